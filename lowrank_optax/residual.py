"""Question 3b of the design: what happens to the part of the gradient outside the subspace.

The residual of a projected leaf is ``E = G - up(down(G))``, Frobenius-
orthogonal to the subspace. A residual rule turns it into a full-space term
added to the mapped-back subspace update:

* dropped (GaLore): :func:`~lowrank_optax.back_project`;
* ``s * sign(E)``, state-free (FRUGAL ``sign_sgd``): :func:`sign_residual`;
* ``s * E``, state-free (FRUGAL ``sgd``): :func:`sgd_residual`.

Residual rules are closers in :func:`~lowrank_optax.chain`: the elements after
them run in full space on the combined update, so a learning rate placed
after the closer scales both parts, as in FRUGAL.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["Closer", "CloseContext", "BackProjection", "ResidualRule",
           "ResidualElement", "residual_of", "sign_residual", "sgd_residual",
           "DROP", "BACK_PROJECTION"]


class CloseContext(NamedTuple):
  """What a closer sees of one projected leaf (inside the jitted update).

  Attributes:
    plan: the leaf's plan.
    g: the gradient as a matrix ``(*batch, M, N)``.
    lowrank: the low-rank gradient ``R = down(G)``; ``None`` for rank 0 (an
      empty subspace).
    inner: the inner transform's output ``N`` (low-rank); ``None`` for rank 0.
    up: maps a low-rank array to ``(*batch, M, N)`` with the current basis.
    scale: the projection's ``alpha``.
  """

  plan: Any
  g: jax.Array
  lowrank: Optional[jax.Array]
  inner: Optional[jax.Array]
  up: Callable[[jax.Array], jax.Array]
  scale: Any


def _scaled(scale, x):
  if isinstance(scale, numbers.Real) and scale == 1.0:
    return x
  return scale * x


class Closer:
  """Closes the subspace of :func:`~lowrank_optax.chain` with a full-space term.

  A closer is static configuration; its per-leaf state (``init``) is a pytree
  of arrays or ``optax.MaskedNode()``. ``role`` is ``"map_back"`` (how the
  subspace result returns: :func:`~lowrank_optax.back_project`, the default)
  or ``"residual"`` (a term from ``E = G - up(down(G))``). A chain holds at
  most one of each; the leaf's update is the sum of their terms.
  """

  role: ClassVar[str] = "residual"

  def init(self, plan, dtype):
    del plan, dtype
    return optax.MaskedNode()

  def apply(self, ctx: CloseContext, state):
    """Returns ``(term, state)``; ``term`` is ``(*batch, M, N)`` or ``None``."""
    raise NotImplementedError


def residual_of(ctx: CloseContext, scale: Any = 1.0) -> jax.Array:
  """``E = G - scale * up(R)`` (``G`` itself for rank 0), in ``G``'s dtype."""
  if ctx.lowrank is None:
    return ctx.g
  return ctx.g - _scaled(scale, ctx.up(ctx.lowrank)).astype(ctx.g.dtype)


@dataclasses.dataclass(frozen=True)
class BackProjection(Closer):
  """``alpha * up(N)``: the subspace direction mapped back (GaLore)."""

  role = "map_back"

  def apply(self, ctx, state):
    if ctx.inner is None:
      return None, state
    return _scaled(ctx.scale, ctx.up(ctx.inner)), state


@dataclasses.dataclass(frozen=True)
class ResidualRule(Closer):
  """A state-free residual rule (static config).

  Attributes:
    kind: ``"drop"``, ``"sign"`` or ``"sgd"``.
    scale: multiplier of the residual term (FRUGAL's ``s_p * s_f``).
  """

  kind: str = "drop"
  scale: float = 1.0

  def __post_init__(self):
    if self.kind not in ("drop", "sign", "sgd"):
      raise ValueError(f"Unknown residual rule {self.kind!r}; expected"
                       " 'drop', 'sign' or 'sgd'.")

  def apply(self, ctx, state):
    if self.kind == "drop":
      return None, state
    e = residual_of(ctx)
    term = jnp.sign(e) if self.kind == "sign" else e
    return _scaled(self.scale, term).astype(ctx.g.dtype), state


DROP = ResidualRule("drop")
BACK_PROJECTION = BackProjection()


@dataclasses.dataclass(frozen=True)
class ResidualElement:
  """A closer for :func:`~lowrank_optax.chain`.

  Like the projection element, it fails with a clear message if it is used in
  ``optax.chain`` directly.
  """

  rule: Closer

  def init(self, params):
    raise TypeError("Residual / back_project elements close a subspace opened"
                    " by lro.galore_project and only work inside lro.chain(...)"
                    ", not optax.chain.")

  def update(self, updates, state, params=None, **extra_args):
    raise TypeError("Residual / back_project elements only work inside"
                    " lro.chain(...).")


def sign_residual(scale: float = 1.0) -> ResidualElement:
  r"""State-free sign step on the residual (FRUGAL's ``sign_sgd`` rule).

  Closes the subspace in :func:`~lowrank_optax.chain` and adds

  .. math::
    s \cdot \mathrm{sign}(G - \mathrm{up}(\mathrm{down}(G)))

  to the mapped-back subspace update of every projected leaf (leaves at full
  rank get nothing). ``E`` uses the same basis as the subspace step and no
  ``scale`` of the projection. Elements after it (the learning rate) scale the
  combined update. A projected leaf with rank 0 takes the sign step on its
  whole gradient.

  Args:
    scale: ``s`` (FRUGAL's ``proj_params_lr_scale * inactive_lr_scale``).

  Returns:
    A closer element for :func:`~lowrank_optax.chain`.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(128, on_refresh="reset"),
    ...                optax.scale_by_adam(), lro.sign_residual(),
    ...                optax.scale_by_learning_rate(1e-3))

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_,
    ICML 2025; official code: https://github.com/fzmushko/FRUGAL
  """
  return ResidualElement(ResidualRule("sign", scale))


def sgd_residual(scale: float = 1.0) -> ResidualElement:
  r"""State-free SGD step on the residual (FRUGAL's ``sgd`` rule): adds ``s * E``.

  Args:
    scale: ``s``.

  Returns:
    A closer element for :func:`~lowrank_optax.chain`.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(128), optax.scale_by_adam(),
    ...                lro.sgd_residual(0.1), optax.scale_by_learning_rate(1e-3))

  References:
    Zmushko et al., FRUGAL, arXiv 2411.07837; https://github.com/fzmushko/FRUGAL
  """
  return ResidualElement(ResidualRule("sgd", scale))
