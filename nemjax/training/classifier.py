"""Cross-entropy training of an NNX classifier with optax, as pure jitted steps.

BatchNorm layers of nemjax models always run in inference mode (frozen running statistics),
so training updates only ``nnx.Param`` leaves: the BN affine scale/bias, convolutions and
linear layers. That keeps the train step a pure function of ``(params, opt_state, batch)``.

Optionally the step also trains training-only per-pixel concept heads on tapped layers
(:mod:`nemjax.training.concepts`); the heads live in the train state next to the model's
params and are dropped when training ends.

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

from nemjax.training.concepts import ConceptTask, concept_loss, init_heads


class TrainState(NamedTuple):
  """Everything a classifier step updates."""
  params: Any  # {"model": nnx.State of nnx.Param leaves, "heads": {layer: {"w", "b"}} or {}}
  opt_state: optax.OptState


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def make_classifier_step(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    heads: dict[str, dict[str, jax.Array]] | None = None,
    concept_weight: float = 0.0,
    l1: float = 0.0,
    nonneg: bool = False,
    balanced: bool = False,
    tied: int = 0,
) -> tuple[Callable[..., tuple[TrainState, jax.Array]], TrainState]:
  """Returns ``(step, state)``; ``step(state, images (B,H,W,3), labels (B,) int, targets={})
  -> (state, loss)``.

  Args:
    heads: optional concept heads (``concepts.init_heads``), trained with the model: the loss
      is then cross-entropy + ``concept_weight`` · ``concepts.concept_loss(..., l1)``, and
      ``targets`` maps each head's layer to its (B, h, w, C) targets.

  The state is donated: do not reuse the ``state`` passed in after a call.
  """
  graphdef, params, rest = _split(model)
  heads = dict(heads or {})
  taps = tuple(sorted(heads))

  def loss_fn(p, images, labels, targets):
    logits, acts = nnx.merge(graphdef, p["model"], rest)(images, taps=taps)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if taps:
      loss += concept_weight * concept_loss(acts, p["heads"], targets, l1, nonneg=nonneg,
                                            balanced=balanced, tied=tied)
    return loss

  def _step(state: TrainState, images, labels, targets):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels, targets)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss

  jitted = jax.jit(_step, donate_argnums=0)

  def step(state: TrainState, images, labels, targets=None):
    return jitted(state, images, labels, {} if targets is None else targets)

  p = {"model": params, "heads": heads}
  return step, TrainState(p, optimizer.init(p))


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
    augment: Callable[[jax.Array, Any], Any] | None = None,
    concepts: ConceptTask | None = None,
    progress: bool = True,
) -> tuple[nnx.Module, list[float]]:
  """Trains ``model`` on in-memory arrays; returns the trained model and per-epoch mean loss.

  Args:
    images: (N, H, W, 3) float32, already normalised for the model.
    labels: (N,) int class indices.
    key: PRNG key for shuffling, the concept heads' initialisation and ``augment``.
    augment: ``augment(key, batch) -> batch`` where ``batch`` is the images (B, H, W, 3), or
      ``(images, {layer: targets (B, h, w, C)})`` with ``concepts``: every leaf is an NHWC
      batch, so a spatial augmentation must move the targets with the pixels.
    concepts: optional per-pixel concept targets of the same N images; their heads are trained
      alongside and discarded (the returned model has the layout it came in with).
  """
  from tqdm.auto import tqdm

  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != (images.shape[0],):
    raise ValueError(
        f"fit_classifier: images must be (N,H,W,3) and labels (N,); got {images.shape} and {labels.shape}")
  n = images.shape[0]
  targets = {} if concepts is None else {k: np.asarray(v, np.float32)
                                         for k, v in concepts.targets.items()}
  for layer, t in targets.items():
    if t.ndim != 4 or t.shape[0] != n:
      raise ValueError(f"fit_classifier: concept targets of {layer!r} must be (N={n}, h, w, C), "
                       f"got {t.shape}")
  heads = None
  if targets:
    key, head_key = jax.random.split(key)
    _, acts = jax.eval_shape(lambda x: model(x, taps=tuple(targets)),
                             jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32))
    for layer, t in targets.items():
      if acts[layer].shape[1:3] != t.shape[1:3]:
        raise ValueError(f"fit_classifier: {layer!r} is {acts[layer].shape[1:3]} but its "
                         f"concept targets are {t.shape[1:3]}")
    heads = init_heads(head_key, {k: (a.shape[-1], targets[k].shape[-1]) for k, a in acts.items()},
                       nonneg=concepts.nonneg, tied=concepts.tied)
  steps_per_epoch = max(n // batch_size, 1)
  step, state = make_classifier_step(
      model, optimizer, heads=heads, concept_weight=0.0 if concepts is None else concepts.weight,
      **({} if concepts is None else dict(l1=concepts.l1, nonneg=concepts.nonneg,
                                          balanced=concepts.balanced, tied=concepts.tied)))
  history = []
  bar = tqdm(total=epochs * steps_per_epoch, desc="train", disable=not progress, unit="step")
  for _ in range(epochs):
    key, perm_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, n))
    losses = []
    for b in range(steps_per_epoch):
      idx = order[b * batch_size:(b + 1) * batch_size]
      x = jnp.asarray(images[idx])
      t = {k: jnp.asarray(v[idx]) for k, v in targets.items()}
      if augment is not None:
        key, aug_key = jax.random.split(key)
        if t:
          x, t = augment(aug_key, (x, t))
        else:
          x = augment(aug_key, x)
      state, loss = step(state, x, jnp.asarray(labels[idx]), t)
      losses.append(float(loss))
      bar.update(1)
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
    history.append(float(np.mean(losses)))
  bar.close()
  return merge_params(model, state.params["model"]), history
