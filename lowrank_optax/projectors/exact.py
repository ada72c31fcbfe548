"""Exact projectors: the top-``r`` singular subspace by SVD (the reference) or eigh.

* ``"svd"`` (:class:`SVDProjector`): the official GaLore code's refresh, the
  top-``r`` singular vectors of ``float32(G)`` by a thin ``jnp.linalg.svd``.
* ``"tucker"`` (:class:`TuckerProjector`): the Natural-GaLore reference's
  Tucker factors of a matrix: the SVD's vectors with tensorly's sign rule.
* ``"eigh"`` (:class:`EighProjector`): the top-``r`` eigenvectors of the Gram
  matrix of the reduced axis (``G G^T`` for ``M``, ``G^T G`` for ``N``): the
  same subspace as the SVD up to float32 accuracy of the Gram (it squares the
  condition number; only the top-``r`` vectors are needed), several times
  faster than an SVD on accelerators.

Under sharding both gather: the SVD needs the whole matrix on every device
(the matrix axes are resharded to replicated, an all-gather of ``G``), eigh
needs the whole ``d x d`` Gram (``d`` the reduced axis; an all-reduce of
``d^2`` values, not of ``G``: in an explicit mesh a sharded ``d`` is first
moved onto the other axis by an all-to-all,
:func:`~lowrank_optax.sharding.rows_unsharded`) and runs the
eigendecomposition redundantly on every device. The matmul-only projectors
(:mod:`.iterative`, :mod:`.dct`, :mod:`.random`) refresh without either.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (BasisProjector, HIGHEST,
                                           is_orthonormal, mT, reduced_axes)

__all__ = ["SVDProjector", "EighProjector", "TuckerProjector", "svd_basis",
           "eigh_basis", "flip_signs"]


def _gathered(a):
  """``a`` with its two matrix axes replicated (batch axes kept)."""
  return shd.reshard(a, shd.small_of(a))


def _full_matrices(a: jax.Array, rank: int) -> bool:
  """Whether the thin SVD of ``a`` has fewer than ``rank`` vectors.

  A rank above the smaller matrix dimension (an explicit rank on a forced
  side, e.g. ``proj_type="left"`` on a tall-in-inputs matrix) asks for more
  directions than ``G`` has; the full SVD completes the top singular
  vectors with an orthonormal basis of ``G``'s null space (the reference
  slices ``min(m, n)`` vectors and changes the state's shape instead).
  """
  return rank > min(a.shape[-2:])


def svd_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` left singular vectors of ``a`` (thin SVD, the reference)."""
  u, _, _ = jnp.linalg.svd(_gathered(a),
                           full_matrices=_full_matrices(a, rank))
  return u[..., :, :rank]


def eigh_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` eigenvectors of the Gram matrix ``a a^T``."""
  a = shd.rows_unsharded(a)  # the Gram reduces over a sharded n, not d
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
    r = plan.rank
    u, _, vh = jnp.linalg.svd(_gathered(a),
                              full_matrices=_full_matrices(a, r))
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


def flip_signs(q):
  """Flips each column of ``q`` (``(*batch, d, r)``) so that its entry of
  largest magnitude is positive (tensorly's / scikit-learn's ``svd_flip``).

  Ties between entries of equal magnitude and opposite sign (which the
  reference breaks by the first index) keep the column as it is. Reductions
  only, so it runs on a basis sharded along ``d``.

  Example:
    >>> import jax.numpy as jnp
    >>> from lowrank_optax.projectors.exact import flip_signs
    >>> flip_signs(jnp.array([[0.6, 0.1], [-0.8, 0.2]]))
    Array([[-0.6,  0.1],
           [ 0.8,  0.2]], dtype=float32)
  """
  mag = jnp.abs(q)
  top = jnp.max(mag, axis=-2, keepdims=True)
  picked = jnp.sum(jnp.where(mag == top, q, 0), axis=-2, keepdims=True)
  return jnp.where(picked < 0, -q, q)


@dataclasses.dataclass(frozen=True)
class TuckerProjector(SVDProjector):
  """The Natural-GaLore reference's projector: Tucker factors of a matrix.

  The reference (``galore_projector_tensor.py``) calls tensorly's ``tucker``
  with rank ``r`` on every mode (HOOI, SVD initialisation, tensorly 0.9).
  For a matrix ``G`` each HOOI step takes the top-``r`` left singular vectors
  of ``G U_2`` and of ``G^T U_1``, which are those of ``G`` itself, so the
  factors are the top-``r`` left and right singular vectors of ``G``
  (checked against tensorly to 1e-15 in float64). tensorly fixes their signs
  (``svd_flip``): each factor's column has its largest-magnitude entry
  positive. This projector is the exact SVD (:class:`~lowrank_optax.
  projectors.SVDProjector`, float32) followed by that sign rule, so it gives
  the reference's bases, signs included, up to float32 rounding and ties
  between singular values. It works on any side (the reference is
  two-sided).
  """

  name = "tucker"

  def compute(self, plan, a, state, *, first, key, count):
    new = super().compute(plan, a, state, first=first, key=key, count=count)
    return type(new)(*(flip_signs(q) for q in new))
