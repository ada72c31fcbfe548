"""State sharding on a device mesh (DESIGN.md rules of the house), orbax resume.

On the 8 virtual CPU devices of conftest.py. The rule under test, from
DESIGN.md: for a projected param sharded ``P(a, b)`` over its matrix
``(m, n)``, an ``(m, r)`` state array is ``P(a, None)`` and an ``(r, n)``
array ``P(None, b)``; batch axes keep the param's entry. Our bases are stored
as ``(d, r)`` (``d`` the reduced axis), so a basis of the ``n`` axis is
``P(b, None)``. The expected specs are built here from the param's spec and
the ``std`` side rule (ALGORITHMS.md 0.1, Flax layout: reduce the smaller of
``(in, out)``, the input axis on a tie), not read from the library, and
compared with ``Sharding.is_equivalent_to`` (trailing ``None`` entries do not
matter).

Compilation dominates the run time, so each optimizer is compiled once (a
module-scoped fixture runs the uninterrupted trajectory) and the tests
inspect its recorded states.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lowrank_optax as lro
from _state import kept_entries

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (conftest.py sets 8 virtual CPU devices)")

RANK, GAP, STEPS = 8, 2, 6  # refreshes at 0-based steps 0, 2, 4

# name: (shape, spec over the fsdp mesh)
LEAVES = {
    "a": ((64, 32), P("fsdp", None)),         # output side, R rows sharded
    "b": ((64, 32), P(None, "fsdp")),         # output side, basis sharded
    "c": ((32, 64), P(None, "fsdp")),         # input side, R columns sharded
    "d": ((32, 64), P("fsdp", None)),         # input side, basis sharded
    "s": ((4, 64, 32), P(None, "fsdp", None)),  # stacked layers
    "norm": ((32,), P()),                     # passes through at full rank
}
# subspace_iteration compiles slowly (cold and warm branches of Cholesky-QR
# iterations per leaf): it runs on the leaves that shard its bases and R.
LEAVES_SUBSPACE_ITERATION = {k: LEAVES[k] for k in ("b", "d", "s", "norm")}


def is_projected(name, shape):
  """The default policy: matrices, except norm / embedding paths."""
  return len(shape) >= 2 and "norm" not in name


def fsdp_mesh():
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def side_of(shape):
  m_in, n_out = shape[-2:]
  return "input" if m_in <= n_out else "output"


def expected_specs(shape, spec, rank=RANK, mesh_sizes=None):
  """(lowrank R spec, basis spec) from DESIGN.md's rule; shapes too."""
  mesh_sizes = mesh_sizes or {"fsdp": 8}
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  batch, (sm, sn) = spec[:-2], spec[-2:]
  m, n = shape[-2:]
  keep_m = kept_entries(sm, sn, m, rank, mesh_sizes)  # (m, r) arrays
  keep_n = kept_entries(sn, sm, n, rank, mesh_sizes)  # (r, n) / (n, r)
  if side_of(shape) == "output":  # reduce n: R (m, r), basis of n (n, r)
    return ((shape[:-2] + (m, rank), P(*batch, *keep_m)),
            (shape[:-2] + (n, rank), P(*batch, *keep_n)))
  # reduce m: R (r, n), basis of m (m, r)
  return ((shape[:-2] + (rank, n), P(*batch, keep_n[1], keep_n[0])),
          (shape[:-2] + (m, rank), P(*batch, *keep_m)))


def make_params(mesh, leaves, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jax.device_put(rng.standard_normal(shape).astype(np.float32),
                            NamedSharding(mesh, spec))
          for k, (shape, spec) in sorted(leaves.items())}


def make_grads(mesh, leaves, steps, seed=1):
  return [make_params(mesh, leaves, seed=seed + 100 * t) for t in range(steps)]


def optimizers():
  """name: (transform, leaves)."""
  return {
      "galore": (lro.galore(1e-2, rank=RANK, update_proj_gap=GAP), LEAVES),
      "subspace_iteration": (lro.chain(
          lro.galore_project(RANK, update_proj_gap=GAP,
                             projector="subspace_iteration"),
          optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)),
                             LEAVES_SUBSPACE_ITERATION),
  }


def assert_sharded_as(x, mesh, spec, what):
  assert isinstance(x.sharding, NamedSharding), (what, x.sharding)
  want = NamedSharding(mesh, spec)
  assert x.sharding.is_equivalent_to(want, x.ndim), (
      what, x.sharding.spec, spec)


def check_state_shardings(state, mesh, leaves, what):
  sub = lro.subspace_state(state)
  names = sorted(leaves)
  for i, k in enumerate(names):
    shape, spec = leaves[k]
    inner = sub.inner[i][0]  # ScaleByAdam(HF)State
    if not is_projected(k, shape):
      assert isinstance(sub.projector[i], optax.MaskedNode)
      for arr in (inner.mu, inner.nu):
        assert arr.shape == shape
        assert_sharded_as(arr, mesh, spec, f"{what} {k} full-rank moment")
      continue
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    (r_shape, r_spec), (q_shape, q_spec) = expected_specs(
        shape, spec, mesh_sizes=sizes)
    for name, arr in (("mu", inner.mu), ("nu", inner.nu)):
      assert arr.shape == r_shape, (what, k, name, arr.shape)
      assert_sharded_as(arr, mesh, r_spec, f"{what} {k} {name}")
    basis = sub.projector[i].basis
    assert basis.shape == q_shape, (what, k, basis.shape)
    assert_sharded_as(basis, mesh, q_spec, f"{what} {k} basis")


def shapes_dtypes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.fixture(scope="module")
def runs():
  """Uninterrupted FSDP trajectories, one compiled update per optimizer."""
  mesh = fsdp_mesh()
  out = {}
  for name, (tx, leaves) in optimizers().items():
    params = make_params(mesh, leaves)
    grads = make_grads(mesh, leaves, STEPS)
    state = tx.init(params)
    step = jax.jit(tx.update)
    # The training-step pattern: the update applied inside the jitted step,
    # where XLA gives it the params' sharding (in an auto mesh the sharding
    # of an update returned on its own is XLA's choice).
    train = jax.jit(lambda g, s, p: (lambda u, s: (
        u, s, optax.apply_updates(p, u)))(*tx.update(g, s, p)))
    rec = {"tx": tx, "leaves": leaves, "step": step, "train": train,
           "mesh": mesh, "grads": grads,
           "params": [params], "states": [state], "updates": [],
           "cache": []}
    for g in grads:
      step(g, state, params)  # the bare update compiles once too
      u, state, params = train(g, state, params)
      rec["updates"].append(u)
      rec["params"].append(params)
      rec["states"].append(state)
      rec["cache"].append(step._cache_size())
    out[name] = rec
  return out


@pytest.mark.parametrize("name", ["galore", "subspace_iteration"])
def test_state_sharding_follows_param_sharding(runs, name):
  """Init, a cold refresh, a plain step, a warm refresh: DESIGN.md's specs."""
  rec = runs[name]
  mesh, leaves = rec["mesh"], rec["leaves"]
  # After init, step 0 (cold refresh), step 1, step 2 (warm refresh), step 5.
  for t in (0, 1, 2, 3, STEPS):
    check_state_shardings(rec["states"][t], mesh, leaves, f"{name} state {t}")
  for t in (0, 2):
    for k, (_, spec) in leaves.items():
      assert_sharded_as(rec["updates"][t][k], mesh, spec, f"update {k}")


@pytest.mark.parametrize("name", ["galore", "subspace_iteration"])
def test_state_shapes_dtypes_stable_and_no_zero_size_arrays(runs, name):
  rec = runs[name]
  ref = shapes_dtypes(rec["states"][0])
  for state in rec["states"][1:]:
    assert jax.tree.structure(state) == jax.tree.structure(rec["states"][0])
    assert shapes_dtypes(state) == ref
  for x in jax.tree.leaves(rec["states"][-1]):
    assert x.size > 0, x.shape
  # The abstract state (for checkpoint targets, memory reports) agrees.
  abstract = jax.eval_shape(rec["tx"].init, rec["params"][0])
  assert jax.tree.structure(abstract) == jax.tree.structure(rec["states"][0])
  assert shapes_dtypes(abstract) == ref


@pytest.mark.parametrize("name", ["galore", "subspace_iteration"])
def test_no_recompilation_after_the_second_call(runs, name):
  """Steady state: refreshes (lax.cond) and later steps reuse one executable.

  With plain ``jax.jit`` the second call may retrace once: JAX spells the
  specs of jit outputs its own way (``P()`` for a replicated basis given
  ``P(None, None)``, trailing ``None``s kept or dropped by propagation), which
  a cache key compares exactly; ``optax.adam`` retraces the same way on a
  mesh. Pinning ``out_shardings`` to ``init``'s compiles once (the test
  below).
  """
  cache = runs[name]["cache"]
  assert cache[1] == cache[-1], cache
  assert cache[-1] <= 2, cache


@pytest.mark.parametrize("name", ["galore", "subspace_iteration"])
def test_fsdp_state_bytes_per_device_are_total_over_8(runs, name):
  """Arrays DESIGN.md shards over fsdp hold 1/8 of their bytes per device."""
  rec = runs[name]
  leaves = rec["leaves"]
  sub = lro.subspace_state(rec["states"][-1])
  n_dev = 8
  checked = 0
  for i, k in enumerate(sorted(leaves)):
    shape, spec = leaves[k]
    if not is_projected(k, shape):
      continue
    (_, r_spec), (_, q_spec) = expected_specs(shape, spec)
    arrays = [(sub.inner[i][0].mu, r_spec), (sub.inner[i][0].nu, r_spec),
              (sub.projector[i].basis, q_spec)]
    for arr, want in arrays:
      if "fsdp" not in tuple(want):
        continue
      shards = arr.addressable_shards
      assert len(shards) == n_dev
      assert len({s.device for s in shards}) == n_dev
      for s in shards:
        assert s.data.nbytes * n_dev == arr.nbytes, (k, arr.shape)
      checked += 1
  assert checked >= 3


def test_jit_with_init_shardings_as_out_shardings_compiles_once(runs):
  """The state's shardings from ``init`` pin a jitted update: one compilation.

  ``jax.jit(update, out_shardings=(param_shardings, init_state_shardings))``
  is how a sharded training step keeps its state layout fixed across steps.
  """
  rec = runs["galore"]
  tx, mesh = rec["tx"], rec["mesh"]
  params = rec["params"][0]
  state = tx.init(params)
  out_sh = (jax.tree.map(lambda x: x.sharding, params),
            jax.tree.map(lambda x: x.sharding, state))
  step = jax.jit(tx.update, out_shardings=out_sh)
  for g in rec["grads"][:3]:  # a refresh, a plain step, a refresh
    _, state = step(g, state, params)
  assert step._cache_size() == 1
  check_state_shardings(state, mesh, rec["leaves"], "pinned")


def test_every_state_array_lives_on_the_params_mesh(runs):
  rec = runs["galore"]
  state = rec["tx"].init(rec["params"][0])
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert isinstance(x.sharding, NamedSharding), (
        jax.tree_util.keystr(path), x.sharding)
    assert x.sharding.mesh == rec["mesh"], jax.tree_util.keystr(path)


def test_two_axis_mesh():
  """(4, 2) mesh with axes (data, model): both param axes sharded."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  leaves = {"w_out": ((64, 32), P("data", "model")),
            "w_in": ((32, 64), P("model", "data")),
            "stack": ((4, 64, 32), P("data", "model", None))}
  params = make_params(mesh, leaves)
  tx = lro.galore(1e-2, rank=RANK, update_proj_gap=GAP)
  state = tx.init(params)
  check_state_shardings(state, mesh, leaves, "init")
  step = jax.jit(tx.update)
  for t, g in enumerate(make_grads(mesh, leaves, 3)):
    _, state = step(g, state, params)
    check_state_shardings(state, mesh, leaves, f"step {t}")
  # Spot-check the rule by hand for the first leaf: R (64, 8) P(data, None),
  # its basis of the 32-long output axis (32, 8) P(model, None).
  sub = lro.subspace_state(state)
  names = sorted(leaves)
  i = names.index("w_out")
  assert sub.inner[i][0].mu.sharding.is_equivalent_to(
      NamedSharding(mesh, P("data", None)), 2)
  assert sub.projector[i].basis.sharding.is_equivalent_to(
      NamedSharding(mesh, P("model", None)), 2)


def test_orbax_resume_is_bit_exact_across_a_refresh(runs, tmp_path):
  """Save params + state after 3 steps, restore (abstract target), continue.

  The target is ``jax.eval_shape(tx.init, params)`` (shapes and dtypes) with
  the live arrays' shardings attached; the continued trajectory (steps 3-5,
  a refresh at step 4) must be bit-identical to the uninterrupted one.
  """
  ocp = pytest.importorskip("orbax.checkpoint")
  rec = runs["galore"]
  tx, train = rec["tx"], rec["train"]
  k = 3
  params, state = rec["params"][k], rec["states"][k]
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": params, "opt_state": state})
  ckpt.wait_until_finished()

  abstract_state = jax.eval_shape(tx.init, rec["params"][0])
  target = {
      "params": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          params),
      "opt_state": jax.tree.map(
          lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                            sharding=x.sharding),
          abstract_state, state),
  }
  restored = ckpt.restore(path, target)
  ckpt.close()
  assert (jax.tree.structure(restored["opt_state"])
          == jax.tree.structure(state))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(
      {"params": params, "opt_state": state})):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  params, state = restored["params"], restored["opt_state"]
  for t in range(k, STEPS):
    _, state, params = train(rec["grads"][t], state, params)
    for name in rec["leaves"]:
      np.testing.assert_array_equal(np.asarray(params[name]),
                                    np.asarray(rec["params"][t + 1][name]),
                                    err_msg=f"{name} after step {t}")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(rec["states"][-1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(lro.subspace_state(state).count) == STEPS
