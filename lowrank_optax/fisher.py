r"""Fisher preconditioning of the low-rank gradient (Natural GaLore).

The transform keeps a window of the last ``s`` gradients (per matrix, ``k`` =
number of entries of the matrix), the rows of ``H`` (``s x k``), and returns
the damped empirical-Fisher natural gradient

.. math::
  \tilde g = (\lambda I + H^\top H)^{-1} g.

The reference evaluates it by the Woodbury identity,
``g / lambda - lambda^-2 H^T (I + H H^T / lambda)^{-1} H g``. In float32 those
two terms cancel: relative error ``~ eps ||g||^2 / lambda``, and a NaN from the
Cholesky of ``I + H H^T / lambda`` once the window is numerically
rank-deficient and ``||g||^2 / lambda`` passes ~1e7 (measured with a repeated
gradient: 6e-4, 4e-2, 0.24, NaN at 1e3, 1e5, 1e6, 1e7). Here the window's
current gradient is a row of ``H`` (``g = H^T e_j``), and the push-through
identity ``(lambda I + H^T H)^{-1} H^T = H^T (lambda I + H H^T)^{-1}`` gives

.. math::
  \tilde g = H^\top (\lambda I + K)^{-1} e_j, \qquad K = H H^\top,

with no ``g / lambda`` term to cancel. The small ``s x s`` system is solved
through the spectrum of the window (:func:`window_spectrum`: thin QR of
``H^T`` and an SVD of the ``s x s`` factor, so the window's singular values are
accurate to ``eps * sigma_max`` instead of the Gram's ``eps * sigma_max^2``),
dropping the numerically zero ones (:func:`solve_window_row`). Unfilled slots
(zero rows) and repeated gradients are exact zero singular values and drop
out. The float32 error is ``~ eps`` times the window's condition number,
whatever ``||g||^2 / lambda``. :func:`woodbury_fisher_solve` takes any ``g``
(split into its part in the window's span, solved the same way, and the rest,
``g_perp / lambda``).

The same small-system solver serves M-FAC (:mod:`lowrank_optax.mfac`), with
the spectrum of its buffer from :func:`window_spectrum` or from a Gram matrix
it updates incrementally (:func:`gram_spectrum`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from lowrank_optax import sharding as shd
from lowrank_optax.subspace import SubspaceOnlyTransformation

__all__ = ["scale_by_natural_fisher", "NaturalFisherState", "woodbury_fisher_solve"]

_HI = jax.lax.Precision.HIGHEST


class NaturalFisherState(NamedTuple):
  """State of :func:`scale_by_natural_fisher`.

  Attributes:
    count: number of gradients seen (int32); the next slot is ``count % s``.
    history: per leaf, ``(*batch, s, *matrix)``: the window of the last
      ``s`` gradients, sharded like the gradient (the window axis
      replicated).
  """

  count: jax.Array
  history: optax.Params


def _matrix_split(shape):
  """(batch shape, k): matrices are the last two axes; lower rank has no batch."""
  if len(shape) <= 2:
    k = 1
    for d in shape:
      k *= d
    return (), k
  return tuple(shape[:-2]), shape[-2] * shape[-1]


# ---------------------------------------------------------------------------
# The small-system solver (shared with lowrank_optax.mfac)
# ---------------------------------------------------------------------------


def _compute_dtype(dtype):
  """float32 for bf16 / f16 / f32 inputs; float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _rank_rtol(s: int, dtype) -> float:
  """Relative noise floor of a window's computed spectrum.

  Measured: the spurious singular value (:func:`window_spectrum`) or
  eigenvalue (:func:`gram_spectrum`) of a window with exactly repeated or
  zero rows is at most ~0.2 s eps (s from 2 to 1024, k up to 65536, float32
  on CPU); ``8 max(s, 8) eps`` sits 40x or more above that.
  """
  return 8.0 * max(s, 8) * float(jnp.finfo(dtype).eps)


class WindowSpectrum(NamedTuple):
  """Eigen-decomposition ``K = V diag(sq_sv) V^T`` of a window's Gram ``H H^T``.

  Attributes:
    sq_sv: ``(*b, s)`` eigenvalues (squared singular values of ``H``).
    vecs: ``(*b, s, s)`` eigenvectors ``V`` (columns).
    kept: ``(*b, s)`` bool: False for directions known to be exact zeros
      (dropped from every solve).
    floor: ``(*b, 1)``: eigenvalues below it are not resolved (rounding);
      :func:`damped_inverse_weights` damps them out smoothly. 0 where every
      kept eigenvalue is resolved.
  """

  sq_sv: jax.Array
  vecs: jax.Array
  kept: jax.Array
  floor: jax.Array


def _window_svd(h: jax.Array, basis: bool):
  """SVD of the window ``h`` ``(*b, s, k)`` through a thin QR of ``h^T``.

  ``h / scale = W diag(sv) Y^T`` (``h^T / scale = Q R``, ``R = U diag(sv)
  W^T``, ``Y = Q U``). Returns ``(scale (*b, 1, 1), sv (*b, p), kept (*b, p),
  W (*b, s, s), Y (*b, k, p) or None)`` with ``p = min(s, k)``.
  """
  s = h.shape[-2]
  scale = jnp.max(jnp.abs(h), axis=(-2, -1), keepdims=True)
  scale = jnp.where(scale > 0, scale, 1.0)
  ht = jnp.swapaxes(h / scale, -1, -2)
  if basis:
    q, r = jnp.linalg.qr(ht, mode="reduced")
  else:
    q, r = None, jnp.linalg.qr(ht, mode="r")
  # full_matrices: a full W also when k < s (the window has a null space).
  u, sv, vh = jnp.linalg.svd(r, full_matrices=True)
  kept = sv > _rank_rtol(s, h.dtype) * sv[..., :1]
  y = None
  if basis:
    y = jnp.einsum("...kp,...pq->...kq", q, u, precision=_HI)
  return scale, sv, kept, jnp.swapaxes(vh, -1, -2), y


def window_spectrum(rows: jax.Array) -> WindowSpectrum:
  r"""Spectrum of the window Gram ``K = rows rows^T`` from the rows themselves.

  Thin QR of ``rows^T`` (``k x s``), then an SVD of the small factor:
  ``rows = V diag(sigma) Y^T``. Singular values come out accurate to
  ``~eps * sigma_max`` (the Gram's eigenvalues only to ``eps * sigma_max^2``),
  which is also how far rounding the window to float32 moves them: a
  direction with ``sigma <= _rank_rtol(s) * sigma_max`` (zero rows, repeated
  rows) cannot be told from rounding and is dropped (never amplified by
  ``1 / lambda``). Rows are scaled by their largest entry first (no overflow
  or underflow in the factorisation).

  Args:
    rows: ``(*b, s, k)``.

  Returns:
    A :class:`WindowSpectrum` in the compute dtype (float32 unless float64
    in), with ``floor = 0``.
  """
  dt = _compute_dtype(rows.dtype)
  s = rows.shape[-2]
  scale, sv, kept, vecs, _ = _window_svd(rows.astype(dt), basis=False)
  pad = s - sv.shape[-1]
  if pad:
    sv = jnp.concatenate([sv, jnp.zeros(sv.shape[:-1] + (pad,), dt)], -1)
    kept = jnp.concatenate([kept, jnp.zeros(kept.shape[:-1] + (pad,), bool)],
                           -1)
  sq_sv = jnp.where(kept, jnp.square(sv * scale[..., 0]), 0.0)
  return WindowSpectrum(sq_sv, vecs, kept, jnp.zeros(sv.shape[:-1] + (1,), dt))


def gram_spectrum(gram: jax.Array) -> WindowSpectrum:
  r"""Spectrum of a window Gram ``K = H H^T`` given as a matrix (``eigh``).

  For callers that keep ``K`` up to date instead of refactorising the window
  (M-FAC). ``K`` is scaled by its largest diagonal entry before ``eigh``.
  Rounding ``K`` makes its eigenvalues accurate to ``~eps * ||K||`` only, far
  above the window's own rounding (``eps^2 ||K||``), so the eigenvalues below
  ``floor = _rank_rtol(s) * mu_max`` are kept but marked unresolved (see
  :func:`damped_inverse_weights`). Exact zeros (zero or duplicate rows) are
  the caller's to remove from ``K`` beforehand.

  Args:
    gram: ``(*b, s, s)`` symmetric positive semi-definite.

  Returns:
    A :class:`WindowSpectrum` (every direction kept, eigenvalues clamped at 0).
  """
  dt = _compute_dtype(gram.dtype)
  k = gram.astype(dt)
  s = k.shape[-1]
  scale = jnp.max(jnp.diagonal(k, axis1=-2, axis2=-1), axis=-1)[..., None]
  scale = jnp.where(scale > 0, scale, 1.0)
  mu, vecs = jnp.linalg.eigh(k / scale[..., None])  # ascending
  mu = jnp.maximum(mu, 0.0) * scale
  floor = _rank_rtol(s, dt) * mu[..., -1:]
  return WindowSpectrum(mu, vecs, jnp.ones(mu.shape, bool), floor)


def damped_inverse_weights(spectrum: WindowSpectrum, damping) -> jax.Array:
  r"""The weights ``1 / (lambda + mu)`` of ``(lambda I + K)^{-1}``, per direction.

  Directions not kept get 0. A kept eigenvalue below the spectrum's ``floor``
  is not resolved (its true value is anywhere in ``[0, floor]``, and its
  direction may be rounding noise): its weight is multiplied by
  ``(lambda^2 + mu^2) / (lambda^2 + floor^2)``. Where the damping dominates
  the floor (``lambda >> floor``) the weight is ``1 / lambda``, right whatever
  ``mu`` truly is; where the floor dominates the direction is damped out,
  so rounding noise is amplified by at most ``~1 / (2 floor)``, never by
  ``1 / lambda``. The factor is 1 at ``mu = floor`` (continuous).

  Args:
    spectrum: a :class:`WindowSpectrum`.
    damping: ``lambda > 0``.

  Returns:
    ``(*b, s)`` weights.
  """
  mu, _, kept, floor = spectrum
  lam = jnp.asarray(damping, mu.dtype)
  unresolved = jnp.maximum(jnp.square(floor / lam) - jnp.square(mu / lam), 0.0)
  return jnp.where(kept, 1.0 / ((lam + mu) * (1.0 + unresolved)), 0.0)


def solve_window_row(rows: jax.Array, spectrum: WindowSpectrum, damping,
                     slot, row_scale=None) -> jax.Array:
  r"""``(damping I + rows^T rows)^{-1} rows[slot]`` without cancellation.

  By push-through, ``= rows^T (damping I + K)^{-1} e_slot``, evaluated as
  ``rows^T V diag(w) V^T e_slot`` with ``w`` = :func:`damped_inverse_weights`.
  No ``1 / damping`` term, so the float32 error does not grow with
  ``||rows||^2 / damping``: it is ``~ eps * kappa`` (``kappa`` = the window's
  condition number over its nonzero singular values) with
  :func:`window_spectrum`, ``~ eps * kappa^2`` with :func:`gram_spectrum`.

  Args:
    rows: ``(*b, s, k)`` the window.
    spectrum: the spectrum of ``K`` (:func:`window_spectrum` or
      :func:`gram_spectrum`) or of ``diag(row_scale) K diag(row_scale)``.
    damping: ``lambda > 0``.
    slot: the row: an int, or an int array of shape ``()`` or ``(*b,)``.
    row_scale: optional ``(*b, s)``: solve for the window with row ``i``
      scaled by ``row_scale[i]`` (``rows`` stay unscaled in memory); the
      result is for that window's row ``slot``.

  Returns:
    ``(*b, k)`` in the compute dtype.
  """
  vecs = spectrum.vecs
  dt = vecs.dtype
  w = damped_inverse_weights(spectrum, damping)
  slot = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), vecs.shape[:-2])
  row_of_v = jnp.take_along_axis(vecs, slot[..., None, None],
                                 axis=-2)[..., 0, :]  # (*b, s): V^T e_slot
  coef = jnp.einsum("...ij,...j->...i", vecs, w * row_of_v, precision=_HI)
  if row_scale is not None:
    coef = coef * row_scale
  return jnp.einsum("...i,...ik->...k", coef, rows.astype(dt), precision=_HI)


def _window_sharding(p, history: int):
  """Sharding of a ``(*batch, s, *matrix)`` window for the leaf ``p``:
  ``p``'s entries with a replicated window axis (``None`` if unknown)."""
  ps = shd.leaf_sharding(p)
  if ps is None:
    return None
  batch, _ = _matrix_split(p.shape)
  spec = tuple(ps.spec) + (None,) * (p.ndim - len(ps.spec))
  nb = len(batch)
  return jax.sharding.NamedSharding(
      ps.mesh, jax.sharding.PartitionSpec(*spec[:nb], None, *spec[nb:]))


def _sharded_explicitly(h) -> bool:
  """The window ``h`` is split over some axis in an explicit mesh, where it
  cannot be flattened (matrix axes) or QR-factored (batched QR refuses a
  sharded batch axis there) in place."""
  hs = shd.leaf_sharding(h)
  if hs is None or not shd._explicit(hs):  # pylint: disable=protected-access
    return False
  return any(e is not None for e in hs.spec)


def _natural_gradient(h, g, slot, damping):
  """``(damping I + H^T H)^{-1} g`` for ``g`` = row ``slot`` of the window ``h``.

  ``h`` is ``(*batch, s, *matrix)`` and ``g`` ``(*batch, *matrix)``. A
  window that is not sharded (or whose sharding is left to XLA, in an auto
  mesh) is flattened and factored by a thin QR (:func:`window_spectrum`,
  error ``~eps kappa``). A window sharded in an explicit mesh keeps its
  sharding: its ``s x s`` Gram is a reduction over the sharded axes (no
  gather) and its spectrum comes from ``eigh`` (:func:`gram_spectrum`, error
  ``~eps kappa^2``, unresolved eigenvalues damped out); the result is a
  combination of the window's rows with ``g``'s sharding.
  """
  batch, k = _matrix_split(g.shape)
  nb = len(batch)
  if not _sharded_explicitly(h):
    flat = h.reshape(batch + (h.shape[nb],) + (k,))
    out = solve_window_row(flat, window_spectrum(flat), damping, slot)
    return out.reshape(g.shape)
  mat = "klmn"[:g.ndim - nb]
  dt = _compute_dtype(h.dtype)
  hd = h.astype(dt)
  hs = shd.leaf_sharding(h)
  small = jax.sharding.NamedSharding(
      hs.mesh, jax.sharding.PartitionSpec(*tuple(hs.spec)[:nb], None, None))
  gram = shd.einsum(f"...i{mat},...j{mat}->...ij", hd, hd, out=small,
                    precision=_HI)
  spectrum = gram_spectrum(gram)
  vecs = spectrum.vecs
  w = damped_inverse_weights(spectrum, damping)
  slot = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), vecs.shape[:-2])
  row_of_v = jnp.take_along_axis(vecs, slot[..., None, None], axis=-2)[..., 0, :]
  coef = jnp.einsum("...ij,...j->...i", vecs, w * row_of_v, precision=_HI)
  return shd.einsum(f"...i,...i{mat}->...{mat}", coef, hd,
                    out=shd.leaf_sharding(g), precision=_HI)


def woodbury_fisher_solve(history: jax.Array, g: jax.Array,
                          damping: float) -> jax.Array:
  r"""``(damping I + H^T H)^{-1} g`` for ``history`` ``H`` ``(*b, s, k)``, ``g`` ``(*b, k)``.

  Rows of ``history`` are the stored gradients; ``g`` is any vector (a row of
  the window or not). The reference's Woodbury form
  ``g / lambda - lambda^-2 H^T z`` cancels in float32 (module docstring); this
  deviates from its numerics, not its maths. With the thin QR of ``H^T`` and
  the SVD of its factor, ``H = V diag(sigma) Y^T`` (``Y`` orthonormal), split
  ``g = Y Y^T g + g_perp``; then

  .. math::
    (\lambda I + H^\top H)^{-1} g
      = Y \operatorname{diag}\Big(\frac{1}{\lambda + \sigma^2}\Big) Y^\top g
        + \frac{g_\perp}{\lambda},

  two terms that do not cancel. ``g_perp`` is computed with an error
  ``~ eps kappa(H) ||g||`` (``kappa`` the window's condition number over its
  kept singular values), so a ``g_perp`` below ``8 max(s, 8) eps kappa(H)
  ||g||`` is indistinguishable from rounding and set to zero: a ``g`` in the
  window's span (a row, a multiple of a row, the current gradient) is then
  solved like a window row, with relative error ``~ eps kappa(H)`` whatever
  ``||g||^2 / lambda``. For a general ``g`` the error is ``~ eps kappa(H)
  ||g|| / (lambda ||A^{-1} g||)`` (``A = lambda I + H^T H``): the float64
  problem's own sensitivity to rounding ``g`` and ``H``. Window directions with
  ``sigma <= 8 max(s, 8) eps sigma_max`` (zero rows, repeated rows) count as
  exact zeros. Never NaN for finite input.

  Args:
    history: ``(*b, s, k)``.
    g: ``(*b, k)``.
    damping: ``lambda > 0``.

  Returns:
    ``(*b, k)`` in float32 (float64 for float64 input).

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> g = jnp.array([3.0, 4.0])             # ||g||^2 = 25
    >>> h = jnp.stack([jnp.zeros(2), g])      # an unfilled slot, then g
    >>> bool(jnp.allclose(lro.woodbury_fisher_solve(h, g, 1.0), g / 26))
    True
    >>> big = 1e4 * g                         # ||g||^2 / lambda = 2.5e12
    >>> out = lro.woodbury_fisher_solve(h.at[1].set(big), big, 1e-3)
    >>> bool(jnp.allclose(out, big / (1e-3 + 2.5e9), rtol=1e-6))
    True
  """
  dt = _compute_dtype(jnp.result_type(history.dtype, g.dtype))
  h = history.astype(dt)
  g = g.astype(dt)
  lam = jnp.asarray(damping, dt)
  scale, sv, kept, _, y = _window_svd(h, basis=True)
  y = jnp.where(kept[..., None, :], y, 0.0)  # orthonormal basis of the rows
  coef = jnp.einsum("...kq,...k->...q", y, g, precision=_HI)  # Y^T g
  sq_sv = jnp.where(kept, jnp.square(sv * scale[..., 0]), 0.0)
  w = damped_inverse_weights(
      WindowSpectrum(sq_sv, None, kept, jnp.zeros(sv.shape[:-1] + (1,), dt)),
      lam)
  in_span = jnp.einsum("...kq,...q->...k", y, w * coef, precision=_HI)
  perp = g - jnp.einsum("...kq,...q->...k", y, coef, precision=_HI)
  # kappa over the kept singular values (1 for an all-zero window).
  sv_min = jnp.min(jnp.where(kept, sv, jnp.inf), axis=-1)
  kappa = jnp.where(jnp.isfinite(sv_min), sv[..., 0] / sv_min, 1.0)
  gscale = jnp.max(jnp.abs(g), axis=-1, keepdims=True)  # no underflow in norms
  gscale = jnp.where(gscale > 0, gscale, 1.0)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x / gscale), axis=-1))
  real = norm(perp) > _rank_rtol(h.shape[-2], dt) * kappa * norm(g)
  return in_span + jnp.where(real[..., None], perp, 0.0) / lam


def scale_by_natural_fisher(
    history: int = 20,
    damping: float = 1e-3,
) -> SubspaceOnlyTransformation:
  r"""Natural-gradient (inverse empirical Fisher) preconditioning, Woodbury form.

  Per matrix (the last two axes of each leaf; leading axes are batch axes,
  leaves with fewer than two axes are one vector), with ``g = vec(R)`` and the
  window ``G_h = [g_{t-s+1}, ..., g_t]`` (current gradient included):

  .. math::
    \tilde g = (\lambda I + G_h G_h^\top)^{-1} g.

  There is no ``1/s`` averaging (as in the reference code).

  Numerics deviate from the reference's (same maths): its Woodbury form
  ``g / lambda - lambda^-2 G_h z`` cancels in float32 (relative error
  ``~ eps ||g||^2 / lambda``: 1e-2 at ``||g|| = 10``, ``lambda = 1e-3``, and
  NaN once the Cholesky of ``I + G_h^T G_h / lambda`` fails). Since ``g`` is a
  row of the window, ``g~ = G_h^T (lambda I + K)^{-1} e_slot`` (``K`` the
  window's Gram) has no ``g / lambda`` term; the ``s x s`` system is solved
  through the window's spectrum (:func:`solve_window_row`), accurate to
  ``~ eps`` times the window's condition number for every ``||g||^2 /
  lambda``. The window is stored in the gradient dtype; the solve runs in
  float32. Inside
  :func:`~lowrank_optax.chain` it runs on projected leaves only and is skipped
  for leaves at full rank (as in the reference); used in ``optax.chain`` it
  preconditions every leaf. Chain it *before* Adam: Adam's moments then
  accumulate ``g~``.

  Memory: ``s`` copies of each low-rank gradient (``s = 20`` is 10x the Adam
  state of the subspace).

  Args:
    history: window length ``s`` (reference default 20).
    damping: ``lambda`` (reference: 1e-3, hard-coded).

  Returns:
    A transform marked :class:`~lowrank_optax.SubspaceOnlyTransformation`.

  Example:
    >>> import optax, lowrank_optax as lro
    >>> tx = lro.chain(lro.galore_project(32, proj_type="full"),
    ...                lro.scale_by_natural_fisher(), lro.scale_by_adam_hf(),
    ...                lro.back_project(), optax.scale_by_learning_rate(1e-2))

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM
    training and fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024;
    official code: https://github.com/selfsupervised-ai/Natural-GaLore
    (``_natural_gradient_transform``).
  """
  if isinstance(history, bool) or not isinstance(history, int) or history < 1:
    raise ValueError(f"history must be a positive int (it sets the window's"
                     f" shape), got {history!r}.")
  if isinstance(damping, (int, float)) and not damping > 0:
    raise ValueError(f"damping must be > 0, got {damping!r}.")

  def init_fn(params):
    def buf(p):
      batch, _ = _matrix_split(p.shape)
      shape = batch + (history,) + tuple(p.shape[len(batch):])
      return shd.zeros(shape, p.dtype, _window_sharding(p, history))
    return NaturalFisherState(jnp.zeros([], jnp.int32),
                              jax.tree.map(buf, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    slot = state.count % history

    def one(g, h):
      batch, _ = _matrix_split(g.shape)
      h = jax.lax.dynamic_update_index_in_dim(
          h, jnp.expand_dims(g.astype(h.dtype), len(batch)), slot,
          axis=len(batch))
      # g is row `slot` of the window: the stable in-window solve.
      out = _natural_gradient(h, g, slot, damping)
      return out.astype(g.dtype), h

    pairs = jax.tree.map(one, updates, state.history)
    new_updates = jax.tree.map(lambda _, p: p[0], updates, pairs)
    new_hist = jax.tree.map(lambda _, p: p[1], updates, pairs)
    return new_updates, NaturalFisherState(
        numerics.safe_int32_increment(state.count), new_hist)

  return SubspaceOnlyTransformation(init_fn, update_fn)
