"""The fooling run's outputs: the Table-1-style transfer table and the heatmap panel."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from nemjax import figures

__all__ = ["format_table", "plot_panel", "grid_png"]


def _f(v: float, fmt: str = ".3f") -> str:
  return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows: Sequence[dict], accuracy: dict, *, fooled: str, kind: str,
                 threshold: float) -> str:
  """Markdown: accuracy before/after, then one row per measured method (the transfer
  matrix's row of the fooled method)."""
  acc = ("| accuracy (%) | before | after |\n|---|---|---|\n" + "".join(
      f"| {name} | {_f(v[0], '.2f')} | {_f(v[1], '.2f')} |\n" for name, v in accuracy.items()))
  if kind == "active":
    head = ("| measured method | FSR before (%) | FSR after (%) | bi-target r before | "
            "bi-target r after |\n|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['method']}{' (fooled)' if r['method'] == fooled else ''} | "
        f"{_f(r['fsr_before'], '.1f')} | {_f(r['fsr_after'], '.1f')} | "
        f"{_f(r['bitarget_before'])} | {_f(r['bitarget_after'])} |\n" for r in rows)
  else:
    head = ("| measured method | FSR before (%) | FSR after (%) | r(original, fooled) | "
            "sign corr. | location r before | location r after | entropy before | "
            "entropy after |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['method']}{' (fooled)' if r['method'] == fooled else ''} | "
        f"{_f(r['fsr_before'], '.1f')} | {_f(r['fsr_after'], '.1f')} | "
        f"{_f(r['correlation'])} | {_f(r['sign_correlation'])} | "
        f"{_f(r['location_before'])} | {_f(r['location_after'])} | "
        f"{_f(r['entropy_before'])} | {_f(r['entropy_after'])} |\n" for r in rows)
  return (acc + f"\n{kind} fooling of {fooled}; FSR threshold {threshold:g} "
          f"({'score >=' if kind == 'centre-mass' else 'score <='} threshold)\n\n" + head + body)


def plot_panel(path: str | os.PathLike, images: np.ndarray, columns: dict[str, np.ndarray],
               title: str) -> None:
  """A PNG grid: one row per image (uint8 (n, H, W, 3)), the image then one column per
  ``columns`` entry (name -> maps (n, h, w), each scaled to the 99.5th percentile of its |m|
  (values beyond saturate: input-level LRP's few huge pixels would hide the rest), signed maps
  with a diverging colour map)."""
  plt = figures.pyplot()
  n, ncol = len(images), 1 + len(columns)
  fig, axes = plt.subplots(n, ncol, figsize=(1.6 * ncol, 1.6 * n + 0.5), squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(images[i])
    for j, (name, maps) in enumerate(columns.items(), start=1):
      m = np.asarray(maps[i], np.float64)
      signed = m.min() < 0
      lim = max(float(np.percentile(np.abs(m), 99.5)), 1e-12)
      axes[i, j].imshow(m, cmap="bwr" if signed else "jet", vmin=-lim if signed else 0,
                        vmax=lim, interpolation="nearest")
      if i == 0:
        axes[i, j].set_title(name, fontsize=6)
  figures.save_grid(fig, axes, path, title)


def grid_png(path: str | os.PathLike, images: np.ndarray, maps: np.ndarray,
             captions: Sequence[str], title: str) -> None:
  """A PNG of image / map pairs, ``cols`` pairs per row (attribution maps of one method)."""
  n = len(images)
  cols = min(4, n)
  rows = (n + cols - 1) // cols
  plt = figures.pyplot()
  fig, axes = plt.subplots(rows, 2 * cols, figsize=(3.2 * cols, 1.7 * rows + 0.4), squeeze=False)
  for k in range(rows * cols):
    a, b = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
    for ax in (a, b):
      ax.set_xticks([])
      ax.set_yticks([])
    if k >= n:
      a.axis("off")
      b.axis("off")
      continue
    a.imshow(images[k])
    a.set_title(captions[k], fontsize=6)
    m = np.asarray(maps[k], np.float64)
    lim = max(np.abs(m).max(), 1e-12)
    signed = m.min() < 0
    b.imshow(m, cmap="bwr" if signed else "jet", vmin=-lim if signed else 0, vmax=lim)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  figures.save_png(fig, path, dpi=90)
