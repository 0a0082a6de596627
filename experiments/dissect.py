"""Network Dissection of chosen layers of a model on a Broden-format probe set.

    python experiments/dissect.py --probe DIR --arch resnet18 --weights CKPT \
        --layers layer3 layer4 --out DIR [--thresholds layer4=thr.npy] [--top-fraction 0.005]

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
  from nemjax.dissect.run import DissectConfig
  from nemjax.sweep.config import field_default
  d = lambda name: field_default(DissectConfig, name)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--arch", help="model architecture (default: from the checkpoint metadata)")
  p.add_argument("--weights", type=Path, help="orbax checkpoint directory (default: embedded)")
  p.add_argument("--layers", nargs="+", help="layers to dissect (default: embedded layers)")
  p.add_argument("--out", type=Path, default=Path("runs/dissect"), help="output directory")
  p.add_argument("--thresholds", nargs="*", default=[], metavar="LAYER=FILE.npy",
                 help="use these thresholds (1-D float, one per unit) instead of quantiles")
  p.add_argument("--top-fraction", type=float, default=d("top_fraction"),
                 help="η: the top fraction of a unit's activations above its threshold")
  p.add_argument("--quantile-method", default=d("quantile_method"),
                 help="numpy.quantile method of the thresholds")
  p.add_argument("--categories", nargs="*", help="categories to use (default: all)")
  p.add_argument("--batch-size", type=int, default=d("batch_size"),
                 help="probe images per forward pass")
  p.add_argument("--tally-method", default=d("tally_method"),
                 help="tally kernel: auto (picks per layer), sparse or dense")
  p.add_argument("--report-top", type=int, default=d("report_top"),
                 help="images per unit in the HTML report")
  p.add_argument("--no-report", action="store_true", help="skip the HTML report")
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"), help="embedded default cache")
  p.add_argument("--seed", type=int, default=0, help="embedded default seed")
  _common.add_process_flags(p)
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
  leader = _common.join_processes(args).leader
  from nemjax.data import broden, synthetic
  from nemjax.dissect.driver import layer_shapes
  from nemjax.dissect.run import DissectConfig, run_dissection

  fail = _common.fail
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", args.probe is None, _common.EMBEDDED_ONLY),
        ("--seed", args.probe is None, _common.EMBEDDED_ONLY),
        ("--report-top", not args.no_report, "a run with the HTML report (not --no-report)")])
    target = _common.resolve_target(args)
  except ValueError as e:
    fail(str(e))
  config = _common.flag_checked(lambda: DissectConfig(
      layers=target.layers, top_fraction=args.top_fraction, quantile_method=args.quantile_method,
      batch_size=args.batch_size, tally_method=args.tally_method, report=not args.no_report,
      report_top=args.report_top))
  _common.check_output(args.out)
  layers = list(config.layers)
  try:
    # Unit counts by shape inference (no computation; the embedded model is not built yet).
    checked = _common.sweep_model(target)
    units = {k: v[-1] for k, v in layer_shapes(checked.model, layers, checked.image_size).items()}
  except (ValueError, FileNotFoundError) as e:  # BrodenFormatError is a ValueError
    fail(one_line(e))
  known = synthetic.CATEGORIES if checked.probe is None else checked.probe.category_names
  unknown = [c for c in args.categories or () if c not in known]
  if unknown or args.categories == []:
    fail(f"--categories: {unknown or 'none given'} not among the probe set's categories "
         f"{', '.join(known)}")
  thresholds = load_thresholds(args.thresholds, layers, units)
  try:
    model, probe = _common.load_sweep_inputs(args, target, checked, progress=leader)
    if args.categories:  # the probe set read again, keeping only these categories
      probe = broden.load_probe(target.probe_dir, categories=args.categories)
  except (ValueError, FileNotFoundError) as e:
    fail(one_line(e))
  with _common.locked_output(args.out):  # a second run on --out is refused
    try:
      summaries = run_dissection(model, probe, config, args.out, thresholds=thresholds,
                                 extra={"weights": str(target.weights)}, progress=leader)
    except (ValueError, FileNotFoundError) as e:
      fail(f"dissection failed: {one_line(e)}")
  if not leader:  # process 0 writes the files and reports
    return
  for layer, summary in summaries.items():
    print(f"{layer}: {summary['num_units']} units, mean IoU {summary['mean_iou']:.4f}, "
          f"{summary['distinct_labels']} distinct labels, per category "
          f"{summary['units_per_category']}")
  print(f"wrote {args.out}" + ("" if args.no_report else f" (report: {args.out / 'index.html'})"))


if __name__ == "__main__":
  _common.run(main)
