"""Block mode: a rotating fraction of whole tensors takes the state-full optimizer.

FRUGAL's pre-training headline (``BlockOptimizer`` / ``BlockAdamW`` of the
official code): the *blocks* are the tensors of the projectable group. At
every refresh (every ``T`` steps) ``num_active = round(n * rho)`` of the ``n``
blocks become active; an active block takes the state-full inner optimizer
(Adam) on its full gradient, every other block takes a state-free step
(``sign(G)``, ``G`` or nothing). Adam state exists only for the active
blocks, so the optimizer memory is about ``rho`` times Adam's.

:func:`active_blocks` implements it as an optax transform with static shapes:
the blocks are grouped by ``(shape, dtype)``; each class has a *slot pool*,
the inner state of one block stacked along a leading slot axis, with as many
slots as blocks of the class can be active at the same time (computed
statically from the order; ``min(class size, num_active)`` for ``random``).
Every block holds its slot as a traced ``int32`` (``-1``: inactive), and its
update is one ``lax.cond``: active, it reads its slot's inner state with a
dynamic index, updates it and writes it back; inactive, the state-free rule.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from lowrank_optax import policy as policy_lib
from lowrank_optax import sharding as shd
from lowrank_optax import subspace as subspace_lib

__all__ = ["ActiveBlocksState", "active_blocks", "BLOCK_ORDERS",
           "STATE_FREE_RULES", "active_block_schedule"]

BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
STATE_FREE_RULES = ("sign", "sgd", "none")


class ActiveBlocksState(NamedTuple):
  """State of :func:`active_blocks`.

  Attributes:
    count: number of completed updates (``int32``).
    slots: ``(n,)`` ``int32``, one entry per block (in ``jax.tree.leaves``
      order of the blocks, not the activation order): the block's slot in its
      class's pool, ``-1`` when it is inactive (``optax.MaskedNode()`` when
      there is no block).
    pools: one entry per ``(shape, dtype)`` class of blocks (in order of first
      appearance in the tree): the inner transform's state of one block with
      a leading slot axis, or ``optax.MaskedNode()`` for a class none of whose
      blocks is ever active.
    full: one entry per parameter leaf: the inner state of a leaf that is not
      a block (full rank, always state-full), ``optax.MaskedNode()`` for a
      block.
  """

  count: jax.Array
  slots: jax.Array
  pools: tuple
  full: tuple


# -- which blocks are active after refresh j ---------------------------------

def _check_order(order: str, n: int, k: int) -> None:
  if order not in BLOCK_ORDERS:
    raise ValueError(f"Unknown block order {order!r}; expected one of"
                     f" {BLOCK_ORDERS}.")
  if order == "mirror" and k % 2:
    raise ValueError(f"block_order='mirror' activates pairs from both ends and"
                     f" needs an even number of active blocks; {n} blocks x"
                     f" rho gives {k}.")


def _deterministic_mask(order: str, n: int, k: int, j, xp):
  """Positions (in block order) active after the ``j``-th refresh (0-based).

  ``xp`` is ``numpy`` (static slot counts) or ``jax.numpy`` (traced ``j``).
  """
  p = xp.arange(n)
  if k == 0 or n == 0:
    return p < 0
  if order == "ascending":
    start = ((j % n) * k) % n
    return (p - start) % n < k
  if order == "descending":
    start = (n - 1 - ((j % n) * k) % n) % n
    return (start - p) % n < k
  # mirror
  h, half = n // 2, k // 2
  start = ((j % h) * half) % h
  q = xp.where(p < h, p, n - 1 - p)
  in_half = (p < h) | (p >= n - h)
  return in_half & ((q - start) % h < half)


def active_block_schedule(n: int, rho: float, order: str = "descending",
                          refreshes: int = 4) -> list:
  """The active positions after each of the first refreshes (deterministic orders).

  For inspection: position ``i`` is the ``i``-th block of the block order
  (see :func:`active_blocks`).

  Args:
    n: number of blocks.
    rho: fraction of active blocks (``num_active = round(n * rho)``).
    order: ``ascending``, ``descending`` or ``mirror``.
    refreshes: how many refreshes.

  Returns:
    A list of sorted tuples of positions.

  Example:
    >>> import lowrank_optax as lro
    >>> lro.active_block_schedule(8, 0.25, "descending", 5)
    [(6, 7), (4, 5), (2, 3), (0, 1), (6, 7)]
    >>> lro.active_block_schedule(8, 0.25, "mirror", 3)
    [(0, 7), (1, 6), (2, 5)]
  """
  k = int(round(n * rho))
  _check_order(order, n, k)
  if order == "random":
    raise ValueError("The random order has no static schedule.")
  return [tuple(int(i) for i in np.nonzero(
      _deterministic_mask(order, n, k, j, np))[0]) for j in range(refreshes)]


# -- which leaves are blocks, in which order ---------------------------------

SelectSpec = Union[None, Mapping[str, bool], Callable[[str, Any], bool]]
OrderSpec = Union[None, Sequence[str], Callable[[str], Any]]


def _is_block(select: SelectSpec, exclude: Optional[str], path: str,
              leaf) -> bool:
  if select is None:
    return (len(getattr(leaf, "shape", ())) >= 2 and not (
        exclude and re.search(exclude, path, flags=re.IGNORECASE)))
  if isinstance(select, Mapping):
    for pattern, value in select.items():
      if re.search(pattern, path, flags=re.IGNORECASE):
        return bool(value)
    return False
  return bool(select(path, leaf))


def _order_key(leaf_order: OrderSpec):
  if leaf_order is None:
    return lambda path: 0
  if callable(leaf_order):
    return leaf_order
  patterns = list(leaf_order)
  for p in patterns:
    re.compile(p)

  def key(path):
    for i, p in enumerate(patterns):
      if re.search(p, path, flags=re.IGNORECASE):
        return i
    return len(patterns)

  return key


class _Layout(NamedTuple):
  """Static description of the blocks of a tree."""

  blocks: tuple          # tree-leaf index of each block (tree order)
  order: tuple           # block number at each position of the block order
  classes: tuple         # (shape, dtype) of each class
  class_of: tuple        # class of each block
  members: tuple         # per class: its blocks (tree order)
  slot_counts: tuple     # per class
  num_active: int


def _layout(tree, select, exclude, leaf_order, rho, order, dtypes=None):
  with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  blocks, paths = [], []
  for i, (kp, leaf) in enumerate(with_path):
    path = policy_lib.path_to_str(kp)
    if _is_block(select, exclude, path, leaf):
      blocks.append(i)
      paths.append(path)
  n = len(blocks)
  k = int(round(n * float(rho)))
  _check_order(order, n, k)
  key = _order_key(leaf_order)
  positions = sorted(range(n), key=lambda b: key(paths[b]))  # stable
  leaves = [leaf for _, leaf in with_path]
  classes, class_of, members = [], [], []
  for b, i in enumerate(blocks):
    dtype = jnp.dtype(dtypes[i] if dtypes is not None else leaves[i].dtype)
    c = (tuple(leaves[i].shape), dtype)
    if c not in classes:
      classes.append(c)
      members.append([])
    class_of.append(classes.index(c))
    members[class_of[-1]].append(b)
  if order == "random":
    counts = [min(len(m), k) for m in members]
  else:
    counts = [0] * len(classes)
    cls = np.asarray(class_of, np.int64)
    pos_block = np.asarray(positions, np.int64)
    for j in range(max(n, 1)):  # the schedule's period divides n (h for mirror)
      active_blocks_j = pos_block[_deterministic_mask(order, n, k, j, np)]
      for c in range(len(classes)):
        counts[c] = max(counts[c], int(np.sum(cls[active_blocks_j] == c)))
  return _Layout(tuple(blocks), tuple(positions), tuple(classes),
                 tuple(class_of), tuple(tuple(m) for m in members),
                 tuple(counts), k)


def _slots(layout: _Layout, active_pos):
  """``(n,)`` ``int32`` slots from the traced active mask over positions."""
  n = len(layout.blocks)
  if n == 0:
    return jnp.zeros((0,), jnp.int32)
  active = jnp.zeros((n,), bool).at[
      jnp.asarray(layout.order, jnp.int32)].set(active_pos)
  slots = jnp.full((n,), -1, jnp.int32)
  for members in layout.members:
    idx = jnp.asarray(members, jnp.int32)
    a = active[idx]
    rank = jnp.cumsum(a.astype(jnp.int32)) - 1
    slots = slots.at[idx].set(jnp.where(a, rank, -1))
  return slots


def _stack(x, count: int):
  """``count`` copies of ``x`` along a new leading (unsharded) axis."""
  y = jnp.broadcast_to(x[None], (count,) + x.shape)
  s = shd.leaf_sharding(x)
  if s is None:
    return y
  return shd.place(y, jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(None, *s.spec)))


def _state_free(rule: str, g, scale):
  if rule == "sign":
    term = jnp.sign(g)
  elif rule == "sgd":
    term = g
  else:
    return jnp.zeros_like(g)
  if isinstance(scale, numbers.Real) and scale == 1.0:
    return term
  return (scale * term).astype(g.dtype)


def active_blocks(
    inner: optax.GradientTransformation,
    rho: float = 0.25,
    *,
    block_order: str = "descending",
    update_gap: int = 200,
    state_free: str = "sign",
    scale: Any = 1.0,
    state_free_scale: Any = 1.0,
    leaf_order: OrderSpec = None,
    select: SelectSpec = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    full_rank_inner: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Block-wise state-full / state-free split (FRUGAL's ``BlockOptimizer``).

  The blocks are the selected leaves (by default every leaf with ``ndim >=
  2`` whose path does not match ``exclude``: the projectable group). After
  each refresh (counts ``0, T, 2T, ...``; ``T = update_gap``) the set ``A`` of
  ``num_active = round(n * rho)`` active blocks changes, all state-full
  state is cleared, and the update of block ``i`` is

  .. math::
    u_i = s_p \cdot \mathrm{inner}(G_i) \quad (i \in A), \qquad
    u_i = s_p s_f \cdot \mathrm{rule}(G_i) \quad (i \notin A),

  with ``rule`` = ``sign`` (FRUGAL's ``sign_sgd``), ``sgd`` (``G``) or
  ``none`` (0). Leaves that are not blocks run ``full_rank_inner`` (default
  ``inner``) unscaled, like FRUGAL's regular parameters. Put the learning
  rate (and weight decay) after it: ``optax.chain(active_blocks(...),
  optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))``.

  Orders (what the official code does; ``j`` = the refresh's number,
  positions ``0..n-1`` in the block order):

  * ``descending`` (the pre-training scripts): the window of ``k`` positions
    ending at ``start_j = (n - 1 - j k) mod n`` going down, cyclically: for
    8 blocks and ``k = 2``: ``{7,6}, {5,4}, {3,2}, {1,0}, {7,6}, ...``.
  * ``ascending``: positions ``(j k + i) mod n``, ``i < k``:
    ``{0,1}, {2,3}, ...``.
  * ``mirror``: pairs from both ends, ``k`` even: with ``h = n // 2`` and
    ``start_j = (j k/2) mod h``, the positions ``q = (start_j + i) mod h``
    and ``n - 1 - q`` for ``i < k/2``: ``{0,7}, {1,6}, {2,5}, {3,4}, ...``;
    with an odd ``n`` the middle block is never active.
  * ``random``: ``k`` positions of a fresh random permutation
    (``jax.random.permutation`` of ``fold_in(key(seed), count)``; the
    reference's ``torch.randperm``).

  Block order: by default the ``jax.tree.leaves`` order of the blocks. For a
  dict pytree (Flax ``nnx.State``) that is sorted keys: ``blocks/0/attn/
  {k,o,q,v}_proj``, ``blocks/0/mlp/{down,gate,up}_proj``, ``blocks/1/...``
  (string keys sort ``layers_10`` before ``layers_2``; integer keys sort
  numerically). The reference uses PyTorch's ``named_modules`` order, per
  layer ``q, k, v, o, gate, down, up``. ``leaf_order`` changes it: a list of
  path regexes (a block's position key is the index of the first pattern its
  path matches, blocks matching none come last; ties keep the tree order), or
  a key function ``path -> sortable`` (e.g. ``(layer number, index of the
  projection in [q, k, v, o, gate, down, up])`` for the reference's order).

  Memory: the blocks are grouped into ``(shape, dtype)`` classes; each class
  keeps ``S_c`` slots of inner state, ``S_c`` = the most blocks of the class
  active after any refresh (exact for the deterministic orders, whose
  schedule is periodic; ``min(class size, k)`` for ``random``). The state
  holds each block's slot (``int32``, ``-1`` inactive). One ``lax.cond`` per
  block runs either the inner transform on its slot (a dynamic index into
  the pool, written back) or the state-free rule; a refresh is one more
  ``lax.cond`` that resets the pools and recomputes the slots.

  Differences from the official code: blocks are leaves, so a stacked
  ``(L, m, n)`` leaf (scanned layers) is one block (unstack the layers to
  get per-layer blocks); every pool is cleared at a refresh, also for a block
  that stays active (the reference clears everything too: its
  ``reset_statistics`` is ignored by ``BlockOptimizer``); the random draws
  are JAX's.

  Args:
    inner: the state-full transform of the active blocks (e.g.
      ``optax.scale_by_adam()``); it gets the block's gradient, state and
      parameter (``params`` leaf, or ``None``).
    rho: fraction of the blocks active at a time (``round(n * rho)``; Python
      rounds half to even).
    block_order: ``descending`` (default, as the reference scripts),
      ``ascending``, ``mirror`` or ``random``.
    update_gap: ``T``: the active set changes every ``T`` steps.
    state_free: ``sign``, ``sgd`` or ``none``: the inactive blocks' rule.
    scale: ``s_p`` (FRUGAL's ``proj_params_lr_scale``), multiplies every
      block's update.
    state_free_scale: ``s_f`` (``inactive_lr_scale``), multiplies the
      inactive blocks' update on top of ``s_p``.
    leaf_order: the block order (see above): ``None``, a list of path regexes
      or a key function of the path.
    select: which leaves are blocks: ``None`` (leaves with ``ndim >= 2`` not
      matching ``exclude``), a dict ``{path_regex: bool}`` (the first match
      decides; no match: not a block) or a callable ``(path, leaf) -> bool``.
    exclude: regex of paths that the default selection leaves out.
    full_rank_inner: the transform of the leaves that are not blocks
      (default ``inner``).
    seed: seed of the ``random`` order.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is an
    :class:`ActiveBlocksState`.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {f"w{i}": jnp.ones((4, 3)) for i in range(8)}
    >>> tx = lro.active_blocks(optax.scale_by_adam(), 0.25, update_gap=10)
    >>> state = tx.init(params)
    >>> state.pools[0].mu.shape  # 2 slots for 8 blocks
    (2, 4, 3)
    >>> u, state = tx.update(params, state)
    >>> state.slots.tolist()  # the last two blocks are active
    [-1, -1, -1, -1, -1, -1, 0, 1]

    The reference's ``named_modules`` order for paths like
    ``blocks/3/attn/q_proj/kernel`` (per layer ``q, k, v, o, gate, down,
    up``):

    >>> import re
    >>> NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
    ...          "down_proj", "up_proj")
    >>> def reference_order(path):
    ...   layer = int(re.search(r"blocks/(\d+)/", path).group(1))
    ...   return layer, [n in path for n in NAMES].index(True)
    >>> reference_order("blocks/1/mlp/gate_proj/kernel")
    (1, 4)
    >>> tx = lro.active_blocks(optax.scale_by_adam(), 0.25,
    ...                        leaf_order=reference_order)

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_,
    ICML 2025; official code https://github.com/fzmushko/FRUGAL
    (``frugal/proj_optimizer_templates.py``, ``BlockOptimizer``).
  """
  if state_free not in STATE_FREE_RULES:
    raise ValueError(f"Unknown state_free rule {state_free!r}; expected one"
                     f" of {STATE_FREE_RULES}.")
  if block_order not in BLOCK_ORDERS:
    raise ValueError(f"Unknown block_order {block_order!r}; expected one of"
                     f" {BLOCK_ORDERS}.")
  if not 0.0 <= float(rho) <= 1.0:
    raise ValueError(f"rho must lie in [0, 1], got {rho}.")
  # update_gap may arrive as a (traced) array under optax.inject_hyperparams;
  # Python values are validated here.
  if isinstance(update_gap, bool) or (
      isinstance(update_gap, numbers.Number)
      and (update_gap != int(update_gap) or update_gap < 1)):
    raise ValueError(f"update_gap must be a positive int, got {update_gap!r}.")
  inner = optax.with_extra_args_support(inner)
  full_rank_inner = optax.with_extra_args_support(
      inner if full_rank_inner is None else full_rank_inner)

  def layout_of(tree, dtypes=None):
    return _layout(tree, select, exclude, leaf_order, rho, block_order, dtypes)

  def fresh_pool(layout, c, like):
    shape, dtype = layout.classes[c]
    zeros = shd.zeros(shape, dtype, shd.leaf_sharding(like))
    return jax.tree.map(lambda x: _stack(x, layout.slot_counts[c]),
                        inner.init(zeros))

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    layout = layout_of(params)
    pools = []
    for c in range(len(layout.classes)):
      if layout.slot_counts[c] == 0:
        pools.append(optax.MaskedNode())
        continue
      first = leaves[layout.blocks[layout.members[c][0]]]
      pools.append(fresh_pool(layout, c, first))
    is_block = set(layout.blocks)
    full = []
    for i, leaf in enumerate(leaves):
      if i in is_block:
        full.append(optax.MaskedNode())
      else:
        full.append(full_rank_inner.init(
            shd.zeros(leaf.shape, leaf.dtype, shd.leaf_sharding(leaf))))
    state = ActiveBlocksState(
        count=jnp.zeros([], jnp.int32),
        slots=(jnp.full((len(layout.blocks),), -1, jnp.int32)
               if layout.blocks else optax.MaskedNode()),
        pools=tuple(pools), full=tuple(full))
    return subspace_lib.on_params_mesh(state, params)

  def update_fn(updates, state, params=None, **extra_args):
    leaves, treedef = jax.tree.flatten(updates)
    p_leaves = (jax.tree.leaves(params) if params is not None
                else [None] * len(leaves))
    dtypes = [p.dtype for p in p_leaves] if params is not None else None
    layout = layout_of(updates, dtypes)
    if len(leaves) != len(state.full):
      raise ValueError(f"The updates have {len(leaves)} leaves but the state"
                       f" was initialised for {len(state.full)}.")
    count = state.count
    n = len(layout.blocks)
    k = layout.num_active

    # -- refresh: new active set, cleared pools ------------------------------
    refresh = count % update_gap == 0
    j = count // update_gap
    if block_order == "random" and n:
      key = jax.random.fold_in(jax.random.key(seed), count)
      perm = jax.random.permutation(key, n)
      active_pos = jnp.zeros((n,), bool).at[perm[:k]].set(True)
    elif block_order == "random":
      active_pos = jnp.zeros((0,), bool)
    else:
      active_pos = _deterministic_mask(block_order, n, k, j, jnp)
    slots = (jnp.where(refresh, _slots(layout, active_pos), state.slots)
             if n else state.slots)
    firsts = [leaves[layout.blocks[m[0]]] for m in layout.members]

    def fresh_pools():
      return tuple(
          optax.MaskedNode() if layout.slot_counts[c] == 0 else
          jax.tree.map(shd.like, fresh_pool(layout, c, firsts[c]),
                       state.pools[c])
          for c in range(len(layout.classes)))

    pools = list(jax.lax.cond(refresh, fresh_pools, lambda: state.pools))

    # -- per-block update ----------------------------------------------------
    out = list(leaves)
    for b, i in enumerate(layout.blocks):
      g, p, c = leaves[i], p_leaves[i], layout.class_of[b]
      dtype = p.dtype if p is not None else g.dtype

      def off(g=g, dtype=dtype):
        return _state_free(state_free, g, scale * state_free_scale).astype(
            dtype)

      if layout.slot_counts[c] == 0:
        out[i] = off()
        continue
      canonical = firsts[c]

      def on(operand, g=g, p=p, dtype=dtype, canonical=canonical):
        pool, slot = operand
        gc = shd.like(g, canonical)
        s = jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, slot, keepdims=False),
            pool)
        pc = None if p is None else shd.like(p, canonical)
        u, s_new = inner.update(gc, s, pc, **extra_args)
        # A block whose gradient is not finite keeps its slot's state (the
        # update stays non-finite, for lro.zero_nonfinite_updates to drop).
        s = subspace_lib.keep_if_nonfinite(gc, s_new, s)
        pool = jax.tree.map(
            lambda x, y: jax.lax.dynamic_update_index_in_dim(
                x, y.astype(x.dtype)[None], slot, 0), pool, s)
        u = shd.like(u, g)
        if not (isinstance(scale, numbers.Real) and scale == 1.0):
          u = scale * u
        return u.astype(dtype), pool

      def inactive(operand, off=off):
        return off(), operand[0]

      out[i], pools[c] = jax.lax.cond(slots[b] >= 0, on, inactive,
                                      (pools[c], slots[b]))

    # -- leaves that are not blocks ------------------------------------------
    new_full = list(state.full)
    is_block = set(layout.blocks)
    for i, g in enumerate(leaves):
      if i in is_block:
        continue
      u, new_full[i] = full_rank_inner.update(g, state.full[i], p_leaves[i],
                                              **extra_args)
      new_full[i] = subspace_lib.keep_if_nonfinite(g, new_full[i],
                                                   state.full[i])
      dtype = p_leaves[i].dtype if p_leaves[i] is not None else g.dtype
      out[i] = u.astype(dtype)

    new_state = ActiveBlocksState(
        count=numerics.safe_int32_increment(count), slots=slots,
        pools=tuple(pools), full=tuple(new_full))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
