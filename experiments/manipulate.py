"""Manipulating feature visualisation by fine-tuning (Nanfack et al. AAAI 2024, Table 1).

    python experiments/manipulate.py                  # embedded default, < 10 min on 2 CPU cores

With no arguments: the embedded default (a synthetic Broden-format probe set, a SmallCNN
trained on a second synthetic set and a third, held-out set, cached in cache/embedded),
push-down on every channel of block4 with k = 10, fine-tuned on the synthetic training set
for 3 epochs (90 steps of 16 training + 16 attacked images) with Adam lr 3e-4 and the dynamic
α rule (start 0.1, ×2 / ÷2 after each evaluation, 0.5-point tolerance on the held-out
accuracy), evaluated every 15 steps (these defaults live in nemjax.manipulate.config; --help
shows them). The papers' lr 1e-5
needs ImageNet-length runs; 3e-4 is the largest rate at which fine-tuning alone
(--alpha-fixed 0) still leaves the top-k sets and rankings almost unchanged (1e-3 already moves
them: top-5 overlap 0.81, Kendall-τ 0.90 after one epoch).

Writes OUT/metrics.csv, metrics.md (Table-1 style), channels.csv, topk_before_after.png,
featvis_before_after.png (activation maximisation of 4 attacked channels, original vs fine-tuned),
config.json, history.json, summary.json, the fine-tuned model OUT/model (orbax, loadable with
nemjax.models.checkpoint.load) and OUT/checkpoints/last (train state after every evaluation).
Re-running the same command after an interruption resumes from the last checkpoint.

Accuracy is always measured on held-out images that no fine-tuning step, distillation batch
or top-k ranking sees (the α rule reads it), next to the accuracy on a fixed sample of the
training stream (--train-eval-size images); both appear before and after in the table.

Other inputs: --probe DIR --weights CKPT (a converted torchvision model) need held-out images,
--val-folder DIR: class-per-subfolder images whose sorted sub-directory names are the model's
classes (ImageFolder order), or any images with --val-unlabelled, in which case the held-out
column is top-1 agreement with the original model, not accuracy (the report says so). The
training stream is --train-folder (class-per-subfolder images, the same classes as
--val-folder) or, by default, the probe images themselves (distillation needs no labels).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

from nemjax.manipulate import config as C  # noqa: E402  (after the venv bootstrap)

D, A, F, E, P = (C.ManipulateConfig, C.AlphaConfig, C.FeatVisReport, C.EMBEDDED_SCHEDULE,
                 C.PAPER_SCHEDULE)


def build_parser() -> argparse.ArgumentParser:
  """The flags; every default comes from :mod:`nemjax.manipulate.config`."""
  p = _common.ArgumentParser(description=__doc__)
  p.add_argument("--attack", default=D.attack, choices=C.ATTACKS,
                 help="the manipulation objective")
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--layers", nargs="+",
                 help=f"layers to attack (default: {' '.join(C.embedded_layers('push-down'))}; "
                      f"fairwash: {' '.join(C.embedded_layers('fairwash'))}, the block4 conv "
                      "before its ReLU)")
  p.add_argument("--channels", nargs="+", default=["all"], metavar="SPEC",
                 help="'all', a list 'J1,J2,...' for every layer, or 'LAYER:J1,J2,...'")
  p.add_argument("--k", type=int, default=D.k, help="top-k set size")
  p.add_argument("--overlap-k", type=int, default=D.overlap_k,
                 help="top-n compared before/after")
  p.add_argument("--decoy-class", help="push-up: decoys = training images of this class "
                                       "(name or index)")
  p.add_argument("--decoy-folder", type=Path, help="push-up: decoys = the images in this folder")
  p.add_argument("--num-decoys", type=int, default=C.DataSources.num_decoys,
                 help="decoy set size")
  p.add_argument("--decoys-per-step", type=int, default=D.decoys_per_step,
                 help="push-up: decoy images per fine-tuning step")
  p.add_argument("--group-concept", default=None,
                 help="fairwash: group 1 = probe images showing this label (default "
                      f"{C.FAIRWASH_GROUP_CONCEPT!r})")
  p.add_argument("--alpha-init", type=float, default=A.init, help="initial α of the dynamic rule")
  p.add_argument("--alpha-min", type=float, default=A.min_alpha, help="lower bound of α")
  p.add_argument("--alpha-max", type=float, default=A.max_alpha, help="upper bound of α")
  p.add_argument("--alpha-tolerance", type=float, default=A.tolerance,
                 help="allowed accuracy drop in points before α is halved")
  p.add_argument("--alpha-fixed", type=float, default=A.fixed,
                 help="constant α, disables the rule (0: fine-tuning-only baseline)")
  p.add_argument("--epochs", type=int, help=f"passes over the training stream (default "
                                            f"embedded: {E.epochs}, else {P.epochs} as the papers)")
  p.add_argument("--lr", type=float, help=f"Adam learning rate (default embedded: "
                                          f"{E.learning_rate:g}, else {P.learning_rate:g})")
  p.add_argument("--batch-size", type=int, default=D.batch_size,
                 help="training-stream images per step")
  p.add_argument("--attack-batch-size", type=int, default=D.attack_batch_size,
                 help="probe images (top-k members / all / both groups) per step")
  p.add_argument("--eval-every", type=int,
                 help="steps between evaluations, α updates and checkpoints "
                      f"(default embedded: {E.eval_every}, else once per epoch)")
  p.add_argument("--loss-scale", default=D.loss_scale, choices=C.LOSS_SCALES,
                 help="relative (scale-invariant) or the papers' plain sum")
  p.add_argument("--train-from", metavar="LAYER",
                 help="train only parameters of this module and later ones (default: all)")
  p.add_argument("--embed-layer", default=D.embed_layer,
                 help="pooled features used as the CLIP stand-in")
  _common.add_heldout_flags(p)
  p.add_argument("--featvis-channels", type=int, default=F.channels,
                 help="attacked channels per layer visualised by activation maximisation "
                      "before and after (0 turns it off)")
  p.add_argument("--featvis-steps", type=int, default=F.steps,
                 help="activation-maximisation steps per visualisation")
  p.add_argument("--eval-batch-size", type=int, default=D.eval_batch_size,
                 help="images per forward pass when evaluating")
  _common.add_run_flags(p, "runs/manipulate",
                         "output directory (re-running resumes from its checkpoints)")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def parse_channels(specs: list[str], layers: tuple[str, ...]) -> dict | None:
  """{layer: (j, ...)} from the --channels specs (None: all channels of every layer); the
  values are checked by the config."""
  if specs == ["all"]:
    return None
  out: dict[str, tuple[int, ...]] = {}
  for spec in specs:
    layer, sep, js = spec.rpartition(":")
    try:
      chans = tuple(int(j) for j in js.split(",") if j != "")
    except ValueError:
      raise ValueError(f"channels: entry {spec!r} must be 'all', 'J1,J2,...' or "
                       "'LAYER:J1,J2,...'") from None
    for t in [layer] if sep else list(layers):
      out[t] = tuple(sorted(set(out.get(t, ()) + chans)))
  return out


def make_config(args: argparse.Namespace, argv=None) -> C.ManipulateConfig:
  """The flags as a config; ValueError naming the field (or flag) of the first bad value."""
  embedded = args.probe is None
  push_up, fairwash = args.attack == "push-up", args.attack == "fairwash"
  _common.refuse_inapplicable(argv, [
      ("--cache", embedded, _common.EMBEDDED_ONLY),
      *[(f, not embedded, _common.PROBE_ONLY) for f in _common.HELDOUT_FLAGS],
      *[(f, push_up, "--attack push-up") for f in (
          "--decoy-class", "--decoy-folder", "--num-decoys", "--decoys-per-step")],
      ("--group-concept", fairwash, "--attack fairwash")])
  group = args.group_concept if args.group_concept is not None else (
      C.FAIRWASH_GROUP_CONCEPT if fairwash else None)
  data = _common.data_sources(args, decoy_class=args.decoy_class,
                              decoy_folder=args.decoy_folder, num_decoys=args.num_decoys,
                              group_concept=group)
  target = _common.resolve_target(args, default_layers=C.embedded_layers(args.attack))
  schedule = C.EMBEDDED_SCHEDULE if target.embedded else C.PAPER_SCHEDULE
  given = lambda value, default: default if value is None else value
  return C.ManipulateConfig(
      attack=args.attack, layers=target.layers,
      channels=parse_channels(args.channels, target.layers), k=args.k,
      overlap_k=args.overlap_k, epochs=given(args.epochs, schedule.epochs),
      learning_rate=given(args.lr, schedule.learning_rate),
      eval_every=given(args.eval_every, schedule.eval_every), batch_size=args.batch_size,
      attack_batch_size=args.attack_batch_size, decoys_per_step=args.decoys_per_step,
      alpha=C.AlphaConfig(init=args.alpha_init, min_alpha=args.alpha_min,
                          max_alpha=args.alpha_max, tolerance=args.alpha_tolerance,
                          fixed=args.alpha_fixed),
      loss_scale=args.loss_scale, train_from=args.train_from, embed_layer=args.embed_layer,
      eval_batch_size=args.eval_batch_size,
      featvis=C.FeatVisReport(channels=args.featvis_channels, steps=args.featvis_steps),
      data=data, arch=target.arch, seed=args.seed)


def main(argv=None) -> None:
  args = parse_args(argv)
  config = _common.make_config(lambda: make_config(args, argv))
  from nemjax.manipulate import experiment, report
  summary = _common.run_finetune(
      args, config, lambda **kw: experiment.run(config, args.out, **kw))
  print()
  print(report.format_table(summary["rows"], overlap_k=config.overlap_k))
  print(f"\n{summary['accuracy_note']}")
  print(f"\n{summary['steps']} steps ({summary['train_seconds']:.0f} s fine-tuning); wrote "
        f"{args.out}/metrics.csv, metrics.md, topk_before_after.png, model/")


if __name__ == "__main__":
  _common.run(main)
