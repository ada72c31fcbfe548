"""Random coordinate projectors (FRUGAL): randperm, columns, rows, randk.

The maps are checked against NumPy fancy indexing with the indices read from
the projector state: ``down`` keeps exactly the selected coordinates, ``up``
writes them into zeros; the indices are distinct, sorted, in range, exactly
``int(rho * d)`` (``round`` for randperm) of the right axis, independent per
batch element, and redrawn at each refresh only. The Flax / PyTorch axis
mapping (PyTorch columns = ``in_features`` = our reduction axis ``M``) is
checked on a non-square leaf.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from lowrank_optax.projectors import coordinates


def _plan(shape, rank, proj_type="std", fraction_of="reduced",
          rounding="floor"):
  (plan,) = lro.plan_leaves({"w": jax.ShapeDtypeStruct(shape, jnp.float32)},
                            rank, proj_type, fraction_of=fraction_of,
                            fraction_rounding=rounding)
  return plan


def _check_indices(idx, size, count, batch):
  idx = np.asarray(idx)
  assert idx.dtype == np.int32
  assert idx.shape == batch + (count,)
  flat = idx.reshape(-1, count)
  for row in flat:
    assert (np.diff(row) > 0).all()  # sorted ascending, distinct
    assert row.min() >= 0 and row.max() < size
  if len(flat) > 1:
    assert not all((flat[0] == r).all() for r in flat[1:])  # per batch elt


def _ref_down(g, idx_list, axes):
  """NumPy reference, per batch element."""
  g = np.asarray(g)
  batch = g.shape[:-2]
  out = []
  for b in np.ndindex(*batch):
    x = g[b]
    for ax, idx in zip(axes, idx_list):
      i = np.asarray(idx)[b]
      x = x[i, :] if ax == "rows" else x[:, i]
    out.append(x)
  return np.stack(out).reshape(batch + out[0].shape)


CASES = [
    # name, shape, rho, proj_type, expected axes, expected sizes
    ("randperm", (2, 10, 6), 0.25, "std", ("cols",), None),
    ("randperm", (6, 10), 0.25, "std", ("rows",), None),
    ("randperm", (10, 12), 0.35, "full", ("rows", "cols"), None),
    ("columns", (2, 10, 6), 0.25, "right", ("rows",), None),
    ("rows", (10, 6), 0.5, "left", ("cols",), None),
]


@pytest.mark.parametrize("name,shape,rho,proj_type,axes,_", CASES)
def test_down_up_are_gather_and_scatter(name, shape, rho, proj_type, axes, _):
  proj = lro.projectors.make(name)
  plan = _plan(shape, rho, proj_type, rounding=proj.fraction_rounding)
  m, n = shape[-2:]
  sizes = {"rows": m, "cols": n}
  rnd = int if proj.fraction_rounding == "floor" else round
  state = proj.init(plan, jnp.float32, jax.random.key(3))
  state = proj.refresh(plan, None, state, True, jax.random.key(4))
  batch = shape[:-2]
  for ax, idx in zip(axes, state):
    reduced = sizes[ax] if len(axes) == 1 else min(m, n)
    count = rnd(rho * reduced)
    assert plan.rank == count
    _check_indices(idx, sizes[ax], count, batch)
  g = jnp.asarray(np.random.default_rng(0).standard_normal(shape),
                  jnp.float32)
  r = jax.jit(lambda g, s: proj.down(plan, g, s))(g, state)
  assert r.shape == proj.lowrank_shape(plan)
  np.testing.assert_array_equal(np.asarray(r), _ref_down(g, state, axes))
  back = np.asarray(jax.jit(lambda x, s: proj.up(plan, x, s))(r, state))
  # up(down(G)) is G on the selected coordinates and 0 elsewhere.
  mask = np.zeros(shape, bool)
  for b in np.ndindex(*batch):
    sel = np.ones((m, n), bool)
    for ax, idx in zip(axes, state):
      keep = np.zeros(sizes[ax], bool)
      keep[np.asarray(idx)[b]] = True
      sel &= keep[:, None] if ax == "rows" else keep[None, :]
    mask[b] = sel
  np.testing.assert_array_equal(back, np.where(mask, np.asarray(g), 0.0))


def test_randk_draws_entries():
  proj = lro.projectors.make("randk")
  shape, rho = (3, 8, 5), 0.3
  plan = _plan(shape, rho, fraction_of="numel")
  k = int(rho * 8 * 5)
  assert plan.rank == k and proj.lowrank_shape(plan) == (3, k)
  state = proj.refresh(plan, None, proj.init(plan, jnp.float32,
                                             jax.random.key(0)),
                       True, jax.random.key(1))
  _check_indices(state.indices, 40, k, (3,))
  g = jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                  jnp.float32)
  r = np.asarray(proj.down(plan, g, state))
  flat = np.asarray(g).reshape(3, 40)
  want = np.take_along_axis(flat, np.asarray(state.indices), axis=1)
  np.testing.assert_array_equal(r, want)
  back = np.asarray(proj.up(plan, jnp.asarray(r), state)).reshape(3, 40)
  mask = np.zeros((3, 40), bool)
  np.put_along_axis(mask, np.asarray(state.indices), True, axis=1)
  np.testing.assert_array_equal(back, np.where(mask, flat, 0.0))


def test_columns_are_pytorch_columns_inputs():
  """PyTorch W = K^T: ``W[:, idx]`` (columns = in_features) is ``K[idx, :]``."""
  proj = lro.projectors.make("columns")
  plan = _plan((12, 5), 0.5, "right")  # (in, out): 12 inputs, 5 outputs
  state = proj.refresh(plan, None, proj.init(plan, jnp.float32),
                       True, jax.random.key(2))
  assert state.indices.shape == (6,)  # int(0.5 * in_features)
  k = np.random.default_rng(2).standard_normal((12, 5)).astype(np.float32)
  w = k.T  # PyTorch layout (out, in)
  r = np.asarray(proj.down(plan, jnp.asarray(k), state))
  np.testing.assert_array_equal(r.T, w[:, np.asarray(state.indices)])
  # The wrong side is refused with the fix in the message.
  with pytest.raises(ValueError, match="proj_type='right'"):
    proj.init(_plan((12, 5), 0.5, "std"), jnp.float32)  # std: outputs


def test_indices_redrawn_at_refresh_only():
  """In a chain: the indices change at counts 0, T, 2T and nowhere else."""
  gap = 3
  tx = lro.chain(lro.frugal_project(0.3, projector="columns",
                                    update_gap=gap),
                 optax.scale_by_adam(), lro.sign_residual())
  params = {"w": jnp.zeros((20, 6))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  prev = None
  g = {"w": jnp.ones((20, 6))}
  for t in range(7):
    _, state = step(g, state)
    idx = np.asarray(state[0].projector[0].indices)
    assert idx.shape == (6,)
    if prev is not None:
      assert (t % gap == 0) != np.array_equal(idx, prev), t
    prev = idx


def test_explicit_mesh_gathers_along_sharded_axes():
  """Explicit 4x2 mesh: down / up along sharded axes name their shardings."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (virtual) devices")
  mesh = jax.make_mesh((4, 2), ("a", "b"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  spec = jax.sharding.PartitionSpec
  shape = (2, 16, 8)
  sharding = jax.sharding.NamedSharding(mesh, spec("b", "a", None))
  g = jax.device_put(jnp.asarray(
      np.random.default_rng(5).standard_normal(shape), jnp.float32),
                     sharding)
  # Two-sided randperm gathers along both (sharded) matrix axes, as columns
  # and rows do along one; randk gathers entries.
  for name, proj_type, fraction_of in (("randperm", "full", "reduced"),
                                       ("randk", "std", "numel")):
    proj = lro.projectors.make(name)
    tx = lro.chain(lro.frugal_project(
        0.5, projector=proj,
        proj_type="full" if name == "randperm" else "std"),
                   optax.scale_by_adam(), lro.sign_residual())
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init)({"w": g})
      u, state = jax.jit(tx.update)({"w": g}, state)
    plan = _plan(shape, 0.5, proj_type, fraction_of,
                 proj.fraction_rounding)
    pstate = state[0].projector[0]
    for idx in pstate:
      assert idx.sharding.spec == spec("b", None), name
    # Reference: on the selected coordinates the first Adam step is
    # R / (|R| + eps) ~ sign(G), elsewhere sign(E) = sign(G): so u = sign(G)
    # wherever G is not tiny.
    np.testing.assert_allclose(np.asarray(u["w"]), np.sign(np.asarray(g)),
                               atol=1e-5, err_msg=name)
    assert u["w"].sharding.spec == sharding.spec, name
    mu = state[0].inner[0][0].mu
    assert mu.shape == proj.lowrank_shape(plan), name


def test_registered_and_doctests():
  names = lro.projectors.names()
  for name in ("randperm", "columns", "rows", "randk"):
    assert name in names
  result = doctest.testmod(coordinates, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0
