"""Online Subspace Descent: GaLore whose basis follows the gradients by online PCA.

Liang, Liu, Chen, Liu (NeurIPS 2024): instead of recomputing the projector by
an SVD every ``T`` steps, the projector is initialised by one SVD and then
updated every step by one step of its own optimizer on the online-PCA loss
``||P P^T G_hat - G_hat||^2``. The pieces are the library's: the
``"online_pca"`` projector
(:class:`~lowrank_optax.projectors.OnlinePCAProjector`), GaLore's HF-style
Adam in the subspace and post-update weight decay; :func:`online_subspace_descent`
composes them.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax.numpy as jnp
import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import recipes
from lowrank_optax import subspace as subspace_lib
from lowrank_optax import transforms

__all__ = ["online_subspace_descent", "schedule_ratio"]


def schedule_ratio(learning_rate: optax.ScalarOrSchedule,
                   peak_learning_rate: Optional[float] = None
                   ) -> Optional[Callable[[Any], Any]]:
  """``count -> lr_t / lr_0``: the reference's scaling of the basis optimizer's rate.

  The reference sets the basis optimizer's learning rate to ``(1/T) *
  group["lr"] / init_lr`` at every step, where ``group["lr"]`` is the main
  optimizer's current (scheduled) rate and ``init_lr`` its construction rate
  (the schedule's peak).

  Args:
    learning_rate: the main learning rate: a float (ratio 1), an optax
      schedule, or an array (under ``optax.inject_hyperparams``: the
      current rate).
    peak_learning_rate: ``lr_0``; needed when ``learning_rate`` is not a
      Python float.

  Returns:
    ``None`` for a constant float rate (the ratio is 1), else a function of
    the 0-based count.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> s = optax.linear_schedule(0.0, 1e-2, transition_steps=10)
    >>> float(lro.osd.schedule_ratio(s, 1e-2)(5))
    0.5
  """
  if isinstance(learning_rate, numbers.Real):
    if peak_learning_rate is None:
      return None
    return lambda count: learning_rate / peak_learning_rate
  if peak_learning_rate is None:
    raise ValueError(
        "online_subspace_descent with a learning-rate schedule needs"
        " peak_learning_rate (the reference's lr_0: the basis optimizer's"
        " rate is (1/T) * lr_t / lr_0), e.g. the schedule's peak_value; or"
        " pass p_lr_multiplier=(count -> factor).")
  if callable(learning_rate):
    return lambda count: learning_rate(count) / peak_learning_rate
  return lambda count: jnp.asarray(learning_rate) / peak_learning_rate


def online_subspace_descent(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    p_optimizer: Optional[optax.GradientTransformation] = None,
    peak_learning_rate: Optional[float] = None,
    p_lr_multiplier: Optional[Callable[[Any], Any]] = None,
    proj_type: str = "std",
    stagger: bool = False,
    on_refresh: str = "keep",
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    state_dtype: Any = None,
    basis_dtype: Any = None,
    skip_nonfinite: Any = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Online Subspace Descent (OSD) with AdamW: GaLore with an online-PCA projector.

  For a projected matrix with gradient ``G_t`` (``t`` 1-based) and basis
  ``P_t`` (:class:`~lowrank_optax.projectors.OnlinePCAProjector`; the
  top-``r`` singular vectors of ``G_1`` at the first step):

  .. math::
    R_t &= \mathrm{down}_{P_t}(G_t),\quad
    N_t = \mathrm{AdamHF}(R_t),\quad
    W_{t+1} = W_t' - \eta_t\lambda W_t',\ \
    W_t' = W_t - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\alpha\,
      \mathrm{up}_{P_t}(N_t), \\
    P_{t+1} &= P_t + \frac{\eta_t}{\eta_0}\,
      \mathrm{opt}_P\big(\nabla_P \lVert P P^\top \hat G_t - \hat G_t
      \rVert_F^2\big) \ (t \ge 2),\qquad \hat G_t = G_t/\lVert G_t\rVert_F,

  where ``opt_P`` is the basis optimizer's update (default AdamW with rate
  ``1/T``, weight decay 0.01) and ``P`` is never re-orthonormalised. Everything
  else is :func:`~lowrank_optax.galore` (HF Adam, ``alpha``, post-update
  weight decay, unprojected leaves at full rank).

  Reference: ``--proj_type continuous`` in
  ``galore_torch/galore_projector.py`` with ``galore_torch/adamw.py``
  (``kyleliang919/Online-Subspace-Descent``). What it does and where this
  recipe differs:

  * First call per parameter: ``P`` from the SVD of ``G`` (GaLore's
    ``get_orthogonal_matrix``) and ``torch.optim.AdamW([P], lr=1/T)``
    created (betas (0.9, 0.999), eps 1e-8, weight decay 0.01: torch's
    defaults); no basis step (``P.grad`` is ``None``). Here the refresh at
    count 0 (``projector="svd"``'s) and no basis step at count 0.
  * Later calls: the loss ``||G_hat P^T P - G_hat||^2`` (right) or ``||P
    P^T G_hat - G_hat||^2`` (left) is back-propagated at the current ``P``,
    the rate is set to ``(1/T) * group["lr"] / init_lr``; ``R`` and the
    back-projection use this ``P``; the basis optimizer steps in
    ``project_back``, after the weight update. Here the closed-form gradient
    (ALGORITHMS.md 8, :func:`~lowrank_optax.projectors.online_pca_grad`:
    no ``n x n`` matrix; the reference's autograd forms ``P^T P``) in the
    projector's ``advance``, after the update's ``down`` / ``up``, with the
    rate multiplied by ``p_lr_multiplier(count)`` (default ``lr_t / lr_0``
    from ``learning_rate`` and ``peak_learning_rate``).
  * ``init_lr`` is the lr the optimizer was built with (the schedule's
    peak); an optax schedule does not carry it, so a scheduled
    ``learning_rate`` needs ``peak_learning_rate`` (or an explicit
    ``p_lr_multiplier``). A constant float rate gives the ratio 1.
  * The basis and its optimizer's state are in ``basis_dtype`` (default the
    param's; the reference: the param's, bf16 in its scripts); the loss
    gradient is computed in float32 (reference: the param dtype).
  * A gradient ``G = 0`` (the reference divides by ``||G|| = 0`` and gets
    NaN): zero loss gradient; a non-finite gradient leaves the basis and its
    optimizer unchanged (with the leaf's other state).
  * ``rank``, ``proj_type``, ``update_proj_gap`` (only the basis rate
    ``1/T``: the basis is never recomputed), ``stagger`` and
    ``on_refresh`` (no effect: the only refresh is the first step's) are
    accepted like :func:`~lowrank_optax.galore`'s; parameters projected:
    the library's default policy (attention / MLP kernels; embeddings,
    ``lm_head``, norms, biases at full rank), as the reference scripts'
    ``attn`` / ``mlp`` modules. Only the AdamW variant (``continuous``); the
    reference's ``continuous_{adam8bit,lion,adafactor,sgd}`` are other
    ``p_optimizer``\ s (e.g. ``optax.sgd(1/T)``, ``optax.lion(1/T)``).

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: rank policy (see :func:`~lowrank_optax.galore_project`).
    update_proj_gap: ``T``: the default basis optimizer's rate is ``1/T``.
    scale: ``alpha`` (0.25 in the reference scripts).
    b1, b2, eps: the main Adam, HF convention (reference 0.9, 0.999, 1e-6).
    weight_decay: ``lambda``, decoupled, applied to the updated weights.
    weight_decay_mask: optional mask for the decay.
    p_optimizer: the basis optimizer, its learning rate included (default
      :func:`~lowrank_optax.projectors.default_p_optimizer` ``(T)``).
    peak_learning_rate: ``lr_0`` for a scheduled ``learning_rate``.
    p_lr_multiplier: ``count -> factor`` multiplying the basis optimizer's
      update; overrides the ratio from ``learning_rate``.
    proj_type, stagger, on_refresh, dimension_numbers: as in
      :func:`~lowrank_optax.galore`.
    exclude, seed, state_dtype, basis_dtype: as in
      :func:`~lowrank_optax.galore`.
    skip_nonfinite: see :func:`~lowrank_optax.skip_nonfinite_steps`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": jnp.ones((64, 64)), "norm": jnp.ones(64)}
    >>> sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100)
    >>> tx = lro.online_subspace_descent(sched, rank=8, update_proj_gap=200,
    ...                                  peak_learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params),
    ...                            state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Liang, Liu, Chen, Liu, `Memory-Efficient LLM Training with Online
    Subspace Descent <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024;
    official code https://github.com/kyleliang919/Online-Subspace-Descent
    (``galore_torch/galore_projector.py``, ``galore_torch/adamw.py``).
  """
  # Numeric arguments may arrive as arrays under optax.inject_hyperparams.
  if isinstance(update_proj_gap, bool) or (
      isinstance(update_proj_gap, numbers.Number)
      and (update_proj_gap != int(update_proj_gap) or update_proj_gap < 1)):
    raise ValueError(f"update_proj_gap must be a positive int, got"
                     f" {update_proj_gap!r}.")
  policy_lib.check_rank_spec(rank)
  policy_lib.check_proj_type(proj_type)
  if p_lr_multiplier is None:
    p_lr_multiplier = schedule_ratio(learning_rate, peak_learning_rate)
  projector = projectors_lib.OnlinePCAProjector(
      optimizer=p_optimizer, update_proj_gap=update_proj_gap,
      lr_multiplier=p_lr_multiplier)
  return recipes.skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.ProjectionElement(subspace_lib.ProjectionConfig(
          rank=rank, update_proj_gap=update_proj_gap, scale=scale,
          proj_type=proj_type, projector=projector, on_refresh=on_refresh,
          stagger=stagger, dimension_numbers=dimension_numbers,
          exclude=exclude, seed=seed, state_dtype=state_dtype,
          basis_dtype=basis_dtype)),
      transforms.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype,
                                  nu_dtype=state_dtype),
      subspace_lib.back_project(),
      optax.scale_by_learning_rate(learning_rate),
      *recipes._maybe_weight_decay(  # pylint: disable=protected-access
          learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)
