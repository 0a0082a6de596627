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
L1 rates 0.5 0.875; vulnerability rates 0.25 0.5 (defaults of nemjax.manipulate.config). Writes OUT/results.csv, results.md,
prune_defence.png and config.json (no resume: a rerun starts over).

Every accuracy column comes twice: on held-out images that neither the recovery nor the attack
trains on (the embedded default's held-out set, or --val-folder with --probe/--weights; the α
rule reads it) and on a fixed sample of the training stream.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common

_common.bootstrap()

from nemjax.manipulate import config as C  # noqa: E402  (after the venv bootstrap)

D, S = C.PruneDefenceConfig, C.PRUNE_DEFENCE_SCHEDULE


def build_parser() -> argparse.ArgumentParser:
  """The flags; every default comes from :mod:`nemjax.manipulate.config`."""
  p = _common.ArgumentParser(description=__doc__)
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--layer", default=C.embedded_layers("push-down")[0], help="attacked layer")
  p.add_argument("--l1-rates", nargs="*", type=float, default=list(D.l1_rates),
                 help="L1 unstructured pruning rates, in (0, 1)")
  p.add_argument("--vulnerability-rates", nargs="*", type=float,
                 default=list(D.vulnerability_rates),
                 help="fractions of the channels most vulnerable to the attack pruned, in (0, 1)")
  p.add_argument("--recover-steps", type=int, default=D.recover_steps,
                 help="distillation-only steps after pruning")
  p.add_argument("--k", type=int, default=C.ManipulateConfig.k, help="top-k set size")
  p.add_argument("--epochs", type=int, default=S.epochs, help="attack epochs")
  p.add_argument("--lr", type=float, default=S.learning_rate, help="Adam learning rate")
  p.add_argument("--batch-size", type=int, default=C.ManipulateConfig.batch_size,
                 help="training-stream images per step")
  p.add_argument("--attack-batch-size", type=int, default=C.ManipulateConfig.attack_batch_size,
                 help="attacked (top-k) images per step")
  p.add_argument("--eval-every", type=int, default=S.eval_every,
                 help="steps between held-out evaluations (and α updates)")
  _common.add_heldout_flags(p)
  _common.add_run_flags(p, "runs/prune_defence", "output directory")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def make_config(args: argparse.Namespace, argv=None) -> C.PruneDefenceConfig:
  """The flags as a config; ValueError naming the field (or flag) of the first bad value."""
  embedded = args.probe is None
  _common.refuse_inapplicable(argv, [
      ("--cache", embedded, _common.EMBEDDED_ONLY),
      *[(f, not embedded, _common.PROBE_ONLY) for f in _common.HELDOUT_FLAGS]])
  data = _common.data_sources(args)
  target = _common.resolve_target(args, layer_flag="--layer")
  attack = C.ManipulateConfig(
      attack="push-down", layers=target.layers, k=args.k,
      overlap_k=min(C.ManipulateConfig.overlap_k, args.k), epochs=args.epochs,
      learning_rate=args.lr, batch_size=args.batch_size,
      attack_batch_size=args.attack_batch_size, eval_every=args.eval_every,
      data=data, arch=target.arch, seed=args.seed)
  return C.PruneDefenceConfig(attack=attack, l1_rates=tuple(args.l1_rates),
                              vulnerability_rates=tuple(args.vulnerability_rates),
                              recover_steps=args.recover_steps)


def main(argv=None) -> None:
  args = parse_args(argv)
  config = _common.make_config(lambda: make_config(args, argv), {"layers": "--layer"})
  from nemjax.manipulate import defence
  _, text = _common.run_finetune(
      args, config.attack, lambda **kw: defence.run(config, args.out, **kw))
  print()
  print(text)
  print(f"\nwrote {args.out}/results.csv, results.md, prune_defence.png")


if __name__ == "__main__":
  _common.run(main)
