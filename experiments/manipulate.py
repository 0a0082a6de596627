"""Manipulating feature visualisation by fine-tuning (Nanfack et al. AAAI 2024, Table 1).

    python experiments/manipulate.py                  # embedded default, < 10 min on 2 CPU cores

With no arguments: the embedded default (a synthetic Broden-format probe set, a SmallCNN
trained on a second synthetic set and a third, held-out set, cached in cache/embedded),
push-down on every channel of block4 with k = 10, fine-tuned on the synthetic training set
for 3 epochs (90 steps of 16 training + 16 attacked images) with Adam lr 3e-4 and the dynamic
α rule (start 0.1, ×2 / ÷2 after each evaluation, 0.5-point tolerance on the held-out
accuracy), evaluated every 15 steps. The papers' lr 1e-5
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
import sys
from pathlib import Path

import _common

_common.bootstrap()

EMBEDDED_DEFAULTS = {"lr": 3e-4, "epochs": 3, "eval_every": 15, "layers": ["block4"],
                     "fairwash_layers": ["features.12"]}
CUSTOM_DEFAULTS = {"lr": 1e-5, "epochs": 5, "eval_every": None}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=_common.HelpFormatter)
  p.add_argument("--attack", default="push-down", choices=["push-down", "push-up", "fairwash"],
                 help="the manipulation objective")
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--layers", nargs="+",
                 help="layers to attack (default: block4; fairwash: features.12, the block4 "
                      "conv before its ReLU)")
  p.add_argument("--channels", nargs="+", default=["all"], metavar="SPEC",
                 help="'all', a list 'J1,J2,...' for every layer, or 'LAYER:J1,J2,...'")
  p.add_argument("--k", type=int, default=10, help="top-k set size (default 10)")
  p.add_argument("--overlap-k", type=int, default=5, help="top-n compared before/after (5)")
  p.add_argument("--decoy-class", help="push-up: decoys = training images of this class "
                                       "(name or index)")
  p.add_argument("--decoy-folder", type=Path, help="push-up: decoys = the images in this folder")
  p.add_argument("--num-decoys", type=int, default=100, help="decoy set size (default 100)")
  p.add_argument("--decoys-per-step", type=int, default=8,
                 help="push-up: decoy images per fine-tuning step")
  p.add_argument("--group-concept", default=None,
                 help="fairwash: group 1 = probe images showing this label (default 'red')")
  p.add_argument("--alpha-init", type=float, default=0.1, help="initial α of the dynamic rule")
  p.add_argument("--alpha-min", type=float, default=1e-3, help="lower bound of α")
  p.add_argument("--alpha-max", type=float, default=0.9, help="upper bound of α")
  p.add_argument("--alpha-tolerance", type=float, default=0.5,
                 help="allowed accuracy drop in points before α is halved (default 0.5)")
  p.add_argument("--alpha-fixed", type=float, default=None,
                 help="constant α, disables the rule (0: fine-tuning-only baseline)")
  p.add_argument("--epochs", type=int, help="passes over the training stream "
                                            "(embedded: 3, else 5 as the papers)")
  p.add_argument("--lr", type=float, help="Adam learning rate (embedded: 3e-4, else 1e-5)")
  p.add_argument("--batch-size", type=int, default=16, help="training-stream images per step")
  p.add_argument("--attack-batch-size", type=int, default=16,
                 help="probe images (top-k members / all / both groups) per step")
  p.add_argument("--eval-every", type=int,
                 help="steps between evaluations, α updates and checkpoints "
                      "(embedded: 15, else once per epoch)")
  p.add_argument("--loss-scale", default="relative", choices=["relative", "sum"],
                 help="relative (default, scale-invariant) or the papers' plain sum")
  p.add_argument("--train-from", metavar="LAYER",
                 help="train only parameters of this module and later ones (default: all)")
  p.add_argument("--embed-layer", default="avgpool",
                 help="pooled features used as the CLIP stand-in (default avgpool)")
  _common.add_heldout_flags(p)
  p.add_argument("--featvis-channels", type=int, default=4,
                 help="attacked channels per layer visualised by activation maximisation "
                      "before and after (default 4; 0 turns it off)")
  p.add_argument("--featvis-steps", type=int, default=128,
                 help="activation-maximisation steps per visualisation (default 128)")
  p.add_argument("--eval-batch-size", type=int, default=50,
                 help="images per forward pass when evaluating")
  _common.add_run_flags(p, "runs/manipulate",
                         "output directory (re-running resumes from its checkpoints)")
  return p.parse_args(argv)


def parse_channels(specs, layers, fail):
  """{layer: (j, ...)} from the --channels specs (None: all channels of every layer)."""
  if specs == ["all"]:
    return None
  out = {}
  for spec in specs:
    layer, sep, js = spec.rpartition(":")
    try:
      chans = tuple(int(j) for j in js.split(",") if j != "")
    except ValueError:
      fail(f"--channels entry {spec!r} must be 'all', 'J1,J2,...' or 'LAYER:J1,J2,...'")
    if not chans or any(j < 0 for j in chans):
      fail(f"--channels entry {spec!r} must list channel indices >= 0")
    targets = [layer] if sep else list(layers)
    for t in targets:
      if t not in layers:
        fail(f"--channels names layer {t!r}, which is not in --layers {layers}")
      out[t] = tuple(sorted(set(out.get(t, ()) + chans)))
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  fail = _common.fail
  # --- flag checks that need nothing loaded -------------------------------------------------
  embedded = args.probe is None
  push_up, fairwash = args.attack == "push-up", args.attack == "fairwash"
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", embedded, _common.EMBEDDED_ONLY),
        *[(f, not embedded, _common.PROBE_ONLY) for f in _common.HELDOUT_FLAGS],
        *[(f, push_up, "--attack push-up") for f in (
            "--decoy-class", "--decoy-folder", "--num-decoys", "--decoys-per-step")],
        ("--group-concept", fairwash, "--attack fairwash")])
  except ValueError as e:
    fail(str(e))
  if args.k < 1:
    fail(f"--k must be >= 1, got {args.k}")
  if not 1 <= args.overlap_k <= args.k:
    fail(f"--overlap-k must be in [1, --k={args.k}], got {args.overlap_k}")
  if args.featvis_channels < 0:
    fail(f"--featvis-channels must be >= 0, got {args.featvis_channels}")
  for name in ("epochs", "batch_size", "attack_batch_size", "eval_every", "num_decoys",
               "decoys_per_step", "eval_batch_size", "featvis_steps"):
    v = getattr(args, name)
    if v is not None and v < 1:
      fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
  if args.lr is not None and not args.lr > 0:
    fail(f"--lr must be > 0, got {args.lr}")
  if args.alpha_fixed is not None and not 0 <= args.alpha_fixed <= 1:
    fail(f"--alpha-fixed must be in [0, 1], got {args.alpha_fixed}")
  if args.alpha_fixed is None:
    if not 0 < args.alpha_min <= args.alpha_max <= 1:
      fail(f"need 0 < --alpha-min <= --alpha-max <= 1, got {args.alpha_min}, {args.alpha_max}")
    if not args.alpha_min <= args.alpha_init <= args.alpha_max:
      fail(f"--alpha-init {args.alpha_init} outside [--alpha-min, --alpha-max]")
    if args.alpha_tolerance < 0:
      fail(f"--alpha-tolerance must be >= 0, got {args.alpha_tolerance}")
  if args.attack == "push-up":
    if (args.decoy_class is None) == (args.decoy_folder is None):
      fail("push-up needs exactly one of --decoy-class or --decoy-folder")
    if args.decoy_folder is not None and not args.decoy_folder.is_dir():
      fail(f"--decoy-folder: directory not found: {args.decoy_folder}")
  _common.check_heldout_flags(args, embedded)
  defaults = EMBEDDED_DEFAULTS if embedded else CUSTOM_DEFAULTS
  lr = args.lr if args.lr is not None else defaults["lr"]
  epochs = args.epochs if args.epochs is not None else defaults["epochs"]
  eval_every = args.eval_every if args.eval_every is not None else defaults["eval_every"]
  try:
    target = _common.resolve_target(args, default_layers=EMBEDDED_DEFAULTS[
        "fairwash_layers" if args.attack == "fairwash" else "layers"])
    from nemjax import models
    for flag, name in (("--train-from", args.train_from), ("--embed-layer", args.embed_layer)):
      if name is not None:
        try:
          models.canonical_layer(target.arch, name)
        except ValueError as e:
          raise ValueError(f"{flag}: {e}") from None
  except ValueError as e:
    fail(str(e))
  layers = list(target.layers)
  channels = parse_channels(args.channels, layers, fail)
  group_concept = args.group_concept or ("red" if args.attack == "fairwash" else None)

  from nemjax.manipulate import experiment as X
  from nemjax.manipulate import inputs as minputs
  from nemjax.manipulate import report
  config = X.ManipulateConfig(
      attack=args.attack, layers=tuple(layers), channels=channels, k=args.k,
      overlap_k=args.overlap_k, epochs=epochs, learning_rate=lr, batch_size=args.batch_size,
      attack_batch_size=args.attack_batch_size, decoys_per_step=args.decoys_per_step,
      eval_every=eval_every, alpha_init=args.alpha_init, alpha_min=args.alpha_min,
      alpha_max=args.alpha_max, alpha_tolerance=args.alpha_tolerance,
      alpha_fixed=args.alpha_fixed, loss_scale=args.loss_scale, train_from=args.train_from,
      embed_layer=args.embed_layer, eval_batch_size=args.eval_batch_size,
      featvis_channels=args.featvis_channels, featvis_steps=args.featvis_steps, seed=args.seed)
  embedder = _common.check_finetune_run(args, config)

  progress = not args.no_progress
  default = None
  if embedded:
    from nemjax.embedded import build_embedded_default
    default = build_embedded_default(args.cache, seed=args.seed, progress=progress)
  try:
    inputs, run_info = _common.heldout_inputs(
        args, config, default, decoy_class=args.decoy_class, decoy_folder=args.decoy_folder,
        num_decoys=args.num_decoys, group_concept=group_concept)
    inputs.embedder, run_info = embedder, dict(run_info, embedder=args.embedder)
    with _common.locked_output(args.out):
      summary = X.run_experiment(config, inputs, args.out, run_info=run_info,
                                 progress=progress)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  print()
  print(report.format_table(summary["rows"], overlap_k=config.overlap_k))
  print(f"\n{summary['accuracy_note']}")
  print(f"\n{summary['steps']} steps ({summary['train_seconds']:.0f} s fine-tuning); wrote "
        f"{args.out}/metrics.csv, metrics.md, topk_before_after.png, model/")


if __name__ == "__main__":
  _common.run(main)
