"""Held-out loss of lro.galore per projector vs exact SVD (and optax.adamw), at equal steps and equal time.

Every run is one call of the main example job, ``examples/pretrain_lm.py``
(``pretrain_lm.train``): the LLaMA-style byte-level decoder trained on the
embedded CPython docs, held-out loss on the fixed held-out windows of that
corpus. All runs share the model, data, schedule and evaluation set; a seed
fixes the model initialisation, the training batch order and the projector's
random start, so runs with the same seed differ only in the optimizer. Runs go
seed by seed, every method per seed, one after the other in this process; each
writes its ``run.json`` and ``loss.png`` to ``<out>/<method>_s<seed>``.

Methods: ``lro.galore(projector=p)`` for each ``--projectors`` entry (``svd`` is
the exact reference; ``eigh``, ``randomized``, ``subspace_iteration``,
``dct`` are the fast ones) and, with ``--with-adamw`` (default), ``optax.adamw``
as a reference line. A ``+stagger`` suffix (``subspace_iteration+stagger``) runs
the projector with ``stagger=True`` (each leaf refreshes at its own step of
the period); ``+rotate`` (``dct+rotate``) with ``on_refresh="rotate"``.

Tables:
  equal steps      final held-out loss (mean ± std over seeds) and its ratio to
                   svd's (per-seed ratio, then mean ± std). Quality guard:
                   the fast projector must be within 0.5% of exact SVD's
                   held-out loss, or better (ratio <= 1.005); reported, not
                   asserted. Also train loss, training time (steps 2..N,
                   excluding evaluation), tokens/s and optimizer state.
  equal wall time  per seed, T* = the smallest final training time over all
                   methods; each method's held-out loss at T* is linearly
                   interpolated in its (eval_time_s, eval_loss) curve, then
                   the ratio to svd's at the same T*; also the steps reached at
                   T*. Times are wall clock: on a shared machine see the
                   "bg load" column (cores other processes kept busy).

Example:
  python3 benchmarks/quality.py                                   # default: ~10-15 min on 2 CPU cores
  python3 benchmarks/quality.py --seeds 0,1 --json quality.json
  python3 benchmarks/quality.py --projectors svd,subspace_iteration --no-with-adamw
  python3 benchmarks/quality.py --steps 30 --dim 64 --n-layers 2 --update-proj-gap 10 --eval-every 10
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

_EXAMPLES = os.path.join(common.REPO, "examples")
if _EXAMPLES not in sys.path:
  sys.path.insert(0, _EXAMPLES)
import pretrain_lm  # noqa: E402

QUALITY_FLAGS = ("", "stagger", "rotate")  # <projector>+<flag>; rotate: on_refresh="rotate" (dct)
GUARD = 1.005  # fast projector's held-out loss <= 1.005 x svd's (within 0.5%, or better)

# TrainConfig fields passed through as --flag (None: pretrain_lm's default).
_PASS_THROUGH = [
    # (field, type, help)
    ("batch_size", int, None),
    ("seq_len", int, None),
    ("n_heads", int, None),
    ("ffn_dim", int, "default 8/3 * dim, multiple of 16"),
    ("eval_batches", int, None),
    ("galore_scale", float, None),
    ("weight_decay", float, None),
    ("clip_norm", float, "0 disables clipping"),
    ("warmup_frac", float, None),
    ("final_lr_frac", float, None),
]


def _mean_std(xs):
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  if not xs:
    return float("nan"), float("nan")
  return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan"))


def _fmt(xs, digits=4, pct=False):
  """``mean ± std`` of ``xs`` (std only with >= 2 values)."""
  m, s = _mean_std(xs)
  if math.isnan(m):
    return "—"
  if pct:  # ratio shown with its percentage difference
    out = f"{m:.{digits}f} ({100 * (m - 1):+.2f}%)"
    return out if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f} ({100 * (m - 1):+.2f}%)"
  return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _fnum(x, fmt):
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def run_one(name: str, overrides: dict, base: dict, seed: int, out_root: str) -> dict:
  cfg = dict(base, **overrides, seed=seed, out=os.path.join(out_root, f"{name}_s{seed}"))
  t0 = common.now()
  res = {"method": name, "seed": seed, "out": cfg["out"]}
  with common.LoadMeter() as lm:
    try:
      rec = pretrain_lm.train(cfg)
    except FloatingPointError as e:  # diverged: reported, the benchmark goes on
      rec = None
      res["error"] = str(e)
  res["wall_s"] = common.now() - t0
  res["bg_cores"] = lm.other_cores
  if rec is not None:
    m, cv = rec["metrics"], rec["curves"]
    res.update(
        config=rec["config"],
        held_out_loss=m["held_out_loss"], train_loss=m["train_loss"],
        train_time_s=m["train_time_s"], tokens_per_s=m["tokens_per_s"],
        first_step_time_s=m["first_step_time_s"], state_bytes=m["state_bytes"],
        adam_state_bytes=m["adam_state_bytes"], n_params=m["n_params"],
        eval_step=cv["eval_step"], eval_loss=cv["eval_loss"], eval_time_s=cv["eval_time_s"])
  del rec
  jax.clear_caches()
  gc.collect()
  return res


def at_time(r: dict, t: float) -> tuple[float, float]:
  """(held-out loss, steps) of run ``r`` at training time ``t``, linearly interpolated."""
  ts = np.asarray(r["eval_time_s"], dtype=float)
  return (float(np.interp(t, ts, np.asarray(r["eval_loss"], dtype=float))),
          float(np.interp(t, ts, np.asarray(r["eval_step"], dtype=float))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--projectors", default=",".join(["svd", "eigh", "randomized", "subspace_iteration", "subspace_iteration+stagger"]),
                  help="comma list of lro.galore projectors (svd is the reference)")
  ap.add_argument("--with-adamw", action=argparse.BooleanOptionalAction, default=True,
                  help="also run optax.adamw as a reference line")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--dim", type=int, default=pretrain_lm.TrainConfig.dim)
  ap.add_argument("--n-layers", type=int, default=pretrain_lm.TrainConfig.n_layers)
  ap.add_argument("--seeds", default="0", help="comma list; every method runs once per seed")
  ap.add_argument("--update-proj-gap", type=int, default=50, help="steps between projector refreshes")
  ap.add_argument("--rank", type=int, default=None, help="projection rank; default dim // 4")
  ap.add_argument("--eval-every", type=int, default=25,
                  help="held-out evaluation period (more points: finer equal-time interpolation)")
  ap.add_argument("--lr", type=float, default=None,
                  help=f"galore peak lr (default {pretrain_lm.OPTIMIZERS['galore'].default_lr:g})")
  ap.add_argument("--adamw-lr", type=float, default=None,
                  help=f"adamw peak lr (default {pretrain_lm.OPTIMIZERS['adamw'].default_lr:g})")
  for field, typ, hlp in _PASS_THROUGH:
    ap.add_argument("--" + field.replace("_", "-"), type=typ, default=None,
                    help=hlp or f"TrainConfig.{field} (default {getattr(pretrain_lm.TrainConfig, field)})")
  ap.add_argument("--out", default=os.path.join("runs", "quality"),
                  help="run outputs go to OUT/<method>_s<seed>")
  ap.add_argument("--progress", action="store_true", help="show each run's progress bar")
  ap.add_argument("--no-plot", action="store_true", help="do not write each run's loss.png")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  env = common.env_info()
  common.print_header("quality.py", env, argv)

  # Methods.
  lro = common.import_lro()
  avail = common.supported_projectors(lro)
  projectors = [p.strip() for p in args.projectors.split(",") if p.strip()]
  for p in projectors:
    if p.partition("+")[0] not in common.LRO_PROJECTORS or p.partition("+")[2] not in QUALITY_FLAGS:
      ap.error(f"unknown projector {p!r}; choose from {', '.join(common.LRO_PROJECTORS)}")
  methods: list[tuple[str, str, dict]] = []  # (name, label, TrainConfig overrides)
  for p in projectors:
    proj, _, flag = p.partition("+")
    if proj not in avail:
      print(f"[quality] skipping projector {p!r}: not available", file=sys.stderr)
      continue
    ov = {"optimizer": "galore", "projector": proj, "stagger": flag == "stagger"}
    if flag == "rotate":
      ov["on_refresh"] = "rotate"
    if args.lr is not None:
      ov["lr"] = args.lr
    methods.append((p, f"lro.galore[{proj}{', ' + flag if flag else ''}]", ov))
  if args.with_adamw:
    ov = {"optimizer": "adamw"}
    if args.adamw_lr is not None:
      ov["lr"] = args.adamw_lr
    methods.append(("adamw", "optax.adamw", ov))
  if not methods:
    ap.error("nothing to run")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

  base = dict(steps=args.steps, dim=args.dim, n_layers=args.n_layers,
              update_proj_gap=args.update_proj_gap, rank=args.rank, eval_every=args.eval_every,
              progress=args.progress, plot=not args.no_plot)
  for field, _, _ in _PASS_THROUGH:
    if getattr(args, field) is not None:
      base[field] = getattr(args, field)
  c = pretrain_lm._as_config(dict(base, optimizer="galore")).resolved()
  n_refresh = len(range(0, c.steps, c.update_proj_gap))
  print(f"# model dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, ffn {c.ffn_dim}; {c.steps} steps x "
        f"batch {c.batch_size} x seq {c.seq_len}; galore rank {c.rank}, update_proj_gap "
        f"{c.update_proj_gap} ({n_refresh} refreshes), scale {c.galore_scale:g}; eval every "
        f"{c.eval_every} steps on {c.eval_batches} batches; seeds {seeds}; outputs {args.out}/",
        flush=True)
  print(f"# {len(methods)} methods x {len(seeds)} seeds = {len(methods) * len(seeds)} runs\n", flush=True)

  # Runs.
  t_all = common.now()
  runs: list[dict] = []
  for seed in seeds:
    for name, label, ov in methods:
      print(f"  {label} seed {seed} ...", end="", flush=True)
      r = run_one(name, ov, base, seed, args.out)
      r["label"] = label
      runs.append(r)
      if "error" in r:
        print(f" FAILED: {r['error']} ({r['wall_s']:.0f} s)", flush=True)
      else:
        print(f" held-out {r['held_out_loss']:.4f}, train {r['train_time_s']:.1f} s, "
              f"{r['tokens_per_s']:,.0f} tok/s, bg load {_fnum(r['bg_cores'], '.1f')} cores"
              f" ({r['wall_s']:.0f} s)", flush=True)
  total_s = common.now() - t_all

  ok = {(r["method"], r["seed"]): r for r in runs if "error" not in r}
  names = [n for n, _, _ in methods]
  labels = dict((n, l) for n, l, _ in methods)
  has_ref = "svd" in names
  adam_bytes = next((r["adam_state_bytes"] for r in ok.values()), None)

  # Equal wall time: per seed, T* = min over methods of the final training time.
  t_star = {}
  for s in seeds:
    finals = [ok[(n, s)]["eval_time_s"][-1] for n in names if (n, s) in ok]
    if finals:
      t_star[s] = min(finals)
  for r in ok.values():
    if r["seed"] in t_star:
      r["loss_at_t_star"], r["steps_at_t_star"] = at_time(r, t_star[r["seed"]])

  def per_seed(n, key):
    return [ok[(n, s)][key] if (n, s) in ok else None for s in seeds]

  def ratios(n, key):
    return [ok[(n, s)][key] / ok[("svd", s)][key] if (n, s) in ok and ("svd", s) in ok else None
            for s in seeds]

  summary = {}
  rows_steps, rows_time = [], []
  for n in names:
    done = [s for s in seeds if (n, s) in ok]
    ent = {"label": labels[n], "seeds_ok": done,
           "failed": {r["seed"]: r["error"] for r in runs if r["method"] == n and "error" in r}}
    for key in ("held_out_loss", "train_loss", "train_time_s", "tokens_per_s", "loss_at_t_star",
                "steps_at_t_star", "bg_cores"):
      ent[key] = _mean_std([x for x in per_seed(n, key) if x is not None])
    ent["state_bytes"] = next((ok[(n, s)]["state_bytes"] for s in done), None)
    if has_ref:
      ent["ratio_vs_svd"] = _mean_std([x for x in ratios(n, "held_out_loss") if x is not None])
      ent["ratio_vs_svd_at_t_star"] = _mean_std([x for x in ratios(n, "loss_at_t_star")
                                                 if x is not None])
      if n not in ("svd", "adamw") and not math.isnan(ent["ratio_vs_svd"][0]):
        ent["meets_guard"] = bool(ent["ratio_vs_svd"][0] <= GUARD)
    summary[n] = ent

    if not done:
      fail = "diverged: " + "; ".join(f"s{s}" for s in ent["failed"])
      rows_steps.append([labels[n], fail] + ["—"] * 7)
      rows_time.append([labels[n], fail, "—", "—"])
      continue
    if n == "svd":
      guard = "reference"
    elif n == "adamw" or "meets_guard" not in ent:
      guard = "—"
    else:
      guard = "yes" if ent.get("meets_guard") else "**no**"
    fail = f" ({len(ent['failed'])} diverged)" if ent["failed"] else ""
    sb = ent["state_bytes"]
    bg = ent["bg_cores"][0]
    rows_steps.append([
        labels[n], _fmt(per_seed(n, "held_out_loss")) + fail,
        _fmt(ratios(n, "held_out_loss"), pct=True) if has_ref else "—", guard,
        _fmt(per_seed(n, "train_loss")),
        _fmt(per_seed(n, "train_time_s"), 1), _fmt(per_seed(n, "tokens_per_s"), 0),
        common.fmt_bytes(sb) + (f" ({sb / adam_bytes:.2f}x adam)" if sb and adam_bytes else ""),
        _fnum(bg, ".1f")])
    rows_time.append([
        labels[n], _fmt(per_seed(n, "loss_at_t_star")),
        _fmt(ratios(n, "loss_at_t_star"), pct=True) if has_ref else "—",
        _fmt(per_seed(n, "steps_at_t_star"), 0)])

  nseed = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "1 seed"
  t1 = common.md_table(
      ["method", "held-out loss", "ratio vs svd", f"within {100 * (GUARD - 1):.1f}% of svd",
       "train loss (last 20)", "train time s", "tokens/s", "optimizer state", "bg load (cores)"],
      rows_steps)
  print(f"\n## Equal steps: held-out loss after {c.steps} steps ({nseed}; ratio = per-seed loss / "
        f"svd's loss; guard: fast projector <= {GUARD:g} x svd)\n")
  print(t1, flush=True)
  ts_str = ", ".join(f"s{s}: {t:.1f} s" for s, t in t_star.items())
  t2 = common.md_table(["method", "held-out loss at T*", "ratio vs svd at T*", "steps reached at T*"],
                       rows_time)
  print(f"\n## Equal wall time: held-out loss at T* = min over methods of the final training time "
        f"({ts_str}; {nseed}; linear interpolation between evaluations every {c.eval_every} steps)\n")
  print(t2, flush=True)
  if not has_ref:
    print("\n(no svd run: ratios not available)")
  print(f"\n# total {total_s / 60:.1f} min for {len(runs)} runs", flush=True)

  payload = {"env": env, "args": vars(args), "config": dataclasses.asdict(c) | {"out": args.out},
             "guard_ratio": GUARD, "t_star_s": t_star, "summary": summary, "runs": runs,
             "tables": {"equal_steps": t1, "equal_time": t2}, "total_s": total_s}
  common.write_json(args.json, payload)
  return payload


if __name__ == "__main__":
  main()
