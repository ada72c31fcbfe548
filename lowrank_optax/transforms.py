"""Small transforms the reference recipes need and optax does not have.

* :func:`scale_by_adam_hf`: Adam in the Hugging-Face / GaLore convention
  (ALGORITHMS.md 0.2 (A)): ``eps`` is added to ``sqrt(v)`` *before* the bias
  correction, which enters only through the step size.
* :func:`decay_updated_weights`: decoupled weight decay applied to the
  already-updated weights (GaLore, Fira, APOLLO, OSD, ALGORITHMS.md 0.5).
"""

from __future__ import annotations

import math

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

__all__ = ["scale_by_adam_hf", "decay_updated_weights", "ScaleByAdamHFState",
           "DecayUpdatedWeightsState", "zero_nonfinite_updates",
           "ZeroNonfiniteState"]


def _log(b):
  if isinstance(b, (int, float)):
    return jnp.float32(math.log(b))
  return jnp.log(jnp.asarray(b, jnp.float32))


class ScaleByAdamHFState(NamedTuple):
  """State of :func:`scale_by_adam_hf`."""

  count: jax.Array  # completed updates, int32
  mu: Any
  nu: Any


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    correct_bias: bool = True,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with Adam in the Hugging-Face (GaLore reference) convention.

  With ``t`` the 1-based step,

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\cdot
          \frac{m_t}{\sqrt{v_t} + \epsilon}.

  This equals ``optax.scale_by_adam`` with a step-dependent
  ``eps / sqrt(1 - b2^t)``: the two conventions differ in the first steps
  and whenever ``sqrt(v)`` is comparable to ``eps`` (ALGORITHMS.md 0.2).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to ``sqrt(v)`` (the reference default is 1e-6).
    correct_bias: apply ``sqrt(1-b2^t)/(1-b1^t)`` (reference default True).
    mu_dtype: dtype of the first moment (default: the gradient's).
    nu_dtype: dtype of the second moment (default: the gradient's).

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> tx = lro.scale_by_adam_hf()
    >>> state = tx.init(jnp.zeros(3))
    >>> u, state = tx.update(jnp.array([1.0, -2.0, 0.0]), state)

  References:
    Zhao et al., GaLore (arXiv 2403.03507), ``galore_torch/adamw.py`` in
    https://github.com/jiaweizzhao/GaLore (``step_size = lr *
    sqrt(bc2) / bc1``, ``denom = sqrt(v) + eps``).
  """

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params, dtype=nu_dtype)
    return ScaleByAdamHFState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = numerics.safe_int32_increment(state.count)
    if correct_bias:
      # 1 - b^t as -expm1(t log b): no cancellation for small t in float32
      # (the reference computes it in float64).
      # log(b) in float64 when b is a Python float: 0.999 rounded to float32
      # alone moves 1 - b by 1.3e-5 relative.
      t = count.astype(jnp.float32)
      bc1 = -jnp.expm1(t * _log(b1))
      bc2 = -jnp.expm1(t * _log(b2))
      step = jnp.sqrt(bc2) / bc1
    else:
      step = 1.0
    new = jax.tree.map(
        lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype),
        mu, nu, updates)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast(nu, nu_dtype)
    return new, ScaleByAdamHFState(count, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DecayUpdatedWeightsState(NamedTuple):
  """State of :func:`decay_updated_weights`."""

  count: jax.Array


def decay_updated_weights(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Decoupled weight decay on the already-updated weights (GaLore's placement).

  With ``u`` the incoming (already scaled) update and ``W`` the params, the
  reference does ``W' = W + u`` then ``W'' = W' - lr * wd * W'``, so

  .. math::
    u \leftarrow u - \eta_t \lambda (W + u).

  ``eta_t`` is the (scheduled) learning rate without any scale or bias
  correction. Place it last, after the learning rate.

  Args:
    learning_rate: the learning rate or schedule ``eta``.
    weight_decay: ``lambda``.
    mask: optional pytree (or callable of params) of booleans: where to decay.

  Returns:
    A ``GradientTransformationExtraArgs`` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> tx = lro.decay_updated_weights(0.1, 0.5)
    >>> p = jnp.ones(2); state = tx.init(p)
    >>> u, _ = tx.update(-0.1 * jnp.ones(2), state, p)
    >>> u  # -0.1 - 0.05 * 0.9
    Array([-0.145, -0.145], dtype=float32)

  References:
    ``galore_torch/adamw.py`` (https://github.com/jiaweizzhao/GaLore): the
    ``p.add_(p, alpha=-lr * wd)`` after ``p.add_(norm_grad, alpha=-step_size)``.
  """

  def init_fn(params):
    del params
    return DecayUpdatedWeightsState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("decay_updated_weights needs params (pass them to"
                       " update).")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    factor = lr * weight_decay
    msk = mask(params) if callable(mask) else mask
    def decay(u, p, m=True):
      if m is False:
        return u
      out = u - factor * (p + u)
      return out.astype(u.dtype) if m is True else jnp.where(m, out, u).astype(u.dtype)
    if msk is None:
      new = jax.tree.map(decay, updates, params)
    else:
      new = jax.tree.map(decay, updates, params, msk)
    return new, DecayUpdatedWeightsState(numerics.safe_int32_increment(
        state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ZeroNonfiniteState(NamedTuple):
  """State of :func:`zero_nonfinite_updates` (``optax.apply_if_finite``'s counters).

  Attributes:
    notfinite_count: consecutive steps with a non-finite update (reset to 0
      by a finite step).
    last_finite: whether the last step's updates were all finite.
    total_notfinite: steps with a non-finite update so far.
  """

  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array


def zero_nonfinite_updates() -> optax.GradientTransformationExtraArgs:
  r"""Replaces each leaf's update by zeros if it is not all finite, and counts.

  Per leaf: ``u <- u`` if every entry of ``u`` is finite, else ``0``, so a
  leaf with a NaN / Inf gradient is left unchanged while the others step.
  Place it last in a chain whose subspace keeps a leaf's state when its
  gradient is not finite (:func:`~lowrank_optax.subspace` does by default):
  the bad leaf then loses nothing, state or params. The counters are those of
  ``optax.apply_if_finite`` and count steps with any non-finite leaf.

  Unlike ``optax.apply_if_finite``, which checks the whole gradient before
  any leaf's update (one predicate for the step), the decision is taken per
  leaf, so no update waits for every gradient: in a jitted training step XLA
  can still apply a layer's update as soon as its gradient exists. Measured
  at LLaMA-1B shapes (benchmarks/RESULTS.md), wrapping ``lro.galore`` in
  ``optax.apply_if_finite`` raised the compiled training step's temp from
  2.95 GiB to 13.37 GiB (peak 1.28x AdamW's). When a whole step is bad (a NaN loss makes every
  gradient NaN) both skip the whole step.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> tx = lro.zero_nonfinite_updates()
    >>> state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
    >>> u, state = tx.update({"a": jnp.array([1.0, jnp.nan]),
    ...                       "b": jnp.array([1.0, 2.0])}, state)
    >>> u["a"], u["b"], int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), Array([1., 2.], dtype=float32), 1)
  """

  def init_fn(params):
    del params
    return ZeroNonfiniteState(jnp.zeros([], jnp.int32),
                              jnp.array(True, jnp.bool_),
                              jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    oks = [jnp.all(jnp.isfinite(u)) for u in leaves]
    new = [jnp.where(ok, u, jnp.zeros_like(u)) for ok, u in zip(oks, leaves)]
    all_ok = jnp.all(jnp.stack(oks)) if oks else jnp.array(True)
    bump = lambda c: jnp.where(all_ok, c, numerics.safe_int32_increment(c))
    return jax.tree.unflatten(treedef, new), ZeroNonfiniteState(
        notfinite_count=jnp.where(all_ok, 0, numerics.safe_int32_increment(
            state.notfinite_count)),
        last_finite=all_ok,
        total_notfinite=bump(state.total_notfinite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
