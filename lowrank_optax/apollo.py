"""APOLLO and APOLLO-Mini: the raw gradient scaled by Adam's ratio estimated in a random subspace.

APOLLO (Zhu et al., 2025) runs Adam on a random projection ``R`` of the
gradient only to *estimate* by how much Adam would rescale each channel (or
the whole matrix), and applies that factor to the raw full gradient: the
update is ``G * s`` with ``s = ||N|| / (||R|| + 1e-8)``, no back-projection.
With a Gaussian projector (:class:`~lowrank_optax.projectors.GaussianProjector`,
regenerated from a key) a projected leaf keeps only its low-rank moments, a
limiter scalar and the key; APOLLO-Mini (rank 1, one factor per matrix) keeps
two vectors. In this library the scaling is a map-back closer,
:func:`apollo_scaling`, for :func:`~lowrank_optax.chain` (it replaces
``alpha * up(N)``); :func:`apollo` and :func:`apollo_mini` are the complete
optimizers. The norm-growth limiter and the full-space bias correction are
Fira's (:func:`~lowrank_optax.limit_norm_growth`,
:func:`~lowrank_optax.scale_by_hf_bias_correction`).

Findings from the official code (``zhuhanqing/APOLLO`` @ 76b3472,
``apollo_torch/apollo.py``, ``random_projector.py``, ``utils/setup.py``;
PyPI ``apollo-torch==1.0.3`` is the same code):

* Channel axis: ``norm_dim = 0 if G.shape[0] < G.shape[1] else 1``, decided
  from the *full* gradient's shape ``(out, in)``: for ``std`` the rank axis
  of ``R``, so one factor per output row (``out >= in``, right projection)
  or per input column (``out < in``, left). Here it comes from the plan's
  side, which is the same for ``std``; for forced ``left`` / ``right`` sides
  against ``std`` the reference reduces the wrong axis (and fails to
  broadcast).
* ``S = G * s`` uses ``p.grad``, the raw gradient. ``sqrt(scale)`` (not
  ``scale``) multiplies ``S``: before the limiter with ``scale_front``, after
  it otherwise; so with ``scale_front`` the limiter's recorded norms include
  ``sqrt(scale)``. The two orders agree exactly without the limiter, and
  with it they differ only through the limiter's ``+ 1e-8`` (the ratio of
  consecutive norms is scale-free): ``scale_front`` is practically a no-op
  unless ``||S||`` is near ``1e-8``.
* The limiter (``disable_nl=False`` by default) is Fira's, with its own state
  ``scaled_grad`` (previous post-limit norm), kept across refreshes; the
  first step only records.
* Ratios use the uncorrected ``N = m / (sqrt(v) + eps)`` and the current
  ``R``; ``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)`` multiplies the
  whole update; weight decay comes after the update, on the updated weights.
* Random projector: ``N(0, 1) / sqrt(r)`` drawn in float32 by a
  ``torch.Generator`` seeded with the param's seed and cast to the gradient
  dtype, regenerated when ``step % T == 0``; moments are kept. The seed
  starts at the 1-based index of the param in optimizer order (all groups)
  and advances by ``next_seed`` after every generation. ``proj_type="full"``
  raises ``NotImplementedError``.
* ``proj="svd"`` uses GaLore's SVD projector (its ``scale`` is unused since
  nothing is projected back).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

import jax.numpy as jnp
import optax

from lowrank_optax import fira as fira_lib
from lowrank_optax import policy as policy_lib
from lowrank_optax import residual as residual_lib
from lowrank_optax import sharding as shd
from lowrank_optax import subspace as subspace_lib
from lowrank_optax.recipes import _maybe_weight_decay
from lowrank_optax.recipes import skip_nonfinite_steps

__all__ = ["SCALE_TYPES", "ApolloScaling", "apollo_scaling", "apollo",
           "apollo_mini"]

SCALE_TYPES = ("channel", "tensor")


def _sqrt(x):
  if isinstance(x, numbers.Real):
    return math.sqrt(x)
  return jnp.sqrt(x)


def _is_one(x):
  return isinstance(x, numbers.Real) and x == 1.0


@dataclasses.dataclass(frozen=True)
class ApolloScaling(residual_lib.Closer):
  """APOLLO's map-back closer (see :func:`apollo_scaling`).

  Attributes:
    scale_type: ``"channel"`` or ``"tensor"``.
    scale: APOLLO's ``scale``; ``sqrt(scale)`` multiplies the term.
    scale_front: apply ``sqrt(scale)`` before the limiter.
    norm_growth_limit: ``gamma`` of the limiter, or ``None`` (no limiter).
  """

  role = "map_back"
  scale_type: str = "channel"
  scale: Any = 1.0
  scale_front: bool = False
  norm_growth_limit: Optional[float] = 1.01

  def __post_init__(self):
    if self.scale_type not in SCALE_TYPES:
      raise ValueError(f"Unknown scale_type {self.scale_type!r}; expected one"
                       f" of {SCALE_TYPES}.")
    if isinstance(self.scale, numbers.Real) and self.scale < 0:
      raise ValueError(f"scale must be >= 0 (sqrt(scale) is applied), got"
                       f" {self.scale}.")
    fira_lib._check_gamma(self.norm_growth_limit)  # pylint: disable=protected-access

  def init(self, plan, dtype):
    del dtype
    fira_lib._check_subspace(plan, "APOLLO's scaling")  # pylint: disable=protected-access
    if self.scale_type == "channel":
      fira_lib._reduced_axis(plan)  # pylint: disable=protected-access
    if self.norm_growth_limit is None:
      return optax.MaskedNode()
    return fira_lib.init_norm_growth(plan)

  def factor(self, ctx):
    """``s``: ``(*batch, 1, N)`` / ``(*batch, M, 1)`` (channel) or
    ``(*batch, 1, 1)`` (tensor), float32."""
    if self.scale_type == "channel":
      return fira_lib.channel_ratio(ctx.plan, ctx.inner, ctx.lowrank)
    num = jnp.sqrt(jnp.sum(jnp.square(ctx.inner.astype(jnp.float32)),
                           axis=(-2, -1), keepdims=True))
    den = jnp.sqrt(jnp.sum(jnp.square(ctx.lowrank.astype(jnp.float32)),
                           axis=(-2, -1), keepdims=True))
    return num / (den + fira_lib.RATIO_EPS)

  def apply(self, ctx, state):
    g = ctx.g
    s = g * self.factor(ctx).astype(g.dtype)
    root = None if _is_one(self.scale) else _sqrt(self.scale)
    if self.scale_front and root is not None:
      s = s * root
    if self.norm_growth_limit is not None:
      s, norm = fira_lib.limit_norm_growth(s, state.norm,
                                           self.norm_growth_limit)
      state = fira_lib.NormGrowthState(shd.like(norm, state.norm))
    if not self.scale_front and root is not None:
      s = s * root
    return s.astype(g.dtype), state


def apollo_scaling(scale_type: str = "channel",
                   scale: Any = 1.0,
                   scale_front: bool = False,
                   norm_growth_limit: Optional[float] = 1.01,
                   ) -> residual_lib.ResidualElement:
  r"""APOLLO's update: the raw gradient scaled by the subspace's Adam ratio.

  A map-back closer for :func:`~lowrank_optax.chain`: instead of ``alpha *
  up(N)`` each projected leaf's subspace result becomes

  .. math::
    s = \frac{\|N\|}{\|R\| + 10^{-8}}, \qquad
    S = \sqrt{\mathrm{scale}}\cdot\mathrm{limit}_\gamma(G \odot s)

  with ``s`` per channel of the non-projected axis (``scale_type="channel"``;
  one factor per output column when the input side is reduced, per input
  row otherwise) or per matrix (``"tensor"``). ``R`` is the low-rank
  gradient, ``N`` the inner transform's output (for the reference, the
  uncorrected HF Adam direction: ``lro.scale_by_adam_hf(correct_bias=False)``
  inside and :func:`~lowrank_optax.scale_by_hf_bias_correction` after).
  ``limit`` is Fira's :func:`~lowrank_optax.limit_norm_growth` (one scalar
  per matrix, kept across refreshes; the first step records). With
  ``scale_front`` the factor ``sqrt(scale)`` is applied before the limiter.
  A residual closer may follow (e.g. :func:`~lowrank_optax.sign_residual`);
  its ``E = G - up(R)`` uses the projector's ``up``.

  Args:
    scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
    scale: APOLLO's ``scale``; the multiplier applied is ``sqrt(scale)``
      (scale 128 -> 11.3).
    scale_front: apply ``sqrt(scale)`` before the limiter (the reference's
      ``scale_front``) instead of after.
    norm_growth_limit: ``gamma`` (1.01); ``None`` disables the limiter (the
      reference's ``disable_nl=True``).

  Returns:
    A map-back closer element for :func:`~lowrank_optax.chain`.

  Raises:
    ValueError (at ``init``): rank 0, or channel scaling of a leaf projected
    on both sides (no channel axis; tensor scaling works there).

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(64, projector="gaussian"),
    ...                lro.scale_by_adam_hf(correct_bias=False),
    ...                lro.apollo_scaling("channel"),
    ...                lro.scale_by_hf_bias_correction(),
    ...                optax.scale_by_learning_rate(1e-2))

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025; official code
    https://github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py``).
  """
  return residual_lib.ResidualElement(
      ApolloScaling(scale_type, scale, scale_front, norm_growth_limit))


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 256,
    *,
    scale_type: str = "channel",
    scale: Any = 1.0,
    projector: str = "gaussian",
    update_proj_gap: int = 200,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    scale_front: bool = False,
    norm_growth_limit: Optional[float] = 1.01,
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
  r"""APOLLO-AdamW; step for step the official ``APOLLOAdamW`` (given its projection).

  For a projected matrix with gradient ``G_t`` (``t`` 1-based), random
  projection ``P`` redrawn at 0-based steps ``0, T, 2T, ...`` and ``R_t =
  down(G_t)`` (``P^T G`` or ``G P``):

  .. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) R_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2,\quad
    N_t = \frac{m_t}{\sqrt{v_t}+\epsilon},\quad
    s_t = \frac{\|N_t\|}{\|R_t\| + 10^{-8}}, \\
    W_{t+1}' &= W_t - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \sqrt{\mathrm{scale}}\;\mathrm{limit}_\gamma(G_t \odot s_t),\qquad
    W_{t+1} = W_{t+1}' - \eta_t \lambda W_{t+1}'

  (:func:`apollo_scaling`; ``s`` per channel or per matrix). Moments, the
  step counter and the limiter state are kept across refreshes. Leaves that
  are not projected take HF-style AdamW with the unscaled learning rate and
  no ``sqrt(scale)``. With the default Gaussian projector a projected leaf's
  state is its low-rank moments, one limiter scalar per matrix and an
  8-byte key (ALGORITHMS.md 12); the projection is regenerated every step.

  The reference's hyper-parameters: ``rank`` 256 (128 at 60M, 192 at 130M),
  ``scale_type="channel"``, ``scale=1``, ``update_proj_gap=200``, lr 0.01.

  Deviations from the official code:

  * The random matrices come from JAX's generator keyed by ``(seed, leaf
    index among projected leaves, refresh step)``, not from torch generators
    seeded by the param's index and ``next_seed`` (no bitwise parity with
    torch; the parity test injects them).
  * The channel axis comes from the projection side, not the gradient's
    shape (the same for ``std``; see :mod:`lowrank_optax.apollo`).
  * ``proj_type="full"`` works with ``scale_type="tensor"`` and the Gaussian
    projector (two independent sketches; the reference raises); channel
    scaling rejects it at ``init``.
  * Ratios and the limiter are computed in float32, the limiter state is
    float32.
  * ``norm_growth_limit`` generalises ``disable_nl`` (``None``) and the
    hard-coded 1.01; with ``on_refresh="reset"`` the moments restart but the
    bias correction does not.
  * A non-finite gradient is not applied by default (``skip_nonfinite``, as
    in :func:`~lowrank_optax.galore`); the reference applies it.

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: rank policy (see :func:`~lowrank_optax.galore_project`).
    scale_type: ``"channel"`` or ``"tensor"``.
    scale: APOLLO's ``scale``; ``sqrt(scale)`` is applied.
    projector: ``gaussian`` (the reference's ``proj="random"``), ``svd``
      (its ``proj="svd"``), or any other projector name or instance.
    update_proj_gap: ``T``.
    proj_type: ``std | reverse_std | left | right`` (``full``: see above).
    b1, b2, eps: Adam, HF convention (reference: 0.9, 0.999, 1e-6).
    weight_decay: ``lambda``, decoupled, applied to the updated weights.
    weight_decay_mask: optional mask for the decay.
    scale_front: apply ``sqrt(scale)`` before the limiter.
    norm_growth_limit: ``gamma`` (1.01); ``None`` is ``disable_nl=True``.
    stagger, dimension_numbers, exclude, seed: as in
      :func:`~lowrank_optax.galore` (``seed`` also seeds the Gaussian
      projections).
    subspace_iters, subspace_init_iters, on_refresh, dct_score: as in
      :func:`~lowrank_optax.galore`.
    state_dtype, basis_dtype, skip_nonfinite: as in
      :func:`~lowrank_optax.galore` (``basis_dtype`` applies to stored
      bases, e.g. ``projector="svd"``).

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": jnp.ones((64, 96)), "norm": jnp.ones(64)}
    >>> tx = lro.apollo(learning_rate=1e-2, rank=16)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025; official code
    https://github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py``,
    ``apollo_torch/random_projector.py``; PyPI ``apollo-torch==1.0.3``).
  """
  return skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.galore_project(
          rank, update_proj_gap=update_proj_gap, scale=1.0,
          proj_type=proj_type, projector=projector, stagger=stagger,
          dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
          subspace_iters=subspace_iters,
          subspace_init_iters=subspace_init_iters, on_refresh=on_refresh,
          dct_score=dct_score, state_dtype=state_dtype,
          basis_dtype=basis_dtype),
      *fira_lib._hf_adam_around(  # pylint: disable=protected-access
          apollo_scaling(scale_type, scale, scale_front, norm_growth_limit),
          b1, b2, eps, state_dtype),
      optax.scale_by_learning_rate(learning_rate),
      *_maybe_weight_decay(learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    scale: Any = 128.0,
    scale_front: bool = False,
    projector: str = "gaussian",
    update_proj_gap: int = 200,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    norm_growth_limit: Optional[float] = 1.01,
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
  r"""APOLLO-Mini: :func:`apollo` at rank 1 with one scaling factor per matrix.

  ``lro.apollo(learning_rate, rank=1, scale_type="tensor", scale=scale,
  scale_front=scale_front, ...)``: the update of a projected matrix is
  ``sqrt(scale) * limit(G * ||N|| / (||R|| + 1e-8))`` with ``R`` a random
  rank-1 sketch of ``G``, so its state is two vectors (the moments of ``R``,
  of the larger dimension), a limiter scalar and an 8-byte key.

  The reference scripts: ``scale`` 128 (192 at 130M) with ``scale_front``
  at 60M / 130M, without at 350M and above; lr 0.01, ``T = 200``.

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    scale: APOLLO's ``scale`` (``sqrt(scale)`` is applied; 128 -> 11.3).
    scale_front: apply ``sqrt(scale)`` before the limiter.
    projector, update_proj_gap, proj_type: as in :func:`apollo`.
    b1, b2, eps, weight_decay, weight_decay_mask: as in :func:`apollo`.
    norm_growth_limit, stagger, dimension_numbers: as in :func:`apollo`.
    exclude, seed, subspace_iters, subspace_init_iters: as in
      :func:`apollo`.
    on_refresh, dct_score, state_dtype, basis_dtype: as in :func:`apollo`.
    skip_nonfinite: as in :func:`apollo`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"mlp": jnp.ones((32, 96))}
    >>> tx = lro.apollo_mini(1e-2)
    >>> state = tx.init(params)
    >>> lro.subspace_state(state).inner[0][0].mu.shape  # a rank-1 sketch
    (1, 96)

  References:
    Zhu et al., APOLLO, arXiv 2412.05270; official code
    https://github.com/zhuhanqing/APOLLO (``scripts/pretrain_c4``).
  """
  return apollo(
      learning_rate, 1, scale_type="tensor", scale=scale,
      scale_front=scale_front, projector=projector,
      update_proj_gap=update_proj_gap, proj_type=proj_type, b1=b1, b2=b2,
      eps=eps, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
      norm_growth_limit=norm_growth_limit, stagger=stagger,
      dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
      subspace_iters=subspace_iters, subspace_init_iters=subspace_init_iters,
      on_refresh=on_refresh, dct_score=dct_score, state_dtype=state_dtype,
      basis_dtype=basis_dtype, skip_nonfinite=skip_nonfinite)
