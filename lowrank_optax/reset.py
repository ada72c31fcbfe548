"""Momentum reset, quick-recovery learning rate, and weight refactorization.

Glentis et al. (arXiv 2505.22922, "Scalable Parameter and Memory Efficient
Pretraining for LLM") restart training every ``K`` steps: factorised weights
``W = B A`` are re-balanced by an SVD (:func:`refactorize`, a model
utility), the optimizer is rebuilt — its moments are zero and its step
counters start again (:func:`reset_every`) — and the learning rate ramps up
quickly from almost zero (:func:`quick_recovery_schedule`).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax.fira import ScaleByHFBiasCorrectionState
from lowrank_optax import sharding as shd
from lowrank_optax import subspace as subspace_lib

__all__ = ["reset_every", "ResetEveryState", "is_moment_state",
           "reset_moment_states", "quick_recovery_schedule", "refactorize"]


class ResetEveryState(NamedTuple):
  """State of :func:`reset_every`.

  Attributes:
    count: number of completed updates (int32).
    inner_state: the wrapped transform's state.
  """

  count: jax.Array
  inner_state: Any


def _is_node(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


def _has_counter_node(tree) -> bool:
  """Whether ``tree`` holds a ``NamedTuple`` with a ``count`` field."""
  for node in jax.tree.leaves(tree, is_leaf=_is_node):
    if _is_node(node) and ("count" in node._fields
                           or _has_counter_node(tuple(node))):
      return True
  return False


def _holds_floats(tree) -> bool:
  return any(hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
             for x in jax.tree.leaves(tree))


#: Counter-only states that are bias-correction counters (reset with the
#: moments), not schedules.
_COUNTER_MOMENT_STATES = (ScaleByHFBiasCorrectionState,)


def is_moment_state(node) -> bool:
  """Whether a state node is a *moment state* that :func:`reset_every` resets.

  A moment state is

  * a ``NamedTuple`` with a ``count`` field, at least one other field that
    holds floating-point arrays, and no nested ``NamedTuple`` with a
    ``count`` field (``optax.ScaleByAdamState``, ``ScaleByLionState``,
    ``FactoredState`` (Adafactor), ``EmaState``,
    :class:`~lowrank_optax.transforms.ScaleByAdamHFState`, the 8-bit Adam
    state, a Fisher or M-FAC gradient window, ...), or
  * an ``optax.TraceState`` (momentum without a counter), or
  * :class:`~lowrank_optax.fira.ScaleByHFBiasCorrectionState` (Fira's and
    APOLLO's bias-correction counter).

  Not moment states, and kept: counter-only nodes (``ScaleByScheduleState``
  and other learning-rate or weight-decay schedule counters, so the
  schedule goes on), ``NamedTuple`` nodes holding nested counter nodes
  (``optax.inject_hyperparams``, :class:`~lowrank_optax.SubspaceState`,
  ``MultiSteps``, ... — the walk descends into them), and counter-less nodes
  (projector bases and indices, Fira's norm-growth limiter, random keys,
  ``apply_if_finite``'s counters).
  """
  if not _is_node(node):
    return False
  if isinstance(node, (optax.TraceState,) + _COUNTER_MOMENT_STATES):
    return True
  if isinstance(node, subspace_lib.SubspaceState):
    return False
  if "count" not in node._fields:
    return False
  others = [getattr(node, f) for f in node._fields if f != "count"]
  return _holds_floats(others) and not _has_counter_node(others)


def reset_moment_states(fresh, state, where, predicate=is_moment_state):
  """``state`` with every moment state taken from ``fresh`` where ``where``.

  Walks ``NamedTuple`` nodes, tuples, lists and dicts of ``state`` and
  ``fresh`` (the same structure) together; a node for which ``predicate`` is
  true is replaced, leaf by leaf, by ``jnp.where(where, fresh, state)``
  (cast to the state's dtype, placed like it). Everything else is kept.

  Like :func:`~lowrank_optax.reset_moments` (the subspace's
  ``on_refresh="reset"``), which keys moment states to the low-rank
  gradient's shape; here the rule is :func:`is_moment_state`, for any optax
  state.

  Args:
    fresh: the state as ``init`` makes it.
    state: the current state.
    where: traced bool.
    predicate: ``node -> bool``: which nodes to reset.

  Returns:
    The state with its moment states reset where ``where``.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = optax.adam(optax.linear_schedule(1.0, 0.0, 10))
    >>> p = jnp.zeros(2); s = tx.init(p)
    >>> _, s = tx.update(jnp.ones(2), s)
    >>> s = lro.reset_moment_states(tx.init(p), s, True)
    >>> int(s[0].count), float(s[0].mu[0]), int(s[1].count)  # schedule kept
    (0, 0.0, 1)
  """
  where = jnp.asarray(where)

  def select(f, s):
    if not hasattr(s, "dtype"):
      return s
    return shd.like(jnp.where(where, jnp.asarray(f).astype(s.dtype), s), s)

  def walk(f, s):
    if predicate(s):
      return jax.tree.map(select, f, s)
    if _is_node(s):
      return type(s)(*(walk(a, b) for a, b in zip(f, s)))
    if isinstance(s, (tuple, list)):
      return type(s)(walk(a, b) for a, b in zip(f, s))
    if isinstance(s, dict):
      return type(s)((k, walk(f[k], s[k])) for k in s)
    return s

  return walk(fresh, state)


def reset_every(
    inner: optax.GradientTransformation,
    every_k: int,
    *,
    predicate: Callable[[Any], bool] = is_moment_state,
) -> optax.GradientTransformationExtraArgs:
  r"""Resets ``inner``'s moments and their counters every ``every_k`` updates.

  Before updates number ``K, 2K, 3K, ...`` (0-based: after ``K``, ``2K``,
  ... completed updates) every moment state of ``inner``'s state
  (:func:`is_moment_state`: Adam's ``mu``, ``nu`` and ``count``, momentum
  traces, bias-correction counters, Fisher windows, ...) takes its initial
  value, so the update right after a reset is a fresh optimizer's first
  update on that gradient: bias correction restarts. Schedule counters are
  kept (the learning-rate schedule goes on; pair it with
  :func:`quick_recovery_schedule`), and so is everything that is not a
  moment state (subspace bases and their refresh counter, limiters, random
  keys).

  The initial values come from ``inner.init(params)`` (or
  ``inner.init(updates)`` without params) traced inside the update; a
  ``jnp.where`` per moment array selects them at a reset, fused into the
  moments' update.

  Reference: the restart block of ``torchrun_main_DDP.py``
  (``OptimAI-Lab/Memory_Efficient_Pretraining``): after ``update_step %
  cycle_length == 0`` completed updates the whole optimizer is rebuilt
  (``build_optimizer``), so its *entire* state restarts. Differences:

  * non-moment state is kept: a GaLore-family optimizer keeps its bases and
    its refresh schedule (the rebuilt reference optimizer recomputes
    GaLore's projector from the next gradient, its step counter being 0),
    and Fira's norm-growth limiter keeps its previous norm;
  * ``predicate`` chooses what is reset (e.g. ``lambda node: True`` for
    leaves of every kind, schedule counters included);
  * the reference rebuilds the scheduler at the same time (see
    :func:`quick_recovery_schedule`).

  Args:
    inner: the optimizer (any optax transform; e.g. ``lro.galore(...)``).
    every_k: ``K`` (the reference's ``--cycle_length``).
    predicate: ``node -> bool``: which state nodes are reset (default
      :func:`is_moment_state`).

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`ResetEveryState`.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.reset_every(optax.adam(1e-2), every_k=2)
    >>> p = jnp.zeros(2); s = tx.init(p)
    >>> u0, s = tx.update(jnp.ones(2), s)
    >>> u1, s = tx.update(-jnp.ones(2), s)
    >>> u2, s = tx.update(jnp.ones(2), s)  # after 2 updates: fresh Adam
    >>> bool(jnp.allclose(u2, u0)), int(s.inner_state[0].count)
    (True, 1)

  References:
    Glentis, Li, Han, Hong, `Scalable Parameter and Memory Efficient
    Pretraining for LLM: Recent Algorithmic Advances and Benchmarking
    <https://arxiv.org/abs/2505.22922>`_; official code
    https://github.com/OptimAI-Lab/Memory_Efficient_Pretraining
    (``torchrun_main_DDP.py``, restart block).
  """
  if isinstance(every_k, bool) or not isinstance(
      every_k, numbers.Integral) or every_k < 1:
    raise ValueError(f"every_k must be a positive int, got {every_k!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ResetEveryState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    count = state.count
    reset = (count > 0) & (count % every_k == 0)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # init's policy notes, said at init
      fresh = inner.init(params if params is not None else updates)
    inner_state = reset_moment_states(fresh, state.inner_state, reset,
                                      predicate)
    updates, inner_state = inner.update(updates, inner_state, params,
                                        **extra_args)
    return updates, ResetEveryState(numerics.safe_int32_increment(count),
                                    inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quick_recovery_schedule(
    schedule: optax.ScalarOrSchedule,
    cycle_length: int,
    recovery_steps: int = 10,
) -> optax.Schedule:
  r"""``schedule`` with a fast linear ramp after every restart.

  With ``K = cycle_length``, ``n = recovery_steps``, a 0-based count ``t``,
  the last restart ``s = K floor(t / K)`` and ``i = t - s``:

  .. math::
    \eta(t) = \begin{cases}
      \tau\,\big(0.001 + 0.999 \min(1, \tfrac{i}{n - 1})\big)
        & s > 0,\ i < n,\quad \tau = \mathrm{schedule}(s + n), \\
      \mathrm{schedule}(t) & \text{otherwise,}
    \end{cases}

  (``i / (n - 1)`` read as 1 for ``n = 1``): at a restart the rate drops to
  ``0.001 tau`` and reaches ``tau``, the normal schedule's value at ``s +
  n``, at ``t = s + n - 1``. Before the first restart it is ``schedule``.
  Aligned with :func:`reset_every` ``(K)``: the update right after a reset
  is the ramp's first step.

  Reference: ``_get_cosine_schedule_with_quick_recovery_lambda`` in
  ``para_eff_pt/peft_pretraining/training_utils.py`` (the formula above,
  with the cosine-with-warmup normal schedule), installed at every restart
  of ``torchrun_main_DDP.py``. Differences:

  * any ``schedule`` plays the normal one;
  * the reference installs it only from the first restart on (before, its
    ``--scheduler``, by default a cosine whose period is ``cycle_length``
    when that divides the number of steps) — here ``schedule`` throughout,
    which is what the recovery formula assumes;
  * off by one: the reference rebuilds its ``LambdaLR`` with
    ``last_epoch=update_step``, whose constructor steps it once, so the
    update right after a restart at ``s`` uses ``eta(s + 1)`` (the ramp's
    second point) and every later update is one step ahead of the normal
    schedule. Here the update after ``s`` completed updates uses
    ``eta(s)``.

  Args:
    schedule: the normal schedule (or a constant).
    cycle_length: ``K``, the restart period (``--cycle_length``).
    recovery_steps: ``n`` (``--recovery_steps``, default 10).

  Returns:
    An optax schedule.

  Example:
    >>> import lowrank_optax as lro
    >>> s = lro.quick_recovery_schedule(1.0, cycle_length=100, recovery_steps=10)
    >>> [round(float(s(t)), 3) for t in (99, 100, 101, 109, 110)]
    [1.0, 0.001, 0.112, 1.0, 1.0]

  References:
    Glentis et al., arXiv 2505.22922; official code
    https://github.com/OptimAI-Lab/Memory_Efficient_Pretraining
    (``para_eff_pt/peft_pretraining/training_utils.py``,
    ``get_cosine_schedule_with_quick_recovery``).
  """
  if isinstance(cycle_length, bool) or not isinstance(
      cycle_length, numbers.Integral) or cycle_length < 1:
    raise ValueError(f"cycle_length must be a positive int, got"
                     f" {cycle_length!r}.")
  if isinstance(recovery_steps, bool) or not isinstance(
      recovery_steps, numbers.Integral) or recovery_steps < 0:
    raise ValueError(f"recovery_steps must be an int >= 0, got"
                     f" {recovery_steps!r}.")
  normal = schedule if callable(schedule) else (lambda t: schedule)
  k, n = int(cycle_length), int(recovery_steps)

  def fn(count):
    t = jnp.asarray(count, jnp.int32)
    start = (t // k) * k
    since = t - start
    base = jnp.asarray(normal(t), jnp.float32)
    if n == 0:
      return base
    target = jnp.asarray(normal(start + n), jnp.float32)
    progress = (jnp.minimum(since.astype(jnp.float32) / (n - 1), 1.0)
                if n > 1 else jnp.float32(1.0))
    ramp = target * 0.001 + (target - target * 0.001) * progress
    return jnp.where((start > 0) & (since < n), ramp, base)

  return fn


def refactorize(b: jax.Array, a: jax.Array, rank: Optional[int] = None):
  r"""Re-balances the factors of ``W = B A`` by an SVD of their product.

  .. math::
    U \Sigma V^\top = \mathrm{svd}(\mathrm{float32}(B A)),\qquad
    B' = U_r \Sigma_r^{1/2},\quad A' = \Sigma_r^{1/2} V_r^\top,

  so ``B' A'`` is the best rank-``r`` approximation of ``B A`` (equal to it
  when its rank is at most ``r``) and ``B'^T B' = A' A'^T = \Sigma_r``.
  Leading axes are batch axes. ``b`` is ``(..., m, k)`` and ``a`` ``(..., k,
  n)``: for PyTorch ``lora_B`` (out, r) and ``lora_A`` (r, in) pass them as
  they are; for Flax factors stored ``(in, r)`` and ``(r, out)`` (kernel =
  ``A_in B_out``) pass the ``(in, r)`` one as ``b``.

  Reference: ``SpLoRaLinear.merge_and_reinit`` in
  ``para_eff_pt/pt_sltrain/splora_model.py``
  (``OptimAI-Lab/Memory_Efficient_Pretraining``), called every
  ``cycle_length`` steps. It casts ``U_r``, ``Sigma_r`` and ``V_r^T`` to the
  factors' dtype before taking the square root and the products; here they
  are formed in float32 and rounded once.

  Args:
    b: ``(..., m, k)``.
    a: ``(..., k, n)``.
    rank: ``r`` (default ``k``, which keeps the shapes); at most
      ``min(m, n)``.

  Returns:
    ``(b', a')`` of shapes ``(..., m, r)`` and ``(..., r, n)`` in the input
    dtypes.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> b = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> a = jnp.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    >>> b2, a2 = lro.refactorize(b, a)
    >>> bool(jnp.allclose(b2 @ a2, b @ a, atol=1e-5))
    True
    >>> [round(float(x), 4) for x in jnp.diag(b2.T @ b2)]  # singular values
    [3.0, 2.0]

  References:
    Glentis et al., arXiv 2505.22922; official code
    https://github.com/OptimAI-Lab/Memory_Efficient_Pretraining.
  """
  m, k, n = b.shape[-2], b.shape[-1], a.shape[-1]
  if a.shape[-2] != k:
    raise ValueError(f"b {b.shape} and a {a.shape} do not multiply.")
  r = k if rank is None else int(rank)
  if not 1 <= r <= min(m, n):
    raise ValueError(f"rank must lie in [1, min(m, n) = {min(m, n)}], got"
                     f" {r}.")
  w = jnp.matmul(b.astype(jnp.float32), a.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  u, s, vh = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(s[..., :r])
  new_b = u[..., :, :r] * root[..., None, :]
  new_a = root[..., :, None] * vh[..., :r, :]
  return new_b.astype(b.dtype), new_a.astype(a.dtype)
