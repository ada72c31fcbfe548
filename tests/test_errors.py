"""Errors that teach: every user-facing message names what was wrong, where
(the leaf path and shape, or the rule), and what to do instead."""

import re
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import lowrank_optax as lro

PARAMS = {"blocks": {"attn": jnp.zeros((32, 32)), "mlp": jnp.zeros((32, 64))},
          "embed": jnp.zeros((100, 32)), "norm": jnp.zeros((32,))}


def test_invalid_regex_names_the_rule_and_the_fix():
  with pytest.raises(ValueError, match=r"rank rule 'attn\[' is not a valid"
                     r" regular expression.*re\.escape"):
    lro.galore(1e-2, rank={"attn[": 4})
  with pytest.raises(ValueError, match=r"exclude pattern '\(' is not a valid"):
    lro.galore(1e-2, rank=4, exclude="(")
  with pytest.raises(ValueError, match=r"dimension_numbers rule"):
    lro.galore(1e-2, rank=4, dimension_numbers={"q[": lro.MatrixView()})


def test_negative_rank_says_whose_rank():
  with pytest.raises(ValueError, match=r"rank of every projected leaf\) must"
                     r" be a positive int, got -4"):
    lro.galore(1e-2, rank=-4)
  with pytest.raises(ValueError, match=r"rank of the rule 'mlp' must be a"
                     r" positive int, got -1"):
    lro.galore(1e-2, rank={"mlp": -1})
  with pytest.raises(ValueError, match=r"fractional rank .* \(0, 1\]"):
    lro.galore(1e-2, rank=1.5)
  # A callable's bad rank names the leaf and its shape.
  tx = lro.galore(1e-2, rank=lambda path, leaf: -2)
  with pytest.raises(ValueError, match=r"of leaf 'blocks/attn' \(shape"
                     r" \(32, 32\)\) must be a positive int"):
    tx.init(PARAMS)


def test_rank_under_inject_hyperparams_points_to_static_args():
  tx = optax.inject_hyperparams(lro.galore)(learning_rate=1e-2, rank=8)
  with pytest.raises(TypeError, match=r"static_args=\('rank',\)"):
    tx.init(PARAMS)
  ok = optax.inject_hyperparams(lro.galore, static_args=("rank",))(
      learning_rate=1e-2, rank=8)
  ok.init(PARAMS)


def test_params_needing_transform_inside_the_subspace():
  tx = lro.chain(lro.galore_project(4), optax.scale_by_adam(),
                 optax.add_decayed_weights(1e-2), lro.back_project())
  with pytest.raises(ValueError, match=r"(?s)params=None.*after the closer.*"
                     r"lro\.back_project\(\), optax\.add_decayed_weights"):
    tx.init(PARAMS)


def test_shape_change_between_init_and_update_names_the_leaf():
  tx = lro.galore(1e-2, rank=4)
  state = tx.init(PARAMS)
  bad = dict(PARAMS, blocks=dict(PARAMS["blocks"], mlp=jnp.zeros((64, 32))))
  with pytest.raises(ValueError, match=r"Leaf 'blocks/mlp': the gradient has"
                     r" shape \(64, 32\).*transposed after init"):
    tx.update(bad, state, bad)
  bad = dict(PARAMS, norm=jnp.zeros((16,)))
  with pytest.raises(ValueError, match=r"Leaf 'norm': the gradient has shape"
                     r" \(16,\)"):
    tx.update(bad, state, bad)


def _warnings(tx, params):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init(params)
  return [str(w.message) for w in caught
          if issubclass(w.category, lro.PolicyWarning)]


def test_policy_mistakes_warn_with_the_pattern_and_the_leaves():
  msgs = _warnings(lro.galore(1e-2, rank={"mpl": 8}), PARAMS)
  assert any(re.search(r"rule 'mpl' matches no leaf.*blocks/attn", m)
             for m in msgs), msgs
  assert any("projects none of the" in m for m in msgs), msgs
  msgs = _warnings(lro.galore(1e-2, rank={"mlp": 64}), PARAMS)
  assert any(re.search(r"'blocks/mlp' of shape \(32, 64\): its rank is"
                       r" clamped to 32", m) for m in msgs), msgs
  msgs = _warnings(lro.galore(1e-2, rank=4), {"q": jnp.zeros((256, 8, 32))})
  assert any(re.search(r"'q' of shape \(256, 8, 32\) is projected as 256"
                       r" separate 8x32 matrices.*MatrixView", m)
             for m in msgs), msgs
  msgs = _warnings(lro.galore(1e-2, rank=16), {"o": jnp.zeros((4, 16, 32))})
  assert any(re.search(r"'o' of shape \(4, 16, 32\) stays at full rank", m)
             for m in msgs), msgs
  # A sound policy says nothing.
  assert not _warnings(lro.galore(1e-2, rank=8), PARAMS)


def test_unknown_projector_and_proj_type_list_the_choices():
  with pytest.raises(ValueError, match=r"Unknown projector 'svdd'.*'svd'"):
    lro.galore(1e-2, projector="svdd")
  with pytest.raises(ValueError, match=r"Unknown proj_type 'sdt'.*'std'"):
    lro.galore(1e-2, proj_type="sdt")
  with pytest.raises(ValueError, match=r"Unknown on_refresh 'kep'"):
    lro.galore(1e-2, on_refresh="kep")


def test_projection_element_in_optax_chain_names_lro_chain():
  tx = optax.chain(lro.galore_project(4), optax.scale_by_adam())
  with pytest.raises(TypeError, match=r"lro\.chain"):
    tx.init(PARAMS)


def test_subspace_state_without_a_projection_says_why():
  with pytest.raises(ValueError, match=r"found 0\. This optimizer has no"
                     r" projection .*lro\.frugal\(mode='block'\)"):
    lro.subspace_state(optax.adamw(1e-3).init(PARAMS))
  state = lro.frugal(1e-3, rho=0.5).init(PARAMS)
  with pytest.raises(ValueError, match=r"ActiveBlocksState"):
    lro.subspace_state(state)
  two = (lro.galore(1e-2, rank=4).init(PARAMS),
         lro.galore(1e-2, rank=4).init(PARAMS))
  with pytest.raises(ValueError, match=r"found 2\. Several"):
    lro.subspace_state(two)


def test_memory_report_rows_of_contrib_galore_name_rank_and_side():
  # Its projection is built from the params; the report asks for it with
  # the params it reports on. optax.contrib.galore reduces the larger
  # dimension: for a (32, 64) kernel that is the 64 outputs.
  rep = lro.memory_report(lro.contrib_galore(1e-3, rank=4), PARAMS)
  rows = {r.path: r for r in rep.leaves}
  assert (rows["blocks/mlp"].rank, rows["blocks/mlp"].side) == (4, "outputs")
  # A leaf's state: a 64 x 4 basis and two 32 x 4 moments (float32), plus
  # the inner Adam's int32 counter.
  assert rows["blocks/mlp"].state_bytes == (64 * 4 + 2 * 32 * 4) * 4 + 4
  assert rows["norm"].rank is None
