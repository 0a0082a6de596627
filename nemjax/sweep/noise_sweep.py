"""Random-noise corruption sweep (Srivastava et al., Tables A.1/A.2): % of units whose
Network-Dissection label changes when noise of std σ is added to a fraction of the probe set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from nemjax.attacks.noise import NOISE_KINDS, corrupt, select_fraction
from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect.driver import activation_fn, dissect, make_mesh
from nemjax.dissect.report import write_json
from nemjax.sweep.delivery import DELIVERY_MODES, deliver
from nemjax.sweep.measure import redissect
from nemjax.sweep.store import ResultsStore

FIELDS = ["layer", "kind", "sigma", "fraction", "delivery", "n_corrupted", "units",
          "units_changed", "pct_changed", "mean_iou_before", "mean_iou_after"]
KEYS = ["layer", "kind", "sigma", "fraction"]


def run_noise_sweep(model, probe: ProbeSet, layers: Sequence[str], out_dir: Path, *,
                    sigmas: Sequence[float] = (0.01, 0.02, 0.03, 0.04, 0.05),
                    fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                    kinds: Sequence[str] = NOISE_KINDS, delivery: str = "float",
                    seed: int = 0, batch_size: int = 32, quantile: float = 0.005,
                    progress: bool = True) -> list[dict]:
  """Runs (or resumes) the sweep; returns the result rows (also in ``out_dir/results.csv``)."""
  bad = [k for k in kinds if k not in NOISE_KINDS]
  if bad:
    raise ValueError(f"unknown noise kinds {bad}; expected among {NOISE_KINDS}")
  if any(s <= 0 for s in sigmas):
    raise ValueError(f"σ values must be > 0, got {list(sigmas)}")
  if any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
  if delivery not in DELIVERY_MODES:
    raise ValueError(f"delivery must be one of {DELIVERY_MODES}, got {delivery!r}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  store = ResultsStore(out_dir / "results.csv", FIELDS, KEYS)
  mesh = make_mesh()
  clean, acts = dissect(model, probe, layers, batch_size=batch_size, quantile=quantile,
                        mesh=mesh, progress=progress, keep_activations=True)
  labels = loader.load_labels(probe, np.arange(probe.num_images))
  fn = activation_fn(model, layers, mesh=mesh)
  bs = batch_size + (-batch_size) % mesh.size
  n = probe.num_images
  grid = [(k, s, f) for k in kinds for s in sigmas for f in fractions
          if not all(store.done(layer=l, kind=k, sigma=float(s), fraction=float(f)) for l in layers)]
  base = jax.random.key(seed)
  for gi, (kind, sigma, frac) in enumerate(tqdm(grid, desc="noise sweep", disable=not progress)):
    key = jax.random.fold_in(jax.random.fold_in(base, NOISE_KINDS.index(kind)),
                             int(round(sigma * 1e6)) * 1000 + int(round(frac * 1000)))
    sel_key, noise_key = jax.random.split(key)
    rows = np.flatnonzero(np.asarray(select_fraction(sel_key, n, frac)))
    new = {l: [] for l in layers}
    for s in range(0, len(rows), bs):
      chunk = rows[s:s + bs]
      x01 = loader.load_images(probe, chunk).astype(np.float32) / np.float32(255.0)
      x01 = np.asarray(corrupt(jax.random.fold_in(noise_key, s), x01, kind, sigma,
                               np.ones(len(chunk), bool)))
      img = deliver(x01, delivery).astype(np.float32)
      img = np.concatenate([img, np.zeros((bs - len(chunk), *img.shape[1:]), np.float32)])
      out = fn(img)
      for l in layers:
        new[l].append(np.asarray(out[l])[:len(chunk)])
    results = []
    for l in layers:
      after = redissect(acts[l], rows, np.concatenate(new[l]), probe, labels, layer=l,
                        quantile=quantile)
      changed = after.best_label != clean[l].best_label
      results.append({
          "layer": l, "kind": kind, "sigma": float(sigma), "fraction": float(frac),
          "delivery": delivery, "n_corrupted": len(rows), "units": int(len(changed)),
          "units_changed": int(changed.sum()), "pct_changed": 100.0 * float(changed.mean()),
          "mean_iou_before": float(clean[l].score.mean()), "mean_iou_after": float(after.score.mean()),
      })
    store.add(results)
  write_json(out_dir / "summary.json", {"rows": store.rows})
  return store.rows


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
