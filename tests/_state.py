"""Test helpers: reach and replace the SubspaceState inside an optimizer state."""

import jax

import lowrank_optax as lro


def with_sub_state(opt_state, sub):
  """``opt_state`` with its (only) ``SubspaceState`` replaced by ``sub``."""
  lro.subspace_state(opt_state)  # exactly one
  return jax.tree.map(
      lambda x: sub if isinstance(x, lro.SubspaceState) else x, opt_state,
      is_leaf=lambda x: isinstance(x, lro.SubspaceState))


def kept_entries(own, other, kept_size, rank, mesh_sizes):
  """The test suite's statement of the state-sharding rule for one low-rank
  array that keeps a matrix axis (``(M, r)``, ``(r, N)``, a basis ``(d, r)``):
  ``(entry of the kept axis, entry of the r axis)``.

  DESIGN.md: the kept axis takes the param's entry for it (``own``). Where
  the param leaves it unsharded, the mesh axes of the param's other matrix
  axis (``other``) move onto the kept axis if they divide its size, else onto
  ``r`` if they divide it, else nowhere; so a param split over ``p`` devices
  has every low-rank array split over them (per-device state = total / p).
  """
  if own is not None or other is None:
    return own, None
  names = (other,) if isinstance(other, str) else tuple(other)
  n = 1
  for name in names:
    n *= mesh_sizes[name]
  if kept_size % n == 0:
    return other, None
  if rank % n == 0:
    return None, other
  return None, None
