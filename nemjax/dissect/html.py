"""HTML report of one dissected layer: each unit's label, IoU and top-activating probe images
with the unit's thresholded mask overlaid (PNG thumbnails)."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image

from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect.report import atomic_write_text
from nemjax.dissect.upsample import upsample_bilinear_pillow


def unit_strip(images: np.ndarray, maps: np.ndarray, threshold: float, thumb: int) -> Image.Image:
  """Side-by-side thumbnails of ``images`` (k,H,W,3) uint8 with ``maps`` (k,sh,sw) > threshold
  highlighted (outside the mask darkened)."""
  tiles = []
  for img, m in zip(images, maps):
    mask = Image.fromarray(((m > threshold) * 255).astype(np.uint8)).resize(
        (img.shape[1], img.shape[0]), Image.NEAREST)
    mask = np.asarray(mask)[..., None] > 0
    shown = np.where(mask, img, (img * 0.3).astype(np.uint8))
    tiles.append(Image.fromarray(shown).resize((thumb, thumb), Image.BILINEAR))
  strip = Image.new("RGB", (thumb * len(tiles) + 2 * (len(tiles) - 1), thumb), "white")
  for i, t in enumerate(tiles):
    strip.paste(t, (i * (thumb + 2), 0))
  return strip


def write_layer_report(
    out_dir: Path,
    layer: str,
    result,
    acts: np.ndarray,
    probe: ProbeSet,
    *,
    top: int = 4,
    thumb: int = 96,
    max_units: int | None = None,
) -> Path:
  """Writes ``<out_dir>/<layer>_report/index.html`` and one PNG strip per unit.

  Args:
    result: a ``LayerDissection``.
    acts: (N, h, w, U) activations the dissection used.
  Returns:
    The path of the HTML file.
  """
  out_dir = Path(out_dir)
  img_dir = out_dir / f"{layer}_report"
  img_dir.mkdir(parents=True, exist_ok=True)
  per_image_max = acts.reshape(acts.shape[0], -1, acts.shape[-1]).max(axis=1)  # (N, U)
  order = np.argsort(-result.score, kind="stable")
  if max_units is not None:
    order = order[:max_units]
  rows = []
  for unit in order:
    top_idx = np.argsort(-per_image_max[:, unit], kind="stable")[:top]
    images = loader.load_images(probe, top_idx)
    maps = np.asarray(upsample_bilinear_pillow(
        np.ascontiguousarray(np.moveaxis(acts[top_idx][..., unit], 0, 0)), probe.seg_size))
    strip = unit_strip(images, maps, float(result.thresholds[unit]), thumb)
    name = f"unit{unit + 1:04d}.png"
    strip.save(img_dir / name)
    cat = probe.category_names[result.best_category[unit]]
    label = probe.label_names[result.best_label[unit]]
    rows.append(
        f"<tr><td>{unit + 1}</td><td>{html.escape(str(label))}</td><td>{html.escape(cat)}</td>"
        f"<td>{result.score[unit]:.4f}</td><td><img src='{img_dir.name}/{name}'></td></tr>")
  page = (
      "<!doctype html><html><head><meta charset='utf-8'>"
      f"<title>nemjax dissection: {html.escape(layer)}</title>"
      "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:middle}"
      "tr:nth-child(even){background:#f3f3f3}</style></head><body>"
      f"<h1>Layer {html.escape(layer)}</h1><p>{result.num_units} units; sorted by IoU. "
      f"Images: top-{top} by per-image max activation; outside the unit's mask is darkened.</p>"
      "<table><tr><th>unit</th><th>label</th><th>category</th><th>IoU</th><th>top images</th></tr>"
      + "\n".join(rows) + "</table></body></html>\n")
  path = out_dir / f"{layer}_report.html"
  atomic_write_text(path, page)
  return path
