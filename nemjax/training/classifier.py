"""Cross-entropy training of an NNX classifier with optax, as pure jitted steps.

BatchNorm layers of nemjax models always run in inference mode (frozen running statistics),
so training updates only ``nnx.Param`` leaves: the BN affine scale/bias, convolutions and
linear layers. That keeps the train step a pure function of ``(params, opt_state, batch)``.

Example::

    step, state = make_classifier_step(model, optax.adam(1e-3))
    state, loss = step(state, images, labels)     # images (B,H,W,3) normalised, labels (B,)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class TrainState(NamedTuple):
  """Everything a classifier step updates."""
  params: Any  # nnx.State of nnx.Param leaves
  opt_state: optax.OptState


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def make_classifier_step(
    model: nnx.Module, optimizer: optax.GradientTransformation
) -> tuple[Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]], TrainState]:
  """Returns ``(step, state)``; ``step(state, images (B,H,W,3), labels (B,) int) -> (state, loss)``.

  The state is donated: do not reuse the ``state`` passed in after a call.
  """
  graphdef, params, rest = _split(model)

  def loss_fn(p, images, labels):
    logits, _ = nnx.merge(graphdef, p, rest)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def _step(state: TrainState, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss

  step = jax.jit(_step, donate_argnums=0)
  return step, TrainState(params, optimizer.init(params))


def merge_params(model: nnx.Module, params) -> nnx.Module:
  """A new model equal to ``model`` with its ``nnx.Param`` leaves replaced by ``params``."""
  graphdef, _, rest = _split(model)
  return nnx.merge(graphdef, params, rest)


def evaluate_accuracy(model: nnx.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
  """Top-1 accuracy in [0, 1] over ``(images (B,H,W,3) normalised, labels (B,))`` batches."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, images):
    logits, _ = nnx.merge(graphdef, state)(images)
    return jnp.argmax(logits, axis=-1)

  correct = total = 0
  for images, labels in batches:
    pred = np.asarray(predict(state, jnp.asarray(images)))
    correct += int((pred == np.asarray(labels)).sum())
    total += len(labels)
  if total == 0:
    raise ValueError("evaluate_accuracy: no examples")
  return correct / total


def fit_classifier(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    key: jax.Array,
    epochs: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    progress: bool = True,
) -> tuple[nnx.Module, list[float]]:
  """Trains ``model`` on in-memory arrays; returns the trained model and per-epoch mean loss.

  Args:
    images: (N, H, W, 3) float32, already normalised for the model.
    labels: (N,) int class indices.
    key: PRNG key for shuffling (and ``augment(key, batch)`` if given).
  """
  from tqdm.auto import tqdm

  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != (images.shape[0],):
    raise ValueError(
        f"fit_classifier: images must be (N,H,W,3) and labels (N,); got {images.shape} and {labels.shape}")
  n = images.shape[0]
  steps_per_epoch = max(n // batch_size, 1)
  step, state = make_classifier_step(model, optimizer)
  history = []
  bar = tqdm(total=epochs * steps_per_epoch, desc="train", disable=not progress, unit="step")
  for _ in range(epochs):
    key, perm_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, n))
    losses = []
    for b in range(steps_per_epoch):
      idx = order[b * batch_size:(b + 1) * batch_size]
      x = jnp.asarray(images[idx])
      if augment is not None:
        key, aug_key = jax.random.split(key)
        x = augment(aug_key, x)
      state, loss = step(state, x, jnp.asarray(labels[idx]))
      losses.append(float(loss))
      bar.update(1)
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
    history.append(float(np.mean(losses)))
  bar.close()
  return merge_params(model, state.params), history
