"""Fira: norm-based scaling of the residual and the norm-growth limiter.

Fira (Chen et al., 2024) keeps GaLore's low-rank Adam step and, instead of
dropping the residual ``E = G - up(down(G))``, adds it back scaled per
channel by how much Adam rescaled the same channel in the subspace, with a
limiter on the growth of its norm. In this library it is a residual closer,
:func:`fira_residual`, for :func:`~lowrank_optax.chain`; :func:`fira` is the
complete optimizer. Two pieces here are shared with APOLLO
(:mod:`lowrank_optax.apollo`): the norm-growth limiter
(:func:`limit_norm_growth`) and the HF bias correction as a full-space
transform (:func:`scale_by_hf_bias_correction`).

Why a separate bias correction: the reference computes the scaling ratios
(and the limiter) from the *uncorrected* Adam direction ``N = m / (sqrt(v) +
eps)`` and multiplies the whole update by ``step_size = lr * sqrt(1 -
b2^t) / (1 - b1^t)`` (ALGORITHMS.md 0.2 (A)). The ratios would absorb a
corrected ``N`` exactly, but the limiter compares norms of consecutive steps,
whose correction factors differ; so the subspace runs
``scale_by_adam_hf(correct_bias=False)`` and the factor is applied after the
closers, to every leaf.

Findings from the official code (``xichen-fy/Fira`` @ 5c28b13,
``optimizer_torch/fira_adamw.py`` and ``gradient_projection.py``; PyPI
``fira==1.0.2`` is the same code with CRLF line ends):

* ``E = G - alpha * Back(R)``: ``project_back`` multiplies by ``alpha``, so
  with ``alpha = 0.25`` the residual still holds ``0.75`` of the in-subspace
  part (the paper writes ``E = G - P R``): ``residual_uses_scale=True``.
* The channel ratio ``phi = ||N||_d / (||R||_d + 1e-8)`` reduces over the
  rank axis of the low-rank arrays; the reference picks it from ``N``'s
  shape (``d = 0 if N.shape[0] < N.shape[1] else 1``), which for ``std`` is
  the rank axis. Here it comes from the plan's side (the reduced axis), which
  agrees with ``std`` and stays right for forced ``left`` / ``right`` sides,
  where the reference can take the wrong axis (and then fails to broadcast).
* The limiter state is the previous *post-limit* norm, one scalar per
  matrix, kept across refreshes; the first step only records the norm;
  ``gamma = 1.01`` is hard-coded; the ratio's denominator has ``+ 1e-8``.
* Decoupled weight decay after the update, on the updated weights (as
  GaLore); non-projected parameters take plain HF AdamW.
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
from lowrank_optax import residual as residual_lib
from lowrank_optax import sharding as shd
from lowrank_optax import subspace as subspace_lib
from lowrank_optax import transforms
from lowrank_optax.recipes import _maybe_weight_decay
from lowrank_optax.recipes import skip_nonfinite_steps

__all__ = ["NormGrowthState", "limit_norm_growth", "channel_ratio",
           "FiraResidual", "fira_residual", "ScaleByHFBiasCorrectionState",
           "scale_by_hf_bias_correction", "fira"]

#: Added to the low-rank gradient's norms in the ratios (the reference's).
RATIO_EPS = 1e-8


class NormGrowthState(NamedTuple):
  """State of the norm-growth limiter of one leaf.

  Attributes:
    norm: ``(*batch,)`` float32: the previous post-limit norm of each matrix
      of the leaf; negative (``-1``) until the first step has recorded it.
  """

  norm: jax.Array


def init_norm_growth(plan) -> NormGrowthState:
  """The limiter's initial state for a leaf (one ``-1`` per matrix)."""
  return NormGrowthState(shd.place(jnp.full(plan.batch_shape, -1.0,
                                            jnp.float32),
                                   shd.batch_only(plan, 0)))


def limit_norm_growth(x: jax.Array, prev: jax.Array, gamma: Any = 1.01):
  r"""Fira's norm-growth limiter on a stack of matrices ``x`` (``(*batch, M, N)``).

  With ``n = ||x||_F`` per matrix and ``p`` the previous post-limit norm:

  .. math::
    c = \max\!\left(\frac{n}{p + 10^{-8}}, \gamma\right) / \gamma, \qquad
    x \leftarrow x / c, \qquad p \leftarrow n / c,

  so a matrix whose norm grew by more than ``gamma`` is rescaled to norm
  ``gamma * p``. Where ``p < 0`` (nothing recorded yet: the first step)
  ``x`` is unchanged and ``p <- n``.

  Args:
    x: ``(*batch, M, N)``.
    prev: ``(*batch,)`` float32, the previous post-limit norms (``< 0``:
      none yet).
    gamma: the growth limit (the reference: 1.01).

  Returns:
    ``(x limited, new prev)``; ``x`` keeps its dtype.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> x, p = lro.limit_norm_growth(jnp.full((1, 1), 10.0), jnp.array(1.0))
    >>> float(x[0, 0]), float(p)  # 10x growth limited to 1.01x
    (1.0099999904632568, 1.0099999904632568)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_; official code
    https://github.com/xichen-fy/Fira (``optimizer_torch/fira_adamw.py``).
  """
  n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1)))
  c = jnp.maximum(n / (prev + RATIO_EPS), gamma) / gamma
  c = jnp.where(prev < 0, jnp.ones_like(c), c)
  out = x / c[..., None, None].astype(x.dtype)
  return out.astype(x.dtype), (n / c).astype(jnp.float32)


def _reduced_axis(plan) -> int:
  """The rank axis of a one-sided low-rank array (the other is the channel)."""
  if plan.side == "both":
    raise ValueError(
        f"Leaf {plan.path!r} is projected on both sides (proj_type='full'):"
        " a channel-wise ratio needs a non-projected axis. Use a one-sided"
        " proj_type (the Fira / APOLLO references support only one-sided"
        " channel scaling), or APOLLO's scale_type='tensor'.")
  return -2 if plan.side == "reduction" else -1


def channel_ratio(plan, inner: jax.Array, lowrank: jax.Array) -> jax.Array:
  r"""Per-channel ratio ``||N||_c / (||R||_c + 1e-8)`` along the non-projected axis.

  The norms reduce over the rank axis of the low-rank arrays (``R`` is ``(r,
  N)`` on the input side, ``(M, r)`` on the output side), so there is one
  factor per output column (input side) or per input row (output side),
  returned with a kept size-1 axis so it broadcasts against the
  ``(*batch, M, N)`` gradient. Computed in float32.

  Args:
    plan: the leaf's plan (its ``side`` decides the axis).
    inner: ``N``, the inner transform's output.
    lowrank: ``R``, the low-rank gradient.

  Returns:
    ``(*batch, 1, N)`` or ``(*batch, M, 1)`` float32.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> plan = lro.plan_leaves({"w": jnp.zeros((4, 8))}, 2)[0]  # (2, 8) R
    >>> lro.channel_ratio(plan, 2 * jnp.ones((2, 8)), jnp.ones((2, 8))).shape
    (1, 8)
  """
  axis = _reduced_axis(plan)
  num = jnp.linalg.norm(inner.astype(jnp.float32), axis=axis, keepdims=True)
  den = jnp.linalg.norm(lowrank.astype(jnp.float32), axis=axis, keepdims=True)
  # The low-rank arrays may split the kept axis over mesh axes the gradient
  # uses elsewhere (FSDP, sharding.lowrank); the factor multiplies G.
  return shd.reshard(num / (den + RATIO_EPS), shd.channels(plan))


def _check_gamma(gamma):
  if gamma is not None and isinstance(gamma, numbers.Real) and gamma <= 0:
    raise ValueError(f"norm_growth_limit must be positive (or None to"
                     f" disable the limiter), got {gamma}.")


def _check_subspace(plan, what):
  if plan.rank == 0:
    raise ValueError(
        f"{what} scales by the ratio of the subspace's Adam direction to the"
        f" low-rank gradient; leaf {plan.path!r} has rank 0 (no subspace).")


@dataclasses.dataclass(frozen=True)
class FiraResidual(residual_lib.Closer):
  """Fira's residual term (see :func:`fira_residual`).

  Attributes:
    norm_growth_limit: ``gamma`` of the limiter, or ``None`` (no limiter).
    residual_uses_scale: ``E = G - alpha * up(R)`` (the reference) if True,
      ``E = G - up(R)`` (the paper) if False.
  """

  role = "residual"
  norm_growth_limit: Optional[float] = 1.01
  residual_uses_scale: bool = True

  def __post_init__(self):
    _check_gamma(self.norm_growth_limit)

  def init(self, plan, dtype):
    del dtype
    _check_subspace(plan, "Fira's residual")
    _reduced_axis(plan)
    if self.norm_growth_limit is None:
      return optax.MaskedNode()
    return init_norm_growth(plan)

  def apply(self, ctx, state):
    scale = ctx.scale if self.residual_uses_scale else 1.0
    e = residual_lib.residual_of(ctx, scale)
    phi = channel_ratio(ctx.plan, ctx.inner, ctx.lowrank)
    psi = e * phi.astype(e.dtype)
    if self.norm_growth_limit is not None:
      psi, norm = limit_norm_growth(psi, state.norm, self.norm_growth_limit)
      state = NormGrowthState(shd.like(norm, state.norm))
    return psi.astype(ctx.g.dtype), state


def fira_residual(norm_growth_limit: Optional[float] = 1.01,
                  residual_uses_scale: bool = True
                  ) -> residual_lib.ResidualElement:
  r"""Fira's residual: ``E`` scaled per channel by Adam's ratio, norm growth limited.

  Closes the subspace in :func:`~lowrank_optax.chain` and adds, for every
  projected leaf with low-rank gradient ``R`` and inner output ``N``,

  .. math::
    E = G - \alpha\,\mathrm{up}(R), \quad
    \phi_c = \frac{\|N_{:,c}\|}{\|R_{:,c}\| + 10^{-8}}, \quad
    \Psi = \mathrm{limit}_\gamma(E \odot \phi)

  to the mapped-back ``alpha * up(N)``. ``c`` runs over the non-projected
  axis (output columns when the input side is reduced, input rows
  otherwise; :func:`channel_ratio`), so ``Psi`` stays orthogonal to the
  subspace when ``alpha = 1``. ``limit`` is :func:`limit_norm_growth`, one
  state scalar per matrix (per batch element of a stacked leaf), kept across
  refreshes; the first step only records the norm.

  The ratio uses the inner transform's output as it is. For the reference
  numerics put ``lro.scale_by_adam_hf(correct_bias=False)`` inside and
  :func:`scale_by_hf_bias_correction` after the closer (as :func:`fira`
  does).

  Args:
    norm_growth_limit: ``gamma`` (the reference's hard-coded 1.01); ``None``
      disables the limiter.
    residual_uses_scale: ``True`` (the reference) subtracts ``alpha *
      up(R)``, ``False`` (the paper) ``up(R)``; equal for ``alpha = 1``.

  Returns:
    A residual closer element for :func:`~lowrank_optax.chain`.

  Raises:
    ValueError (at ``init``): a leaf projected on both sides (no channel
    axis), or of rank 0 (no ratio).

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(64, scale=0.25),
    ...                lro.scale_by_adam_hf(correct_bias=False),
    ...                lro.fira_residual(),
    ...                lro.scale_by_hf_bias_correction(),
    ...                optax.scale_by_learning_rate(1e-2))

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_; official code
    https://github.com/xichen-fy/Fira (``optimizer_torch/fira_adamw.py``).
  """
  return residual_lib.ResidualElement(
      FiraResidual(norm_growth_limit, residual_uses_scale))


class ScaleByHFBiasCorrectionState(NamedTuple):
  """State of :func:`scale_by_hf_bias_correction`."""

  count: jax.Array  # completed updates, int32


def scale_by_hf_bias_correction(
    b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies updates by the HF-Adam bias correction ``sqrt(1 - b2^t) / (1 - b1^t)``.

  ``t`` is the 1-based step (this transform's own counter). Together with
  ``lro.scale_by_adam_hf(correct_bias=False)`` earlier in the chain it gives
  ``lro.scale_by_adam_hf()`` with the correction moved after whatever runs
  in between (Fira's and APOLLO's ratios and limiter, which the reference
  computes from the uncorrected direction; ALGORITHMS.md 0.2 (A)).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> tx = lro.scale_by_hf_bias_correction(0.9, 0.999)
    >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> round(float(u[0]), 5)  # sqrt(0.001) / 0.1
    0.31623

  References:
    ``galore_torch/adamw.py`` / ``fira_adamw.py`` / ``apollo.py``:
    ``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)``.
  """

  def init_fn(params):
    del params
    return ScaleByHFBiasCorrectionState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = numerics.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    # 1 - b^t as -expm1(t log b), as lro.scale_by_adam_hf does.
    bc1 = -jnp.expm1(t * transforms._log(b1))  # pylint: disable=protected-access
    bc2 = -jnp.expm1(t * transforms._log(b2))  # pylint: disable=protected-access
    factor = jnp.sqrt(bc2) / bc1
    new = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return new, ScaleByHFBiasCorrectionState(count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _hf_adam_around(closer, b1: float, b2: float, eps: float, state_dtype):
  """HF Adam in the subspace, ``closer``, then the Adam bias correction.

  The chain elements Fira and APOLLO share: the references compute their
  ratios and limiter from the uncorrected HF Adam direction and apply the
  bias correction afterwards (:func:`scale_by_hf_bias_correction`).
  """
  return (transforms.scale_by_adam_hf(b1=b1, b2=b2, eps=eps,
                                      correct_bias=False, mu_dtype=state_dtype,
                                      nu_dtype=state_dtype),
          closer,
          scale_by_hf_bias_correction(b1, b2))


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: str = "subspace_iteration",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    norm_growth_limit: Optional[float] = 1.01,
    residual_uses_scale: bool = True,
    stagger: bool = False,
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    subspace_iters: int = 1,
    subspace_init_iters: int = 4,
    on_refresh: str = "keep",
    dct_score: str = "l1",
    state_dtype: Any = None,
    basis_dtype: Any = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Fira-AdamW; with ``projector="svd"`` step for step the official ``FiraAdamW``.

  For a projected matrix with gradient ``G_t`` (``t`` 1-based), basis
  refreshed at 0-based steps ``0, T, 2T, ...`` and ``R_t = down(G_t)``:

  .. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) R_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2,\quad
    N_t = \frac{m_t}{\sqrt{v_t}+\epsilon}, \\
    \Psi_t &= \mathrm{limit}_\gamma\big((G_t - \alpha\,\mathrm{up}(R_t))
      \odot \phi_t\big),\quad
    \phi_{t,c} = \frac{\|N_{t,:,c}\|}{\|R_{t,:,c}\| + 10^{-8}}, \\
    W_{t+1}' &= W_t - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \big(\alpha\,\mathrm{up}(N_t) + \Psi_t\big),\qquad
    W_{t+1} = W_{t+1}' - \eta_t \lambda W_{t+1}'

  (:func:`fira_residual`, :func:`limit_norm_growth`). Moments, the step
  counter and the limiter state are kept across refreshes. Leaves that are not
  projected take HF-style AdamW with the unscaled learning rate. Same
  keywords and defaults as :func:`~lowrank_optax.galore`, plus the two of the
  residual.

  Deviations from the official code:

  * The default projector is warm-started subspace iteration (as
    :func:`~lowrank_optax.galore`); ``projector="svd"`` is the reference's.
  * The channel axis comes from the projection side, not from ``N``'s shape
    (the same for ``std``; see :mod:`lowrank_optax.fira`); ``proj_type="full"``
    raises at ``init`` (the reference fails to broadcast there).
  * The ratios and the limiter are computed in float32 and the limiter's
    state is float32 whatever the param dtype (the reference: the param's).
  * ``norm_growth_limit`` (the reference hard-codes 1.01; ``None``
    disables it) and ``residual_uses_scale`` (``False``: the paper's
    ``E = G - up(R)``) are options.
  * With ``on_refresh="reset"`` the moments restart but the bias correction
    (a full-space transform with its own counter) does not.
  * ``scale`` defaults to 0.25 (the reference scripts'; the class default
    ``alpha`` is 1.0).
  * A non-finite gradient is not applied by default (``skip_nonfinite``, as
    in :func:`~lowrank_optax.galore`); the reference applies it.

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: rank policy (see :func:`~lowrank_optax.galore_project`).
    update_proj_gap: ``T``.
    scale: ``alpha`` (0.25 in the reference's 60M-350M scripts, 0.0625 at 1B).
    proj_type: ``std | reverse_std | left | right`` (``full`` is rejected).
    projector: ``subspace_iteration`` (default), ``svd`` (the reference),
      ``eigh``, ``randomized``, ``dct``, ``orthogonal``, ...
    b1, b2, eps: Adam, HF convention (reference: 0.9, 0.999, 1e-6).
    weight_decay: ``lambda``, decoupled, applied to the updated weights.
    weight_decay_mask: optional mask for the decay.
    norm_growth_limit: ``gamma`` of the limiter (1.01), or ``None``.
    residual_uses_scale: see :func:`fira_residual`.
    stagger, dimension_numbers, exclude, seed: as in
      :func:`~lowrank_optax.galore`.
    subspace_iters, subspace_init_iters, on_refresh, dct_score: as in
      :func:`~lowrank_optax.galore`.
    state_dtype, basis_dtype, skip_nonfinite: as in
      :func:`~lowrank_optax.galore`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": jnp.ones((64, 64)), "norm": jnp.ones(64)}
    >>> tx = lro.fira(learning_rate=1e-2, rank=8)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_; official code
    https://github.com/xichen-fy/Fira (``optimizer_torch/fira_adamw.py``,
    ``optimizer_torch/gradient_projection.py``; PyPI ``fira==1.0.2``).
  """
  return skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.galore_project(
          rank, update_proj_gap=update_proj_gap, scale=scale,
          proj_type=proj_type, projector=projector, stagger=stagger,
          dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
          subspace_iters=subspace_iters,
          subspace_init_iters=subspace_init_iters, on_refresh=on_refresh,
          dct_score=dct_score, state_dtype=state_dtype,
          basis_dtype=basis_dtype),
      *_hf_adam_around(fira_residual(norm_growth_limit, residual_uses_scale),
                       b1, b2, eps, state_dtype),
      optax.scale_by_learning_rate(learning_rate),
      *_maybe_weight_decay(learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)
