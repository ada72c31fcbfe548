"""Step-for-step parity of ``lro.apollo`` / ``lro.apollo_mini`` with the official ``APOLLOAdamW``.

The reference is PyPI ``apollo-torch==1.0.3`` (``apollo_torch/apollo.py``,
``random_projector.py``, ``svd_projector.py``; the code of
zhuhanqing/APOLLO), set up the way its ``main_pretrain.py`` /
``utils/setup.py`` do it::

    param_groups = [{'params': regular_params},
                    {'params': lowrank_params, 'rank': r,
                     'update_proj_gap': T, 'scale': scale, 'proj_type': 'std',
                     'proj': 'random' | 'svd', 'scale_type': 'channel' | 'tensor'}]
    APOLLOAdamW(param_groups, lr=lr, weight_decay=wd, scale_front=...,
                disable_nl=...)   # eps 1e-6, betas (0.9, 0.999)

Layout: torch ``nn.Linear`` weights ``(out, in)`` against our Flax kernels
``(in, out)`` (a square, a tall and a wide matrix: both sides of ``std`` on
both layouts; at rank 4 a 1-D parameter and a matrix smaller than the rank
take full-rank AdamW; at rank 1, APOLLO-Mini, that matrix is projected too).

The projection. Torch's generator cannot be reproduced in JAX
(ALGORITHMS.md 0.7), so:

* ``proj='random'`` (our ``projector="gaussian"``): **our** ``P`` is injected
  into torch. Our update of step ``k`` runs first; ``P`` is regenerated from
  our state (:func:`lro.projectors.gaussian_matrices`) and torch's projector
  (created ahead, as ``_initialize_projector`` does) is given a
  ``get_orthogonal_matrix`` that returns it. Torch calls it only when *it*
  refreshes (``step % T == 0``), so the check also covers the refresh
  timing: a refresh at a different step would leave torch with another
  ``P``. Nothing of our state is touched.
* ``proj='svd'``: torch's SVD basis is injected into our state after a probe
  step, exactly as in tests/test_parity_galore_torch.py.

A float64 NumPy step written from ``apollo.py`` (:func:`_ref_step`) runs
alongside with the same projection and checks the harness.

Tolerances. Measured (``test_apollo_matches_apollo_torch`` prints its
``stats``): worst update difference 5.8e-7 of ``max|dW|`` over 11 steps
(refreshes at 0, 4, 8) across the three cases; the bound ``UPDATE_RTOL =
3e-6`` is 5x that and far below what the negative controls produce (the bias
correction inside Adam, which changes what the limiter compares: 6.5e-2 of
``max|dW|``; ``scale`` applied instead of ``sqrt(scale)``: 10).

Install for the torch tests (CPU build; ``apollo-torch``'s declared
dependencies ``transformers`` / ``bitsandbytes`` are not needed)::

    pip install torch==2.13.0 && pip install --no-deps apollo-torch==1.0.3

Without them the tests skip.
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
    map_sub as _map_sub,
    leaf_keys as _leaf_keys,
    align_signs as _align_signs,
    set_count as _set_count,
)

GAP = 4
STEPS = 2 * GAP + 3
LR = 1e-2
B1, B2, EPS = 0.9, 0.999, 1e-6
GAMMA = 1.01

TORCH_SHAPES = {
    "bias": (16,),
    "square": (16, 16),
    "tall": (24, 12),
    "tiny": (3, 5),
    "wide": (10, 20),
}

PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
UPDATE_RTOL = 3e-6
HARNESS_RTOL = 3e-5
BASIS_ATOL = 1e-4


def _make_problem(seed, grad_scale):
  return _parity.make_problem(TORCH_SHAPES, STEPS, seed, grad_scale)


def _schedule():
  return _parity.schedule(LR, STEPS)


def _load_apollo():
  """Returns ``(torch, APOLLOAdamW)`` or skips.

  ``apollo_torch/__init__.py`` imports the 8-bit GaLore optimizer
  (bitsandbytes) and ``apollo.py`` imports
  ``transformers.utils.versions.require_version``. ``apollo.py`` and its two
  projector modules are loaded under a private package name (so the
  ``__init__`` never runs), with a temporary stand-in for ``require_version``
  if transformers is absent.
  """
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("apollo_torch")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("apollo_torch (pip install --no-deps apollo-torch==1.0.3) is"
                " not installed")
  name = "_apollo_torch_reference"
  if name + ".apollo" in sys.modules:
    return torch, sys.modules[name + ".apollo"].AdamW
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
    module = importlib.import_module(name + ".apollo")
  except ImportError as e:
    pytest.skip(f"cannot import apollo_torch.apollo: {e}")
  finally:
    for k in stubs:
      sys.modules.pop(k, None)
  return torch, module.AdamW


# ----------------------------------------------------------------------------
# Data and layout
# ----------------------------------------------------------------------------

def _ours_to_torch_proj(shape, p):
  """Our ``(d, r)`` matrix -> torch's ``(r, in)`` (right) / ``(out, r)`` (left)."""
  p = np.asarray(p, np.float32)
  return p.T if _torch_side(shape) == "right" else p


def _torch_proj_to_ours(shape, p):
  p = np.asarray(p, np.float32)
  return p.T if _torch_side(shape) == "right" else p


# ----------------------------------------------------------------------------
# Independent float64 reference of one APOLLOAdamW step (PyTorch layout)
# ----------------------------------------------------------------------------

def _ref_init():
  return {k: {"step": 0, "m": None, "v": None, "prev": None}
          for k in TORCH_SHAPES}


def _ref_step(w, g, st, lr, wd, cfg, proj=None):
  """One ``APOLLOAdamW`` step in float64, from ``apollo.py``."""
  w = np.asarray(w, np.float64)
  g = np.asarray(g, np.float64)
  if proj is not None:
    q = np.asarray(proj, np.float64)
    r = g @ q.T if _torch_side(w.shape) == "right" else q.T @ g
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
  if proj is not None:
    if cfg["scale_type"] == "channel":
      dim = 0 if g.shape[0] < g.shape[1] else 1
      s = (np.linalg.norm(n, axis=dim, keepdims=True)
           / (np.linalg.norm(r, axis=dim, keepdims=True) + 1e-8))
    else:
      s = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
    out = g * s
    root = math.sqrt(cfg["scale"])
    if cfg["scale_front"]:
      out = out * root
    if not cfg["disable_nl"]:
      if st["prev"] is not None:
        nrm = np.linalg.norm(out)
        c = max(nrm / (st["prev"] + 1e-8), GAMMA) / GAMMA
        out = out / c
        st["prev"] = nrm / c
      else:
        st["prev"] = np.linalg.norm(out)
    if not cfg["scale_front"]:
      out = out * root
    n = out
  w = w - step_size * n
  if wd > 0:
    w = w - lr * wd * w
  return w


# ----------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------

_sub = lro.subspace_state


def _inject_bases(state, keys, bases):
  assert GAP > 1

  def fn(ss):
    proj = list(ss.projector)
    for i, k in enumerate(keys):
      if k in bases:
        proj[i] = proj[i]._replace(
            basis=jnp.asarray(bases[k], proj[i].basis.dtype))
    return ss._replace(projector=tuple(proj), count=jnp.ones_like(ss.count))

  return _map_sub(state, fn)


def _make_tx(cfg, lr, wd, variant):
  kw = dict(update_proj_gap=GAP, weight_decay=wd,
            scale_front=cfg["scale_front"],
            norm_growth_limit=None if cfg["disable_nl"] else GAMMA,
            projector="gaussian" if cfg["proj"] == "random" else "svd")
  scale = cfg["scale"]
  if variant == "scale_not_sqrt":
    scale = scale**2
  if variant == "bias_inside":
    return lro.chain(
        lro.galore_project(cfg["rank"], update_proj_gap=GAP,
                           projector=kw["projector"]),
        lro.scale_by_adam_hf(B1, B2, EPS),
        lro.apollo_scaling(cfg["scale_type"], scale, cfg["scale_front"],
                           kw["norm_growth_limit"]),
        optax.scale_by_learning_rate(lr), lro.decay_updated_weights(lr, wd))
  if cfg["rank"] == 1 and cfg["scale_type"] == "tensor":
    return lro.apollo_mini(lr, scale=scale, **kw)
  return lro.apollo(lr, cfg["rank"], scale_type=cfg["scale_type"],
                    scale=scale, **kw)


def _run_parity(cfg, *, schedule, wd, grad_scale, seed, variant="lro",
                stats=None, stop_early=False):
  """Runs both optimizers; returns mismatch descriptions (empty = parity).

  ``stop_early``: return at the first step with a mismatch (negative
  controls).
  """
  stats = {} if stats is None else stats
  torch, APOLLOAdamW = _load_apollo()
  w0, grads = _make_problem(seed, grad_scale)
  lr_fn = _schedule() if schedule else (lambda k: LR)
  rank = cfg["rank"]

  params = _to_ours(w0)
  keys = _leaf_keys(params)
  plans = dict(zip(keys, lro.plan_leaves(params, rank)))
  projected = tuple(k for k in keys if plans[k] is not None)
  want = ("square", "tall", "wide") + (("tiny",) if rank == 1 else ())
  assert set(projected) == set(want), projected

  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
  lowrank_group = {"params": [tparams[k] for k in projected], "rank": rank,
                   "update_proj_gap": GAP, "scale": cfg["scale"],
                   "proj_type": "std", "proj": cfg["proj"],
                   "scale_type": cfg["scale_type"]}
  opt = APOLLOAdamW(
      [{"params": [p for k, p in tparams.items() if k not in projected]},
       lowrank_group],
      lr=LR, weight_decay=wd, scale_front=cfg["scale_front"],
      disable_nl=cfg["disable_nl"])

  injected = {}  # name -> our P in torch layout (random mode)
  calls = {k: [] for k in projected}
  if cfg["proj"] == "random":
    group = opt.param_groups[1]
    for n in projected:
      st = opt.state[tparams[n]]
      st["projector"] = opt._initialize_projector(group, st)  # pylint: disable=protected-access

      def supply(weights, rank_, type, seed, n=n):  # pylint: disable=redefined-builtin
        del weights, rank_, seed
        assert type == _torch_side(TORCH_SHAPES[n]), (n, type)
        calls[n].append(step_k[0])
        return torch.tensor(injected[n])

      st["projector"].get_orthogonal_matrix = supply

  tx = _make_tx(cfg, _schedule() if schedule else LR, wd, variant)
  state = tx.init(params)
  update = jax.jit(tx.update)

  ref_w = {k: v.astype(np.float64) for k, v in w0.items()}
  ref_st = _ref_init()
  problems = []
  step_k = [0]
  for k in range(STEPS):
    step_k[0] = k
    lr_k = float(lr_fn(k))
    g = grads[k]
    g_ours = _to_ours(g)
    w_before = {n: p.detach().numpy().astype(np.float64)
                for n, p in tparams.items()}

    if cfg["proj"] == "random":  # ours first; its P goes into torch
      upd, state = update(g_ours, state, params)
      sub = _sub(state)
      for i, n in enumerate(keys):
        if n in projected:
          (p,) = lro.projectors.gaussian_matrices(plans[n], sub.projector[i])
          injected[n] = _ours_to_torch_proj(TORCH_SHAPES[n], p)

    for group in opt.param_groups:
      group["lr"] = lr_k
    for n, p in tparams.items():
      p.grad = torch.tensor(g[n])
    opt.step()
    w_torch = {n: p.detach().numpy().copy() for n, p in tparams.items()}
    torch_proj = {n: opt.state[tparams[n]]["projector"].ortho_matrix.numpy().copy()
                  for n in projected}

    if cfg["proj"] == "random":
      for n in projected:  # torch used the P we hold now, so it refreshed with us
        if not np.array_equal(torch_proj[n], injected[n]):
          problems.append(f"step {k}, {n}: torch's P is not ours (refresh"
                          f" timing; torch refreshed at {calls[n]})")
    else:  # torch's SVD basis goes into our state, after a probe
      ours_bases = {n: _torch_proj_to_ours(TORCH_SHAPES[n], b)
                    for n, b in torch_proj.items()}
      _, probe = update(g_ours, state, params)
      for i, n in enumerate(keys):
        if n in projected:
          q = np.asarray(_sub(probe).projector[i].basis)
          err = float(np.max(np.abs(_align_signs(q, ours_bases[n])
                                    - ours_bases[n])))
          stats["basis_err"] = max(stats.get("basis_err", 0.0), err)
          if not err <= BASIS_ATOL:
            problems.append(f"step {k}, {n}: basis differs by {err:.3g}")
      upd, state = update(g_ours, _inject_bases(state, keys, ours_bases),
                          params)
      state = _set_count(state, k + 1)

    ref_w = {n: _ref_step(ref_w[n], g[n], ref_st[n], lr_k, wd, cfg,
                          torch_proj.get(n)) for n in TORCH_SHAPES}
    new_params = optax.apply_updates(params, upd)
    for n in TORCH_SHAPES:
      ours_w = _to_torch_layout(new_params[n])
      theirs = w_torch[n]
      d_ours = _to_torch_layout(upd[n]).astype(np.float64)
      d_torch = theirs.astype(np.float64) - w_before[n]
      d_ref = ref_w[n] - w_before[n]
      perr = np.abs(ours_w.astype(np.float64) - theirs)
      ptol = PARAM_ATOL + PARAM_RTOL * np.abs(theirs)
      uerr = np.abs(d_ours - d_torch) - 2 * np.spacing(np.abs(theirs))
      urel = float(np.max(uerr)) / float(np.max(np.abs(d_torch)))
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
      ref_w[n] = w_torch[n].astype(np.float64)
    params = new_params
    if stop_early and problems:
      return problems
  if cfg["proj"] == "random":
    for n in projected:
      if calls[n] != list(range(0, STEPS, GAP)):
        problems.append(f"{n}: torch refreshed at {calls[n]}")
  stats["steps"] = STEPS
  return problems


def _cfg(rank, scale_type, scale=1.0, scale_front=False, disable_nl=False,
         proj="random"):
  return dict(rank=rank, scale_type=scale_type, scale=scale,
              scale_front=scale_front, disable_nl=disable_nl, proj=proj)


CASES = {
    # name: (cfg, schedule, weight_decay, grad_scale)
    "apollo-const_lr": (_cfg(4, "channel"), False, 0.0, 1.0),
    "apollo-svd-scale2-disable_nl-wd-eps_sensitive": (
        _cfg(4, "channel", 2.0, disable_nl=True, proj="svd"), True, 0.1, 1e-4),
    "mini-scale_front-wd-eps_sensitive": (
        _cfg(1, "tensor", 128.0, scale_front=True), True, 0.1, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apollo_matches_apollo_torch(case):
  cfg, schedule, wd, grad_scale = CASES[case]
  stats = {}
  problems = _run_parity(cfg, schedule=schedule, wd=wd, grad_scale=grad_scale,
                         seed=sorted(CASES).index(case), stats=stats)
  print(case, stats)
  assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("variant,cfg", [
    ("bias_inside", _cfg(4, "channel")),
    ("scale_not_sqrt", _cfg(1, "tensor", 128.0)),
])
def test_parity_check_detects_deviations(variant, cfg):
  problems = _run_parity(cfg, schedule=True, wd=0.0, grad_scale=1.0, seed=0,
                         variant=variant, stop_early=True)
  assert problems, f"the {variant!r} variant was not told apart from APOLLO"
