"""Export one attacked unit's corrupted probe set and re-measure it independently."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from nemjax.data import broden
from nemjax.dissect.driver import dissect
from nemjax.dissect.report import write_json
from nemjax.sweep.export import export_corrupted_probe
from nemjax.sweep.pgd_sweep import PGDSweepConfig, prepare, run_attack_group


def export_and_verify(model, probe, config: PGDSweepConfig, layer: str, unit: int, eps: float,
                      mode: str, export_dir: Path, *, overwrite: bool = False,
                      progress: bool = True) -> dict:
  """Re-runs the attack on (layer, unit, ε, mode) alone, writes the corrupted probe set as a
  Broden directory, dissects that directory from scratch, and reports whether the label it
  finds equals the one the sweep's measurement claims.

  A 'float' delivery cannot be written to image files; the export then uses 'uint8'.
  """
  delivery = config.delivery if config.delivery != "float" else "uint8"
  cfg = dataclasses.replace(config, layers=(layer,), delivery=delivery)
  ctx = prepare(model, probe, cfg, None, progress=progress)[layer]
  (row,), images = run_attack_group(ctx, [unit], eps, mode, return_images=True)
  rows, x_adv = images[unit]
  export_corrupted_probe(probe, export_dir, dict(zip(rows.tolist(), x_adv)), delivery=delivery,
                         jpeg_quality=cfg.jpeg_quality, overwrite=overwrite)
  exported = broden.load_probe(export_dir, categories=list(probe.category_names))
  res = dissect(model, exported, [layer], batch_size=cfg.batch_size, quantile=cfg.quantile,
                quantile_method=cfg.quantile_method, progress=progress)[layer]
  measured = int(res.best_label[unit])
  report = {
      "layer": layer, "unit": unit, "eps": eps, "mode": mode, "delivery": delivery,
      "export_dir": str(export_dir), "n_poisoned": int(len(rows)),
      "clean_label": row["clean_name"], "target_label": row["target_name"],
      "claimed_label": row["new_name"], "claimed_iou": row["new_iou"],
      "measured_label": str(probe.label_names[measured]), "measured_iou": float(res.score[unit]),
      "claimed_threshold": row["threshold_after"], "measured_threshold": float(res.thresholds[unit]),
      "match": measured == row["new_label"] and np.float64(row["threshold_after"]) == res.thresholds[unit],
  }
  write_json(Path(export_dir).parent / f"{Path(export_dir).name}_verify.json", report)
  return report
