"""Random projectors: a seeded Gaussian sketch (APOLLO) and a random orthonormal basis (FRUGAL).

Neither looks at the gradient: a refresh draws a new random matrix from the
refresh's key (``fold_in(fold_in(key(seed), leaf index), count)``, the key
:func:`~lowrank_optax.subspace` hands every refresh), so the same ``(seed,
leaf, refresh step)`` always gives the same matrix, and a non-finite gradient
cannot poison it (the finiteness guard of :meth:`Projector.refresh
<lowrank_optax.projectors.Projector.refresh>` is skipped: there is no
decomposition).

* ``"gaussian"`` (:class:`GaussianProjector`): APOLLO's projector,
  ``P`` with i.i.d. ``N(0, 1/r)`` entries, **not** orthonormalised, of shape
  ``(*batch, d, r)`` for the reduced axis of size ``d`` (``R = P^T G`` on the
  input side, ``G P`` on the output side, ``P_M^T G P_N`` two-sided). The
  state is only the ``uint32`` data of the PRNG key that regenerates it
  (:class:`GaussianState`, 8 bytes with the default ``threefry2x32``):
  ``down`` and ``up`` regenerate ``P`` at every step, so a leaf's projector
  costs no memory (ALGORITHMS.md 12: "regenerable from a seed -> 0"). The
  regeneration is sharded like a stored basis would be
  (``jax.random.normal(..., out_sharding=...)`` in explicit meshes; JAX's
  partitionable threefry makes the values independent of the sharding).
  ``E ||P^T g||^2 = ||g||^2`` for a fixed vector ``g`` (a Johnson-Lindenstrauss
  sketch), but ``P P^T`` is not a projection: ``up(down(G)) != G`` on the
  subspace, so a residual ``G - up(down(G))`` after this projector is not
  orthogonal to it (APOLLO itself never maps back).
* ``"orthogonal"`` (:class:`OrthogonalProjector`): FRUGAL's ``random``
  projection (``torch.nn.init.orthogonal_`` on an ``r x n`` / ``m x r``
  buffer): a Haar-distributed random matrix with orthonormal columns, drawn
  at every refresh and stored as a :class:`~lowrank_optax.projectors.BasisState`
  (as the reference stores it; regenerating would need a QR every step). The
  Gaussian block is orthonormalised by shifted Cholesky-QR
  (:func:`~lowrank_optax.projectors.orthonormalize`): matmuls and ``r x r``
  factors only. QR with a positive-diagonal ``R`` of a Gaussian matrix is
  Haar, as is ``orthogonal_``'s sign-corrected QR.

Both work on stacked leaves (one independent matrix per batch element, from
one draw over the whole ``(*batch, d, r)`` block), on either side and
two-sided (``proj_type="full"``: independent matrices for the two axes, from
the two halves of a split key). The official APOLLO projector raises
``NotImplementedError`` for ``full``; here it is allowed, but APOLLO's
channel-wise scaling has no non-projected axis there
(:func:`~lowrank_optax.apollo_scaling` rejects it; tensor-wise works).

Deviations from the official code: the torch generators cannot be
reproduced, so the matrices differ (parity tests inject them); APOLLO seeds
each matrix with the 1-based index of the parameter in optimizer order and
advances it with ``next_seed`` (the last of 15 ``int64`` draws) after every
generation, here the key is ``fold_in(fold_in(key(seed), i), count)`` with
``i`` the index among projected leaves and ``count`` the refresh's step;
FRUGAL draws from torch's global generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (BasisProjector, Projector, axis_size,
                                           basis_down, basis_up, orthonormalize,
                                           reduced_axes)

__all__ = ["GaussianProjector", "GaussianState", "OrthogonalProjector",
           "gaussian_matrices"]


class GaussianState(NamedTuple):
  """Projector state of :class:`GaussianProjector`: only what regenerates ``P``.

  Attributes:
    key: the raw ``uint32`` data of the refresh's PRNG key
      (``jax.random.key_data``; shape ``(2,)`` for ``threefry2x32``). A plain
      array, so orbax saves and restores it; no typed key is stored.
  """

  key: jax.Array


def _sampled(key, shape, sharding, scale):
  """``scale * N(0, 1)`` of ``shape`` in float32, drawn at ``sharding``."""
  if shd._explicit(sharding):  # pylint: disable=protected-access
    x = jax.random.normal(key, shape, jnp.float32, out_sharding=sharding)
  else:
    x = jax.random.normal(key, shape, jnp.float32)
  return x if scale == 1.0 else x * jnp.float32(scale)


def gaussian_matrices(plan, state: GaussianState, dtype=jnp.float32) -> tuple:
  """The Gaussian matrices ``P`` of a leaf, regenerated from its state.

  One ``(*batch, d, r)`` matrix per reduced axis (two for ``side="both"``,
  from the halves of a split key), entries i.i.d. ``N(0, 1/r)`` drawn in
  float32 (as the reference) and cast to ``dtype``.

  Args:
    plan: the leaf's :class:`~lowrank_optax.LeafPlan`.
    state: its :class:`GaussianState`.
    dtype: the matrices' dtype.

  Returns:
    A tuple of ``(*batch, d, r)`` arrays.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> plan = lro.plan_leaves({"w": jnp.zeros((64, 128))}, 16)[0]
    >>> state = lro.projectors.GaussianState(
    ...     jax.random.key_data(jax.random.key(0)))
    >>> (p,) = lro.projectors.gaussian_matrices(plan, state)
    >>> p.shape  # the input axis (64 < 128) is reduced
    (64, 16)
  """
  key = jax.random.wrap_key_data(state.key)
  axes = reduced_axes(plan)
  keys = jax.random.split(key) if len(axes) == 2 else (key,)
  scale = 1.0 / math.sqrt(plan.rank)
  return tuple(
      _sampled(k, plan.batch_shape + (axis_size(plan, ax), plan.rank),
               shd.basis(plan, ax), scale).astype(dtype)
      for ax, k in zip(axes, keys))


def _key_sharding(plan):
  ms = plan.sharding
  if ms is None:
    return None
  return jax.sharding.NamedSharding(ms.mesh, jax.sharding.PartitionSpec(None))


@dataclasses.dataclass(frozen=True)
class GaussianProjector(Projector):
  """APOLLO's random projection: ``N(0, 1/r)`` entries, regenerated from a key.

  The state (:class:`GaussianState`) is the key only; ``down`` / ``up``
  regenerate ``P`` (:func:`gaussian_matrices`) in the gradient's dtype. The
  matrix is redrawn at every refresh (0-based steps ``0, T, 2T, ...``) from
  the refresh's key, which depends on the seed, the leaf and the step only.
  """

  name = "gaussian"

  def init(self, plan, dtype, key=None):
    """The key the leaf starts from (its first update refreshes it)."""
    del dtype
    key = jax.random.key(0) if key is None else key
    return GaussianState(shd.place(jax.random.key_data(key),
                                   _key_sharding(plan)))

  def refresh(self, plan, g, state, first, key, count=None):
    """Stores the refresh's key; ``g`` is not read."""
    del g, first, count
    new = self.compute(plan, None, state, first=None, key=key, count=None)
    return jax.tree.map(shd.like, new, state)

  def compute(self, plan, a, state, *, first, key, count):
    del plan, a, first, count
    return GaussianState(jax.random.key_data(key).astype(state.key.dtype))

  def matrices(self, plan, state, dtype=jnp.float32) -> tuple:
    """The leaf's current ``P`` (see :func:`gaussian_matrices`)."""
    return gaussian_matrices(plan, state, dtype)

  def down(self, plan, g, state):
    return basis_down(plan, g, gaussian_matrices(plan, state, g.dtype))

  def up(self, plan, x, state):
    return basis_up(plan, x, gaussian_matrices(plan, state, x.dtype))


@dataclasses.dataclass(frozen=True)
class OrthogonalProjector(BasisProjector):
  """FRUGAL's ``random`` projection: a random orthonormal basis, redrawn at every refresh.

  A Haar-distributed ``(*batch, d, r)`` matrix with orthonormal columns
  (shifted Cholesky-QR of a Gaussian block drawn from the refresh's key),
  stored as a :class:`~lowrank_optax.projectors.BasisState` in the
  parameter's dtype.
  """

  name = "orthogonal"

  def refresh(self, plan, g, state, first, key, count=None):
    """Draws a new basis from ``key``; ``g`` is not read."""
    new = self.compute(plan, g, state, first=first, key=key, count=count)
    return jax.tree.map(shd.like, new, state)

  def new_basis(self, plan, a, prev, *, axis, first, key):
    del a, first
    y = _sampled(key, prev.shape, shd.basis(plan, axis), 1.0)
    return orthonormalize(y)
