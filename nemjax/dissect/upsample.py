"""Pillow-exact bilinear upsampling of activation maps.

NetDissect-Lite upsamples each (h, w) activation map to the label-map size (sh, sw) with
``Image.fromarray(a, 'F').resize((sw, sh), Image.BILINEAR)``. Pillow's ``Resample.c`` does
this in two separable passes, horizontal first. For every output coordinate it precomputes
taps in float64 (``precompute_coeffs``)::

  scale = in / out;  filterscale = max(scale, 1);  support = filterscale
  center = (x + 0.5) * scale
  xmin = max(int(center - support + 0.5), 0);  xmax = min(int(center + support + 0.5), in)
  w_t = tri((xmin + t - center + 0.5) / filterscale),  t = 0 .. xmax - xmin - 1
  k_t = w_t / sum(w)

and each pass computes ``float32(0.0 + v[xmin] * k_0 + v[xmin + 1] * k_1 + ...)`` with the
products and the sum in float64. When upsampling (``out >= in``) there are at most two taps,
``xmin`` and ``xmin + 1``.

This module reproduces that bit for bit:

* :func:`pillow_coeffs` re-states ``precompute_coeffs`` in Python floats (IEEE doubles, same
  operation order), :func:`pillow_taps` turns it into a two-tap table.
* :func:`upsample_bilinear_pillow` applies the taps in float64 under a scoped
  ``jax.enable_x64(True)``. XLA would otherwise contract ``a*k0 + b*k1`` into a fused
  multiply-add (one rounding instead of Pillow's three); every product therefore goes
  through an integer XOR with a runtime zero, which no compiler can see through.
* :func:`patch_taps` describes the same computation grouped into "patches" (the output
  pixels that read the same 2x2 source block), which the sparse tally kernel uses.

Example::

  up = upsample_bilinear_pillow(maps, (112, 112))  # maps (..., 7, 7) -> (..., 112, 112) f32
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "PillowTaps",
    "PatchTaps",
    "pillow_coeffs",
    "pillow_taps",
    "patch_taps",
    "upsample_bilinear_pillow",
]


def pillow_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's BILINEAR ``precompute_coeffs`` for one axis, re-stated exactly.

  Vectorised over output coordinates; every float64 operation is the one Pillow performs,
  in the same order, so the weights are bit-identical.

  Args:
    in_size: source length along the axis.
    out_size: output length along the axis.

  Returns:
    ``(bounds, kk)``: ``bounds`` int64 (out_size, 2) holds ``(xmin, n_taps)`` per output
    coordinate; ``kk`` float64 (out_size, ksize) the normalised weights (zero-padded).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
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


class PillowTaps(NamedTuple):
  """Two-tap form of Pillow's bilinear upsampling along one axis.

  Output ``x`` is ``float32(v[idx0[x]] * w0[x] + v[idx1[x]] * w1[x])`` (products and sum in
  float64); a missing second tap has ``idx1 == idx0`` and ``w1 == 0.0``.
  """
  idx0: np.ndarray  # (out,) int32, first source index
  idx1: np.ndarray  # (out,) int32, second source index
  w0: np.ndarray  # (out,) float64, weight of the first tap
  w1: np.ndarray  # (out,) float64, weight of the second tap


def pillow_taps(in_size: int, out_size: int) -> PillowTaps:
  """Two-tap table of Pillow's BILINEAR resize for ``in_size -> out_size``.

  Raises:
    ValueError: when ``out_size < in_size`` (downsampling needs more than two taps and is not
      what dissection does).
  """
  if out_size < in_size:
    raise ValueError(
        f"only upsampling is supported, got in_size={in_size} > out_size={out_size}")
  bounds, kk = pillow_coeffs(in_size, out_size)
  n = bounds[:, 1]
  if np.any(n < 1) or np.any(n > 2):
    raise AssertionError(f"unexpected tap counts {sorted(set(n.tolist()))}")
  idx0 = bounds[:, 0]
  idx1 = np.where(n == 2, idx0 + 1, idx0)
  w0 = kk[:, 0].copy()
  w1 = np.where(n == 2, kk[:, 1], 0.0)
  return PillowTaps(idx0.astype(np.int32), idx1.astype(np.int32), w0, w1)


class PatchTaps(NamedTuple):
  """Output coordinates of one axis grouped by the source pair they read ("patch groups").

  Group ``g`` (0 .. in_size) holds the output coordinates lying between the source centres
  ``g - 1`` and ``g``; all of them read only the clamped source pair
  ``(lo[g], hi[g]) = (max(g - 1, 0), min(g, in_size - 1))``. Groups are padded to ``size``
  positions; padding has ``valid == False``, weight 0 and ``out == out_size`` (a sentinel).
  The value at output ``out[g, r]`` is
  ``float32(pair[off0[g, r]] * w0[g, r] + pair[off1[g, r]] * w1[g, r])``
  with ``pair = (v[lo[g]], v[hi[g]])``, exactly as Pillow computes it.
  """
  lo: np.ndarray  # (in+1,) int32, first source index of the group's pair
  hi: np.ndarray  # (in+1,) int32, second source index of the group's pair
  out: np.ndarray  # (in+1, size) int32, output coordinate (out_size for padding)
  valid: np.ndarray  # (in+1, size) bool
  off0: np.ndarray  # (in+1, size) int32 in {0, 1}: which pair member the first tap reads
  off1: np.ndarray  # (in+1, size) int32 in {0, 1}
  w0: np.ndarray  # (in+1, size) float64
  w1: np.ndarray  # (in+1, size) float64


def patch_taps(in_size: int, out_size: int) -> PatchTaps:
  """Groups Pillow's upsampling taps of one axis into patch groups (see :class:`PatchTaps`)."""
  taps = pillow_taps(in_size, out_size)
  scale = float(in_size) / out_size
  centers = (np.arange(out_size) + 0.5) * scale
  group = np.minimum(np.floor(centers + 0.5).astype(np.int64), in_size)  # non-decreasing
  counts = np.bincount(group, minlength=in_size + 1)
  size = int(counts.max())
  ng = in_size + 1
  lo = np.maximum(np.arange(ng) - 1, 0).astype(np.int32)
  hi = np.minimum(np.arange(ng), in_size - 1).astype(np.int32)
  pos = np.arange(out_size) - (np.cumsum(counts) - counts)[group]
  glo, ghi = lo[group], hi[group]
  for idx in (taps.idx0, taps.idx1):
    if np.any((idx != glo) & (idx != ghi)):
      raise AssertionError(f"a tap of {in_size} -> {out_size} lies outside its source pair")
  o0 = (taps.idx0 != glo).astype(np.int32)
  o1 = np.where(taps.w1 != 0.0, (taps.idx1 != glo).astype(np.int32), o0)
  o0 = np.where(taps.w0 == 0.0, o1, o0)
  out = np.full((ng, size), out_size, np.int32)
  valid = np.zeros((ng, size), bool)
  off0 = np.zeros((ng, size), np.int32)
  off1 = np.zeros((ng, size), np.int32)
  w0 = np.zeros((ng, size), np.float64)
  w1 = np.zeros((ng, size), np.float64)
  out[group, pos] = np.arange(out_size)
  valid[group, pos] = True
  off0[group, pos], off1[group, pos] = o0, o1
  w0[group, pos], w1[group, pos] = taps.w0, taps.w1
  return PatchTaps(lo, hi, out, valid, off0, off1, w0, w1)


def no_contract(p: jax.Array, zero: jax.Array) -> jax.Array:
  """Returns ``p`` (float64) unchanged, but opaque to multiply-add contraction.

  ``zero`` must be a runtime int64 zero (a traced argument, never a constant).
  """
  return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int64) ^ zero, jnp.float64)


def lerp2_f32(a: jax.Array, b: jax.Array, wa: jax.Array, wb: jax.Array,
              zero: jax.Array, signed_zero: bool = False) -> jax.Array:
  """``float32(float64(a) * wa + float64(b) * wb)`` with two separately rounded products.

  With ``signed_zero`` the sum starts from ``+0.0`` as Pillow's does, so a zero result is
  ``+0.0`` even when both products are ``-0.0`` (irrelevant for comparisons, needed for
  bitwise equality of the maps).
  """
  pa = no_contract(a.astype(jnp.float64) * wa, zero)
  pb = no_contract(b.astype(jnp.float64) * wb, zero)
  if signed_zero:
    pa = pa + no_contract(jnp.zeros_like(pa), zero)
  return (pa + pb).astype(jnp.float32)


@jax.jit
def _upsample_impl(maps, ix0, ix1, wx0, wx1, iy0, iy1, wy0, wy1, zero):
  """maps (M, h, w) f32 -> (M, sh, sw) f32."""
  hp = lerp2_f32(jnp.take(maps, ix0, axis=2), jnp.take(maps, ix1, axis=2), wx0, wx1, zero,
                 True)
  return lerp2_f32(jnp.take(hp, iy0, axis=1), jnp.take(hp, iy1, axis=1),
                   wy0[:, None], wy1[:, None], zero, True)


def upsample_bilinear_pillow(maps, out_size: Sequence[int]) -> jax.Array:
  """Upsamples maps exactly as Pillow's BILINEAR resize of a float32 ('F') image.

  Equals ``Image.fromarray(m, 'F').resize((sw, sh), Image.BILINEAR)`` bit for bit for every
  finite float32 map ``m`` whose values and results are not float32 subnormals
  (``0 < |x| < 1.18e-38``): XLA on CPU flushes those to zero, Pillow does not.
  Non-finite values are not supported.

  Args:
    maps: (..., h, w) array, cast to float32.
    out_size: ``(sh, sw)`` with ``sh >= h`` and ``sw >= w``.

  Returns:
    (..., sh, sw) float32 jax array.
  """
  if not isinstance(maps, jax.Array):
    maps = np.asarray(maps, np.float32)
  if maps.ndim < 2:
    raise ValueError(f"maps must have shape (..., h, w), got {tuple(maps.shape)}")
  if len(out_size) != 2:
    raise ValueError(f"out_size must be (sh, sw), got {out_size!r}")
  sh, sw = int(out_size[0]), int(out_size[1])
  h, w = maps.shape[-2:]
  if sh < h or sw < w:
    raise ValueError(f"only upsampling is supported: maps {tuple(maps.shape)} to {(sh, sw)}")
  tx, ty = pillow_taps(w, sw), pillow_taps(h, sh)
  lead = maps.shape[:-2]
  with jax.enable_x64(True):
    flat = jnp.asarray(maps, jnp.float32).reshape((-1, h, w))
    out = _upsample_impl(flat, tx.idx0, tx.idx1, tx.w0, tx.w1, ty.idx0, ty.idx1, ty.w0, ty.w1,
                         np.int64(0))
  return out.reshape(lead + (sh, sw))
