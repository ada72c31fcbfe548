"""Random coordinate projectors (FRUGAL): the subspace is a random set of coordinates.

The state of every projector here is only ``int32`` indices, redrawn from the
refresh key at each refresh (the gradient is not read); ``down`` gathers the
selected coordinates of the gradient and ``up`` scatters a low-rank array into
zeros. No basis and no dense 0/1 selection matrix is ever built.

==============  =====================================  ==========================
name            selects (matrix view ``(*b, M, N)``)   low-rank shape
==============  =====================================  ==========================
``"randperm"``  ``r`` random coordinates of the        ``(*b, r, N)``,
                reduced side(s) (``plan.side``)        ``(*b, M, r)``, ``(*b, r, r)``
``"columns"``   ``r`` random input coordinates (``M``)  ``(*b, r, N)``
``"rows"``      ``r`` random output coordinates (``N``) ``(*b, M, r)``
``"randk"``     ``k`` random entries of the matrix      ``(*b, k)``
==============  =====================================  ==========================

What the official FRUGAL code does (``fzmushko/FRUGAL`` @ ``c7ebe4c``):

* ``randperm`` is ``GaloreOptimizer(proj_type="randperm")``
  (``frugal/galore_projector.py``): the first ``r`` rows of a random
  permutation matrix, so ``R = G B^T`` keeps the coordinates ``perm[:r]`` of
  the reduced side (``left``/``right``/``full`` as for the SVD;
  ``r = round(rho * reduced)``, half to even).
* ``columns`` / ``rows`` / ``randk`` are ``CoordOptimizer``'s ``coord_choice``
  (``frugal/coordinate_projector.py``): ``torch.randperm(d)[:int(d * rho)]``
  with ``d`` the number of columns, rows or ``m * n`` entries of the PyTorch
  weight ``(out_features, in_features)``; ``down`` is ``G[:, idx]``,
  ``G[idx]`` or ``G[rows, cols]``, ``up`` writes into ``torch.zeros``.
  PyTorch's columns are ``in_features``, which in the Flax layout ``(in,
  out)`` is our reduction axis ``M``: ``"columns"`` selects input coordinates
  (it needs ``plan.side == "reduction"``, i.e. ``proj_type="right"``) and
  ``"rows"`` output coordinates (``plan.side == "output"``,
  ``proj_type="left"``). ``"randk"`` draws ``k`` of the ``M * N`` entries (the
  plan's rank is ``k``: ``fraction_of="numel"``); it ignores the side.
  :func:`~lowrank_optax.frugal_project` sets the side, ``fraction_of`` and the
  ``int()`` (floor) rounding from the projector's class attributes
  (:attr:`CoordinateProjector.proj_type`, ``fraction_of``,
  ``fraction_rounding``).

Deviations: the indices are sorted ascending (the reference keeps
``randperm``'s order; the order only permutes the slots of the low-rank
state, which the reference resets at a refresh anyway); the draws use JAX's
PRNG (``jax.random.permutation`` of the leaf's refresh key, one independent
draw per batch element and per reduced side), so they are not the torch
draws. ``randk`` needs ``M * N < 2**31`` (``int32`` indices). A refresh of
``randk`` draws a permutation of all ``M * N`` entries (as the reference), a
transient of the gradient's size in ``int32``.

Sharding: the indices are ``P(*batch, None)`` (:func:`~lowrank_optax.sharding.vectors`,
every device holds all of them); in an explicit mesh the gathers and scatters
name their output shardings (the low-rank array of the leaf's kept axis, the
matrix), so a gather along a sharded axis moves only the selected
coordinates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_optax import sharding as shd
from lowrank_optax.policy import LeafPlan
from lowrank_optax.projectors.base import Projector, mT

__all__ = ["CoordinateProjector", "RandPermProjector", "ColumnsProjector",
           "RowsProjector", "RandKProjector", "CoordinateState",
           "TwoSidedCoordinateState", "random_indices"]

_MAX_INT32 = 2**31 - 1


class CoordinateState(NamedTuple):
  """Projector state of a one-sided (or entry-wise) coordinate projection.

  Attributes:
    indices: ``(*batch, r)`` ``int32``, ascending: the selected coordinates of
      the reduced matrix axis (for ``"randk"``: flat indices ``i * N + j`` of
      the selected entries of the ``(M, N)`` matrix).
  """

  indices: jax.Array


class TwoSidedCoordinateState(NamedTuple):
  """Projector state of a two-sided (``full``) ``"randperm"`` projection.

  Attributes:
    row_indices: ``(*batch, r)`` selected input (``M``) coordinates.
    col_indices: ``(*batch, r)`` selected output (``N``) coordinates.
  """

  row_indices: jax.Array
  col_indices: jax.Array


def random_indices(key: jax.Array, batch_shape: tuple, size: int,
                   count: int) -> jax.Array:
  """``count`` distinct uniformly random indices in ``[0, size)``, per batch element.

  ``torch.randperm(size)[:count]`` in JAX: the first ``count`` entries of
  ``jax.random.permutation``, sorted ascending; each batch element uses its
  own key (split from ``key``).

  Args:
    key: a PRNG key.
    batch_shape: leading shape ``(*batch,)``.
    size: the range.
    count: how many (``<= size``).

  Returns:
    ``(*batch_shape, count)`` ``int32``.

  Example:
    >>> import jax, lowrank_optax as lro
    >>> idx = lro.projectors.random_indices(jax.random.key(0), (2,), 10, 3)
    >>> idx.shape, bool((idx[:, 1:] > idx[:, :-1]).all())
    ((2, 3), True)
  """
  if not 0 <= count <= size:
    raise ValueError(f"Cannot draw {count} distinct indices out of {size}.")

  def one(k):
    perm = jax.random.permutation(k, size)[:count]
    return jnp.sort(perm).astype(jnp.int32)

  n = math.prod(batch_shape)
  if not batch_shape:
    return one(key)
  keys = jax.random.split(key, n)
  return jax.vmap(one)(keys).reshape(tuple(batch_shape) + (count,))


def _batch_index(batch_shape: tuple) -> tuple:
  """Index arrays of the batch axes, shaped to broadcast with ``(*batch, k)``."""
  nb = len(batch_shape)
  out = []
  for i, b in enumerate(batch_shape):
    shape = [1] * (nb + 1)
    shape[i] = b
    out.append(jnp.arange(b, dtype=jnp.int32).reshape(shape))
  return tuple(out)


def _get(x, index: tuple, out):
  """``x[index]`` naming the output sharding in an explicit mesh."""
  kw = dict(unique_indices=True, mode="promise_in_bounds",
            wrap_negative_indices=False)
  if shd._explicit(out):  # pylint: disable=protected-access
    return x.at[index].get(out_sharding=out, **kw)
  return x.at[index].get(**kw)


def _set(shape, dtype, index: tuple, values, out):
  """``zeros(shape).at[index].set(values)`` at sharding ``out``."""
  kw = dict(unique_indices=True, mode="promise_in_bounds",
            wrap_negative_indices=False)
  if shd._explicit(out):  # pylint: disable=protected-access
    z = jnp.zeros(shape, dtype, out_sharding=out)
    return z.at[index].set(values, out_sharding=out, **kw)
  return jnp.zeros(shape, dtype).at[index].set(values, **kw)


def _named(plan: LeafPlan, *entries):
  ms = plan.sharding
  return None if ms is None else ms.named(*entries)


def _entry(plan: LeafPlan, axis: str):
  ms = plan.sharding
  return None if ms is None else ms.of_axis(axis)


def _gather_axis(g, idx, axis: str, out):
  """Keeps coordinates ``idx`` (``(*batch, r)``) of matrix ``axis`` of ``g``.

  ``out`` is the sharding of the result with the selected axis first
  (``(*batch, r, other)``).
  """
  x = g if axis == "rows" else mT(g)  # the selected axis first
  y = _get(x, _batch_index(idx.shape[:-1]) + (idx,), out)
  return y if axis == "rows" else mT(y)


def _scatter_axis(x, idx, axis: str, size: int, out):
  """Writes ``x`` into coordinates ``idx`` of matrix ``axis`` of a zero matrix.

  ``out`` is the sharding of the result with the written axis first.
  """
  y = x if axis == "rows" else mT(x)  # (*batch, r, other)
  shape = y.shape[:-2] + (size, y.shape[-1])
  z = _set(shape, x.dtype, _batch_index(idx.shape[:-1]) + (idx,), y, out)
  return z if axis == "rows" else mT(z)


@dataclasses.dataclass(frozen=True)
class CoordinateProjector(Projector):
  """Base of the projectors onto random coordinate subsets (state: indices).

  Class attributes read by :func:`~lowrank_optax.frugal_project` (and the
  recipe) to build the plan the reference's rules imply:

  Attributes:
    proj_type: the side the projector needs (``None``: any, from the
      ``proj_type`` argument).
    fraction_of: what the density is a fraction of (``"reduced"`` or
      ``"numel"``).
    fraction_rounding: ``"half_even"`` (``round``) or ``"floor"`` (``int``).
  """

  proj_type: ClassVar[Optional[str]] = None
  fraction_of: ClassVar[str] = "reduced"
  fraction_rounding: ClassVar[str] = "floor"
  #: Required ``plan.side`` (``None``: any).
  required_side: ClassVar[Optional[str]] = None

  def _axes(self, plan: LeafPlan) -> tuple:
    if self.required_side is not None and plan.side != self.required_side:
      raise ValueError(
          f"projector={self.name!r} selects the"
          f" {'input (M)' if self.required_side == 'reduction' else 'output (N)'}"
          f" coordinates of a matrix, but the plan of {plan.path!r} reduces"
          f" its {plan.side!r} side; use proj_type={self.proj_type!r} (or"
          " lro.frugal_project / lro.frugal, which set it).")
    return {"reduction": ("rows",), "output": ("cols",),
            "both": ("rows", "cols")}[plan.side]

  def _sizes(self, plan: LeafPlan) -> tuple:
    return tuple(plan.rows if ax == "rows" else plan.cols
                 for ax in self._axes(plan))

  def _draw(self, plan: LeafPlan, key) -> tuple:
    sizes = self._sizes(plan)
    keys = jax.random.split(key, len(sizes))
    return tuple(shd.place(random_indices(k, plan.batch_shape, d, plan.rank),
                           shd.vectors(plan))
                 for k, d in zip(keys, sizes))

  def _state(self, plan, indices):
    if len(indices) == 2:
      return TwoSidedCoordinateState(*indices)
    return CoordinateState(indices[0])

  def init(self, plan, dtype, key=None):
    """A random draw from ``key`` (every leaf redraws at its first update)."""
    del dtype
    return self._state(plan, self._draw(
        plan, jax.random.key(0) if key is None else key))

  def refresh(self, plan, g, state, first, key, count=None):
    """New indices from ``key``; the gradient is not read (no finiteness
    check is needed: nothing is computed from it)."""
    del g, first, count
    new = self._state(plan, self._draw(plan, key))
    return jax.tree.map(shd.like, new, state)

  def compute(self, plan, a, state, *, first, key, count):
    del a, first, count
    return self._state(plan, self._draw(plan, key))

  def down(self, plan, g, state):
    axes = self._axes(plan)
    if len(axes) == 1:
      other = "cols" if axes[0] == "rows" else "rows"
      return _gather_axis(g, state[0], axes[0],
                          _named(plan, None, _entry(plan, other)))
    y = _gather_axis(g, state[0], "rows",
                     _named(plan, None, _entry(plan, "cols")))
    return _gather_axis(y, state[1], "cols", _named(plan, None, None))

  def up(self, plan, x, state):
    axes = self._axes(plan)
    if len(axes) == 1:
      ax = axes[0]
      other = "cols" if ax == "rows" else "rows"
      size = plan.rows if ax == "rows" else plan.cols
      return _scatter_axis(x, state[0], ax, size,
                           _named(plan, _entry(plan, ax), _entry(plan, other)))
    y = _scatter_axis(x, state[1], "cols", plan.cols,
                      _named(plan, _entry(plan, "cols"), None))
    return _scatter_axis(y, state[0], "rows", plan.rows, shd.matrix(plan))


@dataclasses.dataclass(frozen=True)
class RandPermProjector(CoordinateProjector):
  """``r`` random coordinates of the reduced side(s): FRUGAL's ``randperm``.

  The reference's ``proj_type="randperm"`` of ``GaloreOptimizer``: rows of a
  random permutation matrix, ``r = round(rho * reduced)``. Any side
  (``reduction``, ``output``, ``both``).

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(2, projector="randperm"),
    ...                optax.sgd(1.0))
    >>> g = {"w": jnp.ones((4, 6))}
    >>> u, s = tx.update(g, tx.init(g))
    >>> int((u["w"] != 0).any(axis=1).sum())  # 2 of the 4 input rows move
    2
  """

  name = "randperm"
  fraction_rounding = "half_even"


@dataclasses.dataclass(frozen=True)
class ColumnsProjector(CoordinateProjector):
  """``int(rho * M)`` random input coordinates: FRUGAL's ``coord_choice="columns"``.

  PyTorch's columns are ``in_features``: in the Flax layout ``(in, out)`` the
  reduction axis ``M``. Needs ``proj_type="right"``.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.frugal_project(0.5, projector="columns"),
    ...                optax.sgd(1.0))
    >>> g = {"w": jnp.ones((4, 6))}
    >>> u, s = tx.update(g, tx.init(g))
    >>> int((u["w"] != 0).any(axis=1).sum())  # int(0.5 * 4) input rows
    2
  """

  name = "columns"
  proj_type = "right"
  required_side = "reduction"


@dataclasses.dataclass(frozen=True)
class RowsProjector(CoordinateProjector):
  """``int(rho * N)`` random output coordinates: FRUGAL's ``coord_choice="rows"``.

  PyTorch's rows are ``out_features``: in the Flax layout the output axis
  ``N``. Needs ``proj_type="left"``.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.frugal_project(0.5, projector="rows"),
    ...                optax.sgd(1.0))
    >>> g = {"w": jnp.ones((4, 6))}
    >>> u, s = tx.update(g, tx.init(g))
    >>> int((u["w"] != 0).any(axis=0).sum())  # int(0.5 * 6) output columns
    3
  """

  name = "rows"
  proj_type = "left"
  required_side = "output"


@dataclasses.dataclass(frozen=True)
class RandKProjector(CoordinateProjector):
  """``k = int(rho * M * N)`` random entries: FRUGAL's ``coord_choice="randk"``.

  The plan's rank is ``k`` (``fraction_of="numel"``); the low-rank array is
  the ``(*batch, k)`` vector of the selected entries; the side is ignored.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.frugal_project(0.25, projector="randk"),
    ...                optax.scale_by_adam(), lro.back_project())
    >>> g = {"w": jnp.ones((4, 6))}
    >>> u, s = tx.update(g, tx.init(g))
    >>> s[0].inner[0][0].mu.shape, int((u["w"] != 0).sum())  # int(0.25 * 24)
    ((6,), 6)
  """

  name = "randk"
  fraction_of = "numel"

  def lowrank_shape(self, plan):
    return plan.batch_shape + (plan.rank,)

  def lowrank_sharding(self, plan):
    return shd.vectors(plan)

  def _check(self, plan):
    if plan.rows * plan.cols > _MAX_INT32:
      raise ValueError(f"projector='randk' needs M * N < 2**31 (int32"
                       f" indices); {plan.path!r} has {plan.rows} x"
                       f" {plan.cols}.")

  def _draw(self, plan, key):
    self._check(plan)
    return (shd.place(random_indices(key, plan.batch_shape,
                                     plan.rows * plan.cols, plan.rank),
                      shd.vectors(plan)),)

  def _state(self, plan, indices):
    return CoordinateState(indices[0])

  def down(self, plan, g, state):
    idx = state.indices
    index = _batch_index(idx.shape[:-1]) + (idx // plan.cols, idx % plan.cols)
    return _get(g, index, shd.vectors(plan))

  def up(self, plan, x, state):
    idx = state.indices
    index = _batch_index(idx.shape[:-1]) + (idx // plan.cols, idx % plan.cols)
    shape = plan.batch_shape + (plan.rows, plan.cols)
    return _set(shape, x.dtype, index, x, shd.matrix(plan))
