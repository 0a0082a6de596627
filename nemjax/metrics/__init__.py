"""Metrics for explanation manipulation (Nanfack et al. AAAI 2024; Fulleringer 2023).

- top-k images per channel, streaming and exact: :class:`TopKState`, :func:`topk_init`,
  :func:`topk_update`.
- rank agreement: :func:`kendall_tau` (τ-b, = ``scipy.stats.kendalltau``),
  :func:`kendall_tau_cross`, :func:`kendall_tau_w`.
- embedding shift of top-k sets: :func:`clip_delta`, :func:`clip_w`, :func:`set_similarity`,
  with pluggable embedders (:func:`penultimate_embedder`, :func:`clip_embedder`,
  :func:`load_embedder`).
- fairness: :func:`ks_distance`, :func:`ks_distance_groups`, :func:`topk_balance`, :func:`ddi`,
  :func:`deo`.
- accuracy: :func:`topk_accuracy`, :func:`topk_correct`.
"""

from nemjax.metrics.accuracy import label_rank
from nemjax.metrics.accuracy import topk_accuracy
from nemjax.metrics.accuracy import topk_correct
from nemjax.metrics.clip import clip_delta
from nemjax.metrics.clip import clip_w
from nemjax.metrics.clip import embed_sets
from nemjax.metrics.clip import mean_embeddings
from nemjax.metrics.clip import clip_embedder
from nemjax.metrics.clip import load_embedder
from nemjax.metrics.clip import penultimate_embedder
from nemjax.metrics.clip import set_similarity
from nemjax.metrics.fairness import ddi
from nemjax.metrics.fairness import deo
from nemjax.metrics.fairness import ks_distance
from nemjax.metrics.fairness import ks_distance_groups
from nemjax.metrics.fairness import topk_balance
from nemjax.metrics.ranking import kendall_tau
from nemjax.metrics.ranking import kendall_tau_cross
from nemjax.metrics.ranking import kendall_tau_w
from nemjax.metrics.topk import TopKState
from nemjax.metrics.topk import topk_from_scores
from nemjax.metrics.topk import topk_init
from nemjax.metrics.topk import topk_update

__all__ = [
    "label_rank", "topk_accuracy", "topk_correct",
    "clip_delta", "clip_w", "embed_sets", "mean_embeddings", "clip_embedder", "load_embedder",
    "penultimate_embedder", "set_similarity",
    "ddi", "deo", "ks_distance", "ks_distance_groups", "topk_balance",
    "kendall_tau", "kendall_tau_cross", "kendall_tau_w",
    "TopKState", "topk_from_scores", "topk_init", "topk_update",
]
