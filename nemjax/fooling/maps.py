"""Heatmaps of many images, many methods, two models: the measuring side of fooling.

``map_function(method, apply_fn, layer, key)`` is a jitted ``(params, x, target) -> (N, h, w)``
for any method of :data:`nemjax.fooling.config.MEASURABLE` (layer methods get ``layer``,
sampling methods a key folded from the method's name); :func:`maps_of` runs it over a set of
uint8 images in batches; :func:`mosaics` builds active fooling's 2×2 mosaics.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import explain
from nemjax.fooling.config import LAYER_METHODS

__all__ = ["map_function", "maps_of", "logits_of", "mosaics"]

_KEYED = ("smoothgrad", "gradient_shap", "feature_permutation", "shapley_value_sampling", "lime",
          "kernel_shap")


def map_function(method: str, apply_fn: Callable, layer: str, key: jax.Array
                 ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """Jitted ``(params, x (N,H,W,C) model inputs, target (N,)) -> maps (N, h, w)``."""
  opts: dict[str, Any] = {}
  if method in LAYER_METHODS:
    opts["layer"] = layer
  if method in _KEYED:
    opts["key"] = jax.random.fold_in(key, zlib.crc32(method.encode()))
  if method == "saliency":
    opts["abs"] = True
  return jax.jit(lambda p, x, t: explain.explain(method, apply_fn, p, x, t, **opts))


def maps_of(fn: Callable, params: Any, images: np.ndarray, targets: np.ndarray,
            normalize: Callable, batch_size: int) -> np.ndarray:
  """``fn`` over uint8 images (n, H, W, 3) in batches (the last one padded, so one compile):
  (n, h, w) float32."""
  n = len(images)
  out = []
  for s in range(0, n, batch_size):
    x = images[s:s + batch_size]
    t = np.asarray(targets[s:s + batch_size], np.int32)
    pad = batch_size - len(x) if n > batch_size else 0
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
      t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
    m = np.asarray(fn(params, normalize(jnp.asarray(x)), jnp.asarray(t)))
    out.append(m[:len(m) - pad])
  return np.concatenate(out).astype(np.float32)


def logits_of(apply_fn: Callable, params: Any, images: np.ndarray, normalize: Callable,
              batch_size: int) -> np.ndarray:
  """Logits (n, K) of uint8 images (n, H, W, 3)."""
  f = jax.jit(lambda p, x: explain._core.logits_of(apply_fn(p, normalize(x))))  # pylint: disable=protected-access
  return np.concatenate([np.asarray(f(params, jnp.asarray(images[s:s + batch_size])))
                         for s in range(0, len(images), batch_size)])


def mosaics(images1: np.ndarray, images2: np.ndarray, rng: np.random.Generator, n: int
            ) -> np.ndarray:
  """``n`` 2×2 mosaics (n, H, W, 3) uint8 of images of two classes, each tile an image halved
  (2×2 mean): class 1 top-left and bottom-right, class 2 the other two tiles."""
  if len(images1) == 0 or len(images2) == 0:
    raise ValueError("active: both classes need at least one image for the mosaics")
  H, W = images1.shape[1:3]
  if H % 2 or W % 2:
    raise ValueError(f"active: mosaics need even image sides, got {H}x{W}")

  def half(img):
    return img.reshape(H // 2, 2, W // 2, 2, 3).astype(np.float32).mean((1, 3))

  out = np.empty((n, H, W, 3), np.uint8)
  for i in range(n):
    a = rng.choice(len(images1), 2)
    b = rng.choice(len(images2), 2)
    tiles = [[half(images1[a[0]]), half(images2[b[0]])], [half(images2[b[1]]), half(images1[a[1]])]]
    top = np.concatenate(tiles[0], axis=1)
    bottom = np.concatenate(tiles[1], axis=1)
    out[i] = np.round(np.concatenate([top, bottom], axis=0)).astype(np.uint8)
  return out
