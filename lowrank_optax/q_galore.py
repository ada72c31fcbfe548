r"""Q-GaLore: an int4 projector with a lazy, layer-adaptive refresh and 8-bit Adam.

The recipe :func:`q_galore` composes pieces that live elsewhere: the
quantised projector with the adaptive interval
(:class:`~lowrank_optax.projectors.QuantizedProjector`), bitsandbytes-style
block-wise 8-bit Adam (:func:`~lowrank_optax.scale_by_adam_8bit`) and GaLore's
post-update weight decay. Int8 weights with stochastic rounding are the
user's choice of parameter storage; :func:`q_galore`'s docstring shows the
pattern (:func:`~lowrank_optax.apply_updates_int8`).
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import quantization
from lowrank_optax import subspace as subspace_lib
from lowrank_optax.projectors.quantized import QuantizedProjector
from lowrank_optax.recipes import _maybe_weight_decay
from lowrank_optax.recipes import skip_nonfinite_steps

__all__ = ["q_galore", "Q_GALORE_INNER"]

#: The inner optimizers :func:`q_galore` accepts.
Q_GALORE_INNER = ("adam8bit", "adam")


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: Any = "svd",
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    proj_bits: Optional[int] = 4,
    proj_group_size: int = 256,
    proj_clamp_zero: bool = True,
    cos_threshold: float = 0.4,
    gamma_proj: float = 2,
    queue_size: int = 5,
    abs_cos: bool = False,
    inner: str = "adam8bit",
    block_size: int = 2048,
    min_8bit_size: int = 4096,
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    subspace_iters: int = 1,
    subspace_init_iters: int = 4,
    state_dtype: Any = None,
    basis_dtype: Any = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Q-GaLore: GaLore with an int4 basis, a lazy per-layer refresh and 8-bit AdamW.

  For a projected matrix with gradient ``G_t`` (``t`` 1-based, ``k = t - 1``
  the 0-based count) and the dequantised basis ``\hat Q`` (by default on
  the reference's one-sided ``std`` side):

  .. math::
    R_t &= \mathrm{down}_{\hat Q}(G_t),\quad
    u_t = \mathrm{Adam8bit}(R_t) =
      \frac{\hat m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon},
      \\
    W_{t+1}' &= W_t - \eta_t\, \alpha\, \mathrm{up}_{\hat Q}(u_t),\qquad
    W_{t+1} = W_{t+1}' - \eta_t \lambda W_{t+1}'.

  ``\hat Q = s (q - z)`` per group of ``proj_group_size`` elements, from
  ``proj_bits``-bit codes ``q`` of the SVD basis computed at the matrix's
  last refresh (not re-orthonormalised). Matrix ``i`` refreshes when ``k %
  T_i == 0``, ``T_i`` starting at ``update_proj_gap``; after each refresh
  but the first, the cosine of the new first singular vector with the
  previous one enters a FIFO of ``queue_size``, and when the FIFO is full
  with mean ``>= cos_threshold``, ``T_i <- int(gamma_proj T_i)`` (the FIFO
  is kept, so ``T_i`` may double at every later refresh). The 8-bit Adam
  moments (block-wise dynamic quantisation; float32 below ``min_8bit_size``
  elements, as bitsandbytes) and the step counter are kept across
  refreshes. Leaves that are not projected get the same 8-bit AdamW on
  their full gradient (as the reference, whose ``QGaLoreAdamW8bit`` steps
  every parameter group), with the unscaled learning rate; the weight decay
  acts on every leaf after its update, with the unscaled learning rate
  (bitsandbytes' kernel multiplies the updated weight by ``1 - lr wd``; the
  reference moves the projected params' decay after the back-projection,
  the same rule).

  Defaults are the reference's (``run_pretrain.py`` and its
  ``scripts/pretrain_c4``): ``betas=(0.9, args.beta2)`` with ``--beta2``
  defaulting to 0.95, bitsandbytes' ``eps=1e-8``, ``alpha=0.25``, ``T0=200``,
  ``weight_decay=0``, ``proj_bits=4``, ``proj_group_size=256``,
  ``cos_threshold=0.4``, ``gamma_proj=2``, ``queue_size=5``; lr 0.015
  (60M, 130M), 0.01 (350M, 1B), 0.004 (7B, with ``T0=500``); rank 128 /
  256 / 256 / 1024 / 1024.

  Memory per projected ``m x n`` matrix (``m >= n``, ALGORITHMS.md 12): the
  basis at ``proj_bits`` bits, ``rn / 2`` bytes, plus a float32 scale and a
  uint8 zero per 256 elements; moments ``2mr`` bytes plus a float32 absmax
  per block of 2048; besides these, the previous first vector (``n`` values
  in the param dtype), the interval, the refresh count and the 5 cosines.

  **Int8 weights** (the reference's ``--weight_quant --stochastic_round``)
  are parameter storage, not optimizer state, so they are composed around
  the optimizer: keep the projected kernels as
  :class:`~lowrank_optax.QuantizedArray` (:func:`~lowrank_optax.quantize_int8`:
  uint8 codes, groups of 256), run the model and the optimizer on their
  dequantised float view, and apply the update with
  :func:`~lowrank_optax.apply_updates_int8` (dequantise, add, requantise
  with stochastic rounding and a fresh scale / zero per group, as the
  reference's step). bfloat16 weights can likewise be stepped with
  :func:`~lowrank_optax.stochastic_round_to_bf16` instead of
  ``optax.apply_updates``::

    is_q = lambda x: isinstance(x, lro.QuantizedArray)
    def float_view(qparams):
      return jax.tree.map(
          lambda x: lro.dequantize_int8(x) if is_q(x) else x, qparams,
          is_leaf=is_q)

    @jax.jit
    def train_step(qparams, opt_state, batch, key):
      params = float_view(qparams)
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return lro.apply_updates_int8(qparams, updates, key), opt_state

  (The reference's ``QGaLoreLinear`` keeps the gradient of the int8 weight in
  a separate ``float_grad`` and requantises inside the optimizer's step;
  here the gradient is the ordinary gradient of the float view.)

  Deviations from the official code (``VITA-Group/Q-GaLore``:
  ``q_galore_torch/q_galore_projector.py``, ``q_galore_adamw8bit.py``,
  ``utils/quantization.py``, ``run_pretrain.py``):

  * The int4 codes are packed two per byte (the reference keeps one uint8
    per code, which saves nothing); a basis whose size is not a multiple of
    ``proj_group_size`` gets a last, smaller group (the reference asserts);
    scales are float32 and zero points uint8 (the reference: the param
    dtype, bf16 in its runs); the dequantised basis is computed in float32
    and cast to the gradient's dtype.
  * The cosine is computed in float32 (the reference: in the param dtype).
    The SVD's signs are LAPACK's, not torch's, and the signed cosine of the
    reference sees every sign flip as ``cos ~ -1`` (which blocks the
    growth): ``abs_cos=True`` (off by default) ignores the signs.
  * ``T`` is clamped at ``2^30`` (an int32 step count never reaches a
    larger multiple); the reference's Python int grows without bound.
  * Stacked (scanned) leaves: each matrix has its own interval and FIFO, as
    the reference's per-layer projectors, but the leaf's refresh is one
    ``lax.cond``, so when any of its matrices is due the SVDs of all of them
    are computed (only the due ones take the new basis).
  * ``proj_type``: every type is accepted (the reference supports ``std``
    only); ``full`` keeps both bases at ``proj_bits`` and the cosine rule
    uses the mean of their first vectors' cosines.
  * A failed decomposition keeps the previous basis (and still counts as a
    refresh); a non-finite gradient skips the refresh (``skip_nonfinite``
    also zeroes that leaf's update); the reference has no guard.
  * Int8 weights are composed by the user (above), not built into the
    optimizer; the reference's fake-quantisation "simulation" mode for DDP
    is not needed (the state and the weights are ordinary sharded arrays).
  * ``scale_by_adam_8bit``'s own deviations from bitsandbytes are listed in
    its docstring (no percentile clipping or ``max_unorm``; both are off in
    the reference's runs).

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rank: rank policy (see :func:`~lowrank_optax.galore_project`);
      shape-defining.
    update_proj_gap: ``T0``, the initial refresh interval of every matrix.
    scale: ``alpha``, multiplies the mapped-back Adam direction only.
    proj_type: ``std`` (the reference), ``reverse_std``, ``left``, ``right``
      or ``full`` (two-sided, an extension).
    projector: the projector that computes the float basis at a refresh:
      ``svd`` (the reference; the cosine rule is defined on fresh singular
      vectors) or another basis projector's name or instance (e.g.
      ``subspace_iteration``, whose warm-started first vector moves less and
      so grows ``T`` sooner).
    b1, b2, eps: Adam, PyTorch convention (reference 0.9, 0.95, 1e-8).
    weight_decay: ``lambda``, applied to the updated weights of every leaf.
    weight_decay_mask: optional mask for the decay.
    proj_bits: bits per basis element (4); ``None`` keeps the float basis.
    proj_group_size: elements per quantisation group (256).
    proj_clamp_zero: clamp the zero point to ``[0, 2^bits - 1]`` (the
      reference; see :func:`~lowrank_optax.quantize_int4`).
    cos_threshold, gamma_proj, queue_size: the lazy refresh rule (0.4, 2, 5);
      ``gamma_proj=1`` disables the growth.
    abs_cos: use ``|cos|`` in the rule (a deviation; default signed).
    inner: ``"adam8bit"`` (the reference's bitsandbytes ``AdamW8bit``:
      :func:`~lowrank_optax.scale_by_adam_8bit`) or ``"adam"`` (float
      ``optax.scale_by_adam``), for every leaf.
    block_size: elements per block of the 8-bit moments (2048, bitsandbytes
      0.43.1 as pinned by the reference).
    min_8bit_size: leaves (low-rank shapes for projected ones) with fewer
      elements keep float32 moments (bitsandbytes' 4096).
    dimension_numbers: matrix views (see :func:`~lowrank_optax.galore_project`).
    exclude: regex of paths kept at full rank by int / fraction policies.
    seed: seed of the projectors' random starts.
    subspace_iters, subspace_init_iters: options of a ``subspace_iteration``
      ``projector``.
    state_dtype: dtype of the low-rank gradient (and of ``"adam"``'s first
      moment); default: the param's.
    basis_dtype: dtype of the float basis and of the stored first vector
      (default: the param's).
    skip_nonfinite: see :func:`~lowrank_optax.skip_nonfinite_steps`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"mlp": 0.02 * jnp.ones((256, 512)), "norm": jnp.ones(512)}
    >>> tx = lro.q_galore(learning_rate=1e-2, rank=32)
    >>> state = tx.init(params)
    >>> grads = {"mlp": jax.random.normal(jax.random.key(0), (256, 512)),
    ...          "norm": jnp.ones(512)}
    >>> step = jax.jit(tx.update)
    >>> updates, state = step(grads, state, params)
    >>> proj = lro.subspace_state(state).projector[0]
    >>> proj.basis[0].codes.shape, int(proj.interval)  # 256 x 32 at 4 bits
    ((4096,), 200)

    Int8 weights (the pattern above), one step:

    >>> is_q = lambda x: isinstance(x, lro.QuantizedArray)
    >>> qparams = {"mlp": lro.quantize_int8(params["mlp"]),
    ...            "norm": params["norm"]}
    >>> view = jax.tree.map(lambda x: lro.dequantize_int8(x) if is_q(x) else x,
    ...                     qparams, is_leaf=is_q)
    >>> updates, state = step(grads, state, view)
    >>> qparams = lro.apply_updates_int8(qparams, updates, jax.random.key(1))
    >>> qparams["mlp"].codes.dtype
    dtype('uint8')

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
    2024; official code https://github.com/VITA-Group/Q-GaLore
    (``q_galore_torch/``, ``run_pretrain.py``, ``scripts/pretrain_c4/``);
    Dettmers et al., 8-bit optimizers via block-wise quantization, ICLR
    2022.
  """
  if inner not in Q_GALORE_INNER:
    raise ValueError(f"inner must be one of {Q_GALORE_INNER}, got {inner!r}.")
  base = projectors_lib.make(projector, iters=subspace_iters,
                             init_iters=subspace_init_iters)
  proj = QuantizedProjector(
      inner=base, bits=proj_bits, group_size=proj_group_size,
      clamp_zero=proj_clamp_zero, initial_interval=update_proj_gap,
      cos_threshold=cos_threshold, gamma_proj=gamma_proj,
      queue_size=queue_size, abs_cos=abs_cos)
  if inner == "adam8bit":
    adam = quantization.scale_by_adam_8bit(
        b1=b1, b2=b2, eps=eps, block_size=block_size,
        min_8bit_size=min_8bit_size)
  else:
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype)
  return skip_nonfinite_steps(subspace_lib.chain(
      subspace_lib.galore_project(
          rank, update_proj_gap=update_proj_gap, scale=scale,
          proj_type=proj_type, projector=proj,
          dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
          state_dtype=state_dtype, basis_dtype=basis_dtype),
      adam,
      subspace_lib.back_project(),
      optax.scale_by_learning_rate(learning_rate),
      *_maybe_weight_decay(learning_rate, weight_decay, weight_decay_mask),
  ), skip_nonfinite)
