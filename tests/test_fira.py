"""Fira: ALGORITHMS.md 4 (Fi1-Fi6) against float64 NumPy references.

The reference step (:class:`RefFira`) is written from ALGORITHMS.md 4 and
``fira_adamw.py`` in Flax layout (``(in, out)``; ``std`` reduces the smaller
dimension, the input axis on a tie): HF Adam on ``R = down(G)`` with the
uncorrected ``N = m / (sqrt(v) + eps)``, ``E = G - alpha * up(R)``, a ratio
per channel of the non-projected axis, the norm-growth limiter, and
``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)`` on the whole update. The
SVD's signs are ambiguous (ALGORITHMS.md 0.7): our refreshed basis is checked
against NumPy's SVD through ``Q Q^T`` and then handed to the reference.

Property tests read ``Psi`` alone from a chain whose map-back term is dropped
(:class:`_NoMapBack`): its update is exactly the Fira residual term.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _mlp
from lowrank_optax import residual as residual_lib

B1, B2, EPS = 0.9, 0.999, 1e-6
GAMMA = 1.01


def std_side(shape):
  return "reduction" if shape[-2] <= shape[-1] else "output"


def down(q, g, side):
  return q.T @ g if side == "reduction" else g @ q


def up(q, x, side):
  return q @ x if side == "reduction" else x @ q.T


def channel_ratio(n, r, side):
  """Norms over the rank axis: per output column (input side) or input row."""
  axis = 0 if side == "reduction" else 1
  return (np.linalg.norm(n, axis=axis, keepdims=True)
          / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))


class RefLimiter:
  """ALGORITHMS.md 4 step 6, float64."""

  def __init__(self, gamma=GAMMA):
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


class RefFira:
  """One projected matrix (Flax layout), float64, ALGORITHMS.md 4."""

  def __init__(self, side, alpha, gamma=GAMMA, uses_scale=True):
    self.side, self.alpha, self.uses_scale = side, alpha, uses_scale
    self.limiter = RefLimiter(gamma)
    self.m = self.v = None
    self.t = 0

  def step(self, g, q, lr):
    """Returns the update ``-step_size * (alpha up(N) + Psi)`` and ``Psi``."""
    g, q = np.asarray(g, np.float64), np.asarray(q, np.float64)
    r = down(q, g, self.side)
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    n = self.m / (np.sqrt(self.v) + EPS)
    step_size = lr * math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    e = g - (self.alpha if self.uses_scale else 1.0) * up(q, r, self.side)
    psi = self.limiter(e * channel_ratio(n, r, self.side))
    return -step_size * (self.alpha * up(q, n, self.side) + psi), psi


class RefAdamHF:
  def __init__(self):
    self.m = self.v = None
    self.t = 0

  def step(self, g, lr):
    g = np.asarray(g, np.float64)
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g * g
    step_size = lr * math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    return -step_size * self.m / (np.sqrt(self.v) + EPS)


def orthogonal(rng, n, k):
  q, r = np.linalg.qr(rng.standard_normal((n, k)))
  return q * np.sign(np.diag(r))


def gapped_grads(shapes, seed, steps, scale=1.0):
  """float32 gradients with a well-separated spectrum (ratio 0.7)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {}
    for k, s in sorted(shapes.items()):
      if len(s) == 1:
        x = rng.standard_normal(s)
      else:
        mats = []
        for _ in range(int(np.prod(s[:-2]))):
          m, n = s[-2:]
          p = min(m, n)
          sv = 2.0 * 0.7 ** np.arange(p) * rng.uniform(0.8, 1.2)
          mats.append((orthogonal(rng, m, p) * sv) @ orthogonal(rng, n, p).T)
        x = np.stack(mats).reshape(s)
      g[k] = jnp.asarray(scale * x, jnp.float32)
    out.append(g)
  return out


def top_subspace(g, side, r):
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u[:, :r] if side == "reduction" else vh[:r].T


def bases_of(state):
  sub = lro.subspace_state(state)
  return [None if isinstance(p, optax.MaskedNode) else np.asarray(p.basis)
          for p in sub.projector]


# ---------------------------------------------------------------------------
# The whole step against the float64 reference
# ---------------------------------------------------------------------------

# input side; stacked output side (2 layers of (20, 12)); full rank.
SHAPES = {"a_in": (12, 20), "b_stacked_out": (2, 20, 12),
          "norm": (20,)}
RANK, GAP, STEPS, ALPHA = 4, 3, 7, 0.25


@pytest.mark.parametrize("uses_scale,gamma,wd", [(True, GAMMA, 0.1),
                                                 (False, None, 0.0)])
def test_fira_matches_float64_reference_across_refreshes(uses_scale, gamma, wd):
  sched = optax.linear_schedule(1e-2, 2e-3, STEPS)
  tx = lro.fira(sched, RANK, update_proj_gap=GAP, scale=ALPHA, projector="svd",
                weight_decay=wd, norm_growth_limit=gamma,
                residual_uses_scale=uses_scale)
  grads = gapped_grads(SHAPES, 3, STEPS)
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
            for k, s in SHAPES.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  names = sorted(SHAPES)
  refs = {}
  for k in names:
    shape = SHAPES[k]
    if len(shape) == 1:
      refs[k] = [RefAdamHF()]
    else:
      refs[k] = [RefFira(std_side(shape), ALPHA, gamma, uses_scale)
                 for _ in range(int(np.prod(shape[:-2])))]
  for t, g in enumerate(grads):
    lr = float(sched(t))
    u, state = step(g, state, params)
    bases = dict(zip(names, bases_of(state)))
    for k in names:
      w = np.asarray(params[k], np.float64)
      gk = np.asarray(g[k], np.float64)
      if len(SHAPES[k]) == 1:
        want = refs[k][0].step(gk, lr)
      else:
        side = std_side(SHAPES[k])
        q = bases[k].reshape((-1,) + bases[k].shape[-2:])
        gm = gk.reshape((-1,) + gk.shape[-2:])
        outs = []
        for i, ref in enumerate(refs[k]):
          if t % GAP == 0:  # our basis spans the top-r singular subspace
            qr = top_subspace(gm[i], side, RANK)
            np.testing.assert_allclose(q[i] @ q[i].T, qr @ qr.T, atol=1e-4,
                                       err_msg=f"{k}[{i}] basis at {t}")
          outs.append(ref.step(gm[i], q[i], lr)[0])
        want = np.stack(outs).reshape(SHAPES[k])
      want = want - lr * wd * (w + want)
      np.testing.assert_allclose(np.asarray(u[k]), want, rtol=0,
                                 atol=2e-5 * np.abs(want).max(),
                                 err_msg=f"{k} at step {t}")
    params = optax.apply_updates(params, u)


# ---------------------------------------------------------------------------
# Properties (Fi1-Fi6)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NoMapBack(residual_lib.Closer):
  """Drops alpha * up(N): the chain's update is the residual term alone."""

  role = "map_back"

  def apply(self, ctx, state):
    return None, state


def psi_chain(rank, alpha, gamma=GAMMA, uses_scale=True, gap=200,
              projector="svd", proj_type="std"):
  """A chain whose update is Fira's Psi (no step size, no back-projection)."""
  return lro.chain(
      lro.galore_project(rank, update_proj_gap=gap, scale=alpha,
                         projector=projector, proj_type=proj_type),
      lro.scale_by_adam_hf(B1, B2, EPS, correct_bias=False),
      residual_lib.ResidualElement(_NoMapBack()),
      lro.fira_residual(gamma, uses_scale))


CLAMPED = pytest.mark.filterwarnings("ignore:.*clamped")


@CLAMPED
def test_fi1_full_rank_alpha_one_equals_galore():
  """r = n, alpha = 1: E = 0, so Fira's update is GaLore's."""
  shape = (16, 24)  # input side, r = 16 = all of it
  grads = gapped_grads({"w": shape}, 1, 4)
  fira = lro.fira(1e-2, {"w": 16}, scale=1.0, projector="svd")
  galore = lro.galore(1e-2, {"w": 16}, scale=1.0, projector="svd")
  sf, sg = fira.init(grads[0]), galore.init(grads[0])
  fstep, gstep = jax.jit(fira.update), jax.jit(galore.update)
  for g in grads:
    uf, sf = fstep(g, sf)
    ug, sg = gstep(g, sg)
    np.testing.assert_allclose(uf["w"], ug["w"], rtol=0,
                               atol=1e-5 * np.abs(ug["w"]).max())


@CLAMPED
def test_fi2_full_rank_alpha_residual_is_one_minus_alpha_g():
  """r = n, alpha != 1 (the reference's quirk): E = (1 - alpha) G, so
  Psi = (1 - alpha) G * phi on the first step (no limiting yet)."""
  alpha = 0.25
  shape = (16, 24)
  g = gapped_grads({"w": shape}, 2, 1)[0]
  tx = psi_chain({"w": 16}, alpha)
  psi, st = tx.update(g, tx.init(g))
  q = bases_of(st)[0]
  gm = np.asarray(g["w"], np.float64)
  r = down(q, gm, "reduction")
  n = (1 - B1) * r / (np.sqrt((1 - B2) * r * r) + EPS)
  want = (1 - alpha) * gm * channel_ratio(n, r, "reduction")
  np.testing.assert_allclose(psi["w"], want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  # The paper's E = G - up(R) vanishes at full rank.
  tx = psi_chain({"w": 16}, alpha, uses_scale=False)
  psi, _ = tx.update(g, tx.init(g))
  assert np.abs(psi["w"]).max() < 1e-5 * np.abs(want).max()


FI_SHAPES = {"a_in": (12, 20), "b_stacked_out": (2, 20, 12)}


def test_fi3_fi4_psi_orthogonal_to_subspace_and_channelwise_nonneg_multiple_of_e():
  grads = gapped_grads(FI_SHAPES, 4, 5)
  tx = psi_chain(RANK, 1.0, gap=2)
  st = tx.init(grads[0])
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    psi, st = step(g, st)
    for name, basis in zip(sorted(FI_SHAPES), bases_of(st)):
      shape = FI_SHAPES[name]
      side = std_side(shape)
      q = basis.reshape((-1,) + basis.shape[-2:])
      gm = np.asarray(g[name], np.float64).reshape(q.shape[:1] + shape[-2:])
      ps = np.asarray(psi[name], np.float64).reshape(gm.shape)
      for i in range(q.shape[0]):
        # Fi3: Q^T Psi = 0 (input side) / Psi Q = 0 (output side).
        proj = down(q[i], ps[i], side)
        assert np.abs(proj).max() <= 1e-5 * np.abs(ps[i]).max(), (t, name, i)
        # Fi4: each channel of Psi is a non-negative multiple of E's.
        e = gm[i] - up(q[i], down(q[i], gm[i], side), side)
        if side == "output":
          e, p_i = e.T, ps[i].T
        else:
          p_i = ps[i]
        coef = np.sum(p_i * e, axis=0) / np.sum(e * e, axis=0)
        assert np.all(coef >= 0), (t, name, i)
        np.testing.assert_allclose(p_i, e * coef, rtol=0,
                                   atol=1e-5 * np.abs(p_i).max())


def test_fi5_limiter_closed_form():
  """Pre-limit norms [1, 10, 10, 0.5] -> post-limit [1, 1.01, 1.0201, 0.5]."""
  prev = jnp.array([-1.0, -1.0])
  got = []
  for nrm in [1.0, 10.0, 10.0, 0.5]:
    x = jnp.stack([jnp.full((2, 2), nrm / 2), jnp.full((2, 2), 3 * nrm / 2)])
    x, prev = lro.limit_norm_growth(x, prev, GAMMA)
    got.append(np.linalg.norm(np.asarray(x), axis=(1, 2)))
  got = np.array(got)
  np.testing.assert_allclose(got[:, 0], [1, 1.01, 1.0201, 0.5], rtol=1e-6)
  np.testing.assert_allclose(got[:, 1], 3 * np.array([1, 1.01, 1.0201, 0.5]),
                             rtol=1e-6)


def test_fi5_limiter_state_per_matrix_and_kept_across_refreshes():
  """||Psi_t|| <= gamma ||Psi_{t-1}|| per batch element, refreshes included,
  with gradients growing 10x at every refresh; against RefFira's limiter."""
  shape = (2, 10, 16)
  gap = 2
  grads = gapped_grads({"w": shape}, 5, 6)
  for t in range(len(grads)):
    grads[t] = {"w": grads[t]["w"] * (10.0 ** (t // gap))}
  tx = psi_chain(RANK, 0.25, gap=gap)
  st = tx.init(grads[0])
  step = jax.jit(tx.update)
  refs = [RefFira("reduction", 0.25) for _ in range(2)]
  prev = None
  for t, g in enumerate(grads):
    psi, st = step(g, st)
    norms = np.linalg.norm(np.asarray(psi["w"], np.float64), axis=(1, 2))
    q = bases_of(st)[0]
    for i in range(2):
      _, want = refs[i].step(np.asarray(g["w"][i]), q[i], 1.0)
      np.testing.assert_allclose(psi["w"][i], want, rtol=0,
                                 atol=2e-5 * np.abs(want).max())
    if prev is not None:
      assert np.all(norms <= GAMMA * prev * (1 + 1e-5)), (t, norms, prev)
    prev = norms
  limiter_state = lro.subspace_state(st).residual[0][1]
  assert limiter_state.norm.shape == (2,)
  np.testing.assert_allclose(limiter_state.norm, prev, rtol=1e-5)


def test_fi6_first_step_closed_form():
  """step_size * Psi[c] ~= lr * sqrt(r) * E[c] / ||R[c]|| (|R| >> eps/sqrt(1-b2))."""
  shapes = {"a_in": (12, 20), "b_out": (20, 12)}
  lr = 1e-2
  g = gapped_grads(shapes, 6, 1, scale=100.0)[0]
  fira = lro.fira(lr, RANK, scale=0.25, projector="svd")
  galore = lro.galore(lr, RANK, scale=0.25, projector="svd")
  uf, st = jax.jit(fira.update)(g, fira.init(g))
  ug, _ = jax.jit(galore.update)(g, galore.init(g))
  for name, q in zip(sorted(shapes), bases_of(st)):
    side = std_side(shapes[name])
    step_psi = -(np.asarray(uf[name], np.float64) - np.asarray(ug[name]))
    gm = np.asarray(g[name], np.float64)
    r = down(q, gm, side)
    e = gm - 0.25 * up(q, r, side)
    axis = 0 if side == "reduction" else 1
    want = lr * math.sqrt(RANK) * e / np.linalg.norm(r, axis=axis,
                                                     keepdims=True)
    # The approximation's condition: eps / (sqrt(1 - b2) |R|) < 1e-4.
    assert np.abs(r).min() > 1e-2 / 3
    np.testing.assert_allclose(step_psi, want, rtol=0,
                               atol=1e-4 * np.abs(want).max(), err_msg=name)


# ---------------------------------------------------------------------------
# Pieces, errors, training
# ---------------------------------------------------------------------------


def test_scale_by_hf_bias_correction_closed_form():
  tx = lro.scale_by_hf_bias_correction(B1, B2)
  st = tx.init({"x": jnp.zeros(3)})
  for t in range(1, 5):
    u, st = tx.update({"x": jnp.ones(3)}, st)
    np.testing.assert_allclose(
        u["x"], math.sqrt(1 - B2**t) / (1 - B1**t), rtol=1e-6)


def test_two_sided_and_rank_zero_are_rejected_at_init():
  params = {"w": jnp.zeros((12, 20))}
  with pytest.raises(ValueError, match="both sides"):
    lro.fira(1e-2, 4, proj_type="full").init(params)
  tx = lro.chain(lro.galore_project(0), lro.scale_by_adam_hf(),
                 lro.fira_residual())
  with pytest.raises(ValueError, match="rank 0"):
    tx.init(params)


@pytest.mark.parametrize("name", ["fira", "dct_fira"])
def test_trains_a_small_mlp(name):
  if name == "fira":
    tx = lro.fira(1e-2, 4, update_proj_gap=20, weight_decay=1e-3)
  else:  # DCT projection with a Fira residual (the composition)
    tx = lro.chain(lro.galore_project(4, update_proj_gap=20, scale=0.25,
                                      projector="dct"),
                   lro.scale_by_adam_hf(correct_bias=False),
                   lro.fira_residual(),
                   lro.scale_by_hf_bias_correction(),
                   optax.scale_by_learning_rate(1e-2))
  l0, l1 = _mlp.train(tx, _mlp.mlp_problem(), 150)
  assert l1 < 0.2 * l0, (l0, l1)
