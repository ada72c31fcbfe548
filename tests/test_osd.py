"""Online Subspace Descent (``lro.online_subspace_descent``, ``"online_pca"``): ALGORITHMS.md 8, O1-O4.

The references are written from the official code
(``kyleliang919/Online-Subspace-Descent``, ``galore_torch/galore_projector.py``
``continuous`` branches), not from ours: the online-PCA loss in the
reference's PyTorch layout (right: ``P`` is ``r x n``, ``L = ||G P^T P -
G||^2``; left: ``P`` is ``m x r``, ``L = ||P P^T G - G||^2``, ``G`` the
``(out, in)`` gradient normalised by its Frobenius norm), differentiated by
``jax.grad``; NumPy float64 losses; ``lro.galore(projector="svd")`` with an
infinite refresh period for O3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _mlp
from lowrank_optax.projectors import online_pca


def _torch_layout_loss(p, g_torch, side):
  """The reference's loss on the PyTorch ``(out, in)`` gradient."""
  gh = g_torch / jnp.linalg.norm(g_torch)
  if side == "right":  # p: (r, n)
    return jnp.sum((gh @ p.T @ p - gh) ** 2)
  return jnp.sum((p @ p.T @ gh - gh) ** 2)  # left, p: (m, r)


def _loss64(q, a):
  q, a = np.asarray(q, np.float64), np.asarray(a, np.float64)
  a = a / np.linalg.norm(a)
  return float(np.sum((q @ q.T @ a - a) ** 2))


# -- O1: the closed form is the gradient -------------------------------------

def test_o1_closed_form_equals_autodiff_batched():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((3, 9, 4)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((3, 9, 14)), jnp.float32)
  a = a.at[1].multiply(1e3)  # normalisation per matrix
  grad, sq = jax.jit(lro.projectors.online_pca_grad)(q, a)
  auto = jax.jit(jax.vmap(jax.grad(lambda q, a: jnp.sum((
      q @ q.T @ (a / jnp.linalg.norm(a)) - a / jnp.linalg.norm(a)) ** 2))))(
          q, a)
  np.testing.assert_allclose(grad, auto, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(sq, np.sum(np.asarray(a, np.float64) ** 2,
                                        axis=(1, 2)), rtol=1e-5)
  # A zero gradient matrix: zero loss gradient (the reference divides by 0).
  grad0, _ = lro.projectors.online_pca_grad(q, jnp.zeros_like(a))
  np.testing.assert_array_equal(grad0, 0.0)


@pytest.mark.parametrize("shape,side", [((6, 10), "right"), ((10, 6), "left")])
def test_o1_layout_one_sgd_step_is_the_references(shape, side):
  """Flax (in, out) leaf; std reduces the smaller side. (6, 10): PyTorch
  W is (10, 6), m >= n: right, P = Q^T. (10, 6): PyTorch (6, 10): left,
  P = Q. One plain-SGD step on the reference's loss, at count 1."""
  rng = np.random.default_rng(1)
  plan = lro.plan_leaves({"w": jnp.zeros(shape)}, 3)[0]
  lr = 0.3
  proj = lro.projectors.OnlinePCAProjector(optimizer=optax.sgd(lr))
  state = proj.init(plan, jnp.float32, jax.random.key(0))
  d = plan.rows if plan.side == "reduction" else plan.cols
  q = jnp.asarray(rng.standard_normal((d, 3)), jnp.float32)
  state = state._replace(basis=type(state.basis)(q))
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  advance = jax.jit(lambda s, c: proj.advance(plan, g, s, c))
  new = advance(state, jnp.int32(1))
  p0 = q.T if side == "right" else q
  p1 = p0 - lr * jax.jit(jax.grad(_torch_layout_loss), static_argnums=2)(
      p0, g.T, side)
  expected = p1.T if side == "right" else p1
  np.testing.assert_allclose(new.basis.basis, expected, rtol=1e-4, atol=1e-6)
  # At count 0 the basis does not move (the reference's first call).
  same = advance(state, jnp.int32(0))
  np.testing.assert_array_equal(same.basis.basis, q)


# -- O2: a stationary point ----------------------------------------------------

def test_o2_top_singular_basis_is_stationary():
  rng = np.random.default_rng(2)
  g = (rng.standard_normal((10, 3)) @ rng.standard_normal((3, 16))).astype(
      np.float32)  # Flax (in=10, out=16): reduces in; rank(G) = 3 <= r = 4
  u, _, _ = np.linalg.svd(g.astype(np.float64))
  q = jnp.asarray(u[:, :4], jnp.float32)
  grad, _ = lro.projectors.online_pca_grad(q, jnp.asarray(g))
  assert float(jnp.max(jnp.abs(grad))) < 1e-5
  # In the recipe, with a weight-decay-free basis optimizer the basis stays.
  tx = lro.online_subspace_descent(1e-2, rank=4, update_proj_gap=10,
                                   p_optimizer=optax.sgd(0.1))
  params = {"w": jnp.zeros((10, 16))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  bases = []
  for _ in range(4):
    _, state = update({"w": jnp.asarray(g)}, state, params)
    bases.append(np.asarray(lro.subspace_state(state).projector[0].basis.basis))
  for b in bases[1:]:
    np.testing.assert_allclose(b, bases[0], atol=1e-5)
  # ... and it spans G's column space (the SVD start).
  np.testing.assert_allclose(bases[0] @ bases[0].T @ g, g, atol=1e-4)


# -- O3: a frozen basis is GaLore with T = infinity -------------------------------

SHAPES = {"attn": (12, 20), "mlp": (20, 8), "norm": (20,)}


def _grads(steps, seed=3):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in SHAPES.items()} for _ in range(steps)]


def _run(tx, grads):
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state


@pytest.fixture(scope="module")
def galore_frozen():
  tx = lro.galore(1e-2, rank=4, projector="svd", update_proj_gap=10**6,
                  weight_decay=0.1)
  return _run(tx, _grads(6))[0]


def test_o3_zero_basis_rate_is_galore_with_infinite_gap(galore_frozen):
  # T = 3 < 6 steps: OSD never recomputes its basis (T only sets its rate).
  tx = lro.online_subspace_descent(1e-2, rank=4, update_proj_gap=3,
                                   weight_decay=0.1,
                                   p_lr_multiplier=lambda count: 0.0)
  updates, _ = _run(tx, _grads(6))
  for u, ref in zip(updates, galore_frozen):
    for k in SHAPES:
      np.testing.assert_allclose(u[k], ref[k], rtol=1e-5, atol=1e-7)


def test_basis_moves_after_the_update_that_used_it(galore_frozen):
  """The default AdamW basis step runs after the weight update: updates 0
  and 1 use the SVD basis of G_0 (GaLore's), update 2 the moved one."""
  tx = lro.online_subspace_descent(1e-2, rank=4, update_proj_gap=5,
                                   weight_decay=0.1)
  updates, state = _run(tx, _grads(4))
  for step in (0, 1):
    for k in SHAPES:
      np.testing.assert_allclose(updates[step][k], galore_frozen[step][k],
                                 rtol=1e-5, atol=1e-7)
  assert not np.allclose(updates[2]["attn"], galore_frozen[2]["attn"],
                         rtol=1e-3)
  np.testing.assert_allclose(updates[2]["norm"], galore_frozen[2]["norm"],
                             rtol=1e-5)  # full-rank leaves: plain HF AdamW
  # P is not re-orthonormalised.
  q = np.asarray(lro.subspace_state(state).projector[0].basis.basis)
  assert np.abs(q.T @ q - np.eye(4)).max() > 1e-4


def test_basis_rate_follows_the_schedule():
  """P_{t+1} = P_t - (lr_t / lr_0) * lr_P * grad (plain SGD on P)."""
  sched = optax.linear_schedule(0.0, 1e-2, transition_steps=4)
  lr_p = 0.5
  tx = lro.online_subspace_descent(sched, rank=3, peak_learning_rate=1e-2,
                                   p_optimizer=optax.sgd(lr_p))
  grads = [{"w": g["attn"]} for g in _grads(3, seed=4)]
  params = {"w": jnp.ones((12, 20))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref_grad = jax.jit(jax.grad(_torch_layout_loss), static_argnums=2)
  for t, g in enumerate(grads):
    before = lro.subspace_state(state).projector[0].basis.basis
    _, state = update(g, state, params)
    after = lro.subspace_state(state).projector[0].basis.basis
    if t == 0:
      continue
    p0 = before.T  # (12, 20): std reduces in = 12: right, P = Q^T
    expected = p0 - lr_p * (t / 4) * ref_grad(p0, g["w"].T, "right")
    np.testing.assert_allclose(after, expected.T, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="peak_learning_rate"):
    lro.online_subspace_descent(sched)


# -- O4: descent on a fixed gradient ---------------------------------------------

def test_o4_sgd_on_a_fixed_gradient_decreases_the_loss():
  rng = np.random.default_rng(5)
  g = jnp.asarray(rng.standard_normal((8, 30)) * np.linspace(3, 0.1, 8)[:, None],
                  jnp.float32)
  plan = lro.plan_leaves({"w": jnp.zeros((8, 30))}, 3)[0]
  proj = lro.projectors.OnlinePCAProjector(optimizer=optax.sgd(0.05))
  state = proj.init(plan, jnp.float32, jax.random.key(0))
  q, _ = np.linalg.qr(rng.standard_normal((8, 3)))
  state = state._replace(basis=type(state.basis)(jnp.asarray(q, jnp.float32)))
  advance = jax.jit(lambda s: proj.advance(plan, g, s, jnp.int32(1)))
  losses = [_loss64(state.basis.basis, g)]
  for _ in range(30):
    state = advance(state)
    losses.append(_loss64(state.basis.basis, g))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  # ... towards the optimum: the energy outside the top-3 singular subspace.
  s = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
  optimum = float(np.sum(s[3:] ** 2) / np.sum(s ** 2))
  assert losses[-1] - optimum < 0.5 * (losses[0] - optimum)


# -- memory, training -----------------------------------------------------------

def test_memory_report_is_the_osd_row():
  """ALGORITHMS.md 12, OSD: basis rn, moments 2mr, P-AdamW 2rn (W: m x n,
  m >= n; Flax (in=n, out=m)), plus the two int32 Adam counters."""
  m, n, r = 64, 32, 4
  params = {"w": jax.ShapeDtypeStruct((n, m), jnp.float32)}
  osd = lro.memory_report(lro.online_subspace_descent(1e-2, rank=r), params)
  galore = lro.memory_report(lro.galore(1e-2, rank=r), params)
  (row,), (grow,) = osd.leaves, galore.leaves
  assert row.rank == r
  assert row.state_bytes == 4 * (r * n + 2 * m * r + 2 * r * n) + 2 * 4
  assert grow.state_bytes == 4 * (r * n + 2 * m * r) + 4
  assert row.adam_bytes == 4 * 2 * m * n


def test_trains_a_small_mlp():
  tx = lro.online_subspace_descent(3e-2, rank=4, update_proj_gap=20)
  l0, l1 = _mlp.train(tx, _mlp.mlp_problem_16_24_8(), 80)
  assert l1 < 0.3 * l0


def test_by_name_in_galore_project():
  assert "online_pca" in lro.projectors.names()
  elem = lro.galore_project(4, update_proj_gap=7, projector="online_pca")
  proj = elem.config.projector
  assert isinstance(proj, online_pca.OnlinePCAProjector)
  assert proj.update_proj_gap == 7  # its basis rate is 1/T of this T
