"""The benchmark's files: per-image CSV, markdown tables, the box plot and the PNG panels."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np

from nemjax import figures
from nemjax.files import atomic_write_text
from nemjax.fooling.report import plot_panel

__all__ = ["write_csv", "implant_table", "attribution_table", "synthesis_table", "boxplot",
           "attribution_panel", "synthesis_panel"]


def _f(v, fmt: str = ".3f") -> str:
  return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
  """Rows (dicts with the same keys) as a CSV, atomically."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  atomic_write_text(path, buf.getvalue())


def implant_table(before: dict, after: dict) -> str:
  """Clean held-out accuracy and each trojan's ASR / control, before and after."""
  head = ("| | clean accuracy (%) | " + " | ".join(
      f"{k} ASR (%) | {k} control (%)" for k in after["trojans"]) + " |\n")
  sep = "|---" * (2 + 2 * len(after["trojans"])) + "|\n"
  row = lambda name, m: (f"| {name} | {m['clean_accuracy']:.1f} | " + " | ".join(
      f"{v['asr']:.1f} | {v['control']:.1f}" for v in m["trojans"].values()) + " |\n")
  return head + sep + row("before", before) + row("after", after)


def attribution_table(rows: Sequence[dict], per_trojan: dict[str, dict[str, float]],
                      baseline: str, alpha: float) -> str:
  """Mean Pearson per method (per trojan and pooled), the Wilcoxon p against ``baseline``."""
  names = list(per_trojan)
  head = ("| method | " + " | ".join(f"{t} mean r" for t in names) + " | all: mean r | median r "
          f"| n | p (> {baseline}) | beats {baseline} |\n")
  sep = "|---" * (6 + len(names)) + "|\n"
  body = "".join(
      f"| {r['method']} | " + " | ".join(_f(per_trojan[t].get(r["method"])) for t in names)
      + f" | {_f(r['mean'])} | {_f(r['median'])} | {r['n']} | {_f(r['wilcoxon_p'], '.2g')} | "
      f"{'yes' if r['beats_baseline'] else ('—' if r['method'] == baseline else 'no')} |\n"
      for r in rows)
  return (head + sep + body + f"\nPearson r between each map (scaled to [−1, 1]) and the trigger "
          f"mask; one-sided paired Wilcoxon signed-rank test against {baseline} (normal "
          f"approximation), 'beats' at p < {alpha:g}.\n")


def synthesis_table(scores: dict[str, np.ndarray], trojans: Sequence[str]) -> str:
  """8-way multiple-choice credit per tool and trojan (chance 0.125)."""
  head = "| tool | " + " | ".join(trojans) + " | mean |\n" + "|---" * (2 + len(trojans)) + "|\n"
  body = "".join(f"| {tool} | " + " | ".join(f"{v:.3g}" for v in s) + f" | {np.mean(s):.3f} |\n"
                 for tool, s in scores.items())
  return head + body + "\nCredit 1 when the true trigger is the option most similar to the " \
      "tool's images, 1/k on a k-way tie; chance 0.125.\n"


def boxplot(path: str | os.PathLike, scores: dict[str, np.ndarray], baseline: str) -> None:
  """One box per method (all trojans' images pooled), ordered by median, the baseline's median
  as a dashed line (the thesis's figure)."""
  plt = figures.pyplot()
  order = sorted(scores, key=lambda m: np.median(scores[m]))
  fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.2))
  ax.boxplot([scores[m] for m in order], orientation="horizontal", showfliers=False)
  ax.set_yticks(range(1, len(order) + 1), order, fontsize=7)
  ax.axvline(np.median(scores[baseline]), ls="--", c="grey", lw=1)
  ax.set_xlabel("Pearson r (map vs trigger mask)")
  ax.set_title("Trojan rediscovery: attribution maps vs trigger masks", fontsize=9)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=110)


def attribution_panel(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray,
                      maps: dict[str, np.ndarray], title: str) -> None:
  """Rows of triggered images: the image, the trigger mask, each method's scaled map."""
  plot_panel(path, np.clip(images, 0, 1), {"trigger mask": masks, **maps}, title)


def synthesis_panel(path: str | os.PathLike, trigger: np.ndarray,
                    images: dict[str, np.ndarray], title: str) -> None:
  """The true trigger, then each tool's images (one row per tool)."""
  plt = figures.pyplot()
  cols = 1 + max(len(v) for v in images.values())
  fig, axes = plt.subplots(len(images), cols, figsize=(1.5 * cols, 1.6 * len(images) + 0.4),
                           squeeze=False)
  for i, (tool, ims) in enumerate(images.items()):
    axes[i, 0].imshow(np.clip(trigger, 0, 1))
    axes[i, 0].set_title("trigger" if i == 0 else "", fontsize=7)
    axes[i, 0].set_ylabel(tool, fontsize=7)
    for j, im in enumerate(ims, start=1):
      axes[i, j].imshow(np.clip(im, 0, 1))
  figures.save_grid(fig, axes, path, title)
