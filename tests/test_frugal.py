"""FRUGAL (``lro.frugal``, ``lro.active_blocks``): ALGORITHMS.md 3, F1-F6.

The references are float64 NumPy re-implementations of the official code's
step (``fzmushko/FRUGAL``, ``frugal/proj_optimizer_templates.py`` and
``frugal/adamw.py``), written from its logic, not from our code:

* every parameter first decays, ``W <- W (1 - lr wd)`` with the group lr;
* regular (non-projectable) parameters: PyTorch-style Adam, unscaled lr;
* projectable, projection / coordinates: ``-lr s_p Adam(R)`` mapped back plus
  ``-lr s_p s_f sign(G - up(R))``; Adam (m, v, step) restarts at every
  refresh (0-based counts 0, T, 2T);
* projectable, block: the active tensors take ``-lr s_p Adam(G)``, the others
  ``-lr s_p s_f sign(G)``; the active sets follow the ``BlockOptimizer``
  order tables written out by hand below.

The random parts (SVD signs, coordinate draws) are read from our state and
checked for their properties; everything else is computed independently.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro

B1, B2, EPS = 0.9, 0.999, 1e-8



def blocks_state(opt_state):
  """The ActiveBlocksState inside a recipe's state."""
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, lro.ActiveBlocksState))
           if isinstance(x, lro.ActiveBlocksState)]
  assert len(found) == 1, found
  return found[0]

def grads_of(shapes, seed, steps):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in sorted(shapes.items())} for _ in range(steps)]


def params_of(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in sorted(shapes.items())}


class Adam64:
  """PyTorch-style Adam (FRUGAL's ``_compute_update`` without the lr)."""

  def __init__(self):
    self.m = self.v = None
    self.t = 0

  def reset(self, shape):
    self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

  def step(self, g):
    if self.m is None:
      self.reset(g.shape)
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g * g
    mhat = self.m / (1 - B1**self.t)
    vhat = self.v / (1 - B2**self.t)
    return mhat / (np.sqrt(vhat) + EPS)


def f64(x):
  return np.asarray(x, np.float64)


def schedule(t):
  """The learning-rate schedule the references use (and ``lr_fn``)."""
  return 0.01 * (1.0 + 0.1 * t)


def lr_fn(count):
  return 0.01 * (1.0 + 0.1 * count)


def std_side(shape):
  return "reduction" if shape[-2] <= shape[-1] else "output"


# ---------------------------------------------------------------------------
# F1: rho = 0: pure signSGD on the projectable leaves (all modes)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["block", "projection"])
def test_f1_rho_zero_is_sign_sgd_with_pre_update_decay(mode):
  lr, sp, sf, wd = 0.02, 0.5, 0.3, 0.1
  shapes = {"attn": (6, 10), "mlp": (2, 5, 4), "norm": (10,)}
  tx = lro.frugal(lr, 0.0, mode=mode, proj_params_lr_scale=sp,
                  inactive_lr_scale=sf, weight_decay=wd)
  params = params_of(shapes, 0)
  state = tx.init(params)
  adam = Adam64()
  step = jax.jit(tx.update)
  for g in grads_of(shapes, 1, 3):
    u, state = step(g, state, params)
    for k in ("attn", "mlp"):
      want = -lr * sp * sf * np.sign(f64(g[k])) - lr * wd * f64(params[k])
      np.testing.assert_allclose(f64(u[k]), want, rtol=1e-6,
                                 atol=2e-5 * lr)
    want = -lr * adam.step(f64(g["norm"])) - lr * wd * f64(params["norm"])
    np.testing.assert_allclose(f64(u["norm"]), want, rtol=1e-5,
                               atol=2e-5 * lr)
    params = optax.apply_updates(params, u)


# ---------------------------------------------------------------------------
# F5 + block mode against a float64 BlockAdamW
# ---------------------------------------------------------------------------

# BlockOptimizer "descending", 8 tensors, num_active = round(8 * 0.25) = 2:
# next_block_start = 7, activate 7, 6; start -= 2 -> 5; ...; -1 + 8 = 7.
F5_TABLE = [{7, 6}, {5, 4}, {3, 2}, {1, 0}, {7, 6}, {5, 4}]


def test_f5_block_descending_matches_float64_block_adamw():
  lr, sp, sf, wd, gap, steps = schedule, 0.8, 0.5, 0.05, 2, 11
  names = [f"blk{i}" for i in range(8)]
  shapes = {n: (16, 12) for n in names}
  shapes["norm"] = (12,)
  tx = lro.frugal(lr_fn, 0.25, update_gap=gap, proj_params_lr_scale=sp,
                  inactive_lr_scale=sf, weight_decay=wd)
  params = params_of(shapes, 2)
  state = tx.init(params)
  # Memory: exactly two Adam slots of (16, 12) for the eight blocks, plus the
  # pass-through leaf's Adam, the counters and the slot indices.
  rep = lro.memory_report(tx, params)
  f32, i32 = 4, 4
  pool = 2 * i32 + 2 * 2 * 16 * 12 * f32        # counts, mu, nu of 2 slots
  norm = i32 + 2 * 12 * f32                      # Adam of the 1-D leaf
  counters = i32 + 8 * i32 + i32                 # block count, slots, lr
  nonfinite = i32 + 1 + i32                       # the skip's counters, flag
  assert rep.state_bytes == pool + norm + counters + nonfinite
  assert rep.state_bytes < 0.3 * rep.adam_bytes
  adams = {n: Adam64() for n in names}
  norm_adam = Adam64()
  step = jax.jit(tx.update)
  for t, g in enumerate(grads_of(shapes, 3, steps)):
    u, state = step(g, state, params)
    blocks = blocks_state(state)
    active = {i for i in range(8) if int(blocks.slots[i]) >= 0}
    assert active == F5_TABLE[t // gap], t
    assert len(active) == 2  # F5: exactly two tensors hold Adam state
    assert blocks.pools[0].mu.shape == (2, 16, 12)
    assert sorted(int(blocks.slots[i]) for i in active) == [0, 1]
    # The slots' Adam counters restart at each refresh.
    assert [int(c) for c in blocks.pools[0].count] == [t % gap + 1] * 2
    lr_t = schedule(t)
    for i, n in enumerate(names):
      gk, wk = f64(g[n]), f64(params[n])
      if t % gap == 0:
        adams[n].reset(gk.shape)
      if i in active:
        want = -lr_t * sp * adams[n].step(gk)
      else:
        want = -lr_t * sp * sf * np.sign(gk)
      want = want - lr_t * wd * wk
      np.testing.assert_allclose(f64(u[n]), want, rtol=2e-5, atol=2e-5 * lr_t,
                                 err_msg=f"{n} step {t}")
    want = (-lr_t * norm_adam.step(f64(g["norm"]))
            - lr_t * wd * f64(params["norm"]))
    np.testing.assert_allclose(f64(u["norm"]), want, rtol=2e-5, atol=2e-5 * lr_t)
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1


# Hand-written from BlockOptimizer._update_states (positions in block order).
ORDER_TABLES = [
    ("ascending", 8, 0.25, [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 1}]),
    ("ascending", 7, 0.3, [{0, 1}, {2, 3}, {4, 5}, {6, 0}, {1, 2}]),
    ("descending", 7, 0.3, [{6, 5}, {4, 3}, {2, 1}, {0, 6}, {5, 4}]),
    ("mirror", 8, 0.25, [{0, 7}, {1, 6}, {2, 5}, {3, 4}, {0, 7}]),
    # next_block_start 0, 2, 4 (idx 4, 5 -> 4 % 5, 5 % 5), 6 - 5 = 1
    ("mirror", 10, 0.4, [{0, 9, 1, 8}, {2, 7, 3, 6}, {4, 5, 0, 9},
                         {1, 8, 2, 7}]),
    ("mirror", 7, 0.3, [{0, 6}, {1, 5}, {2, 4}, {0, 6}]),  # 3 never active
]


@pytest.mark.parametrize("order,n,rho,table", ORDER_TABLES)
def test_block_orders_follow_the_reference(order, n, rho, table):
  # Two shape classes, interleaved, to exercise per-class slot pools.
  shapes = {f"b{i:02d}": ((4, 3) if i % 2 else (3, 4)) for i in range(n)}
  tx = lro.active_blocks(optax.scale_by_adam(), rho, block_order=order,
                         update_gap=1)
  params = params_of(shapes, 4)
  state = tx.init(params)
  # Slots per class: the most blocks of the class active at once.
  for c, parity in enumerate((0, 1)):
    most = max(sum(1 for i in s if i % 2 == parity) for s in table)
    assert state.pools[c].mu.shape[0] == most
  step = jax.jit(tx.update)
  g = jax.tree.map(jnp.ones_like, params)
  for want in table:
    _, state = step(g, state)
    slots = np.asarray(state.slots)
    assert {i for i in range(n) if slots[i] >= 0} == want
    for parity in (0, 1):  # distinct slots within a class
      used = [slots[i] for i in want if i % 2 == parity]
      assert len(set(used)) == len(used)
  assert lro.active_block_schedule(n, rho, order, len(table)) == [
      tuple(sorted(s)) for s in table]


def test_leaf_order_regexes_and_key_function():
  shapes = {f"layer{i}": {"q": (4, 4), "up": (4, 8)} for i in range(2)}
  params = jax.tree.map(lambda s: jnp.zeros(s), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  g = jax.tree.map(jnp.ones_like, params)
  # Tree order: layer0/q, layer0/up, layer1/q, layer1/up. Regexes put all
  # "up" first: up0, up1, q0, q1; descending, k = 1: q1 first.
  tx = lro.active_blocks(optax.scale_by_adam(), 0.25, update_gap=1,
                         leaf_order=["up", "q"])
  state = tx.init(params)
  step = jax.jit(tx.update)
  active = []
  for _ in range(4):
    _, state = step(g, state)
    active.append(int(np.argmax(np.asarray(state.slots))))
  assert active == [2, 0, 3, 1]  # q1, q0, up1, up0 (tree indices)
  # A key function: reversed tree order.
  paths = ["layer0/q", "layer0/up", "layer1/q", "layer1/up"]
  tx = lro.active_blocks(optax.scale_by_adam(), 0.25, update_gap=1,
                         leaf_order=lambda p: -paths.index(p))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(g, state)
  assert int(np.argmax(np.asarray(state.slots))) == 0


def test_block_random_order():
  n, k = 8, 3
  shapes = {f"b{i}": ((4, 3) if i % 2 else (3, 4)) for i in range(n)}
  tx = lro.active_blocks(optax.scale_by_adam(), k / n, block_order="random",
                         update_gap=2, seed=1)
  params = params_of(shapes, 5)
  state = tx.init(params)
  assert [p.mu.shape[0] for p in state.pools] == [3, 3]  # min(4, k)
  step = jax.jit(tx.update)
  g = jax.tree.map(jnp.ones_like, params)
  sets = []
  for t in range(10):
    _, state = step(g, state)
    slots = np.asarray(state.slots)
    active = frozenset(np.nonzero(slots >= 0)[0].tolist())
    assert len(active) == k
    for parity in (0, 1):
      used = [slots[i] for i in active if i % 2 == parity]
      assert len(set(used)) == len(used) and all(0 <= s < 3 for s in used)
    if t % 2:
      assert active == sets[-1]  # no change between refreshes
    sets.append(active)
  assert len(set(sets)) > 1


def test_block_validation():
  with pytest.raises(ValueError, match="even"):
    lro.active_blocks(optax.scale_by_adam(), 0.5,
                      block_order="mirror").init(
                          {f"b{i}": jnp.zeros((2, 2)) for i in range(6)})
  with pytest.raises(ValueError, match="reset_statistics"):
    lro.frugal(1e-3, reset_statistics=False)
  with pytest.raises(ValueError, match="projector"):
    lro.frugal(1e-3, projector="svd")
  with pytest.raises(ValueError, match="coordinates"):
    lro.frugal(1e-3, mode="coordinates", projector="svd")


def test_block_state_resumes_bit_exactly_with_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  shapes = {f"b{i}": (4, 6) for i in range(4)}
  tx = lro.frugal(1e-2, 0.5, update_gap=2)
  grads = grads_of(shapes, 6, 5)
  params = params_of(shapes, 7)
  st = tx.init(params)
  step = jax.jit(tx.update)
  traj = []
  for t, g in enumerate(grads):
    if t == 1:
      saved = {"p": params, "s": st}
    u, st = step(g, st, params)
    params = optax.apply_updates(params, u)
    traj.append(params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", saved)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "c", jax.eval_shape(lambda: saved))
  ckpt.close()
  params, st = restored["p"], restored["s"]
  for t in range(1, 5):  # refreshes at 2 and 4
    u, st = step(grads[t], st, params)
    params = optax.apply_updates(params, u)
    for k in shapes:
      np.testing.assert_array_equal(np.asarray(params[k]),
                                    np.asarray(traj[t][k]))


# ---------------------------------------------------------------------------
# Projection mode against a float64 GaloreAdamW (FRUGAL's)
# ---------------------------------------------------------------------------


def assert_sign_close(u, want, e_ref, step, what):
  """``u == want`` except where float32 may flip sign(E) (|E| tiny)."""
  ambiguous = np.abs(e_ref) < 1e-4 * np.abs(e_ref).max()
  assert ambiguous.mean() < 0.01, what
  np.testing.assert_allclose(np.where(ambiguous, want, f64(u)), want,
                             rtol=1e-4, atol=1e-4 * step, err_msg=what)


@pytest.mark.parametrize("reset", [True, False])
def test_projection_mode_matches_float64_reference(reset):
  sp, sf, wd, gap, steps, rho = 0.7, 0.4, 0.1, 3, 5, 0.25
  shapes = {"a": (12, 20), "b": (20, 12), "c": (16, 16), "norm": (20,)}
  tx = lro.frugal(lr_fn, rho, mode="projection", projector="svd",
                  update_gap=gap, proj_params_lr_scale=sp,
                  inactive_lr_scale=sf, weight_decay=wd,
                  reset_statistics=reset)
  params = params_of(shapes, 8)
  state = tx.init(params)
  projected = ("a", "b", "c")
  ranks = {"a": 3, "b": 3, "c": 4}  # round(0.25 * reduced side)
  adams = {k: Adam64() for k in shapes}
  step = jax.jit(tx.update)
  names = sorted(shapes)
  for t, g in enumerate(grads_of(shapes, 9, steps)):
    u, state = step(g, state, params)
    sub = lro.subspace_state(state)
    lr_t = schedule(t)
    for i, k in enumerate(names):
      gk, wk = f64(g[k]), f64(params[k])
      if k not in projected:
        want = -lr_t * adams[k].step(gk) - lr_t * wd * wk
        np.testing.assert_allclose(f64(u[k]), want, rtol=2e-5, atol=2e-5 * lr_t)
        continue
      side = std_side(shapes[k])
      q = f64(sub.projector[i].basis)
      assert q.shape[-1] == ranks[k]
      if t % gap == 0:  # the top-r singular subspace of this gradient
        uu, _, vh = np.linalg.svd(gk)
        ref = (uu if side == "reduction" else vh.T)[:, :ranks[k]]
        np.testing.assert_allclose(q @ q.T, ref @ ref.T, atol=1e-4)
      down = (lambda x: q.T @ x) if side == "reduction" else (lambda x: x @ q)
      up = (lambda x: q @ x) if side == "reduction" else (lambda x: x @ q.T)
      r = down(gk)
      if t == 0 or (reset and t % gap == 0):
        adams[k].reset(r.shape)
      a = adams[k].step(r)
      if t % gap == 0 and reset:  # F4: the first step after a reset
        np.testing.assert_allclose(a, r / (np.abs(r) + EPS), rtol=1e-12)
      e = gk - up(r)
      want = (-lr_t * sp * up(a) - lr_t * sp * sf * np.sign(e)
              - lr_t * wd * wk)
      assert_sign_close(u[k], want, e, lr_t, f"{k} step {t}")
    counts = [int(sub.inner[names.index(k)][0].count) for k in projected]
    assert counts == [(t % gap + 1) if reset else t + 1] * 3
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1


def test_f2_full_rank_svd_is_rotated_adam():
  """F2: r = full: E = 0, the update is Adam on G Q (reset every T), times s_p."""
  lr, sp, gap = 0.01, 0.5, 2
  tx = lro.frugal(lr, {"w": 1.0}, mode="projection", projector="svd",
                  update_gap=gap, proj_params_lr_scale=sp, state_free="sgd")
  shapes = {"w": (8, 6)}  # reduces the 6 outputs: R = G Q, Q 6 x 6
  with pytest.warns(lro.PolicyWarning):
    state = tx.init(params_of(shapes, 0))
  adam = Adam64()
  for t, g in enumerate(grads_of(shapes, 10, 5)):
    u, state = tx.update(g, state)
    q = f64(lro.subspace_state(state).projector[0].basis)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
    gk = f64(g["w"])
    if t % gap == 0:
      adam.reset((8, 6))
    want = -lr * sp * adam.step(gk @ q) @ q.T
    np.testing.assert_allclose(f64(u["w"]), want, rtol=1e-4, atol=1e-6)


def _projectors_for_f6():
  names = ["svd", "randperm"]
  if "orthogonal" in lro.projectors.names():
    names.append("orthogonal")
  return names


@pytest.mark.parametrize("projector", _projectors_for_f6())
def test_f6_residual_orthogonal_to_projected_gradient(projector):
  """F6: ``<E, up(down(G))> = 0``; E read as the update of an sgd rule."""
  shapes = {"a": (12, 20), "b": (20, 12)}  # input side, output side
  tx = lro.frugal(1.0, 0.25, mode="projection", projector=projector,
                  state_full=optax.scale(0.0), state_free="sgd")
  g = grads_of(shapes, 11, 1)[0]
  u, state = jax.jit(tx.update)(g, tx.init(g))
  for i, k in enumerate(sorted(shapes)):
    e = -f64(u[k])
    gk = f64(g[k])
    p = gk - e  # up(down(G))
    assert abs(np.sum(e * p)) < 1e-5 * np.linalg.norm(e) * np.linalg.norm(p)
    proj = lro.subspace_state(state).projector[i]
    if projector != "randperm":
      q = f64(proj.basis)
      side = std_side(shapes[k])
      r = q.T @ gk if side == "reduction" else gk @ q
      pr = q @ r if side == "reduction" else r @ q.T
      np.testing.assert_allclose(p, pr, atol=1e-5)


# ---------------------------------------------------------------------------
# F3: coordinates mode (columns / rows / randk) against float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["columns", "rows", "randk"])
def test_f3_coordinates_mode_matches_float64_reference(choice):
  rho, sp, sf, wd, gap, steps = 0.3, 0.7, 0.2, 0.1, 3, 5
  shapes = {"attn": (10, 14), "mlp": (2, 9, 6), "norm": (14,)}
  tx = lro.frugal(lr_fn, rho, mode="coordinates", projector=choice,
                  update_gap=gap, proj_params_lr_scale=sp,
                  inactive_lr_scale=sf, weight_decay=wd)
  params = params_of(shapes, 12)
  state = tx.init(params)
  names = sorted(shapes)
  adams = {}
  prev = {}
  step = jax.jit(tx.update)
  for t, g in enumerate(grads_of(shapes, 13, steps)):
    u, state = step(g, state, params)
    sub = lro.subspace_state(state)
    lr_t = schedule(t)
    for i, k in enumerate(names):
      gk, wk = f64(g[k]), f64(params[k])
      if k == "norm":
        adams.setdefault(k, Adam64())
        want = -lr_t * adams[k].step(gk) - lr_t * wd * wk
        np.testing.assert_allclose(f64(u[k]), want, rtol=2e-5, atol=2e-5 * lr_t)
        continue
      idx = np.asarray(sub.projector[i].indices)
      m, n = shapes[k][-2:]
      size = {"columns": m, "rows": n, "randk": m * n}[choice]
      count = int(rho * size)  # FRUGAL: int(), not round()
      assert idx.shape == shapes[k][:-2] + (count,)
      if t % gap:
        np.testing.assert_array_equal(idx, prev[k])  # kept
      elif t:
        assert not np.array_equal(idx, prev[k])  # redrawn
      prev[k] = idx
      for b in np.ndindex(*shapes[k][:-2]):
        key = (k, b)
        gb, wb, ub = gk[b], wk[b], f64(u[k])[b]
        mask = np.zeros(size, bool)
        mask[idx[b]] = True
        assert mask.sum() == count
        mask = (mask[:, None] if choice == "columns" else
                mask[None, :] if choice == "rows" else mask.reshape(m, n))
        mask = np.broadcast_to(mask, (m, n))
        r = gb[mask]  # the selected coordinates (row-major, ascending)
        if t % gap == 0:
          adams[key] = Adam64()
        active = np.zeros((m, n))
        active[mask] = adams[key].step(r)
        want = np.where(mask, -lr_t * sp * active,
                        -lr_t * sp * sf * np.sign(gb)) - lr_t * wd * wb
        np.testing.assert_allclose(ub, want, rtol=2e-5, atol=2e-5 * lr_t,
                                   err_msg=f"{k}{b} step {t}")
    params = optax.apply_updates(params, u)


# ---------------------------------------------------------------------------
# Every mode trains a small model
# ---------------------------------------------------------------------------

# The other projectors and orders are checked step by step above.
MODES = [("block", None, "descending"), ("projection", "svd", None),
         ("coordinates", "randk", None)]


@pytest.fixture(scope="module")
def regression():
  rng = np.random.default_rng(14)
  sizes = [8, 32, 32, 32, 4]
  teacher = [rng.standard_normal((a, b)) / np.sqrt(a)
             for a, b in zip(sizes, sizes[1:])]
  x = rng.standard_normal((128, 8))
  y = x
  for w in teacher:
    y = np.tanh(y @ w)
  params = {f"mlp{i}": {"kernel": jnp.asarray(
      rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                        "bias": jnp.zeros((b,))}
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
  return params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _loss(params, x, y):
  h = x
  for i in range(4):
    layer = params[f"mlp{i}"]
    h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
  return jnp.mean((h - y) ** 2)


@pytest.mark.parametrize("mode,projector,order", MODES)
def test_every_mode_trains(regression, mode, projector, order):
  params, x, y = regression
  kw = {"block_order": order} if order else {"projector": projector}
  tx = lro.frugal(1e-2, 0.25, mode=mode, update_gap=10, **kw)

  @jax.jit
  def train(params):
    def body(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(_loss)(p, x, y)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), None,
                                  length=60)
    return losses, _loss(p, x, y)

  losses, final = train(params)
  assert np.isfinite(float(final))
  assert float(final) < 0.5 * float(losses[0]), (float(losses[0]),
                                                  float(final))


def test_inject_hyperparams():
  """Learning rate, scales and weight decay may be injected (rho static)."""
  params = {f"b{i}": jnp.ones((4, 6)) for i in range(4)}
  g = jax.tree.map(jnp.ones_like, params)
  for mode in ("block", "projection"):
    tx = optax.inject_hyperparams(lro.frugal, static_args=("rho",))(
        learning_rate=0.1, rho=0.5, mode=mode, weight_decay=0.0,
        update_gap=2)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(g, state, params)
    assert all(np.isfinite(np.asarray(v)).all() for v in u.values())


def test_block_mode_on_explicit_mesh_matches_unsharded():
  """Blocks of one class with different shardings share a pool; the updates
  equal the unsharded ones and keep each param's sharding."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (virtual) devices")
  spec = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  specs = {"a0": spec("fsdp", "tp"), "a1": spec("fsdp", None),
           "a2": spec(None, "tp"), "a3": spec("fsdp", "tp"), "norm": spec()}
  shapes = {k: (16, 8) for k in specs}
  shapes["norm"] = (8,)
  tx = lro.frugal(1e-2, 0.5, update_gap=2, weight_decay=0.1)
  params = params_of(shapes, 15)
  grads = grads_of(shapes, 16, 3)
  step = jax.jit(tx.update)
  state, want = tx.init(params), []
  for g in grads:
    u, state = step(g, state, params)
    want.append(u)
  place = lambda tree: {k: jax.device_put(
      v, jax.sharding.NamedSharding(mesh, specs[k])) for k, v in tree.items()}
  params = place(params)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    assert blocks_state(state).pools[0].mu.sharding.spec == spec(
        None, "fsdp", "tp")
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
      u, state = step(place(g), state, params)
      for k in shapes:
        np.testing.assert_allclose(np.asarray(u[k]), np.asarray(want[t][k]),
                                   rtol=1e-5, atol=1e-8, err_msg=k)
        assert u[k].sharding.is_equivalent_to(
            jax.sharding.NamedSharding(mesh, specs[k]), u[k].ndim), k
