"""Supervised training of classifiers (used to build the embedded default model)."""
from nemjax.training.classifier import (
    TrainState,
    evaluate_accuracy,
    fit_classifier,
    make_classifier_step,
)
from nemjax.training.concepts import ConceptTask, concept_loss, concept_targets, init_heads

__all__ = ["ConceptTask", "TrainState", "concept_loss", "concept_targets", "evaluate_accuracy",
           "fit_classifier", "init_heads", "make_classifier_step"]
