"""Writers for dissection results: NetDissect-Lite's tally.csv, npy arrays, summary JSON.

File I/O lives here, at the edge; the kernels never import this module.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from nemjax.files import atomic_write_bytes

if TYPE_CHECKING:
  from nemjax.dissect.tally import BestLabels


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  atomic_write_bytes(path, buf.getvalue())


def tally_rows(
    *,
    best: "BestLabels",
    iou: np.ndarray,
    tally_both: np.ndarray,
    tally_labels: np.ndarray,
    units_cat_by_label: np.ndarray,
    label_names: Sequence[str],
    category_names: Sequence[str],
) -> list[dict[str, Any]]:
  """Rows of NetDissect-Lite's tally.csv, ordered by descending score (ties: lower unit first).

  Args:
    best: ``nemjax.dissect.tally.best_labels`` of ``iou``.
    iou, tally_both, units_cat_by_label: (U, L+1); ``units_cat_by_label`` is
      ``tally_units_cat @ labelcat.T`` (the IoU's activation term).
    tally_labels: (L+1,).
  """
  labels, scores, bestcat, unit_score = best.label, best.score, best.best_category, best.best_score
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


