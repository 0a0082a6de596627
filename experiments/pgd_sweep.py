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
from nemjax.preprocess import eps_from_255, eps_to_255, format_eps  # noqa: E402
from nemjax.sweep import checks, pgd_sweep  # noqa: E402
from nemjax.sweep.config import (  # noqa: E402
    MASK_SOURCES, MODES, PGDAttack, PGDSweepConfig, field_default)
from nemjax.sweep.poison import POISON_ORDERS  # noqa: E402
from nemjax.sweep.store import ResultsStore  # noqa: E402
from nemjax.sweep.verify import export_and_verify, export_delivery, verified  # noqa: E402


def parse_args(argv=None):
  d = lambda name: field_default(PGDSweepConfig, name)
  a = lambda name: field_default(PGDAttack, name)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--weights", type=Path, help="orbax checkpoint from `python -m nemjax.convert`")
  p.add_argument("--layers", nargs="+", help="layers to attack (default: embedded block3 block4)")
  p.add_argument("--units", nargs="+", metavar="LAYER:U1,U2,...",
                 help="explicit units per layer; they bypass the --min-iou bar")
  p.add_argument("--num-units", type=int, default=d("num_units"),
                 help="units per layer, a seeded choice among the eligible ones (see --min-iou); "
                      "fails if fewer are eligible")
  p.add_argument("--min-iou", type=float, default=d("min_iou"),
                 help=_common.MIN_IOU_HELP + "; not applied to --units")
  p.add_argument("--eps", nargs="+", type=float, default=[eps_to_255(e) for e in a("eps")],
                 help="ε values in /255 units")
  p.add_argument("--steps", type=int, default=a("steps"), help="PGD steps per attack")
  p.add_argument("--step-size", type=float, help="in /255 units (default 2ε/steps)")
  p.add_argument("--modes", nargs="+", default=list(d("modes")),
                 help=f"among {', '.join(MODES)} (noise: random ±ε control)")
  p.add_argument("--mask-source", default=d("mask_source"),
                 help=f"concept masks from ground-truth labels or from the clean run (Eq. 8): "
                      f"{' or '.join(MASK_SOURCES)}")
  p.add_argument("--poison-fraction", type=float, default=d("poison_fraction"),
                 help="cap on poisoned images / N")
  p.add_argument("--poison-order", default=d("poison_order"),
                 help=f"which candidates fill the cap ({' or '.join(POISON_ORDERS)}): 'concept' "
                      "(the paper's code: images holding the source concept, then the "
                      "target's, in probe order) or 'activation' (highest clean activation of "
                      "the unit first)")
  _common.add_probe_pass_flags(p)
  p.add_argument("--units-per-call", type=int, default=d("units_per_call"),
                 help="units attacked in one compiled call")
  p.add_argument("--export-unit", metavar="LAYER:UNIT", help="export this unit's corrupted probe set")
  p.add_argument("--export-dir", type=Path, help="where to write the exported Broden directory")
  p.add_argument("--export-eps", type=float, help="ε (/255) of the export (default: the largest)")
  p.add_argument("--export-mode", help="mode of the export (default: the first of --modes)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
  _common.add_run_flags(p, "runs/pgd_sweep", "output directory (re-running resumes)")
  _common.add_process_flags(p)
  return p.parse_args(argv)


def sweep_config(args, layers) -> PGDSweepConfig:
  """The config of the flags; a bad value ends the script with one line naming its flag."""
  units = checks.parse_units(args.units) if args.units else None
  return PGDSweepConfig(
      layers=tuple(layers), units=units, num_units=args.num_units, min_iou=args.min_iou,
      modes=tuple(args.modes),
      attack=PGDAttack(eps=tuple(eps_from_255(e) for e in args.eps), steps=args.steps,
                       step_size=None if args.step_size is None else eps_from_255(args.step_size)),
      mask_source=args.mask_source, poison_fraction=args.poison_fraction,
      poison_order=args.poison_order, probe_pass=_common.probe_pass(args), seed=args.seed,
      units_per_call=args.units_per_call)


def export_request(args, config: PGDSweepConfig) -> tuple[str, int, float, str] | None:
  """``(layer, unit, ε in [0, 1], mode)`` of --export-*, or None; ValueError naming the flag."""
  if (args.export_unit is None) != (args.export_dir is None):
    raise ValueError("--export-unit and --export-dir go together")
  if args.export_unit is None:
    for flag in ("export_eps", "export_mode"):
      if getattr(args, flag) is not None:
        raise ValueError(f"--{flag.replace('_', '-')} needs --export-unit and --export-dir")
    return None
  layer, unit = checks.parse_layer_unit(args.export_unit)
  mode = args.export_mode or config.modes[0]
  if mode not in config.modes:
    raise ValueError(f"--export-mode {mode!r} must be one of --modes {list(config.modes)}")
  eps = max(config.attack.eps) if args.export_eps is None else eps_from_255(args.export_eps)
  if not 0 < eps <= 1:
    raise ValueError(f"--export-eps must lie in (0, 255] (/255 units), got {format_eps(eps)}")
  if args.export_dir.exists() and not args.overwrite:
    raise ValueError(f"--export-dir {args.export_dir} exists; pass --overwrite to replace it")
  return layer, unit, eps, mode


def main(argv=None) -> None:
  args = parse_args(argv)
  leader = _common.join_processes(args).leader
  progress = not args.no_progress and leader
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
        ("--jpeg-quality", args.delivery == "jpeg", "--delivery jpeg"),
        ("--overwrite", args.export_dir is not None, "--export-dir"),
        ("--export-unit", args.num_processes == 1,
         "one process (export after the sweep, alone: the sweep resumes with nothing to do)")])
    target = _common.resolve_target(args)
  except ValueError as e:
    _common.fail(str(e))
  config = _common.flag_checked(lambda: sweep_config(args, target.layers))
  # What will be attacked, checked on a shape-only model: the embedded one is not trained
  # (nor its probe set generated) until every flag has passed.
  try:
    export = export_request(args, config)
    checked = _common.sweep_model(target)
    widths = checks.spatial_widths(checked.model, config.layers, checked.image_size)
    if config.units:
      checks.check_units(config.units, widths)
    if export:
      checks.check_units({export[0]: (export[1],)}, widths, flag="--export-unit")
    run_info = _common.run_info(target)
    pgd_sweep.check_out_dir(args.out, pgd_sweep.run_record(config, run_info))
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))

  # --- work: build the embedded default if needed, load, sweep ---------------------------
  try:
    model, probe = _common.load_sweep_inputs(args, target, checked, progress)
    with _common.locked_output(args.out):
      summary = pgd_sweep.run_pgd_sweep(model, probe, config, args.out, progress=progress,
                                        run_info=run_info)
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  if not leader:  # process 0 writes the shared files and reports
    return
  print_summary(config, summary)
  pgd_sweep.plot_summary(summary, args.out / "pgd_sweep.png")
  print(f"\nwrote {args.out}/results.csv, summary.json, pgd_sweep.png")
  if export:
    run_export(args, config, model, probe, export, progress)


def print_summary(config: PGDSweepConfig, summary: dict) -> None:
  elig = ", ".join(f"{l} {e['eligible']}/{e['units']}" for l, e in summary["eligible_units"].items())
  print(f"\neligible units (clean label with IoU > {config.min_iou:g}): {elig}"
        + ("; explicit --units bypass the bar" if config.units else ""))
  print(f"poisoned images: '{config.poison_order}' order, at most {config.poison_fraction:g}·N")
  print("\n% of units manipulated (units attacked in parentheses); "
        "untargeted = label changed, targeted = label became the target, "
        "noise = label changed by random ±ε sign noise on the images U2 poisons\n")
  print(pgd_sweep.format_table(summary))
  survival = pgd_sweep.format_survival_table(summary)
  if survival:
    print(f"\n{config.probe_pass.delivery} delivery: % manipulated as floats -> as delivered; "
          "survived = float successes that still succeed once delivered\n")
    print(survival)


def run_export(args, config: PGDSweepConfig, model, probe, export, progress: bool) -> None:
  """Exports one attack's corrupted probe set, re-dissects it and compares (exit 1: mismatch)."""
  layer, unit, eps, mode = export
  delivery = config.probe_pass.delivery
  stored = ResultsStore(args.out / "results.csv", pgd_sweep.RESULT_FIELDS,
                        pgd_sweep.KEY_FIELDS).get(layer=layer, unit=unit, eps=eps, mode=mode)
  if export_delivery(delivery) != delivery:
    print(f"\nnote: the sweep measured float images; the export writes them quantised to "
          f"{export_delivery(delivery)} (image files hold 8-bit pixels)")
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
