"""FRUGAL residual rules: ALGORITHMS.md 3 (F1, F4, F6) vs float64 references.

``lro.chain(lro.galore_project(r, ...), optax.scale_by_adam(),
lro.sign_residual(s), optax.scale_by_learning_rate(lr))`` is FRUGAL's
projectable-parameter step: a PyTorch-style Adam step (optax convention,
ALGORITHMS.md 0.2 (B)) on ``R = down(G)`` mapped back, plus a state-free step
``s * sign(E)`` (or ``s * E``) on the residual ``E = G - up(down(G))``, all
times ``-lr``.

The references are written from ALGORITHMS.md in NumPy float64, in Flax layout
(``(in, out)``; the ``std`` rule reduces the smaller dimension, the input axis
on a tie). The SVD's signs are ambiguous (ALGORITHMS.md 0.7), so the reference
checks our basis against its own SVD through ``Q Q^T`` (sign-invariant) at a
refresh and then uses our basis for its step; everything else (Adam, the
residual, the reset at a refresh, the side) is computed independently.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro

B1, B2, EPS = 0.9, 0.999, 1e-8  # optax.scale_by_adam = FRUGAL's inner Adam


def grads_of(shapes, seed, steps, zero_frac=0.0):
  """``steps`` dicts of float32 Gaussian gradients (exact zeros if asked)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {}
    for k, s in sorted(shapes.items()):
      x = rng.standard_normal(s).astype(np.float32)
      if zero_frac:
        x[rng.random(s) < zero_frac] = 0.0
      g[k] = jnp.asarray(x)
    out.append(g)
  return out


def std_side(shape):
  """ALGORITHMS.md 0.1 in Flax layout (in, out): the reduced matrix axis."""
  m_in, n_out = shape[-2:]
  return "reduction" if m_in <= n_out else "output"


def top_subspace(g, side):
  """float64 singular vectors of the reduced axis, as columns (best first)."""
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  return u if side == "reduction" else vh.T


def down(q, g, side):
  return q.T @ g if side == "reduction" else g @ q


def up(q, x, side):
  return q @ x if side == "reduction" else x @ q.T


class RefFrugal:
  """float64 FRUGAL step for one projectable matrix (ALGORITHMS.md 3).

  ``Delta = -lr * (up(Adam_B(R)) + s * rule(E))``, Adam restarted (m = v = 0,
  t = 0) at every refresh with ``reset=True``, continued otherwise.
  """

  def __init__(self, side, gap, lr, s, rule, reset):
    self.side, self.gap, self.lr, self.s = side, gap, lr, s
    self.rule, self.reset = rule, reset
    self.k = 0  # completed updates
    self.m = self.v = None
    self.t = 0

  def step(self, g, q):
    g = np.asarray(g, np.float64)
    q = np.asarray(q, np.float64)
    refresh = self.k % self.gap == 0
    r = down(q, g, self.side)
    if self.m is None or (refresh and self.reset):
      self.m, self.v, self.t = np.zeros_like(r), np.zeros_like(r), 0
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    mhat = self.m / (1 - B1**self.t)
    vhat = self.v / (1 - B2**self.t)
    adam = up(q, mhat / (np.sqrt(vhat) + EPS), self.side)
    e = g - up(q, r, self.side)
    term = np.sign(e) if self.rule == "sign" else e
    self.k += 1
    return -self.lr * adam, -self.lr * self.s * term, e, r


def assert_sign_step_close(u, expected, e_ref, step_size, what):
  """``u == expected`` except where float32 may flip sign(E) (|E| tiny)."""
  u = np.asarray(u, np.float64)
  ambiguous = np.abs(e_ref) < 1e-4 * np.abs(e_ref).max()
  assert ambiguous.mean() < 0.01, what
  np.testing.assert_allclose(np.where(ambiguous, expected, u), expected,
                             rtol=1e-4, atol=1e-4 * step_size, err_msg=what)


# ---------------------------------------------------------------------------
# F1: rank 0, the whole gradient is residual
# ---------------------------------------------------------------------------


def test_f1_rank_zero_sign_step_is_exact_sign_sgd():
  """F1: rho = 0 with sign_sgd: Delta W = -lr * s * sign(G), sign(0) = 0."""
  lr, s = 0.01, 0.3
  shapes = {"attn": (12, 20), "mlp": (3, 10, 6), "norm": (20,)}
  tx = lro.chain(lro.galore_project(0), optax.scale_by_adam(),
                 lro.sign_residual(s), optax.scale_by_learning_rate(lr))
  grads = grads_of(shapes, 1, 3, zero_frac=0.1)
  state = tx.init(grads[0])
  sub = state[0]
  # An empty subspace keeps no projector and no inner state for the matrices.
  assert isinstance(sub.projector[0], optax.MaskedNode)
  assert isinstance(sub.inner[0], optax.MaskedNode)
  adam = optax.scale_by_adam()
  adam_state = adam.init(grads[0]["norm"])
  step = jax.jit(tx.update)
  for g in grads:
    u, state = step(g, state)
    for k in ("attn", "mlp"):
      gk = np.asarray(g[k])
      assert (gk == 0).any()
      expected = -lr * s * np.sign(gk.astype(np.float64))
      np.testing.assert_allclose(np.asarray(u[k]), expected, rtol=1e-6,
                                 atol=0, err_msg=k)
      assert (np.asarray(u[k])[gk == 0] == 0).all()
    # The 1-D (norm) leaf passes through: plain Adam, no sign term.
    a, adam_state = adam.update(g["norm"], adam_state)
    np.testing.assert_allclose(np.asarray(u["norm"]), -lr * np.asarray(a),
                               rtol=1e-5, atol=1e-9)


def test_f1_rank_zero_with_pre_update_weight_decay():
  """F1 with wd: FRUGAL's W <- W (1 - lr wd) then the sign step.

  ``add_decayed_weights`` after the closer adds ``wd * W_old`` to the combined
  update before the learning rate, which is exactly the pre-update decay:
  ``Delta W = -lr * s * sign(G) - lr * wd * W_old``.
  """
  lr, s, wd = 0.05, 0.5, 0.1
  shapes = {"w": (16, 24)}
  tx = lro.chain(lro.galore_project(0), optax.scale_by_adam(),
                 lro.sign_residual(s), optax.add_decayed_weights(wd),
                 optax.scale_by_learning_rate(lr))
  rng = np.random.default_rng(11)
  w0 = rng.standard_normal((16, 24)).astype(np.float32)
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  w_ref = w0.astype(np.float64)
  for g in grads_of(shapes, 12, 4):
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    w_ref = w_ref * (1 - lr * wd) - lr * s * np.sign(np.asarray(g["w"],
                                                               np.float64))
    np.testing.assert_allclose(np.asarray(params["w"]), w_ref, rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# F6: the residual is Frobenius-orthogonal to the subspace
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_f6_residual_orthogonal_to_projected_gradient(shape):
  """F6 for the SVD projector: <E, up(down(G))>_F = 0, E from the library.

  With the inner transform ``scale(0)`` and ``sgd_residual(1)`` the update is
  exactly the library's residual ``E``; it is checked in float64 against
  ``G - Q Q^T G`` (or ``G - G Q Q^T``) built from the stored basis, and the
  basis against the float64 top-r singular subspace.
  """
  r = 4
  tx = lro.chain(lro.galore_project(r, projector="svd"), optax.scale(0.0), lro.sgd_residual(1.0))
  g = grads_of({"w": shape}, 3, 1)[0]
  e_lib, state = tx.update(g, tx.init(g))
  q = np.asarray(state[0].projector[0].basis, np.float64)
  side = std_side(shape)
  reduced = shape[0] if side == "reduction" else shape[1]
  assert q.shape == (reduced, r)
  gw = np.asarray(g["w"], np.float64)
  ref_q = top_subspace(gw, side)[:, :r]
  np.testing.assert_allclose(q @ q.T, ref_q @ ref_q.T, atol=1e-5)
  p = up(q, down(q, gw, side), side)
  e_ref = gw - p
  e_lib = np.asarray(e_lib["w"], np.float64)
  np.testing.assert_allclose(e_lib, e_ref, rtol=1e-5, atol=1e-5)
  inner = np.sum(e_lib * p)
  assert abs(inner) < 1e-5 * np.linalg.norm(e_lib) * np.linalg.norm(p)
  # E has no component in the subspace at all (stronger than F6).
  assert np.abs(down(q, e_lib, side)).max() < 1e-5 * np.abs(gw).max()
  # sign(E) is not orthogonal to the subspace (ALGORITHMS.md 3, note).
  assert abs(np.sum(np.sign(e_lib) * p)) > 1e-3


# ---------------------------------------------------------------------------
# The combined update against a float64 FRUGAL reference
# ---------------------------------------------------------------------------

SHAPES = {"a_wide": (12, 20), "b_tall": (20, 12), "c_norm": (20, 12),
          "d_bias": (20,), "e_small": (3, 24)}
PROJECTED = ("a_wide", "b_tall")


@pytest.mark.parametrize("rule,on_refresh", [("sign", "reset"),
                                             ("sgd", "reset"),
                                             ("sign", "keep"),
                                             ("sgd", "keep")])
def test_combined_update_matches_float64_frugal(rule, on_refresh):
  """Adam on R mapped back + s * rule(E), over refreshes (F4 with reset)."""
  r, gap, lr, s, steps = 4, 3, 0.01, 0.4, 7
  closer = lro.sign_residual(s) if rule == "sign" else lro.sgd_residual(s)
  tx = lro.chain(lro.galore_project(r, update_proj_gap=gap, projector="svd",
                                    on_refresh=on_refresh),
                 optax.scale_by_adam(), closer,
                 optax.scale_by_learning_rate(lr))
  grads = grads_of(SHAPES, 5, steps)
  state = tx.init(grads[0])
  names = sorted(SHAPES)
  # Only the two matrices are projected: "norm" paths, 1-D leaves and a
  # matrix whose smaller side is below the rank pass through.
  assert [not isinstance(p, optax.MaskedNode)
          for p in state[0].projector] == [k in PROJECTED for k in names]
  refs = {k: RefFrugal(std_side(SHAPES[k]), gap, lr, s, rule,
                       on_refresh == "reset") for k in PROJECTED}
  full = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))
  full_state = full.init({k: grads[0][k] for k in names
                          if k not in PROJECTED})
  step = jax.jit(tx.update)
  prev_q = {}
  for t, g in enumerate(grads):
    u, state = step(g, state)
    sub = state[0]
    for i, k in enumerate(names):
      if k not in PROJECTED:
        continue
      side = refs[k].side
      q = np.asarray(sub.projector[i].basis, np.float64)
      gk = np.asarray(g[k], np.float64)
      refresh = t % gap == 0
      if refresh:  # a refresh: the float64 top-r subspace of this gradient
        ref_q = top_subspace(gk, side)[:, :r]
        np.testing.assert_allclose(q @ q.T, ref_q @ ref_q.T, atol=1e-4)
      else:
        np.testing.assert_array_equal(q, prev_q[k])
      prev_q[k] = q
      adam, res, e, rk = refs[k].step(gk, q)
      if refresh and on_refresh == "reset":
        # F4: a fresh first step, -lr * up(R / (|R| + eps)).
        np.testing.assert_allclose(adam, -lr * up(q, rk / (np.abs(rk) + EPS),
                                                  side), rtol=1e-12)
      what = f"{k} step {t}"
      if rule == "sign":
        assert_sign_step_close(u[k], adam + res, e, lr, what)
      else:
        np.testing.assert_allclose(np.asarray(u[k]), adam + res, rtol=1e-4,
                                   atol=1e-4 * lr, err_msg=what)
    # Pass-through leaves: plain Adam (optax), no residual term.
    fu, full_state = full.update({k: g[k] for k in names
                                  if k not in PROJECTED}, full_state)
    for k, v in fu.items():
      np.testing.assert_allclose(np.asarray(u[k]), np.asarray(v), rtol=1e-5,
                                 atol=1e-9, err_msg=k)
    # The Adam counter restarts at each refresh with reset, not with keep.
    counts = [int(sub.inner[i][0].count) for i, k in enumerate(names)
              if k in PROJECTED]
    expected = (t % gap) + 1 if on_refresh == "reset" else t + 1
    assert counts == [expected] * len(PROJECTED), (t, counts)
  assert step._cache_size() == 1


def test_stacked_leaf_gets_per_layer_residuals():
  """A (L, m, n) leaf: per-layer bases, per-layer Adam and per-layer E."""
  L, shape, r, gap, lr, s, steps = 3, (12, 20), 4, 2, 0.01, 0.5, 4
  tx = lro.chain(lro.galore_project(r, update_proj_gap=gap, projector="svd",
                                    on_refresh="reset"),
                 optax.scale_by_adam(), lro.sgd_residual(s),
                 optax.scale_by_learning_rate(lr))
  grads = grads_of({"layers": (L,) + shape}, 9, steps)
  state = tx.init(grads[0])
  assert state[0].projector[0].basis.shape == (L, 12, r)
  assert state[0].inner[0][0].mu.shape == (L, r, 20)
  refs = [RefFrugal("reduction", gap, lr, s, "sgd", True) for _ in range(L)]
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    u, state = step(g, state)
    qs = np.asarray(state[0].projector[0].basis, np.float64)
    gl = np.asarray(g["layers"], np.float64)
    for i in range(L):
      if t % gap == 0:
        ref_q = top_subspace(gl[i], "reduction")[:, :r]
        np.testing.assert_allclose(qs[i] @ qs[i].T, ref_q @ ref_q.T,
                                   atol=1e-4)
      adam, res, e, _ = refs[i].step(gl[i], qs[i])
      np.testing.assert_allclose(np.asarray(u["layers"][i]), adam + res,
                                 rtol=1e-4, atol=1e-4 * lr,
                                 err_msg=f"layer {i} step {t}")
    # The layers' subspaces differ, so a shared basis could not pass the
    # per-layer comparison above.
    assert not np.allclose(qs[0] @ qs[0].T, qs[1] @ qs[1].T, atol=1e-2)


def test_rank_zero_rejected_without_residual_rule():
  """Rank 0 only means something with a residual rule (empty subspace)."""
  tx = lro.chain(lro.galore_project(0), optax.scale_by_adam(),
                 lro.back_project())
  with pytest.raises(ValueError, match="[Rr]ank"):
    tx.init({"w": jnp.zeros((8, 12))})
