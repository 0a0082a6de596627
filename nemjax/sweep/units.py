"""Which units a sweep attacks: real concept detectors, chosen by a key of their names.

A unit is *eligible* when it has a clean label (best label > 0), a positive threshold (units
active in fewer than η of positions have threshold 0 and nothing to attack) and a clean
best-label IoU above ``min_iou`` (Network Dissection's bar for an interpretable unit, 0.04).
"""
from __future__ import annotations

import jax
import numpy as np

from nemjax.dissect.driver import LayerDissection
from nemjax.sweep.keys import item_key

__all__ = ["DEFAULT_MIN_IOU", "eligible_units", "choose_units"]

DEFAULT_MIN_IOU = 0.04  # Network Dissection's bar for an interpretable unit


def eligible_units(result: LayerDissection, min_iou: float) -> np.ndarray:
  """(E,) int64 sorted ids of the units labelled (> 0), with threshold > 0 and IoU > min_iou."""
  ok = (result.best_label > 0) & (result.thresholds > 0) & (result.score > min_iou)
  return np.flatnonzero(ok)


def choose_units(result: LayerDissection, num_units: int, seed: int, *, layer: str,
                 arch: str, min_iou: float = DEFAULT_MIN_IOU) -> tuple[int, ...]:
  """``num_units`` eligible units of ``layer`` (see :func:`eligible_units`), sorted.

  The choice is keyed by ``(seed, arch, layer)``: the same layer gets the same units whatever
  other layers the sweep attacks.

  Raises:
    ValueError: fewer than ``num_units`` eligible units (there is no fallback to unlabelled
      or weaker units).
  """
  ok = eligible_units(result, min_iou)
  if ok.size < num_units:
    raise ValueError(
        f"layer {layer}: only {ok.size} of {result.num_units} units are labelled with IoU > "
        f"{min_iou:g}, {num_units} requested; lower --num-units or --min-iou, or name units "
        f"with --units")
  key = item_key(seed, "sweep/units", arch, layer)
  pick = np.asarray(jax.random.permutation(key, ok.size))[:num_units]
  return tuple(int(u) for u in np.sort(ok[pick]))
