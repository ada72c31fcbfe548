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
    rank: its subspace rank, or ``None`` at full rank.
    state_bytes: bytes of its projector, inner and residual state.
    adam_bytes: bytes ``optax.adam`` keeps for it (``mu`` and ``nu``).
  """

  path: str
  shape: tuple
  rank: Optional[int]
  state_bytes: int
  adam_bytes: int


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
    def fmt(b):
      for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
          return f"{b:.1f} {unit}" if unit != "B" else f"{b} B"
        b /= 1024
    rows = [("leaf", "shape", "rank", "state", "adam")]
    for l in self.leaves:
      rows.append((l.path, "x".join(map(str, l.shape)) or "()",
                   "full" if l.rank is None else str(l.rank),
                   fmt(l.state_bytes), fmt(l.adam_bytes)))
    if self.leaves:
      rows.append(("(other)", "", "", fmt(self.other_bytes), ""))
    rows.append(("total", "", "", fmt(self.state_bytes), fmt(self.adam_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"state / adam = {self.ratio:.3f}")
    return "\n".join(lines)


def memory_report(tx: optax.GradientTransformation, params) -> MemoryReport:
  """Bytes of ``tx``'s state on ``params`` per leaf and in total, next to ``optax.adam``.

  Nothing is allocated: the state's shapes come from ``jax.eval_shape``, so
  ``params`` may be ``jax.ShapeDtypeStruct`` leaves of a model too large for
  the host.

  Args:
    tx: any optax transform (per-leaf rows need a :func:`~lowrank_optax.chain`
      / :func:`~lowrank_optax.subspace` transform inside).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A :class:`MemoryReport`.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> params = {"mlp": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}
    >>> rep = lro.memory_report(lro.galore(1e-2, rank=128), params)
    >>> rep.state_bytes < rep.adam_bytes
    True
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
  attributed = 0
  rows = []
  for i, (path, leaf) in enumerate(with_path):
    b = tree_bytes((sub.projector[i], sub.inner[i], sub.residual[i]))
    attributed += b
    proj = sub.projector[i]
    rank = None
    if not isinstance(proj, optax.MaskedNode):
      rank = jax.tree.leaves(proj)[0].shape[-1]
    rows.append(LeafMemory(policy_lib.path_to_str(path), tuple(leaf.shape),
                           rank, b,
                           2 * int(np.prod(leaf.shape)) *
                           np.dtype(leaf.dtype).itemsize))
  return MemoryReport(total, adam_total, tuple(rows), total - attributed)
