"""One dissection run as the script runs it: dissect, write each layer's files and the report.

::

  config = DissectConfig(layers=("layer4",), top_fraction=0.005)
  summaries = run_dissection(model, probe, config, out_dir)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nemjax import distributed
from nemjax.data.broden import ProbeSet
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect.driver import check_options, dissect
from nemjax.dissect.html import write_index, write_layer_report
from nemjax.dissect.outputs import write_layer_outputs

__all__ = ["DissectConfig", "run_dissection"]


@dataclasses.dataclass(frozen=True)
class DissectConfig:
  """What a dissection run computes and writes; checked once, when built (``"field: ..."``
  errors name the script's flag)."""
  layers: tuple[str, ...]
  top_fraction: float = quantile_lib.DEFAULT_TOP_FRACTION  # η of the thresholds
  quantile_method: str = "linear"   # numpy.quantile method of the thresholds
  batch_size: int = 32              # probe images per forward pass
  tally_method: str = "auto"        # 'auto' | 'sparse' | 'dense'
  report: bool = True               # write the HTML report
  report_top: int = 4               # images per unit in the report

  def __post_init__(self) -> None:
    object.__setattr__(self, "layers", tuple(self.layers))
    self.validate()

  def validate(self) -> None:
    """ValueError ``"field: ..."`` for the first bad field."""
    if not self.layers:
      raise ValueError("layers: no layers to dissect")
    check_options(top_fraction=self.top_fraction, quantile_method=self.quantile_method,
                  tally_method=self.tally_method, batch_size=self.batch_size,
                  num_top_images=self.report_top)
    if self.report and self.report_top < 1:
      raise ValueError(f"report_top: must be >= 1, got {self.report_top}")


def run_dissection(model, probe: ProbeSet, config: DissectConfig, out_dir: Path, *,
                   thresholds: Mapping[str, np.ndarray] | None = None,
                   extra: Mapping[str, Any] | None = None, progress: bool = True
                   ) -> dict[str, dict]:
  """Dissects ``config.layers`` and writes ``out_dir/<layer>/`` files (tally.csv, thresholds,
  IoU, summary.json), the per-layer HTML pages and ``index.html`` (unless ``config.report`` is
  off). ``thresholds``: ``{layer: (U,)}`` used instead of quantiles; ``extra`` goes into each
  summary.json. Returns ``{layer: summary}``.

  Under ``jax.distributed`` every process calls this (each dissects its shard of the probe
  set, see :func:`nemjax.dissect.dissect`); process 0 alone writes the files.
  """
  results = dissect(model, probe, config.layers, batch_size=config.batch_size,
                    top_fraction=config.top_fraction, quantile_method=config.quantile_method,
                    thresholds=thresholds, tally_method=config.tally_method,
                    num_top_images=config.report_top if config.report else 0,
                    progress=progress)
  write = distributed.current().leader
  summaries = {}
  for layer, res in results.items():
    summaries[layer] = write_layer_outputs(out_dir, res, probe, extra=dict(extra or {}),
                                           write=write)
    if config.report and write:
      write_layer_report(out_dir, layer, res, probe)
  if config.report and write:
    write_index(out_dir, results, probe)
  return summaries
