"""lro.contrib_galore against optax.contrib.galore itself, step for step.

Both take the SVD of the same float32 matrices (``jnp.linalg.svd``) at counts
0, T, 2T, ..., run ``optax.scale_by_adam`` on the low-rank gradients and map
back; the only differences are the order of float32 operations (our
einsums against optax's ``@``), so the updates agree to a few float32 ulps
of the update's size over several refreshes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers

import lowrank_optax as lro

STEPS, GAP = 7, 3


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, params


def _grads(rng, params):
  return [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                             p.dtype), params)
          for _ in range(STEPS)]


@pytest.mark.parametrize("case", ["default", "single", "pytree", "callable"])
def test_matches_optax_contrib_galore(case):
  rng = np.random.default_rng(0)
  params = {"tall": jnp.asarray(rng.standard_normal((24, 10)), jnp.float32),
            "wide": jnp.asarray(rng.standard_normal((10, 24)), jnp.float32),
            "square": jnp.asarray(rng.standard_normal((12, 12)), jnp.float32),
            "small": jnp.asarray(rng.standard_normal((3, 20)), jnp.float32),
            "attn": jnp.asarray(rng.standard_normal((12, 2, 8)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((10,)), jnp.float32)}
  attn = GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  dims = {
      "default": None,
      "single": GaLoreDimensionNumbers(),
      "pytree": {"tall": GaLoreDimensionNumbers(), "wide": None,
                 "square": GaLoreDimensionNumbers(), "small": None,
                 "attn": attn, "bias": None},
      "callable": lambda p: jax.tree.map(
          lambda x: attn if x.ndim == 3 else (
              GaLoreDimensionNumbers() if x.ndim == 2 else None), p),
  }[case]
  if case == "single":  # optax refuses a 2-axis spec for a 3-axis leaf
    del params["attn"]
  kw = dict(rank=4, update_proj_gap=GAP, scale=0.5, weight_decay=0.01,
            weight_dimension_numbers=dims)
  grads = _grads(rng, params)
  ref, ref_params = _run(optax.contrib.galore(1e-2, **kw), params, grads)
  ours, our_params = _run(lro.contrib_galore(1e-2, **kw), params, grads)
  for t, (a, b) in enumerate(zip(ours, ref)):
    for k in params:
      scale = float(jnp.max(jnp.abs(b[k]))) + 1e-30
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]),
                                 atol=2e-5 * scale, rtol=0,
                                 err_msg=f"{case}: {k} at step {t}")
  for k in params:
    np.testing.assert_allclose(our_params[k], ref_params[k], atol=1e-5)


def test_side_and_rank_follow_optax():
  """The larger dimension is reduced (rows on a tie), rank min(rank, m, n)."""
  params = {"tall": jnp.zeros((24, 10)), "wide": jnp.zeros((10, 24)),
            "square": jnp.zeros((12, 12)), "tiny": jnp.zeros((3, 5))}
  state = lro.subspace_state(lro.contrib_galore(1e-2, rank=4).init(params))
  proj = dict(zip(sorted(params), state.projector))
  assert proj["tall"].basis.shape == (24, 4)     # rows reduced
  assert proj["wide"].basis.shape == (24, 4)     # columns reduced
  assert proj["square"].basis.shape == (12, 4)   # a tie: rows
  assert proj["tiny"].basis.shape == (5, 3)      # rank min(4, 3, 5) = 3


def test_bad_rank_is_an_error():
  with pytest.raises(ValueError, match="positive int"):
    lro.contrib_galore(1e-2, rank=0)
