"""The user-facing examples beyond the main job, each run with a tiny setting.

examples/finetune_lm.py, linen_trainstate.py, nnx_sharded.py and
vision_digits.py run in-process (the suite's conftest gives 8 virtual CPU
devices); one run of nnx_sharded.py goes through a fresh interpreter, where
its ``--devices`` flag must set XLA's device count before jax is imported.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('flax')
pytest.importorskip('orbax.checkpoint')

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
sys.path.insert(0, str(EXAMPLES))


def _all_finite(xs):
  return all(math.isfinite(x) for x in xs)


def _check_rule(rows, rank):
  """DESIGN.md's sharding rule, checked from shapes and specs alone.

  For a projected 2-D param ``(m, n)`` sharded ``P(a, b)``: a state array
  ``(r, n)`` is ``P(None, b)``; an ``(d, r)`` array (a moment ``(m, r)`` or a
  basis of either axis) is ``P(e, None)`` with ``e`` the entry of the param
  axis of size ``d``. Full-rank leaves' state has the param's sharding.
  Attention kernels ``(d, h, k)`` / ``(h, k, d)`` are read as ``d x (h k)``
  / ``(h k) x d`` (the merged axes keep their first entry, all the others
  here are unsharded).
  """
  checked = 0
  for path, shape, spec, arrays in rows:
    arrays = [a[-2:] for a in arrays]          # (shape, spec), with or without a name
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    merge = lambda a, b: a if b is None else None   # a merged pair keeps a lone first entry
    if len(shape) == 3 and path.endswith('out/kernel'):    # (h, k, d) -> (h k) x d
      shape, spec = (shape[0] * shape[1], shape[2]), (merge(spec[0], spec[1]), spec[2])
    elif len(shape) == 3:                                  # (d, h, k) -> d x (h k)
      shape, spec = (shape[0], shape[1] * shape[2]), (spec[0], merge(spec[1], spec[2]))
    projected = any(rank in s for s, _ in arrays) and len(shape) == 2
    for s_shape, s_spec in arrays:
      s_spec = tuple(s_spec) + (None,) * (len(s_shape) - len(s_spec))
      if not projected:
        assert s_shape == tuple(shape) and s_spec == spec, (path, s_shape, s_spec, spec)
        continue
      checked += 1
      if s_shape[0] == rank and s_shape[1] == shape[1]:
        assert s_spec == (None, spec[1]), (path, shape, spec, s_shape, s_spec)
      else:
        assert s_shape[1] == rank and s_spec[1] is None, (path, s_shape, s_spec)
        entries = {spec[k] for k in range(2) if shape[k] == s_shape[0]}
        assert entries and s_spec[0] in entries, (path, shape, spec, s_shape, s_spec)
  return checked


# -- finetune_lm.py ------------------------------------------------------------

def test_finetune_continues_a_pretrain_checkpoint(tmp_path):
  """No --checkpoint: a tiny pre-training run writes an orbax checkpoint, the
  fine-tuning loads its params (the docs loss before fine-tuning equals the
  pre-training run's own final held-out loss: same params, same eval set),
  then GaLore lowers the held-out stdlib-source loss."""
  finetune_lm = pytest.importorskip('finetune_lm')
  tiny = dict(dim=32, n_layers=1, n_heads=2, seq_len=32, batch_size=8, eval_batches=2)
  record = finetune_lm.run(dict(
      tiny, methods='galore', steps=12, lr=3e-3, rank=4, update_proj_gap=6,
      pretrain_steps=30, out=str(tmp_path)))
  pre = json.loads((tmp_path / 'pretrain' / 'run.json').read_text())
  assert record['checkpoint_step'] == 30
  assert record['before']['old'] == pytest.approx(pre['metrics']['held_out_loss'], rel=1e-5)
  # Pre-trained on English prose: Python source is a new domain, and far from uniform (ln 256).
  assert record['before']['old'] < record['before']['new'] < math.log(256) - 0.5
  (r,) = record['results']
  assert r['method'] == 'galore'
  assert _all_finite(r['train_losses']) and math.isfinite(r['new_after'])
  assert r['new_after'] < record['before']['new'] - 0.05
  assert r['tokens_per_s'] > 0
  assert r['state_bytes'] < record['adamw_state_bytes']
  assert (tmp_path / 'finetune.json').is_file()


def test_finetune_data_and_methods():
  finetune_lm = pytest.importorskip('finetune_lm')
  split = finetune_lm.stdlib_split()
  assert len(split.train) > 500_000 and len(split.held_out) > 50_000
  # Whole files are held out: textwrap's source is in the held-out part only.
  marker = b'class TextWrapper'
  assert marker in split.held_out.tobytes() and marker not in split.train.tobytes()
  run, skipped = finetune_lm.available_methods('adamw,galore')
  assert run == ['adamw', 'galore'] and skipped == []
  with pytest.raises(ValueError, match='unknown method'):
    finetune_lm.available_methods('adamw,nope')


# -- linen_trainstate.py and nnx_sharded.py on 8 virtual devices ---------------

TINY_MESH = ['--devices', '8', '--tp', '2', '--dim', '32', '--layers', '1', '--heads', '2',
             '--seq-len', '16', '--batch-size', '8', '--rank', '4', '--steps', '8',
             '--update-proj-gap', '4']


def _needs_8_devices():
  import jax
  if jax.device_count() < 8:
    pytest.skip('needs 8 (virtual) devices: run under the suite\'s conftest')


def test_linen_trainstate_shards_state_like_params():
  _needs_8_devices()
  import linen_trainstate
  out = linen_trainstate.main(TINY_MESH)
  assert out['mesh'] == {'fsdp': 4, 'tp': 2}
  losses = out['losses']
  assert len(losses) == 8 and _all_finite(losses)
  assert np.mean(losses[-3:]) < losses[0] - 0.5
  assert out['compilations'] == 1                     # pinned shardings: compiled once
  assert out['report'].state_bytes < out['report'].adam_bytes
  assert _check_rule(out['rows'], rank=4) >= 6 * 3    # 6 projected kernels x (basis, mu, nu)
  specs = {path: spec for path, _, spec, _ in out['rows']}
  assert tuple(specs['block_0/up/kernel']) == ('fsdp', 'tp')
  assert tuple(specs['block_0/down/kernel']) == ('tp', 'fsdp')


def test_nnx_sharded_explicit_mesh():
  _needs_8_devices()
  import nnx_sharded
  out = nnx_sharded.main(TINY_MESH)
  assert out['mesh'] == {'fsdp': 4, 'tp': 2}
  losses = out['losses']
  assert len(losses) == 8 and _all_finite(losses)
  assert np.mean(losses[-3:]) < losses[0] - 0.5
  assert out['report'].state_bytes < out['report'].adam_bytes
  assert _check_rule(out['rows'], rank=4) >= 6 * 3
  rows = {path: (shape, spec, arrays) for path, shape, spec, arrays in out['rows']}
  shape, spec, arrays = rows['blocks/0/attn/query/kernel']
  assert shape == (32, 2, 16) and spec == ('fsdp', 'tp', None)
  # One d x (heads * head_dim) matrix, not `heads` batched ones.
  assert {a[1] for a in arrays} == {(32, 4), (4, 32)}
  # Training keeps every param on its annotated sharding.
  assert out['final_specs'] == [spec for _, _, spec, _ in out['rows']]


def test_devices_flag_in_a_fresh_interpreter():
  """--devices sets XLA's CPU device count before jax is imported."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  argv = ['--devices', '4', '--tp', '2', '--dim', '32', '--layers', '1', '--heads', '2',
          '--seq-len', '16', '--batch-size', '8', '--rank', '4', '--steps', '2']
  proc = subprocess.run([sys.executable, str(EXAMPLES / 'nnx_sharded.py'), *argv],
                        capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 devices, mesh {'fsdp': 2, 'tp': 2} (explicit axes)" in proc.stdout, proc.stdout
  assert 'step    2  loss' in proc.stdout


# -- vision_digits.py ----------------------------------------------------------

def test_vision_digits_learns_and_reports_both_conv_views():
  pytest.importorskip('sklearn')
  import vision_digits
  out = vision_digits.main(['--methods', 'galore', '--steps', '60', '--width', '8',
                            '--rank', '4', '--update-proj-gap', '20'])
  assert out['n_test'] == 450
  (r,) = out['results']
  assert r['test_accuracy'] > 0.6, r               # chance: 0.1
  assert r['loss_last'] < r['loss_first'] - 0.5
  # conv2's kernel (3, 3, 8, 16) at rank 4, float32, plus the inner Adam's
  # int32 step counter. Taps: 9 matrices 8 x 16, each reducing its 8 inputs:
  # basis 8 x 4, moments 2 x (4 x 16). Flat: one 72 x 16 matrix reducing its
  # 16 outputs: basis 16 x 4, moments 2 x (72 x 4).
  def conv2(report):
    return next(l for l in report.leaves if l.path == 'conv2/kernel')
  taps, flat = out['reports']['taps'], out['reports']['flat']
  assert conv2(taps).state_bytes == 9 * (8 * 4 + 2 * 4 * 16) * 4 + 4
  assert conv2(flat).state_bytes == (16 * 4 + 2 * 72 * 4) * 4 + 4
  assert conv2(taps).adam_bytes == 2 * 3 * 3 * 8 * 16 * 4
  assert r['state_bytes'] == taps.state_bytes < out['adamw_state_bytes']
  assert flat.state_bytes < taps.state_bytes


def test_vision_digits_without_sklearn_prints_the_hint(monkeypatch, capsys):
  import vision_digits
  monkeypatch.setitem(sys.modules, 'sklearn', None)   # `import sklearn` raises ImportError
  with pytest.raises(SystemExit) as exc:
    vision_digits.main(['--steps', '1'])
  assert exc.value.code == 1
  assert 'pip install -e .[examples]' in capsys.readouterr().err
