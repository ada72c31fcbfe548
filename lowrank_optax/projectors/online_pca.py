r"""Online PCA: a basis that follows the gradient by one optimizer step per update.

``"online_pca"`` (:class:`OnlinePCAProjector`, Online Subspace Descent, Liang
et al.): the basis ``Q`` of the reduced axis starts as the top-``r``
singular vectors of the first gradient (exactly the ``"svd"`` projector's
refresh) and is then never recomputed. Instead, after every update (the
protocol's ``advance``, which runs after the update's ``down`` / ``up``)
it takes one step of its own optimizer (default: AdamW, learning rate
``1/T``, weight decay 0.01) on the online-PCA loss

.. math::
  L(Q) = \lVert Q Q^\top \hat A - \hat A \rVert_F^2, \qquad
  \hat A = A / \lVert A \rVert_F,

where ``A`` is the gradient matrix with the reduced axis first (``G`` for
the input axis, ``G^T`` for the output axis; ``d x k``). ``Q`` is not
re-orthonormalised. The gradient has the closed form (ALGORITHMS.md 8;
``C = \hat A \hat A^T``, ``M = Q Q^T - I``)

.. math::
  \nabla_Q L = 2 (C M + M C) Q
  = \frac{2}{\lVert A \rVert_F^2}\left(A B (S - 2I) + Q B^\top B\right),
  \quad B = A^\top Q,\ S = Q^\top Q,

evaluated right to left: no ``d x d`` or ``k x k`` matrix is formed, and the
cost is ``4 d k r + 4 (d + k) r^2`` flops (the reference's autograd forms
``P^T P``, ``n x n``, and multiplies ``G`` by it: ``O(m n^2)``).

Layout. The reference stores the right projector as ``P`` (``r x n``, rows
spanning the input axis of a PyTorch ``(out, in)`` weight) and the left one
as ``P`` (``m x r``). Our basis of the reduced axis is ``(d, r)``: the right
``P`` is ``Q^T`` and the left ``P`` is ``Q``. Both of the reference's losses
(``||G P^T P - G||`` and ``||P P^T G - G||``) are then the one loss above on
the gradient with the reduced axis first, and both of its gradients map to
the one formula (``(\nabla_P L)^T = \nabla_Q L`` on the right side).

The optimizer's learning rate follows the main schedule: its update is
multiplied by ``lr_multiplier(count)``, the reference's ``lr_t / lr_0``
(:func:`~lowrank_optax.online_subspace_descent` builds it from the
learning-rate schedule). The state is the basis and the optimizer's state
(arrays only, ``P``-shaped arrays sharded like the basis).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import sharding as shd
from lowrank_optax.projectors.base import (HIGHEST, Projector, basis_down,
                                           basis_up, oriented, reduced_axes)
from lowrank_optax.projectors.exact import SVDProjector

__all__ = ["OnlinePCAProjector", "OnlinePCAState", "online_pca_loss",
           "online_pca_grad", "default_p_optimizer"]


class OnlinePCAState(NamedTuple):
  """Projector state of :class:`OnlinePCAProjector`.

  Attributes:
    basis: a :class:`~lowrank_optax.projectors.BasisState` (one-sided) or
      :class:`~lowrank_optax.projectors.TwoSidedBasisState`: the bases
      ``(*batch, d, r)``, not orthonormal after the first step.
    opt_state: the basis optimizer's state (over ``basis`` as its params).
  """

  basis: Any
  opt_state: Any


def default_p_optimizer(update_proj_gap: int) -> optax.GradientTransformation:
  """The reference's basis optimizer: ``torch.optim.AdamW(lr=1/T)`` with torch defaults.

  ``betas=(0.9, 0.999)``, ``eps=1e-8`` (PyTorch-style Adam, ALGORITHMS.md
  0.2 (B)) and ``weight_decay=0.01`` (decoupled, ``P <- P - lr wd P``, before
  the Adam step: ``optax.adamw``'s placement, the same step).

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> opt = lro.projectors.default_p_optimizer(200)
    >>> u, _ = opt.update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.ones(2))
    >>> round(float(u[0]), 7)  # -(1/200) (1 + 0.01)
    -0.00505
  """
  return optax.adamw(1.0 / update_proj_gap, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.01)


def online_pca_loss(q: jax.Array, a: jax.Array) -> jax.Array:
  """The online-PCA loss ``||Q Q^T Â - Â||_F^2`` per matrix (``Â = A / ||A||_F``).

  Args:
    q: ``(*batch, d, r)`` basis.
    a: ``(*batch, d, k)`` gradient, reduced axis first.

  Returns:
    ``(*batch,)`` losses (``0`` for a zero matrix).

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> a = jnp.array([[3.0, 0.0], [0.0, 1.0]])  # energy 9 + 1
    >>> q = jnp.array([[1.0], [0.0]])  # keeps the 9: loses 1 / 10
    >>> round(float(lro.projectors.online_pca_loss(q, a)), 6)
    0.1
  """
  sq = jnp.sum(jnp.square(a), axis=(-2, -1), keepdims=True)
  a = a / jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
  proj = jnp.einsum("...dr,...er,...ek->...dk", q, q, a, precision=HIGHEST)
  return jnp.sum(jnp.square(proj - a), axis=(-2, -1))


def online_pca_grad(q: jax.Array, a: jax.Array, *, basis_sharding=None):
  """Closed-form gradient of :func:`online_pca_loss` in ``q``, and ``||A||^2``.

  ``2 (A B (S - 2I) + Q B^T B) / ||A||_F^2`` with ``B = A^T Q``, ``S = Q^T
  Q``: matrices of ``d x r``, ``k x r`` and ``r x r`` only. A zero matrix
  (``||A|| = 0``) has loss 0 everywhere and gradient 0.

  Args:
    q: ``(*batch, d, r)`` float32 basis.
    a: ``(*batch, d, k)`` float32 gradient, reduced axis first.
    basis_sharding: the basis's sharding (explicit meshes name the output
      of contractions over sharded axes).

  Returns:
    ``(gradient (*batch, d, r), ||A||_F^2 (*batch,))``.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> q = jnp.array([[1.0], [0.5]]); a = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> g, _ = lro.projectors.online_pca_grad(q, a)
    >>> auto = jax.grad(lambda q: lro.projectors.online_pca_loss(q, a))(q)
    >>> bool(jnp.allclose(g, auto, atol=1e-6))
    True
  """
  r = q.shape[-1]
  sq = jnp.sum(jnp.square(a), axis=(-2, -1))
  b = shd.einsum("...dk,...dr->...kr", a, q, out=shd.derived(a, -1, None),
                 precision=HIGHEST)
  s = shd.einsum("...dr,...ds->...rs", q, q, out=shd.small_of(q),
                 precision=HIGHEST)
  t = shd.einsum("...kr,...ks->...rs", b, b, out=shd.small_of(b),
                 precision=HIGHEST)
  b_s2 = shd.einsum("...kr,...rs->...ks", b,  # B (S - 2I)
                    s - 2.0 * jnp.eye(r, dtype=s.dtype),
                    out=shd.leaf_sharding(b), precision=HIGHEST)
  y = shd.einsum("...dk,...kr->...dr", a, b_s2, out=basis_sharding,
                 precision=HIGHEST)
  z = shd.einsum("...dr,...rs->...ds", q, t, out=basis_sharding,
                 precision=HIGHEST)
  scale = jnp.where(sq > 0, 2.0 / jnp.where(sq > 0, sq, 1.0), 0.0)
  return scale[..., None, None] * (y + z), sq


@dataclasses.dataclass(frozen=True)
class OnlinePCAProjector(Projector):
  """Online Subspace Descent's projector: an SVD start, then one optimizer step per update.

  Attributes:
    optimizer: the optax optimizer of the basis (its learning rate
      included); ``None``: :func:`default_p_optimizer` (the reference's
      ``torch.optim.AdamW(lr=1/T)``, weight decay 0.01). Its update is
      multiplied by ``lr_multiplier(count)``.
    update_proj_gap: ``T``: the default optimizer's learning rate is
      ``1/T``. (The basis is never recomputed; ``T`` only sets this rate.)
    lr_multiplier: ``count -> factor`` (the wrapper's 0-based count): the
      reference's ``lr_t / lr_0``; ``None``: 1.

  Every leaf refreshes (SVD) at count 0 only, whatever the wrapper's
  schedule; at count 0 the basis does not move (the reference creates its
  basis optimizer there and steps it from the second update on). A leaf
  whose first gradient is not finite keeps the placeholder basis (the
  first ``r`` coordinate axes) and follows the online PCA from there. A
  non-finite gradient moves nothing; a zero gradient matrix has a zero loss
  gradient (the optimizer still steps: weight decay, moment decay).

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> proj = lro.projectors.OnlinePCAProjector(update_proj_gap=50)
    >>> tx = lro.chain(lro.galore_project(2, projector=proj),
    ...                optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init({"w": jnp.ones((6, 8))})
    >>> state[0].projector[0].basis.basis.shape
    (6, 2)
  """

  name = "online_pca"
  optimizer: Optional[optax.GradientTransformation] = None
  update_proj_gap: int = 200
  lr_multiplier: Optional[Callable[[jax.Array], Any]] = None

  def __post_init__(self):
    # (A traced value under optax.inject_hyperparams is taken as it is.)
    t = self.update_proj_gap
    if isinstance(t, bool) or (isinstance(t, numbers.Number) and t <= 0):
      raise ValueError(f"update_proj_gap must be positive, got {t!r}.")

  def p_optimizer(self) -> optax.GradientTransformation:
    """The basis optimizer (``optimizer`` or the default AdamW)."""
    if self.optimizer is not None:
      return self.optimizer
    return default_p_optimizer(self.update_proj_gap)

  def init(self, plan, dtype, key=None):
    basis = SVDProjector().init(plan, dtype, key)
    return OnlinePCAState(basis, self.p_optimizer().init(basis))

  def should_refresh(self, plan, state, count, scheduled):
    del plan, state, scheduled
    return count == 0

  def compute(self, plan, a, state, *, first, key, count):
    basis = SVDProjector().compute(plan, a, state.basis, first=first, key=key,
                                   count=count)
    return OnlinePCAState(basis, state.opt_state)

  def down(self, plan, g, state):
    return basis_down(plan, g, tuple(q.astype(g.dtype) for q in state.basis))

  def up(self, plan, x, state):
    return basis_up(plan, x, tuple(q.astype(x.dtype) for q in state.basis))

  def advance(self, plan, g, state, count):
    """One step of the basis optimizer on the online-PCA loss of ``g``."""
    a = g.astype(jnp.float32)
    grads, finite = [], jnp.array(True)
    for ax, q in zip(reduced_axes(plan), state.basis):
      grad, sq = online_pca_grad(q.astype(jnp.float32), oriented(plan, a, ax),
                                 basis_sharding=shd.basis(plan, ax))
      grads.append(grad.astype(q.dtype))
      finite = finite & jnp.all(jnp.isfinite(sq))
    grads = type(state.basis)(*grads)
    opt = self.p_optimizer()
    updates, opt_state = opt.update(grads, state.opt_state, state.basis)
    factor = 1.0 if self.lr_multiplier is None else self.lr_multiplier(count)
    basis = jax.tree.map(
        lambda q, u: (q + jnp.asarray(factor, jnp.float32) * u).astype(q.dtype),
        state.basis, updates)
    new = OnlinePCAState(basis, opt_state)
    step = finite & (count > 0)
    return jax.tree.map(lambda n, o: shd.like(jnp.where(step, n, o), o),
                        new, state)
