"""Export one attacked unit's corrupted probe set and re-measure it independently.

Three numbers are compared:

- ``claimed``: the sweep's incremental measurement of a fresh re-run of the attack, with the
  export's delivery (the pixels the files hold);
- ``measured``: a from-scratch dissection of the exported Broden directory;
- ``stored``: the sweep's own ``results.csv`` row for (layer, unit, ε, mode), when there is one.

Image files hold 8-bit pixels, so a sweep with ``float`` delivery is exported as ``uint8``
(lossless PNG of the rounded floats). The report then says ``quantised: true``, and the stored
(float) result is compared with the re-run's float measurement (``stored_consistent``), while
``stored_survives`` says whether the quantised files still give the stored label.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nemjax.data import broden
from nemjax.dissect.driver import dissect
from nemjax.files import write_json
from nemjax.sweep.export import export_corrupted_probe
from nemjax.sweep.config import PGDSweepConfig
from nemjax.sweep.pgd_sweep import prepare, run_attack_group

# Columns that a re-run of the same attack with the same delivery reproduces exactly.
_REPRODUCED = ("clean_label", "target_label", "new_label", "new_iou", "threshold_after",
               "n_poisoned", "success", "new_label_float", "success_float")


def export_delivery(delivery: str) -> str:
  """The delivery an export uses for a sweep's ``delivery``: files hold 8-bit pixels, so
  'float' becomes 'uint8'; 'uint8' and 'jpeg' stay."""
  return "uint8" if delivery == "float" else delivery


def _same(a: Any, b: Any) -> bool:
  """Equality of a stored CSV string and a fresh value (floats via their exact repr)."""
  if isinstance(b, bool):
    return str(a) in (str(int(b)), str(b))
  if isinstance(b, float):
    return float(a) == b
  return str(a) == str(b)


def export_and_verify(model, probe, config: PGDSweepConfig, layer: str, unit: int, eps: float,
                      mode: str, export_dir: Path, *, stored_row: Mapping[str, str] | None = None,
                      overwrite: bool = False, progress: bool = True) -> dict:
  """Re-runs the attack on (layer, unit, ε, mode) alone, writes the corrupted probe set as a
  Broden directory, dissects that directory from scratch, and compares.

  Args:
    config: the sweep's configuration (its ``delivery`` decides the export's, see
      :func:`export_delivery`).
    stored_row: the sweep's ``results.csv`` row of this attack (strings), or None.
    overwrite: replace an existing ``export_dir``.

  Returns:
    A report (also written to ``<export_dir>_verify.json``) with ``match`` (the fresh
    dissection finds the claimed label and threshold), ``quantised`` (float sweep exported as
    uint8), and, with ``stored_row``: ``stored_consistent`` (the re-run reproduces the stored
    row: every measured column, or for a quantised export the float label), ``stored_match``
    (the fresh dissection finds the stored label and threshold; None when quantised) and
    ``stored_survives`` (the fresh dissection finds the stored label).
  """
  swept_as = config.probe_pass.delivery
  delivery = export_delivery(swept_as)
  quantised = delivery != swept_as
  pp = dataclasses.replace(config.probe_pass, delivery=delivery)
  cfg = dataclasses.replace(config, layers=(layer,), units=None, modes=(mode,), probe_pass=pp,
                            attack=dataclasses.replace(config.attack, eps=(eps,)))
  inputs, layers = prepare(model, probe, cfg, None, progress=progress)
  (row,), images = run_attack_group(inputs, layers[layer], [unit], eps, mode, return_images=True)
  rows, x_adv = images[unit]
  export_corrupted_probe(probe, export_dir, dict(zip(rows.tolist(), x_adv)), delivery=delivery,
                         jpeg_quality=pp.jpeg_quality, overwrite=overwrite)
  exported = broden.load_probe(export_dir, categories=list(probe.category_names))
  res = dissect(model, exported, [layer], batch_size=pp.batch_size, top_fraction=pp.top_fraction,
                quantile_method=pp.quantile_method, progress=progress)[layer]
  measured = int(res.best_label[unit])
  measured_thr = float(res.thresholds[unit])
  report: dict[str, Any] = {
      "layer": layer, "unit": unit, "eps": eps, "mode": mode,
      "sweep_delivery": swept_as, "export_delivery": delivery, "quantised": quantised,
      "note": ("the sweep measured float images; the exported files hold them rounded to "
               "uint8, so their label may differ from the sweep's" if quantised else ""),
      "export_dir": str(export_dir), "n_poisoned": int(len(rows)),
      "clean_label": row["clean_name"], "target_label": row["target_name"],
      "claimed_label": row["new_name"], "claimed_iou": row["new_iou"],
      "claimed_threshold": row["threshold_after"],
      "measured_label": str(probe.label_names[measured]), "measured_iou": float(res.score[unit]),
      "measured_threshold": measured_thr,
      "match": bool(measured == row["new_label"]
                    and np.float64(row["threshold_after"]) == res.thresholds[unit]),
      "stored_label": None, "stored_consistent": None, "stored_match": None,
      "stored_survives": None,
  }
  if stored_row is not None:
    stored_label = int(stored_row["new_label"])
    report["stored_label"] = str(probe.label_names[stored_label])
    if quantised:
      report["stored_consistent"] = bool(stored_label == row["new_label_float"])
    else:
      report["stored_consistent"] = all(_same(stored_row[k], row[k]) for k in _REPRODUCED)
      report["stored_match"] = bool(stored_label == measured
                                    and float(stored_row["threshold_after"]) == measured_thr)
    report["stored_survives"] = bool(stored_label == measured)
  write_json(Path(export_dir).parent / f"{Path(export_dir).name}_verify.json", report)
  return report


def verified(report: Mapping[str, Any]) -> bool:
  """Whether a report shows no disagreement (a quantised label change is not one)."""
  return (bool(report["match"]) and report["stored_consistent"] is not False
          and report["stored_match"] is not False)
