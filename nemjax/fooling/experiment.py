"""Fooling explanations by fine-tuning (Heo, Joo & Moon, NeurIPS 2019), end to end.

``experiments/heo_fooling.py`` is a thin CLI over :func:`run`: model and data from a
:class:`~nemjax.fooling.config.FoolingConfig`'s :class:`~nemjax.manipulate.config.DataSources`
(:func:`nemjax.manipulate.inputs.load_sources`: training stream, held-out images), then
:func:`run_experiment`:

1. the original model's held-out top-1/top-5 accuracy and the heatmaps of every measured
   method (true class; active: classes c1 and c2 on held-out 2×2 mosaics);
2. the fine-tune: ``CE(D) + λ · L_F(D_fool)`` (:func:`nemjax.fooling.losses.make_penalty` in
   :func:`nemjax.manipulate.penalised.make_penalised_step`), Adam, model in inference mode
   (BatchNorm statistics frozen), each step on ``batch_size`` images of the training stream
   (passive fooling: ``D_fool = D``; active: ``mosaics_per_step`` mosaics of training images of
   c1 and c2) through :func:`nemjax.manipulate.loop.run_loop`: an evaluation (held-out
   accuracy, FSR of the fooled method) and a checkpoint every ``eval_every`` steps, so the same
   call resumes after a kill; batches are a pure function of ``(seed, step)``;
3. the transfer table (every measured method's FSR before/after and correlations),
   ``results.md`` / ``results.json``, ``panel.png`` (original vs fooled maps on the same images),
   ``history.json``, ``summary.json`` and the fine-tuned model ``OUT/model``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import models
from nemjax.files import atomic_write_text, check_record, write_json
from nemjax.fooling import losses
from nemjax.fooling import metrics as fm
from nemjax.fooling import report
from nemjax.fooling.config import FoolingConfig
from nemjax.fooling.maps import logits_of, map_function, maps_of, mosaics
from nemjax.manipulate import checkpoints as ckpt
from nemjax.manipulate import inputs as minputs
from nemjax.manipulate import train
from nemjax.manipulate.alpha import AlphaConfig
from nemjax.manipulate.config import ExperimentInputs
from nemjax.manipulate.loop import Evaluation, Stopped, run_loop
from nemjax.manipulate.penalised import make_penalised_step

__all__ = ["eval_set", "measure", "run_experiment", "run"]

FOOLED_KERNEL = losses.FOOLING_METHODS


def eval_set(config: FoolingConfig, inputs: ExperimentInputs, original_pred: np.ndarray
             ) -> dict:
  """The held-out images the maps are measured on: ``{"images": uint8 (n, H, W, 3),
  "targets": (n,)}`` (passive: the true class, the original prediction where unlabelled;
  active: mosaics of held-out c1 and c2 images, target c1)."""
  n = config.report.eval_images
  x, y = inputs.heldout_images, inputs.heldout_labels
  if config.fooling == "active":
    c1, c2 = config.active.c1, config.active.c2
    k = int(min((y == c1).sum(), (y == c2).sum()))
    rng = np.random.default_rng([config.seed, 0x6D6F73])
    m = mosaics(x[y == c1], x[y == c2], rng, k if n is None else min(n, max(k, 1)))
    return dict(images=m, targets=np.full(len(m), c1, np.int32))
  t = np.where(y >= 0, y, original_pred).astype(np.int32)
  rows = slice(None) if n is None else slice(0, n)
  return dict(images=x[rows], targets=t[rows])


def _all_maps(fns: Mapping[str, Callable], params, ev: dict, config: FoolingConfig,
              normalize) -> dict:
  """{method: maps} (active: {method: (maps c1, maps c2)})."""
  bs = config.eval_batch_size
  out = {}
  for name, fn in fns.items():
    if config.fooling == "active":
      c2 = np.full(len(ev["images"]), config.active.c2, np.int32)
      out[name] = (maps_of(fn, params, ev["images"], ev["targets"], normalize, bs),
                   maps_of(fn, params, ev["images"], c2, normalize, bs))
    else:
      out[name] = maps_of(fn, params, ev["images"], ev["targets"], normalize, bs)
  return out


def _grid(config: FoolingConfig, layer_hw: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
  return lambda m: fm.pool_to(m, layer_hw)


def measure(config: FoolingConfig, before: dict, after: dict, layer_hw: tuple[int, int]
            ) -> list[dict]:
  """One row per measured method: FSR before/after and the correlations (see the module
  docstring of :mod:`nemjax.fooling.metrics`; input-level maps pooled to the layer grid for
  the fooling scores)."""
  kind, tau, rows = config.fooling, config.report.threshold, []
  g = _grid(config, layer_hw)
  for name in before:
    if kind == "active":
      (b1, b2), (a1, a2) = before[name], after[name]
      s_before = fm.fooling_score(kind, None, active=(g(b1), g(b2), g(b1), g(b2)))
      s_after = fm.fooling_score(kind, None, active=(g(a1), g(a2), g(b1), g(b2)))
      rows.append({"method": name, "fsr_before": fm.fooling_success_rate(kind, s_before, tau),
                   "fsr_after": fm.fooling_success_rate(kind, s_after, tau),
                   "bitarget_before": fm.nanmean(fm.bitarget_correlation(b1, b2, b1, b2)),
                   "bitarget_after": fm.nanmean(fm.bitarget_correlation(a1, a2, b1, b2))})
      continue
    b, a = before[name], after[name]
    rows.append({
        "method": name,
        "fsr_before": fm.fooling_success_rate(kind, fm.fooling_score(kind, g(b), g(b)), tau),
        "fsr_after": fm.fooling_success_rate(kind, fm.fooling_score(kind, g(a), g(b)), tau),
        "correlation": fm.nanmean(fm.pearson(b, a)),
        "sign_correlation": fm.nanmean(fm.sign_correlation(b, a)),
        "location_before": fm.nanmean(fm.location_correlation(b)),
        "location_after": fm.nanmean(fm.location_correlation(a)),
        "entropy_before": fm.nanmean(fm.entropy(b)), "entropy_after": fm.nanmean(fm.entropy(a))})
  return rows


def _accuracy(apply_fn, params, inputs: ExperimentInputs, bs: int, ref: dict | None) -> dict:
  """Held-out top-1 / top-5 (%) and the training sample's top-1; unlabelled rows score
  agreement with the original predictions in ``ref``."""
  out = {}
  for name, x, y in (("held-out", inputs.heldout_images, inputs.heldout_labels),
                     ("train sample", inputs.train_eval_images, inputs.train_eval_labels)):
    logits = logits_of(apply_fn, params, x, inputs.normalize, bs)
    y = np.where(y >= 0, y, ref[name] if ref else np.argmax(logits, 1))
    out[name] = {"top1": fm.topk_accuracy(logits, y, 1), "top5": fm.topk_accuracy(logits, y, 5),
                 "pred": np.argmax(logits, 1)}
  return out


def _fool_batch(config: FoolingConfig, inputs: ExperimentInputs, train_xy) -> Callable:
  """``(step, x uint8, y) -> extra batch entries`` of the fooling term."""
  if config.fooling != "active":
    return lambda step, x, y: {"fool_image": x, "fool_label": y}
  xs, ys = train_xy
  c1 = xs[ys == config.active.c1]
  c2 = xs[ys == config.active.c2]

  def extra(step, x, y):
    rng = np.random.default_rng([config.seed, 0x6163, step])
    m = mosaics(c1, c2, rng, config.active.mosaics_per_step)
    return {"fool_image": inputs.normalize(jnp.asarray(m))}
  return extra


def run_experiment(config: FoolingConfig, inputs: ExperimentInputs, out_dir: str | os.PathLike,
                   *, run_info: Mapping[str, Any] | None = None, train_xy=None,
                   progress: bool = True, log: Callable[[str], None] = print,
                   stop_after_evals: int | None = None) -> dict:
  """Run (or resume) one fooling fine-tune and write every output into ``out_dir``.

  Args:
    train_xy: ``(images, labels)`` of the training set (active fooling's mosaics; default:
      the training stream's first epoch).
    stop_after_evals: stop after that many evaluations (returns ``{"stopped_at": step}``).

  Returns:
    The summary written to ``summary.json``.
  """
  t0 = time.time()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  model = inputs.model
  model.eval()
  layer = models.canonical_layer(model.arch, config.layer)
  apply_fn, params = models.pure_apply(model, taps=(layer,))
  graphdef = nnx.split(model)[0]
  normalize = inputs.normalize
  trained_cfg = {k: v for k, v in config.to_json().items() if k not in ("report", "data", "arch")}
  record = {"config": config.to_json(), "run": dict(run_info or {}), "arch": model.arch,
            "steps_per_epoch": int(inputs.steps_per_epoch)}
  fingerprint = ckpt.fingerprint({"config": trained_cfg, "arch": model.arch,
                                  "data": (run_info or {}).get("data_fingerprint")})
  ckpt_root = out / "checkpoints"
  old = ckpt.read_checkpoint_meta(ckpt_root) if ckpt_root.exists() else None
  if old is not None and old.get("fingerprint") != fingerprint:
    if (out / "config.json").is_file():
      check_record(out / "config.json", record | {"fingerprint": fingerprint},
                   what="a fooling run", remedy="use another --out or delete it")
    raise ValueError(f"{out} holds a run of another configuration; use a new --out or delete it")
  write_json(out / "config.json", record | {"fingerprint": fingerprint})
  if np.all(inputs.train_eval_labels < 0):
    raise ValueError("the training stream has no class labels (the CE term needs them): give "
                     "--train-folder")
  if config.fooling == "active" and train_xy is None:
    xs, ys = zip(*inputs.train_batches(0))
    train_xy = (np.concatenate(xs), np.concatenate(ys))

  bs = config.eval_batch_size
  acc0 = _accuracy(apply_fn, params, inputs, bs, None)
  ref_pred = {k: v["pred"] for k, v in acc0.items()}
  ev = eval_set(config, inputs, acc0["held-out"]["pred"])
  key = jax.random.key(config.seed)
  fns = {m: map_function(m, apply_fn, layer, key) for m in config.report.measure}
  fooled_name = FOOLED_KERNEL[config.method]
  fns.setdefault(fooled_name, map_function(fooled_name, apply_fn, layer, key))
  before = _all_maps(fns, params, ev, config, normalize)
  layer_hw = np.asarray(before[fooled_name][0] if config.fooling == "active"
                        else before[fooled_name]).shape[1:3]
  log(f"original model: held-out top-1 {acc0['held-out']['top1']:.2f}% "
      f"({len(inputs.heldout_images)} images); measuring {len(ev['images'])} images")

  optimizer = optax.adam(config.learning_rate)
  penalty = losses.make_penalty(config.fooling, config.method, layer,
                                classes=(config.active.c1, config.active.c2))
  step = make_penalised_step(apply_fn, penalty, optimizer, distill=config.distill)
  loop_step = lambda s, b, _alpha: step(s, b, config.lam)
  state = train.train_init(params, optimizer)
  extra = _fool_batch(config, inputs, train_xy)
  fool_fn = {fooled_name: fns[fooled_name]}

  def to_batch(s: int, item) -> dict:
    x = normalize(jnp.asarray(np.asarray(item[0])))
    y = jnp.asarray(np.asarray(item[1], np.int32))
    return {"image": x, "label": y, **extra(s, x, y)}

  def evaluate(st, s, train_m) -> Evaluation:
    del s
    acc = _accuracy(apply_fn, st.params, inputs, bs, ref_pred)
    row = measure(config, {fooled_name: before[fooled_name]},
                  _all_maps(fool_fn, st.params, ev, config, normalize), layer_hw)[0]
    text = (f"held-out top-1 {acc['held-out']['top1']:.2f}% (original "
            f"{acc0['held-out']['top1']:.2f}%), FSR {row['fsr_after']:.1f}% (original "
            f"{row['fsr_before']:.1f}%), CE {train_m['ce']:.4g}, L_F {train_m['penalty']:.4g}")
    return Evaluation({"heldout_top1": acc["held-out"]["top1"], "fsr": row["fsr_after"]},
                      acc["held-out"]["top1"], text,
                      {"acc": f"{acc['held-out']['top1']:.1f}", "fsr": f"{row['fsr_after']:.0f}"})

  try:
    res = run_loop(state, loop_step, inputs.train_batches, to_batch, evaluate,
                   steps_per_epoch=inputs.steps_per_epoch, epochs=config.epochs,
                   eval_every=config.eval_every, alpha=AlphaConfig(fixed=1.0),
                   reference_accuracy=acc0["held-out"]["top1"], ckpt_root=ckpt_root,
                   fingerprint=fingerprint, desc=f"fooling ({config.method}, {config.fooling})",
                   progress=progress, log=log, stop_after_evals=stop_after_evals)
  except Stopped as stop:
    return {"stopped_at": int(stop.args[0])}
  tuned = res.state.params
  acc1 = _accuracy(apply_fn, tuned, inputs, bs, ref_pred)
  after = _all_maps(fns, tuned, ev, config, normalize)
  rows = measure(config, before, after, layer_hw)
  accuracy = {f"{name} top-{k}": (acc0[name][f"top{k}"], acc1[name][f"top{k}"])
              for name in ("held-out", "train sample") for k in (1, 5)}
  table = report.format_table(rows, accuracy, fooled=fooled_name, kind=config.fooling,
                              threshold=config.report.threshold)
  atomic_write_text(out / "results.md", f"# {config.fooling} fooling of {config.method} "
                    f"({model.arch}, {layer}, λ {config.lam:g}, lr {config.learning_rate:g})"
                    f"\n\n{table}")
  k = min(config.report.panel_images, len(ev["images"]))
  cols = {}
  for name in fns:
    if config.fooling == "active":
      for c in (0, 1):
        cols |= {f"{name}\noriginal c{c + 1}": before[name][c][:k],
                 f"{name}\nfooled c{c + 1}": after[name][c][:k]}
    else:
      cols |= {f"{name}\noriginal": before[name][:k], f"{name}\nfooled": after[name][:k]}
  report.plot_panel(out / "panel.png", ev["images"][:k], cols,
                    f"{config.fooling} fooling of {config.method}: original vs fooled")
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  checkpoint.save(nnx.merge(graphdef, tuned), out / "model", arch=model.arch,
                  num_classes=int(model.num_classes),
                  extra_meta={"fooling": config.fooling, "method": config.method,
                              "layer": layer, "fingerprint": fingerprint}, overwrite=True)
  summary = {"rows": rows, "accuracy": accuracy, "steps": res.steps,
             "resumed_from": res.resumed_from, "train_seconds": res.seconds,
             "seconds_this_run": time.time() - t0, "fingerprint": fingerprint, "table": table}
  write_json(out / "results.json", {"rows": rows, "accuracy": accuracy})
  write_json(out / "history.json", res.history)
  write_json(out / "summary.json", summary)
  return summary


def run(config: FoolingConfig, out_dir: str | os.PathLike, *, default: Any = None,
        progress: bool = True, log: Callable[[str], None] = print,
        stop_after_evals: int | None = None, **_: Any) -> dict:
  """One fooling run from a config: its inputs (:func:`nemjax.manipulate.inputs.load_sources`;
  ``default``: the built embedded default) and :func:`run_experiment`."""
  inputs, run_info = minputs.load_sources(config, default)
  return run_experiment(config, inputs, out_dir, run_info=run_info, progress=progress, log=log,
                        stop_after_evals=stop_after_evals)
