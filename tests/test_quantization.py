"""Quantisation pieces of Q-GaLore (ALGORITHMS.md 7) and bitsandbytes' 8-bit Adam.

Every expected value comes from an independent NumPy reference of the
documented rule (group-wise min-max codes, the dynamic map's closed form,
Adam in float64) or from a bound derived from the quantisation grid itself:

* Q1: int4 round trip within ``scale_g / 2`` for non-clamped codes, codes in
  [0, 15], ``ceil(numel / 2)`` bytes per matrix;
* (a) block-wise dynamic quantisation picks a nearest code, so it is within
  the half-gap of the map around ``x / absmax`` (one gap for the sign rule);
* (b) 8-bit Adam: each step equals a float64 Adam step from the dequantised
  state, and over 50 steps its moments stay within the accumulated
  quantisation error of ``optax.scale_by_adam``'s (and so its updates);
* (c) 8-bit state bytes; (d) zero and non-finite gradients;
* Q4: stochastic rounding is unbiased (3 sigma of the Bernoulli variance).
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import lowrank_optax as lro

F32 = np.float32


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------


def ref_groupwise(x, group_size, bits, clamp_zero=True):
  """The reference rule per matrix (trailing two axes), group by group.

  Float32 arithmetic as the library (and the reference for fp32 tensors);
  the last group holds only the matrix's remaining elements.
  Returns codes (*batch, numel) int64, the unclamped codes, scale, zero and
  the dequantised values, all per matrix.
  """
  x = np.asarray(x, F32)
  nb = max(x.ndim - 2, 0)
  batch = x.shape[:nb]
  numel = math.prod(x.shape[nb:])
  flat = x.reshape(-1, numel)
  levels = F32(2**bits - 1)
  n_groups = -(-numel // group_size)
  codes = np.zeros(flat.shape, np.int64)
  raw = np.zeros(flat.shape, np.float64)
  deq = np.zeros(flat.shape, F32)
  scales = np.zeros((flat.shape[0], n_groups), F32)
  zeros = np.zeros((flat.shape[0], n_groups), F32)
  for b in range(flat.shape[0]):
    for g in range(n_groups):
      sl = slice(g * group_size, min((g + 1) * group_size, numel))
      v = flat[b, sl]
      s = np.maximum(v.max() - v.min(), F32(1e-5)) / levels
      z = -np.round(v.min() / s)
      if clamp_zero:
        z = np.clip(z, F32(0), levels)
      r = np.round(v / s) + z
      q = np.clip(r, F32(0), levels)
      codes[b, sl], raw[b, sl] = q, r
      deq[b, sl] = s * (q - z)
      scales[b, g], zeros[b, g] = s, z
  shp = batch + (numel,)
  return (codes.reshape(shp), raw.reshape(shp), scales.reshape(batch + (-1,)),
          zeros.reshape(batch + (-1,)), deq.reshape(x.shape))


def assert_codes_match(got, want, raw_scaled):
  """Codes equal, except where ``x / s`` is within float32 noise of a .5 tie.

  XLA may divide by the constant ``2^b - 1`` as a multiplication by its
  reciprocal, so ``scale`` can differ from the reference in the last bit.
  """
  frac = np.abs(np.abs(raw_scaled) % 1.0 - 0.5)
  ok = (got == want) | (frac < 1e-4)
  assert np.all(ok), np.argwhere(~ok)[:5]


def np_unpack4(packed, numel):
  packed = np.asarray(packed).astype(np.int64)
  out = np.stack([packed & 15, packed >> 4], axis=-1)
  return out.reshape(*packed.shape[:-1], -1)[..., :numel]


def dynamic_map_closed_form(signed):
  """The map as bitsandbytes' create_dynamic_map defines it, in float64."""
  vals = [0.0, 1.0]
  for i in range(7):
    k = 2**i if signed else 2**(i + 1)
    edges = np.linspace(0.1, 1.0, k + 1)
    mids = 10.0**(i - 6) * (edges[:-1] + edges[1:]) / 2
    vals += list(mids) + (list(-mids) if signed else [])
  return np.sort(np.array(vals))


def map64(signed):
  return lro.create_dynamic_map(signed).astype(np.float64)


def np_dequant_blockwise(bq, block, signed):
  codes = np.asarray(bq.codes).reshape(-1).astype(np.int64)
  absmax = np.repeat(np.asarray(bq.absmax, np.float64), block)[:codes.size]
  return (map64(signed)[codes] * absmax).reshape(bq.codes.shape)


def np_absmax_per_elem(x, block):
  flat = np.abs(np.asarray(x, np.float64)).reshape(-1)
  nblk = -(-flat.size // block)
  padded = np.zeros(nblk * block)
  padded[:flat.size] = flat
  amax = padded.reshape(nblk, block).max(1)
  return np.repeat(amax, block)[:flat.size].reshape(np.shape(x))


def half_gap(y, qmap, sign_rule=False):
  """Largest error of a nearest-code choice for normalised values ``y``.

  Inside the map's range: half the gap of the bracketing pair; outside: the
  distance to the end value. With the sign rule, a negative value in the
  bracket ``[largest negative, 0]`` may take the lower code: one full gap.
  """
  idx = np.searchsorted(qmap, y)
  hi = np.clip(idx, 0, len(qmap) - 1)
  lo = np.clip(idx - 1, 0, len(qmap) - 1)
  hg = np.where(idx == 0, qmap[0] - y,
                np.where(idx == len(qmap), y - qmap[-1],
                         (qmap[hi] - qmap[lo]) / 2))
  if sign_rule:
    neg0 = qmap[np.searchsorted(qmap, 0.0) - 1]
    hg = np.where((y < 0) & (y > neg0), -neg0, hg)
  return np.maximum(hg, 0.0)


def nearest_dist(y, qmap):
  return np.min(np.abs(y[..., None] - qmap), axis=-1)


# ---------------------------------------------------------------------------
# 1. Int4 group quantisation of a basis (Q1)
# ---------------------------------------------------------------------------


def orthonormal(shape, seed):
  x = np.random.default_rng(seed).standard_normal(shape)
  return np.linalg.qr(x)[0].astype(F32)


@pytest.mark.parametrize("shape,group", [((3, 64, 8), 256), ((2, 40, 7), 64),
                                         ((33, 5), 16), ((1000,), 256)])
def test_int4_codes_and_values_match_reference_rule(shape, group):
  x = (orthonormal(shape, 0) if len(shape) > 1 else
       np.random.default_rng(1).standard_normal(shape).astype(F32))
  qa = lro.quantize_int4(jnp.asarray(x), group)
  codes, _, scale, zero, deq = ref_groupwise(x, group, 4)
  numel = math.prod(shape[-2:]) if len(shape) > 1 else shape[0]
  batch = shape[:-2]
  # packed: ceil(numel / 2) bytes per matrix, element 2k in the low nibble
  assert qa.codes.dtype == jnp.uint8
  assert qa.codes.shape == batch + (-(-numel // 2),)
  s_elem = np.repeat(scale, group, axis=-1)[..., :numel]
  assert_codes_match(np_unpack4(qa.codes, numel), codes,
                     x.reshape(codes.shape) / s_elem)
  np.testing.assert_allclose(np.asarray(qa.scale), scale, rtol=2e-7, atol=0)
  np.testing.assert_array_equal(np.asarray(qa.zero), zero)
  assert qa.zero.dtype == jnp.uint8 and qa.scale.dtype == jnp.float32
  back = lro.dequantize_int4(qa, shape, group_size=group)
  np.testing.assert_allclose(np.asarray(back), deq, rtol=1e-6,
                             atol=float(np.max(scale)) * 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_int4_round_trip_bound_q1(seed):
  shape, group = (4, 96, 16), 256   # 1536 = 6 groups per matrix
  x = orthonormal(shape, seed)
  qa = lro.quantize_int4(jnp.asarray(x), group)
  back = np.asarray(lro.dequantize_int4(qa, shape, group_size=group))
  codes, raw, scale, _, _ = ref_groupwise(x, group, 4)
  assert codes.min() >= 0 and codes.max() <= 15
  s_elem = np.repeat(scale, group, axis=-1).reshape(shape)
  unclamped = ((raw >= 0) & (raw <= 15)).reshape(shape)
  err = np.abs(back.astype(np.float64) - x)
  assert unclamped.mean() > 0.99
  assert np.all(err[unclamped] <= s_elem[unclamped] / 2 + 1e-7)
  # the dequantised basis is close to orthonormal (not re-orthonormalised)
  gram = np.einsum("bij,bik->bjk", back, back)
  assert np.max(np.abs(gram - np.eye(16))) < 0.1


def test_int4_last_partial_group_uses_its_own_range():
  # 63 elements per matrix in groups of 16: the last group has 15 elements
  x = np.random.default_rng(2).standard_normal((5, 7, 9)).astype(F32)
  x[:, -1, -1] = 50.0   # an outlier in the last group only
  qa = lro.quantize_int4(jnp.asarray(x), 16)
  _, _, scale, _, deq = ref_groupwise(x, 16, 4)
  np.testing.assert_allclose(np.asarray(qa.scale), scale, rtol=2e-7)
  flat = x.reshape(5, 63)
  np.testing.assert_allclose(
      np.asarray(qa.scale)[:, -1],
      (flat[:, 48:].max(1) - flat[:, 48:].min(1)) / 15, rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(lro.dequantize_int4(qa, x.shape, group_size=16)), deq,
      rtol=0, atol=float(scale.max()) * 1e-5)
  assert qa.codes.shape == (5, 32)


def test_int4_clamp_zero_false_never_clamps():
  rng = np.random.default_rng(3)
  x = (rng.uniform(0.5, 1.0, (2, 32, 16)) + rng.uniform(-3, 3, (2, 1, 1)))
  x = x.astype(F32)  # groups of one sign: the reference's zero is clamped
  ref = lro.dequantize_int4(lro.quantize_int4(jnp.asarray(x), 64), x.shape,
                            group_size=64)
  qa = lro.quantize_int4(jnp.asarray(x), 64, clamp_zero=False)
  assert qa.zero.dtype == jnp.float32
  back = np.asarray(lro.dequantize_int4(qa, x.shape, group_size=64))
  _, raw, scale, _, _ = ref_groupwise(x, 64, 4, clamp_zero=False)
  assert raw.min() >= 0 and raw.max() <= 15
  s_elem = np.repeat(scale, 64, axis=-1).reshape(x.shape)
  err = np.abs(back.astype(np.float64) - x)
  assert np.all(err <= s_elem / 2 + 4 * np.finfo(F32).eps * np.abs(x))
  # while the reference rule (clamped zero) is far off on positive groups
  pos = x.reshape(2, -1, 64).min(-1) > 0
  assert pos.any()
  ref_err = np.abs(np.asarray(ref) - x).reshape(2, -1, 64).max(-1)
  assert np.all(ref_err[pos] > 10 * scale[pos])


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_other_bit_widths(bits):
  x = orthonormal((3, 50, 6), 4)
  qa = lro.quantize_int4(jnp.asarray(x), 64, bits=bits)
  numel = 300
  assert qa.codes.shape == (3, -(-numel * bits // 8))
  codes, raw, scale, zero, deq = ref_groupwise(x, 64, bits)
  back = lro.dequantize_int4(qa, x.shape, group_size=64, bits=bits)
  np.testing.assert_allclose(np.asarray(back), deq, rtol=1e-6,
                             atol=float(scale.max()) * 1e-5)
  per = 8 // bits
  packed = np.asarray(qa.codes).astype(np.int64)
  unpacked = np.stack([(packed >> (bits * j)) & (2**bits - 1)
                       for j in range(per)], -1).reshape(3, -1)[:, :numel]
  s_elem = np.repeat(scale, 64, axis=-1)[..., :numel]
  assert_codes_match(unpacked, codes, x.reshape(3, -1) / s_elem)


q_jit_one = jax.jit(lro.quantize_int4)


def test_int4_jit_vmap_and_batch_axes_are_separate_matrices():
  x = jnp.asarray(orthonormal((4, 64, 8), 5))
  q_eager = lro.quantize_int4(x)
  q_jit = jax.jit(lro.quantize_int4)(x)
  q_vmap = jax.vmap(lro.quantize_int4)(x)
  for a, b in ((q_eager, q_jit), (q_eager, q_vmap)):
    for u, v in zip(a, b):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  for i in (0, 3):  # each matrix alone gives the same codes
    qi = q_jit_one(x[i])
    np.testing.assert_array_equal(np.asarray(qi.codes),
                                  np.asarray(q_eager.codes[i]))
  deq = jax.jit(lambda q: lro.dequantize_int4(q, x.shape, jnp.bfloat16))(
      q_eager)
  assert deq.dtype == jnp.bfloat16 and deq.shape == x.shape
  # explicit batch_ndim: (2, 2, 64, 8) with 2 batch axes
  x4 = x.reshape(2, 2, 64, 8)
  q4 = lro.quantize_int4(x4, batch_ndim=2)
  assert q4.codes.shape == (2, 2, 256)
  np.testing.assert_array_equal(
      np.asarray(lro.dequantize_int4(q4, x4.shape, batch_ndim=2)),
      np.asarray(lro.dequantize_int4(q_eager, x.shape)).reshape(x4.shape))


def test_int4_nonfinite_group_is_nan_not_silent():
  x = np.asarray(orthonormal((64, 8), 6))
  x[3, 2] = np.nan    # first group of 256 (elements 0..255)
  qa = lro.quantize_int4(jnp.asarray(x))
  back = np.asarray(lro.dequantize_int4(qa, x.shape)).reshape(-1)
  assert np.all(np.isnan(back[:256])) and np.all(np.isfinite(back[256:]))


def test_dequantize_with_wrong_layout_raises():
  qa = lro.quantize_int4(jnp.ones((64, 8)))
  with pytest.raises(ValueError, match="do not match"):
    lro.dequantize_int4(qa, (64, 16))
  with pytest.raises(ValueError, match="do not match"):
    lro.dequantize_int4(qa, (64, 8), group_size=128)
  with pytest.raises(ValueError, match="bits"):
    lro.quantize_int4(jnp.ones((4, 4)), bits=3)


# ---------------------------------------------------------------------------
# 2a. bitsandbytes' dynamic map and block-wise quantisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_closed_form(signed):
  m = lro.create_dynamic_map(signed)
  assert m.dtype == np.float32 and m.shape == (256,)
  np.testing.assert_allclose(m, dynamic_map_closed_form(signed), rtol=1e-7,
                             atol=0)
  assert np.all(np.diff(m) > 0)
  assert m[-1] == 1.0 and np.sum(m == 0) == 1
  if signed:
    assert np.sum(m < 0) == 127
    np.testing.assert_array_equal(m[:127], -m[128:255][::-1])
  else:
    assert m[0] == 0.0


def log_uniform_signed(rng, shape, lo=1e-9, hi=1.0):
  mag = np.exp(rng.uniform(np.log(lo), np.log(hi), shape))
  return (mag * rng.choice([-1.0, 1.0], shape)).astype(F32)


@pytest.mark.parametrize("signed,sign_rule", [(True, False), (True, True),
                                              (False, False)])
def test_blockwise_round_trip_within_half_gap(signed, sign_rule):
  rng = np.random.default_rng(7)
  x = log_uniform_signed(rng, (37, 61))  # 2257 = 8 blocks of 256, last 209
  x.reshape(-1)[::97] *= 1e-3          # tiny values relative to absmax
  if not signed:
    x = np.abs(x)
  block = 256
  bq = lro.quantize_blockwise(jnp.asarray(x), block, signed=signed,
                              preserve_sign=sign_rule)
  assert bq.codes.dtype == jnp.uint8 and bq.codes.shape == x.shape
  assert bq.absmax.shape == (9,)
  back = np.asarray(lro.dequantize_blockwise(bq, block, signed=signed),
                    np.float64)
  qmap = map64(signed)
  amax = np_absmax_per_elem(x, block)
  np.testing.assert_array_equal(np.repeat(np.asarray(bq.absmax), block)[
      :x.size].reshape(x.shape), amax.astype(F32))
  y = x / amax
  slack = 2.0**-22 * amax
  err = np.abs(back - x)
  assert np.all(err <= amax * half_gap(y, qmap, sign_rule) + slack)
  if not sign_rule:  # and the chosen code is a nearest one
    chosen = qmap[np.asarray(bq.codes).astype(np.int64)]
    assert np.all(np.abs(chosen - y) <= nearest_dist(y, qmap) + 2.0**-22)
  else:              # no negative value is stored as zero or positive
    assert np.all(back[x < 0] < 0)


def test_blockwise_zero_block_and_bound_constants():
  x = jnp.zeros((5000,)).at[:10].set(jnp.arange(10.0))
  bq = lro.quantize_blockwise(x, 2048)
  np.testing.assert_array_equal(np.asarray(bq.absmax), [9.0, 0.0, 0.0])
  back = lro.dequantize_blockwise(bq, 2048)
  assert np.all(np.isfinite(np.asarray(back)))
  np.testing.assert_array_equal(np.asarray(back)[2048:], 0.0)
  # the largest half-gaps of the maps, from the closed form: 0.9/128, 0.9/256
  assert np.max(np.diff(map64(True))) / 2 == pytest.approx(0.9 / 128, rel=1e-5)
  assert np.max(np.diff(map64(False))) / 2 == pytest.approx(0.9 / 256, rel=1e-5)


# ---------------------------------------------------------------------------
# 2b. 8-bit Adam
# ---------------------------------------------------------------------------

B1, B2, EPS = 0.9, 0.999, 1e-8


def adam_grads(shape, steps, seed, scale_drift=True):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = rng.standard_normal(shape)
    if scale_drift:  # magnitudes spread over a few decades, drifting
      g *= np.exp(rng.uniform(-4, 1, shape[-1:])) * (1 + 0.5 * np.sin(t / 5))
    out.append(g.astype(F32))
  return out


def test_adam_8bit_each_step_is_float64_adam_from_dequantised_state():
  shape, block = (50, 90), 2048     # 4500: blocks 2048, 2048, 404
  tx = lro.scale_by_adam_8bit(B1, B2, EPS, block_size=block)
  state = tx.init(jnp.zeros(shape))
  step = jax.jit(tx.update)
  qm, qv = map64(True), map64(False)
  for t, g in enumerate(adam_grads(shape, 20, 0), start=1):
    m_prev = np_dequant_blockwise(state.mu, block, True)
    v_prev = np_dequant_blockwise(state.nu, block, False)
    g64 = g.astype(np.float64)
    m = B1 * m_prev + (1 - B1) * g64
    v = B2 * v_prev + (1 - B2) * g64**2
    u_ref = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    u, state = step(jnp.asarray(g), state)
    assert int(state.count) == t
    np.testing.assert_allclose(np.asarray(u), u_ref, rtol=2e-5, atol=1e-6)
    # the stored moments: nearest codes of the new m, v in their blocks
    am, av = np_absmax_per_elem(m, block), np_absmax_per_elem(v, block)
    m_hat = np_dequant_blockwise(state.mu, block, True)
    v_hat = np_dequant_blockwise(state.nu, block, False)
    assert np.all(np.abs(m_hat - m) <=
                  am * half_gap(m / am, qm, True) + 2.0**-20 * am)
    assert np.all(np.abs(v_hat - v) <=
                  av * half_gap(v / av, qv) + 2.0**-20 * av)


def test_adam_8bit_tracks_optax_adam_within_accumulated_quantisation_error():
  """50 steps against optax.scale_by_adam (float32 moments).

  With ``m8`` the 8-bit trajectory before requantisation, ``Q(m8) - m8`` is at
  most the half-gap ``H_t`` (times the block's absmax), and ``m8_t - m_t =
  b1 (Q(m8_{t-1}) - m_{t-1})``, so elementwise ``|m_hat_t - m_t| <= E_t``
  with ``E_t = b1 E_{t-1} + H_t`` (the same for v with b2). The update
  difference then follows from ``u = M / (sqrt(V) + eps)``:
  ``|u8 - u| <= dM / (s8 + eps) + |M| dV / ((s8 + s)(s8 + eps)(s + eps))``.
  """
  shape, block = (64, 100), 256
  tx8 = lro.scale_by_adam_8bit(B1, B2, EPS, block_size=block,
                               min_8bit_size=0)
  tx = optax.scale_by_adam(B1, B2, EPS)
  s8, s = tx8.init(jnp.zeros(shape)), tx.init(jnp.zeros(shape))
  step8, step = jax.jit(tx8.update), jax.jit(tx.update)
  qm, qv = map64(True), map64(False)
  em = np.zeros(shape)
  ev = np.zeros(shape)
  rel = []
  for t, g in enumerate(adam_grads(shape, 50, 1), start=1):
    g64 = g.astype(np.float64)
    m8 = B1 * np_dequant_blockwise(s8.mu, block, True) + (1 - B1) * g64
    v8 = B2 * np_dequant_blockwise(s8.nu, block, False) + (1 - B2) * g64**2
    u8, s8 = step8(jnp.asarray(g), s8)
    u, s = step(jnp.asarray(g), s)
    m, v = np.asarray(s.mu, np.float64), np.asarray(s.nu, np.float64)
    fl_m = 2.0**-20 * (np.abs(m) + np_absmax_per_elem(m, block))
    fl_v = 2.0**-20 * (np.abs(v) + np_absmax_per_elem(v, block))
    em_pre, ev_pre = B1 * em + fl_m, B2 * ev + fl_v
    assert np.all(np.abs(m8 - m) <= em_pre)
    assert np.all(np.abs(v8 - v) <= ev_pre)
    am, av = np_absmax_per_elem(m8, block), np_absmax_per_elem(v8, block)
    em = em_pre + am * half_gap(m8 / am, qm, True)
    ev = ev_pre + av * half_gap(v8 / av, qv)
    m_hat = np_dequant_blockwise(s8.mu, block, True)
    v_hat = np_dequant_blockwise(s8.nu, block, False)
    assert np.all(np.abs(m_hat - m) <= em)
    assert np.all(np.abs(v_hat - v) <= ev)
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    big_m, sq = m / bc1, np.sqrt(v / bc2)
    sq8 = np.sqrt(v8 / bc2)
    bound = (em_pre / bc1 / (sq8 + EPS) + np.abs(big_m) * (ev_pre / bc2) /
             ((sq8 + sq) * (sq8 + EPS) * (sq + EPS)))
    u8, u = np.asarray(u8, np.float64), np.asarray(u, np.float64)
    assert np.all(np.abs(u8 - u) <= bound + 1e-5 * np.abs(u) + 1e-6)
    rel.append(np.linalg.norm(u8 - u) / np.linalg.norm(u))
  # the resulting drift, measured: 3-4% of the update's norm (a guard, the
  # bounds above are the test)
  assert max(rel) < 0.06


@pytest.mark.parametrize("shape,block", [((64, 64), 2048), ((4, 50, 30), 2048),
                                         ((4097,), 256), ((3, 7, 5, 11), 64)])
def test_adam_8bit_state_is_8bit(shape, block):
  tx = lro.scale_by_adam_8bit(block_size=block, min_8bit_size=0)
  state = jax.eval_shape(tx.init, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
  numel = math.prod(shape)
  for moment in (state.mu, state.nu):
    assert moment.codes.dtype == jnp.uint8 and moment.codes.shape == shape
    assert moment.absmax.dtype == jnp.float32
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(moment))
    assert nbytes == numel + 4 * math.ceil(numel / block)


def test_adam_8bit_small_leaves_keep_float32_moments_like_bitsandbytes():
  params = {"small": jnp.zeros((10, 40)), "big": jnp.zeros((64, 64))}
  tx = lro.scale_by_adam_8bit()           # min_8bit_size=4096
  state = tx.init(params)
  assert state.mu["small"].dtype == jnp.float32
  assert isinstance(state.mu["big"], lro.BlockwiseQuantized)
  ref = optax.scale_by_adam(B1, B2, EPS)
  rs = ref.init(params)
  step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
  for g in adam_grads((10, 40), 5, 2):
    grads = {"small": jnp.asarray(g), "big": jnp.ones((64, 64))}
    u, state = step(grads, state)
    ur, rs = ref_step(grads, rs)
    np.testing.assert_allclose(np.asarray(u["small"]), np.asarray(ur["small"]),
                               rtol=1e-6, atol=1e-7)


def test_adam_8bit_zero_gradients():
  tx = lro.scale_by_adam_8bit(block_size=256, min_8bit_size=0)
  state = tx.init(jnp.zeros((30, 30)))
  step = jax.jit(tx.update)
  for _ in range(3):
    u, state = step(jnp.zeros((30, 30)), state)
    np.testing.assert_array_equal(np.asarray(u), 0.0)
  np.testing.assert_array_equal(np.asarray(state.mu.absmax), 0.0)
  np.testing.assert_array_equal(np.asarray(state.nu.absmax), 0.0)
  # a gradient that is zero on one block only: that block stays exactly zero
  g = jnp.zeros((30, 30)).reshape(-1).at[256:].set(1.0).reshape(30, 30)
  u, state = step(g, state)
  flat = np.asarray(u).reshape(-1)
  np.testing.assert_array_equal(flat[:256], 0.0)
  # step 4 with m = 0.1, v = 0.001 after zeros: u = (0.1/bc1)/(sqrt(0.001/bc2)+eps)
  bc1, bc2 = 1 - B1**4, 1 - B2**4
  np.testing.assert_allclose(flat[256:], (0.1 / bc1) /
                             (np.sqrt(0.001 / bc2) + EPS), rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_adam_8bit_nonfinite_gradients(skip):
  tx = lro.scale_by_adam_8bit(block_size=256, min_8bit_size=0,
                              skip_nonfinite=skip)
  state = tx.init(jnp.zeros((600,)))
  step = jax.jit(tx.update)
  g0 = jnp.asarray(adam_grads((600,), 1, 3)[0])
  _, state = step(g0, state)
  bad = jnp.array([5, 300, 599])
  g = g0.at[bad].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  u, state = step(g, state)
  u = np.asarray(u)
  mask = np.zeros(600, bool)
  mask[np.asarray(bad)] = True
  if skip:
    np.testing.assert_array_equal(u[mask], 0.0)
  else:
    assert np.all(np.isnan(u[mask]))
  assert np.all(np.isfinite(u[~mask]))
  # the moments of those elements are reset to 0 (bitsandbytes); no block is
  # poisoned: absmax stays finite and the next step is finite everywhere
  np.testing.assert_array_equal(
      np.asarray(lro.dequantize_blockwise(state.mu, 256))[mask], 0.0)
  np.testing.assert_array_equal(
      np.asarray(lro.dequantize_blockwise(state.nu, 256, signed=False))[mask],
      0.0)
  assert np.all(np.isfinite(np.asarray(state.mu.absmax)))
  u, _ = step(g0, state)
  assert np.all(np.isfinite(np.asarray(u)))
  # with optax.apply_if_finite the NaN update skips the whole step
  if not skip:
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=5)
    gs = guarded.init(jnp.zeros((600,)))
    u, gs2 = jax.jit(guarded.update)(g, gs)
    np.testing.assert_array_equal(np.asarray(u), 0.0)
    assert int(gs2.notfinite_count) == 1


def test_adam_8bit_dtypes_jit_params_none_and_stable_state():
  params = {"w": jnp.zeros((80, 70), jnp.bfloat16), "b": jnp.zeros((70,))}
  tx = lro.scale_by_adam_8bit(block_size=512, min_8bit_size=0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  struct = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for g in adam_grads((80, 70), 3, 4):
    grads = {"w": jnp.asarray(g, jnp.bfloat16), "b": jnp.asarray(g[0])}
    u, state = step(grads, state, None)
    assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == struct
  # hyper-parameters can be injected (traced b1, b2, eps)
  inj = optax.inject_hyperparams(lro.scale_by_adam_8bit,
                                 static_args=("block_size", "min_8bit_size"))(
                                     b1=0.9, b2=0.99, block_size=512,
                                     min_8bit_size=0)
  s = inj.init(params)
  u, s = jax.jit(inj.update)(grads, s)
  assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))


def test_adam_8bit_runs_in_the_subspace_of_lro_chain():
  shapes = {"attn": (64, 48), "mlp": (3, 32, 96), "norm": (48,)}
  rng = np.random.default_rng(5)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()}
  tx = lro.chain(lro.galore_project(8, update_proj_gap=5),
                 lro.scale_by_adam_8bit(block_size=256, min_8bit_size=0),
                 lro.back_project(), optax.scale_by_learning_rate(1e-2))
  state = tx.init(params)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  assert jax.tree.structure(tx.init(abstract)) == jax.tree.structure(state)
  step = jax.jit(tx.update)
  for t in range(7):
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for k, s in shapes.items()}
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))
  adam_states = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, lro.ScaleByAdam8bitState))
                 if isinstance(x, lro.ScaleByAdam8bitState)]
  assert adam_states
  codes = {x.mu.codes.shape for x in adam_states}
  # low-rank moments, not full-size ones: (64, 48) -> rank 8 on the smaller
  # dim; (3, 32, 96) -> batch of 3 low-rank matrices; the norm is full rank
  assert all(math.prod(c) < 64 * 48 for c in codes)
  assert (48,) in codes
  assert all(int(x.count) == 7 for x in adam_states)


# ---------------------------------------------------------------------------
# 3. Stochastic rounding (Q4)
# ---------------------------------------------------------------------------

N_DRAWS = 10_000


def test_stochastic_round_int8_picks_a_neighbour_after_the_reference_order():
  rng = np.random.default_rng(8)
  w = rng.uniform(-1, 1, (6, 100)).astype(F32)   # 600 = 3 groups, last 88
  qa = lro.stochastic_round_int8(jnp.asarray(w), jax.random.key(0))
  codes, _, scale, zero, _ = ref_groupwise(w, 256, 8)
  np.testing.assert_allclose(np.asarray(qa.scale), scale, rtol=2e-7)
  np.testing.assert_array_equal(np.asarray(qa.zero), zero)
  scale = np.asarray(qa.scale)      # the grid the codes refer to
  s = np.repeat(scale, 256)[:600].reshape(w.shape)
  z = np.repeat(zero, 256)[:600].reshape(w.shape)
  y = w / s                                   # float32, as the rule
  lo = np.clip(np.floor(y) + z, 0, 255)
  hi = np.clip(np.ceil(y) + z, 0, 255)
  q = np.asarray(qa.codes).astype(np.float32)
  assert qa.codes.shape == w.shape and qa.codes.dtype == jnp.uint8
  assert np.all((q == lo) | (q == hi))
  assert 0.3 < np.mean(q == hi) < 0.7          # both neighbours occur
  back = lro.dequantize_int8(qa)
  assert np.all(np.abs(np.asarray(back) - w) <= s * (1 + 1e-5))


def sr_int8_draws(w, n, group):
  keys = jax.random.split(jax.random.key(42), n)
  f = jax.jit(jax.vmap(lambda k: lro.dequantize_int8(
      lro.stochastic_round_int8(w, k, group), group_size=group)))
  return np.asarray(f(keys), np.float64)


def test_stochastic_round_int8_is_unbiased_q4():
  rng = np.random.default_rng(9)
  w = rng.uniform(-0.7, 1.3, (2, 256)).astype(F32)   # 2 groups of 256
  draws = sr_int8_draws(jnp.asarray(w), N_DRAWS, 256)
  mean = draws.mean(0)
  _, _, scale, zero, _ = ref_groupwise(w, 256, 8)
  s = np.repeat(scale, 256).reshape(w.shape).astype(np.float64)
  z = np.repeat(zero, 256).reshape(w.shape).astype(np.float64)
  y = (w / s.astype(F32)).astype(np.float64)
  p = y - np.floor(y)
  # Bernoulli(p) between the two grid neighbours: sigma = s sqrt(p(1-p)/N)
  sigma = s * np.sqrt(p * (1 - p) / N_DRAWS)
  lo_c, hi_c = np.floor(y) + z, np.ceil(y) + z
  inside = (lo_c >= 0) & (hi_c <= 255)
  assert inside.mean() > 0.99
  # expectation of the rule with the clip: w itself for interior elements
  expect = s * ((1 - p) * np.clip(lo_c, 0, 255) + p * np.clip(hi_c, 0, 255)
                - z)
  np.testing.assert_allclose(expect[inside], w[inside], rtol=0, atol=1e-6)
  slack = 1e-6 * s
  zscore = np.abs(mean - expect) / (sigma + slack)
  assert np.all(np.abs(mean - w)[inside] <= 5 * sigma[inside] + slack[inside])
  assert np.mean(zscore[inside] > 3) < 0.01     # expected 0.27%
  # the spec's Q4 as one statistic: the mean error over all interior elements
  tot = np.mean((mean - w)[inside])
  tot_sigma = np.sqrt(np.sum(sigma[inside]**2)) / inside.sum()
  assert abs(tot) <= 3 * tot_sigma
  # the group ends outside the grid (a property of the reference's rounded
  # zero) are pulled inwards by s * frac < s / 2, and match that prediction
  assert np.all(zscore[~inside] <= 5)
  assert np.all(np.abs(expect - w)[~inside] < s[~inside] / 2)


def bf16_neighbours(x):
  """The two bfloat16 values around float32 ``x`` (toward / away from 0)."""
  bits = np.asarray(x, F32).view(np.uint32)
  down = (bits & np.uint32(0xFFFF0000)).view(F32)
  up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(F32)
  return down.astype(np.float64), up.astype(np.float64)


def test_stochastic_round_to_bf16_neighbours_and_unbiased_q4():
  rng = np.random.default_rng(10)
  x = log_uniform_signed(rng, (300,), 1e-30, 1e30)
  x[:3] = [1.0, -2.5, 0.0]                     # exactly representable
  draws = jax.jit(jax.vmap(lro.stochastic_round_to_bf16, in_axes=(None, 0)))(
      jnp.asarray(x), jax.random.split(jax.random.key(1), N_DRAWS))
  assert draws.dtype == jnp.bfloat16
  d = np.asarray(draws.astype(jnp.float32), np.float64)
  lo, hi = bf16_neighbours(x)
  assert np.all((d == lo) | (d == hi))
  np.testing.assert_array_equal(d[:, :3], np.broadcast_to(x[:3], (N_DRAWS, 3)))
  p = (x.astype(np.float64) - lo) / (hi - lo)
  sigma = np.abs(hi - lo) * np.sqrt(p * (1 - p) / N_DRAWS)
  err = np.abs(d.mean(0) - x)
  assert np.all(err <= 5 * sigma + 1e-300)
  assert np.mean(err > 3 * sigma) < 0.02      # expected 0.27%
  # round-to-nearest agrees with the majority neighbour
  rtn = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  far = np.abs(p - 0.5) > 0.05
  majority = np.where(np.mean(d == hi, 0) > 0.5, hi, lo)
  np.testing.assert_array_equal(majority[far], rtn[far])


def test_stochastic_round_to_bf16_special_values():
  x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.0, 3.0e38], jnp.float32)
  y = np.asarray(lro.stochastic_round_to_bf16(x, jax.random.key(0))
                 .astype(jnp.float32))
  assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf
  assert y[3] == 0.0 and np.signbit(y[3])
  assert y[4] in bf16_neighbours(np.float32(3.0e38))


def test_apply_updates_int8():
  rng = np.random.default_rng(11)
  w = rng.uniform(-1, 1, (2, 32, 24)).astype(F32)   # 768 = 3 groups/matrix
  qp = {"w": lro.quantize_int8(jnp.asarray(w)), "b": jnp.ones(5),
        "frozen": None}
  upd = {"w": jnp.asarray(rng.normal(0, 1e-3, w.shape), jnp.float32),
         "b": jnp.full(5, 0.5), "frozen": None}
  out = jax.jit(lro.apply_updates_int8)(qp, upd, jax.random.key(3))
  assert isinstance(out["w"], lro.QuantizedArray) and out["frozen"] is None
  np.testing.assert_array_equal(np.asarray(out["b"]), 1.5)
  target = np.asarray(lro.dequantize_int8(qp["w"])) + np.asarray(upd["w"])
  # scale and zero recomputed from the updated groups; error < one step
  _, _, scale, zero, _ = ref_groupwise(target, 256, 8)
  np.testing.assert_allclose(np.asarray(out["w"].scale), scale, rtol=1e-6)
  s = np.repeat(scale, 256, axis=-1).reshape(w.shape)
  assert np.all(np.abs(np.asarray(lro.dequantize_int8(out["w"])) - target)
                <= s * (1 + 1e-5))
  det = lro.apply_updates_int8(qp, upd, jax.random.key(3), stochastic=False)
  np.testing.assert_array_equal(
      np.asarray(det["w"].codes),
      np.asarray(lro.quantize_int8(jnp.asarray(target)).codes))


# ---------------------------------------------------------------------------
# Sharded arrays (8 virtual CPU devices, see conftest.py)
# ---------------------------------------------------------------------------


def test_explicit_mesh_keeps_shardings_and_values():
  """In an explicit mesh the grouping runs in ``auto_axes``: shardings kept."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((8,), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  g_host = adam_grads((256, 60), 2, 12)
  tx = lro.scale_by_adam_8bit(block_size=256, min_8bit_size=0)
  state = tx.init(jnp.zeros((256, 60)))
  for g in g_host:
    u_ref, state = tx.update(jnp.asarray(g), state)
  basis = orthonormal((8, 64, 16), 13)
  q_ref = lro.quantize_int4(jnp.asarray(basis))
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, P("x", None))
    tx_state = jax.jit(tx.init)(jax.device_put(jnp.zeros((256, 60)), spec))
    step = jax.jit(tx.update)
    for g in g_host:
      u, tx_state = step(jax.device_put(jnp.asarray(g), spec), tx_state)
    assert tx_state.mu.codes.sharding.spec == P("x", None)
    assert u.sharding.spec == P("x", None)
    np.testing.assert_allclose(np.asarray(u), np.asarray(u_ref), rtol=1e-5,
                               atol=1e-6)
    xb = jax.device_put(jnp.asarray(basis),
                        jax.sharding.NamedSharding(mesh, P("x", None, None)))
    qa = jax.jit(lro.quantize_int4)(xb)
    assert qa.codes.sharding.spec == P("x", None)
    np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(q_ref.codes))
    back = jax.jit(lambda q: lro.dequantize_int4(q, basis.shape))(qa)
    assert back.sharding.spec == P("x", None, None)
    qw = jax.jit(lro.stochastic_round_int8)(xb, jax.random.key(0))
    assert qw.codes.sharding.spec == P("x", None, None)
