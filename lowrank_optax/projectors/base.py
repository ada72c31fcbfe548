"""The projector protocol, the basis states, and the orthonormal-basis maps.

A projector answers question 2 of the design for one projected leaf: which
basis, and when. It is a static, hashable configuration object (a frozen
dataclass); every array it needs lives in its *state*, a ``NamedTuple`` of
arrays kept per leaf by :func:`~lowrank_optax.subspace`. The protocol:

==================================  ===========================================
``init(plan, dtype, key)``          the leaf's initial state (placed on the
                                    mesh as ``plan.sharding`` says)
``refresh(plan, g, state, first,    the state after a refresh from the
key, count)``                       gradient matrix ``g``; the base class
                                    keeps the old state if ``g`` is not finite
                                    and calls ``compute``
``down(plan, g, state)``            ``(*batch, M, N)`` -> low-rank ``R``
``up(plan, x, state)``              low-rank -> ``(*batch, M, N)``
``lowrank_shape(plan)``             the shape of ``R`` (default
                                    ``plan.lowrank_shape``)
``should_refresh(plan, state,       whether this count refreshes (default: the
count, scheduled)``                 wrapper's schedule ``scheduled``)
``advance(plan, g, state, count)``  an every-step change of the state after
                                    the update (default: none)
``carry_over(plan, x, old, new)``   optional: moves a low-rank inner-state
                                    array to the new subspace's coordinates
                                    (``on_refresh="rotate"``)
==================================  ===========================================

The matrix view of a leaf is ``(*batch, M, N)`` (``M`` the reduction/input
axis, ``N`` the output axis); ``plan.side`` says which is reduced. For the
families that keep an orthonormal basis ``Q`` of the reduced axis
(:class:`BasisProjector`) the maps are

==============  =========================  =====================
side            down: ``R = ...``          up: ``U = ...``
==============  =========================  =====================
``reduction``   ``Q^T G``  (``r x N``)     ``Q R``
``output``      ``G Q``    (``M x r``)     ``R Q^T``
``both``        ``Q_M^T G Q_N`` (``r x r``)  ``Q_M R Q_N^T``
==============  =========================  =====================

Decompositions run in float32 whatever the gradient's dtype; the basis is
stored in the parameter's dtype (as the reference does).

Sharding: ``plan.sharding`` (a :class:`~lowrank_optax.sharding.MatrixSharding`
or ``None``) says how the leaf lies on the mesh. Every contraction over a
possibly sharded axis goes through :func:`lowrank_optax.sharding.einsum`
with the output sharding DESIGN.md prescribes, so the maps and the
matmul-only refreshes run in explicit meshes without gathering the matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.policy import LeafPlan

__all__ = [
    "Projector",
    "BasisProjector",
    "BasisState",
    "TwoSidedBasisState",
    "orthonormalize",
    "mT",
]

HIGHEST = jax.lax.Precision.HIGHEST


def mT(x):
  """Swaps the last two axes."""
  return jnp.swapaxes(x, -1, -2)


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


class Projector:
  """Base class of every projector (see the module docstring for the protocol).

  Subclasses are frozen dataclasses (static, hashable) and implement
  :meth:`init`, :meth:`compute`, :meth:`down` and :meth:`up`; the rest has
  defaults. ``name`` is what ``projector=`` accepts for a registered family.
  """

  name: ClassVar[str] = ""
  #: Whether :meth:`carry_over` is implemented (``on_refresh="rotate"``).
  supports_carry_over: ClassVar[bool] = False

  # -- shapes -----------------------------------------------------------------
  def lowrank_shape(self, plan: LeafPlan) -> tuple:
    """Shape of the low-rank gradient ``R`` of a leaf."""
    return plan.lowrank_shape

  def lowrank_sharding(self, plan: LeafPlan):
    """Sharding of ``R`` (``None`` where the leaf's is not known)."""
    return shd.lowrank(plan)

  # -- state ------------------------------------------------------------------
  def init(self, plan: LeafPlan, dtype, key: Optional[jax.Array] = None):
    """The leaf's initial state (a ``NamedTuple`` of arrays); ``key`` seeds
    random starts (the subspace passes one per leaf)."""
    raise NotImplementedError

  # -- refresh ----------------------------------------------------------------
  def should_refresh(self, plan: LeafPlan, state, count: jax.Array,
                     scheduled: jax.Array) -> jax.Array:
    """Traced bool: refresh at this count? ``scheduled`` is the wrapper's
    fixed-interval schedule; adaptive projectors decide from their state."""
    del plan, state, count
    return scheduled

  def refresh(self, plan: LeafPlan, g: jax.Array, state, first, key,
              count: Optional[jax.Array] = None):
    """The state after a refresh from the gradient matrix ``g`` (``(*batch, M, N)``).

    ``g`` is cast to float32 and passed to :meth:`compute`, unless it is not
    finite: then the previous state is kept (a ``lax.cond``: no NaN reaches a
    decomposition, and no masked copy of ``g`` is made).

    Args:
      plan: the leaf's plan.
      g: the gradient as a matrix.
      state: the current state.
      first: traced bool, True at the leaf's first refresh.
      key: PRNG key for the refresh (sketches, random draws).
      count: the wrapper's step counter (traced int32).

    Returns:
      The new state, with the same shapes, dtypes and shardings.
    """
    a = g.astype(jnp.float32)

    def fresh():
      new = self.compute(plan, a, state, first=first, key=key, count=count)
      return jax.tree.map(shd.like, new, state)

    return jax.lax.cond(jnp.all(jnp.isfinite(a)), fresh, lambda: state)

  def compute(self, plan: LeafPlan, a: jax.Array, state, *, first, key,
              count):
    """The new state from a finite float32 gradient matrix ``a``."""
    raise NotImplementedError

  def advance(self, plan: LeafPlan, g: jax.Array, state, count: jax.Array):
    """Every-step change of the state after the update (default: none)."""
    del plan, g, count
    return state

  def carry_over(self, plan: LeafPlan, x: jax.Array, old, new) -> jax.Array:
    """Moves a low-rank array from the old subspace's coordinates to the new."""
    raise NotImplementedError(
        f"{type(self).__name__} does not move inner state across a refresh"
        " (on_refresh='rotate'); use on_refresh='keep' or 'reset'.")

  # -- maps -------------------------------------------------------------------
  def down(self, plan: LeafPlan, g: jax.Array, state) -> jax.Array:
    """Full matrix ``(*batch, M, N)`` -> low-rank ``R``."""
    raise NotImplementedError

  def up(self, plan: LeafPlan, x: jax.Array, state) -> jax.Array:
    """Low-rank ``x`` -> full matrix ``(*batch, M, N)``."""
    raise NotImplementedError


# -- maps for families with basis matrices -----------------------------------

def basis_down(plan: LeafPlan, g: jax.Array, qs) -> jax.Array:
  """``R`` from ``g`` and the basis matrices ``qs`` (one or two)."""
  out = shd.lowrank(plan)
  if plan.side == "reduction":
    return shd.einsum("...mr,...mn->...rn", qs[0], g, out=out)
  if plan.side == "output":
    return shd.einsum("...mn,...nr->...mr", g, qs[0], out=out)
  return shd.einsum("...mr,...mn,...ns->...rs", qs[0], g, qs[1], out=out)


def basis_up(plan: LeafPlan, x: jax.Array, qs) -> jax.Array:
  """``(*batch, M, N)`` from the low-rank ``x`` and the basis matrices ``qs``."""
  out = shd.matrix(plan)
  if plan.side == "reduction":
    return shd.einsum("...mr,...rn->...mn", qs[0], x, out=out)
  if plan.side == "output":
    return shd.einsum("...mr,...nr->...mn", x, qs[0], out=out)
  return shd.einsum("...mr,...rs,...ns->...mn", qs[0], x, qs[1], out=out)


def reduced_axes(plan: LeafPlan) -> tuple:
  """The reduced matrix axes: ``("rows",)``, ``("cols",)`` or both."""
  return {"reduction": ("rows",), "output": ("cols",),
          "both": ("rows", "cols")}[plan.side]


def axis_size(plan: LeafPlan, axis: str) -> int:
  return plan.rows if axis == "rows" else plan.cols


def oriented(plan: LeafPlan, a: jax.Array, axis: str) -> jax.Array:
  """``a`` (``(*batch, M, N)``) with ``axis`` first: ``a`` or ``a^T``."""
  return a if axis == "rows" else mT(a)


@dataclasses.dataclass(frozen=True)
class BasisProjector(Projector):
  """A projector whose state is an orthonormal basis of each reduced axis.

  Subclasses implement :meth:`new_basis`: the ``(*batch, d, r)`` basis of the
  column space of a float32 ``(*batch, d, n)`` matrix (``d`` the reduced
  axis). A computed basis that is not orthonormal (a failed factorisation)
  is replaced by the previous one.
  """

  def initial_basis(self, plan: LeafPlan, d: int, dtype, key) -> jax.Array:
    """The basis before the first refresh (a placeholder: the first update
    refreshes; it is used only if that first gradient is not finite)."""
    del key
    return jnp.broadcast_to(jnp.eye(d, plan.rank, dtype=dtype),
                            plan.batch_shape + (d, plan.rank))

  def new_basis(self, plan: LeafPlan, a: jax.Array, prev: jax.Array, *,
                axis: str, first, key) -> jax.Array:
    raise NotImplementedError

  def init(self, plan: LeafPlan, dtype, key=None):
    keys = jax.random.split(jax.random.key(0) if key is None else key)
    bases = [shd.place(self.initial_basis(plan, axis_size(plan, ax), dtype, k),
                       shd.basis(plan, ax))
             for ax, k in zip(reduced_axes(plan), keys)]
    if plan.side == "both":
      return TwoSidedBasisState(*bases)
    return BasisState(bases[0])

  def compute(self, plan, a, state, *, first, key, count):
    del count
    olds = tuple(state)
    keys = jax.random.split(key) if plan.side == "both" else (key,)
    news = []
    for ax, old, k in zip(reduced_axes(plan), olds, keys):
      new = self.new_basis(plan, oriented(plan, a, ax), old.astype(jnp.float32),
                           axis=ax, first=first, key=k)
      new = shd.reshard(new, shd.basis(plan, ax))
      news.append(jnp.where(is_orthonormal(new), new.astype(old.dtype), old))
    return type(state)(*news)

  @staticmethod
  def bases(plan: LeafPlan, state, dtype) -> tuple:
    """The basis matrices of the state, in ``dtype``."""
    del plan
    return tuple(q.astype(dtype) for q in state)

  def down(self, plan, g, state):
    return basis_down(plan, g, self.bases(plan, state, g.dtype))

  def up(self, plan, x, state):
    return basis_up(plan, x, self.bases(plan, state, x.dtype))


def is_orthonormal(q: jax.Array, tol: float = 1e-2) -> jax.Array:
  """Traced bool: finite, with columns of unit norm (to ``tol``)."""
  norms = jnp.sum(jnp.square(q), axis=-2)
  return jnp.all(jnp.isfinite(q)) & jnp.all(jnp.abs(norms - 1.0) < tol)


# -- small dense factorisations ------------------------------------------------

def _per_matrix_on_cpu(fn, *xs):
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


def _replicated(x):
  """``x`` replicated over an explicit mesh (small ``r x r`` factors only).

  Batched Cholesky refuses batch-sharded operands in explicit meshes, and
  ``lax.map`` refuses a sharded leading axis; the ``r x r`` Grams are tiny,
  so they are gathered and every device factors them all.
  """
  s = shd.leaf_sharding(x)
  if s is None or not shd._explicit(s):  # pylint: disable=protected-access
    return x, None
  if all(e is None for e in s.spec):
    return x, None
  full = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return jax.sharding.reshard(x, full), s


def _eye(n: int, dtype) -> jax.Array:
  """``jnp.eye(n)`` from two iotas (the same program, traced without a jit wrapper)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return (rows == cols).astype(dtype)


def inverse_cholesky_factor(gram: jax.Array) -> jax.Array:
  """``L^{-1}`` for the Cholesky factor ``L`` of ``(*batch, r, r)`` ``gram``."""
  gram, sharding = _replicated(gram)
  eye = _eye(gram.shape[-1], gram.dtype)

  def factor(g):
    chol = jnp.linalg.cholesky(g)
    return jax.scipy.linalg.solve_triangular(
        chol, jnp.broadcast_to(eye, g.shape), lower=True)

  out = _per_matrix_on_cpu(factor, gram)
  return out if sharding is None else jax.sharding.reshard(out, sharding)


def orthonormalize(y: jax.Array, passes: int = 3) -> jax.Array:
  """Orthonormalises the columns of ``y`` (``(*batch, d, r)``) by shifted Cholesky-QR.

  The first pass factors ``Y^T Y + s I`` with a small shift ``s`` relative to
  ``||Y||_F^2`` (so it succeeds for ill-conditioned ``Y``); the following
  unshifted passes restore orthonormality to working precision (shifted
  CholeskyQR3, Fukaya et al. 2020). Every pass is an ``r x r`` Gram (a
  reduction over ``d``), an ``r x r`` Cholesky factor and its inverse, and
  ``Y <- Y L^{-T}``, a product that keeps ``Y``'s sharding: no Householder QR,
  no gathering of the long axis under sharding. Columns are pre-normalised,
  which makes the result invariant to column scaling.
  """
  y = y / (jnp.linalg.norm(y, axis=-2, keepdims=True) + 1e-30)
  r = y.shape[-1]
  eye = _eye(r, y.dtype)
  ys, small = shd.leaf_sharding(y), shd.small_of(y)
  for i in range(passes):
    gram = shd.einsum("...dr,...ds->...rs", y, y, out=small, precision=HIGHEST)
    if i == 0:
      shift = 1e-5 * jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] + 1e-30
      gram = gram + shift * eye
    linv = inverse_cholesky_factor(gram)
    y = shd.einsum("...dr,...sr->...ds", y, linv, out=ys, precision=HIGHEST)
  return y
