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
  param_dtype: str = 'float32'      # float32 | bfloat16 (params, grads and default state dtype)
  # Low-rank (GaLore family) options.
  rank: int | None = None           # None: dim // 4
  rank_policy: str | None = None    # per-leaf ranks, 'regex=rank,...' (rank: int, fraction or none)
  update_proj_gap: int = 50
  galore_scale: float = 0.25
  projector: str | None = None      # None: the recipe's default
  stagger: bool = False             # spread the leaves' refreshes over the period
  on_refresh: str = 'keep'          # keep | reset | rotate (rotate: projector='dct' only)
  # Checkpointing (orbax).
  checkpoint_every: int = 0         # save every N steps (and at the end); 0: never
  resume: bool = False              # continue from the latest checkpoint in <out>/checkpoints
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


def rank_policy(c: TrainConfig):
  """``--rank`` (an int), or ``--rank-policy 'attn=32,mlp=0.25,lm_head=none'``.

  A policy string becomes an ``lro`` dict rank policy: comma-separated
  ``regex=rank`` rules over parameter paths (``blocks/0/attn/q_proj/kernel``,
  ``blocks/0/mlp/up_proj/kernel``, ...), first match wins, ``none`` keeps a
  leaf at full rank and unmatched leaves stay at full rank.
  """
  if not c.rank_policy:
    return c.rank
  rules = {}
  for item in c.rank_policy.split(','):
    pattern, sep, value = item.partition('=')
    if not sep or not pattern.strip():
      raise ValueError(f'--rank-policy expects regex=rank items, got {item!r}')
    value = value.strip().lower()
    rules[pattern.strip()] = (None if value in ('none', 'full') else
                              float(value) if '.' in value else int(value))
  return rules


def _projection(c: TrainConfig, default_projector: str = 'subspace_iteration') -> dict[str, Any]:
  """The GaLore-family keywords shared by the low-rank recipes."""
  return dict(rank=rank_policy(c), update_proj_gap=c.update_proj_gap,
              projector=c.projector or default_projector, stagger=c.stagger,
              on_refresh=c.on_refresh, seed=c.seed)


def _adamw(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)


def _contrib_galore(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  # The peer, optax.contrib.galore: one global rank, every 2-D leaf, full SVD.
  return optax.contrib.galore(learning_rate, rank=c.rank, update_proj_gap=c.update_proj_gap,
                              scale=c.galore_scale, weight_decay=c.weight_decay)


def _galore(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.galore(learning_rate, scale=c.galore_scale, weight_decay=c.weight_decay,
                    **_projection(c))


def _fira(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.fira(learning_rate, scale=c.galore_scale, weight_decay=c.weight_decay,
                  **_projection(c))


def _natural_galore(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.natural_galore(learning_rate, scale=c.galore_scale, weight_decay=c.weight_decay,
                            **_projection(c, 'svd'))


def _osd(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  kw = _projection(c)
  kw.pop('projector')  # its projector is the online PCA
  # The basis optimizer's lr follows the schedule as (1/T) lr_t / lr_peak.
  return lro.online_subspace_descent(learning_rate, scale=c.galore_scale,
                                     peak_learning_rate=c.lr,
                                     weight_decay=c.weight_decay, **kw)


def _q_galore(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.q_galore(learning_rate, rank=rank_policy(c), update_proj_gap=c.update_proj_gap,
                      scale=c.galore_scale, weight_decay=c.weight_decay, seed=c.seed)


def _apollo(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.apollo(learning_rate, rank=rank_policy(c), update_proj_gap=c.update_proj_gap,
                    weight_decay=c.weight_decay, seed=c.seed)


def _apollo_mini(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  # The 60M script's setting (scale 128, scale_front) for this small model.
  return lro.apollo_mini(learning_rate, update_proj_gap=c.update_proj_gap,
                         scale_front=True, weight_decay=c.weight_decay, seed=c.seed)


def _frugal(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  # The pre-training headline: block mode, descending order, rho 0.25, sign.
  return lro.frugal(learning_rate, update_gap=c.update_proj_gap,
                    weight_decay=c.weight_decay, seed=c.seed)


def _dct_adamw(learning_rate: Schedule, c: TrainConfig) -> optax.GradientTransformation:
  return lro.dct_adamw(learning_rate, rank=rank_policy(c), weight_decay=c.weight_decay)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    'adamw': OptimizerSpec(_adamw, default_lr=1e-3, description='full-rank AdamW baseline'),
    'contrib_galore': OptimizerSpec(_contrib_galore, default_lr=1e-2,
                                    description='optax.contrib.galore (the JAX peer)'),
    # The GaLore-family papers' recipes (LLaMA pre-training): lr 1e-2 with scale 0.25.
    'galore': OptimizerSpec(_galore, default_lr=1e-2, description='GaLore (Zhao et al., 2024)'),
    'fira': OptimizerSpec(_fira, default_lr=1e-2, description='Fira (Chen et al., 2024)'),
    'apollo': OptimizerSpec(_apollo, default_lr=1e-2, description='APOLLO (Zhu et al., 2025)'),
    'apollo_mini': OptimizerSpec(_apollo_mini, default_lr=1e-2,
                                 description='APOLLO-Mini (rank 1, tensor scaling)'),
    'natural_galore': OptimizerSpec(_natural_galore, default_lr=1e-2,
                                    description='Natural GaLore (Das, 2024)'),
    'q_galore': OptimizerSpec(_q_galore, default_lr=1.5e-2,
                              description='Q-GaLore (Zhang et al., 2024)'),
    'osd': OptimizerSpec(_osd, default_lr=1e-2,
                         description='Online Subspace Descent (Liang et al., 2024)'),
    # FRUGAL's and DCT-AdamW's scripts use AdamW-like learning rates.
    'frugal': OptimizerSpec(_frugal, default_lr=1e-3, description='FRUGAL (Zmushko et al., 2025)'),
    'dct_adamw': OptimizerSpec(_dct_adamw, default_lr=1e-3,
                               description='DCT-AdamW (Modoranu et al., 2025)'),
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
  if c.param_dtype != 'float32':
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(c.param_dtype), params))
  tx, schedule = make_optimizer(c)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  report = lro.memory_report(tx, params)
  adamw_bytes = lro.memory_report(optax.adamw(1e-3), params).state_bytes
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

  def refreshed(state) -> int:
    """Leaves whose basis the last step refreshed (``SubspaceState.refreshed``)."""
    _, opt = nnx.merge(graphdef, state)
    try:
      n = lro.subspace_state(opt.opt_state).refreshed
    except ValueError:  # no subspace (adamw, frugal's block mode, the peer)
      return 0
    return int(n.get_value() if isinstance(n, nnx.Variable) else n)

  # Loop. Throughput counts training steps only: the first step (compilation)
  # and the time spent in evaluation are excluded. Every step is timed (one
  # host sync per step), so the steps that refresh bases can be told apart.
  tokens_per_step = c.batch_size * c.seq_len
  train_curve: list[float] = []
  eval_time: list[float] = [0.0]    # accumulated training time (timer) at each evaluation
  # (step, seconds, leaves refreshed, compiled in this step): steps 2..N.
  step_times: list[tuple[int, float, int, bool]] = []
  first_step, first_step_time = 1, float('nan')
  ckpt = _Checkpointer(out_dir / 'checkpoints', c) if (c.checkpoint_every or c.resume) else None
  if c.resume:
    first_step, state, saved = ckpt.restore(state)
    train_curve, eval_time, step_times = saved['train_curve'], saved['eval_time'], [
        tuple(x) for x in saved['step_times']]
    eval_curve = [tuple(x) for x in saved['eval_curve']]
    resumed_time = saved['train_time']
    for _ in range(first_step - 1):  # the same data order as an uninterrupted run
      next(batches)
  else:
    eval_curve = [(0, evaluate(state))]
    resumed_time = 0.0
  timer = _Timer(resumed_time)

  def timed_steps() -> int:
    """Steps whose time the timer holds (not the compiling first step)."""
    return sum(not compiled for *_, compiled in step_times)
  bar = _progress(c, first_step - 1)
  cpu_start = time.process_time()
  for step in range(first_step, c.steps + 1):
    t_step = time.perf_counter()
    state, loss = train_step(state, jnp.asarray(next(batches)))
    loss = float(loss)   # a host sync: the step is done
    seconds = time.perf_counter() - t_step
    train_curve.append(loss)
    if step == first_step:
      first_step_time = seconds
      timer.start()
    if step > 1:
      step_times.append((step, seconds, refreshed(state), step == first_step))
    if not math.isfinite(loss):
      _close(bar)
      raise FloatingPointError(f'non-finite training loss {loss} at step {step}')
    if step % c.eval_every == 0 or step == c.steps:
      timer.pause()
      eval_time.append(timer.elapsed())
      eval_curve.append((step, evaluate(state)))
      timer.start()
    if ckpt is not None and c.checkpoint_every and (
        step % c.checkpoint_every == 0 or step == c.steps):
      timer.pause()
      ckpt.save(step, state, dict(train_curve=train_curve, eval_curve=eval_curve,
                                  eval_time=eval_time, step_times=step_times,
                                  train_time=timer.elapsed()))
      timer.start()
    if bar is not None and (step % 10 == 0 or step == c.steps):
      bar.update(step - bar.n)
      bar.set_postfix(loss=f'{train_curve[-1]:.3f}', held_out=f'{eval_curve[-1][1]:.3f}',
                      tok_s=f'{timer.rate(timed_steps() * tokens_per_step):,.0f}')
  _close(bar)
  wall = time.perf_counter() - t_start
  cpu_time = time.process_time() - cpu_start
  train_time = timer.elapsed()
  tok_s = timer.rate(timed_steps() * tokens_per_step)
  refresh_steps = [t for _, t, n, compiled in step_times if n and not compiled]
  other_steps = [t for _, t, n, compiled in step_times if not n and not compiled]

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
      'adamw_state_bytes': int(adamw_bytes),
      'refresh_steps': len(refresh_steps),            # timed steps that refreshed bases
      'refresh_time_s': float(np.sum(refresh_steps)) if refresh_steps else 0.0,
      'refresh_step_median_s': float(np.median(refresh_steps)) if refresh_steps else None,
      'other_step_median_s': float(np.median(other_steps)) if other_steps else None,
      'resumed_at_step': first_step if c.resume else None,
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
          'step_time_s': [t for _, t, _, _ in step_times],       # steps 2..N
          'step_refreshed': [n for _, _, n, _ in step_times],    # leaves refreshed per step
          'step_compiled': [c for _, _, _, c in step_times],     # resumed runs: first step
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


class _Checkpointer:
  """Orbax checkpoints of the model and optimizer state, plus the loop's curves.

  ``save`` writes the ``(model, optimizer)`` state (a pure pytree of arrays)
  and the curves so far; ``restore`` reads the latest into the structure of
  the freshly built state, so a resumed run continues bit-exactly (the
  data iterator is advanced to the same position by the caller).
  """

  def __init__(self, directory: Path, c: TrainConfig):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def save(self, step: int, state, curves: dict[str, Any]) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        curves=ocp.args.JsonSave(curves)))
    self.manager.wait_until_finished()

  def restore(self, state):
    ocp = self._ocp
    step = self.manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'--resume: no checkpoint in {self.manager.directory}')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        nnx.to_pure_dict(state))
    got = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), curves=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(state, got['state'])
    return step + 1, state, got['curves']


class _Timer:
  """Accumulates running time between ``start()`` and ``pause()`` calls."""

  def __init__(self, total: float = 0.0):
    self.total, self._since = total, None

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


def _progress(c: TrainConfig, done: int = 0):
  if not c.progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=c.steps, initial=done, desc=c.optimizer, unit='step', dynamic_ncols=True)


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
    title += (f"  rank={c['rank_policy'] or c['rank']}  gap={c['update_proj_gap']}"
              + (f"  {c['projector']}" if c['projector'] else '')
              + ('+stagger' if c.get('stagger') else ''))
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
      + (f", rank {c['rank_policy'] or c['rank']}, update_proj_gap {c['update_proj_gap']}"
         + (f", projector {c['projector']}" if c['projector'] else '')
         + (', staggered' if c.get('stagger') else '') if c['optimizer'] != 'adamw' else '')
      + (f", {c['param_dtype']} params" if c['param_dtype'] != 'float32' else '') + ')',
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
      f"optimizer state  {m['state_bytes'] * mib:.3f} MiB  (optax.adamw on the same params: "
      f"{m['adamw_state_bytes'] * mib:.3f} MiB, ratio {m['state_bytes'] / m['adamw_state_bytes']:.2f})",
      f"refreshes        {m['refresh_steps']} steps refreshed bases, {m['refresh_time_s']:.2f} s in all"
      + (f" (median {m['refresh_step_median_s'] * 1e3:.0f} ms against {m['other_step_median_s'] * 1e3:.0f} ms"
         " for other steps)" if m['refresh_steps'] and m['other_step_median_s'] else ''),
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
  p.add_argument('--rank-policy', default=None,
                 help="per-leaf ranks as 'regex=rank,...' over parameter paths, e.g. "
                      "'attn=16,mlp=0.25' (int, fraction of the smaller dimension, or none)")
  p.add_argument('--param-dtype', default=d.param_dtype, choices=('float32', 'bfloat16'))
  p.add_argument('--checkpoint-every', type=int, default=d.checkpoint_every,
                 help='save an orbax checkpoint every N steps (and at the end); 0: never')
  p.add_argument('--resume', action='store_true',
                 help='continue from the latest checkpoint in <out>/checkpoints')
  p.add_argument('--update-proj-gap', type=int, default=d.update_proj_gap,
                 help='steps between projector refreshes')
  p.add_argument('--galore-scale', type=float, default=d.galore_scale)
  p.add_argument('--projector', default=None,
                 help='default: the recipe\'s; one of ' + ', '.join(lro.projectors.names()))
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
