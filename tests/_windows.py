"""Test helpers shared by the Fisher and M-FAC tests: gradient windows and errors (float64)."""

import numpy as np


def rel_err(x, ref):
  x = np.asarray(x, np.float64).reshape(ref.shape)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_window(kind, s, k, rng):
  """float64 rows (s' x k), the last one the current gradient, ||last|| = 1."""
  if kind == "one":
    rows = rng.standard_normal((1, k))
  elif kind == "independent":
    rows = rng.standard_normal((s, k)) * rng.uniform(0.5, 2.0, (s, 1))
  elif kind == "collinear":  # unit rows, pairwise cosine exactly 0.99
    q, _ = np.linalg.qr(rng.standard_normal((k, s + 1)))
    rows = np.sqrt(0.99) * q[:, 0] + np.sqrt(0.01) * q[:, 1:].T
  elif kind == "repeated":
    rows = np.tile(rng.standard_normal(k), (s, 1))
  else:
    raise ValueError(kind)
  return rows / np.linalg.norm(rows[-1])


def window_kappa(rows):
  """sigma_max / sigma_min over the nonzero singular values (float64)."""
  sv = np.linalg.svd(np.asarray(rows, np.float64), compute_uv=False)
  sv = sv[sv > 1e-9 * sv[0]]
  return sv[0] / sv[-1]
