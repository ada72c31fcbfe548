"""Question 2 of the design: which basis, and when.

A projector keeps, per projected leaf, an orthonormal basis ``Q`` of shape
``(*batch, d, r)`` of the reduced matrix axis (``d = M`` for the input axis,
``d = N`` for the output axis; two-sided projection keeps one of each), and
maps between the full matrix ``G`` (``(*batch, M, N)``) and the low-rank
``R``:

==============  =========================  =====================
side            down: ``R = ...``          up: ``U = ...``
==============  =========================  =====================
``reduction``   ``Q^T G``  (``r x N``)     ``Q R``
``output``      ``G Q``    (``M x r``)     ``R Q^T``
``both``        ``Q_M^T G Q_N`` (``r x r``)  ``Q_M R Q_N^T``
==============  =========================  =====================

The basis is recomputed from the current gradient at a *refresh* by one of the
methods in :data:`BASIS_METHODS`, always in float32 whatever the gradient's
dtype, and cast back to the parameter dtype (as the reference does). A refresh
whose gradient is not finite, or whose result is not an orthonormal basis,
keeps the previous basis.

Basis methods (``projector=`` argument):

* ``"svd"``: the reference: top-``r`` singular vectors of ``float32(G)``
  (``jnp.linalg.svd``, thin).
* ``"eigh"``: top-``r`` eigenvectors of the Gram matrix ``G G^T`` (or
  ``G^T G``) of the reduced side: the same subspace as the SVD up to float32
  accuracy of the Gram (squares the condition number; the top-``r`` vectors
  are what is needed), several times faster than an SVD on accelerators.
* ``"randomized"``: Halko-Martinsson-Tropp range finder with ``oversample``
  extra columns and ``power_iters`` power iterations (Householder QR), then an
  SVD of the small projected matrix.
* ``"subspace_iteration"`` (the default): warm-started block power iteration
  from the previous basis, ``iters`` iterations of
  ``Q <- orth(G orth(G^T Q))``, with a shifted Cholesky-QR orthonormalisation:
  matmuls and ``r x r`` work only, so it is fast and shards without gathering
  ``G``. The first refresh starts from a seeded Gaussian block made at
  ``init`` and runs ``init_iters`` iterations. Because Cholesky-QR is
  triangular, the ``i``-th new column stays aligned with the
  ``i``-th old one, so moments kept across a refresh stay meaningful (an SVD
  may flip signs and reorder vectors).
* ``"dct"``: SVD-free column selection from the fixed orthonormal DCT-II
  matrix (Modoranu et al.): the state is only the ``r`` selected indices per
  matrix (``int32``); the basis columns are computed from them when needed,
  never stored. See :func:`dct_matrix` and :func:`dct_select`.

Precision. The products with the full gradient in ``randomized``,
``subspace_iteration`` and ``dct`` (sketches, power steps, DCT scores) run at
JAX's default matmul precision, like the steady-step projections: on GPUs
with TF32 and on TPUs that is several times faster than float32 passes, and
these methods only need the span (or the ranking) approximately. Set
``jax.default_matmul_precision("highest")`` to change it. The ``r x r`` Grams
of Cholesky-QR and the Gram of ``eigh`` (an exact method) always use
``HIGHEST``, since orthonormality and the exact subspace depend on them. On
CPU every float32 matmul is float32 anyway.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_optax.policy import LeafPlan

__all__ = [
    "BASIS_METHODS",
    "BasisState",
    "TwoSidedBasisState",
    "IndexState",
    "TwoSidedIndexState",
    "Projector",
    "svd_basis",
    "eigh_basis",
    "randomized_basis",
    "subspace_iteration_basis",
    "dct_matrix",
    "dct_select",
    "orthonormalize",
]


class BasisState(NamedTuple):
  """Projector state of a one-sided projection.

  Attributes:
    basis: ``(*batch, d, r)``, orthonormal columns spanning the subspace of the
      reduced matrix axis, in the parameter's dtype.
  """

  basis: jax.Array


class TwoSidedBasisState(NamedTuple):
  """Projector state of a two-sided (``full``) projection.

  Attributes:
    row_basis: ``(*batch, M, r)`` basis of the input (reduction) axis.
    col_basis: ``(*batch, N, r)`` basis of the output axis.
  """

  row_basis: jax.Array
  col_basis: jax.Array


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


# --------------------------------------------------------------------------
# Basis computations. Each takes ``a`` of shape (*batch, d, n) in float32 and
# returns an orthonormal (*batch, d, r) basis of (an approximation of) the
# top-r left singular subspace of ``a``.
# --------------------------------------------------------------------------

_HI = jax.lax.Precision.HIGHEST


def _mT(x):
  return jnp.swapaxes(x, -1, -2)


def _one_matrix_at_a_time_on_cpu(fn, *xs):
  """``fn`` on ``(*batch, ., .)`` arrays; on CPU a ``lax.map`` over the batch.

  Works around an XLA:CPU hang (jaxlib 0.10.2): when one jitted program holds
  two or more *batched* Cholesky or triangular-solve calls that can run
  concurrently (two stacked leaves, each refreshing), execution can deadlock
  on a small host thread pool. It reproduces with one device on 2 cores for
  ``(2, 512, 128)`` operands (``tests/test_cpu_hang.py``); unbatched calls,
  and batched QR / SVD / eigh, do not hang. ``lax.platform_dependent`` keeps
  the batched call on GPU and TPU.
  """
  batch = xs[0].shape[:-2]
  if not batch:
    return fn(*xs)

  def per_matrix(*xs):
    flat = tuple(x.reshape((-1,) + x.shape[-2:]) for x in xs)
    out = jax.lax.map(lambda args: fn(*args), flat)
    return out.reshape(batch + out.shape[-2:])

  return jax.lax.platform_dependent(*xs, cpu=per_matrix, default=fn)


def _cholesky(a):
  return _one_matrix_at_a_time_on_cpu(jnp.linalg.cholesky, a)


def _solve_lower(l, b):
  return _one_matrix_at_a_time_on_cpu(
      lambda l, b: jax.scipy.linalg.solve_triangular(l, b, lower=True), l, b)


def orthonormalize(y: jax.Array, passes: int = 3) -> jax.Array:
  """Orthonormalises the columns of ``y`` (``(*batch, d, r)``) by shifted Cholesky-QR.

  The first pass factors ``Y^T Y + s I`` with a small shift ``s`` relative to
  ``||Y||_F^2`` (so it succeeds for ill-conditioned ``Y``); the following
  unshifted passes restore orthonormality to working precision (shifted
  CholeskyQR3, Fukaya et al. 2020). Every pass is an ``r x r`` Cholesky, a
  triangular solve and a ``d x r`` Gram: no Householder QR, no gathering of
  the long axis under sharding. Columns are pre-normalised, which makes the
  result invariant to column scaling.
  """
  y = y / (jnp.linalg.norm(y, axis=-2, keepdims=True) + 1e-30)
  r = y.shape[-1]
  eye = jnp.eye(r, dtype=y.dtype)
  for i in range(passes):
    gram = jnp.einsum("...dr,...ds->...rs", y, y, precision=_HI)
    if i == 0:
      shift = 1e-5 * jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] + 1e-30
      gram = gram + shift * eye
    chol = _cholesky(gram)
    # y <- y L^{-T}:  solve L X^T = y^T.
    y = _mT(_solve_lower(chol, _mT(y)))
  return y


def svd_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` left singular vectors of ``a`` (thin SVD, the reference)."""
  u, _, _ = jnp.linalg.svd(a, full_matrices=False)
  return u[..., :, :rank]


def eigh_basis(a: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` eigenvectors of the Gram matrix ``a a^T``."""
  gram = jnp.einsum("...dn,...en->...de", a, a, precision=_HI)
  _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
  return jnp.flip(vecs[..., :, -rank:], axis=-1)


def randomized_basis(a: jax.Array, rank: int, key: jax.Array,
                     oversample: int = 8, power_iters: int = 2) -> jax.Array:
  """Randomized range finder (Halko et al. 2011) with power iterations."""
  d, n = a.shape[-2:]
  k = min(rank + oversample, d, n)
  omega = jax.random.normal(key, a.shape[:-2] + (n, k), a.dtype)
  q, _ = jnp.linalg.qr(jnp.matmul(a, omega))
  for _ in range(power_iters):
    z, _ = jnp.linalg.qr(jnp.matmul(_mT(a), q))
    q, _ = jnp.linalg.qr(jnp.matmul(a, z))
  b = jnp.matmul(_mT(q), a)  # (k, n)
  ub, _, _ = jnp.linalg.svd(b, full_matrices=False)
  return jnp.matmul(q, ub[..., :, :rank], precision=_HI)


def subspace_iteration_basis(a: jax.Array, start: jax.Array,
                             iters: int = 1) -> jax.Array:
  """``iters`` steps of ``Q <- orth(a orth(a^T Q))`` from ``start`` (``(*b, d, r)``)."""
  def step(_, q):
    # The intermediate block only has to be well conditioned (the iteration
    # depends on its span), so one shifted Cholesky-QR pass is enough there;
    # the returned basis gets the full three passes.
    z = orthonormalize(jnp.einsum("...dn,...dr->...nr", a, q), passes=1)
    return orthonormalize(jnp.einsum("...dn,...nr->...dr", a, z))
  # fori_loop: ``iters`` may be a traced value (optax.inject_hyperparams).
  return jax.lax.fori_loop(0, iters, step, start)


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
  return (scale * jnp.asarray(_cos_table(d))[phase]).astype(dtype)


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
    raise ValueError(f"Unknown DCT score {score!r}; expected one of {DCT_SCORES}.")
  d = a.shape[-2]
  s = jnp.einsum("dk,...dn->...kn", dct_matrix(d), a)
  if score == "l1":
    scores = jnp.sum(jnp.abs(s), axis=-1)
  else:
    scores = jnp.sum(jnp.square(s), axis=-1)
  _, idx = jax.lax.top_k(scores, rank)
  # Ascending (a documented deviation: the reference keeps top-k's order,
  # which permutes the slots of kept moments even for an unchanged set).
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


BASIS_METHODS = ("svd", "eigh", "randomized", "subspace_iteration", "dct")
DCT_SCORES = ("l1", "l2")


def _is_orthonormal(q: jax.Array, tol: float = 1e-2) -> jax.Array:
  norms = jnp.sum(jnp.square(q), axis=-2)
  return jnp.all(jnp.isfinite(q)) & jnp.all(jnp.abs(norms - 1.0) < tol)


@dataclasses.dataclass(frozen=True)
class Projector:
  """An orthonormal-basis projector (static configuration; the arrays live in state).

  Attributes:
    method: one of :data:`BASIS_METHODS`.
    iters: subspace-iteration steps per warm refresh.
    init_iters: subspace-iteration steps at the first (cold) refresh.
    oversample, power_iters: randomized range finder settings.
    dct_score: the DCT column score, ``"l1"`` (the reference's
      ``ell_norm=1``) or ``"l2"`` (see :func:`dct_select`).
  """

  method: str = "subspace_iteration"
  iters: int = 1
  init_iters: int = 4
  oversample: int = 8
  power_iters: int = 2
  dct_score: str = "l1"

  def __post_init__(self):
    if self.method not in BASIS_METHODS:
      raise ValueError(f"Unknown projector {self.method!r}; expected one of"
                       f" {BASIS_METHODS}.")
    for name in ("iters", "init_iters"):
      value = getattr(self, name)
      if isinstance(value, int) and value < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.dct_score not in DCT_SCORES:
      raise ValueError(f"Unknown dct_score {self.dct_score!r}; expected one of"
                       f" {DCT_SCORES}.")

  # -- state ----------------------------------------------------------------
  def init(self, plan: LeafPlan, dtype, shardings=None, key=None):
    """Initial basis of a leaf.

    For ``subspace_iteration`` an orthonormalised Gaussian block (seeded by
    ``key``): the start of the first refresh, which runs ``init_iters``
    iterations from it. Keeping the start in the state leaves the jitted
    update free of random-number generation (which would be compiled once per
    leaf). For the other methods the first ``r`` unit vectors, a placeholder:
    every projected leaf is refreshed at its first update (count 0), so it is
    only used if that first gradient is not finite. For ``dct`` the indices
    ``0..r-1`` (the lowest frequencies), the same placeholder.
    """
    if self.method == "dct":
      return self._init_indices(plan, shardings)
    def start(d, sharding, k):
      shape = plan.batch_shape + (d, plan.rank)
      if self.method == "subspace_iteration":
        x = orthonormalize(jax.random.normal(k, shape, jnp.float32))
        x = x.astype(dtype)
      else:
        x = jnp.broadcast_to(jnp.eye(d, plan.rank, dtype=dtype), shape)
      return jax.device_put(x, sharding) if sharding is not None else x
    sh = shardings or {}
    k_rows, k_cols = jax.random.split(
        jax.random.key(0) if key is None else key)
    if plan.side == "both":
      return TwoSidedBasisState(start(plan.rows, sh.get("row_basis"), k_rows),
                                start(plan.cols, sh.get("col_basis"), k_cols))
    d = plan.rows if plan.side == "reduction" else plan.cols
    return BasisState(start(d, sh.get("basis"), k_rows))

  def _init_indices(self, plan: LeafPlan, shardings=None):
    sh = shardings or {}
    def start(d, sharding):
      _check_dct_size(d)
      x = jnp.broadcast_to(jnp.arange(plan.rank, dtype=jnp.int32),
                           plan.batch_shape + (plan.rank,))
      return jax.device_put(x, sharding) if sharding is not None else x
    if plan.side == "both":
      return TwoSidedIndexState(start(plan.rows, sh.get("row_indices")),
                                start(plan.cols, sh.get("col_indices")))
    d = plan.rows if plan.side == "reduction" else plan.cols
    return IndexState(start(d, sh.get("indices")))

  # -- refresh --------------------------------------------------------------
  def _basis(self, a, prev, rank, first, key):
    """New basis of the column space of ``a`` (float32)."""
    if self.method == "svd":
      return svd_basis(a, rank)
    if self.method == "eigh":
      return eigh_basis(a, rank)
    if self.method == "randomized":
      return randomized_basis(a, rank, key, self.oversample, self.power_iters)
    # The first refresh starts from the Gaussian block made by init.
    iters = jnp.where(first, self.init_iters, self.iters)
    return subspace_iteration_basis(a, prev.astype(jnp.float32), iters)

  def refresh(self, plan: LeafPlan, g: jax.Array, state, first, key):
    """Recomputes the basis from the gradient matrix ``g`` (``(*batch, M, N)``).

    Args:
      plan: the leaf's plan.
      g: the gradient as a matrix.
      state: the current projector state.
      first: traced bool, True at the leaf's first refresh (no previous basis).
      key: PRNG key (Gaussian starts / sketches).

    Returns:
      The new state; the previous one where ``g`` is not finite or the
      computed basis is not orthonormal.
    """
    a = g.astype(jnp.float32)
    # A cond, not a where: no masked full-size copy of the gradient, and no
    # NaN ever reaches the decomposition.
    return jax.lax.cond(jnp.all(jnp.isfinite(a)),
                        lambda: self._refresh_finite(plan, a, state, first, key),
                        lambda: state)

  def _refresh_finite(self, plan: LeafPlan, a, state, first, key):
    """:meth:`refresh` for a finite float32 gradient matrix ``a``."""
    if self.method == "dct":
      if plan.side == "both":
        return TwoSidedIndexState(
            dct_select(a, plan.rank, self.dct_score),
            dct_select(_mT(a), plan.rank, self.dct_score))
      if plan.side == "output":
        a = _mT(a)
      return IndexState(dct_select(a, plan.rank, self.dct_score))

    def keep_if_bad(new, old):
      return jnp.where(_is_orthonormal(new), new.astype(old.dtype), old)

    if plan.side == "both":
      if self.method == "svd":
        u, _, vh = jnp.linalg.svd(a, full_matrices=False)
        new_rows, new_cols = u[..., :, :plan.rank], _mT(vh[..., :plan.rank, :])
      else:
        k1, k2 = jax.random.split(key)
        new_rows = self._basis(a, state.row_basis, plan.rank, first, k1)
        new_cols = self._basis(_mT(a), state.col_basis, plan.rank, first, k2)
      return TwoSidedBasisState(keep_if_bad(new_rows, state.row_basis),
                                keep_if_bad(new_cols, state.col_basis))
    if plan.side == "output":
      a = _mT(a)
    if self.method == "svd" and plan.side == "output":
      # Right singular vectors from the SVD of G itself (no transposed copy).
      _, _, vh = jnp.linalg.svd(_mT(a), full_matrices=False)
      new = _mT(vh[..., :plan.rank, :])
    else:
      new = self._basis(a, state.basis, plan.rank, first, key)
    return BasisState(keep_if_bad(new, state.basis))

  @staticmethod
  def carry_over(plan: LeafPlan, x: jax.Array, old, new) -> jax.Array:
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
    if isinstance(new, TwoSidedIndexState):
      rr = rot(new.row_indices, old.row_indices)
      rc = rot(new.col_indices, old.col_indices)
      return jnp.einsum("...ij,...jk,...lk->...il", rr, x, rc)
    if not isinstance(new, IndexState):
      raise TypeError("carry_over needs DCT index states.")
    p = rot(new.indices, old.indices)
    if plan.side == "reduction":  # x: (*batch, r, N)
      return jnp.einsum("...ij,...jn->...in", p, x)
    return jnp.einsum("...mj,...ij->...mi", x, p)  # x: (*batch, M, r)

  # -- maps -----------------------------------------------------------------
  @staticmethod
  def bases(plan: LeafPlan, state, dtype):
    """The basis matrices of a projector state, in ``dtype``.

    Returns ``(Q,)`` for a one-sided projection (``(*batch, d, r)``) and
    ``(Q_M, Q_N)`` for a two-sided one; for a DCT state the columns are
    computed from the stored indices.
    """
    if isinstance(state, IndexState):
      d = plan.rows if plan.side == "reduction" else plan.cols
      return (dct_matrix(d, state.indices, dtype),)
    if isinstance(state, TwoSidedIndexState):
      return (dct_matrix(plan.rows, state.row_indices, dtype),
              dct_matrix(plan.cols, state.col_indices, dtype))
    if isinstance(state, TwoSidedBasisState):
      return (state.row_basis.astype(dtype), state.col_basis.astype(dtype))
    return (state.basis.astype(dtype),)

  @classmethod
  def down(cls, plan: LeafPlan, g: jax.Array, state) -> jax.Array:
    """Full matrix ``(*batch, M, N)`` -> low-rank ``R`` (``plan.lowrank_shape``)."""
    qs = cls.bases(plan, state, g.dtype)
    if plan.side == "reduction":
      return jnp.einsum("...mr,...mn->...rn", qs[0], g)
    if plan.side == "output":
      return jnp.einsum("...mn,...nr->...mr", g, qs[0])
    return jnp.einsum("...mr,...mn,...ns->...rs", qs[0], g, qs[1])

  @classmethod
  def up(cls, plan: LeafPlan, x: jax.Array, state) -> jax.Array:
    """Low-rank ``(*batch, ...)`` -> full matrix ``(*batch, M, N)``."""
    qs = cls.bases(plan, state, x.dtype)
    if plan.side == "reduction":
      return jnp.einsum("...mr,...rn->...mn", qs[0], x)
    if plan.side == "output":
      return jnp.einsum("...mr,...nr->...mn", x, qs[0])
    return jnp.einsum("...mr,...rs,...ns->...mn", qs[0], x, qs[1])
