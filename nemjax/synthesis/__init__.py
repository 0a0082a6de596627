"""Feature synthesis for trojan rediscovery (Casper et al.'s benchmark) and its automated
multiple-choice score.

- synthesis tools, each ``(apply_fn, params, ..., target, key, ...)`` with
  ``apply_fn(params, images in [0, 1]) -> logits``: :func:`adversarial_patch` (universal patch at
  random locations), :func:`visualize_target` (feature visualisation of the target logit),
  :func:`tabor` (TABOR trigger reconstruction), :func:`snafue` (natural patches nearest to
  synthetic ones, candidates from :func:`natural_patches`);
- scoring: :func:`multiple_choice` / :func:`multiple_choice_batch` (8-way: the true trigger vs 7
  distractors, by cosine similarity in a pluggable embedder's space; chance 0.125),
  :func:`distractor_indices`.
"""
from nemjax.synthesis.choice import NUM_OPTIONS
from nemjax.synthesis.choice import choice_credit
from nemjax.synthesis.choice import distractor_indices
from nemjax.synthesis.choice import multiple_choice
from nemjax.synthesis.choice import multiple_choice_batch
from nemjax.synthesis.choice import option_similarity
from nemjax.synthesis.featvis import visualize_target
from nemjax.synthesis.patch import adversarial_patch
from nemjax.synthesis.patch import patch_objective
from nemjax.synthesis.patch import patch_success
from nemjax.synthesis.patch import paste_patch
from nemjax.synthesis.snafue import SnafueResult
from nemjax.synthesis.snafue import natural_patches
from nemjax.synthesis.snafue import nearest_patches
from nemjax.synthesis.snafue import snafue
from nemjax.synthesis.tabor import TaborConfig
from nemjax.synthesis.tabor import TaborResult
from nemjax.synthesis.tabor import tabor
from nemjax.synthesis.tabor import tabor_objective

__all__ = [
    "NUM_OPTIONS", "choice_credit", "distractor_indices", "multiple_choice",
    "multiple_choice_batch", "option_similarity",
    "visualize_target",
    "adversarial_patch", "patch_objective", "patch_success", "paste_patch",
    "SnafueResult", "natural_patches", "nearest_patches", "snafue",
    "TaborConfig", "TaborResult", "tabor", "tabor_objective",
]
