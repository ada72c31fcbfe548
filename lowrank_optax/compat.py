"""Migration: ``optax.contrib.galore``'s signature and meaning on this library.

``lro.contrib_galore`` is a drop-in replacement for ``optax.contrib.galore``
(optax 0.2.7-0.2.8): the same arguments with the same meanings and defaults,
the same update step for step, built from this library's pieces. Moving an
existing run over is a one-line change; then the library's extras apply
(sharded state in both mesh modes, jitted init, orbax-safe state, stacked
leaves through ``weight_dimension_numbers``, the faster projectors through
``projector=``). To move on to the reference GaLore's conventions afterwards,
see the migration guide: the same-named arguments of :func:`~lowrank_optax.galore`
mean different things (``scale`` 0.25 vs 1.0, the side that is reduced, the
leaves that are projected, the Adam convention and where weight decay goes).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import jax
import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax import subspace as subspace_lib

__all__ = ["contrib_galore"]


def _is_dim_nums(x) -> bool:
  return hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def _dim_nums_tree(weight_dimension_numbers, tree):
  """``optax.contrib.galore``'s resolution of ``weight_dimension_numbers``."""
  if weight_dimension_numbers is None:
    return jax.tree.map(
        lambda p: policy_lib.MatrixView(0, 1) if p.ndim == 2 else None, tree)
  if callable(weight_dimension_numbers) and not _is_dim_nums(
      weight_dimension_numbers):
    return weight_dimension_numbers(tree)
  if _is_dim_nums(weight_dimension_numbers):
    return jax.tree.map(
        lambda p: weight_dimension_numbers if p.ndim >= 2 else None, tree)
  return weight_dimension_numbers


def _policy(rank: int, weight_dimension_numbers, tree):
  """Per-path views and ranks (``min(rank, m, n)``) for ``tree``'s leaves."""
  dims = _dim_nums_tree(weight_dimension_numbers, tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # Align the dimension numbers with the leaves (None is a leaf there).
  flat_dims = jax.tree.flatten(
      dims, is_leaf=lambda x: x is None or _is_dim_nums(x))[0]
  if len(flat_dims) != len(leaves):
    raise ValueError(
        "weight_dimension_numbers must have one entry (dimension numbers or"
        f" None) per parameter leaf: got {len(flat_dims)} for"
        f" {len(leaves)} leaves.")
  views, ranks = {}, {}
  for (path, leaf), dn in zip(leaves, flat_dims):
    key = "^" + re.escape(policy_lib.path_to_str(path)) + "$"
    if dn is None:
      views[key], ranks[key] = None, None
      continue
    view = policy_lib.MatrixView(dn.reduction_axis, dn.output_axis)
    red = (view.reduction_axis,) if isinstance(view.reduction_axis, int) \
        else tuple(view.reduction_axis)
    out = (view.output_axis,) if isinstance(view.output_axis, int) \
        else tuple(view.output_axis)
    m = 1
    for a in red:
      m *= leaf.shape[a]
    n = 1
    for a in out:
      n *= leaf.shape[a]
    views[key], ranks[key] = view, min(rank, m, n)
  return views, ranks


def contrib_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    weight_decay: Any = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    weight_dimension_numbers: Any = None,
    *,
    projector: Any = "svd",
) -> optax.GradientTransformationExtraArgs:
  r"""``optax.contrib.galore`` as it is, built from this library's pieces.

  The arguments and their defaults are ``optax.contrib.galore``'s, with its
  meanings (what differs from :func:`~lowrank_optax.galore` is listed below):

  * every leaf with two axes is projected (embeddings and heads too), other
    leaves only where ``weight_dimension_numbers`` says (optax's
    ``GaLoreDimensionNumbers``, a single one, a pytree of them with ``None``
    for full rank, or a callable of the params returning such a pytree);
  * the rank is ``min(rank, m, n)``;
  * the side: the larger matrix dimension is reduced (the input axis on a
    tie) — :func:`~lowrank_optax.galore` reduces the smaller one, as the
    reference GaLore does;
  * ``scale`` (default 1.0) multiplies the mapped-back update of projected
    leaves;
  * ``base_optimizer`` (default ``optax.scale_by_adam()``, PyTorch-style
    ``eps=1e-8``) runs in the subspace (per leaf here; it must not need
    params, as in optax);
  * weight decay is ``optax.add_decayed_weights(weight_decay, mask)`` before
    the learning rate (on the pre-update params);
  * the basis is refreshed by an SVD of the float32 gradient at counts 0,
    ``T``, ``2T``, ... (``projector=`` selects another projector of this
    library, e.g. ``"subspace_iteration"``, which then no longer matches
    optax's numbers).

  Differences in behaviour: the state is this library's (sharded in both
  mesh modes, no zero-size placeholders); ``base_optimizer`` runs per leaf
  (identical for elementwise transforms such as Adam; a transform that
  couples leaves, e.g. a global-norm clip, would see one leaf at a time).

  Args:
    learning_rate: a float or schedule.
    rank: the target rank.
    update_proj_gap: steps between refreshes.
    scale: multiplies the update of projected leaves.
    base_optimizer: the transform run in the subspace.
    weight_decay: decoupled weight decay (before the learning rate).
    mask: ``optax.add_decayed_weights``'s mask.
    weight_dimension_numbers: optax's dimension numbers (see above).
    projector: the projector (default ``"svd"``, optax's).

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.ones((16,))}
    >>> # tx = optax.contrib.galore(1e-2, rank=4)  # becomes:
    >>> tx = lro.contrib_galore(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    ``optax.contrib.galore`` (optax 0.2.7, ``optax/contrib/_galore.py``);
    Zhao et al., GaLore, arXiv 2403.03507.
  """
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"rank must be a positive int (as in optax.contrib.galore),"
                     f" got {rank!r}.")
  base = optax.scale_by_adam() if base_optimizer is None else base_optimizer

  def build(tree):
    views, ranks = _policy(rank, weight_dimension_numbers, tree)
    return subspace_lib.chain(
        subspace_lib.galore_project(
            lambda path, leaf: ranks.get("^" + re.escape(path) + "$"),
            update_proj_gap=update_proj_gap, scale=scale, proj_type="larger",
            projector=projector, dimension_numbers=views, exclude=None),
        base,
        subspace_lib.back_project(),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )

  def init_fn(params):
    return build(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return build(updates).update(updates, state, params, **extra_args)

  # The projection depends on the params (each leaf's dimension numbers):
  # memory_report asks for it with the params it reports on.
  out = subspace_lib.LowRankTransformation(init_fn, update_fn)
  out.projection = None
  out.projection_for = lambda params: getattr(build(params), "projection",
                                              None)
  return out
