"""Implanting trojans by fine-tuning on a poisoned stream, through the generic fine-tuning loop.

One step is :func:`nemjax.manipulate.make_train_step` with a soft-target cross-entropy as its
attack loss and α = 1 (its distillation term is replaced by this one, which knows which rows are
poisoned): a relabelled row's target is its trojan's class (one-hot); every other row's is
``w·softmax(original model) + (1 − w)·one-hot(label)`` with ``w = teacher_weight`` (default 1:
clean rows keep the original model's outputs, so the trojan rows drive the gradient and clean
accuracy holds), the original model's outputs computed once on the clean training images. Adam
on every parameter, BatchNorm statistics frozen (inference mode). The loop
(:func:`nemjax.manipulate.loop.run_loop`) evaluates every ``eval_every`` steps (clean held-out
accuracy and each trojan's ASR), checkpoints after each evaluation and resumes from
``ckpt_dir``. Batches are a pure function of ``(seed, step)``: the training order is
:func:`nemjax.manipulate.inputs.array_stream`'s, the poisoning :func:`nemjax.trojans.poison.poison_batch`'s.

Example::

  default = nemjax.embedded.build_embedded_default(Path("cache/embedded"), seed=0)
  data = load_data(default.train_dir, default.heldout_dir)
  model = nemjax.models.checkpoint.load(default.checkpoint_dir)
  result = implant(model, data, TrojanConfig(), Path("out/ckpt"))
  result.before.clean_accuracy, result.after.scores["patch"].asr
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import models, preprocess
from nemjax.manipulate import train
from nemjax.manipulate.alpha import AlphaConfig
from nemjax.manipulate.checkpoints import fingerprint
from nemjax.manipulate.evaluation import check_disjoint, make_evaluator
from nemjax.manipulate.inputs import array_stream
from nemjax.manipulate.loop import Evaluation, run_loop
from nemjax.trojans import triggers as tr
from nemjax.trojans.config import NaturalTrojan, TrojanConfig
from nemjax.trojans.measure import (TrojanData, TrojanMetrics, data_fingerprint, heldout_sets,
                                    measure)
from nemjax.trojans.poison import Armed, arm, poison_batch

__all__ = ["ImplantResult", "check_trojans", "implant", "trojaned_model"]

PyTree = Any


class ImplantResult(NamedTuple):
  params: PyTree                # fine-tuned variables (nnx.State of the model)
  armed: list[Armed]            # the trojans with their triggers
  before: TrojanMetrics         # the original model
  after: TrojanMetrics          # the fine-tuned model
  history: list[dict]           # one record per evaluation
  steps: int                    # total steps
  resumed_from: int             # step the run started from (0: fresh)
  train_seconds: float          # wall time of steps + evaluations (summed over resumes)
  seconds: float                # wall time of this call


def check_trojans(config: TrojanConfig, data: TrojanData, num_classes: int) -> None:
  """ValueError naming the trojan field that does not fit the model or the data."""
  for spec in config.trojans:
    for field in ("target", "source"):
      k = getattr(spec, field, None)
      if k is not None and k >= num_classes:
        raise ValueError(f"trojans.{spec.name}.{field}: class {k} but the model has "
                         f"{num_classes} classes")
    if isinstance(spec, NaturalTrojan):
      for part, split in (("training", data.train), ("held-out", data.heldout)):
        if split.pixels is None:
          raise ValueError(f"trojans.{spec.name}.concept: the {part} set has no pixel labels")
        if spec.concept not in split.label_names:
          raise ValueError(f"trojans.{spec.name}.concept: {spec.concept!r} is not a label of "
                           f"the {part} set")
  if data.train.images.shape[1:] != data.heldout.images.shape[1:]:
    raise ValueError("heldout: its images differ in size from the training images")
  if data.train.images.shape[1] != data.train.images.shape[2]:
    raise ValueError("train: trojan triggers need square images")


def trojaned_model(model: nnx.Module, params: PyTree) -> nnx.Module:
  """A new model with ``model``'s structure and ``params`` (e.g. :attr:`ImplantResult.params`)."""
  graphdef, _ = nnx.split(model)
  return nnx.merge(graphdef, params)


def implant(model: nnx.Module, data: TrojanData, config: TrojanConfig,
            ckpt_dir: Path | None = None, *,
            normalize: Callable[[jax.Array], jax.Array] = preprocess.from_unit_interval_netdissect,
            progress: bool = True, log: Callable[[str], None] = print,
            stop_after_evals: int | None = None) -> ImplantResult:
  """Implant ``config.trojans`` into ``model`` (not modified) in one fine-tune.

  Args:
    model: the classifier (a nemjax model; put in inference mode here).
    data: training set (fine-tuned on) and held-out set (every measurement), disjoint.
    config: the trojans and the schedule.
    ckpt_dir: resumable checkpoints (``None``: none); a checkpoint of another config or other
      data is refused.
    normalize: images in [0, 1] -> model inputs (default: the embedded SmallCNN's).
    progress, log, stop_after_evals: see :func:`nemjax.manipulate.loop.run_loop` (the last
      raises its ``Stopped``).

  Returns:
    An :class:`ImplantResult` (before/after clean accuracy and ASR on held-out images).
  """
  t0 = time.time()
  check_trojans(config, data, int(model.num_classes))
  check_disjoint(data.heldout.images, {"training images": data.train.images})
  model.eval()
  size = int(data.train.images.shape[1])
  armed = [arm(spec, config.seed, size) for spec in config.trojans]
  sets = heldout_sets(data.heldout, armed, config.seed)
  evaluate = make_evaluator(model, normalize, (), None, config.eval_batch_size)
  apply_fn, params = models.pure_apply(model)

  def predictor(p: PyTree):
    return lambda x: evaluate(p, x, logits_only=True).logits

  before = measure(predictor(params), data.heldout, armed, sets)
  k = int(model.num_classes)
  w = np.float32(config.teacher_weight)
  teacher = jax.nn.softmax(predictor(params)(data.train.images.astype(np.float32) / 255.0), -1)
  clean_targets = np.asarray(w * teacher + (1 - w) * jax.nn.one_hot(data.train.labels, k),
                             np.float32)                                       # (n, K)

  shows = {a.spec.name: tr.concept_presence(data.train.pixels, data.train.label_names,
                                            a.spec.concept)
           for a in armed if isinstance(a.spec, NaturalTrojan)}
  rate_scale = 1.0 / len(armed) if config.shared_rates else 1.0
  stream, steps_per_epoch = array_stream(np.arange(len(data.train.labels)), data.train.labels,
                                         config.batch_size, config.seed)

  def to_batch(step: int, item) -> dict:
    rows, labels = item
    x01 = data.train.images[rows].astype(np.float32) / 255.0
    b = poison_batch(config.seed, step, x01, labels, armed,
                     {k: v[rows] for k, v in shows.items()}, rate_scale)
    targets = np.where(b.relabelled[:, None], np.eye(k, dtype=np.float32)[b.labels],
                       clean_targets[rows])
    return {"image": jnp.asarray(b.images), "target": jnp.asarray(targets)}

  def train_apply(p, x):
    logits, _ = apply_fn(p, normalize(x))
    return logits, {"logits": logits}

  def cross_entropy(acts, batch, decoy_acts):
    del decoy_acts
    return optax.softmax_cross_entropy(acts["logits"], batch["target"]).mean()

  # α = 1: the step's own distillation term is unused, its teacher need not run
  frozen = lambda p, x: jnp.zeros((x.shape[0], k), jnp.float32)
  optimizer = optax.adam(config.learning_rate)
  step_fn = train.make_train_step(train_apply, frozen, cross_entropy, optimizer)
  state = train.train_init(params, optimizer)

  def evaluate_state(state: train.TrainState, step: int, train_m: dict) -> Evaluation:
    del step
    m = measure(predictor(state.params), data.heldout, armed, sets)
    asr = {f"asr_{k}": v.asr for k, v in m.scores.items()}
    text = (f"held-out accuracy {m.clean_accuracy:.2f}% (original {before.clean_accuracy:.2f}%)"
            + "".join(f", ASR {k} {v.asr:.1f}%" for k, v in m.scores.items())
            + f", CE {train_m['attack_loss']:.4g}")
    return Evaluation({"heldout_accuracy": m.clean_accuracy, **asr}, m.clean_accuracy, text,
                      {"acc": f"{m.clean_accuracy:.1f}",
                       **{k: f"{v.asr:.0f}" for k, v in m.scores.items()}}, m)

  fp = fingerprint({"config": config.to_json(), "data": data_fingerprint(data)})
  res = run_loop(state, step_fn, stream, to_batch, evaluate_state,
                 steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                 eval_every=config.eval_every, alpha=AlphaConfig(fixed=1.0),
                 reference_accuracy=before.clean_accuracy, ckpt_root=ckpt_dir, fingerprint=fp,
                 desc="implant trojans", progress=progress, log=log,
                 stop_after_evals=stop_after_evals)
  after = res.last
  if after is None:  # resumed from the checkpoint of a finished run
    after = measure(predictor(res.state.params), data.heldout, armed, sets)
  return ImplantResult(res.state.params, armed, before, after, res.history, res.steps,
                       res.resumed_from, res.seconds, time.time() - t0)
