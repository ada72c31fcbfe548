"""Random projectors: ``"gaussian"`` (APOLLO) and ``"orthogonal"`` (FRUGAL ``random``).

ALGORITHMS.md 5 (A4): APOLLO's ``P`` has i.i.d. ``N(0, 1/r)`` entries (not
orthonormalised), the same ``(seed, refresh)`` gives the same ``P``, and ``P``
changes exactly at ``k = 0, T, 2T``. The key of a refresh is documented as
``fold_in(fold_in(key(seed), leaf index among projected leaves), count)``;
the tests rebuild ``P`` from that rule with ``jax.random`` directly (not
through the library) and check ``down`` / ``up`` against float64 products.
FRUGAL's ``random`` projection is ``torch.nn.init.orthogonal_`` (Haar
distributed, orthonormal): checked for orthonormality and for the Haar
moments ``E[q_ij^2] = 1/d`` and ``E[Q Q^T] = (r/d) I``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lowrank_optax as lro
from _state import kept_entries
from lowrank_optax import projectors
from lowrank_optax import sharding as shd

RANK, GAP, STEPS, SEED = 4, 3, 8, 5
SHAPES = {"a_in": (12, 20),        # input side (12 <= 20): R is (r, 20)
          "b_out": (20, 12),       # output side: R is (20, r)
          "c_stacked": (3, 10, 16),  # stacked, input side
          "norm": (20,)}           # full rank
PROJECTED = ("a_in", "b_out", "c_stacked")


def std_side(shape):
  return "reduction" if shape[-2] <= shape[-1] else "output"


def grads_of(shapes, seed, steps):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in sorted(shapes.items())} for _ in range(steps)]


def expected_p(shape, side, index, count, seed=SEED, rank=RANK, which=None):
  """P from the documented key rule, with jax.random directly (float64)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index),
                           count)
  if side == "both":
    keys = jax.random.split(key)
    return tuple(np.asarray(jax.random.normal(
        k, shape[:-2] + (d, rank), jnp.float32), np.float64) / math.sqrt(rank)
                 for k, d in zip(keys, shape[-2:]))
  d = shape[-2] if side == "reduction" else shape[-1]
  return np.asarray(jax.random.normal(key, shape[:-2] + (d, rank), jnp.float32),
                    np.float64) / math.sqrt(rank)


def np_down(p, g, side):
  return (np.swapaxes(p, -1, -2) @ g if side == "reduction" else g @ p)


def np_up(p, x, side):
  return p @ x if side == "reduction" else x @ np.swapaxes(p, -1, -2)


# ---------------------------------------------------------------------------
# gaussian
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_run():
  """A GaLore-style chain with the Gaussian projector, STEPS jitted steps."""
  tx = lro.chain(lro.galore_project(RANK, update_proj_gap=GAP,
                                    projector="gaussian", seed=SEED),
                 optax.identity())
  grads = grads_of(SHAPES, 0, STEPS)
  state = tx.init(grads[0])
  step = jax.jit(tx.update)
  states, updates = [], []
  for g in grads:
    u, state = step(g, state)
    states.append(state)
    updates.append(u)
  return {"tx": tx, "grads": grads, "states": states, "updates": updates,
          "step": step}


def _keys(state):
  return [np.asarray(p.key) for p in lro.subspace_state(state).projector
          if isinstance(p, projectors.GaussianState)]


def test_a4_state_is_the_key_only_and_orbax_safe(gaussian_run):
  state = gaussian_run["states"][-1]
  sub = lro.subspace_state(state)
  names = sorted(SHAPES)
  for name, p in zip(names, sub.projector):
    if name not in PROJECTED:
      assert isinstance(p, optax.MaskedNode)
      continue
    assert isinstance(p, projectors.GaussianState)
    # One raw uint32 key per leaf (stacked leaves too): no matrix is stored.
    assert p.key.dtype == jnp.uint32 and p.key.shape == (2,)
  for x in jax.tree.leaves(state):
    assert not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    assert x.size > 0


def test_a4_p_changes_exactly_at_refreshes_and_follows_the_key_rule(
    gaussian_run):
  """P changes at k = 0, T, 2T only, and at refresh k it is the draw of the
  key rule for (seed, leaf index, k): the same (seed, refresh) gives the same
  P, another leaf or seed (SEED is not the default 0) another one."""
  prev = None
  refresh_of = 0
  for k, (g, u, state) in enumerate(zip(gaussian_run["grads"],
                                        gaussian_run["updates"],
                                        gaussian_run["states"])):
    keys = _keys(state)
    if prev is not None:
      changed = [not np.array_equal(a, b) for a, b in zip(keys, prev)]
      assert all(changed) == (k % GAP == 0) and any(changed) == (k % GAP == 0), k
    prev = keys
    if k % GAP == 0:
      refresh_of = k
    for index, name in enumerate(PROJECTED):
      shape, side = SHAPES[name], std_side(SHAPES[name])
      p = expected_p(shape, side, index, refresh_of)
      gm = np.asarray(g[name], np.float64)
      # identity inner, alpha 1: the update is up(down(G)) = P P^T G / G P P^T.
      want = np_up(p, np_down(p, gm, side), side)
      np.testing.assert_allclose(np.asarray(u[name]), want, rtol=1e-4,
                                 atol=1e-4 * np.abs(want).max(),
                                 err_msg=f"{name} at step {k}")
    np.testing.assert_array_equal(u["norm"], g["norm"])
  assert gaussian_run["step"]._cache_size() == 1


def test_a4_statistics_mean_zero_variance_one_over_r():
  r = 64
  plan = lro.plan_leaves({"w": jnp.zeros((512, 1024))}, r)[0]
  proj = projectors.GaussianProjector()
  state = proj.refresh(plan, jnp.zeros((512, 1024)), proj.init(
      plan, jnp.float32, jax.random.key(0)), True, jax.random.key(3))
  (p,) = proj.matrices(plan, state)
  p = np.asarray(p, np.float64)
  assert p.shape == (512, r)
  n = p.size
  assert abs(p.mean()) < 4 * math.sqrt(1 / r / n)
  # var of a sample variance of N(0, s2) is 2 s2^2 / n: 5 standard errors.
  assert abs(p.var() * r - 1) < 5 * math.sqrt(2 / n)
  # Not orthonormalised: columns have squared norm ~ d / r, not 1.
  col = np.sum(p * p, axis=0)
  assert abs(col.mean() - 512 / r) < 0.05 * 512 / r
  assert np.abs(p.T @ p - np.eye(r)).max() > 0.5


def test_stacked_leaf_gets_independent_matrices():
  plan = lro.plan_leaves({"s": jnp.zeros((3, 10, 16))}, RANK)[0]
  state = projectors.GaussianState(jax.random.key_data(jax.random.key(1)))
  (p,) = projectors.gaussian_matrices(plan, state)
  assert p.shape == (3, 10, RANK)
  assert not np.allclose(p[0], p[1]) and not np.allclose(p[1], p[2])


def test_two_sided_gaussian_is_two_independent_sketches():
  shape = (12, 20)
  tx = lro.chain(lro.galore_project(RANK, projector="gaussian",
                                    proj_type="full", seed=SEED),
                 optax.identity())
  g = grads_of({"w": shape}, 3, 1)[0]
  u, st = jax.jit(tx.update)(g, tx.init(g))
  pm, pn = expected_p(shape, "both", 0, 0)
  gm = np.asarray(g["w"], np.float64)
  r = pm.T @ gm @ pn
  want = pm @ r @ pn.T
  np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  assert not np.allclose(pm[:RANK], pn[:RANK])


def test_gaussian_refresh_ignores_a_non_finite_gradient():
  """No decomposition to poison: a NaN gradient still draws the new key."""
  plan = lro.plan_leaves({"w": jnp.zeros((8, 12))}, 2)[0]
  proj = projectors.GaussianProjector()
  st = proj.init(plan, jnp.float32, jax.random.key(0))
  g = jnp.full((8, 12), jnp.nan)
  new = proj.refresh(plan, g, st, False, jax.random.key(7))
  np.testing.assert_array_equal(new.key,
                                jax.random.key_data(jax.random.key(7)))


def test_memory_report_has_no_basis_bytes():
  """ALGORITHMS.md 12: the projector of a Gaussian leaf costs 0 (+ an 8-byte key)."""
  m, n, r = 256, 1024, 32  # (in, out): input side, R is (r, 1024)
  params = {"mlp": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  tx = lro.chain(lro.galore_project(r, projector="gaussian"),
                 optax.scale_by_adam())
  rep = lro.memory_report(tx, params)
  (row,) = rep.leaves
  # moments 2 r n float32 + the inner Adam's int32 count + the uint32 key.
  assert row.state_bytes == 2 * r * n * 4 + 4 + 8
  rep_basis = lro.memory_report(
      lro.chain(lro.galore_project(r, projector="svd"), optax.scale_by_adam()),
      params)
  assert rep_basis.leaves[0].state_bytes - row.state_bytes == m * r * 4 - 8


def _explicit_mesh():
  return jax.make_mesh((8,), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("spec", [P("fsdp", None), P(None, "fsdp")])
def test_regeneration_is_sharded_and_sharding_invariant(spec):
  """Inside jit on an explicit mesh P is drawn sharded like a stored basis,
  with the same values as an unsharded draw."""
  mesh = _explicit_mesh()
  shape = (32, 64)  # input side: P is (32, r), the basis of the rows
  x = jax.device_put(jnp.zeros(shape), NamedSharding(mesh, spec))
  plan0 = lro.plan_leaves({"w": x}, RANK)[0]
  state = projectors.GaussianState(jax.random.key_data(jax.random.key(4)))

  @jax.jit
  def regen(x, state):
    plan = plan0.with_sharding(shd.for_leaf(plan0, x))
    return projectors.gaussian_matrices(plan, state)[0]

  with jax.set_mesh(mesh):
    p = regen(x, state)
  # The basis of the rows keeps the param's rows entry, or takes the
  # columns' fsdp when the param leaves the rows unsharded (the FSDP rule).
  want = NamedSharding(mesh, P(*kept_entries(spec[0], spec[1], shape[0],
                                             RANK, {"fsdp": 8})))
  assert p.sharding.is_equivalent_to(want, 2), p.sharding
  np.testing.assert_array_equal(
      np.asarray(p), np.asarray(projectors.gaussian_matrices(plan0, state)[0]))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_apollo_on_explicit_mesh_matches_unsharded():
  mesh = _explicit_mesh()
  shapes = {"a": (32, 64), "b": (64, 32)}
  specs = {"a": P(None, "fsdp"), "b": P("fsdp", None)}
  tx = lro.apollo(1e-2, rank=RANK, update_proj_gap=1)
  grads = grads_of(shapes, 4, 2)
  put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                   for k, v in t.items()}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  with jax.set_mesh(mesh):
    sp = put(params)
    st = jax.jit(tx.init)(sp)
    step = jax.jit(tx.update)
    for g in grads:
      u, st = step(put(g), st, sp)
      sp = optax.apply_updates(sp, u)
  ref_st = tx.init(params)
  ref_step = jax.jit(tx.update)
  for g in grads:
    u, ref_st = ref_step(g, ref_st, params)
    params = optax.apply_updates(params, u)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(sp[k]), np.asarray(params[k]),
                               rtol=1e-5, atol=1e-7)
  sub = lro.subspace_state(st)
  names = sorted(shapes)
  # Moments follow the param's kept axis (DESIGN.md); the key is replicated.
  mu_a = sub.inner[names.index("a")][0].mu  # (r, 64), cols sharded
  assert mu_a.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)
  mu_b = sub.inner[names.index("b")][0].mu  # (64, r), rows sharded
  assert mu_b.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)


def test_orbax_resume_is_bit_exact_across_a_refresh(tmp_path):
  """The saved key regenerates the same P after a restore."""
  ocp = pytest.importorskip("orbax.checkpoint")
  shapes = {"w": (12, 20)}
  tx = lro.apollo(1e-2, rank=RANK, update_proj_gap=2)
  grads = grads_of(shapes, 6, 5)
  params = {"w": jnp.zeros(shapes["w"])}
  step = jax.jit(tx.update)
  st = tx.init(params)
  traj = []
  for t, g in enumerate(grads):
    if t == 2:
      saved = (params, st)
    u, st = step(g, st, params)
    params = optax.apply_updates(params, u)
    traj.append(params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", {"p": saved[0], "s": saved[1]})
  ckpt.wait_until_finished()
  target = jax.eval_shape(lambda: {"p": saved[0], "s": saved[1]})
  restored = ckpt.restore(tmp_path / "c", target)
  ckpt.close()
  params, st = restored["p"], restored["s"]
  for t in range(2, 5):  # refreshes at 2 and 4
    u, st = step(grads[t], st, params)
    params = optax.apply_updates(params, u)
    np.testing.assert_array_equal(np.asarray(params["w"]),
                                  np.asarray(traj[t]["w"]))


# ---------------------------------------------------------------------------
# orthogonal
# ---------------------------------------------------------------------------


def test_orthogonal_is_orthonormal_random_and_redrawn_only_at_refreshes():
  proj_type = "std"
  shapes = {"b_out": (20, 12), "c_stacked": (3, 10, 16)}  # both sides
  tx = lro.chain(lro.galore_project(RANK, update_proj_gap=GAP,
                                    projector="orthogonal",
                                    proj_type=proj_type, seed=SEED),
                 optax.identity())
  grads = grads_of(shapes, 1, 7)
  grads[3]["b_out"] = jnp.full((20, 12), jnp.nan)  # a refresh step
  st = tx.init(grads[0])
  step = jax.jit(tx.update)
  prev = None
  for k, g in enumerate(grads):
    _, st = step(g, st)
    bases = [np.asarray(q, np.float64)
             for p in lro.subspace_state(st).projector for q in p]
    for q in bases:
      eye = np.eye(RANK)
      assert np.abs(np.swapaxes(q, -1, -2) @ q - eye).max() < 1e-5
    assert bases[0].shape == (12, RANK)  # (20, 12): the 12 outputs reduced
    assert bases[1].shape == (3, 10, RANK)
    assert not np.allclose(bases[1][0], bases[1][1])
    if prev is not None:
      changed = [not np.array_equal(a, b) for a, b in zip(bases, prev)]
      assert all(changed) == (k % GAP == 0) and any(changed) == (k % GAP == 0)
    prev = bases


def test_orthogonal_two_sided():
  plan = lro.plan_leaves({"w": jnp.zeros((12, 20))}, RANK, "full")[0]
  proj = projectors.OrthogonalProjector()
  st = jax.jit(lambda st: proj.refresh(plan, jnp.zeros((12, 20)), st, True,
                                       jax.random.key(2)))(
      proj.init(plan, jnp.float32, jax.random.key(0)))
  assert isinstance(st, projectors.TwoSidedBasisState)
  for q, d in zip(st, (12, 20)):
    q = np.asarray(q, np.float64)
    assert q.shape == (d, RANK)
    assert np.abs(q.T @ q - np.eye(RANK)).max() < 1e-5
    assert np.abs(q[:RANK] - np.eye(RANK)).max() > 0.1  # not the placeholder


def test_orthogonal_haar_moments():
  """E[q_ij^2] = 1/d at every position, E[Q Q^T] = (r/d) I (Haar)."""
  batch, d, r = 1000, 8, 3
  plan = lro.plan_leaves({"w": jnp.zeros((batch, d, 50))}, r)[0]
  proj = projectors.OrthogonalProjector()
  st = jax.jit(lambda st: proj.refresh(plan, jnp.zeros((batch, d, 50)), st,
                                       True, jax.random.key(11)))(
      proj.init(plan, jnp.float32, jax.random.key(0)))
  q = np.asarray(st.basis, np.float64)
  assert q.shape == (batch, d, r)
  se = math.sqrt(2.0 / batch) / d  # rough standard error of a mean of q^2
  np.testing.assert_allclose(np.mean(q * q, axis=0), 1.0 / d, atol=5 * se)
  np.testing.assert_allclose(np.mean(q, axis=0), 0.0, atol=5 / math.sqrt(
      batch * d))
  qqt = np.mean(q @ np.swapaxes(q, -1, -2), axis=0)
  np.testing.assert_allclose(qqt, r / d * np.eye(d), atol=0.03)


def test_docstring_examples():
  """tests/test_docstrings.py covers top-level modules only."""
  import doctest  # pylint: disable=g-import-not-at-top
  from lowrank_optax.projectors import random as random_module  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(random_module, optionflags=doctest.ELLIPSIS
                           | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted > 0
