"""Exactness tests of nemjax.dissect kernels against Pillow, numpy.quantile and the oracle.

Everything is compared with ``np.array_equal`` (bit-exact), never with a tolerance.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from nemjax import dissect
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect import tally as tally_lib
from nemjax.dissect import topimages as topimages_lib
from nemjax.dissect import upsample as upsample_lib
from nemjax.ops import resample as resample_lib

sys.path.insert(0, os.path.dirname(__file__))
import oracle_netdissect as oracle  # noqa: E402

TALLY_FIELDS = ("tally_both", "tally_labels", "tally_units_cat", "tally_units")


# ----------------------------------------------------------------------------- data
def _acts(rng, n, h, w, u, negative=False):
  """ReLU-like activations with exact zeros, repeated values and special units."""
  a = rng.standard_normal((n, h, w, u)).astype(np.float32)
  a = a + np.linspace(-1, 1, h)[None, :, None, None].astype(np.float32)  # some structure
  if not negative:
    a = np.maximum(a, 0)
  a[..., ::3] = np.round(a[..., ::3] * 4) / 4  # many ties
  a[..., 0] = 0  # never active
  if u > 2:
    a[1:, :, :, 2] = 0  # active in one image only
  return a.astype(np.float32)


def _thresholds(a):
  """Per-unit thresholds: quantiles incl. values equal to activations, 0, and > max."""
  u = a.shape[-1]
  flat = a.reshape(-1, u).astype(np.float64)
  thr = np.quantile(flat, 0.9, axis=0, method="lower")  # equal to an activation value
  thr[1::4] = np.quantile(flat[:, 1::4], 0.8, axis=0)  # interpolated
  if u > 3:
    thr[3] = 0.0
  if u > 4:
    thr[4] = flat[:, 4].max() + 1.0  # never above threshold
  return thr


def _labels(rng, n, k, sh, sw, num_labels, s=3, blocks=8):
  """Blocky label layers (several labels per layer, all-zero and padding layers)."""
  coarse = rng.integers(0, num_labels, (n, k, (sh + blocks - 1) // blocks,
                                        (sw + blocks - 1) // blocks))
  pix = np.repeat(np.repeat(coarse, blocks, 2), blocks, 3)[:, :, :sh, :sw]
  noise = rng.random(pix.shape) < 0.05  # some pixel-level variation
  pix = np.where(noise, rng.integers(0, num_labels, pix.shape), pix).astype(np.int32)
  if k > 1:
    pix[:, -1] = 0  # padding layer
  if k > 2:
    pix[0, 1] = 0  # an all-zero layer of one image
    pix[1, 1] = pix[1, 0]  # same label at the same pixel in two layers
  scal = rng.integers(1, num_labels, (n, s)).astype(np.int32)
  scal[:, -1] = 0  # padding
  if s > 2:
    scal[0, 1] = scal[0, 0]  # duplicate image-level label
  return pix, scal


def _labelcat(rng, num_labels, c):
  primary = rng.integers(0, c, num_labels)
  return np.eye(c)[primary], primary


def _assert_tally_equal(ref: dict, st):
  for f in TALLY_FIELDS:
    got = getattr(st, f)
    assert got.dtype == np.int64, f
    assert np.array_equal(ref[f], got), f


# ----------------------------------------------------------------------------- resizing
SIZES = [(7, 7, 112, 112), (14, 14, 112, 112), (13, 13, 113, 113), (28, 28, 112, 112),
         (56, 56, 112, 112), (7, 13, 112, 113), (14, 7, 113, 112)]
# Layers larger than the label maps (VGG16 conv1_*: 224 -> 112), AlexNet-like sizes against 113,
# equal sizes (Pillow skips the pass), mixed and non-square. Pillow >= 13 runs the vertical pass
# first when h > sh and h - sh > 2 (w - sw) (never for square maps resized to a square);
# NetDissect-Lite's Pillow and nemjax always run the horizontal pass first, so no case here
# falls in that range.
RESIZE_SIZES = [(224, 224, 112, 112), (55, 55, 113, 113), (27, 27, 113, 113),
                (56, 56, 112, 112), (112, 112, 112, 112), (7, 7, 112, 112),
                (113, 113, 112, 112), (224, 200, 112, 113), (60, 120, 112, 112),
                (5, 300, 112, 7), (224, 224, 7, 9)]


def _pillow(m, sh, sw):
  return np.stack([np.asarray(Image.fromarray(x, "F").resize((sw, sh), Image.BILINEAR))
                   for x in m])


def _vertical_first_in_new_pillow(h, w, sh, sw):
  return sh < h and sw != w and h - sh > 2 * (w - sw)


@pytest.mark.parametrize("h,w,sh,sw", SIZES + RESIZE_SIZES)
def test_resize_bit_exact_vs_pillow(h, w, sh, sw):
  assert not _vertical_first_in_new_pillow(h, w, sh, sw)
  rng = np.random.default_rng(h * 1000 + w)
  m = _acts(rng, 1, h, w, 24, negative=True)[0].transpose(2, 0, 1)
  m[1] = np.maximum(m[1], 0)
  m[2] = rng.integers(0, 3, (h, w))  # ties
  m[3] = 0
  m[4] = (rng.random((h, w)) * 1e-30 + 1e-37).astype(np.float32)  # tiny (normal) values
  m[5] = (rng.random((h, w)) * 3e38).astype(np.float32)  # near float32 max
  ref = _pillow(m, sh, sw)
  got = np.asarray(dissect.resize_bilinear_pillow(m, (sh, sw)))
  assert got.dtype == np.float32 and got.shape == (24, sh, sw)
  assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
  orc = np.stack([oracle.pillow_resize(x, sh, sw) for x in m])
  assert np.array_equal(orc.view(np.uint32), ref.view(np.uint32))


def _numpy_pass(a, out_size):
  """One Pillow pass along the last axis from ops.resample's tap table, in NumPy float64."""
  taps = resample_lib.tap_table(a.shape[-1], out_size)
  s = np.zeros(a.shape[:-1] + (out_size,))
  for t in range(taps.idx.shape[1]):
    s = s + a[..., taps.idx[:, t]].astype(np.float64) * taps.w[:, t]
  return s.astype(np.float32)


def test_resample_coefficients_restate_pillow():
  """ops.resample's taps, applied in NumPy (horizontal pass first), give Pillow bit for bit;
  its dense matrix holds the same weights; downsampling has Pillow's wide filter."""
  rng = np.random.default_rng(4)
  for h, w, sh, sw in RESIZE_SIZES + [(1, 1, 5, 7), (3, 5, 200, 9), (41, 97, 29, 13)]:
    m = rng.standard_normal((2, h, w)).astype(np.float32)
    x = _numpy_pass(m, sw) if sw != w else m
    x = np.swapaxes(_numpy_pass(np.swapaxes(x, 1, 2), sh), 1, 2) if sh != h else x
    assert np.array_equal(x, _pillow(m, sh, sw)), (h, w, sh, sw)
    for i, o in ((h, sh), (w, sw)):
      bounds, kk = resample_lib.pillow_coeffs(i, o)
      taps = resample_lib.tap_table(i, o)
      r = resample_lib.resample_matrix(i, o)
      dense = np.zeros((o, i))
      np.add.at(dense, (np.arange(o)[:, None], taps.idx), taps.w)
      assert np.array_equal(r, dense) and r.dtype == np.float64
      np.testing.assert_allclose(r.sum(1), 1.0, rtol=0, atol=1e-14)
      assert taps.idx.shape[1] == bounds[:, 1].max()
  bounds, kk = resample_lib.pillow_coeffs(224, 112)  # filterscale 2: 4 taps, 1:3:3:1
  assert bounds[1:-1, 1].tolist() == [4] * 110 and kk.shape == (112, 5)
  assert np.array_equal(kk[5, :4], [0.125, 0.375, 0.375, 0.125])
  assert np.array_equal(dissect.pillow_coeffs(7, 112)[1], resample_lib.pillow_coeffs(7, 112)[1])
  with pytest.raises(ValueError, match="in_size"):
    resample_lib.tap_table(0, 5)
  with pytest.raises(ValueError, match="out_size"):
    resample_lib.resample_matrix(5, 2.5)


def test_resize_leading_dims_and_errors():
  m = np.random.default_rng(0).random((2, 3, 7, 7), dtype=np.float32)
  out = np.asarray(dissect.upsample_bilinear_pillow(m, (112, 112)))
  assert out.shape == (2, 3, 112, 112)
  assert np.array_equal(out[1, 2], _pillow(m[1, 2:3], 112, 112)[0])
  down = np.asarray(dissect.resize_bilinear_pillow(m, (5, 3)))
  assert down.shape == (2, 3, 5, 3)
  assert np.array_equal(down[0, 1], _pillow(m[0, 1:2], 5, 3)[0])
  with pytest.raises(ValueError, match="out_size"):
    dissect.resize_bilinear_pillow(m, (112,))
  with pytest.raises(ValueError, match="positive"):
    dissect.resize_bilinear_pillow(m, (0, 112))


def test_products_are_not_contracted_to_fma():
  # a*a + c with one rounding (FMA) gives 2**-60; Pillow's two roundings give 0.
  with jax.enable_x64(True):
    a = np.full(8, 1 + 2.0**-30)
    c = np.full(8, -(1 + 2.0**-29))
    f = jax.jit(lambda a, c, z: upsample_lib.no_contract(a * a, z) + upsample_lib.no_contract(
        c * 1.0, z))
    assert np.all(np.asarray(f(a, c, np.int64(0))) == 0.0)


def test_pack_bits_matches_numpy():
  rng = np.random.default_rng(0)
  m = rng.random((5, 3, 150)) < 0.5
  m[0, 0] = True
  m[0, 1] = False
  with jax.enable_x64(True):
    got = np.asarray(tally_lib._pack_bits(m, 3))
  ref = np.zeros((5, 3, 24), np.uint8)
  ref[..., :19] = np.packbits(m, axis=-1, bitorder="little")
  assert np.array_equal(got, ref.view("<u8"))
  for v in range(256):  # the multiply trick, exhaustively
    x = sum(((v >> i) & 1) << (8 * i) for i in range(8))
    assert (x * 0x0102040810204080) % (1 << 64) >> 56 == v


def test_bilinear_value_never_exceeds_its_block():
  """The property the sparse tally relies on, checked on adversarial values."""
  rng = np.random.default_rng(3)
  for h, w, sh, sw in SIZES[:5]:
    m = rng.standard_normal((20, h, w)).astype(np.float32)
    m[::2] = np.nextafter(m[::2], np.float32(np.inf))  # near-ties
    up = np.asarray(dissect.upsample_bilinear_pillow(m, (sh, sw)))
    ty, tx = upsample_lib.patch_taps(h, sh), upsample_lib.patch_taps(w, sw)
    p = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="edge")
    bmax = np.maximum(np.maximum(p[:, :-1, :-1], p[:, :-1, 1:]),
                      np.maximum(p[:, 1:, :-1], p[:, 1:, 1:]))  # (n, h+1, w+1)
    gy = np.zeros(sh, int)
    gx = np.zeros(sw, int)
    gy[ty.out[ty.valid]] = np.nonzero(ty.valid)[0]
    gx[tx.out[tx.valid]] = np.nonzero(tx.valid)[0]
    assert np.all(up <= bmax[:, gy[:, None], gx[None, :]])


# ----------------------------------------------------------------------------- thresholds
def test_floor_to_float32_equivalence():
  rng = np.random.default_rng(0)
  t = np.concatenate([rng.standard_normal(2000), rng.standard_normal(200).astype(np.float32),
                      [0.0, -0.0, 1e-46, -1e-46, 1e300, -1e300, np.inf, -np.inf]])
  with np.errstate(over="ignore"):
    t32 = t.astype(np.float32)
  v = np.concatenate([rng.standard_normal(3000).astype(np.float32), t32,
                      np.nextafter(t32, np.float32(9))])
  f = dissect.floor_to_float32(t)
  assert f.dtype == np.float32
  assert np.array_equal(v[:, None] > t[None, :], v[:, None] > f[None, :])


@pytest.mark.parametrize("impl", ["host", "device"])
def test_thresholds_equal_numpy_quantile_streaming(impl):
  rng = np.random.default_rng(1)
  for trial in range(6):
    n = int(rng.integers(3, 30))
    h = int(rng.integers(1, 6))
    u = int(rng.integers(1, 5))
    a = _acts(rng, n, h, h, u, negative=trial % 2 == 1)
    per_unit = a.transpose(3, 0, 1, 2).reshape(u, -1).astype(np.float64)
    batch = int(rng.integers(1, n + 1))
    for q in (0.995, dissect.NETDISSECT_LITE_Q, 0.5, 0.0, 1.0, float(rng.random())):
      st = dissect.threshold_init(u, n * h * h, q)
      for s in range(0, n, batch):
        st = dissect.threshold_update(st, a[s:s + batch], impl=impl)
      for method in dissect.QUANTILE_METHODS:
        ref = np.quantile(per_unit, q, axis=1, method=method)
        got = dissect.threshold_finalize(st, method)
        assert got.dtype == np.float64
        assert np.array_equal(ref, got), (trial, q, method)


def test_thresholds_large_streaming_layer_like():
  """ResNet-like sizes: batches of 64, k ~ 0.5 % of n, several methods."""
  rng = np.random.default_rng(2)
  a = np.maximum(rng.standard_normal((200, 14, 14, 32)), 0).astype(np.float32)
  st = dissect.threshold_init(32, 200 * 196)
  assert st.top.shape[1] == dissect.required_top_k(200 * 196, dissect.DEFAULT_Q)
  assert st.top.shape[1] < 200 * 196 * 0.006
  for s in range(0, 200, 64):
    st = dissect.threshold_update(st, a[s:s + 64])
  per_unit = a.reshape(-1, 32).astype(np.float64)
  for method in ("linear", "hazen", "lower", "higher", "nearest", "midpoint"):
    assert np.array_equal(np.quantile(per_unit, 0.995, axis=0, method=method),
                          dissect.threshold_finalize(st, method))
  assert np.array_equal(np.quantile(per_unit, dissect.NETDISSECT_LITE_Q, axis=0,
                                    method="hazen"),
                        dissect.quantile_thresholds(a, dissect.NETDISSECT_LITE_Q, "hazen"))


def test_thresholds_layouts_valid_and_one_shot():
  rng = np.random.default_rng(4)
  a = _acts(rng, 10, 5, 5, 6)
  valid = np.ones(12, bool)
  valid[10:] = False
  padded = np.concatenate([a, np.full((2, 5, 5, 6), 1e9, np.float32)])
  ref = np.quantile(a.reshape(-1, 6).astype(np.float64), 0.9, axis=0)
  st = dissect.threshold_init(6, 250, 0.9)
  st = dissect.threshold_update(st, padded[:7], valid=valid[:7])
  st = dissect.threshold_update(st, padded[7:].transpose(0, 3, 1, 2), valid=valid[7:],
                                layout="NCHW")
  assert np.array_equal(dissect.threshold_finalize(st), ref)
  assert np.array_equal(dissect.quantile_thresholds(a, 0.9), ref)
  assert np.array_equal(dissect.quantile_thresholds(a.transpose(0, 3, 1, 2), 0.9,
                                                    layout="NCHW"), ref)
  assert np.array_equal(dissect.quantile_thresholds(padded, 0.9, valid=valid), ref)
  flat = a.reshape(-1, 6)[:40]  # (N, U) activations, e.g. after global pooling
  assert np.array_equal(dissect.quantile_thresholds(flat, 0.9),
                        np.quantile(flat.astype(np.float64), 0.9, axis=0))


def test_threshold_errors():
  st = dissect.threshold_init(4, 100)
  with pytest.raises(ValueError, match="units"):
    dissect.threshold_update(st, np.zeros((2, 5, 5, 3), np.float32))
  with pytest.raises(ValueError, match="acts"):
    dissect.threshold_update(st, np.zeros((2, 5, 4), np.float32))
  with pytest.raises(ValueError, match="valid"):
    dissect.threshold_update(st, np.zeros((2, 5, 5, 4), np.float32), valid=np.ones(3, bool))
  with pytest.raises(ValueError, match="total_count"):
    dissect.threshold_update(st, np.zeros((5, 5, 5, 4), np.float32))
  st = dissect.threshold_update(st, np.zeros((2, 5, 5, 4), np.float32))
  with pytest.raises(ValueError, match="expected total_count"):
    dissect.threshold_finalize(st)
  with pytest.raises(ValueError, match="method"):
    dissect.threshold_finalize(st._replace(count=100), "bogus")
  with pytest.raises(ValueError, match="k="):
    dissect.threshold_init(4, 1000, 0.995, k=2)
  with pytest.raises(ValueError, match="needs the"):
    dissect.threshold_finalize(st._replace(count=100), q=0.5)


# ----------------------------------------------------------------------------- tally
TALLY_CASES = [  # (n, h, w, u, k, sh, sw)
    (5, 7, 7, 6, 3, 112, 112),
    (4, 14, 14, 6, 3, 112, 112),
    (4, 13, 13, 5, 3, 113, 113),
    (3, 28, 28, 5, 2, 112, 112),
    (3, 7, 13, 5, 3, 112, 113),
    (2, 56, 56, 4, 2, 112, 112),
    # Maps at least as large as the label maps: downsampled (dense path for both methods).
    (2, 224, 224, 5, 2, 112, 112),
    (3, 113, 113, 5, 3, 112, 112),
    (3, 60, 120, 5, 2, 112, 112),
    (3, 112, 112, 5, 2, 112, 112),
]


def _case(seed, n, h, w, u, k, sh, sw, num_labels=24, c=4, negative=False):
  rng = np.random.default_rng(seed)
  a = _acts(rng, n, h, w, u, negative=negative)
  pix, scal = _labels(rng, n, k, sh, sw, num_labels)
  labelcat, primary = _labelcat(rng, num_labels, c)
  return a, _thresholds(a), pix, scal, labelcat, primary


@pytest.mark.parametrize("case", TALLY_CASES)
def test_tally_iou_labels_equal_oracle(case):
  n, u = case[0], case[3]
  a, thr, pix, scal, labelcat, primary = _case(sum(case), *case)
  valid = np.ones(n, bool)
  valid[1] = False  # a padding row in the middle must contribute nothing
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat, valid)
  assert ref["tally_units"].sum() > 0
  for method in ("sparse", "dense"):
    st = dissect.tally_init(u, labelcat.shape[0], labelcat.shape[1])
    st = dissect.tally_update(st, a, thr, pix, scal, labelcat, valid=valid, method=method)
    _assert_tally_equal(ref, st)
  iou_ref = oracle.iou(ref, labelcat)
  iou = dissect.compute_iou(st, labelcat)
  assert np.array_equal(iou_ref, iou)
  bref = oracle.best_labels(iou_ref, primary, labelcat.shape[1])
  best = dissect.best_labels(iou, primary, labelcat.shape[1])
  assert np.array_equal(bref["label"], best.label)
  assert np.array_equal(bref["score"], best.score)
  assert np.array_equal(bref["best_category"], best.best_category)
  assert np.array_equal(bref["best_label"], best.best_label)
  assert np.array_equal(bref["best_score"], best.best_score)


def test_tally_negative_activations_nchw_and_no_label_layers():
  n, h, w, u, k, sh, sw = 4, 14, 14, 5, 2, 112, 112
  a, _, pix, scal, labelcat, _ = _case(7, n, h, w, u, k, sh, sw, negative=True)
  thr = np.quantile(a.reshape(-1, u).astype(np.float64), 0.7, axis=0)
  thr[2] = -0.25  # negative threshold
  for p in (pix, pix[:, :0]):  # with label layers, and with K == 0 (image-level only)
    ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, p, scal, labelcat)
    st = dissect.tally_init(u, labelcat.shape[0], labelcat.shape[1])
    st = dissect.tally_update(st, a.transpose(0, 3, 1, 2), thr, p, scal, labelcat,
                              layout="NCHW")
    _assert_tally_equal(ref, st)


def test_tally_labelcat_with_several_categories_per_label():
  """Non-negative labelcat rows with more than one category (tally_cat sums them)."""
  n, h, w, u, k, sh, sw = 3, 7, 7, 4, 2, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(21, n, h, w, u, k, sh, sw)
  labelcat = labelcat.copy()
  labelcat[1::3, 0] = 0.5  # a second category for every third label
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat)
  st = dissect.tally_update(dissect.tally_init(u, *labelcat.shape), a, thr, pix, scal,
                            labelcat)
  _assert_tally_equal(ref, st)
  assert np.array_equal(oracle.iou(ref, labelcat), dissect.compute_iou(st, labelcat))


def test_tally_batch_split_invariance_and_shared_labels():
  n, h, w, u, k, sh, sw = 9, 14, 14, 6, 3, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(11, n, h, w, u, k, sh, sw)
  nl, c = labelcat.shape
  one = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat)
  three = dissect.tally_init(u, nl, c)
  for s in (0, 4, 6):
    e = {0: 4, 4: 6, 6: 9}[s]
    labels = dissect.prepare_labels(pix[s:e], scal[s:e], nl)
    three = dissect.tally_update(three, a[s:e], thr, labelcat=labelcat, labels=labels)
  for f in TALLY_FIELDS:
    assert np.array_equal(getattr(one, f), getattr(three, f)), f


def test_tally_batches_from_arrays_or_an_iterator_in_either_layout():
  n, h, w, u, k, sh, sw = 9, 14, 14, 6, 3, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(12, n, h, w, u, k, sh, sw)
  nl, c = labelcat.shape
  ref = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat)
  nchw = np.ascontiguousarray(np.moveaxis(a, 3, 1))
  gen = ((nchw[s:s + 4], pix[s:s + 4], scal[s:s + 4]) for s in range(0, n, 4))
  for got in (dissect.tally_batches((a, pix, scal), thr, labelcat, batch_size=2),
              dissect.tally_batches(gen, thr, labelcat, layout="NCHW")):
    for f in TALLY_FIELDS:
      assert np.array_equal(getattr(ref, f), getattr(got, f)), f
  with pytest.raises(ValueError, match="no batches"):
    dissect.tally_batches(iter(()), thr, labelcat)
  with pytest.raises(ValueError, match="same number of rows"):
    dissect.tally_batches((a, pix[:3], scal), thr, labelcat)


def test_tally_sparse_call_splitting(monkeypatch):
  """Many sparse calls (pairs never split across calls) give the same counts."""
  n, h, w, u, k, sh, sw = 6, 14, 14, 8, 2, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(5, n, h, w, u, k, sh, sw)
  nl, c = labelcat.shape
  ref = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat,
                             method="dense")
  monkeypatch.setattr(tally_lib, "_CHUNK_PIXELS", 64 * 8)
  got = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat,
                             method="sparse")
  for f in TALLY_FIELDS:
    assert np.array_equal(getattr(ref, f), getattr(got, f)), f


def test_tally_auto_method_by_backend(monkeypatch):
  """'auto' takes the measured per-backend choice (AUTO_TALLY_METHOD: sparse on CPU, dense on
  backends not listed); every choice gives the same counts."""
  assert tally_lib.auto_method("cpu") == "sparse"
  assert tally_lib.auto_method("gpu") == tally_lib.auto_method("tpu") == "dense"
  n, h, w, u, k, sh, sw = 4, 7, 7, 5, 2, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(6, n, h, w, u, k, sh, sw)
  nl, c = labelcat.shape
  ref = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat,
                             method="sparse")
  picked = []
  monkeypatch.setattr(tally_lib, "auto_method", lambda b: picked.append(b) or "dense")
  got = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat)
  assert picked == ["cpu"]
  for f in TALLY_FIELDS:
    assert np.array_equal(getattr(ref, f), getattr(got, f)), f


def test_tally_downsampled_layer_dense_route_and_unit_chunks(monkeypatch):
  """A layer larger than the label maps: 'sparse' routes to the dense path, whose unit chunks
  shrink to its value budget (here one unit per call) without changing a count."""
  n, h, w, u, k, sh, sw = 2, 224, 224, 3, 2, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(9, n, h, w, u, k, sh, sw)
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat)
  assert ref["tally_units"].sum() > 0

  def no_sparse(*args, **kwargs):
    raise AssertionError("maps larger than the label maps must take the dense path")

  monkeypatch.setattr(tally_lib, "_sparse_pair_counts", no_sparse)
  monkeypatch.setattr(tally_lib, "_DENSE_VALUES", 1)
  st = dissect.tally_update(dissect.tally_init(u, *labelcat.shape), a, thr, pix, scal,
                            labelcat, method="sparse")
  _assert_tally_equal(ref, st)


def test_tally_many_labels_per_layer():
  """P > 4 slots per layer (several code bit planes) and label numbers > 255."""
  n, h, w, u, k, sh, sw = 3, 7, 7, 4, 2, 112, 112
  rng = np.random.default_rng(8)
  a = _acts(rng, n, h, w, u)
  thr = _thresholds(a)
  pix = rng.integers(0, 600, (n, k, sh, sw)).astype(np.int32)
  pix[:, :, :, 50:] = pix[:, :, :, 50:] % 3  # mix of noise and few labels
  scal = rng.integers(0, 600, (n, 2)).astype(np.int32)
  labelcat, _ = _labelcat(rng, 600, 3)
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat)
  labels = dissect.prepare_labels(pix, scal, 600)
  assert labels.slots.shape[-1] >= 256 and labels.code.dtype == np.uint16
  for method in ("sparse", "dense"):
    st = dissect.tally_update(dissect.tally_init(u, 600, 3), a, thr, labelcat=labelcat,
                              labels=labels, method=method)
    _assert_tally_equal(ref, st)


def test_tally_no_recompile_on_same_shapes():
  n, h, w, u, k, sh, sw = 4, 14, 14, 6, 2, 112, 112
  a, thr, pix, scal, labelcat, _ = _case(3, n, h, w, u, k, sh, sw)
  nl, c = labelcat.shape
  fns = (tally_lib._sparse_counts, tally_lib._sparse_hpass, tally_lib._active_patches, tally_lib._patch_code_planes,
         tally_lib._label_histogram, tally_lib._label_codes)
  st = dissect.tally_update(dissect.tally_init(u, nl, c), a, thr, pix, scal, labelcat)
  before = [f._cache_size() for f in fns]
  rng = np.random.default_rng(0)
  a2 = a * np.float32(1.0 + 0.01 * rng.random())  # other values, same shapes
  dissect.tally_update(st, a2, thr, pix, scal, labelcat)
  assert [f._cache_size() for f in fns] == before
  st = dissect.threshold_init(u, 2 * n * h * w)
  dissect.threshold_update(st, a, impl="device")
  size = quantile_lib._merge_device._cache_size()
  dissect.threshold_update(st, a2, impl="device")
  assert quantile_lib._merge_device._cache_size() == size


def test_tally_tiny_values():
  """Subnormal-range values: exact where they cannot matter, refused where XLA would differ."""
  a, thr, pix, scal, labelcat, _ = _case(1, 2, 7, 7, 5, 2, 112, 112)
  a[0, 0, 0, 4] = 1e-40  # unit 4 has a threshold above its max: this block is inactive
  a[1, 3, 3, 0] = 1e-39  # unit 0 is all zeros, threshold 0: active only through this value
  thr[0] = 0.0
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat)
  assert ref["tally_units"][0] > 0  # Pillow keeps the subnormal values > 0
  for method in ("sparse", "dense"):
    with pytest.raises(ValueError, match="tiny"):
      dissect.tally_update(dissect.tally_init(5, *labelcat.shape), a, thr, pix, scal, labelcat,
                           method=method)
  a[1, 3, 3, 0] = 0.0
  ref = oracle.tally(a.transpose(0, 3, 1, 2), thr, pix, scal, labelcat)
  st = dissect.tally_update(dissect.tally_init(5, *labelcat.shape), a, thr, pix, scal,
                            labelcat, method="sparse")
  _assert_tally_equal(ref, st)


def test_tally_errors_name_the_argument():
  a, thr, pix, scal, labelcat, _ = _case(1, 2, 7, 7, 3, 2, 112, 112)
  nl, c = labelcat.shape
  st = dissect.tally_init(3, nl, c)
  with pytest.raises(ValueError, match="thresholds"):
    dissect.tally_update(st, a, thr[:2], pix, scal, labelcat)
  with pytest.raises(ValueError, match="acts"):
    dissect.tally_update(st, a[..., :2], thr, pix, scal, labelcat)
  with pytest.raises(ValueError, match="pixels"):
    dissect.tally_update(st, a, thr, pix[:1], scal, labelcat)
  with pytest.raises(ValueError, match="scalars"):
    dissect.tally_update(st, a, thr, pix, scal[:, 0], labelcat)
  with pytest.raises(ValueError, match="labelcat"):
    dissect.tally_update(st, a, thr, pix, scal, labelcat[:-1])
  with pytest.raises(ValueError, match="valid"):
    dissect.tally_update(st, a, thr, pix, scal, labelcat, valid=np.ones(3, bool))
  with pytest.raises(ValueError, match="pixels hold labels"):
    dissect.tally_update(st, a, thr, pix + nl, scal, labelcat)
  with pytest.raises(ValueError, match="layout"):
    dissect.tally_update(st, a, thr, pix, scal, labelcat, layout="HWCN")
  with pytest.raises(ValueError, match="method"):
    dissect.tally_update(st, a, thr, pix, scal, labelcat, method="fast")
  with pytest.raises(ValueError, match="primary_category"):
    dissect.best_labels(np.zeros((3, nl)), np.zeros(nl - 1, int), c)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(bad):
  a, thr, pix, scal, labelcat, _ = _case(2, 3, 7, 7, 4, 2, 112, 112)
  nl, c = labelcat.shape
  a_bad = a.copy()
  a_bad[1, 2, 3, 1] = bad
  st = dissect.threshold_init(4, 3 * 49)
  with pytest.raises(ValueError, match=r"acts .* must be finite.*index \(1, 2, 3, 1\)"):
    dissect.threshold_update(st, a_bad)
  with pytest.raises(ValueError, match="must be finite"):
    dissect.threshold_update(st, a_bad.transpose(0, 3, 1, 2), layout="NCHW", impl="device")
  with pytest.raises(ValueError, match="must be finite"):
    dissect.quantile_thresholds(a_bad)
  valid = np.array([True, False, True])  # a bad value in a padding row is ignored
  st = dissect.threshold_update(st, a_bad, valid=valid)
  assert st.count == 2 * 49
  t = dissect.tally_init(4, nl, c)
  for method in ("sparse", "dense"):
    with pytest.raises(ValueError, match=r"acts .* must be finite"):
      dissect.tally_update(t, a_bad, thr, pix, scal, labelcat, method=method)
    thr_bad = thr.copy()
    thr_bad[2] = bad
    with pytest.raises(ValueError, match="thresholds must be finite"):
      dissect.tally_update(t, a, thr_bad, pix, scal, labelcat, method=method)
  ref = dissect.tally_update(t, a[[0, 2]], thr, pix[[0, 2]], scal[[0, 2]], labelcat)
  got = dissect.tally_update(t, a_bad, thr, pix, scal, labelcat, valid=valid)
  for f in TALLY_FIELDS:
    assert np.array_equal(getattr(ref, f), getattr(got, f)), f
  with pytest.raises(ValueError, match="finite"):
    topimages_lib.top_images_update(topimages_lib.top_images_init(4, 2, (7, 7)), a_bad,
                                    np.arange(3))


def test_top_images_streaming_equals_stable_argsort():
  rng = np.random.default_rng(5)
  a = np.round(np.maximum(rng.standard_normal((23, 3, 4, 6)), 0) * 2).astype(np.float32) / 2
  a[:, :, :, 0] = 0  # all tied: the lowest rows win
  a[4, 0, 0, 1] = -0.0
  peak = a.max(axis=(1, 2))
  for k in (1, 3, 30):
    st = topimages_lib.top_images_init(6, k, (3, 4))
    order = rng.permutation(23)  # rows arrive in any order, in uneven batches
    for s, e in ((0, 5), (5, 6), (6, 17), (17, 23)):
      valid = np.ones(e - s, bool)
      valid[0] = s != 6  # row order[6] comes later in a batch of its own
      st = topimages_lib.top_images_update(st, a[order[s:e]], order[s:e], valid=valid)
    st = topimages_lib.top_images_update(st, a[order[6:7]], order[6:7])
    for u in range(6):
      want = np.argsort(-peak[:, u], kind="stable")[:k]
      n = len(want)
      assert np.array_equal(st.row[u, :n], want), (k, u)
      assert np.all(st.row[u, n:] == -1) and np.all(st.value[u, n:] == -np.inf)
      assert np.array_equal(st.value[u, :n], peak[want, u])
      assert np.array_equal(st.maps[u, :n], a[want, :, :, u])
    one = topimages_lib.top_images_from_acts(a, k)
    for f in ("value", "row", "maps"):
      assert np.array_equal(getattr(one, f), getattr(st, f)), f
  with pytest.raises(ValueError, match="acts must be"):
    topimages_lib.top_images_update(st, a[..., :5], np.arange(23))
  with pytest.raises(ValueError, match="rows"):
    topimages_lib.top_images_update(st, a, np.arange(22))
