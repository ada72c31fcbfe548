"""Fine-tune a pre-trained byte-level LM on a new domain: low-rank methods against AdamW.

Continues a checkpoint of the main job (``pretrain_lm.py``, a small LLaMA
pre-trained on the CPython *documentation*) on another corpus, the standard
library's own *Python sources*, with every parameter trained (full-parameter
fine-tuning, no adapters) by:

* ``adamw``   full-rank AdamW (the baseline);
* ``galore``  ``lro.galore``; GaLore's GLUE fine-tuning setting (README:
  rank 4 / 8, ``scale`` 4, ``update_proj_gap`` 500, lr ~3e-5);
* ``frugal``  ``lro.frugal`` in coordinate mode, FRUGAL's fine-tuning setting
  (``run_glue.py``: ``columns``, ``inactive_lr_scale`` 0.1, gap 500, density
  ``rank / min(shape)``);
* ``fira``    ``lro.fira``; Fira's fine-tuning script (LLaMA-7B commonsense:
  ``scale`` 1, gap 200, lr 1e-4);
* ``apollo`` / ``apollo_mini``  ``lro.apollo`` / ``lro.apollo_mini``; the
  APOLLO authors' commonsense fine-tuning scripts (channel-wise, ``scale`` 1 /
  tensor-wise rank 1, ``scale`` 128; lr 1e-4);

each present only if the installed ``lowrank_optax`` has the recipe. For each
method it reports the held-out loss on the new domain before and after, the
held-out loss on the old domain after (forgetting), the optimizer-state bytes
against AdamW's and the training throughput.

    python examples/finetune_lm.py                      # pre-trains a small model first
    python examples/pretrain_lm.py --optimizer adamw --checkpoint-every 100 --out runs/pre
    python examples/finetune_lm.py --checkpoint runs/pre  # continue that run's latest checkpoint
    python examples/finetune_lm.py --methods adamw,galore --steps 500 --rank 4

Data (offline, deterministic): 29 pure-Python modules of the running
interpreter's standard library (``argparse.py``, ``typing.py``, ...), read as
UTF-8 bytes; five whole modules (``fractions``, ``heapq``, ``queue``,
``shlex``, ``textwrap``) are held out, so the new-domain loss is measured on
code the model never saw.

Hyper-parameters (adapted to a 0.4 M-parameter byte model pre-trained for
300 steps, fine-tuned for 150; the papers fine-tune RoBERTa / LLaMA-7B for
thousands of steps):

* learning rate 1e-3 for every method (the pre-training peak), linear decay
  to 0, no warm-up (``run_glue.py``'s schedule), global-norm clipping 1, no
  weight decay. The papers' 1e-5..3e-5 (GLUE) and 1e-4..3e-4 (LLaMA
  commonsense) barely move a model this far from converged: at 1e-4 / 3e-4
  / 1e-3 / 3e-3 the new-domain loss after fine-tuning was, for AdamW, 2.171 /
  2.084 / 1.977 / 1.952, GaLore 2.193 / 2.120 / 2.039 / 2.040, Fira 2.223 /
  2.150 / 2.057 / 1.996 (one seed); 3e-3 raised the old-domain (docs) loss
  twice as much as 1e-3 for AdamW and GaLore.
* rank 8 (``dim / 12``) for GaLore, Fira and APOLLO; FRUGAL's density is
  ``8 / 96``. ``scale``: GaLore 4, Fira 1, APOLLO 1, APOLLO-Mini 128.
* ``update_proj_gap`` 100 for every low-rank method: the papers' 200-500 are
  a small fraction of their runs; here 100 gives two subspaces in 150 steps.

Measured at the defaults on the development machine (2 CPU cores shared with
other jobs: wall times are pessimistic, tokens/s vary by up to 2x with the
load): 5 min 19 s wall (6 min CPU), of which pre-training 77 s (AdamW, 300
steps, held-out docs loss 1.811); then 150 fine-tuning steps x 16 x 128
bytes per method, 28-48 s each:

    method       new-domain loss  old-domain loss  state KiB  vs AdamW  tokens/s
    (before)              2.3701           1.8110
    adamw                 1.9769           1.8622     2981.3      1.00    12,631
    galore                2.0390           1.8983      668.4      0.22    12,702
    frugal                2.0727           1.8779      605.4      0.20     9,214
    fira                  2.0572           1.8797      668.5      0.22     7,861
    apollo                2.0877           1.8824      605.6      0.20     7,732
    apollo_mini           2.0559           1.8913      416.6      0.14     9,545

Every low-rank method gets 72-84% of AdamW's gain on the new domain with
14-22% of its optimizer state (the full-rank embedding and head are more
than half of what is left); the losses are the same on every run
(deterministic data and seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # examples/ siblings
try:
  import lowrank_optax as lro
except ImportError:  # a source checkout that is not pip-installed
  sys.path.insert(0, str(_HERE.parent))
  import lowrank_optax as lro

import corpus  # noqa: E402
import pretrain_lm  # noqa: E402
from llama import Llama, LlamaConfig, loss_fn  # noqa: E402


# ----------------------------------------------------------------------------
# The new domain: standard-library sources
# ----------------------------------------------------------------------------

#: Pure-Python modules of the standard library (paths under ``stdlib``), read
#: in this order; a file missing from an interpreter version is skipped.
STDLIB_FILES = (
    'argparse.py', 'ast.py', 'bisect.py', 'calendar.py', 'collections/__init__.py',
    'configparser.py', 'contextlib.py', 'copy.py', 'csv.py', 'dataclasses.py',
    'difflib.py', 'enum.py', 'functools.py', 'inspect.py', 'json/decoder.py',
    'json/encoder.py', 'operator.py', 'pprint.py', 'random.py', 'statistics.py',
    'string.py', 'tokenize.py', 'typing.py', 'uuid.py',
    # Held out (never trained on):
    'fractions.py', 'heapq.py', 'queue.py', 'shlex.py', 'textwrap.py',
)
HELD_OUT_FILES = ('fractions.py', 'heapq.py', 'queue.py', 'shlex.py', 'textwrap.py')


def stdlib_split() -> corpus.Split:
  """Train / held-out bytes of the standard-library sources (whole files held out)."""
  root = Path(sysconfig.get_paths()['stdlib'])
  parts = {True: [], False: []}
  for name in STDLIB_FILES:
    path = root / name
    if path.is_file():
      parts[name in HELD_OUT_FILES].append(path.read_bytes())
  if not parts[True] or not parts[False]:
    raise FileNotFoundError(f'standard-library sources not found under {root}')
  join = lambda chunks: np.frombuffer(b'\n\n'.join(chunks), dtype=np.uint8)
  return corpus.Split(train=join(parts[False]), held_out=join(parts[True]))


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneConfig:
  """Everything that defines a fine-tuning comparison (all fields are CLI flags)."""

  checkpoint: str | None = None     # a pretrain_lm.py --out dir; None: pre-train into <out>/pretrain
  methods: str = 'adamw,galore,frugal,fira,apollo,apollo_mini'  # those the library lacks are skipped
  steps: int = 150
  batch_size: int = 16
  seq_len: int = 128
  lr: float = 1e-3
  clip_norm: float = 1.0
  rank: int = 8
  update_proj_gap: int = 100
  galore_scale: float = 4.0         # GaLore's GLUE setting
  fira_scale: float = 1.0           # Fira's fine-tuning script
  projector: str | None = None      # GaLore / Fira projector; None: the recipe's default
  eval_batches: int = 8
  seed: int = 0
  out: str = 'runs/finetune'
  # The model pre-trained when no --checkpoint is given (pretrain_lm.py's flags).
  pretrain_steps: int = 300
  pretrain_optimizer: str = 'adamw'
  dim: int = 96
  n_layers: int = 3
  n_heads: int = 3


# ----------------------------------------------------------------------------
# Methods: make(learning_rate, config, params) -> GradientTransformation
# ----------------------------------------------------------------------------

def _adamw(lr, c, params):
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def _galore(lr, c, params):
  kw = {} if c.projector is None else dict(projector=c.projector)
  return lro.galore(lr, rank=c.rank, update_proj_gap=c.update_proj_gap,
                    scale=c.galore_scale, seed=c.seed, **kw)


def _frugal(lr, c, params):
  # run_glue.py's CoordAdamW: density = rank / min(shape of a projected weight);
  # the smallest matrix dimension here is the model width.
  dims = [min(x.shape[-2:]) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if x.ndim >= 2 and not _excluded(path)]
  rho = c.rank / min(dims)
  return lro.frugal(lr, rho=rho, mode='coordinates', projector='columns',
                    inactive_lr_scale=0.1, update_gap=c.update_proj_gap, seed=c.seed)


def _fira(lr, c, params):
  kw = {} if c.projector is None else dict(projector=c.projector)
  return lro.fira(lr, rank=c.rank, update_proj_gap=c.update_proj_gap,
                  scale=c.fira_scale, seed=c.seed, **kw)


def _apollo(lr, c, params):
  return lro.apollo(lr, rank=c.rank, scale=1.0, update_proj_gap=c.update_proj_gap, seed=c.seed)


def _apollo_mini(lr, c, params):
  return lro.apollo_mini(lr, scale=128.0, update_proj_gap=c.update_proj_gap, seed=c.seed)


def _excluded(path) -> bool:
  return re.search(lro.DEFAULT_EXCLUDE, jax.tree_util.keystr(path, simple=True, separator='/'),
                   flags=re.IGNORECASE) is not None


#: name -> (the ``lro`` attribute it needs or None, factory)
METHODS: dict[str, tuple[str | None, Callable]] = {
    'adamw': (None, _adamw),
    'galore': ('galore', _galore),
    'frugal': ('frugal', _frugal),
    'fira': ('fira', _fira),
    'apollo': ('apollo', _apollo),
    'apollo_mini': ('apollo_mini', _apollo_mini),
}


def available_methods(names: str) -> tuple[list[str], list[str]]:
  """(methods to run, methods skipped because the library lacks their recipe)."""
  run, skipped = [], []
  for name in (n.strip() for n in names.split(',') if n.strip()):
    if name not in METHODS:
      raise ValueError(f'unknown method {name!r}; choose from {sorted(METHODS)}')
    needs = METHODS[name][0]
    (run if needs is None or hasattr(lro, needs) else skipped).append(name)
  return run, skipped


# ----------------------------------------------------------------------------
# The pre-trained model
# ----------------------------------------------------------------------------

def pretrain_if_needed(c: FinetuneConfig) -> Path:
  """The pre-training run directory: ``--checkpoint``, or a quick pre-training run."""
  if c.checkpoint:
    return Path(c.checkpoint)
  run_dir = Path(c.out) / 'pretrain'
  if (run_dir / 'run.json').is_file() and (run_dir / 'checkpoints').is_dir():
    print(f'reusing the pre-trained model in {run_dir}', flush=True)
    return run_dir
  print(f'no --checkpoint: pre-training {c.pretrain_optimizer} for {c.pretrain_steps} steps '
        f'-> {run_dir}', flush=True)
  record = pretrain_lm.train(dict(
      optimizer=c.pretrain_optimizer, steps=c.pretrain_steps, batch_size=c.batch_size,
      seq_len=c.seq_len, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
      checkpoint_every=c.pretrain_steps, eval_batches=c.eval_batches, seed=c.seed,
      out=str(run_dir), progress=False, plot=False))
  m = record['metrics']
  print(f"pre-trained: held-out docs loss {m['held_out_loss']:.4f} "
        f"({m['wall_time_s']:.0f} s)", flush=True)
  return run_dir


def load_pretrained(run_dir: Path) -> tuple[Llama, int]:
  """The model of ``run_dir``'s latest orbax checkpoint (its optimizer state is not read).

  ``pretrain_lm.py`` saves ``nnx.to_pure_dict(nnx.state((model, optimizer)))``
  under the item ``state``: key ``'0'`` is the model. Only that subtree is
  restored (``partial_restore``), into the shapes and shardings of a freshly
  built model of the run's ``model_config``.
  """
  import orbax.checkpoint as ocp
  record = json.loads((run_dir / 'run.json').read_text())
  model = Llama(LlamaConfig(**record['model_config']), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  target = {'0': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(params))}
  manager = ocp.CheckpointManager((run_dir / 'checkpoints').resolve(), item_names=('state',))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {run_dir / "checkpoints"} '
                            '(run pretrain_lm.py with --checkpoint-every)')
  got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  manager.close()
  nnx.replace_by_pure_dict(params, got['state']['0'])
  nnx.update(model, params)
  return model, step


# ----------------------------------------------------------------------------
# Fine-tuning one method
# ----------------------------------------------------------------------------

def finetune(name: str, graphdef, params0, c: FinetuneConfig, data: corpus.Split,
             evaluate: Callable[[Any, str], float]) -> dict[str, Any]:
  """``c.steps`` steps of ``name`` from ``params0`` (not modified); returns its metrics."""
  schedule = optax.linear_schedule(c.lr, 0.0, c.steps)
  tx = METHODS[name][1](schedule, c, params0)
  if c.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params0)   # the steps donate their input buffers
  opt_state = tx.init(params)
  state_bytes = lro.memory_report(tx, params0).state_bytes
  batches = corpus.train_batches(data.train, c.batch_size, c.seq_len, seed=c.seed)

  losses, t_steps = [], 0.0
  for i in range(c.steps):
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, jnp.asarray(next(batches)))
    losses.append(float(loss))               # a host sync
    if i > 0:                                # step 1 compiles
      t_steps += time.perf_counter() - t
    if not math.isfinite(losses[-1]):
      raise FloatingPointError(f'{name}: non-finite loss {losses[-1]} at step {i + 1}')
  return {
      'method': name,
      'new_after': evaluate(params, 'new'),
      'old_after': evaluate(params, 'old'),
      'train_loss_first': float(np.mean(losses[:10])),
      'train_loss_last': float(np.mean(losses[-10:])),
      'state_bytes': int(state_bytes),
      'tokens_per_s': (c.steps - 1) * c.batch_size * c.seq_len / t_steps if t_steps else math.nan,
      'train_losses': losses,
  }


def _loss(params, graphdef, batch):
  return loss_fn(nnx.merge(graphdef, params), batch)


_eval_loss = jax.jit(_loss, static_argnums=1)


def run(config: FinetuneConfig | dict[str, Any] | None = None) -> dict[str, Any]:
  """Load (or pre-train) the model, fine-tune it with every method; returns the record."""
  t0 = time.perf_counter()
  c = config if isinstance(config, FinetuneConfig) else FinetuneConfig(**(config or {}))
  methods, skipped = available_methods(c.methods)
  for name in skipped:
    print(f'skipping {name}: this lowrank_optax has no lro.{METHODS[name][0]}', flush=True)

  run_dir = pretrain_if_needed(c)
  model, ckpt_step = load_pretrained(run_dir)
  graphdef, params0 = nnx.split(model)   # a Llama holds nnx.Param variables only
  params0 = nnx.as_pure(params0)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  print(f'loaded {run_dir} step {ckpt_step}: {n_params:,} params', flush=True)

  new = stdlib_split()
  old = corpus.load_split()
  evals = {'new': [jnp.asarray(b) for b in corpus.eval_batches(
               new.held_out, c.batch_size, c.seq_len, c.eval_batches)],
           'old': [jnp.asarray(b) for b in corpus.eval_batches(
               old.held_out, c.batch_size, c.seq_len, c.eval_batches)]}

  def evaluate(params, which: str) -> float:
    return float(np.mean([_eval_loss(params, graphdef, b) for b in evals[which]]))

  before = {k: evaluate(params0, k) for k in evals}
  print(f'new domain: {len(new.train):,} train / {len(new.held_out):,} held-out bytes of stdlib '
        f"source; before fine-tuning: held-out loss {before['new']:.4f} (new), "
        f"{before['old']:.4f} (old, the docs)", flush=True)

  results = []
  for name in methods:
    t = time.perf_counter()
    r = finetune(name, graphdef, params0, c, new, evaluate)
    r['wall_s'] = time.perf_counter() - t
    results.append(r)
    print(f"  {name:<12} new {before['new']:.4f} -> {r['new_after']:.4f}   "
          f"old {before['old']:.4f} -> {r['old_after']:.4f}   "
          f"{r['tokens_per_s']:,.0f} tok/s   ({r['wall_s']:.0f} s)", flush=True)

  adamw_bytes = lro.memory_report(_adamw(c.lr, c, params0), params0).state_bytes
  record = {'config': dataclasses.asdict(c), 'pretrained': str(run_dir),
            'checkpoint_step': ckpt_step, 'n_params': int(n_params), 'before': before,
            'adamw_state_bytes': int(adamw_bytes), 'skipped': skipped,
            'results': results, 'wall_time_s': time.perf_counter() - t0}
  out = Path(c.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'finetune.json').write_text(json.dumps(record, indent=1))
  return record


def table(record: dict[str, Any]) -> str:
  """The comparison as a text table."""
  b, kib = record['before'], 1 / 1024
  lines = [f"{'method':<12} {'new-domain loss':>20} {'old-domain loss':>20} "
           f"{'state KiB':>10} {'vs AdamW':>9} {'tokens/s':>9}",
           f"{'(before)':<12} {b['new']:>20.4f} {b['old']:>20.4f}"]
  for r in record['results']:
    lines.append(f"{r['method']:<12} {r['new_after']:>20.4f} {r['old_after']:>20.4f} "
                 f"{r['state_bytes'] * kib:>10.1f} "
                 f"{r['state_bytes'] / record['adamw_state_bytes']:>9.2f} "
                 f"{r['tokens_per_s']:>9,.0f}")
  lines.append(f"{record['n_params']:,} params; wall time {record['wall_time_s']:.0f} s")
  return '\n'.join(lines)


_HELP = {
    'checkpoint': 'a pretrain_lm.py --out directory (its latest orbax checkpoint is loaded); '
                  'default: pre-train a small model into <out>/pretrain (reused if there)',
    'methods': 'comma-separated, from ' + ', '.join(METHODS) + '; those the installed '
               'lowrank_optax lacks are skipped',
    'lr': 'peak learning rate of every method (linear decay to 0)',
    'clip_norm': 'global-norm gradient clipping; 0 disables',
    'rank': 'GaLore / Fira / APOLLO rank; FRUGAL density = rank / model width',
    'galore_scale': "GaLore's scale (alpha)",
    'fira_scale': "Fira's scale (alpha)",
    'projector': "GaLore / Fira projector; default: the recipe's",
    'pretrain_steps': 'steps of the pre-training run made when no --checkpoint is given',
    'dim': 'model width of that pre-training run (also --n-layers, --n-heads)',
}


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
  d = FinetuneConfig()
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(FinetuneConfig):
    kind = {'int': int, 'float': float}.get(str(f.type).split(' ')[0], str)
    p.add_argument('--' + f.name.replace('_', '-'), type=kind, default=getattr(d, f.name),
                   help=_HELP.get(f.name, f.name.replace('_', ' ')))
  return FinetuneConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  record = run(parse_args(argv))
  print('\n' + table(record), flush=True)
  return record


if __name__ == '__main__':
  main()
