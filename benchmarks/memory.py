"""Compile-only memory benchmark on LLaMA shapes: optax.adamw vs optax.contrib.galore vs lro.galore.

Nothing the size of a parameter is ever allocated: parameters, gradients and
optimizer states are ``jax.ShapeDtypeStruct`` trees (``benchmarks/shapes.py``,
``jax.eval_shape``), and programs are only lowered and compiled, never run.
So 7B runs on a laptop-sized host (XLA compilation time is the cost).

Per size and method it reports:

* **state**: bytes of ``jax.eval_shape(tx.init, params)`` (sum over leaves),
  next to Adam's (``shapes.adam_state_bytes``: m and v, params' dtype) and the
  analytic GaLore minimum of ALGORITHMS.md section 12
  (``shapes.galore_min_state_bytes``: projector ``r*n`` + moments ``2*r*m``
  per attention / MLP matrix, Adam ``m, v`` for every other leaf, one
  counter; for ``dct`` methods ``r`` int32 indices instead of the ``r*n``
  basis, for ``+reverse_std`` methods ``r*m`` + ``2*r*n``). ``state/min`` is the ratio (target for lro methods: within 1%;
  reported, not asserted). ``optax.contrib.galore`` projects *every* 2-D leaf
  (embedding and head too) and no 3-D (stacked) leaf, so its ratio is well
  below 1 in the per-layer layout and well above 1 in the stacked one.
* **optimizer step, compile-only**: ``jax.jit(step, donate_argnums=(0, 2))``
  with ``step(params, grads, state) = tx.update + optax.apply_updates``,
  lowered on the abstract trees and compiled; from
  ``compiled.memory_analysis()``: argument, output, temp and alias bytes and
  ``peak ~ argument + output + temp - alias`` (params, grads and state
  resident, outputs written in place of the donated params / state). The
  update contains the refresh branch (``lax.cond``), so temp covers the
  refresh step (SVD / eigh / ... workspaces) too. ``memory_analysis()`` may
  be ``None`` (or raise) on some backends: the columns then read "—".
  XLA's own ``peak_memory_in_bytes`` is kept in the JSON (``peak_memory``);
  on XLA:CPU (jax 0.10) it equals argument + output - alias, i.e. it leaves
  the temp block out, so the tables use the estimate above (an upper bound:
  the temp block is one preallocation for the whole program). Temp sizes are
  backend-specific: XLA:CPU keeps many full-size ``m x n`` buffers (SVD
  factors, back-projected updates) live at once when every gradient is an
  input. With bf16 params the temps on XLA:CPU are large: the refresh of a
  bf16 leaf runs in float32 (projectors.refresh casts the gradient), and the
  CPU backend evidently computes bf16 matmuls through float32 copies (the
  model's fwd+bwd alone at 7B: 22.2 GiB temp in bf16 against 1.8 GiB in
  float32), so bf16 peaks measured on CPU say little about a GPU.
* **train step, compile-only** (on by default, ``--no-train-step`` skips it):
  forward + backward + update
  of ``examples/llama.py``'s ``Llama`` at these shapes, batch
  ``--train-batch`` x ``--train-seq`` tokens, ``donate_argnums`` on params and
  state; the model is built with ``nnx.eval_shape`` and split into abstract
  params, so nothing is allocated. A "fwd+bwd only" row (``jax.value_and_grad``
  of the loss, no optimizer) gives the floor. The example model is always
  per-layer (a Python loop over blocks), whatever ``--layout`` says, and
  float32 unless ``--dtype bfloat16`` (then its params are cast to bf16; RoPE
  tables stay float32, so part of the attention runs in float32). It roughly
  doubles the run time: on 2 shared CPU cores each train step compiles in
  about 1-1.5x the time of its optimizer step (at 7B: 5-15 s, but about 110 s
  for ``subspace_iteration``, whose compiles are the slowest everywhere; the
  whole default run takes 13-16 min).
  Unlike the optimizer step, where all gradients are inputs, here XLA can
  apply each layer's update as soon as its gradient is ready, so the peak is
  about params + state + activations/workspace, not params + grads + state.
* With ``--dtype bfloat16``: BF16 params + optimizer state next to the GaLore
  paper's Table 2 memory estimates (60M 0.36G Adam / 0.24G GaLore, 130M
  0.76G / 0.52G, 350M 2.06G / 1.22G, 1B 7.80G / 4.38G); for every dtype, the
  state reduction vs Adam next to the paper's -65.5% at 7B.

Example:
  python3 benchmarks/memory.py --sizes 60m,130m --methods adamw,contrib,svd,subspace_iteration
  python3 benchmarks/memory.py --sizes 60m,130m,350m,1b,7b --dtype bfloat16 --json /tmp/mem.json
  python3 benchmarks/memory.py --sizes 1b --layout stacked --methods adamw,eigh --no-train-step
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
import shapes  # noqa: E402

warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")

DEFAULT_METHODS = "adamw,contrib,svd,subspace_iteration,eigh"

# GaLore paper (Zhao et al., 2024), Table 2: memory estimates of BF16 params +
# optimizer states, in "G". 7B: GaLore reports -65.5% optimizer-state memory.
PAPER_TABLE2 = {"60m": (0.36, 0.24), "130m": (0.76, 0.52), "350m": (2.06, 1.22),
                "1b": (7.80, 4.38)}
PAPER_7B_STATE_REDUCTION = -0.655

_MA_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


# ----------------------------------------------------------------------------- helpers


def memory_stats(compiled) -> Optional[dict]:
  """``compiled.memory_analysis()`` as a dict with a peak estimate, or ``None``."""
  try:
    ma = compiled.memory_analysis()
  except Exception as e:  # pragma: no cover - backend dependent
    print(f"[memory] memory_analysis() failed: {type(e).__name__}: {e}", file=sys.stderr)
    return None
  if ma is None:
    return None
  if isinstance(ma, (list, tuple)):  # one entry per device / executable on some versions
    if not ma or ma[0] is None:
      return None
    ma = ma[0]
  out = {}
  for f in _MA_FIELDS:
    v = getattr(ma, f, None)
    out[f.replace("_size_in_bytes", "").replace("_in_bytes", "")] = (
        None if v is None else int(v))
  if None in (out["argument"], out["output"], out["temp"], out["alias"]):
    return None
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def compile_memory(fn, *args, donate_argnums=()) -> dict:
  """Lowers and compiles ``jax.jit(fn)`` on abstract ``args``; memory stats + timings."""
  t = common.now()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  t1 = common.now()
  compiled = lowered.compile()
  t2 = common.now()
  res = {"lower_s": t1 - t, "compile_s": t2 - t1, "memory": memory_stats(compiled)}
  del lowered, compiled
  gc.collect()
  return res


def opt_step_memory(tx, params_sds) -> dict:
  state_sds = jax.eval_shape(tx.init, params_sds)

  return compile_memory(common.optimizer_step(tx), params_sds, params_sds, state_sds, donate_argnums=(0, 2))


def abstract_llama(size: str, dtype: str, seq: int):
  """``(llama module, graphdef, abstract params, abstract rest)`` of examples/llama.py's Llama."""
  llama = common.load_llama("memory")
  if llama is None:
    return None
  from flax import nnx
  s = shapes.CONFIGS[size]
  cfg = llama.LlamaConfig(vocab_size=s.vocab, dim=s.hidden, n_layers=s.layers, n_heads=s.heads,
                          ffn_dim=s.ffn, max_seq_len=seq)
  model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  dt = shapes._dtype(dtype)
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      params)
  return llama, graphdef, params, rest


def train_step_memory(size: str, methods: list[common.Method], *, batch: int, seq: int,
                      dtype: str) -> Optional[list[dict]]:
  """Compile-only forward + backward (+ update) of examples/llama.py's Llama."""
  got = abstract_llama(size, dtype, seq)
  if got is None:
    print("[memory] examples/llama.py not available: skipping --train-step", file=sys.stderr)
    return None
  llama, graphdef, params, rest = got
  from flax import nnx
  data = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

  def loss(p, r, b):
    return llama.loss_fn(nnx.merge(graphdef, p, r), b)

  out = []
  r = compile_memory(jax.value_and_grad(loss), params, rest, data)
  r.update(method="fwd+bwd", label="forward + backward only")
  out.append(r)
  print(f"  train-step {size} fwd+bwd: compile {r['lower_s'] + r['compile_s']:.1f} s", flush=True)
  for m in methods:
    tx = m.make()
    state = jax.eval_shape(tx.init, params)

    def train_step(p, st, r, b, tx=tx):
      l, g = jax.value_and_grad(loss)(p, r, b)
      u, st = tx.update(g, st, p)
      return optax.apply_updates(p, u), st, l

    res = compile_memory(train_step, params, state, rest, data, donate_argnums=(0, 1))
    res.update(method=m.name, label=m.label)
    out.append(res)
    print(f"  train-step {size} {m.label}: compile {res['lower_s'] + res['compile_s']:.1f} s",
          flush=True)
  return out


# ----------------------------------------------------------------------------- formatting


def _b(mem: Optional[dict], key: str) -> str:
  return "—" if mem is None or mem.get(key) is None else common.fmt_bytes(mem[key])


def _gb(b: Optional[int]) -> str:
  return "—" if b is None else f"{b / 1e9:.2f} GB"


def _pct(a, b) -> str:
  if a is None or not b:
    return "—"
  return f"{100 * (a / b - 1):+.1f}%"


def _peak(r: Optional[dict]) -> Optional[int]:
  return None if r is None or r.get("memory") is None else r["memory"]["peak_estimate"]


def state_table(size: str, results: list[dict], *, adam_b: int, gmin: dict, params_b: int,
                dtype: str) -> str:
  """``gmin``: the analytic minimum per method name (``"default"`` for the rest)."""
  headers = ["optimizer", "state", "state (GB)", "Adam state (analytic)", "GaLore min (analytic)",
             "state / min", "state vs Adam"]
  bf16 = dtype == "bfloat16"
  if bf16:
    headers += ["bf16 params + state", "paper Table 2", "ours / paper"]
  if size == "7b":
    headers += ["paper (7B state vs Adam)"]
  rows = []
  for r in results:
    sb = r["state_bytes"]
    lowrank = r["kind"] in ("contrib", "lro")
    mn = gmin.get(r["method"], gmin["default"])["total"]
    row = [r["label"], common.fmt_bytes(sb), _gb(sb), common.fmt_bytes(adam_b),
           common.fmt_bytes(mn), f"{sb / mn:.4f}" if lowrank else "—", _pct(sb, adam_b)]
    if bf16:
      tot = params_b + sb
      paper = PAPER_TABLE2.get(size)
      pv = None if paper is None else paper[1 if lowrank else 0]
      row += [f"{_gb(tot)} ({common.fmt_bytes(tot)})",
              "—" if pv is None else f"{pv:.2f}G ({'GaLore' if lowrank else 'Adam'})",
              "—" if pv is None else f"{tot / 1e9 / pv:.2f}x (GB) / {tot / 2**30 / pv:.2f}x (GiB)"]
    if size == "7b":
      row += [f"{100 * PAPER_7B_STATE_REDUCTION:+.1f}%" if lowrank else "—"]
    rows.append(row)
  return common.md_table(headers, rows)


def peak_table(results: list[dict], train: Optional[list[dict]]) -> str:
  base = next((_peak(r["opt_step"]) for r in results if r["method"] == "adamw"), None)
  headers = ["optimizer", "argument", "output", "temp", "alias", "opt-step peak",
             "peak vs adamw", "lower+compile s"]
  tr = {}
  tbase = None
  if train:
    tr = {t["method"]: t for t in train}
    tbase = _peak(tr.get("adamw"))
    headers += ["train-step peak", "train temp", "train vs adamw", "train lower+compile s"]
  rows = []
  for r in results:
    o = r["opt_step"]
    m = o["memory"]
    row = [r["label"], _b(m, "argument"), _b(m, "output"), _b(m, "temp"), _b(m, "alias"),
           _b(m, "peak_estimate"), common.fmt_ratio(_peak(o), base),
           f"{o['lower_s'] + o['compile_s']:.1f}"]
    if train:
      t = tr.get(r["method"])
      row += (["—"] * 4 if t is None else
              [_b(t["memory"], "peak_estimate"), _b(t["memory"], "temp"),
               common.fmt_ratio(_peak(t), tbase), f"{t['lower_s'] + t['compile_s']:.1f}"])
    rows.append(row)
  if train and "fwd+bwd" in tr:
    t = tr["fwd+bwd"]
    rows.append([t["label"] + " (no optimizer)"] + ["·"] * 7 +
                [_b(t["memory"], "peak_estimate"), _b(t["memory"], "temp"),
                 common.fmt_ratio(_peak(t), tbase), f"{t['lower_s'] + t['compile_s']:.1f}"])
  return common.md_table(headers, rows)


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_shape_args(ap, "60m,130m,350m,1b,7b")
  ap.add_argument("--methods", default=DEFAULT_METHODS,
                  help="comma list of: adamw, contrib, svd, subspace_iteration, eigh, randomized,"
                       " <proj>+stagger, all (adamw is always added as the baseline)")
  ap.add_argument("--no-opt-step", action="store_true",
                  help="skip compiling the optimizer step (state bytes only, plus --train-step)")
  ap.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                  help="also compile forward+backward+update of examples/llama.py at these shapes"
                       " (default on; --no-train-step skips it)")
  ap.add_argument("--train-batch", type=int, default=1)
  ap.add_argument("--train-seq", type=int, default=256)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  lro = common.import_lro()
  env = common.env_info()
  t_start = common.now()
  common.print_header("memory.py", env, argv, "; compile-only, nothing allocated")
  payload: dict[str, Any] = {"env": env, "args": vars(args), "results": {}}

  for size in [s.strip().lower() for s in args.sizes.split(",") if s.strip()]:
    t_size = common.now()
    rank = args.rank or shapes.GALORE_RANK[size]
    methods = common.make_methods(args.methods, rank=rank, gap=args.gap, lro=lro)
    if "adamw" not in [m.name for m in methods]:
      methods = common.make_methods("adamw", rank=rank, gap=args.gap, lro=lro) + methods
    else:
      methods = sorted(methods, key=lambda m: m.name != "adamw")
    sds = shapes.llama_params(size, args.dtype, args.layout)
    params_b = shapes.tree_bytes(sds)
    adam_b = shapes.adam_state_bytes(sds)
    gmin = {"default": shapes.galore_min_state_bytes(sds, rank)}
    for m in methods:  # the DCT projector stores indices; reverse_std swaps the sides
      if m.kind == "lro":
        gmin[m.name] = shapes.galore_min_state_bytes(
            sds, rank, projector="indices" if m.projector == "dct" else "basis",
            proj_type=m.proj_type)
    print(f"\n## {size} ({shapes.num_params(sds) / 1e6:.1f} M params = {common.fmt_bytes(params_b)},"
          f" {args.dtype}, {args.layout}, rank {rank}, T={args.gap})", flush=True)

    results = []
    for m in methods:
      tx = m.make()
      state_sds = jax.eval_shape(tx.init, sds)
      r = {"method": m.name, "label": m.label, "kind": m.kind,
           "state_bytes": shapes.tree_bytes(state_sds)}
      if not args.no_opt_step:
        print(f"  {m.label} ...", end="", flush=True)
        r["opt_step"] = opt_step_memory(tx, sds)
        mem = r["opt_step"]["memory"]
        print(f" state {common.fmt_bytes(r['state_bytes'])}, opt-step peak {_b(mem, 'peak_estimate')}"
              f" (lower+compile {r['opt_step']['lower_s'] + r['opt_step']['compile_s']:.1f} s)",
              flush=True)
      results.append(r)

    print(f"\nOptimizer state ({size}, {args.dtype}, {args.layout}, rank {rank}); analytic min:"
          f" ALGORITHMS.md 12 ({gmin['default']['n_matrices']} projected matrices; per method:"
          f" r int32 indices instead of the basis for dct, sides swapped for reverse_std)\n")
    t1 = state_table(size, results, adam_b=adam_b, gmin=gmin, params_b=params_b, dtype=args.dtype)
    print(t1, flush=True)
    entry = {"rank": rank, "num_params": shapes.num_params(sds), "params_bytes": params_b,
             "adam_state_bytes": adam_b, "galore_min": gmin, "results": results,
             "state_table": t1}

    train = None
    if args.train_step:
      train = train_step_memory(size, methods,
                                batch=args.train_batch, seq=args.train_seq, dtype=args.dtype)
      entry["train_step"] = train
    if not args.no_opt_step or train:
      if args.no_opt_step:
        for r in results:
          r["opt_step"] = {"memory": None, "lower_s": 0.0, "compile_s": 0.0}
      print("\nPeak bytes, compile-only (memory_analysis; peak = argument + output + temp - alias)."
            " Optimizer step: params + grads + state in, params + state donated."
            + (f" Train step: examples/llama.py, batch {args.train_batch} x seq {args.train_seq},"
               f" per-layer model, params + state donated." if train else "") + "\n")
      t2 = peak_table(results, train)
      print(t2, flush=True)
      entry["peak_table"] = t2
    entry["wall_s"] = common.now() - t_size
    print(f"\n({size}: {entry['wall_s']:.0f} s)", flush=True)
    payload["results"][size] = entry
    gc.collect()

  payload["wall_s"] = common.now() - t_start
  print(f"\n# total {payload['wall_s']:.0f} s", flush=True)
  common.write_json(args.json, payload)


if __name__ == "__main__":
  main()
