"""Pre-train a small LLaMA-style byte-level language model with a low-rank optimizer.

The main example job of ``lowrank_optax``: a Flax NNX decoder (``llama.py``)
trained on the CPython documentation embedded in every Python install
(``corpus.py``), with either full-rank AdamW or GaLore. Nothing is downloaded.

    python examples/pretrain_lm.py                        # GaLore, ~1.5 min on 2 CPU cores
    python examples/pretrain_lm.py --optimizer adamw      # full-rank baseline
    python examples/pretrain_lm.py --steps 20             # smoke test

Each run writes ``<out>/run.json`` (config, final metrics, loss curves) and
``<out>/loss.png`` (train and held-out loss against step); ``--out`` defaults to
``runs/<optimizer>``.

Adding an optimizer: write ``make(learning_rate, config) -> GradientTransformation``
and register it in ``OPTIMIZERS`` together with its default peak learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # examples/ siblings: llama.py, corpus.py
try:
  import lowrank_optax as lro
except ImportError:  # running from a source checkout that is not pip-installed
  sys.path.insert(0, str(_HERE.parent))
  import lowrank_optax as lro

import corpus  # noqa: E402
from llama import Llama, LlamaConfig, count_params, loss_fn  # noqa: E402


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run (all fields are CLI flags)."""

  optimizer: str = 'galore'
  # Optimisation.
  steps: int = 400
  batch_size: int = 16
  seq_len: int = 128
  lr: float | None = None           # None: the optimizer's default (see OPTIMIZERS)
  warmup_frac: float = 0.1          # fraction of steps of linear warm-up
  final_lr_frac: float = 0.1        # cosine decays to this fraction of the peak
  weight_decay: float = 0.0
  clip_norm: float = 1.0            # global-norm gradient clipping; 0 disables
  # Low-rank (GaLore family) options.
  rank: int | None = None           # None: dim // 4
  update_proj_gap: int = 50
  galore_scale: float = 0.25
  projector: str = 'subspace_iteration'
  stagger: bool = False             # spread the leaves' refreshes over the period
  on_refresh: str = 'keep'          # keep | reset | rotate (rotate: projector='dct' only)
  # Model.
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  ffn_dim: int | None = None        # None: LLaMA's 8/3 * dim rounded up to a multiple of 16
  # Evaluation and bookkeeping.
  eval_every: int | None = None     # None: max(25, steps // 8)
  eval_batches: int = 8
  seed: int = 0
  out: str | None = None            # None: runs/<optimizer>
  progress: bool = True             # show a tqdm progress bar
  plot: bool = True                 # write loss.png

  def resolved(self) -> 'TrainConfig':
    """A copy with every ``None`` default filled in."""
    c = dataclasses.replace(self)
    if c.steps < 1:
      raise ValueError('steps must be >= 1')
    if c.optimizer not in OPTIMIZERS:
      raise ValueError(f'unknown optimizer {c.optimizer!r}; choose from {sorted(OPTIMIZERS)}')
    if c.lr is None:
      c.lr = OPTIMIZERS[c.optimizer].default_lr
    if c.rank is None:
      c.rank = max(1, c.dim // 4)
    if c.ffn_dim is None:
      c.ffn_dim = 16 * math.ceil(8 * c.dim / 3 / 16)
    if c.eval_every is None:
      c.eval_every = max(25, c.steps // 8)
    if c.out is None:
      c.out = os.path.join('runs', c.optimizer)
    return c

  def model_config(self) -> LlamaConfig:
    return LlamaConfig(vocab_size=corpus.VOCAB_SIZE, dim=self.dim, n_layers=self.n_layers,
                       n_heads=self.n_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len)


# ----------------------------------------------------------------------------
# Optimizers: one factory per method. Register new methods here.
# ----------------------------------------------------------------------------

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How to build an optimizer: ``make(learning_rate, config)`` and its default peak lr."""
  make: Callable[[Schedule, TrainConfig], optax.GradientTransformation]
  default_lr: float
  description: str = ''


def _adamw(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)


def _galore(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.galore(learning_rate, rank=c.rank, update_proj_gap=c.update_proj_gap,
                    scale=c.galore_scale, projector=c.projector, stagger=c.stagger,
                    on_refresh=c.on_refresh, weight_decay=c.weight_decay, seed=c.seed)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    'adamw': OptimizerSpec(_adamw, default_lr=1e-3, description='full-rank AdamW baseline'),
    # GaLore paper recipe (LLaMA pre-training): lr 1e-2 with scale 0.25.
    'galore': OptimizerSpec(_galore, default_lr=1e-2, description='GaLore (Zhao et al., 2024)'),
}


def make_optimizer(c: TrainConfig) -> tuple[optax.GradientTransformation, Schedule]:
  """Cosine schedule with linear warm-up, optional clipping, then the chosen method."""
  warmup = max(1, int(c.warmup_frac * c.steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(c.steps, warmup + 1), end_value=c.lr * c.final_lr_frac)
  tx = OPTIMIZERS[c.optimizer].make(schedule, c)
  if c.clip_norm and c.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
  return tx, schedule


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def _as_config(config: TrainConfig | argparse.Namespace | dict[str, Any] | None) -> TrainConfig:
  if config is None:
    return TrainConfig()
  if isinstance(config, TrainConfig):
    return config
  if isinstance(config, argparse.Namespace):
    config = vars(config)
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = set(config) - names
  if unknown:
    raise ValueError(f'unknown config fields: {sorted(unknown)}')
  return TrainConfig(**config)


def train(config: TrainConfig | argparse.Namespace | dict[str, Any] | None = None) -> dict[str, Any]:
  """Train one model and return the run record (also written to ``<out>/run.json``).

  Accepts a ``TrainConfig``, an ``argparse.Namespace`` or a dict of its fields.
  The record holds ``config``, final ``metrics`` and the loss ``curves``.
  """
  t_start = time.perf_counter()
  c = _as_config(config).resolved()
  out_dir = Path(c.out)
  out_dir.mkdir(parents=True, exist_ok=True)

  # Data.
  split = corpus.load_split()
  batches = corpus.train_batches(split.train, c.batch_size, c.seq_len, seed=c.seed)
  eval_set = [jnp.asarray(b) for b in
              corpus.eval_batches(split.held_out, c.batch_size, c.seq_len, c.eval_batches)]

  # Model and optimizer.
  model = Llama(c.model_config(), rngs=nnx.Rngs(c.seed))
  tx, schedule = make_optimizer(c)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  report = lro.memory_report(tx, params)
  n_params = count_params(model)

  # Jitted steps over the split (graphdef, state) pair: the graph is traversed
  # once here instead of on every call, and the state buffers are donated.
  graphdef, state = nnx.split((model, optimizer))

  def _train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  train_step = jax.jit(_train_step, donate_argnums=0)

  @jax.jit
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return loss_fn(model, batch)

  def evaluate(state) -> float:
    return float(np.mean([eval_step(state, b) for b in eval_set]))

  # Loop. Throughput counts training steps only: the first step (compilation)
  # and the time spent in evaluation are excluded.
  tokens_per_step = c.batch_size * c.seq_len
  train_curve: list[float] = []
  eval_curve: list[tuple[int, float]] = [(0, evaluate(state))]
  eval_time: list[float] = [0.0]    # accumulated training time (timer) at each evaluation
  pending: list[jax.Array] = []
  timer = _Timer()
  bar = _progress(c)
  cpu_start = time.process_time()
  for step in range(1, c.steps + 1):
    t_step = time.perf_counter()
    state, loss = train_step(state, jnp.asarray(next(batches)))
    pending.append(loss)
    if step == 1:
      loss.block_until_ready()
      first_step_time = time.perf_counter() - t_step
      timer.start()
    if step % 10 == 0 or step == c.steps or step % c.eval_every == 0:
      train_curve.extend(float(x) for x in pending)  # one host sync per flush
      pending.clear()
      if not math.isfinite(train_curve[-1]):
        _close(bar)
        raise FloatingPointError(f'non-finite training loss {train_curve[-1]} at step {step}')
      if step % c.eval_every == 0 or step == c.steps:
        timer.pause()
        eval_time.append(timer.elapsed())
        eval_curve.append((step, evaluate(state)))
        timer.start()
      if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f'{train_curve[-1]:.3f}', held_out=f'{eval_curve[-1][1]:.3f}',
                        tok_s=f'{timer.rate((step - 1) * tokens_per_step):,.0f}')
  _close(bar)
  wall = time.perf_counter() - t_start
  cpu_time = time.process_time() - cpu_start
  train_time = timer.elapsed()
  tok_s = timer.rate((c.steps - 1) * tokens_per_step)

  window = min(20, len(train_curve))
  metrics = {
      'train_loss': float(np.mean(train_curve[-window:])),   # mean over the last steps
      'train_loss_last': train_curve[-1],
      'held_out_loss': eval_curve[-1][1],
      'held_out_loss_initial': eval_curve[0][1],
      'held_out_bits_per_byte': eval_curve[-1][1] / math.log(2),
      'tokens_per_s': tok_s,
      'wall_time_s': wall,                # the whole train() call
      'train_time_s': train_time,         # steps 2..N only, excluding evaluation
      'first_step_time_s': first_step_time,  # includes compilation
      'cpu_time_s': cpu_time,             # training loop, all threads (> wall when parallel)
      'state_bytes': int(report.state_bytes),
      'adam_state_bytes': int(report.adam_bytes),
      'n_params': int(n_params),
      'tokens_seen': c.steps * tokens_per_step,
  }
  record = {
      'config': dataclasses.asdict(c),
      'model_config': dataclasses.asdict(c.model_config()),
      'metrics': metrics,
      'curves': {
          'train_step': list(range(1, len(train_curve) + 1)),
          'train_loss': train_curve,
          'eval_step': [s for s, _ in eval_curve],
          'eval_loss': [l for _, l in eval_curve],
          'eval_time_s': eval_time,      # train_time_s so far at each evaluation
          'lr': np.asarray(schedule(jnp.arange(c.steps))).tolist(),
      },
      'environment': {'jax': jax.__version__, 'optax': optax.__version__,
                      'backend': jax.default_backend(), 'devices': str(jax.devices())},
  }
  with open(out_dir / 'run.json', 'w') as f:
    json.dump(record, f, indent=1)
  if c.plot:
    plot_losses(record, out_dir / 'loss.png')
  return record


class _Timer:
  """Accumulates running time between ``start()`` and ``pause()`` calls."""

  def __init__(self):
    self.total, self._since = 0.0, None

  def start(self) -> None:
    self._since = time.perf_counter()

  def pause(self) -> None:
    if self._since is not None:
      self.total += time.perf_counter() - self._since
      self._since = None

  def elapsed(self) -> float:
    running = 0.0 if self._since is None else time.perf_counter() - self._since
    return self.total + running

  def rate(self, count: float) -> float:
    """``count`` per second of accumulated time (NaN before any time has run)."""
    elapsed = self.elapsed()
    return count / elapsed if elapsed > 0 and count > 0 else float('nan')


def _progress(c: TrainConfig):
  if not c.progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=c.steps, desc=c.optimizer, unit='step', dynamic_ncols=True)


def _close(bar) -> None:
  if bar is not None:
    bar.close()


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------

def plot_losses(record: dict[str, Any], path: str | os.PathLike) -> None:
  """Train (raw and smoothed) and held-out loss against step."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  curves, c = record['curves'], record['config']
  steps, train_loss = np.asarray(curves['train_step']), np.asarray(curves['train_loss'])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(steps, train_loss, color='tab:blue', alpha=0.25, lw=0.8)
  k = max(1, min(20, len(train_loss) // 10))
  if k > 1:
    smooth = np.convolve(train_loss, np.ones(k) / k, mode='valid')
    ax.plot(steps[k - 1:], smooth, color='tab:blue', label=f'train (mean of {k})')
  else:
    ax.plot(steps, train_loss, color='tab:blue', label='train')
  ax.plot(curves['eval_step'], curves['eval_loss'], 'o-', color='tab:orange', label='held-out')
  ax.axhline(math.log(corpus.VOCAB_SIZE), color='gray', ls=':', lw=1, label='uniform, ln 256')
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats / byte)')
  title = f"{c['optimizer']}  lr={c['lr']:g}"
  if c['optimizer'] != 'adamw':
    title += f"  rank={c['rank']}  gap={c['update_proj_gap']}  {c['projector']}" + ('+stagger' if c.get('stagger') else '')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(record: dict[str, Any]) -> str:
  """A human-readable final summary of a run."""
  c, m = record['config'], record['metrics']
  mib = 1 / 2 ** 20
  lines = [
      f"optimizer        {c['optimizer']}  (peak lr {c['lr']:g}"
      + (f", rank {c['rank']}, update_proj_gap {c['update_proj_gap']}, scale {c['galore_scale']:g}, "
         f"projector {c['projector']}" + (', staggered' if c.get('stagger') else '') if c['optimizer'] != 'adamw' else '') + ')',
      f"model            {m['n_params']:,} params  (dim {c['dim']}, {c['n_layers']} layers, "
      f"{c['n_heads']} heads, ffn {c['ffn_dim']})",
      f"data             {c['steps']} steps x {c['batch_size']} x {c['seq_len']} bytes "
      f"= {m['tokens_seen']:,} tokens",
      f"train loss       {m['train_loss']:.4f}  (mean of last steps; last {m['train_loss_last']:.4f})",
      f"held-out loss    {m['held_out_loss']:.4f}  ({m['held_out_bits_per_byte']:.3f} bits/byte; "
      f"initial {m['held_out_loss_initial']:.4f})",
      f"throughput       {m['tokens_per_s']:,.0f} tokens/s",
      f"wall time        {m['wall_time_s']:.1f} s  (first step incl. compile {m['first_step_time_s']:.1f} s, "
      f"steps 2-{c['steps']} {m['train_time_s']:.1f} s; loop CPU time {m['cpu_time_s']:.1f} s)",
      f"optimizer state  {m['state_bytes'] * mib:.3f} MiB  (Adam on the same params: "
      f"{m['adam_state_bytes'] * mib:.3f} MiB, ratio {m['state_bytes'] / m['adam_state_bytes']:.2f})",
      f"written          {Path(c['out']) / 'run.json'}"
      + (f", {Path(c['out']) / 'loss.png'}" if c['plot'] else ''),
  ]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> TrainConfig:
  d = TrainConfig()
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--optimizer', choices=sorted(OPTIMIZERS), default=d.optimizer)
  p.add_argument('--steps', type=int, default=d.steps)
  p.add_argument('--batch-size', type=int, default=d.batch_size)
  p.add_argument('--seq-len', type=int, default=d.seq_len)
  p.add_argument('--lr', type=float, default=None,
                 help='peak learning rate; default per optimizer: '
                 + ', '.join(f'{k} {v.default_lr:g}' for k, v in OPTIMIZERS.items()))
  p.add_argument('--warmup-frac', type=float, default=d.warmup_frac)
  p.add_argument('--final-lr-frac', type=float, default=d.final_lr_frac)
  p.add_argument('--weight-decay', type=float, default=d.weight_decay)
  p.add_argument('--clip-norm', type=float, default=d.clip_norm, help='0 disables clipping')
  p.add_argument('--rank', type=int, default=None, help='projection rank; default dim // 4')
  p.add_argument('--update-proj-gap', type=int, default=d.update_proj_gap,
                 help='steps between projector refreshes')
  p.add_argument('--galore-scale', type=float, default=d.galore_scale)
  p.add_argument('--projector', default=d.projector,
                 help="subspace_iteration | svd | eigh | randomized | dct")
  p.add_argument('--stagger', action='store_true',
                 help='spread the projected leaves\' refreshes evenly over the period')
  p.add_argument('--on-refresh', default=d.on_refresh, choices=('keep', 'reset', 'rotate'),
                 help="inner state at a refresh: keep (GaLore), reset, rotate (dct only)")
  p.add_argument('--dim', type=int, default=d.dim)
  p.add_argument('--n-layers', type=int, default=d.n_layers)
  p.add_argument('--n-heads', type=int, default=d.n_heads)
  p.add_argument('--ffn-dim', type=int, default=None, help='default 8/3 * dim, multiple of 16')
  p.add_argument('--eval-every', type=int, default=None, help='default max(25, steps // 8)')
  p.add_argument('--eval-batches', type=int, default=d.eval_batches)
  p.add_argument('--seed', type=int, default=d.seed)
  p.add_argument('--out', default=None, help='output directory; default runs/<optimizer>')
  p.add_argument('--no-progress', dest='progress', action='store_false')
  p.add_argument('--no-plot', dest='plot', action='store_false')
  return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  config = parse_args(argv).resolved()
  print(f'backend {jax.default_backend()}; training {config.optimizer} -> {config.out}', flush=True)
  record = train(config)
  print('\n' + summary(record), flush=True)
  return record


if __name__ == '__main__':
  main()
