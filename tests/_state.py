"""Test helpers: reach and replace the SubspaceState inside an optimizer state."""

import jax

import lowrank_optax as lro


def with_sub_state(opt_state, sub):
  """``opt_state`` with its (only) ``SubspaceState`` replaced by ``sub``."""
  lro.subspace_state(opt_state)  # exactly one
  return jax.tree.map(
      lambda x: sub if isinstance(x, lro.SubspaceState) else x, opt_state,
      is_leaf=lambda x: isinstance(x, lro.SubspaceState))
