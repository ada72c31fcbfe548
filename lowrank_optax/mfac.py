r"""M-FAC: the sliding-window inverse empirical Fisher as an optax transform.

M-FAC keeps a ring buffer of the last ``m`` gradients (the rows of ``G``,
zero-initialised) and preconditions the newest gradient ``x`` (inserted into
the buffer first) with the damped, window-averaged empirical Fisher

.. math::
  u = \Big(\lambda I + \frac{1}{m} \sum_{i=1}^{m} g_i g_i^\top\Big)^{-1} x
    = \big(\lambda I + G^\top G / m\big)^{-1} x,

with the window size ``m`` in the ``1/m`` even while the buffer is not full.
It is Natural GaLore's Fisher transform (:mod:`lowrank_optax.fisher`) up to
scale: ``u = m * (m lambda I + G^T G)^{-1} x``.

Numerics. The reference's dynamic algorithm (an unpivoted LU of
``K / lambda + m I`` and ``u = x / lambda - G^T c``) cancels in float32 like
Natural GaLore's Woodbury form. Here, as ``x`` is a row of the buffer, the
push-through identity gives ``u = G^T (lambda I + K / m)^{-1} e_slot``
(``K = G G^T``), with no ``1 / lambda`` term, solved through the spectrum of
the window by the solver shared with :mod:`lowrank_optax.fisher`
(:func:`~lowrank_optax.fisher.solve_window_row`). The spectrum comes either
from refactorising the buffer every step (``solver="qr"``, as Natural
GaLore's transform; ``O(d m^2)``) or from the Gram ``K`` kept up to date in
``O(d m)`` per step (``solver="gram"``, the reference's cost model).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax import sharding as shd
from lowrank_optax.fisher import _compute_dtype
from lowrank_optax.fisher import _matrix_split
from lowrank_optax.fisher import gram_spectrum
from lowrank_optax.fisher import solve_window_row
from lowrank_optax.fisher import window_spectrum
from lowrank_optax.fisher import woodbury_fisher_solve
from lowrank_optax.subspace import SubspaceOnlyTransformation

__all__ = ["scale_by_mfac", "MFACState", "mfac_solve"]

_HI = jax.lax.Precision.HIGHEST


class MFACState(NamedTuple):
  """State of :func:`scale_by_mfac`.

  Attributes:
    count: number of gradients seen (int32); the next slot is
      ``count % window``.
    buffer: the ring buffer of flattened gradients: per leaf ``(*batch, m, k)``
      (``per_leaf=True``), or one ``(m, d)`` array over all leaves
      (``per_leaf=False``); zeros in unfilled slots.
    gram: ``solver="gram"`` only (else ``optax.MaskedNode()``): the buffer's
      Gram matrix ``G G^T``, per leaf ``(*batch, m, m)`` or one ``(m, m)``
      array, in float32 (float64 for float64 gradients).
    equal_rows: ``solver="gram"`` only: bool, shaped as ``gram``; ``[i, j]``
      is True when rows ``i`` and ``j`` are nonzero and bitwise equal (the
      diagonal: row ``i`` is nonzero). Exact structure the solve removes
      before the eigensolver.
  """

  count: jax.Array
  buffer: Any
  gram: Any
  equal_rows: Any


def mfac_solve(buffer: jax.Array, x: jax.Array, damping: float) -> jax.Array:
  r"""``(damping I + G^T G / m)^{-1} x`` for any ``x`` (the reference's ``mul``).

  ``G`` = ``buffer`` ``(*b, m, k)`` (``m`` its number of rows, zero rows
  included: the ``1/m`` is over the window size), ``x`` ``(*b, k)``. Computed
  as ``m * woodbury_fisher_solve(G, x, m * damping)`` (same maths, stable
  numerics: see :func:`~lowrank_optax.woodbury_fisher_solve`).

  Args:
    buffer: ``(*b, m, k)``.
    x: ``(*b, k)``.
    damping: ``lambda > 0``.

  Returns:
    ``(*b, k)`` in float32 (float64 for float64 input).

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> x = jnp.array([1.0, 2.0, 2.0])
    >>> lro.mfac_solve(jnp.zeros((4, 3)), x, 0.5)   # empty buffer: x / lambda
    Array([2., 4., 4.], dtype=float32)
  """
  m = buffer.shape[-2]
  return m * woodbury_fisher_solve(buffer, x, m * damping)


def _insert(buf, row, slot):
  return jax.lax.dynamic_update_index_in_dim(buf, row[..., None, :], slot,
                                             buf.ndim - 2)


def _insert_and_solve_qr(g, buf, slot, damping, window):
  """Insert ``g`` ``(*b, k)`` at ``slot``, solve by refactorising the buffer."""
  buf = _insert(buf, g.astype(buf.dtype), slot)
  spectrum = window_spectrum(buf)
  spectrum = spectrum._replace(sq_sv=spectrum.sq_sv / window)  # G^T G / m
  return solve_window_row(buf, spectrum, damping, slot), buf


def _insert_and_solve_gram(g, buf, gram, equal_rows, slot, damping, window):
  """Insert ``g`` ``(*b, k)`` at ``slot``, update ``K`` and solve from it.

  Returns ``(u, buf, gram, equal_rows)``. The buffer's exact structure is
  removed before the eigensolver sees ``K``: zero rows (unfilled slots) drop
  out and bitwise-equal rows are merged into one row of weight
  ``sqrt(multiplicity)`` (``G^T G / m = Gt^T Gt``, ``Gt`` the distinct rows
  each scaled by ``sqrt(c / m)``), so no exact null direction is left to
  rounding.
  """
  axis = buf.ndim - 2
  row = g.astype(buf.dtype)
  buf = _insert(buf, row, slot)
  dt = gram.dtype
  # The new row and column of K: the stored (possibly rounded) rows times the
  # stored g, so K stays the exact Gram of the buffer's contents (no drift).
  col = jnp.einsum("...ik,...k->...i", buf.astype(dt), row.astype(dt),
                   precision=_HI)
  gram = jax.lax.dynamic_update_index_in_dim(gram, col[..., None, :], slot,
                                             axis)
  gram = jax.lax.dynamic_update_index_in_dim(gram, col[..., :, None], slot,
                                             axis + 1)
  nonzero = jnp.any(row != 0, axis=-1, keepdims=True)
  eq = jnp.all(buf == row[..., None, :], axis=-1) & nonzero  # (*b, m)
  equal_rows = jax.lax.dynamic_update_index_in_dim(
      equal_rows, eq[..., None, :], slot, axis)
  equal_rows = jax.lax.dynamic_update_index_in_dim(
      equal_rows, eq[..., :, None], slot, axis + 1)
  # Multiplicity of each distinct nonzero row, at its first occurrence.
  earlier = jnp.tri(window, k=-1, dtype=bool)  # [i, j]: j < i
  diag = jnp.diagonal(equal_rows, axis1=-2, axis2=-1)
  first = diag & ~jnp.any(equal_rows & earlier, axis=-1)
  root = jnp.sqrt(jnp.where(first, jnp.sum(equal_rows, axis=-1), 0).astype(dt))
  spectrum = gram_spectrum(gram * root[..., :, None] * root[..., None, :]
                           / window)
  # x = row `slot` = its first occurrence `rep` (root 0 if x is zero).
  rep = jnp.argmax(eq, axis=-1)
  root_rep = jnp.where(nonzero,
                       jnp.take_along_axis(root, rep[..., None], axis=-1), 0.0)
  u = solve_window_row(buf, spectrum, damping, rep, row_scale=root)
  u = jnp.where(root_rep > 0, u / jnp.where(root_rep > 0, root_rep, 1.0), 0.0)
  return u, buf, gram, equal_rows


SOLVERS = ("auto", "qr", "gram")
_AUTO_QR_MAX_WINDOW = 64


def _replicated(x):
  """``x`` replicated over an explicit mesh: the window is kept whole on every
  device (it is flattened, and the reference's solver works on flat
  vectors); auto meshes and unsharded arrays are left alone."""
  s = shd.leaf_sharding(x)
  if s is None or not shd._explicit(s):  # pylint: disable=protected-access
    return x
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))


def scale_by_mfac(
    window: int = 1024,
    damping: float = 1e-5,
    per_leaf: bool = True,
    solver: str = "auto",
) -> SubspaceOnlyTransformation:
  r"""M-FAC: precondition by the inverse of a sliding-window empirical Fisher.

  With the ring buffer ``G`` of the last ``m`` = ``window`` gradients
  (zero-initialised; the newest gradient ``x`` is inserted before the
  product):

  .. math::
    u = \big(\lambda I + G^\top G / m\big)^{-1} x,

  ``1/m`` over the window size even while the buffer fills. This equals
  ``m`` times :func:`~lowrank_optax.scale_by_natural_fisher` with
  ``history=m`` and damping ``m * lambda``. Permuting the buffer's rows does
  not change ``u``.

  Two layouts:

  * ``per_leaf=True`` (default): one window per matrix, as
    :func:`~lowrank_optax.scale_by_natural_fisher` (the last two axes of each
    leaf, leading axes batch axes; leaves with fewer than two axes are one
    vector). This is the drop-in Fisher preconditioner for the subspace of
    :func:`~lowrank_optax.chain` (ALGORITHMS.md 9: applied to ``vec(R)``).
  * ``per_leaf=False``: one window over all leaves flattened and
    concatenated (``jax.tree.leaves`` order), ``d`` = total size, as the
    reference optimizer, which treats all parameters as one vector. Use it
    on its own in ``optax.chain``. (Inside :func:`~lowrank_optax.chain` the
    subspace runs its inner transforms leaf by leaf, so there it means one
    window per leaf, batch axes included.)

  The transform is marked :class:`~lowrank_optax.SubspaceOnlyTransformation`:
  in :func:`~lowrank_optax.chain` it preconditions projected leaves only and is
  skipped for leaves at full rank (as the Natural-GaLore transform); in
  ``optax.chain`` it preconditions every leaf.

  The reference optimizer's coupled weight decay and momentum are left to
  composition: ``optax.add_decayed_weights(wd)`` *before* (the decayed
  gradient enters the window, as in the reference), and ``optax.ema(mu,
  debias=False)`` *after* (``v = mu v + (1 - mu) u``); its sparse-mask
  option is not offered.

  Numerics deviate from the reference's (same maths): its dynamic algorithm
  returns ``x / lambda - G^T c``, which cancels in float32 (relative error
  ``~ eps ||x||^2 / (m lambda)``). Here ``u = G^T (lambda I + K / m)^{-1}
  e_slot`` (``K = G G^T``), with no ``1 / lambda`` term, through the spectrum
  of the window (:func:`~lowrank_optax.fisher.solve_window_row`), from one of:

  * ``solver="qr"``: a thin QR of the buffer every step (as
    :func:`~lowrank_optax.scale_by_natural_fisher`), ``O(d m^2)``. Relative
    error ``~ eps * kappa(G)`` (``kappa`` over the buffer's nonzero singular
    values) for every ``||x||^2 / (m lambda)``; directions with singular
    value below ``8 max(m, 8) eps`` of the largest (zero rows, repeated
    gradients) count as exact zeros.
  * ``solver="gram"``: the reference's cost model. ``K`` is kept up to date
    in ``O(d m)`` per step (one row and column replaced; no drift, each entry
    is one dot product of stored rows), plus an ``O(m^3)`` ``eigh``. Zero and
    bitwise-repeated rows are removed exactly (tracked in the state). The
    Gram squares the condition number: relative error ``~ eps * kappa(G)^2``
    while every singular value is above ``sqrt(8 max(m, 8) eps)`` of the
    largest. Directions below that are unresolved: weighted ``1 / lambda``
    when ``lambda`` dominates their floor, damped out when it does not (never
    amplified), so windows of slowly changing gradients (consecutive angles
    ~1e-3) lose accuracy once ``||x||^2 / (m lambda)`` passes ~1e3 (errors of
    5-100% measured at 1e4-1e9, where ``"qr"`` stays at ``~ eps kappa``).
  * ``solver="auto"`` (default): ``"qr"`` for windows up to 64, ``"gram"``
    above (refactorising costs ``m`` times the Gram update).

  Memory: the buffer (``m`` copies of the gradient, in the gradient's dtype);
  ``"gram"`` adds ``m^2`` floats and ``m^2`` bools per window. The
  reference's default ``m = 1024`` is meant for a global window; in the
  subspace, windows of a few tens (as Natural GaLore's 20) are the
  affordable range.

  Args:
    window: ``m``, the number of gradients kept (reference ``ngrads`` 1024).
    damping: ``lambda`` (reference ``damp`` 1e-5).
    per_leaf: one window per matrix (True) or one over all leaves (False).
    solver: ``"auto"``, ``"qr"`` or ``"gram"`` (above).

  Returns:
    A transform marked :class:`~lowrank_optax.SubspaceOnlyTransformation`.

  Example:
    The reference optimizer (global window, coupled weight decay, momentum)
    on a small dense model:

    >>> import jax, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> tx = optax.chain(optax.add_decayed_weights(3e-3),
    ...                  lro.scale_by_mfac(window=32, damping=1e-5,
    ...                                    per_leaf=False),
    ...                  optax.ema(0.9, debias=False),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init(params)
    >>> state[1].buffer.shape   # one window over the 8 entries of both leaves
    (32, 8)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> g = 1.0 + 3e-3 * params["w"]     # the decayed gradient is stored
    >>> bool(jnp.allclose(state[1].buffer[0, 2:], g.ravel()))  # "b", then "w"
    True

    In the subspace of :func:`~lowrank_optax.chain`, in place of
    :func:`~lowrank_optax.scale_by_natural_fisher`:

    >>> tx = lro.chain(lro.galore_project(4), lro.scale_by_mfac(window=16),
    ...                optax.scale_by_adam(), lro.back_project(),
    ...                optax.scale_by_learning_rate(1e-3))

  References:
    Frantar, Kurtić, Alistarh, `M-FAC: Efficient Matrix-Free Approximations
    of Second-Order Information <https://arxiv.org/abs/2107.03356>`_,
    NeurIPS 2021; official code: https://github.com/IST-DASLab/M-FAC
    (``optim.py``: ``HInvFastUpMulti``, ``MFAC``).
  """
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be a positive int (it sets the buffer's"
                     f" shape), got {window!r}.")
  if isinstance(damping, (int, float)) and not damping > 0:
    raise ValueError(f"damping must be > 0, got {damping!r}.")
  if not isinstance(per_leaf, bool):
    raise ValueError(f"per_leaf must be a bool, got {per_leaf!r}.")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
  use_gram = solver == "gram" or (solver == "auto"
                                  and window > _AUTO_QR_MAX_WINDOW)

  def window_state(batch, dtype):
    """(buffer, gram, equal_rows) of one window of ``k``-vectors."""
    buf = jnp.zeros(batch[0] + (window, batch[1]), dtype)
    if not use_gram:
      return buf, optax.MaskedNode(), optax.MaskedNode()
    square = batch[0] + (window, window)
    return (buf, jnp.zeros(square, _compute_dtype(dtype)),
            jnp.zeros(square, bool))

  def solve(flat, buf, gram, equal_rows, slot):
    """Insert ``flat`` ``(*b, k)``; return (u, buf, gram, equal_rows)."""
    if not use_gram:
      u, buf = _insert_and_solve_qr(flat, buf, slot, damping, window)
      return u, buf, gram, equal_rows
    return _insert_and_solve_gram(flat, buf, gram, equal_rows, slot, damping,
                                  window)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if per_leaf:
      per = jax.tree.map(
          lambda p: window_state(_matrix_split(p.shape), p.dtype), params)
      pick = lambda i: jax.tree.map(lambda _, t: t[i], params, per)
      if not use_gram:
        return MFACState(count, pick(0), optax.MaskedNode(),
                         optax.MaskedNode())
      return MFACState(count, pick(0), pick(1), pick(2))
    leaves = jax.tree.leaves(params)
    d = sum(math.prod(p.shape) for p in leaves)
    if d == 0:  # nothing to precondition: no zero-size arrays in the state
      return MFACState(count, optax.MaskedNode(), optax.MaskedNode(),
                       optax.MaskedNode())
    dtype = jnp.result_type(*[p.dtype for p in leaves])
    return MFACState(count, *window_state(((), d), dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    slot = state.count % window
    count = numerics.safe_int32_increment(state.count)
    if per_leaf:
      if use_gram:
        gram, equal_rows = state.gram, state.equal_rows
      else:  # one MaskedNode each: spread over the leaves
        gram = equal_rows = jax.tree.map(lambda _: optax.MaskedNode(),
                                         updates)

      def one(g, buf, gr, eq):
        batch, k = _matrix_split(g.shape)
        gr_ = _replicated(g)
        u, *rest = solve(gr_.reshape(batch + (k,)), buf, gr, eq, slot)
        return (shd.like(u.reshape(g.shape).astype(g.dtype), g), *rest)

      out = jax.tree.map(one, updates, state.buffer, gram, equal_rows)
      pick = lambda i: jax.tree.map(lambda _, t: t[i], updates, out)
      if not use_gram:
        return pick(0), state._replace(count=count, buffer=pick(1))
      return pick(0), MFACState(count, pick(1), pick(2), pick(3))
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves or isinstance(state.buffer, optax.MaskedNode):
      return updates, state._replace(count=count)
    flat = jnp.concatenate([_replicated(g).reshape(-1).astype(state.buffer.dtype)
                            for g in leaves])
    u, *rest = solve(flat, state.buffer, state.gram, state.equal_rows, slot)
    out, start = [], 0
    for g in leaves:
      out.append(shd.like(u[start:start + g.size].reshape(g.shape).astype(g.dtype),
                          g))
      start += g.size
    return jax.tree.unflatten(treedef, out), MFACState(count, *rest)

  return SubspaceOnlyTransformation(init_fn, update_fn)
