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
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["ResidualRule", "ResidualElement", "sign_residual", "sgd_residual",
           "DROP"]


@dataclasses.dataclass(frozen=True)
class ResidualRule:
  """A residual rule (static config); stateless rules keep ``MaskedNode`` state.

  Attributes:
    kind: ``"drop"``, ``"sign"`` or ``"sgd"``.
    scale: multiplier of the residual term (FRUGAL's ``s_p * s_f``).
  """

  kind: str = "drop"
  scale: float = 1.0

  def init(self, plan, dtype):
    del plan, dtype
    return optax.MaskedNode()

  def apply(self, plan, g, project_back: Optional[Callable[[], jax.Array]],
            update, state):
    """Adds the residual term to ``update``.

    Args:
      plan: the leaf's plan.
      g: the gradient matrix ``(*batch, M, N)``.
      project_back: returns ``up(down(G))``; ``None`` for a rank-0 leaf
        (empty subspace: ``E = G``).
      update: the mapped-back subspace update (``None`` for rank 0).
      state: the rule's state.

    Returns:
      ``(update + term, state)``.
    """
    del plan
    if self.kind == "drop":
      return update, state
    if project_back is None:
      e = g
    else:
      e = g - project_back().astype(g.dtype)
    term = jnp.sign(e) if self.kind == "sign" else e
    if not (isinstance(self.scale, (int, float)) and self.scale == 1.0):
      term = self.scale * term
    term = term.astype(g.dtype)
    return (term if update is None else update + term), state


DROP = ResidualRule("drop")


@dataclasses.dataclass(frozen=True)
class ResidualElement:
  """A closer for :func:`~lowrank_optax.chain` (``rule=None`` drops the residual).

  Like the projection element, it fails with a clear message if it is used in
  ``optax.chain`` directly.
  """

  rule: Optional[ResidualRule]

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
