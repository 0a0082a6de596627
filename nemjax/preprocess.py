"""Pure image normalisations, for NumPy and JAX inputs alike.

Two conventions are used by the models nemjax dissects:

- NetDissect-Lite (``loader/data_loader.py: normalize_image`` + ``feature_extraction``), used for
  every network dissected the NetDissect way::

    x = (rgb - [124.6901, 118.6897, 109.5388]) / (255 * 0.224)

  computed in NetDissect-Lite's order of operations: RGB -> BGR float32, the float64 BGR mean
  ``[109.5388, 118.6897, 124.6901]`` subtracted in float64 and stored as float32, back to RGB, then
  divided by ``float32(255 * 0.224)`` in float32 (as torch's ``Tensor.div_`` does).
- torchvision ImageNet: ``(x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]`` for x in [0, 1].

Every function takes NHWC (or any ``(..., 3)``) RGB arrays. A ``numpy.ndarray`` in gives a
``numpy.ndarray`` out (computed in float64 where NetDissect-Lite does); anything else (a
``jax.Array`` or a tracer inside ``jax.jit`` / ``jax.grad``) is computed with ``jax.numpy`` in
float32 and stays differentiable.

Exactness: the NumPy path is bit-identical to NetDissect-Lite for any input. The JAX path is
bit-identical for integer-valued inputs (uint8 images, or floats holding integers 0..255); for
other float inputs it is within 1 ulp of it.

Example::

  from nemjax import preprocess
  x = preprocess.netdissect_normalize(images_uint8)            # (N, H, W, 3) float32
  logits = model(preprocess.from_unit_interval_netdissect(x01))  # attacks work in [0, 1]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "PIXEL_LEVELS",
  "eps_to_255",
  "eps_from_255",
  "format_eps",
  "NETDISSECT_BGR_MEAN",
  "NETDISSECT_RGB_MEAN",
  "NETDISSECT_SCALE",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "netdissect_normalize",
  "from_unit_interval_netdissect",
  "imagenet_normalize",
]

# NetDissect-Lite's BGR mean (float64, as in its settings) and the same in RGB order.
NETDISSECT_BGR_MEAN = (109.5388, 118.6897, 124.6901)
NETDISSECT_RGB_MEAN = NETDISSECT_BGR_MEAN[::-1]
# The divisor NetDissect-Lite applies on the torch side (a Python float; torch divides in float32).
NETDISSECT_SCALE = 255.0 * 0.224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RGB_MEAN64 = np.asarray(NETDISSECT_RGB_MEAN, np.float64)
# float32 head and tail of the float64 mean: (x - hi) - lo reproduces float32(x - mean64) exactly
# for every integer-valued x in 0..255 (checked in tests/test_models.py).
_RGB_MEAN_HI = _RGB_MEAN64.astype(np.float32)
_RGB_MEAN_LO = (_RGB_MEAN64 - _RGB_MEAN_HI.astype(np.float64)).astype(np.float32)


def _check_rgb(x: Any, fn: str) -> None:
  shape = np.shape(x)
  if len(shape) < 1 or shape[-1] != 3:
    raise ValueError(f"{fn}: expected RGB images with a last axis of size 3, e.g. (N, H, W, 3); got shape {tuple(shape)}")
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
  if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"{fn}: expected an integer or floating image array, got dtype {dtype}")


def _exact_div(x: jax.Array, divisor: Any) -> jax.Array:
  """``x / float32(divisor)`` rounded as a true float32 division (divisor broadcast to x).

  XLA rewrites ``x / broadcast(c)`` into ``x * (1 / c)``, which differs from torch's division in the
  last bit; dividing by a full-size array hidden behind an optimisation barrier keeps the division.
  """
  denom = jnp.broadcast_to(jnp.asarray(divisor, jnp.float32), x.shape)
  return x / lax.optimization_barrier(denom)


def netdissect_normalize(images: Any) -> Any:
  """NetDissect-Lite normalisation of RGB images in 0..255.

  Args:
    images: (..., 3) RGB, usually (N, H, W, 3), uint8 or float in 0..255. A NumPy array or a JAX
      array / tracer.

  Returns:
    (..., 3) float32 ``(rgb - [124.6901, 118.6897, 109.5388]) / 57.12``, a NumPy array for NumPy
    input and a JAX array otherwise.
  """
  _check_rgb(images, "netdissect_normalize")
  if isinstance(images, np.ndarray) or np.isscalar(images):
    x = np.asarray(images, np.float32)
    bgr = x[..., ::-1]
    # In-place `img -= bgr_mean` on float32 with a float64 mean: NumPy computes in float64 and casts.
    bgr = (bgr.astype(np.float64) - np.asarray(NETDISSECT_BGR_MEAN, np.float64)).astype(np.float32)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    return rgb / np.float32(NETDISSECT_SCALE)
  x = jnp.asarray(images).astype(jnp.float32)
  x = (x - jnp.asarray(_RGB_MEAN_HI)) - jnp.asarray(_RGB_MEAN_LO)
  return _exact_div(x, NETDISSECT_SCALE)


def from_unit_interval_netdissect(x01: Any) -> Any:
  """NetDissect-Lite normalisation of images in [0, 1] pixel space (what attacks optimise).

  Args:
    x01: (..., 3) RGB float in [0, 1].

  Returns:
    (..., 3) float32 ``netdissect_normalize(x01 * 255)``; differentiable under JAX.
  """
  _check_rgb(x01, "from_unit_interval_netdissect")
  if isinstance(x01, np.ndarray):
    return netdissect_normalize(np.asarray(x01, np.float32) * np.float32(255.0))
  return netdissect_normalize(jnp.asarray(x01, jnp.float32) * jnp.float32(255.0))


def imagenet_normalize(x: Any) -> Any:
  """torchvision ImageNet normalisation of RGB images in [0, 1].

  Args:
    x: (..., 3) RGB float in [0, 1] (NumPy or JAX).

  Returns:
    (..., 3) float32 ``(x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]``.
  """
  _check_rgb(x, "imagenet_normalize")
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  if isinstance(x, np.ndarray):
    return (np.asarray(x, np.float32) - mean) / std
  return _exact_div(jnp.asarray(x, jnp.float32) - mean, std)


PIXEL_LEVELS = 255
"""Levels of an 8-bit pixel. Perturbation sizes (ε, step sizes, σ) are in [0, 1] pixel units
everywhere inside nemjax; the /255 scale exists only in flags and reports, through these three
functions."""


def eps_to_255(eps: float) -> float:
  """ε in [0, 1] pixel units on the /255 scale of reports and flags (4/255 -> 4.0)."""
  return float(eps) * PIXEL_LEVELS


def eps_from_255(value: float) -> float:
  """A /255-scale value (a flag's) in [0, 1] pixel units (4.0 -> 4/255)."""
  return float(value) / PIXEL_LEVELS


def format_eps(eps: float) -> str:
  """``'4/255'`` for ε = 4/255 (at most 4 decimals)."""
  return f"{round(eps_to_255(eps), 4):g}/{PIXEL_LEVELS}"
