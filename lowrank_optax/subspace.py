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
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import residual as residual_lib

__all__ = [
    "SubspaceState",
    "ProjectionConfig",
    "ProjectionElement",
    "SubspaceOnlyTransformation",
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
    residual: one entry per leaf: the residual rule's state, or
      ``optax.MaskedNode()``.
  """

  count: jax.Array
  projector: tuple
  inner: tuple
  residual: tuple


class SubspaceOnlyTransformation(optax.GradientTransformationExtraArgs):
  """Marks an inner transform that acts on projected leaves only.

  Inside :func:`chain` such a transform is skipped for the leaves that pass
  through at full rank (the Natural-GaLore reference applies its Fisher
  transform to projected parameters only).
  """


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """Everything that defines a projection (static; see :func:`galore_project`)."""

  rank: Any = 128
  update_proj_gap: int = 200
  scale: float = 1.0
  proj_type: str = "std"
  projector: projectors_lib.Projector = projectors_lib.Projector()
  on_refresh: str = "keep"
  stagger: bool = False
  dimension_numbers: Any = None
  exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE
  seed: int = 0

  def __post_init__(self):
    if self.on_refresh not in ON_REFRESH:
      raise ValueError(f"Unknown on_refresh {self.on_refresh!r}; expected one"
                       f" of {ON_REFRESH}.")
    if self.on_refresh == "rotate" and self.projector.method != "dct":
      raise ValueError(
          "on_refresh='rotate' moves the moments of the DCT columns kept"
          " across a refresh to their new slots; it needs projector='dct' (for"
          " a basis projector use 'keep' or 'reset'), got"
          f" projector={self.projector.method!r}.")

  def leaf_key(self, plan: policy_lib.LeafPlan) -> jax.Array:
    """The leaf's PRNG key: its projector's start at init; folded with the
    count for the sketches of each refresh."""
    return jax.random.fold_in(jax.random.key(self.seed), plan.index)

  def plans(self, params, allow_zero_rank=False):
    return policy_lib.plan_leaves(params, self.rank, self.proj_type,
                                  self.dimension_numbers, self.exclude,
                                  allow_zero_rank)


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


def _sharding_of(x):
  try:
    s = getattr(x, "sharding", None)
  except Exception:  # tracers without a concrete sharding
    return None
  return s if isinstance(s, jax.sharding.NamedSharding) else None


def _on_params_mesh(state, params):
  """Places the state's unsharded leaves (counters) replicated on the params' mesh.

  Without it, scalar counters created by ``jnp.zeros`` are uncommitted
  single-device arrays while the rest of the state lives on the mesh, so the
  state's shardings change after the first jitted update and ``jax.jit(...,
  out_shardings=<init shardings>)`` fails.
  """
  shardings = [s for s in map(_sharding_of, jax.tree.leaves(params))
               if s is not None]
  if not shardings:
    return state
  replicated = jax.sharding.NamedSharding(shardings[0].mesh,
                                          jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda x: x if _sharding_of(x) is not None
      else jax.device_put(x, replicated), state)


def _spec_entry(spec, axes):
  """Mesh axes for a merged group of array axes (first axis's, if alone)."""
  entries = [spec[a] for a in axes]
  if all(e is None for e in entries[1:]):
    return entries[0]
  return None


def _lowrank_shardings(plan: policy_lib.LeafPlan, sharding):
  """Shardings of the low-rank gradient and the bases, from the param's.

  A param sharded ``P(a, b)`` over ``(M, N)`` gives ``P(a, None)`` for an
  ``(M, r)`` array and ``P(None, b)`` for an ``(r, N)`` array.
  """
  if sharding is None:
    return None, {}
  P = jax.sharding.PartitionSpec
  spec = tuple(sharding.spec) + (None,) * (len(plan.shape) - len(sharding.spec))
  batch = tuple(spec[a] for a in plan.batch_axes)
  rows = _spec_entry(spec, plan.reduction_axes)
  cols = _spec_entry(spec, plan.output_axes)
  mk = lambda *s: jax.sharding.NamedSharding(sharding.mesh, P(*batch, *s))
  # DCT projectors store (*batch, r) indices, replicated over the matrix.
  indices = {"indices": mk(None), "row_indices": mk(None),
             "col_indices": mk(None)}
  if plan.side == "reduction":
    return mk(None, cols), {"basis": mk(rows, None), **indices}
  if plan.side == "output":
    return mk(rows, None), {"basis": mk(cols, None), **indices}
  return mk(None, None), {"row_basis": mk(rows, None),
                          "col_basis": mk(cols, None), **indices}


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
  moved to the new selection's slots in the same branch
  (:meth:`~lowrank_optax.Projector.carry_over`).

  Returns:
    ``(projector state, inner state, traced bool refresh flag)``.
  """
  gap = config.update_proj_gap
  offset = _refresh_offset(plan, n_projected, gap, config.stagger)
  refresh = (count == 0) | ((count + offset) % gap == 0)
  key = jax.random.fold_in(config.leaf_key(plan), count)
  rotate = config.on_refresh == "rotate"

  def do_refresh(operand):
    ps, ist = operand
    new = config.projector.refresh(plan, gm, ps, count == 0, key)
    if rotate:
      ist = jax.tree.map(
          lambda x: config.projector.carry_over(plan, x, ps, new)
          if (x.shape == plan.lowrank_shape
              and jnp.issubdtype(x.dtype, jnp.floating)) else x, ist)
    return new, ist

  pstate, rotated = jax.lax.cond(refresh, do_refresh, lambda op: op,
                                 (pstate, istate if rotate else None))
  return pstate, (rotated if rotate else istate), refresh


def subspace(
    inner: optax.GradientTransformation,
    config: ProjectionConfig,
    residual: Optional[residual_lib.ResidualRule] = None,
    full_rank_inner: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` in a low-rank subspace of every projected leaf.

  For a projected leaf with gradient matrix ``G`` (after the leaf's matrix
  view, ``(*batch, M, N)``) and basis ``Q`` of the reduced side:

  .. math::
    R = \mathrm{down}(G), \quad N = \mathrm{inner}(R), \quad
    U = \alpha\,\mathrm{up}(N) + \mathrm{residual}(G - \mathrm{up}(R))

  where ``alpha`` is ``config.scale`` and the residual term is zero unless a
  residual rule is given. The basis is recomputed from the current gradient
  at count 0 and whenever ``(count + offset) % update_proj_gap == 0``
  (``offset`` is 0, or spread over the period with ``stagger=True``), inside
  the jitted update via ``lax.cond``. With ``on_refresh='reset'`` the leaf's
  inner state is re-initialised at each of its refreshes (FRUGAL); with
  ``'keep'`` (GaLore) it is left as it is; with ``'rotate'`` (DCT projector
  only) its low-rank arrays follow the selected DCT columns to their new
  slots. Leaves that are not projected run
  ``full_rank_inner`` (default ``inner``) on their full gradient, unscaled.

  Args:
    inner: the transform run in the subspace (gets ``params=None``).
    config: the projection (see :func:`galore_project`).
    residual: what to do with ``G - up(down(G))``; ``None`` drops it.
    full_rank_inner: the transform for pass-through leaves.

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
  allow_zero = residual is not None
  if residual is None:
    residual = residual_lib.DROP

  def _plans(params):
    plans = config.plans(params, allow_zero_rank=allow_zero)
    return plans, sum(p is not None for p in plans)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plans, _ = _plans(params)
    proj_states, inner_states, res_states = [], [], []
    for leaf, plan in zip(leaves, plans):
      sharding = _sharding_of(leaf)
      if plan is None:
        proxy = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        inner_states.append(full_rank_inner.init(proxy))
        proj_states.append(optax.MaskedNode())
        res_states.append(optax.MaskedNode())
        continue
      res_states.append(residual.init(plan, leaf.dtype))
      if plan.rank == 0:  # the whole gradient is residual: no subspace state
        proj_states.append(optax.MaskedNode())
        inner_states.append(optax.MaskedNode())
        continue
      r_sharding, basis_shardings = _lowrank_shardings(plan, sharding)
      proxy = jax.ShapeDtypeStruct(plan.lowrank_shape, leaf.dtype,
                                   sharding=r_sharding)
      inner_states.append(inner.init(proxy))
      proj_states.append(config.projector.init(
          plan, leaf.dtype, basis_shardings,
          key=config.leaf_key(plan)))
    return _on_params_mesh(
        SubspaceState(count=jnp.zeros([], jnp.int32),
                      projector=tuple(proj_states),
                      inner=tuple(inner_states),
                      residual=tuple(res_states)), params)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transforms get params=None (shapes differ)
    leaves, treedef = jax.tree.flatten(updates)
    plans, n_projected = _plans(updates)
    if len(leaves) != len(state.inner):
      raise ValueError(
          f"The updates have {len(leaves)} leaves but the state was"
          f" initialised for {len(state.inner)}.")
    count = state.count
    new_leaves, new_proj, new_inner, new_res = [], [], [], []
    for g, plan, pstate, istate, rstate in zip(
        leaves, plans, state.projector, state.inner, state.residual):
      if plan is None:
        u, istate = full_rank_inner.update(g, istate, None, **extra_args)
        new_leaves.append(u)
        new_proj.append(pstate)
        new_inner.append(istate)
        new_res.append(rstate)
        continue

      gm = plan.to_matrix(g)
      if plan.rank == 0:
        upd, rstate = residual.apply(plan, gm, None, None, rstate)
        new_leaves.append(plan.from_matrix(upd.astype(g.dtype)))
        new_proj.append(pstate)
        new_inner.append(istate)
        new_res.append(rstate)
        continue

      pstate, istate, refresh = _refresh_leaf(config, plan, gm, pstate,
                                              istate, count, n_projected)
      if config.on_refresh == "reset":
        r_sharding, _ = _lowrank_shardings(plan, _sharding_of(g))
        fresh = inner.init(jax.ShapeDtypeStruct(plan.lowrank_shape, g.dtype,
                                                sharding=r_sharding))
        istate = jax.tree.map(lambda f, s: jnp.where(refresh, f, s),
                              fresh, istate)

      r = config.projector.down(plan, gm, pstate)
      n, istate = inner.update(r, istate, None, **extra_args)
      upd = config.projector.up(plan, n, pstate)
      if not (isinstance(config.scale, numbers.Real) and config.scale == 1.0):
        upd = config.scale * upd
      upd, rstate = residual.apply(
          plan, gm, lambda: config.projector.up(plan, r, pstate), upd, rstate)
      new_leaves.append(plan.from_matrix(upd.astype(g.dtype)))
      new_proj.append(pstate)
      new_inner.append(istate)
      new_res.append(rstate)

    new_state = SubspaceState(
        count=numerics.safe_int32_increment(count),
        projector=tuple(new_proj), inner=tuple(new_inner),
        residual=tuple(new_res))
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    projector: ``subspace_iteration`` (default: warm-started, matmuls
      only), ``svd`` (the reference), ``eigh``, ``randomized``, or ``dct``
      (SVD-free selection of DCT columns; the state is ``r`` indices per
      matrix, no basis) (see :mod:`lowrank_optax.projectors`).
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
  # Numeric arguments may arrive as (traced) arrays under
  # optax.inject_hyperparams; Python values are validated here.
  if isinstance(update_proj_gap, bool) or (
      isinstance(update_proj_gap, numbers.Number)
      and (update_proj_gap != int(update_proj_gap) or update_proj_gap < 1)):
    raise ValueError(f"update_proj_gap must be a positive int, got"
                     f" {update_proj_gap!r}.")
  proj = projectors_lib.Projector(method=projector, iters=subspace_iters,
                                  init_iters=subspace_init_iters,
                                  dct_score=dct_score)
  return ProjectionElement(ProjectionConfig(
      rank=rank, update_proj_gap=update_proj_gap, scale=scale,
      proj_type=proj_type, projector=proj, on_refresh=on_refresh,
      stagger=stagger, dimension_numbers=dimension_numbers, exclude=exclude,
      seed=seed))


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
  return residual_lib.ResidualElement(None)


def chain(*elements) -> optax.GradientTransformationExtraArgs:
  """``optax.chain`` that understands projection elements.

  ``chain(pre..., projection, inner..., closer, post...)``: ``pre`` and
  ``post`` run in full space, ``inner`` in the subspace of every projected
  leaf (and at full rank, unscaled, on the others, skipping transforms marked
  :class:`SubspaceOnlyTransformation`). Without a closer the subspace extends
  to the end of the chain. Without a projection element this is
  ``optax.chain``.

  Args:
    *elements: optax transforms, at most one projection element
      (:func:`galore_project`) and at most one closer after it.

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
  if len(close_idx) > 1:
    raise ValueError("lro.chain takes at most one closer (back_project /"
                     f" *_residual), got {len(close_idx)}.")
  if not proj_idx:
    if close_idx:
      raise ValueError("A residual / back_project element needs a projection"
                       " element (e.g. lro.galore_project) before it.")
    return optax.chain(*elements)
  p = proj_idx[0]
  c = close_idx[0] if close_idx else len(elements)
  if c < p:
    raise ValueError("The closer must come after the projection element.")
  inner_elems = elements[p + 1:c]
  inner = optax.chain(*inner_elems) if inner_elems else optax.identity()
  full_elems = [e for e in inner_elems
                if not isinstance(e, SubspaceOnlyTransformation)]
  full = optax.chain(*full_elems) if full_elems else optax.identity()
  rule = elements[c].rule if close_idx else None
  wrapped = subspace(inner, elements[p].config, rule, full)
  chained = optax.chain(*elements[:p], wrapped, *elements[c + 1:])
  # The counters of the full-space elements (pre / post) go on the mesh too.
  return optax.GradientTransformationExtraArgs(
      lambda params: _on_params_mesh(chained.init(params), params),
      chained.update)
