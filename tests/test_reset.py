"""Momentum reset and weight refactorization (``lro.reset_every``, ``lro.quick_recovery_schedule``, ``lro.refactorize``): ALGORITHMS.md 10, R1-R4.

References: NumPy float64 SVDs (R1, R2); a fresh ``optax.scale_by_adam`` fed
the gradients since the last reset (R3); the official recovery lambda
(``OptimAI-Lab/Memory_Efficient_Pretraining``,
``para_eff_pt/peft_pretraining/training_utils.py``,
``_get_cosine_schedule_with_quick_recovery_lambda``) re-written in plain
Python floats from its logic (R4).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro


# -- R1, R2: refactorization -----------------------------------------------------

def test_r1_r2_refactorize_preserves_the_product_and_balances():
  rng = np.random.default_rng(0)
  b = rng.standard_normal((3, 20, 5))
  a = rng.standard_normal((3, 5, 30))
  b[..., 4] = b[..., 0] + b[..., 1]  # rank(BA) = 4 <= r = 5 per matrix
  nb, na = lro.refactorize(jnp.asarray(b, jnp.float32),
                           jnp.asarray(a, jnp.float32))
  assert nb.shape == (3, 20, 5) and na.shape == (3, 5, 30)
  w = b @ a
  np.testing.assert_allclose(np.asarray(nb) @ np.asarray(na), w, rtol=1e-4,
                             atol=1e-4)
  s = np.linalg.svd(w, compute_uv=False)[..., :5]
  for i in range(3):
    np.testing.assert_allclose(np.asarray(nb[i]).T @ np.asarray(nb[i]),
                               np.diag(s[i]), atol=2e-4 * s[i, 0])
    np.testing.assert_allclose(np.asarray(na[i]) @ np.asarray(na[i]).T,
                               np.diag(s[i]), atol=2e-4 * s[i, 0])


def test_refactorize_to_a_lower_rank_is_the_truncated_svd():
  rng = np.random.default_rng(1)
  b, a = rng.standard_normal((12, 6)), rng.standard_normal((6, 9))
  nb, na = lro.refactorize(jnp.asarray(b, jnp.float32),
                           jnp.asarray(a, jnp.float32), rank=3)
  u, s, vh = np.linalg.svd(b @ a, full_matrices=False)
  np.testing.assert_allclose(np.asarray(nb) @ np.asarray(na),
                             (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-4)
  nb16, na16 = lro.refactorize(jnp.asarray(b, jnp.bfloat16),
                               jnp.asarray(a, jnp.bfloat16))
  assert nb16.dtype == na16.dtype == jnp.bfloat16
  with pytest.raises(ValueError):
    lro.refactorize(jnp.ones((4, 2)), jnp.ones((2, 3)), rank=4)


# -- R3: the update after a reset is a fresh optimizer's first update ----------------

def test_r3_update_after_reset_is_a_fresh_adam_step():
  k, steps = 3, 8
  sched = optax.linear_schedule(1e-2, 1e-3, steps)
  tx = lro.reset_every(optax.chain(optax.scale_by_adam(),
                                   optax.scale_by_learning_rate(sched)), k)
  rng = np.random.default_rng(2)
  grads = [{"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
           for _ in range(steps)]
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  update = jax.jit(tx.update)
  adam = optax.scale_by_adam()
  for t, g in enumerate(grads):
    if t % k == 0:  # a reset (or the start): a fresh Adam from here on
      ref_state = adam.init(params)
    u, state = update(g, state, params)
    d, ref_state = adam.update(g, ref_state)
    for name in g:
      np.testing.assert_allclose(u[name], -sched(t) * d[name], rtol=1e-6,
                                 atol=1e-9, err_msg=f"{name} at {t}")
  adam_state, sched_state = state.inner_state
  assert int(adam_state.count) == steps - (steps - 1) // k * k  # since reset
  assert int(sched_state.count) == steps          # the schedule went on


def test_reset_inside_galore_keeps_the_basis():
  """Moments and counter restart; the basis (refresh every 10) is kept."""
  k = 2
  tx = lro.reset_every(lro.galore(1e-2, rank=2, projector="svd",
                                  update_proj_gap=10), k)
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros((6, 9))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(3):
    g = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
    basis = lro.subspace_state(state).projector[0].basis
    _, state = update({"w": g}, state, params)
    sub = lro.subspace_state(state)
    adam = sub.inner[0][0]
    if t == k:  # the update right after the reset: m = (1 - b1) R, v = (1 - b2) R^2
      np.testing.assert_array_equal(sub.projector[0].basis, basis)
      r = basis.T @ g  # (6, 9): std reduces in = 6
      assert int(adam.count) == 1
      np.testing.assert_allclose(adam.mu, 0.1 * r, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(adam.nu, 1e-3 * r**2, rtol=1e-4, atol=1e-9)
  assert int(sub.count) == 3  # the refresh schedule went on


def test_what_is_a_moment_state():
  x = jnp.zeros(3)
  assert lro.is_moment_state(optax.ScaleByAdamState(jnp.int32(0), x, x))
  assert lro.is_moment_state(lro.scale_by_adam_hf().init(x))
  assert lro.is_moment_state(optax.TraceState(x))
  assert lro.is_moment_state(lro.scale_by_hf_bias_correction().init(x))
  assert not lro.is_moment_state(optax.ScaleByScheduleState(jnp.int32(0)))
  inject = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2).init(x)
  assert not lro.is_moment_state(inject)  # a container: walked into
  assert not lro.is_moment_state(lro.galore(1e-2, rank=2).init(
      {"w": jnp.zeros((6, 9))}))
  assert not lro.is_moment_state(lro.BasisState(jnp.eye(3)))
  # A subspace with a stateless inner transform holds a counter and float
  # bases but no nested counter: still a container (bases, schedule kept).
  stateless = lro.chain(lro.galore_project(2), optax.scale_by_sign())
  assert not lro.is_moment_state(lro.subspace_state(
      stateless.init({"w": jnp.zeros((6, 9))})))
  # inject_hyperparams: the inner Adam restarts, the hyperparameter's own
  # counter does not.
  tx = lro.reset_every(optax.inject_hyperparams(optax.adam)(
      learning_rate=optax.linear_schedule(1.0, 0.0, 10)), 2)
  s = tx.init(x)
  for _ in range(3):
    _, s = tx.update(jnp.ones(3), s)
  assert int(s.inner_state.count) == 3
  assert int(s.inner_state.inner_state[0].count) == 1


# -- R4: the quick-recovery learning rate -------------------------------------------

def _reference_lambda(step, *, total, warmup, every, n, min_ratio):
  """The official recovery lambda, in plain Python floats."""
  def normal(s):
    if s < warmup:
      return s / max(1, warmup)
    progress = (s - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
  last = (step // every) * every
  since = step - last
  if since < n:
    target = normal(last + n)
    start = 0.001 * target
    progress = min(since / (n - 1) if n > 1 else 1.0, 1.0)
    return start + (target - start) * progress
  return normal(step)


def test_r4_quick_recovery_matches_the_reference_lambda():
  total, warmup, every, n, peak = 400, 40, 100, 10, 3e-3
  normal = optax.join_schedules([
      optax.linear_schedule(0.0, peak, warmup),
      optax.cosine_decay_schedule(peak, total - warmup, alpha=0.1)], [warmup])
  sched = jax.jit(jax.vmap(lro.quick_recovery_schedule(normal, every, n)))
  got = np.asarray(sched(jnp.arange(total)))
  ref = np.array([peak * _reference_lambda(t, total=total, warmup=warmup,
                                           every=every, n=n, min_ratio=0.1)
                  for t in range(total)])
  # Restarts at 100, 200, 300 (the reference's recovery also covers
  # 0 <= t < n, a window it never reaches: its first cycle runs the plain
  # schedule).
  np.testing.assert_allclose(got[n:], ref[n:], rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(got[:n], [normal(t) for t in range(n)],
                             rtol=1e-6)
  for s in (100, 200, 300):
    target = float(normal(s + n))
    np.testing.assert_allclose(got[s], 0.001 * target, rtol=1e-5)
    np.testing.assert_allclose(got[s + n - 1], target, rtol=1e-6)
    np.testing.assert_allclose(got[s - 1], normal(s - 1), rtol=1e-6)


def test_reset_and_recovery_are_aligned():
  """The update right after a reset is a fresh Adam step at the ramp's first
  (0.001) rate."""
  k = 4
  sched = lro.quick_recovery_schedule(1e-2, k, recovery_steps=3)
  tx = lro.reset_every(optax.adam(sched), k)
  s = tx.init(jnp.zeros(2))
  update = jax.jit(tx.update)
  us = []
  for t in range(2 * k):
    u, s = update(jnp.full(2, (-1.0)**t * (t + 1)), s)
    us.append(float(u[0]))
  # A fresh Adam's first step is -lr sign(g) (up to eps and optax's float32
  # bias correction, 1 - 0.999 rounded: ~1e-5); the sign alternates here,
  # so a step with history is smaller.
  np.testing.assert_allclose(us[0], -1e-2, rtol=1e-4)
  assert abs(us[k - 1]) < 0.9e-2
  np.testing.assert_allclose(us[k], -1e-5, rtol=1e-4)  # g_k > 0, k even
  adam = optax.scale_by_adam()
  st = adam.init(jnp.zeros(2))
  _, st = adam.update(jnp.full(2, k + 1.0), st)
  d, _ = adam.update(jnp.full(2, -(k + 2.0)), st)
  np.testing.assert_allclose(us[k + 1], -1e-2 * (0.001 + 0.999 * 0.5)
                             * float(d[0]), rtol=1e-4)
