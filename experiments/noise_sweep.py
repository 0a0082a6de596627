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
from nemjax.attacks.noise import NOISE_KINDS  # noqa: E402
from nemjax.sweep import checks  # noqa: E402
from nemjax.sweep.config import NoiseSweepConfig, field_default  # noqa: E402
from nemjax.sweep.noise_sweep import (  # noqa: E402
    check_noise_out_dir, format_noise_table, noise_record, run_noise_sweep)


def parse_args(argv=None):
  d = lambda name: field_default(NoiseSweepConfig, name)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax checkpoint from `python -m nemjax.convert`")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--layers", nargs="+", help="layers to dissect (default: embedded block3 block4)")
  p.add_argument("--sigmas", nargs="+", type=float, default=list(d("sigmas")),
                 help="noise strengths σ, in [0, 1] pixel units")
  p.add_argument("--fractions", nargs="+", type=float, default=list(d("fractions")),
                 help="fractions of the probe images corrupted, in (0, 1]")
  p.add_argument("--kinds", nargs="+", default=list(d("kinds")),
                 help=f"noise kinds among {', '.join(NOISE_KINDS)} (gaussian: N(0, σ²); uniform "
                      "and bernoulli: bounded by σ)")
  _common.add_probe_pass_flags(p)
  p.add_argument("--min-iou", type=float, default=d("min_iou"),
                 help="count only these units: " + _common.MIN_IOU_HELP)
  _common.add_run_flags(p, "runs/noise_sweep", "output directory (re-running resumes)")
  _common.add_process_flags(p)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  leader = _common.join_processes(args).leader
  progress = not args.no_progress and leader
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
        ("--jpeg-quality", args.delivery == "jpeg", "--delivery jpeg")])
    target = _common.resolve_target(args)
  except ValueError as e:
    _common.fail(str(e))
  config = _common.flag_checked(lambda: NoiseSweepConfig(
      layers=target.layers, sigmas=tuple(args.sigmas), fractions=tuple(args.fractions),
      kinds=tuple(args.kinds), min_iou=args.min_iou, probe_pass=_common.probe_pass(args),
      seed=args.seed))
  try:
    checked = _common.sweep_model(target)
    checks.spatial_widths(checked.model, config.layers, checked.image_size)
    run_info = _common.run_info(target)
    check_noise_out_dir(args.out, noise_record(config, run_info))
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))

  try:
    model, probe = _common.load_sweep_inputs(args, target, checked, progress)
    with _common.locked_output(args.out):
      rows = run_noise_sweep(model, probe, config, args.out, progress=progress,
                             run_info=run_info)
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  if not leader:  # process 0 writes the shared files and reports
    return
  counts = {r["layer"]: r["units"] for r in rows}
  print("eligible units (clean label with IoU > %g): %s" % (
      config.min_iou, ", ".join(f"{l} {counts[l]}" for l in config.layers)))
  for layer in config.layers:
    for kind in config.kinds:
      print(f"\n% of {layer} units whose label changed, {kind} noise "
            f"({config.probe_pass.delivery} delivery, seed {config.seed})\n")
      print(format_noise_table(rows, layer, kind))
  print(f"\nwrote {args.out}/results.csv, summary.json, noise_sweep.png")


if __name__ == "__main__":
  _common.run(main)
