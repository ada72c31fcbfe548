"""Multi-process (multi-host) FSDP training with GaLore, orbax checkpoint and resume.

The main example job's model (``llama.py``, a byte-level LLaMA on the CPython
docs from ``corpus.py``), tiny, trained with ``lro.galore`` on one global mesh
that spans every process's devices. Launch the script once per process; the
same file runs on a TPU pod slice, a multi-node GPU cluster, or as N processes
on one CPU machine:

    # 2 processes x 4 virtual CPU devices on localhost (one line per process)
    python examples/multihost.py --coordinator localhost:12355 --num-processes 2 \\
        --process-id 0 --local-devices 4 --out runs/multihost &
    python examples/multihost.py --coordinator localhost:12355 --num-processes 2 \\
        --process-id 1 --local-devices 4 --out runs/multihost

    # the same global mesh (8 devices) in one process, for comparison
    python examples/multihost.py --single-process --local-devices 8 --out runs/single

    # TPU pod slice / SLURM: no distributed flags, jax.distributed.initialize()
    # detects the cluster
    python examples/multihost.py --out /shared/runs/multihost

What every process does:

1. ``jax.distributed.initialize(...)`` (skipped with ``--single-process``).
   On CPU the cross-process collectives go through gloo
   (``jax_cpu_collectives_implementation``).
2. One global mesh over ``jax.devices()`` (all processes' devices) with an
   ``fsdp`` axis (and a ``tp`` axis with ``--tp N``), of ``--axis-type``
   ``explicit`` (the default of ``jax.make_mesh``) or ``auto``.
3. The model's params, created identically on every process, become global
   arrays sharded over ``fsdp`` on their largest axis (FSDP); the forward pass
   all-gathers each weight (``reshard`` to replicated), so the gradients come
   back reduce-scattered to the params' sharding.
4. The optimizer state of ``lro.galore`` is created sharded: with
   ``jax.jit(tx.init, out_shardings=lro.state_shardings(tx, params))`` where
   the library has it, else by an eager ``tx.init(params)`` on the sharded
   params.
5. ``--steps`` training steps on deterministic global batches; each process
   supplies only the rows of the batch that live on its own devices
   (``jax.make_array_from_callback``).
6. Before step ``--ckpt-step`` every process takes part in an orbax save of
   ``{"params", "opt_state"}``; after the uninterrupted run, the checkpoint is
   restored into an abstract target (``jax.eval_shape`` + shardings) and
   training continues from there to ``--steps`` again. ``--restore-from DIR``
   restores another run's checkpoint instead (e.g. one written by a
   different number of processes).
7. Process 0 writes ``<out>/result.json`` (per-step losses of both
   trajectories, checksums of params and state) and the full params at the
   start, after the uninterrupted run and after the resumed one
   (``<out>/{initial,final,resumed}_params.npz``); every process writes
   ``<out>/process_<i>.json`` with the losses and checksums it saw.

Every process prints its loss per step; ``--out`` must be the same directory,
visible to every process (a shared file system on a real cluster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group('distributed runtime')
  g.add_argument('--coordinator', default=None,
                 help='host:port of process 0 (None: auto-detect, e.g. TPU pod, SLURM)')
  g.add_argument('--num-processes', type=int, default=None)
  g.add_argument('--process-id', type=int, default=None)
  g.add_argument('--single-process', action='store_true',
                 help='do not call jax.distributed.initialize (one process, local devices only)')
  g.add_argument('--local-devices', type=int, default=None,
                 help='run on CPU with this many virtual devices per process')
  g.add_argument('--init-timeout', type=int, default=120,
                 help='seconds jax.distributed.initialize waits for the other processes')
  g = p.add_argument_group('mesh')
  g.add_argument('--axis-type', choices=('explicit', 'auto'), default='explicit')
  g.add_argument('--tp', type=int, default=1,
                 help='size of a second mesh axis "tp" (params sharded on both matrix axes)')
  g.add_argument('--init', choices=('auto', 'jit', 'eager'), default='auto',
                 help='how the sharded optimizer state is created: jit (with '
                      'lro.state_shardings), eager (tx.init on sharded params), '
                      'auto (jit when the library has lro.state_shardings)')
  g = p.add_argument_group('model and training (tiny by default: seconds on CPU)')
  g.add_argument('--dim', type=int, default=32)
  g.add_argument('--n-layers', type=int, default=2)
  g.add_argument('--n-heads', type=int, default=2)
  g.add_argument('--ffn-dim', type=int, default=64)
  g.add_argument('--seq-len', type=int, default=32)
  g.add_argument('--batch-size', type=int, default=None,
                 help='global batch (default: 2 per device of the fsdp axis)')
  g.add_argument('--steps', type=int, default=8)
  g.add_argument('--ckpt-step', type=int, default=4,
                 help='save the checkpoint before this (0-based) step, restore it and continue')
  g.add_argument('--lr', type=float, default=1e-2)
  g.add_argument('--rank', type=int, default=8)
  g.add_argument('--update-proj-gap', type=int, default=3)
  g.add_argument('--projector', default='subspace_iteration')
  g.add_argument('--seed', type=int, default=0)
  g = p.add_argument_group('output')
  g.add_argument('--out', default='runs/multihost',
                 help='directory shared by all processes: checkpoint, result.json')
  g.add_argument('--restore-from', default=None,
                 help='checkpoint directory to restore at --ckpt-step (default: this run\'s own)')
  args = p.parse_args(argv)
  if not 0 < args.ckpt_step < args.steps:
    p.error('need 0 < --ckpt-step < --steps')
  if args.num_processes == 1 and args.coordinator is None:
    args.single_process = True
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.perf_counter()

  # Virtual CPU devices must be requested before jax is imported.
  if args.local_devices is not None:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    flags.append(f'--xla_force_host_platform_device_count={args.local_devices}')
    os.environ['XLA_FLAGS'] = ' '.join(flags)

  import jax
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from etils import epath
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  here = Path(__file__).resolve().parent
  sys.path.insert(0, str(here))  # llama.py, corpus.py
  try:
    import lowrank_optax as lro
  except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(here.parent))
    import lowrank_optax as lro

  # -- 1. the distributed runtime --------------------------------------------
  # Cross-process collectives on CPU need an implementation: gloo (the default
  # in recent JAX; older versions had none). TPU and GPU collectives ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if not args.single_process:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=args.init_timeout)
  pid, nproc = jax.process_index(), jax.process_count()
  # Imported only now: importing llama.py initialises the XLA backend (its
  # default ``rngs=nnx.Rngs(0)`` creates a key), which must come after
  # jax.distributed.initialize.
  import corpus
  from llama import Llama, LlamaConfig, loss_fn

  def log(*a):
    print(f'[process {pid}/{nproc} {time.perf_counter() - t_start:6.1f}s]', *a, flush=True)

  log(f'{jax.local_device_count()} local / {jax.device_count()} global devices '
      f'({jax.default_backend()}), jax {jax.__version__}')

  # -- 2. one global mesh ----------------------------------------------------
  n_dev = jax.device_count()
  if n_dev % args.tp:
    raise SystemExit(f'--tp {args.tp} does not divide {n_dev} devices')
  axis_type = {'explicit': jax.sharding.AxisType.Explicit,
               'auto': jax.sharding.AxisType.Auto}[args.axis_type]
  if args.tp > 1:
    shape, names = (n_dev // args.tp, args.tp), ('fsdp', 'tp')
  else:
    shape, names = (n_dev,), ('fsdp',)
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
  explicit = args.axis_type == 'explicit'
  n_fsdp = shape[0]
  log(f'mesh {dict(zip(names, shape))} {args.axis_type}')

  # -- 3. the model, its params sharded over the mesh (FSDP) ------------------
  cfg = LlamaConfig(vocab_size=corpus.VOCAB_SIZE, dim=args.dim, n_layers=args.n_layers,
                    n_heads=args.n_heads, ffn_dim=args.ffn_dim, max_seq_len=args.seq_len)
  # Every process builds the same model from the same seed on its own first
  # device; only the shards a process owns are then put on its devices.
  model = Llama(cfg, rngs=nnx.Rngs(args.seed))
  graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
  host_params = jax.tree.map(np.asarray, nnx.to_pure_dict(param_state))
  del model, param_state

  def param_spec(x: np.ndarray) -> P:
    """FSDP: shard the largest axis (the first on a tie) that ``fsdp`` divides;
    with ``--tp``, a 2-D matrix's other axis over ``tp``. 1-D: replicated."""
    if x.ndim < 2:
      return P()
    order = sorted(range(x.ndim), key=lambda a: (-x.shape[a], a))
    spec = [None] * x.ndim
    for a in order:
      if x.shape[a] % n_fsdp == 0:
        spec[a] = 'fsdp'
        break
    if args.tp > 1 and x.ndim == 2:
      other = 1 - spec.index('fsdp') if 'fsdp' in spec else 1
      if x.shape[other] % args.tp == 0:
        spec[other] = 'tp'
    return P(*spec)

  param_shardings = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x)), host_params)

  def global_array(host_value: np.ndarray, sharding) -> jax.Array:
    # The callback is asked only for the shards on this process's devices.
    return jax.make_array_from_callback(host_value.shape, sharding,
                                        lambda index: host_value[index])

  params = jax.tree.map(global_array, host_params, param_shardings)
  initial_host = host_params
  replicated = NamedSharding(mesh, P())

  def all_gather(p):
    """The full weight for the forward pass; its transpose reduce-scatters the grad."""
    if explicit:
      return jax.sharding.reshard(p, replicated)
    return jax.lax.with_sharding_constraint(p, replicated)

  def forward_loss(full_params, batch):
    return loss_fn(nnx.merge(graphdef, full_params, rest), batch)

  if explicit:
    # llama.py's embedding lookup (``jnp.take`` in ``nnx.Embed``) does not name
    # its output sharding, which an explicit mesh requires for a batch-sharded
    # gather; the model's forward pass runs with auto axes inside. Params,
    # gradients and the optimizer state stay explicitly sharded.
    forward_loss = jax.sharding.auto_axes(forward_loss, out_sharding=P())

  def loss_of(params, batch):
    return forward_loss(jax.tree.map(all_gather, params), batch)

  # -- 4. the optimizer and its sharded state ----------------------------------
  tx = lro.galore(args.lr, rank=args.rank, update_proj_gap=args.update_proj_gap,
                  scale=0.25, projector=args.projector, seed=args.seed)
  init_path = args.init
  if init_path == 'auto':
    init_path = 'jit' if hasattr(lro, 'state_shardings') else 'eager'
  with jax.set_mesh(mesh):
    if init_path == 'jit':
      state_shardings = lro.state_shardings(tx, params)
      opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    else:
      opt_state = tx.init(params)
      state_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f'{n_params:,} params, {n_state:,} optimizer-state numbers '
      f'(Adam: {2 * n_params:,}); state created by {init_path} init')

  # -- 5. the training step and the data -------------------------------------
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_of)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_fn = jax.jit(train_step, donate_argnums=(0, 1),
                    out_shardings=(param_shardings, state_shardings, replicated))

  global_batch = args.batch_size or 2 * n_fsdp
  if global_batch % n_fsdp:
    raise SystemExit(f'global batch {global_batch} is not divisible by fsdp={n_fsdp}')
  stream = corpus.train_batches(corpus.load_split().train, global_batch, args.seq_len,
                                seed=args.seed)
  # Every process computes the same global batches (cheap here); a real loader
  # would read only the rows the callback asks for.
  host_batches = [next(stream) for _ in range(args.steps)]
  batch_sharding = NamedSharding(mesh, P('fsdp', None))

  def batch_at(step: int) -> jax.Array:
    return global_array(host_batches[step], batch_sharding)

  def gathered(tree):
    """Every process gets the full values (small trees only)."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  def digest(tree) -> dict:
    leaves = jax.tree.leaves(gathered(tree))
    h = hashlib.sha256()
    for x in leaves:
      h.update(np.ascontiguousarray(x).tobytes())
    return {'sha256': h.hexdigest(),
            'sum': float(sum(np.sum(x, dtype=np.float64) for x in leaves)),
            'abs_sum': float(sum(np.sum(np.abs(x), dtype=np.float64) for x in leaves))}

  def directory(path: str):
    """A local directory (made absolute: orbax needs that) or a URL such as
    ``gs://bucket/run`` (``etils.epath``, which orbax uses too)."""
    return epath.Path(path if '://' in path else os.path.abspath(path))

  out = directory(args.out)
  ckpt_dir = out / 'ckpt' / f'step_{args.ckpt_step}'
  ckpt = ocp.StandardCheckpointer()

  def run(params, opt_state, start: int, what: str):
    losses = []
    saved = None
    for step in range(start, args.steps):
      if what == 'train' and step == args.ckpt_step:
        # Every process writes its own shards; orbax synchronises them.
        ckpt.save(ckpt_dir, {'params': params, 'opt_state': opt_state}, force=True)
        ckpt.wait_until_finished()
        saved = digest({'params': params, 'opt_state': opt_state})
        log(f'saved step {step} to {ckpt_dir}')
      t = time.perf_counter()
      with jax.set_mesh(mesh):
        params, opt_state, loss = step_fn(params, opt_state, batch_at(step))
      losses.append(float(loss))
      log(f'{what} step {step:3d}  loss {losses[-1]:.6f}  ({time.perf_counter() - t:.2f} s)')
    return params, opt_state, losses, saved

  # -- 6. uninterrupted run (saving at ckpt_step), then restore and continue --
  t_train = time.perf_counter()
  params, opt_state, losses, saved_digest = run(params, opt_state, 0, 'train')
  final = digest(params)
  final_state = digest(opt_state)
  final_host = gathered(params)
  train_s = time.perf_counter() - t_train
  compiled_before_restore = step_fn._cache_size()

  # The restore target, built as a fresh process would build it, from no live
  # state: the params' shapes with their shardings, the state's shapes and
  # dtypes from jax.eval_shape(tx.init, ...), its shardings from
  # lro.state_shardings. With an eagerly created state, its own shardings:
  # they are what the step is compiled for, and lro.state_shardings spells a
  # few of them differently (P(None,) for P()), which jit would recompile for.
  abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host_params,
      param_shardings)
  with jax.set_mesh(mesh):
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    target_shardings = (lro.state_shardings(tx, abstract_params)
                        if init_path == 'jit' else state_shardings)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, target_shardings)
  del params, opt_state
  source = directory(args.restore_from) if args.restore_from else ckpt_dir
  restored = ckpt.restore(source, {'params': abstract_params, 'opt_state': abstract_state})
  restored_digest = digest(restored)
  log(f'restored step {args.ckpt_step} from {source}'
      + ('' if args.restore_from else
         f" (bit-identical to what was saved: {restored_digest['sha256'] == saved_digest['sha256']})"))
  params, opt_state, resumed_losses, _ = run(restored['params'], restored['opt_state'],
                                             args.ckpt_step, 'resumed')
  resumed = digest(params)
  resumed_host = gathered(params)
  resumed_state = digest(opt_state)
  ckpt.close()
  wall = time.perf_counter() - t_start

  # -- 7. the record ------------------------------------------------------------
  out.mkdir(parents=True, exist_ok=True)
  (out / f'process_{pid}.json').write_text(json.dumps({
      'process_index': pid, 'local_devices': [str(d) for d in jax.local_devices()],
      'losses': losses, 'resumed_losses': resumed_losses,
      'final_params': final, 'resumed_params': resumed}, indent=1))
  if pid == 0:
    record = {
        'config': vars(args),
        'process_count': nproc,
        'device_count': n_dev,
        'local_device_count': jax.local_device_count(),
        'mesh': dict(zip(names, shape)),
        'axis_type': args.axis_type,
        'init': init_path,
        'global_batch': global_batch,
        'losses': losses,
        'resumed_losses': resumed_losses,
        'final_params': final,
        'final_opt_state': final_state,
        'resumed_params': resumed,
        'resumed_opt_state': resumed_state,
        'saved_at_ckpt': saved_digest,
        'restored_at_ckpt': restored_digest,
        'restored_from': str(source),
        # The resumed steps reuse the executable of the uninterrupted ones.
        'step_compilations': [compiled_before_restore, step_fn._cache_size()],
        'train_time_s': train_s,
        'wall_time_s': wall,
        'jax': jax.__version__,
    }
    (out / 'result.json').write_text(json.dumps(record, indent=1))
    for name, tree in (('initial_params', initial_host), ('final_params', final_host),
                       ('resumed_params', resumed_host)):
      with (out / f'{name}.npz').open('wb') as f:
        np.savez(f, **{jax.tree_util.keystr(k): v for k, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]})
    log(f'wrote {out / "result.json"}')
  log(f'done in {wall:.1f} s (train loop {train_s:.1f} s); final params sha256 '
      f"{final['sha256'][:16]}, resumed {resumed['sha256'][:16]}")
  if not args.single_process:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
