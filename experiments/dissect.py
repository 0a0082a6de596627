"""Network Dissection of chosen layers of a model on a Broden-format probe set.

    python experiments/dissect.py --probe DIR --arch resnet18 --weights CKPT \
        --layers layer3 layer4 --out DIR [--thresholds layer4=thr.npy] [--quantile 0.005]

``--weights`` is an orbax checkpoint written by ``python -m nemjax.convert`` (or by the
embedded default). With no --probe/--weights the embedded default is used.
Writes, per layer: <layer>_tally.csv, <layer>_thresholds.npy, <layer>_iou.npy,
<layer>_summary.json and <layer>_report.html.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

import numpy as np  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="model architecture (default: from the checkpoint metadata)")
  p.add_argument("--weights", type=Path, help="orbax checkpoint directory (default: embedded)")
  p.add_argument("--layers", nargs="+", help="layers to dissect (default: embedded layers)")
  p.add_argument("--out", type=Path, default=Path("runs/dissect"))
  p.add_argument("--thresholds", nargs="*", default=[], metavar="LAYER=FILE.npy",
                 help="use these thresholds instead of computing quantiles")
  p.add_argument("--quantile", type=float, default=0.005, help="η: top fraction (default 0.005)")
  p.add_argument("--quantile-method", default="linear", help="numpy.quantile method")
  p.add_argument("--categories", nargs="*", help="categories to use (default: all)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--tally-method", default="auto", choices=["auto", "sparse", "dense"])
  p.add_argument("--report-top", type=int, default=4, help="images per unit in the HTML report")
  p.add_argument("--no-report", action="store_true", help="skip the HTML report")
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"), help="embedded default cache")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  from nemjax.data import broden
  from nemjax.dissect.driver import dissect
  from nemjax.dissect.html import write_layer_report
  from nemjax.dissect.outputs import write_layer_outputs
  from nemjax.models import checkpoint

  if not 0 < args.quantile < 1:
    _common.fail(f"--quantile must lie in (0, 1), got {args.quantile}")
  if (args.probe is None) != (args.weights is None):
    _common.fail("give both --probe and --weights, or neither (embedded default)")
  if args.probe is None:
    from nemjax.embedded import build_embedded_default
    default = build_embedded_default(args.cache, seed=args.seed)
    probe_dir, weights, layers = default.probe_dir, default.checkpoint_dir, args.layers or list(default.layers)
  else:
    probe_dir, weights, layers = args.probe, args.weights, args.layers
    if not layers:
      _common.fail("--layers is required with --weights")
  try:
    probe = broden.load_probe(probe_dir, categories=args.categories or None)
    model = checkpoint.load(weights, arch=args.arch)
    from nemjax import models
    canon = [models.canonical_layer(model.arch, l) for l in layers]
  except (ValueError, FileNotFoundError) as e:
    _common.fail(str(e))
  thresholds = {}
  for spec in args.thresholds:
    layer, sep, path = spec.partition("=")
    if not sep or layer not in layers:
      _common.fail(f"--thresholds entry {spec!r} must be LAYER=FILE.npy with LAYER among --layers")
    if not Path(path).exists():
      _common.fail(f"--thresholds file not found: {path}")
    thresholds[layer] = np.load(path)
  del canon
  results, acts = dissect(model, probe, layers, batch_size=args.batch_size, quantile=args.quantile,
                          quantile_method=args.quantile_method, thresholds=thresholds,
                          tally_method=args.tally_method, keep_activations=True, workdir=None)
  args.out.mkdir(parents=True, exist_ok=True)
  for layer, res in results.items():
    summary = write_layer_outputs(args.out, res, probe, extra={"weights": str(weights)})
    if not args.no_report:
      write_layer_report(args.out, layer, res, acts[layer], probe, top=args.report_top)
    print(f"{layer}: {summary['num_units']} units, mean IoU {summary['mean_iou']:.4f}, "
          f"{summary['distinct_labels']} distinct labels, per category {summary['units_per_category']}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
