"""Flax NNX + ``nnx.Optimizer(model, lro.galore(...))`` on an explicit FSDP x TP mesh.

The code a TPU user runs, shrunk to 8 virtual CPU devices: a byte-level
transformer LM (``nnx.MultiHeadAttention`` + a GELU MLP, every kernel
annotated with ``nnx.with_partitioning``) on the CPython docs
(``corpus.py``), on a ``jax.make_mesh`` mesh with explicit axes ``fsdp``
(the model dimension and the batch) and ``tp`` (heads, MLP and vocabulary):

1. the model and ``nnx.Optimizer(model, lro.galore(...), wrt=nnx.Param)`` are
   created together inside ``nnx.jit`` under ``jax.set_mesh(mesh)``: each
   param is born sharded as annotated, and the GaLore state is born sharded
   too (its low-rank arrays follow their param's kept axis, DESIGN.md), on
   no single device first;
2. the forward pass names the output sharding of each contraction over a
   sharded axis (``out_sharding=``), as explicit axes require; gradients come
   back with their params' shardings;
3. a ``nnx.jit`` train step with the model and optimizer donated;
4. printouts: param and state shardings side by side, the memory report, the
   loss.

    python examples/nnx_sharded.py                      # 8 devices: fsdp 4 x tp 2
    python examples/nnx_sharded.py --devices 8 --tp 4 --steps 50
    python examples/nnx_sharded.py --dim 1024 --layers 16 --rank 256   # scale up

On a real TPU slice nothing changes but the devices: pass ``--devices 0``
(the default fakes 8 CPU devices) and pick ``--tp`` (on a one-host v5e-8,
``--tp 2`` gives this very mesh, fsdp 4 x tp 2, over its 8 chips). A slice of
several hosts (v5e-16 and up) also needs ``jax.distributed.initialize()``
before anything touches the devices, and each host feeds only its rows of
the global batch (``jax.make_array_from_callback``): ``examples/multihost.py``
shows both, and saves and restores the sharded state with orbax.

The attention kernels ``(d, heads, head_dim)`` and ``(heads, head_dim, d)``
of ``nnx.MultiHeadAttention`` are recognised by the library's default policy
as matrices ``d x (heads * head_dim)`` (``lro.MatrixView(0, (1, 2))``), not as
``heads`` batched matrices.

Measured at the defaults on the development machine (2 CPU cores shared with
other jobs; the 8 devices are virtual, so this shows the sharding, not speed):
8 virtual devices, mesh fsdp 4 x tp 2, 459,392 params; GaLore state
0.974 MiB against Adam's 3.505 MiB (0.278); loss 4.109 -> 2.366 (mean of the
first / last 5 of 200 steps); 36 s wall (35 s CPU). From the printout
(``mu`` and ``nu`` have the same sharding)::

    blocks/0/attn/query/kernel   (128, 4, 32)   ('fsdp', 'tp', None)
      basis                      (128, 16)      ('fsdp', None)
      mu                         (16, 128)      (None, 'tp')
    blocks/0/attn/out/kernel     (4, 32, 128)   ('tp', None, 'fsdp')
      basis                      (128, 16)      ('tp', None)
      mu                         (16, 128)      (None, 'fsdp')
    blocks/0/down/kernel         (512, 128)     ('tp', 'fsdp')
      basis                      (128, 16)      ('fsdp', None)
      mu                         (512, 16)      ('tp', None)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
import mesh_cli  # noqa: E402  (no jax import: devices are requested first)


def main(argv=None) -> dict:
  """Train; returns the losses, the shardings table and the memory report."""
  args = mesh_cli.parse_args(__doc__.split('\n\n')[0], argv)
  mesh_cli.request_devices(args.devices)
  t_start = time.perf_counter()

  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, str(_HERE))
  try:
    import lowrank_optax as lro
  except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(_HERE.parent))
    import lowrank_optax as lro
  import corpus

  # Activations: batch over fsdp, features replicated (FSDP gathers weights,
  # not activations); the hidden MLP / head features over tp.
  ACT = P('fsdp', None, None)
  HIDDEN = P('fsdp', None, 'tp')

  def init(std=None):
    return nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)

  def linear(d_in, d_out, sharding, rngs, std=None):
    return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init(std), sharding))

  class Block(nnx.Module):
    def __init__(self, dim, heads, ffn, *, rngs):
      self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(
          num_heads=heads, in_features=dim, use_bias=False, decode=False, rngs=rngs,
          kernel_init=nnx.with_partitioning(init(), ('fsdp', 'tp', None)),
          out_kernel_init=nnx.with_partitioning(init(), ('tp', None, 'fsdp')))
      self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
      self.up = linear(dim, ffn, ('fsdp', 'tp'), rngs)
      self.down = linear(ffn, dim, ('tp', 'fsdp'), rngs)

    def __call__(self, x):
      # The output projections contract a tp-sharded axis: name their output.
      x = x + self.attn(self.attn_norm(x), is_causal=True, out_sharding=ACT)
      h = jax.nn.gelu(self.up(self.mlp_norm(x)))
      return x + self.down(h, out_sharding=ACT)

  class LM(nnx.Module):
    def __init__(self, vocab, dim, layers, heads, ffn, *, rngs):
      self.embed = nnx.Embed(vocab, dim, rngs=rngs, embedding_init=nnx.with_partitioning(
          init(0.02), ('tp', 'fsdp')))
      self.blocks = nnx.List([Block(dim, heads, ffn, rngs=rngs) for _ in range(layers)])
      self.norm = nnx.RMSNorm(dim, rngs=rngs)
      self.lm_head = linear(dim, vocab, ('fsdp', 'tp'), rngs, std=0.02)

    def __call__(self, tokens):
      x = self.embed(tokens, out_sharding=ACT)
      for block in self.blocks:
        x = block(x)
      return self.lm_head(self.norm(x))            # logits: vocab over tp

  def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    # Gather the vocabulary axis for the label lookup (cheap: one activation).
    logits = jax.sharding.reshard(logits, ACT)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  # -- the mesh: explicit axes (jax.make_mesh's default) ---------------------
  n = jax.device_count()
  if n % args.tp:
    raise SystemExit(f'--tp {args.tp} does not divide {n} devices')
  mesh = jax.make_mesh((n // args.tp, args.tp), ('fsdp', 'tp'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  tx = lro.galore(args.lr, rank=args.rank, update_proj_gap=args.update_proj_gap,
                  scale=0.25, seed=args.seed)

  # -- 1. model and optimizer, created sharded ------------------------------
  @nnx.jit
  def create():
    model = LM(corpus.VOCAB_SIZE, args.dim, args.layers, args.heads, args.ffn or 4 * args.dim,
               rngs=nnx.Rngs(args.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  # -- 3. the train step: model and optimizer donated -----------------------
  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  data = corpus.load_split()
  batches = corpus.train_batches(data.train, args.batch_size, args.seq_len, seed=args.seed)
  losses = []
  with jax.set_mesh(mesh):
    model, optimizer = create()
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    rows = sharding_rows(params, nnx.as_pure(optimizer.opt_state), lro, jax)
    print(f'{n} devices, mesh {dict(mesh.shape)} (explicit axes); '
          f'{sum(x.size for x in jax.tree.leaves(params)):,} params')
    print('\nparam -> optimizer-state arrays (shape spec); low-rank arrays follow the kept axis:')
    for path, shape, spec, state_arrays in rows:
      if path.startswith(('blocks/0/', 'embed')) and 'norm' not in path:
        print(f'  {path:<28} {str(shape):<14} {spec}')
        for s_name, s_shape, s_spec in state_arrays:
          print(f'    {s_name:<26} {str(s_shape):<14} {s_spec}')
    report = lro.memory_report(tx, params)
    print('\n' + str(report) + '\n', flush=True)

    t_loop = time.perf_counter()
    for step in range(args.steps):
      batch = jax.device_put(next(batches), P('fsdp', None))
      losses.append(float(train_step(model, optimizer, batch)))
      if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
        print(f'step {step + 1:4d}  loss {losses[-1]:.4f}', flush=True)
    loop_s = time.perf_counter() - t_loop
    # The params still have their annotated shardings after training.
    final = [tuple(pad(jax.typeof(x).sharding.spec, x.ndim))
             for x in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f'non-finite loss: {losses}')
  wall = time.perf_counter() - t_start
  print(f'loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f} (mean of 5 steps); '
        f'loop {loop_s:.1f} s, wall {wall:.1f} s')
  return {'losses': losses, 'rows': rows, 'report': report, 'mesh': dict(mesh.shape),
          'final_specs': final, 'wall_s': wall}


def pad(spec, ndim) -> tuple:
  """A partition spec with one entry per axis (``P('a')`` of a matrix is ``('a', None)``)."""
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def sharding_rows(params, opt_state, lro, jax):
  """``(path, shape, spec, [(name, state shape, state spec), ...])`` per param leaf.

  The state arrays of leaf ``i`` are ``lro.subspace_state(opt_state)``'s
  ``projector[i]`` (the basis) and ``inner[i]`` (the Adam moments).
  """
  sub = lro.subspace_state(opt_state)
  rows = []
  for i, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    arrays = []
    for sub_path, a in jax.tree_util.tree_flatten_with_path((sub.projector[i], sub.inner[i]))[0]:
      if getattr(a, 'ndim', 0) >= 1:
        name = jax.tree_util.keystr(sub_path[-1:], simple=True)
        arrays.append((name, tuple(a.shape), pad(a.sharding.spec, a.ndim)))
    rows.append((jax.tree_util.keystr(path, simple=True, separator='/'), tuple(x.shape),
                 pad(x.sharding.spec, x.ndim), arrays))
  return rows


if __name__ == '__main__':
  main()
