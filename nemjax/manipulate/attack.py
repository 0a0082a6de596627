"""The manipulation attacks as fine-tunes: each attack's objective and per-step batch extras
(:func:`build_attack`), which parameters train (:func:`trainable_from`), and :func:`finetune`,
which runs them through the generic loop (:func:`nemjax.manipulate.loop.run_loop`).

One step minimises ``α · L_A + (1 − α) · L_M`` (:func:`nemjax.manipulate.make_train_step`) on
``batch_size`` images of the training stream plus ``attack_batch_size`` images of the ranking
set (and ``decoys_per_step`` decoys). With ``loss_scale="relative"`` (default;
:mod:`nemjax.manipulate.relative`) every attack term is divided by the batch's mean energy of
the channel and weighted so ``L_A`` starts near 1 like the distillation cross-entropy:
push-down weights each (image, channel) pair by ``Ē₀_j / (E₀[n, j] · #pairs)``, push-up
averages the hinge over its terms, fairwashing divides ``(μ₀−μ₁)²`` by the mean square ``s``
and ``(ρ₀−ρ₁)²`` by ``s²``, then each channel by its initial value. ``"sum"`` is the papers'
statement (:mod:`nemjax.manipulate.losses`).

Batches are a pure function of ``(seed, step)``: the training stream's epoch permutation, and
ranking-set and decoy samples from a generator seeded with ``(seed, stream, step)``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import metrics as nm
from nemjax import models
from nemjax.manipulate import losses
from nemjax.manipulate import train
from nemjax.manipulate.config import ExperimentInputs, ManipulateConfig
from nemjax.manipulate.evaluation import (Accuracies, EvalOutputs, Reference, measure_accuracy,
                                          topk_overlap)
from nemjax.manipulate.loop import Evaluation, run_loop
from nemjax.manipulate.relative import (relative_fairwash_objective, relative_fairwash_terms,
                                        relative_push_down_objective, relative_push_up_objective)

__all__ = ["Attack", "build_attack", "trainable_from", "FinetuneResult", "finetune"]

PyTree = Any

class Attack(NamedTuple):
  """The attack objective and the per-step batch extras that feed it."""
  objective: losses.AttackLossFn
  extras: Callable[[int, np.ndarray], tuple[np.ndarray, dict]]  # (step, n_train) -> (rows, batch)


def _step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
  """NumPy generator of one (seed, stream, step): the batch of a step never depends on history."""
  return np.random.default_rng([int(seed), int(stream), int(step)])


def _sample(rng: np.random.Generator, pool: np.ndarray, size: int) -> np.ndarray:
  return np.sort(rng.choice(pool, size=size, replace=pool.size < size))


def build_attack(config: ManipulateConfig, ref: Reference) -> Attack:
  """Objective and batch extras for ``config.attack`` (see the module docstring on scale).

  ``extras(step, n_train)`` returns the ranking-set rows appended to the training images of
  this step and the batch entries the objective reads, already laid out for a batch of
  ``n_train`` training images followed by those rows.
  """
  relative = config.loss_scale == "relative"
  layers = ref.layers
  nb = config.attack_batch_size
  n_eval = ref.num_probe
  mean0 = {n: ref.before.energy[n].mean(0) for n in layers}  # (C,) mean initial energy
  eps = {n: np.maximum(1e-3 * mean0[n], 1e-12).astype(np.float32) for n in layers}

  if config.attack == "push-down":
    member = {}
    for name in layers:
      topk = ref.topk[name]                                   # (C, k)
      m = np.zeros((ref.images.shape[0], topk.shape[0]), bool)
      rows, cols = topk.T.ravel(), np.tile(np.arange(topk.shape[0]), topk.shape[1])
      m[rows, cols] = True
      member[name] = m & ref.attacked[name][None, :]
    pool = np.flatnonzero(np.any(np.stack([m.any(1) for m in member.values()]), axis=0))
    # relative weights: the pair's initial energy relative to its channel's mean -> L_A ~ 1
    ratio0 = {n: np.maximum(ref.before.energy[n], eps[n]) / np.maximum(mean0[n], 1e-12)
              for n in layers}
    if relative:
      objective = relative_push_down_objective(eps)
    else:
      objective = losses.push_down_objective({n: np.ones(ref.attacked[n].shape, bool)
                                              for n in layers})

    def extras(step: int, n_train: int):
      rows = _sample(_step_rng(config.seed, step, 1), pool, nb)
      masks = {}
      for name in layers:
        m = member[name][rows].astype(np.float32)
        if relative:
          m = m / ratio0[name][rows] / max(1.0, float(m.sum()))
        masks[name] = np.concatenate([np.zeros((n_train, m.shape[1]), np.float32), m])
      return rows, {"topk_mask": masks}

    return Attack(objective, extras)

  if config.attack == "push-up":
    decoys = np.arange(n_eval, ref.images.shape[0])
    pool = np.arange(n_eval)
    weights = {}
    for name in layers:
      c = ref.attacked[name].astype(np.float32)
      if relative:
        c = c / ((config.batch_size + nb) * config.decoys_per_step * max(1.0, c.sum()))
      weights[name] = c
    if relative:
      objective = relative_push_up_objective(weights, eps)
    else:
      objective = losses.push_up_objective(weights)

    def extras(step: int, n_train: int):
      del n_train
      rows = _sample(_step_rng(config.seed, step, 1), pool, nb)
      drows = _sample(_step_rng(config.seed, step, 2), decoys, config.decoys_per_step)
      return rows, {"decoy": ref.images[drows]}

    return Attack(objective, extras)

  # fairwash: layers are tapped as given (use the pre-activation conv, e.g. features.12)
  g = ref.groups
  pools = (np.flatnonzero(g == 0), np.flatnonzero(g == 1))
  weights, feps = {}, {}
  for name in layers:
    c = ref.attacked[name].astype(np.float32)
    rho = ref.before.energy[name][:n_eval] / ref.spatial[name]  # per-image mean square
    feps[name] = np.maximum(1e-3 * rho.mean(0), 1e-12).astype(np.float32)
    if relative:
      l0 = np.asarray(relative_fairwash_terms(ref.before.mean[name][:n_eval], rho, g,
                                              feps[name]))
      floor = 1e-3 * float(np.max(l0[c > 0], initial=0.0)) + 1e-12
      c = c / np.maximum(l0, floor) / max(1.0, c.sum())
    weights[name] = c
  if relative:
    objective = relative_fairwash_objective(weights, feps)
  else:
    objective = losses.fairwashing_objective(weights)
  half = nb // 2

  def extras(step: int, n_train: int):
    rng = _step_rng(config.seed, step, 1)
    rows = np.concatenate([_sample(rng, pools[0], nb - half), _sample(rng, pools[1], half)])
    group = np.concatenate([np.full((n_train,), -1, np.int32), g[rows]])
    return rows, {"group": group}

  return Attack(objective, extras)


# ------------------------------------------------------------------------- trainable leaves
def trainable_from(arch: str, first: str | None) -> Callable[[str, Any], bool] | None:
  """Filter for :func:`nemjax.manipulate.make_train_step`: train ``nnx.Param`` leaves of
  modules at or after ``first`` in the forward order (``None``: every parameter).

  Args:
    arch: model architecture (``models.layer_names(arch)`` gives the order).
    first: canonical name or alias of the first module to train, e.g. ``"features.12"``.
  """
  if first is None:
    return None
  names = models.layer_names(arch)
  start = names.index(models.canonical_layer(arch, first))
  position = {n: i for i, n in enumerate(names)}

  def rule(path: str, node: Any) -> bool:
    if not isinstance(node, nnx.Param):
      return False
    parts = path.split("/")
    if parts[-1] == "value":
      parts = parts[:-1]
    parts = parts[:-1]  # drop the leaf name (kernel, bias, scale, ...)
    while parts:
      name = ".".join(parts)
      if name in position:
        return position[name] >= start
      parts = parts[:-1]
    return False

  return rule


class FinetuneResult(NamedTuple):
  params: PyTree                # fine-tuned variables (nnx.State)
  after: EvalOutputs            # the last evaluation on the ranking set
  accuracy: Accuracies          # accuracy (%) at the last evaluation
  alpha: float                  # α used in the last steps
  history: list[dict]           # one record per evaluation
  steps: int                    # total steps
  resumed_from: int             # step the run started from (0: fresh)
  train_seconds: float          # wall time of steps + evaluations (summed over resumes)


def finetune(config: ManipulateConfig, inputs: ExperimentInputs, ref: Reference, evaluate,
             params: PyTree, *, teacher_params: PyTree | None = None,
             masks: PyTree | None = None, attack: bool = True,
             ckpt_root: Path | None = None, fingerprint: str = "",
             progress: bool = True, log: Callable[[str], None] = print,
             stop_after_evals: int | None = None) -> FinetuneResult:
  """Fine-tune ``params`` with ``config``'s attack (:func:`build_attack`) through the loop.

  Args:
    config: settings.
    inputs: model, training stream and data.
    ref: :func:`nemjax.manipulate.evaluation.make_reference` of the model being attacked.
    evaluate: from :func:`nemjax.manipulate.evaluation.make_evaluator`.
    params: variables to start from (the model's ``nnx.State``).
    teacher_params: variables of the distillation teacher (default: ``params``).
    masks: pruning masks re-applied after every update (:func:`nemjax.manipulate.masked`).
    attack: ``False`` runs distillation only (α = 0, no attack batch extras), e.g. to recover
      from pruning.
    ckpt_root, fingerprint, progress, log, stop_after_evals: see
      :func:`nemjax.manipulate.loop.run_loop` (raises its ``Stopped``).

  Returns:
    A :class:`FinetuneResult`.
  """
  model = inputs.model
  layers = ref.layers
  apply_fn, _ = models.pure_apply(model, taps=layers)
  normalize = inputs.normalize

  def train_apply(p, x):
    return apply_fn(p, normalize(x))

  optimizer = optax.adam(config.learning_rate)
  trainable = trainable_from(model.arch, config.train_from)
  the_attack = build_attack(config, ref) if attack else None
  objective = the_attack.objective if attack else (lambda acts, batch, decoy: jnp.zeros(()))
  step_fn = train.make_train_step(train_apply, None, objective, optimizer, trainable=trainable)
  if masks is not None:
    step_fn = train.masked(step_fn, masks)
  if teacher_params is not None:  # the state is donated: never hand it the caller's buffers
    teacher_params = jax.tree.map(jnp.array, teacher_params)
  state = train.train_init(params, optimizer, teacher_params=teacher_params, trainable=trainable)
  n_train, ok = config.batch_size, config.overlap_k

  def to_batch(step: int, item) -> dict:
    x = np.asarray(item[0])
    if x.shape[0] != n_train:
      raise ValueError(f"training batch has {x.shape[0]} images, expected {n_train}")
    if attack:
      rows, extra = the_attack.extras(step, n_train)
      images = np.concatenate([x.astype(ref.images.dtype), ref.images[rows]])
    else:
      images, extra = x, {}
    return {"image": jnp.asarray(images), **jax.tree.map(jnp.asarray, extra)}

  def measure(state: train.TrainState, step: int, train_m: dict) -> Evaluation:
    del step
    after = evaluate(state.params, ref.images)
    acc = measure_accuracy(evaluate, state.params, inputs, ref.heldout_logits,
                           ref.train_logits)[0]
    overlap = float(np.mean([
        topk_overlap(ref.topk[n][ref.attacked[n], :ok],
                     np.asarray(nm.topk_from_scores(after.energy[n], ok).indices)
                     [ref.attacked[n]]).mean() for n in layers]))
    text = (f"held-out accuracy {acc.heldout:.2f}% (original {ref.accuracy.heldout:.2f}%), "
            f"train {acc.train:.2f}% ({ref.accuracy.train:.2f}%), top-{ok} overlap "
            f"{overlap:.2f}, L_A {train_m['attack_loss']:.4g}, L_M {train_m['distill_loss']:.4g}")
    # the α rule reads the held-out accuracy, never the train one
    return Evaluation({"heldout_accuracy": acc.heldout, "train_accuracy": acc.train,
                       f"top{ok}_overlap": overlap}, acc.heldout, text,
                      {"acc": f"{acc.heldout:.1f}", "overlap": f"{overlap:.2f}"}, (after, acc))

  rule = config.alpha if attack else dataclasses.replace(config.alpha, fixed=0.0)
  res = run_loop(state, step_fn, inputs.train_batches, to_batch, measure,
                 steps_per_epoch=inputs.steps_per_epoch, epochs=config.epochs,
                 eval_every=config.eval_every, alpha=rule,
                 reference_accuracy=ref.accuracy.heldout, ckpt_root=ckpt_root,
                 fingerprint=fingerprint,
                 desc=f"fine-tune ({config.attack})" if attack else "fine-tune (distillation)",
                 progress=progress, log=log, stop_after_evals=stop_after_evals)
  if res.last is None:  # resumed from a checkpoint of the finished run
    after = evaluate(res.state.params, ref.images)
    acc = measure_accuracy(evaluate, res.state.params, inputs, ref.heldout_logits,
                           ref.train_logits)[0]
  else:
    after, acc = res.last
  return FinetuneResult(res.state.params, after, acc, res.alpha, res.history, res.steps,
                        res.resumed_from, res.seconds)
