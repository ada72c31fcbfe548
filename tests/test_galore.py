"""GaLore: ALGORITHMS.md G1-G8 and step-for-step agreement with a float64 reference.

The reference below is written from ALGORITHMS.md section 1 (the official
``GaLoreAdamW``) in NumPy float64, in PyTorch layout ``W = K^T`` (out, in),
independently of the library. The SVD's signs are ambiguous (ALGORITHMS.md
0.7), so the reference checks our basis against its own SVD in a
sign-invariant way (``Q Q^T``) and then uses our basis for its step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from _state import with_sub_state

B1, B2, EPS = 0.9, 0.999, 1e-6

# The reference's projector (the library's default is subspace iteration).
galore_ref = functools.partial(lro.galore, projector="svd")


sub_state = lro.subspace_state


def inject(state, count, bases):
  """Returns ``state`` with the subspace count and bases replaced."""
  sub = sub_state(state)
  proj = tuple(lro.BasisState(jnp.asarray(b, p.basis.dtype)) if b is not None
               else p for b, p in zip(bases, sub.projector))
  sub = sub._replace(count=jnp.asarray(count, jnp.int32), projector=proj)
  return with_sub_state(state, sub)


class RefGaLore:
  """float64 reference of one GaLoreAdamW param (PyTorch layout, 'std')."""

  def __init__(self, w, rank, gap, alpha, lr, wd=0.0):
    self.w = np.array(w, np.float64)
    self.r, self.gap, self.alpha, self.lr, self.wd = rank, gap, alpha, lr, wd
    self.m = self.v = None
    self.step = 0
    self.proj = None
    m, n = self.w.shape
    self.right = m >= n

  def top_subspace(self, g):
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return vh[:self.r].T if self.right else u[:, :self.r]  # (n|m, r) columns

  def update(self, g, basis=None, lr=None):
    lr = self.lr if lr is None else lr
    g = np.asarray(g, np.float64)
    if self.proj is None or self.step % self.gap == 0:
      self.proj = self.top_subspace(g) if basis is None else basis
    q = self.proj
    r = g @ q if self.right else q.T @ g
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.step += 1
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    step_size = lr * np.sqrt(1 - B2**self.step) / (1 - B1**self.step)
    n = self.m / (np.sqrt(self.v) + EPS)
    back = n @ q.T if self.right else q @ n
    self.w = self.w - step_size * self.alpha * back
    if self.wd:
      self.w = self.w - lr * self.wd * self.w
    return self.w


def random_grads(key, shapes, steps, scale=1.0):
  out = []
  for t in range(steps):
    k = jax.random.fold_in(key, t)
    out.append({name: scale * jax.random.normal(jax.random.fold_in(k, i), s)
                for i, (name, s) in enumerate(sorted(shapes.items()))})
  return out


SHAPES = {"a_square": (24, 24), "b_wide": (16, 40), "c_tall": (40, 16)}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_float64_reference_across_refreshes(wd):
  rank, gap, alpha, lr = 6, 4, 0.25, 0.05
  key = jax.random.key(0)
  params = {k: jax.random.normal(jax.random.fold_in(key, 99 + i), s)
            for i, (k, s) in enumerate(sorted(SHAPES.items()))}
  tx = galore_ref(lr, rank=rank, update_proj_gap=gap, scale=alpha,
                  weight_decay=wd)
  state = tx.init(params)
  step = jax.jit(tx.update)
  refs = {k: RefGaLore(np.asarray(params[k]).T, rank, gap, alpha, lr, wd)
          for k in SHAPES}
  names = sorted(SHAPES)
  for t, g in enumerate(random_grads(key, SHAPES, 3 * gap + 2)):
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    sub = sub_state(state)
    for i, k in enumerate(names):
      q = np.asarray(sub.projector[i].basis, np.float64)  # (d, r), our layout
      gt = np.asarray(g[k], np.float64).T  # PyTorch layout
      if t % gap == 0:  # a refresh: same subspace as the float64 SVD
        ref_q = refs[k].top_subspace(gt)
        np.testing.assert_allclose(q @ q.T, ref_q @ ref_q.T, atol=2e-4)
      # Our basis spans the reduced axis of K = W^T: K's axis 0 = W's axis 1.
      refs[k].update(gt, basis=q)
      np.testing.assert_allclose(np.asarray(params[k]).T, refs[k].w,
                                 rtol=1e-5, atol=2e-6, err_msg=f"{k} step {t}")
  assert int(sub.count) == 3 * gap + 2


def test_g1_projector_orthonormal():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = galore_ref(1e-2, rank=6)
  state = tx.init(params)
  g = random_grads(jax.random.key(1), SHAPES, 1)[0]
  _, state = tx.update(g, state, params)
  for p in sub_state(state).projector:
    q = np.asarray(p.basis)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-5)


def test_g2_update_lies_in_subspace():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = galore_ref(1e-2, rank=6, update_proj_gap=3)
  state = tx.init(params)
  for g in random_grads(jax.random.key(2), SHAPES, 5):
    u, state = tx.update(g, state, params)
    for i, k in enumerate(sorted(SHAPES)):
      q = np.asarray(sub_state(state).projector[i].basis, np.float64)
      uk = np.asarray(u[k], np.float64)
      if q.shape[0] == uk.shape[0]:  # reduced axis 0 (inputs)
        resid = uk - q @ (q.T @ uk)
      else:
        resid = uk - (uk @ q) @ q.T
      assert np.abs(resid).max() < 1e-6 * max(1.0, np.abs(uk).max())


def test_g3_first_step_closed_form():
  lr, alpha, r = 0.1, 0.25, 5
  k = {"w": (20, 30)}
  g = random_grads(jax.random.key(3), k, 1)[0]
  tx = galore_ref(lr, rank=r, scale=alpha)
  u, state = tx.update(g, tx.init(g), g)
  q = np.asarray(sub_state(state).projector[0].basis, np.float64)
  gw = np.asarray(g["w"], np.float64)
  R = q.T @ gw  # (20, 30): in=20 < out=30, reduce axis 0
  n = (1 - B1) * R / (np.sqrt(1 - B2) * np.abs(R) + EPS)
  expected = -lr * alpha * np.sqrt(1 - B2) / (1 - B1) * (q @ n)
  np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=2e-5,
                             atol=1e-7)


def test_g4_identity_projector_equals_hf_adamw():
  """Injected B = I (r = n) and alpha = 1: exactly HF-style AdamW."""
  n_in, n_out, lr, wd = 12, 20, 0.01, 0.05
  key = jax.random.key(4)
  w0 = jax.random.normal(key, (n_in, n_out))
  tx = galore_ref(lr, rank={"w": n_in}, scale=1.0, update_proj_gap=1000,
                  weight_decay=wd)
  state = inject(tx.init({"w": w0}), 1, [np.eye(n_in)])
  w = np.asarray(w0, np.float64)
  m = v = np.zeros_like(w)
  params = {"w": w0}
  for t in range(1, 6):
    g = jax.random.normal(jax.random.fold_in(key, t), (n_in, n_out))
    u, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, u)
    gn = np.asarray(g, np.float64)
    m = B1 * m + (1 - B1) * gn
    v = B2 * v + (1 - B2) * gn**2
    w = w - lr * np.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + EPS)
    w = w - lr * wd * w
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5,
                               atol=1e-6)


def test_g5_full_rank_rotation_with_momentum_equals_momentum_sgd():
  n_in, n_out = 10, 14
  key = jax.random.key(5)
  rot, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n_in, n_in)))
  tx = lro.chain(lro.galore_project({"w": n_in}, update_proj_gap=1000),
                 optax.trace(decay=0.9), optax.scale_by_learning_rate(0.1))
  state = tx.init({"w": jnp.zeros((n_in, n_out))})
  sub = state[0]
  state = (sub._replace(count=jnp.ones([], jnp.int32),
                        projector=(lro.BasisState(jnp.asarray(rot, jnp.float32)),)),
           ) + tuple(state[1:])
  ref = optax.chain(optax.trace(decay=0.9), optax.scale_by_learning_rate(0.1))
  rstate = ref.init({"w": jnp.zeros((n_in, n_out))})
  for t in range(4):
    g = {"w": jax.random.normal(jax.random.fold_in(key, t), (n_in, n_out))}
    u, state = tx.update(g, state)
    ur, rstate = ref.update(g, rstate)
    np.testing.assert_allclose(u["w"], ur["w"], rtol=1e-5, atol=1e-6)


def test_g6_moments_kept_at_refresh_and_counter_continues():
  gap = 3
  shapes = {"w": (16, 24)}
  grads = random_grads(jax.random.key(6), shapes, gap + 1)
  tx = galore_ref(1e-2, rank=4, update_proj_gap=gap)
  state = tx.init(grads[0])
  for g in grads[:gap]:
    _, state = tx.update(g, state, g)
  prev_mu = np.asarray(sub_state(state).inner[0][0].mu)
  _, state = tx.update(grads[gap], state, grads[gap])  # refresh at k = T
  sub = sub_state(state)
  q = np.asarray(sub.projector[0].basis)
  r_new = q.T @ np.asarray(grads[gap]["w"])
  np.testing.assert_allclose(np.asarray(sub.inner[0][0].mu),
                             B1 * prev_mu + (1 - B1) * r_new, rtol=1e-5,
                             atol=1e-7)
  assert int(sub.inner[0][0].count) == gap + 1
  assert int(sub.count) == gap + 1


@pytest.mark.parametrize("stagger", [False, True])
def test_g7_refresh_exactly_at_multiples_of_gap(stagger):
  gap, steps = 4, 13
  shapes = {"a": (12, 20), "b": (20, 12), "c": (16, 16)}
  tx = galore_ref(1e-2, rank=3, update_proj_gap=gap, stagger=stagger)
  grads = random_grads(jax.random.key(7), shapes, steps)
  state = tx.init(grads[0])
  step = jax.jit(tx.update)
  changed = {k: [] for k in range(3)}
  prev = None
  for t, g in enumerate(grads):
    _, state = step(g, state, g)
    bases = [np.asarray(p.basis) for p in sub_state(state).projector]
    for i, b in enumerate(bases):
      if prev is None or not np.array_equal(b, prev[i]):
        changed[i].append(t)
    prev = bases
  for i in range(3):
    offset = (i * gap) // 3 if stagger else 0
    expected = [t for t in range(steps) if t == 0 or (t + offset) % gap == 0]
    assert changed[i] == expected, (i, changed[i], expected)
  assert step._cache_size() == 1  # no recompilation across refreshes


def test_stacked_leaf_is_projected_per_layer():
  """A (L, d_in, d_out) leaf equals L independent 2-D leaves."""
  L, shape, gap = 3, (12, 18), 2
  key = jax.random.key(8)
  grads = [jax.random.normal(jax.random.fold_in(key, t), (L,) + shape)
           for t in range(5)]
  tx = galore_ref(1e-2, rank=4, update_proj_gap=gap)
  st = tx.init({"s": grads[0]})
  st2 = tx.init({f"l{i}": grads[0][i] for i in range(L)})
  for g in grads:
    u, st = tx.update({"s": g}, st, {"s": g})
    u2, st2 = tx.update({f"l{i}": g[i] for i in range(L)}, st2,
                        {f"l{i}": g[i] for i in range(L)})
    for i in range(L):
      # Sign-invariant: compare the update (the basis sign cancels).
      np.testing.assert_allclose(u["s"][i], u2[f"l{i}"], rtol=2e-4, atol=1e-7)


def test_learning_rate_schedule():
  sched = optax.linear_schedule(0.1, 0.0, 10)
  shapes = {"w": (10, 16)}
  grads = random_grads(jax.random.key(9), shapes, 3)
  tx = galore_ref(sched, rank=3)
  tx_const = [galore_ref(float(sched(t)), rank=3) for t in range(3)]
  st = tx.init(grads[0])
  sts = [t.init(grads[0]) for t in tx_const]
  for t, g in enumerate(grads):
    u, st = tx.update(g, st, g)
    for j in range(3):
      uj, sts[j] = tx_const[j].update(g, sts[j], g)
      if j == t:
        np.testing.assert_allclose(u["w"], uj["w"], rtol=1e-6)


def test_full_rank_leaves_use_unscaled_adam():
  params = {"norm": jnp.zeros(8), "embed": jnp.zeros((30, 8))}
  g = {"norm": jnp.arange(8.0) - 3, "embed": jnp.ones((30, 8))}
  u, _ = galore_ref(0.1, rank=2, scale=0.25).update(
      g, galore_ref(0.1, rank=2, scale=0.25).init(params), params)
  ref, _ = optax.chain(lro.scale_by_adam_hf(),
                       optax.scale_by_learning_rate(0.1)).update(
      g, optax.chain(lro.scale_by_adam_hf(),
                     optax.scale_by_learning_rate(0.1)).init(params))
  for k in params:
    np.testing.assert_allclose(u[k], ref[k], rtol=1e-6)
