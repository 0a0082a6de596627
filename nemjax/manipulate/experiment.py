"""End-to-end fine-tuning attack on feature visualisation (Nanfack et al. 2024, Table 1).

``experiments/manipulate.py`` is a thin CLI over :func:`run` (model and data from the paths
of a :class:`~nemjax.manipulate.config.ManipulateConfig`, :mod:`nemjax.manipulate.inputs`) and
so :func:`run_experiment`, which

1. evaluates the original model on the *ranking set* (the probe images, plus the decoys for
   push-up): per-channel activations ``E[n, j] = ‖f^{(l,j)}(x_n)‖²``, logits and pooled
   features for the embedder; and its accuracy on the *held-out images* (which no fine-tuning
   step, distillation batch or top-k reference ever sees) and on a fixed sample of the
   training stream;
2. takes each channel's initial top-k images and builds the attack (push-down on the top-k
   images, push-up towards decoy images, or fairwashing between two groups);
3. fine-tunes (:func:`nemjax.manipulate.attack.finetune` through the generic loop
   :func:`nemjax.manipulate.loop.run_loop`) with ``α · L_A + (1 − α) · L_M``, each
   step on ``batch_size`` images of the training stream plus ``attack_batch_size`` images of the
   ranking set (and ``decoys_per_step`` decoys), evaluating every ``eval_every`` steps; after an
   evaluation α follows the dynamic rule (:func:`nemjax.manipulate.alpha_update`), driven by
   the held-out accuracy, unless it is fixed, and the train state is checkpointed
   (:mod:`nemjax.manipulate.checkpoints`:
   ``OUT/checkpoints/last``, written next to it and swapped in, so a kill at any point leaves a
   complete checkpoint);
4. re-evaluates and reports, per attacked layer (means over attacked channels): overlap of the
   top-5 sets before/after, Kendall-τ and τ-W of the activation rankings, CLIP-δ and CLIP-W,
   train and held-out accuracy before/after (fairwash: also DDI / DEO); writes
   ``metrics.csv``/``metrics.md``, ``channels.csv``, ``topk_before_after.png``
   (:mod:`nemjax.manipulate.report`), and — as the thesis compares them —
   activation-maximisation images of a few attacked channels for the original and the
   fine-tuned model from the same random start (``featvis_before_after.png``, and their pixel
   correlation in the table, undefined for a constant image); then ``history.json``,
   ``summary.json`` and the fine-tuned model (``OUT/model``, a :mod:`nemjax.models.checkpoint`).

The pruning defence built on the same pieces is :mod:`nemjax.manipulate.defence`.

Decisions (documented departures from the papers, all switchable):

* **Embedder.** CLIP-δ / CLIP-W use the *original* model's pooled features (``embed_layer``,
  default ``avgpool``) as the image embedding — :func:`nemjax.metrics.penultimate_embedder`'s
  definition, computed from the same forward pass as the initial activations. It stands in for
  CLIP, which needs weights nemjax cannot download; any ``embedder(images uint8) -> (n, D)`` can
  be passed instead, e.g. CLIP ViT-B/32 from a local state dict
  (:func:`nemjax.metrics.load_embedder` ``("clip:PATH")``, the CLIs' ``--embedder``).
* **Loss scale.** The papers' push-down loss is a plain sum of energies. Minimised as stated
  on the embedded SmallCNN (block4 feeds a linear classifier through global pooling) it shrinks
  every channel uniformly — we measured the mean energy fall to 7·10⁻⁴ of its value with the
  top-5 sets still half unchanged — because the classifier undoes the scale, so the
  distillation term does not object and the rankings (the explanations) barely move. With
  ``loss_scale="relative"`` (default) every attack term is divided by the batch's mean energy of
  the channel (gradient through both), which cancels the rescaling direction
  (:mod:`nemjax.manipulate.attack` gives the weights); ``"sum"`` is the papers' statement.
* **Accuracy.** Top-1 (%) on held-out images no step or ranking sees, next to the same on a
  fixed sample of the training stream; agreement with the original model on a set without
  labels (:mod:`nemjax.manipulate.evaluation`). The α rule reads the held-out accuracy.
* **Resume.** Batches are a pure function of ``(seed, step)`` (training stream: one seeded
  permutation per epoch; ranking-set and decoy samples from a generator seeded with
  ``(seed, stream, step)``), so a run resumed from ``OUT/checkpoints/last`` sees exactly the
  batches an uninterrupted run sees and, on the same machine, ends with the same parameters.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from nemjax import models
from nemjax.files import atomic_write_text, check_record, write_json
from nemjax.manipulate import checkpoints as ckpt
from nemjax.manipulate import featvis
from nemjax.manipulate import inputs as minputs
from nemjax.manipulate import report
from nemjax.manipulate.attack import finetune
from nemjax.manipulate.config import ExperimentInputs, ManipulateConfig
from nemjax.manipulate.evaluation import (accuracy_kind, accuracy_note, attack_metrics,
                                          canonical_layers, embedder_description,
                                          make_evaluator, make_reference, nanmean)
from nemjax.manipulate.loop import Stopped

__all__ = ["feature_visualisations", "pixel_correlation", "run_experiment", "run"]

PyTree = Any


def feature_visualisations(model: nnx.Module, normalize: Callable, params: PyTree, layer: str,
                           channels: Sequence[int], key: jax.Array, *, size: int,
                           steps: int) -> np.ndarray:
  """Activation-maximisation images (:func:`nemjax.manipulate.visualize_channels`) of
  ``channels`` of ``layer`` for the model with variables ``params``.

  The same ``key`` gives the same initial spectra and transforms, so visualisations of the
  original and the fine-tuned model differ only by what the fine-tune changed.

  Returns:
    ``(len(channels), size, size, 3)`` float32 images in [0, 1].
  """
  apply_fn, _ = models.pure_apply(model, taps=(layer,), upto=layer)

  def features_fn(img):  # (B, H, W, 3) in [0, 1] -> (B, h, w, C)
    return apply_fn(params, normalize(img * 255.0))[1][layer]

  return np.asarray(featvis.visualize_channels(features_fn, None, np.asarray(channels), key,
                                               size=size, steps=steps))


def pixel_correlation(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
  """(n,) Pearson correlation of each pair of images ``a[i]``, ``b[i]`` (n, H, W, 3), in float64.

  A correlation with a constant image is undefined: where either image's pixel standard
  deviation is at most ``tolerance`` (pixel units; the default is 1/40 of an 8-bit level in
  [0, 1]), the result is NaN — never ±1 from rounding noise around a flat image.
  """
  if np.shape(a) != np.shape(b) or np.ndim(a) < 2:
    raise ValueError(f"pixel_correlation: expected two (n, ...) image arrays of one shape, got "
                     f"{np.shape(a)} and {np.shape(b)}")
  a = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
  b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  sa, sb = np.sqrt((a * a).mean(1)), np.sqrt((b * b).mean(1))
  ok = (sa > tolerance) & (sb > tolerance)
  den = np.where(ok, sa * sb, 1.0) * a.shape[1]
  return np.where(ok, (a * b).sum(1) / den, np.nan)


# ---------------------------------------------------------------------------- the experiment
def run_experiment(config: ManipulateConfig, inputs: ExperimentInputs, out_dir: str | os.PathLike,
                   *, run_info: Mapping[str, Any] | None = None, progress: bool = True,
                   log: Callable[[str], None] = print,
                   stop_after_evals: int | None = None) -> dict:
  """Run (or resume) one fine-tuning attack and write every output into ``out_dir``.

  Args:
    config: settings (checked when they were built).
    inputs: model and data (see :class:`ExperimentInputs`).
    out_dir: output directory; re-running with the same configuration resumes from
      ``out_dir/checkpoints/last``, another configuration there is refused (ValueError).
    run_info: extra JSON-serialisable facts stored in ``config.json`` (e.g. paths).
    progress: progress bar.
    log: line printer.
    stop_after_evals: stop after that many evaluations (returns ``{"stopped_at": step}``).

  Returns:
    The summary dict also written to ``summary.json``.
  """
  t_start = time.time()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  model = inputs.model
  layers = canonical_layers(model, config.layers)
  cfg_json = {"config": config.to_json(), "run": dict(run_info or {}),
              "arch": model.arch, "num_classes": int(model.num_classes),
              "steps_per_epoch": int(inputs.steps_per_epoch),
              "num_probe_images": int(len(inputs.probe_images)),
              "num_heldout_images": int(len(inputs.heldout_images)),
              "num_train_eval_images": int(len(inputs.train_eval_images)),
              "num_decoys": 0 if inputs.decoy_images is None else int(len(inputs.decoy_images))}
  # what the fine-tune depends on (the feature-visualisation settings only change the report)
  # (and where the data came from: run_info's data_fingerprint, not the paths as typed)
  trained = {k: v for k, v in cfg_json["config"].items()
             if k not in ("featvis", "data", "arch")}
  fingerprint = ckpt.fingerprint({k: v for k, v in cfg_json.items() if k != "run"} |
                                 {"config": trained} |
                                 {"data": (run_info or {}).get("data_fingerprint")})
  ckpt_root = out / "checkpoints"
  old = ckpt.read_checkpoint_meta(ckpt_root) if ckpt_root.exists() else None
  if old is not None and old.get("fingerprint") != fingerprint:
    stored = out / "config.json"
    if stored.is_file():  # name the fields that differ (the check raises)
      check_record(stored, cfg_json | {"fingerprint": fingerprint},
                   what="a fine-tuning run", remedy="use another --out or delete it")
    raise ValueError(f"{out} holds a run of another configuration; use a new --out or delete it")
  write_json(out / "config.json", cfg_json | {"fingerprint": fingerprint})

  graphdef, params = nnx.split(model)
  evaluate = make_evaluator(model, inputs.normalize, layers, config.embed_layer,
                            config.eval_batch_size)
  ref = make_reference(config, inputs, evaluate, params, log=log)
  log(f"original model: held-out {accuracy_kind(inputs.heldout_labels)} "
      f"{ref.accuracy.heldout:.2f}% ({len(inputs.heldout_images)} images), train "
      f"{ref.accuracy.train:.2f}% ({len(inputs.train_eval_images)} images); "
      f"attacking {sum(int(m.sum()) for m in ref.attacked.values())} channels of "
      f"{', '.join(layers)} ({config.attack}, k={config.k})")
  try:
    result = finetune(config, inputs, ref, evaluate, params, ckpt_root=ckpt_root,
                      fingerprint=fingerprint, progress=progress, log=log,
                      stop_after_evals=stop_after_evals)
  except Stopped as stop:
    return {"stopped_at": int(stop.args[0])}

  rows, channel_rows, topk_after = attack_metrics(config, ref, result.after, result.accuracy)
  for r in rows:
    r["alpha"] = float(result.alpha)
  if config.featvis.channels:
    shown = report.shown_channels(ref.attacked, config.featvis.channels)
    key = jax.random.key(config.seed)
    vis = {side: {name: feature_visualisations(model, inputs.normalize, p, name, js, key,
                                               size=ref.images.shape[1],
                                               steps=config.featvis.steps)
                  for name, js in shown.items()}
           for side, p in (("before", params), ("after", result.params))}
    corr = {name: pixel_correlation(vis["before"][name], vis["after"][name],
                                    config.featvis.tolerance) for name in shown}
    for r in rows:  # constant visualisations have no correlation: counted, not averaged
      c = corr.get(r["layer"], np.zeros((0,)))
      r["featvis_corr"] = nanmean(c)
      r["featvis_undefined"] = int(np.isnan(c).sum())
    report.plot_featvis(out / "featvis_before_after.png", vis["before"], vis["after"], shown,
                        corr, title=f"{config.attack}: activation maximisation before / after")
  table = report.format_table(rows, overlap_k=config.overlap_k)
  atomic_write_text(out / "metrics.csv", report.csv_text(rows))
  atomic_write_text(out / "channels.csv", report.csv_text(channel_rows))
  note = (f"\n\n*CLIP-δ / CLIP-W computed with {embedder_description(inputs, config)} as the "
          "image embedding.* "
          f"Means over attacked channels; rankings over {ref.images.shape[0]} images; "
          f"{accuracy_note(inputs)}")
  if config.featvis.channels:
    note += (" Feature-visualisation r: mean pixel correlation of the defined pairs; a pair with "
             "a constant image has none (`featvis_undefined` counts them).")
  if config.attack == "fairwash":
    note += (" DDI / DEO: the model's disparate-impact / equal-opportunity differences between "
             "the two groups on the probe images, averaged over classes.")
  note += "\n"
  atomic_write_text(out / "metrics.md",
                    f"# {config.attack} fine-tuning attack ({model.arch})\n\n" + table + note)
  write_json(out / "history.json", result.history)
  report.plot_topk(out / "topk_before_after.png", ref, topk_after, overlap_k=config.overlap_k,
            class_names=inputs.class_names,
            title=f"{config.attack}: top-{config.overlap_k} images before / after fine-tuning")
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  tuned = nnx.merge(graphdef, result.params)
  checkpoint.save(tuned, out / "model", arch=model.arch, num_classes=int(model.num_classes),
                  extra_meta={"attack": config.attack, "layers": list(layers),
                              "fingerprint": fingerprint}, overwrite=True)
  summary = {"rows": rows, "history": result.history, "steps": result.steps,
             "resumed_from": result.resumed_from, "train_seconds": result.train_seconds,
             "seconds_this_run": time.time() - t_start, "fingerprint": fingerprint,
             "accuracy_note": accuracy_note(inputs)}
  write_json(out / "summary.json", summary)
  return summary


def run(config: ManipulateConfig, out_dir: str | os.PathLike, *, default: Any = None,
        embedder: Callable[[np.ndarray], Any] | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
  """One attack from a config: its inputs (:func:`nemjax.manipulate.inputs.load_sources`;
  ``default``: the built embedded default when ``config.data`` names no probe set) and
  :func:`run_experiment` with ``embedder`` (``None``: the original model's pooled features).

  Returns:
    The summary dict (:func:`run_experiment`).
  """
  inputs, run_info = minputs.load_sources(config, default)
  inputs.embedder = embedder
  run_info = dict(run_info, embedder=config.data.embedder)
  return run_experiment(config, inputs, out_dir, run_info=run_info, progress=progress, log=log)
