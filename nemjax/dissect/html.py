"""HTML report of dissected layers: each unit's label, category, IoU, threshold and its
top-activating probe images with the unit's thresholded mask overlaid (JPEG thumbnails), and an
``index.html`` with every layer's units in one sortable table.

The report needs only each unit's top images and their maps (``LayerDissection.top_images``,
kept by ``dissect(..., num_top_images=k)``), not the layer's activations::

  results = dissect(model, probe, ["layer4"], num_top_images=4)
  write_layer_report(out_dir, "layer4", results["layer4"], probe)
  write_index(out_dir, results, probe)

Speed: every probe image shown is decoded once and shrunk to the thumbnail size once, however
many units show it; masks are thresholded and overlaid for 64 units at a time with NumPy at the
thumbnail resolution; strips are JPEG-encoded (about 25x faster than PNG) on a thread pool.
"""
from __future__ import annotations

import collections
import concurrent.futures
import html
import io
import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.files import atomic_write_bytes, atomic_write_text, remove_stale_temps
from nemjax.dissect.topimages import TopImagesState, top_images_from_acts
from nemjax.dissect.upsample import resize_bilinear_pillow

__all__ = ["unit_strips", "write_layer_report", "write_index"]

_UNIT_IMAGE = re.compile(r"^unit\d+\.(png|jpg)$")
_UNITS_PER_CHUNK = 64  # units upsampled and overlaid per call (one compiled shape per layer)
_DECODE_CHUNK = 256  # probe images decoded at a time before shrinking to thumbnails
_GAP = 2  # white pixels between thumbnails
_DARKEN = 0.3  # brightness kept outside the unit's mask
_JPEG_QUALITY = 90


def _thumbnails(probe: ProbeSet, rows: np.ndarray, thumb: int, num_workers: int) -> np.ndarray:
  """uint8 (len(rows), thumb, thumb, 3): each row's image decoded once, bilinear-shrunk."""
  out = np.zeros((len(rows), thumb, thumb, 3), np.uint8)
  for s in range(0, len(rows), _DECODE_CHUNK):
    images = loader.load_images(probe, rows[s:s + _DECODE_CHUNK], num_workers=num_workers)
    for j, img in enumerate(images):
      out[s + j] = np.asarray(Image.fromarray(img).resize((thumb, thumb), Image.BILINEAR))
  return out


def unit_strips(thumbs: np.ndarray, maps: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Side-by-side thumbnails with each unit's mask shown (outside darkened).

  Args:
    thumbs: uint8 (n, k, t, t, 3) the units' top images at thumbnail size.
    maps: float32 (n, k, sh, sw) the units' upsampled activation maps on those images.
    thresholds: (n,) the units' thresholds; the mask is ``map > threshold`` (as the tally's).

  Returns:
    uint8 (n, t, k·t + (k − 1)·gap, 3): the mask is read at each thumbnail pixel's nearest
    label-map pixel.
  """
  n, k, t = thumbs.shape[:3]
  sh, sw = maps.shape[-2:]
  yi = np.minimum(((np.arange(t) + 0.5) * sh / t).astype(np.int64), sh - 1)
  xi = np.minimum(((np.arange(t) + 0.5) * sw / t).astype(np.int64), sw - 1)
  mask = maps[:, :, yi][:, :, :, xi] > np.asarray(thresholds, np.float64)[:, None, None, None]
  shown = np.where(mask[..., None], thumbs, (thumbs * _DARKEN).astype(np.uint8))
  strips = np.full((n, t, k * t + (k - 1) * _GAP, 3), 255, np.uint8)
  for j in range(k):
    strips[:, :, j * (t + _GAP):j * (t + _GAP) + t] = shown[:, j]
  return strips


def _encode_jpeg(strip: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(strip).save(buf, format="JPEG", quality=_JPEG_QUALITY)
  return buf.getvalue()


def _unit_name(unit: int) -> str:
  return f"unit{unit + 1:04d}.jpg"


def _unit_records(layer: str, result, probe: ProbeSet, max_units: int | None) -> list[dict]:
  """The layer's units by descending IoU (the ``max_units`` best): what a report shows of each
  (``unit`` 1-based, as in tally.csv)."""
  order = np.argsort(-result.score, kind="stable")
  if max_units is not None:
    order = order[:max_units]
  return [{"layer": layer, "unit": int(u) + 1,
           "label": str(probe.label_names[result.best_label[u]]),
           "category": probe.category_names[result.best_category[u]],
           "iou": float(result.score[u]), "threshold": float(result.thresholds[u])}
          for u in order]


_STYLE = ("<style>body{font-family:sans-serif}td,th{padding:4px;vertical-align:middle;"
          "text-align:left}tr:nth-child(even){background:#f3f3f3}th{cursor:pointer;"
          "background:#ddd}</style>")

# Click a header to sort by that column (numbers numerically); click again to reverse.
_SORT_JS = """<script>
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.order !== 'asc';
    th.dataset.order = asc ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].innerText, y = b.cells[col].innerText;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""


def _page(title: str, intro: str, header: list[str], rows: list[str]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  return ("<!doctype html><html><head><meta charset='utf-8'>"
          f"<title>{html.escape(title)}</title>{_STYLE}</head><body>"
          f"<h1>{html.escape(title)}</h1><p>{intro}</p>"
          f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>\n"
          + "\n".join(rows) + f"\n</tbody></table>{_SORT_JS}</body></html>\n")


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
  """Writes ``<out_dir>/<layer>_report.html`` and one JPEG strip per unit in
  ``<out_dir>/<layer>_report/`` (strips of a previous report that are not rewritten are removed).

  Args:
    result: a ``LayerDissection``; its ``top_images`` (from ``dissect(...,
      num_top_images=k)``) give each unit's images.
    probe: the probe set it was dissected on (the images are decoded from it).
    acts: optional (N, h, w, U) activations, used instead of ``result.top_images``.
    top: images per unit (default: all kept in ``result.top_images``, or 4 with ``acts``).
    thumb: thumbnail size in pixels.
    max_units: only the this many best units (by IoU).
    num_workers: threads decoding images and encoding strips.

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
  records = _unit_records(layer, result, probe, max_units)
  order = np.array([r["unit"] - 1 for r in records], np.int64)
  names = {_unit_name(int(u)) for u in order}
  for old in img_dir.iterdir():  # stale strips of an earlier report
    if _UNIT_IMAGE.match(old.name) and old.name not in names:
      old.unlink()
  remove_stale_temps(img_dir)  # temp files of a killed report
  _write_strips(tops, order, top, thumb, result.thresholds, probe, img_dir, num_workers)
  intro = (f"{result.num_units} units; sorted by IoU (click a column header to sort). Images: "
           f"top-{top} by per-image max activation; outside the unit's mask (upsampled "
           "activation &gt; threshold) is darkened.")
  page = _page(f"nemjax dissection: layer {layer}", intro,
               ["unit", "label", "category", "IoU", "threshold", "top images"],
               [f"<tr id='unit{r['unit']}'><td>{r['unit']}</td><td>{html.escape(r['label'])}</td>"
                f"<td>{html.escape(r['category'])}</td><td>{r['iou']:.4f}</td>"
                f"<td>{r['threshold']:.6g}</td><td><img src='{img_dir.name}/"
                f"{_unit_name(r['unit'] - 1)}' loading='lazy'></td></tr>" for r in records])
  path = out_dir / f"{layer}_report.html"
  atomic_write_text(path, page)
  return path


def _write_strips(tops: TopImagesState, order: np.ndarray, top: int, thumb: int,
                  thresholds: np.ndarray, probe: ProbeSet, img_dir: Path,
                  num_workers: int) -> None:
  """Decodes the shown images once, then overlays and encodes ``_UNITS_PER_CHUNK`` units at a
  time (JPEG encoding on a thread pool, a bounded number of strips in flight)."""
  rows = tops.row[order, :top]
  shown = np.unique(rows[rows >= 0])
  thumbs = _thumbnails(probe, shown, thumb, num_workers)
  where = np.searchsorted(shown, np.maximum(rows, 0))  # (units, top) index into thumbs
  blank = rows < 0  # fewer probe images than `top`: a white tile
  pending: collections.deque = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers),
                                             thread_name_prefix="nemjax-report") as pool:
    for s in range(0, len(order), _UNITS_PER_CHUNK):
      chunk = order[s:s + _UNITS_PER_CHUNK]
      maps = np.zeros((_UNITS_PER_CHUNK, top) + tops.maps.shape[2:], np.float32)
      maps[:len(chunk)] = tops.maps[chunk, :top]
      up = np.asarray(resize_bilinear_pillow(maps, probe.seg_size))[:len(chunk)]
      tiles = thumbs[where[s:s + len(chunk)]] if len(shown) else np.zeros(
          (len(chunk), top, thumb, thumb, 3), np.uint8)
      tiles[blank[s:s + len(chunk)]] = 255
      strips = unit_strips(tiles, up, np.asarray(thresholds)[chunk])
      for unit, strip in zip(chunk, strips):
        path = img_dir / _unit_name(int(unit))
        pending.append(pool.submit(lambda p, a: atomic_write_bytes(p, _encode_jpeg(a), fsync=False),
                                   path, strip))
      while len(pending) > 4 * _UNITS_PER_CHUNK:  # bounded memory
        pending.popleft().result()
    while pending:
      pending.popleft().result()


def write_index(out_dir: Path, results: Mapping[str, object], probe: ProbeSet,
                max_units: int | None = None) -> Path:
  """Writes ``<out_dir>/index.html``: every layer's units in one sortable table (layer, unit,
  label, category, IoU, threshold), each linking to its row and top images in the layer's
  report page, and ``<out_dir>/units.json`` with the same rows for scripts.

  Args:
    results: ``{layer: LayerDissection}`` as returned by ``dissect``.
    max_units: per layer, only this many best units (as ``write_layer_report``'s).
  """
  out_dir = Path(out_dir)
  records = [r for layer, result in results.items()
             for r in _unit_records(layer, result, probe, max_units)]
  rows = [f"<tr><td>{html.escape(r['layer'])}</td><td><a href='{r['layer']}_report.html"
          f"#unit{r['unit']}'>{r['unit']}</a></td><td>{html.escape(r['label'])}</td>"
          f"<td>{html.escape(r['category'])}</td><td>{r['iou']:.4f}</td>"
          f"<td>{r['threshold']:.6g}</td><td><a href='{r['layer']}_report/"
          f"{_unit_name(r['unit'] - 1)}'>images</a></td></tr>" for r in records]
  intro = (f"{len(records)} units of {len(results)} layer(s), probe set {html.escape(probe.root)} "
           f"({probe.num_images} images). Click a column header to sort.")
  atomic_write_text(out_dir / "units.json", json.dumps(records, indent=1) + "\n")
  path = out_dir / "index.html"
  atomic_write_text(path, _page("nemjax dissection", intro,
                                ["layer", "unit", "label", "category", "IoU", "threshold",
                                 "top images"], rows))
  return path
