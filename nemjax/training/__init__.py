"""Supervised training of classifiers (used to build the embedded default model)."""
from nemjax.training.classifier import (
    TrainState,
    evaluate_accuracy,
    fit_classifier,
    make_classifier_step,
)

__all__ = ["TrainState", "evaluate_accuracy", "fit_classifier", "make_classifier_step"]
