"""Q-GaLore: ALGORITHMS.md 7 (Q1-Q4), the lazy refresh, memory, int8 weights.

References here are written from ALGORITHMS.md 7 and the official
``q_galore_torch`` code: the group-wise min-max quantiser and its decoding
in NumPy (codes packed low nibble first), the interval rule as a schedule
table, and a float64 GaLore step with PyTorch-style Adam in PyTorch layout
(``W = K^T``, out x in) that projects with the decoded basis, as the
reference's ``project`` / ``project_back`` do.
"""

import dataclasses
import doctest
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lowrank_optax as lro
import _mlp
from lowrank_optax.projectors.base import BasisState


# ---------------------------------------------------------------------------
# NumPy reference of the quantiser (q_galore_projector.py `_quantize`)
# ---------------------------------------------------------------------------


def quantize_ref(w, group_size, bits=4):
  """float32 groups of the flattened ``w``: (codes, scales, zeros) per group."""
  flat = np.asarray(w, np.float32).reshape(-1, group_size)
  levels = np.float32(2**bits - 1)
  hi, lo = flat.max(1, keepdims=True), flat.min(1, keepdims=True)
  scales = np.maximum(hi - lo, np.float32(1e-5)) / levels
  zeros = np.clip(-np.round(lo / scales), 0, levels)
  codes = np.clip(np.round(flat / scales) + zeros, 0, levels)
  return codes, scales[:, 0], zeros[:, 0]


def decode(qa, numel, group_size):
  """Our packed int4 codes (one matrix) -> (codes per group, dequantised)."""
  packed = np.asarray(qa.codes).reshape(-1)
  codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(-1)[:numel]
  n_groups = -(-numel // group_size)
  codes = np.pad(codes.astype(np.float32), (0, n_groups * group_size - numel))
  codes = codes.reshape(n_groups, group_size)
  scale = np.asarray(qa.scale, np.float32).reshape(-1, 1)
  zero = np.asarray(qa.zero, np.float32).reshape(-1, 1)
  return codes, (scale * (codes - zero)).reshape(-1)[:numel]


def plan_of(shape, rank, proj_type="std"):
  (plan,) = lro.plan_leaves({"w": jnp.zeros(shape)}, rank, proj_type)
  return plan


# ---------------------------------------------------------------------------
# Q1: the stored basis, in the reference's layout and grouping
# ---------------------------------------------------------------------------


AXES = {"reduction": ("rows",), "output": ("cols",), "both": ("rows", "cols")}


@pytest.mark.parametrize("shape,proj_type,side", [
    ((64, 96), "std", "reduction"), ((96, 64), "std", "output"),
    ((64, 96), "full", "both")])
def test_q1_basis_is_quantised_as_the_reference(shape, proj_type, side):
  """Codes, scales, zeros equal the reference rule applied to B or A.

  Flax ``(64, 96)`` is PyTorch ``W`` 96 x 64 (``right``): the reference
  quantises ``B = Vh[:r]`` (r x 64) = our ``Q^T``; ``(96, 64)`` is ``left``:
  ``A = U[:, :r]`` (64 x r) = our ``Q``; ``full`` keeps both. With ``r = 8``
  the 512 entries of a 64-row basis form two groups of 256, and the two
  orientations put different entries in a group, so a transposed layout
  fails.
  """
  r, gs = 8, 256
  plan = plan_of(shape, r, proj_type)
  assert plan.side == side
  a = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  svd = lro.projectors.SVDProjector()
  qp = lro.projectors.QuantizedProjector(group_size=gs)
  kw = dict(first=True, key=jax.random.key(0), count=jnp.int32(0))
  floats = svd.compute(plan, a, svd.init(plan, jnp.float32), **kw)
  state = qp.compute(plan, a, qp.init(plan, jnp.float32), **kw)
  deqs = qp.dequantized_bases(plan, state)
  assert len(state.basis) == len(AXES[side])
  for ax, q, qa, deq, first in zip(AXES[side], floats, state.basis, deqs,
                                   state.first):
    q = np.asarray(q)
    ref_matrix = q.T if ax == "rows" else q  # B (r x in) or A (out x r)
    codes, scales, zeros = quantize_ref(ref_matrix, gs)
    got_codes, got = decode(qa, q.size, gs)
    assert qa.codes.shape == (q.size // 2,)  # packed: 4 bits each
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_allclose(qa.scale, scales, rtol=1e-6)
    np.testing.assert_array_equal(qa.zero, zeros)
    assert got_codes.min() >= 0 and got_codes.max() <= 15
    # Round trip: within half a step of each group's scale (none clamped).
    err = np.abs(got - ref_matrix.reshape(-1)).reshape(-1, gs)
    assert np.all(err <= scales[:, None] / 2 + 1e-7)
    # down / up use the dequantised basis (not re-orthonormalised).
    got = got.reshape(ref_matrix.shape)
    np.testing.assert_allclose(deq, got.T if ax == "rows" else got, rtol=0,
                               atol=1e-7)
    deq = np.asarray(deq)
    assert np.abs(deq.T @ deq - np.eye(r)).max() > 1e-4  # not orthonormal
    # The vector kept for the cosine rule: Vh[0] (right) / U[:, 0] (left).
    np.testing.assert_array_equal(first, q[:, 0])


# ---------------------------------------------------------------------------
# Q2: the lazy, layer-adaptive interval
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FirstColumns(lro.projectors.BasisProjector):
  """Stand-in inner projector: the basis is G's first r columns, normalised.

  Unlike an SVD its signs and angles are set by the test's gradients.
  """

  def new_basis(self, plan, a, prev, *, axis, first, key):
    c = a[..., :, :plan.rank]
    return c / jnp.linalg.norm(c, axis=-2, keepdims=True)


def schedule_table(t0, steps, gamma=2, queue=5):
  """The reference's rule for cos = 1 at every refresh: (refresh step, T after)."""
  out, t, n = [], t0, 0
  for k in range(steps):
    if k % t == 0:
      if n >= 1 and n >= queue:  # n cosines seen before + this one
        t = int(gamma * t)
      n += 1
      out.append((k, t))
  return out


def test_schedule_table_is_the_spec():
  """ALGORITHMS.md 7 Q2, literally: refreshes 0..1000, T 400 at 1000, ..."""
  table = schedule_table(200, 3400)
  assert [k for k, _ in table] == [0, 200, 400, 600, 800, 1000, 1200, 1600,
                                   3200]
  assert dict(table)[1000] == 400 and dict(table)[1200] == 800
  assert dict(table)[1600] == 1600 and dict(table)[3200] == 3200


THETA_HI, THETA_LO = math.acos(0.45), math.acos(0.35)


@pytest.mark.parametrize("abs_cos", [False, True])
def test_q2_adaptive_interval_per_matrix(abs_cos):
  """Four stacked matrices, driven over counts 0..3400 with a stand-in basis.

  0: constant basis (cos = +1): the Q2 schedule. 1: the basis flips sign at
  every refresh (cos = -1): never grows with the signed cosine, grows like 0
  with ``abs_cos``. 2 / 3: the first vector turns by a fixed angle per
  200 steps, cos 0.45 / 0.35: the mean crosses the threshold 0.4 or not
  (matrix 2 grows at 1000; later its steps span several angles, not
  checked). Each matrix keeps its own interval and FIFO.
  """
  shape, r, t0 = (4, 6, 8), 2, 200
  plan = plan_of(shape, r)
  assert plan.side == "reduction" and plan.batch_shape == (4,)
  proj = lro.projectors.QuantizedProjector(
      inner=FirstColumns(), group_size=4, initial_interval=t0,
      abs_cos=abs_cos)

  def grad(k):
    j = (k // t0).astype(jnp.float32)
    e = jnp.eye(6, 8)
    def turned(theta):
      first = jnp.zeros(6).at[0].set(jnp.cos(j * theta)).at[1].set(
          jnp.sin(j * theta))
      return e.at[:, 0].set(first).at[:, 1].set(jnp.eye(6)[2])
    flip = jnp.where((k // t0) % 2 == 0, 1.0, -1.0)
    return jnp.stack([e, flip * e, turned(THETA_HI), turned(THETA_LO)])

  def body(state, k):
    refresh = proj.should_refresh(plan, state, k, k == 0)
    due = proj.due(state, k) & refresh
    state = jax.lax.cond(
        refresh, lambda s: proj.refresh(plan, grad(k), s, k == 0,
                                        jax.random.key(0), count=k),
        lambda s: s, state)
    return state, (due, state.interval)

  run = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(3401)))
  state, (due, interval) = run(proj.init(plan, jnp.float32))
  due, interval = np.asarray(due), np.asarray(interval)
  table = schedule_table(t0, 3401)
  every_200 = list(range(0, 3401, 200))
  for b in range(4):
    got = list(np.nonzero(due[:, b])[0])
    if b == 0 or (b == 1 and abs_cos):
      assert got == [k for k, _ in table], (b, got)
      for k, t in table:
        assert interval[k, b] == t, (b, k, interval[k, b], t)
    elif b in (1, 3):
      assert got == every_200, (b, got)
      assert np.all(interval[:, b] == t0)
    else:  # b == 2: grows at 1000 exactly
      assert got[:6] == every_200[:6]
      assert interval[999, b] == 200 and interval[1000, b] == 400
    assert int(state.refreshes[b]) == len(got)


def test_q2_through_the_recipe_with_the_svd():
  """Constant G, T0 = 2, queue 2: refreshes at 0, 2, 4 (T 4), 8 (T 8), 16 (T 16)."""
  tx = lro.q_galore(1e-3, rank=2, update_proj_gap=2, queue_size=2,
                    proj_group_size=16)
  params = {"w": jnp.zeros((16, 24))}
  g = {"w": jax.random.normal(jax.random.key(0), (16, 24))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  refreshed, seen = [], 0
  for k in range(20):
    _, state = step(g, state, params)
    ps = lro.subspace_state(state).projector[0]
    if int(ps.refreshes) > seen:
      refreshed.append(k)
      seen = int(ps.refreshes)
  assert refreshed == [0, 2, 4, 8, 16]
  assert int(ps.interval) == 16
  np.testing.assert_allclose(ps.cosines, 1.0, rtol=1e-5)  # signed, same SVD


# ---------------------------------------------------------------------------
# Q3: no quantisation and no growth is GaLore with the same inner Adam
# ---------------------------------------------------------------------------


def test_q3_unquantised_without_growth_equals_galore_with_adam_8bit():
  lr, wd, gap, r = 1e-2, 0.1, 3, 4
  rng = np.random.default_rng(1)
  params = {"bias": jnp.asarray(rng.standard_normal(24), jnp.float32),
            "w": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)}
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), params) for _ in range(8)]
  q = lro.q_galore(lr, rank=r, update_proj_gap=gap, weight_decay=wd,
                   proj_bits=None, gamma_proj=1, min_8bit_size=0)
  galore = lro.skip_nonfinite_steps(lro.chain(
      lro.galore_project(r, update_proj_gap=gap, scale=0.25, projector="svd"),
      lro.scale_by_adam_8bit(b1=0.9, b2=0.95, eps=1e-8, min_8bit_size=0),
      lro.back_project(), optax.scale_by_learning_rate(lr),
      lro.decay_updated_weights(lr, wd)))
  traj = []
  for tx in (q, galore):
    state, p, us = tx.init(params), params, []
    step = jax.jit(tx.update)
    for g in grads:  # refreshes at 0, 3, 6
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
      us.append(u)
    traj.append(us)
    if tx is q:
      assert int(lro.subspace_state(state).projector[1].refreshes) == 3
  for a, b in zip(*traj):
    for k in params:
      np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------
# The recipe against a float64 reference (int4 basis, float Adam)
# ---------------------------------------------------------------------------


def test_recipe_matches_float64_reference_with_the_decoded_basis():
  """GaLore step of QGaLoreAdamW8bit's shape, PyTorch Adam, alpha, post decay.

  ``inner="adam"`` (float moments) so the reference is exact; the basis is
  the decoded int4 one (checked against the reference quantiser in Q1). The
  pass-through bias gets PyTorch AdamW with the same post-update decay.
  """
  lr, wd, alpha, gap, r, gs = 0.02, 0.1, 0.25, 2, 4, 32
  b1, b2, eps = 0.9, 0.95, 1e-8
  rng = np.random.default_rng(2)
  w0 = {"bias": rng.standard_normal(40), "w": rng.standard_normal((16, 40))}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
  tx = lro.q_galore(lr, rank=r, update_proj_gap=gap, weight_decay=wd,
                    inner="adam", proj_group_size=gs)
  state = tx.init(params)
  step = jax.jit(tx.update)
  w = w0["w"].T.copy()  # PyTorch layout 40 x 16: right (reduce in = 16)
  bias = w0["bias"].copy()
  mw = vw = mb = vb = 0.0
  for t in range(5):  # refreshes at 0, 2, 4
    g = {k: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32)
         for k, x in w0.items()}
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    ps = lro.subspace_state(state).projector[1]
    _, bmat = decode(ps.basis[0], r * 16, gs)
    bmat = bmat.reshape(r, 16).astype(np.float64)  # B = Vh[:r], decoded
    gt = np.asarray(g["w"], np.float64).T
    rr = gt @ bmat.T
    n = t + 1
    mw = b1 * mw + (1 - b1) * rr
    vw = b2 * vw + (1 - b2) * rr * rr
    upd = (mw / (1 - b1**n)) / (np.sqrt(vw / (1 - b2**n)) + eps)
    w = w - lr * alpha * upd @ bmat
    w = w - lr * wd * w
    gb = np.asarray(g["bias"], np.float64)
    mb = b1 * mb + (1 - b1) * gb
    vb = b2 * vb + (1 - b2) * gb * gb
    bias = bias - lr * (mb / (1 - b1**n)) / (np.sqrt(vb / (1 - b2**n)) + eps)
    bias = bias - lr * wd * bias
    np.testing.assert_allclose(np.asarray(params["w"]).T, w, rtol=1e-5,
                               atol=1e-6, err_msg=f"step {t}")
    np.testing.assert_allclose(params["bias"], bias, rtol=1e-5, atol=1e-6)
  assert int(ps.refreshes) == 3 and int(ps.interval) == gap


# ---------------------------------------------------------------------------
# Memory (ALGORITHMS.md 12)
# ---------------------------------------------------------------------------


def test_memory_report_matches_algorithms_12_row():
  """rn at 4 bits + scale/zero per 256; 2mr at 8 bits + absmax per block."""
  m, n, r = 512, 256, 32  # PyTorch W m x n (m >= n): Flax kernel (n, m)
  params = {"mlp": jax.ShapeDtypeStruct((n, m), jnp.float32)}
  rep = lro.memory_report(lro.q_galore(1e-2, rank=r), params)
  (leaf,) = rep.leaves
  basis = r * n // 2 + math.ceil(r * n / 256) * (4 + 1)  # codes, f32 + u8
  moments = 2 * (m * r + 4 * math.ceil(m * r / 2048))  # u8 codes + f32 absmax
  extras = 4 * n + 4 + 4 + 5 * 4 + 4  # first vector, T, count, FIFO, Adam t
  assert leaf.state_bytes == basis + moments + extras
  galore = lro.memory_report(lro.galore(1e-2, rank=r), params).leaves[0]
  assert galore.state_bytes == 4 * (r * n + 2 * m * r) + 4
  assert leaf.state_bytes < 0.3 * galore.state_bytes


# ---------------------------------------------------------------------------
# Training, int8 weights
# ---------------------------------------------------------------------------


def test_trains_a_small_mlp_with_float_and_int8_weights():
  """Float weights: a lower loss. Int8 kernels (the docstring's pattern):
  one update lands within one quantisation step of ``w + u`` and training
  on the int8 weights lowers the loss too."""
  params, loss = _mlp.mlp_problem_24_32_16()
  tx = lro.q_galore(1e-2, rank=4, update_proj_gap=20, min_8bit_size=0)
  update = jax.jit(tx.update)
  grad = jax.jit(jax.value_and_grad(loss))
  l0 = float(loss(params))
  p, state = params, tx.init(params)
  for _ in range(150):
    _, g = grad(p)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  assert float(loss(p)) < 0.3 * l0

  is_q = lambda x: isinstance(x, lro.QuantizedArray)
  view = jax.jit(lambda qp: jax.tree.map(
      lambda x: lro.dequantize_int8(x) if is_q(x) else x, qp, is_leaf=is_q))
  apply_int8 = jax.jit(lro.apply_updates_int8)
  qparams = {k: lro.quantize_int8(v) if v.ndim == 2 else v
             for k, v in params.items()}
  state = tx.init(view(qparams))
  for t in range(60):
    w = view(qparams)
    _, g = grad(w)
    u, state = update(g, state, w)
    qparams = apply_int8(qparams, u, jax.random.key(t))
    if t == 0:
      for k in ("mlp_in", "mlp_out"):
        assert qparams[k].codes.dtype == jnp.uint8
        target = np.asarray(w[k] + u[k])
        got = np.asarray(view(qparams)[k])
        step = np.repeat(np.asarray(qparams[k].scale), 256)[:target.size]
        assert np.all(np.abs(got - target).reshape(-1) <= step * 1.001), k
  assert float(loss(view(qparams))) < 0.7 * l0


# ---------------------------------------------------------------------------
# Sharding and orbax
# ---------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_state_is_stable_and_resumes_bit_exactly(tmp_path):
  """FSDP mesh: the state keeps its shardings (no recompilation), the codes
  are per-matrix vectors, and an orbax restore continues bit-exactly across
  a refresh."""
  ocp = pytest.importorskip("orbax.checkpoint")
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  specs = {"a": ((64, 32), P("fsdp", None)), "c": ((32, 64), P(None, "fsdp")),
           "norm": ((32,), P())}
  def put(seed):
    rs = np.random.default_rng(seed)
    return {k: jax.device_put(rs.standard_normal(s).astype(np.float32),
                              NamedSharding(mesh, sp))
            for k, (s, sp) in specs.items()}

  params = put(0)
  grads = [put(10 + t) for t in range(5)]
  tx = lro.q_galore(1e-2, rank=8, update_proj_gap=2, proj_group_size=64)
  state = tx.init(params)
  step = jax.jit(tx.update)
  states, ps, cache = [state], [params], []
  for g in grads:  # refreshes at 0, 2, 4
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    states.append(state)
    ps.append(params)
    cache.append(step._cache_size())
  # As tests/test_sharding.py: one retrace at the second call at most (jit's
  # spelling of output specs), then refreshes and growth reuse it.
  assert cache[1] == cache[-1] <= 2, cache
  for x in jax.tree.leaves(state):
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
    assert x.size > 0
  for s0, s1 in zip(jax.tree.leaves(states[0]), jax.tree.leaves(state)):
    assert s0.shape == s1.shape and s0.dtype == s1.dtype
    assert s0.sharding.is_equivalent_to(s1.sharding, s0.ndim)
  sub = lro.subspace_state(state)
  codes = sub.projector[0].basis[0].codes  # leaf "a"
  assert codes.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)

  k = 1
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", {"p": ps[k], "s": states[k]})
  ckpt.wait_until_finished()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"p": ps[k], "s": states[k]})
  restored = ckpt.restore(tmp_path / "c", target)
  ckpt.close()
  p, s = restored["p"], restored["s"]
  for t in range(k, len(grads)):
    u, s = step(grads[t], s, p)
    p = optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Arguments, defaults, the projector module's examples
# ---------------------------------------------------------------------------


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="inner"):
    lro.q_galore(1e-2, inner="lion")
  with pytest.raises(TypeError, match="basis projector"):
    lro.projectors.QuantizedProjector(inner=lro.projectors.DCTProjector())
  with pytest.raises(ValueError, match="bits"):
    lro.projectors.QuantizedProjector(bits=3)


def test_defaults_are_the_reference_scripts():
  import inspect  # pylint: disable=g-import-not-at-top
  sig = inspect.signature(lro.q_galore).parameters
  want = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std",
              projector="svd", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
              proj_bits=4, proj_group_size=256, cos_threshold=0.4,
              gamma_proj=2, queue_size=5, abs_cos=False, inner="adam8bit",
              block_size=2048, min_8bit_size=4096, skip_nonfinite=True)
  assert {k: sig[k].default for k in want} == want
  assert lro.projectors.make("int4_svd") == lro.projectors.QuantizedProjector()


def test_projector_module_examples():
  """projectors/quantized.py is not in test_docstrings' top-level list."""
  module = importlib.import_module("lowrank_optax.projectors.quantized")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
