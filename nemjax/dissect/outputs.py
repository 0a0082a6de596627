"""Writes a dissected layer's files: ``<layer>_tally.csv`` (NetDissect-Lite's columns and
number format), ``<layer>_thresholds.npy``, ``<layer>_iou.npy`` (units × labels, label axis =
global label number, 0 = unlabeled) and ``<layer>_summary.json``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nemjax.data.broden import ProbeSet
from nemjax.dissect.report import atomic_save_npy, tally_csv_text, tally_rows
from nemjax.files import atomic_write_text, write_json
from nemjax.dissect.tally import BestLabels


def write_layer_outputs(out_dir: Path, result, probe: ProbeSet, extra: dict | None = None,
                        *, write: bool = True) -> dict:
  """Writes the four files of ``result`` (a ``LayerDissection``); returns the summary dict
  (``write=False``: only returns it, as processes other than 0 of a multi-process run do)."""
  out_dir = Path(out_dir)
  layer = result.layer
  t = result.tally
  units_cat_by_label = np.asarray(t.tally_units_cat, np.float64) @ probe.labelcat.T
  best = BestLabels(result.category_labels, result.category_scores, result.best_category,
                    result.best_label, result.score)
  rows = tally_rows(
      best=best, iou=result.iou, tally_both=np.asarray(t.tally_both, np.float64),
      tally_labels=np.asarray(t.tally_labels, np.float64), units_cat_by_label=units_cat_by_label,
      label_names=list(probe.label_names), category_names=probe.category_names)
  if write:
    atomic_write_text(out_dir / f"{layer}_tally.csv", tally_csv_text(rows, probe.category_names))
    atomic_save_npy(out_dir / f"{layer}_thresholds.npy", result.thresholds)
    atomic_save_npy(out_dir / f"{layer}_iou.npy", result.iou)
  cats = [probe.category_names[c] for c in result.best_category]
  summary = {
      "layer": layer,
      "num_units": result.num_units,
      "num_images": probe.num_images,
      "probe": probe.root,
      "mean_iou": float(result.score.mean()),
      "units_with_iou_above_0.04": int((result.score > 0.04).sum()),
      "units_per_category": {c: cats.count(c) for c in probe.category_names},
      "distinct_labels": int(len(set(result.best_label.tolist()))),
      **(extra or {}),
  }
  if write:
    write_json(out_dir / f"{layer}_summary.json", summary)
  return summary
