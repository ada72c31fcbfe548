"""SVD-free DCT projection: select ``r`` columns of the fixed orthonormal DCT-II matrix.

``"dct"`` (:class:`DCTProjector`, Modoranu et al.): at a refresh the score of
each column of the DCT matrix of the reduced axis is the ``l1`` (the
reference) or squared ``l2`` norm of the gradient's coefficients on it; the
top-``r`` columns are kept. The state is only their ``r`` ``int32`` indices
per matrix; the basis columns are computed from the indices when needed
(:func:`dct_matrix`), never stored. Under sharding the scores are one
product with the replicated DCT matrix, so the gradient is not gathered: in
an explicit mesh a sharded reduced axis is first moved onto the other axis
(an all-to-all, :func:`~lowrank_optax.sharding.rows_unsharded`) and only the
``d`` scores are all-reduced; the selected columns are sliced to the
basis's sharding, so ``down`` / ``up`` reduce ``r``-wide blocks. (In an auto
mesh the sharding is unknown while tracing: XLA all-reduces the full-size
coefficients ``C^T G`` when the reduced axis is sharded.)

Deviation from the reference: the selected indices are sorted ascending
(the reference keeps ``top_k``'s order, which permutes the slots of kept
moments even for an unchanged set); ``on_refresh="rotate"`` is its
``rotate_subspace`` (:meth:`DCTProjector.carry_over`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (Projector, axis_size, basis_down,
                                           basis_up, oriented, reduced_axes)

__all__ = ["DCTProjector", "IndexState", "TwoSidedIndexState", "dct_matrix",
           "dct_select", "DCT_MAX_DIM", "DCT_SCORES"]

DCT_SCORES = ("l1", "l2")


class IndexState(NamedTuple):
  """Projector state of a one-sided DCT projection.

  Attributes:
    indices: ``(*batch, r)`` ``int32``, ascending: the selected columns of the
      DCT matrix (:func:`dct_matrix`) of the reduced matrix axis.
  """

  indices: jax.Array


class TwoSidedIndexState(NamedTuple):
  """Projector state of a two-sided (``full``) DCT projection.

  Attributes:
    row_indices: ``(*batch, r)`` selected DCT columns of the input axis.
    col_indices: ``(*batch, r)`` selected DCT columns of the output axis.
  """

  row_indices: jax.Array
  col_indices: jax.Array


def _batch_vector(a):
  """Sharding of a ``(*batch, d)`` vector built from ``a``: batch entries."""
  s = shd.small_of(a)
  if s is None:
    return None
  return jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[:-1]))


# The DCT entry C[k, j] is looked up from cos(pi t / (2 d)) at
# t = k (2 j + 1) mod 4d, computed exactly in uint32: d <= 46340.
DCT_MAX_DIM = 46340


def _check_dct_size(d: int) -> None:
  if not 1 <= d <= DCT_MAX_DIM:
    raise ValueError(f"The DCT projector supports matrix dimensions up to"
                     f" {DCT_MAX_DIM}; got {d}.")


@functools.lru_cache(maxsize=None)
def _cos_table(d: int) -> np.ndarray:
  return np.cos(np.arange(4 * d) * (np.pi / (2 * d))).astype(np.float32)


def dct_matrix(d: int, indices: Optional[jax.Array] = None,
               dtype=jnp.float32) -> jax.Array:
  r"""Columns of the orthonormal DCT-II matrix of size ``d``.

  .. math::
    C_{kj} = s_k \cos\frac{\pi k (2j + 1)}{2d}, \quad
    s_0 = \sqrt{1/d},\ s_{k>0} = \sqrt{2/d},

  so that ``C C^T = C^T C = I``, row 0 is ``1/sqrt(d)`` and
  ``scipy.fft.dct(x, type=2, norm="ortho") == C @ x``. This is the matrix the
  reference calls ``dct3_matrix`` and selects columns of (its default
  ``sim_type="matmul"``). The entries are looked up from a table of ``4d``
  cosines at the exact integer phase ``k (2j + 1) mod 4d``, so no ``d x d``
  matrix is stored and large phases lose no accuracy.

  Args:
    d: the size (at most :data:`DCT_MAX_DIM`).
    indices: ``(*batch, r)`` integer column indices; ``None`` for all ``d``.
    dtype: the result's dtype.

  Returns:
    ``(*batch, d, r)``: the selected columns ``C[:, indices]``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> c = lro.dct_matrix(4)
    >>> bool(jnp.allclose(c @ c.T, jnp.eye(4), atol=1e-6))
    True
    >>> lro.dct_matrix(4, jnp.array([0, 2])).shape
    (4, 2)

  References:
    Modoranu et al., `FFT-based Dynamic Subspace Selection for Low-Rank
    Adaptive Optimization of Large Language Models
    <https://arxiv.org/abs/2505.17967>`_ (v1: "SVD-Free Low-Rank Adaptive
    Gradient Optimization for Large Language Models"); official code
    https://github.com/IST-DASLab/ISTA-DASLab-Optimizers
    (``ista_daslab_optimizers/utils/dct.py``).
  """
  _check_dct_size(d)
  if indices is None:
    indices = jnp.arange(d, dtype=jnp.int32)
  k = jnp.arange(d, dtype=jnp.uint32)[:, None]
  j = indices.astype(jnp.uint32)[..., None, :]
  phase = (k * (2 * j + 1)) % jnp.uint32(4 * d)
  scale = jnp.where(k == 0, np.sqrt(1.0 / d), np.sqrt(2.0 / d)).astype(
      jnp.float32)
  table = jnp.asarray(_cos_table(d))
  out = shd.leaf_sharding(phase)
  if shd._explicit(out):  # pylint: disable=protected-access
    # Batch-sharded indices (stacked leaves) in an explicit mesh: a lookup
    # into the unsharded table must name its output sharding.
    values = table.at[phase].get(out_sharding=out)
  else:
    values = table[phase]
  return (scale * values).astype(dtype)


def dct_select(a: jax.Array, rank: int, score: str = "l1") -> jax.Array:
  r"""Indices of the ``rank`` DCT columns that carry most of ``a``.

  With ``S = C^T a`` (``C = dct_matrix(d)``, ``a`` of shape ``(*b, d, n)``),
  the score of column ``j`` of ``C`` is the ``l1`` norm (or the squared
  ``l2`` norm) of row ``j`` of ``S``; the top-``rank`` indices are returned in
  ascending order.

  Args:
    a: ``(*batch, d, n)`` float32 gradient, reduced axis first.
    rank: number of columns to select.
    score: ``"l1"`` (the reference's default ``ell_norm=1``) or ``"l2"``
      (the Frobenius-optimal choice among column subsets of ``C``: it
      minimises ``||a - C_S C_S^T a||``).

  Returns:
    ``(*batch, rank)`` ``int32``, ascending.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> a = lro.dct_matrix(8, jnp.array([6, 1])) @ jnp.ones((2, 5))
    >>> lro.dct_select(a, 2)
    Array([1, 6], dtype=int32)

  References:
    Modoranu et al., arXiv 2505.17967; official code
    https://github.com/IST-DASLab/ISTA-DASLab-Optimizers
    (``ista_daslab_optimizers/fft_low_rank/fft_projector.py``, the dynamic
    column selection of ``dct_adamw.py``).
  """
  if score not in DCT_SCORES:
    raise ValueError(f"Unknown DCT score {score!r}; expected one of"
                     f" {DCT_SCORES}.")
  d = a.shape[-2]
  # A sharded d would gather a (or all-reduce the full-size S): move its
  # mesh axes onto n first, so S keeps n sharded and only the d scores are
  # reduced.
  a = shd.rows_unsharded(a)
  s = shd.einsum("dk,...dn->...kn", dct_matrix(d), a,
                 out=shd.derived(a, None, -1))
  if score == "l1":
    scores = jnp.sum(jnp.abs(s), axis=-1)
  else:
    scores = jnp.sum(jnp.square(s), axis=-1)
  _, idx = jax.lax.top_k(shd.reshard(scores, _batch_vector(a)), rank)
  # Ascending (a documented deviation: the reference keeps top-k's order,
  # which permutes the slots of kept moments even for an unchanged set).
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DCTProjector(Projector):
  """Selection of ``r`` DCT-II columns per reduced axis; state: ``int32`` indices.

  Attributes:
    score: ``"l1"`` (the reference's ``ell_norm=1``) or ``"l2"`` (see
      :func:`dct_select`).
  """

  name = "dct"
  supports_carry_over = True
  score: str = "l1"

  def __post_init__(self):
    if self.score not in DCT_SCORES:
      raise ValueError(f"Unknown dct_score {self.score!r}; expected one of"
                       f" {DCT_SCORES}.")

  def init(self, plan, dtype, key):
    """Indices ``0..r-1`` (the lowest frequencies): a placeholder, since every
    leaf refreshes at its first update; used only if that gradient is not
    finite."""
    del dtype, key
    def start(axis):
      _check_dct_size(axis_size(plan, axis))
      x = jnp.broadcast_to(jnp.arange(plan.rank, dtype=jnp.int32),
                           plan.batch_shape + (plan.rank,))
      return shd.place(x, shd.vectors(plan))
    starts = [start(ax) for ax in reduced_axes(plan)]
    if plan.side == "both":
      return TwoSidedIndexState(*starts)
    return IndexState(starts[0])

  def compute(self, plan, a, state, *, first, key, count):
    del first, key, count
    found = [dct_select(oriented(plan, a, ax), plan.rank, self.score)
             for ax in reduced_axes(plan)]
    return type(state)(*found)

  @staticmethod
  def bases(plan, state, dtype) -> tuple:
    """The selected DCT columns, ``(*batch, d, r)`` per reduced axis, sharded
    as a stored basis would be (a local slice of the replicated columns: a
    product with a sharded ``G`` then reduces ``r``-wide blocks instead of
    gathering ``G``)."""
    return tuple(shd.reshard(dct_matrix(axis_size(plan, ax), idx, dtype),
                             shd.basis(plan, ax))
                 for ax, idx in zip(reduced_axes(plan), state))

  def down(self, plan, g, state):
    return basis_down(plan, g, self.bases(plan, state, g.dtype))

  def up(self, plan, x, state):
    return basis_up(plan, x, self.bases(plan, state, x.dtype))

  def carry_over(self, plan, x, old, new):
    """Moves a low-rank array from the old DCT selection's slots to the new one's.

    The map of the reference's ``rotate_subspace`` (DCT-AdamW): with ``P_old``
    and ``P_new`` the selected DCT columns, ``Rot = P_new^T P_old``, which for
    an orthonormal DCT is the 0/1 partial permutation ``Rot[i, j] =
    [new_i == old_j]``: the entry of an index kept in both selections moves to
    its new slot, and a newly selected index starts at 0. Applied to the side
    of ``x`` (``plan.lowrank_shape``) that is projected. The reference also
    takes ``|v Rot|`` for the second moment, which for a 0/1 ``Rot`` is the
    same map.

    Args:
      plan: the leaf's plan.
      x: a low-rank array (an inner-state moment).
      old, new: the :class:`IndexState` (or :class:`TwoSidedIndexState`)
        before and after the refresh.

    Returns:
      ``x`` in the new selection's slots.
    """
    def rot(n_idx, o_idx):  # (*batch, r, r)
      return (n_idx[..., :, None] == o_idx[..., None, :]).astype(x.dtype)
    out = shd.lowrank(plan)
    if isinstance(new, TwoSidedIndexState):
      rr = rot(new.row_indices, old.row_indices)
      rc = rot(new.col_indices, old.col_indices)
      return shd.einsum("...ij,...jk,...lk->...il", rr, x, rc, out=out)
    if not isinstance(new, IndexState):
      raise TypeError("carry_over needs DCT index states.")
    p = rot(new.indices, old.indices)
    if plan.side == "reduction":  # x: (*batch, r, N)
      return shd.einsum("...ij,...jn->...in", p, x, out=out)
    return shd.einsum("...mj,...ij->...mi", x, p, out=out)  # x: (*batch, M, r)
