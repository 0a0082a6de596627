"""Which probe images an attack poisons.

Rule (documented in README / BUILD.md): the candidates are the images that contain the
source concept or the target concept (a non-empty mask); at most ``cap`` are poisoned,
those on which the attacked unit's clean activation peaks highest (they dominate both its
threshold and its IoU). Indices are returned sorted.

Target concepts are drawn with :func:`nemjax.attacks.pgd.random_targets` (never the source,
never concept 0).
"""
from __future__ import annotations

import numpy as np


def poison_cap(num_images: int, fraction: float) -> int:
  """Largest number of poisoned images: ``max(1, floor(fraction·N))``."""
  if not 0 < fraction <= 1:
    raise ValueError(f"poison fraction must lie in (0, 1], got {fraction}")
  return max(1, int(np.floor(fraction * num_images + 1e-9)))


def choose_poisoned(contains: np.ndarray, priority: np.ndarray, cap: int) -> np.ndarray:
  """Args: contains (N,) bool, priority (N,) float (higher first, ties -> lower index).
  Returns: sorted int64 row indices, at most ``cap``."""
  contains = np.asarray(contains, bool)
  cand = np.flatnonzero(contains)
  order = cand[np.argsort(-np.asarray(priority)[cand], kind="stable")]
  return np.sort(order[:cap])
