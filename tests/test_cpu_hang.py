"""Regression test: stacked leaves must not hang XLA:CPU.

With one CPU device on a small machine (2 cores), a jitted program holding
two concurrent *batched* Cholesky or triangular-solve calls deadlocked
(jaxlib 0.10.2): ``jax.jit(tx.init)`` of ``lro.galore`` with the
subspace-iteration projector hung forever on the stacked layers of
LLaMA-60M, and so did ``speed.py --layout stacked``. The library now maps
those two calls over the batch on CPU (``projectors.base._per_matrix_on_cpu``).

The suite runs with 8 virtual devices (conftest.py), which hides the hang, so
this test runs a fresh interpreter with the default single device and a time
limit. The hang is timing-dependent: on the 2-core development machine the
script below hangs every time without the fix when run from a shell or from
``pytest -s``; under pytest's default output capture it happened to finish.
On machines with many cores it may not reproduce at all.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import lowrank_optax as lro
    assert jax.device_count() == 1, jax.devices()
    from lowrank_optax.projectors import orthonormalize

    # The smallest reproducer: two batched Cholesky-QRs in one program.
    def two_blocks(key):
      return [orthonormalize(jax.random.normal(k, (2, 512, 128)), passes=1)
              for k in jax.random.split(key, 2)]
    jax.block_until_ready(jax.jit(two_blocks)(jax.random.key(0)))

    rng = np.random.default_rng(0)
    # The stacked layers of LLaMA-60M (8 layers): the hang's reproducer.
    shapes = {"q": (8, 512, 512), "k": (8, 512, 512), "v": (8, 512, 512),
              "o": (8, 512, 512), "gate": (8, 512, 1376), "up": (8, 512, 1376),
              "down": (8, 1376, 512)}
    params = {k: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32)
              for k, s in shapes.items()}
    params["embed"] = jnp.zeros((32000, 512))  # full rank, like the model's
    params["norm"] = jnp.ones((8, 512))
    for projector in ("subspace_iteration", "randomized"):
      tx = lro.galore(1e-3, rank=128, update_proj_gap=2, projector=projector)
      state = jax.jit(tx.init)(params)
      update = jax.jit(tx.update)
      for _ in range(3):  # counts 0 (cold refresh), 1, 2 (warm refresh)
        u, state = update(params, state, params)
      jax.block_until_ready((u, state))
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    print("done")
""")


def test_stacked_subspace_iteration_runs_on_one_cpu_device():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the default: one host device
  env["JAX_PLATFORMS"] = "cpu"
  try:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                         capture_output=True, text=True, timeout=240,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
  except subprocess.TimeoutExpired:
    pytest.fail("jitted init/update of stacked leaves did not finish in 240 s"
                " (XLA:CPU batched Cholesky / triangular-solve hang)")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("done")
