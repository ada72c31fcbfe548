"""DCT-AdamW (``lro.dct_adamw``): ALGORITHMS.md 6 and 0.3.

The reference is a float64 NumPy re-implementation of the official
``DCTAdamW.step`` (``IST-DASLab/ISTA-DASLab-Optimizers``,
``ista_daslab_optimizers/fft_low_rank/dct_adamw.py`` with
``fft_projector.py`` and ``utils/dct.py``), written from its logic in the
PyTorch ``(out, in)`` layout: global 1-based step, decay first, full AdamW
for 1-D and large parameters, DCT column selection by l1 score at ``t == 1 or
t % T == 0``, optional moment rotation, Adam written as ``m / (eps sqrt(bc2)
+ sqrt(v))`` with step ``lr sqrt(bc2) / bc1``. One documented deviation is
built into the reference where it matters: without rotation the selected
columns are kept in ascending order (the official ``topk(sorted=False)``
order is unspecified). With rotation the reference uses the score order
(descending), and the result must not depend on it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
import _mlp

B1, B2, EPS = 0.9, 0.999, 1e-8


def dct3_matrix(n):
  """``utils/dct.py``'s ``dct3_matrix``: Q[k, j] = sqrt(2/n) cos(pi k (2j+1) / 2n), row 0 / sqrt(2)."""
  k = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  q = np.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * j + 1) / (2 * n))
  q[0] *= np.sqrt(0.5)
  return q


class RefDCTAdamW:
  """The official step, float64, PyTorch layout (params are ``(out, in)``)."""

  def __init__(self, params, lr, wd, rank, gap, rotate, max_shape, order):
    self.p = {k: np.array(v, np.float64) for k, v in params.items()}
    self.lr, self.wd, self.rank, self.gap = lr, wd, rank, gap
    self.rotate, self.max_shape, self.order = rotate, max_shape, order
    self.t = 0
    self.m = {k: None for k in params}
    self.v = {k: None for k in params}
    self.idx = {}

  def lowrank(self, p):
    return p.ndim == 2 and max(p.shape) < self.max_shape

  def step(self, grads):
    self.t += 1
    t = self.t
    bc1, sbc2 = 1 - B1**t, np.sqrt(1 - B2**t)
    for k, p in self.p.items():
      g = np.asarray(grads[k], np.float64)
      p *= 1 - self.lr * self.wd
      if not self.lowrank(p):
        if self.m[k] is None:
          self.m[k], self.v[k] = np.zeros_like(p), np.zeros_like(p)
        self.m[k] = B1 * self.m[k] + (1 - B1) * g
        self.v[k] = B2 * self.v[k] + (1 - B2) * g * g
        p += -self.lr * sbc2 / bc1 * self.m[k] / (EPS * sbc2
                                                  + np.sqrt(self.v[k]))
        continue
      n, m = p.shape
      right = n >= m or (n in (512, 1024) and m in (3584, 4096))
      q = dct3_matrix(m if right else n)
      if self.m[k] is None:
        shape = (n, self.rank) if right else (self.rank, m)
        self.m[k], self.v[k] = np.zeros(shape), np.zeros(shape)
      refresh = t == 1 or t % self.gap == 0
      if refresh:
        s = g @ q if right else q.T @ g
        scores = np.abs(s).sum(axis=0 if right else 1)
        top = np.argsort(-scores)[:self.rank]
        idx = np.sort(top) if self.order == "ascending" else top
        prev = self.idx.get(k)
        self.idx[k] = idx
        a = s[:, idx] if right else s[idx, :]
        if self.rotate and t > 1:
          if right:
            rot = q[:, prev].T @ q[:, idx]
            self.m[k], self.v[k] = self.m[k] @ rot, np.abs(self.v[k] @ rot)
          else:
            rot = q[:, idx].T @ q[:, prev]
            self.m[k], self.v[k] = rot @ self.m[k], np.abs(rot @ self.v[k])
      else:
        idx = self.idx[k]
        a = g @ q[:, idx] if right else q[:, idx].T @ g
      self.m[k] = B1 * self.m[k] + (1 - B1) * a
      self.v[k] = B2 * self.v[k] + (1 - B2) * a * a
      u = self.m[k] / (EPS * sbc2 + np.sqrt(self.v[k]))
      back = u @ q[:, idx].T if right else q[:, idx] @ u
      p += -self.lr * sbc2 / bc1 * back


# Flax (in, out) shapes. "w1": PyTorch (20, 12), rows >= cols: right, N = 12.
# "w2": PyTorch (10, 16): left, N = 10. "big": a dimension >= max_shape (32):
# full AdamW. "b": 1-D: full AdamW.
SHAPES = {"b": (20,), "big": (6, 40), "w1": (12, 20), "w2": (16, 10)}


@pytest.mark.parametrize("rotate,gap,order", [
    (False, 2, "ascending"), (True, 1, "descending"), (True, 3, "descending")])
def test_matches_float64_reference(rotate, gap, order):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in SHAPES.items()}
  # Gradients of "b" and "w2" as small as eps: the Adam convention (eps
  # outside the bias-corrected root, ALGORITHMS.md 0.2 (B)) shows.
  tiny = {"b": 1e-8, "w2": 1e-8}
  grads = [{k: jnp.asarray(rng.standard_normal(s) * tiny.get(k, 1.0),
                           jnp.float32)
            for k, s in SHAPES.items()} for _ in range(6)]
  lr, wd, rank = 1e-2, 0.1, 4
  tx = lro.dct_adamw(lr, rank, update_proj_gap=gap, weight_decay=wd,
                     max_shape=32, rotate_subspace=rotate)
  ref = RefDCTAdamW({k: np.asarray(v).T for k, v in params.items()}, lr, wd,
                    rank, gap, rotate, 32, order)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    ref.step({k: np.asarray(v).T for k, v in g.items()})
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(params[k]), ref.p[k].T,
                                 rtol=2e-5, atol=2e-6, err_msg=k)
  sub = lro.subspace_state(state)
  # Projected leaves store r int32 indices (the selection of the last
  # refresh, as sets); the others keep full AdamW moments.
  for i, k in enumerate(sorted(SHAPES)):
    if k in ref.idx:
      assert sub.projector[i].indices.dtype == jnp.int32
      assert set(np.asarray(sub.projector[i].indices)) == set(ref.idx[k])
    else:
      assert sub.inner[i][0].mu.shape == SHAPES[k]


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_refresh_cadence(gap):
  """Reselection exactly at 1-based t = 1, T, 2T, ... (t == 1 or t % T == 0).

  G_t lies in the span of DCT columns S_t (a different pair each step), so
  a reselection at t selects exactly S_t."""
  d, n, rank, steps = 8, 12, 2, 12
  rng = np.random.default_rng(gap)
  # Flax (in=8, out=12): reduces in (d = 8). A PyTorch-right gradient
  # G_torch = X Q[:, S]^T is G_flax = Q[:, S] X^T: the in-axis DCT
  # coefficients Q^T G_flax vanish outside S.
  q = dct3_matrix(d)
  sets, prev = [], None
  for _ in range(steps):
    s = prev
    while s == prev:
      s = tuple(sorted(rng.choice(d, rank, replace=False)))
    sets.append(s)
    prev = s
  tx = lro.dct_adamw(1e-3, rank, update_proj_gap=gap)
  params = {"w": jnp.zeros((d, n))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(1, steps + 1):
    g = q[:, sets[t - 1]] @ rng.standard_normal((rank, n))
    _, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    refreshed = t == 1 or t % gap == 0
    last = max(s for s in range(1, t + 1) if s == 1 or s % gap == 0)
    sub = lro.subspace_state(state)
    assert tuple(np.asarray(sub.projector[0].indices)) == sets[last - 1], t
    assert int(sub.refreshed) == int(refreshed), t


def test_parameter_selection_and_sides():
  r = 8
  shapes = {
      "attn/q": (64, 64),          # square: reduce in (right)
      "mlp/up": (64, 256),         # PyTorch (256, 64): right, reduce in
      "mlp/down": (256, 64),       # PyTorch (64, 256): left, reduce out
      "exc/a": (4096, 1024),       # PyTorch (1024, 4096): forced right
      "exc/b": (3584, 512),        # PyTorch (512, 3584): forced right
      "exc/c": (4096, 512),        # PyTorch (512, 4096): forced right too
      "plain": (4096, 1000),       # PyTorch (1000, 4096): left
      "embed": (32000, 64),        # a dimension >= max_shape: full AdamW
      "wte": (31999, 64),          # projected (no name rule), left
      "norm": (64,),               # 1-D: full AdamW
      "scalar": (),                # 0-D: full AdamW
      "tiny": (3, 64),             # reduced dim 3 < r: full AdamW
      "stack": (2, 64, 256),       # stacked matrices: per matrix
  }
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  state = jax.eval_shape(lro.dct_adamw(1e-3, r).init, params)
  sub = lro.subspace_state(state)
  names = [k for k, _ in sorted(shapes.items())]
  mu = {k: sub.inner[i][0].mu.shape for i, k in enumerate(names)}
  expected = {
      "attn/q": (r, 64), "mlp/up": (r, 256), "mlp/down": (256, r),
      "exc/a": (r, 1024), "exc/b": (r, 512), "exc/c": (r, 512),
      "plain": (4096, r), "embed": (32000, 64), "wte": (31999, r),
      "norm": (64,), "scalar": (), "tiny": (3, 64), "stack": (2, r, 256)}
  assert mu == expected
  for i, k in enumerate(names):
    proj = sub.projector[i]
    if expected[k] == shapes[k]:
      assert isinstance(proj, optax.MaskedNode), k
    else:
      assert proj.indices.shape == shapes[k][:-2] + (r,), k
      assert proj.indices.dtype == jnp.int32
  # max_shape and exclude move leaves to full AdamW; a rank policy works.
  state = jax.eval_shape(
      lro.dct_adamw(1e-3, {"mlp": 4, "attn": None}, max_shape=200,
                    exclude="down").init, params)
  sub = lro.subspace_state(state)
  mu = {k: sub.inner[i][0].mu.shape for i, k in enumerate(names)}
  assert mu["mlp/up"] == (64, 256) and mu["mlp/down"] == (256, 64)
  assert mu["attn/q"] == (64, 64) and mu["stack"] == (2, 64, 256)


def test_trains_a_small_mlp():
  tx = lro.dct_adamw(2e-2, 4, rotate_subspace=True, weight_decay=1e-3)
  l0, l1 = _mlp.train(tx, _mlp.mlp_problem_16_24_8(), 80)
  assert l1 < 0.3 * l0
