"""Natural GaLore: ALGORITHMS.md 2 (N1-N5), a float64 reference of the recipe, memory.

The reference below is written from ALGORITHMS.md section 2 and the official
``SubSpaceAdamW`` / ``GaLoreProjectorTensor`` in NumPy float64, in PyTorch
layout ``W = K^T`` (out, in): factors ``U1`` (out x r), ``U2`` (in x r) from
the Tucker decomposition (for a matrix: the top singular vectors with
tensorly's sign rule, checked against tensorly itself where it is
installed), ``R = U1^T G U2``, the window solve ``solve(lam I + H^T H, vec
R)`` directly in ``k = r^2`` dimensions, HF-style Adam, ``alpha`` on the
back-projection, decay of the updated weights. As in tests/test_galore.py,
the reference checks our bases at a refresh and then steps with them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _mlp
from _state import with_sub_state

B1, B2, EPS = 0.9, 0.999, 1e-6


def fisher_ref(window, g, lam):
  """float64 ``solve(lam I + sum_h h h^T, g)`` over the rows of ``window``."""
  h = np.asarray(window, np.float64).reshape(len(window), -1)
  g = np.asarray(g, np.float64).reshape(-1)
  return np.linalg.solve(lam * np.eye(g.size) + h.T @ h, g)


def flip_ref(u):
  """tensorly's svd_flip: each column's largest-magnitude entry positive."""
  idx = np.argmax(np.abs(u), axis=0)
  return u * np.sign(u[idx, np.arange(u.shape[1])])


def tucker_ref(g, r):
  """float64 Tucker factors of a matrix (PyTorch layout): (U1 out x r, U2 in x r)."""
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64))
  return flip_ref(u[:, :r]), flip_ref(vh[:r].T)


class RefNaturalGaLore:
  """float64 SubSpaceAdamW (natural_galore) on one matrix, PyTorch layout.

  ``k`` is the projector's step count (refresh when ``k % gap == 0``), ``t``
  Adam's (the tests start ``k`` at 1 with injected bases; see below).
  """

  def __init__(self, w, r, gap, alpha, lr, s, lam, wd, k0=0):
    self.w = np.array(w, np.float64)
    self.r, self.gap, self.alpha, self.lr = r, gap, alpha, lr
    self.s, self.lam, self.wd = s, lam, wd
    self.k, self.t = k0, 0
    self.m = self.v = 0.0
    self.window = []
    self.factors = None

  def update(self, g, factors=None):
    g = np.asarray(g, np.float64)
    if self.factors is None or self.k % self.gap == 0:
      self.factors = tucker_ref(g, self.r) if factors is None else factors
    u1, u2 = self.factors
    rr = u1.T @ g @ u2
    if self.s:  # history 0: no transform (two-sided GaLore)
      self.window = (self.window + [rr.reshape(-1)])[-self.s:]
      nat = fisher_ref(self.window, rr, self.lam).reshape(rr.shape)
    else:
      nat = rr
    self.k += 1
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * nat
    self.v = B2 * self.v + (1 - B2) * nat * nat
    step_size = self.lr * np.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    n = self.m / (np.sqrt(self.v) + EPS)
    self.w = self.w - step_size * self.alpha * (u1 @ n @ u2.T)
    self.w = self.w - self.lr * self.wd * self.w


class RefAdamW:
  """float64 HF-style AdamW with post-update decay (a pass-through leaf)."""

  def __init__(self, w, lr, wd):
    self.w, self.lr, self.wd = np.array(w, np.float64), lr, wd
    self.m = self.v = 0.0
    self.t = 0

  def update(self, g):
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g * g
    step_size = self.lr * np.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    self.w = self.w - step_size * self.m / (np.sqrt(self.v) + EPS)
    self.w = self.w - self.lr * self.wd * self.w


def orthonormal(rng, d, r):
  return np.linalg.qr(rng.standard_normal((d, r)))[0]


def inject(state, count, bases):
  """``state`` with the subspace count set and leaf bases replaced."""
  sub = lro.subspace_state(state)
  proj = list(sub.projector)
  for i, qs in bases.items():
    old = proj[i]
    proj[i] = type(old)(*(jnp.asarray(q, o.dtype) for q, o in zip(qs, old)))
  return with_sub_state(state, sub._replace(
      count=jnp.asarray(count, jnp.int32), projector=tuple(proj)))


def fisher_and_adam(state, i):
  """(NaturalFisherState, ScaleByAdamHFState) of projected leaf ``i``."""
  fs, adam = lro.subspace_state(state).inner[i]
  return fs, adam


# ---------------------------------------------------------------------------
# N1 (and N4) through the whole recipe: a float64 reference over a refresh
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("history,wd", [(3, 0.01), (0, 0.0)])
def test_n1_n4_recipe_matches_float64_reference_across_a_refresh(history, wd):
  """Several steps of lro.natural_galore(projector="tucker") against float64.

  ``history=3`` over 7 steps: the window fills, drops its oldest vectors and
  keeps old-basis vectors across the refresh at count 4 (N1: each step's
  transform is the direct solve of the window); ``wd=0.01`` is the 60M
  script's decay, on both leaves. ``history=0`` is N4: without the transform
  the recipe is two-sided GaLore. Generic bases are injected first (count
  1): with the SVD's own bases ``R = U^T G V`` is diagonal and its
  off-diagonal float32 noise would be amplified by a first Adam step.
  """
  r, gap, alpha, lr, lam = 4, 4, 0.25, 0.01, 1e-3
  rng = np.random.default_rng(0)
  w0 = {"bias": rng.standard_normal(20), "w": rng.standard_normal((12, 20))}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
  grads = [{k: jnp.asarray(0.01 * rng.standard_normal(x.shape), jnp.float32)
            for k, x in w0.items()} for _ in range(7)]
  tx = lro.natural_galore(lr, rank=r, update_proj_gap=gap, history=history,
                          weight_decay=wd, projector="tucker")
  state = tx.init(params)
  u2, u1 = orthonormal(rng, 12, r), orthonormal(rng, 20, r)  # in, out
  state = inject(state, 1, {1: (u2, u1)})
  ref = RefNaturalGaLore(w0["w"].T, r, gap, alpha, lr, history, lam, wd, k0=1)
  ref_bias = RefAdamW(w0["bias"], lr, wd)
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    count = t + 1
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    ps = lro.subspace_state(state).projector[1]
    row, col = (np.asarray(q, np.float64) for q in ps)  # in (M), out (N)
    gt = np.asarray(g["w"], np.float64).T  # PyTorch layout
    if count == gap:  # the refresh: the reference's Tucker factors, signs too
      f1, f2 = tucker_ref(gt, r)
      np.testing.assert_allclose(col, f1, atol=2e-4)
      np.testing.assert_allclose(row, f2, atol=2e-4)
    ref.update(gt, factors=(col, row))
    ref_bias.update(np.asarray(g["bias"], np.float64))
    np.testing.assert_allclose(np.asarray(params["w"]).T, ref.w, rtol=1e-5,
                               atol=1e-6, err_msg=f"w, step {t}")
    np.testing.assert_allclose(params["bias"], ref_bias.w, rtol=1e-5,
                               atol=1e-6, err_msg=f"bias, step {t}")
  if history:
    fs, _ = fisher_and_adam(state, 1)
    assert fs.history.shape[0] == history and fs.history.size == history * r * r
    assert int(fs.count) == len(grads)  # never reset at the refresh
  else:
    assert len(lro.subspace_state(state).inner[1]) == 1  # Adam only
  assert step._cache_size() == 1


def test_n4_transform_off_is_two_sided_galore():
  """N4 with the default projector: history=0 is lro.galore(proj_type="full")."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((10, 14)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.standard_normal((10, 14)), jnp.float32)}
           for _ in range(4)]  # refreshes at 0 and 2
  kw = dict(rank=3, update_proj_gap=2, weight_decay=0.1)
  outs = []
  for tx in (lro.natural_galore(1e-2, history=0, **kw),
             lro.galore(1e-2, proj_type="full", **kw)):
    state, p, us = tx.init(params), params, []
    step = jax.jit(tx.update)
    for g in grads:
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
      us.append(np.asarray(u["w"]))
    outs.append(us)
  for a, b in zip(*outs):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# N2, N3 through the recipe: the Adam moment holds (1 - b1) g~
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", ["full", "std"])
def test_n2_n3_first_and_orthogonal_steps(proj_type):
  """N2: window {g}: g~ = g / (lam + |g|^2); N3: a g orthogonal to the window.

  Read from the recipe's state: after step 1 Adam's ``mu = (1 - b1) g~_1``,
  after step 2 ``mu - b1 mu_prev = (1 - b1) g~_2``. ``proj_type="std"``
  checks that the transform works unchanged on one-sided projections (its
  window then holds ``r x max(m, n)`` gradients).
  """
  lam, r = 1e-3, 3
  shape = (8, 11)  # in 8 < out 11: std reduces the inputs, R is r x 11
  rng = np.random.default_rng(2)
  tx = lro.natural_galore(1e-2, rank=r, history=4, proj_type=proj_type,
                          update_proj_gap=100)
  params = {"w": jnp.zeros(shape)}
  state = tx.init(params)
  qm, qn = orthonormal(rng, 8, r), orthonormal(rng, 11, r)
  bases = (qm, qn) if proj_type == "full" else (qm,)
  state = inject(state, 1, {0: bases})

  def lowrank(g):
    return qm.T @ g @ qn if proj_type == "full" else qm.T @ g

  g1 = 0.05 * rng.standard_normal(shape)
  r1 = lowrank(g1)
  # g2: its R orthogonal to R1 (Frobenius), plus a part outside the subspace.
  x = rng.standard_normal(r1.shape)
  x -= np.sum(x * r1) / np.sum(r1 * r1) * r1
  x *= 2.0
  lift = qm @ x @ qn.T if proj_type == "full" else qm @ x
  g2 = lift + 0.1 * (np.eye(8) - qm @ qm.T) @ rng.standard_normal(shape)
  r2 = lowrank(g2)
  np.testing.assert_allclose(r2, x, atol=1e-12)
  step = jax.jit(tx.update)
  _, state = step({"w": jnp.asarray(g1, jnp.float32)}, state, params)
  fs, adam = fisher_and_adam(state, 0)
  assert fs.history.shape[0] == 4 and fs.history.size == 4 * r1.size
  want1 = r1 / (lam + np.sum(r1 * r1))
  np.testing.assert_allclose(adam.mu, (1 - B1) * want1, rtol=1e-5)
  mu1 = np.asarray(adam.mu, np.float64)
  _, state = step({"w": jnp.asarray(g2, jnp.float32)}, state, params)
  _, adam = fisher_and_adam(state, 0)
  got2 = (np.asarray(adam.mu, np.float64) - B1 * mu1) / (1 - B1)
  want2 = r2 / (lam + np.sum(r2 * r2))
  np.testing.assert_allclose(got2, want2, rtol=1e-4, atol=1e-6 * np.abs(
      want2).max())
  # Sharp: not g / lambda, and not what a non-orthogonal window would give.
  assert np.abs(want2 - r2 / lam).max() > 0.5 * np.abs(want2).max()


# ---------------------------------------------------------------------------
# N5: the M-FAC cross-check
# ---------------------------------------------------------------------------


def test_n5_mfac_equals_window_times_natural_galore():
  """MFAC(damp=lam_M, window m) x = m * NatGaLore(lam = m lam_M) x.

  The recipe's Adam first moment is the EMA of its transformed gradients;
  the same EMA of ``lro.scale_by_mfac`` (Gram solver: an independent
  small-system path) applied to the same low-rank gradients, divided by
  ``m``, must agree.
  """
  m, lam_m, r, steps = 3, 0.02, 3, 5
  shape = (9, 7)
  rng = np.random.default_rng(3)
  tx = lro.natural_galore(1e-2, rank=r, history=m, damping=m * lam_m,
                          update_proj_gap=100)
  params = {"w": jnp.zeros(shape)}
  qm, qn = orthonormal(rng, 9, r), orthonormal(rng, 7, r)
  state = inject(tx.init(params), 1, {0: (qm, qn)})
  mfac = lro.scale_by_mfac(window=m, damping=lam_m, solver="gram")
  rs = {"w": jnp.zeros((r, r))}
  mstate = mfac.init(rs)
  step = jax.jit(tx.update)
  mfac_step = jax.jit(mfac.update)
  mu = 0.0
  for _ in range(steps):
    g = 0.3 * rng.standard_normal(shape)
    _, state = step({"w": jnp.asarray(g, jnp.float32)}, state, params)
    rr = jnp.asarray(qm.T @ g @ qn, jnp.float32)
    u, mstate = mfac_step({"w": rr}, mstate)
    mu = B1 * mu + (1 - B1) * np.asarray(u["w"], np.float64) / m
    _, adam = fisher_and_adam(state, 0)
    np.testing.assert_allclose(adam.mu, mu, rtol=2e-4,
                               atol=1e-5 * np.abs(mu).max())


# ---------------------------------------------------------------------------
# The reference's projector
# ---------------------------------------------------------------------------


def test_tucker_projector_matches_tensorly():
  """tensorly's tucker of a matrix = top singular vectors, tensorly's signs."""
  tl = pytest.importorskip("tensorly")
  from tensorly.decomposition import tucker  # pylint: disable=g-import-not-at-top
  tl.set_backend("numpy")
  rng = np.random.default_rng(4)
  r = 3
  g_pt = rng.standard_normal((10, 8))  # PyTorch layout (out, in)
  _, (f1, f2) = tucker(g_pt, rank=[r, r])
  ref1, ref2 = tucker_ref(g_pt, r)  # the tests' reference helper
  np.testing.assert_allclose(f1, ref1, atol=1e-10)
  np.testing.assert_allclose(f2, ref2, atol=1e-10)
  tx = lro.natural_galore(1e-2, rank=r, projector="tucker")
  state = tx.init({"w": jnp.zeros((8, 10))})  # Flax (in, out)
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g_pt.T, jnp.float32)},
                                state)
  row, col = lro.subspace_state(state).projector[0]
  np.testing.assert_allclose(col, f1, atol=1e-5)  # out-axis factor
  np.testing.assert_allclose(row, f2, atol=1e-5)  # in-axis factor


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def test_memory_report_matches_algorithms_12_row():
  """Two-sided: bases mr + nr, moments 2 r^2, window s r^2 (+ two counters)."""
  m, n, r, s = 64, 48, 8, 20
  params = {"attn": jax.ShapeDtypeStruct((n, m), jnp.float32)}  # Flax (in, out)
  rep = lro.memory_report(lro.natural_galore(1e-2, rank=r), params)
  (leaf,) = rep.leaves
  floats = m * r + n * r + 2 * r * r + s * r * r
  assert leaf.state_bytes == 4 * floats + 4 + 4  # Fisher and Adam counts
  assert leaf.adam_bytes == 4 * 2 * m * n


def test_one_sided_window_exceeds_adam_at_llama_1b_shapes():
  """With proj_type="std" the window (s copies of r x max(m,n)) > 2mn."""
  r, s = 512, 20
  params = {"attn_q": jax.ShapeDtypeStruct((2048, 2048), jnp.float32),
            "mlp_up": jax.ShapeDtypeStruct((2048, 5461), jnp.float32)}
  std = lro.natural_galore(1e-2, rank=r, proj_type="std")
  full = lro.natural_galore(1e-2, rank=r)
  rep_std, rep_full = (lro.memory_report(t, params) for t in (std, full))
  sub = lro.subspace_state(jax.eval_shape(std.init, params))
  for i, (name, p) in enumerate(sorted(params.items())):
    window = sub.inner[i][0].history
    assert window.shape[0] == s and window.size == s * r * max(p.shape)
    window_bytes = window.size * 4
    adam_bytes = 2 * p.shape[0] * p.shape[1] * 4
    assert window_bytes == pytest.approx(s * r / (2 * min(p.shape))
                                         * adam_bytes)
    assert window_bytes > 2 * adam_bytes, name  # 2.5x Adam at r = 512
    assert rep_std.leaves[i].state_bytes > rep_std.leaves[i].adam_bytes
    # Two-sided (the reference): the whole state is below Adam's.
    assert rep_full.leaves[i].state_bytes < rep_full.leaves[i].adam_bytes


# ---------------------------------------------------------------------------
# Training, defaults, arguments
# ---------------------------------------------------------------------------


def test_trains_a_small_mlp():
  tx = lro.natural_galore(3e-2, rank=8, update_proj_gap=20, history=8)
  l0, l1 = _mlp.train(tx, _mlp.mlp_problem_24_32_16(), 150)
  assert l1 < 0.3 * l0


def test_defaults_are_the_reference_scripts():
  import inspect  # pylint: disable=g-import-not-at-top
  sig = inspect.signature(lro.natural_galore).parameters
  want = dict(rank=128, update_proj_gap=200, scale=0.25, history=20,
              damping=1e-3, proj_type="full", b1=0.9, b2=0.999, eps=1e-6,
              weight_decay=0.0, skip_nonfinite=True)
  assert {k: sig[k].default for k in want} == want


@pytest.mark.parametrize("history", [-1, 2.5, True, "3"])
def test_bad_history_raises(history):
  with pytest.raises(ValueError, match="history"):
    lro.natural_galore(1e-2, history=history)
