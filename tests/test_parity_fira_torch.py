"""Step-for-step parity of ``lro.fira(projector="svd")`` with the official ``FiraAdamW``.

The reference is PyPI ``fira==1.0.2`` (``fira/fira_adamw.py`` and
``fira/gradient_projection.py``; the code of xichen-fy/Fira with CRLF line
ends), set up the way its ``divide_params`` and the official
``torchrun_main.py`` do it::

    param_groups = [{'params': regular_params},
                    {'params': projection_params, 'rank': r,
                     'update_proj_gap': T, 'alpha': alpha, 'proj_type': 'std'}]
    FiraAdamW(param_groups, lr=lr, weight_decay=wd)  # eps 1e-6, betas (0.9, 0.999)

The harness is the one of tests/test_parity_galore_torch.py (read its
docstring): torch ``nn.Linear`` layout ``(out, in)`` against our Flax layout
``(in, out)`` (a square, a tall and a wide matrix, so both sides of ``std``
on both layouts; a 1-D parameter and a matrix smaller than the rank at full
rank); the SVD's sign ambiguity (ALGORITHMS.md 0.7) is removed by
**injecting the torch projector** into our state at every step after a
*probe* step from our untouched state has checked that our refresh (timing
and subspace) matches torch's up to column signs. Fira's state beyond
GaLore's, the limiter's previous norm, is compared through the updates it
produces at every step (it is kept across refreshes on both sides).

A float64 NumPy step written from ``fira_adamw.py`` (:func:`_ref_step`,
independent of both) runs alongside with the same injected bases and checks
the harness; its numbers appear in the failure messages.

Tolerances. Both sides evaluate the same float32 expressions in a different
order; ``lro`` computes the bias correction as ``-expm1(t log b)`` in float32,
torch in float64. Measured on this problem (``test_fira_matches_fira``
prints its ``stats``): worst update difference 3.6e-7 of ``max|dW|`` over 11
steps (refreshes at 0, 4, 8) in both cases; the bound
``UPDATE_RTOL = 3e-6`` is 8x that and far below what the negative controls
produce (the paper's residual ``E = G - up(R)``: 0.79 of ``max|dW|``; the
bias correction inside Adam, which changes what the limiter compares: 0.75).
The ``eps``-sensitive cases scale the gradients by 1e-4 so that ``sqrt(v)``
is comparable to ``eps``.

Install for the torch tests (CPU build; ``fira``'s declared dependencies are
not needed)::

    pip install torch==2.13.0 && pip install --no-deps fira==1.0.2

Without them the torch tests skip.
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
    map_sub as _map_sub,
    leaf_keys as _leaf_keys,
    align_signs as _align_signs,
    set_count as _set_count,
)

RANK = 4
GAP = 4                 # update_proj_gap T
STEPS = 2 * GAP + 3     # refreshes at 0, T, 2T
ALPHA = 0.25
LR = 1e-2
B1, B2, EPS = 0.9, 0.999, 1e-6
GAMMA = 1.01

TORCH_SHAPES = {
    "bias": (16,),       # 1-D: full-rank AdamW
    "square": (16, 16),  # std tie: reduces `in` (right)
    "tall": (24, 12),    # out >= in: right
    "tiny": (3, 5),      # smaller than the rank: full-rank AdamW
    "wide": (10, 20),    # out < in: left
}
PROJECTED = ("square", "tall", "wide")

PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
UPDATE_RTOL = 3e-6      # ours vs torch, relative to max|dW| of the leaf and step
HARNESS_RTOL = 3e-5     # torch (float32) vs the float64 one-step reference
BASIS_ATOL = 1e-4


def _make_problem(seed, grad_scale):
  return _parity.make_problem(TORCH_SHAPES, STEPS, seed, grad_scale)


def _schedule():
  return _parity.schedule(LR, STEPS)


def _load_fira():
  """Returns ``(torch, FiraAdamW)`` or skips.

  ``fira_adamw.py`` imports ``transformers.utils.versions.require_version``
  (a version check). If ``transformers`` is absent, ``fira_adamw.py`` and
  ``gradient_projection.py`` are loaded from the installed package under a
  private package name with a temporary stand-in for ``require_version``;
  nothing outside the private name is left in ``sys.modules``.
  """
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("fira")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("fira (pip install --no-deps fira==1.0.2) is not installed")
  if importlib.util.find_spec("transformers") is not None:
    try:
      from fira import FiraAdamW  # pylint: disable=g-import-not-at-top
      return torch, FiraAdamW
    except Exception:  # pylint: disable=broad-except
      pass
  name = "_fira_reference"
  if name + ".fira_adamw" in sys.modules:
    return torch, sys.modules[name + ".fira_adamw"].AdamW
  versions = types.ModuleType("transformers.utils.versions")
  versions.require_version = lambda *a, **k: None
  utils = types.ModuleType("transformers.utils")
  utils.versions = versions
  top = types.ModuleType("transformers")
  top.utils = utils
  stubs = {"transformers": top, "transformers.utils": utils,
           "transformers.utils.versions": versions}
  stubs = {k: v for k, v in stubs.items() if k not in sys.modules}
  pkg = types.ModuleType(name)
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules[name] = pkg
  sys.modules.update(stubs)
  try:
    module = importlib.import_module(name + ".fira_adamw")
  except ImportError as e:
    pytest.skip(f"cannot import fira.fira_adamw: {e}")
  finally:
    for k in stubs:
      sys.modules.pop(k, None)
  return torch, module.AdamW


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

# ----------------------------------------------------------------------------
# Independent float64 reference of one FiraAdamW step (PyTorch layout)
# ----------------------------------------------------------------------------

def _ref_init():
  return {k: {"step": 0, "m": None, "v": None, "prev": None}
          for k in TORCH_SHAPES}


def _ref_step(w, g, st, lr, wd, basis=None):
  """One ``FiraAdamW`` step in float64, from ``fira_adamw.py``."""
  w = np.asarray(w, np.float64)
  g = np.asarray(g, np.float64)
  if basis is not None:
    q = np.asarray(basis, np.float64)
    right = _torch_side(w.shape) == "right"
    r = g @ q.T if right else q.T @ g
    back = (lambda x: ALPHA * (x @ q)) if right else (lambda x: ALPHA * (q @ x))
  else:
    r = g
  if st["m"] is None:
    st["m"], st["v"] = np.zeros_like(r), np.zeros_like(r)
  st["step"] += 1
  t = st["step"]
  st["m"] = B1 * st["m"] + (1 - B1) * r
  st["v"] = B2 * st["v"] + (1 - B2) * r * r
  n = st["m"] / (np.sqrt(st["v"]) + EPS)
  step_size = lr * math.sqrt(1 - B2**t) / (1 - B1**t)
  if basis is not None:
    dim = 0 if n.shape[0] < n.shape[1] else 1
    phi = (np.linalg.norm(n, axis=dim, keepdims=True)
           / (np.linalg.norm(r, axis=dim, keepdims=True) + 1e-8))
    psi = (g - back(r)) * phi
    if st["prev"] is not None:
      nrm = np.linalg.norm(psi)
      c = max(nrm / (st["prev"] + 1e-8), GAMMA) / GAMMA
      psi = psi / c
      st["prev"] = nrm / c
    else:
      st["prev"] = np.linalg.norm(psi)
    n = back(n) + psi
  w = w - step_size * n
  if wd > 0:
    w = w - lr * wd * w
  return w


# ----------------------------------------------------------------------------
# Our side: state surgery for the injection
# ----------------------------------------------------------------------------

_sub = lro.subspace_state


def _bases(state, keys):
  return {k: np.asarray(p.basis) for k, p in zip(keys, _sub(state).projector)
          if isinstance(p, lro.BasisState)}


def _inject(state, keys, bases):
  """Writes ``bases`` into the projector states and sets the count to 1 (no
  refresh fires there; the Adam, bias-correction, schedule and weight-decay
  counters are separate)."""
  assert GAP > 1

  def fn(ss):
    proj = list(ss.projector)
    for i, k in enumerate(keys):
      if k in bases:
        proj[i] = proj[i]._replace(
            basis=jnp.asarray(bases[k], proj[i].basis.dtype))
    return ss._replace(projector=tuple(proj), count=jnp.ones_like(ss.count))

  return _map_sub(state, fn)


# ----------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------

def _make_tx(variant, lr, wd):
  if variant == "lro.fira":
    return lro.fira(lr, RANK, update_proj_gap=GAP, scale=ALPHA,
                    weight_decay=wd, projector="svd")
  if variant == "paper_residual":  # E = G - up(R) instead of G - alpha up(R)
    return lro.fira(lr, RANK, update_proj_gap=GAP, scale=ALPHA,
                    weight_decay=wd, projector="svd",
                    residual_uses_scale=False)
  if variant == "bias_inside":  # corrected N feeds the ratios and limiter
    return lro.chain(
        lro.galore_project(RANK, update_proj_gap=GAP, scale=ALPHA,
                           projector="svd"),
        lro.scale_by_adam_hf(B1, B2, EPS), lro.fira_residual(),
        optax.scale_by_learning_rate(lr), lro.decay_updated_weights(lr, wd))
  raise ValueError(variant)


def _run_parity(*, schedule, wd, grad_scale, seed, variant="lro.fira",
                stats=None, stop_early=False):
  """Runs both optimizers; returns mismatch descriptions (empty = parity).

  ``stop_early``: return at the first step with a mismatch (negative
  controls).
  """
  stats = {} if stats is None else stats
  torch, FiraAdamW = _load_fira()
  w0, grads = _make_problem(seed, grad_scale)
  lr_fn = _schedule() if schedule else (lambda k: LR)

  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
  opt = FiraAdamW(
      [{"params": [p for k, p in tparams.items() if k not in PROJECTED]},
       {"params": [tparams[k] for k in PROJECTED], "rank": RANK,
        "update_proj_gap": GAP, "alpha": ALPHA, "proj_type": "std"}],
      lr=LR, weight_decay=wd, no_deprecation_warning=True)

  tx = _make_tx(variant, _schedule() if schedule else LR, wd)
  params = _to_ours(w0)
  state = tx.init(params)
  keys = _leaf_keys(params)
  assert set(_bases(state, keys)) == set(PROJECTED)
  update = jax.jit(tx.update)

  ref_w = {k: v.astype(np.float64) for k, v in w0.items()}
  ref_st = _ref_init()
  problems = []
  for k in range(STEPS):
    lr_k = float(lr_fn(k))
    g = grads[k]
    w_before = {n: p.detach().numpy().astype(np.float64)
                for n, p in tparams.items()}
    for group in opt.param_groups:
      group["lr"] = lr_k
    for n, p in tparams.items():
      p.grad = torch.tensor(g[n])
    opt.step()
    w_torch = {n: p.detach().numpy().copy() for n, p in tparams.items()}
    torch_bases = {n: opt.state[tparams[n]]["projector"].ortho_matrix.numpy().copy()
                   for n in PROJECTED}
    ours_torch_bases = {n: _torch_basis_to_ours(TORCH_SHAPES[n], b)
                        for n, b in torch_bases.items()}
    if k % GAP == 0:  # harness: torch refreshed from G_k's SVD
      for n in PROJECTED:
        b_ref = _ref_svd_basis(g[n], RANK)
        axis = 0 if _torch_side(TORCH_SHAPES[n]) == "right" else 1
        s = np.sign(np.sum(torch_bases[n] * b_ref, axis=1 - axis,
                           keepdims=True))
        np.testing.assert_allclose(torch_bases[n], b_ref * s, atol=BASIS_ATOL,
                                   err_msg=f"harness: torch basis {n} at {k}")

    ref_w = {n: _ref_step(ref_w[n], g[n], ref_st[n], lr_k, wd,
                          torch_bases.get(n)) for n in TORCH_SHAPES}

    g_ours = _to_ours(g)
    _, probe = update(g_ours, state, params)
    if int(_sub(probe).count) != k + 1:
      problems.append(f"step {k}: count {int(_sub(probe).count)}")
    for n, q in _bases(probe, keys).items():
      qt = ours_torch_bases[n]
      err = float(np.max(np.abs(_align_signs(q, qt) - qt)))
      stats["basis_err"] = max(stats.get("basis_err", 0.0), err)
      if not err <= BASIS_ATOL:
        problems.append(f"step {k}, {n}: basis differs from torch's by {err:.3g}")

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
      uscale = float(np.max(np.abs(d_torch)))
      uerr = np.abs(d_ours - d_torch) - 2 * np.spacing(np.abs(theirs))
      urel = float(np.max(uerr)) / uscale
      stats["param_err"] = max(stats.get("param_err", 0.0),
                               float(np.max(perr / ptol)))
      stats["update_rel"] = max(stats.get("update_rel", 0.0), urel)
      stats["update_abs"] = max(stats.get("update_abs", 0.0),
                                float(np.max(np.abs(d_ours - d_torch))))
      if np.any(perr > ptol) or urel > UPDATE_RTOL:
        problems.append(
            f"step {k}, {n} {TORCH_SHAPES[n]}: max|W_ours - W_torch| ="
            f" {perr.max():.3g}; max|dW_ours - dW_torch| / max|dW_torch| ="
            f" {urel:.3g}; vs float64 ref:"
            f" {np.max(np.abs(d_ours - d_ref)) / np.max(np.abs(d_ref)):.3g}")
    for n in TORCH_SHAPES:
      d_torch = w_torch[n].astype(np.float64) - w_before[n]
      d_ref = ref_w[n] - w_before[n]
      rel = (np.max(np.abs(d_torch - d_ref) - 2 * np.spacing(np.abs(w_torch[n])))
             / np.max(np.abs(d_ref)))
      stats["torch_vs_ref"] = max(stats.get("torch_vs_ref", 0.0), float(rel))
      assert rel < HARNESS_RTOL, f"harness: torch vs float64 ref, step {k} {n}: {rel:.3g}"
      ref_w[n] = w_torch[n].astype(np.float64)  # one-step reference
    params = new_params
    if stop_early and problems:
      break
  stats["steps"] = STEPS
  return problems


CASES = {
    # name: (schedule, weight_decay, grad_scale)
    "const_lr-wd0-g1": (False, 0.0, 1.0),
    "schedule-wd0.1-eps_sensitive": (True, 0.1, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fira_matches_fira(case):
  schedule, wd, grad_scale = CASES[case]
  stats = {}
  problems = _run_parity(schedule=schedule, wd=wd, grad_scale=grad_scale,
                         seed=sorted(CASES).index(case), stats=stats)
  print(case, stats)
  assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("variant", ["paper_residual", "bias_inside"])
def test_parity_check_detects_deviations(variant):
  """Negative controls: the tolerances catch the two easy mistakes."""
  problems = _run_parity(schedule=True, wd=0.1, grad_scale=1.0, seed=0,
                         variant=variant, stop_early=True)
  assert problems, f"the {variant!r} variant was not told apart from FiraAdamW"
