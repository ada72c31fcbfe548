"""Shared helpers of the benchmark scripts: optimizer registry, timing, tables.

Method names (``--methods``):

* ``adamw``                       optax.adamw
* ``contrib``                     optax.contrib.galore (same rank / T / scale; its default: every 2-D leaf)
* ``svd``, ``subspace_iteration``, ``eigh``, ``randomized``, ``dct``
                                  lro.galore(projector=...)
* any of them with ``+stagger`` (e.g. ``svd+stagger``): lro.galore(..., stagger=True)
* any of them with ``+reverse_std`` (e.g. ``dct+reverse_std``):
  lro.galore(..., proj_type="reverse_std"), which reduces the *larger* matrix
  dimension (as optax.contrib.galore does): smaller moments, larger bases

``all`` expands to every method the installed library supports.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

LRO_PROJECTORS = ("svd", "subspace_iteration", "eigh", "randomized", "dct")
METHOD_FLAGS = ("", "stagger", "reverse_std", "noskip", "skipstep")


def import_lro():
  """``lowrank_optax`` or ``None`` (with the reason printed) if not importable."""
  try:
    import lowrank_optax as lro  # noqa: F401
    lro.galore  # noqa: B018
    return lro
  except Exception as e:  # pragma: no cover - depends on the library's state
    print(f"[benchmarks] lowrank_optax not importable: {type(e).__name__}: {e}", file=sys.stderr)
    return None


def optimizer_step(tx):
  """``(params, grads, state) -> (params, state)``: ``tx.update`` + ``optax.apply_updates``."""
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def load_llama(tag: str = "benchmarks"):
  """``examples/llama.py`` as a module, or ``None`` (with the reason printed)."""
  ex = os.path.join(REPO, "examples")
  if not os.path.exists(os.path.join(ex, "llama.py")):
    return None
  if ex not in sys.path:
    sys.path.insert(0, ex)
  try:
    import llama  # noqa: F401
    llama.LlamaConfig, llama.Llama, llama.loss_fn  # noqa: B018
    return llama
  except Exception as e:
    print(f"[{tag}] examples/llama.py not usable: {type(e).__name__}: {e}", file=sys.stderr)
    return None


def supported_projectors(lro) -> list[str]:
  """The lro.galore projectors that build and run on a tiny problem."""
  if lro is None:
    return []
  ok = []
  p = {"attn": {"q": jnp.ones((8, 6))}}
  for name in LRO_PROJECTORS:
    try:
      tx = lro.galore(1e-3, rank=2, update_proj_gap=5, projector=name)
      s = tx.init(p)
      jax.eval_shape(lambda g, s: tx.update(g, s, p), p, s)
      ok.append(name)
    except Exception as e:
      print(f"[benchmarks] lro.galore(projector={name!r}) unavailable: {type(e).__name__}: {e}",
            file=sys.stderr)
  return ok


@dataclasses.dataclass
class Method:
  name: str          # CLI name
  label: str         # table label
  make: Callable[[], optax.GradientTransformation]
  kind: str          # 'adamw' | 'contrib' | 'lro'
  projector: Optional[str] = None
  stagger: bool = False
  proj_type: str = "std"


def make_methods(names: list[str] | str, *, rank: int, gap: int, lr: float = 1e-3,
                 scale: float = 0.25, lro=None, wd: float = 0.0) -> list[Method]:
  """Build the optimizers named in ``names`` (list or comma separated string)."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  avail = supported_projectors(lro)
  if "all" in names:
    names = ["adamw", "contrib"] + avail + [p + "+stagger" for p in avail]
  out = []
  for n in names:
    if n == "adamw":
      out.append(Method(n, "optax.adamw", lambda: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-6,
                                                              weight_decay=wd), "adamw"))
    elif n == "contrib":
      out.append(Method(n, f"optax.contrib.galore r{rank}",
                        lambda: optax.contrib.galore(lr, rank=rank, update_proj_gap=gap,
                                                     scale=scale, weight_decay=wd), "contrib"))
    else:
      proj, _, flag = n.partition("+")
      if flag not in METHOD_FLAGS or proj not in LRO_PROJECTORS:
        raise ValueError(f"unknown method {n!r}")
      if proj not in avail:
        print(f"[benchmarks] skipping {n}: projector {proj!r} not available", file=sys.stderr)
        continue
      stagger = flag == "stagger"
      proj_type = "reverse_std" if flag == "reverse_std" else "std"
      # The recipe's default drops the non-finite leaves' updates and keeps
      # their state (lro.zero_nonfinite_updates); "+noskip": no skip at all;
      # "+skipstep": the whole step skipped when any gradient is not finite
      # (skip_nonfinite="step", optax.apply_if_finite's rule).
      skip = {"noskip": False, "skipstep": "step"}.get(flag, True)
      label = f"lro.galore[{proj}{', ' + flag if flag else ''}] r{rank}"
      out.append(Method(n, label,
                        (lambda proj=proj, stagger=stagger, proj_type=proj_type, skip=skip:
                         lro.galore(lr, rank=rank, update_proj_gap=gap, scale=scale,
                                    projector=proj, stagger=stagger, proj_type=proj_type,
                                    weight_decay=wd, skip_nonfinite=skip)),
                        "lro", proj, stagger, proj_type))
  return out


def set_count(state, value: int):
  """Returns ``state`` with every NamedTuple field named ``count`` set to ``value``.

  Used to place an optimizer at step ``value`` (e.g. a multiple of T for a
  refresh step) without running that many steps. Affects Adam bias
  correction too, which is irrelevant for timing.
  """
  def rec(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      kw = {}
      for f in x._fields:
        v = getattr(x, f)
        if f == "count" and hasattr(v, "dtype"):
          kw[f] = jnp.full_like(v, value)
        else:
          kw[f] = rec(v)
      return type(x)(**kw)
    if isinstance(x, (tuple, list)):
      return type(x)(rec(v) for v in x)
    if isinstance(x, dict):
      return type(x)({k: rec(v) for k, v in x.items()})
    return x
  return rec(state)


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def median(xs):
  return statistics.median(xs) if xs else float("nan")


def fmt_ms(s: Optional[float]) -> str:
  if s is None or (isinstance(s, float) and np.isnan(s)):
    return "—"
  ms = 1e3 * s
  return f"{ms:.0f}" if ms >= 1000 else (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")


def fmt_bytes(b: Optional[int]) -> str:
  if b is None:
    return "—"
  if b >= 2**30:
    return f"{b / 2**30:.2f} GiB"
  return f"{b / 2**20:.1f} MiB"


def fmt_ratio(a, b) -> str:
  if a is None or b is None or not b or (isinstance(a, float) and np.isnan(a)):
    return "—"
  return f"{a / b:.2f}x"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(lines)


def env_info() -> dict:
  return {
      "date": datetime.date.today().isoformat(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": os.cpu_count(),
      "argv": " ".join(sys.argv),
  }


def print_header(script: str, env: dict, argv=None, note: str = "") -> None:
  """The first lines of a benchmark's output: versions, backend and the exact command."""
  args = sys.argv[1:] if argv is None else argv
  print(f"# {script}  ({env['date']}, jax {env['jax']}, optax {env['optax']}, backend {env['backend']},"
        f" {env['cpu_count']} CPUs{note})\n# command: python3 benchmarks/{script} " + " ".join(args),
        flush=True)


def add_shape_args(ap, sizes: str) -> None:
  """The CLI flags that pick the LLaMA shapes and the projection (speed.py, memory.py)."""
  import shapes  # benchmarks/ sibling
  ap.add_argument("--sizes", default=sizes)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--rank", type=int, default=None,
                  help="projection rank (default: GaLore paper rank per size: 60m 128, 130m/350m 256, 1b 512, 7b 1024)")
  ap.add_argument("--gap", type=int, default=200, help="update_proj_gap T")
  ap.add_argument("--layout", default="per_layer", choices=shapes.LAYOUTS)


def write_json(path: Optional[str], payload: dict):
  if not path:
    return
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  print(f"[benchmarks] wrote {path}")


def now() -> float:
  return time.perf_counter()


def _proc_stat_busy() -> Optional[float]:
  """System-wide busy CPU seconds since boot (all cores), from /proc/stat."""
  try:
    with open("/proc/stat") as f:
      parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
  except Exception:
    return None


class LoadMeter:
  """Measures how many cores *other* processes kept busy during a measurement.

  ``other_cores = (system busy CPU seconds - this process's CPU seconds) / wall``.
  On a shared machine a value well above 0 means the timing is contaminated.
  """

  def __enter__(self):
    self.t = time.perf_counter()
    self.sys = _proc_stat_busy()
    c = os.times()
    self.own = c.user + c.system
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self.t
    s = _proc_stat_busy()
    c = os.times()
    own = c.user + c.system - self.own
    self.wall = wall
    self.own_cores = own / max(wall, 1e-9)
    self.other_cores = (None if s is None or self.sys is None
                        else max(0.0, (s - self.sys - own) / max(wall, 1e-9)))
    return False


def wait_quiet(max_wait_s: float = 0.0, threshold: float = 0.3, window_s: float = 2.0) -> Optional[float]:
  """Waits (up to ``max_wait_s``) until other processes use < ``threshold`` cores.

  Returns the last measured background load (cores)."""
  deadline = time.perf_counter() + max_wait_s
  while True:
    with LoadMeter() as lm:
      time.sleep(window_s)
    if lm.other_cores is None or lm.other_cores < threshold or time.perf_counter() > deadline:
      return lm.other_cores
