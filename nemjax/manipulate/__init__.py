"""Manipulating feature visualisation by fine-tuning (Nanfack et al. AAAI 2024; Fulleringer 2023).

Pure building blocks:

- losses: :func:`channel_energy`, :func:`push_down_loss`, :func:`push_up_loss`,
  :func:`fairwashing_loss`, :func:`distillation_loss`, :func:`total_loss` and the
  ``*_objective`` factories producing ``attack_loss_fn(acts, batch, decoy_acts)``.
- the dynamic α rule: :class:`AlphaConfig`, :class:`AlphaState`, :func:`alpha_init`,
  :func:`alpha_update`.
- fine-tuning: :class:`TrainState`, :func:`train_init`, :func:`make_train_step`, :func:`masked`.
- synthetic feature visualisation: :func:`visualize_channel`, :func:`visualize_channels`.
- pruning defences: :func:`l1_unstructured_masks`, :func:`vulnerability_masks`,
  :func:`apply_masks`.
- scale-free objectives (the experiments' default): :func:`relative_push_down_objective`,
  :func:`relative_push_up_objective`, :func:`relative_fairwash_objective`.

Orchestration (imported on demand, not here; each imports only the ones before it):
:mod:`~nemjax.manipulate.config` (frozen settings, checked once), :mod:`~nemjax.manipulate.evaluation`
(evaluator, accuracy, reference, metrics), :mod:`~nemjax.manipulate.loop` (the reusable
fine-tuning loop), :mod:`~nemjax.manipulate.attack` (the attacks as fine-tunes),
:mod:`~nemjax.manipulate.experiment` (the fine-tuning attack end to end),
:mod:`~nemjax.manipulate.inputs` (model and data from paths),
:mod:`~nemjax.manipulate.data` (training-stream adapters), :mod:`~nemjax.manipulate.checkpoints`
(resumable train state), :mod:`~nemjax.manipulate.report` (tables and figures) and
:mod:`~nemjax.manipulate.defence` (pruning as a defence).
"""

from nemjax.manipulate.alpha import AlphaConfig
from nemjax.manipulate.alpha import AlphaState
from nemjax.manipulate.alpha import alpha_init
from nemjax.manipulate.alpha import alpha_update
from nemjax.manipulate.featvis import COLOR_CORRELATION_SVD_SQRT
from nemjax.manipulate.featvis import FeatVisConfig
from nemjax.manipulate.featvis import init_spectrum
from nemjax.manipulate.featvis import random_transform
from nemjax.manipulate.featvis import spectrum_to_image
from nemjax.manipulate.featvis import visualize_channel
from nemjax.manipulate.featvis import visualize_channels
from nemjax.manipulate.losses import channel_energy
from nemjax.manipulate.losses import distillation_loss
from nemjax.manipulate.losses import fairwashing_loss
from nemjax.manipulate.losses import fairwashing_objective
from nemjax.manipulate.losses import push_down_loss
from nemjax.manipulate.losses import push_down_objective
from nemjax.manipulate.losses import push_up_loss
from nemjax.manipulate.losses import push_up_objective
from nemjax.manipulate.losses import sum_objectives
from nemjax.manipulate.losses import topk_membership
from nemjax.manipulate.losses import total_loss
from nemjax.manipulate.prune import apply_masks
from nemjax.manipulate.prune import combine_masks
from nemjax.manipulate.prune import l1_unstructured_masks
from nemjax.manipulate.prune import leaf_paths
from nemjax.manipulate.prune import pruned_fraction
from nemjax.manipulate.prune import vulnerability_masks
from nemjax.manipulate.relative import relative_fairwash_objective
from nemjax.manipulate.relative import relative_push_down_objective
from nemjax.manipulate.relative import relative_push_up_objective
from nemjax.manipulate.train import TrainState
from nemjax.manipulate.train import default_optimizer
from nemjax.manipulate.train import make_train_step
from nemjax.manipulate.train import masked
from nemjax.manipulate.train import train_init
from nemjax.manipulate.train import trainable_mask

__all__ = [
    "AlphaConfig", "AlphaState", "alpha_init", "alpha_update",
    "COLOR_CORRELATION_SVD_SQRT", "FeatVisConfig", "init_spectrum", "random_transform",
    "spectrum_to_image", "visualize_channel", "visualize_channels",
    "channel_energy", "distillation_loss", "fairwashing_loss", "fairwashing_objective",
    "push_down_loss", "push_down_objective", "push_up_loss", "push_up_objective",
    "sum_objectives", "topk_membership", "total_loss",
    "apply_masks", "combine_masks", "l1_unstructured_masks", "leaf_paths", "pruned_fraction",
    "vulnerability_masks",
    "relative_fairwash_objective", "relative_push_down_objective", "relative_push_up_objective",
    "TrainState", "default_optimizer", "make_train_step", "masked", "train_init",
    "trainable_mask",
]
