"""Exact Network Dissection tally (NetDissect-Lite's ``tally_job``), IoU and best labels.

For every image ``n`` and unit ``u`` with ``acts[n, :, :, u].max() > thr[u]``, NetDissect-Lite
resizes the map to the label size with Pillow (see :mod:`nemjax.dissect.upsample`), takes
the mask ``M = upsampled > thr[u]`` and adds

* ``tally_units[u] += |M|``;
* ``tally_both[u, l] += #{(layer k, pixel p in M) : pixels[n, k, p] == l}`` for ``l != 0``, and
  ``+= |M|`` for every image-level label ``l`` of the image (a repeated one counts again);
* ``tally_units_cat[u, c] += |M| * (tally_cat[c] > 0)`` with ``tally_cat`` = (label counts in
  ``M``, label 0 left out) ``@ labelcat`` + ``sum of labelcat[l]`` over image-level labels.
  The original reuses a stale ``tally_cat`` for an image without label PNGs; here such an
  image (``K == 0`` or only all-zero layers, which give the same) uses the image-level part.

and once per image ``tally_labels[l] +=`` (number of (layer, pixel) pairs labelled ``l``) +
``sh * sw`` per image-level label. IoU (:func:`compute_iou`) is
``tally_both / (tally_units_cat @ labelcat.T + tally_labels - tally_both + 1e-10)``.

Everything here equals NetDissect-Lite exactly (integer counts, float64 IoU in the original's
operation order). The mask comparison ``float32 > float64`` of NumPy 2 is done in float32
against the threshold rounded *down* to float32, which is equivalent for every float32 value.
One limit: XLA on CPU flushes float32 subnormals to zero, so an active 2x2 block holding a
value with ``0 < |x| < 2**-60`` (where Pillow's intermediate results could be subnormal)
raises ``ValueError`` instead of silently differing; such blocks cannot occur in float32
networks in practice, and inactive ones do not matter.

**Fast path** (``method='sparse'``, the default on CPU). A bilinear value never exceeds the
2x2 source block it interpolates (Pillow's normalised non-negative weights and float32
rounding keep that true bit for bit), so most of the work cannot count:

1. Output pixels are grouped into *patches*: per axis, the outputs between source centres
   ``g - 1`` and ``g`` (``g = 0 .. h``) read only the clamped source pair ``(g - 1, g)``.
   Patch ``(n, u, gy, gx)`` can hold mask pixels only if the max of its 2x2 block > thr,
   i.e. the 2x2 max of the edge-padded map. One fused pass flags the active patches
   (≈ 1-2 % of all), the host compacts them (``np.flatnonzero``, already ordered by
   (image, unit) pair), and they are processed in calls of one fixed size per layer
   geometry (the last one padded), so a layer compiles the kernel once.
2. Per active patch a jitted kernel gathers the block, upsamples the patch exactly as Pillow
   (float64, contraction-proof), thresholds it and packs the mask into 64-bit words.
3. Labels never become a one-hot over all labels: per (image, layer) the distinct labels
   present get slots (``P`` per layer, a power of two), each pixel gets its slot code
   (``slot + 1``, 0 = unlabelled) and the codes are stored as ``log2(P) + 1`` bit planes
   (:func:`prepare_labels`, once per batch, shareable by all layers), regrouped per patch.
   The pixels of slot ``p`` inside the mask are then ``mask & AND_j (plane_j or ~plane_j)``,
   counted with ``popcount``: a few word operations per 64 pixels and slot.
4. Per (image, unit) sums come from a sorted segment sum over the (pair-ordered) patches;
   the small final scatter into ``(U, L+1)`` and the category bookkeeping run on the host in
   int64.

``method='dense'`` resizes every map and counts with the same slots on full images
(einsum); it is exact too and suits accelerators. Layers whose maps are larger than the label
maps (downsampling: Pillow's widened filter reads more than two taps per output, so there are
no 2x2 patches) always take it; it needs no patch structure and any tap count. Counts per batch on the device are int32,
accumulation across batches is int64 on the host.

Example::

  state = tally_init(U, num_labels=L + 1, num_categories=C)
  for acts, pixels, scalars, valid in batches:
    state = tally_update(state, acts, thr, pixels, scalars, labelcat, valid=valid)
  iou = compute_iou(state, labelcat)
  best = best_labels(iou, primary_category, C)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nemjax.dissect._checks import check_finite
from nemjax.dissect.upsample import PatchTaps, lerp2_f32, patch_taps, resample_f32
from nemjax.ops.resample import tap_table

__all__ = [
    "TallyState",
    "AUTO_TALLY_METHOD",
    "auto_method",
    "LabelBatch",
    "BestLabels",
    "tally_init",
    "prepare_labels",
    "tally_update",
    "tally_merge",
    "compute_iou",
    "best_labels",
    "floor_to_float32",
]

# Patches per sparse call: every call has the same static size (one compilation per layer
# geometry and label-slot count), about this many patch pixels; the last call is padded.
_CHUNK_PIXELS = 1 << 19
# Dense path: at most about this many float64 values of a resize pass per call (the unit chunk
# shrinks below 64 for large maps, e.g. VGG16 conv1_* at 224x224).
_DENSE_VALUES = 1 << 25


class TallyState(NamedTuple):
  """Accumulated NetDissect counts of one layer (host int64)."""
  tally_both: np.ndarray  # (U, L+1) int64, mask ∩ label counts
  tally_labels: np.ndarray  # (L+1,) int64, label areas
  tally_units_cat: np.ndarray  # (U, C) int64, mask sizes where the category occurs
  tally_units: np.ndarray  # (U,) int64, mask sizes


class LabelBatch(NamedTuple):
  """Per-batch label preprocessing, reusable across the layers of one batch.

  Each (image, layer) gets ``P`` slots for the distinct non-zero labels it contains
  (ascending; ``P`` is the batch maximum rounded up to a power of two). Pixel ``(k, y, x)``
  of image ``b`` has ``code = slot index + 1`` (0 = unlabelled), stored also as ``nb`` bit
  planes packed along rows, from which the tally kernels derive every slot's pixels.
  """
  code: jax.Array  # (B', K, sh, sw) uint8/16/32 slot code of each pixel (valid images)
  code_bits: jax.Array  # (B', K, nb, sh, RW) uint64, bit x % 64 of word x // 64 = bit j
  scalars: np.ndarray  # (B', S) int64, valid images only (0 = padding)
  slots: np.ndarray  # (B', K, P) int32 global label of each slot, -1 = empty
  tally_labels: np.ndarray  # (L+1,) int64 contribution of this batch to tally_labels
  num_labels: int  # L+1


class BestLabels(NamedTuple):
  """Best label per unit and category; ties go to the first index."""
  label: np.ndarray  # (U, C) int64, best label of each category (0 if all IoUs are 0)
  score: np.ndarray  # (U, C) float64, its IoU
  best_category: np.ndarray  # (U,) int64, argmax of score over categories
  best_label: np.ndarray  # (U,) int64
  best_score: np.ndarray  # (U,) float64


def tally_init(num_units: int, num_labels: int, num_categories: int) -> TallyState:
  """Zero counts for ``num_units`` units, ``num_labels`` = L+1 labels, C categories."""
  if num_units < 1 or num_labels < 1 or num_categories < 1:
    raise ValueError(f"need positive sizes, got num_units={num_units}, "
                     f"num_labels={num_labels}, num_categories={num_categories}")
  return TallyState(
      tally_both=np.zeros((num_units, num_labels), np.int64),
      tally_labels=np.zeros(num_labels, np.int64),
      tally_units_cat=np.zeros((num_units, num_categories), np.int64),
      tally_units=np.zeros(num_units, np.int64))


def floor_to_float32(t) -> np.ndarray:
  """Largest float32 <= t, elementwise. For float32 ``v``: ``v > t  <=>  v > floor32(t)``."""
  t = np.asarray(t, np.float64)
  with np.errstate(over="ignore"):
    f = t.astype(np.float32)
  down = f.astype(np.float64) > t
  out = np.where(down, np.nextafter(f, np.float32(-np.inf)), f).astype(np.float32)
  return out + np.float32(0.0)  # -0.0 -> +0.0 (same comparisons, simpler bit order)


def _pow2(n: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------- labels
def prepare_labels(pixels, scalars, num_labels: int, valid=None) -> LabelBatch:
  """Preprocesses a batch's labels (shared by all layers of the batch).

  A jitted scatter-add counts the labels of every (image, layer); the host turns the counts
  into slots and a lookup table; a second jitted pass writes the slot codes and bit planes.

  Args:
    pixels: (B, K, sh, sw) int label layers, values in [0, num_labels).
    scalars: (B, S) int image-level labels, values in [0, num_labels); 0 = padding.
    num_labels: L+1.
    valid: optional (B,) bool; invalid images are dropped.

  Returns:
    LabelBatch with per-layer label slots and this batch's ``tally_labels``.
  """
  pixels = np.asarray(pixels)
  scalars = np.asarray(scalars)
  if pixels.ndim != 4:
    raise ValueError(f"pixels must be (B, K, sh, sw), got shape {pixels.shape}")
  if scalars.ndim != 2 or scalars.shape[0] != pixels.shape[0]:
    raise ValueError(f"scalars must be (B={pixels.shape[0]}, S), got shape {scalars.shape}")
  if not (np.issubdtype(pixels.dtype, np.integer) and np.issubdtype(scalars.dtype, np.integer)):
    raise ValueError(f"pixels and scalars must be integer arrays, got {pixels.dtype}, "
                     f"{scalars.dtype}")
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != (pixels.shape[0],):
      raise ValueError(f"valid must have shape ({pixels.shape[0]},), got {valid.shape}")
    if not valid.all():
      pixels, scalars = pixels[valid], scalars[valid]
  b, k, sh, sw = pixels.shape
  nl = int(num_labels)
  if scalars.size and (scalars.min() < 0 or scalars.max() >= nl):
    raise ValueError(f"scalars hold labels outside [0, {nl}): min {scalars.min()}, "
                     f"max {scalars.max()}")
  scalars = scalars.astype(np.int64)
  if k == 0:
    counts = np.zeros((b, 0, nl), np.int64)
  else:
    with jax.enable_x64(True):
      if pixels.dtype.itemsize > 4 or pixels.dtype == np.uint32:  # int32 cast could wrap
        if pixels.size and (pixels.min() < 0 or pixels.max() >= nl):
          raise ValueError(f"pixels hold labels outside [0, {nl}): min {pixels.min()}, "
                           f"max {pixels.max()}")
      pix32 = np.asarray(pixels, np.int32)
      if pix32.size and pix32.view(np.uint32).max() >= nl:  # negative labels wrap around
        raise ValueError(f"pixels hold labels outside [0, {nl}): min {pixels.min()}, "
                         f"max {pixels.max()}")
      pj = jax.device_put(pix32, may_alias=True)
      counts = np.asarray(_label_histogram(pj, nl)).astype(np.int64)
  counts[:, :, 0] = 0
  tally_labels = counts.sum(axis=(0, 1))
  present = counts > 0
  per = present.sum(axis=2)  # (b, k) distinct labels per layer
  p = _pow2(int(per.max()) if per.size else 0)
  nb = p.bit_length()
  bi, ki, li = np.nonzero(present)
  rank = np.arange(bi.size) - (np.cumsum(per.reshape(-1)) - per.reshape(-1))[bi * k + ki]
  slots = np.full((b, k, p), -1, np.int32)
  slots[bi, ki, rank] = li
  ctype = np.uint8 if p < 255 else (np.uint16 if p < 65535 else np.uint32)
  if k == 0:
    code = np.zeros((b, 0, sh, sw), ctype)
    code_bits = np.zeros((b, 0, nb, sh, (sw + 63) // 64), np.uint64)
  else:
    lut = np.zeros(b * k * nl, ctype)
    lut[(bi * k + ki) * nl + li] = rank + 1
    with jax.enable_x64(True):
      code, code_bits = _label_codes(pj, lut, nb)
  sc = scalars[scalars != 0]
  tally_labels += np.bincount(sc, minlength=nl) * (sh * sw)
  return LabelBatch(code, code_bits, scalars, slots, tally_labels, nl)


@functools.partial(jax.jit, static_argnames=("num_labels",))
def _label_histogram(pixels, num_labels):
  """Label counts per (image, layer): (B, K, sh, sw) int32 in [0, L+1) -> (B, K, L+1) int32."""
  b, k, sh, sw = pixels.shape
  keys = pixels.reshape(b * k, sh * sw) + (jnp.arange(b * k, dtype=jnp.int32) * num_labels)[:,
                                                                                          None]
  counts = jnp.zeros(b * k * num_labels, jnp.int32).at[keys.reshape(-1)].add(1, mode="drop")
  return counts.reshape(b, k, num_labels)


@functools.partial(jax.jit, static_argnames=("nb",))
def _label_codes(pixels, lut, nb):
  """Slot codes and their row bit planes.

  Args:
    pixels: (B, K, sh, sw) int32.
    lut: (B * K * (L+1),) uint code (slot + 1, 0 = none) of each (image, layer, label).
    nb: static number of code bits.

  Returns:
    code (B, K, sh, sw) and code_bits (B, K, nb, sh, ceil(sw / 64)) uint64 (bit ``x % 64``
    of word ``x // 64`` is bit ``j`` of the code of pixel ``x``).
  """
  b, k, sh, sw = pixels.shape
  nl = lut.shape[0] // (b * k)
  keys = pixels.reshape(b * k, sh * sw) + (jnp.arange(b * k, dtype=jnp.int32) * nl)[:, None]
  code = lut[keys].reshape(b, k, sh, sw)
  rw = (sw + 63) // 64
  if code.dtype != jnp.uint8:
    bits = (code[:, :, None] >> jnp.arange(nb, dtype=code.dtype)[None, None, :, None, None]) & 1
    return code, _pack_bits(bits.astype(bool), rw)
  # uint8 codes: read 8 pixels as one uint64 and pack bit j of each byte with the multiply
  # trick of _pack_bits, without materialising per-bit arrays.
  padded = jnp.pad(code, ((0, 0), (0, 0), (0, 0), (0, rw * 64 - sw)))
  x = lax.bitcast_convert_type(padded.reshape(b, k, sh, rw * 8, 8), jnp.uint64)
  planes = []
  for j in range(nb):
    bj = ((x >> jnp.uint64(j)) & jnp.uint64(0x0101010101010101)) * jnp.uint64(
        0x0102040810204080) >> jnp.uint64(56)
    planes.append(lax.bitcast_convert_type(bj.astype(jnp.uint8).reshape(b, k, sh, rw, 8),
                                           jnp.uint64))
  return code, jnp.stack(planes, axis=2)


# ----------------------------------------------------------------------------- geometry
class _Geometry(NamedTuple):
  """Patch layout of one (h, w) -> (sh, sw) upsampling (host arrays).

  A patch mask is R x Cm pixels, stored with a row stride of ``cs`` bits (``cs`` = the
  power of two >= Cm, so no row straddles a 64-bit word): bit ``(r * cs + c) % 64`` of word
  ``(r * cs + c) // 64`` of the patch's ``words`` uint64 words.
  """
  ty: PatchTaps  # row groups
  tx: PatchTaps  # column groups, padded to cs positions
  cs: int  # row stride in bits
  words: int  # 64-bit words per patch
  row_index: np.ndarray  # (h+1, words, 64 // cs) int32, see _patch_code_planes
  x_word: np.ndarray  # (w+1,) int32
  x_shift: np.ndarray  # (w+1,) uint64
  x_keep: np.ndarray  # (w+1,) uint64


def _geometry(h: int, w: int, sh: int, sw: int) -> _Geometry:
  """Patch tables for ``(h, w) -> (sh, sw)``; pure and cheap (a few hundred Python steps)."""
  ty, tx = patch_taps(h, sh), patch_taps(w, sw)
  for t in (ty, tx):
    two = t.valid & (t.lo != t.hi)[:, None] & (t.w1 != 0.0)
    if np.any(t.off0[t.valid] != 0) or np.any(t.off1[two] != 1):
      raise AssertionError("unexpected Pillow tap order")
  r, cm = ty.out.shape[1], tx.out.shape[1]
  if cm > 64:
    raise ValueError(f"sparse tally needs patches at most 64 pixels wide; {w} -> {sw} gives "
                     f"{cm} (use method='dense')")
  cs = _pow2(cm)
  rpw = 64 // cs
  words = (r * cs + 63) // 64
  slot = np.arange(words * rpw).reshape(words, rpw)
  row_index = np.where(slot[None] < r, ty.out[:, np.minimum(slot, r - 1)], sh)
  row_index = np.where(ty.valid[:, np.minimum(slot, r - 1)] & (slot[None] < r), row_index, sh)
  ncol = tx.valid.sum(axis=1)
  x0 = np.where(ncol > 0, tx.out[:, 0], 0)
  keep = np.array([(1 << int(n)) - 1 for n in ncol], np.uint64)
  extra = cs - cm
  txp = tx
  if extra:
    pad = lambda x, v: np.pad(x, ((0, 0), (0, extra)), constant_values=v)  # noqa: E731
    txp = tx._replace(out=pad(tx.out, sw), valid=pad(tx.valid, False), off0=pad(tx.off0, 0),
                      off1=pad(tx.off1, 0), w0=pad(tx.w0, 0.0), w1=pad(tx.w1, 0.0))
  return _Geometry(ty, txp, cs, words, row_index.astype(np.int32), (x0 // 64).astype(np.int32),
                   (x0 % 64).astype(np.uint64), keep)


def _pack_bits(m: jax.Array, words: int) -> jax.Array:
  """m (..., Q) bool -> (..., words) uint64, bit q % 64 of word q // 64 = m[..., q].

  Eight 0/1 bytes read as one little-endian uint64 ``x`` pack into the byte
  ``(x * 0x0102040810204080) >> 56`` (each byte's bit lands on its own bit of the top byte,
  without carries; checked exhaustively in the tests); eight such bytes make a word.
  """
  q = m.shape[-1]
  m = jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, words * 64 - q)])
  x = lax.bitcast_convert_type(m.astype(jnp.uint8).reshape(m.shape[:-1] + (words, 8, 8)),
                               jnp.uint64)  # (..., words, 8)
  by = ((x * jnp.uint64(0x0102040810204080)) >> jnp.uint64(56)).astype(jnp.uint8)
  return lax.bitcast_convert_type(by, jnp.uint64)


@jax.jit
def _patch_code_planes(code_bits, row_index, x_word, x_shift, x_keep):
  """Regroups row-packed code bit planes into per-patch words (see :class:`_Geometry`).

  Args:
    code_bits: (B, K, nb, sh, RW) uint64 row bit planes.
    row_index: (h+1, W, rpw) int32 output row stored at slot ``j`` of word ``w`` of a
      patch of row group ``gy`` (``sh`` = padding, reads a zero row); ``rpw = 64 // cs``.
    x_word: (w+1,) int32 index of the row word holding the first column of each group.
    x_shift: (w+1,) uint64 bit offset of that column in its word.
    x_keep: (w+1,) uint64 mask of the group's columns after the shift.

  Returns:
    (B, h+1, w+1, K, nb, W) uint64.
  """
  b, k, nb, _, rw = code_bits.shape
  gy, n_words, rpw = row_index.shape
  cs = 64 // rpw
  pad = jnp.zeros((b, k, nb, 1, rw), jnp.uint64)
  rows = jnp.concatenate([code_bits, pad], axis=3)
  rows = jnp.concatenate([rows, jnp.zeros(rows.shape[:-1] + (1,), jnp.uint64)], axis=-1)
  # Column groups: the group's bits start at (x_word, x_shift) and may spill into the next
  # word. Extract them on the (few) rows first, then gather the patch rows.
  lo = jnp.take(rows, x_word, axis=-1)  # (B, K, nb, sh+1, gx)
  hi = jnp.take(rows, x_word + 1, axis=-1)
  spill = jnp.where(x_shift > 0, hi << ((jnp.uint64(64) - x_shift) % jnp.uint64(64)),
                    jnp.uint64(0))
  field = ((lo >> x_shift) | spill) & x_keep  # (B, K, nb, sh+1, gx)
  field = jnp.take(field, row_index.reshape(-1), axis=3).reshape(
      (b, k, nb, gy, n_words, rpw, x_word.shape[0]))
  shifts = (jnp.arange(rpw, dtype=jnp.uint64) * jnp.uint64(cs))[:, None]
  words = jnp.sum(field << shifts, axis=5, dtype=jnp.uint64)  # (B, K, nb, gy, W, gx)
  return words.transpose(0, 3, 5, 1, 2, 4)


@jax.jit
def _sparse_hpass(acts, ids, n_valid, ty_lo, ty_hi, tx_lo, tx_hi, tx_w0, tx_w1, zero):
  """Horizontal Pillow pass of the two source rows of each active patch.

  A separate call so that the result is materialised: fused into the vertical pass, XLA
  would recompute it for every output pixel (three float64 lerps per pixel instead of one).

  Args:
    acts: (B, h, w, U) float32.
    ids: (cap,) int32 patch ids ``((b * U + u) * (h+1) + gy) * (w+1) + gx``; rows
      >= n_valid are padding.
    n_valid: () int32.
    ty_lo, ty_hi, tx_lo, tx_hi, tx_w0, tx_w1: patch tap tables (see ``PatchTaps``), the
      column tables padded to the row stride ``cs``.
    zero: () int64 runtime zero.

  Returns:
    (hrow (cap, 2, cs) float32, tiny () bool): ``tiny`` flags source values too small for
    exact float32 results on XLA (see :func:`_tiny`).
  """
  _, h, w, u_n = acts.shape
  gx = ids % (w + 1)
  rest = ids // (w + 1)
  gy = rest % (h + 1)
  pair = rest // (h + 1)
  u = pair % u_n
  b = pair // u_n
  a = acts.reshape(-1)

  def src(y, x):
    return a[((b * h + y) * w + x) * u_n + u]

  ylo, yhi, xlo, xhi = ty_lo[gy], ty_hi[gy], tx_lo[gx], tx_hi[gx]
  blk = jnp.stack([jnp.stack([src(ylo, xlo), src(ylo, xhi)], -1),
                   jnp.stack([src(yhi, xlo), src(yhi, xhi)], -1)], 1)  # (cap, 2, 2)
  # Every tap table has off0 == 0 and off1 == 1 (checked in _geometry): the first tap reads
  # the pair's low member, the second the high one (the same value at the borders).
  hrow = lerp2_f32(blk[:, :, 0:1], blk[:, :, 1:2], tx_w0[gx][:, None, :],
                   tx_w1[gx][:, None, :], zero)
  ok = jnp.arange(ids.shape[0]) < n_valid
  # Inputs this small could make Pillow's intermediate results float32 subnormals, which
  # XLA flushes to zero; the caller refuses them. (Larger inputs cannot: a non-zero sum of
  # two float64 products is at least ~2**-52 of the smaller product.)
  return hrow, jnp.any(_tiny(blk) & ok[:, None, None])


def _sparse_counts_impl(hrow, thr32, ids, seg, n_valid, planes, ty_valid, ty_w0, ty_w1,
                        tx_valid, slot_bits, zero):
  """Vertical pass, mask, label-slot counts of active patches, summed per (image, unit).

  Args:
    hrow: (cap, 2, cs) float32 from :func:`_sparse_hpass`.
    thr32: (U,) float32 thresholds rounded down.
    ids: (cap,) int32 patch ids (see :func:`_sparse_hpass`), sorted.
    seg: (cap,) int32 non-decreasing pair index of each patch within this call.
    n_valid: () int32.
    planes: (B, h+1, w+1, K, nb, W) uint64 per-patch code bit planes.
    ty_valid, ty_w0, ty_w1, tx_valid: patch tap tables.
    slot_bits: (P, nb) bool, bit j of ``p + 1``.
    zero: () int64 runtime zero.

  Returns:
    (size (cap,) int32, counts (cap, K, P) int32), rows ``i`` for pair ``i`` of ``seg``.
  """
  b_n, gyn, gxn = planes.shape[:3]
  u_n = thr32.shape[0]
  cap = ids.shape[0]
  gx = ids % gxn
  rest = ids // gxn
  gy = rest % gyn
  pair = rest // gyn
  u = pair % u_n
  b = pair // u_n
  ok = jnp.arange(cap) < n_valid
  # Vertical pass: (cap, R, cs).
  up = lerp2_f32(hrow[:, 0:1, :], hrow[:, 1:2, :], ty_w0[gy][:, :, None],
                 ty_w1[gy][:, :, None], zero)
  inside = (up > thr32[u][:, None, None]) & ty_valid[gy][:, :, None]
  mask = inside & tx_valid[gx][:, None, :] & ok[:, None, None]
  mw = _pack_bits(mask.reshape(cap, -1), planes.shape[-1])  # (cap, W)
  size = jnp.sum(lax.population_count(mw), axis=-1, dtype=jnp.int32)
  cp = planes.reshape((b_n * gyn * gxn,) + planes.shape[3:])[(b * gyn + gy) * gxn + gx]
  # cp: (cap, K, nb, W)
  sel = jnp.where(slot_bits[None, None, :, :, None], cp[:, :, None], ~cp[:, :, None])
  slot_words = mw[:, None, None, :]
  for j in range(sel.shape[3]):
    slot_words = slot_words & sel[:, :, :, j]  # (cap, K, P, W)
  counts = jnp.sum(lax.population_count(slot_words), axis=-1, dtype=jnp.int32)
  size = jax.ops.segment_sum(size, seg, num_segments=cap, indices_are_sorted=True)
  counts = jax.ops.segment_sum(counts, seg, num_segments=cap, indices_are_sorted=True)
  return size, counts


_sparse_counts = jax.jit(_sparse_counts_impl)


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (``-0.0`` just below ``+0.0``), exact for
  subnormals, which XLA's float comparisons on CPU flush to zero."""
  b = lax.bitcast_convert_type(x, jnp.int32)
  return b ^ ((b >> 31) & 0x7FFFFFFF)


@jax.jit
def _active_patches(acts, thr32):
  """(B, h, w, U) -> (B, U, h+1, w+1) bool: max of the clamped 2x2 source block > thr.

  Thresholds first (on order-preserving integer bits, so subnormals compare exactly; ``thr32``
  must not be ``-0.0``), then ORs neighbours: the same test, much cheaper for XLA.
  """
  g = _ordered_bits(acts) > _ordered_bits(thr32)
  y = jnp.concatenate([g[:, :1], g[:, :-1] | g[:, 1:], g[:, -1:]], axis=1)
  x = jnp.concatenate([y[:, :, :1], y[:, :, :-1] | y[:, :, 1:], y[:, :, -1:]], axis=2)
  return x.transpose(0, 3, 1, 2)


def _subnormal_error() -> ValueError:
  return ValueError(
      "acts or thresholds hold tiny float32 values (0 < |x| < 2**-60) next to the threshold; "
      "XLA on CPU flushes float32 subnormals to zero, so the upsampled masks could differ "
      "from Pillow's. Flush such values to zero first "
      "(np.where(np.abs(a) < 2.0**-60, 0, a)) on both sides.")


def _tiny(x: jax.Array) -> jax.Array:
  """0 < |x| < 2**-60: values whose Pillow products or sums may be float32 subnormals."""
  mag = lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
  return (mag > 0) & (mag < 0x21800000)  # 0x21800000 = bits of 2**-60


#: The tally method ``'auto'`` takes on each JAX backend, from ``benchmarks/dissect_kernels.py``'s
#: sparse-vs-dense table (BENCHMARKS.md section 2; ``benchmarks/suite.py`` reruns it on an
#: accelerator and says when the other one was faster there). Backends not listed: dense.
AUTO_TALLY_METHOD = {"cpu": "sparse"}


def auto_method(backend: str) -> str:
  """``'sparse'`` or ``'dense'``: the tally ``method='auto'`` uses on ``backend``."""
  return AUTO_TALLY_METHOD.get(backend, "dense")


def _sparse_pair_counts(acts: np.ndarray, thr32: np.ndarray, lab: LabelBatch):
  """Active (image, unit) pairs with their mask sizes and per-slot label counts.

  Returns:
    pb (n,), pu (n,) int64 pair image/unit, size (n,) int64, counts (n, K, P) int64.
  """
  _, h, w, u_n = acts.shape
  sh, sw = lab.code.shape[2:]
  k, p = lab.slots.shape[1:]
  nb = lab.code_bits.shape[2]
  geo = _geometry(h, w, sh, sw)
  ty, tx = geo.ty, geo.tx
  acts_j = jax.device_put(acts, may_alias=True)  # zero-copy on CPU; only read below
  thr_j = jnp.asarray(thr32)
  if np.any((thr32 != 0) & (np.abs(thr32) < 2.0**-60)):
    raise _subnormal_error()
  flat = np.flatnonzero(np.asarray(_active_patches(acts_j, thr_j)))  # pair-major order
  n_act = flat.size
  if n_act == 0:
    e = np.zeros(0, np.int64)
    return e, e, e, np.zeros((0, k, p), np.int64)
  npatch = (h + 1) * (w + 1)
  pair = flat // npatch
  new = np.empty(n_act, bool)
  new[0] = True
  np.not_equal(pair[1:], pair[:-1], out=new[1:])
  starts = np.flatnonzero(new)
  rank = np.cumsum(new) - 1
  planes = _patch_code_planes(jax.device_put(lab.code_bits, may_alias=True), geo.row_index,
                              geo.x_word, geo.x_shift, geo.x_keep)
  r = ty.out.shape[1]
  slot_bits = ((np.arange(1, p + 1)[:, None] >> np.arange(nb)[None, :]) & 1).astype(bool)
  cap = max(_pow2(npatch), _pow2(_CHUNK_PIXELS // (r * geo.cs)))
  zero = jax.device_put(np.int64(0))
  hconsts = [jax.device_put(x) for x in (ty.lo, ty.hi, tx.lo, tx.hi, tx.w0, tx.w1)]
  vconsts = [jax.device_put(x) for x in (ty.valid, ty.w0, ty.w1, tx.valid, slot_bits)]
  ids32 = flat.astype(np.int32)
  pending = []
  s = 0
  while s < n_act:
    e = min(s + cap, n_act)
    if e < n_act:  # end the call at a pair boundary so that no pair is split
      e = int(starts[np.searchsorted(starts, e, side="right") - 1])
    n = e - s
    ids = np.zeros(cap, np.int32)
    ids[:n] = ids32[s:e]
    seg = np.full(cap, cap - 1, np.int32)
    seg[:n] = rank[s:e] - rank[s]
    n_pairs = int(rank[e - 1] - rank[s]) + 1
    # Dispatch is asynchronous: the host prepares the next call while this one runs.
    hrow, tiny = _sparse_hpass(acts_j, ids, np.int32(n), *hconsts, zero)
    pending.append((n_pairs, tiny, _sparse_counts(hrow, thr_j, ids, seg, np.int32(n), planes,
                                                  *vconsts, zero)))
    s = e
  pid = pair[starts]
  if any(bool(tiny) for _, tiny, _ in pending):
    raise _subnormal_error()
  size_p = np.concatenate([np.asarray(r[0])[:m] for m, _, r in pending]).astype(np.int64)
  cnt_p = np.concatenate([np.asarray(r[1])[:m] for m, _, r in pending]).astype(np.int64)
  return pid // u_n, pid % u_n, size_p, cnt_p


@jax.jit
def _dense_counts_impl(acts_bu, thr32, onehot, tx, ty, zero):
  """acts_bu (B, Uc, h, w), thr32 (Uc,), onehot (B, K*P, sh*sw) f32 -> size (B,Uc), counts.

  ``tx`` / ``ty``: Pillow tap tables (:class:`~nemjax.ops.resample.TapTable`) of the two axes,
  any number of taps (up- or downsampling); horizontal pass first, as Pillow. The mask sizes
  come out of the same product as the counts (an all-ones slot row): a second consumer of the
  mask made XLA:CPU recompute the resize per consumer (15x slower for 224 -> 112).
  """
  up = resample_f32(resample_f32(acts_bu, tx, 3, zero), ty, 2, zero)
  m = (up > thr32[None, :, None, None]).reshape(up.shape[0], up.shape[1], -1)
  rows = jnp.concatenate([jnp.ones_like(onehot[:, :1]), onehot], axis=1)
  counts = jnp.einsum("bus,bps->bup", m.astype(jnp.float32), rows,
                      precision=lax.Precision.HIGHEST).astype(jnp.int32)  # exact below 2**24
  return counts[..., 0], counts[..., 1:]


def _dense_pair_counts(acts: np.ndarray, thr32: np.ndarray, lab: LabelBatch,
                       unit_chunk: int = 64):
  """All (image, unit) pairs, every map resized to the label size (exact; for accelerators,
  and for maps larger than the label maps on any backend)."""
  b_n, h, w, u_n = acts.shape
  sh, sw = lab.code.shape[2:]
  k, p = lab.slots.shape[1:]
  tx, ty = tap_table(w, sw), tap_table(h, sh)
  flat_code = np.asarray(lab.code).reshape(b_n, k, 1, sh * sw)
  onehot = (flat_code == np.arange(1, p + 1)[None, None, :, None]).reshape(
      b_n, k * p, sh * sw).astype(np.float32)
  if np.any((acts != 0) & (np.abs(acts) < 2.0**-60)) or np.any(
      (thr32 != 0) & (np.abs(thr32) < 2.0**-60)):
    raise _subnormal_error()
  acts_bu = np.ascontiguousarray(acts.transpose(0, 3, 1, 2))
  per_unit = max(1, b_n * (h * sw + sh * sw))  # both passes' outputs per unit
  uc = max(1, min(unit_chunk, u_n, _DENSE_VALUES // per_unit))
  size = np.zeros((b_n, u_n), np.int64)
  cnt = np.zeros((b_n, u_n, k * p), np.int64)
  for s in range(0, u_n, uc):
    e = min(s + uc, u_n)
    chunk = np.zeros((b_n, uc, h, w), np.float32)
    chunk[:, :e - s] = acts_bu[:, s:e]
    thr = np.full(uc, np.inf, np.float32)
    thr[:e - s] = thr32[s:e]
    sz, ct = _dense_counts_impl(chunk, thr, onehot, tx, ty, np.int64(0))
    size[:, s:e] = np.asarray(sz)[:, :e - s]
    cnt[:, s:e] = np.asarray(ct)[:, :e - s]
  keep = size.reshape(-1) > 0
  pb, pu = np.divmod(np.flatnonzero(keep), u_n)
  return pb, pu, size.reshape(-1)[keep], cnt.reshape(b_n * u_n, k, p)[keep]


# ----------------------------------------------------------------------------- update
def _check_acts(acts, layout: str) -> np.ndarray:
  a = np.asarray(acts)
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if a.ndim == 2:
    a = a[:, None, None, :] if layout == "NHWC" else a[:, :, None, None]
  if a.ndim != 4:
    raise ValueError(f"acts must be (B, h, w, U) (NHWC), (B, U, h, w) (NCHW) or (B, U); "
                     f"got shape {np.shape(acts)}")
  if layout == "NCHW":
    a = a.transpose(0, 2, 3, 1)
  return np.ascontiguousarray(a, dtype=np.float32)


def tally_update(state: TallyState, acts, thresholds, pixels=None, scalars=None,
                 labelcat=None, valid=None, *, layout: str = "NHWC", method: str = "auto",
                 labels: LabelBatch | None = None) -> TallyState:
  """Adds one batch to the tally.

  Args:
    state: from :func:`tally_init` or a previous update.
    acts: (B, h, w, U) float32 (``layout='NHWC'``) or (B, U, h, w) (``'NCHW'``); (B, U) is
      treated as 1x1 maps.
    thresholds: (U,) float64.
    pixels: (B, K, sh, sw) int label layers (0 = unlabelled / padding layer).
    scalars: (B, S) int image-level labels (0 = padding).
    labelcat: (L+1, C) non-negative one-hot primary category of each label (row 0 unused).
    valid: optional (B,) bool; False rows (padding of a last batch) contribute nothing.
    layout: 'NHWC' or 'NCHW'.
    method: 'sparse' (active patches only), 'dense' (every map) or 'auto' (sparse on CPU,
      dense on accelerators). Both are exact. Maps larger than the label maps along an axis
      (downsampled, e.g. VGG16 ``conv1_*``) always take the dense path.
    labels: optional :func:`prepare_labels` result for this batch (then ``pixels``,
      ``scalars`` and ``valid`` are taken from it) to share the label work across layers.

  Returns:
    The new state (host int64 arrays).
  """
  u_n, nl = state.tally_both.shape
  n_cat = state.tally_units_cat.shape[1]
  a = _check_acts(acts, layout)
  if labelcat is None:
    raise ValueError("labelcat (L+1, C) is required")
  labelcat = np.asarray(labelcat, np.float64)
  if labelcat.shape != (nl, n_cat):
    raise ValueError(f"labelcat must be ({nl}, {n_cat}) for this state, got {labelcat.shape}")
  if np.any(labelcat < 0):
    raise ValueError("labelcat must be non-negative (a one-hot of primary categories)")
  thr = np.asarray(thresholds, np.float64)
  if thr.shape != (u_n,):
    raise ValueError(f"thresholds must be ({u_n},), got {thr.shape}")
  check_finite(thr, "thresholds")
  if a.shape[-1] != u_n:
    raise ValueError(f"acts {np.shape(acts)} ({layout}) has {a.shape[-1]} units, state has {u_n}")
  if labels is None:
    if pixels is None or scalars is None:
      raise ValueError("pass pixels and scalars, or labels=prepare_labels(...)")
    if np.ndim(pixels) != 4 or np.shape(pixels)[0] != a.shape[0]:
      raise ValueError(f"pixels must be (B={a.shape[0]}, K, sh, sw), got {np.shape(pixels)}")
    if np.ndim(scalars) != 2 or np.shape(scalars)[0] != a.shape[0]:
      raise ValueError(f"scalars must be (B={a.shape[0]}, S), got {np.shape(scalars)}")
    labels = prepare_labels(pixels, scalars, nl, valid)
  elif labels.num_labels != nl:
    raise ValueError(f"labels were prepared for {labels.num_labels} labels, state has {nl}")
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != (a.shape[0],):
      raise ValueError(f"valid must have shape ({a.shape[0]},), got {valid.shape}")
    if not valid.all():
      a = a[valid]
  check_finite(a, "acts (NHWC, valid rows)")
  if labels.code.shape[0] != a.shape[0]:
    raise ValueError(f"labels hold {labels.code.shape[0]} valid images, acts "
                     f"{a.shape[0]}")
  sh, sw = labels.code.shape[2:]
  h, w = a.shape[1:3]
  if method == "auto":
    method = auto_method(jax.default_backend())
  if method not in ("sparse", "dense"):
    raise ValueError(f"method must be 'auto', 'sparse' or 'dense', got {method!r}")
  if h > sh or w > sw:
    method = "dense"  # downsampling: more than two taps per output, no 2x2 patches

  both = state.tally_both.copy()
  units_cat = state.tally_units_cat.copy()
  units = state.tally_units.copy()
  tally_labels = state.tally_labels + labels.tally_labels
  if a.shape[0] == 0:
    return TallyState(both, tally_labels, units_cat, units)
  thr32 = floor_to_float32(thr)
  with jax.enable_x64(True):
    if method == "sparse":
      pb, pu, size, cnt = _sparse_pair_counts(a, thr32, labels)
    else:
      pb, pu, size, cnt = _dense_pair_counts(a, thr32, labels)
  _accumulate(both, units_cat, units, pb, pu, size, cnt, labels, labelcat)
  return TallyState(both, tally_labels, units_cat, units)


def _accumulate(both, units_cat, units, pb, pu, size, cnt, labels: LabelBatch,
                labelcat: np.ndarray) -> None:
  """Scatters per-pair sizes / slot counts into the int64 state arrays (in place).

  Args:
    both, units_cat, units: state arrays, updated in place.
    pb, pu: (n,) image / unit of each pair with a non-empty mask (others add nothing).
    size: (n,) int64 mask sizes.
    cnt: (n, K, P) int64 label counts of each slot inside the mask.
    labels: the batch's labels.
    labelcat: (L+1, C) float64.
  """
  nl = both.shape[1]
  if pb.size == 0:
    return
  np.add.at(units, pu, size)
  slots = labels.slots[pb].reshape(pb.size, -1)  # (n, K*P) global labels, -1 = empty
  cflat = cnt.reshape(pb.size, -1)
  hit = cflat > 0
  flat_both = both.reshape(-1)
  np.add.at(flat_both, (pu[:, None] * nl + slots)[hit], cflat[hit])
  scal = labels.scalars[pb]  # (n, S)
  has = scal != 0
  if has.any():
    np.add.at(flat_both, (pu[:, None] * nl + scal)[has],
              np.broadcast_to(size[:, None], scal.shape)[has])
  # tally_cat = (label counts in the mask) @ labelcat + image-level labels' rows. All terms
  # are >= 0, so tally_cat[c] > 0 iff some label in the mask (or of the image) has
  # labelcat[l, c] > 0: OR the labels' category bit masks instead of summing floats.
  n_cat = labelcat.shape[1]
  if n_cat <= 64:
    lab_bits = ((labelcat > 0).astype(np.uint64) << np.arange(n_cat, dtype=np.uint64)).sum(
        axis=1, dtype=np.uint64)  # (L+1,) category bit mask of each label
    bits = np.bitwise_or.reduce(np.where(hit, lab_bits[np.maximum(slots, 0)], 0), axis=1)
    bits |= np.bitwise_or.reduce(np.where(has, lab_bits[scal], 0), axis=1)
    present = ((bits[:, None] >> np.arange(n_cat, dtype=np.uint64)) & 1).astype(bool)
  else:
    cat = np.einsum("ns,nsc->nc", cflat.astype(np.float64),
                    labelcat[np.maximum(slots, 0)] * (slots >= 0)[..., None])
    cat += (labelcat[scal] * has[..., None]).sum(axis=1)
    present = cat > 0
  np.add.at(units_cat, pu, size[:, None] * present)


def tally_batches(batches, thresholds, labelcat, *, layout: str = "NHWC", method: str = "auto",
                  batch_size: int = 64) -> TallyState:
  """The whole tally of activations from any source, against given thresholds.

  Args:
    batches: an iterable of ``(acts, pixels, scalars)`` batches — acts ``(B, h, w, U)``
      (``layout='NHWC'``) or ``(B, U, h, w)`` (``'NCHW'``), pixels ``(B, K, sh, sw)``, scalars
      ``(B, S)`` — or one such triple of whole arrays (``(N, ...)``, NumPy arrays or memmaps),
      which is cut into ``batch_size`` rows at a time.
    thresholds: (U,) float64, e.g. another implementation's, to compare tallies exactly.
    labelcat: (L+1, C) primary category of each label.
    layout, method: as in :func:`tally_update`.
    batch_size: rows per update when whole arrays are given.

  Returns:
    The :class:`TallyState` of every batch (:func:`compute_iou` gives the IoU).
  """
  if isinstance(batches, tuple) and len(batches) == 3 and all(
      hasattr(x, "shape") for x in batches):
    whole = batches
    n = np.shape(whole[0])[0]
    if any(np.shape(x)[0] != n for x in whole):
      raise ValueError(f"acts, pixels and scalars must have the same number of rows, got "
                       f"{[np.shape(x) for x in whole]}")
    batches = (tuple(x[s:s + batch_size] for x in whole) for s in range(0, n, batch_size))
  labelcat = np.asarray(labelcat, np.float64)
  state = None
  for i, batch in enumerate(batches):
    if len(batch) != 3:
      raise ValueError(f"batch {i}: expected (acts, pixels, scalars), got {len(batch)} items")
    acts, pixels, scalars = batch
    if state is None:
      units = _check_acts(acts, layout).shape[-1]
      state = tally_init(units, labelcat.shape[0], labelcat.shape[1])
    state = tally_update(state, acts, thresholds, pixels, scalars, labelcat, layout=layout,
                         method=method)
  if state is None:
    raise ValueError("tally_batches: no batches")
  return state


def tally_merge(a: TallyState, b: TallyState) -> TallyState:
  """The tally of the images of ``a`` and ``b`` together (states of disjoint probe rows, e.g.
  two processes' shards): every count is a sum over images, so this is exact."""
  shapes = [(x.shape, y.shape) for x, y in zip(a, b) if x.shape != y.shape]
  if shapes:
    raise ValueError(f"tally states differ in shape: {shapes}")
  return TallyState(*(np.asarray(x, np.int64) + np.asarray(y, np.int64) for x, y in zip(a, b)))


def compute_iou(state: TallyState, labelcat) -> np.ndarray:
  """IoU (U, L+1) float64, in NetDissect-Lite's operation order."""
  labelcat = np.asarray(labelcat, np.float64)
  nl = state.tally_both.shape[1]
  if labelcat.shape != (nl, state.tally_units_cat.shape[1]):
    raise ValueError(f"labelcat must be ({nl}, {state.tally_units_cat.shape[1]}), got "
                     f"{labelcat.shape}")
  both = state.tally_both.astype(np.float64)
  units_cat = np.dot(state.tally_units_cat.astype(np.float64), labelcat.T)
  return both / (units_cat + state.tally_labels.astype(np.float64)[None, :] - both + 1e-10)


def best_labels(iou, primary_category, num_categories: int) -> BestLabels:
  """Best label per unit and category (first label index wins ties) and the best category.

  The best category is NetDissect-Lite's ``score.argsort(axis=0)[::-1][0]``: of several tied
  categories the *last* wins, which is what NumPy's sort (an insertion sort, so stable, for
  the ≤ 16 categories in use) gave the original. Newer NumPy builds with SIMD sorts may order
  such ties otherwise; the rule here is deterministic.

  Args:
    iou: (U, L+1) float64.
    primary_category: (L+1,) int primary category of each label.
    num_categories: C.
  """
  iou = np.asarray(iou, np.float64)
  prim = np.asarray(primary_category)
  if iou.ndim != 2 or prim.shape != (iou.shape[1],):
    raise ValueError(f"iou must be (U, L+1) and primary_category (L+1,); got {iou.shape}, "
                     f"{prim.shape}")
  c = np.arange(num_categories)
  pciou = iou[None, :, :] * (prim[None, None, :] == c[:, None, None])  # (C, U, L+1)
  label = pciou.argmax(axis=2)  # (C, U)
  score = np.take_along_axis(pciou, label[:, :, None], axis=2)[:, :, 0]
  best_cat = num_categories - 1 - score[::-1].argmax(axis=0)
  units = np.arange(iou.shape[0])
  return BestLabels(label.T.astype(np.int64), score.T, best_cat.astype(np.int64),
                    label[best_cat, units].astype(np.int64), score[best_cat, units])
