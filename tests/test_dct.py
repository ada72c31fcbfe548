"""The SVD-free DCT projector (ALGORITHMS.md section 6).

References here are independent of the library: the DCT-II matrix comes from
``scipy.fft.dct`` of the identity (float64), the column scores and the GaLore
step are written in numpy in PyTorch's ``(out, in)`` layout with the
reference's side rule, and D4's optimality is checked by brute force over all
column subsets.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft

import lowrank_optax as lro
from lowrank_optax.projectors import DCT_MAX_DIM


def dct_f64(d):
  """Orthonormal DCT-II matrix C (C @ x == scipy.fft.dct(x, norm='ortho'))."""
  return scipy.fft.dct(np.eye(d), type=2, norm="ortho", axis=0)


# ------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("d", [1, 2, 7, 64, 768, 2053])
def test_dct_matrix_is_scipys_orthonormal_dct2(d):  # D1
  c = np.asarray(lro.dct_matrix(d), np.float64)
  ref = dct_f64(d)
  np.testing.assert_allclose(c, ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(c @ c.T, np.eye(d), atol=2e-5, rtol=0)
  np.testing.assert_allclose(c[0], 1 / np.sqrt(d), rtol=1e-6)


def test_dct_matrix_columns_from_batched_indices():
  d = 40
  idx = np.array([[0, 3, 39], [5, 6, 7]], np.int32)
  cols = np.asarray(lro.dct_matrix(d, jnp.asarray(idx)), np.float64)
  assert cols.shape == (2, d, 3)
  ref = dct_f64(d)
  for b in range(2):
    np.testing.assert_allclose(cols[b], ref[:, idx[b]], atol=1e-6)


def test_dct_matrix_rejects_dimensions_it_cannot_index_exactly():
  with pytest.raises(ValueError, match=str(DCT_MAX_DIM)):
    lro.dct_matrix(DCT_MAX_DIM + 1)


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize("score", ["l1", "l2"])
def test_dct_select_matches_numpy_scores(score):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 20, 30))
  r = 5
  got = np.asarray(lro.dct_select(jnp.asarray(a, jnp.float32), r, score))
  s = np.einsum("dk,bdn->bkn", dct_f64(20), a)
  sc = np.abs(s).sum(-1) if score == "l1" else (s ** 2).sum(-1)
  want = np.sort(np.argsort(-sc, axis=-1)[:, :r], axis=-1)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32


@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_exact_recovery_of_a_dct_subspace(score, proj_type):  # D3
  # A Flax kernel (in=24, out=16) whose reduced axis (std: the output axis,
  # 16 < 24) is spanned by the DCT columns in S: the selection finds S and
  # up(down(G)) == G.
  rng = np.random.default_rng(1)
  m_in, n_out, r = 24, 16, 4
  s_in, s_out = [1, 5, 11, 20], [0, 2, 9, 15]
  x = rng.standard_normal((r, r))
  # K = C_in[:, s_in] X C_out[:, s_out]^T has both axes in DCT subspaces.
  k = dct_f64(m_in)[:, s_in] @ x @ dct_f64(n_out)[:, s_out].T
  params = {"w": jnp.zeros((m_in, n_out), jnp.float32)}
  plan, = lro.plan_leaves(params, r, proj_type)
  proj = lro.projectors.DCTProjector(score=score)
  g = jnp.asarray(k, jnp.float32)
  state = proj.refresh(plan, g, proj.init(plan, jnp.float32, None), True,
                       jax.random.key(0))
  if proj_type == "full":
    np.testing.assert_array_equal(state.row_indices, s_in)
    np.testing.assert_array_equal(state.col_indices, s_out)
  else:
    want = s_out if plan.side == "output" else s_in
    np.testing.assert_array_equal(state.indices, want)
  back = proj.up(plan, proj.down(plan, g, state), state)
  np.testing.assert_allclose(np.asarray(back), k, atol=1e-5)


def test_l2_selection_is_the_best_column_subset():  # D4
  rng = np.random.default_rng(2)
  d, n, r = 7, 9, 3
  a = rng.standard_normal((d, n))
  c = dct_f64(d)
  idx = np.asarray(lro.dct_select(jnp.asarray(a, jnp.float32), r, score="l2"))
  s = c.T @ a

  def err(sub):
    p = c[:, list(sub)]
    return np.sum((a - p @ p.T @ a) ** 2)

  errors = {sub: err(sub) for sub in itertools.combinations(range(d), r)}
  best = min(errors, key=errors.get)
  assert tuple(idx) == best
  excluded = [j for j in range(d) if j not in idx]
  np.testing.assert_allclose(errors[tuple(idx)], np.sum(s[excluded] ** 2),
                             rtol=1e-10)


# ------------------------------------------------- GaLore with DCT, end to end


def galore_dct_reference(grads_seq, r, gap, lr, scale, eps, score="l1",
                         rotate=False):
  """float64 GaLore-AdamW (HF Adam) with DCT column selection.

  Written in PyTorch layout W = K^T (out, in): right (N = cols) if
  rows >= cols, else left (N = rows); refresh at 0-based steps 0, T, 2T, ...;
  indices sorted ascending. Leading axes of a kernel are layers. Moments are
  kept at a refresh, or with ``rotate`` mapped as the reference's
  ``rotate_subspace``: right ``m <- m Rot``, ``v <- |v Rot|`` with
  ``Rot = P_prev^T P_cur``; left ``m <- Rot m``, ``v <- |Rot v|`` with
  ``Rot = P_cur^T P_prev`` (P = the selected DCT columns, float64).
  """
  b1, b2 = 0.9, 0.999
  out = []
  states = {}
  for t, grads in enumerate(grads_seq):
    ups = {}
    for name, gk in grads.items():
      gk = np.asarray(gk, np.float64)
      w_g = np.swapaxes(gk, -1, -2)  # (…, out, in)
      rows, cols = w_g.shape[-2:]
      right = rows >= cols
      big_n = cols if right else rows
      c = dct_f64(big_n)
      st = states.setdefault(name, {"idx": None, "m": None, "v": None})
      lead = w_g.shape[:-2]
      upd = np.empty_like(w_g)
      if st["idx"] is None:
        st["idx"] = [None] * int(np.prod(lead, dtype=int))
        lr_shape = (rows, r) if right else (r, cols)
        st["m"] = np.zeros(lead + lr_shape)
        st["v"] = np.zeros(lead + lr_shape)
      for i, ix in enumerate(np.ndindex(*lead) if lead else [()]):
        g = w_g[ix]
        if t % gap == 0:
          s = g @ c if right else c.T @ g
          axis = 0 if right else 1  # score the columns / rows of S
          sc = np.abs(s).sum(axis) if score == "l1" else (s ** 2).sum(axis)
          prev = st["idx"][i]
          st["idx"][i] = np.sort(np.argsort(-sc)[:r])
          if rotate and prev is not None:
            p_prev, p_cur = c[:, prev], c[:, st["idx"][i]]
            if right:
              rot = p_prev.T @ p_cur
              st["m"][ix] = st["m"][ix] @ rot
              st["v"][ix] = np.abs(st["v"][ix] @ rot)
            else:
              rot = p_cur.T @ p_prev
              st["m"][ix] = rot @ st["m"][ix]
              st["v"][ix] = np.abs(rot @ st["v"][ix])
        p = c[:, st["idx"][i]]
        low = g @ p if right else p.T @ g
        st["m"][ix] = b1 * st["m"][ix] + (1 - b1) * low
        st["v"][ix] = b2 * st["v"][ix] + (1 - b2) * low ** 2
        n = st["m"][ix] / (np.sqrt(st["v"][ix]) + eps)
        step = lr * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        back = n @ p.T if right else p @ n
        upd[ix] = -step * scale * back
      ups[name] = np.swapaxes(upd, -1, -2)
    out.append(ups)
  return out


@pytest.mark.parametrize("score,rotate", [("l1", False), ("l2", False),
                                          ("l1", True)])
def test_galore_dct_matches_float64_reference(score, rotate):
  rng = np.random.default_rng(3)
  shapes = {"attn_sq": (12, 12), "mlp_up": (12, 20), "mlp_down": (20, 12),
            "stacked_mlp": (2, 10, 14)}
  r, gap, lr, scale, eps, steps = 4, 3, 1e-2, 0.25, 1e-6, 7
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  grads_seq = [{k: rng.standard_normal(s).astype(np.float32)
                for k, s in shapes.items()} for _ in range(steps)]
  tx = lro.galore(lr, rank=r, update_proj_gap=gap, scale=scale, eps=eps,
                  projector="dct", dct_score=score,
                  on_refresh="rotate" if rotate else "keep")
  state = tx.init(params)
  update = jax.jit(tx.update)
  want = galore_dct_reference(grads_seq, r, gap, lr, scale, eps, score,
                              rotate)
  for t in range(steps):
    g = jax.tree.map(jnp.asarray, grads_seq[t])
    u, state = update(g, state, params)
    for k in shapes:
      np.testing.assert_allclose(np.asarray(u[k], np.float64), want[t][k],
                                 rtol=2e-4, atol=1e-7, err_msg=f"{k} step {t}")


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_carry_over_is_the_partial_permutation_of_kept_columns(proj_type):
  # D5: Rot = P_new^T P_old from float64 DCT columns is 0/1 with at most one
  # 1 per row and column, and carry_over applies exactly that map.
  d_in, d_out, r = 12, 10, 4
  plan, = lro.plan_leaves({"w": jnp.zeros((d_in, d_out))}, r, proj_type)
  rng = np.random.default_rng(7)
  x = rng.standard_normal(plan.lowrank_shape)
  old_i, new_i = np.array([0, 3, 5, 9]), np.array([1, 3, 8, 9])
  old_o, new_o = np.array([2, 4, 6, 7]), np.array([2, 5, 6, 7])

  def rot(d, new, old):
    m = dct_f64(d)[:, new].T @ dct_f64(d)[:, old]
    np.testing.assert_allclose(m, np.round(m), atol=1e-12)
    assert (np.round(m).sum(0) <= 1).all() and (np.round(m).sum(1) <= 1).all()
    return m

  if proj_type == "full":
    old = lro.TwoSidedIndexState(jnp.asarray(old_i), jnp.asarray(old_o))
    new = lro.TwoSidedIndexState(jnp.asarray(new_i), jnp.asarray(new_o))
    want = rot(d_in, new_i, old_i) @ x @ rot(d_out, new_o, old_o).T
  else:
    d = d_out if plan.side == "output" else d_in
    o, n = (old_o, new_o) if plan.side == "output" else (old_i, new_i)
    old, new = lro.IndexState(jnp.asarray(o)), lro.IndexState(jnp.asarray(n))
    m = rot(d, n, o)
    want = x @ m.T if plan.side == "output" else m @ x
  got = lro.projectors.DCTProjector().carry_over(plan, jnp.asarray(x, jnp.float32),
                                        old, new)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_rotate_needs_the_dct_projector():
  with pytest.raises(ValueError, match="projector='dct'"):
    lro.galore_project(4, projector="svd", on_refresh="rotate")
  with pytest.raises(ValueError, match="projector='dct'"):  # lro.subspace users
    lro.ProjectionConfig(rank=4, on_refresh="rotate")


def test_state_is_int32_indices_only():
  params = {"mlp": jnp.zeros((64, 96)), "layers": jnp.zeros((3, 32, 48)),
            "norm": jnp.zeros((64,))}
  r = 8
  tx = lro.galore(1e-3, rank=r, projector="dct")
  state = jax.eval_shape(tx.init, params)
  proj = lro.subspace_state(state).projector  # leaves sorted: layers, mlp, norm
  assert proj[0] == lro.IndexState(jax.ShapeDtypeStruct((3, r), jnp.int32))
  assert proj[1] == lro.IndexState(jax.ShapeDtypeStruct((r,), jnp.int32))
  assert isinstance(proj[2], optax.MaskedNode)
  # Projector bytes: 4 per index. Moments: 2 x r x max(m, n) floats.
  rep = lro.memory_report(tx, params)
  svd = lro.memory_report(lro.galore(1e-3, rank=r, projector="svd"), params)
  bases = 4 * (3 * 32 * r + 64 * r)
  assert svd.state_bytes - rep.state_bytes == bases - 4 * (3 * r + r)


def test_nonfinite_gradient_at_a_refresh_keeps_the_indices():
  params = {"w": jnp.zeros((16, 24))}
  tx = lro.galore(1e-2, rank=4, update_proj_gap=2, projector="dct")
  state = tx.init(params)
  rng = np.random.default_rng(4)
  g = {"w": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)}
  _, state = tx.update(g, state, params)
  before = np.asarray(lro.subspace_state(state).projector[0].indices)
  _, state = tx.update(g, state, params)
  bad = {"w": g["w"].at[3, 5].set(jnp.nan)}
  _, state = tx.update(bad, state, params)  # count 2: a refresh
  np.testing.assert_array_equal(lro.subspace_state(state).projector[0].indices, before)


def test_too_large_a_dimension_is_a_clear_error_at_init():
  big = DCT_MAX_DIM + 1
  params = {"w": jax.ShapeDtypeStruct((big, big + 1), jnp.float32)}
  tx = lro.galore(1e-3, rank=4, projector="dct")
  with pytest.raises(ValueError, match="DCT projector supports"):
    jax.eval_shape(tx.init, params)


def test_unknown_dct_score_is_rejected():
  with pytest.raises(ValueError, match="dct_score"):
    lro.galore_project(4, projector="dct", dct_score="l3")
  with pytest.raises(ValueError, match="DCT score"):
    lro.dct_select(jnp.ones((4, 4)), 2, "linf")


def test_bfloat16_params():
  params = {"w": jnp.zeros((32, 48), jnp.bfloat16)}
  tx = lro.galore(1e-2, rank=4, projector="dct")
  state = tx.init(params)
  g = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((32, 48)),
                        jnp.bfloat16)}
  u, state = jax.jit(tx.update)(g, state, params)
  assert u["w"].dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(u["w"].astype(jnp.float32))))
  assert lro.subspace_state(state).projector[0].indices.dtype == jnp.int32


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_indices_follow_the_batch_axes_sharding_and_stay_put():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  specs = {"a": ((32, 48), P("fsdp", None)),
           "s": ((8, 16, 24), P("fsdp", None, None))}
  rng = np.random.default_rng(6)
  params = {k: jax.device_put(rng.standard_normal(s).astype(np.float32),
                              NamedSharding(mesh, p))
            for k, (s, p) in specs.items()}
  tx = lro.galore(1e-2, rank=4, update_proj_gap=2, projector="dct")
  state = tx.init(params)
  want = {"a": P(), "s": P("fsdp", None)}
  for step in range(3):
    for i, k in enumerate(sorted(specs)):
      idx = lro.subspace_state(state).projector[i].indices
      assert idx.sharding.is_equivalent_to(NamedSharding(mesh, want[k]),
                                           idx.ndim), (k, step, idx.sharding)
    _, state = jax.jit(tx.update)(params, state, params)
