"""Baseline maps a real method should beat: an edge detector and a blank map."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemjax.explain import _core

__all__ = ["sobel", "blank"]


def _sobel_axis(g: jax.Array, axis: int) -> jax.Array:
  """``scipy.ndimage.sobel(g, axis)`` on (N, H, W) with mode 'reflect' (axis 1 or 2)."""
  p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
  h, w = g.shape[1:]
  sl = lambda dy, dx: p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
  if axis == 1:   # derivative down the rows, [1, 2, 1] smoothing along the columns
    return sum(c * (sl(1, dx) - sl(-1, dx)) for dx, c in ((-1, 1.0), (0, 2.0), (1, 1.0)))
  return sum(c * (sl(dy, 1) - sl(dy, -1)) for dy, c in ((-1, 1.0), (0, 2.0), (1, 1.0)))


def sobel(apply_fn: Any, params: Any, x: jax.Array, target: jax.Array) -> jax.Array:
  """Sobel gradient magnitude of the grey image (the channel mean); model and target unused.

  ``hypot(sobel_rows, sobel_cols)`` with ``scipy.ndimage.sobel``'s kernels and its default
  'reflect' border (the edge pixel repeated).

  Returns:
    (N, H, W).
  """
  del apply_fn, params
  x, target = _core.check_x_target(x, target, "sobel")
  g = jnp.mean(x, axis=-1)
  return jnp.hypot(_sobel_axis(g, 1), _sobel_axis(g, 2))


def blank(apply_fn: Any, params: Any, x: jax.Array, target: jax.Array) -> jax.Array:
  """All-zero map (N, H, W): the floor any explanation should beat."""
  del apply_fn, params
  x, target = _core.check_x_target(x, target, "blank")
  return jnp.zeros(x.shape[:3], x.dtype)
