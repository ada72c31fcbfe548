"""M-FAC as a transform: ALGORITHMS.md 9 (M1-M5) against float64 NumPy.

References are ``np.linalg.solve(lambda I + G^T G / m, x)`` in float64 over the
gradients fed in (never over the transform's own state), and closed forms.

Bounds (``kappa`` = sigma_max / sigma_min over the nonzero singular values of
the float64 window, 1 for a repeated gradient; see tests/test_fisher.py for
why ``eps * kappa`` is what the float64 problem itself allows for x a row of
the window, independently of lambda):

* ``solver="qr"`` refactorises the window as Natural GaLore's transform:
  ``C * eps * kappa``.
* ``solver="gram"`` solves from the Gram ``K = G G^T`` (the reference's cost
  model). Rounding ``K`` costs ``eps * ||K||``, i.e. relative
  ``eps * kappa^2`` on its smallest eigenvalue, which dominates the answer
  when lambda is small: ``C * eps * kappa^2``, for windows whose singular
  values the Gram resolves (sigma_min^2 / sigma_max^2 well above 8 m eps);
  below that only finiteness and the operator bound ``||u|| <= ||x|| /
  lambda`` are claimed (test_slowly_changing_gradients).

Neither grows with ``||x||^2 / (m lambda)``, unlike the reference's
``x / lambda - G^T c`` (``~ eps ||x||^2 / (m lambda)``). C = 100 is headroom
over the measured constants (<= 8).
``mfac_solve`` goes through ``woodbury_fisher_solve``: the bounds of
tests/test_fisher.py (``eps * kappa`` for a vector in the window's span,
``eps * kappa * kappa_x`` for a general one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from _windows import make_window, rel_err, window_kappa

F32_EPS = float(np.finfo(np.float32).eps)
SOLVER_C = 100.0
ROW_C = 100.0
GEN_C = 100.0
SOLVERS = ["qr", "gram"]
RATIOS = [1e-2, 1.0, 1e3, 1e6, 1e9]   # ||x||^2 / (m lambda)
KINDS = ["one", "independent", "collinear", "repeated"]


def mfac_ref(rows, x, lam, m):
  """float64 ``solve(lam I + rows^T rows / m, x)``."""
  rows = np.asarray(rows, np.float64).reshape(-1, np.size(x))
  x = np.asarray(x, np.float64).reshape(-1)
  return np.linalg.solve(lam * np.eye(x.size) + rows.T @ rows / m, x)


def solver_bound(solver, rows):
  kappa = window_kappa(rows)
  return SOLVER_C * F32_EPS * (kappa if solver == "qr" else kappa**2)


def f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# ---------------------------------------------------------------------------
# M1: the product is solve(lambda I + G^T G / m, x)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_m1_every_step_with_wraparound_per_leaf(solver):
  """m = 3 over 7 steps: FIFO window, 1/m while filling, per matrix."""
  m, lam, steps = 3, 0.05, 7
  shapes = {"stack": (2, 3, 4), "vec": (5,), "w": (4, 6)}
  rng = np.random.default_rng(0)
  grads = [{k: 0.3 * rng.standard_normal(s) for k, s in shapes.items()}
           for _ in range(steps)]
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  state = tx.init(f32(grads[0]))
  assert state.buffer["stack"].shape == (2, m, 12)
  assert state.buffer["vec"].shape == (m, 5)
  if solver == "gram":
    assert state.gram["stack"].shape == (2, m, m)
    assert state.equal_rows["stack"].dtype == jnp.bool_
  else:  # the QR solver keeps no Gram
    assert isinstance(state.gram, optax.MaskedNode)
  update = jax.jit(tx.update)
  fifo = []
  for t, g in enumerate(grads):
    u, state = update(f32(g), state)
    assert int(state.count) == t + 1
    fifo = (fifo + [g])[-m:]
    for k in ("vec", "w"):
      rows = np.float32([f[k].reshape(-1) for f in fifo])
      ref = mfac_ref(rows, rows[-1], lam, m)
      assert rel_err(u[k], ref) < solver_bound(solver, rows)
    for b in range(2):  # each layer of the stack has its own window
      rows = np.float32([f["stack"][b].reshape(-1) for f in fifo])
      ref = mfac_ref(rows, rows[-1], lam, m)
      assert rel_err(u["stack"][b], ref) < (
          solver_bound(solver, rows))
    if solver == "qr":
      continue
    # The kept Gram is the Gram of the buffer's contents (no drift).
    for k in shapes:
      buf = np.asarray(state.buffer[k], np.float64)
      np.testing.assert_allclose(
          state.gram[k], np.einsum("...ik,...jk->...ij", buf, buf),
          rtol=1e-5, atol=1e-6 * np.abs(buf).max() ** 2)
  assert update._cache_size() == 1


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_m1_stable_for_every_ratio(kind, solver):
  """||x||^2 / (m lambda) from 1e-2 to 1e9 at the reference's damp 1e-5."""
  m, lam = 8, 1e-5
  base = make_window(kind, 5, 48, np.random.default_rng(1 + KINDS.index(kind)))
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  update = jax.jit(tx.update)
  for ratio in RATIOS:
    rows = np.float32(base * np.sqrt(ratio * lam * m))
    state = tx.init({"w": jnp.zeros((6, 8))})
    for r in rows:
      u, state = update({"w": jnp.asarray(r.reshape(6, 8))}, state)
    assert bool(jnp.all(jnp.isfinite(u["w"])))
    ref = mfac_ref(rows, rows[-1], lam, m)
    bound = solver_bound(solver, rows)
    assert rel_err(u["w"], ref) < bound, (ratio, rel_err(u["w"], ref), bound)
  assert update._cache_size() == 1


@pytest.mark.parametrize("ratio", [1e-2, 1e3, 1e9])
def test_m1_mfac_solve_for_any_x(ratio):
  """``mfac_solve``: a buffer row, and a general x, with zero rows."""
  m, lam, k = 6, 1e-4, 20
  rng = np.random.default_rng(2)
  rows = np.float32(make_window("independent", 4, k, rng)
                    * np.sqrt(ratio * lam * m))
  buf = np.concatenate([rows[:2], np.zeros((2, k), np.float32), rows[2:]])
  x = np.float32(rng.standard_normal(k) * np.linalg.norm(rows[-1]) / np.sqrt(k))
  for vec, in_window in ((rows[-1], True), (x, False)):
    ref = mfac_ref(buf, vec, lam, m)
    out = lro.mfac_solve(jnp.asarray(buf), jnp.asarray(vec), lam)
    if in_window:
      bound = ROW_C * F32_EPS * window_kappa(rows)
    else:  # the float64 problem's condition numbers (test_fisher.py)
      bound = GEN_C * F32_EPS * window_kappa(rows) * np.linalg.norm(vec) / (
          lam * np.linalg.norm(ref))
    assert rel_err(out, ref) < bound, (in_window, rel_err(out, ref), bound)


# ---------------------------------------------------------------------------
# M2, M3: closed forms
# ---------------------------------------------------------------------------


def test_m2_empty_buffer_is_x_over_lambda():
  rng = np.random.default_rng(3)
  x = np.float32(rng.standard_normal((2, 7)))  # batch of two vectors
  for lam in (1e-5, 0.3):
    out = lro.mfac_solve(jnp.zeros((2, 4, 7)), jnp.asarray(x), lam)
    np.testing.assert_allclose(out, np.float64(x) / lam, rtol=4 * F32_EPS)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_m3_single_row_per_leaf_and_global(ratio, solver):
  """First step (one nonzero row g, x = g): u = g / (lambda + ||g||^2 / m)."""
  m, lam = 16, 1e-5
  rng = np.random.default_rng(4)
  g = {"stack": rng.standard_normal((3, 4, 5)), "vec": rng.standard_normal(6),
       "w": rng.standard_normal((5, 4))}
  total = sum(np.sum(v**2) for v in g.values())
  g = jax.tree.map(lambda v: np.float32(v * np.sqrt(ratio * lam * m / total)),
                   g)
  g64 = jax.tree.map(np.float64, g)
  tol = SOLVER_C * F32_EPS  # kappa = 1
  # Per leaf: each matrix (each layer of the stack) has its own ||g||.
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  u, _ = tx.update(f32(g), tx.init(f32(g)))
  for k in ("vec", "w"):
    want = g64[k] / (lam + np.sum(g64[k] ** 2) / m)
    assert rel_err(u[k], want) < tol, k
  norms = np.sum(g64["stack"] ** 2, axis=(1, 2), keepdims=True)
  assert rel_err(u["stack"], g64["stack"] / (lam + norms / m)) < tol
  # Global: one window over all leaves, one ||g||.
  tx = lro.scale_by_mfac(window=m, damping=lam, per_leaf=False,
                         solver=solver)
  u, state = tx.update(f32(g), tx.init(f32(g)))
  assert state.buffer.shape == (m, 86)
  total = sum(np.sum(v**2) for v in jax.tree.leaves(g64))
  for k in g:
    assert rel_err(u[k], g64[k] / (lam + total / m)) < tol, k


@pytest.mark.parametrize("solver", SOLVERS)
def test_repeated_gradient_closed_form(solver):
  """The same g t times: u_t = g / (lambda + min(t, m) ||g||^2 / m)."""
  m, lam = 4, 1e-5
  rng = np.random.default_rng(5)
  g = rng.standard_normal((6, 8))
  g = np.float32(g / np.linalg.norm(g) * np.sqrt(1e9 * lam * m))
  norm2 = np.sum(np.float64(g) ** 2)
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  state = tx.init({"w": jnp.zeros((6, 8))})
  for t in range(1, 7):
    u, state = tx.update({"w": jnp.asarray(g)}, state)
    want = np.float64(g) / (lam + min(t, m) * norm2 / m)
    assert rel_err(u["w"], want) < SOLVER_C * F32_EPS, t


# ---------------------------------------------------------------------------
# M4: MFAC(lambda_M, m) x = m * NaturalGaLore(lambda = m lambda_M) x
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["independent", "collinear"])
def test_m4_equivalence_with_natural_galore_transform(kind, solver):
  m, lam_m, steps = 4, 1e-5, 7
  rng = np.random.default_rng(6)
  rows = np.float32(make_window(kind, steps, 48, rng) * np.sqrt(1e4 * lam_m * m))
  mfac = lro.scale_by_mfac(window=m, damping=lam_m, solver=solver)
  nat = lro.scale_by_natural_fisher(history=m, damping=m * lam_m)
  sm = mfac.init({"w": jnp.zeros((6, 8))})
  sn = nat.init({"w": jnp.zeros((6, 8))})
  for t in range(steps):
    g = {"w": jnp.asarray(rows[t].reshape(6, 8))}
    um, sm = mfac.update(g, sm)
    un, sn = nat.update(g, sn)
    window = rows[max(0, t + 1 - m):t + 1]
    bound = solver_bound(solver, window) + solver_bound("qr", window)
    ref = mfac_ref(window, rows[t], lam_m, m)
    assert rel_err(um["w"], ref) < bound
    assert rel_err(m * np.asarray(un["w"], np.float64), ref) < bound
    assert rel_err(um["w"], m * np.asarray(un["w"], np.float64).ravel()) < (
        2 * bound), t


@pytest.mark.parametrize("solver", SOLVERS)
def test_m4_inside_lro_chain(solver):
  """Same projection, then MFAC vs m x Natural-GaLore's transform."""
  m, lam_m = 5, 1e-4
  grads = [{"w": jax.random.normal(jax.random.key(t), (32, 48)),
            "bias": jax.random.normal(jax.random.key(10 + t), (48,))}
           for t in range(4)]

  def run(fisher):
    tx = lro.chain(lro.galore_project(4, update_proj_gap=3), fisher,
                   lro.back_project())
    state, outs = tx.init(grads[0]), []
    for gt in grads:
      u, state = tx.update(gt, state)
      outs.append(u)
    return outs, state

  um, state = run(lro.scale_by_mfac(window=m, damping=lam_m, solver=solver))
  un, _ = run(lro.scale_by_natural_fisher(history=m, damping=m * lam_m))
  for a, b in zip(um, un):
    np.testing.assert_allclose(a["w"], m * np.asarray(b["w"]), rtol=1e-4,
                               atol=1e-5 * np.abs(a["w"]).max())
    # The 1-D leaf passes through at full rank, skipping the Fisher transform.
    np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-6)
  mstate = [s for s in jax.tree.leaves(state[0].inner, is_leaf=lambda x:
                                       isinstance(x, lro.MFACState))
            if isinstance(s, lro.MFACState)]
  assert len(mstate) == 1 and mstate[0].buffer.shape == (m, 4 * 48)


# ---------------------------------------------------------------------------
# M5: the order of the buffer does not matter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_m5_permuting_the_window_leaves_the_result_unchanged(solver):
  m, lam = 5, 1e-5
  rng = np.random.default_rng(7)
  rows = np.float32(make_window("independent", 5, 30, rng) * 0.3)
  x = rows[-1]
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  outs = []
  for order in ([0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]):
    state = tx.init({"w": jnp.zeros(30)})
    for i in order:
      _, state = tx.update({"w": jnp.asarray(rows[i])}, state)
    u, _ = tx.update({"w": jnp.asarray(x)}, state)
    outs.append(np.asarray(u["w"], np.float64))
  ref = mfac_ref(rows, x, lam, m)
  bound = solver_bound(solver, rows)
  for o in outs:
    assert rel_err(o, ref) < bound
    assert rel_err(o, outs[0]) < 2 * bound
  # mfac_solve: permuted buffer rows (zero rows included), same product.
  buf = np.concatenate([rows, np.zeros((2, 30), np.float32)])
  y = np.float32(rng.standard_normal(30))
  a = lro.mfac_solve(jnp.asarray(buf), jnp.asarray(y), lam)
  b = lro.mfac_solve(jnp.asarray(buf[rng.permutation(7)]), jnp.asarray(y), lam)
  ref = mfac_ref(buf, y, lam, 7)
  kappa_y = window_kappa(rows) * np.linalg.norm(y) / (
      lam * np.linalg.norm(ref))
  assert rel_err(a, ref) < GEN_C * F32_EPS * kappa_y
  assert rel_err(b, np.asarray(a, np.float64)) < 2 * GEN_C * F32_EPS * kappa_y


# ---------------------------------------------------------------------------
# The reference optimizer by composition, layouts, optax integration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_optimizer_by_composition(solver):
  """add_decayed_weights -> scale_by_mfac(global) -> ema(debias=False) -> lr.

  Against MFAC.step in float64: g = grad + wd w; insert g; u = solve(...);
  v = mu v + (1 - mu) u; w -= lr v, all params flattened together (in
  ``jax.tree.leaves`` order: "c", then "w").
  """
  # lambda keeps the problem well conditioned (||g||^2 / (m lambda) ~ 10), so
  # the float32 and float64 trajectories stay within float32 noise.
  m, lam, wd, mu, lr, steps = 4, 0.1, 3e-3, 0.9, 0.1, 6
  rng = np.random.default_rng(8)
  a = rng.standard_normal((10, 7)) / 3
  b = rng.standard_normal(10)
  tx = optax.chain(optax.add_decayed_weights(wd),
                   lro.scale_by_mfac(window=m, damping=lam, per_leaf=False,
                                     solver=solver),
                   optax.ema(mu, debias=False),
                   optax.scale_by_learning_rate(lr))
  params = {"c": jnp.zeros(1, jnp.float32),
            "w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}
  state = tx.init(params)
  flat = lambda p: jnp.concatenate([p["c"], p["w"].ravel()])
  z64 = np.asarray(flat(params), np.float64)
  buf, v = np.zeros((m, 7)), np.zeros(7)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  for t in range(steps):
    # Least squares in the concatenation z = [c, w]: grad = A^T (A z - b).
    gz = a32.T @ (a32 @ flat(params) - b32)
    u, state = tx.update({"c": gz[:1], "w": gz[1:].reshape(2, 3)}, state,
                         params)
    params = optax.apply_updates(params, u)
    g64 = a.T @ (a @ z64 - b) + wd * z64
    buf[t % m] = g64
    v = mu * v + (1 - mu) * np.linalg.solve(
        lam * np.eye(7) + buf.T @ buf / m, g64)
    z64 = z64 - lr * v
    np.testing.assert_allclose(np.asarray(flat(params), np.float64), z64,
                               rtol=2e-4, atol=2e-5, err_msg=str(t))


@pytest.mark.parametrize("solver", SOLVERS)
def test_global_window_follows_tree_leaves_and_keeps_dtypes(solver):
  m, lam = 4, 1e-3
  rng = np.random.default_rng(9)
  shapes = {"b": (4,), "s": (2, 3, 4), "w": (3, 4)}
  tx = lro.scale_by_mfac(window=m, damping=lam, per_leaf=False, solver=solver)
  params = {"b": jnp.zeros(4, jnp.bfloat16), "s": jnp.zeros((2, 3, 4)),
            "w": jnp.zeros((3, 4))}
  state = tx.init(params)
  assert state.buffer.shape == (m, 40) and state.buffer.dtype == jnp.float32
  update = jax.jit(tx.update)
  fifo = []
  for t in range(6):
    g = {k: rng.standard_normal(s) for k, s in shapes.items()}
    gj = {k: jnp.asarray(v, params[k].dtype) for k, v in g.items()}
    u, new_state = update(gj, state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), state)
    state = new_state
    assert {k: v.dtype for k, v in u.items()} == {k: v.dtype
                                                  for k, v in gj.items()}
    flat = np.concatenate([np.float64(gj[k]).ravel() for k in ("b", "s", "w")])
    fifo = (fifo + [flat])[-m:]
    ref = mfac_ref(np.float32(fifo), flat, lam, m)
    got = np.concatenate([np.float64(u[k]).ravel() for k in ("b", "s", "w")])
    assert rel_err(got[4:], ref[4:]) < solver_bound(solver, np.float32(fifo))
    # The bf16 leaf's output is rounded to bf16 (relative 2^-8).
    assert rel_err(got[:4], ref[:4]) < 2.0**-8
  # Per leaf is a different preconditioner (one window per matrix).
  tx_leaf = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  gj = {k: jnp.ones(s) for k, s in shapes.items()}
  gj["w"] = gj["w"] * 2
  u_leaf, _ = tx_leaf.update(gj, tx_leaf.init(gj))
  u_glob, _ = tx.update(gj, tx.init(gj))
  assert rel_err(u_leaf["w"], np.float64(u_glob["w"]).ravel()) > 0.1


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("per_leaf", [True, False])
def test_masked_only_preconditions_unmasked_leaves(per_leaf, solver):
  m, lam = 3, 1e-2
  params = {"a": jnp.zeros((2, 3)), "frozen": jnp.zeros(5)}
  tx = optax.masked(lro.scale_by_mfac(window=m, damping=lam,
                                      per_leaf=per_leaf, solver=solver),
                    {"a": True, "frozen": False})
  state = tx.init(params)
  buf = state.inner_state.buffer
  assert (buf["a"] if per_leaf else buf).shape == (m, 6)
  g = {"a": jnp.arange(6.0).reshape(2, 3) / 10, "frozen": jnp.ones(5)}
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(u["frozen"], g["frozen"])
  ga = np.arange(6.0) / 10
  np.testing.assert_allclose(np.ravel(u["a"]), ga / (lam + ga @ ga / m),
                             rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_readme_chain_with_mfac_and_a_big_repeated_gradient_stays_finite(
    solver):
  tx = lro.chain(lro.galore_project(4),
                 lro.scale_by_mfac(window=8, solver=solver),
                 optax.scale_by_adam(), lro.back_project(),
                 optax.scale_by_learning_rate(1e-3))
  g = {"w": jax.random.normal(jax.random.key(1), (32, 48)) * 30,
       "layer_norm": jnp.ones((8, 8))}
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(5):
    u, state = update(g, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  assert update._cache_size() == 1
  # MFAC state for the projected leaf only (the norm passes through).
  mstates = [s for s in jax.tree.leaves(
      state[0].inner, is_leaf=lambda x: isinstance(x, lro.MFACState))
             if isinstance(s, lro.MFACState)]
  assert len(mstates) == 1


def test_init_on_abstract_params_and_no_zero_size_arrays():
  abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32),
              "v": jax.ShapeDtypeStruct((2, 3, 4), jnp.bfloat16)}
  for per_leaf in (True, False):
    for solver in SOLVERS:
      tx = lro.scale_by_mfac(window=4, per_leaf=per_leaf, solver=solver)
      leaves = jax.tree.leaves(tx.init(abstract))
      assert leaves and all(x.size > 0 for x in leaves)
  state = lro.scale_by_mfac(window=4, per_leaf=False).init({})
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  u, _ = lro.scale_by_mfac(window=4, per_leaf=False).update({}, state)
  assert u == {}


@pytest.mark.parametrize("window", [0, -1, 2.5, True, "3"])
def test_bad_window_raises(window):
  with pytest.raises(ValueError, match="window"):
    lro.scale_by_mfac(window=window)


@pytest.mark.parametrize("damping", [0, 0.0, -1e-5])
def test_bad_damping_raises(damping):
  with pytest.raises(ValueError, match="damping"):
    lro.scale_by_mfac(damping=damping)


def test_bad_per_leaf_raises():
  with pytest.raises(ValueError, match="per_leaf"):
    lro.scale_by_mfac(per_leaf="yes")


def test_bad_solver_raises():
  with pytest.raises(ValueError, match="solver"):
    lro.scale_by_mfac(solver="lu")


def test_auto_solver_is_qr_up_to_window_64():
  p = {"w": jnp.zeros((2, 3))}
  assert isinstance(lro.scale_by_mfac(window=64).init(p).gram,
                    optax.MaskedNode)
  assert lro.scale_by_mfac(window=65).init(p).gram["w"].shape == (65, 65)


# ---------------------------------------------------------------------------
# Exact structure and hard windows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_interleaved_repeats_and_a_zero_gradient(solver):
  """Windows with repeated rows among others, and zero gradients (u = 0)."""
  m, lam = 6, 1e-5
  rng = np.random.default_rng(11)
  a, b, c = np.float32(rng.standard_normal((3, 24)) * 30)
  zero = np.zeros(24, np.float32)
  seq = [a, b, a, zero, a, c, b, a, a]
  tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
  state = tx.init({"w": jnp.zeros(24)})
  update = jax.jit(tx.update)
  for t, x in enumerate(seq):
    u, state = update({"w": jnp.asarray(x)}, state)
    window = np.array(seq[max(0, t + 1 - m):t + 1])
    if not np.any(x):
      np.testing.assert_array_equal(u["w"], 0.0)
      continue
    ref = mfac_ref(window, x, lam, m)
    distinct = np.unique(window[np.any(window != 0, axis=1)], axis=0)
    assert rel_err(u["w"], ref) < solver_bound(solver, distinct), t


@pytest.mark.parametrize("solver", SOLVERS)
def test_slowly_changing_gradients(solver):
  """Consecutive gradients 1e-3 apart (a full-batch run): kappa(G) ~ 5e3.

  QR: within eps * kappa for every ratio. Gram: within eps * kappa^2 while the
  Gram resolves the window (ratio <= 1e2 here); beyond that finite and within
  the operator bound ||u|| <= ||x|| / lambda (the documented limit).
  """
  m, k, theta = 8, 48, 1e-3
  rng = np.random.default_rng(12)
  g = rng.standard_normal(k)
  g /= np.linalg.norm(g)
  rows = []
  for _ in range(6):
    d = rng.standard_normal(k)
    d -= g * (g @ d)
    g = np.cos(theta) * g + np.sin(theta) * d / np.linalg.norm(d)
    rows.append(g)
  rows = np.float32(rows)
  for ratio in RATIOS:
    lam = 1.0 / (ratio * m)  # ||x|| = 1
    tx = lro.scale_by_mfac(window=m, damping=lam, solver=solver)
    state = tx.init({"w": jnp.zeros(k)})
    for r in rows:
      u, state = tx.update({"w": jnp.asarray(r)}, state)
    u = np.asarray(u["w"], np.float64)
    ref = mfac_ref(rows, rows[-1], lam, m)
    assert np.all(np.isfinite(u))
    if solver == "qr" or ratio <= 1e2:
      assert rel_err(u, ref) < solver_bound(solver, rows), ratio
    else:
      assert np.linalg.norm(u) <= np.linalg.norm(rows[-1]) / lam
