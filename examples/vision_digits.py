"""A conv net on scikit-learn's handwritten digits: GaLore and friends outside language modelling.

scikit-learn ships the UCI digits (1,797 grey 8 x 8 images, 10 classes) inside
the package, so nothing is downloaded. A small Flax NNX conv net
(three 3 x 3 convolutions, a dense layer, a classifier head) is trained by
``optax.adamw`` and by the library's recipes that exist in this install
(``lro.galore``, ``lro.fira``, ``lro.apollo``, ``lro.frugal``), and each run
reports test accuracy, optimizer-state bytes and time.

Conv kernels are 4-D, ``(H, W, C_in, C_out)``. Two ways to see one as a matrix:

* ``taps`` (the library's default view for ``ndim > 2``: the last two axes are
  the matrix, the leading ones batch axes): one ``C_in x C_out`` matrix per
  kernel tap, each with its own rank-``r`` subspace (9 bases for a 3 x 3
  kernel);
* ``flat``: ``dimension_numbers={"conv": lro.MatrixView((0, 1, 2), 3)}``, the
  im2col matrix ``(H * W * C_in) x C_out`` (the usual reading of a
  convolution as one matrix), one subspace for the whole kernel.

``lro.memory_report`` shows both (``--show-report``); ``galore`` and
``galore_flat`` below differ only in that view. The classifier head stays at
full rank (``exclude``), as GaLore's fine-tuning scripts keep theirs, and so
does the first conv (``(3, 3, 1, w)``: too thin to save anything).

    pip install -e .[examples]               # scikit-learn, flax, ...
    python examples/vision_digits.py
    python examples/vision_digits.py --methods adamw,galore --steps 1000 --width 64 --rank 16

Measured at the defaults on the development machine (2 CPU cores shared with
other jobs, so the times are pessimistic):
1 min 41 s wall (100 s CPU) for 6 methods x 400 steps of 64 images, 188,234
params; test set of 450 images (chance 0.10):

    method        test acc  state KiB  vs AdamW  steps/s
    adamw           0.9778     1470.6      1.00       71
    galore          0.9756      181.6      0.12       68
    galore_flat     0.9689      140.7      0.10       67
    fira            0.9733      181.7      0.12       60
    apollo          0.9756      150.7      0.10       66
    frugal          0.9867      439.6      0.30       16

(``frugal`` in projection mode refreshes with an SVD of every kernel tap;
``galore`` and ``fira`` use the default warm-started subspace iteration.)
For conv2 ``(3, 3, 32, 64)`` the flat view keeps one 64 x 8 basis (of the
outputs) instead of nine 32 x 8 ones (of the inputs), and moments of 288 x 8
instead of 9 x (8 x 64): 20.0 KiB of state against 45.0 KiB
(``--show-report`` prints both reports).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent

HINT = 'vision_digits.py needs scikit-learn (it ships the digits data): pip install -e .[examples]'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default='adamw,galore,galore_flat,fira,apollo,frugal',
                 help='comma-separated; recipes this lowrank_optax lacks are skipped')
  p.add_argument('--steps', type=int, default=400)
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--width', type=int, default=32, help='channels of the first conv (then 2x)')
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--update-proj-gap', type=int, default=50)
  p.add_argument('--lr', type=float, default=3e-3, help='AdamW peak lr')
  p.add_argument('--lowrank-lr', type=float, default=1e-2,
                 help='peak lr of the GaLore-family recipes (with scale 0.25, their papers\' pairing)')
  p.add_argument('--test-fraction', type=float, default=0.25)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--show-report', action='store_true',
                 help='print lro.memory_report for the taps and flat views')
  return p.parse_args(argv)


def load_digits(test_fraction: float, seed: int):
  """(x_train, y_train, x_test, y_test): images (N, 8, 8, 1) in [0, 1], int labels."""
  import numpy as np
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split
  data = sk_load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      x, data.target.astype(np.int32), test_size=test_fraction, random_state=seed,
      stratify=data.target)
  return x_train, y_train, x_test, y_test


def main(argv=None) -> dict:
  """Train every method; returns ``{'results': [...], 'reports': {...}}``."""
  args = parse_args(argv)
  try:
    import sklearn  # noqa: F401
  except ImportError:
    print(HINT, file=sys.stderr)
    raise SystemExit(1)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  sys.path.insert(0, str(_HERE))
  try:
    import lowrank_optax as lro
  except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(_HERE.parent))
    import lowrank_optax as lro

  class ConvNet(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
      conv = lambda i, o: nnx.Conv(i, o, kernel_size=(3, 3), padding='SAME', rngs=rngs)
      self.conv1 = conv(1, width)               # (3, 3, 1, w): too thin to project
      self.conv2 = conv(width, 2 * width)       # (3, 3, w, 2w)
      self.conv3 = conv(2 * width, 2 * width)   # (3, 3, 2w, 2w), after a 2x2 pool
      self.hidden = nnx.Linear(4 * 4 * 2 * width, 128, rngs=rngs)
      self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
      x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
      x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
      x = jax.nn.relu(self.conv3(x))
      return self.head(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))

  x_train, y_train, x_test, y_test = load_digits(args.test_fraction, args.seed)
  # Created inside jit: one compilation instead of one per initializer and shape.
  graphdef, params0 = nnx.split(nnx.jit(lambda: ConvNet(args.width, rngs=nnx.Rngs(args.seed)))())
  params0 = nnx.as_pure(params0)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  print(f'digits: {len(x_train)} train / {len(x_test)} test images (8 x 8); '
        f'conv net with {n_params:,} params', flush=True)

  # Full rank: the classifier head (as GaLore's fine-tuning scripts keep theirs)
  # and conv1, whose (3, 3, 1, w) kernel is too thin to save anything.
  exclude = lro.DEFAULT_EXCLUDE + r'|(^|/)head/|(^|/)conv1/'
  flat = {'conv': lro.MatrixView((0, 1, 2), 3)}          # the im2col matrix of each kernel
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(
      0.0, peak, max(1, args.steps // 10), args.steps, peak * 0.1)
  low = dict(update_proj_gap=args.update_proj_gap, exclude=exclude, seed=args.seed)
  recipes = {
      'adamw': (None, lambda: optax.adamw(schedule(args.lr), weight_decay=1e-4)),
      'galore': ('galore', lambda: lro.galore(schedule(args.lowrank_lr), rank=args.rank,
                                              scale=0.25, **low)),
      'galore_flat': ('galore', lambda: lro.galore(schedule(args.lowrank_lr), rank=args.rank,
                                                   scale=0.25, dimension_numbers=flat, **low)),
      'fira': ('fira', lambda: lro.fira(schedule(args.lowrank_lr), rank=args.rank,
                                        scale=0.25, **low)),
      'apollo': ('apollo', lambda: lro.apollo(schedule(args.lowrank_lr), rank=args.rank, **low)),
      # FRUGAL's projection mode (rho 0.25 of the reduced side, sign step on the
      # residual, AdamW-like lr). Its block mode saves nothing here: every
      # tensor of this net has its own shape, and a block's Adam state lives in
      # a static slot pool per shape.
      'frugal': ('frugal', lambda: lro.frugal(schedule(args.lr), mode='projection',
                                              update_gap=args.update_proj_gap,
                                              exclude=exclude, seed=args.seed)),
  }
  methods = []
  for name in (m.strip() for m in args.methods.split(',') if m.strip()):
    if name not in recipes:
      raise SystemExit(f'unknown method {name!r}; choose from {sorted(recipes)}')
    if recipes[name][0] is None or hasattr(lro, recipes[name][0]):
      methods.append(name)
    else:
      print(f'skipping {name}: this lowrank_optax has no lro.{recipes[name][0]}')

  reports = {}
  if hasattr(lro, 'galore'):
    for view, name in (('taps', 'galore'), ('flat', 'galore_flat')):
      reports[view] = lro.memory_report(recipes[name][1](), params0)
      if args.show_report:
        print(f'\nlro.memory_report, {view} view:\n{reports[view]}')
    print('conv kernels as matrices (rank {}): taps view {:.1f} KiB of state, flat view {:.1f} '
          'KiB (Adam: {:.1f} KiB)'.format(args.rank, reports['taps'].state_bytes / 1024,
                                         reports['flat'].state_bytes / 1024,
                                         reports['taps'].adam_bytes / 1024), flush=True)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y)

  rng = np.random.default_rng(args.seed)
  order = [rng.permutation(len(x_train)) for _ in range(args.steps * args.batch_size
                                                        // len(x_train) + 1)]
  order = np.concatenate(order)                       # the same batches for every method
  results = []
  for name in methods:
    tx = recipes[name][1]()

    @jax.jit
    def step(params, opt_state, x, y, tx=tx):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    params = params0
    opt_state = jax.jit(tx.init)(params)
    t0 = time.perf_counter()
    losses = []
    for i in range(args.steps):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
      losses.append(loss)
      if i == 0:
        jax.block_until_ready(loss)
        t_compiled = time.perf_counter()
    losses = [float(l) for l in losses]
    seconds = time.perf_counter() - t_compiled
    if not all(np.isfinite(losses)):
      raise FloatingPointError(f'{name}: non-finite training loss')
    r = {'method': name,
         'test_accuracy': float(accuracy(params, x_test, y_test)),
         'state_bytes': lro.memory_report(tx, params0).state_bytes,
         'train_s': seconds, 'compile_s': t_compiled - t0,
         'loss_first': float(np.mean(losses[:10])), 'loss_last': float(np.mean(losses[-10:]))}
    results.append(r)
    print(f"  {name:<12} test accuracy {r['test_accuracy']:.4f}  "
          f"state {r['state_bytes'] / 1024:6.1f} KiB  "
          f"{seconds:5.1f} s (+{r['compile_s']:.1f} s compile)", flush=True)

  adamw_bytes = lro.memory_report(optax.adamw(1e-3), params0).state_bytes
  print(f"\n{'method':<12} {'test acc':>9} {'state KiB':>10} {'vs AdamW':>9} {'steps/s':>8}")
  for r in results:
    print(f"{r['method']:<12} {r['test_accuracy']:>9.4f} {r['state_bytes'] / 1024:>10.1f} "
          f"{r['state_bytes'] / adamw_bytes:>9.2f} {(args.steps - 1) / r['train_s']:>8.0f}")
  return {'results': results, 'reports': reports, 'n_params': int(n_params),
          'adamw_state_bytes': int(adamw_bytes), 'n_test': len(x_test)}


if __name__ == '__main__':
  main()
