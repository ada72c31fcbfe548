"""Exact projectors: the top-``r`` singular subspace by SVD (the reference) or eigh.

* ``"svd"`` (:class:`SVDProjector`): the official GaLore code's refresh, the
  top-``r`` singular vectors of ``float32(G)`` by a thin ``jnp.linalg.svd``.
* ``"eigh"`` (:class:`EighProjector`): the top-``r`` eigenvectors of the Gram
  matrix of the reduced axis (``G G^T`` for ``M``, ``G^T G`` for ``N``): the
  same subspace as the SVD up to float32 accuracy of the Gram (it squares the
  condition number; only the top-``r`` vectors are needed), several times
  faster than an SVD on accelerators.

Under sharding both gather: the SVD needs the whole matrix on every device
(the matrix axes are resharded to replicated, an all-gather of ``G``), eigh
needs the whole ``d x d`` Gram (``d`` the reduced axis; an all-reduce of
``d^2`` values, not of ``G``) and runs the eigendecomposition redundantly on
every device. The matmul-only projectors (:mod:`.iterative`, :mod:`.dct`,
:mod:`.random`) refresh without either.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (BasisProjector, HIGHEST,
                                           is_orthonormal, mT, reduced_axes)

__all__ = ["SVDProjector", "EighProjector", "svd_basis", "eigh_basis"]


def _gathered(a):
  """``a`` with its two matrix axes replicated (batch axes kept)."""
  return shd.reshard(a, shd.small_of(a))


def svd_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` left singular vectors of ``a`` (thin SVD, the reference)."""
  u, _, _ = jnp.linalg.svd(_gathered(a), full_matrices=False)
  return u[..., :, :rank]


def eigh_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` eigenvectors of the Gram matrix ``a a^T``."""
  gram = shd.einsum("...dn,...en->...de", a, a, out=shd.small_of(a),
                    precision=HIGHEST)
  _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
  return jnp.flip(vecs[..., :, -rank:], axis=-1)


@dataclasses.dataclass(frozen=True)
class SVDProjector(BasisProjector):
  """The reference refresh: top-``r`` singular vectors of ``float32(G)``.

  One thin SVD of ``G`` itself serves every side (the right singular vectors
  come from ``Vh``, not from an SVD of ``G^T``; a two-sided projection takes
  both from the same SVD), as in the official ``GaLoreProjector``.
  """

  name = "svd"

  def compute(self, plan, a, state, *, first, key, count):
    del first, key, count
    u, _, vh = jnp.linalg.svd(_gathered(a), full_matrices=False)
    r = plan.rank
    found = {"rows": u[..., :, :r], "cols": mT(vh[..., :r, :])}
    news = []
    for ax, old in zip(reduced_axes(plan), state):
      new = shd.reshard(found[ax], shd.basis(plan, ax))
      news.append(jnp.where(is_orthonormal(new), new.astype(old.dtype), old))
    return type(state)(*news)


@dataclasses.dataclass(frozen=True)
class EighProjector(BasisProjector):
  """Top-``r`` eigenvectors of the reduced axis's Gram matrix (the SVD's subspace)."""

  name = "eigh"

  def new_basis(self, plan, a, prev, *, axis, first, key):
    del prev, axis, first, key
    return eigh_basis(a, plan.rank)

