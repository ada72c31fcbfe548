"""optax citizenship: inject_hyperparams, MultiSteps, partition/masked, dtypes, Flax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro


def make(shapes, key=0, dtype=jnp.float32):
  k = jax.random.key(key)
  return {n: jax.random.normal(jax.random.fold_in(k, i), s).astype(dtype)
          for i, (n, s) in enumerate(sorted(shapes.items()))}


SHAPES = {"attn": (16, 24), "mlp": (24, 16), "norm": (16,)}


def run(tx, steps=5, shapes=SHAPES, dtype=jnp.float32, jit=True):
  params = make(shapes, dtype=dtype)
  state = tx.init(params)
  upd = jax.jit(tx.update) if jit else tx.update
  for t in range(steps):
    g = make(shapes, key=100 + t, dtype=dtype)
    u, state = upd(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_inject_hyperparams_equals_plain_recipe():
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
  plain = lro.galore(sched, rank=4, update_proj_gap=2, scale=0.25,
                     weight_decay=0.01)
  injected = optax.inject_hyperparams(lro.galore, static_args=("rank",))(
      learning_rate=sched, rank=4, update_proj_gap=2, scale=0.25,
      weight_decay=0.01)
  p1, _ = run(plain)
  p2, s2 = run(injected)
  for k in p1:
    np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)
  # The learning rate is visible and changeable, as with optax.adamw.
  assert "learning_rate" in s2.hyperparams


def test_inject_hyperparams_subspace_iteration_traced_iters():
  tx = optax.inject_hyperparams(lro.galore, static_args=("rank",))(
      learning_rate=1e-2, rank=4, update_proj_gap=2,
      projector="subspace_iteration", subspace_iters=2)
  p, _ = run(tx)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in p.values())


def test_multisteps_zero_updates_on_non_emit_steps():
  k = 3
  tx = optax.MultiSteps(lro.galore(1e-2, rank=4, update_proj_gap=2),
                        every_k_schedule=k)
  params = make(SHAPES)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for t in range(2 * k):
    u, state = upd(make(SHAPES, key=t), state, params)
    emit = (t + 1) % k == 0
    for v in jax.tree.leaves(u):
      assert bool(jnp.any(v != 0)) == emit
  assert upd._cache_size() == 1


def test_multisteps_equals_galore_on_averaged_gradients():
  k = 2
  inner = lambda: lro.galore(1e-2, rank=4, update_proj_gap=2)
  tx = optax.MultiSteps(inner(), every_k_schedule=k)
  ref = inner()
  params = make(SHAPES)
  s, rs = tx.init(params), ref.init(params)
  p, rp = params, params
  for t in range(3):
    g1, g2 = make(SHAPES, key=10 + 2 * t), make(SHAPES, key=11 + 2 * t)
    u, s = tx.update(g1, s, p)
    p = optax.apply_updates(p, u)
    u, s = tx.update(g2, s, p)
    p = optax.apply_updates(p, u)
    gm = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ru, rs = ref.update(gm, rs, rp)
    rp = optax.apply_updates(rp, ru)
  for key in p:
    np.testing.assert_allclose(p[key], rp[key], rtol=1e-5, atol=1e-6)


def test_partition_and_masked():
  params = make(SHAPES)
  labels = {"attn": "lowrank", "mlp": "adam", "norm": "adam"}
  tx = optax.partition(
      {"lowrank": lro.galore(1e-2, rank=4), "adam": optax.adam(1e-3)}, labels)
  p, state = run(tx)
  # The "adam" leaves got plain optax.adam (compare with it directly).
  ref_p, _ = run(optax.masked(optax.adam(1e-3),
                              {"attn": False, "mlp": True, "norm": True}))
  np.testing.assert_allclose(p["mlp"], ref_p["mlp"], rtol=1e-6)
  # optax.masked around a galore recipe: unmasked leaves pass through.
  tx = optax.masked(lro.galore(1e-2, rank=4),
                    {"attn": True, "mlp": False, "norm": False})
  params = make(SHAPES)
  state = tx.init(params)
  g = make(SHAPES, key=5)
  u, state = tx.update(g, state, params)
  np.testing.assert_array_equal(u["mlp"], g["mlp"])
  assert not np.allclose(u["attn"], g["attn"])


@pytest.mark.parametrize("projector", ["svd", "subspace_iteration"])
def test_bf16_dtype_stability(projector):
  tx = lro.galore(1e-2, rank=4, update_proj_gap=2, projector=projector)
  params = make(SHAPES, dtype=jnp.bfloat16)
  state = tx.init(params)
  dtypes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  upd = jax.jit(tx.update)
  for t in range(4):
    u, state = upd(make(SHAPES, key=t, dtype=jnp.bfloat16), state, params)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(u))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == dtypes0
    params = optax.apply_updates(params, u)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))
  assert lro.subspace_state(state).projector[0].basis.dtype == jnp.bfloat16


def test_init_on_shape_dtype_structs_and_no_zero_size_arrays():
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  for tx in (lro.galore(1e-2, rank=4),
             lro.chain(lro.galore_project(4), lro.scale_by_natural_fisher(4),
                       optax.scale_by_adam(), lro.sign_residual(),
                       optax.scale_by_learning_rate(1e-3))):
    state = tx.init(abstract)
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert all(x.size > 0 for x in leaves)


def test_unknown_extra_args_are_accepted():
  tx = lro.chain(lro.galore_project(4), optax.scale_by_adam(),
                 lro.back_project(), optax.scale_by_learning_rate(1e-2))
  params = make(SHAPES)
  state = tx.init(params)
  u, _ = tx.update(make(SHAPES, 3), state, params, value=jnp.ones(()),
                   some_unknown_arg=1)
  assert set(u) == set(SHAPES)


def test_params_none_works_without_weight_decay():
  tx = lro.galore(1e-2, rank=4)
  params = make(SHAPES)
  u, _ = tx.update(make(SHAPES, 1), tx.init(params), None)
  assert set(u) == set(SHAPES)


def test_memory_report():
  abstract = {
      "layers": {"attn": jax.ShapeDtypeStruct((4, 256, 256), jnp.float32),
                 "mlp": jax.ShapeDtypeStruct((4, 256, 1024), jnp.float32)},
      "embed": jax.ShapeDtypeStruct((1000, 256), jnp.float32),
      "norm": jax.ShapeDtypeStruct((256,), jnp.float32)}
  r = 32
  rep = lro.memory_report(lro.galore(1e-2, rank=r), abstract)
  # Analytic (ALGORITHMS.md 12): projector r*min + moments 2*r*max per matrix,
  # Adam 2x for the rest, plus int32 counters (one per inner Adam + chain).
  f32 = 4
  expect = 4 * (r * 256 + 2 * r * 256) + 4 * (r * 256 + 2 * r * 1024)
  expect += 2 * (1000 * 256 + 256)
  expect *= f32
  # Counters: an int32 count per leaf's Adam (4 leaves), the subspace's count
  # and refresh tally (int32 each), and the non-finite skip's two int32
  # counters and bool flag.
  counters = rep.state_bytes - expect
  assert counters == 4 * 4 + 4 + 4 + (4 + 4 + 1)
  assert rep.adam_bytes == 2 * f32 * (4 * 256 * 256 + 4 * 256 * 1024
                                      + 1000 * 256 + 256) + 4
  rows = {l.path: l for l in rep.leaves}
  assert rows["layers/attn"].rank == r and rows["embed"].rank is None
  # 256 x 256 (a tie) and 256 -> 1024: the input axis is reduced, by the
  # default projector; pass-through leaves have neither.
  assert (rows["layers/attn"].side, rows["layers/mlp"].side) == ("inputs",
                                                                 "inputs")
  assert rows["layers/attn"].projector == "subspace_iteration"
  assert rows["embed"].side is None and rows["embed"].projector is None
  text = str(rep)
  assert "layers/mlp" in text and "total" in text
  assert "(bytes in MiB, 1 MiB = 1,048,576 bytes" in text


def test_flax_nnx_optimizer():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.Linear(16, 32, use_bias=False, rngs=rngs)
      self.norm = nnx.RMSNorm(32, rngs=rngs)
      self.lm_head = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
      return self.lm_head(self.norm(self.attn(x)))

  model = Model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, lro.galore(1e-2, rank=4, update_proj_gap=3),
                      wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (64, 16))
  y = jax.random.normal(jax.random.key(1), (64, 8))

  @nnx.jit
  def train_step(model, opt):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt)) for _ in range(30)]
  assert losses[-1] < 0.8 * losses[0]
  # The low-rank state is plain arrays, not Variables carrying metadata.
  sub = jax.tree.leaves(opt.opt_state, is_leaf=lambda x: isinstance(
      x, lro.SubspaceState))
  sub = [s for s in sub if isinstance(s, lro.SubspaceState)][0]
  basis = [p for p in sub.projector if not isinstance(p, optax.MaskedNode)]
  assert len(basis) == 1 and basis[0].basis.shape == (16, 4)


def test_small_training_run_reaches_loss_threshold():
  """Low-rank regression: galore fits a target with low-rank structure."""
  key = jax.random.key(0)
  d_in, d_out, n = 32, 48, 256
  x = jax.random.normal(key, (n, d_in))
  w_true = (jax.random.normal(jax.random.fold_in(key, 1), (d_in, 4)) @
            jax.random.normal(jax.random.fold_in(key, 2), (4, d_out))) / 4
  y = x @ w_true
  params = {"w": jnp.zeros((d_in, d_out))}
  tx = lro.galore(0.05, rank=8, update_proj_gap=20, scale=1.0)
  state = tx.init(params)
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  l0 = float(loss(params))
  for _ in range(300):
    params, state, l = step(params, state)
  assert float(loss(params)) < 1e-2 * l0
