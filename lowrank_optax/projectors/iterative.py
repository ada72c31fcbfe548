"""Iterative projectors: warm-started subspace iteration (the default) and a
randomized range finder. Matmuls and ``r x r`` factorisations only.

* ``"subspace_iteration"`` (:class:`SubspaceIterationProjector`):
  warm-started block power iteration from the previous basis, ``iters``
  iterations of ``Q <- orth(G orth(G^T Q))`` with shifted Cholesky-QR
  (:func:`~lowrank_optax.projectors.orthonormalize`). The first refresh starts
  from a seeded Gaussian block made at ``init`` and runs ``init_iters``
  iterations. Because Cholesky-QR is triangular, the ``i``-th new column
  stays aligned with the ``i``-th old one, so moments kept across a refresh
  stay meaningful (an SVD may flip signs and reorder vectors).
* ``"randomized"`` (:class:`RandomizedProjector`): the Halko-Martinsson-Tropp
  range finder with ``oversample`` extra columns and ``power_iters`` power
  iterations (each block orthonormalised by Cholesky-QR), then the top-``r``
  directions of the small ``k x N`` projected matrix (from its ``k x k``
  Gram).

Under sharding neither gathers the gradient: the products with ``G`` keep
its sharding (reductions over a sharded axis become reduce-scatters /
all-reduces of ``d x r`` blocks) and the factorisations are ``r x r``
(``k x k``).

Precision: the products with the full gradient run at JAX's default matmul
precision, like the steady-step projections (on GPUs with TF32 and on TPUs
several times faster than float32 passes; these methods only need the span
approximately); the Grams of Cholesky-QR use ``HIGHEST``, since
orthonormality depends on them. On CPU every float32 matmul is float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (BasisProjector, HIGHEST,
                                           orthonormalize)
from lowrank_optax.projectors.exact import eigh_basis

__all__ = ["SubspaceIterationProjector", "RandomizedProjector",
           "subspace_iteration_basis", "randomized_basis"]


def subspace_iteration_basis(a: jax.Array, start: jax.Array,
                             iters: int = 1) -> jax.Array:
  """``iters`` steps of ``Q <- orth(a orth(a^T Q))`` from ``start`` (``(*b, d, r)``).

  A rank above ``n`` (more directions than ``a``'s range has; an explicit
  rank on a forced side) cannot be iterated (``a^T Q`` has rank ``n < r``):
  the top eigenvectors of the ``d x d`` Gram are returned instead
  (:func:`~lowrank_optax.projectors.eigh_basis`).
  """
  if start.shape[-1] > a.shape[-1]:
    return eigh_basis(a, start.shape[-1])
  along_n, along_d = shd.block_of(a, -1), shd.block_of(a, -2)

  def step(_, q):
    # The intermediate block only has to be well conditioned (the iteration
    # depends on its span), so one shifted Cholesky-QR pass is enough there;
    # the returned basis gets the full three passes.
    z = orthonormalize(shd.einsum("...dn,...dr->...nr", a, q, out=along_n),
                       passes=1)
    return orthonormalize(shd.einsum("...dn,...nr->...dr", a, z, out=along_d))

  # fori_loop: ``iters`` may be a traced value (optax.inject_hyperparams).
  return jax.lax.fori_loop(0, iters, step, shd.reshard(start, along_d))


def randomized_basis(a: jax.Array, rank: int, key: jax.Array,
                     oversample: int = 8, power_iters: int = 2) -> jax.Array:
  """Randomized range finder (Halko et al. 2011) with power iterations.

  A ``rank`` above ``n`` (more directions than ``a``'s range has; an
  explicit rank on a forced side) takes the top eigenvectors of the
  ``d x d`` Gram instead (:func:`~lowrank_optax.projectors.eigh_basis`).
  """
  d, n = a.shape[-2:]
  if rank > n:
    return eigh_basis(a, rank)
  k = min(rank + oversample, d, n)
  along_n, along_d = shd.block_of(a, -1), shd.block_of(a, -2)
  omega = shd.reshard(jax.random.normal(key, a.shape[:-2] + (n, k), a.dtype),
                      along_n)
  q = orthonormalize(shd.einsum("...dn,...nk->...dk", a, omega, out=along_d))
  for _ in range(power_iters):
    z = orthonormalize(shd.einsum("...dn,...dk->...nk", a, q, out=along_n))
    q = orthonormalize(shd.einsum("...dn,...nk->...dk", a, z, out=along_d))
  # The top-r directions of B = Q^T a (k x n) from its k x k Gram.
  bt = shd.einsum("...dn,...dk->...nk", a, q, out=along_n)
  gram = shd.einsum("...nk,...nl->...kl", bt, bt, out=shd.small_of(a),
                    precision=HIGHEST)
  _, vecs = jnp.linalg.eigh(gram)
  top = jnp.flip(vecs[..., :, -rank:], axis=-1)
  return shd.einsum("...dk,...kr->...dr", q, top, out=along_d,
                    precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class SubspaceIterationProjector(BasisProjector):
  """Warm-started subspace iteration with Cholesky-QR (the default projector).

  Attributes:
    iters: iterations per warm refresh.
    init_iters: iterations of the first (cold) refresh, from the Gaussian
      start made at ``init`` (kept in the state, so the update has no
      random-number generation).
  """

  name = "subspace_iteration"
  iters: int = 1
  init_iters: int = 4

  def __post_init__(self):
    for field in ("iters", "init_iters"):
      value = getattr(self, field)
      if isinstance(value, int) and value < 1:
        raise ValueError(f"{field} must be >= 1, got {value}.")

  def initial_basis(self, plan, d, dtype, key):
    shape = plan.batch_shape + (d, plan.rank)
    return orthonormalize(jax.random.normal(key, shape, jnp.float32)).astype(
        dtype)

  def new_basis(self, plan, a, prev, *, axis, first, key):
    del axis, key
    iters = jnp.where(first, self.init_iters, self.iters)
    return subspace_iteration_basis(a, prev, iters)


@dataclasses.dataclass(frozen=True)
class RandomizedProjector(BasisProjector):
  """Randomized range finder (fresh Gaussian sketch at every refresh).

  Attributes:
    oversample: extra sketch columns.
    power_iters: power iterations.
  """

  name = "randomized"
  oversample: int = 8
  power_iters: int = 2

  def new_basis(self, plan, a, prev, *, axis, first, key):
    del prev, axis, first
    return randomized_basis(a, plan.rank, key, self.oversample,
                            self.power_iters)
