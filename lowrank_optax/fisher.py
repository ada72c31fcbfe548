r"""Fisher preconditioning of the low-rank gradient (Natural GaLore).

The transform keeps a window of the last ``s`` gradients ``G_h`` (per matrix,
``k`` = number of entries of the matrix) and returns the damped
empirical-Fisher natural gradient

.. math::
  \tilde g = (\lambda I + G_h G_h^\top)^{-1} g
           = \lambda^{-1} g - \lambda^{-2} G_h (I + \lambda^{-1} G_h^\top G_h)^{-1} G_h^\top g

by the Woodbury identity (an ``s x s`` Cholesky solve instead of a ``k x k``
one). The window includes the current gradient; unfilled slots are zeros,
which gives the same result as a shorter window (zero columns add identity
rows to the small system and nothing to ``G_h z``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax.subspace import SubspaceOnlyTransformation

__all__ = ["scale_by_natural_fisher", "NaturalFisherState", "woodbury_fisher_solve"]

_HI = jax.lax.Precision.HIGHEST


class NaturalFisherState(NamedTuple):
  """State of :func:`scale_by_natural_fisher`.

  Attributes:
    count: number of gradients seen (int32); the next slot is ``count % s``.
    history: per leaf, ``(*batch, s, k)``: the window of flattened gradients.
  """

  count: jax.Array
  history: optax.Params


def _matrix_split(shape):
  """(batch shape, k): matrices are the last two axes; lower rank has no batch."""
  if len(shape) <= 2:
    k = 1
    for d in shape:
      k *= d
    return (), k
  return tuple(shape[:-2]), shape[-2] * shape[-1]


def woodbury_fisher_solve(history: jax.Array, g: jax.Array,
                          damping: float) -> jax.Array:
  """``(damping I + H^T H)^{-1} g`` for ``history`` ``(*b, s, k)``, ``g`` ``(*b, k)``.

  Rows of ``history`` are the stored gradients. Computed in float32 (the
  ``s x s`` system is solved by Cholesky).
  """
  h = history.astype(jnp.float32)
  g = g.astype(jnp.float32)
  lam = jnp.asarray(damping, jnp.float32)
  s = h.shape[-2]
  small = jnp.eye(s, dtype=jnp.float32) + jnp.einsum(
      "...ik,...jk->...ij", h, h, precision=_HI) / lam
  y = jnp.einsum("...ik,...k->...i", h, g, precision=_HI)
  chol = jnp.linalg.cholesky(small)
  z = jax.scipy.linalg.cho_solve((chol, True), y[..., None])[..., 0]
  return g / lam - jnp.einsum("...ik,...i->...k", h, z, precision=_HI) / lam**2


def scale_by_natural_fisher(
    history: int = 20,
    damping: float = 1e-3,
) -> SubspaceOnlyTransformation:
  r"""Natural-gradient (inverse empirical Fisher) preconditioning, Woodbury form.

  Per matrix (the last two axes of each leaf; leading axes are batch axes,
  leaves with fewer than two axes are one vector), with ``g = vec(R)`` and the
  window ``G_h = [g_{t-s+1}, ..., g_t]`` (current gradient included):

  .. math::
    \tilde g = (\lambda I + G_h G_h^\top)^{-1} g.

  There is no ``1/s`` averaging (as in the reference code). Inside
  :func:`~lowrank_optax.chain` it runs on projected leaves only and is skipped
  for leaves at full rank (as in the reference); used in ``optax.chain`` it
  preconditions every leaf. Chain it *before* Adam: Adam's moments then
  accumulate ``g~``.

  Memory: ``s`` copies of each low-rank gradient (``s = 20`` is 10x the Adam
  state of the subspace).

  Args:
    history: window length ``s`` (reference default 20).
    damping: ``lambda`` (reference: 1e-3, hard-coded).

  Returns:
    A transform marked :class:`~lowrank_optax.SubspaceOnlyTransformation`.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(32, proj_type="full"),
    ...                lro.scale_by_natural_fisher(), lro.scale_by_adam_hf(),
    ...                lro.back_project(), optax.scale_by_learning_rate(1e-2))

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM
    training and fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024;
    official code: https://github.com/selfsupervised-ai/Natural-GaLore
    (``_natural_gradient_transform``).
  """
  if isinstance(history, bool) or not isinstance(history, int) or history < 1:
    raise ValueError(f"history must be a positive int (it sets the window's"
                     f" shape), got {history!r}.")
  if isinstance(damping, (int, float)) and not damping > 0:
    raise ValueError(f"damping must be > 0, got {damping!r}.")

  def init_fn(params):
    def buf(p):
      batch, k = _matrix_split(p.shape)
      return jnp.zeros(batch + (history, k), p.dtype)
    return NaturalFisherState(jnp.zeros([], jnp.int32),
                              jax.tree.map(buf, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    slot = state.count % history

    def one(g, h):
      batch, k = _matrix_split(g.shape)
      flat = g.reshape(batch + (k,))
      h = jax.lax.dynamic_update_index_in_dim(
          h, flat.astype(h.dtype)[..., None, :], slot, axis=len(batch))
      out = woodbury_fisher_solve(h, flat, damping)
      return out.reshape(g.shape).astype(g.dtype), h

    pairs = jax.tree.map(one, updates, state.history)
    new_updates = jax.tree.map(lambda _, p: p[0], updates, pairs)
    new_hist = jax.tree.map(lambda _, p: p[1], updates, pairs)
    return new_updates, NaturalFisherState(
        numerics.safe_int32_increment(state.count), new_hist)

  return SubspaceOnlyTransformation(init_fn, update_fn)
