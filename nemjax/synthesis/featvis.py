"""Feature visualisation of a target logit: :func:`nemjax.manipulate.featvis.visualize_channel`
(FFT parameterisation, colour decorrelation, random transforms) on the model's logits, as the
target-class visualisations of Casper et al.'s benchmark.

Example::

  img = visualize_target(logits_fn, params, 3, jax.random.key(0), size=64, steps=128)
"""
from __future__ import annotations

from typing import Any

import jax

from nemjax.manipulate import featvis
from nemjax.synthesis import _common as C

__all__ = ["visualize_target"]


def visualize_target(apply_fn: C.ApplyFn, params: Any, target: int | jax.Array, key: jax.Array,
                     *, size: int | tuple[int, int] = 128, steps: int = 256,
                     lr: float = featvis.FEATVIS_LEARNING_RATE,
                     config: featvis.FeatVisConfig = featvis.FeatVisConfig()) -> jax.Array:
  """The image that maximises the ``target`` logit (activation maximisation).

  ``features_fn(img) = apply_fn(params, img)`` logits ``(1, K)``, channel ``target``; see
  :func:`nemjax.manipulate.featvis.visualize_channel` for the parameterisation. ``params`` are
  closed over, so each call compiles once (they enter the program as constants).

  Args:
    apply_fn: ``apply_fn(params, images (N, H, W, 3) in [0, 1]) -> (N, K)`` logits (or a tuple
      led by them).
    params: its parameters.
    target: class index.
    key: PRNG key (initial spectrum and transforms).
    size: image side or ``(H, W)``.
    steps: Adam steps.
    lr: Adam learning rate on the spectrum.
    config: transform ranges (shrink ``jitter`` for small images) and objective.

  Returns:
    ``(H, W, 3)`` float32 image in ``[0, 1]``.
  """
  def features_fn(images: jax.Array) -> jax.Array:
    return C.logits_of(apply_fn(params, images))

  return featvis.visualize_channel(features_fn, target, key, size=size, steps=steps, lr=lr,
                                   config=config)
