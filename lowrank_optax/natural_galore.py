r"""Natural GaLore: GaLore with an inverse empirical-Fisher transform of the low-rank gradient.

The pieces already exist: the projection (:func:`~lowrank_optax.galore_project`,
two-sided by default, as the reference), the Fisher transform
(:func:`~lowrank_optax.scale_by_natural_fisher`), HF-style Adam
(:func:`~lowrank_optax.scale_by_adam_hf`) and GaLore's post-update weight
decay (:func:`~lowrank_optax.decay_updated_weights`). This module adds the
recipe :func:`natural_galore`; the reference's projector is
:class:`~lowrank_optax.projectors.TuckerProjector` (``"tucker"``): for a
matrix, the Tucker (HOOI) factors the reference computes are the top
singular vectors with tensorly's sign rule.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax.numpy as jnp
import optax

from lowrank_optax import fisher
from lowrank_optax import policy as policy_lib
from lowrank_optax import subspace as subspace_lib
from lowrank_optax import transforms
from lowrank_optax.recipes import _maybe_weight_decay
from lowrank_optax.recipes import skip_nonfinite_steps

__all__ = ["natural_galore"]


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    history: int = 20,
    damping: float = 1e-3,
    proj_type: str = "full",
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
  r"""Natural GaLore: two-sided GaLore-AdamW on the damped inverse-Fisher gradient.

  For a projected matrix with gradient ``G_t`` (``t`` 1-based) and bases
  ``U`` (output axis) and ``V`` (input axis) refreshed from ``G`` at 0-based
  steps ``0, T, 2T, ...``:

  .. math::
    R_t &= U^\top G_t V \ (r \times r), \quad
    \tilde g_t = (\lambda I + H_t^\top H_t)^{-1} \mathrm{vec}(R_t), \quad
    H_t = [\mathrm{vec}(R_{t-s+1}); \dots; \mathrm{vec}(R_t)], \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) \tilde g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde g_t^2, \\
    W_{t+1}' &= W_t - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
      \alpha\, U \frac{m_t}{\sqrt{v_t}+\epsilon} V^\top,\qquad
    W_{t+1} = W_{t+1}' - \eta_t \lambda_{wd} W_{t+1}'.

  The window ``H`` holds the last ``s`` low-rank gradients, the current one
  included (zero rows until it fills), and there is no ``1/s`` averaging. At
  a refresh the Adam moments, the step counter and the window are all kept
  (old-basis vectors stay in the window for up to ``s`` steps), as in the
  reference. Leaves that are not projected (embeddings, ``lm_head``, norms,
  1-D, matrices no larger than the rank) take the plain HF-style AdamW step
  with the unscaled learning rate and no Fisher transform; the weight decay
  acts on every leaf (``weight_decay_mask`` to restrict it).

  Defaults are the reference's pre-training scripts (LLaMA-60M: ``rank=128``;
  130M/350M: 256; 1B: 1024; ``lr=0.01``, ``T=200``, ``alpha=0.25``, ``s=20``,
  ``lambda=1e-3``) and its ``SubSpaceAdamW`` (``betas=(0.9, 0.999)``,
  ``eps=1e-6``, bias correction). ``weight_decay=0`` is the 130M/350M/1B
  scripts' value; the 60M script (and the argparse default) uses ``0.01``.

  Memory per projected ``m x n`` matrix (ALGORITHMS.md 12): bases ``mr +
  nr``, moments ``2 r^2``, window ``s r^2`` (plus two int32 counters). The
  window is small only because the projection is two-sided: with a
  one-sided ``proj_type`` (``"std"``) it holds ``s`` copies of the ``r x
  max(m, n)`` low-rank gradient, which is **more than Adam's whole state**
  ``2mn`` whenever ``s r > 2 min(m, n)``: at LLaMA-1B shapes (``2048 x
  2048``, ``2048 x 5461``) with ``r=512`` the window alone is 2.5x Adam's
  state, with the script's ``r=1024`` 5x (tests/test_natural_galore.py
  checks this with :func:`~lowrank_optax.memory_report`).

  Deviations from the official code (``selfsupervised-ai/Natural-GaLore``,
  ``code/natural_galore/subspace_adamw.py``, ``galore_projector_tensor.py``):

  * **Projector.** The reference computes a Tucker decomposition (tensorly,
    HOOI) with rank ``r`` on both modes; for a matrix its factors are the
    top-``r`` singular vectors with tensorly's sign rule (``projector=
    "tucker"`` reproduces them, :class:`~lowrank_optax.projectors.TuckerProjector`; ``"svd"`` gives
    the same subspaces with LAPACK's signs). The default here is the
    library's ``subspace_iteration`` (one warm-started block power step and
    Cholesky-QR per refresh), as in :func:`~lowrank_optax.galore`: a fraction
    of an SVD's cost, and on the GaLore main job a lower held-out loss than
    the SVD (benchmarks/RESULTS.md, "Default projector"). It matters more
    here than in GaLore: the Adam moments *and* the Fisher window are kept
    across refreshes, and a warm-started basis keeps its columns aligned
    with the previous ones, so the kept coordinates stay meaningful, where
    an SVD may reorder or flip them (the reference's sign rule does this
    only in part).
  * **Fisher solve.** The reference evaluates the Woodbury form
    ``g / lambda - lambda^-2 H^T (I + H H^T / lambda)^{-1} H g`` by a
    float32 Cholesky, which cancels (relative error ``~ eps ||g||^2 /
    lambda``) and fails with NaN once the window is rank-deficient and
    ``||g||^2 / lambda`` is large; here the same quantity is computed by the
    stable in-window solve of :func:`~lowrank_optax.scale_by_natural_fisher`
    (same maths).
  * **proj_type.** The reference is always two-sided (its README's
    ``proj_type='std'`` raises ``NotImplementedError``). Every GaLore
    ``proj_type`` is accepted here (see the memory note above for one-sided
    windows); higher-order leaves are matrix views with batch axes, each
    matrix projected on its own (the reference's Tucker would project every
    mode; it only ever projects 2-D ``nn.Linear`` weights).
  * ``history=0`` turns the transform off (the method is then two-sided
    GaLore); the reference's buffer cannot be empty.
  * **Dtypes.** The window is stored in the low-rank gradient's dtype
    (``state_dtype``, default the param's) and solved in float32. The
    reference's scripts train with Lightning's ``bf16-mixed`` (float32
    weights and gradients), so there the window is float32.
  * Not offered: the reference's ``online_galore`` / ``online_natural_galore``
    variants (an AdamW on the Tucker factors every step; see Online Subspace
    Descent for the online-PCA projector), and its ``amsgrad`` /
    ``maximize`` flags. Non-finite gradients are handled by
    ``skip_nonfinite`` (the reference has no guard).

  Args:
    learning_rate: ``eta``, a float or an optax schedule (reference 0.01).
    rank: rank policy (int, fraction, dict of path regexes, or callable; see
      :func:`~lowrank_optax.galore_project`); shape-defining.
    update_proj_gap: ``T``.
    scale: ``alpha``, multiplies the mapped-back Adam direction only.
    history: ``s``, the window length (shape-defining); ``0`` disables the
      Fisher transform.
    damping: ``lambda`` of the Fisher (reference 1e-3, hard-coded there).
    proj_type: ``full`` (two-sided, the reference) or a one-sided type
      (``std``, ``reverse_std``, ``left``, ``right``).
    projector: ``subspace_iteration`` (default), ``tucker`` (the reference's
      factors), ``svd``, ``eigh``, ``randomized``, ``dct``, ... or a
      :class:`~lowrank_optax.projectors.Projector` instance.
    b1, b2, eps: Adam, HF convention (reference 0.9, 0.999, 1e-6).
    weight_decay: ``lambda_wd``, decoupled, applied to the updated weights of
      every leaf with the unscaled learning rate.
    weight_decay_mask: optional mask for the decay.
    stagger: spread the leaves' refreshes over the period.
    dimension_numbers: matrix views (see :func:`~lowrank_optax.galore_project`).
    exclude: regex of paths kept at full rank by int / fraction policies.
    seed: seed of the projectors' random starts and sketches.
    subspace_iters: iterations per refresh of ``subspace_iteration``.
    subspace_init_iters: iterations of its first (cold) refresh.
    on_refresh: ``keep`` (the reference) or ``reset`` the Adam moments at a
      refresh (the window is kept either way).
    dct_score: column score of the ``dct`` projector.
    state_dtype: dtype of the low-rank gradient, the window and the Adam
      moments (default: the param's).
    basis_dtype: dtype of the stored bases (default: the param's).
    skip_nonfinite: see :func:`~lowrank_optax.skip_nonfinite_steps`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": jnp.ones((64, 48)), "norm": jnp.ones(48)}
    >>> tx = lro.natural_galore(learning_rate=1e-2, rank=8, history=4)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> window = lro.subspace_state(state).inner[0][0].history
    >>> window.shape[0], window.size  # s copies of the r x r gradient
    (4, 256)

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM
    training and fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024;
    official code https://github.com/selfsupervised-ai/Natural-GaLore
    (``code/natural_galore/subspace_adamw.py``,
    ``code/natural_galore/galore_projector_tensor.py``,
    ``code/scripts/benchmark_c4/``).
  """
  if (isinstance(history, bool) or not isinstance(history, numbers.Integral)
      or history < 0):
    raise ValueError(f"history must be an int >= 0 (0 disables the Fisher"
                     f" transform), got {history!r}.")
  fisher_tx = (() if history == 0 else
               (fisher.scale_by_natural_fisher(int(history), damping),))
  return skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.galore_project(
          rank, update_proj_gap=update_proj_gap, scale=scale,
          proj_type=proj_type, projector=projector, stagger=stagger,
          dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
          subspace_iters=subspace_iters,
          subspace_init_iters=subspace_init_iters, on_refresh=on_refresh,
          dct_score=dct_score, state_dtype=state_dtype,
          basis_dtype=basis_dtype),
      *fisher_tx,
      transforms.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype,
                                  nu_dtype=state_dtype),
      subspace_lib.back_project(),
      optax.scale_by_learning_rate(learning_rate),
      *_maybe_weight_decay(learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)
