"""DCT-AdamW: AdamW with low-rank state on dynamically selected DCT columns.

Modoranu et al. (arXiv 2505.17967): the state of every projected matrix is
Adam's ``m, v`` of the low-rank gradient ``R = G C[:, idx]`` (PyTorch
layout), where ``idx`` are the ``r`` columns of the orthonormal DCT-II matrix
``C`` with the largest ``l1`` scores ``||(G C)[:, j]||_1``, reselected every
``T`` steps (default every step). The pieces are the library's: the
``"dct"`` projector (:class:`~lowrank_optax.projectors.DCTProjector`, state
= ``r`` indices), ``optax.scale_by_adam`` (PyTorch-style Adam), and the
reference's choice of projected parameters and sides
(:class:`DCTAdamWConfig`); :func:`dct_adamw` composes them.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Optional

import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import recipes
from lowrank_optax import subspace as subspace_lib

__all__ = ["dct_adamw", "DCTAdamWConfig", "FORCED_RIGHT_SHAPES",
           "DCT_ADAMW_MAX_SHAPE"]

#: The reference's ``max_shape``: 2-D params with a dimension at least this
#: large (embeddings, ``lm_head``) take full AdamW.
DCT_ADAMW_MAX_SHAPE = 32000

#: PyTorch ``(rows, cols) = (out, in)`` sizes that the reference forces to the
#: right side (reduce ``in``, ``N = cols``) although ``rows < cols``: any
#: ``rows`` in the first set with any ``cols`` in the second ("fix for
#: Llama-3-8B ... (1024, 4096)", "fix for Qwen2.5-7B ... (512, 3584)").
FORCED_RIGHT_SHAPES = ((512, 1024), (3584, 4096))


def _forced_right(out_size: int, in_size: int) -> bool:
  rows, cols = FORCED_RIGHT_SHAPES
  return out_size in rows and in_size in cols


@dataclasses.dataclass(frozen=True)
class DCTAdamWConfig(subspace_lib.ProjectionConfig):
  """A :class:`~lowrank_optax.ProjectionConfig` with DCT-AdamW's parameter and side rules.

  On top of the rank policy (``rank``, ``dimension_numbers``):

  * a leaf with fewer than two axes, or whose matrix has a dimension
    ``>= max_shape``, or whose path matches ``exclude``, is not projected
    (full AdamW);
  * side: the reference's ``rows >= cols -> right`` (PyTorch ``(out, in)``;
    the library's ``std`` rule: reduce the smaller of ``in`` / ``out``,
    ``in`` on a tie), except that a PyTorch shape ``(rows, cols)`` with
    ``rows`` in ``{512, 1024}`` and ``cols`` in ``{3584, 4096}`` is forced
    right (reduces ``in = cols``, the larger dimension);
  * with a numeric rank, a leaf whose reduced dimension is smaller than the
    rank is not projected (the reference's ``top_k`` would fail on it);
    equal is projected (all columns: a full rotation), as in the reference.

  Attributes:
    max_shape: the reference's ``max_shape``.
  """

  max_shape: int = DCT_ADAMW_MAX_SHAPE

  def plans(self, params, allow_zero_rank=False, notes=None):
    numeric = isinstance(self.rank, numbers.Real)
    rank = (lambda path, leaf, r=self.rank: r) if numeric else self.rank
    plans = policy_lib.plan_leaves(
        params, rank, self.proj_type, self.dimension_numbers,
        None if numeric else self.exclude, allow_zero_rank, self.fraction_of,
        self.fraction_rounding, None if numeric else notes)
    out, index = [], 0
    for plan in plans:
      if plan is None or max(plan.rows, plan.cols) >= self.max_shape or (
          self.exclude and re.search(self.exclude, plan.path,
                                     flags=re.IGNORECASE)):
        out.append(None)
        continue
      if (self.proj_type == "std" and plan.side == "output"
          and _forced_right(plan.cols, plan.rows)):
        plan = dataclasses.replace(plan, side="reduction")
      reduced = {"reduction": plan.rows, "output": plan.cols,
                 "both": min(plan.rows, plan.cols)}[plan.side]
      if numeric and isinstance(self.rank, numbers.Integral):
        if self.rank > reduced:
          out.append(None)
          continue
        plan = dataclasses.replace(plan, rank=int(self.rank))
      out.append(dataclasses.replace(plan, index=index))
      index += 1
    return out


def dct_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any,
    *,
    update_proj_gap: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Any = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_shape: int = DCT_ADAMW_MAX_SHAPE,
    rotate_subspace: bool = False,
    dct_score: str = "l1",
    dimension_numbers: Any = None,
    exclude: Optional[str] = None,
    state_dtype: Any = None,
    skip_nonfinite: Any = True,
) -> optax.GradientTransformationExtraArgs:
  r"""DCT-AdamW: AdamW whose matrices keep Adam's state on ``r`` selected DCT columns.

  With ``t`` the 1-based step, ``C_d`` the orthonormal DCT-II matrix of the
  reduced dimension ``d`` (:func:`~lowrank_optax.dct_matrix`) and ``P_t =
  C_d[:, idx_t]``, for a projected matrix (PyTorch layout, right side):

  .. math::
    idx_t &= \mathrm{top}_r\big(\lVert (G_t C_d)_{:, j} \rVert_1\big)
      \ \text{if } t = 1 \text{ or } t \bmod T = 0,
      \text{ else } idx_{t-1}, \qquad R_t = G_t P_t, \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) R_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2, \\
    W_{t+1} &= W_t (1 - \eta_t\lambda) - \eta_t\,
      \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}\, P_t^\top.

  The left side is the transpose (``R = P^T G``, back-projection ``P N``).
  Other leaves (1-D, 0-D, matrices with a dimension ``>= max_shape``) take
  the same AdamW step at full rank. With ``rotate_subspace=True`` the
  moments of columns selected both before and after a reselection move to
  their new slots and new columns start at 0 (``m <- m Rot``, ``v <- |v
  Rot|`` with the partial permutation ``Rot = P_{old}^T P_{new}``);
  otherwise the moments are kept as they are. The Adam counter is global
  and never reset.

  Reference: ``DCTAdamW`` in ``ista_daslab_optimizers/fft_low_rank/
  dct_adamw.py`` with ``proj='dct'`` (``FFTLowRankProjector``). What it does
  and where this recipe differs:

  * Arguments: the reference's ``lr``, ``weight_decay`` and ``rank`` have no
    defaults; ``rank`` has none here either (an int, or any rank policy of
    :func:`~lowrank_optax.galore_project`), ``weight_decay`` defaults to 0.
    Its defaults ``update_proj_gap=1``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``max_shape=32000``, ``rotate_subspace=False``,
    ``ell_norm=1`` (``dct_score="l1"``), ``sim_type='matmul'`` are ours.
  * Cadence: ``steps`` is incremented at the start of ``step``; the
    selection is redone when ``steps == 1 or steps % T == 0``, so the first
    interval is ``T - 1`` steps. Here ``refresh_offset=1``: 0-based counts
    ``c`` with ``c == 0 or (c + 1) % T == 0``, the same steps.
  * Adam: ``u = m / (eps sqrt(bc2) + sqrt(v))``, ``W += -lr sqrt(bc2) / bc1
    u``, which is ``optax.scale_by_adam(b1, b2, eps)`` (PyTorch-style, eps
    outside the root) rearranged; the full-rank ``adamw_step`` is the same.
    No ``alpha``. Weight decay ``p.mul_(1 - lr wd)`` on every parameter with
    a gradient, before its update, with the group's lr: here
    ``optax.add_decayed_weights(wd)`` before ``scale_by_learning_rate(lr)``,
    the same step (``weight_decay_mask`` can restrict it; the reference has
    no mask).
  * Projected parameters: every 2-D parameter with both dimensions
    ``< max_shape`` (no name filter: small embeddings are projected too).
    Side: PyTorch ``(rows, cols)``: ``rows >= cols`` -> right (reduce
    ``cols = in``), else left (reduce ``rows = out``), except ``rows`` in
    ``{512, 1024}`` with ``cols`` in ``{3584, 4096}``, forced right (the
    code covers these four combinations; its comments name (1024, 4096) and
    (512, 3584)). In the Flax ``(in, out)`` layout this is the library's
    ``std`` rule plus that exception (:class:`DCTAdamWConfig`).
  * Parameters with three or more axes: the reference gives them **no
    update at all** (``update_step`` handles ``ndim`` 1 and 2 only; only
    the weight decay acts), and 0-D parameters likewise. Here 0-D leaves
    take full AdamW and leaves with more axes are projected as stacks of
    matrices (the library's matrix views: leading axes are batch axes, each
    matrix selects its own columns) — a scanned model keeps its layers
    stacked.
  * A matrix whose reduced dimension is smaller than ``rank``: the
    reference fails (``top_k`` with ``k > N``); here it takes full AdamW.
  * Selected indices are sorted ascending (the reference keeps
    ``torch.topk(sorted=False)``'s order). With ``rotate_subspace=True``
    the result does not depend on the order (the rotation moves every kept
    moment to its column's slot). Without rotation the reference's slot
    order is arbitrary across reselections, so kept moments are attached to
    arbitrary new columns; with sorted indices a column that stays selected
    keeps its moments as long as the columns below it do.
  * One DCT matrix per distinct reduced size, computed on the fly from a
    table of cosines (never stored); the reference creates one ``Q`` of
    size ``min(p.shape)`` for the first low-rank parameter and reuses it for
    all (wrong for other sizes: a bug, not reproduced).
  * Not implemented: ``sim_type='makhoul'`` (the FFT computation, which
    selects columns of ``C^T`` instead of ``C``), ``ell_norm < 0`` (scores
    weighted by the columns' norms), the error feedback ``use_ef`` /
    ``q_ef``, the ``hdm`` / ``rqr`` projections and ``distributed=True``
    (which shards whole parameters over ranks; use the library's sharding).
  * ``dct_score="l2"`` (an extension): squared column norms, the
    Frobenius-optimal selection.

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: ``r`` (an int, as in the reference), or a rank policy (float
      fraction, dict of path regexes, callable). Shape-defining: under
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    update_proj_gap: ``T``: reselect at ``t = 1, T, 2T, ...`` (1 = every
      step).
    b1, b2, eps: Adam (PyTorch convention).
    weight_decay: ``lambda``, decoupled, before the update.
    weight_decay_mask: optional mask for the decay (the reference decays
      every parameter).
    max_shape: matrices with a dimension ``>= max_shape`` take full AdamW.
      Shape-defining, like ``rank``: under ``optax.inject_hyperparams``
      pass it in ``static_args``.
    rotate_subspace: move the moments of kept columns to their new slots at
      a reselection (``on_refresh="rotate"``); else keep them as they are.
    dct_score: ``"l1"`` (the reference's ``ell_norm=1``) or ``"l2"``.
    dimension_numbers: matrix views of leaves with three or more axes (see
      :func:`~lowrank_optax.galore_project`).
    exclude: regex of paths that take full AdamW (the reference: none).
    state_dtype: dtype of Adam's moments (default: the param's, as the
      reference).
    skip_nonfinite: see :func:`~lowrank_optax.skip_nonfinite_steps`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    >>> tx = lro.dct_adamw(1e-3, rank=8, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> lro.subspace_state(state).projector[1].indices.shape  # 8 columns
    (8,)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params),
    ...                            state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Modoranu, Safaryan, Schultheis, Ryabinin, Chumachenko, Alistarh,
    `FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization
    of Large Language Models <https://arxiv.org/abs/2505.17967>`_ (v1:
    "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
    Models"); official code
    https://github.com/IST-DASLab/ISTA-DASLab-Optimizers
    (``ista_daslab_optimizers/fft_low_rank/dct_adamw.py``,
    ``fft_projector.py``, ``utils/dct.py``; PyPI
    ``ista-daslab-optimizers==1.1.15``).
  """
  policy_lib.check_rank_spec(rank)
  if isinstance(update_proj_gap, bool) or (
      isinstance(update_proj_gap, numbers.Number)
      and (update_proj_gap != int(update_proj_gap) or update_proj_gap < 1)):
    raise ValueError(f"update_proj_gap must be a positive int, got"
                     f" {update_proj_gap!r}.")
  if isinstance(max_shape, bool) or (
      isinstance(max_shape, numbers.Number) and max_shape < 2):
    raise ValueError(f"max_shape must be an int >= 2, got {max_shape!r}.")
  config = DCTAdamWConfig(
      rank=rank, update_proj_gap=update_proj_gap, scale=1.0, proj_type="std",
      projector=projectors_lib.DCTProjector(score=dct_score),
      on_refresh="rotate" if rotate_subspace else "keep",
      dimension_numbers=dimension_numbers, exclude=exclude, refresh_offset=1,
      state_dtype=state_dtype, max_shape=max_shape)
  if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
    decay = ()
  else:
    decay = (optax.add_decayed_weights(weight_decay, weight_decay_mask),)
  return recipes.skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.ProjectionElement(config),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype),
      subspace_lib.back_project(),
      *decay,
      optax.scale_by_learning_rate(learning_rate),
  ), skip_nonfinite)
