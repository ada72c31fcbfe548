"""Flags and virtual devices shared by the mesh examples (linen_trainstate.py, nnx_sharded.py).

Imports nothing from jax: ``request_devices`` must run before jax is imported.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(description: str, argv=None) -> argparse.Namespace:
  """The mesh examples' flags: devices, mesh, model size and optimizer."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--devices', type=int, default=8,
                 help='virtual CPU devices (sets XLA_FLAGS before jax is imported); 0: the real ones')
  p.add_argument('--tp', type=int, default=2, help='size of the tensor-parallel mesh axis')
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--ffn', type=int, default=None, help='default 4 * dim')
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--rank', type=int, default=16)
  p.add_argument('--update-proj-gap', type=int, default=50)
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def request_devices(n: int) -> None:
  """Ask for ``n`` virtual CPU devices; only possible before jax is imported."""
  if not n:
    return
  if 'jax' in sys.modules:  # e.g. imported by a test runner that set its own flags
    import jax
    if jax.device_count() < n:
      raise SystemExit(f'--devices {n}: jax is already imported with {jax.device_count()} '
                       'devices; run this script in a fresh interpreter')
    return
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
