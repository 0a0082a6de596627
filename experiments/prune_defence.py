"""Pruning as a defence against feature-visualisation manipulation (Nanfack et al. AAAI 2024).

    python experiments/prune_defence.py               # embedded default, a few minutes on 2 CPUs

For each pruning method and rate: prune the original model, recover with a short
distillation-only fine-tune (masks re-applied after every update), then run the push-down
attack again and measure accuracy and CLIP-δ. Methods: global unstructured L1 magnitude
pruning of conv / linear kernels, and vulnerability pruning — zeroing the attacked layer's
channels with the highest CLIP-δ under an attack on the unpruned model (conv + BatchNorm
feeding the layer). The paper found no pruning level that resists the attack without a large
accuracy loss.

Default (embedded SmallCNN, block4, all channels, k = 10): attack = 1 epoch (30 steps of
16 + 16 images, Adam lr 1e-3, dynamic α, evaluation every 10 steps); recovery = 15 steps;
L1 rates 0.5 0.875; vulnerability rates 0.25 0.5. Writes OUT/results.csv, results.md,
prune_defence.png and config.json (no resume: a rerun starts over).

Every accuracy column comes twice: on held-out images that neither the recovery nor the attack
trains on (the embedded default's held-out set, or --val-folder with --probe/--weights; the α
rule reads it) and on a fixed sample of the training stream.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common

_common.bootstrap()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=_common.HelpFormatter)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--layer", default="block4", help="attacked layer (default block4)")
  p.add_argument("--l1-rates", nargs="*", type=float, default=[0.5, 0.875],
                 help="L1 unstructured pruning rates, in [0, 1)")
  p.add_argument("--vulnerability-rates", nargs="*", type=float, default=[0.25, 0.5],
                 help="fractions of the channels most vulnerable to the attack pruned, in [0, 1)")
  p.add_argument("--recover-steps", type=int, default=15,
                 help="distillation-only steps after pruning (default 15)")
  p.add_argument("--k", type=int, default=10, help="top-k set size")
  p.add_argument("--epochs", type=int, default=1, help="attack epochs (default 1)")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
  p.add_argument("--batch-size", type=int, default=16, help="training-stream images per step")
  p.add_argument("--attack-batch-size", type=int, default=16,
                 help="attacked (top-k) images per step")
  p.add_argument("--eval-every", type=int, default=10,
                 help="steps between held-out evaluations (and α updates)")
  _common.add_heldout_flags(p)
  _common.add_run_flags(p, "runs/prune_defence", "output directory")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  fail = _common.fail
  embedded = args.probe is None
  try:
    _common.refuse_inapplicable(argv, [
        ("--cache", embedded, _common.EMBEDDED_ONLY),
        *[(f, not embedded, _common.PROBE_ONLY) for f in _common.HELDOUT_FLAGS]])
  except ValueError as e:
    fail(str(e))
  for name in ("l1_rates", "vulnerability_rates"):
    bad = [r for r in getattr(args, name) if not 0 < r < 1]
    if bad:
      fail(f"--{name.replace('_', '-')} must lie in (0, 1), got {bad}")
  for name in ("recover_steps", "k", "epochs", "batch_size", "attack_batch_size", "eval_every"):
    if getattr(args, name) < 1:
      fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if not args.lr > 0:
    fail(f"--lr must be > 0, got {args.lr}")
  _common.check_heldout_flags(args, embedded)

  try:
    _common.resolve_target(args, layer_flag="--layer")
  except ValueError as e:
    fail(str(e))

  from nemjax.files import atomic_write_text, claim_record
  from nemjax.manipulate import experiment as X
  from nemjax.manipulate import defence
  from nemjax.manipulate import inputs as minputs
  from nemjax.manipulate import report
  config = X.ManipulateConfig(
      attack="push-down", layers=(args.layer,), k=args.k, overlap_k=min(5, args.k),
      epochs=args.epochs,
      learning_rate=args.lr, batch_size=args.batch_size,
      attack_batch_size=args.attack_batch_size, eval_every=args.eval_every, seed=args.seed)
  embedder = _common.check_finetune_run(args, config)
  progress = not args.no_progress
  default = None
  if embedded:
    from nemjax.embedded import build_embedded_default
    default = build_embedded_default(args.cache, seed=args.seed, progress=progress)
  with _common.locked_output(args.out):
    try:
      inputs, run_info = _common.heldout_inputs(args, config, default)
      inputs.embedder = embedder
      record = {"config": config.to_json(), "run": run_info, "embedder": args.embedder,
                "l1_rates": args.l1_rates, "vulnerability_rates": args.vulnerability_rates,
                "recover_steps": args.recover_steps}
      # another configuration's results are not overwritten: the differing fields are named
      claim_record(args.out / "config.json", record, what="pruning-defence results",
                   remedy="use another --out or delete it")
      rows = defence.run_prune_defence(config, inputs, l1_rates=args.l1_rates,
                                       vulnerability_rates=args.vulnerability_rates,
                                       recover_steps=args.recover_steps, progress=progress)
    except (ValueError, FileNotFoundError) as e:
      fail(str(e))
    table = report.format_table(rows, overlap_k=config.overlap_k)
    atomic_write_text(args.out / "results.csv", report.csv_text(rows))
    note = ("\n\nΔ held-out acc. = held-out accuracy after the attack − that of the pruned "
            f"model. *CLIP-δ with {X.embedder_description(inputs, config)} as the embedding.* "
            f"{X.accuracy_note(inputs)}\n")
    atomic_write_text(args.out / "results.md", "# Pruning defence (push-down attack)\n\n"
                      + table + note)
    report.plot_prune_defence(args.out / "prune_defence.png", rows,
                              title=f"pruning defence: push-down on {args.layer}")
  print()
  print(table)
  print(f"\n{X.accuracy_note(inputs)}")
  print(f"\nwrote {args.out}/results.csv, results.md, prune_defence.png")


if __name__ == "__main__":
  _common.run(main)
