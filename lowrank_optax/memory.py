"""Optimizer-state memory report, from shapes alone (``jax.eval_shape``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
import optax

from lowrank_optax import policy as policy_lib
from lowrank_optax.subspace import SubspaceState

__all__ = ["memory_report", "MemoryReport", "LeafMemory", "tree_bytes"]


def tree_bytes(tree) -> int:
  """Total bytes of the arrays / ``ShapeDtypeStruct`` leaves of a pytree."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  """One parameter leaf's share of the optimizer state.

  Attributes:
    path: the leaf's path.
    shape: the parameter's shape.
    rank: its subspace rank, or ``None`` at full rank (or unknown).
    side: the reduced matrix axis: ``"inputs"``, ``"outputs"`` or ``"both"``
      (two-sided); ``None`` at full rank or when the transform does not say.
    projector: the projector's name, or ``None``.
    state_bytes: bytes of its projector, inner and closer state.
    adam_bytes: bytes ``optax.adam`` keeps for it (``mu`` and ``nu``).
  """

  path: str
  shape: tuple
  rank: Optional[int]
  state_bytes: int
  adam_bytes: int
  side: Optional[str] = None
  projector: Optional[str] = None


_UNITS = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30),
          ("TiB", 2**40))


def _unit_for(nbytes: int):
  """The largest binary unit in which ``nbytes`` is at least 1."""
  name, size = _UNITS[0]
  for n, sz in _UNITS:
    if nbytes >= sz:
      name, size = n, sz
  return name, size


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Result of :func:`memory_report`; ``print`` it for a table.

  Attributes:
    state_bytes: total bytes of the optimizer state.
    adam_bytes: total bytes of ``optax.adam``'s state on the same params.
    leaves: per-leaf rows (empty when the transform has no subspace state).
    other_bytes: state bytes not attributed to a leaf (counters, other
      transforms of a chain).
  """

  state_bytes: int
  adam_bytes: int
  leaves: tuple = ()
  other_bytes: int = 0

  @property
  def ratio(self) -> float:
    """``state_bytes / adam_bytes``."""
    return self.state_bytes / max(self.adam_bytes, 1)

  def __str__(self):
    unit, size = _unit_for(max(self.state_bytes, self.adam_bytes))
    fmt = lambda b: f"{b / size:,.3f}" if size > 1 else f"{b:,}"
    rows = [("leaf", "shape", "rank", "side", "projector", f"state ({unit})",
             f"adam ({unit})", "state/adam")]
    for l in self.leaves:
      rows.append((l.path, "x".join(map(str, l.shape)) or "()",
                   "full" if l.rank is None else str(l.rank),
                   l.side or "-", l.projector or "-",
                   fmt(l.state_bytes), fmt(l.adam_bytes),
                   f"{l.state_bytes / l.adam_bytes:.3f}" if l.adam_bytes
                   else "-"))
    if self.leaves:
      rows.append(("(other: counters, ...)", "", "", "", "",
                   fmt(self.other_bytes), "", ""))
    rows.append(("total", "", "", "", "", fmt(self.state_bytes),
                 fmt(self.adam_bytes), f"{self.ratio:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"(bytes in {unit}, 1 {unit} = {size:,} bytes; adam ="
                 " optax.adam's mu and nu on the same params)")
    return "\n".join(lines)


_SIDES = {"reduction": "inputs", "output": "outputs", "both": "both"}


def _leaf_info(tx, params):
  """Per leaf ``(rank, side, projector name)`` from ``tx``'s projection, if known."""
  config = getattr(tx, "projection", None)
  if config is None and callable(getattr(tx, "projection_for", None)):
    config = tx.projection_for(params)   # built from the params (contrib_galore)
  n = len(jax.tree.leaves(params))
  if config is None:
    return [None] * n
  plans = config.plans(params, allow_zero_rank=True)
  name = getattr(config.projector, "name", "") or type(config.projector).__name__
  return [None if p is None else (p.rank, _SIDES[p.side], name) for p in plans]


def memory_report(tx: optax.GradientTransformation, params) -> MemoryReport:
  """Bytes of ``tx``'s state on ``params`` per leaf and in total, next to ``optax.adam``.

  Nothing is allocated: the state's shapes come from ``jax.eval_shape``, so
  ``params`` may be ``jax.ShapeDtypeStruct`` leaves of a model too large for
  the host. ``print`` the result for a per-leaf table (path, shape, rank, the
  reduced side, the projector, state and Adam bytes in one stated unit).

  Args:
    tx: any optax transform (per-leaf rows need a :func:`~lowrank_optax.chain`
      / :func:`~lowrank_optax.subspace` transform inside; rank, side and
      projector columns need the transform as the library returns it, not
      wrapped by another optax transform).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A :class:`MemoryReport`.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> params = {"mlp": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}
    >>> rep = lro.memory_report(lro.galore(1e-2, rank=128), params)
    >>> rep.state_bytes < rep.adam_bytes
    True
    >>> rep.leaves[0].rank, rep.leaves[0].side
    (128, 'inputs')
  """
  state = jax.eval_shape(tx.init, params)
  adam_state = jax.eval_shape(optax.adam(1e-3).init, params)
  total = tree_bytes(state)
  adam_total = tree_bytes(adam_state)
  subs = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, SubspaceState))
          if isinstance(s, SubspaceState)]
  if not subs:
    return MemoryReport(total, adam_total)
  sub = subs[0]
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  info = _leaf_info(tx, params)
  attributed = 0
  rows = []
  for i, (path, leaf) in enumerate(with_path):
    b = tree_bytes((sub.projector[i], sub.inner[i], sub.residual[i]))
    attributed += b
    rank = side = proj = None
    if info[i] is not None:
      rank, side, proj = info[i]
    rows.append(LeafMemory(policy_lib.path_to_str(path), tuple(leaf.shape),
                           rank,
                           b,
                           2 * int(np.prod(leaf.shape)) *
                           np.dtype(leaf.dtype).itemsize, side, proj))
  return MemoryReport(total, adam_total, tuple(rows), total - attributed)
