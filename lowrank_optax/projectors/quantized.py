"""Q-GaLore's projector: an int4-quantised basis and a lazy, layer-adaptive refresh.

:class:`QuantizedProjector` wraps a basis projector (the exact SVD by
default, as the reference) and changes two things (ALGORITHMS.md 7):

* **Storage.** At a refresh the new basis is quantised group-wise
  (:func:`~lowrank_optax.quantize_int4`: ``bits``-bit codes packed
  ``8 // bits`` per byte, a float32 ``scale`` and a uint8 ``zero`` per group
  of ``group_size`` consecutive elements) and only the codes are kept.
  ``down`` and ``up`` use the dequantised basis ``scale * (code - zero)``,
  which is **not** re-orthonormalised (as in the reference).
* **When.** With ``initial_interval=T0`` each matrix keeps its own traced
  interval ``T`` (starting at ``T0``) and refreshes when ``count % T == 0``
  (the wrapper's ``update_proj_gap`` and ``stagger`` are then not used). At
  each refresh after the first, the cosine of the new first basis vector
  with the previous one goes into a FIFO of ``queue_size``; when the FIFO is
  full and its mean is at least ``cos_threshold``, ``T <- int(gamma_proj *
  T)``. The FIFO is not cleared, so ``T`` can grow at every later refresh.
  With ``initial_interval=None`` (the registered ``"int4_svd"``) the
  wrapper's fixed schedule applies and ``T`` never changes.

Layout (ALGORITHMS.md 0.1). The reference stores the projector of a PyTorch
weight ``W`` (out, in) as ``B = Vh[:r]`` (``r x in``, ``right``) or
``A = U[:, :r]`` (``out x r``, ``left``) and quantises it flattened
row-major. Our basis of a Flax matrix ``(*batch, M, N)`` is ``Q`` (``(*batch,
d, r)``, orthonormal columns): on the reduction side ``Q = B^T`` and on the
output side ``Q = A``. So the groups are taken over ``Q^T`` flattened
(reduction side) or ``Q`` flattened (output side): the same elements share a
scale as in the reference. The reference's "first vector" (the first row of
``Vh`` for ``right``, the first column of ``U`` for ``left``) is ``Q[..., :,
0]`` on both sides. Two-sided projections (``proj_type="full"``; the
reference supports ``std`` only) keep both bases this way and use the mean
of their two cosines.

State (arrays only, so orbax saves and restores it; ``*batch`` keeps the
leaf's batch sharding): the packed codes ``(*batch, d r bits / 8)`` (in the
reference's flat order), the per-group scales and zero points (5 bytes per
group), the previous first vector and the cosine FIFO are per-matrix vectors,
replicated over the matrix axes (:func:`~lowrank_optax.sharding.vectors`);
the interval and the refresh counter are per matrix. The codes are small
(``d r / 2`` bytes at 4 bits, 1/8 of a float32 basis), but replicated they
are not ``1/p`` per device under FSDP as the float bases are: at ``m = n``,
``p = 8`` they are twice the per-device share of the 8-bit moments. The
dequantised basis is resharded along ``d`` like a float basis
(:func:`~lowrank_optax.sharding.basis`) before the projections, so ``down``
and ``up`` contract exactly as for the float projectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_optax import quantization as quant
from lowrank_optax import sharding as shd
from lowrank_optax.policy import LeafPlan
from lowrank_optax.projectors.base import (BasisProjector, BasisState,
                                           Projector, TwoSidedBasisState,
                                           axis_size, basis_down, basis_up,
                                           mT, reduced_axes)
from lowrank_optax.projectors.exact import SVDProjector

__all__ = ["QuantizedProjector", "QuantizedBasisState", "MAX_INTERVAL"]

#: Intervals are clamped here (the reference's Python int grows without
#: bound; an int32 ``count`` never reaches a larger multiple anyway).
MAX_INTERVAL = 2**30


class QuantizedBasisState(NamedTuple):
  """Projector state of :class:`QuantizedProjector`.

  Attributes:
    basis: one entry per reduced axis (one; two for ``proj_type="full"``,
      the input axis first): a :class:`~lowrank_optax.QuantizedArray` (packed
      codes ``(*batch, ceil(d r bits / 8))`` uint8, ``scale`` float32 and
      ``zero`` uint8 of shape ``(*batch, ceil(d r / group_size))``) in the
      reference's element order (module docstring); or, with ``bits=None``,
      the float basis ``(*batch, d, r)``.
    first: one entry per reduced axis: ``(*batch, d)``, the first vector of
      the last computed (float) basis, in the basis dtype: the cosine rule's
      "previous vector".
    interval: ``(*batch,)`` int32, the current refresh interval ``T`` (0 when
      the wrapper's schedule is used).
    cosines: ``(*batch, queue_size)`` float32, the FIFO of cosines (a ring:
      the ``i``-th cosine is in slot ``i % queue_size``; the rule uses only
      their mean).
    refreshes: ``(*batch,)`` int32, the number of refreshes of each matrix
      (the reference's ``svd_count``).
  """

  basis: tuple
  first: tuple
  interval: jax.Array
  cosines: jax.Array
  refreshes: jax.Array


def _select(mask, new, old):
  """``where(mask, new, old)`` per matrix: ``mask`` ``(*batch,)`` broadcast
  over each array's trailing axes."""
  def one(a, b):
    m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
    return jnp.where(m, a, b)
  return jax.tree.map(one, new, old)


def cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x . y / max(|x| |y|, 1e-8)`` over the last axis, in float32 (torch's
  ``F.cosine_similarity`` with its ``eps=1e-8``)."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  dot = jnp.sum(x * y, axis=-1)
  norms = jnp.sqrt(jnp.sum(x * x, axis=-1)) * jnp.sqrt(jnp.sum(y * y, axis=-1))
  return dot / jnp.maximum(norms, 1e-8)


@dataclasses.dataclass(frozen=True)
class QuantizedProjector(Projector):
  """A basis stored at ``bits`` bits, with Q-GaLore's lazy refresh.

  See the module docstring for the rule. Registered as ``"int4_svd"``: the
  name says what is stored, an SVD basis at 4 bits (registry names describe
  the basis, as ``"svd"``, ``"eigh"``, ``"dct"``); by that name the wrapper's
  fixed schedule applies. :func:`~lowrank_optax.q_galore` builds it with
  ``initial_interval=update_proj_gap`` for the reference's adaptive schedule.

  Attributes:
    inner: the projector that computes the float basis at a refresh (a
      :class:`~lowrank_optax.projectors.BasisProjector`; default the exact
      SVD, as the reference). It receives the dequantised previous basis as
      its warm start.
    bits: code width (1, 2, 4 or 8); ``None`` stores the float basis
      (quantisation off).
    group_size: elements per quantisation group (reference 256).
    clamp_zero: clamp the zero point to ``[0, 2^bits - 1]`` as the reference.
    initial_interval: ``T0`` of the adaptive schedule; ``None``: the wrapper's
      schedule, no growth.
    cos_threshold: the FIFO mean at or above which ``T`` grows (0.4).
    gamma_proj: the growth factor (2): ``T <- int(gamma_proj * T)``.
    queue_size: FIFO length (5).
    abs_cos: use ``|cos|`` (insensitive to the SVD's sign flips; a
      deviation, off by default: the reference's cosine is signed).

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> proj = lro.projectors.QuantizedProjector(initial_interval=2)
    >>> tx = lro.chain(lro.galore_project(8, projector=proj),
    ...                optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.zeros((32, 64))}
    >>> state = tx.init(params)
    >>> g = {"w": jax.random.normal(jax.random.key(0), (32, 64))}
    >>> step = jax.jit(tx.update)
    >>> for _ in range(5):  # refreshes at 0, 2, 4
    ...   u, state = step(g, state)
    >>> ps = lro.subspace_state(state).projector[0]
    >>> codes = ps.basis[0].codes  # 32 x 8 at 4 bits, packed
    >>> codes.shape, codes.dtype, int(ps.refreshes)
    ((128,), dtype('uint8'), 3)
  """

  name = "int4_svd"

  inner: Projector = dataclasses.field(default_factory=SVDProjector)
  bits: Optional[int] = 4
  group_size: int = 256
  clamp_zero: bool = True
  initial_interval: Optional[int] = None
  cos_threshold: float = 0.4
  gamma_proj: float = 2
  queue_size: int = 5
  abs_cos: bool = False

  def __post_init__(self):
    if not isinstance(self.inner, BasisProjector):
      raise TypeError(
          "QuantizedProjector wraps a basis projector (lro.projectors."
          f"BasisProjector, e.g. SVDProjector()), got {self.inner!r}.")
    if self.bits is not None and self.bits not in (1, 2, 4, 8):
      raise ValueError(f"bits must be 1, 2, 4, 8 or None, got {self.bits!r}.")
    if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
        or self.group_size < 1):
      raise ValueError(f"group_size must be a positive int, got"
                       f" {self.group_size!r}.")
    if self.initial_interval is not None and (
        isinstance(self.initial_interval, bool)
        or not isinstance(self.initial_interval, int)
        or self.initial_interval < 1):
      raise ValueError(f"initial_interval must be a positive int or None, got"
                       f" {self.initial_interval!r}.")
    if (isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int)
        or self.queue_size < 1):
      raise ValueError(f"queue_size must be a positive int, got"
                       f" {self.queue_size!r}.")
    if not self.gamma_proj > 0:
      raise ValueError(f"gamma_proj must be > 0, got {self.gamma_proj!r}.")

  # -- layout -----------------------------------------------------------------
  @staticmethod
  def _ref_layout(axis: str, q: jax.Array) -> jax.Array:
    """Our ``(*batch, d, r)`` basis of ``axis`` in the reference's stored
    orientation: ``B = Vh[:r]`` (``r x in``) for the input axis, ``A = U[:,
    :r]`` (``out x r``) for the output axis. (Also its own inverse.)"""
    return mT(q) if axis == "rows" else q

  @staticmethod
  def _ref_shape(plan: LeafPlan, axis: str) -> tuple:
    d, r = axis_size(plan, axis), plan.rank
    return plan.batch_shape + ((r, d) if axis == "rows" else (d, r))

  def _store(self, plan: LeafPlan, axis: str, q: jax.Array):
    if self.bits is None:
      return q
    # The (small) basis is gathered before it is flattened into groups: an
    # explicit mesh refuses to flatten a sharded axis, and the edge padding of
    # the groups to slice a sharded batch axis. The codes, scales and zeros
    # are then placed as per-matrix vectors.
    q = shd.reshard(q, shd.replicated_like(plan, 2))
    qa = quant.quantize_int4(self._ref_layout(axis, q), self.group_size,
                             bits=self.bits, clamp_zero=self.clamp_zero,
                             batch_ndim=len(plan.batch_shape))
    vec = shd.vectors(plan)
    return jax.tree.map(lambda x: shd.place(x, vec), qa)

  def dequantized_bases(self, plan: LeafPlan, state: QuantizedBasisState,
                        dtype=jnp.float32) -> tuple:
    """The bases ``(*batch, d, r)`` that ``down`` and ``up`` use, in ``dtype``
    (one per reduced axis)."""
    out = []
    for ax, b in zip(reduced_axes(plan), state.basis):
      if self.bits is None:
        q = b.astype(dtype)
      else:
        q = quant.dequantize_int4(b, self._ref_shape(plan, ax), dtype,
                                  group_size=self.group_size, bits=self.bits,
                                  batch_ndim=len(plan.batch_shape))
        q = self._ref_layout(ax, q)
      out.append(shd.reshard(q, shd.basis(plan, ax)))
    return tuple(out)

  # -- state ------------------------------------------------------------------
  def init(self, plan: LeafPlan, dtype, key=None):
    starts = tuple(self.inner.init(plan, dtype, key))  # placeholder bases
    axes = reduced_axes(plan)
    vec = shd.vectors(plan)
    per_matrix = shd.batch_only(plan, 0)
    batch = plan.batch_shape
    return QuantizedBasisState(
        basis=tuple(self._store(plan, ax, q) for ax, q in zip(axes, starts)),
        first=tuple(shd.place(q[..., :, 0], vec) for q in starts),
        interval=shd.place(jnp.full(batch, self.initial_interval or 0,
                                    jnp.int32), per_matrix),
        cosines=shd.place(jnp.zeros(batch + (self.queue_size,), jnp.float32),
                          vec),
        refreshes=shd.place(jnp.zeros(batch, jnp.int32), per_matrix))

  # -- refresh ----------------------------------------------------------------
  def due(self, state: QuantizedBasisState, count: jax.Array) -> jax.Array:
    """``(*batch,)`` bool: which matrices refresh at ``count`` (adaptive)."""
    interval = jnp.maximum(state.interval, 1)
    return (count == 0) | (count % interval == 0)

  def should_refresh(self, plan, state, count, scheduled):
    if self.initial_interval is None:
      return scheduled
    return jnp.any(self.due(state, count))

  def compute(self, plan, a, state, *, first, key, count):
    dtype = state.first[0].dtype
    axes = reduced_axes(plan)
    prev = (BasisState if len(axes) == 1 else TwoSidedBasisState)(
        *self.dequantized_bases(plan, state, dtype))
    news = tuple(self.inner.compute(plan, a, prev, first=first, key=key,
                                    count=count))
    new_first = tuple(q[..., :, 0] for q in news)
    coss = [cosine(f, n) for f, n in zip(state.first, new_first)]
    if self.abs_cos:
      coss = [jnp.abs(c) for c in coss]
    # Two-sided (an extension: the reference is one-sided): their mean.
    cos = sum(coss) / len(coss)
    seen = state.refreshes  # refreshes before this one
    has_prev = seen > 0
    slot = jnp.maximum(seen - 1, 0) % self.queue_size
    push = has_prev[..., None] & (
        jnp.arange(self.queue_size) == slot[..., None])
    cosines = jnp.where(push, cos[..., None], state.cosines)
    interval = state.interval
    if self.initial_interval is not None:
      # After this push the FIFO holds min(seen, queue_size) cosines.
      full = has_prev & (seen >= self.queue_size)
      grow = full & (jnp.mean(cosines, axis=-1) >= self.cos_threshold)
      grown = jnp.floor(interval.astype(jnp.float32) * self.gamma_proj)
      grown = jnp.clip(grown, 1, MAX_INTERVAL).astype(jnp.int32)
      interval = jnp.where(grow, grown, interval)
    fresh = QuantizedBasisState(
        basis=tuple(self._store(plan, ax, q) for ax, q in zip(axes, news)),
        first=tuple(f.astype(dtype) for f in new_first),
        interval=interval, cosines=cosines, refreshes=seen + 1)
    if self.initial_interval is None:  # the whole leaf refreshes
      return fresh
    return _select(self.due(state, count), fresh, state)

  # -- maps -------------------------------------------------------------------
  def down(self, plan, g, state):
    return basis_down(plan, g, self.dequantized_bases(plan, state, g.dtype))

  def up(self, plan, x, state):
    return basis_up(plan, x, self.dequantized_bases(plan, state, x.dtype))
