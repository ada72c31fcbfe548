"""LLaMA parameter pytrees (Flax layout) as ``jax.ShapeDtypeStruct`` leaves.

Model sizes follow GaLore's ``configs/*.json`` (ALGORITHMS.md section 11) plus
LLaMA-7B; vocabulary 32000 for all of them.

Flax layout: a dense kernel is stored ``(in, out)``. Per layer::

    attn/{q,k,v,o}   (d, d)
    mlp/{gate,up}    (d, ffn)
    mlp/down         (ffn, d)
    input_norm, post_norm   (d,)

plus ``embed`` (32000, d), ``final_norm`` (d,), ``lm_head`` (d, 32000).

Two layouts:

* ``per_layer``: ``{'layers_0': {...}, 'layers_1': {...}, ...}``
* ``stacked``  : ``{'layers': {'attn': {'q': (L, d, d), ...}, 'input_norm': (L, d), ...}}``
  (what ``nn.scan`` / ``nnx.scan`` over layers stores).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 32000


@dataclasses.dataclass(frozen=True)
class LlamaShape:
  name: str
  hidden: int
  ffn: int
  heads: int
  layers: int
  vocab: int = VOCAB


CONFIGS: dict[str, LlamaShape] = {
    "60m": LlamaShape("60m", 512, 1376, 8, 8),
    "130m": LlamaShape("130m", 768, 2048, 12, 12),
    "350m": LlamaShape("350m", 1024, 2736, 16, 24),
    "1b": LlamaShape("1b", 2048, 5461, 32, 24),
    "7b": LlamaShape("7b", 4096, 11008, 32, 32),
}

# GaLore paper ranks per size (ALGORITHMS.md 11.1; 1B: official script r1024, paper r512; 7B: paper r1024).
GALORE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

LAYOUTS = ("per_layer", "stacked")


def _dtype(dtype) -> Any:
  if isinstance(dtype, str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "f32": jnp.float32,
            "bf16": jnp.bfloat16}[dtype]
  return dtype


def _layer(cfg: LlamaShape, lead: tuple[int, ...], dt) -> dict:
  d, f = cfg.hidden, cfg.ffn
  s = lambda *shape: jax.ShapeDtypeStruct(lead + shape, dt)
  return {
      "attn": {"q": s(d, d), "k": s(d, d), "v": s(d, d), "o": s(d, d)},
      "mlp": {"gate": s(d, f), "up": s(d, f), "down": s(f, d)},
      "input_norm": s(d),
      "post_norm": s(d),
  }


def llama_params(size: str | LlamaShape, dtype="float32", layout: str = "per_layer") -> dict:
  """Parameter pytree of ``jax.ShapeDtypeStruct`` for a LLaMA size."""
  cfg = CONFIGS[size.lower()] if isinstance(size, str) else size
  dt = _dtype(dtype)
  tree: dict = {"embed": jax.ShapeDtypeStruct((cfg.vocab, cfg.hidden), dt)}
  if layout == "per_layer":
    for i in range(cfg.layers):
      tree[f"layers_{i}"] = _layer(cfg, (), dt)
  elif layout == "stacked":
    tree["layers"] = _layer(cfg, (cfg.layers,), dt)
  else:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  tree["final_norm"] = jax.ShapeDtypeStruct((cfg.hidden,), dt)
  tree["lm_head"] = jax.ShapeDtypeStruct((cfg.hidden, cfg.vocab), dt)
  return tree


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_projected_reference(path: str, shape) -> bool:
  """GaLore reference policy: attention / MLP matrices only (not embed, lm_head, norms)."""
  return len(shape) >= 2 and ("attn" in path or "mlp" in path)


def galore_min_state_bytes(tree, rank: int, state_dtype=None, counters: int = 1,
                           projector: str = "basis", proj_type: str = "std") -> dict:
  """Analytic minimum optimizer-state bytes of GaLore (ALGORITHMS.md section 12).

  Per projected matrix (m x n, batch axes multiply), with ``d`` the reduced
  dimension (``std``: ``min(m, n)``; ``reverse_std``: ``max(m, n)``) and ``k``
  the other one: projector ``r*d`` elements (``projector="basis"``) or ``r``
  int32 indices (``projector="indices"``, the DCT projector) + moments
  ``2*r*k``; every other leaf: ``2 x`` its size (Adam m, v); plus
  ``counters`` int32 scalars. Element size = ``state_dtype`` (default: the
  leaf's dtype). ``r`` is capped at ``min(m, n)``.
  """
  if projector not in ("basis", "indices") or proj_type not in ("std", "reverse_std"):
    raise ValueError(f"unknown projector / proj_type: {projector!r}, {proj_type!r}")
  proj = other = 0
  n_proj = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    p = path_str(path)
    item = np.dtype(state_dtype or leaf.dtype).itemsize
    shape = leaf.shape
    if is_projected_reference(p, shape) and min(shape[-2:]) > rank:
      batch = math.prod(shape[:-2])
      d, k = min(shape[-2:]), max(shape[-2:])
      if proj_type == "reverse_std":
        d, k = k, d
      basis = rank * d * item if projector == "basis" else rank * 4
      proj += batch * (basis + 2 * rank * k * item)
      n_proj += batch
    else:
      other += 2 * math.prod(shape) * item
  return {"projected": proj, "full": other, "counters": 4 * counters,
          "total": proj + other + 4 * counters, "n_matrices": n_proj}


def adam_state_bytes(tree, state_dtype=None) -> int:
  return sum(2 * math.prod(x.shape) * np.dtype(state_dtype or x.dtype).itemsize
             for x in jax.tree.leaves(tree)) + 4


def materialize(tree, seed: int = 0, scale: float = 1.0):
  """Random-normal arrays with the tree's shapes/dtypes (fixed seed)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [(scale * jax.random.normal(k, l.shape, jnp.float32)).astype(l.dtype)
         for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


if __name__ == "__main__":
  for name in CONFIGS:
    t = llama_params(name)
    print(f"{name:>5}: {num_params(t) / 1e6:8.1f} M params, {tree_bytes(t) / 2**30:6.2f} GiB float32")
