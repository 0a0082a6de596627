"""Scoring of the attribution benchmark: maps scaled to [−1, 1], their pixel-wise Pearson
correlation with the trigger masks, and the paired Wilcoxon signed-rank test (NumPy only).

* :func:`scale_maps`: each map divided by its largest ``|value|`` (an all-zero map stays 0).
* :func:`pearson`: per-image Pearson correlation over the pixels, float64. NaN-safe: when a map
  or a mask is constant (the blank baseline, an all-zero gradient) the correlation is undefined
  and is **0 by definition** (no linear relation shown), never NaN.
* :func:`wilcoxon`: the signed-rank test of paired scores ``x − y`` with scipy.stats.wilcoxon's
  ``method="approx"`` variant: zero differences dropped (``zero_method="wilcox"``), average ranks
  of ``|d|``, the normal approximation with the tie correction ``Σ(t³ − t)/48`` subtracted from
  the variance, no continuity correction (``correction=False``). ``alternative="greater"``: is
  ``x`` above ``y``? (``T⁺`` against its mean ``n(n+1)/4``); ``"two-sided"`` uses
  ``min(T⁺, T⁻)``. tests/test_trojan_bench.py checks it against scipy.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["scale_maps", "pearson", "WilcoxonResult", "wilcoxon", "ALTERNATIVES"]

ALTERNATIVES = ("greater", "less", "two-sided")


def scale_maps(maps: np.ndarray) -> np.ndarray:
  """``(N, H, W)`` maps divided by each one's max ``|value|`` -> ``(N, H, W)`` float64 in
  [−1, 1] (an all-zero map stays all zero)."""
  m = np.asarray(maps, np.float64)
  peak = np.max(np.abs(m.reshape(m.shape[0], -1)), axis=1)
  return m / np.where(peak > 0, peak, 1.0)[:, None, None]


def pearson(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Pixel-wise Pearson correlation of each map with its mask.

  Args:
    maps: ``(N, H, W)`` attribution maps (any scale; Pearson is scale-free, scale them with
      :func:`scale_maps` for display).
    masks: ``(N, H, W)`` trigger masks.

  Returns:
    ``(N,)`` float64 in [−1, 1]; 0 where a map or a mask is constant (see the module docstring).
  """
  a = np.asarray(maps, np.float64).reshape(len(maps), -1)
  b = np.asarray(masks, np.float64).reshape(len(masks), -1)
  if a.shape != b.shape:
    raise ValueError(f"masks: shape {np.shape(masks)} differs from the maps' {np.shape(maps)}")
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
  num = (a * b).sum(1)
  ok = den > 1e-300
  return np.where(ok, num / np.where(ok, den, 1.0), 0.0).clip(-1.0, 1.0)


class WilcoxonResult(NamedTuple):
  statistic: float   # T⁺ (alternative greater / less) or min(T⁺, T⁻) (two-sided)
  z: float           # standardised statistic
  pvalue: float      # NaN when every difference is zero
  n: int             # non-zero differences


def _average_ranks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ranks 1..n with ties averaged, and the size of every tie group."""
  order = np.argsort(v, kind="mergesort")
  sv = v[order]
  starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
  sizes = np.diff(np.r_[starts, len(sv)])
  avg = starts + (sizes + 1) / 2.0
  ranks = np.empty(len(v))
  ranks[order] = np.repeat(avg, sizes)
  return ranks, sizes


def _norm_sf(z: float) -> float:
  return 0.5 * math.erfc(z / math.sqrt(2.0))


def wilcoxon(x: np.ndarray, y: np.ndarray, alternative: str = "greater") -> WilcoxonResult:
  """Paired Wilcoxon signed-rank test of ``x`` against ``y`` (normal approximation; see the
  module docstring).

  Args:
    x, y: ``(n,)`` paired scores (e.g. a method's and the edge detector's per image).
    alternative: ``"greater"`` (x above y), ``"less"`` or ``"two-sided"``.

  Returns:
    A :class:`WilcoxonResult`.
  """
  if alternative not in ALTERNATIVES:
    raise ValueError(f"alternative: must be one of {ALTERNATIVES}, got {alternative!r}")
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"y: must be paired with x (both (n,)), got {x.shape} and {y.shape}")
  d = x - y
  d = d[d != 0]
  n = int(d.size)
  if n == 0:
    return WilcoxonResult(float("nan"), float("nan"), float("nan"), 0)
  ranks, ties = _average_ranks(np.abs(d))
  r_plus = float(ranks[d > 0].sum())
  r_minus = float(ranks[d < 0].sum())
  mean = n * (n + 1) / 4.0
  var = n * (n + 1) * (2 * n + 1) / 24.0 - float((ties ** 3 - ties).sum()) / 48.0
  se = math.sqrt(var) if var > 0 else float("nan")
  if alternative == "two-sided":
    t = min(r_plus, r_minus)
    z = (t - mean) / se
    p = min(1.0, 2.0 * _norm_sf(abs(z)))
  else:
    t = r_plus
    z = (t - mean) / se
    p = _norm_sf(z) if alternative == "greater" else _norm_sf(-z)
  return WilcoxonResult(t, float(z), float(p), n)
