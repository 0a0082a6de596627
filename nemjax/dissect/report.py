"""Writers for dissection results: NetDissect-Lite's tally.csv, npy arrays, summary JSON.

File I/O lives here, at the edge; the kernels never import this module.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: Path, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  atomic_write_bytes(path, buf.getvalue())


def per_category_best(
    iou: np.ndarray, primary_category: np.ndarray, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
  """Best label per (unit, category), NetDissect-Lite style (first label index wins ties).

  Args:
    iou: (U, L+1) float64.
    primary_category: (L+1,) int category index of each label.
  Returns:
    labels (U, C) int, scores (U, C) float64. A category with no positive IoU gives label 0.
  """
  c = np.arange(num_categories)[:, None]
  pciou = iou[None, :, :] * (primary_category[None, :] == c)[:, None, :]  # (C, U, L+1)
  labels = pciou.argmax(axis=2)                                             # (C, U)
  scores = np.take_along_axis(pciou, labels[:, :, None], axis=2)[:, :, 0]
  return labels.T, scores.T


def best_category(scores: np.ndarray) -> np.ndarray:
  """(U, C) scores -> (U,) category index; ties go to the *last* category.

  NetDissect-Lite takes ``scores.argsort(axis=0)[::-1][0]``; NumPy's default sort is an
  insertion sort (stable) for the ≤ 16 categories in use, so the reversed order puts the
  last of several tied categories first. We reproduce that deterministically.
  """
  c = scores.shape[1]
  return c - 1 - np.argmax(scores[:, ::-1], axis=1)


def tally_rows(
    *,
    iou: np.ndarray,
    tally_both: np.ndarray,
    tally_labels: np.ndarray,
    units_cat_by_label: np.ndarray,
    primary_category: np.ndarray,
    label_names: Sequence[str],
    category_names: Sequence[str],
) -> list[dict[str, Any]]:
  """Rows of NetDissect-Lite's tally.csv, ordered by descending score (ties: lower unit first).

  Args:
    iou, tally_both, units_cat_by_label: (U, L+1); ``units_cat_by_label`` is
      ``tally_units_cat @ labelcat.T`` (the IoU's activation term).
    tally_labels: (L+1,).
  """
  labels, scores = per_category_best(iou, primary_category, len(category_names))
  bestcat = best_category(scores)
  unit_score = scores[np.arange(len(scores)), bestcat]
  order = np.argsort(-unit_score, kind="stable")
  f64 = lambda v: np.float64(v)
  rows = []
  for unit in order:
    row: dict[str, Any] = {
        "unit": int(unit) + 1,
        "category": category_names[bestcat[unit]],
        "label": label_names[labels[unit, bestcat[unit]]],
        "score": f64(unit_score[unit]),
    }
    for ci, cat in enumerate(category_names):
      lab = labels[unit, ci]
      row[f"{cat}-label"] = label_names[lab]
      row[f"{cat}-truth"] = f64(tally_labels[lab])
      row[f"{cat}-activation"] = f64(units_cat_by_label[unit, lab])
      row[f"{cat}-intersect"] = f64(tally_both[unit, lab])
      row[f"{cat}-iou"] = f64(scores[unit, ci])
    rows.append(row)
  return rows


def tally_csv_text(rows: list[dict[str, Any]], category_names: Sequence[str]) -> str:
  """CSV text with NetDissect-Lite's header and number format (``str`` of float64)."""
  fields = ["unit", "category", "label", "score"]
  for cat in category_names:
    fields += [f"{cat}-label", f"{cat}-truth", f"{cat}-activation", f"{cat}-intersect", f"{cat}-iou"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fields, lineterminator="\r\n")
  writer.writeheader()
  for row in rows:
    writer.writerow(row)
  return buf.getvalue()


def write_json(path: Path, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")
