"""How interpretable the embedded default's units are: a clean dissection, summarised per layer.

    PYTHONPATH=. .venv/bin/python tools/embedded_units.py [--cache cache/embedded] [--seed 0]
        [--layers block3 block4]

Builds the embedded default into ``--cache`` if it is not there (generation + training, timed),
dissects ``--layers`` on its probe set and prints, per layer: the IoU quantiles of each unit's
best label, the fraction of units above NetDissect's interpretability bar (IoU > 0.04), the
category mix of the best labels (all units and units above the bar), and the most frequent
labels; then the checkpoint's held-out scene accuracy.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

IOU_BAR = 0.04  # NetDissect's threshold for an interpretable unit


def layer_summary(result, probe, bar: float = IOU_BAR) -> dict:
  """Summary of one ``LayerDissection``: IoU quantiles, fraction > ``bar``, category mix.

  Returns:
    dict with ``units`` (U), ``quantiles`` {q: IoU} for q in 0/.25/.5/.75/.9/1,
    ``mean``, ``frac_above``, ``categories`` {category: units} over all units,
    ``categories_above`` the same over units with IoU > bar, ``labels_above``
    [(category/label, units)] most frequent first, ``silent`` (units with threshold 0, active
    in fewer than η of positions) and ``mean_attackable`` (mean IoU of the labelled units with
    a positive threshold: those a sweep picks from).
  """
  score = np.asarray(result.score, np.float64)                    # (U,)
  live = (np.asarray(result.thresholds) > 0) & (np.asarray(result.best_label) > 0)
  cats = [probe.category_names[c] for c in np.asarray(result.best_category)]
  names = [str(probe.label_names[n]) for n in np.asarray(result.best_label)]
  above = score > bar
  qs = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
  return {
      "units": int(score.shape[0]),
      "quantiles": {q: float(np.quantile(score, q)) for q in qs},
      "mean": float(score.mean()),
      "silent": int((np.asarray(result.thresholds) <= 0).sum()),
      "mean_attackable": float(score[live].mean()) if live.any() else 0.0,
      "frac_above": float(above.mean()),
      "categories": dict(collections.Counter(cats).most_common()),
      "categories_above": dict(collections.Counter(
          c for c, a in zip(cats, above) if a).most_common()),
      "labels_above": collections.Counter(
          f"{c}/{n}" for c, n, a in zip(cats, names, above) if a).most_common(),
  }


def format_summary(layer: str, s: dict) -> str:
  q = " ".join(f"q{int(k * 100)}={v:.3f}" for k, v in s["quantiles"].items())
  cats = ", ".join(f"{k} {v}" for k, v in s["categories"].items())
  cats_above = ", ".join(f"{k} {v}" for k, v in s["categories_above"].items()) or "-"
  labels = ", ".join(f"{k} {v}" for k, v in s["labels_above"][:10]) or "-"
  return (f"{layer}: {s['units']} units, IoU {q} mean={s['mean']:.3f}\n"
          f"  silent (threshold 0): {s['silent']}, mean IoU of labelled live units: "
          f"{s['mean_attackable']:.3f}\n"
          f"  IoU > {IOU_BAR}: {s['frac_above']:.1%} "
          f"({round(s['frac_above'] * s['units'])}/{s['units']})\n"
          f"  best-label categories (all units): {cats}\n"
          f"  best-label categories (IoU > {IOU_BAR}): {cats_above}\n"
          f"  labels (IoU > {IOU_BAR}): {labels}")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--layers", nargs="+", help="default: nemjax.embedded.LAYERS")
  args = p.parse_args(argv)

  from nemjax import dissect, embedded
  from nemjax.data import broden
  from nemjax.models import checkpoint

  t0 = time.perf_counter()
  default = embedded.build_embedded_default(args.cache, seed=args.seed, progress=False)
  build_s = time.perf_counter() - t0
  layers = list(args.layers or default.layers)
  model = checkpoint.load(default.checkpoint_dir)
  probe = broden.load_probe(default.probe_dir)
  results = dissect.dissect(model, probe, layers, progress=False)
  print(f"embedded default seed {args.seed} ({args.cache}): build/load {build_s:.1f} s, "
        f"probe {probe.num_images} images")
  for layer in layers:
    print(format_summary(layer, layer_summary(results[layer], probe)))
  extra = default.metadata.get("extra", {})
  acc = {k: extra[k] for k in ("train_accuracy", "probe_accuracy", "heldout_accuracy")
         if k in extra}
  print("accuracy: " + ", ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in acc.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
