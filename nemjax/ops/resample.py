"""Pillow's BILINEAR resampling coefficients, the one statement of them in nemjax.

Pillow resizes in two separable passes (horizontal first). For each axis
(``libImaging/Resample.c``, ``precompute_coeffs``) it precomputes, in float64, per output
coordinate ``x``::

  scale = in / out;  filterscale = max(scale, 1);  support = 1 * filterscale
  center = (x + 0.5) * scale
  xmin = max(int(center - support + 0.5), 0);  xmax = min(int(center + support + 0.5), in)
  w_t = tri((xmin + t - center + 0.5) * (1 / filterscale)),  t = 0 .. xmax - xmin - 1
  k_t = w_t / sum(w)   (summed in tap order)

with ``tri(a) = 1 - |a|`` for ``|a| < 1``, else 0. Upsampling (``out >= in``) has at most two
taps; downsampling widens the filter by ``filterscale`` (about ``2 * in / out`` taps). A pass
then stores ``float32(0.0 + v[xmin] * k_0 + v[xmin + 1] * k_1 + ...)``, products and sum in
float64, in tap order.

* :func:`pillow_coeffs` re-states ``precompute_coeffs`` operation for operation (bit-identical
  weights);
* :func:`tap_table` is the same as fixed-width ``(index, weight)`` columns, what the JAX
  kernels gather (``nemjax.dissect.upsample``);
* :func:`resample_matrix` is the dense ``(out, in)`` matrix, what act-avg projects masks with
  (``nemjax.attacks.act_avg``).

Example::

  bounds, kk = pillow_coeffs(224, 112)       # (112, 2) int64, (112, 5) float64
  taps = tap_table(224, 112)                 # idx (112, 4) int32, w (112, 4) float64
  r = resample_matrix(7, 112)                # (112, 7) float64; r @ a resizes a (7,) signal
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["TapTable", "pillow_coeffs", "tap_table", "resample_matrix"]


def _check_sizes(in_size, out_size) -> tuple[int, int]:
  for name, v in (("in_size", in_size), ("out_size", out_size)):
    if isinstance(v, bool) or int(v) != v or v < 1:
      raise ValueError(f"Pillow resampling: {name} must be a positive int, got {v!r}")
  return int(in_size), int(out_size)


def pillow_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's BILINEAR ``precompute_coeffs`` for one axis, re-stated exactly (any direction).

  Vectorised over output coordinates; every float64 operation is the one Pillow performs,
  in the same order, so the weights are bit-identical.

  Args:
    in_size: source length along the axis (> 0).
    out_size: output length along the axis (> 0).

  Returns:
    ``(bounds, kk)``: ``bounds`` int64 (out_size, 2) holds ``(xmin, n_taps)`` per output
    coordinate; ``kk`` float64 (out_size, ksize) the normalised weights (zero-padded),
    ``ksize = 2 * ceil(filterscale) + 1`` as in Pillow.
  """
  in_size, out_size = _check_sizes(in_size, out_size)
  # Pillow: scale = (double)(in1 - in0) / outSize, where in0/in1 are the float box edges.
  scale = float(np.float32(in_size) - np.float32(0.0)) / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale
  ksize = int(math.ceil(support)) * 2 + 1
  ss = 1.0 / filterscale
  center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C int cast
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  t = np.arange(ksize)
  arg = np.abs(((t[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
  w = np.where((arg < 1.0) & (t[None, :] < xmax[:, None]), 1.0 - arg, 0.0)  # bilinear_filter
  ww = np.zeros(out_size)
  for x in range(ksize):  # Pillow sums in tap order; unused taps add an exact 0.0
    ww = ww + w[:, x]
  safe = np.where(ww != 0.0, ww, 1.0)
  kk = np.where(ww[:, None] != 0.0, w / safe[:, None], w)
  return np.stack([xmin, xmax], axis=1), kk


class TapTable(NamedTuple):
  """Pillow's taps of one axis as ``T`` fixed columns (``T`` = the most taps of any output).

  Output ``x`` is ``float32(0.0 + v[idx[x, 0]] * w[x, 0] + ... + v[idx[x, T-1]] * w[x, T-1])``
  (products and sums in float64, left to right). Columns past an output's own taps read its
  last tap with weight ``0.0``: for finite ``v`` they add an exact zero, so the result is
  Pillow's.
  """
  idx: np.ndarray  # (out, T) int32 source index of each tap
  w: np.ndarray  # (out, T) float64 weight of each tap (0.0 past the output's taps)


def tap_table(in_size: int, out_size: int) -> TapTable:
  """:class:`TapTable` of Pillow's BILINEAR resize ``in_size -> out_size`` (any direction)."""
  bounds, kk = pillow_coeffs(in_size, out_size)
  n = bounds[:, 1]
  if np.any(n < 1):
    raise AssertionError(f"Pillow resampling {in_size} -> {out_size}: an output has no tap")
  cols = int(n.max())
  t = np.arange(cols)
  used = t[None, :] < n[:, None]
  idx = bounds[:, :1] + np.minimum(t[None, :], n[:, None] - 1)
  w = np.where(used, kk[:, :cols], 0.0)
  return TapTable(idx.astype(np.int32), w)


def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Pillow's BILINEAR resampling of one axis as a dense float64 matrix.

  Args:
    in_size: input length (> 0).
    out_size: output length (> 0).

  Returns:
    ``R`` float64 (out_size, in_size): row ``x`` holds Pillow's weights ``k_t`` at columns
    ``xmin + t``. Resizing a 1-D signal ``a`` (in_size,) is ``R @ a`` (in exact arithmetic;
    Pillow rounds each pass to float32).
  """
  bounds, kk = pillow_coeffs(in_size, out_size)
  r = np.zeros((int(out_size), int(in_size)), np.float64)
  rows = np.arange(bounds.shape[0])
  for t in range(int(bounds[:, 1].max())):
    use = t < bounds[:, 1]
    r[rows[use], bounds[use, 0] + t] = kk[use, t]
  return r
