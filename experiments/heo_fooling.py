"""Fooling explanations by fine-tuning (Heo, Joo & Moon, NeurIPS 2019, Table 1).

    python experiments/heo_fooling.py                 # embedded default, < 10 min on 2 CPU cores

With no arguments: the embedded default (a SmallCNN trained on synthetic scenes, cached in
cache/embedded), location fooling of Grad-CAM at block4: CE on the training set + λ · the mean
squared difference between the max-normalised Grad-CAM of the true class and a frame mask
(+ μ · distillation to the original model's outputs on the same images, --distill), Adam, the
model in inference mode (BatchNorm statistics frozen). The embedded schedule
(nemjax.fooling.config; --help shows it) is shorter and faster than the paper's (VGG19 on
ImageNet: lr 1e-6..3e-6, λ 0.5..2; active lr 1e-5, λ 10), used for --probe/--weights models.

Writes OUT/results.md (accuracy before/after; FSR before/after and correlations of every
--measure method: the transfer row of the fooled method), results.json, panel.png (original
vs fooled heatmaps of every measured method on the same held-out images), config.json,
history.json, summary.json, the fine-tuned model OUT/model and OUT/checkpoints/last (train
state after every evaluation): re-running the same command after a kill resumes.

Other models: --probe DIR --weights CKPT (a converted torchvision model) --layer LAYER with
--val-folder (held-out images, class-per-subfolder, the model's classes) and --train-folder
(the labelled training stream; the CE term needs labels).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

from nemjax.fooling import config as C  # noqa: E402  (after the venv bootstrap)
from nemjax.fooling.losses import FOOLING_METHODS, KINDS  # noqa: E402

D, R, A, E = C.FoolingConfig, C.FoolingReport, C.ActiveSetup, C.EMBEDDED_SCHEDULE
P, PA = C.PAPER_SCHEDULE, C.PAPER_ACTIVE_SCHEDULE
FLAGS = {"lam": "--lam", "learning_rate": "--lr", "distill": "--distill", "active.mosaics_per_step": "--mosaics-per-step",
         "report.eval_images": "--eval-images"}


def build_parser() -> argparse.ArgumentParser:
  """The flags; every default comes from :mod:`nemjax.fooling.config`."""
  p = _common.ArgumentParser(description=__doc__)
  p.add_argument("--method", default=D.method, choices=sorted(FOOLING_METHODS),
                 help="the explanation fooled: gradcam (Heo's Grad-CAM) or lrp (LRP at --layer)")
  p.add_argument("--fooling", default=D.fooling, choices=KINDS, help="the fooling loss")
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--layer", help=f"layer the heatmaps are computed at (default embedded: "
                                 f"{C.EMBEDDED_LAYER}; required with --weights)")
  p.add_argument("--lam", type=float, help=f"λ, weight of the fooling loss (default embedded: "
                                           f"{E.lam:g}; else {P.lam:g}, active {PA.lam:g})")
  p.add_argument("--lr", type=float, help=f"Adam learning rate (default embedded: "
                                          f"{E.learning_rate:g}; else {P.learning_rate:g}, "
                                          f"active {PA.learning_rate:g})")
  p.add_argument("--distill", type=float, help=f"μ, weight of the distillation loss to the "
                                               f"original model on clean images (default "
                                               f"embedded: {E.distill:g}; else {P.distill:g})")
  p.add_argument("--epochs", type=int, help=f"passes over the training stream (default "
                                            f"embedded: {E.epochs}, else {P.epochs})")
  p.add_argument("--eval-every", type=int, help="steps between evaluations and checkpoints "
                                                f"(default embedded: {E.eval_every}, else once "
                                                "per epoch)")
  p.add_argument("--batch-size", type=int, default=D.batch_size,
                 help="training images per step (CE, and the fooling loss when passive)")
  p.add_argument("--c1", type=int, default=A.c1, help="active fooling: first class of the swap")
  p.add_argument("--c2", type=int, default=A.c2, help="active fooling: second class of the swap")
  p.add_argument("--mosaics-per-step", type=int, default=A.mosaics_per_step,
                 help="active fooling: 2x2 mosaics of c1 and c2 images per step")
  p.add_argument("--measure", nargs="+", default=list(R.measure), metavar="METHOD",
                 help=f"methods measured before and after (transfer), among {list(C.MEASURABLE)}")
  p.add_argument("--threshold", type=float, default=R.threshold,
                 help="FSR threshold of the per-image fooling score")
  p.add_argument("--panel-images", type=int, default=R.panel_images,
                 help="held-out images shown in panel.png")
  p.add_argument("--eval-images", type=int, help="held-out images measured (default: all)")
  p.add_argument("--eval-batch-size", type=int, default=D.eval_batch_size,
                 help="images per forward pass when measuring")
  _common.add_heldout_flags(p, embedder=False)
  _common.add_run_flags(p, "runs/heo_fooling",
                        "output directory (re-running resumes from its checkpoints)")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def make_config(args: argparse.Namespace, argv=None) -> C.FoolingConfig:
  """The flags as a config; ValueError naming the field (or flag) of the first bad value."""
  embedded = args.probe is None
  active = args.fooling == "active"
  _common.refuse_inapplicable(argv, [
      ("--cache", embedded, _common.EMBEDDED_ONLY),
      *[(f, not embedded, _common.PROBE_ONLY) for f in _common.HELDOUT_FLAGS],
      *[(f, active, "--fooling active") for f in ("--c1", "--c2", "--mosaics-per-step")]])
  data = _common.data_sources(args)
  target = _common.resolve_target(args, default_layers=(C.EMBEDDED_LAYER,), layer_flag="--layer")
  schedule = C.schedule_for(target.embedded, args.fooling)
  given = lambda value, default: default if value is None else value
  return C.FoolingConfig(
      method=args.method, fooling=args.fooling, layer=target.layers[0],
      lam=given(args.lam, schedule.lam), learning_rate=given(args.lr, schedule.learning_rate),
      distill=given(args.distill, schedule.distill),
      epochs=given(args.epochs, schedule.epochs),
      eval_every=given(args.eval_every, schedule.eval_every), batch_size=args.batch_size,
      eval_batch_size=args.eval_batch_size,
      active=C.ActiveSetup(c1=args.c1, c2=args.c2, mosaics_per_step=args.mosaics_per_step),
      report=C.FoolingReport(measure=tuple(args.measure), threshold=args.threshold,
                             panel_images=args.panel_images, eval_images=args.eval_images),
      data=data, arch=target.arch, seed=args.seed)


def main(argv=None) -> None:
  args = parse_args(argv)
  config = _common.make_config(lambda: make_config(args, argv), FLAGS)
  from nemjax.fooling import experiment  # pylint: disable=import-outside-toplevel
  summary = _common.run_finetune(args, config,
                                 lambda **kw: experiment.run(config, args.out, **kw))
  print()
  print(summary["table"])
  print(f"{summary['steps']} steps ({summary['train_seconds']:.0f} s fine-tuning); wrote "
        f"{args.out}/results.md, panel.png, model/")


if __name__ == "__main__":
  _common.run(main)
