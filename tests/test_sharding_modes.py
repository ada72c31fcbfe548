"""State shardings in JAX's explicit and auto sharding modes, every projector and recipe.

On the 8 virtual CPU devices of conftest.py, a ``(4, 2)`` mesh ``("fsdp",
"tp")`` of each axis type (``jax.sharding.AxisType.Explicit``, the default of
``jax.make_mesh`` in jax 0.10, and ``Auto``).

The rule under test is DESIGN.md's, restated here and computed in this file
from the param's spec alone (nothing is read from the library): a projected
leaf is viewed as a matrix ``(*batch, M, N)`` (``M`` = its reduction / input
axes, ``N`` its output axes; Flax attention kernels ``(d, H, hd)`` have
``M = d``, ``N = H * hd``, the output kernel ``(H, hd, d)`` ``M = H * hd``,
``N = d``); a merged group of axes keeps the mesh axes of its first (major)
axis. With the param sharded ``P(*b, a, c)`` over that view:

* ``(M, r)`` state arrays are ``P(*b, a, None)``, ``(r, N)`` ones
  ``P(*b, None, c)`` (the low-rank gradient's shape: the moments);
* bases are stored ``(d, r)`` for the reduced axis ``d``: a basis of ``M``
  is ``P(*b, a, None)``, of ``N`` ``P(*b, c, None)``;
* index vectors ``(*b, r)`` (DCT columns, random coordinates, ``randk``'s
  entries and its ``(*b, k)`` moments) are ``P(*b, None)``; per-matrix
  scalars ``(*b,)`` (Fira / APOLLO norm limiters) ``P(*b)``;
* counters, PRNG keys and other scalars are replicated ``P()``;
* a pass-through leaf's state has the param's sharding.

Which side is reduced is the ``std`` rule (ALGORITHMS.md 0.1: the smaller of
``M``, ``N``, ``M`` on a tie); ``"columns"`` reduces ``M`` (``proj_type=
"right"``) and ``"rows"`` ``N`` (``"left"``), as their docstrings fix.

What is tested (``CASES`` = ``lro.galore`` with every registered projector,
plus ``lro.frugal`` (projection mode), ``lro.fira``, ``lro.apollo``,
``lro.apollo_mini`` where they exist):

(a) ``tx.init(params)`` on sharded arrays: every state array has the rule's
    sharding (auto mode: every case; explicit mode, where an eager op is
    typed as a traced one and (b) covers every case: ``EAGER_EXPLICIT``).
(b) Jitted / abstract init. Explicit mesh: ``jax.eval_shape(tx.init, ...)``
    of the arrays and of ``jax.ShapeDtypeStruct`` params carrying shardings
    (in an explicit mesh a traced value's sharding is its type, so this is
    exactly what ``jax.jit(tx.init)`` returns); auto mesh:
    ``lro.state_shardings(tx, params)`` for arrays and for
    ``ShapeDtypeStruct``s, every case. The real ``jax.jit(tx.init)`` (under
    ``jax.set_mesh``) / ``jax.jit(tx.init, out_shardings=...)`` runs for
    ``JIT_INIT_CASES`` (one per kind of projector state: a basis, DCT
    indices, a PRNG key) and gives the eager init's values at the rule's
    shardings.
(c) ``STEPS`` jitted updates with refreshes at steps 0 and ``GAP``:
    explicit mode traces the update of every case abstractly
    (``jax.eval_shape``: the output types are the compiled program's
    shardings) and checks that every state array keeps init's sharding and
    the updates come out in the params' (at a refresh the state's types
    are the update's fixed point); ``RUN_CASES`` (the default projector in
    both modes: compiles dominate the run time) run for real on
    ``RUN_LEAVES``: shardings identical to init's after every step, one
    compilation, and the same updates as the optimizer on one device.
(d) HLO: ``compile().as_text()`` of a refresh-containing update of a
    ``P("fsdp", None)`` and a ``P(None, "fsdp")`` leaf has no all-gather or
    all-reduce whose result is as large as the matrix, for the matmul-only
    projectors (every registered projector but the SVD-based ones and
    eigh); for ``svd`` it has (the positive control). See
    :func:`test_hlo_refresh_never_gathers_the_matrix` for what each
    projector moves.

Compile time dominates, so: small shapes, module-level caches, one compiled
update per (case, mode) actually run, and the full case list only where no
compilation is needed (eager init, abstract traces).
"""

import contextlib
import math
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lowrank_optax as lro
from _state import kept_entries

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (conftest.py sets 8 virtual CPU devices)")

MESH_SHAPE, MESH_AXES = (4, 2), ("fsdp", "tp")
MODES = ("explicit", "auto")
RANK, GAP, STEPS, LR = 4, 2, 4, 1e-2

# path: (shape, spec). Flax-style paths (the attention block is recognised
# from its query / key / value siblings).
LEAVES = {
    "fsdp_in/kernel": ((32, 64), P("fsdp", None)),    # FSDP on the input axis
    "fsdp_out/kernel": ((32, 64), P(None, "fsdp")),   # FSDP on the output axis
    "tp_col/kernel": ((64, 32), P(None, "tp")),       # tensor parallel, outputs
    "both/kernel": ((64, 32), P("fsdp", "tp")),       # 2-D sharded
    "replicated/kernel": ((32, 48), P()),
    "stacked/kernel": ((4, 32, 64), P("fsdp", None, "tp")),  # (L, M, N)
    "attn/query/kernel": ((32, 4, 16), P("fsdp", "tp", None)),  # (d, H, hd)
    "attn/key/kernel": ((32, 4, 16), P("fsdp", "tp", None)),
    "attn/value/kernel": ((32, 4, 16), P("fsdp", "tp", None)),
    "attn/out/kernel": ((4, 16, 32), P("tp", None, "fsdp")),    # (H, hd, d)
    "embed/embedding": ((64, 32), P("fsdp", "tp")),   # passes through
    "norm/scale": ((32,), P("fsdp")),                 # passes through
}
PASS_THROUGH = ("embed/embedding", "norm/scale")
# (c) runs on these: a 2-D sharded leaf (reduced axis on tp, kept axis on
# fsdp), FSDP on a reduced axis, a stacked leaf sharded on its batch axis
# (and tp on its kept axis), a pass-through leaf. Compiles dominate the run
# time and grow with the number of leaves, so the attention kernels (their
# merged views) are covered by the eager, abstract and traced checks only.
RUN_LEAVES = ("both/kernel", "fsdp_in/kernel", "norm/scale",
              "stacked/kernel")


# -- the optimizers -------------------------------------------------------------

def _projector_side(name):
  """proj_type for a registered projector: coordinate projectors that select
  inputs / outputs fix their side (their docstrings)."""
  return {"columns": "right", "rows": "left"}.get(name, "std")


def cases():
  """name: (factory, rank rule, proj_type, entry-wise low-rank vectors)."""
  out = {}
  for name in lro.projectors.names():
    pt = _projector_side(name)
    out[f"galore-{name}"] = (
        lambda name=name, pt=pt: lro.galore(
            LR, rank=RANK, update_proj_gap=GAP, projector=name, proj_type=pt),
        lambda d: RANK, pt, name == "randk")
  if hasattr(lro, "frugal"):  # projection mode (the subspace); rho of d
    out["frugal"] = (lambda: lro.frugal(LR, rho=0.25, mode="projection",
                                        update_gap=GAP),
                     lambda d: round(0.25 * d), "std", False)
  if hasattr(lro, "fira"):
    out["fira"] = (lambda: lro.fira(LR, rank=RANK, update_proj_gap=GAP),
                   lambda d: RANK, "std", False)
  if hasattr(lro, "apollo"):
    out["apollo"] = (lambda: lro.apollo(LR, rank=RANK, update_proj_gap=GAP),
                     lambda d: RANK, "std", False)
  if hasattr(lro, "apollo_mini"):
    out["apollo_mini"] = (lambda: lro.apollo_mini(LR, update_proj_gap=GAP),
                          lambda d: 1, "std", False)
  return out


CASES = cases()
# (b) real jit: one case per kind of projector state (a basis, indices, a
# PRNG key); the other cases' jitted inits are checked through their traced
# types (explicit: exactly jit's output shardings) and state_shardings
# (auto: jit's out_shardings).
JIT_INIT_CASES = [c for c in ("galore-svd", "galore-dct", "galore-gaussian")
                  if c in CASES]
# (c) real runs (each a compilation, plus one on one device per case): the
# default projector (a basis refreshed by matmuls) in both modes. The other
# cases' compiled shardings are their traced types (explicit, all cases),
# and their refreshes' collectives are checked in (d).
RUN_CASES = [(c, m) for c, m in (("galore-subspace_iteration", "explicit"),
                                 ("galore-subspace_iteration", "auto"))
             if c in CASES]
# (a) in an explicit mesh an eager op is typed exactly as when traced, so the
# eager init there repeats the explicit eval_shape check of (b) plus the
# placement of concrete arrays (device_put): it runs for one case per kind
# of projector state (compiling op by op is slow: ~1-10 s a case on 2
# cores). The auto mesh (propagation, device_put) runs every case but
# Q-GaLore's, whose int4 packing dispatches op by op for ~10 s (its
# shardings: (b), both modes).
EAGER_EXPLICIT = ("galore-subspace_iteration", "galore-svd", "galore-dct",
                  "galore-gaussian", "galore-randperm", "galore-online_pca",
                  "apollo")
EAGER_SKIP = ("galore-int4_svd",)


_TXS = {}


def tx_of(case):
  if case not in _TXS:
    _TXS[case] = CASES[case][0]()
  return _TXS[case]


# -- the expected shardings, from the param's spec ------------------------------

def view_of(path, shape):
  """(batch axes, reduction axes, output axes) of a leaf (DESIGN.md views)."""
  layer = path.split("/")[-2]
  if path.startswith("attn/"):
    if layer in ("query", "key", "value"):
      return (), (0,), (1, 2)
    return (), (0, 1), (2,)
  n = len(shape)
  return tuple(range(n - 2)), (n - 2,), (n - 1,)


def merged_entry(spec, axes):
  """The mesh axes of a merged group of array axes (only its major one may
  be sharded in these tests)."""
  entries = [spec[a] for a in axes]
  assert all(e is None for e in entries[1:]), (spec, axes)
  return entries[0]


class Expected:
  """The rule's shapes and specs for one projected leaf under one case."""

  def __init__(self, path, case):
    shape, spec = LEAVES[path]
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    batch, red, out = view_of(path, shape)
    _, rank_of, proj_type, entrywise = CASES[case]
    self.b = tuple(spec[a] for a in batch)
    self.batch_shape = tuple(shape[a] for a in batch)
    m = math.prod(shape[a] for a in red)
    n = math.prod(shape[a] for a in out)
    a, c = merged_entry(spec, red), merged_entry(spec, out)
    side = {"std": "M" if m <= n else "N", "right": "M",
            "left": "N"}[proj_type]
    self.side = side
    self.rank = r = rank_of(m if side == "M" else n)
    bs, b = self.batch_shape, self.b
    sizes = dict(zip(MESH_AXES, MESH_SHAPE))
    keep_m = kept_entries(a, c, m, r, sizes)  # an array keeping M: (M, r)
    keep_n = kept_entries(c, a, n, r, sizes)  # an array keeping N: (r, N)
    if entrywise:
      self.lowrank = (bs + (r,), P(*b, None))
    elif side == "M":
      self.lowrank = (bs + (r, n), P(*b, keep_n[1], keep_n[0]))
    else:
      self.lowrank = (bs + (m, r), P(*b, *keep_m))
    self.basis = {"M": (bs + (m, r), P(*b, *keep_m)),
                  "N": (bs + (n, r), P(*b, *keep_n))}
    self.vector = (bs + (r,), P(*b, None))
    self.per_matrix = (bs, P(*b))


def canon(spec, ndim):
  """A spec as a tuple of ``ndim`` entries (1-tuples as names)."""
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  out = []
  for e in entries:
    if isinstance(e, tuple) and len(e) == 1:
      e = e[0]
    if isinstance(e, tuple) and not e:
      e = None
    out.append(e)
  return tuple(out)


def assert_spec(x, spec, what, traced=False):
  s = x.sharding
  if traced and s is None and x.ndim == 0 and canon(spec, 0) == ():
    # jax.eval_shape leaves a scalar made without a mesh (jnp.zeros([]))
    # unsharded; jax.jit replicates it (P()), as for optax.adam's count.
    return
  assert isinstance(s, NamedSharding), (what, s)
  assert (tuple(s.mesh.axis_names), tuple(s.mesh.axis_sizes)) == (
      MESH_AXES, MESH_SHAPE), (what, s.mesh)
  assert canon(s.spec, len(x.shape)) == canon(spec, len(x.shape)), (
      what, tuple(x.shape), s.spec, spec)


def tree_paths(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def arrays(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def check_state(state, case, what, leaves=tuple(LEAVES), traced=False):
  """Every array of ``state`` (arrays or ``ShapeDtypeStruct``s with
  shardings; ``traced``: from ``jax.eval_shape``) of the params ``leaves``
  has the rule's sharding."""
  sub = lro.subspace_state(state)
  # Outside the subspace: counters of the wrappers (apply_if_finite, ...).
  outside = jax.tree.map(
      lambda x: None if isinstance(x, lro.SubspaceState) else x, state,
      is_leaf=lambda x: isinstance(x, lro.SubspaceState))
  for path, x in arrays(outside):
    assert x.ndim == 0, (what, jax.tree_util.keystr(path), x.shape)
    assert_spec(x, P(), f"{what} {jax.tree_util.keystr(path)}", traced=traced)
  assert_spec(sub.count, P(), f"{what} count", traced=traced)
  paths = tree_paths(_nested({k: 0 for k in leaves}))
  assert len(sub.inner) == len(paths)
  for i, path in enumerate(paths):
    where = f"{what} {path}"
    shape, spec = LEAVES[path]
    if path in PASS_THROUGH:
      assert isinstance(sub.projector[i], optax.MaskedNode), where
      assert not jax.tree.leaves(sub.residual[i]), where
      for p, x in arrays(sub.inner[i]):
        want = P() if x.ndim == 0 else spec
        assert x.ndim == 0 or tuple(x.shape) == shape, (where, x.shape)
        assert_spec(x, want, f"{where} inner{jax.tree_util.keystr(p)}", traced=traced)
      continue
    e = Expected(path, case)
    assert jax.tree.leaves(sub.projector[i]), where
    for p, x in arrays(sub.projector[i]):
      w = f"{where} projector{jax.tree_util.keystr(p)}"
      field = getattr(p[-1], "name", None)
      shape = tuple(x.shape)
      if field == "key" or x.ndim == 0:  # PRNG key data, counters
        want = P()
      elif shape == e.basis[e.side][0]:
        # the basis of the reduced axis, or an array shaped like it (the
        # moments of online PCA's basis optimizer)
        want = e.basis[e.side][1]
      elif shape == e.batch_shape:  # a per-matrix scalar
        want = e.per_matrix[1]
      elif shape[:-1] == e.batch_shape and len(shape) == len(e.batch_shape) + 1:
        # per-matrix vectors: indices, packed int4 codes and their scales
        want = e.vector[1]
      else:
        raise AssertionError(f"{w}: unexpected shape {shape}; teach this"
                             " test its rule")
      assert_spec(x, want, w, traced=traced)
    for part, tree in (("inner", sub.inner[i]), ("residual", sub.residual[i])):
      for p, x in arrays(tree):
        w = f"{where} {part}{jax.tree_util.keystr(p)}"
        if x.ndim == 0:
          want = P()
        elif tuple(x.shape) == e.lowrank[0]:
          want = e.lowrank[1]
        elif part == "residual" and tuple(x.shape) == e.per_matrix[0]:
          want = e.per_matrix[1]
        else:
          raise AssertionError(f"{w}: unexpected shape {x.shape} (low-rank"
                               f" {e.lowrank[0]})")
        assert_spec(x, want, w, traced=traced)


# -- meshes and params ------------------------------------------------------------

def _nested(flat):
  out = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


_MESHES = {}


def mesh_of(mode):
  if mode not in _MESHES:
    t = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    _MESHES[mode] = jax.make_mesh(MESH_SHAPE, MESH_AXES,
                                  axis_types=(t,) * len(MESH_AXES))
  return _MESHES[mode]


def values(paths=tuple(LEAVES), seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(LEAVES[k][0]).astype(np.float32)
          for k in paths}


def sharded(vals, mode):
  mesh = mesh_of(mode)
  return _nested({k: jax.device_put(v, NamedSharding(mesh, LEAVES[k][1]))
                  for k, v in vals.items()})


def abstract(vals, mode):
  mesh = mesh_of(mode)
  return _nested({k: jax.ShapeDtypeStruct(
      v.shape, v.dtype, sharding=NamedSharding(mesh, LEAVES[k][1]))
                  for k, v in vals.items()})


def on_one_device(vals):
  dev = jax.devices()[0]
  return _nested({k: jax.device_put(v, dev) for k, v in vals.items()})


_PARAMS = {}


def params_of(mode):
  if mode not in _PARAMS:
    _PARAMS[mode] = sharded(values(), mode)
  return _PARAMS[mode]


def with_shardings(shapes, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)


def test_the_rule_on_hand_picked_leaves():
  """The test's rule itself, spelled out for three leaves (galore, rank 4)."""
  e = Expected("attn/out/kernel", "galore-svd")  # M = 64 > N = 32: reduce N
  assert e.lowrank == ((64, 4), P("tp", None))
  assert e.basis["N"] == ((32, 4), P("fsdp", None))
  e = Expected("attn/query/kernel", "galore-svd")  # M = 32 < N = 64: reduce M
  assert e.lowrank == ((4, 64), P(None, "tp"))
  assert e.basis["M"] == ((32, 4), P("fsdp", None))
  # Stacked (4, 32, 64) P(fsdp, None, tp): M unsharded by the param, so a
  # basis of M takes the other axis's tp (32 divides by 2).
  e = Expected("stacked/kernel", "galore-svd")
  assert e.lowrank == ((4, 4, 64), P("fsdp", None, "tp"))
  assert e.basis["M"] == ((4, 32, 4), P("fsdp", "tp", None))
  assert e.vector == ((4, 4), P("fsdp", None))
  # FSDP on M only: the (r, N) moment takes fsdp on N.
  e = Expected("fsdp_in/kernel", "galore-svd")
  shape, _ = LEAVES["fsdp_in/kernel"]
  if shape[0] <= shape[1]:
    assert e.lowrank[1] == P(None, "fsdp")


# -- (a) eager init ---------------------------------------------------------------

EAGER_CASES = ([(c, "explicit") for c in EAGER_EXPLICIT if c in CASES]
               + [(c, "auto") for c in sorted(CASES) if c not in EAGER_SKIP])


@pytest.mark.parametrize("case,mode", EAGER_CASES)
def test_eager_init_shardings(case, mode):
  state = tx_of(case).init(params_of(mode))
  check_state(state, case, f"{case} {mode} eager init")
  for _, x in arrays(state):  # concrete arrays on the params' devices
    assert x.sharding.mesh == mesh_of(mode)


# -- (b) jitted / abstract init ---------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_abstract_init_shardings(case, mode):
  tx, mesh = tx_of(case), mesh_of(mode)
  params = params_of(mode)
  sds = abstract(values(), mode)
  if mode == "explicit":
    with jax.set_mesh(mesh):
      for what, p in (("arrays", params), ("ShapeDtypeStructs", sds)):
        check_state(jax.eval_shape(tx.init, p), case,
                    f"{case} explicit eval_shape of {what}", traced=True)
  shapes = jax.eval_shape(tx.init, params)
  for what, p in (("arrays", params), ("ShapeDtypeStructs", sds)):
    shardings = lro.state_shardings(tx, p)
    assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
    check_state(with_shardings(shapes, shardings), case,
                f"{case} {mode} state_shardings of {what}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", JIT_INIT_CASES)
def test_jitted_init(case, mode):
  """``jax.jit(tx.init)`` in an explicit mesh (under ``jax.set_mesh``, which
  explicit meshes need for any jitted init: ``optax.adam`` too, since init
  reads no param value), ``jax.jit(tx.init, out_shardings=
  lro.state_shardings(tx, params))`` in an auto mesh: the rule's shardings
  and the eager init's values."""
  tx, mesh, params = tx_of(case), mesh_of(mode), params_of(mode)
  if mode == "explicit":
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init)(params)
  else:
    sds = abstract(values(), mode)
    state = jax.jit(tx.init, out_shardings=lro.state_shardings(tx, sds))(
        params)
  check_state(state, case, f"{case} {mode} jitted init")
  eager = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-7)


# -- (c) the update: stable shardings, the same numbers as on one device ----------

def grads_at(t, paths):
  return values(paths, seed=100 + t)


def test_explicit_update_types_keep_init_shardings():
  """Every case, abstractly: the update's output types in an explicit mesh
  (which are the compiled program's shardings) give every state array the
  rule's sharding, as init does (so the state's types are a fixed point of
  the update: no recompilation), and the updates the params' shardings.
  One program covers refresh and plain steps (a ``lax.cond``)."""
  mesh, params = mesh_of("explicit"), params_of("explicit")
  grads = sharded(grads_at(0, tuple(LEAVES)), "explicit")
  for case in sorted(CASES):
    tx = tx_of(case)
    with jax.set_mesh(mesh):
      state = jax.eval_shape(tx.init, params)
      updates, state = jax.eval_shape(tx.update, grads, state, params)
      check_state(state, case, f"{case} explicit traced update", traced=True)
      for (p, u), x in zip(arrays(updates), jax.tree.leaves(params)):
        assert u.shape == x.shape and u.dtype == x.dtype
        assert_spec(u, x.sharding.spec,
                    f"{case} update {jax.tree_util.keystr(p)}", traced=True)


_RUNS = {}


def run(case, mode):
  """``STEPS`` jitted updates (refreshes at 0 and GAP) on ``RUN_LEAVES``.

  A fresh transform per run (so each jitted update has its own cache); the
  state from the eager ``tx.init`` (the jitted inits are
  ``test_jitted_init``'s). Returns (states, updates, compilations).
  """
  key = (case, mode)
  if key in _RUNS:
    return _RUNS[key]
  tx = CASES[case][0]()
  vals = values(RUN_LEAVES)
  if mode == "single":
    params = on_one_device(vals)
    grads = [on_one_device(grads_at(t, RUN_LEAVES)) for t in range(STEPS)]
  else:
    params = sharded(vals, mode)
    grads = [sharded(grads_at(t, RUN_LEAVES), mode) for t in range(STEPS)]
  ctx = (jax.set_mesh(mesh_of(mode)) if mode == "explicit"
         else contextlib.nullcontext())
  with ctx:
    state = tx.init(params)
    # The training-step pattern: the update applied inside the jitted step
    # (in an auto mesh the sharding of an update returned on its own is
    # XLA's choice; applied to the params it takes theirs).
    train = lambda g, s, p: (lambda u, s: (
        u, s, optax.apply_updates(p, u)))(*tx.update(g, s, p))
    if mode == "auto":
      # The README's pattern for auto meshes: pin the init shardings. (jit
      # spells the shardings it computes differently from one program to
      # the next there, P("a", None) or P("a"); unpinned, even optax.adam's
      # params and moments change a cache key after the first step.)
      psh = jax.tree.map(lambda x: x.sharding, params)
      step = jax.jit(train, out_shardings=(
          psh, jax.tree.map(lambda x: x.sharding, state), psh))
    else:
      step = jax.jit(train)
    states, updates = [state], []
    for g in grads:
      u, state, params = step(g, state, params)
      states.append(state)
      updates.append(u)
  _RUNS[key] = (states, updates, step._cache_size())
  return _RUNS[key]


@pytest.mark.parametrize("case,mode", RUN_CASES)
def test_jitted_updates_keep_shardings_and_match_one_device(case, mode):
  """Shardings identical to init's after every step (refreshes at 0, 2),
  one compilation; updates in the params' shardings; the same updates as
  on one device.

  Tolerance: the sharded program sums the products with ``G`` in another
  order (partial sums per shard, then an all-reduce) than the one-device
  program, so results differ by float32 rounding (~1e-7 relative per
  reduction of <= 64 terms). Through the Cholesky-QR refreshes (Grams of
  well-conditioned Gaussian blocks), Adam's ``m / sqrt(v)`` (first steps:
  ``R / |R|``, well conditioned away from ``R = 0``) and ``STEPS`` steps this
  stays far below 1e-4 relative (measured: < 1e-5); a wrong sharding, basis
  or random draw changes the update at O(1).
  """
  states, updates, compiled = run(case, mode)
  ref_updates = run(case, "single")[1]
  init = states[0]
  check_state(init, case, f"{case} {mode} init", RUN_LEAVES)
  for t in range(1, STEPS + 1):
    assert jax.tree.structure(states[t]) == jax.tree.structure(init)
    for (p, a), b in zip(arrays(states[t]), jax.tree.leaves(init)):
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
          case, mode, t, jax.tree_util.keystr(p), a.sharding.spec,
          b.sharding.spec)
  for t in range(STEPS):
    for k in RUN_LEAVES:
      u = _get(updates[t], k)
      want = NamedSharding(mesh_of(mode), LEAVES[k][1])
      assert u.sharding.is_equivalent_to(want, u.ndim), (case, t, k)
      ref = np.asarray(_get(ref_updates[t], k))
      scale = np.max(np.abs(ref))
      np.testing.assert_allclose(np.asarray(u), ref, rtol=1e-4,
                                 atol=1e-4 * scale,
                                 err_msg=f"{case} {mode} step {t} {k}")
  # One executable for every step, refreshes included: the state's
  # shardings (as jit spells them) are a fixed point of the update.
  assert compiled == 1, compiled


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


# -- (d) HLO: the refresh does not gather the matrix ------------------------------

HLO_LEAVES = {"rows_sharded": ((64, 48), P("fsdp", None)),
              "cols_sharded": ((64, 48), P(None, "fsdp"))}
FULL = 64 * 48
# Projectors that gather the full matrix by design: the exact SVD and those
# built on it (Tucker factors of a matrix = its SVD with a sign rule; Q-GaLore's
# int4 basis; online PCA's first basis, an SVD, before its matmul-only steps).
GATHERS = ("svd", "tucker", "int4_svd", "online_pca")
# Not asserted either way: eigh gathers no matrix in an explicit mesh (a
# sharded reduced axis is moved by an all-to-all, then d x d Grams are
# all-reduced), but a d x d Gram of a larger reduced axis could exceed M x N.
UNASSERTED = ("eigh",)
COLLECTIVE = re.compile(
    r"=\s*(.+?)\s+(all-gather|all-reduce)(?:-start)?\(")
SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def big_collectives(hlo_text, size):
  """(op, result type) of every all-gather / all-reduce with a result of at
  least ``size`` elements (tuple results: their largest element)."""
  found = []
  for line in hlo_text.splitlines():
    m = COLLECTIVE.search(line)
    if not m:
      continue
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in SHAPE.findall(m.group(1))]
    if sizes and max(sizes) >= size:
      found.append((m.group(2), m.group(1)))
  return found


def test_big_collectives_parser():
  text = ("  %all-gather.1 = f32[64,48]{0,1} all-gather(%x), dimensions={1}\n"
          "  %ar = (f32[8,8]{1,0}, f32[64,48]{1,0}) all-reduce(%a, %b)\n"
          "  %ar2 = f32[48]{0} all-reduce(%c)\n"
          "  %ags = (f32[16,48]{1,0}, f32[64,48]{1,0}) all-gather-start(%d)\n")
  assert [op for op, _ in big_collectives(text, FULL)] == [
      "all-gather", "all-reduce", "all-gather"]


# The SVD is the positive control; the projectors built on it gather for the
# same reason and are not compiled again here.
HLO_PROJECTORS = [n for n in lro.projectors.names()
                  if n not in UNASSERTED and (n not in GATHERS or n == "svd")]


@pytest.mark.parametrize("name", HLO_PROJECTORS)
def test_hlo_refresh_never_gathers_the_matrix(name):
  """What each projector moves at a refresh (explicit mesh, 4-way fsdp):

  * ``svd``: all-gathers ``G`` (the thin SVD needs the matrix): asserted;
  * ``subspace_iteration``, ``randomized``, ``orthogonal``: ``(d, r)`` /
    ``(n, r)`` blocks and ``r x r`` Grams are all-reduced;
  * ``dct``: a sharded reduced axis is moved to the other one (an
    all-to-all of ``1/p`` of ``G``), then only the ``d`` column scores are
    all-reduced; ``down`` / ``up`` use the selected columns sliced to the
    basis's sharding (``(M, r)`` all-reduces);
  * ``gaussian``: no refresh traffic (a key), ``(M, r)`` all-reduces in
    ``down``;
  * coordinate projectors (``randperm``, ``columns``, ``rows``, ``randk``):
    the gathered coordinates only (``(r, N)``-sized all-reduces).

  In an auto mesh (not asserted here) the sharding is unknown while tracing,
  and XLA all-reduces the full-size DCT coefficients ``C^T G`` when the
  reduced axis is sharded.

  The compiled update contains the refresh branch (a ``lax.cond``), so the
  HLO covers a refresh step.
  """
  mesh = mesh_of("explicit")
  rng = np.random.default_rng(0)
  params = {k: jax.device_put(rng.standard_normal(s).astype(np.float32),
                              NamedSharding(mesh, sp))
            for k, (s, sp) in HLO_LEAVES.items()}
  # The projection with plain SGD in the subspace: the refresh, down and up
  # are what moves data (Adam is elementwise on R); a small program.
  tx = lro.chain(lro.galore_project(8, update_proj_gap=GAP, projector=name,
                                    proj_type=_projector_side(name)),
                 optax.sgd(LR))
  with jax.set_mesh(mesh):
    state = jax.eval_shape(tx.init, params)
    text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  found = big_collectives(text, FULL)
  if name in GATHERS:
    assert any(op == "all-gather" for op, _ in found), found
  else:
    assert not found, (name, found)
