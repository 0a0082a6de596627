"""HTML report of one dissected layer: each unit's label, IoU and top-activating probe images
with the unit's thresholded mask overlaid (PNG thumbnails).

The report needs only each unit's top images and their maps (``LayerDissection.top_images``,
kept by ``dissect(..., num_top_images=k)``), not the layer's activations::

  results = dissect(model, probe, ["layer4"], num_top_images=4)
  write_layer_report(out_dir, "layer4", results["layer4"], probe)
"""
from __future__ import annotations

import collections
import concurrent.futures
import html
import re
from pathlib import Path

import numpy as np
from PIL import Image

from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.files import atomic_write_text
from nemjax.dissect.topimages import TopImagesState, top_images_from_acts
from nemjax.dissect.upsample import resize_bilinear_pillow

_UNIT_PNG = re.compile(r"^unit\d+\.png$")
_UPSAMPLE_UNITS = 64  # units upsampled per call (one compiled shape per layer)


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


def _render(probe: ProbeSet, rows: np.ndarray, maps: np.ndarray, threshold: float, thumb: int,
            path: Path) -> None:
  """Worker job: decodes the rows' images, draws the strip, writes the PNG."""
  images = loader.load_images(probe, rows, num_workers=0)
  unit_strip(images, maps, threshold, thumb).save(path)


def _upsampled_chunks(tops: TopImagesState, units: np.ndarray, top: int,
                      seg_size: tuple[int, int]):
  """Yields ``(unit, maps (top, sh, sw) float32)`` in ``units`` order, upsampling
  ``_UPSAMPLE_UNITS`` units per call (the last call padded to the same shape)."""
  for s in range(0, len(units), _UPSAMPLE_UNITS):
    chunk = units[s:s + _UPSAMPLE_UNITS]
    maps = np.zeros((_UPSAMPLE_UNITS, top) + tops.maps.shape[2:], np.float32)
    maps[:len(chunk)] = tops.maps[chunk, :top]
    up = np.asarray(resize_bilinear_pillow(maps, seg_size))
    for j, unit in enumerate(chunk):
      yield int(unit), up[j]


def write_layer_report(
    out_dir: Path,
    layer: str,
    result,
    probe: ProbeSet,
    *,
    acts: np.ndarray | None = None,
    top: int | None = None,
    thumb: int = 96,
    max_units: int | None = None,
    num_workers: int = 2,
) -> Path:
  """Writes ``<out_dir>/<layer>_report.html`` and one PNG strip per unit in
  ``<out_dir>/<layer>_report/`` (PNGs of a previous report that are not rewritten are removed).

  Args:
    result: a ``LayerDissection``; its ``top_images`` (from ``dissect(...,
      num_top_images=k)``) give each unit's images.
    probe: the probe set it was dissected on (the images are decoded from it).
    acts: optional (N, h, w, U) activations, used instead of ``result.top_images``.
    top: images per unit (default: all kept in ``result.top_images``, or 4 with ``acts``).
    thumb: thumbnail size in pixels.
    max_units: only the this many best units (by IoU).
    num_workers: threads decoding images and writing PNGs (one pool for the whole report).

  Returns:
    The path of the HTML file.
  """
  if acts is not None:
    tops = top_images_from_acts(acts, 4 if top is None else top)
  elif result.top_images is not None:
    tops = result.top_images
  else:
    raise ValueError(f"report of {layer}: the result holds no top images; dissect with "
                     "num_top_images > 0 or pass acts")
  if tops.row.shape[0] != result.num_units:
    raise ValueError(f"report of {layer}: top images are for {tops.row.shape[0]} units, the "
                     f"result has {result.num_units}")
  kept = tops.row.shape[1]
  top = kept if top is None else int(top)
  if not 1 <= top <= kept:
    raise ValueError(f"report of {layer}: top must lie in [1, {kept}], got {top}")
  out_dir = Path(out_dir)
  img_dir = out_dir / f"{layer}_report"
  img_dir.mkdir(parents=True, exist_ok=True)
  order = np.argsort(-result.score, kind="stable")
  if max_units is not None:
    order = order[:max_units]
  names = {int(u): f"unit{int(u) + 1:04d}.png" for u in order}
  for old in img_dir.iterdir():  # stale strips of an earlier report
    if _UNIT_PNG.match(old.name) and old.name not in names.values():
      old.unlink()
  rows = []
  pending: collections.deque = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers),
                                             thread_name_prefix="nemjax-report") as pool:
    for unit, maps in _upsampled_chunks(tops, order, top, probe.seg_size):
      have = tops.row[unit, :top] >= 0  # fewer probe images than `top`
      pending.append(pool.submit(_render, probe, tops.row[unit, :top][have], maps[have],
                                 float(result.thresholds[unit]), thumb, img_dir / names[unit]))
      while len(pending) > 4 * max(1, num_workers):  # bounded memory
        pending.popleft().result()
      cat = probe.category_names[result.best_category[unit]]
      label = probe.label_names[result.best_label[unit]]
      rows.append(
          f"<tr><td>{unit + 1}</td><td>{html.escape(str(label))}</td><td>{html.escape(cat)}</td>"
          f"<td>{result.score[unit]:.4f}</td><td><img src='{img_dir.name}/{names[unit]}'></td></tr>")
    while pending:
      pending.popleft().result()
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
