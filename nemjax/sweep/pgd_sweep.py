"""The act-avg PGD sweep: attack units of chosen layers at several ε and modes, re-dissect,
and count the units whose Network-Dissection label changed (Srivastava et al., Table 2).

Work is keyed by (layer, unit, ε, mode); each finished group of units is appended to
``results.csv`` atomically, so a re-run of the same command skips finished work and a SIGKILL
loses at most the attack in flight. Groups of ``units_per_call`` units are cut from each
layer's whole unit list (finished units are then dropped from their group), so a resumed run
attacks units in the same groups as an uninterrupted one.

Several processes (``jax.distributed``): every process takes part in the clean dissection
(each loads its shard of the probe set; thresholds, tallies and activations are combined
exactly, so every process holds the whole clean result), the processes agree on the finished
keys, and the unfinished groups, in the sweep's order, are dealt out round-robin
(:func:`nemjax.distributed.split_work`): the same on every process, whatever list a process
sees, since each builds it from the same config and the same finished keys. A group's rows
depend only on its units and names, never on which process runs it. Each process writes its
rows to ``results.<process>.csv``; process 0 merges them into ``results.csv`` and writes the
summary and the clean dissection (:mod:`nemjax.sweep.store`). A killed process loses only its
group in flight: re-running the same command (with any number of processes) resumes.

Poisoned images (:mod:`nemjax.sweep.poison`): the images holding the unit's source or target
concept, at most ``poison_fraction·N``, taken in ``poison_order``: ``concept`` (default, the
paper's public code: source holders, then target holders, in probe order) or ``activation``
(highest clean activation of the unit first).

Units (:mod:`nemjax.sweep.units`): ``num_units`` per layer among those with a clean label and
IoU > ``min_iou``, unless named in ``units`` (which bypasses the bar). Every random draw (units,
targets, noise) is keyed by names -- architecture, layer name, unit, mode, ε
(:mod:`nemjax.sweep.keys`) -- so a layer's rows do not depend on what else the sweep attacks.

Modes: ``u2`` (Eq. 9 with a random target), ``targeted`` (Eq. 9, target from the source's
category), ``u1`` (Eq. 10), and the control ``noise``: random ±ε sign noise (Bernoulli, p = ½)
on the very images U2 poisons, which shows how much of U2's effect is more than chance.

Delivery: with ``uint8`` or ``jpeg`` delivery every attack is measured twice in the same run,
as delivered and as the attacker's exact floats (``*_float`` columns), and the summary reports
the survival rate: float successes that still succeed after delivery / float successes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from nemjax import distributed, figures, preprocess
from nemjax.attacks.act_avg import concept_mask_from_labels, concept_mask_from_unit_masks
from nemjax.attacks.noise import bernoulli_noise
from nemjax.attacks.pgd import random_targets
from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect.driver import LayerDissection, activation_fn, dissect, make_mesh
from nemjax.dissect.outputs import write_layer_outputs
from nemjax.files import write_json
from nemjax.sweep.config import MODES, PGDSweepConfig, eps_to_255, format_eps
from nemjax.sweep.delivery import deliver
from nemjax.sweep.attack import SweepAttack
from nemjax.sweep.measure import batched_activations, redissect_units
from nemjax.sweep.keys import eps_code, item_key
from nemjax.sweep.poison import choose_by_concept, choose_poisoned, poison_cap
from nemjax.sweep.profile import NULL_TIMER, StageTimer
from nemjax.sweep.units import choose_units, eligible_units
from nemjax.sweep import store as store_lib

MODE_TITLES = {"u2": "untargeted (U2)", "targeted": "targeted", "u1": "untargeted (U1)",
               "noise": "noise control (±ε)"}
RESULT_FIELDS = [
    "layer", "unit", "eps", "eps_255", "mode", "mask_source", "poison_order", "delivery",
    "clean_label", "clean_name", "clean_category", "clean_iou",
    "target_label", "target_name",
    "new_label", "new_name", "new_category", "new_iou",
    "source_iou_after", "target_iou_before", "target_iou_after",
    "threshold_before", "threshold_after", "n_candidates", "n_poisoned",
    "changed", "success", "new_label_float", "changed_float", "success_float", "seconds",
]
KEY_FIELDS = ["layer", "unit", "eps", "mode"]
ATTACK_CHUNK = 32  # poisoned images per compiled PGD call (rounded up to the device count)


def features_fn_for(model, layer: str) -> Callable[[jax.Array], jax.Array]:
  """``x01 (N,H,W,3) in [0,1] -> (N,h,w,U)`` activations of ``layer``, NetDissect normalisation
  applied inside, network cut after ``layer``."""
  from nemjax import models
  apply_fn, state = models.pure_apply(model, taps=(layer,), upto=layer)

  def features_fn(x01):
    _, acts = apply_fn(state, preprocess.from_unit_interval_netdissect(x01))
    return acts[layer]
  return features_fn


def _unit_key(seed: int, arch: str, layer: str, unit: int, mode: str) -> jax.Array:
  """The PRNG key of one (arch, layer, unit, mode)'s target draw, keyed by names."""
  return item_key(seed, "pgd/target", arch, layer, unit, mode)


def _noise_key(seed: int, arch: str, layer: str, unit: int, eps: float) -> jax.Array:
  """The PRNG key of the ``noise`` control's ±ε signs of one (arch, layer, unit, ε)."""
  return item_key(seed, "pgd/noise", arch, layer, unit, eps_code(eps))


class SweepInputs(NamedTuple):
  """What every layer of a sweep shares."""
  probe: ProbeSet
  labels: tuple[np.ndarray, np.ndarray]  # (pixels (N, K, sh, sw), scalars (N, S)) of every image
  config: PGDSweepConfig
  mesh: Mesh


class LayerData(NamedTuple):
  """Everything about one layer that every attack on it reuses (from :func:`layer_data`)."""
  layer: str
  arch: str
  clean: LayerDissection        # the clean dissection
  acts: np.ndarray              # (N, h, w, U) clean activations
  per_image_max: np.ndarray     # (N, U) max of each unit over each image
  present: np.ndarray           # (L,) labels (> 0) present in the probe set
  cap: int                      # most poisoned images per unit
  act_fn: Callable              # images 0..255 -> {layer: (B, h, w, U)}
  attack: SweepAttack           # every (ε, mode) of the layer: one compiled step


def layer_data(model, inputs: SweepInputs, layer: str, clean: LayerDissection,
               acts: np.ndarray) -> LayerData:
  """The :class:`LayerData` of ``layer`` (its attack is built, not yet compiled)."""
  c = inputs.config
  attack = SweepAttack(features_fn_for(model, layer), steps=c.attack.steps,
                       chunk=_pad_rows(ATTACK_CHUNK, inputs.mesh.size), mesh=inputs.mesh)
  present = np.flatnonzero(np.asarray(clean.tally.tally_labels) > 0)
  return LayerData(
      layer=layer, arch=str(getattr(model, "arch", type(model).__name__)), clean=clean,
      acts=acts, per_image_max=acts.reshape(acts.shape[0], -1, acts.shape[-1]).max(axis=1),
      present=present[present > 0], cap=poison_cap(inputs.probe.num_images, c.poison_fraction),
      act_fn=activation_fn(model, [layer], mesh=inputs.mesh), attack=attack)


def target_for(inputs: SweepInputs, data: LayerData, unit: int, mode: str) -> int:
  """The target concept of ``unit`` in ``mode`` (0 for ``u1``). ``noise`` uses U2's target,
  so it poisons the same images as U2.

  Candidates: the labels present in the probe set (``mask_source='clean'``: the clean labels
  of the layer's units); ``targeted`` keeps those of the source's category.

  Raises:
    ValueError: no candidate other than the source (no fallback to another rule).
  """
  if mode == "u1":
    return 0
  if mode == "noise":
    mode = "u2"
  probe, clean = inputs.probe, data.clean
  src = int(clean.best_label[unit])
  cands = data.present
  where = "present in the probe set"
  if inputs.config.mask_source == "clean":
    cands = np.unique(clean.best_label[clean.best_label > 0])
    where = f"that label a unit of {data.layer} (mask source 'clean')"
  if mode == "targeted":
    cat = probe.primary_category[src]
    cands = cands[probe.primary_category[cands] == cat]
    where = f"of category {probe.category_names[cat]!r} {where}"
  cands = cands[(cands != src) & (cands != 0)]
  if cands.size == 0:
    raise ValueError(f"layer {data.layer} unit {unit} ({mode}): no target label other than "
                     f"its clean label {probe.label_names[src]!r} is {where}")
  key = _unit_key(inputs.config.seed, data.arch, data.layer, unit, mode)
  return int(random_targets(key, cands.astype(np.int32), np.array([src], np.int32))[0])


def poisoned_rows(inputs: SweepInputs, data: LayerData, source: int, target: int,
                  unit: int) -> tuple[np.ndarray, int]:
  """``(rows (P,) sorted int64, n_candidates)``: the images poisoned for ``unit`` (see
  :mod:`nemjax.sweep.poison`) and the number holding the source or the target concept."""
  has_src, has_tgt = contains(inputs, data, source), contains(inputs, data, target)
  if inputs.config.poison_order == "concept":
    rows = choose_by_concept(has_src, has_tgt, data.cap)
  else:
    rows = choose_poisoned(has_src | has_tgt, data.per_image_max[:, unit], data.cap)
  return rows, int((has_src | has_tgt).sum())


def concept_masks(inputs: SweepInputs, data: LayerData, concept: int,
                  rows: np.ndarray) -> np.ndarray:
  """(len(rows), sh, sw) float32 mask of ``concept`` on probe ``rows`` (zeros for concept 0)."""
  sh, sw = inputs.probe.seg_size
  if concept == 0 or len(rows) == 0:
    return np.zeros((len(rows), sh, sw), np.float32)
  if inputs.config.mask_source == "labels":
    pixels, scalars = inputs.labels
    return np.asarray(concept_mask_from_labels(pixels[rows], scalars[rows], concept))
  units = np.flatnonzero(data.clean.best_label == concept)
  if units.size == 0:
    return np.zeros((len(rows), sh, sw), np.float32)
  return np.asarray(concept_mask_from_unit_masks(
      data.acts[rows], data.clean.thresholds, units, (sh, sw)))


def contains(inputs: SweepInputs, data: LayerData, concept: int) -> np.ndarray:
  """(N,) bool: images whose ``concept`` mask is non-empty."""
  n = inputs.probe.num_images
  if concept == 0:
    return np.zeros(n, bool)
  if inputs.config.mask_source == "labels":
    pixels, scalars = inputs.labels
    return (pixels == concept).any(axis=(1, 2, 3)) | (scalars == concept).any(axis=1)
  out = np.zeros(n, bool)
  for s in range(0, n, 64):
    rows = np.arange(s, min(s + 64, n))
    out[rows] = concept_masks(inputs, data, concept, rows).reshape(len(rows), -1).any(axis=1)
  return out


def new_activations(inputs: SweepInputs, data: LayerData, images: np.ndarray) -> np.ndarray:
  """(P, h, w, U) activations of delivered images (0..255), batched like the dissection."""
  return batched_activations(data.act_fn, images, {data.layer: data.acts.shape[1:]},
                             batch_size=inputs.config.probe_pass.batch_size,
                             num_devices=inputs.mesh.size)[data.layer]


def _pad_rows(n: int, multiple: int) -> int:
  """``n`` rounded up to a multiple of ``multiple``."""
  return n + (-n) % multiple


class _Plan(NamedTuple):
  """One unit's attack in a group."""
  unit: int
  source: int          # clean label
  target: int          # target concept (0: none)
  n_candidates: int    # images holding the source or target concept
  rows: np.ndarray     # (P,) int64 poisoned probe rows, sorted


def _perturb(inputs: SweepInputs, data: LayerData, plans: Sequence[_Plan], x01: np.ndarray,
             eps: float, mode: str, timer: StageTimer = NULL_TIMER) -> np.ndarray:
  """(P, H, W, 3) poisoned images in [0, 1] of all ``plans``' rows (x01: their clean
  images, (P, H, W, 3) in [0, 1]), in plan order."""
  if mode == "noise":  # one key per unit: independent of how units are grouped into calls
    out, offset = [], 0
    for p in plans:
      key = _noise_key(inputs.config.seed, data.arch, data.layer, p.unit, eps)
      out.append(np.asarray(bernoulli_noise(key, x01[offset:offset + len(p.rows)], eps)))
      offset += len(p.rows)
    return np.concatenate(out)
  unit_ids = np.concatenate([np.full(len(p.rows), p.unit, np.int32) for p in plans])
  with timer.stage("concept masks"):
    src_m = np.concatenate([concept_masks(inputs, data, p.source, p.rows) for p in plans])
    tgt_m = (None if mode == "u1" else
             np.concatenate([concept_masks(inputs, data, p.target, p.rows) for p in plans]))
  a = inputs.config.attack
  with timer.stage("pgd"):
    return data.attack(x01, unit_ids, src_m, tgt_m, eps=eps,
                       step_size=2.0 * eps / a.steps if a.step_size is None else a.step_size)


def _column(d: LayerDissection, j: int) -> LayerDissection:
  """Unit ``j`` of a several-unit re-dissection, as a one-unit :class:`LayerDissection`
  (its tally is left whole)."""
  sl = slice(j, j + 1)
  return dataclasses.replace(
      d, thresholds=d.thresholds[sl], iou=d.iou[sl], category_labels=d.category_labels[sl],
      category_scores=d.category_scores[sl], best_category=d.best_category[sl],
      best_label=d.best_label[sl], score=d.score[sl])


def run_attack_group(inputs: SweepInputs, data: LayerData, units: Sequence[int], eps: float,
                     mode: str, return_images: bool = False, timer: StageTimer = NULL_TIMER):
  """Attacks ``units`` of ``data.layer`` in one compiled call, re-dissects each, returns
  result rows.

  With a ``uint8`` / ``jpeg`` delivery each unit is also re-dissected with the undelivered
  floats (``new_label_float``, ``changed_float``, ``success_float``); with ``float`` delivery
  those columns repeat the delivered ones.

  With ``return_images`` also returns ``{unit: (rows, x_adv (P,H,W,3) in [0,1])}``, the images
  before delivery (what :func:`nemjax.sweep.export.export_corrupted_probe` takes).
  ``timer`` (:mod:`nemjax.sweep.profile`) records the time of each stage.
  """
  t0 = time.time()
  probe, c = inputs.probe, inputs.config
  delivery, jpeg_quality = c.probe_pass.delivery, c.probe_pass.jpeg_quality
  plans = []
  with timer.stage("targets + poisoned rows"):
    for u in units:
      src, tgt = int(data.clean.best_label[u]), target_for(inputs, data, u, mode)
      rows, n_cand = poisoned_rows(inputs, data, src, tgt, u)
      plans.append(_Plan(u, src, tgt, n_cand, rows))
  all_rows = np.concatenate([p.rows for p in plans]) if plans else np.zeros(0, np.int64)
  x_adv = np.zeros((0, *probe.image_size, 3), np.float32)
  new_acts = new_acts_float = np.zeros((0, *data.acts.shape[1:]), np.float32)
  if len(all_rows):
    with timer.stage("load images"):
      x01 = loader.load_images(probe, all_rows).astype(np.float32) / np.float32(255.0)
    x_adv = _perturb(inputs, data, plans, x01, eps, mode, timer)
    with timer.stage("delivery"):
      delivered = deliver(x_adv, delivery, jpeg_quality)
      undelivered = delivered if delivery == "float" else deliver(x_adv, "float")
    with timer.stage("activations of poisoned images"):
      new_acts = new_activations(inputs, data, delivered)
      new_acts_float = (new_acts if delivery == "float"
                        else new_activations(inputs, data, undelivered))
  out_rows, images = [], {}
  offset = 0
  seconds = (time.time() - t0) / max(len(units), 1)
  clean = data.clean
  spans = np.cumsum([0] + [len(p.rows) for p in plans])
  pp = c.probe_pass
  # every unit of the group in one re-dissection: each column holds its own unit's poisoned
  # rows, and thresholds, tallies and IoU are per column
  measure = lambda acts: redissect_units(
      data.acts, [p.unit for p in plans], [p.rows for p in plans],
      [acts[spans[j]:spans[j + 1]] for j in range(len(plans))], probe, inputs.labels,
      layer=data.layer, top_fraction=pp.top_fraction, quantile_method=pp.quantile_method,
      timer=timer)
  after_all = measure(new_acts)
  after_all_float = after_all if delivery == "float" else measure(new_acts_float)
  for j, (u, src, tgt, n_cand, rows) in enumerate(plans):
    sl = slice(offset, offset + len(rows))
    if return_images:
      images[u] = (rows, x_adv[sl])
    offset += len(rows)
    after, after_float = _column(after_all, j), _column(after_all_float, j)
    new_label, new_label_float = int(after.best_label[0]), int(after_float.best_label[0])
    success_of = lambda label: (label == tgt) if mode == "targeted" else (label != src)
    name = lambda l: str(probe.label_names[l])
    out_rows.append({
        "layer": data.layer, "unit": u, "eps": float(eps), "eps_255": round(eps_to_255(eps), 4),
        "mode": mode, "mask_source": c.mask_source, "poison_order": c.poison_order,
        "delivery": delivery,
        "clean_label": src, "clean_name": name(src),
        "clean_category": probe.category_names[clean.best_category[u]],
        "clean_iou": float(clean.score[u]),
        "target_label": tgt, "target_name": name(tgt),
        "new_label": new_label, "new_name": name(new_label),
        "new_category": probe.category_names[after.best_category[0]],
        "new_iou": float(after.score[0]),
        "source_iou_after": float(after.iou[0, src]),
        "target_iou_before": float(clean.iou[u, tgt]) if tgt else 0.0,
        "target_iou_after": float(after.iou[0, tgt]) if tgt else 0.0,
        "threshold_before": float(clean.thresholds[u]),
        "threshold_after": float(after.thresholds[0]),
        "n_candidates": n_cand, "n_poisoned": len(rows),
        "changed": new_label != src, "success": bool(success_of(new_label)),
        "new_label_float": new_label_float, "changed_float": new_label_float != src,
        "success_float": bool(success_of(new_label_float)), "seconds": round(seconds, 3),
    })
  return (out_rows, images) if return_images else out_rows


def prepare(model, probe: ProbeSet, config: PGDSweepConfig, out_dir: Path | None, mesh=None,
            progress: bool = True, timer: StageTimer = NULL_TIMER
            ) -> tuple[SweepInputs, dict[str, LayerData]]:
  """The sweep's set-up, shared with export: the clean dissection (written under
  ``out_dir/clean`` unless None) and ``(inputs, {layer: LayerData})``."""
  mesh = make_mesh() if mesh is None else mesh
  pp = config.probe_pass
  with timer.stage("clean dissection"):
    clean, acts = dissect(model, probe, config.layers, batch_size=pp.batch_size,
                          top_fraction=pp.top_fraction, quantile_method=pp.quantile_method,
                          mesh=mesh, progress=progress, keep_activations=True)
    if out_dir is not None and distributed.current().leader:
      for res in clean.values():
        write_layer_outputs(Path(out_dir) / "clean", res, probe)
  with timer.stage("labels + layer set-up"):
    inputs = SweepInputs(probe, loader.load_labels(probe, np.arange(probe.num_images)), config,
                         mesh)
    return inputs, {layer: layer_data(model, inputs, layer, clean[layer], acts[layer])
                    for layer in config.layers}


def run_record(config: PGDSweepConfig, run_info: Mapping[str, Any] | None = None) -> dict:
  """What ``config.json`` holds: the config and the run's inputs (probe, weights, arch)."""
  return json.loads(json.dumps({"config": config.to_json(), **(run_info or {})}))


def check_out_dir(out_dir: Path, record: Mapping[str, Any]) -> None:
  """ValueError if ``out_dir`` holds results of another configuration or another version's
  columns (reads only)."""
  store_lib.check_out_dir(out_dir, record, RESULT_FIELDS, KEY_FIELDS)


def run_pgd_sweep(model, probe: ProbeSet, config: PGDSweepConfig, out_dir: Path, *,
                  mesh=None, progress: bool = True, run_info: dict | None = None,
                  timer: StageTimer = NULL_TIMER) -> dict:
  """Runs (or resumes) the sweep; writes results.csv, summary.json, config.json, and the clean
  dissection under ``out_dir/clean``. Returns the summary.

  Under ``jax.distributed`` every process calls this with the same arguments (module
  docstring); each returns the same summary, process 0 writes the shared files. ``timer``
  (:mod:`nemjax.sweep.profile`) records the time of each stage.
  """
  out_dir = Path(out_dir)
  procs = distributed.current()
  record = run_record(config, run_info)
  store = store_lib.open_out_dir(out_dir, record, RESULT_FIELDS, KEY_FIELDS, procs)
  inputs, layers = prepare(model, probe, config, out_dir, mesh=mesh, progress=progress,
                           timer=timer)
  work, eligible, order = [], {}, []
  for layer, data in layers.items():
    eligible[layer] = {"eligible": int(eligible_units(data.clean, config.min_iou).size),
                       "units": int(data.clean.num_units)}
    units = (config.units or {}).get(layer) or choose_units(
        data.clean, config.num_units, config.seed, layer=layer, arch=data.arch,
        min_iou=config.min_iou)
    bad = [u for u in units if not 0 <= u < data.clean.num_units]
    if bad:
      raise ValueError(f"units {bad} out of range for layer {layer} ({data.clean.num_units} units)")
    for mode in config.modes:  # every target exists, checked before any attack runs
      for u in units:
        target_for(inputs, data, u, mode)
    for eps in config.attack.eps:
      for mode in config.modes:
        keys = [dict(layer=layer, unit=u, eps=float(eps), mode=mode) for u in units]
        order.extend(keys)
        for s in range(0, len(keys), config.units_per_call):
          todo = [k["unit"] for k in keys[s:s + config.units_per_call] if not store.done(**k)]
          if todo:
            work.append((data, todo, float(eps), mode))
  work = distributed.split_work(work, procs)
  total_units = sum(len(w[1]) for w in work)
  bar = tqdm(total=total_units, desc="pgd sweep", unit="attack", disable=not progress)
  for data, units, eps, mode in work:
    bar.set_postfix_str(f"{data.layer} ε={format_eps(eps)} {mode}")
    rows = run_attack_group(inputs, data, units, eps, mode, timer=timer)
    with timer.stage("results.csv write"):
      store.add(rows)
    bar.update(len(units))
  bar.close()
  summary = summarise(store.finish(order), probe.category_names)
  summary.update(poison_order=config.poison_order, min_iou=config.min_iou,
                 eligible_units=eligible)
  if procs.leader:
    write_json(out_dir / "summary.json", summary)
  return summary


def summarise(rows: Sequence[Mapping[str, str]], category_names: Sequence[str]) -> dict:
  """% of units manipulated per (layer, ε, mode), overall and per clean-label category.

  Each table entry also holds the undelivered (float) rate and, for uint8 / JPEG delivery,
  ``survival_pct``: of the units the float attack manipulates, the % still manipulated after
  delivery (None when the float attack manipulates none, or for float delivery).
  """
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["layer"], float(r["eps"]), r["mode"]), []).append(r)
  table = []
  layers = list(dict.fromkeys(r["layer"] for r in rows))
  if len(layers) > 1:  # pooled over layers: the sweep-level trend with ε
    for (layer, eps, mode), rs in list(groups.items()):
      groups.setdefault(("all layers", eps, mode), []).extend(rs)
  order = {l: i for i, l in enumerate(layers + ["all layers"])}
  for (layer, eps, mode), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][1])):
    succ = np.array([int(r["success"]) for r in rs], bool)
    succ_f = np.array([int(r["success_float"]) for r in rs], bool)
    chg = np.array([int(r["changed"]) for r in rs])
    deliveries = sorted({r["delivery"] for r in rs})
    orders = sorted({r["poison_order"] for r in rs})
    per_cat = {}
    for cat in category_names:
      sel = [int(r["success"]) for r in rs if r["clean_category"] == cat]
      if sel:
        per_cat[cat] = {"units": len(sel), "pct_manipulated": 100.0 * float(np.mean(sel))}
    delivered = deliveries != ["float"]
    table.append({
        "layer": layer, "eps": eps, "eps_255": round(eps_to_255(eps), 4), "mode": mode,
        "units": len(rs), "pct_manipulated": 100.0 * float(succ.mean()),
        "pct_label_changed": 100.0 * float(chg.mean()),
        "delivery": "/".join(deliveries), "poison_order": "/".join(orders),
        "pct_manipulated_float": 100.0 * float(succ_f.mean()),
        "n_success_float": int(succ_f.sum()),
        "n_survived": int((succ & succ_f).sum()),
        "survival_pct": (100.0 * float((succ & succ_f).sum()) / int(succ_f.sum())
                         if delivered and succ_f.any() else None),
        "mean_iou_before": float(np.mean([float(r["clean_iou"]) for r in rs])),
        "mean_source_iou_after": float(np.mean([float(r["source_iou_after"]) for r in rs])),
        "mean_poisoned": float(np.mean([int(r["n_poisoned"]) for r in rs])),
        "per_category": per_cat,
    })
  return {"table": table}


def _columns(summary: dict) -> tuple[list[tuple[str, float]], list[str], dict]:
  cols = sorted({(t["mode"], t["eps_255"]) for t in summary["table"]},
                key=lambda c: (MODES.index(c[0]), c[1]))
  layers = list(dict.fromkeys(t["layer"] for t in summary["table"]))
  cell = {(t["layer"], t["mode"], t["eps_255"]): t for t in summary["table"]}
  return cols, layers, cell


def _grid(summary: dict, fmt: Callable[[dict], str]) -> str:
  cols, layers, cell = _columns(summary)
  head = "| layer | " + " | ".join(f"{m} ε={e:g}/255" for m, e in cols) + " |"
  lines = [head, "|" + "---|" * (len(cols) + 1)]
  for layer in layers:
    vals = [fmt(cell[(layer, m, e)]) if (layer, m, e) in cell else "" for m, e in cols]
    lines.append(f"| {layer} | " + " | ".join(vals) + " |")
  return "\n".join(lines)


def format_table(summary: dict) -> str:
  """Markdown table in the paper's Table-2 layout: layers × (mode, ε), cells
  ``% manipulated (units attacked)``."""
  return _grid(summary, lambda t: f"{t['pct_manipulated']:.1f} ({t['units']})")


def format_survival_table(summary: dict) -> str:
  """For uint8 / JPEG delivery: cells ``float % -> delivered %, survived k/n`` (k of the n
  float successes still succeed once delivered); '' for a float-delivery summary."""
  if all(t.get("delivery", "float") == "float" for t in summary["table"]):
    return ""

  def fmt(t):
    return (f"{t['pct_manipulated_float']:.1f} -> {t['pct_manipulated']:.1f}, survived "
            f"{t['n_survived']}/{t['n_success_float']}")
  return _grid(summary, fmt)


def plot_summary(summary: dict, path: Path) -> None:
  """% manipulated vs ε, one panel per attack mode, one line per layer; the ``noise`` control
  is drawn dotted on the untargeted panels (its own panel if it is the only mode)."""
  plt = figures.pyplot()
  present = [m for m in MODES if any(t["mode"] == m for t in summary["table"])]
  panels = [m for m in present if m != "noise"] or present
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  layers = list(dict.fromkeys(t["layer"] for t in summary["table"]))
  colors = {l: ("black" if l == "all layers" else f"C{i}") for i, l in enumerate(layers)}

  def points(layer, mode):
    return sorted((t["eps_255"], t["pct_manipulated"]) for t in summary["table"]
                  if t["layer"] == layer and t["mode"] == mode)
  for ax, mode in zip(axes[0], panels):
    for layer in layers:
      style = dict(linestyle="--") if layer == "all layers" else {}
      if pts := points(layer, mode):
        ax.plot(*zip(*pts), marker="o", label=layer, color=colors[layer], **style)
      if mode in ("u2", "u1") and "noise" in present and (pts := points(layer, "noise")):
        ax.plot(*zip(*pts), marker="x", linestyle=":", color=colors[layer], alpha=0.7,
                label=f"{layer}, ±ε noise")
    ax.set_title(MODE_TITLES[mode])
    ax.set_xlabel("ε (/255)")
    ax.set_ylabel("% units manipulated")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=110)
