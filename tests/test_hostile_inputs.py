"""Nothing lost to bad input: non-finite and zero gradients, degenerate shapes
and ranks, empty trees and integer leaves (DESIGN.md, rules of the house:
"a non-finite gradient keeps the previous basis instead of poisoning it;
degenerate input (zero gradient, rank > dims) is handled and documented").

The behaviour under test is the one documented in ``lro.subspace`` (per-leaf
guard of the bare transform: a leaf whose gradient is not finite keeps its
state; dtype errors), ``lro.skip_nonfinite_steps`` / ``lro.galore``
(``skip_nonfinite=True``: that leaf also gets a zero update while the others
step; ``"step"``: the whole step changes nothing) and ``lro.plan_leaves``
(rank >= dims: pass-through or clamped, with a PolicyWarning). Expected
values are never taken from
a library run of the same input: a skipped / guarded step is compared with
the same compiled update run on the finite trajectory (bitwise, so "as if
the step had not happened" is exact), zero gradients with the closed form
(zero moments give a zero step), pass-through leaves with the float64
closed form of the first HF-AdamW step (ALGORITHMS.md 0.2 A), bases with
orthonormality (G1) and a float64 numpy SVD.

Compilation dominates, so each optimizer is compiled once per projector
(``functools.lru_cache``) and every scenario replays the cached trajectory.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from _state import with_sub_state

RANK, GAP, LR = 2, 2, 1e-2  # refreshes at counts 0, 2, 4
PROJECTORS = lro.projectors.names()
#: Projectors that do not read the gradient: they draw from the refresh key
#: and redraw as scheduled whatever the gradient. Every other projector
#: (any registered later too) keeps its state on a non-finite gradient.
DRAWS_FROM_KEY = ("gaussian", "orthogonal", "randperm", "columns", "rows",
                  "randk")
#: Projectors whose low-rank R reads only selected coordinates of G.
COORDINATES = ("randperm", "columns", "rows", "randk")
FORCED_SIDE = {"columns": "right", "rows": "left"}

# One tree with the degenerate projected shapes: a normal matrix (inputs
# reduced), a rank clamped to the whole reduced dimension (outputs
# reduced), a stack of (1, 8) matrices (a 1-element matrix axis), and a 1-D
# pass-through leaf. (The mirror image (8, 1) is the same code path.)
SHAPES = {"w": (6, 10), "big": (6, 4), "stk": (3, 1, 8), "b": (5,)}
RANKS = {"w": RANK, "big": 9, "stk": 3}
NAMES = sorted(SHAPES)  # jax.tree.leaves order of a dict
STEPS = 5


def _grads(step, shapes=SHAPES):
  rng = np.random.default_rng(100 + step)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in shapes.items()}


def _params(shapes=SHAPES):
  return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


def _corrupt(g, bad, leaves=("w",)):
  """``g`` with non-finite values: one NaN entry, a whole leaf of -inf, or
  every leaf NaN (``leaves`` is ignored for "nan_all")."""
  g = dict(g)
  if bad == "nan_all":
    return {k: jnp.full_like(v, jnp.nan) for k, v in g.items()}
  for k in leaves:
    if bad == "nan_entry":
      g[k] = g[k].at[(1,) * g[k].ndim].set(jnp.nan)
    else:  # "inf_leaf"
      g[k] = jnp.full_like(g[k], -jnp.inf)
  return g


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def _leaf_state(sub, name, names=NAMES):
  i = names.index(name)
  return sub.projector[i], sub.inner[i], sub.residual[i]


def _check_projector_state(pstate):
  """G1 for stored bases; valid distinct ascending indices for index states
  (other states, e.g. quantised bases or keys, only need to be finite)."""
  if isinstance(pstate, (lro.projectors.BasisState,
                         lro.projectors.TwoSidedBasisState)):
    for q in pstate:
      q = np.asarray(q, np.float64)
      eye = np.eye(q.shape[-1])
      assert np.abs(np.swapaxes(q, -1, -2) @ q - eye).max() < 1e-5
  if isinstance(pstate, (lro.IndexState, lro.TwoSidedIndexState,
                         lro.projectors.CoordinateState,
                         lro.projectors.TwoSidedCoordinateState)):
    for x in pstate:
      x = np.asarray(x)
      assert np.all(x >= 0) and np.all(np.diff(x, axis=-1) > 0)


# ---------------------------------------------------------------------------
# The recipe (skip_nonfinite=True) on every registered projector
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _recipe(name, skip=True):
  tx = lro.galore(LR, rank=RANKS, update_proj_gap=GAP, projector=name,
                  proj_type=FORCED_SIDE.get(name, "std"), scale=1.0,
                  skip_nonfinite=skip)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = jax.jit(tx.init)(_params())
  update = jax.jit(tx.update)
  states, updates = [state], []
  for k in range(STEPS):
    u, state = update(_grads(k), state, _params())
    states.append(state)
    updates.append(u)
  notes = [str(w.message) for w in caught if w.category is lro.PolicyWarning]
  return update, states, updates, notes, tx


def _counters(state):
  """The non-finite counters of a recipe's state (``notfinite_count``,
  ``total_notfinite``), wherever the guard keeps them."""
  found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: hasattr(x, "total_notfinite"))
           if hasattr(x, "total_notfinite")]
  assert len(found) == 1
  return int(found[0].notfinite_count), int(found[0].total_notfinite)


def _reduced_size(shape, proj_type):
  """The size of the axis the side rule reduces (ALGORITHMS.md 0.1, Flax
  layout: std reduces the smaller of (in, out), inputs on a tie)."""
  rows, cols = shape[-2:]
  if proj_type == "right" or (proj_type == "std" and rows <= cols):
    return rows
  return cols


@pytest.mark.parametrize("name", PROJECTORS)
def test_recipe_warns_about_clamped_ranks_and_runs_degenerate_shapes(name):
  _, states, updates, notes, tx = _recipe(name)
  proj_type = FORCED_SIDE.get(name, "std")
  # dict ranks at least as large as the reduced dimension are clamped to
  # it, and init says so, naming the leaf (plan_leaves' documented rule).
  plans = dict(zip(NAMES, lro.plan_leaves(_params(), RANKS, proj_type)))
  assert plans["b"] is None
  requested = {"w": RANK, "big": 9, "stk": 3}
  for leaf, r in requested.items():
    d = _reduced_size(SHAPES[leaf], proj_type)
    assert plans[leaf].rank == min(r, d)
    warned = any(f"'{leaf}'" in n and "clamped" in n for n in notes)
    assert warned == (r >= d), (leaf, notes)
  # Every step (refreshes at 0, 2, 4) is finite in every leaf, with finite
  # state of unchanged structure, shapes and dtypes (the abstract state's,
  # whose bytes the memory report counts), and the stored bases stay
  # orthonormal (G1).
  shapes_dtypes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  abstract = jax.eval_shape(tx.init, _params())
  assert jax.tree.structure(abstract) == jax.tree.structure(states[0])
  assert lro.memory_report(tx, _params()).state_bytes == sum(
      x.nbytes for x in jax.tree.leaves(states[0]))
  for u in updates:
    assert _all_finite(u)
    assert shapes_dtypes(u) == shapes_dtypes(_params())
  for s in states:
    assert _all_finite(s)
    assert shapes_dtypes(s) == shapes_dtypes(abstract)
    sub = lro.subspace_state(s)
    for leaf in NAMES:
      _check_projector_state(_leaf_state(sub, leaf)[0])
  # The projected leaves really moved (the degenerate ones too).
  for leaf in NAMES:
    assert float(jnp.abs(updates[-1][leaf]).max()) > 0, leaf


@pytest.mark.parametrize("name", PROJECTORS)
def test_recipe_zero_gradients(name):
  update, states, _, _, _ = _recipe(name)
  zero = jax.tree.map(jnp.zeros_like, _grads(0))
  # At the very first step (the first refresh, from zero moments): the HF
  # Adam step of a zero gradient is exactly zero, in every leaf.
  u, s = update(zero, states[0], _params())
  for leaf in NAMES:
    np.testing.assert_array_equal(np.asarray(u[leaf]), 0.0)
  assert _all_finite(s)
  sub = lro.subspace_state(s)
  for leaf in NAMES:
    _check_projector_state(_leaf_state(sub, leaf)[0])
  # Training goes on from there.
  u, s = update(_grads(1), s, _params())
  assert _all_finite(u) and _all_finite(s)
  # Later: a zero gradient at a refresh (count 2) and at a normal step.
  s = states[2]
  for _ in range(2):
    u, s = update(zero, s, _params())
    assert _all_finite(u) and _all_finite(s)
    sub = lro.subspace_state(s)
    for leaf in NAMES:
      _check_projector_state(_leaf_state(sub, leaf)[0])
  u, s = update(_grads(4), s, _params())
  assert _all_finite(u) and _all_finite(s)


@pytest.mark.parametrize("bad", ["nan_entry", "inf_leaf", "nan_all"])
@pytest.mark.parametrize("at", [0, 2, 3], ids=["first", "refresh", "normal"])
@pytest.mark.parametrize("name", PROJECTORS)
def test_recipe_nonfinite_leaf_loses_nothing(name, at, bad):
  """skip_nonfinite=True (the default): per leaf, state kept, zero update."""
  update, states, updates, _, _ = _recipe(name)
  before, good = states[at], states[at + 1]
  g_bad = _corrupt(_grads(at), bad)
  u, s = update(g_bad, before, _params())
  sub, sub0, sub1 = (lro.subspace_state(x) for x in (s, before, good))
  assert _all_finite(s) and _all_finite(u)
  assert int(sub.count) == at + 1  # the step happened for the other leaves
  bad_leaves = NAMES if bad == "nan_all" else ["w"]
  for leaf in NAMES:
    if leaf not in bad_leaves:  # exactly the finite trajectory's step
      np.testing.assert_array_equal(np.asarray(u[leaf]),
                                    np.asarray(updates[at][leaf]))
      _leaves_equal(_leaf_state(sub, leaf), _leaf_state(sub1, leaf))
      continue
    proj, inner, res = _leaf_state(sub, leaf)
    if bad == "nan_entry" and name in COORDINATES:
      # R reads only the selected coordinates: either the NaN is among them
      # (the leaf is skipped) or the leaf steps as usual from a finite R.
      skipped = bool(np.all(np.asarray(u[leaf]) == 0))
      ref = _leaf_state(sub0 if skipped else sub1, leaf)
      _leaves_equal(inner, ref[1])
      if not skipped:
        np.testing.assert_array_equal(np.asarray(u[leaf]),
                                      np.asarray(updates[at][leaf]))
      continue
    np.testing.assert_array_equal(np.asarray(u[leaf]), 0.0)
    proj0, inner0, res0 = _leaf_state(sub0, leaf)
    _leaves_equal(inner, inner0)  # moments and Adam count as before
    _leaves_equal(res, res0)
    # The basis is kept by projectors that read G; the random ones redraw
    # as scheduled.
    _leaves_equal(proj, proj0 if name not in DRAWS_FROM_KEY
                  else _leaf_state(sub1, leaf)[0])
  # Counted when a leaf's update was not finite (a NaN outside the
  # coordinates a coordinate projector reads never reaches the update).
  count0, total0 = _counters(before)
  bumped = not (bad == "nan_entry" and name in COORDINATES and not skipped)
  assert _counters(s) == ((count0 + 1, total0 + 1) if bumped
                          else (0, total0))
  # The next finite step is finite everywhere, and (for a whole bad step)
  # equals the step from the kept state with only the count moved on.
  g = _grads(at + 1)
  u1, s1 = update(g, s, _params())
  assert _all_finite(u1) and _all_finite(s1)
  assert _counters(s1)[0] == 0
  if bad == "nan_all":
    ref = with_sub_state(before, sub0._replace(count=sub.count,
                                               projector=sub.projector))
    u2, s2 = update(g, ref, _params())
    _leaves_equal(u1, u2)
    _leaves_equal(lro.subspace_state(s1), lro.subspace_state(s2))


@pytest.mark.parametrize("bad", ["nan_entry", "nan_all"])
@pytest.mark.parametrize("at", [0, 2, 3], ids=["first", "refresh", "normal"])
def test_recipe_skip_whole_step_changes_nothing(at, bad):
  """skip_nonfinite="step" (optax.apply_if_finite): the step never happened."""
  update, states, updates, _, _ = _recipe("svd", "step")
  before = states[at]
  u, s = update(_corrupt(_grads(at), bad), before, _params())
  for leaf in NAMES:
    np.testing.assert_array_equal(np.asarray(u[leaf]), 0.0)
  _leaves_equal(lro.subspace_state(s), lro.subspace_state(before))
  count0, total0 = _counters(before)
  assert _counters(s) == (count0 + 1, total0 + 1)
  # The next finite step is exactly the step the bad one displaced.
  u, s = update(_grads(at), s, _params())
  _leaves_equal(u, updates[at])
  _leaves_equal(lro.subspace_state(s), lro.subspace_state(states[at + 1]))
  assert _counters(s)[0] == 0


# ---------------------------------------------------------------------------
# The bare chain: per-leaf guard of lro.subspace
# ---------------------------------------------------------------------------

BARE_SHAPES = {"w": (6, 10), "v": (10, 6), "b": (5,)}
BARE_NAMES = sorted(BARE_SHAPES)


@functools.lru_cache(maxsize=None)
def _bare(name):
  tx = lro.chain(
      lro.galore_project(RANK, update_proj_gap=GAP, projector=name,
                         proj_type=FORCED_SIDE.get(name, "std")),
      optax.scale_by_adam(), optax.scale_by_learning_rate(LR))
  params = _params(BARE_SHAPES)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  states, updates = [state], []
  for k in range(STEPS):
    u, state = update(_grads(k, BARE_SHAPES), state, params)
    states.append(state)
    updates.append(u)
  return update, states, updates


# The default projector of lro.galore_project, the reference SVD, a
# key-only Gaussian (does not read G) and random coordinates (reads only
# some of G); the recipe tests above run the same guard on every projector.
BARE_PROJECTORS = ("subspace_iteration", "svd", "gaussian", "randperm")


@pytest.mark.parametrize("bad", ["nan_entry", "inf_leaf"])
@pytest.mark.parametrize("at", [0, 2, 3], ids=["first", "refresh", "normal"])
@pytest.mark.parametrize("name", BARE_PROJECTORS)
def test_bare_chain_keeps_a_leafs_state_when_its_gradient_is_not_finite(
    name, at, bad):
  update, states, updates = _bare(name)
  params = _params(BARE_SHAPES)
  before, good = states[at], states[at + 1]
  u, s = update(_corrupt(_grads(at, BARE_SHAPES), bad), before, params)
  sub, sub0, sub1 = (lro.subspace_state(x) for x in (s, before, good))
  assert int(sub.count) == at + 1  # the wrapper's count moves on
  assert _all_finite(s)
  # Other leaves are not affected: their updates and states are those of
  # the finite step.
  for leaf in ("v", "b"):
    np.testing.assert_array_equal(np.asarray(u[leaf]),
                                  np.asarray(updates[at][leaf]))
    _leaves_equal(_leaf_state(sub, leaf, BARE_NAMES),
                  _leaf_state(sub1, leaf, BARE_NAMES))
  proj, inner, res = _leaf_state(sub, "w", BARE_NAMES)
  proj0, inner0, res0 = _leaf_state(sub0, "w", BARE_NAMES)
  if bad == "nan_entry" and name in COORDINATES:
    # R reads only the selected coordinates: if the NaN is among them the
    # leaf keeps its moments and its update is visibly non-finite, else it
    # steps as usual from a finite R.
    w = np.asarray(u["w"])
    if np.all(np.isfinite(w)):
      np.testing.assert_array_equal(w, np.asarray(updates[at]["w"]))
      _leaves_equal(inner, _leaf_state(sub1, "w", BARE_NAMES)[1])
    else:
      _leaves_equal(inner, inner0)
  else:
    # The bad leaf: moments and counter exactly as before the step ...
    _leaves_equal(inner, inner0)
    _leaves_equal(res, res0)
    # ... its basis kept (projectors that read G) or redrawn as scheduled
    # (random projectors do not read G) ...
    expected = proj0 if name not in DRAWS_FROM_KEY else _leaf_state(
        sub1, "w", BARE_NAMES)[0]
    _leaves_equal(proj, expected)
    # ... and its update visibly non-finite (as any optax transform's).
    assert not np.all(np.isfinite(np.asarray(u["w"])))
  # The next finite step is finite everywhere.
  u, s = update(_grads(at + 1, BARE_SHAPES), s, params)
  assert _all_finite(u) and _all_finite(s)


@pytest.mark.parametrize("at", [0, 2, 3], ids=["first", "refresh", "normal"])
@pytest.mark.parametrize("name", BARE_PROJECTORS)
def test_bare_chain_all_leaves_nan_keeps_everything_but_the_count(name, at):
  update, states, _ = _bare(name)
  params = _params(BARE_SHAPES)
  before = states[at]
  u, s = update(_corrupt(_grads(at, BARE_SHAPES), "nan_all"), before, params)
  assert _all_finite(s)
  for leaf in BARE_NAMES:
    assert not np.all(np.isfinite(np.asarray(u[leaf])))
  sub, sub0 = lro.subspace_state(s), lro.subspace_state(before)
  assert int(sub.count) == at + 1
  _leaves_equal(sub.inner, sub0.inner)
  _leaves_equal(sub.residual, sub0.residual)
  if name not in DRAWS_FROM_KEY:
    _leaves_equal(sub.projector, sub0.projector)
  # The next finite step equals the step from the kept state with only the
  # count moved on: the bad step is, for the state, as if it had not
  # happened.
  g = _grads(at + 1, BARE_SHAPES)
  u1, s1 = update(g, s, params)
  ref_state = with_sub_state(
      s, sub0._replace(count=sub.count, projector=sub.projector))
  u2, s2 = update(g, ref_state, params)
  _leaves_equal(u1, u2)
  _leaves_equal(s1, s2)
  assert _all_finite(u1)


def test_first_gradient_nan_keeps_the_start_until_the_next_refresh():
  # Documented in lro.subspace: a refresh on a non-finite gradient keeps
  # the previous basis, which at count 0 is the projector's start.
  update, states, _ = _bare("svd")
  params = _params(BARE_SHAPES)
  _, s = update(_corrupt(_grads(0, BARE_SHAPES), "nan_all"), states[0], params)
  start = lro.subspace_state(states[0]).projector
  _leaves_equal(lro.subspace_state(s).projector, start)
  _, s = update(_grads(1, BARE_SHAPES), s, params)  # count 1: no refresh
  _leaves_equal(lro.subspace_state(s).projector, start)
  g = _grads(2, BARE_SHAPES)
  _, s = update(g, s, params)  # count 2 refreshes from G: top-2 subspace
  q = np.asarray(lro.subspace_state(s).projector[BARE_NAMES.index("w")].basis,
                 np.float64)
  u_ref = np.linalg.svd(np.asarray(g["w"], np.float64))[0][:, :RANK]
  assert np.abs(q @ q.T - u_ref @ u_ref.T).max() < 1e-4


# ---------------------------------------------------------------------------
# Ranks at or above the matrix dimensions
# ---------------------------------------------------------------------------


def _hf_adam_first_step(g, lr=LR, b1=0.9, b2=0.999, eps=1e-6):
  """ALGORITHMS.md 0.2 (A) at t = 1, float64."""
  g = np.asarray(g, np.float64)
  n = (1 - b1) * g / (np.sqrt((1 - b2) * g * g) + eps)
  return -lr * np.sqrt(1 - b2) / (1 - b1) * n


def test_int_rank_at_or_above_dims_passes_through_at_full_rank():
  shapes = {"sq": (4, 4), "wide": (3, 8), "row": (1, 8), "col": (8, 1),
            "stk": (4, 1, 8)}
  params = _params(shapes)
  tx = lro.galore(LR, rank=4)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
  notes = [str(w.message) for w in caught
           if w.category is lro.PolicyWarning]
  # Nothing is projected: init says so (and names the stacked sliver leaf).
  assert any("projects none" in n for n in notes), notes
  assert any("'stk'" in n and "full rank" in n for n in notes), notes
  sub = lro.subspace_state(state)
  names = sorted(shapes)
  for i, k in enumerate(names):
    assert isinstance(sub.projector[i], optax.MaskedNode)
    assert sub.inner[i][0].mu.shape == shapes[k]  # full-rank Adam state
  g = _grads(0, shapes)
  u, _ = jax.jit(tx.update)(g, state, params)
  for k in names:  # plain HF-AdamW, unscaled
    np.testing.assert_allclose(np.asarray(u[k], np.float64),
                               _hf_adam_first_step(g[k]), rtol=1e-5)


@pytest.mark.parametrize("name", ["subspace_iteration", "svd", "dct",
                                  "randperm"])
def test_one_element_axis_projected_by_a_dict_rank_is_adamw(name):
  # (1, 8) reduces its 1-element input axis, (8, 1) its 1-element output
  # axis: the dict rank 3 is clamped to 1 (with a PolicyWarning) and the
  # basis is the 1 x 1 matrix +-1, a full-rank orthogonal projector. The
  # first HF-Adam step is odd in R, so the update is plain HF-AdamW's
  # (ALGORITHMS.md G4 with scale 1), whatever the sign.
  shapes = {"row": (1, 8), "col": (8, 1)}
  params = _params(shapes)
  tx = lro.galore(LR, rank={"row|col": 3}, projector=name, scale=1.0)
  with pytest.warns(lro.PolicyWarning, match="clamped"):
    state = tx.init(params)
  g = _grads(0, shapes)
  u, state = jax.jit(tx.update)(g, state, params)
  sub = lro.subspace_state(state)
  for i, k in enumerate(sorted(shapes)):
    assert not isinstance(sub.projector[i], optax.MaskedNode)  # projected
    np.testing.assert_allclose(np.asarray(u[k], np.float64),
                               _hf_adam_first_step(g[k]), rtol=1e-5)


@pytest.mark.parametrize("name", ["svd", "randomized", "subspace_iteration"])
def test_rank_above_the_smaller_dim_on_a_forced_side(name):
  # proj_type="left" reduces the output axis N = 8 of a (4, 8) matrix; the
  # dict rank 6 is clamped to N but exceeds min(M, N) = 4: G's row space
  # has only 4 directions. The basis is completed to 6 orthonormal columns
  # that contain G's whole row space.
  params = {"w": jnp.zeros((4, 8))}
  tx = lro.galore(LR, rank={"w": 6}, projector=name, proj_type="left",
                  scale=1.0)
  state = tx.init(params)
  g = _grads(0, {"w": (4, 8)})
  u, state = jax.jit(tx.update)(g, state, params)
  q = np.asarray(lro.subspace_state(state).projector[0].basis, np.float64)
  assert q.shape == (8, 6)
  assert np.abs(q.T @ q - np.eye(6)).max() < 1e-5
  gw = np.asarray(g["w"], np.float64)
  assert np.abs(gw - gw @ q @ q.T).max() < 1e-4 * np.abs(gw).max()
  assert _all_finite(u)


# ---------------------------------------------------------------------------
# Empty trees, None leaves, 1-D only
# ---------------------------------------------------------------------------


def _both(rank=RANK):
  return {"recipe": lro.galore(LR, rank=rank, projector="svd"),
          "bare": lro.chain(lro.galore_project(rank, projector="svd"),
                            optax.scale_by_adam(),
                            optax.scale_by_learning_rate(LR))}


@pytest.mark.parametrize("kind", ["recipe", "bare"])
@pytest.mark.parametrize("tree", [{}, [], {"a": None}, {"a": None, "b": []}],
                         ids=["dict", "list", "none", "nested_empty"])
def test_empty_trees(kind, tree):
  tx = _both()[kind]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing to warn about
    state = tx.init(tree)
  u, state2 = tx.update(tree, state, tree)
  assert jax.tree.structure(u) == jax.tree.structure(tree)
  sub = lro.subspace_state(state2)
  assert sub.projector == () and sub.inner == () and int(sub.count) == 1
  # Only counters: a few int32 scalars.
  assert lro.memory_report(tx, tree).state_bytes <= 4 * 8


@pytest.mark.parametrize("kind", ["recipe", "bare"])
def test_none_leaves_are_kept_as_none(kind):
  tx = _both()[kind]
  params = {"skip": None, "w": jnp.zeros((6, 10)), "nested": {"x": None}}
  state = tx.init(params)
  g = {"skip": None, "w": _grads(0, {"w": (6, 10)})["w"], "nested": {"x": None}}
  u, _ = jax.jit(tx.update)(g, state, params)
  assert u["skip"] is None and u["nested"]["x"] is None
  assert u["w"].shape == (6, 10) and _all_finite(u)
  assert lro.subspace_state(state).projector[0] != optax.MaskedNode()


def test_only_vector_leaves_is_plain_hf_adamw_without_warning():
  shapes = {"bias": (5,), "scale": (3,), "scalar": ()}
  params = _params(shapes)
  tx = lro.galore(LR, rank=RANK)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = tx.init(params)
  g = _grads(0, shapes)
  u, _ = tx.update(g, state, params)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(u[k], np.float64),
                               _hf_adam_first_step(g[k]), rtol=1e-5)


# ---------------------------------------------------------------------------
# Integer, bool and complex leaves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["recipe", "bare"])
@pytest.mark.parametrize("leaf,value,dtype", [
    ("step", jnp.int32(3), "int32"),
    ("mask", jnp.ones((6, 10), bool), "bool"),     # would be projected
    ("table", jnp.ones((4,), jnp.uint8), "uint8"),
])
def test_integer_and_bool_leaves_fail_at_init_naming_the_leaf(kind, leaf,
                                                              value, dtype):
  tx = _both()[kind]
  params = {"layer": {"w": jnp.zeros((6, 10)), leaf: value}}
  with pytest.raises(TypeError) as err:
    tx.init(params)
  msg = str(err.value)
  assert f"'layer/{leaf}'" in msg and dtype in msg  # where and what
  assert "floating-point" in msg and "optax.partition" in msg  # the fix


def test_the_suggested_fix_for_integer_leaves_works():
  params = {"w": jnp.zeros((6, 10)), "step": jnp.int32(3)}
  labels = {"w": "train", "step": "frozen"}
  tx = optax.partition({"train": lro.galore(LR, rank=RANK, projector="svd"),
                        "frozen": optax.set_to_zero()}, labels)
  state = tx.init(params)
  g = {"w": _grads(0, {"w": (6, 10)})["w"], "step": jnp.int32(0)}
  u, _ = jax.jit(tx.update)(g, state, params)
  assert int(u["step"]) == 0 and u["step"].dtype == jnp.int32
  assert _all_finite(u["w"]) and float(jnp.abs(u["w"]).max()) > 0


def test_integer_gradient_fails_at_update_naming_the_leaf():
  # jax.grad(..., allow_int=True) gives float0 gradients; an integer
  # gradient for a float param is a mistake too.
  tx = _both()["bare"]
  params = {"w": jnp.zeros((6, 10)), "b": jnp.zeros(5)}
  state = tx.init(params)
  g = {"w": jnp.zeros((6, 10)), "b": jnp.zeros(5, jnp.int32)}
  with pytest.raises(TypeError, match=re.escape("gradient leaf 'b'")):
    tx.update(g, state, params)


def test_complex_projected_leaf_fails_at_init_naming_the_fix():
  params = {"w": jnp.zeros((6, 10), jnp.complex64)}
  with pytest.raises(TypeError, match=r"'w'.*complex64.*rank None"):
    lro.galore(LR, rank=RANK).init(params)
