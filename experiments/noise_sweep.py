"""Random-noise corruption of the probe set (Srivastava et al., Tables A.1/A.2).

    python experiments/noise_sweep.py            # embedded default

% of units (labelled with clean IoU > --min-iou, default 0.04) whose
label changes for σ ∈ {0.01 … 0.05} × poisoned fraction {20 … 100 %} × noise type (gaussian,
uniform, bernoulli). Resumable: results.csv is appended as cells finish, keyed by (layer, kind,
σ, fraction, delivery, seed), so another --seed or --delivery adds rows to the same directory;
other settings (probe, weights, quantile, batch size, min IoU) are guarded by OUT/config.json.
Writes OUT/summary.json and OUT/noise_sweep.png. Every flag is checked before any work starts
(the embedded model is not trained for a bad flag). Noise is keyed by (seed, architecture,
kind, σ, fraction, image), never by list positions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

# Imported after the bootstrap, which re-runs this script inside the project venv.
from nemjax.sweep import checks  # noqa: E402
from nemjax.sweep.noise_sweep import (  # noqa: E402
    check_noise_args, check_noise_out_dir, format_noise_table, noise_record, run_noise_sweep)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax checkpoint from `python -m nemjax.convert`")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--layers", nargs="+", help="layers to dissect (default: embedded block3 block4)")
  p.add_argument("--sigmas", nargs="+", type=float, default=[0.01, 0.02, 0.03, 0.04, 0.05],
                 help="noise strengths σ, in [0, 1] pixel units")
  p.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0],
                 help="fractions of the probe images corrupted, in (0, 1]")
  p.add_argument("--kinds", nargs="+", default=["gaussian", "uniform", "bernoulli"],
                 help="noise kinds (gaussian: N(0, σ²); uniform and bernoulli: bounded by σ)")
  _common.add_probe_pass_flags(p)
  p.add_argument("--min-iou", type=float, help="count only these units: " + _common.MIN_IOU_HELP)
  _common.add_run_flags(p, "runs/noise_sweep", "output directory (re-running resumes)")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  progress = not args.no_progress
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
        ("--jpeg-quality", args.delivery == "jpeg", "--delivery jpeg")])
    args.min_iou = _common.min_iou(args)
  except ValueError as e:
    _common.fail(str(e))
  grid = dict(sigmas=args.sigmas, fractions=args.fractions, kinds=args.kinds,
              delivery=args.delivery, jpeg_quality=args.jpeg_quality, seed=args.seed,
              batch_size=args.batch_size, quantile=args.quantile, min_iou=args.min_iou)
  try:
    check_noise_args(**grid)
  except ValueError as e:
    _common.fail(_common.as_flag_error(e))
  try:
    target = _common.sweep_target(args)
    layers = target.layers
    checks.spatial_widths(target.model, layers, target.image_size)
    run_info = {"probe": str(Path(target.probe_dir).resolve()),
                "weights": str(Path(target.weights).resolve()), "arch": target.model.arch}
    check_noise_out_dir(args.out, noise_record(batch_size=args.batch_size, quantile=args.quantile,
                                               jpeg_quality=args.jpeg_quality,
                                               min_iou=args.min_iou, run_info=run_info))
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))

  try:
    model, probe = _common.load_sweep_target(args, target, progress)
    with _common.locked_output(args.out):
      rows = run_noise_sweep(model, probe, layers, args.out, progress=progress,
                             run_info=run_info, **grid)
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  counts = {r["layer"]: r["units"] for r in rows}
  print("eligible units (clean label with IoU > %g): %s" % (
      args.min_iou, ", ".join(f"{l} {counts[l]}" for l in layers)))
  for layer in layers:
    for kind in args.kinds:
      print(f"\n% of {layer} units whose label changed, {kind} noise "
            f"({args.delivery} delivery, seed {args.seed})\n")
      print(format_noise_table(rows, layer, kind))
  print(f"\nwrote {args.out}/results.csv, summary.json, noise_sweep.png")


if __name__ == "__main__":
  _common.run(main)
