"""Pillow-exact bilinear resizing of activation maps (up- and downsampling).

NetDissect-Lite resizes each (h, w) activation map to the label-map size (sh, sw) with
``Image.fromarray(a, 'F').resize((sw, sh), Image.BILINEAR)``: upsampling for most layers,
downsampling for layers larger than the label maps (VGG16 ``conv1_*``: 224 -> 112). Pillow's
``Resample.c`` does this in two separable passes, horizontal first, skipping a pass whose size
does not change. Its per-axis taps (``precompute_coeffs``) are :mod:`nemjax.ops.resample`'s;
each pass computes ``float32(0.0 + v[xmin] * k_0 + v[xmin + 1] * k_1 + ...)`` with the
products and the sum in float64. Upsampling (``out >= in``) has at most two taps, ``xmin``
and ``xmin + 1``; downsampling by ``f`` about ``2 f``.

Pass order: NetDissect-Lite's Pillow (and every Pillow up to 12) runs the horizontal pass
first, and so does this module. Pillow 13 runs the vertical one first when ``sh < h`` and
``h - sh > 2 (w - sw)`` (found by testing Pillow 13.0 on ~1,000 shapes); a square map resized to
a square label map, as in every NetDissect layer, never meets that condition.

This module reproduces that bit for bit:

* :func:`resize_bilinear_pillow` applies the taps (:func:`nemjax.ops.resample.tap_table`) in
  float64 under a scoped ``jax.enable_x64(True)``. XLA would otherwise contract
  ``a*k0 + b*k1`` into a fused multiply-add (one rounding instead of Pillow's several); every
  product therefore goes through an integer XOR with a runtime zero, which no compiler can
  see through (:func:`no_contract`, :func:`resample_f32`).
* :func:`pillow_taps` is the two-tap table of an upsampling, and :func:`patch_taps` groups it
  into "patches" (the output pixels that read the same 2x2 source block), which the sparse
  tally kernel uses.

Example::

  up = resize_bilinear_pillow(maps, (112, 112))  # maps (..., 7, 7) -> (..., 112, 112) f32
  dn = resize_bilinear_pillow(maps224, (112, 112))  # (..., 224, 224) -> (..., 112, 112) f32
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nemjax.ops.resample import TapTable, pillow_coeffs, tap_table

__all__ = [
    "PillowTaps",
    "PatchTaps",
    "pillow_coeffs",
    "pillow_taps",
    "patch_taps",
    "resample_f32",
    "resize_bilinear_pillow",
    "upsample_bilinear_pillow",
]


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
  """Two-tap table of Pillow's BILINEAR upsampling ``in_size -> out_size`` (the sparse tally's
  patches are built from it; a general resize uses :func:`nemjax.ops.resample.tap_table`).

  Raises:
    ValueError: when ``out_size < in_size`` (downsampling reads more than two taps).
  """
  if out_size < in_size:
    raise ValueError(f"pillow_taps is the two-tap table of an upsampling, got in_size={in_size} "
                     f"> out_size={out_size}; use nemjax.ops.resample.tap_table")
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


def resample_f32(v: jax.Array, taps: TapTable, axis: int, zero: jax.Array,
                 signed_zero: bool = False) -> jax.Array:
  """One Pillow pass along ``axis``: ``float32(sum_t float64(v[.., idx[:, t], ..]) * w[:, t])``.

  Products are rounded separately (:func:`no_contract`) and summed left to right, as Pillow.
  With two columns this is :func:`lerp2_f32`.

  Args:
    v: float32 array; its ``axis`` has the source length.
    taps: :class:`~nemjax.ops.resample.TapTable` (as arrays: ``idx`` (out, T) int32, ``w``
      (out, T) float64).
    axis: the axis resampled (negative counts from the end).
    zero: () int64 runtime zero.
    signed_zero: start the sum from ``+0.0`` as Pillow does (see :func:`lerp2_f32`).

  Returns:
    ``v`` with ``axis`` resized to ``out``, float32.
  """
  idx, w = taps
  axis = axis % v.ndim
  wshape = [1] * v.ndim
  wshape[axis] = idx.shape[0]
  total = None
  for t in range(idx.shape[1]):
    p = no_contract(jnp.take(v, idx[:, t], axis=axis).astype(jnp.float64)
                    * w[:, t].reshape(wshape), zero)
    if total is None:
      total = p + no_contract(jnp.zeros_like(p), zero) if signed_zero else p
    else:
      total = total + p
  return total.astype(jnp.float32)


@jax.jit
def _resize_impl(maps, tx, ty, zero):
  """maps (M, h, w) f32 -> (M, sh, sw) f32; ``tx`` / ``ty`` None skip a pass (as Pillow)."""
  if tx is not None:
    maps = resample_f32(maps, tx, 2, zero, signed_zero=True)
  if ty is not None:
    maps = resample_f32(maps, ty, 1, zero, signed_zero=True)
  return maps


def resize_bilinear_pillow(maps, out_size: Sequence[int]) -> jax.Array:
  """Resizes maps exactly as Pillow's BILINEAR resize of a float32 ('F') image.

  Equals ``Image.fromarray(m, 'F').resize((sw, sh), Image.BILINEAR)`` bit for bit, up- or
  downsampling either axis, for every finite float32 map ``m`` whose values and results are
  not float32 subnormals (``0 < |x| < 1.18e-38``): XLA on CPU flushes those to zero, Pillow
  does not. Non-finite values are not supported. Horizontal pass first (see the module
  docstring for Pillow 13's order on some non-square shapes).

  Args:
    maps: (..., h, w) array, cast to float32.
    out_size: ``(sh, sw)``, positive.

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
  if sh < 1 or sw < 1:
    raise ValueError(f"out_size must be positive, got {(sh, sw)} for maps {tuple(maps.shape)}")
  h, w = maps.shape[-2:]
  if h < 1 or w < 1:
    raise ValueError(f"maps must have non-empty (h, w), got {tuple(maps.shape)}")
  tx = tap_table(w, sw) if sw != w else None
  ty = tap_table(h, sh) if sh != h else None
  lead = maps.shape[:-2]
  with jax.enable_x64(True):
    flat = jnp.asarray(maps, jnp.float32).reshape((-1, h, w))
    out = _resize_impl(flat, tx, ty, np.int64(0))
  return out.reshape(lead + (sh, sw))


def upsample_bilinear_pillow(maps, out_size: Sequence[int]) -> jax.Array:
  """:func:`resize_bilinear_pillow` (the name from when only upsampling was supported)."""
  return resize_bilinear_pillow(maps, out_size)
