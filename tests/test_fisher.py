"""Natural GaLore's Fisher transform: ALGORITHMS.md 2 (N1-N3) in float64.

``lro.woodbury_fisher_solve`` computes ``(lambda I + G_h G_h^T)^{-1} g`` by the
Woodbury identity, in float32 (documented). Its float32 error grows with the
cancellation between ``g / lambda`` and the in-span correction, i.e. with
``||G_h||_2^2 / lambda``; tolerances below are either "well conditioned"
(``||G_h||^2 / lambda`` of order 10-100) or an explicit bound
``C * eps_32 * (1 + ||G_h||_2^2 / lambda)``, never tuned to the output.
References solve the ``k x k`` system directly in NumPy float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from _windows import make_window, rel_err, window_kappa

F32_EPS = float(np.finfo(np.float32).eps)


def fisher_solve_ref(window, g, lam):
  """float64 ``solve(lam I + sum_h h h^T, g)`` over the rows of ``window``."""
  window = np.asarray(window, np.float64).reshape(-1, np.size(g))
  g = np.asarray(g, np.float64).reshape(-1)
  k = g.size
  return np.linalg.solve(lam * np.eye(k) + window.T @ window, g)


# ---------------------------------------------------------------------------
# N1: the Woodbury solve
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lam,scale,in_span", [
    (1.0, 0.5, True),      # well conditioned, g one of the window's rows
    (1.0, 0.5, False),     # well conditioned, g a fresh vector
    (1e-3, 0.02, True),    # reference damping, small (realistic) gradients
    (1e-3, 1.0, True),     # reference damping, ||G_h||^2 / lambda ~ 1e5
])
def test_n1_woodbury_equals_direct_solve(lam, scale, in_span):
  rng = np.random.default_rng(0)
  s, k = 6, 40
  h = scale * rng.standard_normal((s, k))
  h[0] = 0.0  # an unfilled slot of the ring buffer: must not matter
  g = h[-1].copy() if in_span else scale * rng.standard_normal(k)
  out = lro.woodbury_fisher_solve(jnp.asarray(h, jnp.float32),
                                  jnp.asarray(g, jnp.float32), lam)
  assert out.shape == (k,) and out.dtype == jnp.float32
  ref = fisher_solve_ref(h, g, lam)
  cond = 1.0 + np.linalg.norm(h, 2) ** 2 / lam
  tol = 1e-4 if cond < 1e3 else 2 * F32_EPS * cond
  assert rel_err(out, ref) < tol, (rel_err(out, ref), tol)
  # The zero row changes nothing: same as the window without it.
  out_short = lro.woodbury_fisher_solve(jnp.asarray(h[1:], jnp.float32),
                                        jnp.asarray(g, jnp.float32), lam)
  assert rel_err(out_short, ref) < tol


def test_n1_batched_matrices_are_independent():
  """history (*b, s, k), g (*b, k): each batch element solves its own system."""
  rng = np.random.default_rng(1)
  b, s, k, lam = (2, 3), 4, 12, 0.5
  h = 0.5 * rng.standard_normal(b + (s, k))
  g = 0.5 * rng.standard_normal(b + (k,))
  out = np.asarray(lro.woodbury_fisher_solve(jnp.asarray(h, jnp.float32),
                                             jnp.asarray(g, jnp.float32), lam))
  assert out.shape == b + (k,)
  for i in range(b[0]):
    for j in range(b[1]):
      ref = fisher_solve_ref(h[i, j], g[i, j], lam)
      assert rel_err(out[i, j], ref) < 1e-4


# ---------------------------------------------------------------------------
# N2, N3 and the ring buffer, through the transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lam,scale", [(0.5, 1.0), (1e-3, 0.01)])
def test_n2_first_step_is_g_over_lambda_plus_norm_squared(lam, scale):
  """N2: history = {g}: g~ = g / (lambda + ||g||^2), per matrix (batch too)."""
  rng = np.random.default_rng(2)
  g = {"mat": scale * rng.standard_normal((4, 5)),
       "stack": scale * rng.standard_normal((3, 4, 5)),
       "vec": scale * rng.standard_normal((7,))}
  tx = lro.scale_by_natural_fisher(history=5, damping=lam)
  gj = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
  out, state = tx.update(gj, tx.init(gj))
  # The window keeps each gradient's shape: (*batch, s, *matrix).
  assert state.history["mat"].shape == (5, 4, 5)
  assert state.history["stack"].shape == (3, 5, 4, 5)
  assert state.history["vec"].shape == (5, 7)
  np.testing.assert_allclose(out["mat"], g["mat"] / (lam + np.sum(g["mat"]**2)),
                             rtol=1e-5)
  norms = np.sum(g["stack"]**2, axis=(1, 2), keepdims=True)  # per layer
  np.testing.assert_allclose(out["stack"], g["stack"] / (lam + norms),
                             rtol=1e-5)
  np.testing.assert_allclose(out["vec"], g["vec"] / (lam + np.sum(g["vec"]**2)),
                             rtol=1e-5)


def test_n3_orthogonal_to_history_is_g_over_lambda_plus_norm_squared():
  """N3: g orthogonal to every other window vector: g~ = g / (lambda + ||g||^2).

  The other window vectors are large and mutually non-orthogonal, so a window
  without the current g (g / lambda), a 1/s average, or a wrong slot would all
  give a different answer.
  """
  rng = np.random.default_rng(3)
  lam, s, shape = 1.0, 4, (5, 6)
  others = 2.0 * rng.standard_normal((s - 1, 30))
  others[1] += others[0]
  g = rng.standard_normal(30)
  qo, _ = np.linalg.qr(others.T)
  g = g - qo @ (qo.T @ g)
  assert np.abs(others @ g).max() < 1e-12
  tx = lro.scale_by_natural_fisher(history=s, damping=lam)
  state = tx.init({"w": jnp.zeros(shape)})
  for h in others:
    _, state = tx.update({"w": jnp.asarray(h.reshape(shape), jnp.float32)},
                         state)
  out, state = tx.update({"w": jnp.asarray(g.reshape(shape), jnp.float32)},
                         state)
  expected = g / (lam + g @ g)
  cond = 1.0 + np.linalg.norm(others, 2) ** 2 / lam
  assert rel_err(out["w"], expected) < 2 * F32_EPS * cond + 1e-6
  # Not the answer without the others' damping-free part: the test is sharp.
  assert rel_err(expected, g / lam) > 0.5
  assert rel_err(expected, g / (lam + g @ g / s)) > 0.1


def test_ring_buffer_holds_exactly_the_last_s_gradients():
  """s = 3 over 7 steps: the window is a FIFO of the last 3 gradients."""
  s, steps, lam = 3, 7, 1.0
  shapes = {"m": (4, 5), "v": (6,)}
  rng = np.random.default_rng(4)
  grads = [{k: 0.5 * rng.standard_normal(sh) for k, sh in shapes.items()}
           for _ in range(steps)]
  tx = lro.scale_by_natural_fisher(history=s, damping=lam)
  state = tx.init({k: jnp.zeros(sh) for k, sh in shapes.items()})
  update = jax.jit(tx.update)
  fifo = {k: [] for k in shapes}
  for t, g in enumerate(grads):
    out, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g),
                        state)
    assert int(state.count) == t + 1
    for k in shapes:
      fifo[k] = (fifo[k] + [g[k].reshape(-1)])[-s:]
      assert state.history[k].shape == (s,) + g[k].shape
      window = np.asarray(state.history[k], np.float64).reshape(s, -1)
      # Exactly the last min(t+1, s) gradients (as a multiset), zeros elsewhere.
      want = sorted(map(tuple, np.asarray(fifo[k], np.float32)))
      rows = [tuple(r) for r in window.astype(np.float32) if np.any(r != 0)]
      assert sorted(rows) == want, (k, t)
      assert np.sum(np.all(window == 0, axis=1)) == s - len(fifo[k])
      ref = fisher_solve_ref(np.asarray(fifo[k]), g[k], lam)
      assert rel_err(out[k], ref) < 1e-4, (k, t)
  assert update._cache_size() == 1


# ---------------------------------------------------------------------------
# Inside lro.chain: projected leaves only
# ---------------------------------------------------------------------------

HF_B1, HF_B2, HF_EPS = 0.9, 0.999, 1e-6


def _orthonormal(rng, d, r):
  q, _ = np.linalg.qr(rng.standard_normal((d, r)))
  return q


def test_chain_applies_fisher_to_projected_leaves_only():
  """Natural GaLore: project (two-sided) -> Fisher -> HF Adam -> back -> lr.

  The projected leaf matches a float64 reference; the 1-D leaf and the
  ``norm`` matrix get plain HF Adam and keep no Fisher window. Generic
  (injected) bases are used until the refresh: with the SVD's own bases
  ``R = U^T G V`` is diagonal, its off-diagonal entries are float32 noise, and
  a first Adam step (``~ sign``) would amplify that noise into the update.
  The refresh at count ``gap`` then switches to the SVD bases, and the window
  (never cleared at a refresh, ALGORITHMS.md 2) keeps the old-basis vectors.
  """
  r, gap, lr, steps, s = 4, 4, 0.01, 5, 20
  lam = 1e-3  # the reference's hard-coded damping (the default)
  shapes = {"bias": (20,), "layer_norm": (8, 8), "w": (12, 20)}
  tx = lro.chain(lro.galore_project(r, proj_type="full", update_proj_gap=gap,
                                    projector="svd"),
                 lro.scale_by_natural_fisher(), lro.scale_by_adam_hf(),
                 lro.back_project(), optax.scale_by_learning_rate(lr))
  rng = np.random.default_rng(5)
  # Realistically small gradients keep ||G_h||^2 / lambda moderate (float32).
  grads = [{k: jnp.asarray(0.01 * rng.standard_normal(sh), jnp.float32)
            for k, sh in shapes.items()} for _ in range(steps)]
  state = tx.init(grads[0])
  sub = state[0]
  fisher_state, _ = sub.inner[2]
  assert isinstance(fisher_state, lro.NaturalFisherState)
  assert fisher_state.history.shape == (s, r, r)
  is_fisher = lambda x: isinstance(x, lro.NaturalFisherState)
  for i in (0, 1):  # pass-through leaves: HF Adam only, no Fisher window
    assert len(sub.inner[i]) == 1
    assert not any(map(is_fisher, jax.tree.leaves(sub.inner[i],
                                                  is_leaf=is_fisher)))
  # Inject generic bases and start at count 1 (no refresh until count gap).
  qm0, qn0 = _orthonormal(rng, 12, r), _orthonormal(rng, 20, r)
  proj = list(sub.projector)
  proj[2] = lro.TwoSidedBasisState(jnp.asarray(qm0, jnp.float32),
                                   jnp.asarray(qn0, jnp.float32))
  state = (sub._replace(count=jnp.ones([], jnp.int32), projector=tuple(proj)),
           ) + tuple(state[1:])
  hf = optax.chain(lro.scale_by_adam_hf(), optax.scale_by_learning_rate(lr))
  hf_state = hf.init({k: grads[0][k] for k in ("bias", "layer_norm")})
  step = jax.jit(tx.update)
  window, m, v = [], 0.0, 0.0
  for t, g in enumerate(grads):
    count = t + 1
    u, state = step(g, state)
    sub = state[0]
    hu, hf_state = hf.update({k: g[k] for k in ("bias", "layer_norm")},
                             hf_state)
    for k in ("bias", "layer_norm"):
      np.testing.assert_allclose(u[k], hu[k], rtol=1e-5, atol=1e-9, err_msg=k)
    qm = np.asarray(sub.projector[2].row_basis, np.float64)
    qn = np.asarray(sub.projector[2].col_basis, np.float64)
    gw = np.asarray(g["w"], np.float64)
    if count < gap:
      np.testing.assert_allclose(qm, np.float32(qm0), rtol=0, atol=0)
    else:  # refreshed at count == gap: the top-r singular subspaces of G
      uu, _, vh = np.linalg.svd(np.asarray(grads[gap - 1]["w"], np.float64))
      np.testing.assert_allclose(qm @ qm.T, uu[:, :r] @ uu[:, :r].T, atol=1e-4)
      np.testing.assert_allclose(qn @ qn.T, vh[:r].T @ vh[:r], atol=1e-4)
    rmat = qm.T @ gw @ qn
    window = (window + [rmat.reshape(-1)])[-s:]
    nat = fisher_solve_ref(np.asarray(window), rmat, lam).reshape(r, r)
    m = HF_B1 * m + (1 - HF_B1) * nat
    v = HF_B2 * v + (1 - HF_B2) * nat**2
    n = np.sqrt(1 - HF_B2**(t + 1)) / (1 - HF_B1**(t + 1)) * m / (
        np.sqrt(v) + HF_EPS)
    np.testing.assert_allclose(u["w"], -lr * qm @ n @ qn.T, rtol=2e-4,
                               atol=1e-4 * lr, err_msg=f"step {t}")
    # The window holds exactly the low-rank gradients seen so far, old
    # bases included (not cleared at the refresh).
    hist = np.asarray(sub.inner[2][0].history, np.float64).reshape(s, -1)
    filled = hist[np.any(hist != 0, axis=1)]
    assert len(filled) == t + 1
    for w in window:
      assert np.abs(filled - w).max(axis=1).min() < 1e-5 * np.abs(w).max()
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("history", [0, -1, 2.5, True, "3"])
def test_bad_history_raises(history):
  with pytest.raises(ValueError, match="history"):
    lro.scale_by_natural_fisher(history=history)


@pytest.mark.parametrize("damping", [0, 0.0, -1e-3])
def test_bad_damping_raises(damping):
  with pytest.raises(ValueError, match="damping"):
    lro.scale_by_natural_fisher(damping=damping)


# ---------------------------------------------------------------------------
# Numerical stability of the solve for every ||g||^2 / lambda
# ---------------------------------------------------------------------------
#
# Bounds. For g a row of the window, g~ = H^T (lambda I + H H^T)^{-1} e_j
# (push-through), i.e. sum_i Y_i phi(sigma_i) P_ji over the SVD H = P S Y^T with
# phi(sigma) = sigma / (lambda + sigma^2). A relative perturbation eps of the
# window (rounding it to float32 is one) moves each sigma_i by <= eps sigma_max,
# and |phi'(sigma) / phi(sigma)| <= 1 / sigma, so the float64 answer itself
# moves by ~ eps * kappa(H), kappa(H) = sigma_max / sigma_min over the nonzero
# singular values, independently of lambda. No float32 method can promise
# better; ROW_C = 100 is headroom for the QR / SVD constants (measured: <= 8).
# Windows with exactly repeated rows are ill-posed under *generic* perturbations
# (any eps-perturbation adds a direction amplified by up to ||g||^2 / lambda);
# the claim there is for the exact window, with kappa over its nonzero
# singular values (1 for a repeated gradient).
# For a general g (not in the window), rounding g alone moves the answer by
# ||A^{-1} dg|| <= eps ||g|| / lambda, i.e. relative eps * kappa_g with
# kappa_g = ||g|| / (lambda ||A^{-1} g||) >= 1 (A = lambda I + H^T H), and
# rounding the window turns its row space by ~ eps * kappa(H), which moves
# g_perp (amplified by 1 / lambda) by as much relative to ||g||; the bound is
# GEN_C * eps * kappa(H) * kappa_g, both factors from the float64 problem
# (measured: <= 8 eps kappa_g).

ROW_C = 100.0
GEN_C = 100.0
RATIOS = [1e-2, 1.0, 1e3, 1e6, 1e9]   # ||g||^2 / lambda for the current g
KINDS = ["one", "independent", "collinear", "repeated"]
LAM = 1e-3


def reference_woodbury_f32(h, g, lam):
  """The reference's form g/lam - lam^-2 H^T (I + H H^T/lam)^{-1} H g, float32."""
  h = np.asarray(h, np.float32)
  g = np.asarray(g, np.float32)
  lam = np.float32(lam)
  small = np.eye(len(h), dtype=np.float32) + (h @ h.T) / lam
  z = np.linalg.solve(small, h @ g)
  return g / lam - (h.T @ z) / lam**2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_stable_solve_for_a_window_row(kind, ratio):
  """g = the window's current row, ||g||^2/lambda from 1e-2 to 1e9."""
  rng = np.random.default_rng(10 + KINDS.index(kind))
  rows = make_window(kind, 5, 48, rng) * np.sqrt(ratio * LAM)
  # Two unfilled slots (zero rows) first, as in the ring buffer.
  h = np.float32(np.concatenate([np.zeros((2, 48)), rows]))
  ref = fisher_solve_ref(h, h[-1], LAM)
  bound = ROW_C * F32_EPS * window_kappa(h)
  out = lro.woodbury_fisher_solve(jnp.asarray(h), jnp.asarray(h[-1]), LAM)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert rel_err(out, ref) < bound, (rel_err(out, ref), bound)
  # Sharpness: the reference's float32 form misses this bound once
  # ||g||^2 / lambda is large (its error ~ eps ||g||^2 / lambda).
  if ratio >= 1e6:
    try:
      with np.errstate(all="ignore"):
        old = reference_woodbury_f32(h, h[-1], LAM)
    except np.linalg.LinAlgError:  # its s x s system is singular in float32
      old = np.full_like(h[-1], np.nan)
    assert not np.all(np.isfinite(old)) or rel_err(old, ref) > bound


@pytest.mark.parametrize("kind", KINDS)
def test_stable_transform_for_every_ratio(kind):
  """Through scale_by_natural_fisher (the in-window path), zero slots left."""
  rng = np.random.default_rng(20 + KINDS.index(kind))
  base = make_window(kind, 5, 48, rng)
  tx = lro.scale_by_natural_fisher(history=8, damping=LAM)
  update = jax.jit(tx.update)
  for ratio in RATIOS:
    rows = np.float32(base * np.sqrt(ratio * LAM))
    state = tx.init({"w": jnp.zeros((6, 8))})
    for r in rows:
      out, state = update({"w": jnp.asarray(r.reshape(6, 8))}, state)
    ref = fisher_solve_ref(rows, rows[-1], LAM)
    bound = ROW_C * F32_EPS * window_kappa(rows)
    assert bool(jnp.all(jnp.isfinite(out["w"])))
    assert rel_err(out["w"], ref) < bound, (ratio, rel_err(out["w"], ref))
  assert update._cache_size() == 1


@pytest.mark.parametrize("ratio", RATIOS)
def test_stable_solve_for_a_general_g(ratio):
  """g not a row: fresh, near the window's span, and exact multiples of a row."""
  rng = np.random.default_rng(30)
  k = 48
  rows = np.float32(make_window("independent", 5, k, rng) * np.sqrt(ratio * LAM))
  h = np.concatenate([np.zeros((1, k), np.float32), rows])
  gnorm = np.linalg.norm(rows[-1])
  fresh = rng.standard_normal(k) * gnorm / np.sqrt(k)
  near = rows[2] + 1e-3 * gnorm * rng.standard_normal(k) / np.sqrt(k)
  cases = {"fresh": (fresh, None), "near": (near, None),
           "2 x row": (2 * rows[2], window_kappa(h)),
           "-row": (-rows[0], window_kappa(h))}
  for name, (g, kappa_row) in cases.items():
    g = np.float32(g)
    ref = fisher_solve_ref(h, g, LAM)
    out = lro.woodbury_fisher_solve(jnp.asarray(h), jnp.asarray(g), LAM)
    assert bool(jnp.all(jnp.isfinite(out)))
    if kappa_row is None:
      kappa_g = np.linalg.norm(g) / (LAM * np.linalg.norm(ref))
      bound = GEN_C * F32_EPS * window_kappa(h) * kappa_g
    else:  # in the window's span exactly: as stable as a row
      bound = ROW_C * F32_EPS * kappa_row
    assert rel_err(out, ref) < bound, (name, rel_err(out, ref), bound)


def test_general_g_with_more_rows_than_entries():
  """s > k: the window has a null space; the solve stays exact."""
  rng = np.random.default_rng(31)
  h = np.float32(rng.standard_normal((6, 3)))
  for g in (np.float32(rng.standard_normal(3)), h[2]):
    ref = fisher_solve_ref(h, g, 0.1)
    out = lro.woodbury_fisher_solve(jnp.asarray(h), jnp.asarray(g), 0.1)
    kappa_g = np.linalg.norm(g) / (0.1 * np.linalg.norm(ref))
    assert rel_err(out, ref) < GEN_C * F32_EPS * window_kappa(h) * kappa_g


def test_repeated_gradient_closed_form_through_the_transform():
  """The same g t times: g~_t = g / (lambda + t ||g||^2), ||g||^2/lambda = 1e9."""
  rng = np.random.default_rng(32)
  g = rng.standard_normal((6, 8))
  g = np.float32(g / np.linalg.norm(g) * np.sqrt(1e9 * LAM))
  tx = lro.scale_by_natural_fisher(history=4, damping=LAM)
  state = tx.init({"w": jnp.zeros((6, 8))})
  norm2 = np.sum(np.float64(g) ** 2)
  for t in range(1, 7):
    out, state = tx.update({"w": jnp.asarray(g)}, state)
    expected = np.float64(g) / (LAM + min(t, 4) * norm2)
    assert rel_err(out["w"], expected) < ROW_C * F32_EPS, t


@pytest.mark.parametrize("scale", [0.0, 1e-20, 1e-8, 1e6, 1e15])
def test_degenerate_scales_never_nan(scale):
  """Zero, tiny and huge gradients: finite, and the closed form g/(lam+||g||^2)."""
  rng = np.random.default_rng(33)
  g = np.float32(scale * rng.standard_normal(12))
  h = np.stack([np.zeros(12, np.float32), g, g])
  for lam in (1e-3, 1.0):
    out = np.asarray(lro.woodbury_fisher_solve(jnp.asarray(h), jnp.asarray(g),
                                               lam), np.float64)
    assert np.all(np.isfinite(out))
    expected = np.float64(g) / (lam + 2 * np.sum(np.float64(g) ** 2))
    if scale == 0.0:
      assert np.all(out == 0.0)
    else:
      assert rel_err(out, expected) < ROW_C * F32_EPS, (scale, lam)
    # Zero history, any g: g / lambda.
    out0 = lro.woodbury_fisher_solve(jnp.zeros((3, 12)), jnp.asarray(g), lam)
    np.testing.assert_allclose(out0, np.float64(g) / lam, rtol=1e-6)


def test_readme_chain_with_a_big_repeated_gradient_stays_finite():
  """The README chain fed the same big gradient 5 times (was NaN at step 2)."""
  tx = lro.chain(lro.galore_project(4), lro.scale_by_natural_fisher(),
                 optax.scale_by_adam(), lro.back_project(),
                 optax.scale_by_learning_rate(1e-3))
  g = {"w": jax.random.normal(jax.random.key(1), (32, 48)) * 30}
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(5):
    u, state = update(g, state)
    assert bool(jnp.all(jnp.isfinite(u["w"])))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  # Adam over an identical input is a fixed step: -lr * sign-like, bounded.
  assert float(jnp.max(jnp.abs(u["w"]))) < 1e-2


# ---------------------------------------------------------------------------
# A sharded window (explicit mesh): the Gram path, against float64
# ---------------------------------------------------------------------------

@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("scale", [0.1, 300.0])
def test_window_sharded_in_an_explicit_mesh(scale):
  """A gradient split over a (4, 2) explicit mesh keeps its window split (no
  gather: the s x s Gram is a reduction over the sharded axes) and the result
  equals the float64 solve. The Gram squares the window's condition number,
  so the bound is 100 eps kappa^2 (kappa: the float64 window's, over its
  nonzero singular values); ||g||^2 / lambda reaches ~1e10 at scale 300."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"),
                       axis_types=(AxisType.Explicit,) * 2)
  s, lam, steps = 4, 1e-3, 6
  rng = np.random.default_rng(11)
  grads = [scale * rng.standard_normal((16, 12)) for _ in range(steps)]
  tx = lro.scale_by_natural_fisher(history=s, damping=lam)
  sharding = NamedSharding(mesh, P("fsdp", "tp"))
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), sharding)
    state = jax.jit(tx.init)({"w": put(grads[0])})
    assert state.history["w"].sharding.spec == P(None, "fsdp", "tp")
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
      out, state = update({"w": put(g)}, state)
      assert out["w"].sharding.spec == P("fsdp", "tp")
      assert state.history["w"].sharding.spec == P(None, "fsdp", "tp")
      window = np.asarray(grads[max(0, t + 1 - s):t + 1], np.float32).astype(
          np.float64).reshape(-1, g.size)
      sv = np.linalg.svd(window, compute_uv=False)
      kappa = sv[0] / sv[sv > 1e-12 * sv[0]][-1]
      ref = fisher_solve_ref(window, g.astype(np.float32).astype(np.float64),
                             lam)
      assert np.all(np.isfinite(np.asarray(out["w"])))
      assert rel_err(out["w"], ref) < 100 * F32_EPS * kappa**2, (t, kappa)
