"""Question 1 of the design: which leaves are projected, as which matrix, at which rank.

A projected leaf is read as a matrix ``(reduction, output)`` with implicit batch
axes, following the semantics of optax's ``MuonDimensionNumbers``: every axis
that is neither a reduction nor an output axis is a batch axis, and each batch
element is projected independently (scanned layers ``(L, d_in, d_out)``,
experts ``(E, d, f)``, conv taps ``(H, W, C_in, C_out)``).

Arrays are read in Flax layout: a 2-D kernel is ``(in, out)``, so the reduction
axis is 0 and the output axis 1; for ``ndim > 2`` the default matrix is the
last two axes. PyTorch stores the same linear map as ``W = K^T`` of shape
``(out, in)``, which is the layout all reference code (and ALGORITHMS.md) uses;
the side names ``left`` / ``right`` below keep the reference's meaning so a
user's PyTorch setting means the same thing here:

* ``right``: reduces the input (reduction) axis (PyTorch ``G @ B^T``).
* ``left``: reduces the output axis (PyTorch ``A^T @ G``).
* ``std``: reduces the smaller matrix dimension; on a tie the input axis
  (what the reference does for a square ``nn.Linear``).
* ``reverse_std``: the opposite of ``std`` (on a tie, the output axis).
* ``full``: both axes (two-sided, ``R`` is ``r x r``).
* ``larger``: reduces the larger matrix dimension, the input axis on a tie
  (``optax.contrib.galore``'s rule on the stored array; see
  :func:`~lowrank_optax.contrib_galore`).

Everything here is static Python evaluated at ``init`` / trace time; no arrays
are created.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

__all__ = [
    "MatrixView",
    "LeafPlan",
    "DEFAULT_EXCLUDE",
    "PROJ_TYPES",
    "plan_leaves",
    "attention_views",
    "PolicyWarning",
    "path_to_str",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full", "larger")
FRACTION_OF = ("min", "reduced", "numel")
FRACTION_ROUNDING = ("half_even", "floor")

#: Paths matching this (case-insensitive ``re.search``) pass through at full
#: rank under the default policy: the reference scripts never project
#: embeddings, the output head, normalisation weights or biases.
DEFAULT_EXCLUDE = (r"embed|lm_head|unembed|wte|wpe|norm|ln_f|layernorm"
                   r"|(^|/)bias$")


class MatrixView(NamedTuple):
  """Which axes of a leaf form the matrix (optax ``MuonDimensionNumbers`` semantics).

  Attributes:
    reduction_axis: input axis or axes (contracted with activations).
    output_axis: output axis or axes.

  Axes not named are batch axes, projected independently.

  Example:
    >>> import lowrank_optax as lro
    >>> attention = lro.MatrixView(reduction_axis=0, output_axis=(1, 2))
  """

  reduction_axis: Union[int, Sequence[int]] = 0
  output_axis: Union[int, Sequence[int]] = 1


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static description of how one projected leaf is viewed and reduced.

  Attributes:
    path: the leaf's path as a string (``a/b/c``).
    shape: the leaf's shape.
    batch_axes, reduction_axes, output_axes: a partition of ``range(ndim)``.
    rank: the subspace dimension ``r``; ``0`` means "no subspace" (the whole
      gradient is residual; only meaningful with a residual rule).
    side: ``"reduction"``, ``"output"`` or ``"both"``: which matrix axis the
      subspace lives on (``"both"`` is two-sided).
    index: position among the projected leaves (used for staggering / seeds).
  """

  path: str
  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  rank: int
  side: str
  index: int = 0
  sharding: Any = None

  def with_sharding(self, sharding) -> "LeafPlan":
    """This plan with a :class:`~lowrank_optax.sharding.MatrixSharding` (or None)."""
    if sharding == self.sharding:
      return self
    return dataclasses.replace(self, sharding=sharding)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def rows(self) -> int:
    """Size of the matrix's reduction (input) dimension, ``M``."""
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def cols(self) -> int:
    """Size of the matrix's output dimension, ``N``."""
    return math.prod(self.shape[a] for a in self.output_axes)

  @property
  def needs_transpose(self) -> bool:
    order = self.batch_axes + self.reduction_axes + self.output_axes
    return order != tuple(range(len(self.shape)))

  def _reshape(self, x, shape, spec):
    ms = self.sharding
    if ms is not None and ms.explicit and x.shape != tuple(shape):
      # Explicit meshes name the result's sharding where axes merge / split.
      out = jax.sharding.NamedSharding(ms.mesh, jax.sharding.PartitionSpec(*spec))
      return jax.lax.reshape(x, tuple(shape), out_sharding=out)
    return x.reshape(shape)

  def to_matrix(self, x):
    """``x`` (leaf shape) -> ``(*batch, M, N)``."""
    order = self.batch_axes + self.reduction_axes + self.output_axes
    if self.needs_transpose:
      x = x.transpose(order)
    ms = self.sharding
    spec = None if ms is None else (*ms.batch, ms.rows, ms.cols)
    return self._reshape(x, self.batch_shape + (self.rows, self.cols), spec)

  def from_matrix(self, x):
    """``(*batch, M, N)`` -> leaf shape (inverse of :meth:`to_matrix`)."""
    order = self.batch_axes + self.reduction_axes + self.output_axes
    moved = tuple(self.shape[a] for a in order)
    ms = self.sharding
    spec = None if ms is None else tuple(ms.leaf_spec[a] for a in order)
    x = self._reshape(x, moved, spec)
    if self.needs_transpose:
      x = x.transpose(tuple(sorted(range(len(order)), key=order.__getitem__)))
    return x

  @property
  def lowrank_shape(self) -> tuple[int, ...]:
    """Shape of the projected gradient ``R`` (batch axes leading)."""
    r = self.rank
    if self.side == "reduction":
      return self.batch_shape + (r, self.cols)
    if self.side == "output":
      return self.batch_shape + (self.rows, r)
    return self.batch_shape + (r, r)

  @property
  def channel_axis(self) -> int:
    """Axis of ``R`` (and of the matrix view) that is *not* projected."""
    return -1 if self.side == "reduction" else -2


def path_to_str(path) -> str:
  """Renders a ``jax.tree_util`` key path as ``a/b/c`` (drops a final ``.value``)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  if len(parts) > 1 and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


def _normalize_axes(axes, ndim: int, path: str, shape) -> tuple[int, ...]:
  if isinstance(axes, numbers.Integral):
    axes = (int(axes),)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"Leaf {path!r} of shape {tuple(shape)} has no axis {a}: the matrix"
          " view asks for an axis that does not exist. Give a MatrixView whose"
          " axes exist for this leaf (or route it to full rank with None).")
    out.append(a % ndim)
  return tuple(out)


def _default_view(ndim: int) -> MatrixView:
  if ndim == 2:
    return MatrixView(0, 1)
  return MatrixView(-2, -1)


#: Views of Flax multi-head attention kernels (``nnx.MultiHeadAttention``,
#: Linen ``MultiHeadDotProductAttention``, any ``DenseGeneral`` block named like
#: them): query / key / value are ``(..., d, heads, head_dim)`` (input ``d``,
#: outputs ``heads x head_dim``), the output projection ``(..., heads,
#: head_dim, d)``; leading axes (scanned layers) are batch axes.
ATTENTION_IN_VIEW = MatrixView(-3, (-2, -1))
ATTENTION_OUT_VIEW = MatrixView((-3, -2), -1)
_QKV = ("query", "key", "value")
_QKV_PROJ = ("q_proj", "k_proj", "v_proj")
_OUT = ("out", "o_proj", "out_proj", "output")
_KERNEL = ("kernel", "weight", "w")


def _layer_of(path: str):
  """``(parent, layer)`` of a kernel path ``.../parent/layer/kernel``."""
  parts = path.split("/")
  if len(parts) >= 2 and parts[-1].lower() in _KERNEL:
    parts = parts[:-1]
  return "/".join(parts[:-1]), parts[-1].lower()


def attention_views(paths) -> dict:
  """Flax attention views for the kernel paths of attention blocks.

  A block is recognised by its sibling layers: a parent holding ``query``,
  ``key`` and ``value`` (Flax) or ``q_proj``, ``k_proj`` and ``v_proj``. Its
  query / key / value kernels get :data:`ATTENTION_IN_VIEW` and its output
  projection :data:`ATTENTION_OUT_VIEW` (used for leaves of three or more
  axes; 2-D kernels keep the default view).

  Args:
    paths: the leaves' ``a/b/c`` paths.

  Returns:
    ``{path: MatrixView}`` for the recognised kernels.
  """
  children: dict = {}
  for path in paths:
    parent, layer = _layer_of(path)
    children.setdefault(parent, set()).add(layer)
  views = {}
  for path in paths:
    if path.split("/")[-1].lower() not in _KERNEL:
      continue
    parent, layer = _layer_of(path)
    siblings = children.get(parent, set())
    if not (set(_QKV) <= siblings or set(_QKV_PROJ) <= siblings):
      continue
    if layer in _QKV or layer in _QKV_PROJ:
      views[path] = ATTENTION_IN_VIEW
    elif layer in _OUT:
      views[path] = ATTENTION_OUT_VIEW
  return views


ViewSpec = Union[None, MatrixView, Mapping[str, Optional[MatrixView]],
                 Callable[[str, Any], Optional[MatrixView]]]
RankSpec = Union[int, float, Mapping[str, Any], Callable[[str, Any], Any]]


def _as_view(v):
  """Accepts lro.MatrixView and optax's Muon/GaLore dimension numbers."""
  if v is None or isinstance(v, MatrixView):
    return v
  if hasattr(v, "reduction_axis") and hasattr(v, "output_axis"):
    return MatrixView(v.reduction_axis, v.output_axis)
  raise TypeError(f"Expected a MatrixView (or None), got {v!r}.")


def _lookup_view(spec: ViewSpec, path: str, leaf, attention: dict):
  """Returns (view or None, whether the view was given explicitly).

  Without an explicit view for the leaf, a recognised attention kernel of
  three or more axes gets its attention view (:func:`attention_views`), any
  other leaf with ``ndim >= 2`` the default view.
  """
  default = attention.get(path) if leaf.ndim >= 3 else None
  if default is None and leaf.ndim >= 2:
    default = _default_view(leaf.ndim)
  if spec is None:
    return default, False
  if isinstance(spec, (MatrixView,)) or (
      hasattr(spec, "reduction_axis") and not isinstance(spec, Mapping)):
    return (_as_view(spec) if leaf.ndim >= 2 else None), False
  if isinstance(spec, Mapping):
    for pattern, view in spec.items():
      if re.search(pattern, path, flags=re.IGNORECASE):
        return _as_view(view), True
    return default, False
  if callable(spec):
    return _as_view(spec(path, leaf)), True
  raise TypeError(f"Unsupported dimension_numbers {spec!r}.")


_STATIC_HINT = (
    " The rank sets the shapes of the optimizer state, so it cannot be a"
    " traced or array hyper-parameter: under optax.inject_hyperparams pass it"
    " in static_args, e.g. optax.inject_hyperparams(lro.galore,"
    " static_args=('rank',))(learning_rate=schedule, rank=128).")


def _check_rank_value(rank, where: str, allow_zero: bool):
  """Validates one rank; ``where`` says whose rank it is, for the message."""
  if rank is None:
    return
  if isinstance(rank, (jax.Array, np.ndarray)) or hasattr(rank, "aval"):
    raise TypeError(f"The rank {where} is an array ({rank!r})." + _STATIC_HINT)
  if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
    raise TypeError(f"The rank {where} must be an int, a float fraction in"
                    f" (0, 1], or None (full rank); got {rank!r}.")
  if isinstance(rank, numbers.Integral):
    if rank < 0 or (rank == 0 and not allow_zero):
      raise ValueError(
          f"The rank {where} must be a positive int, got {rank}. (Rank 0, an"
          " empty subspace, is accepted only together with a residual rule"
          " such as lro.sign_residual(), where it means a state-free step on"
          " the whole gradient; None keeps a leaf at full rank.)")
  else:
    if not 0.0 < float(rank) <= 1.0:
      raise ValueError(f"A fractional rank {where} must lie in (0, 1] (a"
                       f" fraction of the matrix dimension), got {rank}.")


def check_pattern(pattern, what: str) -> None:
  """A clear error for a path regex that does not compile."""
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(
        f"The {what} {pattern!r} is not a valid regular expression ({e})."
        " Patterns are Python regexes matched with re.search (case"
        " insensitive) against leaf paths such as"
        " 'blocks/0/attn/q_proj/kernel'; escape literal characters with"
        " re.escape.") from None


def _resolve_rank(rank, size: int, rounding: str = "half_even") -> int:
  if isinstance(rank, numbers.Integral):
    return int(rank)
  # A fraction of ``size``: Python's round() (half to even), as FRUGAL's
  # ``round(n * density)`` for projections, or its ``int(n * density)``
  # (floor) for coordinates.
  x = float(rank) * size
  return max(1, int(x) if rounding == "floor" else int(round(x)))


def _side(proj_type: str, rows: int, cols: int) -> str:
  # rows = M = input (reduction) size = PyTorch n; cols = N = output = PyTorch m.
  if proj_type == "std":      # PyTorch: m >= n -> right (reduce n = inputs)
    return "reduction" if cols >= rows else "output"
  if proj_type == "reverse_std":  # PyTorch: m >= n -> left (reduce m = outputs)
    return "output" if cols >= rows else "reduction"
  if proj_type == "right":
    return "reduction"
  if proj_type == "larger":  # optax.contrib.galore: the input axis on a tie
    return "reduction" if rows >= cols else "output"
  if proj_type == "left":
    return "output"
  return "both"


def check_proj_type(proj_type: str) -> None:
  if proj_type not in PROJ_TYPES:
    raise ValueError(f"Unknown proj_type {proj_type!r}; expected one of"
                     f" {PROJ_TYPES}.")


def check_rank_spec(rank: RankSpec, allow_zero: bool = False) -> None:
  """Validates a rank policy eagerly (at construction time) where possible."""
  if isinstance(rank, Mapping):
    for pattern, r in rank.items():
      check_pattern(pattern, "rank rule")
      _check_rank_value(r, f"of the rule {pattern!r}", allow_zero)
  elif callable(rank) and not hasattr(rank, "aval"):
    return
  else:
    _check_rank_value(rank, "(the rank of every projected leaf)", allow_zero)


def check_view_spec(spec, exclude) -> None:
  """Validates the regexes of a dimension_numbers dict and of exclude."""
  if isinstance(spec, Mapping):
    for pattern in spec:
      check_pattern(pattern, "dimension_numbers rule")
  if exclude is not None:
    check_pattern(exclude, "exclude pattern")


def plan_leaves(
    params,
    rank: RankSpec,
    proj_type: str = "std",
    dimension_numbers: ViewSpec = None,
    exclude: Optional[str] = DEFAULT_EXCLUDE,
    allow_zero_rank: bool = False,
    fraction_of: str = "min",
    fraction_rounding: str = "half_even",
    notes: Optional[list] = None,
) -> list[Optional[LeafPlan]]:
  """Resolves the policy into one :class:`LeafPlan` (or ``None``) per leaf.

  Rules, per leaf (``path`` is the ``a/b/c`` string of its tree path):

  * ``rank`` an int or a fraction: the leaf is projected if it has a matrix
    view (``ndim >= 2``, or an explicit view), its path does not match
    ``exclude``, and both matrix dimensions exceed the rank; otherwise it
    passes through at full rank.
  * ``rank`` a dict ``{regex: rank | None}``: the first pattern that matches
    (``re.search``, case-insensitive) decides; ``None`` means full rank;
    leaves matching no pattern pass through. Explicit ranks at least as large
    as the smaller matrix dimension are clamped to it (what the reference's
    slicing of the SVD does).
  * ``rank`` a callable ``(path, leaf) -> rank | None``: as for a dict entry.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    rank: the rank policy.
    proj_type: ``std | reverse_std | left | right | full``.
    dimension_numbers: ``None`` (default views), one :class:`MatrixView` for
      every leaf with ``ndim >= 2``, a dict ``{regex: MatrixView | None}``, or a
      callable ``(path, leaf) -> MatrixView | None``.
    exclude: regex of paths that pass through under int / fraction policies.
    allow_zero_rank: accept rank 0 (only with a residual rule).
    fraction_of: what a float rank is a fraction of: ``"min"``, the smaller
      matrix dimension (default), or ``"reduced"``, the dimension that the
      side rule reduces (FRUGAL's ``round(rho * n)`` for the right side,
      ``round(rho * m)`` for the left, ``round(rho * min(m, n))`` for full),
      or ``"numel"``, the matrix's ``M * N`` (entry-wise coordinate
      projectors; the rank is then a number of entries, at most ``M * N``).
    fraction_rounding: ``"half_even"`` (Python's ``round``) or ``"floor"``.
    notes: if a list, messages about likely policy mistakes are appended to
      it (a dict rule that matches no leaf, an explicit rank clamped to a
      full-rank projection, a leaf cut into slivers by the default view or
      left at full rank because its matrices are no larger than the rank, a
      policy that projects nothing); :func:`~lowrank_optax.subspace` emits
      them as :class:`PolicyWarning` at ``init``.

  Returns:
    A list with one entry per leaf in ``jax.tree.leaves`` order.
  """
  check_proj_type(proj_type)
  if fraction_of not in FRACTION_OF:
    raise ValueError(f"Unknown fraction_of {fraction_of!r}; expected one of"
                     f" {FRACTION_OF}.")
  if fraction_rounding not in FRACTION_ROUNDING:
    raise ValueError(f"Unknown fraction_rounding {fraction_rounding!r};"
                     f" expected one of {FRACTION_ROUNDING}.")
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_to_str(k) for k, _ in leaves_with_path]
  attention = attention_views(paths)
  plans: list[Optional[LeafPlan]] = []
  n_projected = 0
  for (key_path, leaf), path in zip(leaves_with_path, paths):
    shape = tuple(getattr(leaf, "shape", ()))
    ndim = len(shape)

    explicit_rank = isinstance(rank, Mapping) or (
        callable(rank) and not isinstance(rank, numbers.Real))
    if isinstance(rank, Mapping):
      leaf_rank = None
      for pattern, r in rank.items():
        if re.search(pattern, path, flags=re.IGNORECASE):
          leaf_rank = r
          break
    elif explicit_rank:
      leaf_rank = rank(path, leaf)
    else:
      leaf_rank = rank
    _check_rank_value(leaf_rank, f"of leaf {path!r} (shape {shape})",
                      allow_zero_rank)

    view, explicit_view = _lookup_view(dimension_numbers, path, leaf,
                                       attention)
    if leaf_rank is None or view is None or ndim < 2:
      plans.append(None)
      continue
    if (not explicit_rank and not explicit_view and exclude
        and re.search(exclude, path, flags=re.IGNORECASE)):
      plans.append(None)
      continue

    red = _normalize_axes(view.reduction_axis, ndim, path, shape)
    out = _normalize_axes(view.output_axis, ndim, path, shape)
    if set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(out):
      raise ValueError(f"Leaf {path!r} of shape {shape}: reduction axes {red}"
                       f" and output axes {out} must be distinct.")
    batch = tuple(a for a in range(ndim) if a not in red and a not in out)
    rows = math.prod(shape[a] for a in red)
    cols = math.prod(shape[a] for a in out)
    side = _side(proj_type, rows, cols)
    reduced = {"reduction": rows, "output": cols, "both": min(rows, cols)}[side]
    if fraction_of == "numel":
      reduced = rows * cols
    limit = min(rows, cols) if fraction_of == "min" else reduced
    r = _resolve_rank(leaf_rank,
                      min(rows, cols) if fraction_of == "min" else reduced,
                      fraction_rounding)
    if explicit_rank:
      r = min(r, reduced)
    elif r >= limit:
      plans.append(None)  # default policy: too small to be worth projecting
      continue
    plans.append(LeafPlan(path=path, shape=shape, batch_axes=batch,
                          reduction_axes=red, output_axes=out, rank=r,
                          side=side, index=n_projected))
    n_projected += 1
    if notes is not None and not explicit_view and path not in attention:
      n_matrices = math.prod(shape[a] for a in batch)
      if n_matrices > max(rows, cols):
        notes.append(
            f"Leaf {path!r} of shape {shape} is projected as {n_matrices}"
            f" separate {rows}x{cols} matrices (the default view reads the"
            " last two axes as the matrix and the others as batch axes). If"
            " its matrix spans other axes (e.g. attention (d, heads,"
            " head_dim)), give dimension_numbers={" + repr(path) + ":"
            " lro.MatrixView(reduction_axis, output_axis)}.")
  if notes is not None:
    _policy_notes(notes, leaves_with_path, paths, plans, rank, attention,
                  dimension_numbers, exclude, fraction_of)
  return plans


def _policy_notes(notes, leaves_with_path, paths, plans, rank, attention,
                  dimension_numbers, exclude, fraction_of):
  """Appends the messages about likely policy mistakes (see plan_leaves)."""
  if isinstance(rank, Mapping):
    for pattern in rank:
      if not any(re.search(pattern, p, flags=re.IGNORECASE) for p in paths):
        notes.append(
            f"The rank rule {pattern!r} matches no leaf. Leaf paths look like"
            f" {paths[:4]}.")
  explicit_rank = isinstance(rank, Mapping) or (
      callable(rank) and not isinstance(rank, numbers.Real))
  for (_, leaf), path, plan in zip(leaves_with_path, paths, plans):
    shape = tuple(getattr(leaf, "shape", ()))
    if plan is not None and explicit_rank:
      reduced = {"reduction": plan.rows, "output": plan.cols,
                 "both": min(plan.rows, plan.cols)}[plan.side]
      if plan.rank >= reduced and fraction_of != "numel":
        notes.append(
            f"Leaf {path!r} of shape {shape}: its rank is clamped to"
            f" {plan.rank}, the whole reduced dimension. Such a full-rank"
            " projection keeps a basis on top of Adam's state (more memory"
            " than Adam). Give it a smaller rank, or None for full rank.")
    if (plan is None and len(shape) >= 3 and not explicit_rank
        and path not in attention and dimension_numbers is None
        and isinstance(rank, numbers.Real)
        and not (exclude and re.search(exclude, path, flags=re.IGNORECASE))):
      rows, cols = shape[-2], shape[-1]
      n_matrices = math.prod(shape[:-2])
      r = _resolve_rank(rank, min(rows, cols))
      if n_matrices > 1 and min(rows, cols) <= r:
        notes.append(
            f"Leaf {path!r} of shape {shape} stays at full rank: the default"
            f" view reads it as {n_matrices} matrices of {rows}x{cols}, no"
            f" larger than the rank {r}. If its matrix spans other axes (e.g."
            " attention (heads, head_dim, d)), give dimension_numbers={"
            + repr(path) + ": lro.MatrixView(reduction_axis, output_axis)}.")
  n_matrix_leaves = sum(len(getattr(x, "shape", ())) >= 2
                        for _, x in leaves_with_path)
  if n_matrix_leaves and not any(p is not None for p in plans):
    notes.append(
        f"The rank policy {rank!r} projects none of the {n_matrix_leaves}"
        " leaves with two or more axes: the optimizer keeps full-rank state"
        " everywhere (no memory is saved). Check the rank against the"
        " matrix sizes, the exclude pattern and the paths"
        f" ({paths[:4]}...).")


class PolicyWarning(UserWarning):
  """A rank policy that probably does not do what was meant (see plan_leaves)."""
