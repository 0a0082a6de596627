"""Export a corrupted probe set as a complete Broden-format directory.

Every file of the original is hard-linked (or copied), except ``index.csv``, which is rewritten
so that the poisoned rows point at the poisoned images stored under
``images/nemjax_poisoned/`` — lossless PNG for uint8 delivery, the exact JPEG bytes for JPEG
delivery. Any Network Dissection implementation can then re-measure the attack independently.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from nemjax.data.broden import ProbeSet
from nemjax.sweep.delivery import jpeg_bytes, to_uint8

POISON_DIR = "nemjax_poisoned"


def _link_tree(src: Path, dst: Path) -> None:
  for root, _, files in os.walk(src):
    rel = Path(root).relative_to(src)
    (dst / rel).mkdir(parents=True, exist_ok=True)
    for f in files:
      if rel == Path(".") and f == "index.csv":
        continue
      try:
        os.link(Path(root) / f, dst / rel / f)
      except OSError:
        shutil.copy2(Path(root) / f, dst / rel / f)


def export_corrupted_probe(
    probe: ProbeSet,
    out_dir: Path,
    images: Mapping[int, np.ndarray],
    *,
    delivery: str = "uint8",
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> Path:
  """Writes the probe set with ``images`` ({row: (H,W,3) float in [0, 1]}, the attack's
  output before delivery) replacing those rows.

  Args:
    delivery: 'uint8' writes PNGs; 'jpeg' writes JPEGs encoded at ``jpeg_quality`` (the same
      encoder settings as :func:`nemjax.sweep.delivery.deliver`, so decoding gives the pixels
      the sweep measured).
  Returns:
    ``out_dir``; written atomically (a temp dir renamed at the end).
  """
  if delivery not in ("uint8", "jpeg"):
    raise ValueError(f"export needs delivery 'uint8' or 'jpeg' (files hold 8-bit pixels), got {delivery!r}")
  out_dir = Path(out_dir)
  if out_dir.exists():
    if not overwrite:
      raise FileExistsError(f"export directory {out_dir} exists; pass overwrite=True / --overwrite")
    shutil.rmtree(out_dir)
  src = Path(probe.root)
  images_root = src / "images"
  replaced = {}
  for row, img in images.items():
    rel = Path(probe.image_paths[row]).relative_to(images_root)
    ext = ".png" if delivery == "uint8" else ".jpg"
    replaced[str(rel)] = (Path(POISON_DIR) / (str(rel).replace(os.sep, "__") + ext), img)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    _link_tree(src, tmp)
    (tmp / "images" / POISON_DIR).mkdir(parents=True, exist_ok=True)
    for new_rel, img in replaced.values():
      img = to_uint8(img)
      path = tmp / "images" / new_rel
      if delivery == "uint8":
        Image.fromarray(img).save(path, format="PNG")
      else:
        path.write_bytes(jpeg_bytes(img, jpeg_quality))
    with open(src / "index.csv", newline="") as f:
      rows = list(csv.reader(f))
    header = rows[0]
    col = header.index("image")
    hits = 0
    for r in rows[1:]:
      if r and r[col] in replaced:
        r[col] = str(replaced[r[col]][0]).replace(os.sep, "/")
        hits += 1
    if hits != len(replaced):
      raise ValueError(f"export: {len(replaced) - hits} poisoned images were not found in index.csv")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (tmp / "index.csv").write_text(buf.getvalue())
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
