"""act-avg PGD sweep (Srivastava et al., "Corrupting Neuron Explanations", Table 2).

    python experiments/pgd_sweep.py                      # embedded default, < 10 min on 2 CPU cores

With no arguments: a synthetic Broden-format probe set and a SmallCNN trained on it (cached in
cache/embedded), layers block3 and block4, 8 labelled units each, ε ∈ {2,4,6}/255, modes U2
and targeted. Results are appended to OUT/results.csv as they finish; re-running the same
command resumes. Writes OUT/summary.json, OUT/pgd_sweep.png and the clean dissection in
OUT/clean/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common

_common.bootstrap()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--weights", type=Path, help="orbax checkpoint from `python -m nemjax.convert`")
  p.add_argument("--layers", nargs="+", help="layers to attack (default: embedded block3 block4)")
  p.add_argument("--units", nargs="+", metavar="LAYER:U1,U2,...", help="explicit units per layer")
  p.add_argument("--num-units", type=int, default=8, help="labelled units per layer (seeded choice)")
  p.add_argument("--eps", nargs="+", type=float, default=[2, 4, 6], help="ε values in /255 units")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--step-size", type=float, help="in /255 units (default 2ε/steps)")
  p.add_argument("--modes", nargs="+", default=["u2", "targeted"], help="u2, targeted, u1")
  p.add_argument("--mask-source", default="labels", choices=["labels", "clean"],
                 help="concept masks from ground-truth labels or from the clean run (Eq. 8)")
  p.add_argument("--poison-fraction", type=float, default=0.1, help="cap on poisoned images / N")
  p.add_argument("--delivery", default="float", choices=["float", "uint8", "jpeg"])
  p.add_argument("--jpeg-quality", type=int, default=90)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--units-per-call", type=int, default=4, help="units attacked in one compiled call")
  p.add_argument("--quantile", type=float, default=0.005)
  p.add_argument("--out", type=Path, default=Path("runs/pgd_sweep"))
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"), help="embedded default cache")
  p.add_argument("--export-unit", metavar="LAYER:UNIT", help="export this unit's corrupted probe set")
  p.add_argument("--export-dir", type=Path, help="where to write the exported Broden directory")
  p.add_argument("--export-eps", type=float, help="ε (/255) of the export (default: the largest)")
  p.add_argument("--export-mode", help="mode of the export (default: the first of --modes)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  fail = _common.fail
  # --- flag checks that need nothing loaded -------------------------------------------------
  if any(e <= 0 for e in args.eps):
    fail(f"--eps values must be > 0 (in /255 units), got {args.eps}")
  if args.steps < 1:
    fail(f"--steps must be >= 1, got {args.steps}")
  if args.step_size is not None and args.step_size <= 0:
    fail(f"--step-size must be > 0, got {args.step_size}")
  if not 0 < args.poison_fraction <= 1:
    fail(f"--poison-fraction must lie in (0, 1], got {args.poison_fraction}")
  if not 0 < args.quantile < 1:
    fail(f"--quantile must lie in (0, 1), got {args.quantile}")
  if (args.probe is None) != (args.weights is None):
    fail("give both --probe and --weights, or neither (embedded default)")
  if args.weights is not None and not args.weights.exists():
    fail(f"--weights: checkpoint directory not found: {args.weights}")
  if args.probe is not None and not (args.probe / "index.csv").exists():
    fail(f"--probe: no index.csv in {args.probe}")
  if (args.export_unit is None) != (args.export_dir is None):
    fail("--export-unit and --export-dir go together")
  units = None
  if args.units:
    units = {}
    for spec in args.units:
      layer, sep, us = spec.partition(":")
      try:
        units[layer] = tuple(int(u) for u in us.split(",") if u)
      except ValueError:
        fail(f"--units entry {spec!r} must be LAYER:U1,U2,...")
      if not sep or not units[layer]:
        fail(f"--units entry {spec!r} must be LAYER:U1,U2,...")

  from nemjax.data import broden
  from nemjax import models
  from nemjax.models import checkpoint
  from nemjax.sweep import pgd_sweep

  progress = not args.no_progress
  if args.probe is None:
    from nemjax.embedded import build_embedded_default
    default = build_embedded_default(args.cache, seed=args.seed, progress=progress)
    probe_dir, weights, layers = default.probe_dir, default.checkpoint_dir, args.layers or list(default.layers)
  else:
    probe_dir, weights, layers = args.probe, args.weights, args.layers
    if not layers:
      fail("--layers is required with --weights")
  try:
    probe = broden.load_probe(probe_dir)
    model = checkpoint.load(weights, arch=args.arch)
    for layer in layers:
      models.canonical_layer(model.arch, layer)
    if units:
      unknown = set(units) - set(layers)
      if unknown:
        fail(f"--units names layers not in --layers: {sorted(unknown)}")
    config = pgd_sweep.PGDSweepConfig(
        layers=tuple(layers), units=units, num_units=args.num_units,
        eps=tuple(e / 255 for e in args.eps), steps=args.steps,
        step_size=None if args.step_size is None else args.step_size / 255,
        modes=tuple(args.modes), mask_source=args.mask_source,
        poison_fraction=args.poison_fraction, delivery=args.delivery,
        jpeg_quality=args.jpeg_quality, seed=args.seed, batch_size=args.batch_size,
        units_per_call=args.units_per_call, quantile=args.quantile)
    config.validate()
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  # unit ranges are checked against the layer width before any attack starts
  import jax.numpy as jnp
  import numpy as np
  if units:
    for layer, us in units.items():
      fn = pgd_sweep.features_fn_for(model, layer)
      import jax
      width = jax.eval_shape(fn, jnp.zeros((1, *probe.image_size, 3), jnp.float32)).shape[-1]
      bad = [u for u in us if not 0 <= u < width]
      if bad:
        fail(f"--units: {bad} out of range for layer {layer} with {width} units")

  run_info = {"probe": str(Path(probe_dir).resolve()), "weights": str(Path(weights).resolve()),
              "arch": model.arch}
  try:
    summary = pgd_sweep.run_pgd_sweep(model, probe, config, args.out, progress=progress,
                                      run_info=run_info)
  except ValueError as e:
    fail(str(e))
  print("\n% of units manipulated (units attacked in parentheses); "
        "untargeted = label changed, targeted = label became the target\n")
  print(pgd_sweep.format_table(summary))
  pgd_sweep.plot_summary(summary, args.out / "pgd_sweep.png")
  print(f"\nwrote {args.out}/results.csv, summary.json, pgd_sweep.png")

  if args.export_unit:
    from nemjax.sweep.verify import export_and_verify
    layer, _, unit = args.export_unit.partition(":")
    if layer not in layers or not unit.isdigit():
      fail(f"--export-unit must be LAYER:UNIT with LAYER among {layers}")
    eps = (args.export_eps if args.export_eps else max(args.eps)) / 255
    mode = args.export_mode or args.modes[0]
    rep = export_and_verify(model, probe, config, layer, int(unit), eps, mode, args.export_dir,
                            overwrite=args.overwrite, progress=progress)
    print(f"exported {rep['n_poisoned']} poisoned images to {rep['export_dir']}: claimed label "
          f"{rep['claimed_label']!r}, re-dissected label {rep['measured_label']!r}, match={rep['match']}")
    if not rep["match"]:
      sys.exit(1)


if __name__ == "__main__":
  main()
