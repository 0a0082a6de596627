"""Running top-k probe images per unit, by per-image maximum activation (for the HTML report).

Keeps, for every unit, the ``k`` images whose activation map has the largest maximum, with
those maps, so a report needs no stored activations: memory ``U·k·(h·w + 2)`` values,
independent of the probe-set size. Order: descending per-image max, ties to the lower probe
row — the same images as ``np.argsort(-acts.max(axis=(1, 2))[:, u], kind="stable")[:k]``.

Streaming use (the dissection driver does this)::

  st = top_images_init(num_units=U, k=4, map_shape=(h, w))
  for acts, rows, valid in batches:              # (B, h, w, U) float32, (B,) int, (B,) bool
    st = top_images_update(st, acts, rows, valid)
  st.row[u], st.maps[u]                          # (k,) rows (-1 = none), (k, h, w) maps
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nemjax.dissect._checks import check_finite

__all__ = ["TopImagesState", "top_images_init", "top_images_update", "top_images_merge",
           "top_images_from_acts"]


class TopImagesState(NamedTuple):
  """The k top-activating images of each unit, best first (host NumPy arrays)."""
  value: np.ndarray  # (U, k) float32 per-image max of the unit's map, descending; -inf = empty
  row: np.ndarray  # (U, k) int64 probe row of each image; -1 = empty slot
  maps: np.ndarray  # (U, k, h, w) float32 the unit's activation map on that image (0 if empty)


def top_images_init(num_units: int, k: int, map_shape: tuple[int, int]) -> TopImagesState:
  """Empty state for ``num_units`` units, ``k`` images each, maps of ``map_shape`` (h, w)."""
  if num_units < 1 or k < 1:
    raise ValueError(f"need num_units >= 1 and k >= 1, got {num_units}, {k}")
  h, w = (int(v) for v in map_shape)
  return TopImagesState(value=np.full((num_units, k), -np.inf, np.float32),
                        row=np.full((num_units, k), -1, np.int64),
                        maps=np.zeros((num_units, k, h, w), np.float32))


def top_images_update(state: TopImagesState, acts, rows, valid=None) -> TopImagesState:
  """Merges one batch into the running top-k.

  Args:
    state: from :func:`top_images_init` or a previous update.
    acts: (B, h, w, U) float32 activations (NHWC), or (B, U) for vector layers.
    rows: (B,) int probe row of each image; rows must not repeat across updates.
    valid: optional (B,) bool; False rows (padding) are ignored.

  Returns:
    The new state.
  """
  a = np.asarray(acts)
  if a.ndim == 2:
    a = a[:, None, None, :]
  u_n, k, h, w = state.maps.shape
  if a.ndim != 4 or a.shape[1:] != (h, w, u_n):
    raise ValueError(f"acts must be (B, {h}, {w}, {u_n}) for this state, got {np.shape(acts)}")
  rows = np.asarray(rows, np.int64)
  if rows.shape != (a.shape[0],):
    raise ValueError(f"rows must have shape ({a.shape[0]},), got {rows.shape}")
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != (a.shape[0],):
      raise ValueError(f"valid must have shape ({a.shape[0]},), got {valid.shape}")
    if not valid.all():
      a, rows = a[valid], rows[valid]
  if a.shape[0] == 0:
    return state
  check_finite(a, "acts (NHWC, valid rows)")
  peak = a.reshape(a.shape[0], -1, u_n).max(axis=1).astype(np.float32)  # (B', U)
  value = np.concatenate([state.value, peak.T], axis=1)  # (U, k + B')
  row = np.concatenate([state.row, np.broadcast_to(rows, (u_n, rows.size))], axis=1)
  # Descending value, then ascending row; empty slots (-inf) sort last.
  order = np.lexsort((row, -value), axis=-1)[:, :k]  # (U, k)
  new = order >= k
  if not new.any():
    return state
  maps = np.take_along_axis(state.maps, np.minimum(order, k - 1)[:, :, None, None], axis=1)
  uu, slot = np.nonzero(new)
  maps[uu, slot] = a[order[uu, slot] - k, :, :, uu]  # (n, h, w)
  return TopImagesState(np.take_along_axis(value, order, axis=1),
                        np.take_along_axis(row, order, axis=1), maps)


def top_images_merge(a: TopImagesState, b: TopImagesState) -> TopImagesState:
  """The top-k of ``a`` and ``b`` together (states of disjoint probe rows, same units, k and
  map shape), in the same order as one stream over both: descending value, ties to the lower
  row."""
  if a.maps.shape != b.maps.shape:
    raise ValueError(f"top-image states differ: maps {a.maps.shape} vs {b.maps.shape}")
  k = a.value.shape[1]
  value = np.concatenate([a.value, b.value], axis=1)
  row = np.concatenate([a.row, b.row], axis=1)
  empty = row < 0  # empty slots (-inf, row -1) last, after every real image
  order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, row), -value), axis=-1)[:, :k]
  maps = np.concatenate([a.maps, b.maps], axis=1)
  return TopImagesState(np.take_along_axis(value, order, axis=1),
                        np.take_along_axis(row, order, axis=1),
                        np.take_along_axis(maps, order[:, :, None, None], axis=1))


def top_images_from_acts(acts, k: int) -> TopImagesState:
  """One-shot top-k of all (N, h, w, U) (or (N, U)) activations in probe row order."""
  a = np.asarray(acts)
  if a.ndim == 2:
    a = a[:, None, None, :]
  if a.ndim != 4:
    raise ValueError(f"acts must be (N, h, w, U) or (N, U), got shape {np.shape(acts)}")
  state = top_images_init(a.shape[-1], k, a.shape[1:3])
  return top_images_update(state, a, np.arange(a.shape[0]))
