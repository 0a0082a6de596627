"""Pruning as a defence against feature-visualisation manipulation (Nanfack et al. 2024).

:func:`run_prune_defence` prunes the original model (global unstructured L1 magnitude, or the
attacked layer's most vulnerable channels), recovers it by distillation and attacks it again;
:func:`nemjax.manipulate.report.plot_prune_defence` draws the result.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flax import nnx

from nemjax import models
from nemjax.files import atomic_write_text, claim_record
from nemjax.manipulate import inputs as minputs
from nemjax.manipulate import prune
from nemjax.manipulate import report
from nemjax.manipulate.attack import finetune
from nemjax.manipulate.config import ExperimentInputs, PruneDefenceConfig
from nemjax.manipulate.evaluation import (Accuracies, accuracy_note, attack_metrics,
                                          canonical_layers, embedder_description,
                                          make_evaluator, make_reference)

__all__ = ["channel_param_prefixes", "run_prune_defence", "run"]


def channel_param_prefixes(model: nnx.Module, layer: str) -> list[str]:
  """Parameter path prefixes whose output channels are the channels of ``layer``: walking back
  from ``layer`` in forward order, every parametrised module up to and including the first conv
  / linear kernel (e.g. SmallCNN ``block4`` -> ``["features/13", "features/12"]``, its BatchNorm
  and conv; ResNet ``layer4`` -> ``layer4/1/bn2``, ``layer4/1/conv2``; a residual block's
  skip path is not pruned)."""
  names = models.layer_names(model.arch)
  idx = names.index(models.canonical_layer(model.arch, layer))
  state = nnx.state(model)
  owned: dict[str, list[str]] = {}
  for path in prune.leaf_paths(state):
    module, _, leaf = path.rpartition("/")
    owned.setdefault(module.replace("/", "."), []).append(leaf)
  out = []
  for name in reversed(names[:idx + 1]):
    if name in owned:
      out.append(name.replace(".", "/"))
      if "kernel" in owned[name]:
        return out
  raise ValueError(f"no conv / linear kernel feeds layer {layer!r} of {model.arch}")


def run_prune_defence(defence: PruneDefenceConfig, inputs: ExperimentInputs, *,
                      progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
  """Pruning as a defence (Nanfack et al. 2024): prune, recover by distillation, attack again.

  1. attack the unpruned model (``defence.attack``) -> per-channel CLIP-δ (the vulnerability score);
  2. for each L1 rate (global unstructured magnitude pruning of conv / linear kernels) and each
     vulnerability rate (zero that fraction of the attacked layer's channels, highest CLIP-δ
     first): prune the original weights, fine-tune ``recover_steps`` steps with distillation
     only (teacher: the unpruned model, masks re-applied after every update), then run the same
     attack on the pruned model (teacher: the pruned model) with the masks kept.

  Every accuracy is measured twice, on the held-out images (``heldout_acc_*``, which neither
  the recovery nor the attack ever trains on; the α rule reads it) and on the fixed sample of
  the training stream (``train_acc_*``).

  Returns:
    One row per (method, rate): train and held-out accuracy of the original model, after
    pruning + recovery and after the attack, the held-out change the attack caused, top-n
    overlap, Kendall-τ, CLIP-δ (means over attacked, unpruned channels).
  """
  config, recover_steps = defence.attack, defence.recover_steps
  model = inputs.model
  layers = canonical_layers(model, config.layers)
  if not recover_steps <= inputs.steps_per_epoch:
    raise ValueError(f"recover_steps: must be in [1, {inputs.steps_per_epoch}] (one epoch of "
                     f"the training stream), got {recover_steps}")
  _, params = nnx.split(model)
  evaluate = make_evaluator(model, inputs.normalize, layers, config.embed_layer,
                            config.eval_batch_size)
  ok = config.overlap_k
  quiet = lambda s: None

  def attack(p, masks, method, rate, acc_pruned: Accuracies):
    # channels pruned to a constant are left out of the attack and the means by make_reference
    ref = make_reference(config, inputs, evaluate, p, log=quiet)
    res = finetune(config, inputs, ref, evaluate, p, masks=masks, progress=progress, log=quiet)
    rows, chans, _ = attack_metrics(config, ref, res.after, res.accuracy)
    r = rows[0]
    orig = ref_original.accuracy
    row = {"method": method, "rate": float(rate),
           "pruned_fraction": 0.0 if masks is None else prune.pruned_fraction(masks, p),
           "train_acc_original": orig.train, "heldout_acc_original": orig.heldout,
           "train_acc_pruned": acc_pruned.train, "heldout_acc_pruned": acc_pruned.heldout,
           "train_acc_attacked": res.accuracy.train,
           "heldout_acc_attacked": res.accuracy.heldout,
           "delta_heldout_acc": res.accuracy.heldout - acc_pruned.heldout,
           f"top{ok}_overlap": r[f"top{ok}_overlap"], "kendall_tau": r["kendall_tau"],
           "clip_delta": r["clip_delta"], "channels": r["channels"]}
    log(f"{method} {rate:.3g}: held-out accuracy {acc_pruned.heldout:.2f}% after pruning, "
        f"{res.accuracy.heldout:.2f}% after the attack (train {acc_pruned.train:.2f}% / "
        f"{res.accuracy.train:.2f}%); CLIP-δ {r['clip_delta']:.3f}, "
        f"top-{ok} overlap {r[f'top{ok}_overlap']:.2f}")
    return row, chans

  ref_original = make_reference(config, inputs, evaluate, params, log=quiet)
  row, chans = attack(params, None, "none", 0.0, ref_original.accuracy)
  results = [row]
  width = ref_original.attacked[layers[0]].shape[0]
  scores = np.full((width,), np.nan)
  for c in chans:
    scores[c["channel"]] = c["clip_delta"]
  prefixes = channel_param_prefixes(model, layers[0])
  recover_cfg = dataclasses.replace(config, epochs=1, eval_every=recover_steps)
  recover_inputs = dataclasses.replace(inputs, steps_per_epoch=recover_steps)
  for method, rates in (("l1", defence.l1_rates), ("vulnerability", defence.vulnerability_rates)):
    for rate in rates:
      if method == "l1":
        masks = prune.l1_unstructured_masks(params, rate)
      else:
        masks = prune.vulnerability_masks(params, prefixes, scores, rate=rate)
      pruned = prune.apply_masks(params, masks)
      rec = finetune(recover_cfg, recover_inputs, ref_original, evaluate, pruned,
                     teacher_params=params, masks=masks, attack=False, progress=progress,
                     log=quiet)
      row, _ = attack(rec.params, masks, method, rate, rec.accuracy)
      results.append(row)
  return results


def run(defence: PruneDefenceConfig, out_dir: str | os.PathLike, *, default: Any = None,
        embedder: Callable[[np.ndarray], Any] | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> tuple[list[dict], str]:
  """The pruning defence from a config: its inputs (:func:`nemjax.manipulate.inputs.load_sources`;
  ``default``: the built embedded default), :func:`run_prune_defence`, and ``results.csv``,
  ``results.md``, ``prune_defence.png`` and ``config.json`` in ``out_dir`` (another
  configuration's results there are refused, the differing fields named; a rerun starts over).

  Returns:
    ``(rows, table)``: the result rows and their markdown table with its notes.
  """
  out = Path(out_dir)
  config = defence.attack
  inputs, run_info = minputs.load_sources(config, default)
  inputs.embedder = embedder
  record = defence.to_json() | {"run": run_info, "embedder": config.data.embedder}
  # another configuration's results are not overwritten: the differing fields are named
  claim_record(out / "config.json", record, what="pruning-defence results",
               remedy="use another --out or delete it")
  rows = run_prune_defence(defence, inputs, progress=progress, log=log)
  table = report.format_table(rows, overlap_k=config.overlap_k)
  atomic_write_text(out / "results.csv", report.csv_text(rows))
  note = ("\n\nΔ held-out acc. = held-out accuracy after the attack − that of the pruned "
          f"model. *CLIP-δ with {embedder_description(inputs, config)} as the embedding.* "
          f"{accuracy_note(inputs)}\n")
  atomic_write_text(out / "results.md", "# Pruning defence (push-down attack)\n\n" + table
                    + note)
  report.plot_prune_defence(out / "prune_defence.png", rows,
                            title=f"pruning defence: push-down on {config.layers[0]}")
  return rows, table + "\n\n" + accuracy_note(inputs)
