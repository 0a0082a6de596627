"""Tables, CSV and figures of the fine-tuning attacks and the pruning defence."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from nemjax import figures

if TYPE_CHECKING:  # only for annotations
  from nemjax.manipulate.evaluation import Reference

__all__ = ["format_table", "csv_text", "shown_channels", "plot_topk", "plot_featvis",
           "plot_prune_defence"]


_COLUMN_TITLES = {
    "attack": "attack", "layer": "layer", "channels": "channels", "silenced": "silenced",
    "alpha": "α (last)",
    "kendall_tau": "Kendall-τ", "kendall_tau_w": "Kendall-τ-W", "clip_delta": "CLIP-δ*",
    "clip_w": "CLIP-W*", "train_acc_before": "train acc. before (%)",
    "train_acc_after": "train acc. after (%)", "heldout_acc_before": "held-out acc. before (%)",
    "heldout_acc_after": "held-out acc. after (%)", "delta_heldout_acc": "Δ held-out acc.",
    "decoy_share_before": "decoys in top-k before",
    "decoy_share_after": "decoys in top-k after", "ks_before": "KS before",
    "ks_after": "KS after", "balance_before": "top-k balance before",
    "balance_after": "top-k balance after", "ddi_before": "DDI before", "ddi_after": "DDI after",
    "deo_before": "DEO before", "deo_after": "DEO after",
    "featvis_corr": "feat. vis. r (before/after)", "featvis_undefined": "feat. vis. r undefined",
    "method": "method", "rate": "rate", "pruned_fraction": "pruned fraction",
    "train_acc_original": "train acc. original (%)",
    "heldout_acc_original": "held-out acc. original (%)",
    "train_acc_pruned": "train acc. pruned + recovered (%)",
    "heldout_acc_pruned": "held-out acc. pruned + recovered (%)",
    "train_acc_attacked": "train acc. after attack (%)",
    "heldout_acc_attacked": "held-out acc. after attack (%)",
}
# columns where NaN means "no value exists" (not a failed computation)
_UNDEFINED_WHEN_NAN = ("featvis_corr",)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.3f}"
  return str(v)


def format_table(rows: Sequence[dict], *, overlap_k: int = 5) -> str:
  """Markdown table (the papers' Table 1 layout) of :func:`attack_metrics` rows."""
  if not rows:
    return ""
  cols = list(rows[0])
  titles = [_COLUMN_TITLES.get(c, f"top-{overlap_k} overlap" if c.endswith("_overlap") else c)
            for c in cols]
  lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(cols)]
  def cell(r: dict, c: str) -> str:
    v = r[c]
    if c in _UNDEFINED_WHEN_NAN and isinstance(v, float) and math.isnan(v):
      return "undefined"
    return _fmt(v)

  for r in rows:
    lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
  return "\n".join(lines)


def csv_text(rows: Sequence[dict]) -> str:
  """CSV of a list of flat dicts (floats with 6 significant digits)."""
  if not rows:
    return ""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  return buf.getvalue()


# ------------------------------------------------------------------------------------- plot
def shown_channels(attacked: Mapping[str, np.ndarray], max_channels: int
                   ) -> dict[str, list[int]]:
  """Up to ``max_channels`` attacked channels per layer, spread evenly over the attacked ones
  (the channels the figures show)."""
  out = {}
  for name, mask in attacked.items():
    att = np.flatnonzero(mask)
    if att.size:
      pick = att[np.linspace(0, att.size - 1, min(max_channels, att.size)).round().astype(int)]
      out[name] = [int(j) for j in np.unique(pick)]
  return out


def plot_featvis(path: Path, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                 channels: Mapping[str, Sequence[int]], corr: Mapping[str, np.ndarray], *,
                 title: str = "") -> None:
  """PNG: one row per visualised channel, its activation-maximisation image for the original
  model (left) and the fine-tuned one (right), titled with their pixel correlation.

  Args:
    before, after: ``{layer: (n, H, W, 3)}`` images in [0, 1].
    channels: ``{layer: [channel, ...]}`` (n per layer).
    corr: ``{layer: (n,)}`` Pearson correlation of each before/after pair (NaN: undefined, a
      constant image).
  """
  plt = figures.pyplot()
  rows = [(name, i, j) for name, js in channels.items() for i, j in enumerate(js)]
  fig, axes = plt.subplots(len(rows), 2, figsize=(4.2, 2.1 * len(rows) + 0.4), squeeze=False)
  for r, (name, i, j) in enumerate(rows):
    for c, (imgs, side) in enumerate(((before, "original"), (after, "fine-tuned"))):
      ax = axes[r, c]
      ax.imshow(np.clip(imgs[name][i], 0.0, 1.0))
      ax.set_xticks([])
      ax.set_yticks([])
      r_txt = "undefined" if np.isnan(corr[name][i]) else f"{corr[name][i]:.2f}"
      ax.set_title(f"{side}" + (f"  (r = {r_txt})" if c else ""), fontsize=7)
      if c == 0:
        ax.set_ylabel(f"{name}\nch {j}", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=90)


def plot_topk(path: Path, ref: Reference, topk_after: Mapping[str, np.ndarray], *,
              overlap_k: int = 5, max_channels: int = 6,
              class_names: Sequence[str] | None = None, title: str = "") -> None:
  """PNG grid: for up to ``max_channels`` attacked channels per layer, the top-``overlap_k``
  images before (left) and after (right) the attack, captioned with their labels; images in
  both sets are framed green, new ones red."""
  plt = figures.pyplot()

  chosen = [(name, j) for name, js in shown_channels(ref.attacked, max_channels).items()
            for j in js]
  k = overlap_k
  fig, axes = plt.subplots(len(chosen), 2 * k, figsize=(1.35 * 2 * k + 0.6, 1.55 * len(chosen)),
                           squeeze=False)

  def caption(row: int) -> str:
    if row >= ref.num_probe:
      return "decoy"
    y = int(ref.labels[row])
    if y < 0:
      return f"#{row}"
    name = class_names[y] if class_names is not None and y < len(class_names) else str(y)
    return f"{name} #{row}"

  for r, (name, j) in enumerate(chosen):
    before, after_ = ref.topk[name][j, :k], topk_after[name][j, :k]
    for c in range(2 * k):
      ax = axes[r, c]
      row = int(before[c] if c < k else after_[c - k])
      ax.imshow(ref.images[row])
      ax.set_xticks([])
      ax.set_yticks([])
      color = "black"
      if c >= k:
        color = "green" if row in set(before.tolist()) else "red"
        for side in ax.spines.values():
          side.set_edgecolor(color)
          side.set_linewidth(2.5)
      ax.set_title(caption(row), fontsize=6, color=color)
      if c == 0:
        ax.set_ylabel(f"{name}\nch {j}", fontsize=7)
  if chosen:
    axes[0, 0].annotate(f"top-{k} before", (0, 1.35), xycoords="axes fraction", fontsize=9,
                        weight="bold")
    axes[0, k].annotate(f"top-{k} after (green: kept, red: new)", (0, 1.35),
                        xycoords="axes fraction", fontsize=9, weight="bold")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=1 - 0.9 / fig.get_figheight(),
                      wspace=0.08, hspace=0.35)
  figures.save_png(fig, path, dpi=90)


def plot_prune_defence(path: Path, rows: Sequence[dict], *, title: str = "") -> None:
  """Two panels vs pruning rate: held-out accuracy (after pruning, after the attack) and
  CLIP-δ."""
  plt = figures.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  base = next(r for r in rows if r["method"] == "none")
  for method, color in (("l1", "tab:blue"), ("vulnerability", "tab:red")):
    rs = [base] + sorted((r for r in rows if r["method"] == method), key=lambda r: r["rate"])
    x = [r["rate"] for r in rs]
    ax1.plot(x, [r["heldout_acc_pruned"] for r in rs], "o-", color=color,
             label=f"{method}: pruned")
    ax1.plot(x, [r["heldout_acc_attacked"] for r in rs], "s--", color=color,
             label=f"{method}: pruned + attacked")
    ax2.plot(x, [r["clip_delta"] for r in rs], "o-", color=color, label=method)
  ax1.set_xlabel("pruning rate")
  ax1.set_ylabel("held-out accuracy (%)")
  ax1.legend(fontsize=7)
  ax2.set_xlabel("pruning rate")
  ax2.set_ylabel("CLIP-δ* (mean over attacked channels)")
  ax2.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=100)
