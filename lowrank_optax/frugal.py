"""FRUGAL: a state-full subspace and a state-free rest (Zmushko et al., ICML 2025).

The gradient of every projectable matrix is split into a part that a
state-full optimizer (Adam) updates and a part that a state-free rule (signSGD)
updates. Three ways to split, as in the official code (``fzmushko/FRUGAL`` @
``c7ebe4c``, ``frugal/proj_optimizer_templates.py``):

* ``mode="block"`` (``BlockOptimizer``; the pre-training headline): a
  rotating fraction ``rho`` of the tensors is state-full
  (:func:`~lowrank_optax.active_blocks`);
* ``mode="projection"`` (``GaloreOptimizer``): a rank ``round(rho * d)``
  subspace of each matrix (SVD, random semi-orthogonal, or random
  coordinates ``randperm``), the residual ``G - up(down(G))`` state-free;
* ``mode="coordinates"`` (``CoordOptimizer``; the fine-tuning default): a
  random set of ``int(rho * d)`` columns, rows or entries.

The pieces are the library's: :func:`frugal_project` (a
:func:`~lowrank_optax.galore_project` with FRUGAL's rank rule and reset),
``optax.scale_by_adam`` in the subspace, the residual closers
(:func:`~lowrank_optax.sign_residual`, ...), and :func:`frugal` composes them.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import optax

from lowrank_optax import block as block_lib
from lowrank_optax import policy as policy_lib
from lowrank_optax import projectors as projectors_lib
from lowrank_optax import residual as residual_lib
from lowrank_optax import subspace as subspace_lib
from lowrank_optax.recipes import skip_nonfinite_steps

__all__ = ["frugal", "frugal_project", "MODES"]

MODES = ("block", "projection", "coordinates")

_DEFAULT_PROJECTOR = {"projection": "svd", "coordinates": "columns"}


def frugal_project(
    rho: Any = 0.25,
    *,
    projector: Any = "svd",
    update_gap: int = 200,
    proj_type: str = "std",
    reset_statistics: bool = True,
    scale: Any = 1.0,
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    state_dtype: Any = None,
    basis_dtype: Any = None,
) -> subspace_lib.ProjectionElement:
  r"""The projection element with FRUGAL's rank rule, side and reset.

  :func:`~lowrank_optax.galore_project` with the settings the official
  ``GaloreOptimizer`` / ``CoordOptimizer`` imply:

  * the rank is ``round(rho * d)`` (Python's half-to-even) of the reduced
    side ``d`` (``fraction_of="reduced"``); for the coordinate projectors
    ``"columns"`` / ``"rows"`` ``int(rho * d)`` with ``d`` = the number of
    inputs ``M`` / outputs ``N`` (their side is forced: ``proj_type="right"``
    / ``"left"``), for ``"randk"`` ``int(rho * M * N)`` entries;
  * ``on_refresh="reset"`` (``reset_statistics=True``): at a refresh
    (0-based counts ``0, T, 2T, ...``; the reference's 1-based steps ``1,
    T + 1, ...``) the subspace optimizer's moments and counter restart, so
    its bias correction restarts; ``"keep"`` otherwise;
  * ``scale`` is ``s_p`` (``proj_params_lr_scale``) on the mapped-back step.

  A ``rho`` of ``0`` is an empty subspace (the whole gradient takes the
  residual rule). ``rho`` may also be a rank policy like
  :func:`~lowrank_optax.galore_project`'s (a dict of path regexes to
  fractions or ints, or a callable); an explicit fraction projects the
  matching leaves even at full rank.

  Args:
    rho: density (fraction of the reduced side), or a rank policy.
    projector: ``svd`` (the reference's default), ``orthogonal`` (the
      reference's ``random``: random semi-orthogonal, when registered),
      ``randperm``, ``columns``, ``rows``, ``randk`` or any other registered
      projector or :class:`~lowrank_optax.projectors.Projector` instance.
    update_gap: ``T``.
    proj_type: ``std | reverse_std | left | right | full`` (the reference's
      ``proj_side``); ignored for coordinate projectors that fix their side.
    reset_statistics: reset the subspace optimizer's state at a refresh.
    scale: ``s_p``.
    dimension_numbers, exclude, seed, state_dtype, basis_dtype: as in
      :func:`~lowrank_optax.galore_project`.

  Returns:
    A :class:`~lowrank_optax.ProjectionElement` for :func:`~lowrank_optax.chain`.

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.frugal_project(0.25, projector="columns"),
    ...                optax.scale_by_adam(), lro.sign_residual(),
    ...                optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.ones((10, 16))})
    >>> state[0].inner[0][0].mu.shape  # int(0.25 * 10) input coordinates
    (2, 16)

  References:
    Zmushko et al., FRUGAL, arXiv 2411.07837; official code
    https://github.com/fzmushko/FRUGAL (``frugal/galore_projector.py``,
    ``frugal/coordinate_projector.py``).
  """
  proj = projectors_lib.make(projector)
  forced = getattr(proj, "proj_type", None)
  if isinstance(forced, str):
    policy_lib.check_proj_type(proj_type)
    if proj_type not in ("std", forced):
      raise ValueError(f"projector={proj.name!r} fixes proj_type={forced!r};"
                       f" got proj_type={proj_type!r}.")
    proj_type = forced
  fraction_of = getattr(proj, "fraction_of", "reduced")
  rounding = getattr(proj, "fraction_rounding", "half_even")
  if not isinstance(fraction_of, str):
    fraction_of = "reduced"
  if not isinstance(rounding, str):
    rounding = "half_even"
  rank = rho
  if isinstance(rho, numbers.Real) and not isinstance(rho, bool):
    if not 0.0 <= float(rho) <= 1.0:
      raise ValueError(f"rho must lie in [0, 1], got {rho}.")
    if float(rho) == 0.0:
      rank = 0
  policy_lib.check_rank_spec(rank, allow_zero=True)
  policy_lib.check_proj_type(proj_type)
  return subspace_lib.ProjectionElement(subspace_lib.ProjectionConfig(
      rank=rank, update_proj_gap=update_gap, scale=scale, proj_type=proj_type,
      projector=proj, on_refresh="reset" if reset_statistics else "keep",
      dimension_numbers=dimension_numbers, exclude=exclude, seed=seed,
      fraction_of=fraction_of, fraction_rounding=rounding,
      state_dtype=state_dtype, basis_dtype=basis_dtype))


def _closer(state_free: str, scale):
  if state_free == "sign":
    return residual_lib.sign_residual(scale)
  if state_free == "sgd":
    return residual_lib.sgd_residual(scale)
  return subspace_lib.back_project()


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    rho: Any = 0.25,
    *,
    mode: str = "block",
    projector: Any = None,
    update_gap: int = 200,
    state_full: Optional[optax.GradientTransformation] = None,
    state_free: str = "sign",
    proj_params_lr_scale: Any = 1.0,
    inactive_lr_scale: Any = 1.0,
    reset_statistics: bool = True,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
    block_order: str = "descending",
    leaf_order: Any = None,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    dimension_numbers: Any = None,
    exclude: Optional[str] = policy_lib.DEFAULT_EXCLUDE,
    seed: int = 0,
    skip_nonfinite: Any = True,
) -> optax.GradientTransformationExtraArgs:
  r"""FRUGAL-AdamW: Adam on a state-full part, signSGD on the rest.

  For a projectable matrix ``W`` with gradient ``G`` (``eta`` the learning
  rate, ``lambda`` the weight decay, ``s_p`` / ``s_f`` the two lr scales):

  .. math::
    W \leftarrow W (1 - \eta\lambda) - \eta\, s_p\, \mathrm{up}(
      \mathrm{Adam}(\mathrm{down}(G))) - \eta\, s_p s_f\,
      \mathrm{sign}(G - \mathrm{up}(\mathrm{down}(G)))

  (projection and coordinate modes), or in block mode ``W <- W (1 - eta
  lambda) - eta s_p Adam(G)`` for an active tensor and ``- eta s_p s_f
  sign(G)`` for an inactive one. Adam is PyTorch-style (``optax.scale_by_adam``,
  ALGORITHMS.md 0.2 (B)). Leaves that are not projectable (embeddings,
  ``lm_head``, norms, 1-D) take plain AdamW with the unscaled ``eta``.
  Every ``T = update_gap`` steps (0-based counts ``0, T, 2T, ...``, the
  reference's 1-based ``1, T + 1, ...``) the split changes and the state-full
  state restarts (moments and the bias-correction counter; block mode clears
  all of it).

  With the defaults this is the official pre-training configuration
  (``--optimizer frugal`` = ``BlockAdamW``, ``scripts/benchmark_c4``:
  ``block_order=descending``, ``rho=0.25``, ``T=200``, ``sign_sgd``,
  ``s_p = s_f = 1``, reset on, Adam (0.9, 0.999, 1e-8), ``wd=0``; the scripts
  use ``lr=1e-3`` with a cosine schedule). The fine-tuning configuration
  (``--optimizer frugal`` in ``run_glue.py`` = ``CoordAdamW``) is
  ``mode="coordinates"``, ``projector="columns"``, ``inactive_lr_scale=0.1``,
  ``update_gap=500``, with the density derived from ``--rank 8`` as ``8 /
  min(shape of the classifier's first weight)``.

  What the official code does, and where this recipe differs:

  * Weight decay: ``p.mul_(1 - lr * wd)`` for every parameter before its
    update, with the group's (scheduled) ``lr`` — not times ``s_p``. Here:
    ``optax.add_decayed_weights(wd)`` after the FRUGAL update and before
    ``scale_by_learning_rate(lr)``, which is the same step. The reference
    decays every parameter (norms, embeddings too); so does this recipe
    unless ``weight_decay_mask`` says otherwise.
  * Refresh: ``_update_states_if_necessary`` fires when the group's first
    parameter's ``step % update_gap == 0`` (``step`` completed updates since
    its last reset), i.e. every ``T`` steps starting at the first; it redraws
    the projector from the current gradient and, with ``reset_statistics``,
    sets ``m = v = 0, step = 0``. Here every leaf refreshes at counts ``0, T,
    2T, ...`` (the same steps) with ``on_refresh="reset"``.
  * Projection mode: ``r = round(rho * d)`` of the side ``proj_side`` reduces,
    no ``alpha``; the residual uses the same projector, unscaled. Here
    :func:`frugal_project`. The SVD's signs and the random draws (``random``
    = ``"orthogonal"``, ``randperm``) are not torch's.
  * Coordinates: ``int(rho * d)``; ``columns`` are PyTorch's columns =
    ``in_features`` = our input axis ``M`` (see
    :mod:`lowrank_optax.projectors.coordinates`). The code default
    ``coord_choice`` is ``columns`` (the README says ``randk``); so is ours.
  * Block mode: see :func:`~lowrank_optax.active_blocks` (block order =
    the tree order of the leaves, not ``named_modules``' ``q, k, v, o, gate,
    down, up``; pass ``leaf_order`` for another). ``BlockOptimizer`` ignores
    ``reset_statistics``; here ``reset_statistics=False`` with block mode is
    an error rather than silently ignored.
  * Projectable leaves: the reference's ``prepare_proj_params`` takes the
    ``nn.Linear`` weights whose module name contains ``attn``, ``mlp``,
    ``q_proj``, ... ; here the library's default policy: leaves with two or
    more axes whose path does not match ``exclude`` (embeddings,
    ``lm_head``, norms, biases).
  * ``rho`` of the projection modes is a fraction of a matrix dimension; a
    leaf whose rank would reach the full dimension passes through at full
    rank (plain Adam, no ``s_p``), as the library's default policy does; an
    explicit dict policy projects it anyway. A rank that rounds to 0 for a
    small matrix is raised to 1 (the reference would keep an empty
    subspace).

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    rho: density: the fraction of the tensors (block mode) or of each
      matrix's reduced side / entries (other modes). In the projection modes
      also a rank policy (see :func:`frugal_project`). Shape-defining: under
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    mode: ``"block"`` (default), ``"projection"`` or ``"coordinates"``.
    projector: projection mode: ``"svd"`` (default), ``"orthogonal"``
      (FRUGAL's ``random``), ``"randperm"``, or any registered projector;
      coordinates mode: ``"columns"`` (default), ``"rows"``, ``"randk"``;
      block mode: must be ``None``.
    update_gap: ``T``.
    state_full: the state-full transform; default
      ``optax.scale_by_adam(b1, b2, eps)`` (any optax transform; it also
      runs, unscaled, on the non-projectable leaves).
    state_free: ``"sign"`` (FRUGAL's ``sign_sgd``), ``"sgd"`` or ``"none"``
      (FRUGAL's ``no``; GaLore-like).
    proj_params_lr_scale: ``s_p``.
    inactive_lr_scale: ``s_f``.
    reset_statistics: reset the state-full state at a refresh.
    weight_decay: ``lambda`` (decoupled, before the update).
    weight_decay_mask: optional mask of ``optax.add_decayed_weights``.
    block_order: block mode: ``descending`` (default), ``ascending``,
      ``mirror`` or ``random``.
    leaf_order: block mode: the block order (see
      :func:`~lowrank_optax.active_blocks`).
    proj_type: projection mode: ``std | reverse_std | left | right | full``.
    b1, b2, eps: the default Adam's.
    dimension_numbers: matrix views (projection modes).
    exclude: regex of paths that are never projectable / blocks.
    seed: seed of the random draws.
    skip_nonfinite: a leaf whose gradient is not finite keeps its state and
      gets a zero update (``True``, the default), or the whole step is
      skipped (``"step"``), or nothing (``False``); see
      :func:`~lowrank_optax.recipes.skip_nonfinite_steps`. The reference
      applies non-finite updates.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"attn": {"q": jnp.ones((16, 16)), "k": jnp.ones((16, 16))},
    ...           "mlp": {"up": jnp.ones((16, 32)), "down": jnp.ones((32, 16))},
    ...           "norm": jnp.ones(16)}
    >>> tx = lro.frugal(1e-3, rho=0.5, update_gap=200)  # block, descending
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zmushko, Beznosikov, Takáč, Horváth, `FRUGAL: Memory-Efficient
    Optimization by Reducing State Overhead for Scalable Training
    <https://arxiv.org/abs/2411.07837>`_, ICML 2025; official code
    https://github.com/fzmushko/FRUGAL (``frugal/proj_optimizer_templates.py``,
    ``frugal/adamw.py``, ``utils/args_utils.py``, ``scripts/benchmark_c4``).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown FRUGAL mode {mode!r}; expected one of {MODES}.")
  if state_free not in block_lib.STATE_FREE_RULES:
    raise ValueError(f"Unknown state_free rule {state_free!r}; expected one"
                     f" of {block_lib.STATE_FREE_RULES}.")
  if state_full is None:
    state_full = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
    decay = ()
  else:
    decay = (optax.add_decayed_weights(weight_decay, weight_decay_mask),)
  lr = (optax.scale_by_learning_rate(learning_rate),)

  if mode == "block":
    if projector is not None:
      raise ValueError("mode='block' has no projector (the blocks are whole"
                       f" tensors); got projector={projector!r}.")
    if not reset_statistics:
      raise ValueError(
          "mode='block' clears the state-full state at every refresh (the"
          " official BlockOptimizer ignores reset_statistics); pass"
          " reset_statistics=True.")
    if not isinstance(rho, numbers.Real) or isinstance(rho, bool):
      raise TypeError(f"mode='block' takes a float rho, got {rho!r}.")
    chained = optax.chain(
        block_lib.active_blocks(
            state_full, rho, block_order=block_order, update_gap=update_gap,
            state_free=state_free, scale=proj_params_lr_scale,
            state_free_scale=inactive_lr_scale, leaf_order=leaf_order,
            exclude=exclude, seed=seed),
        *decay, *lr)
    # The schedule's counter goes on the params' mesh too (as lro.chain does).
    return skip_nonfinite_steps(optax.GradientTransformationExtraArgs(
        lambda params: subspace_lib.on_params_mesh(chained.init(params),
                                                   params),
        chained.update), skip_nonfinite)

  if projector is None:
    projector = _DEFAULT_PROJECTOR[mode]
  proj = projectors_lib.make(projector)
  is_coord = isinstance(proj, projectors_lib.CoordinateProjector)
  if mode == "coordinates" and not is_coord:
    raise ValueError(f"mode='coordinates' takes projector='columns', 'rows'"
                     f" or 'randk'; got {projector!r}.")
  if state_free == "none" and isinstance(rho, numbers.Real) and rho == 0:
    raise ValueError("rho=0 with state_free='none' never updates the"
                     " projectable parameters.")
  free_scale = proj_params_lr_scale * inactive_lr_scale
  return skip_nonfinite_steps(subspace_lib.chain(
      frugal_project(rho, projector=proj, update_gap=update_gap,
                     proj_type=proj_type, reset_statistics=reset_statistics,
                     scale=proj_params_lr_scale,
                     dimension_numbers=dimension_numbers, exclude=exclude,
                     seed=seed),
      state_full,
      _closer(state_free, free_scale),
      *decay, *lr), skip_nonfinite)
