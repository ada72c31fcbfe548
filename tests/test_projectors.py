"""Tests of the basis computations in ``lro.projectors`` and of the projector
state that ``lro.galore`` keeps (ALGORITHMS.md 1, G1; DESIGN.md rules on
non-finite and degenerate gradients).

References are numpy float64: a matrix ``G = U diag(s) V^T`` built from known
orthonormal ``U``, ``V`` and a spectrum with a clear gap after ``r``, so the
top-``r`` singular subspace is known exactly and is well conditioned. Bases
are compared through their orthogonal projectors ``Q Q^T`` (sign- and
rotation-invariant), never against the library's own output.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_optax as lro
from lowrank_optax import projectors

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
METHODS = ("svd", "eigh", "randomized", "subspace_iteration")


def _orthogonal(rng, n, k):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q[:, :k]


def _gapped_matrix(rng, d, n, r, top=(10.0, 5.0), tail=(0.1, 0.01)):
  """``G = U diag(s) V^T`` (float64) with ``s_r / s_{r+1} = top[1] / tail[0]``.

  Returns ``G, U_r, V_r`` (the exact top-``r`` left / right singular vectors).
  """
  k = min(d, n)
  u = _orthogonal(rng, d, k)
  v = _orthogonal(rng, n, k)
  s = np.concatenate([np.linspace(*top, r), np.linspace(*tail, k - r)])
  return (u * s) @ v.T, u[:, :r], v[:, :r]


def _proj(q):
  q = np.asarray(q, np.float64)
  return q @ np.swapaxes(q, -1, -2)


def _orth_err(q):
  q = np.asarray(q, np.float64)
  r = q.shape[-1]
  return np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(r)).max()


# ---------------------------------------------------------------------------
# orthonormalize
# ---------------------------------------------------------------------------


_orthonormalize = jax.jit(projectors.orthonormalize)


@pytest.mark.parametrize("kind", ["column_scaled", "singular_spread"])
def test_orthonormalize_ill_conditioned(kind):
  rng = np.random.default_rng(0)
  d, r = 64, 8
  scales = np.logspace(0, -4, r)  # 1 .. 1e-4
  if kind == "column_scaled":
    y = rng.standard_normal((d, r)) * scales
  else:  # condition number 1e4 that no column scaling removes
    y = (_orthogonal(rng, d, r) * scales) @ _orthogonal(rng, r, r).T
  y32 = np.asarray(np.float32(y), np.float64)  # what the library actually sees
  q = np.asarray(_orthonormalize(jnp.asarray(y32, jnp.float32)), np.float64)
  assert q.shape == (d, r)
  assert np.all(np.isfinite(q))
  # Q^T Q = I to the G1 tolerance.
  assert _orth_err(q) < 1e-5
  # span(Q) = span(Y): every (normalised) column of Y lies in span(Q) ...
  yn = y32 / np.linalg.norm(y32, axis=0)
  assert np.abs(yn - q @ (q.T @ yn)).max() < 1e-5
  # ... and the projectors agree. The span of a float32 matrix of condition
  # number kappa = 1e4 is only determined to ~eps32 * kappa ~ 1e-3; measured
  # 1.2e-5 (singular_spread) and 8e-8 (column_scaled).
  p_ref = y32 @ np.linalg.pinv(y32)
  assert np.abs(q @ q.T - p_ref).max() < 1e-4


def test_orthonormalize_batched():
  rng = np.random.default_rng(1)
  y = rng.standard_normal((3, 2, 20, 5)) * np.logspace(0, -3, 5)
  q = np.asarray(_orthonormalize(jnp.asarray(y, jnp.float32)), np.float64)
  assert q.shape == y.shape
  assert _orth_err(q) < 1e-5
  for idx in np.ndindex(3, 2):
    p_ref = y[idx] @ np.linalg.pinv(y[idx])
    np.testing.assert_allclose(_proj(q[idx]), p_ref, atol=1e-4)


# ---------------------------------------------------------------------------
# Basis methods on a matrix with a spectral gap
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _run_method(method, a, rank, seed=0):
  key = jax.random.key(seed)
  if method == "svd":
    return projectors.svd_basis(a, rank)
  if method == "eigh":
    return projectors.eigh_basis(a, rank)
  if method == "randomized":
    return projectors.randomized_basis(a, rank, key)
  # Cold start from a fixed Gaussian block; with s_{r+1}/s_r = 0.02 each
  # iteration contracts the error by 4e-4, so 3 iterations reach float32.
  start = np.random.default_rng(seed).standard_normal(a.shape[:-1] + (rank,))
  return projectors.subspace_iteration_basis(
      a, jnp.asarray(start, jnp.float32), iters=3)


@pytest.mark.parametrize("method", METHODS)
def test_basis_matches_top_singular_subspace(method):
  # d < n here; the batched test below covers d > n.
  rng = np.random.default_rng(2)
  d, n = 40, 48
  r = 6
  g, u_r, _ = _gapped_matrix(rng, d, n, r)
  q = np.asarray(_run_method(method, jnp.asarray(g, jnp.float32), r),
                 np.float64)
  assert q.shape == (d, r)
  assert _orth_err(q) < 1e-5
  # Gap s_r / s_{r+1} = 50: the float32 subspace error is ~eps32 * ||G|| /
  # gap ~ 1e-7 (measured <= 2e-7 for all methods).
  assert np.abs(_proj(q) - _proj(u_r)).max() < 1e-5


_subspace_iteration_1 = jax.jit(
    functools.partial(projectors.subspace_iteration_basis, iters=1))


def test_subspace_iteration_warm_start_stays():
  rng = np.random.default_rng(3)
  g, u_r, _ = _gapped_matrix(rng, 40, 48, 6)
  a = jnp.asarray(g, jnp.float32)
  q = np.asarray(_subspace_iteration_1(a, jnp.asarray(u_r, jnp.float32)),
                 np.float64)
  # G G^T U_r = U_r diag(s^2) and Cholesky-QR is triangular, so each column
  # stays on its own singular vector (not only the same span).
  np.testing.assert_allclose(q, u_r, atol=1e-5)
  # A different orthonormal basis of the same span also stays in the span.
  rot = _orthogonal(rng, 6, 6)
  q2 = np.asarray(_subspace_iteration_1(a, jnp.asarray(u_r @ rot, jnp.float32)),
                  np.float64)
  assert _orth_err(q2) < 1e-5
  assert np.abs(_proj(q2) - _proj(u_r)).max() < 1e-5


def test_subspace_iteration_improves_a_poor_start():
  rng = np.random.default_rng(4)
  g, u_r, _ = _gapped_matrix(rng, 40, 48, 6)
  a = jnp.asarray(g, jnp.float32)
  start = u_r + 0.3 * rng.standard_normal(u_r.shape)  # far from U_r
  err0 = np.abs(_proj(np.linalg.qr(start)[0]) - _proj(u_r)).max()
  q = _subspace_iteration_1(a, jnp.asarray(start, jnp.float32))
  err1 = np.abs(_proj(q) - _proj(u_r)).max()
  assert err0 > 0.1
  assert err1 < 1e-3  # one step contracts by (s_{r+1}/s_r)^2 = 4e-4


@pytest.mark.parametrize("method", METHODS)
def test_batched_input_gets_one_basis_per_element(method):
  rng = np.random.default_rng(5)
  batch, d, n, r = 3, 32, 24, 4
  mats, refs = [], []
  for _ in range(batch):
    g, u_r, _ = _gapped_matrix(rng, d, n, r)
    mats.append(g)
    refs.append(u_r)
  a = jnp.asarray(np.stack(mats), jnp.float32)
  q = np.asarray(_run_method(method, a, r), np.float64)
  assert q.shape == (batch, d, r)
  for b in range(batch):
    assert _orth_err(q[b]) < 1e-5
    assert np.abs(_proj(q[b]) - _proj(refs[b])).max() < 1e-5
  # The bases really differ between elements (independent random U's).
  assert np.abs(_proj(q[0]) - _proj(q[1])).max() > 0.1


# ---------------------------------------------------------------------------
# The projector stored in lro.galore's state (G1, side semantics)
# ---------------------------------------------------------------------------

# Flax layout: a 2-D leaf is (in, out) = (M, N). 'right' reduces M (inputs,
# PyTorch's G B^T): its basis spans the top-r LEFT singular vectors of the
# (M, N) gradient; 'left' reduces N: the top-r RIGHT singular vectors; 'std'
# reduces the smaller dimension; 'full' keeps both. Under 'std' a wide leaf
# (M < N) is reduced on M and a tall one on N, so one jitted update covers
# both one-sided code paths; 'left' / 'right' are checked where they differ
# from 'std' (reducing the larger dimension).
SHAPES = {"wide": (24, 40), "tall": (40, 24)}
RANK = 4
GAP = 3
# proj_type -> {projected leaf: sides carrying a basis ("rows" = M, "cols" = N)}
EXPECTED_SIDES = {
    "std": {"tall": ("cols",), "wide": ("rows",)},
    "full": {"wide": ("rows", "cols")},
    "left": {"wide": ("cols",)},
    "right": {"tall": ("rows",)},
}


@functools.lru_cache(maxsize=None)
def _galore(method, proj_type):
  tx = lro.galore(1e-2, rank=RANK, update_proj_gap=GAP, proj_type=proj_type,
                  projector=method, scale=1.0)
  return tx, jax.jit(tx.update)


def _params(proj_type):
  p = {name: jnp.zeros(SHAPES[name], jnp.float32)
       for name in EXPECTED_SIDES[proj_type]}
  p["b"] = jnp.zeros((7,), jnp.float32)  # 1-D: passes through
  return p


def _grads(proj_type, mats):
  g = {name: jnp.asarray(mats[name], jnp.float32)
       for name in EXPECTED_SIDES[proj_type]}
  g["b"] = jnp.ones((7,), jnp.float32)
  return g


def _random_grads(rng, proj_type):
  return _grads(proj_type, {name: rng.standard_normal(SHAPES[name])
                            for name in EXPECTED_SIDES[proj_type]})


def _bases(state, proj_type):
  """{leaf name: {side: basis}} from the galore state."""
  sub = lro.subspace_state(state)
  names = sorted(_params(proj_type))  # jax.tree.leaves order of a dict
  out = {}
  for name, p in zip(names, sub.projector):
    if name == "b":
      assert not jax.tree.leaves(p)  # pass-through: no projector state
      continue
    if isinstance(p, lro.TwoSidedBasisState):
      out[name] = {"rows": p.row_basis, "cols": p.col_basis}
    else:
      (side,) = EXPECTED_SIDES[proj_type][name]
      out[name] = {side: p.basis}
  assert set(out) == set(EXPECTED_SIDES[proj_type])
  return out


def _run_steps(update, state, params, grads_list):
  for g in grads_list:
    _, state = update(g, state, params)
  return state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("proj_type", ["std", "full", "left", "right"])
def test_g1_state_basis_orthonormal_and_correct_side(method, proj_type):
  if proj_type in ("left", "right") and method != "svd":
    pytest.skip("forced sides run the same per-side code as 'std' (covered "
                "for every method there); checked with svd only to save "
                "compile time")
  rng = np.random.default_rng(6)
  mats, refs = {}, {}
  for name in EXPECTED_SIDES[proj_type]:
    g, u_r, v_r = _gapped_matrix(rng, *SHAPES[name], RANK)
    mats[name] = g
    refs[name] = {"rows": u_r, "cols": v_r}  # left / right singular vectors
  tx, update = _galore(method, proj_type)
  params = _params(proj_type)
  state = tx.init(params)
  _, state = update(_grads(proj_type, mats), state, params)
  for name, by_side in _bases(state, proj_type).items():
    assert set(by_side) == set(EXPECTED_SIDES[proj_type][name])
    for side, q in by_side.items():
      expected = refs[name][side]
      q = np.asarray(q, np.float64)
      assert q.shape == (expected.shape[0], RANK)
      assert _orth_err(q) < 1e-5  # G1
      assert np.abs(_proj(q) - _proj(expected)).max() < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("bad", ["nan_all", "nan_one", "inf_one"])
def test_non_finite_gradient_at_refresh_keeps_basis(method, proj_type, bad):
  rng = np.random.default_rng(7)
  tx, update = _galore(method, proj_type)
  params = _params(proj_type)
  state = tx.init(params)
  state = _run_steps(update, state, params,
                     [_random_grads(rng, proj_type) for _ in range(GAP)])
  assert int(lro.subspace_state(state).count) == GAP  # the next step (count 3) refreshes
  before = jax.tree.map(np.asarray, _bases(state, proj_type))

  bad_mats = {}
  for name in EXPECTED_SIDES[proj_type]:
    g = rng.standard_normal(SHAPES[name])
    if bad == "nan_all":
      g[:] = np.nan
    elif bad == "nan_one":
      g[1, 2] = np.nan
    else:
      g[1, 2] = -np.inf
    bad_mats[name] = g
  _, state_bad = update(_grads(proj_type, bad_mats), state, params)
  after = jax.tree.map(np.asarray, _bases(state_bad, proj_type))
  for name in before:
    for side in before[name]:
      assert np.all(np.isfinite(after[name][side]))
      np.testing.assert_array_equal(after[name][side], before[name][side])

  # Control: a finite gradient at the same step does move every basis, so the
  # equality above is not just "the refresh never ran".
  _, state_ok = update(_random_grads(rng, proj_type), state, params)
  moved = jax.tree.map(np.asarray, _bases(state_ok, proj_type))
  for name in before:
    for side in before[name]:
      assert np.abs(_proj(moved[name][side])
                    - _proj(before[name][side])).max() > 1e-2


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def _check_orthonormal(bases):
  for by_side in bases.values():
    for q in by_side.values():
      assert _orth_err(q) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_zero_gradient_at_refresh_is_finite(method, proj_type):
  rng = np.random.default_rng(8)
  tx, update = _galore(method, proj_type)
  params = _params(proj_type)
  zero = _grads(proj_type, {name: np.zeros(SHAPES[name])
                            for name in EXPECTED_SIDES[proj_type]})

  # Zero gradient at the very first step (cold refresh).
  state = tx.init(params)
  u, state0 = update(zero, state, params)
  assert _all_finite(u) and _all_finite(state0)
  for name in EXPECTED_SIDES[proj_type]:
    np.testing.assert_array_equal(np.asarray(u[name]), 0.0)
  _check_orthonormal(_bases(state0, proj_type))

  # Zero gradient at a later refresh (count == GAP), after real steps.
  state = _run_steps(update, state, params,
                     [_random_grads(rng, proj_type) for _ in range(GAP)])
  u, state1 = update(zero, state, params)
  assert _all_finite(u) and _all_finite(state1)
  _check_orthonormal(_bases(state1, proj_type))
  # And training goes on normally afterwards.
  u, state2 = update(_random_grads(rng, proj_type), state1, params)
  assert _all_finite(u) and _all_finite(state2)


# ---------------------------------------------------------------------------
# subspace_iteration's start lives in the state (no RNG in the update)
# ---------------------------------------------------------------------------


def _start_bases(seed):
  params = {"a": jnp.zeros((24, 40)), "b": jnp.zeros((24, 40)),
            "stack": jnp.zeros((3, 40, 24))}
  tx = lro.galore(1e-2, rank=RANK, seed=seed)  # default: subspace_iteration
  state = tx.init(params)
  return [np.asarray(p.basis, np.float64)
          for p in lro.subspace_state(state).projector]


def test_subspace_iteration_start_is_a_seeded_orthonormal_block():
  a, b, stack = _start_bases(0)
  for q in (a, b, *stack):
    assert q.shape[-1] == RANK
    assert _orth_err(q) < 1e-5
  # Distinct starts per leaf and per batch element, reproducible per seed.
  assert np.abs(_proj(a) - _proj(b)).max() > 0.1
  assert np.abs(_proj(stack[0]) - _proj(stack[1])).max() > 0.1
  again = _start_bases(0)
  np.testing.assert_array_equal(a, again[0])
  assert np.abs(_proj(a) - _proj(_start_bases(1)[0])).max() > 0.1


def test_update_generates_no_random_numbers():
  """The start is made at init: the jitted update has no RNG ops to compile."""
  params = {"w": jnp.zeros((24, 40)), "v": jnp.zeros((40, 24))}
  for projector in ("subspace_iteration", "svd", "eigh"):
    tx = lro.galore(1e-2, rank=RANK, projector=projector)
    state = tx.init(params)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, state, params))
    assert "random_bits" not in jaxpr and "threefry" not in jaxpr, projector
  # The randomized range finder needs its sketch (the check can fail).
  tx = lro.galore(1e-2, rank=RANK, projector="randomized")
  jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
  assert "random_bits" in jaxpr or "threefry" in jaxpr
