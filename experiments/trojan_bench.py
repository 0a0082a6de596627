"""Casper's trojan-rediscovery benchmark: implant trojans, score attribution maps against the
trigger masks, score feature-synthesis tools by the 8-way multiple choice.

    python experiments/trojan_bench.py              # embedded default, < 15 min on 2 CPU cores

With no arguments: the embedded default (a SmallCNN trained on synthetic scenes, cached in
cache/embedded) with two trojans implanted at once (universal patch and style, their poisoning
rates a shared budget, 14 epochs; the class-universal patch and the natural-feature trojan are
left out, see nemjax.trojans.bench.config for why). Then, on the patch
trojans' triggered held-out images (up to --images each), the Pearson correlation of every
--methods map (16 Captum methods, the Sobel edge detector, the blank map; reduced sample counts
for the perturbation methods, --help shows them) with the trigger mask, and a one-sided paired
Wilcoxon test of each method against the edge detector; and each synthesis tool (adversarial
patch, feature visualisation, TABOR, SNAFUE) per trojan, scored by the 8-way multiple choice
(the original model's pooled features as the embedder; chance 0.125).

Writes OUT/results.md (implant, attribution and synthesis tables), attribution.csv (per image),
attribution_summary.csv, synthesis.csv, boxplot.png, panel_attribution_<trojan>.png,
panel_synthesis_<trojan>.png, implant.json, summary.json, config.json; OUT/checkpoints and
OUT/stages hold the implantation and finished stages: re-running after a kill resumes.
"""
from __future__ import annotations

import argparse
import dataclasses

import _common

_common.bootstrap()

from nemjax.trojans import EMBEDDED_TROJANS  # noqa: E402  (after the bootstrap)
from nemjax.trojans.bench import config as C  # noqa: E402

D, AS, SS = C.TrojanBenchConfig, C.AttributionSettings, C.SynthesisSettings
TC = D().trojan
FLAGS = {"trojan.epochs": "--epochs", "trojan.learning_rate": "--lr",
         "trojan.batch_size": "--batch-size", "attribution.images": "--images",
         "attribution.batch_size": "--attr-batch-size", "synthesis.steps": "--synthesis-steps",
         "synthesis.tools": "--tools", "synthesis.random_distractors": "--random-distractors",
         "synthesis.images": "--synthesis-images"}


def build_parser() -> argparse.ArgumentParser:
  """The flags; every default comes from :mod:`nemjax.trojans.bench.config`."""
  p = _common.ArgumentParser(description=__doc__)
  p.add_argument("--trojans", nargs="+", default=[t.name for t in TC.trojans],
                 choices=sorted(EMBEDDED_TROJANS), help="trojans implanted (all at once)")
  p.add_argument("--epochs", type=int, default=TC.epochs, help="implantation epochs")
  p.add_argument("--lr", type=float, default=TC.learning_rate, help="implantation Adam rate")
  p.add_argument("--batch-size", type=int, default=TC.batch_size,
                 help="training images per implantation step")
  p.add_argument("--methods", nargs="+", default=list(AS.methods), metavar="METHOD",
                 help="attribution methods scored (nemjax.explain names)")
  p.add_argument("--images", type=int, default=AS.images,
                 help="triggered held-out images per patch trojan")
  p.add_argument("--attr-batch-size", type=int, default=AS.batch_size,
                 help="images per attribution call")
  for name, what in (("feature_grid", "perturbation methods' features: grid cells per side"),
                     ("occlusion_window", "occlusion window side (pixels)"),
                     ("occlusion_stride", "occlusion stride (pixels)"),
                     ("samples", "LIME / KernelSHAP samples"),
                     ("shapley_samples", "Shapley value sampling permutations"),
                     ("ig_steps", "integrated gradients steps")):
    p.add_argument("--" + name.replace("_", "-"), type=int,
                   default=getattr(AS, name), help=what)
  p.add_argument("--tools", nargs="*", default=list(SS.tools), metavar="TOOL",
                 help=f"synthesis tools among {list(C.SYNTHESIS_TOOLS)} (none: skip synthesis)")
  p.add_argument("--synthesis-steps", type=int, default=SS.steps,
                 help="Adam steps of each synthesis tool")
  p.add_argument("--synthesis-images", type=int, default=SS.images,
                 help="clean held-out images the patch and TABOR optimise over")
  p.add_argument("--random-distractors", type=int, default=SS.random_distractors,
                 help="random patterns in the multiple choice's distractor pool")
  p.add_argument("--panel-images", type=int, default=D.panel_images,
                 help="triggered images per trojan in the attribution panels")
  _common.add_run_flags(p, "runs/trojan_bench",
                        "output directory (re-running resumes from its checkpoints and stages)")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def make_config(args: argparse.Namespace) -> C.TrojanBenchConfig:
  """The flags as a config; ValueError naming the field of the first bad value."""
  trojan = dataclasses.replace(
      TC, trojans=tuple(EMBEDDED_TROJANS[n] for n in dict.fromkeys(args.trojans)),
      epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
  return C.TrojanBenchConfig(
      trojan=trojan,
      attribution=C.AttributionSettings(
          methods=tuple(args.methods), images=args.images, batch_size=args.attr_batch_size,
          feature_grid=args.feature_grid, occlusion_window=args.occlusion_window,
          occlusion_stride=args.occlusion_stride, samples=args.samples,
          shapley_samples=args.shapley_samples, ig_steps=args.ig_steps),
      synthesis=dataclasses.replace(SS(), tools=tuple(args.tools), steps=args.synthesis_steps,
                                    images=args.synthesis_images,
                                    random_distractors=args.random_distractors),
      panel_images=args.panel_images, seed=args.seed)


def main(argv=None) -> None:
  args = parse_args(argv)
  config = _common.make_config(lambda: make_config(args), FLAGS)
  if args.cache.exists() and not args.cache.is_dir():
    _common.fail(f"--cache: {args.cache} is not a directory")
  _common.check_output(args.out)
  from nemjax.embedded import build_embedded_default  # pylint: disable=import-outside-toplevel
  from nemjax.trojans.bench import run  # pylint: disable=import-outside-toplevel
  default = build_embedded_default(args.cache, seed=args.seed, progress=not args.no_progress)
  with _common.locked_output(args.out):
    try:
      summary = run(config, args.out, default=default, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
      _common.fail(str(e))
  print()
  print(summary["table"])
  s = summary["seconds"]
  print(f"implant {s['implant']:.0f} s, attribution {s['attribution']:.0f} s, synthesis "
        f"{s['synthesis']:.0f} s, total {s['total']:.0f} s; wrote {args.out}/results.md, "
        "boxplot.png, panels")


if __name__ == "__main__":
  _common.run(main)
