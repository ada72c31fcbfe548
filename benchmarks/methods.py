"""Every method on the main job's budget: held-out loss, state bytes, tokens/s, one plot.

Runs ``examples/pretrain_lm.py``'s ``train()`` (the README's main job: a
byte-level LLaMA on the CPython docs) once per method and seed with the same
model, data, steps, schedule shape and rank, each method at its papers'
learning rate (the main job's per-optimizer default) and otherwise its
recipe's defaults; ``optax.adamw`` and ``optax.contrib.galore`` run side by
side in the same process. Prints a markdown table (held-out loss mean and
spread over seeds, relative to AdamW, optimizer-state bytes against AdamW's,
tokens/s, refresh steps) and writes one plot with every method's held-out
loss curve (mean over seeds) and JSON with every run's record.

    python benchmarks/methods.py --seeds 0,1 --out benchmarks/results/methods_cpu

Tokens/s on a shared 2-core CPU are noisy (other processes, thermal); they
are the median step's throughput of each run, reported as measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE.parent))

import pretrain_lm  # noqa: E402

DEFAULT_METHODS = ("adamw,contrib_galore,galore,fira,apollo,apollo_mini,frugal,"
                   "natural_galore,q_galore,osd,dct_adamw")


def run_all(methods, seeds, overrides, out: Path) -> dict:
  records = {}
  for method in methods:
    for seed in seeds:
      t0 = time.perf_counter()
      cfg = dict(overrides, optimizer=method, seed=seed, progress=False,
                 plot=False, out=str(out / "runs" / f"{method}_s{seed}"))
      try:
        rec = pretrain_lm.train(cfg)
      except Exception as e:  # pylint: disable=broad-except
        print(f"[methods] {method} seed {seed} failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        records.setdefault(method, []).append({"error": f"{type(e).__name__}: {e}"})
        continue
      m = rec["metrics"]
      print(f"[methods] {method:15s} seed {seed}: held-out {m['held_out_loss']:.4f}"
            f"  state {m['state_bytes'] / 2**20:.3f} MiB  {m['tokens_per_s']:,.0f} tok/s"
            f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
      records.setdefault(method, []).append(rec)
  return records


def median_step_tok_s(rec) -> float:
  c, times = rec["config"], rec["curves"]["step_time_s"]
  compiled = rec["curves"].get("step_compiled", [False] * len(times))
  times = [t for t, comp in zip(times, compiled) if not comp]
  return c["batch_size"] * c["seq_len"] / float(np.median(times))


def table(records) -> str:
  base = [r["metrics"]["held_out_loss"] for r in records.get("adamw", []) if "metrics" in r]
  base_mean = float(np.mean(base)) if base else float("nan")
  rows = ["| method | held-out loss (mean ± half-range) | vs adamw | state | state / adamw |"
          " tokens/s (median step) | refresh steps (median ms vs other) |",
          "|---|---|---|---|---|---|---|"]
  for method, recs in records.items():
    ok = [r for r in recs if "metrics" in r]
    if not ok:
      rows.append(f"| {method} | failed: {recs[0]['error'][:80]} | | | | | |")
      continue
    losses = [r["metrics"]["held_out_loss"] for r in ok]
    m = ok[0]["metrics"]
    tok = float(np.median([median_step_tok_s(r) for r in ok]))
    spread = (max(losses) - min(losses)) / 2
    ms = lambda x: "-" if x is None else f"{x * 1e3:.0f}"
    # (every step refreshes at T = 1: then there is no "other" step)
    refresh = (f"{m['refresh_steps']} ({ms(m['refresh_step_median_s'])} vs"
               f" {ms(m['other_step_median_s'])})" if m["refresh_steps"] else "0")
    rows.append(
        f"| {method} | {np.mean(losses):.4f} ± {spread:.4f} (n={len(losses)}) |"
        f" {np.mean(losses) / base_mean:.4f}x | {m['state_bytes'] / 2**20:.3f} MiB |"
        f" {m['state_bytes'] / m['adamw_state_bytes']:.3f} | {tok:,.0f} | {refresh} |")
  return "\n".join(rows)


def plot(records, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (method, recs) in enumerate(records.items()):
    ok = [r for r in recs if "metrics" in r]
    if not ok:
      continue
    steps = ok[0]["curves"]["eval_step"]
    losses = np.mean([r["curves"]["eval_loss"] for r in ok], axis=0)
    ax.plot(steps[1:], losses[1:], "o-", ms=3, label=method,
            color=plt.cm.tab20(2 * i % 20 + (2 * i // 20)),
            ls="--" if method in ("adamw", "contrib_galore") else "-")
  ax.set_xlabel("step")
  ax.set_ylabel("held-out loss (nats / byte), mean over seeds")
  ax.set_title("main job: every method at the same budget")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--methods", default=DEFAULT_METHODS)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", type=int, default=None, help="default: the main job's")
  ap.add_argument("--out", default="benchmarks/results/methods_cpu")
  ap.add_argument("--tabulate", action="store_true",
                  help="only rebuild the table, plot and JSON from <out>/runs/*/run.json")
  args = ap.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  seeds = [int(s) for s in args.seeds.split(",")]
  overrides = {} if args.steps is None else {"steps": args.steps}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  import jax
  print(f"# methods.py ({time.strftime('%Y-%m-%d')}, jax {jax.__version__},"
        f" backend {jax.default_backend()}, {os.cpu_count()} CPUs)")
  print(f"# command: python3 benchmarks/methods.py {' '.join(argv or sys.argv[1:])}")
  t0 = time.perf_counter()
  if args.tabulate:
    records = {m: [json.loads((out / "runs" / f"{m}_s{seed}" / "run.json").read_text())
                   for seed in seeds] for m in methods}
  else:
    records = run_all(methods, seeds, overrides, out)
  print()
  md = table(records)
  print(md)
  plot(records, out / "loss_curves.png")
  slim = {m: [{k: r.get(k) for k in ("config", "metrics", "curves", "error")} for r in recs]
          for m, recs in records.items()}
  (out / "methods.json").write_text(json.dumps(slim, indent=1))
  (out / "methods.md").write_text(md + "\n")
  print(f"\n# total {time.perf_counter() - t0:.0f} s; wrote {out}/methods.md,"
        f" loss_curves.png, methods.json")


if __name__ == "__main__":
  main()
