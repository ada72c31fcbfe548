"""An embedded byte-level text corpus: the CPython documentation topics.

Every Python installation ships ``pydoc_data.topics.topics``, a dict of ~80
help topics (~0.47 M characters of English prose and code samples). We join
the values in sorted-key order, encode as UTF-8 and use the raw bytes as
tokens (vocabulary 256), so nothing is downloaded and no tokenizer is needed.

The last ``held_out_fraction`` of the byte stream is held out for evaluation.
Training batches are random windows of the training part; the evaluation set
is a fixed, evenly spaced set of windows of the held-out part.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

VOCAB_SIZE = 256


@functools.lru_cache(maxsize=None)
def corpus_bytes() -> np.ndarray:
  """The whole corpus as a uint8 array (deterministic across runs)."""
  from pydoc_data.topics import topics
  text = '\n\n'.join(topics[key] for key in sorted(topics))
  return np.frombuffer(text.encode('utf-8'), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Split:
  """Train / held-out byte arrays."""
  train: np.ndarray
  held_out: np.ndarray


def load_split(held_out_fraction: float = 0.1) -> Split:
  """Deterministic split: the last ``held_out_fraction`` of bytes are held out."""
  data = corpus_bytes()
  cut = int(len(data) * (1.0 - held_out_fraction))
  return Split(train=data[:cut], held_out=data[cut:])


def train_batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
  """Endless iterator of random training windows, int32 arrays (B, seq_len + 1).

  Window start offsets are drawn uniformly from a ``numpy`` Generator seeded
  with ``seed``, so the stream of batches is reproducible.
  """
  rng = np.random.default_rng(seed)
  width = seq_len + 1
  if len(data) < width:
    raise ValueError(f'corpus of {len(data)} bytes is shorter than a window of {width}')
  index = np.arange(width)
  while True:
    starts = rng.integers(0, len(data) - width + 1, size=batch_size)
    yield data[starts[:, None] + index[None, :]].astype(np.int32)


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int = 8) -> list[np.ndarray]:
  """A fixed list of ``num_batches`` int32 batches (B, seq_len + 1) from ``data``.

  Windows start at evenly spaced offsets covering the whole held-out part, so
  the set is deterministic and independent of any seed.
  """
  width = seq_len + 1
  n = batch_size * num_batches
  starts = np.linspace(0, len(data) - width, n).astype(np.int64)
  windows = data[starts[:, None] + np.arange(width)[None, :]].astype(np.int32)
  return list(windows.reshape(num_batches, batch_size, width))
