"""Network Dissection of chosen layers of a model on a Broden-format probe set.

    python experiments/dissect.py --probe DIR --arch resnet18 --weights CKPT \
        --layers layer3 layer4 --out DIR [--thresholds layer4=thr.npy] [--quantile 0.005]

``--weights`` is an orbax checkpoint written by ``python -m nemjax.convert`` (or by the
embedded default). With no --probe/--weights the embedded default is used.
Writes, per layer: <layer>_tally.csv, <layer>_thresholds.npy, <layer>_iou.npy,
<layer>_summary.json and <layer>_report.html (+ <layer>_report/ JPEG strips), and an
index.html with every layer's units in one sortable table (units.json for scripts). The
dissection streams over the probe set (two forward passes), so memory does not grow with its
size.

Bad input fails up front with one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

import numpy as np  # noqa: E402


def parse_args(argv=None):
  from nemjax.dissect.quantile import DEFAULT_ETA
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="model architecture (default: from the checkpoint metadata)")
  p.add_argument("--weights", type=Path, help="orbax checkpoint directory (default: embedded)")
  p.add_argument("--layers", nargs="+", help="layers to dissect (default: embedded layers)")
  p.add_argument("--out", type=Path, default=Path("runs/dissect"), help="output directory")
  p.add_argument("--thresholds", nargs="*", default=[], metavar="LAYER=FILE.npy",
                 help="use these thresholds (1-D float, one per unit) instead of quantiles")
  p.add_argument("--quantile", type=float, default=DEFAULT_ETA,
                 help=f"η: top fraction (default {DEFAULT_ETA})")
  p.add_argument("--quantile-method", default="linear", help="numpy.quantile method")
  p.add_argument("--categories", nargs="*", help="categories to use (default: all)")
  p.add_argument("--batch-size", type=int, default=32, help="probe images per forward pass")
  p.add_argument("--tally-method", default="auto", choices=["auto", "sparse", "dense"],
                 help="tally kernel (auto picks per layer)")
  p.add_argument("--report-top", type=int, default=4, help="images per unit in the HTML report")
  p.add_argument("--no-report", action="store_true", help="skip the HTML report")
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"), help="embedded default cache")
  p.add_argument("--seed", type=int, default=0, help="embedded default seed")
  return p.parse_args(argv)


def one_line(e: BaseException) -> str:
  """The exception's message on one line."""
  return " ".join(str(e).split()) or type(e).__name__


def load_thresholds(specs: list[str], layers: list[str], units: dict[str, int]
                    ) -> dict[str, np.ndarray]:
  """Parses ``LAYER=FILE.npy`` entries; fails (exit 2) on any problem, naming the entry.

  Args:
    specs: the --thresholds entries.
    layers: the --layers names.
    units: ``{layer: U}`` unit count of each layer.
  """
  thresholds = {}
  for spec in specs:
    layer, sep, path = spec.partition("=")
    if not sep or not layer or not path:
      _common.fail(f"--thresholds entry {spec!r} must be LAYER=FILE.npy")
    if layer not in layers:
      _common.fail(f"--thresholds {spec!r}: layer {layer!r} is not among --layers {layers}")
    if layer in thresholds:
      _common.fail(f"--thresholds: layer {layer!r} given twice")
    if not Path(path).is_file():
      _common.fail(f"--thresholds {spec!r}: file not found: {path}")
    try:
      arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
      _common.fail(f"--thresholds {spec!r}: cannot load {path} as a .npy array ({one_line(e)})")
    if not isinstance(arr, np.ndarray):
      _common.fail(f"--thresholds {spec!r}: {path} holds several arrays (.npz); give one .npy")
    if not np.issubdtype(arr.dtype, np.floating):
      _common.fail(f"--thresholds {spec!r}: {path} must hold a float array, got dtype {arr.dtype}")
    if arr.shape != (units[layer],):
      _common.fail(f"--thresholds {spec!r}: {path} must be 1-D with one threshold per unit "
                   f"({units[layer]},) for {layer}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
      _common.fail(f"--thresholds {spec!r}: {path} holds NaN or inf")
    thresholds[layer] = arr.astype(np.float64)
  return thresholds


def main(argv=None) -> None:
  args = parse_args(argv)
  from nemjax.data import broden
  from nemjax.dissect import QUANTILE_METHODS, dissect
  from nemjax.dissect.driver import layer_shapes
  from nemjax.dissect.html import write_index, write_layer_report
  from nemjax.dissect.outputs import write_layer_outputs
  from nemjax.models import checkpoint

  fail = _common.fail
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
        ("--seed", args.probe is None, _common.EMBEDDED_ONLY),
        ("--report-top", not args.no_report, "a run with the HTML report (not --no-report)")])
  except ValueError as e:
    fail(str(e))
  if not 0 < args.quantile < 1:
    fail(f"--quantile must lie in (0, 1), got {args.quantile}")
  if args.quantile_method not in QUANTILE_METHODS:
    fail(f"--quantile-method {args.quantile_method!r} is not one of {', '.join(QUANTILE_METHODS)}")
  if args.batch_size < 1:
    fail(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.report_top < 1 and not args.no_report:
    fail(f"--report-top must be >= 1, got {args.report_top}")
  if (args.probe is None) != (args.weights is None):
    fail("give both --probe and --weights, or neither (embedded default)")
  _common.check_output(args.out)
  try:
    if args.probe is None:
      from nemjax.embedded import build_embedded_default
      default = build_embedded_default(args.cache, seed=args.seed)
      probe_dir, weights = default.probe_dir, default.checkpoint_dir
      layers = args.layers or list(default.layers)
    else:
      probe_dir, weights, layers = args.probe, args.weights, args.layers
      if not layers:
        fail("--layers is required with --weights")
    probe = broden.load_probe(probe_dir, categories=args.categories or None)
    model = checkpoint.load(weights, arch=args.arch)
    # Unit counts by shape inference (no computation); unknown layers fail here.
    units = {k: v[-1] for k, v in layer_shapes(model, layers, probe.image_size).items()}
  except (ValueError, FileNotFoundError) as e:  # BrodenFormatError is a ValueError
    fail(one_line(e))
  thresholds = load_thresholds(args.thresholds, layers, units)
  with _common.locked_output(args.out):  # a second run on --out is refused
    try:
      results = dissect(model, probe, layers, batch_size=args.batch_size, quantile=args.quantile,
                        quantile_method=args.quantile_method, thresholds=thresholds,
                        tally_method=args.tally_method,
                        num_top_images=0 if args.no_report else args.report_top)
    except (ValueError, FileNotFoundError) as e:
      fail(f"dissection failed: {one_line(e)}")
    for layer, res in results.items():
      summary = write_layer_outputs(args.out, res, probe, extra={"weights": str(weights)})
      if not args.no_report:
        write_layer_report(args.out, layer, res, probe)
      print(f"{layer}: {summary['num_units']} units, mean IoU {summary['mean_iou']:.4f}, "
            f"{summary['distinct_labels']} distinct labels, per category "
            f"{summary['units_per_category']}")
    if not args.no_report:
      write_index(args.out, results, probe)
  print(f"wrote {args.out}" + ("" if args.no_report else f" (report: {args.out / 'index.html'})"))


if __name__ == "__main__":
  _common.run(main)
