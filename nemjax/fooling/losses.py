"""Heo, Joo & Moon (NeurIPS 2019) fooling losses on heatmaps, and the fine-tuning penalty.

Every loss takes maps ``h`` (N, h, w) of the true class and returns one value per image (N,);
the penalty (:func:`make_penalty`) is their batch mean, for
:func:`nemjax.manipulate.penalised.make_penalised_step` (``CE + λ · L_F``):

* location: ``mean((h / max h − m)²)`` with the frame mask ``m`` (:func:`frame_mask`: 0 inside
  ``[H/7, 6H/7) × [W/7, 6W/7)``, 1 outside);
* uniform: ``Σ p log p`` with ``p = |h| / Σ|h|`` (negative entropy; minimising spreads the map);
* top-k: both maps min-max normalised, the mean of the current map's ``h²`` over the top
  ``fraction`` (10 %) positions of the frozen original model's map;
* centre-mass: ``‖c(h) − c(h₀)‖`` between the centres of mass (row, col in pixels of the map)
  of the current and the original map; the loss is its negative (minimising moves it away);
* active: swap classes ``c1`` and ``c2``: ``mean((h_{c1} − h⁰_{c2})²) + mean((h_{c2} −
  h⁰_{c1})²)`` against the original model's maps ``h⁰``.

Maps come from :mod:`nemjax.explain` (``grad_cam_heo``: Grad-CAM at a layer divided by its max,
``lrp_layer``: Heo's LRP at a layer, min-max normalised), computed with the fine-tuned
parameters, so ``jax.grad`` of a loss reaches the parameters through the explanation.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import explain

__all__ = ["KINDS", "FOOLING_METHODS", "TOPK_FRACTION", "frame_mask", "max_normalise",
           "minmax_normalise", "location_loss", "uniform_loss", "topk_loss", "centre_of_mass",
           "centre_mass_distance", "centre_mass_loss", "active_loss", "heatmap",
           "make_penalty"]

KINDS = ("location", "uniform", "topk", "centre-mass", "active")
# fooled method (CLI name) -> the explain kernel whose map the loss reads (at a layer)
FOOLING_METHODS = {"gradcam": "grad_cam_heo", "lrp": "lrp_layer"}
TOPK_FRACTION = 0.1   # top-k fooling: share of the original map's positions (authors' code)
_TINY = 1e-12


def frame_mask(h: int, w: int) -> np.ndarray:
  """(h, w) float32: 0 inside rows ``[h/7, 6h/7)`` × columns ``[w/7, 6w/7)``, 1 outside."""
  r = np.arange(h)[:, None]
  c = np.arange(w)[None, :]
  inside = (r >= h / 7) & (r < 6 * h / 7) & (c >= w / 7) & (c < 6 * w / 7)
  return (~inside).astype(np.float32)


def max_normalise(h: jax.Array) -> jax.Array:
  """(N, h, w) maps divided by their per-image max (a map with max <= 0 is left as zeros)."""
  mx = jnp.max(h, axis=(1, 2), keepdims=True)
  return jnp.where(mx > _TINY, h / jnp.where(mx > _TINY, mx, 1.0), 0.0)


def minmax_normalise(h: jax.Array) -> jax.Array:
  """(N, h, w) maps mapped to [0, 1] per image (a constant map becomes zeros)."""
  lo = jnp.min(h, axis=(1, 2), keepdims=True)
  span = jnp.max(h, axis=(1, 2), keepdims=True) - lo
  return jnp.where(span > _TINY, (h - lo) / jnp.where(span > _TINY, span, 1.0), 0.0)


def location_loss(h: jax.Array) -> jax.Array:
  """Location fooling: (N,) mean squared difference of the max-normalised map and the frame."""
  h = jnp.asarray(h)      # NumPy float64 maps (the metrics) become JAX's canonical float dtype
  m = jnp.asarray(frame_mask(h.shape[1], h.shape[2]), h.dtype)
  return jnp.mean((max_normalise(h) - m) ** 2, axis=(1, 2))


def uniform_loss(h: jax.Array) -> jax.Array:
  """Uniform fooling: (N,) ``Σ p log p`` of ``p = |h| / Σ|h|`` (0 log 0 = 0)."""
  a = jnp.abs(h).reshape(h.shape[0], -1)
  p = a / jnp.maximum(jnp.sum(a, axis=1, keepdims=True), _TINY)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)


def topk_positions(h0: jax.Array, fraction: float = TOPK_FRACTION) -> jax.Array:
  """(N, h·w) bool: the ``ceil(fraction · h·w)`` largest positions of each original map."""
  flat = h0.reshape(h0.shape[0], -1)
  k = max(1, int(np.ceil(fraction * flat.shape[1])))
  idx = jax.lax.top_k(flat, k)[1]
  return jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)


def topk_loss(h: jax.Array, h0: jax.Array, fraction: float = TOPK_FRACTION) -> jax.Array:
  """Top-k fooling: (N,) mean of ``minmax(h)²`` over the top ``fraction`` positions of
  ``minmax(h0)`` (the frozen original model's map)."""
  sel = topk_positions(jax.lax.stop_gradient(minmax_normalise(h0)), fraction)
  v = minmax_normalise(h).reshape(h.shape[0], -1) ** 2
  return jnp.sum(jnp.where(sel, v, 0.0), axis=1) / jnp.sum(sel, axis=1)


def centre_of_mass(h: jax.Array) -> jax.Array:
  """(N, 2) centre of mass (row, col, in map pixels) of ``|h|`` (the centre for a zero map)."""
  h = jnp.asarray(h)      # NumPy float64 maps (the metrics) become JAX's canonical float dtype
  a = jnp.abs(h)
  tot = jnp.sum(a, axis=(1, 2))
  rows = jnp.arange(h.shape[1], dtype=h.dtype)
  cols = jnp.arange(h.shape[2], dtype=h.dtype)
  r = jnp.sum(a * rows[None, :, None], axis=(1, 2))
  c = jnp.sum(a * cols[None, None, :], axis=(1, 2))
  ok = tot > _TINY
  safe = jnp.where(ok, tot, 1.0)
  centre = jnp.array([(h.shape[1] - 1) / 2, (h.shape[2] - 1) / 2], h.dtype)
  return jnp.where(ok[:, None], jnp.stack([r / safe, c / safe], 1), centre[None])


def centre_mass_distance(h: jax.Array, h0: jax.Array) -> jax.Array:
  """(N,) ``√((Δrow² + Δcol²) / 2) / (w − 1)`` between the centres of mass of ``h`` and ``h0``
  (the test score: in [0, 1] for square maps)."""
  d = centre_of_mass(h) - centre_of_mass(h0)
  return jnp.sqrt(jnp.sum(d ** 2, axis=1) / 2 + _TINY) / (h.shape[2] - 1)


def centre_mass_loss(h: jax.Array, h0: jax.Array) -> jax.Array:
  """Centre-mass fooling: (N,) minus the centre-of-mass distance (minimising moves it)."""
  return -centre_mass_distance(h, jax.lax.stop_gradient(h0))


def active_loss(h1: jax.Array, h2: jax.Array, h01: jax.Array, h02: jax.Array) -> jax.Array:
  """Active fooling: (N,) ``mean((h1 − h02)²) + mean((h2 − h01)²)``: the fine-tuned model's
  maps of classes c1, c2 against the original model's maps of c2, c1."""
  h01, h02 = jax.lax.stop_gradient(h01), jax.lax.stop_gradient(h02)
  return jnp.mean((h1 - h02) ** 2, axis=(1, 2)) + jnp.mean((h2 - h01) ** 2, axis=(1, 2))


def heatmap(method: str, apply_fn: Callable, params: Any, x: jax.Array, target: jax.Array,
            layer: str) -> jax.Array:
  """(N, h, w) map of ``method`` ('gradcam' | 'lrp', :data:`FOOLING_METHODS`) at ``layer``.

  The map is taken of ``apply_fn`` as given: the fine-tuning step that differentiates it
  decides on the CPU gradient rewrite for the whole loss (``manipulate.penalised``)."""
  if method not in FOOLING_METHODS:
    raise ValueError(f"method: must be one of {sorted(FOOLING_METHODS)}, got {method!r}")
  return explain.explain(FOOLING_METHODS[method], apply_fn, params, x, target, layer=layer,
                         fast_grad=False)


def per_image_loss(kind: str, h: jax.Array, h0: jax.Array | None) -> jax.Array:
  """(N,) passive fooling loss ``kind`` of maps ``h`` (``h0``: the original model's maps)."""
  if kind == "location":
    return location_loss(h)
  if kind == "uniform":
    return uniform_loss(h)
  if kind == "topk":
    return topk_loss(h, h0)
  if kind == "centre-mass":
    return centre_mass_loss(h, h0)
  raise ValueError(f"fooling: must be one of {KINDS[:-1]} here, got {kind!r}")


def make_penalty(kind: str, method: str, layer: str, *, classes: tuple[int, int] = (0, 1)
                 ) -> Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]:
  """The fooling penalty for :func:`nemjax.manipulate.penalised.make_penalised_step`.

  Passive kinds read ``batch["fool_image"]`` (M, H, W, C) and ``batch["fool_label"]`` (M,)
  (the true class); ``active`` reads ``batch["fool_image"]`` (mosaics holding classes
  ``classes = (c1, c2)``). Losses that need the original model's maps (top-k, centre-mass,
  active) compute them with the frozen teacher params.

  Returns:
    ``penalty(apply_fn, params, teacher_params, batch) -> (mean loss, {})``.
  """
  if kind not in KINDS:
    raise ValueError(f"fooling: must be one of {KINDS}, got {kind!r}")
  if method not in FOOLING_METHODS:
    raise ValueError(f"method: must be one of {sorted(FOOLING_METHODS)}, got {method!r}")
  needs_original = kind in ("topk", "centre-mass")

  def penalty(apply_fn, params, teacher_params, batch):
    x = batch["fool_image"]
    if kind == "active":
      n = x.shape[0]
      t1 = jnp.full((n,), classes[0], jnp.int32)
      t2 = jnp.full((n,), classes[1], jnp.int32)
      h1 = heatmap(method, apply_fn, params, x, t1, layer)
      h2 = heatmap(method, apply_fn, params, x, t2, layer)
      h01 = heatmap(method, apply_fn, teacher_params, x, t1, layer)
      h02 = heatmap(method, apply_fn, teacher_params, x, t2, layer)
      return jnp.mean(active_loss(h1, h2, h01, h02)), {}
    t = batch["fool_label"]
    h = heatmap(method, apply_fn, params, x, t, layer)
    h0 = heatmap(method, apply_fn, teacher_params, x, t, layer) if needs_original else None
    return jnp.mean(per_image_loss(kind, h, h0)), {}

  return penalty
