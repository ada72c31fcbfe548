"""memory_report of the GaLore-family recipes against ALGORITHMS.md section 12.

One Flax kernel ``(64, 96)`` at rank ``r = 8``. ``std`` reduces the smaller
dimension, the 64 inputs, so in section 12's notation (``m >= n``) ``n = 64``
is the projected side and ``m = 96``. Every float is float32 (4 bytes); each
optax moment state carries one int32 ``count`` (4 bytes), which the table
does not list. The other recipes' rows are tested in their own files
(test_apollo.py, test_frugal.py, test_q_galore.py, test_natural_galore.py).
"""

import jax
import jax.numpy as jnp
import pytest

import lowrank_optax as lro

M, N, R = 96, 64, 8
F32, COUNT = 4, 4
PARAMS = {"mlp": jax.ShapeDtypeStruct((N, M), jnp.float32)}   # (in, out)

GALORE = F32 * (R * N + 2 * M * R) + COUNT                      # basis rn, moments 2mr

ROWS = {
    "galore": (lambda: lro.galore(1e-2, rank=R), GALORE),
    # Fira: GaLore's row plus one scalar (the limiter's previous norm).
    "fira": (lambda: lro.fira(1e-2, rank=R), GALORE + F32),
    # OSD: GaLore's row plus the basis optimizer's AdamW moments (2rn) and count.
    "osd": (lambda: lro.online_subspace_descent(1e-2, rank=R),
            GALORE + F32 * 2 * R * N + COUNT),
    # DCT-AdamW: r int32 indices instead of the rn basis.
    "dct_adamw": (lambda: lro.dct_adamw(1e-3, rank=R),
                  4 * R + F32 * 2 * M * R + COUNT),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_leaf_state_matches_section_12(name):
  make, expected = ROWS[name]
  rep = lro.memory_report(make(), PARAMS)
  (leaf,) = rep.leaves
  assert (leaf.rank, leaf.side) == (R, "inputs")
  assert leaf.state_bytes == expected
  assert leaf.adam_bytes == F32 * 2 * M * N
  # What is not a leaf's are the recipe's scalar counters, a few bytes.
  assert 0 < rep.state_bytes - leaf.state_bytes < 64
