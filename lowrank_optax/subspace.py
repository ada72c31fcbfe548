"""The subspace wrapper, the projection element and ``lro.chain``.

:func:`subspace` is the primitive, in the idiom of ``optax.masked``: it wraps
an inner transform, runs it on the projected (low-rank) gradient of every
projected leaf and on the full gradient of every other leaf, and maps the
result back. The inner transform is initialised from **low-rank
``jax.ShapeDtypeStruct`` proxies** carrying the sharding derived from the
parameter's (so ``zeros_like`` inside any optax transform creates correctly
shaped and sharded low-rank state) and receives ``params=None``.

The inner transform runs **per leaf**, like the reference PyTorch optimizers
whose state is per parameter: each leaf has its own inner state (so a leaf's
moments and counter can be reset at its own refresh, and a staggered refresh
touches one leaf only). Transforms that need the whole tree at once (global
norm clipping) belong *before* the projection element.

:func:`chain` is the user-facing spelling::

    lro.chain(pre..., lro.galore_project(128), inner..., closer, post...)

``pre`` runs in full space before projection, ``inner`` in the subspace,
``closer`` (:func:`back_project`, :func:`~lowrank_optax.sign_residual`, ...)
maps back and decides what happens to the residual ``G - up(down(G))``, and
``post`` runs in full space on the combined update (learning rate, weight
decay, which needs params).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import residual as residual_lib
from lowrank_optax import sharding as shd

__all__ = [
    "SubspaceState",
    "subspace_state",
    "ProjectionConfig",
    "ProjectionElement",
    "SubspaceOnlyTransformation",
    "LowRankTransformation",
    "subspace",
    "galore_project",
    "back_project",
    "chain",
    "ON_REFRESH",
]

ON_REFRESH = ("keep", "reset", "rotate")


class SubspaceState(NamedTuple):
  """State of :func:`subspace`.

  Attributes:
    count: number of completed updates (int32).
    projector: one entry per parameter leaf (``jax.tree.leaves`` order): the
      projector state of a projected leaf, ``optax.MaskedNode()`` otherwise.
    inner: one entry per leaf: the inner transform's state (low-rank for
      projected leaves, full-rank otherwise).
    residual: one entry per leaf: the closers' state (a pair ``(map-back,
      residual)``), or ``optax.MaskedNode()``.
    refreshed: how many leaves refreshed their basis in the last update
      (int32): read it in a training loop to see refresh events (and time
      the steps where it is non-zero) without leaving ``jit``.
  """

  count: jax.Array
  projector: tuple
  inner: tuple
  residual: tuple
  refreshed: jax.Array


class LowRankTransformation(optax.GradientTransformationExtraArgs):
  """An optax transform that remembers its projection.

  What :func:`subspace`, :func:`chain` and the recipes return: a
  ``GradientTransformationExtraArgs`` (``init``, ``update``) with an extra
  attribute ``projection``, the :class:`ProjectionConfig`, so that
  :func:`~lowrank_optax.memory_report` can say each leaf's rank, side and
  projector. Wrapping it in another optax transform keeps it working (only
  that report loses those columns).
  """


def with_projection(tx, config) -> LowRankTransformation:
  """``tx`` as a :class:`LowRankTransformation` remembering ``config``."""
  out = LowRankTransformation(tx.init, tx.update)
  out.projection = config
  return out


class SubspaceOnlyTransformation(optax.GradientTransformationExtraArgs):
  """Marks an inner transform that acts on projected leaves only.

  Inside :func:`chain` such a transform is skipped for the leaves that pass
  through at full rank (the Natural-GaLore reference applies its Fisher
  transform to projected parameters only).
  """


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """Everything that defines a projection (static; see :func:`galore_project`).

  Attributes:
    rank, update_proj_gap, scale, proj_type, on_refresh: as in
      :func:`galore_project`.
    stagger, dimension_numbers, exclude, seed: as in :func:`galore_project`.
    projector: a :class:`~lowrank_optax.projectors.Projector` instance.
    refresh_offset: added to every leaf's refresh offset: leaves refresh at
      count 0 and where ``(count + offset) % update_proj_gap == 0``; ``1``
      gives DCT-AdamW's cadence ``t == 1 or t % T == 0`` (``t = count + 1``).
    fraction_of, fraction_rounding: how a float rank becomes a rank: a
      fraction of the smaller matrix dimension (``"min"``), of the reduced
      side's (``"reduced"``, FRUGAL's rule) or of ``M * N`` (``"numel"``),
      rounded half to even or down (``"floor"``); see
      :func:`~lowrank_optax.plan_leaves`.
    state_dtype: dtype of the low-rank gradient and of the inner state
      created from it (default: the parameter's).
    basis_dtype: dtype of stored bases (default: the parameter's).
  """

  rank: Any = 128
  update_proj_gap: int = 200
  scale: float = 1.0
  proj_type: str = "std"
  projector: projectors_lib.Projector = dataclasses.field(
      default_factory=projectors_lib.SubspaceIterationProjector)
  on_refresh: str = "keep"
  stagger: bool = False
  dimension_numbers: Any = None
  exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE
  seed: int = 0
  refresh_offset: int = 0
  fraction_of: str = "min"
  fraction_rounding: str = "half_even"
  state_dtype: Any = None
  basis_dtype: Any = None

  def __post_init__(self):
    if isinstance(self.projector, str):
      object.__setattr__(self, "projector",
                         projectors_lib.make(self.projector))
    if not isinstance(self.projector, projectors_lib.Projector):
      raise TypeError(f"projector must be a name in"
                      f" {projectors_lib.names()} or a"
                      f" lro.projectors.Projector instance, got"
                      f" {self.projector!r}.")
    if self.on_refresh not in ON_REFRESH:
      raise ValueError(f"Unknown on_refresh {self.on_refresh!r}; expected one"
                       f" of {ON_REFRESH}.")
    if self.on_refresh == "rotate" and not self.projector.supports_carry_over:
      raise ValueError(
          "on_refresh='rotate' moves the moments of the DCT columns kept"
          " across a refresh to their new slots; it needs projector='dct' (for"
          " a basis projector use 'keep' or 'reset'), got"
          f" projector={type(self.projector).__name__}.")

  def leaf_key(self, plan: policy_lib.LeafPlan) -> jax.Array:
    """The leaf's PRNG key: its projector's start at init; folded with the
    count for the sketches of each refresh."""
    return jax.random.fold_in(jax.random.key(self.seed), plan.index)

  def plans(self, params, allow_zero_rank=False, notes=None):
    return policy_lib.plan_leaves(params, self.rank, self.proj_type,
                                  self.dimension_numbers, self.exclude,
                                  allow_zero_rank, self.fraction_of,
                                  self.fraction_rounding, notes)


_CHAIN_HINT = (
    "Compose it with lro.chain instead of optax.chain, e.g.\n"
    "  lro.chain(lro.galore_project(128), optax.scale_by_adam(),"
    " optax.scale_by_learning_rate(1e-3))\n"
    "optax.chain initialises every element with full-shaped params, so it"
    " cannot give the inner transforms low-rank state.")


@dataclasses.dataclass(frozen=True)
class ProjectionElement:
  """What :func:`galore_project` returns: a chain element for :func:`chain`.

  It has ``init`` / ``update`` so that putting it into ``optax.chain`` by
  mistake fails at ``init`` with a message that names the fix, instead of
  silently allocating full-size state.
  """

  config: ProjectionConfig

  def init(self, params):
    raise TypeError("lro.galore_project(...) is a projection element, not a"
                    " stand-alone optax transform. " + _CHAIN_HINT)

  def update(self, updates, state, params=None, **extra_args):
    raise TypeError("lro.galore_project(...) cannot update on its own. "
                    + _CHAIN_HINT)


def on_params_mesh(state, params):
  """Places the state's unsharded leaves (counters) replicated on the params' mesh.

  Without it, scalar counters created by ``jnp.zeros`` by an eager ``init``
  are uncommitted single-device arrays while the rest of the state lives on
  the mesh, so the state's shardings change after the first jitted update and
  ``jax.jit(..., out_shardings=<init shardings>)`` fails. (Inside ``jax.jit``
  the outputs are placed by ``jit``; nothing to do.)
  """
  leaves = jax.tree.leaves(params)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return state
  shardings = [s for s in map(shd.leaf_sharding, leaves) if s is not None]
  shardings = [s for s in shardings
               if isinstance(s.mesh, jax.sharding.Mesh)]
  if not shardings:
    return state
  replicated = jax.sharding.NamedSharding(shardings[0].mesh,
                                          jax.sharding.PartitionSpec())

  def place(x):
    if isinstance(x, jax.core.Tracer) or shd.leaf_sharding(x) is not None:
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, state)


def subspace_state(opt_state) -> SubspaceState:
  """The :class:`SubspaceState` inside an optimizer state.

  Finds it through any wrapping (``lro.galore``'s ``optax.apply_if_finite``,
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...):
  for reading the step counter, the bases or the moments in a training
  loop.

  Args:
    opt_state: the state of an optimizer with exactly one subspace.

  Returns:
    The :class:`SubspaceState`.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> tx = lro.galore(1e-2, rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 6))})
    >>> lro.subspace_state(state).inner[0][0].mu.shape
    (8, 2)
  """
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SubspaceState))
           if isinstance(x, SubspaceState)]
  if len(found) != 1:
    hint = (" This optimizer has no projection (optax's own transforms,"
            " lro.frugal(mode='block') whose state is ActiveBlocksState, or"
            " a transform built without lro.chain / lro.subspace), so there"
            " is no per-leaf refresh state to read." if not found else
            " Several lro.chain / lro.subspace transforms are in the state:"
            " pass the part of the state that belongs to one of them.")
    raise ValueError(f"Expected one SubspaceState in the optimizer state,"
                     f" found {len(found)}.{hint}")
  return found[0]


def _refresh_offset(plan: policy_lib.LeafPlan, n_projected: int, gap: int,
                    stagger: bool) -> int:
  if not stagger or n_projected == 0:
    return 0
  return (plan.index * gap) // n_projected


def _refresh_leaf(config: ProjectionConfig, plan: policy_lib.LeafPlan, gm,
                  pstate, istate, count, n_projected):
  """Refreshes one leaf's basis if it refreshes at this count.

  One ``lax.cond`` per leaf, whose operands are that leaf's gradient and
  state only. A single cond over all leaves (tried: one predicate per step
  instead of one per leaf) makes every refresh wait for every gradient, so a
  training step can no longer apply a layer's update as soon as its gradient
  exists: at LLaMA-1B shapes it raised the compiled training step's temp
  from 2.36 GiB to 6.63 GiB (benchmarks/RESULTS.md).

  With ``on_refresh="rotate"`` the leaf's low-rank inner-state arrays are
  moved to the new subspace's coordinates in the same branch
  (the projector's ``carry_over``).

  Returns:
    ``(projector state, inner state, traced bool refresh flag)``.
  """
  projector = config.projector
  gap = config.update_proj_gap
  offset = (_refresh_offset(plan, n_projected, gap, config.stagger)
            + config.refresh_offset)
  scheduled = (count == 0) | ((count + offset) % gap == 0)
  refresh = projector.should_refresh(plan, pstate, count, scheduled)
  key = jax.random.fold_in(config.leaf_key(plan), count)
  rotate = config.on_refresh == "rotate"
  lowrank_shape = projector.lowrank_shape(plan)

  def do_refresh(operand):
    ps, ist = operand
    new = projector.refresh(plan, gm, ps, count == 0, key, count=count)
    if rotate:
      ist = jax.tree.map(
          lambda x: shd.like(projector.carry_over(plan, x, ps, new), x)
          if (x.shape == lowrank_shape
              and jnp.issubdtype(x.dtype, jnp.floating)) else x, ist)
    return new, ist

  pstate, rotated = jax.lax.cond(refresh, do_refresh, lambda op: op,
                                 (pstate, istate if rotate else None))
  return pstate, (rotated if rotate else istate), refresh


def _is_state_node(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


def reset_moments(fresh, state, lowrank_shape, where):
  """Resets the moment states inside an inner state, leaving the rest alone.

  A *moment state* is a ``NamedTuple`` node of the inner state with a
  ``count`` field and at least one array field of the low-rank gradient's
  shape (``optax.ScaleByAdamState``, ``ScaleByLionState``, ``TraceState``,
  :class:`~lowrank_optax.transforms.ScaleByAdamHFState`, ...): where
  ``where`` is true, all of its fields (moments and their counter) take their
  fresh values. Every other node keeps its value: the counters of schedules
  and ``optax.inject_hyperparams``, Fisher windows (whose arrays have another
  shape), and so on. Nodes without a ``count`` whose fields have the
  low-rank shape (``optax.TraceState``) are moment states too.

  Args:
    fresh: the inner state as ``init`` makes it.
    state: the current inner state (same structure).
    lowrank_shape: the shape of the low-rank gradient.
    where: traced bool.

  Returns:
    The inner state with its moment states reset where ``where``.
  """
  def is_moment_state(node):
    if not _is_state_node(node):
      return False
    direct = [getattr(node, f) for f in node._fields]
    return any(hasattr(v, "shape") and tuple(v.shape) == tuple(lowrank_shape)
               for v in direct)

  def walk(f, s):
    if is_moment_state(s):
      return jax.tree.map(
          lambda a, b: shd.like(jnp.where(where, a.astype(b.dtype), b), b),
          f, s)
    if _is_state_node(s):
      return type(s)(*(walk(a, b) for a, b in zip(f, s)))
    if isinstance(s, (tuple, list)):
      return type(s)(walk(a, b) for a, b in zip(f, s))
    if isinstance(s, dict):
      return {k: walk(f[k], s[k]) for k in s}
    return s

  return walk(fresh, state)


def keep_if_nonfinite(x, new, old, finite=None):
  """``new`` if every entry of ``x`` is finite, else ``old`` (one select each).

  The guard of :func:`subspace`: ``x`` is the leaf's gradient (an input of
  the step, so its reduction does not wait for anything the step computes),
  ``new`` / ``old`` the leaf's state after / before the step. The select
  fuses into the producers of ``new``; a state without arrays needs no
  check.

  Args:
    x: the array whose finiteness decides.
    new: the pytree to return if ``x`` is all finite.
    old: a pytree of the same structure, shapes and dtypes, returned
      otherwise.
    finite: ``jnp.all(jnp.isfinite(x))`` if the caller has it already.

  Returns:
    ``new`` or ``old``, leaf by leaf (with ``old``'s sharding).

  Example:
    >>> import jax.numpy as jnp
    >>> from lowrank_optax.subspace import keep_if_nonfinite as keep
    >>> old, new = jnp.zeros(2), jnp.ones(2)
    >>> keep(jnp.array([1.0, jnp.nan]), new, old)
    Array([0., 0.], dtype=float32)
    >>> keep(jnp.array([1.0, 2.0]), new, old)
    Array([1., 1.], dtype=float32)
  """
  if not jax.tree.leaves(old):
    return new
  ok = jnp.all(jnp.isfinite(x)) if finite is None else finite
  return jax.tree.map(lambda a, b: shd.like(jnp.where(ok, a, b), b), new, old)


def _check_leaf_dtype(path: str, dtype, projected: bool, what: str) -> None:
  """Integer / bool leaves (and complex projected ones) fail with a message."""
  if jnp.issubdtype(dtype, jnp.floating) or (
      not projected and jnp.issubdtype(dtype, jnp.complexfloating)):
    return
  name = jnp.dtype(dtype).name
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        f"The {what} leaf {path!r} has dtype {name}: complex leaves cannot be"
        " projected to low rank. Give it the rank None in a dict rank policy"
        " (e.g. rank={" + repr(path) + ": None, '.*': 128}) to update it at"
        " full rank.")
  raise TypeError(
      f"The {what} leaf {path!r} has dtype {name}: lowrank_optax updates"
      " floating-point leaves only. Keep integer and bool leaves (step"
      " counters, masks) out of the optimizer: filter them"
      " (nnx.Optimizer(..., wrt=nnx.Param), eqx.is_inexact_array) or freeze"
      " them with optax.partition({'train': tx, 'frozen':"
      " optax.set_to_zero()}, labels).")


def _raise_if_shapes_changed(err, path, g, plan, pstate, istate):
  """Re-raises a failed leaf update with its cause when the gradient's shape
  is not the one the leaf's state was made for (a changed or transposed
  parameter between ``init`` and ``update``)."""
  have = [tuple(x.shape) for x in jax.tree.leaves((pstate, istate))]
  if plan is None:
    fits = all(len(s) != g.ndim or s == tuple(g.shape) for s in have)
    want = tuple(g.shape)
  else:
    want = plan.lowrank_shape
    fits = any(s == tuple(want) for s in have) or not have
  if fits:
    return
  raise ValueError(
      f"Leaf {path!r}: the gradient has shape {tuple(g.shape)}, but the"
      f" optimizer state of this leaf holds arrays of shapes {sorted(set(have))}"
      f" (a gradient of this shape needs {want}). The params given to init and"
      " the gradients given to update must have the same shapes: was the"
      " parameter resized or transposed after init? Re-run init (or restore"
      " a state made for these shapes).") from err


def _needs_params_hint(err: Exception) -> bool:
  msg = str(err)
  return "params" in msg or "parameters" in msg


def _check_inner_runs(inner, istate, proxy, path, where):
  """Traces ``inner.update`` abstractly once at ``init`` with ``params=None``.

  A transform that cannot run there (one that needs params, such as weight
  decay) fails here, at ``init``, with a message that says where it belongs,
  instead of at the first update deep inside the jitted step.
  """
  try:
    jax.eval_shape(lambda s, g: inner.update(g, s, None), istate, proxy)
  except Exception as e:  # pylint: disable=broad-except
    hint = ""
    if _needs_params_hint(e):
      hint = ("\nTransforms inside the subspace get params=None (the"
              " low-rank gradient has another shape than the param). Put"
              " transforms that need params (optax.add_decayed_weights,"
              " lro.decay_updated_weights, ...) after the closer:\n"
              "  lro.chain(lro.galore_project(r), optax.scale_by_adam(),"
              " lro.back_project(), optax.add_decayed_weights(wd),"
              " optax.scale_by_learning_rate(lr))")
    raise ValueError(
        f"The transform that runs {where} failed on leaf {path!r} (a"
        f" gradient of shape {tuple(proxy.shape)}, {proxy.dtype}) with"
        f" params=None: {type(e).__name__}: {e}{hint}") from e


def subspace(
    inner: optax.GradientTransformation,
    config: ProjectionConfig,
    residual: Optional[residual_lib.Closer] = None,
    full_rank_inner: Optional[optax.GradientTransformation] = None,
    map_back: Optional[residual_lib.Closer] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` in a low-rank subspace of every projected leaf.

  For a projected leaf with gradient matrix ``G`` (after the leaf's matrix
  view, ``(*batch, M, N)``) and basis ``Q`` of the reduced side:

  .. math::
    R = \mathrm{down}(G), \quad N = \mathrm{inner}(R), \quad
    U = \alpha\,\mathrm{up}(N) + \mathrm{residual}(G - \mathrm{up}(R))

  where ``alpha`` is ``config.scale``, ``alpha up(N)`` is the default
  ``map_back`` term (:func:`back_project`; APOLLO replaces it) and the
  residual term is zero unless a residual rule is given. The basis is
  recomputed from the current gradient at count 0 and whenever ``(count +
  offset) % update_proj_gap == 0`` (``offset`` is 0, or spread over the
  period with ``stagger=True``; an adaptive projector decides itself), inside
  the jitted update via ``lax.cond``. At a refresh, ``on_refresh='keep'``
  (GaLore) leaves the inner state as it is; ``'reset'`` (FRUGAL) resets its
  moment states: every ``NamedTuple`` node with a ``count`` and an array of
  the low-rank shape (Adam's ``mu``, ``nu`` and ``count``; Lion's; a trace)
  takes its initial value, while other inner state (schedule counters,
  ``inject_hyperparams``, a Fisher window) is kept (:func:`reset_moments`);
  ``'rotate'`` (projectors with ``carry_over``, e.g. ``dct``) moves the
  low-rank arrays to the new subspace's coordinates. Leaves that are not
  projected run ``full_rank_inner`` (default ``inner``) on their full
  gradient, unscaled.

  The inner transform runs per leaf (each leaf has its own inner state, so a
  leaf's moments can be reset at its own refresh) with ``params=None``; it
  is initialised from low-rank zero arrays of the leaf's dtype (or
  ``config.state_dtype``) placed with the sharding derived from the param's.
  Updates come out in the param's dtype when ``params`` are given (as
  ``optax``'s do), else in the gradient's.

  Non-finite gradients, per leaf (what the bare transform does; the recipes
  also zero such a leaf's update or skip the whole step, see
  :func:`~lowrank_optax.skip_nonfinite_steps`): a leaf whose gradient ``G``
  is not all finite keeps its projector, inner and closer state (moments,
  counters, limiters) as they were before the step
  (:func:`keep_if_nonfinite`: one reduction over ``G`` and a select that
  fuses into the state update). The check reads ``G``, not ``R``: a
  reduction over ``R`` (which a down-projection produces inside the step)
  kept every leaf's new state alive beside its old one, which at LLaMA-1B
  shapes raised the compiled optimizer step's temp from 4.5 to 7.8 GiB
  (benchmarks/RESULTS.md). An
  ``R`` that overflows from a finite ``G`` (entries near the dtype's
  maximum) is not caught by this check. A refresh on a non-finite
  gradient keeps the previous basis
  (:meth:`~lowrank_optax.projectors.Projector.refresh`; the random
  projectors, which do not read ``G``, redraw as scheduled), so a leaf whose
  very first gradient is not finite keeps its placeholder start (a fixed
  orthonormal basis) until its next scheduled refresh. The leaf's *update*
  is not finite (a projected leaf's is NaN even where ``R`` happened to
  read only finite entries): the failure stays visible, as
  with any optax transform, and the next finite step continues from the
  kept state. Other leaves are not affected. Integer and bool leaves raise
  a ``TypeError`` at ``init`` that names the leaf (filter or freeze them);
  empty trees and ``None`` leaves are accepted.

  Args:
    inner: the transform run in the subspace (gets ``params=None``).
    config: the projection (see :func:`galore_project`).
    residual: a residual closer (``E = G - up(down(G))``); ``None`` drops it.
    full_rank_inner: the transform for pass-through leaves.
    map_back: the closer that maps the subspace result back; ``None`` is
      ``alpha * up(N)``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`SubspaceState`.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.subspace(optax.scale_by_adam(),
    ...                   lro.ProjectionConfig(rank=2, update_proj_gap=10))
    >>> params = {"w": jnp.ones((8, 6)), "b": jnp.ones((6,))}
    >>> state = tx.init(params)
    >>> state.inner[1].mu.shape  # "w" (in 8, out 6): the smaller axis, 6 -> 2
    (8, 2)
  """
  inner = optax.with_extra_args_support(inner)
  full_rank_inner = optax.with_extra_args_support(
      inner if full_rank_inner is None else full_rank_inner)
  if residual is None:
    residual = residual_lib.DROP
  if map_back is None:
    map_back = residual_lib.BACK_PROJECTION
  for closer, role in ((residual, "residual"), (map_back, "map_back")):
    if closer.role != role:
      raise ValueError(f"{type(closer).__name__} is a {closer.role!r} closer,"
                       f" not a {role!r} one.")
  allow_zero = residual is not residual_lib.DROP
  projector = config.projector

  def _plans(tree, notes=None):
    plans = config.plans(tree, allow_zero_rank=allow_zero, notes=notes)
    leaves = jax.tree.leaves(tree)
    plans = [None if p is None else p.with_sharding(shd.for_leaf(p, x))
             for p, x in zip(plans, leaves)]
    return plans, sum(p is not None for p in plans)

  def _lowrank_zeros(plan, dtype):
    dtype = config.state_dtype or dtype
    return shd.zeros(projector.lowrank_shape(plan), dtype,
                     projector.lowrank_sharding(plan))

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    paths = [policy_lib.path_to_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    notes = []
    plans, _ = _plans(params, notes)
    for note in notes:
      warnings.warn(note, policy_lib.PolicyWarning, stacklevel=3)
    proj_states, inner_states, res_states = [], [], []
    checked = set()
    for leaf, plan, path in zip(leaves, plans, paths):
      _check_leaf_dtype(path, leaf.dtype, plan is not None, "parameter")
      if plan is None:
        zeros = shd.zeros(leaf.shape, leaf.dtype, shd.leaf_sharding(leaf))
        state = full_rank_inner.init(zeros)
        if "full" not in checked:
          _check_inner_runs(full_rank_inner, state, zeros, path,
                            "at full rank on pass-through leaves")
          checked.add("full")
        inner_states.append(state)
        proj_states.append(optax.MaskedNode())
        res_states.append(optax.MaskedNode())
        continue
      res_states.append((map_back.init(plan, leaf.dtype),
                         residual.init(plan, leaf.dtype)))
      if plan.rank == 0:  # the whole gradient is residual: no subspace state
        proj_states.append(optax.MaskedNode())
        inner_states.append(optax.MaskedNode())
        continue
      zeros = _lowrank_zeros(plan, leaf.dtype)
      state = inner.init(zeros)
      if "lowrank" not in checked:
        _check_inner_runs(inner, state, zeros, path, "in the subspace")
        checked.add("lowrank")
      inner_states.append(state)
      proj_states.append(projector.init(
          plan, config.basis_dtype or leaf.dtype, config.leaf_key(plan)))
    del treedef
    return on_params_mesh(
        SubspaceState(count=jnp.zeros([], jnp.int32),
                      refreshed=jnp.zeros([], jnp.int32),
                      projector=tuple(proj_states),
                      inner=tuple(inner_states),
                      residual=tuple(res_states)), params)

  def update_fn(updates, state, params=None, **extra_args):
    leaves, treedef = jax.tree.flatten(updates)
    out_dtypes = ([p.dtype for p in jax.tree.leaves(params)]
                  if params is not None else [g.dtype for g in leaves])
    plans, n_projected = _plans(updates)
    if len(leaves) != len(state.inner):
      raise ValueError(
          f"The updates have {len(leaves)} leaves but the state was"
          f" initialised for {len(state.inner)}.")
    count = state.count
    new_leaves, new_proj, new_inner, new_res = [], [], [], []
    refreshes = []
    def update_leaf(g, plan, pstate, istate, rstate, dtype):
      """One leaf: ``(update, projector, inner, closer state, refresh flag)``."""
      if plan is None:
        u, new_istate = full_rank_inner.update(g, istate, None, **extra_args)
        istate = keep_if_nonfinite(g, new_istate, istate)
        return u.astype(dtype), pstate, istate, rstate, None

      gm = plan.to_matrix(g)
      mb_state, res_state = rstate
      if plan.rank == 0:
        ctx = residual_lib.CloseContext(plan, gm, None, None, None,
                                        config.scale)
        term, new_res_state = residual.apply(ctx, res_state)
        res_state = keep_if_nonfinite(gm, new_res_state, res_state)
        u = shd.like(plan.from_matrix(term.astype(dtype)), g)
        return u, pstate, istate, (mb_state, res_state), None

      before = (istate, rstate)  # kept if this step's R is not finite
      pstate, istate, refresh = _refresh_leaf(config, plan, gm, pstate,
                                              istate, count, n_projected)
      if config.on_refresh == "reset":
        fresh = inner.init(_lowrank_zeros(plan, g.dtype))
        istate = reset_moments(fresh, istate, projector.lowrank_shape(plan),
                               refresh)

      r = projector.down(plan, gm, pstate)
      if config.state_dtype is not None:
        r = r.astype(config.state_dtype)
      n, istate = inner.update(r, istate, None, **extra_args)
      ps = pstate
      ctx = residual_lib.CloseContext(
          plan, gm, r, n, lambda x: projector.up(plan, x, ps), config.scale)
      upd = None
      new_cstates = []
      for closer, cstate in ((map_back, mb_state), (residual, res_state)):
        term, cstate = closer.apply(ctx, cstate)
        new_cstates.append(cstate)
        if term is not None:
          upd = term if upd is None else upd + term
      if upd is None:  # every term dropped (e.g. a map-back of zero)
        upd = jnp.zeros_like(gm)
      # A gradient with a NaN / Inf outside what R reads (coordinate
      # projectors) must not give a finite update from kept state: the
      # update is made non-finite too, for the recipes' skip to drop.
      finite = jnp.all(jnp.isfinite(gm))
      upd = jnp.where(finite, upd, jnp.nan)
      u = shd.like(plan.from_matrix(upd.astype(dtype)), g)
      (new_pstate, istate, cstates) = keep_if_nonfinite(
          gm, (projector.advance(plan, gm, pstate, count), istate,
              tuple(new_cstates)), (pstate,) + before, finite=finite)
      return u, new_pstate, istate, cstates, refresh

    paths = None
    for i, (g, plan, pstate, istate, rstate, dtype) in enumerate(zip(
        leaves, plans, state.projector, state.inner, state.residual,
        out_dtypes)):
      if not jnp.issubdtype(g.dtype, jnp.inexact):  # int, bool, float0
        _check_leaf_dtype(policy_lib.path_to_str(
            jax.tree_util.tree_flatten_with_path(updates)[0][i][0]),
                          g.dtype, plan is not None, "gradient")
      try:
        u, pstate, istate, rstate, refresh = update_leaf(
            g, plan, pstate, istate, rstate, dtype)
      except Exception as e:  # pylint: disable=broad-except
        if paths is None:
          paths = [policy_lib.path_to_str(k) for k, _ in
                   jax.tree_util.tree_flatten_with_path(updates)[0]]
        _raise_if_shapes_changed(e, paths[i], g, plan, state.projector[i],
                                 state.inner[i])
        raise
      if refresh is not None:
        refreshes.append(refresh)
      new_leaves.append(u)
      new_proj.append(pstate)
      new_inner.append(istate)
      new_res.append(rstate)

    new_state = SubspaceState(
        count=numerics.safe_int32_increment(count),
        refreshed=(sum(r.astype(jnp.int32) for r in refreshes) if refreshes
                   else jnp.zeros([], jnp.int32)),
        projector=tuple(new_proj), inner=tuple(new_inner),
        residual=tuple(new_res))
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return with_projection(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), config)


def galore_project(
    rank: Any = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    projector: str = "subspace_iteration",
    on_refresh: str = "keep",
    stagger: bool = False,
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    subspace_iters: int = 1,
    subspace_init_iters: int = 4,
    dct_score: str = "l1",
    state_dtype: Any = None,
    basis_dtype: Any = None,
) -> ProjectionElement:
  r"""The GaLore projection element: gradients into a refreshed low-rank subspace.

  Used as the first element of :func:`chain`; the elements after it, up to a
  closer (:func:`back_project`, :func:`~lowrank_optax.sign_residual`,
  :func:`~lowrank_optax.sgd_residual`) or the end of the chain, run on the
  low-rank gradient

  .. math::
    R_t = Q_t^\top G_t \ (\text{input side}) \quad\text{or}\quad
    R_t = G_t Q_t \ (\text{output side}),

  and their result ``N_t`` is mapped back as ``alpha * Q_t N_t`` (or
  ``alpha * N_t Q_t^T``). ``Q_t`` is recomputed from ``G_t`` at 0-based steps
  ``0, T, 2T, ...`` (``T = update_proj_gap``), before projecting ``G_t``.

  Args:
    rank: rank policy: an int, a float fraction of the smaller matrix
      dimension, a dict ``{path_regex: rank | None}``, or a callable
      ``(path, leaf) -> rank | None`` (see :func:`~lowrank_optax.policy.plan_leaves`).
    update_proj_gap: refresh interval ``T`` (steps).
    scale: ``alpha``, multiplies the mapped-back subspace direction only.
    proj_type: ``std`` (reduce the smaller dimension; the reference default),
      ``reverse_std``, ``right`` (reduce inputs), ``left`` (reduce outputs),
      ``full`` (two-sided). Sides keep PyTorch's meaning on Flax arrays.
    projector: a registered name — ``subspace_iteration`` (default:
      warm-started, matmuls only), ``svd`` (the reference), ``eigh``,
      ``randomized``, ``dct`` (SVD-free selection of DCT columns; the state
      is ``r`` indices per matrix, no basis), ... (``lro.projectors.names()``)
      — or a :class:`~lowrank_optax.projectors.Projector` instance, e.g. one
      of your own (see :mod:`lowrank_optax.projectors`).
    on_refresh: ``keep`` the inner state at a refresh (GaLore), ``reset``
      it (FRUGAL), or ``rotate`` it (``projector="dct"`` only: the moments of
      DCT columns selected before and after the refresh move to their new
      slots, newly selected columns start at 0; the reference DCT-AdamW's
      ``rotate_subspace``).
    stagger: spread the leaves' refreshes evenly over the period, so that no
      single step pays for all of them (the first step still refreshes all).
    dimension_numbers: matrix views (:class:`~lowrank_optax.MatrixView`, a
      dict of path regexes to views, or a callable); default: a 2-D leaf is
      ``(in, out)``, higher-rank leaves use their last two axes with the
      leading ones as batch axes.
    exclude: regex of paths that int / fraction policies never project.
    seed: seed of the random starts and sketches of the projectors.
    subspace_iters: iterations per warm refresh of ``subspace_iteration``.
    subspace_init_iters: iterations of its first (cold) refresh.
    dct_score: column score of the ``dct`` projector: ``"l1"`` (the
      reference's ``ell_norm=1``) or ``"l2"``.
    state_dtype: dtype of the low-rank gradient and the inner state (e.g.
      ``jnp.float32`` moments for ``bfloat16`` params); default: the param's.
    basis_dtype: dtype of stored bases; default: the param's (as the
      reference). Decompositions always run in float32.

  Returns:
    A :class:`ProjectionElement` for :func:`chain`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(4, update_proj_gap=50),
    ...                optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.ones((16, 32))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((16, 32))}, state)
    >>> updates["w"].shape
    (16, 32)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024;
    official code: https://github.com/jiaweizzhao/GaLore
  """
  policy_lib.check_rank_spec(rank, allow_zero=True)
  policy_lib.check_proj_type(proj_type)
  policy_lib.check_view_spec(dimension_numbers, exclude)
  # Numeric arguments may arrive as (traced) arrays under
  # optax.inject_hyperparams; Python values are validated here.
  if isinstance(update_proj_gap, bool) or (
      isinstance(update_proj_gap, numbers.Number)
      and (update_proj_gap != int(update_proj_gap) or update_proj_gap < 1)):
    raise ValueError(f"update_proj_gap must be a positive int, got"
                     f" {update_proj_gap!r}.")
  proj = projectors_lib.make(projector, iters=subspace_iters,
                             init_iters=subspace_init_iters, score=dct_score,
                             update_proj_gap=update_proj_gap)
  return ProjectionElement(ProjectionConfig(
      rank=rank, update_proj_gap=update_proj_gap, scale=scale,
      proj_type=proj_type, projector=proj, on_refresh=on_refresh,
      stagger=stagger, dimension_numbers=dimension_numbers, exclude=exclude,
      seed=seed, state_dtype=state_dtype, basis_dtype=basis_dtype))


def back_project() -> residual_lib.ResidualElement:
  """Closes the subspace in :func:`chain`, dropping the residual (GaLore).

  Elements after it run in full space on the mapped-back update (use it
  before transforms that need params, such as weight decay).

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(64), optax.scale_by_adam(),
    ...                lro.back_project(), optax.add_decayed_weights(1e-2),
    ...                optax.scale_by_learning_rate(1e-3))
  """
  return residual_lib.ResidualElement(residual_lib.BACK_PROJECTION)


def chain(*elements) -> optax.GradientTransformationExtraArgs:
  """``optax.chain`` that understands projection elements.

  ``chain(pre..., projection, inner..., closers, post...)``: ``pre`` and
  ``post`` run in full space, ``inner`` in the subspace of every projected
  leaf (and at full rank, unscaled, on the others, skipping transforms marked
  :class:`SubspaceOnlyTransformation`). ``closers`` are one or two adjacent
  closer elements: at most one that maps the subspace result back
  (:func:`back_project`, the default; APOLLO's scaling replaces it) and at
  most one residual rule (:func:`~lowrank_optax.sign_residual`, ...); the
  leaf's update is the sum of their terms. Without a closer the subspace
  extends to the end of the chain. Without a projection element this is
  ``optax.chain``.

  Args:
    *elements: optax transforms, at most one projection element
      (:func:`galore_project`) and the closers after it.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(128), optax.scale_by_adam(),
    ...                lro.sign_residual(), optax.scale_by_learning_rate(1e-3))
  """
  proj_idx = [i for i, e in enumerate(elements)
              if isinstance(e, ProjectionElement)]
  close_idx = [i for i, e in enumerate(elements)
               if isinstance(e, residual_lib.ResidualElement)]
  if len(proj_idx) > 1:
    raise ValueError("lro.chain takes at most one projection element, got"
                     f" {len(proj_idx)}.")
  if not proj_idx:
    if close_idx:
      raise ValueError("A residual / back_project element needs a projection"
                       " element (e.g. lro.galore_project) before it.")
    return optax.chain(*elements)
  p = proj_idx[0]
  if close_idx and close_idx[0] < p:
    raise ValueError("The closer must come after the projection element.")
  if close_idx and close_idx != list(range(close_idx[0],
                                           close_idx[0] + len(close_idx))):
    raise ValueError("The closers (back_project / *_residual / ...) of"
                     " lro.chain must be adjacent.")
  closers = {"map_back": [], "residual": []}
  for i in close_idx:
    closers[elements[i].rule.role].append(elements[i].rule)
  for role, found in closers.items():
    if len(found) > 1:
      raise ValueError(f"lro.chain takes at most one {role} closer, got"
                       f" {len(found)}: {found}.")
  c = close_idx[0] if close_idx else len(elements)
  end = close_idx[-1] + 1 if close_idx else len(elements)
  inner_elems = elements[p + 1:c]
  inner = optax.chain(*inner_elems) if inner_elems else optax.identity()
  full_elems = [e for e in inner_elems
                if not isinstance(e, SubspaceOnlyTransformation)]
  full = optax.chain(*full_elems) if full_elems else optax.identity()
  wrapped = subspace(inner, elements[p].config,
                     residual=(closers["residual"] or [None])[0],
                     full_rank_inner=full,
                     map_back=(closers["map_back"] or [None])[0])
  chained = optax.chain(*elements[:p], wrapped, *elements[end:])
  # The counters of the full-space elements (pre / post) go on the mesh too.
  return with_projection(optax.GradientTransformationExtraArgs(
      lambda params: on_params_mesh(chained.init(params), params),
      chained.update), elements[p].config)
