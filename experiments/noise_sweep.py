"""Random-noise corruption of the probe set (Srivastava et al., Tables A.1/A.2).

    python experiments/noise_sweep.py            # embedded default

% of units whose label changes for σ ∈ {0.01 … 0.05} × poisoned fraction {20 … 100 %} ×
noise type (gaussian, uniform, bernoulli). Resumable: results.csv is appended as cells finish.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--probe", type=Path)
  p.add_argument("--weights", type=Path)
  p.add_argument("--arch")
  p.add_argument("--layers", nargs="+")
  p.add_argument("--sigmas", nargs="+", type=float, default=[0.01, 0.02, 0.03, 0.04, 0.05])
  p.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0])
  p.add_argument("--kinds", nargs="+", default=["gaussian", "uniform", "bernoulli"])
  p.add_argument("--delivery", default="float", choices=["float", "uint8", "jpeg"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--out", type=Path, default=Path("runs/noise_sweep"))
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"))
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if any(s <= 0 for s in args.sigmas):
    _common.fail(f"--sigmas must be > 0, got {args.sigmas}")
  if any(not 0 < f <= 1 for f in args.fractions):
    _common.fail(f"--fractions must lie in (0, 1], got {args.fractions}")
  if (args.probe is None) != (args.weights is None):
    _common.fail("give both --probe and --weights, or neither (embedded default)")
  from nemjax import models
  from nemjax.data import broden
  from nemjax.models import checkpoint
  from nemjax.sweep.noise_sweep import format_noise_table, run_noise_sweep
  progress = not args.no_progress
  if args.probe is None:
    from nemjax.embedded import build_embedded_default
    d = build_embedded_default(args.cache, seed=args.seed, progress=progress)
    probe_dir, weights, layers = d.probe_dir, d.checkpoint_dir, args.layers or list(d.layers)
  else:
    probe_dir, weights, layers = args.probe, args.weights, args.layers
    if not layers:
      _common.fail("--layers is required with --weights")
  try:
    probe = broden.load_probe(probe_dir)
    model = checkpoint.load(weights, arch=args.arch)
    for layer in layers:
      models.canonical_layer(model.arch, layer)
    rows = run_noise_sweep(model, probe, layers, args.out, sigmas=args.sigmas,
                           fractions=args.fractions, kinds=args.kinds, delivery=args.delivery,
                           seed=args.seed, batch_size=args.batch_size, progress=progress)
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  for layer in layers:
    for kind in args.kinds:
      print(f"\n% of {layer} units whose label changed, {kind} noise\n")
      print(format_noise_table(rows, layer, kind))
  print(f"\nwrote {args.out}/results.csv")


if __name__ == "__main__":
  main()
