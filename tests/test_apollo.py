"""APOLLO / APOLLO-Mini: ALGORITHMS.md 5 (A1-A3, A5, A6; A4 is in
test_random_projectors.py) against float64 NumPy references.

The reference step (:class:`RefApollo`) is written from ALGORITHMS.md 5 and
``apollo_torch/apollo.py`` in Flax layout (``(in, out)``; ``std`` reduces the
smaller dimension, the input axis on a tie): ``R = P^T G`` / ``G P`` with the
Gaussian ``P`` rebuilt from the documented key rule with ``jax.random``
directly (``fold_in(fold_in(key(seed), leaf index), refresh step)``, ``N(0,
1) / sqrt(r)``), HF Adam with the uncorrected ``N``, the ratio ``s`` per
channel of the non-projected axis or per matrix, ``S = G * s``,
``sqrt(scale)`` before or after Fira's limiter, ``step_size = lr * sqrt(1 -
b2^t) / (1 - b1^t)`` on the whole update, decay after the update.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _mlp

B1, B2, EPS = 0.9, 0.999, 1e-6
GAMMA = 1.01


def std_side(shape):
  return "reduction" if shape[-2] <= shape[-1] else "output"


def gaussian_p(shape, side, index, count, seed, rank):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index),
                           count)
  d = shape[-2] if side == "reduction" else shape[-1]
  return np.asarray(jax.random.normal(key, shape[:-2] + (d, rank), jnp.float32),
                    np.float64) / math.sqrt(rank)


def down(p, g, side):
  return p.T @ g if side == "reduction" else g @ p


class RefLimiter:
  def __init__(self, gamma):
    self.gamma, self.prev = gamma, None

  def __call__(self, x):
    if self.gamma is None:
      return x
    n = np.linalg.norm(x)
    if self.prev is None:
      self.prev = n
      return x
    c = max(n / (self.prev + 1e-8), self.gamma) / self.gamma
    self.prev = n / c
    return x / c


class RefApollo:
  """One projected matrix (Flax layout), float64, ALGORITHMS.md 5."""

  def __init__(self, side, scale_type, scale, scale_front, gamma):
    self.side, self.scale_type = side, scale_type
    self.root, self.front = math.sqrt(scale), scale_front
    self.limiter = RefLimiter(gamma)
    self.m = self.v = None
    self.t = 0

  def step(self, g, p, lr):
    """Returns ``-step_size * S``."""
    r = down(p, g, self.side)
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    n = self.m / (np.sqrt(self.v) + EPS)
    step_size = lr * math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    if self.scale_type == "channel":
      axis = 0 if self.side == "reduction" else 1
      s = (np.linalg.norm(n, axis=axis, keepdims=True)
           / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
    else:
      s = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
    out = g * s
    if self.front:
      out = out * self.root
    out = self.limiter(out)
    if not self.front:
      out = out * self.root
    return -step_size * out


class RefAdamHF:
  def __init__(self):
    self.m = self.v = None
    self.t = 0

  def step(self, g, lr):
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g * g
    step_size = lr * math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    return -step_size * self.m / (np.sqrt(self.v) + EPS)


def grads_of(shapes, seed, steps, scale=1.0):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
           for k, s in sorted(shapes.items())} for _ in range(steps)]


# input side; stacked output side (2 layers of (20, 12)); full rank.
SHAPES = {"a_in": (12, 20), "b_stacked_out": (2, 20, 12),
          "norm": (20,)}
GAP, STEPS, SEED = 3, 7, 3

CASES = {
    # name: (rank, scale_type, scale, scale_front, gamma, wd)
    "apollo-channel": (4, "channel", 1.0, False, GAMMA, 0.1),
    "apollo-channel-no_limiter": (4, "channel", 2.0, False, None, 0.0),
    "mini-scale_front": (1, "tensor", 128.0, True, GAMMA, 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apollo_matches_float64_reference_across_refreshes(case):
  rank, scale_type, scale, front, gamma, wd = CASES[case]
  sched = optax.linear_schedule(1e-2, 2e-3, STEPS)
  if rank == 1 and scale_type == "tensor":
    tx = lro.apollo_mini(sched, scale=scale, scale_front=front,
                         update_proj_gap=GAP, weight_decay=wd,
                         norm_growth_limit=gamma, seed=SEED)
  else:
    tx = lro.apollo(sched, rank, scale_type=scale_type, scale=scale,
                    scale_front=front, update_proj_gap=GAP, weight_decay=wd,
                    norm_growth_limit=gamma, seed=SEED)
  grads = grads_of(SHAPES, 1, STEPS)
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
            for k, s in SHAPES.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  names = sorted(SHAPES)
  projected = [k for k in names if len(SHAPES[k]) > 1]
  refs = {}
  for k in names:
    shape = SHAPES[k]
    if len(shape) == 1:
      refs[k] = [RefAdamHF()]
    else:
      refs[k] = [RefApollo(std_side(shape), scale_type, scale, front, gamma)
                 for _ in range(int(np.prod(shape[:-2])))]
  for t, g in enumerate(grads):
    lr = float(sched(t))
    u, state = step(g, state, params)
    refresh = t - t % GAP
    for k in names:
      w = np.asarray(params[k], np.float64)
      gk = np.asarray(g[k], np.float64)
      if len(SHAPES[k]) == 1:
        want = refs[k][0].step(gk, lr)
      else:
        side = std_side(SHAPES[k])
        p = gaussian_p(SHAPES[k], side, projected.index(k), refresh, SEED,
                       rank)
        p = p.reshape((-1,) + p.shape[-2:])
        gm = gk.reshape((-1,) + gk.shape[-2:])
        want = np.stack([ref.step(gm[i], p[i], lr)
                         for i, ref in enumerate(refs[k])]).reshape(SHAPES[k])
      want = want - lr * wd * (w + want)
      np.testing.assert_allclose(np.asarray(u[k]), want, rtol=0,
                                 atol=2e-5 * np.abs(want).max(),
                                 err_msg=f"{case}: {k} at step {t}")
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def run_steps(tx, grads, params=None):
  st = tx.init(grads[0] if params is None else params)
  step = jax.jit(tx.update)
  out = []
  for g in grads:
    u, st = step(g, st, params)
    out.append(u)
  return out, st


TWO_SIDES = {"a_in": (12, 20), "b_out": (20, 12)}  # input side, output side


def test_a1_tensor_scaling_update_is_parallel_to_minus_g():
  grads = grads_of(TWO_SIDES, 2, 4)
  tx = lro.apollo(1e-2, 4, scale_type="tensor", norm_growth_limit=None)
  us, _ = run_steps(tx, grads)
  for g, u in zip(grads, us):
    for k in TWO_SIDES:
      gk, uk = np.asarray(g[k], np.float64), np.asarray(u[k], np.float64)
      cos = np.sum(uk * -gk) / (np.linalg.norm(uk) * np.linalg.norm(gk))
      assert cos > 1 - 1e-6
      np.testing.assert_allclose(uk / gk, np.mean(uk / gk), rtol=1e-5)


def test_a2_channel_scaling_rows_or_columns_parallel_to_g():
  """Input side (12 < 20): each output column of dW is a non-positive
  multiple of G's; output side: each input row."""
  grads = grads_of(TWO_SIDES, 3, 4)
  tx = lro.apollo(1e-2, 4, scale_type="channel")
  us, _ = run_steps(tx, grads)
  for g, u in zip(grads, us):
    for k, shape in TWO_SIDES.items():
      axis = 0 if std_side(shape) == "reduction" else 1
      gk, uk = np.asarray(g[k], np.float64), np.asarray(u[k], np.float64)
      ratio = uk / gk
      per_channel = np.mean(ratio, axis=axis, keepdims=True)
      assert np.all(per_channel <= 0)
      np.testing.assert_allclose(ratio, np.broadcast_to(per_channel, gk.shape),
                                 rtol=1e-5)
      assert np.std(per_channel) > 1e-3 * np.abs(per_channel).mean()


def test_a3_first_step_closed_form():
  """dW ~= -lr sqrt(scale) sqrt(numel(R)) G / ||R|| (APOLLO-Mini: numel(R)
  is the larger dimension)."""
  lr, scale = 1e-2, 128.0
  g = grads_of(TWO_SIDES, 4, 1, scale=100.0)
  (u,), _ = run_steps(lro.apollo_mini(lr, scale=scale, seed=SEED), g)
  for index, (k, shape) in enumerate(sorted(TWO_SIDES.items())):
    side = std_side(shape)
    p = gaussian_p(shape, side, index, 0, SEED, 1)
    gm = np.asarray(g[0][k], np.float64)
    r = down(p, gm, side)
    assert r.size == max(shape)
    want = -lr * math.sqrt(scale) * math.sqrt(r.size) * gm / np.linalg.norm(r)
    # The approximation needs |R_ij| >> eps / sqrt(1 - b2).
    assert np.abs(r).min() > 1e-2 / 3
    np.testing.assert_allclose(u[k], want, rtol=1e-3)


def test_a5_limiter_bounds_growth_per_matrix_across_refreshes():
  """||S_t|| <= 1.01 ||S_{t-1}|| per batch element with gradients growing
  10x at every refresh (S = dW / (-lr * bias correction))."""
  shape, gap, lr = (2, 10, 16), 2, 1e-2
  grads = grads_of({"w": shape}, 5, 6)
  for t in range(len(grads)):
    grads[t] = {"w": grads[t]["w"] * 10.0 ** (t // gap)}
  us, st = run_steps(lro.apollo(lr, 4, update_proj_gap=gap), grads)
  prev = None
  for t, u in enumerate(us, start=1):
    corr = math.sqrt(1 - B2**t) / (1 - B1**t)
    norms = np.linalg.norm(np.asarray(u["w"], np.float64) / (lr * corr),
                           axis=(1, 2))
    if prev is not None:
      assert np.all(norms <= GAMMA * prev * (1 + 1e-5)), (t, norms, prev)
      assert np.all(norms >= 0.5 * GAMMA * prev)  # it was limited, not zeroed
    prev = norms
  assert lro.subspace_state(st).residual[0][0].norm.shape == (2,)


def test_a6_scale_front_equals_back_without_limiter():
  grads = grads_of({"w": (2, 12, 20)}, 6, 4)
  mk = lambda front, gamma: lro.apollo_mini(1e-2, scale=128.0,
                                            scale_front=front,
                                            norm_growth_limit=gamma)
  a, _ = run_steps(mk(True, None), grads)
  b, _ = run_steps(mk(False, None), grads)
  for ua, ub in zip(a, b):
    for k in ua:
      np.testing.assert_allclose(ua[k], ub[k], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# State, memory, errors, compositions, training
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 8])
def test_memory_report_matches_section_12(rank):
  """A projected (m, n) matrix keeps moments 2 r max(m, n), one limiter
  scalar and the 8-byte key (ALGORITHMS.md 12; the inner Adam's count too);
  APOLLO-Mini: two vectors."""
  m, n = 256, 1024  # (in, out): the input side is reduced, R is (r, 1024)
  params = {"mlp": jax.ShapeDtypeStruct((m, n), jnp.float32),
            "stacked": jax.ShapeDtypeStruct((3, n, m), jnp.float32),
            "norm": jax.ShapeDtypeStruct((m,), jnp.float32)}
  tx = (lro.apollo_mini(1e-2) if rank == 1 else lro.apollo(1e-2, rank))
  rep = lro.memory_report(tx, params)
  rows = {l.path: l for l in rep.leaves}
  f32 = 4
  key, count, limiter = 8, 4, 4
  assert rows["mlp"].state_bytes == 2 * rank * n * f32 + count + limiter + key
  assert rows["stacked"].state_bytes == (3 * 2 * rank * n * f32 + count
                                         + 3 * limiter + key)
  assert rows["norm"].state_bytes == 2 * m * f32 + count
  state = jax.eval_shape(tx.init, params)
  sub = lro.subspace_state(state)
  names = sorted(params)
  mu = sub.inner[names.index("mlp")][0].mu
  assert mu.shape == (rank, n)


def test_inner_state_is_low_rank_only_and_state_is_orbax_safe():
  params = {"w": jnp.zeros((12, 20))}
  st = lro.apollo_mini(1e-2).init(params)
  for x in jax.tree.leaves(st):
    assert x.size > 0
    assert not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    assert x.size <= 20 or x.dtype == jnp.uint32


def test_full_projection():
  params = {"w": jnp.zeros((12, 20))}
  with pytest.raises(ValueError, match="both sides"):
    lro.apollo(1e-2, 4, proj_type="full").init(params)
  # Tensor-wise scaling has no channel axis to need: it runs two-sided.
  g = grads_of({"w": (12, 20)}, 7, 2)
  us, st = run_steps(lro.apollo(1e-2, 4, proj_type="full",
                                scale_type="tensor",
                                norm_growth_limit=None), g)
  assert lro.subspace_state(st).inner[0][0].mu.shape == (4, 4)
  u, gg = np.asarray(us[0]["w"]), np.asarray(g[0]["w"])
  np.testing.assert_allclose(u / gg, np.mean(u / gg), rtol=1e-5)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="scale_type"):
    lro.apollo_scaling("row")
  with pytest.raises(ValueError, match="norm_growth_limit"):
    lro.apollo_scaling(norm_growth_limit=0.0)
  with pytest.raises(TypeError):
    lro.apollo_mini(1e-2, rank=4)  # fixed at 1


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(lro.apollo_mini)(learning_rate=1e-2,
                                                 scale=128.0)
  g = grads_of({"w": (12, 20)}, 8, 2)
  params = {"w": jnp.ones((12, 20))}  # the traced weight decay needs them
  ref, _ = run_steps(lro.apollo_mini(1e-2, scale=128.0), g, params)
  got, st = run_steps(tx, g, params)
  np.testing.assert_allclose(got[1]["w"], ref[1]["w"], rtol=1e-6)
  assert "learning_rate" in st.hyperparams


TRAINERS = {
    "apollo": lambda: lro.apollo(1e-2, 4, update_proj_gap=20,
                                 weight_decay=1e-3),
    "apollo_mini": lambda: lro.apollo_mini(3e-3, update_proj_gap=20),
    # The composition: APOLLO-style scaling plus a sign residual.
    "apollo_sign_residual": lambda: lro.chain(
        lro.galore_project(4, update_proj_gap=20, projector="gaussian"),
        lro.scale_by_adam_hf(correct_bias=False),
        lro.apollo_scaling(),
        lro.sign_residual(0.1),
        lro.scale_by_hf_bias_correction(),
        optax.scale_by_learning_rate(1e-2)),
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trains_a_small_mlp(name):
  l0, l1 = _mlp.train(TRAINERS[name](), _mlp.mlp_problem(), 150)
  assert l1 < 0.2 * l0, (l0, l1)
