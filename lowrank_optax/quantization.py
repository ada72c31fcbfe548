"""Quantisation pieces of Q-GaLore: int4 bases, 8-bit Adam, stochastic rounding.

Three independent tools (ALGORITHMS.md 7), each a set of pure, jit- and
vmap-compatible functions whose state is a ``NamedTuple`` of arrays:

* **Group-wise min-max quantisation** (:func:`quantize_int4`,
  :func:`dequantize_int4`): Q-GaLore's int4 projector, packed two codes per
  byte (any ``bits`` in 1, 2, 4, 8).
* **Block-wise 8-bit Adam** (:func:`scale_by_adam_8bit`) with bitsandbytes'
  dynamic quantisation map (:func:`create_dynamic_map`,
  :func:`quantize_blockwise`, :func:`dequantize_blockwise`): the inner
  optimizer of Q-GaLore and GaLore-8bit.
* **Stochastic rounding** (:func:`stochastic_round_int8`,
  :func:`dequantize_int8`, :func:`apply_updates_int8`,
  :func:`stochastic_round_to_bf16`): Q-GaLore's int8 weights.

Group-wise functions work on stacked matrices: the trailing two axes of an
array are the matrix and every leading axis is a batch axis (``batch_ndim``
overrides this); each matrix is flattened and quantised on its own, in groups
of ``group_size`` consecutive elements that cross row boundaries, as the
reference does for its 2-D tensors. In an explicit mesh the grouping runs in
``jax.sharding.auto_axes`` and the outputs keep the input's sharding (codes
of the array's shape) or its batch axes' (per-group arrays).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

__all__ = [
    "QuantizedArray",
    "quantize_int4",
    "dequantize_int4",
    "quantize_int8",
    "stochastic_round_int8",
    "dequantize_int8",
    "apply_updates_int8",
    "stochastic_round_to_bf16",
    "create_dynamic_map",
    "BlockwiseQuantized",
    "quantize_blockwise",
    "dequantize_blockwise",
    "ScaleByAdam8bitState",
    "scale_by_adam_8bit",
]

# The reference's floor on a group's range: scale = max(max - min, 1e-5) / L.
_MIN_RANGE = 1e-5
_PACKABLE_BITS = (1, 2, 4, 8)
_P = jax.sharding.PartitionSpec


def _explicit_spec(x) -> Optional[tuple]:
  """The spec entries of ``x`` if it lives in an explicit mesh, else ``None``."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sharding, "mesh", None)
  types = getattr(mesh, "axis_types", ())
  if not any(t == jax.sharding.AxisType.Explicit for t in types):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def _run(fn, args, out_specs):
  """``fn(*args)``; with ``out_specs`` (explicit mesh), in ``auto_axes``.

  The flatten / pad / reshape-to-groups and the table lookups are not
  expressible with explicit shardings, so in an explicit mesh they run with
  its axes made automatic (XLA propagates the shardings) and the outputs are
  given back with ``out_specs``: the input's sharding for arrays of its shape,
  its batch axes' for per-group arrays.
  """
  if out_specs is None:
    return fn(*args)
  return jax.sharding.auto_axes(fn, out_sharding=out_specs)(*args)


# ---------------------------------------------------------------------------
# Group-wise asymmetric min-max quantisation (Q-GaLore projector and weights)
# ---------------------------------------------------------------------------


class QuantizedArray(NamedTuple):
  """Group-wise min-max quantised array: ``x_hat = scale * (code - zero)``.

  Attributes:
    codes: uint8. For :func:`quantize_int4` the codes of each matrix,
      flattened and packed ``8 // bits`` per byte, shape
      ``(*batch, ceil(numel * bits / 8))`` (element ``2k`` in the low nibble
      of byte ``k`` for 4 bits). For the int8 functions the codes in the
      array's own shape.
    scale: float32, ``(*batch, n_groups)``: ``max(max - min, 1e-5) / (2^b - 1)``
      per group.
    zero: ``(*batch, n_groups)``: the integer zero point per group; uint8 with
      the reference's clamp to ``[0, 2^b - 1]`` (``clamp_zero=True``), float32
      (an exact integer) without it.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


def _batch_ndim(ndim: int, batch_ndim: Optional[int]) -> int:
  if batch_ndim is None:
    return max(ndim - 2, 0)
  if not 0 <= batch_ndim <= ndim:
    raise ValueError(f"batch_ndim={batch_ndim} is out of range for an array"
                     f" with {ndim} dimensions.")
  return batch_ndim


def _check_group_size(group_size) -> int:
  if not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
  return int(group_size)


def _check_input(x, batch_ndim):
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("Cannot quantise an empty array.")
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError("Quantisation of complex arrays is not supported.")
  return x, _batch_ndim(x.ndim, batch_ndim)


def _group_specs(spec, nb, codes_spec):
  """Out specs (codes, scale, zero) in an explicit mesh, or ``None``."""
  if spec is None:
    return None
  per_group = _P(*spec[:nb], None)
  return (codes_spec, per_group, per_group)


def _groups(x, group_size, batch_ndim):
  """``(*batch, n_groups, group_size)`` float32 groups of each flattened matrix.

  A last, partial group is padded with the matrix's last element (``edge``),
  which leaves that group's min and max (so its scale and zero) those of its
  real elements: it is quantised as a smaller group.
  """
  nb = batch_ndim
  batch = x.shape[:nb]
  numel = math.prod(x.shape[nb:])
  n_groups = -(-numel // group_size)
  flat = x.astype(jnp.float32).reshape(*batch, numel)
  pad = n_groups * group_size - numel
  if pad:
    flat = jnp.pad(flat, [(0, 0)] * nb + [(0, pad)], mode="edge")
  return flat.reshape(*batch, n_groups, group_size), batch, numel


def _scale_zero(groups, levels, clamp_zero):
  """Per-group ``scale`` and ``zero`` of the reference (``levels = 2^b - 1``).

  A group holding a non-finite value gets a NaN scale, so the whole group
  dequantises to NaN (visible) instead of to arbitrary codes.
  """
  hi = jnp.max(groups, axis=-1)
  lo = jnp.min(groups, axis=-1)
  finite = jnp.all(jnp.isfinite(groups), axis=-1)
  scale = jnp.maximum(hi - lo, _MIN_RANGE) / levels
  scale = jnp.where(finite, scale, jnp.nan)
  zero = -jnp.round(lo / scale)
  if clamp_zero:
    zero = jnp.clip(zero, 0, levels)
  zero = jnp.where(finite, zero, 0.0)
  return scale, zero


def _finish(q, scale, zero, clamp_zero, batch, numel):
  """Drops the padding; returns codes ``(*batch, numel)`` uint8, zero dtype."""
  q = jnp.where(jnp.isfinite(scale)[..., None], q, 0.0)
  codes = q.reshape(*batch, -1)[..., :numel].astype(jnp.uint8)
  zero = zero.astype(jnp.uint8) if clamp_zero else zero.astype(jnp.float32)
  return codes, scale.astype(jnp.float32), zero


def _pack(codes, bits):
  """Packs ``(*batch, n)`` uint8 codes ``8 // bits`` per byte (low bits first)."""
  per_byte = 8 // bits
  if per_byte == 1:
    return codes
  n = codes.shape[-1]
  pad = -n % per_byte
  if pad:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  codes = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(jnp.uint32)
  shifts = jnp.arange(per_byte, dtype=jnp.uint32) * bits
  return jnp.sum(codes << shifts, axis=-1).astype(jnp.uint8)


def _unpack(packed, bits, n):
  per_byte = 8 // bits
  if per_byte == 1:
    return packed[..., :n]
  shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
  mask = jnp.uint8((1 << bits) - 1)
  codes = (packed[..., None] >> shifts) & mask
  return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def _dequantize_groups(codes_flat, scale, zero, group_size, batch, numel):
  """``scale * (code - zero)`` per group; returns ``(*batch, numel)`` float32."""
  n_groups = scale.shape[-1]
  pad = n_groups * group_size - numel
  q = codes_flat.astype(jnp.float32)
  if pad:
    q = jnp.pad(q, [(0, 0)] * len(batch) + [(0, pad)])
  q = q.reshape(*batch, n_groups, group_size)
  x = scale[..., None] * (q - zero.astype(jnp.float32)[..., None])
  return x.reshape(*batch, -1)[..., :numel]


def _check_layout(qa, batch, numel, group_size, nbytes, what):
  n_groups = -(-numel // group_size)
  want = (tuple(batch) + (nbytes,), tuple(batch) + (n_groups,))
  got = (tuple(qa.codes.shape), tuple(qa.scale.shape))
  if got != want or tuple(qa.zero.shape) != want[1]:
    raise ValueError(
        f"{what}: codes/scale/zero of shapes {got[0]}/{got[1]}/"
        f"{tuple(qa.zero.shape)} do not match the shape and group_size given"
        f" (expected {want[0]}/{want[1]}/{want[1]}); pass the same shape,"
        " group_size, bits and batch_ndim as to the quantiser.")


def _check_bits(bits):
  if bits not in _PACKABLE_BITS:
    raise ValueError(f"bits must be one of {_PACKABLE_BITS} (codes are packed"
                     f" whole into bytes), got {bits!r}.")


def quantize_int4(
    x: jax.Array,
    group_size: int = 256,
    *,
    bits: int = 4,
    clamp_zero: bool = True,
    batch_ndim: Optional[int] = None,
) -> QuantizedArray:
  r"""Quantises each matrix group-wise to ``bits``-bit codes, packed per byte.

  Q-GaLore's projector quantisation (ALGORITHMS.md 7, item 2). Each matrix
  (the trailing two axes; leading axes are batch axes) is flattened and split
  into groups of ``group_size`` consecutive elements. With ``L = 2^b - 1``,
  per group :math:`g`

  .. math::
    s_g = \max(\max g - \min g,\ 10^{-5}) / L,\quad
    z_g = \mathrm{clip}(-\mathrm{round}(\min g / s_g), 0, L),\quad
    q = \mathrm{clip}(\mathrm{round}(x / s_g) + z_g, 0, L),

  and the value is read back as :math:`\hat x = s_g (q - z_g)`
  (:func:`dequantize_int4`); ``round`` is half-to-even, as ``torch.round``.
  An element is off by at most :math:`s_g/2` unless its code was clamped.

  The reference's clamp of ``z`` to ``[0, L]`` is exact only for groups
  whose range contains (nearly) zero, as an orthonormal basis's groups do;
  for a group of one sign (e.g. 256 entries of a first singular vector that
  are all positive) it clamps codes and the error can be the size of the
  values themselves. ``clamp_zero=False`` stores ``z`` unclamped (float32)
  and then no code is ever clamped: every element is within :math:`s_g/2`
  (plus float32 rounding of :math:`|x|`).

  Deviations from the reference (``q_galore_torch/q_galore_projector.py``):
  codes are packed (it stores one uint8 per 4-bit code, which saves nothing);
  a matrix whose size is not a multiple of ``group_size`` (the reference
  asserts) gets a last, smaller group (padded internally with its last
  element, so its scale is that of its real elements); ``scale`` is float32
  (the reference keeps it in the parameter dtype, bf16 in its runs:
  float32 keeps the error bound above exact and costs 4 bytes per group,
  1/64 of a byte per element at 256); a group holding a non-finite value
  dequantises to NaN (the reference asserts finite input).

  Args:
    x: a real array ``(*batch, d, r)`` (any float dtype; computed in float32).
    group_size: elements per group (reference 256).
    bits: code width: 1, 2, 4 (default) or 8.
    clamp_zero: clamp the zero point to ``[0, 2^b - 1]`` as the reference
      (stored uint8); ``False`` stores it unclamped (float32).
    batch_ndim: number of leading batch axes (default ``x.ndim - 2``, at
      least 0); each remaining block of axes is one matrix.

  Returns:
    A :class:`QuantizedArray` with packed codes ``(*batch, ceil(numel * bits
    / 8))``, ``scale`` and ``zero`` of shape ``(*batch, ceil(numel /
    group_size))``, ``numel`` the size of one matrix.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> basis = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (3, 64, 8)))[0]
    >>> qa = lro.quantize_int4(basis)
    >>> qa.codes.shape, qa.codes.dtype, qa.scale.shape
    ((3, 256), dtype('uint8'), (3, 2))
    >>> back = lro.dequantize_int4(qa, basis.shape)
    >>> bool(jnp.all(jnp.abs(back - basis) <= qa.scale.max() / 2 + 1e-7))
    True

  References:
    Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296;
    ``q_galore_torch/q_galore_projector.py`` (``_quantize``) in
    https://github.com/VITA-Group/Q-GaLore.
  """
  _check_bits(bits)
  group_size = _check_group_size(group_size)
  x, nb = _check_input(x, batch_ndim)
  levels = float(2**bits - 1)

  def run(x):
    groups, batch, numel = _groups(x, group_size, nb)
    scale, zero = _scale_zero(groups, levels, clamp_zero)
    q = jnp.clip(jnp.round(groups / scale[..., None]) + zero[..., None], 0,
                 levels)
    codes, scale, zero = _finish(q, scale, zero, clamp_zero, batch, numel)
    return _pack(codes, bits), scale, zero

  spec = _explicit_spec(x)
  specs = _group_specs(spec, nb, spec and _P(*spec[:nb], None))
  return QuantizedArray(*_run(run, (x,), specs))


def dequantize_int4(
    qa: QuantizedArray,
    shape,
    dtype: Any = jnp.float32,
    *,
    group_size: int = 256,
    bits: int = 4,
    batch_ndim: Optional[int] = None,
) -> jax.Array:
  r"""Reads back an array quantised by :func:`quantize_int4`: ``scale * (q - zero)``.

  Args:
    qa: the :class:`QuantizedArray`.
    shape: the original array's shape (static; packed codes do not carry it).
    dtype: dtype of the result (computed in float32).
    group_size: the ``group_size`` given to :func:`quantize_int4`.
    bits: the ``bits`` given to :func:`quantize_int4`.
    batch_ndim: the ``batch_ndim`` given to :func:`quantize_int4`.

  Returns:
    An array of ``shape`` and ``dtype``.

  Raises:
    ValueError: if the arrays of ``qa`` do not have the layout that
      ``shape``, ``group_size``, ``bits`` and ``batch_ndim`` imply.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> x = jnp.linspace(0.5, 1.0, 32).reshape(4, 8)  # positive groups
    >>> for clamp in (True, False):  # the reference's zero clamp bites here
    ...   qa = lro.quantize_int4(x, group_size=16, clamp_zero=clamp)
    ...   y = lro.dequantize_int4(qa, x.shape, group_size=16)
    ...   print(y.shape, bool(jnp.max(jnp.abs(y - x)) <= qa.scale.max() / 2 + 1e-7))
    (4, 8) False
    (4, 8) True

  References:
    ``q_galore_torch/q_galore_projector.py`` in
    https://github.com/VITA-Group/Q-GaLore (``scales * (q - zeros)``).
  """
  _check_bits(bits)
  group_size = _check_group_size(group_size)
  shape = tuple(shape)
  nb = _batch_ndim(len(shape), batch_ndim)
  batch, numel = shape[:nb], math.prod(shape[nb:])
  _check_layout(qa, batch, numel, group_size, -(-numel * bits // 8),
                "dequantize_int4")

  def run(codes, scale, zero):
    codes = _unpack(codes, bits, numel)
    x = _dequantize_groups(codes, scale, zero, group_size, batch, numel)
    return x.reshape(shape).astype(dtype)

  spec = _explicit_spec(qa.codes)
  out = None if spec is None else _P(*spec[:nb], *(None,) * (len(shape) - nb))
  return _run(run, tuple(qa), out)


def quantize_int8(
    w: jax.Array,
    group_size: int = 256,
    *,
    clamp_zero: bool = True,
    batch_ndim: Optional[int] = None,
) -> QuantizedArray:
  r"""Quantises weights group-wise to uint8 with round-to-nearest.

  The rule of :func:`quantize_int4` with ``bits=8`` (``L = 255``), codes kept
  unpacked in ``w``'s shape: Q-GaLore's initial weight quantisation
  (``_quantize_tensor_int8`` in ``q_galore_torch/utils/quantization.py``).
  Read back with :func:`dequantize_int8`; keep weights updated with
  :func:`apply_updates_int8`.

  Args:
    w: a real array ``(*batch, d_in, d_out)``.
    group_size: elements per group (reference 256).
    clamp_zero: as in :func:`quantize_int4`.
    batch_ndim: as in :func:`quantize_int4`.

  Returns:
    A :class:`QuantizedArray` with uint8 ``codes`` of ``w.shape``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> w = jnp.linspace(-1.0, 1.0, 512).reshape(16, 32)
    >>> qw = lro.quantize_int8(w)
    >>> qw.codes.shape, qw.codes.dtype, qw.scale.shape
    ((16, 32), dtype('uint8'), (2,))

  References:
    ``q_galore_torch/utils/quantization.py`` in
    https://github.com/VITA-Group/Q-GaLore.
  """
  return _int8(w, None, group_size, clamp_zero, batch_ndim)


def _int8(w, key, group_size, clamp_zero, batch_ndim):
  """Round-to-nearest (``key=None``) or stochastic int8 codes in ``w``'s shape."""
  group_size = _check_group_size(group_size)
  w, nb = _check_input(w, batch_ndim)

  def run(w, key):
    groups, batch, numel = _groups(w, group_size, nb)
    scale, zero = _scale_zero(groups, 255.0, clamp_zero)
    y = groups / scale[..., None]
    if key is None:
      r = jnp.round(y)
    else:  # the reference: ceil(y) if u < y - floor(y) else floor(y)
      down = jnp.floor(y)
      u = jax.random.uniform(key, y.shape, jnp.float32)
      r = jnp.where(u < y - down, jnp.ceil(y), down)
    q = jnp.clip(r + zero[..., None], 0, 255)
    codes, scale, zero = _finish(q, scale, zero, clamp_zero, batch, numel)
    return codes.reshape(w.shape), scale, zero

  spec = _explicit_spec(w)
  specs = _group_specs(spec, nb, spec and _P(*spec))
  if key is None:
    return QuantizedArray(*_run(lambda w: run(w, None), (w,), specs))
  return QuantizedArray(*_run(run, (w, key), specs))


def stochastic_round_int8(
    w: jax.Array,
    key: jax.Array,
    group_size: int = 256,
    *,
    clamp_zero: bool = True,
    batch_ndim: Optional[int] = None,
) -> QuantizedArray:
  r"""Quantises weights group-wise to uint8 with stochastic rounding.

  Q-GaLore's requantisation of its int8 weights after every update
  (``_quantize_stochastic_round`` in ``q_galore_torch/q_galore_adamw8bit.py``),
  in the reference's order: ``scale`` and ``zero`` are recomputed from the
  (updated) group exactly as in :func:`quantize_int8`, then

  .. math::
    y = w / s,\quad
    q = \mathrm{clip}(\lfloor y\rfloor + [u < y - \lfloor y\rfloor] + z,\ 0,\ 255),
    \quad u \sim U[0, 1)

  (the reference picks ``ceil(y)`` when ``u < frac(y)``, else ``floor(y)``;
  for an integer ``y`` both are ``y``), i.e. the rounding happens on ``w/s``
  *before* the zero point is added and the clip is last.

  Unbiasedness: :math:`E[s(q - z)] = w` for every element inside the
  representable range :math:`[s(0 - z), s(255 - z)]`. Because
  :math:`z = -\mathrm{round}(\min/s)` is rounded, one end of each group's
  range can lie up to :math:`s/2` outside that grid: the group's minimum when
  ``min/s`` rounds up, its maximum when it rounds down; such an element is
  clipped when it rounds outward, so its expectation is pulled inward by
  :math:`s \cdot \mathrm{frac}`, less than :math:`s/2` (a property of the
  reference's rule, kept here for parity).

  Args:
    w: a real array ``(*batch, d_in, d_out)`` (computed in float32).
    key: a PRNG key (one uniform draw per element).
    group_size: elements per group (reference 256).
    clamp_zero: as in :func:`quantize_int4`.
    batch_ndim: as in :func:`quantize_int4`.

  Returns:
    A :class:`QuantizedArray` with uint8 ``codes`` of ``w.shape``.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> w = jnp.linspace(-1.0, 1.0, 256)
    >>> qw = lro.stochastic_round_int8(w, jax.random.key(0))
    >>> back = lro.dequantize_int8(qw)
    >>> bool(jnp.all(jnp.abs(back - w) <= qw.scale[0] * (1 + 1e-5)))
    True

  References:
    Zhang et al., arXiv 2407.08296 (Q-GaLore), section on stochastic
    rounding; ``q_galore_torch/q_galore_adamw8bit.py`` in
    https://github.com/VITA-Group/Q-GaLore.
  """
  return _int8(w, key, group_size, clamp_zero, batch_ndim)


def dequantize_int8(
    qa: QuantizedArray,
    dtype: Any = jnp.float32,
    *,
    group_size: int = 256,
    batch_ndim: Optional[int] = None,
) -> jax.Array:
  r"""Reads back int8 weights: ``scale * (q - zero)`` per group.

  Args:
    qa: a :class:`QuantizedArray` from :func:`quantize_int8` or
      :func:`stochastic_round_int8` (codes in the weight's shape).
    dtype: dtype of the result (computed in float32).
    group_size: the ``group_size`` used to quantise.
    batch_ndim: the ``batch_ndim`` used to quantise.

  Returns:
    An array of ``qa.codes.shape`` and ``dtype``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> w = jnp.array([[-0.5, 0.0], [0.25, 1.0]])
    >>> lro.dequantize_int8(lro.quantize_int8(w, group_size=4))
    Array([[-0.5       ,  0.        ],
           [ 0.24705882,  1.        ]], dtype=float32)

  References:
    ``q_galore_torch/utils/quantization.py`` in
    https://github.com/VITA-Group/Q-GaLore.
  """
  group_size = _check_group_size(group_size)
  shape = tuple(qa.codes.shape)
  nb = _batch_ndim(len(shape), batch_ndim)
  batch, numel = shape[:nb], math.prod(shape[nb:])
  _check_layout(QuantizedArray(jax.ShapeDtypeStruct(batch + (numel,),
                                                    jnp.uint8),
                               qa.scale, qa.zero),
                batch, numel, group_size, numel, "dequantize_int8")

  def run(codes, scale, zero):
    flat = codes.reshape(*batch, numel)
    x = _dequantize_groups(flat, scale, zero, group_size, batch, numel)
    return x.reshape(shape).astype(dtype)

  spec = _explicit_spec(qa.codes)
  return _run(run, tuple(qa), None if spec is None else _P(*spec))


def _is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def apply_updates_int8(
    qparams: Any,
    updates: Any,
    key: jax.Array,
    *,
    group_size: int = 256,
    stochastic: bool = True,
    clamp_zero: bool = True,
) -> Any:
  r"""``optax.apply_updates`` for int8 weights: dequantise, add, requantise.

  For every leaf that is a :class:`QuantizedArray`:
  ``w = dequantize_int8(q); q' = stochastic_round_int8(w + u)`` (scale and
  zero recomputed from the updated group), as Q-GaLore's optimizer step does
  for its ``QGaLoreLinear`` weights. Other leaves get ``p + u``, as
  ``optax.apply_updates``. Each quantised leaf draws from its own key
  (``fold_in(key, leaf_index)``).

  Args:
    qparams: a pytree whose leaves are arrays or :class:`QuantizedArray` s.
    updates: a pytree of updates with the structure of the float params
      (a :class:`QuantizedArray` stands for one array).
    key: PRNG key of this step.
    group_size: the weights' group size.
    stochastic: stochastic rounding (reference ``--stochastic_round``);
      ``False`` rounds to nearest.
    clamp_zero: as in :func:`quantize_int4`.

  Returns:
    The updated pytree of the same structure as ``qparams``.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> qp = {"w": lro.quantize_int8(jnp.linspace(-1.0, 1.0, 256).reshape(16, 16)),
    ...       "b": jnp.zeros(16)}
    >>> upd = {"w": jnp.full((16, 16), 0.1), "b": jnp.ones(16)}
    >>> qp = lro.apply_updates_int8(qp, upd, jax.random.key(0))
    >>> type(qp["w"]).__name__, qp["w"].codes.dtype
    ('QuantizedArray', dtype('uint8'))

  References:
    ``q_galore_torch/q_galore_adamw8bit.py`` (``step``) in
    https://github.com/VITA-Group/Q-GaLore.
  """
  leaves, treedef = jax.tree.flatten(qparams, is_leaf=_is_quantized)
  upd = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(leaves, upd)):
    if u is None:
      out.append(p)
    elif _is_quantized(p):
      w = dequantize_int8(p, group_size=group_size) + u.astype(jnp.float32)
      if stochastic:
        out.append(stochastic_round_int8(w, jax.random.fold_in(key, i),
                                         group_size, clamp_zero=clamp_zero))
      else:
        out.append(quantize_int8(w, group_size, clamp_zero=clamp_zero))
    else:
      out.append(jnp.asarray(p + u).astype(jnp.asarray(p).dtype))
  return treedef.unflatten(out)


def stochastic_round_to_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  r"""Rounds float32 values to bfloat16 stochastically (unbiased).

  Each value goes to one of its two neighbouring bfloat16 values,
  :math:`b_\downarrow \le |x| < b_\uparrow` in magnitude, with

  .. math::
    P(b_\uparrow) = \frac{|x| - b_\downarrow}{b_\uparrow - b_\downarrow},

  so :math:`E[\mathrm{SR}(x)] = x`. Implemented on the bit pattern: a uniform
  16-bit integer is added to the low 16 bits of the float32 word, which is
  then truncated to its top 16 bits (the bfloat16). A float32 value that is
  already a bfloat16 is returned unchanged; ``nan`` and ``inf`` pass through;
  a finite value above the largest finite bfloat16 (``3.3895e38``) can
  round up to ``inf``, as round-to-nearest would.

  Args:
    x: a float32 array (other float dtypes are cast to float32 first).
    key: a PRNG key (16 random bits per element).

  Returns:
    A bfloat16 array of ``x.shape``.

  Example:
    >>> import jax, jax.numpy as jnp, lowrank_optax as lro
    >>> x = jnp.full((10000,), 1.0 + 2.0**-9, jnp.float32)  # 1/4 of a bf16 ulp
    >>> y = lro.stochastic_round_to_bf16(x, jax.random.key(0))
    >>> sorted({float(v) for v in y})
    [1.0, 1.0078125]

  References:
    Zhang et al., arXiv 2407.08296 (Q-GaLore: stochastic rounding keeps small
    updates of low-precision weights); Gupta et al., "Deep Learning with
    Limited Numerical Precision", ICML 2015.
  """
  x = jnp.asarray(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isfinite(x), y, x.astype(jnp.bfloat16))


# ---------------------------------------------------------------------------
# Block-wise dynamic 8-bit quantisation and 8-bit Adam (bitsandbytes)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> np.ndarray:
  data = []
  for i in range(7):  # decades 1e-6 .. 1e0
    n = 2**i if signed else 2**(i + 1)
    edges = np.linspace(0.1, 1.0, n + 1)
    means = (edges[:-1] + edges[1:]) / 2.0
    data.extend(10.0**(i - 6) * means)
    if signed:
      data.extend(-(10.0**(i - 6)) * means)
  data += [0.0, 1.0]
  out = np.sort(np.asarray(data, np.float32))
  assert out.shape == (256,)
  out.setflags(write=False)
  return out


def create_dynamic_map(signed: bool = True) -> np.ndarray:
  r"""bitsandbytes' 8-bit "dynamic tree" quantisation map (256 sorted values).

  With 7 exponent bits (bitsandbytes' ``create_dynamic_map(signed,
  max_exponent_bits=7, total_bits=8)``): for each decade
  :math:`i = 0..6` the map holds the midpoints of
  ``linspace(0.1, 1, k + 1)`` times :math:`10^{i-6}`, with :math:`k = 2^i`
  values per sign (signed) or :math:`k = 2^{i+1}` (unsigned), plus ``0`` and
  ``1``. Signed: 127 negative values down to ``-0.99296875``, ``0``, 127
  positive values and ``1``. Unsigned: ``0``, 254 positive values, ``1``.
  The grid is finer for small magnitudes: the smallest nonzero magnitude is
  ``5.5e-7`` (signed) or ``3.25e-7`` (unsigned); the largest gap, ``0.9/64``
  (signed) or ``0.9/128`` (unsigned), is among the values just under 1.
  Relative to the value, the grid is coarsest at the low end of each decade
  (``0.9/k`` against ``0.1``).

  Computed in float64 and rounded once to float32 (bitsandbytes computes the
  midpoints in float32 with ``torch.linspace``, so values may differ in the
  last float32 bit).

  Args:
    signed: the signed map (first moment) or the unsigned one (second).

  Returns:
    A read-only float32 NumPy array of 256 increasing values in ``[-1, 1]``.

  Example:
    >>> import lowrank_optax as lro
    >>> m = lro.create_dynamic_map(signed=False)
    >>> m.shape, m.dtype, float(m[0]), float(m[-1])
    ((256,), dtype('float32'), 0.0, 1.0)

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR
    2022 (arXiv 2110.02861); ``create_dynamic_map`` in
    ``bitsandbytes/functional.py``,
    https://github.com/bitsandbytes-foundation/bitsandbytes; Dettmers,
    "8-Bit Approximations for Parallelism in Deep Learning", arXiv 1511.04561.
  """
  return _dynamic_map(bool(signed))


class BlockwiseQuantized(NamedTuple):
  """An array quantised block-wise with a dynamic map.

  Attributes:
    codes: uint8 indices into the map, in the original array's shape.
    absmax: float32 ``(ceil(size / block_size),)``: the largest magnitude of
      each block of the flattened array (0 for an all-zero block).
  """

  codes: jax.Array
  absmax: jax.Array


def _n_blocks(size: int, block_size: int) -> int:
  return -(-size // block_size)


def _check_block_size(block_size) -> int:
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
  return int(block_size)


def _nearest_code(y, qmap):
  """Index of the nearest value of the sorted ``qmap``; ties to the lower."""
  idx = jnp.searchsorted(qmap, y, side="left", method="scan")
  hi = jnp.clip(idx, 0, qmap.shape[0] - 1)
  lo = jnp.clip(idx - 1, 0, qmap.shape[0] - 1)
  mid = (qmap[lo] + qmap[hi]) * 0.5
  return jnp.where(y > mid, hi, lo)


def _quantize_blockwise(x32, block_size, signed, preserve_sign):
  spec = _explicit_spec(x32)
  if spec is None:
    return _quantize_blockwise_local(x32, block_size, signed, preserve_sign)
  fn = lambda x: tuple(_quantize_blockwise_local(x, block_size, signed,
                                                 preserve_sign))
  return BlockwiseQuantized(*_run(fn, (x32,), (_P(*spec), _P(None))))


def _dequantize_blockwise(bq, block_size, signed):
  spec = _explicit_spec(bq.codes)
  if spec is None:
    return _dequantize_blockwise_local(bq, block_size, signed)
  fn = lambda c, a: _dequantize_blockwise_local(BlockwiseQuantized(c, a),
                                                block_size, signed)
  return _run(fn, tuple(bq), _P(*spec))


def _quantize_blockwise_local(x32, block_size, signed, preserve_sign):
  qmap = jnp.asarray(_dynamic_map(signed))
  shape, size = x32.shape, x32.size
  nblk = _n_blocks(size, block_size)
  flat = x32.reshape(-1)
  pad = nblk * block_size - size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  blocks = flat.reshape(nblk, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  y = blocks / safe[:, None]
  codes = _nearest_code(y, qmap)
  if preserve_sign:
    codes = jnp.where((blocks < 0) & (qmap[codes] >= 0), codes - 1, codes)
  codes = codes.reshape(-1)[:size].reshape(shape).astype(jnp.uint8)
  return BlockwiseQuantized(codes, absmax)


def _dequantize_blockwise_local(bq, block_size, signed):
  qmap = jnp.asarray(_dynamic_map(signed))
  shape, size = bq.codes.shape, bq.codes.size
  nblk = bq.absmax.shape[0]
  flat = bq.codes.reshape(-1)
  pad = nblk * block_size - size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  vals = qmap[flat.reshape(nblk, block_size).astype(jnp.int32)]
  vals = vals * bq.absmax[:, None]
  return vals.reshape(-1)[:size].reshape(shape)


def quantize_blockwise(
    x: jax.Array,
    block_size: int = 2048,
    *,
    signed: bool = True,
    preserve_sign: bool = False,
) -> BlockwiseQuantized:
  r"""Quantises an array block-wise to 8-bit codes of the dynamic map.

  The array is flattened and cut into blocks of ``block_size`` elements (the
  last one shorter). Per block :math:`A = \max |x|`; each element gets the
  index of the map value nearest to :math:`x / A` (ties to the lower value;
  an all-zero block gets the code of 0), so
  :math:`|\hat x - x| \le A \cdot \mathrm{gap}/2` with ``gap`` the distance
  between the two map values around :math:`x/A`.

  ``preserve_sign=True`` is bitsandbytes' rule for the first Adam moment: a
  negative value whose nearest code is ``0`` takes the next code down
  instead (the smallest negative magnitude, ``5.5e-7 A``), so no negative
  value is stored as zero; its error is then at most one gap, not half.

  Args:
    x: a real, finite array (computed in float32; a non-finite value makes
      its whole block non-finite).
    block_size: elements per block.
    signed: use the signed map (``x`` of both signs) or the unsigned one
      (``x >= 0``; negative values take the code of 0).
    preserve_sign: bitsandbytes' sign rule (above).

  Returns:
    A :class:`BlockwiseQuantized` with codes in ``x.shape``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> x = jnp.array([-2.0, 0.5, 1.0, 0.0])
    >>> bq = lro.quantize_blockwise(x, block_size=2)
    >>> bq.absmax
    Array([2., 1.], dtype=float32)
    >>> lro.dequantize_blockwise(bq, block_size=2)
    Array([-1.9859375,  0.4953125,  1.       ,  0.       ], dtype=float32)

  References:
    Dettmers et al., ICLR 2022 (arXiv 2110.02861), block-wise quantisation;
    ``quantize_blockwise`` in ``bitsandbytes/functional.py`` and the 8-bit
    blockwise optimizer kernels in ``csrc/kernels.cu``,
    https://github.com/bitsandbytes-foundation/bitsandbytes.
  """
  block_size = _check_block_size(block_size)
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("Cannot quantise an empty array.")
  return _quantize_blockwise(x.astype(jnp.float32), block_size, bool(signed),
                             preserve_sign)


def dequantize_blockwise(
    bq: BlockwiseQuantized,
    block_size: int = 2048,
    *,
    signed: bool = True,
    dtype: Any = jnp.float32,
) -> jax.Array:
  r"""Reads back a :class:`BlockwiseQuantized` array: ``map[code] * absmax``.

  Args:
    bq: the quantised array.
    block_size: the ``block_size`` used to quantise.
    signed: the map used to quantise.
    dtype: dtype of the result (computed in float32).

  Returns:
    An array of ``bq.codes.shape`` and ``dtype``.

  Example:
    >>> import jax.numpy as jnp, lowrank_optax as lro
    >>> bq = lro.quantize_blockwise(jnp.array([4.0, 1e-3, 0.0]), signed=False)
    >>> lro.dequantize_blockwise(bq, signed=False)  # 1e-3/4 is coarse
    Array([4.000e+00, 9.625e-04, 0.000e+00], dtype=float32)

  References:
    ``dequantize_blockwise`` in ``bitsandbytes/functional.py``,
    https://github.com/bitsandbytes-foundation/bitsandbytes.
  """
  block_size = _check_block_size(block_size)
  want = _n_blocks(bq.codes.size, block_size)
  if bq.absmax.shape != (want,):
    raise ValueError(f"absmax of shape {bq.absmax.shape} does not match"
                     f" {bq.codes.size} codes in blocks of {block_size}"
                     f" (expected ({want},)); pass the block_size used to"
                     " quantise.")
  return _dequantize_blockwise(bq, block_size, bool(signed)).astype(dtype)


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: number of completed updates (int32).
    mu: per leaf, the first moment as a :class:`BlockwiseQuantized` (signed
      map), or a float32 array for a leaf smaller than ``min_8bit_size``.
    nu: the second moment, likewise (unsigned map).
  """

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 2048,
    min_8bit_size: int = 4096,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam whose two moments are stored in 8 bits (bitsandbytes' block-wise Adam8bit).

  PyTorch-style Adam (ALGORITHMS.md 0.2 (B), as ``optax.scale_by_adam``)
  with ``t`` the 1-based step and :math:`Q` block-wise dynamic quantisation
  (:func:`quantize_blockwise`):

  .. math::
    m_t = \beta_1 \hat m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 \hat v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon},

  where :math:`\hat m_{t-1}, \hat v_{t-1}` are the dequantised stored moments;
  the update uses the float32 :math:`m_t, v_t` of this step, and only then
  are they requantised: :math:`m_t` with the signed map and bitsandbytes'
  sign rule, :math:`v_t` with the unsigned map, each with the absmax of its
  block of the *new* values. The state per moment is one uint8 per element
  plus one float32 per block: ``size + 4 * ceil(size / block_size)`` bytes.

  What bitsandbytes does (read from ``bitsandbytes/functional.py``,
  ``bitsandbytes/optim/optimizer.py`` and the kernel
  ``kOptimizerStatic8bit2StateBlockwise`` in ``csrc/kernels.cu``):

  * maps: ``create_dynamic_map(signed=True)`` for ``state1`` (m),
    ``signed=False`` for ``state2`` (v) (:func:`create_dynamic_map`);
  * blocks of the flattened parameter: 2048 elements in the releases of
    Q-GaLore's time (its ``environment.yml`` pins bitsandbytes 0.43.1;
    ``init_state`` allocates ``ceil(n / 2048)`` absmax values), the default
    here; the current main uses 256 (``BLOCKSIZE_2STATE``; pass
    ``block_size=256`` for parity with it);
  * per element in float32: dequantise (``map[code] * absmax[block]``), the
    moment updates above, new per-block absmax of the updated moments, the
    parameter step ``p += -lr * sqrt(bc2) / bc1 * m / (sqrt(v) + sqrt(bc2)
    * eps)`` (identical to :math:`-\mathrm{lr}\, u_t`), then requantise to
    the nearest code by binary search over the map (ties: either neighbour,
    by the search path; here the lower), and for m: if the chosen code's
    sign differs from m's, move one code towards m's sign;
  * state starts as code 0 with absmax 0 (dequantises to 0);
  * parameters with fewer than ``min_8bit_size`` (4096) elements keep
    float32 moments (``Optimizer2State.init_state``); Q-GaLore's
    ``AdamW8bit`` keeps that default and applies it to the *low-rank* shape;
  * non-finite gradient elements (current kernel; the older 2048-block
    kernel has no such check and lets NaN spread through its block): that
    element's moments are set to 0 and its parameter is left unchanged.

  Deviations: no percentile clipping, ``max_unorm`` or weight decay (chain
  ``optax`` transforms for those; Q-GaLore moves weight decay out of the
  8-bit call); the sign rule acts on strictly negative m only (bitsandbytes
  also moves ``-0.0``); blocks may have any size (bitsandbytes' kernels take
  a few fixed ones); a non-finite gradient element resets that element's
  moments to 0 as bitsandbytes does, but its update is NaN
  (``skip_nonfinite=False``, so ``optax.apply_if_finite`` and NaN checks
  see it) unless ``skip_nonfinite=True`` (update 0: bitsandbytes' "parameter
  unchanged"). An all-zero block (e.g. zero gradients from the start) has
  absmax 0, codes of 0 and zero updates.

  Dynamic range: a second-moment value below about ``1.6e-7`` of its
  block's absmax is stored as 0, so if the next gradients of that element
  are tiny too its update divides by a much smaller ``sqrt(v)`` (or by
  ``eps``) than float32 Adam's and can be orders of magnitude larger. This
  is bitsandbytes' behaviour, kept for parity; it needs elements of a block
  whose gradients differ by more than ~3.5 decades, and smaller blocks
  (``block_size=256``) make it rarer.

  Sharding: ``codes`` have the leaf's shape and are created with its
  sharding; ``absmax`` is a small vector. Blocks run over the flattened leaf,
  so in an explicit mesh the block computation runs in ``auto_axes`` and
  hands ``codes`` back with the leaf's spec (``absmax`` replicated); in an
  auto mesh XLA's propagation keeps ``codes`` sharded when the blocks split
  evenly over the devices (e.g. ``size / block_size`` a multiple of the
  shard count), otherwise pin the state's ``out_shardings``.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to :math:`\sqrt{\hat v}` (PyTorch convention).
    block_size: elements per quantisation block.
    min_8bit_size: leaves with fewer elements keep float32 moments
      (bitsandbytes' default 4096; 0 quantises every leaf).
    skip_nonfinite: update 0 instead of NaN where the gradient is not
      finite.

  Returns:
    A ``GradientTransformationExtraArgs``; works with ``params=None``; the
    update has each gradient's dtype (computed in float32).

  Example:
    >>> import jax.numpy as jnp, optax, lowrank_optax as lro
    >>> tx = optax.chain(lro.scale_by_adam_8bit(min_8bit_size=0),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = jnp.zeros((64, 64))
    >>> state = tx.init(params)
    >>> u, state = tx.update(jnp.ones((64, 64)), state)
    >>> bool(jnp.allclose(u, -1e-3)), state[0].mu.codes.dtype, state[0].mu.absmax.shape
    (True, dtype('uint8'), (2,))

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR
    2022 (arXiv 2110.02861), https://github.com/bitsandbytes-foundation/bitsandbytes;
    Zhang et al., Q-GaLore (arXiv 2407.08296), ``q_galore_torch/
    q_galore_adamw8bit.py`` in https://github.com/VITA-Group/Q-GaLore.
  """
  block_size = _check_block_size(block_size)

  def quantized(p) -> bool:
    return math.prod(p.shape) >= min_8bit_size

  def init_leaf(p, signed):
    if jnp.issubdtype(p.dtype, jnp.complexfloating):
      raise TypeError("scale_by_adam_8bit does not support complex params.")
    if not quantized(p):
      return jnp.zeros_like(p, dtype=jnp.float32)
    nblk = _n_blocks(math.prod(p.shape), block_size)
    return BlockwiseQuantized(jnp.zeros_like(p, dtype=jnp.uint8),
                              jnp.zeros((nblk,), jnp.float32))

  def init_fn(params):
    mu = jax.tree.map(lambda p: init_leaf(p, True), params)
    nu = jax.tree.map(lambda p: init_leaf(p, False), params)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

  def update_leaf(g, mu, nu, bc1, bc2):
    g32 = g.astype(jnp.float32)
    finite = jnp.isfinite(g32)
    g32 = jnp.where(finite, g32, 0.0)
    is_q = isinstance(mu, BlockwiseQuantized)
    m_prev = _dequantize_blockwise(mu, block_size, True) if is_q else mu
    v_prev = _dequantize_blockwise(nu, block_size, False) if is_q else nu
    m = jnp.where(finite, (1 - b1) * g32 + b1 * m_prev, 0.0)
    v = jnp.where(finite, (1 - b2) * (g32 * g32) + b2 * v_prev, 0.0)
    u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
    u = jnp.where(finite, u, 0.0 if skip_nonfinite else jnp.nan)
    if is_q:
      m = _quantize_blockwise(m, block_size, True, True)
      v = _quantize_blockwise(v, block_size, False, False)
    return u.astype(g.dtype), m, v

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = numerics.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    bc1 = 1 - jnp.asarray(b1, jnp.float32)**t
    bc2 = 1 - jnp.asarray(b2, jnp.float32)**t
    leaves, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    out = [update_leaf(g, m, v, bc1, bc2) for g, m, v in zip(leaves, mus, nus)]
    new_updates = treedef.unflatten([o[0] for o in out])
    mu = treedef.unflatten([o[1] for o in out])
    nu = treedef.unflatten([o[2] for o in out])
    return new_updates, ScaleByAdam8bitState(count, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
