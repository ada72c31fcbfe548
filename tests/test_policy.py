"""Policy resolution: which leaves, which matrix, which rank, which side."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_optax as lro
from lowrank_optax import policy


def sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


LLAMA60M = {  # Flax layout (in, out); PyTorch shapes are the transposes.
    "embed": {"embedding": sds(32000, 512)},
    "layers_0": {
        "attn": {"q": {"kernel": sds(512, 512)}},
        "mlp": {"gate": {"kernel": sds(512, 1376)},
                "down": {"kernel": sds(1376, 512)}},
        "input_norm": {"scale": sds(512)},
    },
    "lm_head": {"kernel": sds(512, 32000)},
}


def plans_by_path(params, rank, **kw):
  out = {}
  for (path, _), plan in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             policy.plan_leaves(params, rank, **kw)):
    out[policy.path_to_str(path)] = plan
  return out


def test_default_policy_skips_embed_head_norm_and_vectors():
  p = plans_by_path(LLAMA60M, 128)
  assert p["embed/embedding"] is None
  assert p["lm_head/kernel"] is None
  assert p["layers_0/input_norm/scale"] is None
  for k in ("layers_0/attn/q/kernel", "layers_0/mlp/gate/kernel",
            "layers_0/mlp/down/kernel"):
    assert p[k] is not None and p[k].rank == 128


def test_g8_llama60m_shapes_match_reference_sides():
  """ALGORITHMS.md G8, in Flax layout (our arrays are PyTorch's transposes)."""
  tx = lro.galore(1e-2, rank=128)
  state = jax.eval_shape(tx.init, LLAMA60M)
  sub = lro.subspace_state(state)
  leaves = [policy.path_to_str(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(LLAMA60M)[0]]
  idx = {k: i for i, k in enumerate(leaves)}
  # gate/up: PyTorch (1376, 512) -> right: projector 128x512, moments 1376x128.
  i = idx["layers_0/mlp/gate/kernel"]
  assert sub.projector[i].basis.shape == (512, 128)
  assert sub.inner[i][0].mu.shape == (128, 1376)  # = (1376 x 128)^T
  # down: PyTorch (512, 1376) -> left: projector 512x128, moments 128x1376.
  i = idx["layers_0/mlp/down/kernel"]
  assert sub.projector[i].basis.shape == (512, 128)
  assert sub.inner[i][0].mu.shape == (1376, 128)
  # q (square): right, reduces PyTorch in_features = our axis 0; moments 512x128.
  i = idx["layers_0/attn/q/kernel"]
  assert sub.projector[i].basis.shape == (512, 128)
  assert sub.inner[i][0].mu.shape == (128, 512)
  # Pass-through leaves keep full-shape Adam state, no projector.
  i = idx["embed/embedding"]
  assert isinstance(sub.projector[i], optax.MaskedNode)
  assert sub.inner[i][0].mu.shape == (32000, 512)


@pytest.mark.parametrize("proj_type,shape,side", [
    ("std", (512, 512), "reduction"),      # tie -> PyTorch right (inputs)
    ("std", (512, 1376), "reduction"),     # out > in -> reduce inputs
    ("std", (1376, 512), "output"),
    ("reverse_std", (512, 512), "output"),
    ("reverse_std", (512, 1376), "output"),
    ("reverse_std", (1376, 512), "reduction"),
    ("right", (1376, 512), "reduction"),
    ("left", (512, 1376), "output"),
    ("full", (512, 1376), "both"),
])
def test_side_rule(proj_type, shape, side):
  (plan,) = policy.plan_leaves({"w": sds(*shape)}, 64, proj_type=proj_type)
  assert plan.side == side


def test_fraction_rank_rounds_half_to_even():
  # 0.25 * 512 = 128; 0.3 * 10 = 3; 0.25 * 10 = 2.5 -> 2 (Python round).
  p = plans_by_path({"a": sds(512, 700), "b": sds(10, 20)}, 0.25)
  assert p["a"].rank == 128 and p["b"].rank == 2
  p = plans_by_path({"b": sds(10, 20)}, 0.3)
  assert p["b"].rank == 3


def test_regex_dict_policy_first_match_and_none():
  rules = {"embed|lm_head": None, "attn": 32, "mlp": 0.5}
  p = plans_by_path(LLAMA60M, rules)
  assert p["embed/embedding"] is None and p["lm_head/kernel"] is None
  assert p["layers_0/attn/q/kernel"].rank == 32
  assert p["layers_0/mlp/gate/kernel"].rank == 256
  assert p["layers_0/input_norm/scale"] is None  # no rule matches


def test_explicit_rank_is_clamped_to_reduced_dim():
  p = plans_by_path({"w": sds(16, 40)}, {"w": 100})
  assert p["w"].rank == 16 and p["w"].side == "reduction"


def test_int_rank_not_below_dims_passes_through():
  p = plans_by_path({"small": sds(64, 256), "big": sds(256, 256)}, 64)
  assert p["small"] is None and p["big"].rank == 64


def test_callable_policy():
  fn = lambda path, leaf: 8 if "mlp" in path and leaf.ndim == 2 else None
  p = plans_by_path(LLAMA60M, fn)
  assert p["layers_0/mlp/gate/kernel"].rank == 8
  assert p["layers_0/attn/q/kernel"] is None
  assert p["embed/embedding"] is None


def test_stacked_leaf_batch_axes_and_views():
  params = {"layers": {"mlp": sds(4, 64, 96), "attn": sds(64, 8, 16)},
            "conv": sds(3, 3, 32, 48)}
  views = {"attn": lro.MatrixView(reduction_axis=0, output_axis=(1, 2))}
  p = plans_by_path(params, 16, dimension_numbers=views)
  mlp = p["layers/mlp"]
  assert mlp.batch_axes == (0,) and (mlp.rows, mlp.cols) == (64, 96)
  assert mlp.lowrank_shape == (4, 16, 96)
  attn = p["layers/attn"]
  assert attn.batch_axes == () and (attn.rows, attn.cols) == (64, 128)
  conv = p["conv"]
  assert conv.batch_axes == (0, 1) and conv.lowrank_shape == (3, 3, 16, 48)
  # to_matrix / from_matrix are inverse and follow the view.
  x = jnp.arange(64 * 8 * 16, dtype=jnp.float32).reshape(64, 8, 16)
  m = attn.to_matrix(x)
  np.testing.assert_array_equal(m, x.reshape(64, 128))
  np.testing.assert_array_equal(attn.from_matrix(m), x)


def test_scan_axis_in_the_middle():
  """A MaxText-style (d, L, f) leaf: batch axis 1 needs a transpose."""
  (plan,) = policy.plan_leaves({"w": sds(32, 3, 48)}, 8,
                               dimension_numbers=lro.MatrixView(0, 2))
  assert plan.batch_axes == (1,)
  x = jax.random.normal(jax.random.key(0), (32, 3, 48))
  m = plan.to_matrix(x)
  assert m.shape == (3, 32, 48)
  np.testing.assert_array_equal(m[1], x[:, 1, :])
  np.testing.assert_array_equal(plan.from_matrix(m), x)


def test_optax_dimension_numbers_are_accepted():
  dn = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  (plan,) = policy.plan_leaves({"attn": sds(64, 4, 32)}, 8,
                               dimension_numbers={"attn": dn})
  assert (plan.rows, plan.cols) == (64, 128)


# ----------------------------------------------------------------- errors ---

@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, "8", True])
def test_bad_rank_raises_at_construction(bad):
  with pytest.raises((ValueError, TypeError)):
    lro.galore(1e-2, rank=bad).init({"w": jnp.ones((16, 16))})


def test_rank_zero_needs_residual_rule():
  with pytest.raises(ValueError, match="residual"):
    lro.chain(lro.galore_project({"w": 0}), optax.scale_by_adam()).init(
        {"w": jnp.ones((16, 16))})


def test_unknown_proj_type_and_projector():
  with pytest.raises(ValueError, match="proj_type"):
    lro.galore(1e-2, rank=4, proj_type="diagonal")
  with pytest.raises(ValueError, match="projector"):
    lro.galore(1e-2, rank=4, projector="qr")
  with pytest.raises(ValueError, match="on_refresh"):
    lro.galore_project(4, on_refresh="rotate")
  with pytest.raises(ValueError, match="update_proj_gap"):
    lro.galore_project(4, update_proj_gap=0)


def test_missing_axis_raises_with_path():
  tx = lro.galore(1e-2, rank=4,
                  dimension_numbers={"attn": lro.MatrixView(0, 3)})
  with pytest.raises(ValueError, match="attn.*no axis 3"):
    tx.init({"attn": jnp.ones((16, 4, 8))})


def test_projection_element_in_optax_chain_names_the_fix():
  tx = optax.chain(lro.galore_project(8), optax.scale_by_adam())
  with pytest.raises(TypeError, match=r"lro\.chain"):
    tx.init({"w": jnp.ones((32, 32))})
  tx = optax.chain(optax.scale_by_adam(), lro.sign_residual())
  with pytest.raises(TypeError, match=r"lro\.chain"):
    tx.init({"w": jnp.ones((32, 32))})
