"""The fine-tuning loop, whatever the fine-tune is for: steps over a training stream, an
evaluation every ``eval_every`` steps, the dynamic α rule, checkpoints and resume.

The caller says what is trained and measured (the manipulation attacks:
:func:`nemjax.manipulate.attack.finetune`; a fooling or trojan fine-tune the same way):

* ``step(state, batch, alpha) -> (state, metrics)``: a jitted update of a
  :class:`nemjax.manipulate.TrainState` (:func:`nemjax.manipulate.make_train_step`, optionally
  :func:`nemjax.manipulate.masked`); ``metrics`` is a dict of scalars, averaged between
  evaluations into the history;
* ``stream(epoch)``: an iterable of at least ``steps_per_epoch`` items (e.g. ``(images,
  labels)``), and ``to_batch(step, item)``: the batch mapping the step takes;
* ``evaluate(state, step, train_metrics) -> Evaluation``: the fields recorded, the accuracy the
  α rule reads, a progress line.

Batches must be a pure function of ``(epoch, step)`` so that a run resumed from
``ckpt_root/last`` (:mod:`nemjax.manipulate.checkpoints`, written after every evaluation,
atomically) sees the batches an uninterrupted run sees. Ctrl-C / SIGTERM propagate out of the
loop; the last checkpoint is always complete, so the same call resumes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.manipulate import alpha as alpha_rule
from nemjax.manipulate import checkpoints as ckpt
from nemjax.manipulate.train import TrainState

__all__ = ["Evaluation", "LoopResult", "Stopped", "run_loop"]

StepFn = Callable[[TrainState, Mapping[str, Any], float], tuple[TrainState, Mapping[str, Any]]]


class Evaluation(NamedTuple):
  """What one evaluation inside the loop reports."""
  fields: dict[str, Any]      # recorded in the history after step, epoch and α
  accuracy: float             # what the α rule reads (e.g. held-out accuracy, %)
  text: str                   # the progress line after "step s/total: "
  postfix: dict[str, str]     # progress-bar postfix
  aux: Any = None             # anything the caller wants back (LoopResult.last)


class LoopResult(NamedTuple):
  state: TrainState           # the final train state
  history: list[dict]         # one record per evaluation (this run and the resumed ones)
  steps: int                  # total steps
  resumed_from: int           # step the run started from (0: fresh)
  seconds: float              # wall time of steps + evaluations (summed over resumes)
  alpha: float                # α used in the last steps
  last: Any                   # ``aux`` of the last evaluation of this run (None: none ran)


class Stopped(Exception):
  """Raised by :func:`run_loop` when ``stop_after_evals`` is reached (``args[0]``: the step)."""


def run_loop(state: TrainState, step: StepFn, stream: Callable[[int], Iterable[Any]],
             to_batch: Callable[[int, Any], Mapping[str, Any]],
             evaluate: Callable[[TrainState, int, dict], Evaluation], *, steps_per_epoch: int,
             epochs: int, eval_every: int | None, alpha: alpha_rule.AlphaConfig,
             reference_accuracy: float, ckpt_root: Path | None = None, fingerprint: str = "",
             desc: str = "fine-tune", progress: bool = True,
             log: Callable[[str], None] = print,
             stop_after_evals: int | None = None) -> LoopResult:
  """Run (or resume) ``epochs * steps_per_epoch`` steps.

  Args:
    state: the initial train state (:func:`nemjax.manipulate.train_init`).
    step: the update (see the module docstring).
    stream: ``epoch -> iterable`` of items; ``to_batch(step, item)`` makes a step's batch.
    evaluate: called after every ``eval_every`` steps (None: once per epoch) and the last.
    steps_per_epoch, epochs: the schedule.
    alpha: the α rule (:class:`~nemjax.manipulate.alpha.AlphaConfig`; ``fixed``: constant α).
    reference_accuracy: the original model's accuracy, the rule's reference.
    ckpt_root: directory of the ``last`` checkpoint (``None``: no checkpoints, no resume).
    fingerprint: stored in checkpoints; a checkpoint with another one is refused.
    desc, progress, log: progress bar title, whether it is shown, line printer.
    stop_after_evals: stop (without finishing) after this many evaluations (raises
      :class:`Stopped`; tests).

  Returns:
    A :class:`LoopResult`.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  total = epochs * steps_per_epoch
  eval_every = eval_every or steps_per_epoch
  # Commit every leaf to the device: a mix of committed (restored) and uncommitted (fresh
  # optimizer state) inputs would compile the step a second time once its outputs come back.
  state = jax.device_put(state, jax.devices()[0])
  fixed = alpha.fixed
  alpha_state = None if fixed is not None else alpha_rule.alpha_init(reference_accuracy, alpha)
  history: list[dict] = []
  start, seconds = 0, 0.0
  if ckpt_root is not None and ckpt.find_checkpoint(ckpt_root) is not None:
    meta = ckpt.read_checkpoint_meta(ckpt_root)
    if meta.get("fingerprint") != fingerprint:
      raise ValueError(f"{ckpt_root} holds a checkpoint of another configuration; use a new "
                       "output directory or delete it")
    state, meta = ckpt.restore_checkpoint(ckpt_root, state)
    start, history, seconds = int(meta["step"]), list(meta["history"]), float(meta["seconds"])
    if alpha_state is not None:
      alpha_state = alpha_rule.AlphaState(
          alpha=jnp.asarray(meta["alpha"], jnp.float32),
          reference_accuracy=jnp.asarray(reference_accuracy, jnp.float32),
          count=jnp.asarray(meta["alpha_count"], jnp.int32))
    if int(state.step) != start:
      raise ValueError(f"corrupt checkpoint in {ckpt_root}: step {int(state.step)} != {start}")
    log(f"resuming from the checkpoint at step {start}/{total}")

  def current_alpha() -> float:
    return float(fixed) if alpha_state is None else float(alpha_state.alpha)

  last = None
  bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, unit="step")
  epoch, it, pending, evals_done = None, None, [], 0
  t_last = time.time()
  for s in range(start, total):
    e, i = divmod(s, steps_per_epoch)
    if epoch != e:
      epoch, it = e, iter(stream(e))
      for _ in range(i):  # resume inside an epoch: skip the batches already used
        next(it)
    try:
      item = next(it)
    except StopIteration as stop:
      raise ValueError(f"the training stream yielded fewer than steps_per_epoch="
                       f"{steps_per_epoch} batches in epoch {e}") from stop
    a = current_alpha()
    state, m = step(state, to_batch(s, item), a)
    pending.append(m)
    bar.update(1)
    done = s + 1
    if done % eval_every == 0 or done == total:
      train_m = {k: float(np.mean([float(p[k]) for p in pending])) for k in pending[0]}
      pending = []
      ev = evaluate(state, done, train_m)
      last = ev.aux
      record = {"step": done, "epoch": done / steps_per_epoch, "alpha": a, **ev.fields,
                **train_m}
      if alpha_state is not None:
        alpha_state = alpha_rule.alpha_update(alpha_state, ev.accuracy, alpha)
      now = time.time()
      seconds += now - t_last
      t_last = now
      record["seconds"] = seconds
      history.append(record)
      bar.set_postfix(**ev.postfix, alpha=f"{a:.3g}")
      log(f"step {done}/{total}: {ev.text}, α {a:.3g} -> {current_alpha():.3g}")
      if ckpt_root is not None:
        meta = {"step": done, "fingerprint": fingerprint, "history": history,
                "seconds": seconds, "alpha": current_alpha(),
                "alpha_count": 0 if alpha_state is None else int(alpha_state.count)}
        ckpt.save_checkpoint(ckpt_root, state, meta)
      evals_done += 1
      if stop_after_evals is not None and evals_done >= stop_after_evals and done < total:
        bar.close()
        raise Stopped(done)
  bar.close()
  last_alpha = history[-1]["alpha"] if history else current_alpha()
  return LoopResult(state, history, total, start, seconds, last_alpha, last)
