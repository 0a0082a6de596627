"""Random-noise corruption sweep (Srivastava et al., Tables A.1/A.2): % of units whose
Network-Dissection label changes when noise of std σ is added to a fraction of the probe set.

Rows of ``results.csv`` are keyed by (layer, kind, σ, fraction, delivery, seed), so a re-run
skips finished cells and a run with more σ values, another delivery or another seed appends
to the same table. What changes results but is not in the key (probe set, weights, top fraction,
batch size, JPEG quality) is recorded in ``config.json`` and must match on re-runs.

Noise is drawn per image from a key folded from (seed, architecture, kind name, σ, fraction,
row) -- names and values, never list positions (:mod:`nemjax.sweep.keys`) -- so it depends
neither on the batch size nor on which other kinds, σ, fractions or layers the run holds; the
corrupted images are the same ``round(fraction·N)`` rows for every layer.

Units counted: those with a clean label and clean IoU > ``min_iou`` (default 0.04, Network
Dissection's bar for an interpretable unit); ``units`` in each row is how many were eligible.

Several processes (``jax.distributed``): the clean dissection is computed together (each
process loads its shard of the probe set, results combined exactly), the processes agree on
the finished cells and deal out the unfinished (kind, σ, fraction) cells round-robin in grid
order; each writes its rows to ``results.<process>.csv`` and process 0 merges them into
``results.csv`` and writes the summary and plot (:mod:`nemjax.sweep.store`). A cell's rows do
not depend on the process that computes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemjax import distributed, figures
from nemjax.attacks.noise import NOISE_KINDS, corrupt, select_fraction
from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect.driver import activation_fn, dissect, make_mesh
from nemjax.files import write_json
from nemjax.sweep.config import NoiseSweepConfig
from nemjax.sweep.delivery import deliver
from nemjax.sweep.keys import item_key, micro_code
from nemjax.sweep.measure import batched_activations, redissect
from nemjax.sweep.units import eligible_units
from nemjax.sweep import store as store_lib

FIELDS = ["layer", "kind", "sigma", "fraction", "delivery", "seed", "n_corrupted", "units",
          "units_changed", "pct_changed", "mean_iou_before", "mean_iou_after"]
KEYS = ["layer", "kind", "sigma", "fraction", "delivery", "seed"]


def noise_record(config: NoiseSweepConfig, run_info: Mapping[str, Any] | None = None) -> dict:
  """What ``config.json`` holds: the settings outside the row key, and the run's inputs."""
  return json.loads(json.dumps({**config.record(), **(run_info or {})}))


def check_noise_out_dir(out_dir: Path, record: Mapping[str, Any]) -> None:
  """ValueError if ``out_dir`` holds another configuration or other columns (reads only)."""
  store_lib.check_out_dir(out_dir, record, FIELDS, KEYS)


def _cell_key(seed: int, arch: str, kind: str, sigma: float, fraction: float) -> jax.Array:
  """The key of one grid cell's image choice and noise, keyed by names and values."""
  return item_key(seed, "noise/cell", arch, kind, micro_code(sigma), micro_code(fraction))


def noisy_images(key: jax.Array, rows: np.ndarray, x01: np.ndarray, kind: str, sigma: float
                 ) -> np.ndarray:
  """``kind`` noise on images ``x01`` (P, H, W, 3) in [0, 1] of probe ``rows`` (P,); image p
  uses ``fold_in(key, rows[p])``, so the result does not depend on batching."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(rows, jnp.uint32))
  one = lambda k, x: corrupt(k, x[None], kind, sigma)[0]
  return np.asarray(jax.vmap(one)(keys, jnp.asarray(x01)))


def run_noise_sweep(model, probe: ProbeSet, config: NoiseSweepConfig, out_dir: Path, *,
                    progress: bool = True, run_info: Mapping[str, Any] | None = None
                    ) -> list[dict]:
  """Runs (or resumes) the sweep.

  Writes ``out_dir/results.csv`` (all rows, of every run in that directory), ``config.json``,
  ``summary.json`` (this grid's rows, ``min_iou`` and the eligible units per layer) and
  ``noise_sweep.png``. Only units with a clean label and IoU > ``config.min_iou`` are counted.

  Raises:
    ValueError: another configuration in ``out_dir``, or a layer without an eligible unit.

  Returns:
    The rows of this grid (layers × kinds × σ × fractions at this delivery and seed), as
    stored (strings).
  """
  layers, kinds, sigmas, fractions = config.layers, config.kinds, config.sigmas, config.fractions
  pp, seed, min_iou = config.probe_pass, config.seed, config.min_iou
  delivery, batch_size = pp.delivery, pp.batch_size
  out_dir = Path(out_dir)
  arch = str(getattr(model, "arch", type(model).__name__))
  record = noise_record(config, run_info)
  procs = distributed.current()
  store = store_lib.open_out_dir(out_dir, record, FIELDS, KEYS, procs)
  cell = lambda l, k, s, f: dict(layer=l, kind=k, sigma=float(s), fraction=float(f),
                                 delivery=delivery, seed=seed)
  grid = [(k, s, f) for k in kinds for s in sigmas for f in fractions
          if not all(store.done(**cell(l, k, s, f)) for l in layers)]
  if grid:
    mesh = make_mesh()
    clean, acts = dissect(model, probe, layers, batch_size=batch_size,
                          top_fraction=pp.top_fraction, quantile_method=pp.quantile_method,
                          mesh=mesh, progress=progress, keep_activations=True)
    labels = loader.load_labels(probe, np.arange(probe.num_images))
    fn = activation_fn(model, layers, mesh=mesh)
    shapes = {l: acts[l].shape[1:] for l in layers}
    counted = {l: eligible_units(clean[l], min_iou) for l in layers}
    empty = [l for l in layers if counted[l].size == 0]
    if empty:
      raise ValueError(f"layers {empty} have no unit labelled with IoU > {min_iou:g}; "
                       "lower --min-iou")
  for kind, sigma, frac in tqdm(distributed.split_work(grid, procs), desc="noise sweep",
                                disable=not progress):
    sel_key, noise_key = jax.random.split(_cell_key(seed, arch, kind, sigma, frac))
    rows = np.flatnonzero(np.asarray(select_fraction(sel_key, probe.num_images, frac)))
    new = {l: [] for l in layers}
    for s in range(0, len(rows), batch_size):
      chunk = rows[s:s + batch_size]
      x01 = loader.load_images(probe, chunk).astype(np.float32) / np.float32(255.0)
      img = deliver(noisy_images(noise_key, chunk, x01, kind, sigma), delivery, pp.jpeg_quality)
      for l, a in batched_activations(fn, img, shapes, batch_size=batch_size,
                                      num_devices=mesh.size).items():
        new[l].append(a)
    results = []
    for l in layers:
      new_l = np.concatenate(new[l]) if new[l] else np.zeros((0, *shapes[l]), np.float32)
      after = redissect(acts[l], rows, new_l, probe, labels, layer=l,
                        top_fraction=pp.top_fraction, quantile_method=pp.quantile_method)
      u = counted[l]
      changed = after.best_label[u] != clean[l].best_label[u]
      results.append({
          **cell(l, kind, sigma, frac), "n_corrupted": len(rows), "units": int(len(changed)),
          "units_changed": int(changed.sum()), "pct_changed": 100.0 * float(changed.mean()),
          "mean_iou_before": float(clean[l].score[u].mean()),
          "mean_iou_after": float(after.score[u].mean()),
      })
    store.add(results)
  store.finish([cell(l, k, s, f) for k in kinds for s in sigmas for f in fractions
                for l in layers])
  rows_out = [store.get(**cell(l, k, s, f))
              for l in layers for k in kinds for s in sigmas for f in fractions]
  eligible = {l: int(next(r["units"] for r in rows_out if r["layer"] == l)) for l in layers}
  if procs.leader:
    write_json(out_dir / "summary.json", {"delivery": delivery, "seed": seed,
                                          "min_iou": min_iou, "eligible_units": eligible,
                                          "rows": rows_out})
    plot_noise_sweep(rows_out, out_dir / "noise_sweep.png")
  return rows_out


def format_noise_table(rows: Sequence[dict], layer: str, kind: str) -> str:
  """σ (rows) × poisoned fraction (columns) table of % units changed."""
  sel = [r for r in rows if r["layer"] == layer and r["kind"] == kind]
  sigmas = sorted({float(r["sigma"]) for r in sel})
  fracs = sorted({float(r["fraction"]) for r in sel})
  cell = {(float(r["sigma"]), float(r["fraction"])): float(r["pct_changed"]) for r in sel}
  lines = [f"| {layer} {kind} σ \\ fraction | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
           "|" + "---|" * (len(fracs) + 1)]
  for s in sigmas:
    lines.append(f"| {s:g} | " + " | ".join(
        f"{cell[(s, f)]:.1f}" if (s, f) in cell else "" for f in fracs) + " |")
  return "\n".join(lines)


def plot_noise_sweep(rows: Sequence[Mapping[str, str]], path: Path) -> None:
  """% of units changed vs σ: one panel per (layer, noise kind), one line per fraction."""
  plt = figures.pyplot()
  layers = list(dict.fromkeys(r["layer"] for r in rows))
  kinds = [k for k in NOISE_KINDS if any(r["kind"] == k for r in rows)]
  if not layers or not kinds:
    return
  fig, axes = plt.subplots(len(layers), len(kinds), figsize=(4 * len(kinds), 3.2 * len(layers)),
                           squeeze=False)
  fracs = sorted({float(r["fraction"]) for r in rows})
  for i, layer in enumerate(layers):
    for j, kind in enumerate(kinds):
      ax = axes[i][j]
      for f in fracs:
        pts = sorted((float(r["sigma"]), float(r["pct_changed"])) for r in rows
                     if r["layer"] == layer and r["kind"] == kind and float(r["fraction"]) == f)
        if pts:
          ax.plot(*zip(*pts), marker="o", label=f"{f:.0%} of images")
      ax.set_title(f"{layer}, {kind} noise")
      ax.set_xlabel("σ")
      ax.set_ylabel("% units changed")
      ax.set_ylim(-2, 102)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=110)
