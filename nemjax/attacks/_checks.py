"""Argument checks shared by the attack modules; they raise before anything reaches JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_number(v) -> bool:
  """A real Python / NumPy scalar (not a bool, not an array)."""
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def check_images(x, fn: str) -> jax.Array:
  """``x`` as a (N, H, W, C) floating-point array of images in [0, 1] (the range is not
  checked: it may be traced); ValueError naming ``fn`` otherwise."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{fn}: x must be NHWC (N, H, W, C) in [0, 1], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: x must be floating point in [0, 1], got dtype {x.dtype}")
  return x


def is_traced(a) -> bool:
  """Whether ``a`` is an abstract value inside ``jax.jit`` / ``grad`` (no concrete contents)."""
  return isinstance(a, jax.core.Tracer)
