"""Sharded low-rank optimizer state with Flax: nnx (explicit and auto meshes) and Linen.

What a TPU user writes, on the 8 virtual CPU devices of conftest.py and a
``(4, 2)`` mesh ``("fsdp", "tp")``:

(a) nnx, explicit mesh (``jax.make_mesh``'s default): params annotated with
    ``nnx.with_partitioning`` (two ``nnx.Linear`` kernels and an
    ``nnx.MultiHeadAttention``), model and ``nnx.Optimizer(model,
    lro.galore(...), wrt=nnx.Param)`` created together inside ``nnx.jit``
    under ``jax.set_mesh``, a few training steps inside ``nnx.jit``;
(b) the same model on an auto mesh, created eagerly under ``jax.set_mesh``
    (Flax's eager sharding shards the variables) with the optimizer created
    eagerly on the sharded model;
(c) Linen: ``nn.with_logical_partitioning`` params (``nn.Dense`` layers and
    ``nn.MultiHeadDotProductAttention``) sharded from their logical names by
    ``nn.logical_to_mesh_sharding``, a ``flax.training.train_state.TrainState``
    created by ``jax.jit(..., out_shardings=...)`` whose optimizer-state part
    is ``lro.state_shardings(tx, params)``, and ``jax.jit`` training steps
    pinned to those shardings (as Flax's Linen sharding guide pins them).

In each, every state array of the optimizer must have DESIGN.md's sharding,
derived here from its param's *actual* sharding (the rule, restated from
tests/test_sharding_modes.py: for a param ``P(a, c)`` over its matrix view
``(M, N)``, ``(M, r)`` arrays ``P(a, None)``, ``(r, N)`` arrays
``P(None, c)``, a basis of ``M`` ``(M, r)`` ``P(a, None)``, of ``N``
``(N, r)`` ``P(c, None)``; the reduced axis is the smaller of ``M``, ``N``;
Flax attention kernels are read as ``M = d``, ``N = heads * head_dim``
(query / key / value) and ``M = heads * head_dim``, ``N = d`` (output); a
merged group of axes keeps its major axis's mesh axes), before and after the
training steps. nnx's ``Optimizer`` wraps the state returned by ``tx.init``
in ``OptVariable`` s that copy the metadata of any ``Variable`` it finds there;
the low-rank state must not carry a param's sharding metadata (``sharding
names`` for another shape), which the tests check on the wrapped state.

Not asserted, reported: Flax's metadata-based helpers
(``nnx.get_partition_spec``, ``nnx.get_abstract_model``, Linen's
``nn.get_sharding``) read shardings from Variable / box metadata, which the
low-rank state does not have (it is made of new arrays), so they report
``P()`` for it; the arrays' own shardings (or ``lro.state_shardings``) are
the source of truth for checkpoint targets, as tested below.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lowrank_optax as lro
from _state import kept_entries

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (conftest.py sets 8 virtual CPU devices)")

MESH_SHAPE, MESH_AXES = (4, 2), ("fsdp", "tp")
RANK, GAP, STEPS, LR = 4, 2, 3, 1e-2  # refreshes at 0-based steps 0 and 2
D, HEADS, HEAD_DIM, FFN = 32, 4, 16, 64
BATCH, SEQ = 8, 6


def make_mesh(kind):
  t = AxisType.Explicit if kind == "explicit" else AxisType.Auto
  return jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(t,) * 2)


def inputs():
  x = np.random.default_rng(0).standard_normal((BATCH, SEQ, D))
  return jnp.asarray(x, jnp.float32)


# -- the rule -------------------------------------------------------------------

def view(path, shape):
  """(reduction axes, output axes) of a kernel (Flax attention views)."""
  parent_layer = path[-2] if len(path) >= 2 else ""
  if len(shape) == 3 and parent_layer in ("query", "key", "value"):
    return (0,), (1, 2)
  if len(shape) == 3 and parent_layer == "out":
    return (0, 1), (2,)
  return (0,), (1,)


def merged(spec, axes):
  entries = [spec[a] for a in axes]
  assert all(e is None for e in entries[1:]), (spec, axes)
  return entries[0]


def expected(path, shape, spec, rank=RANK):
  """{"lowrank": (shape, spec), "basis": (shape, spec)} from the param's spec."""
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  red, out = view(path, shape)
  m = math.prod(shape[a] for a in red)
  n = math.prod(shape[a] for a in out)
  a, c = merged(spec, red), merged(spec, out)
  sizes = dict(zip(MESH_AXES, MESH_SHAPE))
  keep_m = kept_entries(a, c, m, rank, sizes)  # arrays keeping M: (M, r)
  keep_n = kept_entries(c, a, n, rank, sizes)  # arrays keeping N: (r, N)
  if m <= n:  # reduce M (inputs)
    return {"lowrank": ((rank, n), P(keep_n[1], keep_n[0])),
            "basis": ((m, rank), P(*keep_m))}
  return {"lowrank": ((m, rank), P(*keep_m)), "basis": ((n, rank), P(*keep_n))}


def canon(spec, ndim):
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e
               for e in entries)


def assert_spec(x, spec, what):
  s = x.sharding
  assert isinstance(s, NamedSharding), (what, s)
  assert tuple(s.mesh.axis_names) == MESH_AXES, (what, s.mesh)
  assert canon(s.spec, x.ndim) == canon(spec, x.ndim), (
      what, x.shape, s.spec, spec)


def key_names(path):
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue  # an nnx Variable's value (not attention's "value" child)
    names.append(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return tuple(names)


def check_opt_state(opt_state, params, what):
  """Every array of ``opt_state`` has the rule's sharding, derived from the
  actual sharding of its param (``params``: the param arrays, in the
  optimizer's leaf order)."""
  sub = lro.subspace_state(opt_state)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(flat) == len(sub.inner), (len(flat), len(sub.inner))
  projected = 0
  for i, (path, p) in enumerate(flat):
    names = key_names(path)
    where = f"{what} {'/'.join(map(str, names))}"
    spec = p.sharding.spec
    if isinstance(sub.projector[i], lro.projectors.BasisState):
      e = expected(names, p.shape, spec)
      q = sub.projector[i].basis
      assert q.shape == e["basis"][0], (where, q.shape)
      assert_spec(q, e["basis"][1], f"{where} basis")
      for x in jax.tree.leaves(sub.inner[i]):
        if x.ndim:
          assert x.shape == e["lowrank"][0], (where, x.shape)
          assert_spec(x, e["lowrank"][1], f"{where} moment")
        else:
          assert_spec(x, P(), f"{where} counter")
      projected += 1
    else:  # passes through: the param's sharding
      for x in jax.tree.leaves(sub.inner[i]):
        assert_spec(x, spec if x.ndim else P(), f"{where} full-rank state")
  for x in jax.tree.leaves(opt_state):
    if x.ndim == 0:
      assert_spec(x, P(), f"{what} counter")
  return projected


def assert_same_shardings(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b)):
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (
        what, jax.tree_util.keystr(path), x.sharding.spec, y.sharding.spec)


# -- nnx ---------------------------------------------------------------------------

def nnx_model_class():
  init = nnx.initializers.lecun_normal()
  part = nnx.with_partitioning

  class Block(nnx.Module):
    """Attention (heads on tp), then an MLP: up (FSDP on its outputs), down
    (FSDP on its inputs, TP on its outputs): contractions agree on their
    shardings, as an explicit mesh requires."""

    def __init__(self, rngs, explicit):
      self.explicit = explicit
      self.attn = nnx.MultiHeadAttention(
          num_heads=HEADS, in_features=D, qkv_features=HEADS * HEAD_DIM,
          out_features=D, decode=False, use_bias=False,
          kernel_init=part(init, (None, "tp", None)),
          out_kernel_init=part(init, ("tp", None, None)), rngs=rngs)
      self.norm = nnx.LayerNorm(D, rngs=rngs)
      self.up = nnx.Linear(D, FFN, use_bias=False,
                           kernel_init=part(init, (None, "fsdp")), rngs=rngs)
      self.down = nnx.Linear(FFN, D, use_bias=False,
                             kernel_init=part(init, ("fsdp", "tp")),
                             rngs=rngs)

    def __call__(self, x):
      # An explicit mesh asks for the output sharding of a contraction over
      # a sharded axis (attention's output projection, down).
      e = self.explicit
      h = self.attn(x, out_sharding=P() if e else None)
      h = self.up(self.norm(x + h))
      return self.down(jax.nn.relu(h),
                       out_sharding=P(None, None, "tp") if e else None)

  return Block


# The params' specs the annotations ask for (checked against the live params).
NNX_SPECS = {("attn", "query", "kernel"): P(None, "tp", None),
             ("attn", "key", "kernel"): P(None, "tp", None),
             ("attn", "value", "kernel"): P(None, "tp", None),
             ("attn", "out", "kernel"): P("tp", None, None),
             ("up", "kernel"): P(None, "fsdp"),
             ("down", "kernel"): P("fsdp", "tp")}


def nnx_train(kind):
  """Creates model + optimizer as a user would in ``kind`` and trains."""
  mesh = make_mesh(kind)
  block = nnx_model_class()
  tx = lro.galore(LR, rank=RANK, update_proj_gap=GAP)
  x = inputs()

  def loss_fn(model):
    return jnp.mean(jnp.square(model(x)))

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  with jax.set_mesh(mesh):
    if kind == "explicit":
      @nnx.jit
      def create():
        model = block(nnx.Rngs(0), explicit=True)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
      model, optimizer = create()
    else:
      model = block(nnx.Rngs(0), explicit=False)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # Snapshots (arrays are immutable; the Variables get new values).
    params0 = nnx.as_pure(nnx.state(model, nnx.Param))
    opt0 = nnx.as_pure(optimizer.opt_state)  # the optax state's structure
    losses = [float(train_step(model, optimizer)) for _ in range(STEPS)]
  return {"mesh": mesh, "tx": tx, "model": model, "optimizer": optimizer,
          "params0": params0, "opt0": opt0,
          "params": nnx.as_pure(nnx.state(model, nnx.Param)),
          "opt": nnx.as_pure(optimizer.opt_state), "losses": losses}


_NNX = {}


def nnx_run(kind):
  if kind not in _NNX:
    _NNX[kind] = nnx_train(kind)
  return _NNX[kind]


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_nnx_optimizer_state_shardings(kind):
  r = nnx_run(kind)
  # The model is sharded as annotated.
  for path, v in jax.tree_util.tree_flatten_with_path(r["params0"])[0]:
    names = key_names(path)
    if names in NNX_SPECS:
      assert_spec(v, NNX_SPECS[names], f"param {names}")
  for when, params, opt in (("created", r["params0"], r["opt0"]),
                            (f"after {STEPS} steps", r["params"], r["opt"])):
    n = check_opt_state(opt, params, f"nnx {kind} {when}")
    assert n == 6, n  # 4 attention kernels, up, down (the norm passes through)
  assert_same_shardings(r["opt"], r["opt0"], f"nnx {kind} stable")
  assert all(np.isfinite(r["losses"])), r["losses"]
  assert r["losses"][-1] < r["losses"][0], r["losses"]


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_nnx_low_rank_state_carries_no_param_metadata(kind):
  """nnx wraps the optimizer state in OptVariables and copies the metadata
  of Variables found in it: any sharding metadata on a state Variable must
  describe that array (same rank, same sharding), never a param's."""
  r = nnx_run(kind)
  checked = 0
  for path, v in jax.tree_util.tree_flatten_with_path(
      r["optimizer"].opt_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    if not isinstance(v, nnx.Variable):
      continue
    value = v.get_value()
    meta = v.get_metadata()
    for name in ("sharding_names", "out_sharding", "sharding"):
      names = meta.get(name)
      if names is None or not isinstance(names, (tuple, list, P)):
        continue
      names = tuple(names)
      assert len(names) == value.ndim, (jax.tree_util.keystr(path), name,
                                        names, value.shape)
      assert canon(names, value.ndim) == canon(value.sharding.spec,
                                               value.ndim), (
          jax.tree_util.keystr(path), names, value.sharding.spec)
    checked += 1
  assert checked > 0


def test_nnx_state_shardings_give_the_checkpoint_target():
  """``lro.state_shardings(tx, nnx.state(model, nnx.Param))`` (Variables
  inside) gives the live optimizer state's shardings on an auto mesh: the
  target to restore the ``opt_state`` into (Flax's metadata helpers report
  ``P()`` for the low-rank state; see the module docstring)."""
  r = nnx_run("auto")
  with jax.set_mesh(r["mesh"]):
    params = nnx.state(r["model"], nnx.Param)  # Variables, as nnx passes them
  shardings = lro.state_shardings(r["tx"], params)
  live = r["opt0"]
  assert jax.tree.structure(shardings) == jax.tree.structure(live)
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(live)):
    assert s.is_equivalent_to(x.sharding, x.ndim), (s.spec, x.sharding.spec)


# -- Linen ---------------------------------------------------------------------------

LOGICAL_RULES = (("embed", "fsdp"), ("mlp", "tp"), ("heads", "tp"),
                 ("kv", None))


def linen_model():
  init = nn.initializers.lecun_normal()
  logical = nn.with_logical_partitioning

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.MultiHeadDotProductAttention(
          num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, out_features=D,
          use_bias=False, kernel_init=logical(init, ("embed", "heads", "kv")),
          out_kernel_init=logical(init, ("heads", "kv", "embed")),
          name="attn")(x)
      h = nn.LayerNorm(name="norm")(x + h)
      h = nn.Dense(FFN, use_bias=False,
                   kernel_init=logical(init, ("embed", "mlp")), name="up")(h)
      return nn.Dense(D, use_bias=False,
                      kernel_init=logical(init, ("mlp", "embed")),
                      name="down")(nn.relu(h))

  return Block()


LINEN_SPECS = {("attn", "query", "kernel"): P("fsdp", "tp", None),
               ("attn", "key", "kernel"): P("fsdp", "tp", None),
               ("attn", "value", "kernel"): P("fsdp", "tp", None),
               ("attn", "out", "kernel"): P("tp", None, "fsdp"),
               ("up", "kernel"): P("fsdp", "tp"),
               ("down", "kernel"): P("tp", "fsdp")}


@pytest.fixture(scope="module")
def linen_run():
  mesh = make_mesh("auto")
  model = linen_model()
  x = inputs()
  tx = lro.galore(LR, rank=RANK, update_proj_gap=GAP)

  def init_params(key):
    return model.init(key, x)["params"]

  key = jax.random.key(0)
  abstract = jax.eval_shape(init_params, key)
  param_shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), mesh, LOGICAL_RULES)
  params = nn.unbox(jax.jit(init_params, out_shardings=param_shardings)(key))

  def create(params):
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=tx)

  abstract_state = jax.eval_shape(create, params)
  state_shardings = abstract_state.replace(
      step=NamedSharding(mesh, P()),
      params=jax.tree.map(lambda p: p.sharding, params),
      opt_state=lro.state_shardings(tx, params))
  state = jax.jit(create, out_shardings=state_shardings)(params)

  def train_step(state, x):
    def loss_fn(p):
      return jnp.mean(jnp.square(state.apply_fn({"params": p}, x)))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  step = jax.jit(train_step, in_shardings=(state_shardings, None),
                 out_shardings=(state_shardings, None), donate_argnums=0)
  state0 = state
  shardings0 = jax.tree.map(lambda a: a.sharding, state0)
  opt0_ok = check_opt_state(state0.opt_state, state0.params, "linen created")
  losses = []
  for _ in range(STEPS):
    state, loss = step(state, x)
    losses.append(float(loss))
  return {"state": state, "shardings0": shardings0, "opt0_ok": opt0_ok,
          "losses": losses, "compiles": step._cache_size()}


def test_linen_train_state_shardings(linen_run):
  r = linen_run
  state = r["state"]
  for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    names = key_names(path)
    if names in LINEN_SPECS:
      assert_spec(v, LINEN_SPECS[names], f"param {names}")
  assert r["opt0_ok"] == 6
  assert check_opt_state(state.opt_state, state.params,
                         f"linen after {STEPS} steps") == 6
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(r["shardings0"])):
    assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
  assert r["compiles"] == 1
  assert all(np.isfinite(r["losses"])), r["losses"]
  assert r["losses"][-1] < r["losses"][0], r["losses"]
