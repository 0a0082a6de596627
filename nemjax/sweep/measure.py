"""Exact incremental re-dissection of a partly corrupted probe set.

Only the poisoned images go through the model again; every other image keeps its clean
activations. Thresholds are then recomputed on the whole (partly poisoned) set and the tally
is re-run, so the result equals a full dissection of the corrupted set exactly (the tests
check this against ``dissect(..., image_overrides=...)`` and against an exported directory).
"""
from __future__ import annotations

import numpy as np

from nemjax.data.broden import ProbeSet
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect.driver import LayerDissection, finish_layer, tally_layer


def redissect(
    clean_acts: np.ndarray,
    rows: np.ndarray,
    new_acts: np.ndarray,
    probe: ProbeSet,
    labels: tuple[np.ndarray, np.ndarray],
    *,
    layer: str = "",
    quantile: float = 0.005,
    quantile_method: str = "linear",
    tally_method: str = "auto",
) -> LayerDissection:
  """Dissection of units whose activations on probe ``rows`` were replaced.

  Args:
    clean_acts: (N, h, w, U) activations of the clean probe set (U may be a unit subset).
    rows: (P,) probe rows that were poisoned.
    new_acts: (P, h, w, U) activations of the poisoned images.
    labels: ``(pixels (N,K,sh,sw), scalars (N,S))`` of the whole probe set.
  """
  clean_acts = np.asarray(clean_acts)
  rows = np.asarray(rows, np.int64)
  new_acts = np.asarray(new_acts, np.float32)
  if new_acts.shape != (len(rows), *clean_acts.shape[1:]):
    raise ValueError(f"new_acts must be ({len(rows)}, {', '.join(map(str, clean_acts.shape[1:]))}); "
                     f"got {new_acts.shape}")
  acts = np.array(clean_acts, np.float32, copy=True)
  acts[rows] = new_acts
  thr = quantile_lib.quantile_thresholds(acts, q=1.0 - quantile, method=quantile_method)
  state = tally_layer(acts, probe, thr, method=tally_method, progress=False, labels=labels)
  return finish_layer(layer, probe, thr, state)
