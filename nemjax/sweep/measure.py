"""Exact incremental re-dissection of a partly corrupted probe set.

Only the poisoned images go through the model again; every other image keeps its clean
activations. Thresholds are then recomputed on the whole (partly poisoned) set and the tally
is re-run, so the result equals a full dissection of the corrupted set exactly (the tests
check this against ``dissect(..., image_overrides=...)`` and against an exported directory).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from nemjax.data.broden import ProbeSet
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect.driver import LayerDissection, finish_layer, tally_layer
from nemjax.sweep.profile import NULL_TIMER, StageTimer


def batched_activations(
    act_fn: Callable[[np.ndarray], Mapping[str, object]],
    images: np.ndarray,
    shapes: Mapping[str, tuple[int, int, int]],
    *,
    batch_size: int,
    num_devices: int = 1,
) -> dict[str, np.ndarray]:
  """Activations of (corrupted) images, batched exactly like the clean dissection.

  Every batch holds ``batch_size`` rounded up to a multiple of ``num_devices`` images (the
  last is zero-padded), so one compiled program serves all batches, whatever the number of
  images, and each row's activations do not depend on how many images are re-run.

  Args:
    act_fn: ``fn(images (B, H, W, 3) float32 0..255) -> {layer: (B, h, w, U)}``, e.g.
      :func:`nemjax.dissect.driver.activation_fn`.
    images: (P, H, W, 3) on the 0..255 scale (float or uint8), P may be 0.
    shapes: ``{layer: (h, w, U)}``; the layers to return (and their shape when P = 0).
    batch_size: the dissection's batch size (>= 1).
    num_devices: devices the batch is sharded over.

  Returns:
    ``{layer: (P, h, w, U) float32}``.
  """
  if batch_size < 1 or num_devices < 1:
    raise ValueError(f"batch_size and num_devices must be >= 1, got {batch_size}, {num_devices}")
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (P, H, W, 3), got shape {images.shape}")
  bs = batch_size + (-batch_size) % num_devices
  out: dict[str, list[np.ndarray]] = {layer: [] for layer in shapes}
  for s in range(0, len(images), bs):
    chunk = images[s:s + bs].astype(np.float32)
    pad = np.zeros((bs - len(chunk), *chunk.shape[1:]), np.float32)
    acts = act_fn(np.concatenate([chunk, pad]))
    for layer in shapes:
      out[layer].append(np.asarray(acts[layer])[:len(chunk)])
  return {layer: (np.concatenate(out[layer]) if out[layer]
                  else np.zeros((0, *shapes[layer]), np.float32)) for layer in shapes}


def redissect_units(
    clean_acts: np.ndarray,
    units: Sequence[int],
    rows: Sequence[np.ndarray],
    new_acts: Sequence[np.ndarray],
    probe: ProbeSet,
    labels: tuple[np.ndarray, np.ndarray],
    **kwargs,
) -> LayerDissection:
  """:func:`redissect` of several units at once, each with its own poisoned rows.

  Column ``j`` holds unit ``units[j]``'s clean activations with its rows ``rows[j]``
  replaced by ``new_acts[j][..., units[j]]``; thresholds, tallies and IoU are per column, so
  column ``j`` equals ``redissect`` of that unit alone, and one tally pass serves the group.

  Args:
    clean_acts: (N, h, w, U) clean activations of the whole layer.
    units: G unit indices (distinct).
    rows: G arrays (P_j,) of probe rows.
    new_acts: G arrays (P_j, h, w, U) of the poisoned images' activations.
    kwargs: as :func:`redissect` (layer, top_fraction, quantile_method, tally_method, timer).

  Returns:
    A :class:`LayerDissection` of G units, in ``units`` order.
  """
  units = list(units)
  cols = np.array(np.asarray(clean_acts)[..., units], np.float32, copy=True)
  for j, (u, r, a) in enumerate(zip(units, rows, new_acts)):
    cols[np.asarray(r, np.int64), ..., j] = np.asarray(a, np.float32)[..., u]
  return redissect(cols, np.zeros(0, np.int64), np.zeros((0, *cols.shape[1:]), np.float32),
                   probe, labels, **kwargs)


def redissect(
    clean_acts: np.ndarray,
    rows: np.ndarray,
    new_acts: np.ndarray,
    probe: ProbeSet,
    labels: tuple[np.ndarray, np.ndarray],
    *,
    layer: str = "",
    top_fraction: float = quantile_lib.DEFAULT_TOP_FRACTION,
    quantile_method: str = "linear",
    tally_method: str = "auto",
    timer: StageTimer = NULL_TIMER,
) -> LayerDissection:
  """Dissection of units whose activations on probe ``rows`` were replaced.

  Args:
    clean_acts: (N, h, w, U) activations of the clean probe set (U may be a unit subset).
    rows: (P,) probe rows that were poisoned.
    new_acts: (P, h, w, U) activations of the poisoned images.
    labels: ``(pixels (N,K,sh,sw), scalars (N,S))`` of the whole probe set.
    top_fraction: η of the thresholds (as :func:`nemjax.dissect.dissect`).
    timer: records the "re-dissection: thresholds" and "...: tally + IoU" stages
      (:mod:`nemjax.sweep.profile`).
  """
  clean_acts = np.asarray(clean_acts)
  rows = np.asarray(rows, np.int64)
  new_acts = np.asarray(new_acts, np.float32)
  if new_acts.shape != (len(rows), *clean_acts.shape[1:]):
    raise ValueError(f"new_acts must be ({len(rows)}, {', '.join(map(str, clean_acts.shape[1:]))}); "
                     f"got {new_acts.shape}")
  with timer.stage("re-dissection: thresholds"):
    acts = np.array(clean_acts, np.float32, copy=True)
    acts[rows] = new_acts
    thr = quantile_lib.quantile_thresholds(acts, q=quantile_lib.quantile_of(top_fraction),
                                           method=quantile_method)
  with timer.stage("re-dissection: tally + IoU"):
    state = tally_layer(acts, probe, thr, method=tally_method, progress=False, labels=labels)
    return finish_layer(layer, probe, thr, state)
