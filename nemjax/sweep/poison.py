"""Which probe images an attack poisons.

The candidates are the images that contain the source concept or the target concept (a
non-empty mask); at most ``cap = max(1, floor(poison_fraction·N))`` of them are poisoned, in
one of two orders (``PGDSweepConfig.poison_order``):

- ``concept`` (default; the paper's public code attacks the images holding the source or the
  target concept): the images holding the source concept in probe order, then those holding
  the target concept (and not the source) in probe order, up to the cap;
- ``activation``: the candidates on which the attacked unit's clean activation peaks highest
  (they dominate its threshold and its IoU), ties to the lower index.

Indices are returned sorted. Target concepts are drawn with
:func:`nemjax.attacks.pgd.random_targets` (never the source, never concept 0).
"""
from __future__ import annotations

import numpy as np

POISON_ORDERS = ("concept", "activation")


def poison_cap(num_images: int, fraction: float) -> int:
  """Largest number of poisoned images: ``max(1, floor(fraction·N))``."""
  if not 0 < fraction <= 1:
    raise ValueError(f"poison fraction must lie in (0, 1], got {fraction}")
  return max(1, int(np.floor(fraction * num_images + 1e-9)))


def choose_poisoned(contains: np.ndarray, priority: np.ndarray, cap: int) -> np.ndarray:
  """The ``activation`` order. Args: contains (N,) bool, priority (N,) float (higher first,
  ties -> lower index). Returns: sorted int64 row indices, at most ``cap``."""
  contains = np.asarray(contains, bool)
  cand = np.flatnonzero(contains)
  order = cand[np.argsort(-np.asarray(priority)[cand], kind="stable")]
  return np.sort(order[:cap])


def choose_by_concept(has_source: np.ndarray, has_target: np.ndarray, cap: int) -> np.ndarray:
  """The ``concept`` order. Args: has_source, has_target (N,) bool. Returns: sorted int64 row
  indices, at most ``cap``: source holders in probe order first, then target holders."""
  has_source, has_target = np.asarray(has_source, bool), np.asarray(has_target, bool)
  if has_source.shape != has_target.shape or has_source.ndim != 1:
    raise ValueError(f"choose_by_concept: has_source {has_source.shape} and has_target "
                     f"{has_target.shape} must be the same (N,) shape")
  order = np.concatenate([np.flatnonzero(has_source), np.flatnonzero(has_target & ~has_source)])
  return np.sort(order[:cap]).astype(np.int64)
