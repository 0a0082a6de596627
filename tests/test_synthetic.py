"""Tests for nemjax.data.synthetic: determinism, table consistency, label/image agreement,
learnability of the scene task, scene_targets and the command line."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemjax.data import loader, synthetic
from nemjax.data.broden import load_probe


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_rows(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
  return synthetic.make_probe_set(tmp_path_factory.mktemp("syn") / "probe", num_images=40, seed=5)


def test_deterministic_bytes(tmp_path: Path):
  a = _files(synthetic.make_probe_set(tmp_path / "a", num_images=10, seed=7))
  b = _files(synthetic.make_probe_set(tmp_path / "b", num_images=10, seed=7))
  c = _files(synthetic.make_probe_set(tmp_path / "c", num_images=10, seed=8))
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  assert sum(1 for name in a if name.endswith(".jpg")) == 10
  jpgs = [k for k in a if k.endswith(".jpg")]
  assert any(k not in c or a[k] != c[k] for k in jpgs)
  assert a["index.csv"] != c["index.csv"] or a["label.csv"] != c["label.csv"]


def test_tables_match_the_label_pngs(probe_dir: Path):
  """category.csv, label.csv and c_*.csv statistics equal those recomputed from the data."""
  probe = load_probe(probe_dir)
  pixels, scalars = loader.load_labels(probe)
  sh, sw = probe.seg_size
  inventory = synthetic.label_inventory(4)
  layer_cat = []
  for i in range(probe.num_images):
    layer_cat.append([c for c, layers in enumerate(probe.category_layers[i]) for _ in layers])
  for c, cat in enumerate(probe.category_names):
    rows = _read_rows(probe_dir / f"c_{cat}.csv")
    members = [lab for lab in inventory if cat in lab.categories]
    assert [int(r["number"]) for r in rows] == [m.number for m in members]
    assert [int(r["code"]) for r in rows] == list(range(1, len(members) + 1))
    for r in rows:
      n = int(r["number"])
      freq, cov = 0, 0.0
      for i in range(probe.num_images):
        if cat in ("scene", "texture"):
          hit = n in probe.category_scalars[i][c]
          cov += float(hit)
        else:
          ks = [k for k, kc in enumerate(layer_cat[i]) if kc == c]
          count = int(sum((pixels[i, k] == n).sum() for k in ks))
          hit = count > 0
          cov += count / (sh * sw)
        freq += hit
      assert int(r["frequency"]) == freq, (cat, n)
      assert float(r["coverage"]) == pytest.approx(cov, abs=2e-6), (cat, n)
  cats = _read_rows(probe_dir / "category.csv")
  assert [r["name"] for r in cats] == list(synthetic.CATEGORIES)
  for r in cats:
    c_rows = _read_rows(probe_dir / f"c_{r['name']}.csv")
    assert int(r["count"]) == len(c_rows)
    assert int(r["frequency"]) == sum(int(x["frequency"]) for x in c_rows)
    assert int(r["first"]) == min(int(x["number"]) for x in c_rows)
    assert int(r["last"]) == max(int(x["number"]) for x in c_rows)
  for r in _read_rows(probe_dir / "label.csv"):
    cats_field = dict(part[:-1].split("(") for part in r["category"].split(";"))
    assert int(r["frequency"]) == sum(int(v) for v in cats_field.values())


def test_label_maps_agree_with_the_image(probe_dir: Path):
  """Pixels labelled with a colour look like it; the object rim is darker than its core."""
  probe = load_probe(probe_dir)
  images = loader.load_images(probe).astype(np.float32)
  pixels, _ = loader.load_labels(probe)
  sh = probe.seg_size[0]
  idx = ((np.arange(sh) + 0.5) * probe.image_size[0] / sh).astype(int)
  small = images[:, idx][:, :, idx]                       # (N, sh, sw, 3) image at label pixels
  color_layer = pixels[:, 0]                              # colour maps come first
  numbers = {lab.name: lab.number for lab in synthetic.label_inventory(4)}
  for name, rgb in synthetic.COLORS:
    sel = color_layer == numbers[name]
    if sel.sum() < 200:
      continue
    mean = small[sel].mean(axis=0)
    dists = {other: np.abs(mean - np.array(o_rgb)).sum() for other, o_rgb in synthetic.COLORS}
    assert min(dists, key=dists.get) == name, (name, mean)
  lum = small.mean(axis=-1)
  rim = (pixels == numbers["rim"]).any(axis=1)
  core = (pixels == numbers["core"]).any(axis=1)
  # Per object colour, rim pixels are darker than core pixels.
  for name, _ in synthetic.COLORS:
    sel = color_layer == numbers[name]
    if (sel & rim).sum() > 100 and (sel & core).sum() > 100:
      assert lum[sel & rim].mean() < 0.9 * lum[sel & core].mean(), name
  # Every part pixel is on a shape object, and every pixel of a shape object has both parts.
  # (Rows without objects have no object/part layers, so the stack is shorter there.)
  c_obj, c_part = probe.category_index("object"), probe.category_index("part")
  for i in range(probe.num_images):
    counts = [len(layers) for layers in probe.category_layers[i]]
    start = np.cumsum([0] + counts)
    obj = pixels[i, start[c_obj]] if counts[c_obj] else np.zeros(probe.seg_size, np.int32)
    shapes = np.isin(obj, [numbers[s] for s in synthetic.SHAPES])
    if not counts[c_part]:
      assert not shapes.any()
      continue
    assert counts[c_part] == 2
    for k in (0, 1):
      np.testing.assert_array_equal(pixels[i, start[c_part] + k] != 0, shapes)


def test_scene_is_learnable_from_pixels(tmp_path: Path):
  """A nearest-centroid classifier on colour histograms beats chance (25 %) by far."""
  root = synthetic.make_probe_set(tmp_path / "p", num_images=160, image_size=64, seg_size=32,
                                  seed=11)
  probe = load_probe(root)
  y = synthetic.scene_targets(probe)
  images = loader.load_images(probe)
  q = (images // 64).astype(np.int64)                      # 4 levels per channel
  codes = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(len(y), -1)
  hist = np.stack([np.bincount(c, minlength=64) for c in codes]).astype(np.float64)
  hist /= hist.sum(1, keepdims=True)
  train, test = np.arange(len(y)) < 100, np.arange(len(y)) >= 100
  centroids = np.stack([hist[train & (y == k)].mean(0) for k in range(4)])
  pred = np.argmin(((hist[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (pred == y[test]).mean() > 0.5


def test_scene_targets_and_classes(probe_dir: Path, tmp_path: Path):
  classes = json.loads((probe_dir / "classes.json").read_text())
  assert classes == {"task": "scene", "classes": ["kitchen", "park", "street", "beach"]}
  probe = load_probe(probe_dir)
  y = synthetic.scene_targets(probe)
  assert y.dtype == np.int32 and y.shape == (40,)
  assert np.bincount(y, minlength=4).tolist() == [10, 10, 10, 10]  # balanced
  c = probe.category_index("scene")
  for i in range(probe.num_images):
    assert probe.label_names[probe.category_scalars[i][c][0]] == classes["classes"][y[i]]
  np.testing.assert_array_equal(
      synthetic.scene_targets(probe, classes=["beach", "street", "park", "kitchen"]), 3 - y)
  with pytest.raises(ValueError, match="not one of the classes"):
    synthetic.scene_targets(probe, classes=["kitchen"])
  with pytest.raises(ValueError, match="not kept"):
    synthetic.scene_targets(load_probe(probe_dir, categories=["color"]))
  # A row without a scene label gets -1.
  copy = tmp_path / "copy"
  synthetic.make_probe_set(copy, num_images=3, seed=5)
  rows = (copy / "index.csv").read_text().splitlines()
  cells = rows[2].split(",")
  cells[10] = ""
  rows[2] = ",".join(cells)
  (copy / "index.csv").write_text("\n".join(rows) + "\n")
  assert synthetic.scene_targets(load_probe(copy))[1] == -1


def test_num_scenes_and_sizes(tmp_path: Path):
  root = synthetic.make_probe_set(tmp_path / "p", num_images=8, num_scenes=8, image_size=96,
                                  seg_size=48, seed=1)
  probe = load_probe(root)
  assert len(json.loads((root / "classes.json").read_text())["classes"]) == 8
  assert probe.image_size == (96, 96) and probe.seg_size == (48, 48)
  assert sorted(set(synthetic.scene_targets(probe).tolist())) == list(range(8))
  with pytest.raises(ValueError, match="num_scenes"):
    synthetic.make_probe_set(tmp_path / "q", num_scenes=9)
  with pytest.raises(ValueError, match="seg_size"):
    synthetic.make_probe_set(tmp_path / "q", image_size=64, seg_size=65)


def test_overwrite(tmp_path: Path):
  root = synthetic.make_probe_set(tmp_path / "p", num_images=4, seed=0)
  (root / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    synthetic.make_probe_set(root, num_images=2, seed=0)
  synthetic.make_probe_set(root, num_images=2, seed=1, overwrite=True)
  assert (root / "keep.txt").read_text() == "mine"             # foreign files are left alone
  assert len(list((root / "images" / "synth").glob("*.jpg"))) == 2  # old images are gone
  assert load_probe(root).num_images == 2


def test_cli(tmp_path: Path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "nemjax.data.synthetic", str(out), "--num-images", "3", "--seed", "2"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "RuntimeWarning" not in proc.stderr
  assert load_probe(out).num_images == 3
  ref = synthetic.make_probe_set(tmp_path / "ref", num_images=3, seed=2)
  assert _files(out) == _files(ref)
  proc = subprocess.run([sys.executable, "-m", "nemjax.data.synthetic", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "not empty" in proc.stderr
