"""Fooling metrics (Heo, Joo & Moon, NeurIPS 2019), on the host in float64 NumPy.

Maps are (N, h, w) arrays of one method (input-level maps may be pooled to the layer's grid
first, :func:`pool_to`). Per image:

* :func:`sign_correlation`: Pearson correlation of the sign vectors of two maps, over the
  positions where either map's ``|h|`` exceeds its mean + std;
* :func:`location_correlation`: Pearson correlation of a map with the frame mask;
* :func:`bitarget_correlation`: active fooling's swap: the mean of ``r(h'_{c1}, h_{c2})`` and
  ``r(h'_{c2}, h_{c1})`` (fooled maps against the original model's maps of the other class);
* :func:`entropy`: ``−Σ p log p`` of ``p = |h| / Σ|h|``;
* :func:`fooling_score`: the per-image test score of a fooling kind, and :func:`fooled`
  whether it passes the threshold (location, top-k, uniform, active: score ≤ τ; centre-mass:
  score ≥ τ); :func:`fooling_success_rate` is the share of images that pass.

An undefined correlation (a constant map) is NaN; means skip NaNs.
"""
from __future__ import annotations

import numpy as np

from nemjax.fooling import losses

__all__ = ["DEFAULT_THRESHOLD", "pearson", "sign_correlation", "location_correlation",
           "bitarget_correlation", "entropy", "fooling_score", "fooled",
           "fooling_success_rate", "topk_accuracy", "pool_to", "nanmean"]

DEFAULT_THRESHOLD = 0.15   # FSR threshold of the authors' code


def _flat(h) -> np.ndarray:
  h = np.asarray(h, np.float64)
  return h.reshape(h.shape[0], -1)


def pearson(a, b) -> np.ndarray:
  """(N,) Pearson correlation of each image's maps ``a`` and ``b`` (NaN if either is constant)."""
  a, b = _flat(a), _flat(b)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _salient(h: np.ndarray) -> np.ndarray:
  a = np.abs(h)
  return a > a.mean(1, keepdims=True) + a.std(1, keepdims=True)


def sign_correlation(h0, h) -> np.ndarray:
  """(N,) Pearson correlation of ``sign(h0)`` and ``sign(h)`` over the positions where
  ``|h0|`` or ``|h|`` exceeds that map's mean + std (NaN if fewer than 2 or constant)."""
  h0, h = _flat(h0), _flat(h)
  keep = _salient(h0) | _salient(h)
  out = np.full(h.shape[0], np.nan)
  for i in range(h.shape[0]):
    if keep[i].sum() >= 2:
      out[i] = pearson(np.sign(h0[i, keep[i]])[None], np.sign(h[i, keep[i]])[None])[0]
  return out


def location_correlation(h) -> np.ndarray:
  """(N,) Pearson correlation of each map with the frame mask (:func:`losses.frame_mask`)."""
  h = np.asarray(h, np.float64)
  m = losses.frame_mask(h.shape[1], h.shape[2])
  return pearson(h, np.broadcast_to(m, h.shape))


def bitarget_correlation(h1, h2, h01, h02) -> np.ndarray:
  """(N,) mean of ``r(h1, h02)`` and ``r(h2, h01)`` (fooled c1/c2 maps vs original c2/c1)."""
  return (pearson(h1, h02) + pearson(h2, h01)) / 2


def entropy(h) -> np.ndarray:
  """(N,) ``−Σ p log p`` of ``p = |h| / Σ|h|`` (0 for a zero map)."""
  a = np.abs(_flat(h))
  p = a / np.maximum(a.sum(1, keepdims=True), 1e-300)
  with np.errstate(divide="ignore", invalid="ignore"):
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)


def fooling_score(kind: str, h, h0=None, *, active=None) -> np.ndarray:
  """(N,) per-image test score of fooling ``kind`` for maps ``h`` (``h0``: original maps).

  location: the location loss (mean squared difference to the frame, in [0, 1]); top-k: the
  top-k loss; uniform: ``1 − H(p) / log(h·w)`` (0 = uniform); centre-mass:
  ``√((Δrow² + Δcol²)/2)/(w − 1)``; active: ``(1 − bi-target correlation) / 2`` from
  ``active = (h1, h2, h01, h02)`` (``h``, ``h0`` unused).
  """
  if kind == "active":
    if active is None:
      raise ValueError("fooling_score: active needs active=(h1, h2, h01, h02)")
    return (1 - bitarget_correlation(*active)) / 2
  h = np.asarray(h, np.float64)
  if kind == "location":
    return np.asarray(losses.location_loss(h), np.float64)
  if kind == "uniform":
    return 1 - entropy(h) / np.log(h.shape[1] * h.shape[2])
  if h0 is None:
    raise ValueError(f"fooling_score: {kind} needs the original maps h0")
  h0 = np.asarray(h0, np.float64)
  if kind == "topk":
    return np.asarray(losses.topk_loss(h, h0), np.float64)
  if kind == "centre-mass":
    return np.asarray(losses.centre_mass_distance(h, h0), np.float64)
  raise ValueError(f"fooling: must be one of {losses.KINDS}, got {kind!r}")


def fooled(kind: str, score, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(N,) bool: centre-mass ``score >= threshold``, every other kind ``score <= threshold``
  (NaN never passes)."""
  s = np.asarray(score, np.float64)
  with np.errstate(invalid="ignore"):
    return s >= threshold if kind == "centre-mass" else s <= threshold


def fooling_success_rate(kind: str, score, threshold: float = DEFAULT_THRESHOLD) -> float:
  """Share (%) of images whose fooling score passes ``threshold`` (:func:`fooled`)."""
  s = np.asarray(score)
  return float(100.0 * fooled(kind, s, threshold).mean()) if s.size else float("nan")


def topk_accuracy(logits, labels, k: int) -> float:
  """Top-``k`` accuracy (%) of logits (N, K) against labels (N,) (``k`` capped at K)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  k = min(int(k), logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(100.0 * np.mean(np.any(top == labels[:, None], axis=1)))


def pool_to(h, grid: tuple[int, int]) -> np.ndarray:
  """(N, H, W) maps average-pooled to ``grid`` (h, w) when H, W are multiples of it (the
  authors compare input-level maps on the layer's grid); other maps are returned unchanged."""
  h = np.asarray(h, np.float64)
  H, W = h.shape[1:3]
  gh, gw = grid
  if (H, W) == (gh, gw) or H % gh or W % gw:
    return h
  return h.reshape(h.shape[0], gh, H // gh, gw, W // gw).mean((2, 4))


def nanmean(v) -> float:
  """Mean over the finite entries (NaN when there is none)."""
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")
