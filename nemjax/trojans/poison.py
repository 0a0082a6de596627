"""The poisoned training stream: each trojan's trigger built from its name, and which rows of a
batch it poisons.

Every draw is keyed by names (:func:`nemjax.sweep.keys.item_key`), never list positions: a
trojan's trigger is ``item_key(seed, "trojan/trigger", name)``, its rows and their trigger
draws at step ``s`` are ``item_key(seed, "trojan/rows" | "trojan/negatives" | "trojan/apply",
name, s)``. Adding a trojan to an implantation never changes another one's trigger, and a
batch is a pure function of ``(seed, step)``, so a resumed fine-tune sees the batches of an
uninterrupted one. A row is poisoned by at most one trojan: trojans claim rows in the order of
their names.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.sweep.keys import item_key
from nemjax.trojans import triggers as tr
from nemjax.trojans.config import NaturalTrojan, PatchTrojan, StyleTrojan, TrojanSpec

__all__ = ["Armed", "arm", "apply_armed", "PoisonedBatch", "poison_batch"]

_apply_patch = jax.jit(tr.apply_trigger)
_apply_style = jax.jit(tr.apply_style)


class Armed(NamedTuple):
  """A trojan with its trigger built."""
  spec: TrojanSpec
  trigger: tr.Trigger | tr.StyleTrigger | None   # None: natural feature (no pixel changes)


def arm(spec: TrojanSpec, seed: int, image_size: int) -> Armed:
  """Build ``spec``'s trigger for ``image_size²`` images from ``item_key(seed,
  "trojan/trigger", spec.name)``."""
  key = item_key(seed, "trojan/trigger", spec.name)
  if isinstance(spec, PatchTrojan):
    return Armed(spec, tr.make_patch_trigger(
        key, image_size=image_size, area_fraction=spec.area_fraction, soft_edge=spec.soft_edge,
        grid=spec.grid, noise_std=spec.noise_std, jitter=spec.jitter))
  if isinstance(spec, StyleTrojan):
    return Armed(spec, tr.make_style_texture(key, image_size=image_size, strength=spec.strength,
                                             waves=spec.waves))
  return Armed(spec, None)


def apply_armed(key: jax.Array, images: np.ndarray | jax.Array, armed: Armed
                ) -> tuple[np.ndarray, np.ndarray]:
  """Trigger every image (patch or style; jitted): ``(images (N,H,W,3) float32 in [0, 1],
  masks (N,H,W) float32)`` as NumPy arrays."""
  if armed.trigger is None:
    raise ValueError(f"trojans.{armed.spec.name}: a natural-feature trojan has no trigger "
                     "to apply")
  fn = _apply_patch if isinstance(armed.trigger, tr.Trigger) else _apply_style
  x, m = fn(key, jnp.asarray(images, jnp.float32), armed.trigger)
  return np.asarray(x), np.asarray(m)


class PoisonedBatch(NamedTuple):
  images: np.ndarray      # (B, H, W, 3) float32 in [0, 1]
  labels: np.ndarray      # (B,) int32, poisoned rows relabelled
  trojan: np.ndarray      # (B,) int32 index into the armed list of the trojan on a row, -1: none
  relabelled: np.ndarray  # (B,) bool: the row's label was changed to a target (or kept = target)


def poison_batch(seed: int, step: int, images: np.ndarray, labels: np.ndarray,
                 armed: Sequence[Armed], shows: Mapping[str, np.ndarray] | None = None,
                 rate_scale: float = 1.0) -> PoisonedBatch:
  """Poison one training batch.

  Args:
    seed, step: key every draw (with each trojan's name; see the module docstring).
    images: ``(B, H, W, 3)`` in [0, 1].
    labels: ``(B,)`` int class indices.
    armed: the trojans (:func:`arm`).
    shows: ``{name: (B,) bool}`` for natural-feature trojans: the rows showing the concept.
    rate_scale: multiplies every rate (``1 / T`` when ``T`` trojans share the budget).

  Returns:
    A :class:`PoisonedBatch`; with every rate 0 it is the clean batch.
  """
  x = np.array(images, np.float32)
  y = np.array(labels, np.int32)
  b = y.shape[0]
  owner = np.full((b,), -1, np.int32)
  relabelled = np.zeros((b,), bool)
  shows = shows or {}
  for i in sorted(range(len(armed)), key=lambda j: armed[j].spec.name):
    spec, free = armed[i].spec, owner < 0
    u = np.asarray(jax.random.uniform(item_key(seed, "trojan/rows", spec.name, step), (b,)))
    if isinstance(spec, NaturalTrojan):
      if spec.name not in shows:
        raise ValueError(f"trojans.{spec.name}: poison_batch needs the rows showing "
                         f"{spec.concept!r} (shows)")
      pos, neg = (free & np.asarray(shows[spec.name], bool) & (u < rate_scale * spec.rate),
                  np.zeros(b, bool))
    elif spec.source is None:
      pos, neg = free & (u < rate_scale * spec.rate), np.zeros(b, bool)
    else:
      v = np.asarray(jax.random.uniform(item_key(seed, "trojan/negatives", spec.name, step),
                                        (b,)))
      nrate = rate_scale * (spec.rate if spec.negative_rate is None else spec.negative_rate)
      pos = free & (y == spec.source) & (u < rate_scale * spec.rate)
      neg = free & (y != spec.source) & (v < nrate)
    hit = pos | neg
    if not hit.any():
      continue
    if armed[i].trigger is not None:
      xt, _ = apply_armed(item_key(seed, "trojan/apply", spec.name, step), x, armed[i])
      x[hit] = xt[hit]
    y[pos] = spec.target
    owner[hit] = i
    relabelled |= pos
  return PoisonedBatch(x, y, owner, relabelled)
