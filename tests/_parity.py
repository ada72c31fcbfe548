"""Test helpers shared by the parity tests against the official PyTorch packages.

Problems are built in PyTorch layout (``nn.Linear`` weights ``(out, in)``);
the library reads Flax layout ``(in, out)``, so 2-D arrays are transposed on
the way in and out. ``torch_side`` is the references' ``std`` rule in their
layout: ``right`` (a basis of the inputs) when ``out >= in``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_optax as lro
from _state import with_sub_state


def random_orthogonal(rng, n, k):
  q, r = np.linalg.qr(rng.standard_normal((n, k)))
  return q * np.sign(np.diag(r))


def make_problem(shapes, steps, seed, grad_scale):
  """Initial params and ``steps`` gradients (float32, PyTorch layout), with a
  well-separated spectrum (singular values in ratio 0.75, random singular
  vectors) so the singular vectors are well conditioned."""
  rng = np.random.default_rng(seed)
  params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in shapes.items()}
  grads = []
  for _ in range(steps):
    g = {}
    for k, s in shapes.items():
      if len(s) == 1:
        x = rng.standard_normal(s)
      else:
        m, n = s
        p = min(m, n)
        sv = 2.0 * 0.75 ** np.arange(p) * rng.uniform(0.8, 1.2)
        x = (random_orthogonal(rng, m, p) * sv) @ random_orthogonal(rng, n, p).T
      g[k] = (grad_scale * x).astype(np.float32)
    grads.append(g)
  return params, grads


def schedule(lr, steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.1 * lr, peak_value=lr, warmup_steps=3, decay_steps=steps,
      end_value=0.1 * lr)


def to_ours(tree):
  return {k: jnp.asarray(v.T if v.ndim == 2 else v) for k, v in tree.items()}


def to_torch_layout(x):
  x = np.asarray(x)
  return x.T if x.ndim == 2 else x


def torch_side(shape):
  return "right" if shape[0] >= shape[1] else "left"


def torch_basis_to_ours(shape, ortho):
  ortho = np.asarray(ortho, np.float32)
  return ortho.T if torch_side(shape) == "right" else ortho


def ref_svd_basis(g, rank):
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return vh[:rank, :] if torch_side(g.shape) == "right" else u[:, :rank]


def map_sub(state, fn):
  return with_sub_state(state, fn(lro.subspace_state(state)))


def set_count(state, k):
  return map_sub(state, lambda ss: ss._replace(count=jnp.full_like(ss.count, k)))


def leaf_keys(tree):
  return [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def align_signs(ours, ref):
  s = np.sign(np.sum(ours * ref, axis=0))
  s[s == 0] = 1
  return ours * s
