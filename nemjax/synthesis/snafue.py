"""SNAFUE-style search (Casper, Hariharan & Hadfield-Menell 2022, "Diagnostics for Deep Neural
Networks with Automated Copy/Paste Attacks"): natural patches whose embeddings are nearest to
synthetic adversarial patches.

Candidates are a grid of square crops of the probe images (:func:`natural_patches`). The
synthetic patches (e.g. from :func:`nemjax.synthesis.adversarial_patch` with several keys) and
the candidates are embedded with the pluggable embedder (:mod:`nemjax.metrics.clip`; SNAFUE
embeds with the network's own latent features, :func:`nemjax.metrics.penultimate_embedder`),
and each candidate is scored by its cosine similarity to the *nearest* synthetic patch
(``reduce="max"``; ``"mean"`` averages over them). The ``k`` best are returned. SNAFUE's last
step, keeping the natural patches that are themselves adversarial when pasted, is a filter the
caller can apply with :func:`nemjax.synthesis.patch_success`.

Example::

  synth = jnp.stack([adversarial_patch(f, p, x, t, k, patch_size=16) for k in keys])
  cands, origins = natural_patches(probe_images, 16, stride=8)
  best = snafue(embedder, synth, cands, k=10)          # best.patches: (10, 16, 16, 3)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.metrics.clip import Embedder, embed_sets
from nemjax.synthesis import _common as C
from nemjax.synthesis.choice import option_similarity

__all__ = ["SnafueResult", "natural_patches", "nearest_patches", "snafue"]


class SnafueResult(NamedTuple):
  """The natural patches nearest to the synthetic ones, best first."""
  indices: jax.Array     # (k,) int32 rows of the candidates
  similarity: jax.Array  # (k,) float32 cosine similarity (nearest or mean, see reduce)
  patches: jax.Array     # (k, p, q, 3) float32 the candidates themselves


def natural_patches(images: Any, patch_size: int, stride: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """A grid of square crops of every image.

  Args:
    images: ``(N, H, W, 3)`` in ``[0, 1]``.
    patch_size: crop side ``p <= min(H, W)``.
    stride: grid step (default ``p``: non-overlapping crops).

  Returns:
    ``(patches (M, p, p, 3), origins (M, 3))`` with ``M = N·g_h·g_w``, ``g_h = (H − p)//stride + 1``,
    image-major then row then column; ``origins`` holds ``(image, row, col)`` int32.
  """
  n, h, w = C.check_images("images", images)
  if int(patch_size) != patch_size or not 1 <= int(patch_size) <= min(h, w):
    raise ValueError(f"patch_size must be an int in [1, {min(h, w)}], got {patch_size}")
  p = int(patch_size)
  stride = p if stride is None else stride
  if int(stride) != stride or int(stride) < 1:
    raise ValueError(f"stride must be an int >= 1, got {stride}")
  rows = np.arange(0, h - p + 1, int(stride))
  cols = np.arange(0, w - p + 1, int(stride))
  x = jnp.asarray(images, jnp.float32)
  crops = jnp.stack([x[:, r:r + p, c:c + p] for r in rows for c in cols], axis=1)
  g = len(rows) * len(cols)
  grid = np.array([(r, c) for r in rows for c in cols], np.int32)
  origins = np.concatenate([np.repeat(np.arange(n, dtype=np.int32), g)[:, None],
                            np.tile(grid, (n, 1))], axis=1)
  return crops.reshape(n * g, p, p, 3), jnp.asarray(origins)


def nearest_patches(synthetic_emb: jax.Array, candidate_emb: jax.Array, k: int,
                    reduce: str = "max") -> tuple[jax.Array, jax.Array]:
  """The ``k`` candidates most similar to the synthetic patches (pure, jittable; ``k`` static).

  Args:
    synthetic_emb: ``(S, D)`` embeddings of the synthetic patches.
    candidate_emb: ``(M, D)`` embeddings of the candidates, ``M >= k``.
    k: how many.
    reduce: ``"max"`` (cosine to the nearest synthetic patch) or ``"mean"``.

  Returns:
    ``(indices (k,) int32, similarity (k,) float32)``, most similar first (ties: lower index).
  """
  sim = option_similarity(synthetic_emb, candidate_emb, reduce)
  values, indices = jax.lax.top_k(sim, k)
  return indices.astype(jnp.int32), values


def snafue(embedder: Embedder, synthetic: Any, candidates: Any, *, k: int = 10,
           reduce: str = "max", batch_size: int = 256) -> SnafueResult:
  """Natural patches nearest (in the embedder's space) to synthetic adversarial patches.

  Args:
    embedder: ``embedder(images (n, H, W, 3)) -> (n, D)``.
    synthetic: ``(S, p, q, 3)`` synthetic adversarial patches in ``[0, 1]``.
    candidates: ``(M, p', q', 3)`` natural patches (e.g. :func:`natural_patches`).
    k: how many to return, ``1 <= k <= M``.
    reduce: ``"max"`` (nearest synthetic patch, SNAFUE's nearest-neighbour search) or ``"mean"``.
    batch_size: images per embedder call.

  Returns:
    :class:`SnafueResult`.
  """
  C.check_images("synthetic", synthetic)
  m, _, _ = C.check_images("candidates", candidates)
  if int(k) != k or not 1 <= int(k) <= m:
    raise ValueError(f"k must be an int in [1, {m}], got {k}")
  synth_emb = embed_sets(embedder, np.asarray(synthetic)[None], batch_size)[0]
  cand_emb = embed_sets(embedder, np.asarray(candidates)[None], batch_size)[0]
  if synth_emb.shape[-1] != cand_emb.shape[-1]:
    raise ValueError("embedder gave embeddings of different sizes for synthetic and candidates")
  indices, sim = nearest_patches(synth_emb, cand_emb, int(k), reduce)
  return SnafueResult(indices, sim, jnp.asarray(candidates, jnp.float32)[indices])
