"""act-avg PGD sweep (Srivastava et al., "Corrupting Neuron Explanations", Table 2).

    python experiments/pgd_sweep.py                      # embedded default, < 10 min on 2 CPU cores

With no arguments: a synthetic Broden-format probe set and a SmallCNN trained on it (cached in
cache/embedded/seed<S>), layers block3 and block4, 8 units each among those labelled with
clean IoU > 0.04, ε ∈ {2,4,6}/255, 10 steps of 2ε/10 from the clean image, modes U2 and
targeted, plus the control `noise` (random ±ε sign noise on the images U2 poisons). Poisoned:
the images holding the unit's concept, then those holding the target's, in probe order, at
most 10 % of the probe set (the paper's rule; `--poison-order activation` takes the images
where the unit fires most instead). Results are appended to OUT/results.csv as they finish;
re-running the same command resumes. Writes OUT/summary.json, OUT/pgd_sweep.png and the clean
dissection in OUT/clean/.
Every flag is checked before any work starts (the embedded model is not trained for a bad
flag).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common

_common.bootstrap()

# Imported after the bootstrap, which re-runs this script inside the project venv.
from nemjax.sweep import checks, pgd_sweep  # noqa: E402
from nemjax.sweep.store import ResultsStore  # noqa: E402
from nemjax.sweep.verify import export_and_verify, export_delivery, verified  # noqa: E402

DEFAULT_MODES = ["u2", "targeted", "noise"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--weights", type=Path, help="orbax checkpoint from `python -m nemjax.convert`")
  p.add_argument("--layers", nargs="+", help="layers to attack (default: embedded block3 block4)")
  p.add_argument("--units", nargs="+", metavar="LAYER:U1,U2,...",
                 help="explicit units per layer; they bypass the --min-iou bar")
  p.add_argument("--num-units", type=int, default=8,
                 help="units per layer, a seeded choice among the eligible ones (see --min-iou); "
                      "fails if fewer are eligible")
  p.add_argument("--min-iou", type=float, help=_common.MIN_IOU_HELP + "; not applied to --units")
  p.add_argument("--eps", nargs="+", type=float, default=[2, 4, 6], help="ε values in /255 units")
  p.add_argument("--steps", type=int, default=10, help="PGD steps per attack")
  p.add_argument("--step-size", type=float, help="in /255 units (default 2ε/steps)")
  p.add_argument("--modes", nargs="+", default=DEFAULT_MODES,
                 help=f"among {', '.join(pgd_sweep.MODES)} (noise: random ±ε control)")
  p.add_argument("--mask-source", default="labels", choices=["labels", "clean"],
                 help="concept masks from ground-truth labels or from the clean run (Eq. 8)")
  p.add_argument("--poison-fraction", type=float, default=0.1, help="cap on poisoned images / N")
  p.add_argument("--poison-order", default="concept",
                 help="which candidates fill the cap: 'concept' (the paper's code: images holding "
                      "the source concept, then the target's, in probe order) or 'activation' "
                      "(highest clean activation of the unit first)")
  _common.add_probe_pass_flags(p)
  p.add_argument("--units-per-call", type=int, default=4, help="units attacked in one compiled call")
  p.add_argument("--export-unit", metavar="LAYER:UNIT", help="export this unit's corrupted probe set")
  p.add_argument("--export-dir", type=Path, help="where to write the exported Broden directory")
  p.add_argument("--export-eps", type=float, help="ε (/255) of the export (default: the largest)")
  p.add_argument("--export-mode", help="mode of the export (default: the first of --modes)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
  _common.add_run_flags(p, "runs/pgd_sweep", "output directory (re-running resumes)")
  return p.parse_args(argv)


def check_plain_flags(args, argv=None) -> None:
  """Checks that need nothing loaded; ValueError with the flag's name."""
  _common.refuse_inapplicable(argv, [
      ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
      ("--jpeg-quality", args.delivery == "jpeg", "--delivery jpeg")])
  if any(not 0 < e <= 255 for e in args.eps):
    raise ValueError(f"--eps values must lie in (0, 255] (/255 units of the pixel range), "
                     f"got {args.eps}")
  if args.step_size is not None and args.step_size > 255:
    raise ValueError(f"--step-size must lie in (0, 255] (/255 units), got {args.step_size}")
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  if args.step_size is not None and args.step_size <= 0:
    raise ValueError(f"--step-size must be > 0, got {args.step_size}")
  bad = [m for m in args.modes if m not in pgd_sweep.MODES]
  if bad:
    raise ValueError(f"--modes must be among {list(pgd_sweep.MODES)}, got {bad}")
  if not 0 < args.poison_fraction <= 1:
    raise ValueError(f"--poison-fraction must lie in (0, 1], got {args.poison_fraction}")
  if args.poison_order not in pgd_sweep.POISON_ORDERS:
    raise ValueError(f"--poison-order must be one of {list(pgd_sweep.POISON_ORDERS)}, "
                     f"got {args.poison_order!r}")
  args.min_iou = _common.min_iou(args)
  if not 0 < args.quantile < 1:
    raise ValueError(f"--quantile must lie in (0, 1), got {args.quantile}")
  if not 1 <= args.jpeg_quality <= 100:
    raise ValueError(f"--jpeg-quality must lie in [1, 100], got {args.jpeg_quality}")
  for flag in ("num_units", "batch_size", "units_per_call"):
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  if args.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {args.seed}")
  if (args.export_unit is None) != (args.export_dir is None):
    raise ValueError("--export-unit and --export-dir go together")
  if args.export_unit is None:
    for flag in ("export_eps", "export_mode"):
      if getattr(args, flag) is not None:
        raise ValueError(f"--{flag.replace('_', '-')} needs --export-unit and --export-dir")
  else:
    if args.export_mode is not None and args.export_mode not in args.modes:
      raise ValueError(f"--export-mode {args.export_mode!r} must be one of --modes {args.modes}")
    if args.export_eps is not None and args.export_eps <= 0:
      raise ValueError(f"--export-eps must be > 0 (in /255 units), got {args.export_eps}")
    if args.export_dir.exists() and not args.overwrite:
      raise ValueError(f"--export-dir {args.export_dir} exists; pass --overwrite to replace it")


def main(argv=None) -> None:
  args = parse_args(argv)
  progress = not args.no_progress
  try:
    check_plain_flags(args, argv)
    units = checks.parse_units(args.units) if args.units else None
    export = checks.parse_layer_unit(args.export_unit) if args.export_unit else None
    # What will be attacked, checked on a shape-only model: the embedded one is not trained
    # (nor its probe set generated) until every flag has passed.
    target = _common.sweep_target(args)
    layers = target.layers
    widths = checks.spatial_widths(target.model, layers, target.image_size)
    if units:
      checks.check_units(units, widths)
    if export:
      checks.check_units({export[0]: (export[1],)}, widths, flag="--export-unit")
    config = pgd_sweep.PGDSweepConfig(
        layers=tuple(layers), units=units, num_units=args.num_units, min_iou=args.min_iou,
        eps=tuple(e / 255 for e in args.eps), steps=args.steps,
        step_size=None if args.step_size is None else args.step_size / 255,
        modes=tuple(args.modes), mask_source=args.mask_source,
        poison_fraction=args.poison_fraction, poison_order=args.poison_order,
        delivery=args.delivery,
        jpeg_quality=args.jpeg_quality, seed=args.seed, batch_size=args.batch_size,
        units_per_call=args.units_per_call, quantile=args.quantile)
    config.validate()
    run_info = {"probe": str(Path(target.probe_dir).resolve()),
                "weights": str(Path(target.weights).resolve()), "arch": target.model.arch}
    pgd_sweep.check_out_dir(args.out, pgd_sweep.run_record(config, run_info))
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))

  # --- work: build the embedded default if needed, load, sweep ---------------------------
  try:
    model, probe = _common.load_sweep_target(args, target, progress)
    with _common.locked_output(args.out):
      summary = pgd_sweep.run_pgd_sweep(model, probe, config, args.out, progress=progress,
                                        run_info=run_info)
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  elig = ", ".join(f"{l} {e['eligible']}/{e['units']}" for l, e in summary["eligible_units"].items())
  print(f"\neligible units (clean label with IoU > {args.min_iou:g}): {elig}"
        + ("; explicit --units bypass the bar" if units else ""))
  print(f"poisoned images: '{args.poison_order}' order, at most {args.poison_fraction:g}·N")
  print("\n% of units manipulated (units attacked in parentheses); "
        "untargeted = label changed, targeted = label became the target, "
        "noise = label changed by random ±ε sign noise on the images U2 poisons\n")
  print(pgd_sweep.format_table(summary))
  survival = pgd_sweep.format_survival_table(summary)
  if survival:
    print(f"\n{args.delivery} delivery: % manipulated as floats -> as delivered; survived = "
          "float successes that still succeed once delivered\n")
    print(survival)
  pgd_sweep.plot_summary(summary, args.out / "pgd_sweep.png")
  print(f"\nwrote {args.out}/results.csv, summary.json, pgd_sweep.png")

  if export:
    layer, unit = export
    eps = (args.export_eps if args.export_eps is not None else max(args.eps)) / 255
    mode = args.export_mode or args.modes[0]
    stored = ResultsStore(args.out / "results.csv", pgd_sweep.RESULT_FIELDS,
                          pgd_sweep.KEY_FIELDS).get(layer=layer, unit=unit, eps=eps, mode=mode)
    if export_delivery(args.delivery) != args.delivery:
      print(f"\nnote: the sweep measured float images; the export writes them quantised to "
            f"{export_delivery(args.delivery)} (image files hold 8-bit pixels)")
    rep = export_and_verify(model, probe, config, layer, unit, eps, mode, args.export_dir,
                            stored_row=stored, overwrite=args.overwrite, progress=progress)
    print(f"exported {rep['n_poisoned']} poisoned images ({rep['export_delivery']}) to "
          f"{rep['export_dir']}: claimed label {rep['claimed_label']!r}, re-dissected label "
          f"{rep['measured_label']!r}, match={rep['match']}")
    if stored is None:
      print("no stored results row for this (layer, unit, ε, mode): compared with the re-run only")
    else:
      print(f"stored results row: label {rep['stored_label']!r}, reproduced by the re-run="
            f"{rep['stored_consistent']}, found in the export={rep['stored_survives']}")
    if not verified(rep):
      sys.exit(1)


if __name__ == "__main__":
  _common.run(main)
