"""Plain NumPy oracle of NetDissect-Lite's thresholds, tally, IoU and best labels.

Written from ``/work/shared/spec/netdissect.md`` and NetDissect-Lite's
``FeatureOperator.tally_job`` / ``FeatureOperator.tally``: a per-image, per-unit Python loop,
each map resized to the label size by Pillow itself (BILINEAR on a float32 'F' image, up- or
downsampling, as the original), and the same NumPy calls as the original (``np.bincount`` over
the label layers under the mask, ``tally_cat`` through ``labelcat``). It shares no code with
``nemjax.dissect``. Slow on purpose-free grounds: it is the reference, not the fast path.

Only deviation from the original, as the spec asks: an image with no label-PNG layer uses
``tally_cat`` = its image-level part only (the original reuses a stale value).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------- resizing
def pillow_resize(fmap: np.ndarray, sh: int, sw: int) -> np.ndarray:
  """``Image.fromarray(fmap, 'F').resize((sw, sh), BILINEAR)``: (h, w) -> (sh, sw) float32.

  Pillow itself, as NetDissect-Lite calls it (``imresize(..., mode='F')``), in either
  direction (up- or downsampling).
  """
  img = Image.fromarray(np.ascontiguousarray(fmap, np.float32))  # float32 -> mode 'F'
  return np.asarray(img.resize((int(sw), int(sh)), Image.BILINEAR), np.float32)


# ----------------------------------------------------------------------------- thresholds
def thresholds(acts_nuhw: np.ndarray, q: float, method: str = "linear") -> np.ndarray:
  """Exact per-unit quantile: acts (N, U, h, w) -> (U,) float64."""
  a = np.asarray(acts_nuhw, np.float64)
  per_unit = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
  return np.quantile(per_unit, q, axis=1, method=method)


# ----------------------------------------------------------------------------- tally
def tally(acts_nuhw: np.ndarray, threshold: np.ndarray, pixels: np.ndarray,
          scalars: np.ndarray, labelcat: np.ndarray, valid: np.ndarray | None = None) -> dict:
  """NetDissect-Lite ``tally_job`` over images.

  Args:
    acts_nuhw: (N, U, h, w) float32 activations.
    threshold: (U,) float64.
    pixels: (N, K, sh, sw) int label layers (0 = unlabelled; an all-zero layer is harmless).
    scalars: (N, S) int image-level labels (0 = padding).
    labelcat: (L+1, C) one-hot primary category of each label.
    valid: optional (N,) bool; invalid images are skipped.

  Returns:
    dict of int64 arrays ``tally_both`` (U, L+1), ``tally_labels`` (L+1,),
    ``tally_units_cat`` (U, C), ``tally_units`` (U,).
  """
  n_img, units = acts_nuhw.shape[:2]
  n_labels, n_cat = labelcat.shape
  sh, sw = pixels.shape[2:]
  tally_both = np.zeros((units, n_labels), np.int64)
  tally_labels = np.zeros(n_labels, np.int64)
  tally_units_cat = np.zeros((units, n_cat), np.int64)
  tally_units = np.zeros(units, np.int64)
  for i in range(n_img):
    if valid is not None and not valid[i]:
      continue
    scal = [int(s) for s in scalars[i] if s != 0]
    pix = np.asarray(pixels[i], np.int64)  # (K, sh, sw)
    has_png = pix.shape[0] > 0
    for s in scal:
      tally_labels[s] += sh * sw
    if has_png:
      tl = np.bincount(pix.ravel())
      if len(tl) > 0:
        tl[0] = 0
      tally_labels[:len(tl)] += tl
    for u in range(units):
      fmap = acts_nuhw[i, u]
      if fmap.max() > threshold[u]:
        mask = pillow_resize(fmap, sh, sw)
        indexes = np.argwhere(mask > threshold[u])  # float32 vs float64: compared in float64
        tally_units[u] += len(indexes)
        tally_cat = np.zeros(n_cat)
        if has_png:
          tb = np.bincount(pix[:, indexes[:, 0], indexes[:, 1]].ravel())
          if len(tb) > 0:
            tb[0] = 0
          tally_cat = np.dot(tb[None, :], labelcat[:len(tb), :])[0]
          tally_both[u, :len(tb)] += tb
        for s in scal:
          tally_cat = tally_cat + labelcat[s]
          tally_both[u, s] += len(indexes)
        tally_units_cat[u] += len(indexes) * (tally_cat > 0)
  return dict(tally_both=tally_both, tally_labels=tally_labels,
              tally_units_cat=tally_units_cat, tally_units=tally_units)


def iou(t: dict, labelcat: np.ndarray) -> np.ndarray:
  """NetDissect-Lite IoU (U, L+1) float64, in the original's operation order."""
  both = t["tally_both"].astype(np.float64)
  units_cat = np.dot(t["tally_units_cat"].astype(np.float64), labelcat.T)
  return both / (units_cat + t["tally_labels"].astype(np.float64)[np.newaxis, :] - both + 1e-10)


def best_labels(iou_ul: np.ndarray, primary: np.ndarray, n_cat: int) -> dict:
  """Best label per (category, unit) via ``pciou.argmax`` as in NetDissect-Lite."""
  pciou = np.array([iou_ul * (primary[np.arange(iou_ul.shape[1])] == ci)[np.newaxis, :]
                    for ci in range(n_cat)])  # (C, U, L+1)
  label_pciou = pciou.argmax(axis=2)  # (C, U)
  score_pciou = pciou[np.arange(n_cat)[:, None], np.arange(iou_ul.shape[0])[None, :],
                      label_pciou]
  # The original's ``argsort(axis=0)[::-1][0]``, with the stable order NumPy's small-array sort had.
  best_cat = score_pciou.argsort(axis=0, kind="stable")[::-1][0]
  units = np.arange(iou_ul.shape[0])
  return dict(label=label_pciou.T, score=score_pciou.T, best_category=best_cat,
              best_label=label_pciou[best_cat, units], best_score=score_pciou[best_cat, units])
