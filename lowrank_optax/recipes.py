"""Complete optimizers with the reference settings, like ``optax.adamw``."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax import subspace as subspace_lib
from lowrank_optax import transforms

__all__ = ["galore", "skip_nonfinite_steps"]


#: ``optax.apply_if_finite``'s ``max_consecutive_errors`` for
#: ``skip_nonfinite="step"``: a non-finite step is never applied.
NEVER_APPLY_NONFINITE = 2**31 - 1


def _maybe_weight_decay(learning_rate, weight_decay, mask):
  """The post-update decay, omitted when it is statically zero."""
  if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
    return ()
  return (transforms.decay_updated_weights(learning_rate, weight_decay, mask),)


SKIP_NONFINITE = (True, False, "leaf", "step")


def skip_nonfinite_steps(tx: optax.GradientTransformation,
                         skip=True) -> optax.GradientTransformation:
  """What the recipes do about non-finite gradients (``skip_nonfinite=``).

  * ``True`` / ``"leaf"`` (the default): a leaf whose gradient is not finite
    keeps its optimizer state (:func:`~lowrank_optax.subspace` does that per
    leaf) and gets a zero update
    (:func:`~lowrank_optax.zero_nonfinite_updates`, appended to ``tx``); the
    other leaves step. A NaN loss makes every gradient NaN, and then the
    whole step is skipped. Counters (``optax.apply_if_finite``'s) are in the
    state. No update waits for the whole gradient, so this costs no memory in
    a jitted training step.
  * ``"step"``: ``optax.apply_if_finite(tx)``: one check of the whole
    gradient decides for the step. It makes every update wait for every
    gradient: at LLaMA-1B shapes the compiled training step's temp grows from
    2.95 GiB to 13.37 GiB, a peak of 1.28x AdamW's (benchmarks/RESULTS.md,
    "Non-finite guards").
  * ``False``: nothing (a non-finite update is returned as it is; the
    subspace still keeps the leaf's state).

  Args:
    tx: the optimizer.
    skip: one of ``True``, ``"leaf"``, ``"step"``, ``False``.

  Returns:
    The guarded optimizer.
  """
  if skip not in SKIP_NONFINITE:
    raise ValueError(f"skip_nonfinite must be one of {SKIP_NONFINITE}, got"
                     f" {skip!r}.")
  if skip is False:
    return tx  # (keeps tx's projection)
  if skip == "step":
    guarded = optax.apply_if_finite(
        tx, max_consecutive_errors=NEVER_APPLY_NONFINITE)
  else:
    guarded = optax.chain(tx, transforms.zero_nonfinite_updates())
  # Its counters go on the params' mesh like the rest of the state.
  out = optax.GradientTransformationExtraArgs(
      lambda params: subspace_lib.on_params_mesh(guarded.init(params), params),
      guarded.update)
  projection = getattr(tx, "projection", None)
  return out if projection is None else subspace_lib.with_projection(
      out, projection)


def galore(
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
  r"""GaLore-AdamW; with ``projector="svd"`` step for step the official ``GaLoreAdamW``.

  For a projected matrix with gradient ``G_t`` (``t`` 1-based) and basis
  ``Q`` refreshed from ``G`` at 0-based steps ``0, T, 2T, ...``:

  .. math::
    R_t &= \mathrm{down}(G_t),\quad
    m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2, \\
    W_{t+1}' &= W_t - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
      \alpha\,\mathrm{up}\!\left(\frac{m_t}{\sqrt{v_t}+\epsilon}\right),\qquad
    W_{t+1} = W_{t+1}' - \eta_t \lambda W_{t+1}'.

  Moments and the step counter are kept across refreshes. Leaves that are not
  projected (embeddings, ``lm_head``, norms, 1-D, and matrices no larger than
  the rank under the default policy) take the same HF-style AdamW step with
  the unscaled learning rate.

  The basis ``Q`` is, by default, refreshed by warm-started subspace
  iteration (one block power step from the previous basis, Cholesky-QR):
  matmuls and ``r x r`` work only, a fraction of the cost of the reference's
  SVD of every matrix (benchmarks/RESULTS.md; on the main job it also reached
  a lower held-out loss than the SVD). Its columns stay aligned
  with the previous basis, so the kept moments stay meaningful. Pass
  ``projector="svd"`` to reproduce ``GaLoreAdamW`` exactly (up to the SVD's
  signs; tests/test_parity_galore_torch.py).

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: rank policy (int, fraction, dict of path regexes, or callable;
      see :func:`~lowrank_optax.galore_project`). Shape-defining: under
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    update_proj_gap: ``T``.
    scale: ``alpha`` (0.25 in the reference pre-training scripts).
    proj_type: ``std | reverse_std | left | right | full``.
    projector: ``subspace_iteration`` (default), ``svd`` (the reference),
      ``eigh``, ``randomized``, ``dct`` (GaLore with SVD-free DCT column
      selection, Modoranu et al.; stores ``r`` indices per matrix).
    b1, b2, eps: Adam, HF convention (reference: 0.9, 0.999, 1e-6).
    weight_decay: ``lambda``, decoupled, applied to the updated weights.
    weight_decay_mask: optional mask for the decay.
    stagger: spread refreshes of the leaves over the period.
    dimension_numbers: matrix views (see :func:`~lowrank_optax.galore_project`).
    exclude: regex of paths kept at full rank by int / fraction policies.
    seed: seed of the random starts and sketches of the projectors.
    subspace_iters: iterations per refresh of ``subspace_iteration``.
    subspace_init_iters: iterations of its first (cold) refresh.
    on_refresh: ``keep`` the Adam moments and counter at a refresh (the
      reference), ``reset`` them, or (``projector="dct"``) ``rotate`` them:
      moments of DCT columns kept across the refresh move to their new slots.
    dct_score: column score of the ``dct`` projector, ``"l1"`` (the
      reference) or ``"l2"``.
    state_dtype: dtype of the Adam moments of every leaf (low-rank and
      full-rank), e.g. ``jnp.float32`` for ``bfloat16`` params; default: the
      param's (the reference keeps moments in the param dtype).
    basis_dtype: dtype of the stored bases; default: the param's.
    skip_nonfinite: what a non-finite gradient does: ``True`` (per leaf: that
      leaf keeps its state and gets a zero update; counted), ``"step"``
      (``optax.apply_if_finite``: the whole step is skipped, at a memory
      cost) or ``False`` (see :func:`skip_nonfinite_steps`).

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": jnp.ones((64, 64)), "norm": jnp.ones(64)}
    >>> tx = lro.galore(learning_rate=1e-2, rank=8, update_proj_gap=200)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; official code
    https://github.com/jiaweizzhao/GaLore (``galore_torch/adamw.py``,
    ``galore_torch/galore_projector.py``; PyPI ``galore-torch==1.0``).
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
      transforms.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype,
                                  nu_dtype=state_dtype),
      subspace_lib.back_project(),
      optax.scale_by_learning_rate(learning_rate),
      *_maybe_weight_decay(learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)
