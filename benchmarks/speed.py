"""Optimizer step time on LLaMA shapes: optax.adamw vs optax.contrib.galore vs lro.galore.

Everything is measured in one process, on the default JAX device. For each
method: params, grads (random normal, fixed seed, reused every step) and the
optimizer state are resident on the device; one jitted function
``(params, grads, state) -> (params, state)`` does ``tx.update`` +
``optax.apply_updates`` with ``donate_argnums=(0, 2)``. Compilation is done
ahead of time (``.lower().compile()``) and reported separately; the first step
(count 0, which refreshes every projected leaf, cold for subspace iteration) is
reported separately and excluded from the steady-state numbers.

Columns:
  step      median over ``--repeats`` steady steps (counts 1..repeats, no refresh
            when stagger is off; with stagger on a few of them refresh one leaf)
  refresh   median over ``--refresh-repeats`` steps at count = T (every projected
            leaf refreshes; stagger off only)
  period    ``--period``: every step of a full period (T steps from count = T):
            max / mean. With ``--period-passes N`` (N > 1) the period is timed N
            times from the same count, and a "denoised" max / median is also
            reported: per step, the minimum over the N passes. A refresh a step
            always pays shows up in every pass; a one-off stall of the machine
            (another process, the OS) does not.

Example:
  python3 benchmarks/speed.py --sizes 60m,130m --dtype float32
  python3 benchmarks/speed.py --sizes 130m --methods adamw,svd,svd+stagger --period --gap 50
  python3 benchmarks/speed.py --sizes 60m --train-step
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
import shapes  # noqa: E402

warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")


def make_step(tx):
  return jax.jit(common.optimizer_step(tx), donate_argnums=(0, 2))


def _timed(compiled, params, grads, state, n: int, count=None):
  """Runs ``n`` steps, each timed alone (``count``: set the state's counters first).

  Returns ``(params, state, times, bg_cores)``: ``bg_cores`` is how many cores
  other processes kept busy meanwhile (see ``common.LoadMeter``).
  """
  times = []
  with common.LoadMeter() as lm:
    for _ in range(n):
      if count is not None:
        state = common.set_count(state, count)
        common.block(state)
      t = common.now()
      params, state = compiled(params, grads, state)
      common.block((params, state))
      times.append(common.now() - t)
  return params, state, times, lm.other_cores


def bench_optimizer(method: common.Method, params_sds, grads, *, gap: int, repeats: int,
                    refresh_repeats: int, period: bool, skip_refresh: bool,
                    period_passes: int = 1) -> dict:
  res: dict = {"method": method.name, "label": method.label}
  tx = method.make()
  params = shapes.materialize(params_sds, seed=1, scale=0.02)
  state = jax.jit(tx.init)(params)
  common.block((params, state))
  res["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))

  t = common.now()
  compiled = make_step(tx).lower(params, grads, state).compile()
  res["compile_s"] = common.now() - t

  # First step: count 0 (refreshes every projected leaf; cold start).
  t = common.now()
  params, state = compiled(params, grads, state)
  common.block((params, state))
  res["first_step_s"] = common.now() - t

  # Steady steps: counts 1 .. repeats (+1 warm-up).
  state = common.set_count(state, 1)
  params, state = compiled(params, grads, state)
  common.block((params, state))
  params, state, times, res["bg_cores_steady"] = _timed(compiled, params, grads, state, repeats)
  res["step_s"] = common.median(times)
  res["step_min_s"] = min(times)
  res["step_times_s"] = times

  is_lowrank = method.kind in ("contrib", "lro")
  if is_lowrank and not method.stagger and not skip_refresh and refresh_repeats > 0:
    params, state, rt, res["bg_cores_refresh"] = _timed(
        compiled, params, grads, state, refresh_repeats, count=gap)
    res["refresh_s"] = common.median(rt)
    res["refresh_times_s"] = rt
  elif is_lowrank and not method.stagger:
    res["refresh_skipped"] = True

  if period and is_lowrank:
    if skip_refresh and not method.stagger:
      res["period_skipped"] = True
    else:
      passes = []
      for _ in range(max(1, period_passes)):
        state = common.set_count(state, gap)
        params, state, pt, bg = _timed(compiled, params, grads, state, gap)
        passes.append(pt)
        if bg is not None:
          res["bg_cores_period"] = max(bg, res.get("bg_cores_period") or 0.0)
      pt = passes[0]
      res["period_times_s"] = pt
      res["period_max_s"] = max(pt)
      res["period_mean_s"] = float(np.mean(pt))
      res["period_median_s"] = common.median(pt)
      res["period_argmax"] = int(np.argmax(pt))
      if len(passes) > 1:
        best = np.min(np.asarray(passes), axis=0)
        res["period_passes_times_s"] = passes
        res["period_min_max_s"] = float(best.max())
        res["period_min_median_s"] = float(np.median(best))
        res["period_min_argmax"] = int(np.argmax(best))
  del params, state, compiled
  gc.collect()
  return res


# ----------------------------------------------------------------------------- train step


def bench_train_step(size: str, methods: list[common.Method], *, batch: int, seq: int,
                     repeats: int, dtype: str) -> list[dict] | None:
  """Forward + backward + update of examples/llama.py's Llama at LLaMA shapes."""
  llama = common.load_llama("speed")
  if llama is None:
    print("[speed] examples/llama.py not available: skipping --train-step", file=sys.stderr)
    return None
  from flax import nnx
  s = shapes.CONFIGS[size]
  cfg = llama.LlamaConfig(vocab_size=s.vocab, dim=s.hidden, n_layers=s.layers, n_heads=s.heads,
                          ffn_dim=s.ffn, max_seq_len=seq)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params0 = nnx.split(model)
  if dtype != "float32":
    params0 = jax.tree.map(lambda x: x.astype(shapes._dtype(dtype)), params0)
  data = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, s.vocab, jnp.int32)

  def loss(p, b):
    return llama.loss_fn(nnx.merge(graphdef, p), b)

  out = []
  # forward + backward only (no optimizer): the floor
  gfn = jax.jit(jax.value_and_grad(loss))
  l, g = gfn(params0, data)
  common.block(g)
  ts = []
  for _ in range(repeats):
    t = common.now()
    common.block(gfn(params0, data))
    ts.append(common.now() - t)
  out.append({"method": "fwd+bwd", "label": "forward + backward only", "train_step_s":
              common.median(ts), "times": ts})
  del g
  print(f"  train-step {size} fwd+bwd: {common.fmt_ms(out[-1]['train_step_s'])} ms", flush=True)

  for m in methods:
    tx = m.make()

    def train_step(p, st, b, tx=tx):
      l, g = jax.value_and_grad(loss)(p, b)
      u, st = tx.update(g, st, p)
      return optax.apply_updates(p, u), st, l

    params = jax.tree.map(jnp.copy, params0)
    st = tx.init(params)
    fn = jax.jit(train_step, donate_argnums=(0, 1))
    params, st, l = fn(params, st, data)  # compile + count-0 step
    common.block((params, st))
    st = common.set_count(st, 1)
    params, st, l = fn(params, st, data)
    common.block((params, st))
    ts = []
    for _ in range(repeats):
      t = common.now()
      params, st, l = fn(params, st, data)
      common.block((params, st))
      ts.append(common.now() - t)
    out.append({"method": m.name, "label": m.label, "train_step_s": common.median(ts),
                "times": ts})
    print(f"  train-step {size} {m.label}: {common.fmt_ms(out[-1]['train_step_s'])} ms",
          flush=True)
    del params, st, fn
    gc.collect()
  return out


# ----------------------------------------------------------------------------- main


def _amortised(r: dict, gap: int):
  """Mean step time over one refresh period.

  Measured over the period when it was timed; otherwise one refresh step plus
  ``gap - 1`` steady steps; the steady step alone for adamw.
  """
  if "period_mean_s" in r:
    return r["period_mean_s"]
  if "refresh_s" in r:
    return (r["refresh_s"] + (gap - 1) * r["step_s"]) / gap
  return r["step_s"] if r["method"].startswith("adamw") else None


def _fl(x):
  return "—" if x is None else f"{x:.1f}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_shape_args(ap, "60m,130m")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--refresh-repeats", type=int, default=2)
  ap.add_argument("--methods", default="all",
                  help="comma list of: adamw, contrib, svd, subspace_iteration, eigh, randomized, <proj>+stagger, all")
  ap.add_argument("--skip-refresh", default="", help="comma list of methods whose refresh step is not timed")
  ap.add_argument("--period", action="store_true", help="also time every step of one T-step period")
  ap.add_argument("--period-passes", type=int, default=1,
                  help="time the period this many times; >1 adds a per-step-minimum max/median")
  ap.add_argument("--period-methods", default="",
                  help="comma list: time the period only for these methods (default: every low-rank method)")
  ap.add_argument("--no-adamw-again", action="store_true",
                  help="do not re-time optax.adamw at the end of each size (drift check)")
  ap.add_argument("--train-step", action="store_true",
                  help="also time forward+backward+update of examples/llama.py at these shapes")
  ap.add_argument("--train-batch", type=int, default=4)
  ap.add_argument("--train-seq", type=int, default=128)
  ap.add_argument("--train-repeats", type=int, default=3)
  ap.add_argument("--wait-quiet", type=float, default=0.0,
                  help="before each method wait up to this many seconds for other processes to use < 0.3 cores")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  lro = common.import_lro()
  env = common.env_info()
  common.print_header("speed.py", env, argv)
  skip = {s.strip() for s in args.skip_refresh.split(",") if s.strip()}
  period_only = {s.strip() for s in args.period_methods.split(",") if s.strip()}
  payload = {"env": env, "args": vars(args), "results": {}}

  for size in [s.strip().lower() for s in args.sizes.split(",") if s.strip()]:
    rank = args.rank or shapes.GALORE_RANK[size]
    methods = common.make_methods(args.methods, rank=rank, gap=args.gap, lro=lro)
    if "adamw" not in [m.name for m in methods]:
      methods = common.make_methods("adamw", rank=rank, gap=args.gap, lro=lro) + methods
    else:  # adamw first
      methods = sorted(methods, key=lambda m: m.name != "adamw")
    sds = shapes.llama_params(size, args.dtype, args.layout)
    print(f"\n## {size} ({shapes.num_params(sds) / 1e6:.1f} M params, {args.dtype}, {args.layout},"
          f" rank {rank}, T={args.gap})", flush=True)
    grads = shapes.materialize(sds, seed=0)
    common.block(grads)
    results = []
    for m in methods:
      if args.wait_quiet:
        common.wait_quiet(args.wait_quiet)
      print(f"  {m.label} ...", end="", flush=True)
      t0 = common.now()
      r = bench_optimizer(m, sds, grads, gap=args.gap, repeats=args.repeats,
                          refresh_repeats=args.refresh_repeats,
                          period=args.period and (not period_only or m.name in period_only),
                          period_passes=args.period_passes,
                          skip_refresh=m.name in skip)
      r["wall_s"] = common.now() - t0
      print(f" step {common.fmt_ms(r['step_s'])} ms, refresh {common.fmt_ms(r.get('refresh_s'))} ms"
            f" ({r['wall_s']:.0f} s)", flush=True)
      results.append(r)
    if not args.no_adamw_again:
      m = common.make_methods("adamw", rank=rank, gap=args.gap, lro=lro)[0]
      r = bench_optimizer(m, sds, grads, gap=args.gap, repeats=args.repeats, refresh_repeats=0,
                          period=False, skip_refresh=True)
      r["label"] = "optax.adamw (again, end of run)"
      r["method"] = "adamw_again"
      results.append(r)
    del grads
    gc.collect()

    base = results[0]["step_s"]
    contrib = next((r["step_s"] for r in results if r["method"] == "contrib"), None)
    headers = ["optimizer", "step ms", "vs adamw", "vs contrib", "refresh step ms",
               f"amortised over T={args.gap} ms", "amortised vs adamw",
               "first step ms (count 0)", "state", "compile s", "bg load (cores) step/refresh"]
    if args.period:
      headers += [f"max step over T={args.gap} ms", "max / median step", "mean step over period ms"]
      if args.period_passes > 1:
        headers += [f"max / median, per-step min of {args.period_passes} passes", "bg load period"]
    rows = []
    for r in results:
      ref = ("skipped (--skip-refresh)" if r.get("refresh_skipped")
             else common.fmt_ms(r.get("refresh_s")))
      amort = _amortised(r, args.gap)
      row = [r["label"], common.fmt_ms(r["step_s"]), common.fmt_ratio(r["step_s"], base),
             common.fmt_ratio(r["step_s"], contrib), ref, common.fmt_ms(amort),
             common.fmt_ratio(amort, base), common.fmt_ms(r["first_step_s"]),
             common.fmt_bytes(r["state_bytes"]), f"{r['compile_s']:.1f}",
             f"{_fl(r.get('bg_cores_steady'))}/{_fl(r.get('bg_cores_refresh'))}"]
      if args.period:
        has = "period_max_s" in r
        row += [common.fmt_ms(r["period_max_s"]) if has else "—",
                common.fmt_ratio(r["period_max_s"], r["period_median_s"]) if has else "—",
                common.fmt_ms(r["period_mean_s"]) if has else "—"]
        if args.period_passes > 1:
          hm = "period_min_max_s" in r
          row += [common.fmt_ratio(r["period_min_max_s"], r["period_min_median_s"]) if hm else "—",
                  _fl(r.get("bg_cores_period"))]
      rows.append(row)
    table = common.md_table(headers, rows)
    print()
    print(table, flush=True)
    entry = {"rank": rank, "results": results, "table": table}

    if args.train_step:
      tr = bench_train_step(size, [m for m in methods if not m.stagger], batch=args.train_batch,
                            seq=args.train_seq, repeats=args.train_repeats, dtype=args.dtype)
      if tr:
        fb = tr[0]["train_step_s"]
        opt = {r["method"]: r["step_s"] for r in results}
        rows = []
        for r in tr:
          o = opt.get(r["method"])
          rows.append([r["label"], common.fmt_ms(r["train_step_s"]),
                       common.fmt_ratio(r["train_step_s"], tr[1]["train_step_s"] if len(tr) > 1 else None),
                       common.fmt_ms(r["train_step_s"] - fb) if r["method"] != "fwd+bwd" else "—",
                       f"{100 * o / r['train_step_s']:.0f}%" if o else "—"])
        t2 = common.md_table(["train step", "ms", "vs adamw step", "minus fwd+bwd ms",
                              "optimizer-only step / train step"], rows)
        print(f"\nTrain step: examples/llama.py at {size} shapes, batch {args.train_batch} x seq"
              f" {args.train_seq}, {args.dtype}, median of {args.train_repeats} steady steps\n")
        print(t2, flush=True)
        entry["train_step"] = tr
        entry["train_table"] = t2
    payload["results"][size] = entry
  common.write_json(args.json, payload)


if __name__ == "__main__":
  main()
