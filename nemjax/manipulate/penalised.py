"""Fine-tuning with a custom loss: ``CE(labels) + λ · L(params, batch)`` (+ an optional
distillation term ``μ · CE(softmax(teacher), student)`` on the same images), one jitted step.

The generic piece behind every "fine-tune a classifier so that something else changes" attack
(explanation fooling, :mod:`nemjax.fooling`; trojan implantation): the classification
cross-entropy on labelled images keeps the model accurate, a caller-given penalty ``L`` says
what else to change. It reuses :mod:`nemjax.manipulate.train`'s :class:`TrainState`
(:func:`train_init`; the teacher params are the frozen original model, which ``L`` may read)
and runs in :func:`nemjax.manipulate.loop.run_loop` (pass ``step`` as the loop's step: the
loop's α argument becomes λ; use ``AlphaConfig(fixed=...)`` or wrap the step to fix λ).

Example::

  def penalty(apply_fn, params, teacher_params, batch):     # -> (scalar, {name: scalar})
    h = explain.grad_cam_heo(apply_fn, params, batch["image"], batch["label"], layer="block4")
    return jnp.mean(h ** 2), {}
  state = train_init(variables, optax.adam(1e-4))
  step = make_penalised_step(apply_fn, penalty, optax.adam(1e-4))
  state, metrics = step(state, {"image": x, "label": y}, 1.0)   # λ = 1

BatchNorm: build ``apply_fn`` from a model in inference mode (``model.eval()``); the step never
writes running statistics back, so they stay frozen.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from nemjax.manipulate import train
from nemjax.manipulate.losses import distillation_loss
from nemjax.ops import fastgrad

__all__ = ["PenaltyFn", "make_penalised_step", "cross_entropy"]

PyTree = Any
# penalty(apply_fn, params, teacher_params, batch) -> (scalar loss, {name: scalar} to report)
PenaltyFn = Callable[[Callable, PyTree, PyTree, Mapping[str, Any]],
                     tuple[jax.Array, Mapping[str, jax.Array]]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits (N, K) against int labels (N,); rows labelled -1
  are left out (0 when none is labelled)."""
  keep = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
  return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def make_penalised_step(apply_fn: Callable[[PyTree, jax.Array], Any], penalty_fn: PenaltyFn,
                        optimizer: optax.GradientTransformation | None = None, *,
                        trainable: train.TrainableFn | None = None, donate: bool = True,
                        fast_grad: bool | None = None, distill: float = 0.0):
  r"""Build the jitted step minimising ``CE(f_θ(x), y) + λ · L(θ) + μ · L_M(θ)``.

  Args:
    apply_fn: ``apply_fn(params, x (N,H,W,C)) -> logits (N,K)`` or ``(logits, {tap: acts})``,
      in inference mode.
    penalty_fn: ``penalty_fn(apply_fn, params, teacher_params, batch) -> (L, aux)``: a scalar
      and a dict of scalars reported in the metrics; it gets the step's ``apply_fn`` and the
      frozen original model's params (``TrainState.teacher_params``; use them under
      ``jax.lax.stop_gradient``, they are never trained).
    optimizer: the transformation given to :func:`nemjax.manipulate.train_init` (default
      :func:`nemjax.manipulate.default_optimizer`).
    trainable: the filter given to :func:`nemjax.manipulate.train_init`.
    donate: donate the train state's buffers (default ``True``).
    fast_grad: evaluate the whole loss through :func:`nemjax.ops.fastgrad.cpu_fast_grad` (same
      values; max-pool and stem-conv gradients without XLA:CPU's slow paths, also inside
      penalties that differentiate the model themselves, e.g. explanations). Default: on when
      JAX's default backend is the CPU.
    distill: μ, weight of the distillation loss L_M
      (:func:`nemjax.manipulate.losses.distillation_loss`: cross-entropy from the frozen
      original model's softmax on ``batch["image"]``); 0 (default) leaves it out.

  Returns:
    ``step(train_state, batch, lam) -> (train_state, metrics)``; ``batch`` has ``"image"``
    (N,H,W,C) and ``"label"`` (N,) int (``-1``: no CE term) and whatever the penalty reads;
    ``lam`` is a scalar (float32, never recompiles); ``metrics``: ``loss``, ``ce``,
    ``penalty``, ``distill`` (L_M, 0 when μ = 0), ``accuracy`` (batch top-1 on labelled rows),
    ``grad_norm`` and the penalty's aux. The jitted function is ``step.jitted``.
  """
  optimizer = train.default_optimizer() if optimizer is None else optimizer
  if not distill >= 0:
    raise ValueError(f"penalised step: distill must be >= 0, got {distill}")

  def _update(state: train.TrainState, batch: Mapping[str, Any], lam: jax.Array):
    for key in ("image", "label"):
      if key not in batch:
        raise ValueError(f"penalised step: batch needs an {key!r} entry, has {sorted(batch)}")
    flags = train._flags(state.params, trainable)  # pylint: disable=protected-access
    trained, leaves = train._partition(state.params, flags)  # pylint: disable=protected-access
    treedef = jax.tree.structure(state.params)
    labels = batch["label"]

    def loss_fn(train_params, teacher_params):
      params = train._combine(train_params, leaves, flags, treedef)  # pylint: disable=protected-access
      out = apply_fn(params, batch["image"])
      logits = out[0] if isinstance(out, (tuple, list)) else out
      ce = cross_entropy(logits, labels)
      dist = jnp.zeros((), logits.dtype)
      if distill:
        t_out = apply_fn(jax.lax.stop_gradient(teacher_params), batch["image"])
        dist = distillation_loss(logits, t_out[0] if isinstance(t_out, (tuple, list)) else t_out)
      pen, aux = penalty_fn(apply_fn, params, jax.lax.stop_gradient(teacher_params), batch)
      hit = (jnp.argmax(logits, -1) == labels) & (labels >= 0)
      acc = jnp.sum(hit) / jnp.maximum(jnp.sum(labels >= 0), 1)
      return ce + lam * pen + distill * dist, (ce, pen, acc, dict(aux, distill=dist))

    fn = fastgrad.by_backend(loss_fn, fast_grad)
    (loss, (ce, pen, acc, aux)), grads = jax.value_and_grad(fn, has_aux=True)(
        trained, state.teacher_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    params = train._combine(trained, leaves, flags, treedef)  # pylint: disable=protected-access
    metrics = {"loss": loss, "ce": ce, "penalty": pen, "accuracy": acc.astype(jnp.float32),
               "grad_norm": optax.tree.norm(grads), **aux}
    return train.TrainState(params, opt_state, state.teacher_params, state.step + 1), metrics

  return train.jitted_step(_update, donate, "penalised step: lam")
