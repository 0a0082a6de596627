"""Cheap argument checks shared by the dissection kernels (host NumPy, before any JAX call)."""
from __future__ import annotations

import numpy as np


def check_finite(x: np.ndarray, what: str, shape: tuple[int, ...] | None = None) -> None:
  """Raises ValueError if the array ``x`` holds NaN or ±inf.

  Costs two SIMD reductions (``min`` and ``max``, both of which propagate NaN) and no
  temporary array; only on failure is the first offending element located for the message.

  Args:
    x: any numeric array.
    what: how the message names the array.
    shape: optional shape (same size, C order) in which to report the offending index.
  """
  if x.size == 0 or (np.isfinite(x.min()) and np.isfinite(x.max())):
    return
  flat = int(np.flatnonzero(~np.isfinite(x.reshape(-1)))[0])
  shape = tuple(x.shape if shape is None else shape)
  index = tuple(int(i) for i in np.unravel_index(flat, shape))
  raise ValueError(f"{what} must be finite (no NaN or inf); found {x.reshape(-1)[flat]} at "
                   f"index {index} of shape {shape}")
