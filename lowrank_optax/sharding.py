"""Where the arrays live: shardings of low-rank state, derived from the param's.

DESIGN.md's rule: for a projected leaf whose matrix view ``(*batch, M, N)`` is
sharded ``P(*b, a, c)``, an ``(M, r)`` array is ``P(*b, a, None)``, an
``(r, N)`` array ``P(*b, None, c)``; a basis of the ``M`` axis (``(M, r)``)
is ``P(*b, a, None)`` and one of the ``N`` axis ``P(*b, c, None)``; index
arrays ``(*batch, r)`` are ``P(*b, None)``. Where the param leaves the kept
axis unsharded (FSDP on the other axis: ``c`` is ``None``), the other axis's
mesh axes move onto it when they divide it: ``(r, N)``
becomes ``P(*b, None, a)``, so the per-device state is the total over the
devices, as DESIGN.md also asks; when it does not divide them either, they
go onto the ``r`` axis (:func:`_entries`).

Three situations are handled, all by reading the leaf's sharding with
:func:`leaf_sharding`:

* **eager** on concrete arrays (auto or explicit mesh): the param's
  ``NamedSharding``; state arrays are ``device_put`` there;
* **traced in an explicit mesh** (``jax.make_mesh``'s default axis type): the
  sharding is part of the tracer's type (``jax.typeof(x).sharding``); every
  contraction over a sharded axis names its output sharding
  (:func:`einsum`), and the state is created sharded inside ``jax.jit``;
* **traced in an auto mesh**: the sharding is not known while tracing;
  shardings come from ``jax.jit``'s ``in_shardings`` / ``out_shardings``
  (:func:`~lowrank_optax.state_shardings` gives the state's) and XLA's
  propagation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["MatrixSharding", "leaf_sharding", "for_leaf", "state_shardings"]

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding


def _is_explicit(mesh) -> bool:
  types = getattr(mesh, "axis_types", ())
  return any(t == jax.sharding.AxisType.Explicit for t in types)


def leaf_sharding(x) -> Optional[NamedSharding]:
  """The ``NamedSharding`` of an array, tracer or ``ShapeDtypeStruct``, if known.

  ``None`` for unsharded (single-device) arrays, for tracers of an auto mesh
  (whose sharding is decided later by XLA) and for values without one.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    s = x.sharding
  elif isinstance(x, jax.core.Tracer):
    try:
      s = jax.typeof(x).sharding
    except Exception:  # pylint: disable=broad-except
      return None
    if not isinstance(s, NamedSharding) or not _is_explicit(s.mesh):
      return None
  else:
    try:
      s = getattr(x, "sharding", None)
    except Exception:  # pylint: disable=broad-except  (deleted / abstract)
      return None
  if not isinstance(s, NamedSharding) or s.mesh.empty:
    return None
  return s


def _merged_entry(spec, axes):
  """Mesh axes of a merged group of array axes: the first's, if it is alone.

  A group whose only sharded axis is its first (major) one keeps that
  sharding after the reshape; any other combination is gathered.
  """
  entries = [spec[a] for a in axes]
  if all(e is None for e in entries[1:]):
    return entries[0]
  return None


@dataclasses.dataclass(frozen=True)
class MatrixSharding:
  """How a leaf's matrix view ``(*batch, M, N)`` lies on a mesh (static).

  Attributes:
    mesh: the mesh (concrete, or abstract while tracing).
    leaf_spec: the leaf's partition spec, one entry per leaf axis.
    batch: entries of the batch axes.
    rows: entry of the merged reduction (``M``) axis.
    cols: entry of the merged output (``N``) axis.
    explicit: the mesh has explicit axes: shardings are part of the types
      and contractions over sharded axes must name their output sharding.
  """

  mesh: Any
  leaf_spec: tuple
  batch: tuple
  rows: Any
  cols: Any
  explicit: bool

  def named(self, *entries) -> NamedSharding:
    """``NamedSharding`` of ``(*batch, *entries)``."""
    return NamedSharding(self.mesh, P(*self.batch, *entries))

  def of_axis(self, axis: str):
    """The entry of ``"rows"`` (``M``) or ``"cols"`` (``N``)."""
    return self.rows if axis == "rows" else self.cols

  def leaf(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(*self.leaf_spec))


def for_leaf(plan, x) -> Optional[MatrixSharding]:
  """The :class:`MatrixSharding` of leaf ``x`` under ``plan``'s view, if known."""
  s = leaf_sharding(x)
  if s is None:
    return None
  ndim = len(plan.shape)
  spec = tuple(s.spec) + (None,) * (ndim - len(s.spec))
  return MatrixSharding(
      mesh=s.mesh, leaf_spec=spec,
      batch=tuple(spec[a] for a in plan.batch_axes),
      rows=_merged_entry(spec, plan.reduction_axes),
      cols=_merged_entry(spec, plan.output_axes),
      explicit=_is_explicit(s.mesh))


# -- shardings of the arrays a projector and the subspace create -------------

def matrix(plan) -> Optional[NamedSharding]:
  """``(*batch, M, N)``: the gradient as a matrix."""
  ms = plan.sharding
  return None if ms is None else ms.named(ms.rows, ms.cols)


def _mesh_size(mesh, entry) -> int:
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  size = 1
  for n in names:
    size *= mesh.shape[n]
  return size


def _entries(plan, axis: str, rank_size: int):
  """Mesh-axis entries ``(kept axis, r axis)`` of a low-rank array that keeps
  the matrix axis ``axis`` (``"rows"`` / ``"cols"``) next to an axis of size
  ``rank_size`` (``(M, r)``, ``(r, N)``, a basis ``(d, r)``).

  The param's own entry for the kept axis, with ``r`` unsharded, if it has
  one (DESIGN.md: ``P(a, b)`` over ``(M, N)`` gives ``P(a, None)`` for
  ``(M, r)`` and ``P(None, b)`` for ``(r, N)``). If the param does not shard
  that axis, the mesh axes it uses on the other matrix axis move onto the
  kept axis, or onto ``r`` if the kept axis does not divide by them (and stay
  off the array if neither does): under FSDP a param sharded ``P(a, None)``
  gets ``P(None, a)`` for an ``(r, N)`` moment (or ``P(a, None)``, split over
  ``r``) instead of a replicated one, so every low-rank array is split over
  the devices its param is split over and the per-device state is the total
  over the devices, as the params'.
  """
  ms = plan.sharding
  own, other = (ms.rows, ms.cols) if axis == "rows" else (ms.cols, ms.rows)
  if own is not None or other is None:
    return own, None
  size = plan.rows if axis == "rows" else plan.cols
  n = _mesh_size(ms.mesh, other)
  if size % n == 0:
    return other, None
  if rank_size % n == 0:
    return None, other
  return None, None


def lowrank(plan) -> Optional[NamedSharding]:
  """``plan.lowrank_shape``: ``(r, N)``, ``(M, r)`` or ``(r, r)``."""
  ms = plan.sharding
  if ms is None:
    return None
  if plan.side == "reduction":
    kept, on_r = _entries(plan, "cols", plan.rank)
    return ms.named(on_r, kept)
  if plan.side == "output":
    kept, on_r = _entries(plan, "rows", plan.rank)
    return ms.named(kept, on_r)
  return ms.named(None, None)


def basis(plan, axis: str) -> Optional[NamedSharding]:
  """``(*batch, d, r)`` basis of the ``"rows"`` (``M``) or ``"cols"`` axis."""
  ms = plan.sharding
  return None if ms is None else ms.named(*_entries(plan, axis, plan.rank))


def channels(plan) -> Optional[NamedSharding]:
  """A per-channel factor ``(*batch, 1, N)`` / ``(*batch, M, 1)`` along the
  kept axis, laid out as the gradient is there (so it multiplies ``G``)."""
  ms = plan.sharding
  if ms is None:
    return None
  if plan.side == "reduction":
    return ms.named(None, ms.cols)
  return ms.named(ms.rows, None)


def vectors(plan) -> Optional[NamedSharding]:
  """``(*batch, k)``: per-matrix vectors (indices), replicated over the matrix."""
  ms = plan.sharding
  return None if ms is None else ms.named(None)


def batch_only(plan, ndim: int) -> Optional[NamedSharding]:
  """``(*batch, ...)`` with ``ndim`` trailing replicated axes (small factors)."""
  ms = plan.sharding
  return None if ms is None else ms.named(*(None,) * ndim)


def replicated_like(plan, ndim: int) -> Optional[NamedSharding]:
  """Fully replicated over the mesh (``(*batch, ...)`` included)."""
  ms = plan.sharding
  if ms is None:
    return None
  return NamedSharding(ms.mesh, P(*(None,) * (len(ms.batch) + ndim)))


def derived(a, rows=None, cols=None) -> Optional[NamedSharding]:
  """Sharding of a ``(*batch, ., .)`` array built from ``a`` (``(*batch, d, n)``).

  The batch entries are ``a``'s; each of the two matrix axes takes the entry
  of ``a``'s axis ``rows`` / ``cols`` (``-2`` or ``-1``), or is replicated
  (``None``).
  """
  s = leaf_sharding(a)
  if s is None:
    return None
  spec = tuple(s.spec) + (None,) * (a.ndim - len(s.spec))
  pick = lambda axis: None if axis is None else spec[axis]
  return NamedSharding(s.mesh, P(*spec[:-2], pick(rows), pick(cols)))


def block_of(a, axis: int) -> Optional[NamedSharding]:
  """A ``(*batch, a.shape[axis], k)`` block built from ``a``: ``axis``'s
  entry, then replicated."""
  return derived(a, axis, None)


def small_of(a) -> Optional[NamedSharding]:
  """A ``(*batch, k, l)`` factor built from ``a``: batch entries only."""
  return derived(a)


# -- operations ---------------------------------------------------------------

def _explicit(sharding) -> bool:
  return sharding is not None and _is_explicit(sharding.mesh)


def einsum(subscripts: str, *operands, out: Optional[NamedSharding] = None,
           precision=None):
  """``jnp.einsum`` whose output sharding is ``out`` in an explicit mesh.

  Explicit meshes refuse a contraction over a sharded axis unless the output
  sharding is named; elsewhere ``out`` is ignored (auto meshes propagate).
  """
  out = out if _explicit(out) else None
  fast = _dot_general_einsum(subscripts, operands, out, precision)
  if fast is not None:
    return fast
  if out is not None:
    return jnp.einsum(subscripts, *operands, precision=precision,
                      out_sharding=out)
  return jnp.einsum(subscripts, *operands, precision=precision)


def _dot_general_einsum(subscripts: str, operands, out, precision):
  """A two-operand ``...``-batched einsum as one ``lax.dot_general``.

  The same program as ``jnp.einsum`` (a dot_general, then a transpose if the
  output order asks for one), traced without ``jnp.einsum``'s per-call
  contraction-path search and jit wrapper: a projected leaf's refresh makes a
  dozen of these, which was a third of the optimizer step's trace time.
  Returns None for anything else (``jnp.einsum`` handles it).
  """
  if len(operands) != 2 or "->" not in subscripts:
    return None
  ins, res = subscripts.replace(" ", "").split("->")
  a_sub, b_sub = ins.split(",")
  x, y = operands
  subs = (a_sub, b_sub, res)
  if not all(t.startswith("...") and "." not in t[3:] for t in subs):
    return None
  a_sub, b_sub, res = (t[3:] for t in subs)
  nb = x.ndim - len(a_sub)
  if nb < 0 or y.ndim - len(b_sub) != nb or x.shape[:nb] != y.shape[:nb]:
    return None
  if (len(set(a_sub)) != len(a_sub) or len(set(b_sub)) != len(b_sub)
      or len(set(res)) != len(res)):
    return None
  contract = [c for c in a_sub if c in b_sub and c not in res]
  if any(c in a_sub and c in b_sub for c in res):
    return None                     # a shared free letter: a batch dim
  if any(c not in a_sub + b_sub for c in res):
    return None
  if any(c not in res and c not in contract for c in a_sub + b_sub):
    return None                     # a summed-out letter of one operand
  dtype = jnp.result_type(x, y)
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  batch = tuple(range(nb))
  dims = (([nb + a_sub.index(c) for c in contract],
           [nb + b_sub.index(c) for c in contract]), (batch, batch))
  order = [c for c in a_sub if c in res] + [c for c in b_sub if c in res]
  perm = tuple(range(nb)) + tuple(nb + order.index(c) for c in res)
  dot_out = None
  if out is not None:
    spec = tuple(out.spec) + (None,) * (nb + len(res) - len(out.spec))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
      inv[p] = i
    dot_out = NamedSharding(out.mesh, P(*(spec[inv[i]] for i in range(len(perm)))))
  z = jax.lax.dot_general(x, y, dims, precision=precision,
                          preferred_element_type=dtype, out_sharding=dot_out)
  if perm != tuple(range(len(perm))):
    z = jnp.transpose(z, perm)
    if out is not None:
      z = jax.sharding.reshard(z, out)
  return z


def reshard(x, sharding: Optional[NamedSharding]):
  """Moves ``x`` to ``sharding`` in an explicit mesh (identity elsewhere)."""
  if _explicit(sharding):
    return jax.sharding.reshard(x, sharding)
  return x


def rows_unsharded(a):
  """``a`` (``(*batch, d, n)``) with the mesh axes of its row axis ``d`` moved onto ``n``.

  For a product that needs every row of ``a`` on each device while
  contracting ``n`` (a ``d x d`` Gram, the DCT coefficients ``C^T a``): with
  ``d`` sharded, XLA would all-gather ``a`` (or all-reduce a full-size
  partial product); after this reshard (an all-to-all: each device
  exchanges its own shard, ``1/p`` of ``a``) the contraction over ``n`` is
  local and only its small result is reduced. Identity when ``d`` is
  unsharded, outside explicit meshes, or when ``n`` does not divide by the
  combined mesh axes.
  """
  s = leaf_sharding(a)
  if not _explicit(s):
    return a
  spec = tuple(s.spec) + (None,) * (a.ndim - len(s.spec))
  rows, cols = spec[-2], spec[-1]
  if rows is None:
    return a
  names = lambda e: () if e is None else ((e,) if isinstance(e, str)
                                          else tuple(e))
  moved = names(cols) + names(rows)
  if a.shape[-1] % math.prod(s.mesh.shape[n] for n in moved):
    return a
  return jax.sharding.reshard(
      a, NamedSharding(s.mesh, P(*spec[:-2], None, moved)))


def like(x, ref):
  """``x`` resharded to ``ref``'s sharding in an explicit mesh.

  ``lax.cond`` branches must agree on shardings there, and a refreshed state
  must keep its predecessor's.
  """
  s = leaf_sharding(ref)
  if s is None or not _explicit(s) or not hasattr(x, "shape"):
    return x
  if leaf_sharding(x) == s:
    return x
  return jax.sharding.reshard(x, s)


def place(x, sharding: Optional[NamedSharding]):
  """Puts a new state array where it belongs: ``device_put`` on concrete
  arrays, a reshard while tracing in an explicit mesh; identity otherwise."""
  if sharding is None:
    return x
  if isinstance(x, jax.core.Tracer):
    return reshard(x, sharding)
  if isinstance(sharding.mesh, jax.sharding.AbstractMesh):
    return x
  return jax.device_put(x, canonical(sharding, x.ndim))


def canonical(sharding: NamedSharding, ndim: int) -> NamedSharding:
  """``sharding`` of an ``ndim``-array spelled with one entry per axis.

  ``jax.jit`` spells the shardings it computes for its outputs that way
  (``P("a", None)``, not ``P("a")``; the type, in an explicit mesh). An
  eager ``init`` placed this way feeds a jitted update whose state outputs
  have the very same shardings, so the update compiles once (jit's cache
  compares shardings exactly, not by equivalence).
  """
  spec = tuple(sharding.spec)
  want = spec + (None,) * (ndim - len(spec))
  if want == spec:
    return sharding
  return NamedSharding(sharding.mesh, P(*want),
                       memory_kind=sharding.memory_kind)


def zeros(shape, dtype, sharding: Optional[NamedSharding]):
  """A zero array of ``shape`` placed at ``sharding``."""
  x = jnp.zeros(shape, dtype)
  return place(x, sharding)


# -- the state's shardings, for ``jax.jit(tx.init, out_shardings=...)`` ------

def _explicit_twin(mesh):
  """An abstract copy of ``mesh`` whose axes are all explicit."""
  abstract = mesh.abstract_mesh if isinstance(mesh, jax.sharding.Mesh) else mesh
  explicit = (jax.sharding.AxisType.Explicit,) * len(abstract.axis_names)
  return abstract.update_axis_types(
      dict(zip(abstract.axis_names, explicit)))


def state_shardings(tx: optax.GradientTransformation, params):
  """Shardings of ``tx.init(params)``, without running it.

  For the jitted creation of a sharded state on an auto mesh, where the
  shardings are not known while tracing::

    state = jax.jit(tx.init, out_shardings=lro.state_shardings(tx, params))(params)

  (On an explicit mesh ``jax.jit(tx.init)(params)`` shards the state by
  itself.) The state is traced abstractly with the params' shardings made
  explicit, so every state array gets the sharding DESIGN.md prescribes
  (low-rank arrays follow their param's kept axis, counters are
  replicated); nothing is allocated.

  Args:
    tx: any optax transform (``lro.galore(...)``, ``lro.chain(...)``, ...).
    params: arrays or ``jax.ShapeDtypeStruct`` with ``NamedSharding``
      shardings, all on one mesh.

  Returns:
    A pytree of ``NamedSharding`` on the params' mesh, with the structure of
    the state; ``None`` if no param is sharded.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, lowrank_optax as lro
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> params = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32,
    ...                                     sharding=NamedSharding(mesh, P("fsdp")))}
    >>> tx = lro.galore(1e-2, rank=4)
    >>> shardings = lro.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(
    ...     {"w": jnp.zeros((64, 32))})
  """
  leaves = jax.tree.leaves(params)
  shardings = [leaf_sharding(x) for x in leaves]
  meshes = {s.mesh for s in shardings if s is not None}
  if not meshes:
    return None
  if len(meshes) > 1:
    raise ValueError("state_shardings needs every sharded param on one mesh;"
                     f" got {len(meshes)} meshes.")
  mesh = meshes.pop()
  concrete = mesh if isinstance(mesh, jax.sharding.Mesh) else None
  twin = _explicit_twin(mesh)

  def abstract(x, s):
    spec = P() if s is None else s.spec
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(twin, spec))

  abstract_params = jax.tree.unflatten(
      jax.tree.structure(params),
      [abstract(x, s) for x, s in zip(leaves, shardings)])
  with jax.sharding.use_abstract_mesh(twin):
    out = jax.eval_shape(tx.init, abstract_params)
  target = concrete if concrete is not None else mesh

  def back(x):
    s = getattr(x, "sharding", None)
    spec = tuple(s.spec) if isinstance(s, NamedSharding) else ()
    while spec and spec[-1] is None:  # P(None,) -> P(), as an eager init
      spec = spec[:-1]
    return NamedSharding(target, P(*spec))

  return jax.tree.map(back, out)
