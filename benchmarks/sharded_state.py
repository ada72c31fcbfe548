"""Per-device optimizer-state bytes under FSDP on 8 devices, at LLaMA shapes (nothing allocated).

The parameters are ``jax.ShapeDtypeStruct`` s (``benchmarks/shapes.py``)
carrying a ``NamedSharding`` on a 1-D mesh ``("fsdp",)`` of 8 devices, FSDP
style: every leaf is sharded on one axis, its largest axis that divides by 8
(the first on a tie; for a stacked ``(L, M, N)`` leaf the largest of ``M``,
``N``: the layer axis is scanned over, not sharded); a leaf with no such axis
is replicated. At LLaMA-1B the MLP width 5461 does not divide by 8, so the
MLP kernels are sharded on their 2048 axis.

The optimizer state's shapes and shardings come from tracing ``init``
without allocating anything:

* ``explicit`` mesh (``jax.make_mesh``'s default axis type):
  ``jax.eval_shape(tx.init, params)`` under ``jax.set_mesh``: in an explicit
  mesh a traced array's sharding is its type, which is exactly what
  ``jax.jit(tx.init)`` returns; an array made without a mesh (``jnp.zeros``)
  has no sharding there and ``jit`` replicates it, so it is counted whole.
* ``auto`` mesh: ``lro.state_shardings(tx, params)`` (what
  ``jax.jit(tx.init, out_shardings=...)`` is given; it accepts any optax
  transform, and its shardings are those an eager ``tx.init`` on sharded
  arrays produces: ``zeros_like(param)`` keeps the param's sharding,
  ``jnp.zeros`` makes an unsharded array). The numbers equal the explicit
  mode's by construction (it traces ``init`` with the mesh made explicit);
  the rows show that the auto path gives the same layout.
* ``auto_plain_jit`` (the optax methods only): what XLA's propagation gives
  a plain ``jax.jit(tx.init)`` (``lower(...).compile().output_shardings``;
  init only makes zeros, so this compile is cheap). ``init`` reads no param
  value, so nothing propagates and the state comes out replicated: on an
  auto mesh, state shardings must be given as ``out_shardings``.

Per-device bytes = the sum over state leaves of the bytes of one shard
(``sharding.shard_shape``), i.e. what device 0 holds (every shard has the
same shape here).

Methods: ``optax.adamw``; ``optax.contrib.galore`` (rank 512 at 1B, 128 at
60M, ``shapes.GALORE_RANK``; its other arguments at their defaults: it
projects every 2-D leaf, embedding and head included); ``lro.galore`` with
the same ranks, default projector (``subspace_iteration``: a ``(d, r)``
basis per matrix) and ``projector="dct"`` (``r`` int32 indices per matrix).

Example:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python3 benchmarks/sharded_state.py --sizes 60m,1b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                    ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import shapes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lowrank_optax as lro  # noqa: E402

N_DEVICES = 8
METHODS = ("adamw", "contrib_galore", "lro_galore", "lro_galore_dct")
OPTAX_METHODS = ("adamw", "contrib_galore")


def make_tx(method: str, rank: int):
  if method == "adamw":
    return optax.adamw(1e-3)
  if method == "contrib_galore":
    return optax.contrib.galore(1e-3, rank=rank)
  if method == "lro_galore":
    return lro.galore(1e-3, rank=rank)
  if method == "lro_galore_dct":
    return lro.galore(1e-3, rank=rank, projector="dct")
  raise ValueError(method)


def fsdp_spec(shape) -> P:
  """One sharded axis: the largest divisible by the mesh (first on a tie);
  for ndim >= 3 only the last two (matrix) axes are candidates."""
  candidates = range(len(shape)) if len(shape) <= 2 else (len(shape) - 2,
                                                           len(shape) - 1)
  best = None
  for a in candidates:
    if shape[a] % N_DEVICES == 0 and (best is None or shape[a] > shape[best]):
      best = a
  if best is None:
    return P()
  return P(*(("fsdp" if a == best else None) for a in range(len(shape))))


def sharded_params(tree, mesh):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, fsdp_spec(x.shape))),
      tree)


def nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def state_bytes(shapes_tree, shardings_tree):
  """(total, per-device, #arrays, #replicated non-scalar arrays, their bytes)."""
  total = per_device = n = replicated = replicated_bytes = 0
  for x, s in zip(jax.tree.leaves(shapes_tree), jax.tree.leaves(
      shardings_tree, is_leaf=lambda s: s is None)):
    b = nbytes(x.shape, x.dtype)
    total += b
    n += 1
    shard = (tuple(x.shape) if not isinstance(s, jax.sharding.Sharding)
             else tuple(s.shard_shape(x.shape)))
    per_device += nbytes(shard, x.dtype)
    if x.ndim > 0 and shard == tuple(x.shape):
      replicated += 1
      replicated_bytes += b
  return total, per_device, n, replicated, replicated_bytes


def measure(method, size, mode, layout, dtype):
  axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  if mode == "auto_plain_jit" and method not in OPTAX_METHODS:
    return None
  mesh = jax.make_mesh((N_DEVICES,), ("fsdp",), axis_types=(axis_type,))
  params = sharded_params(shapes.llama_params(size, dtype, layout), mesh)
  rank = shapes.GALORE_RANK[size]
  tx = make_tx(method, rank)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if mode == "explicit":
      with jax.set_mesh(mesh):
        out = jax.eval_shape(tx.init, params)
      shardings = jax.tree.map(lambda x: x.sharding, out)
      how = "eval_shape (explicit types)"
    elif mode == "auto_plain_jit":
      out = jax.eval_shape(tx.init, params)
      compiled = jax.jit(tx.init).lower(params).compile()
      shardings = compiled.output_shardings
      how = "jit(init) output_shardings (XLA propagation)"
    else:
      out = jax.eval_shape(tx.init, params)
      shardings = lro.state_shardings(tx, params)
      how = "lro.state_shardings"
  total, per_device, n, replicated, replicated_bytes = state_bytes(
      out, shardings)
  param_total, param_dev, _, _, _ = state_bytes(
      params, jax.tree.map(lambda x: x.sharding, params))
  return {"size": size, "method": method, "mode": mode, "layout": layout,
          "dtype": dtype, "rank": rank, "state_total_bytes": total,
          "state_per_device_bytes": per_device,
          "per_device_over_total": per_device / total,
          "n_state_arrays": n, "n_replicated_arrays": replicated,
          "replicated_bytes": replicated_bytes,
          "param_total_bytes": param_total,
          "param_per_device_bytes": param_dev, "shardings_from": how}


def mib(b):
  return f"{b / 2**20:,.1f}"


def table(rows) -> str:
  out = ["| size | mode | method | rank | state total (MiB) | per device (MiB)"
         " | per device / total | per device vs adamw | replicated arrays"
         " (MiB each device holds whole) |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  adamw = {(r["size"], r["mode"]): r["state_per_device_bytes"]
           for r in rows if r["method"] == "adamw"}
  for r in rows:
    ref = adamw.get((r["size"], r["mode"]))
    vs = "" if not ref else f"{r['state_per_device_bytes'] / ref:.3f}"
    out.append(
        f"| {r['size']} | {r['mode']} | {r['method']} | {r['rank']} |"
        f" {mib(r['state_total_bytes'])} | {mib(r['state_per_device_bytes'])}"
        f" | {r['per_device_over_total']:.4f} | {vs} |"
        f" {r['n_replicated_arrays']}/{r['n_state_arrays']}"
        f" ({mib(r['replicated_bytes'])}) |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="60m,1b")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--modes", default="explicit,auto,auto_plain_jit")
  ap.add_argument("--layout", default="per_layer", choices=shapes.LAYOUTS)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "sharded_state.json"))
  args = ap.parse_args(argv)
  if jax.device_count() < N_DEVICES:
    raise SystemExit(f"needs {N_DEVICES} devices; run with XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={N_DEVICES}")
  rows = []
  for size in args.sizes.split(","):
    for mode in args.modes.split(","):
      for method in args.methods.split(","):
        row = measure(method, size, mode, args.layout, args.dtype)
        if row is not None:
          rows.append(row)
  print(f"Optimizer state per device, FSDP over {N_DEVICES} devices"
        f" ({args.layout}, {args.dtype}; 1/{N_DEVICES} = {1 / N_DEVICES:.4f})")
  print()
  print(table(rows))
  print()
  for r in rows:
    if r["method"] == "adamw" and r["mode"] == "explicit":
      print(f"{r['size']} {r['mode']}: params {mib(r['param_total_bytes'])}"
            f" MiB total, {mib(r['param_per_device_bytes'])} MiB per device")
  if args.json:
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
