"""The dissection a user waits for, with and without its HTML report, side by side in one run.

    .venv/bin/python benchmarks/report.py [--images 320] [--out FILE.md]

A random-weight ResNet18 (365 classes) on a synthetic Broden-format probe set (224 images, 112
label maps), layers layer3 and layer4, through ``experiments/dissect.py``'s library calls:
``dissect`` + the per-layer files (``--no-report``), against ``dissect(num_top_images=4)`` +
the files + every layer's report page, its JPEG strips and ``index.html``. Both are compiled
once first, then timed alternately (best of ``--min-reps``); the report's share is the ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sidebyside as sbs  # noqa: E402

LAYERS = ["layer3", "layer4"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=320)
  p.add_argument("--top", type=int, default=4, help="images per unit in the report")
  sbs.add_common_args(p, min_seconds=0.0)
  p.set_defaults(min_reps=2)
  args = p.parse_args()
  sbs.set_up(args)

  from flax import nnx

  from nemjax.data import broden, synthetic
  from nemjax.dissect import dissect
  from nemjax.dissect.html import write_index, write_layer_report
  from nemjax.dissect.outputs import write_layer_outputs
  from nemjax.models import build

  with tempfile.TemporaryDirectory(prefix="nemjax-report-") as tmp_name:
    tmp = Path(tmp_name)
    probe = broden.load_probe(synthetic.make_probe_set(tmp / "probe", num_images=args.images,
                                                       seed=0))
    model = build("resnet18", num_classes=365, rngs=nnx.Rngs(0))

    def without_report() -> None:
      for res in dissect(model, probe, LAYERS, progress=False).values():
        write_layer_outputs(tmp / "plain", res, probe)

    def with_report() -> None:
      results = dissect(model, probe, LAYERS, progress=False, num_top_images=args.top)
      for layer, res in results.items():
        write_layer_outputs(tmp / "report", res, probe)
        write_layer_report(tmp / "report", layer, res, probe)
      write_index(tmp / "report", results, probe)

    without_report(), with_report()  # compile both
    best = sbs.interleaved_best({"plain": sbs.timed(without_report),
                                 "report": sbs.timed(with_report)},
                                args.min_reps, args.min_seconds)
    units = sum(1 for _ in (tmp / "report").rglob("unit*.jpg"))
  lines = ["| probe images | units | no report (s) | with report (s) | ratio |",
           "|---|---|---|---|---|",
           f"| {args.images} | {units} | {best['plain']:.2f} | {best['report']:.2f} | "
           f"{best['report'] / best['plain']:.2f} |"]
  sbs.emit(lines, args.out)


if __name__ == "__main__":
  main()
