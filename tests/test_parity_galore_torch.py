"""Step-for-step parity of ``lro.galore`` with the official ``GaLoreAdamW``.

The reference is ``galore-torch==1.0`` (``galore_torch/adamw.py`` and
``galore_torch/galore_projector.py``, the code of jiaweizzhao/GaLore), set up
the way the official ``torchrun_main.py`` does it::

    param_groups = [{'params': non_galore_params},
                    {'params': galore_params, 'rank': r, 'update_proj_gap': T,
                     'scale': alpha, 'proj_type': 'std'}]
    GaLoreAdamW(param_groups, lr=lr, weight_decay=wd)   # eps 1e-6, betas (0.9, 0.999)

Layout. The torch side holds ``nn.Linear``-style weights ``W`` of shape
``(out, in)``; our side holds Flax kernels ``K = W.T`` of shape ``(in, out)``
and receives the transposed gradients. The parameter set has a square matrix
(the tie case of ``std``: the reference reduces ``in``), a tall ``W`` (reduced
on the right, i.e. on ``in``) and a wide ``W`` (reduced on the left, i.e. on
``out``), so both sides of ``std`` are exercised on both layouts; a 1-D
parameter and a matrix smaller than the rank, which both get full-rank
HF-style AdamW with the unscaled learning rate. Everything is float32.

The SVD sign ambiguity (ALGORITHMS.md 0.7). Singular vectors are defined up
to sign (and LAPACK builds differ in the last bits), and GaLore keeps its
Adam moments across a refresh, so two correct implementations that pick
different signs drift apart after the first refresh. To compare exactly, the
test **injects the torch projector** into our state at every step:

1. torch takes step ``k``; ``optimizer.state[p]['projector'].ortho_matrix`` is
   the basis it used at that step (``B`` of shape ``(r, in)`` on the right,
   ``A`` of shape ``(out, r)`` on the left). In our layout the same subspace is
   the ``(d, r)`` column basis ``B.T`` (reduction side) or ``A`` (output side).
2. *probe*: our jitted update runs untouched from our current state. Its new
   basis must equal torch's up to column signs (``|Q_ours^T Q_torch| = I``):
   at refresh steps ``0, T, 2T`` this checks our refresh timing and our SVD
   against torch's; in between, that the basis was kept. The probe's result
   is then discarded.
3. *real step*: the same update runs on our state with the torch bases
   written into ``SubspaceState.projector`` and ``SubspaceState.count`` set to
   1, a count at which no refresh fires (it is used for nothing else with
   ``stagger=False`` and ``projector='svd'``: the Adam bias correction, the
   learning-rate schedule and the weight decay keep their own counters).
   The count is then put back to ``k + 1``. So both sides project with
   bit-identical bases, and the only differences left are float32 rounding.

Compared at every step, per parameter: the parameters (ours ``K`` against
torch ``W.T``) with ``rtol=1e-5, atol=1e-6``, and the update ``ΔW`` (ours: the
returned update; torch's: read off its float32 weights, so up to 1 ulp of
``W`` is allowed on top) relative to its own size:
``|ΔW_ours - ΔW_torch| <= 3e-5 * max|ΔW_torch|``. A tiny float64 numpy
implementation of the reference step (:func:`_ref_step`, written from
``adamw.py``, independent of both) runs alongside with the same injected bases;
it checks the harness (torch against it, same bound) and its numbers appear in
the failure messages.

Tolerances. Both sides evaluate the same float32 expressions in a different
order. The largest difference comes from the bias correction: ``lro`` computes
``sqrt(1 - b2**t) / (1 - b1**t)`` in float32 (as optax does), torch in Python
float64; ``1 - 0.999**t`` in float32 loses ~5 digits to cancellation, so the
step size is off by 4e-6 to 1e-5 relative for t = 1..11 (a float32
``-expm1(t * log(b2))`` would be ~1e-7). Measured on this problem: worst
update difference 1.0e-5 of ``max|ΔW|`` (1e-7 with an expm1 bias correction),
worst parameter difference 0.32 of the parameter bound. The update bound, 3e-5,
is 3x the measured worst case and 30x below the smallest convention error the
negative controls at the bottom inject (weight decay on the pre-update weights:
1e-3 of ``ΔW``; a PyTorch-style Adam epsilon: O(1) in the eps-sensitive case).
The gradients of the ``eps``-sensitive cases are scaled (1e-4) so that
``sqrt(v)`` is comparable to ``eps = 1e-6`` and the Adam convention matters;
the others are O(1). Gradients are drawn with a prescribed, well-separated
spectrum (ratio 0.75 between consecutive singular values) so that the singular
vectors, and so the probe check (``1e-4``), are well conditioned.

Install for the torch tests (CPU build; galore-torch's declared dependencies
``transformers`` and ``bitsandbytes`` are not needed and not installed)::

    pip install torch==2.13.0 && pip install --no-deps galore-torch==1.0

Without them the torch tests skip; the numpy-reference test still runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _parity
from _parity import (  # pylint: disable=g-multiple-import
    to_ours as _to_ours,
    to_torch_layout as _to_torch_layout,
    torch_side as _torch_side,
    torch_basis_to_ours as _torch_basis_to_ours,
    ref_svd_basis as _ref_svd_basis,
    map_sub as _map_subspace,
    leaf_keys as _leaf_keys,
    align_signs as _align_signs,
    set_count as _set_count,
)

RANK = 4
GAP = 4                 # update_proj_gap T
STEPS = 2 * GAP + 3     # refreshes at 0, T, 2T, and kept moments in between
ALPHA = 0.25
LR = 1e-2
B1, B2, EPS = 0.9, 0.999, 1e-6

# PyTorch layout (out, in) of each parameter. Keys avoid the default exclude
# regex (embed / norm / ...). jax.tree flattens a dict in sorted-key order.
TORCH_SHAPES = {
    "bias": (16,),       # 1-D: full-rank AdamW, unscaled lr
    "square": (16, 16),  # std tie: reference reduces `in` (right)
    "tall": (24, 12),    # out >= in: right, reduces `in`
    "tiny": (3, 5),      # smaller than the rank: full-rank AdamW
    "wide": (10, 20),    # out < in: left, reduces `out`
}
GALORE_KEYS = ("square", "tall", "wide")

PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
UPDATE_RTOL = 2e-6      # ours vs torch, relative to max |ΔW| of the leaf at that step (see docstring)
HARNESS_RTOL = 3e-5     # torch (float32) vs the float64 one-step reference
BASIS_ATOL = 1e-4       # our SVD vs torch's SVD, after sign alignment


# ----------------------------------------------------------------------------
# Loading the reference
# ----------------------------------------------------------------------------

def _make_problem(seed, grad_scale):
  return _parity.make_problem(TORCH_SHAPES, STEPS, seed, grad_scale)


def _schedule():
  return _parity.schedule(LR, STEPS)


def _load_galore_torch():
  """Returns ``(torch, GaLoreAdamW)`` or skips.

  ``galore_torch/__init__.py`` imports ``adamw8bit`` (bitsandbytes), and
  ``adamw.py`` imports ``transformers.utils.versions.require_version`` (a
  version check). Neither is needed for ``GaLoreAdamW``, and both are heavy.
  If the plain import fails, this loads ``adamw.py`` and
  ``galore_projector.py`` from the installed package under a private package
  name (so ``__init__`` never runs), with a temporary stand-in for
  ``require_version`` if transformers is absent. Nothing outside the private
  name is left in ``sys.modules``.
  """
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("galore_torch")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("galore_torch (pip install --no-deps galore-torch==1.0) is"
                " not installed")
  try:
    from galore_torch import GaLoreAdamW  # pylint: disable=g-import-not-at-top
    return torch, GaLoreAdamW
  except Exception:  # pylint: disable=broad-except
    pass  # missing bitsandbytes / transformers (or a broken bitsandbytes)
  name = "_galore_torch_reference"
  if name + ".adamw" in sys.modules:
    return torch, sys.modules[name + ".adamw"].AdamW
  stubs = {}
  if importlib.util.find_spec("transformers") is None:
    versions = types.ModuleType("transformers.utils.versions")
    versions.require_version = lambda *a, **k: None
    utils = types.ModuleType("transformers.utils")
    utils.versions = versions
    top = types.ModuleType("transformers")
    top.utils = utils
    stubs = {"transformers": top, "transformers.utils": utils,
             "transformers.utils.versions": versions}
  pkg = types.ModuleType(name)
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules[name] = pkg
  sys.modules.update(stubs)
  try:
    adamw = importlib.import_module(name + ".adamw")
  except ImportError as e:
    pytest.skip(f"cannot import galore_torch.adamw: {e}")
  finally:
    for k in stubs:
      sys.modules.pop(k, None)
  return torch, adamw.AdamW


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

# ----------------------------------------------------------------------------
# Independent float64 reference of one GaLoreAdamW step (PyTorch layout)
# ----------------------------------------------------------------------------

def _ref_init():
  return {k: {"step": 0, "m": None, "v": None} for k in TORCH_SHAPES}


def _ref_step(w, g, st, lr, wd, basis=None):
  """One ``GaLoreAdamW`` step in float64, from ``galore_torch/adamw.py``.

  ``basis`` is the projector in torch form (``B`` (r, in) for a right
  projection, ``A`` (out, r) for a left one) or None for a full-rank param.
  Returns the new weight; updates ``st`` in place.
  """
  w = np.asarray(w, np.float64)
  g = np.asarray(g, np.float64)
  if basis is not None:
    q = np.asarray(basis, np.float64)
    side = _torch_side(w.shape)
    r = g @ q.T if side == "right" else q.T @ g
  else:
    r = g
  if st["m"] is None:
    st["m"], st["v"] = np.zeros_like(r), np.zeros_like(r)
  st["step"] += 1
  t = st["step"]
  st["m"] = B1 * st["m"] + (1 - B1) * r
  st["v"] = B2 * st["v"] + (1 - B2) * r * r
  n = st["m"] / (np.sqrt(st["v"]) + EPS)
  step_size = lr * math.sqrt(1 - B2 ** t) / (1 - B1 ** t)
  if basis is not None:
    n = ALPHA * (n @ q if side == "right" else q @ n)
  w = w - step_size * n
  if wd > 0:
    w = w - lr * wd * w
  return w


# ----------------------------------------------------------------------------
# Our side: state surgery for the projector injection
# ----------------------------------------------------------------------------

_find_subspace = lro.subspace_state


def _bases(state, keys):
  ss = _find_subspace(state)
  out = {}
  for k, p in zip(keys, ss.projector):
    if isinstance(p, lro.BasisState):
      out[k] = np.asarray(p.basis)
  return out


def _inject(state, keys, bases):
  """Writes ``bases`` (ours layout) into the projector and sets count to 1.

  With ``update_proj_gap > 1`` and no stagger, count 1 fires no refresh.
  """
  assert GAP > 1
  def fn(ss):
    proj = list(ss.projector)
    for i, k in enumerate(keys):
      if k in bases:
        assert isinstance(proj[i], lro.BasisState), (k, proj[i])
        assert proj[i].basis.shape == bases[k].shape, (k, proj[i].basis.shape,
                                                       bases[k].shape)
        proj[i] = proj[i]._replace(
            basis=jnp.asarray(bases[k], proj[i].basis.dtype))
    return ss._replace(projector=tuple(proj),
                       count=jnp.ones_like(ss.count))
  return _map_subspace(state, fn)


# ----------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------

def _make_tx(variant, lr, wd):
  if variant == "lro.galore":
    return lro.galore(lr, RANK, update_proj_gap=GAP, scale=ALPHA,
                      weight_decay=wd, projector="svd")
  # Deliberately wrong variants (negative controls), same state structure.
  if variant == "pytorch_adam":   # ALGORITHMS.md 0.2 (B) instead of (A)
    inner, post = optax.scale_by_adam(B1, B2, eps=EPS), [
        optax.scale_by_learning_rate(lr), lro.decay_updated_weights(lr, wd)]
  elif variant == "decay_before":  # decay on the pre-update weights
    inner = lro.scale_by_adam_hf(B1, B2, EPS)
    post = [optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr)]
  else:
    raise ValueError(variant)
  return lro.chain(lro.galore_project(RANK, update_proj_gap=GAP, scale=ALPHA,
                                       projector="svd"),
                   inner, lro.back_project(), *post)


def _run_parity(*, schedule, wd, grad_scale, seed, variant="lro.galore",
                stats=None):
  """Runs both optimizers; returns a list of mismatch descriptions (empty = parity).

  ``stats`` (a dict), if given, receives the worst error ratios seen.
  """
  stats = {} if stats is None else stats
  torch, GaLoreAdamW = _load_galore_torch()
  w0, grads = _make_problem(seed, grad_scale)
  lr_fn = _schedule() if schedule else (lambda k: LR)

  # torch side, exactly as torchrun_main.py groups them.
  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
  galore_params = [tparams[k] for k in GALORE_KEYS]
  non_galore = [p for k, p in tparams.items() if k not in GALORE_KEYS]
  opt = GaLoreAdamW(
      [{"params": non_galore},
       {"params": galore_params, "rank": RANK, "update_proj_gap": GAP,
        "scale": ALPHA, "proj_type": "std"}],
      lr=LR, weight_decay=wd, no_deprecation_warning=True)

  # our side.
  tx = _make_tx(variant, _schedule() if schedule else LR, wd)
  params = _to_ours(w0)
  state = tx.init(params)
  keys = _leaf_keys(params)
  assert set(_bases(state, keys)) == set(GALORE_KEYS), (
      "lro.galore's default policy should project exactly the torch GaLore"
      f" group {GALORE_KEYS}, got {sorted(_bases(state, keys))}")
  update = jax.jit(tx.update)

  # float64 reference.
  ref_w = {k: v.astype(np.float64) for k, v in w0.items()}
  ref_st = _ref_init()

  problems = []
  for k in range(STEPS):
    lr_k = float(lr_fn(k))
    g = grads[k]
    # torch.
    w_before = {n: p.detach().numpy().astype(np.float64)
                for n, p in tparams.items()}
    for group in opt.param_groups:
      group["lr"] = lr_k
    for n, p in tparams.items():
      p.grad = torch.tensor(g[n])
    opt.step()
    w_torch = {n: p.detach().numpy().copy() for n, p in tparams.items()}
    torch_bases = {n: opt.state[tparams[n]]["projector"].ortho_matrix.numpy().copy()
                   for n in GALORE_KEYS}
    ours_torch_bases = {n: _torch_basis_to_ours(TORCH_SHAPES[n], b)
                        for n, b in torch_bases.items()}
    # Harness check: torch refreshed exactly at 0, T, 2T (from G_k's SVD).
    if k % GAP == 0:
      for n in GALORE_KEYS:
        b_ref = _ref_svd_basis(g[n], RANK)
        axis = 0 if _torch_side(TORCH_SHAPES[n]) == "right" else 1
        b_t = torch_bases[n]
        s = np.sign(np.sum(b_t * b_ref, axis=1 - axis, keepdims=True))
        np.testing.assert_allclose(b_t, b_ref * s, atol=BASIS_ATOL,
                                   err_msg=f"harness: torch basis of {n} at {k}")

    # reference.
    ref_w = {n: _ref_step(ref_w[n], g[n], ref_st[n], lr_k, wd,
                          torch_bases.get(n)) for n in TORCH_SHAPES}

    # ours: probe (untouched state) then the injected step.
    g_ours = _to_ours(g)
    _, probe_state = update(g_ours, state, params)
    probe_count = int(_find_subspace(probe_state).count)
    if probe_count != k + 1:
      problems.append(f"step {k}: SubspaceState.count is {probe_count},"
                      f" expected {k + 1}")
    for n, q in _bases(probe_state, keys).items():
      qt = ours_torch_bases[n]
      err = float(np.max(np.abs(_align_signs(q, qt) - qt)))
      stats["basis_err"] = max(stats.get("basis_err", 0.0), err)
      if not err <= BASIS_ATOL:
        problems.append(
            f"step {k} ({'refresh' if k % GAP == 0 else 'no refresh'}), {n}:"
            f" our basis differs from torch's (up to signs) by {err:.3g}")

    upd, state = update(g_ours, _inject(state, keys, ours_torch_bases), params)
    state = _set_count(state, k + 1)
    new_params = optax.apply_updates(params, upd)

    for n in TORCH_SHAPES:
      ours_w = _to_torch_layout(new_params[n])
      theirs = w_torch[n]
      d_ours = _to_torch_layout(upd[n]).astype(np.float64)
      d_torch = theirs.astype(np.float64) - w_before[n]
      d_ref = ref_w[n] - w_before[n]
      perr = np.abs(ours_w.astype(np.float64) - theirs)
      ptol = PARAM_ATOL + PARAM_RTOL * np.abs(theirs)
      # torch's dW is read off the rounded weights: <= 1 ulp of W_after
      # (two roundings with weight decay).
      uscale = float(np.max(np.abs(d_torch)))
      uerr = np.abs(d_ours - d_torch) - 2 * np.spacing(np.abs(theirs))
      urel = float(np.max(uerr)) / uscale
      stats["param_err"] = max(stats.get("param_err", 0.0),
                               float(np.max(perr / ptol)))
      stats["update_rel"] = max(stats.get("update_rel", 0.0), urel)
      if np.any(perr > ptol) or urel > UPDATE_RTOL:
        i = np.unravel_index(np.argmax(perr - ptol), perr.shape)
        problems.append(
            f"step {k}, {n} {TORCH_SHAPES[n]}: max|W_ours - W_torch| ="
            f" {perr.max():.3g} (at {i}: ours {ours_w[i]:.9g}, torch"
            f" {theirs[i]:.9g}, float64 ref {ref_w[n][i]:.9g}); max|dW_ours -"
            f" dW_torch| / max|dW_torch| = {urel:.3g};"
            f" max|dW_ours - dW_ref| / max|dW_ref| ="
            f" {np.max(np.abs(d_ours - d_ref)) / np.max(np.abs(d_ref)):.3g}")
    # Harness check: torch agrees with the independent float64 reference.
    for n in TORCH_SHAPES:
      d_torch = w_torch[n].astype(np.float64) - w_before[n]
      d_ref = ref_w[n] - w_before[n]
      rel = (np.max(np.abs(d_torch - d_ref) - 2 * np.spacing(np.abs(w_torch[n])))
             / np.max(np.abs(d_ref)))
      stats["torch_vs_ref"] = max(stats.get("torch_vs_ref", 0.0), float(rel))
      assert rel < HARNESS_RTOL, f"harness: torch vs float64 ref, step {k} {n}: {rel:.3g}"
      ref_w[n] = w_torch[n].astype(np.float64)  # re-sync: one-step reference
    params = new_params
  return problems


CASES = {
    # name: (schedule, weight_decay, grad_scale)
    "const_lr-wd0-g1": (False, 0.0, 1.0),
    "const_lr-wd0-eps_sensitive": (False, 0.0, 1e-4),
    "schedule-wd0.1-g1": (True, 0.1, 1.0),
    "schedule-wd0.1-eps_sensitive": (True, 0.1, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_galore_matches_galore_torch(case):
  schedule, wd, grad_scale = CASES[case]
  problems = _run_parity(schedule=schedule, wd=wd, grad_scale=grad_scale,
                         seed=sorted(CASES).index(case))
  assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("variant,grad_scale", [("pytorch_adam", 1e-4),
                                                ("decay_before", 1.0)])
def test_parity_check_detects_convention_errors(variant, grad_scale):
  """Negative controls: the tolerances above are tight enough to catch errors."""
  problems = _run_parity(schedule=True, wd=0.1, grad_scale=grad_scale, seed=0,
                         variant=variant)
  assert problems, f"the {variant!r} variant was not told apart from GaLoreAdamW"


def test_galore_matches_numpy_reference():
  """Without torch: lro.galore against the float64 numpy reference.

  Our own refreshed basis is checked to span the top-``r`` singular subspace of
  the gradient (sign-invariant: ``Q Q^T``) and is then handed to the
  reference, which replays the step in float64 from our pre-step params.
  """
  w0, grads = _make_problem(7, 1e-4)
  wd = 0.1
  sched = _schedule()
  tx = lro.galore(sched, RANK, update_proj_gap=GAP, scale=ALPHA,
                  weight_decay=wd, projector="svd")
  params = _to_ours(w0)
  state = tx.init(params)
  keys = _leaf_keys(params)
  update = jax.jit(tx.update)
  ref_st = _ref_init()
  prev_bases = None
  for k in range(STEPS):
    g = grads[k]
    upd, state = update(_to_ours(g), state, params)
    new_params = optax.apply_updates(params, upd)
    bases = _bases(state, keys)
    assert set(bases) == set(GALORE_KEYS)
    for n, q in bases.items():
      if k % GAP == 0:
        ref_q = _ref_svd_basis(g[n], RANK)
        ref_q = ref_q.T if _torch_side(TORCH_SHAPES[n]) == "right" else ref_q
        np.testing.assert_allclose(q @ q.T, ref_q @ ref_q.T, atol=BASIS_ATOL,
                                   err_msg=f"subspace of {n} at step {k}")
      else:
        np.testing.assert_array_equal(q, prev_bases[n],
                                      err_msg=f"{n} refreshed at step {k}")
    prev_bases = bases
    for n in TORCH_SHAPES:
      w_prev = _to_torch_layout(params[n])
      basis = None
      if n in bases:
        basis = bases[n].T if _torch_side(TORCH_SHAPES[n]) == "right" else bases[n]
      ref = _ref_step(w_prev, g[n], ref_st[n], float(sched(k)), wd, basis)
      d_ref = ref - w_prev
      np.testing.assert_allclose(_to_torch_layout(new_params[n]), ref,
                                 rtol=PARAM_RTOL, atol=PARAM_ATOL,
                                 err_msg=f"params of {n} at step {k}")
      np.testing.assert_allclose(_to_torch_layout(upd[n]), d_ref, rtol=0,
                                 atol=UPDATE_RTOL * np.max(np.abs(d_ref)),
                                 err_msg=f"update of {n} at step {k}")
    params = new_params
