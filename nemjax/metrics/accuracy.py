"""Top-1 / top-5 classification accuracy.

A label counts as correct within the top ``k`` when its rank is below ``k``, where

.. math:: \\mathrm{rank}(y) = \\#\\{j : z_j > z_y\\} + \\#\\{j < y : z_j = z_y\\}

i.e. ties between logits go to the lower class index, the order of ``jax.lax.top_k`` and of
``argmax``. Counts are int32 per batch; accumulate them on the host in int64.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["label_rank", "topk_correct", "topk_accuracy"]


def _check(logits: Any, labels: Any, name: str) -> tuple[int, int]:
  ls, ys = np.shape(logits), np.shape(labels)
  if len(ls) != 2 or ys != (ls[0],):
    raise ValueError(f"{name}: expected logits (N, K) and labels (N,), got {ls} and {ys}")
  return ls


def label_rank(logits: Any, labels: Any) -> jax.Array:
  """``(N,)`` int32 rank of the true label among the logits (0 = predicted class)."""
  _check(logits, labels, "label_rank")
  z = jnp.asarray(logits)
  y = jnp.asarray(labels).astype(jnp.int32)
  zy = jnp.take_along_axis(z, y[:, None], axis=1)  # (N, 1)
  cls = jnp.arange(z.shape[1])[None, :]
  ahead = (z > zy) | ((z == zy) & (cls < y[:, None]))
  return jnp.sum(ahead, axis=1).astype(jnp.int32)


def topk_correct(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> jax.Array:
  """Number of images whose label is within the top ``k``, for each ``k`` in ``ks``.

  Args:
    logits: ``(N, K)`` scores.
    labels: ``(N,)`` int labels in ``[0, K)``.
    ks: the cut-offs (each in ``[1, K]``).

  Returns:
    ``(len(ks),)`` int32 counts.
  """
  n, k_classes = _check(logits, labels, "topk_correct")
  ks = tuple(int(k) for k in ks)
  if not ks or any(k < 1 or k > k_classes for k in ks):
    raise ValueError(f"topk_correct: every k must be in [1, {k_classes}], got {ks}")
  rank = label_rank(logits, labels)
  return jnp.stack([jnp.sum(rank < k) for k in ks]).astype(jnp.int32)


def topk_accuracy(logits: Any, labels: Any, k: int = 1) -> jax.Array:
  """Fraction of images whose label is within the top ``k`` (``k=1``: top-1 accuracy)."""
  n, _ = _check(logits, labels, "topk_accuracy")
  if n == 0:
    raise ValueError("topk_accuracy: empty batch")
  return topk_correct(logits, labels, (k,))[0].astype(jnp.float32) / n
