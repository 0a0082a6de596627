"""Exact streaming top-k images per channel.

Each channel keeps its ``k`` highest-scoring images seen so far, ordered by score descending and,
on equal scores, by dataset index ascending. Folding batches in any split gives the same result
as sorting the whole ``(n, C)`` score matrix at once with that order (a stable argsort of
``-score`` over index order), because the order is a strict total order on (score, index).

Example::

  state = topk_init(num_channels=256, k=10)
  for batch in batches:
    energies = channel_energy(acts_of(batch.images))      # (B, 256)
    state = topk_update(state, energies, batch.index)      # index: (B,) dataset indices
  state.indices                                            # (256, 10), best first
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TopKState", "topk_init", "topk_update", "topk_from_scores"]

_SENTINEL_KEY = np.iinfo(np.int32).max


class TopKState(NamedTuple):
  """Running top-k per channel."""
  values: jax.Array   # (C, k) float32 scores, descending; -inf in unfilled slots
  indices: jax.Array  # (C, k) int32 dataset indices; -1 in unfilled slots


def topk_init(num_channels: int, k: int) -> TopKState:
  """Empty top-k state for ``num_channels`` channels."""
  if int(num_channels) < 1 or int(k) < 1:
    raise ValueError(f"topk_init: need num_channels >= 1 and k >= 1, got {num_channels}, {k}")
  return TopKState(values=jnp.full((num_channels, k), -jnp.inf, jnp.float32),
                   indices=jnp.full((num_channels, k), -1, jnp.int32))


@jax.jit
def _merge(values, indices, scores, idx, valid):
  c, k = values.shape
  b = scores.shape[0]
  s = jnp.where(valid[:, None], scores.astype(jnp.float32), -jnp.inf).T  # (C, B)
  i = jnp.broadcast_to(jnp.where(valid, idx.astype(jnp.int32), -1)[None, :], (c, b))
  all_v = jnp.concatenate([values, s], axis=1)
  all_i = jnp.concatenate([indices, i], axis=1)
  tie_key = jnp.where(all_i < 0, _SENTINEL_KEY, all_i)  # unfilled slots sort last on ties
  _, _, v, ix = jax.lax.sort((-all_v, tie_key, all_v, all_i), dimension=1, num_keys=2)
  return TopKState(values=v[:, :k], indices=ix[:, :k])


def topk_update(state: TopKState, energies: Any, indices: Any, valid: Any = None) -> TopKState:
  """Fold a batch of per-channel scores into the running top-k.

  Args:
    state: current :class:`TopKState`.
    energies: ``(B, C)`` scores (e.g. channel energies) of the batch. NaN scores are not
      supported (mask them with ``valid`` or replace them beforehand).
    indices: ``(B,)`` int dataset indices of the batch images (distinct across all updates).
    valid: optional ``(B,)`` bool; rows with ``False`` (padding of a last partial batch) are
      ignored.

  Returns:
    The updated state. Jittable; the merge is jitted.
  """
  es, ix = np.shape(energies), np.shape(indices)
  c, _ = np.shape(state.values)
  if len(es) != 2 or es[1] != c or ix != (es[0],):
    raise ValueError(f"topk_update: expected energies (B, {c}) and indices (B,), got {es} and {ix}")
  if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
    raise ValueError(f"topk_update: indices must be integers, got {jnp.result_type(indices)}")
  if valid is None:
    valid = jnp.ones((es[0],), bool)
  elif np.shape(valid) != (es[0],):
    raise ValueError(f"topk_update: valid must be ({es[0]},), got {np.shape(valid)}")
  return _merge(state.values, state.indices, jnp.asarray(energies), jnp.asarray(indices),
                jnp.asarray(valid, bool))


def topk_from_scores(scores: Any, k: int, indices: Any = None) -> TopKState:
  """Top-k of a whole ``(n, C)`` score matrix in one call (``indices`` default ``arange(n)``)."""
  if np.ndim(scores) != 2:
    raise ValueError(f"topk_from_scores: scores must be (n, C), got {np.shape(scores)}")
  n, c = np.shape(scores)
  if indices is None:
    indices = jnp.arange(n, dtype=jnp.int32)
  return topk_update(topk_init(c, k), scores, indices)
