"""Tests for nemjax.data.broden and nemjax.data.loader.

A hand-written mini Broden directory (16x16 images, 8x8 label maps) exercises the format rules
and every error; a small synthetic set (nemjax.data.synthetic) exercises the round trip.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nemjax.data import broden, loader, synthetic
from nemjax.data.broden import BrodenFormatError, BrodenMissingFileError, load_probe

# ----------------------------------------------------------------------------------------------
# A hand-written mini probe set.
#
# Categories (category.csv order): color, object, scene. Labels: 1 red, 2 blue (color),
# 3 grass (color and object, equal coverage -> the later category, object, wins),
# 4 tree (object), 5 beach (scene), 300 bigthing (object; R=44, G=1). Numbers 6..299 are gaps.
# index.csv lines: 2 a (all), 3 b (color only), 4 c (nothing: always dropped; its files do not
# exist), 5 d (object with two layers + scene), 6 e (scene only).

MINI_FILES = {
    "category.csv": (
        "name,first,last,count,frequency\n"
        "color,1,3,3,4\n"
        "object,3,300,3,3\n"
        "scene,5,5,1,2\n"),
    "label.csv": (
        "number,name,category,frequency,coverage,syns\n"
        "1,red,color(2),2,1.0,\n"
        "2,blue,color(1),1,0.5,\n"
        "3,grass,color(1);object(2),3,1.0,lawn;turf\n"
        "4,tree,object(1),1,0.25,\n"
        "5,beach,scene(2),2,2.0,\n"
        "300,bigthing,object(1),1,0.25,\n"),
    "c_color.csv": (
        "code,number,name,frequency,coverage\n"
        "1,1,red,2,1.0\n"
        "2,2,blue,1,0.5\n"
        "3,3,grass,1,0.5\n"),
    "c_object.csv": (
        "code,number,name,frequency,coverage\n"
        "1,3,grass,2,0.5\n"
        "2,4,tree,1,0.25\n"
        "3,300,bigthing,1,0.25\n"),
    "c_scene.csv": (
        "code,number,name,frequency,coverage\n"
        "1,5,beach,2,2.0\n"),
    "index.csv": (
        "image,split,ih,iw,sh,sw,color,object,scene\n"
        "a.jpg,train,16,16,8,8,a_color.png,a_object.png,5\n"
        "b.jpg,val,16,16,8,8,b_color.png,,\n"
        "c.jpg,train,16,16,8,8,,,\n"
        "d.jpg,train,16,16,8,8,,d_obj1.png;d_obj2.png,5\n"
        "e.jpg,train,16,16,8,8,,,5\n"),
}
IMAGE_SIZE, SEG = 16, 8


def _label_map(seed: int, values: list[int]) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.asarray(values)[rng.integers(len(values), size=(SEG, SEG))].astype(np.int32)


MINI_PNGS = {
    "a_color.png": _label_map(1, [0, 1, 2, 3]),
    "a_object.png": _label_map(2, [0, 3, 300]),
    "b_color.png": _label_map(3, [1, 2]),
    "d_obj1.png": _label_map(4, [0, 4]),
    "d_obj2.png": _label_map(5, [0, 300, 3]),
}


def _write_png(path: Path, labels: np.ndarray) -> None:
  rgb = np.zeros(labels.shape + (3,), np.uint8)
  rgb[..., 0] = labels % 256
  rgb[..., 1] = labels // 256
  rgb[..., 2] = 77  # B is unused
  Image.fromarray(rgb, "RGB").save(path)


def _write_jpg(path: Path, size: int = IMAGE_SIZE, seed: int = 0) -> None:
  rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  Image.fromarray(rgb, "RGB").save(path, quality=95)


def make_mini(root: Path, **replace: str) -> Path:
  """Writes the mini set; `replace` maps a file name (dots as '_') to new text."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "images").mkdir(exist_ok=True)
  for name, text in MINI_FILES.items():
    (root / name).write_text(replace.get(name.replace(".", "_"), text))
  for k, stem in enumerate("abde"):
    _write_jpg(root / "images" / f"{stem}.jpg", seed=k)
  for name, labels in MINI_PNGS.items():
    _write_png(root / "images" / name, labels)
  return root


def _edit(name: str, old: str, new: str) -> dict[str, str]:
  text = MINI_FILES[name]
  assert old in text, (name, old)
  return {name.replace(".", "_"): text.replace(old, new, 1)}


def _raises(fn, file: str, line: int | None, reason: str, cls=BrodenFormatError):
  """Calls fn, checks the error names `file` (suffix), `line` and matches `reason` (regex)."""
  with pytest.raises(cls) as info:
    fn()
  e = info.value
  msg = str(e)
  assert Path(e.path).name == file or e.path.endswith(file), msg
  assert e.line == line, msg
  where = f"{file}:{line}:" if line is not None else f"{file}:"
  assert where in msg, msg
  assert re.search(reason, msg), msg
  return e


@pytest.fixture
def mini(tmp_path: Path) -> Path:
  return make_mini(tmp_path / "mini")


# ----------------------------------------------------------------------------------------------
# Format rules on the mini set


def test_mini_tables(mini: Path):
  probe = load_probe(mini)
  assert probe.category_names == ("color", "object", "scene")
  assert probe.num_images == 4  # c (line 4) dropped
  np.testing.assert_array_equal(probe.row_numbers, [2, 3, 5, 6])
  assert probe.image_paths == tuple(str(mini / "images" / f"{s}.jpg") for s in "abde")
  assert probe.splits == ("train", "val", "train", "train")
  assert probe.seg_size == (8, 8) and probe.image_size == (16, 16)
  # Dense label table: 0..300 with '' at 0 and in the gaps.
  assert probe.num_labels == 301
  assert probe.label_names[0] == "" and probe.label_names[3] == "grass"
  assert probe.label_names[300] == "bigthing" and probe.label_names[150] == ""
  assert probe.label_defined.sum() == 6 and not probe.label_defined[0]
  assert probe.label_categories[3] == {"color": 1, "object": 2}
  assert probe.label_syns[3] == ("lawn", "turf")
  assert probe.label_frequency[3] == 3 and probe.label_coverage[5] == 2.0
  assert probe.category_codes[1, 300] == 3 and probe.category_coverage[0, 3] == 0.5
  # Primary categories: grass ties 0.5/0.5 -> the later one (object); label 0, the gaps -> last.
  expected = np.full(301, 2)
  expected[[1, 2]] = 0
  expected[[3, 4, 300]] = 1
  np.testing.assert_array_equal(probe.primary_category, expected)
  np.testing.assert_array_equal(probe.labelcat, np.eye(3)[expected])
  assert probe.labelcat.dtype == np.float64
  np.testing.assert_array_equal(probe.labels_of_category("object"), [3, 4, 300])
  # Per-row values.
  assert probe.pixel_layers[0] == (str(mini / "images/a_color.png"), str(mini / "images/a_object.png"))
  assert probe.pixel_layers[2] == (str(mini / "images/d_obj1.png"), str(mini / "images/d_obj2.png"))
  assert probe.pixel_layers[3] == ()
  assert probe.scalars == ((5,), (), (5,), (5,))
  assert probe.category_layers[2] == ((), probe.pixel_layers[2], ())
  assert probe.category_scalars[0] == ((), (), (5,))
  assert probe.max_layers == 2 and probe.max_scalars == 1
  with pytest.raises(ValueError):
    probe.row_numbers[0] = 7  # read-only


def test_primary_category_earlier_wins_when_larger(tmp_path: Path):
  root = make_mini(tmp_path / "m", **_edit("c_color.csv", "3,3,grass,1,0.5", "3,3,grass,1,0.75"))
  assert load_probe(root).primary_category[3] == 0


def test_category_subset_and_dropped_rows(mini: Path):
  probe = load_probe(mini, categories=["object", "color"])  # kept in category.csv order
  assert probe.category_names == ("color", "object")
  np.testing.assert_array_equal(probe.row_numbers, [2, 3, 5])  # e (scene only) dropped too
  assert probe.max_scalars == 0 and probe.max_layers == 2
  # Primary among the kept categories: grass ties -> object; scene labels and 0 -> last kept.
  assert probe.primary_category[3] == 1 and probe.primary_category[5] == 1
  assert probe.primary_category[0] == 1 and probe.primary_category[1] == 0
  only_scene = load_probe(mini, categories="scene")
  np.testing.assert_array_equal(only_scene.row_numbers, [2, 5, 6])
  assert only_scene.max_layers == 0 and only_scene.scalars == ((5,), (5,), (5,))
  assert np.all(only_scene.primary_category == 0)


def test_decode_label_png_r_plus_256_g(mini: Path):
  probe = load_probe(mini)
  got = broden.decode_label_png(mini / "images/a_object.png", (8, 8), probe.label_defined)
  assert got.dtype == np.int32 and got.shape == (8, 8)
  np.testing.assert_array_equal(got, MINI_PNGS["a_object.png"])
  assert 300 in got  # G channel = 1
  rgb = np.asarray(Image.open(mini / "images/a_object.png"))
  assert rgb[..., 1].max() == 1


def test_decode_image_is_rgb_and_unresized(mini: Path, tmp_path: Path):
  img = broden.decode_image(mini / "images/a.jpg", 16)
  assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
  np.testing.assert_array_equal(img, np.asarray(Image.open(mini / "images/a.jpg")))
  grey = tmp_path / "grey.png"
  Image.fromarray(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16), "L").save(grey)
  g = broden.decode_image(grey, (16, 16))
  assert g.shape == (16, 16, 3) and np.all(g[..., 0] == g[..., 2])


# ----------------------------------------------------------------------------------------------
# Loader


def test_loader_batches_order_padding(mini: Path):
  probe = load_probe(mini)
  batches = list(loader.iterate_batches(probe, 3, progress=False))
  assert [b.images.shape[0] for b in batches] == [3, 1]
  b0 = batches[0]
  assert b0.images.shape == (3, 16, 16, 3) and b0.images.dtype == np.uint8
  assert b0.pixels.shape == (3, 2, 8, 8) and b0.pixels.dtype == np.int32
  assert b0.scalars.shape == (3, 1) and b0.scalars.dtype == np.int32
  np.testing.assert_array_equal(b0.index, [0, 1, 2])
  assert b0.index.dtype == np.int32 and b0.valid.all()
  # Row a: color layer then object layer; row b: one layer, zero-padded; row d: two object layers.
  np.testing.assert_array_equal(b0.pixels[0, 0], MINI_PNGS["a_color.png"])
  np.testing.assert_array_equal(b0.pixels[0, 1], MINI_PNGS["a_object.png"])
  np.testing.assert_array_equal(b0.pixels[1, 0], MINI_PNGS["b_color.png"])
  assert not b0.pixels[1, 1].any()
  np.testing.assert_array_equal(b0.pixels[2, 1], MINI_PNGS["d_obj2.png"])
  np.testing.assert_array_equal(b0.scalars[:, 0], [5, 0, 5])
  np.testing.assert_array_equal(b0.images[1], np.asarray(Image.open(mini / "images/b.jpg")))
  # pad_last: fixed shapes; padding rows are zero, index -1, valid False.
  padded = list(loader.iterate_batches(probe, 3, pad_last=True, progress=False, num_workers=0))
  last = padded[-1]
  assert last.images.shape == (3, 16, 16, 3) and last.pixels.shape == (3, 2, 8, 8)
  np.testing.assert_array_equal(last.index, [3, -1, -1])
  np.testing.assert_array_equal(last.valid, [True, False, False])
  assert not last.images[1:].any() and not last.pixels[1:].any() and not last.scalars[1:].any()
  for a, b in zip(batches, padded):
    n = a.images.shape[0]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y[:n])


def test_loader_indices_transform_and_helpers(mini: Path):
  probe = load_probe(mini)
  sel = [3, 0, 2]
  out = list(loader.iterate_batches(probe, 2, indices=sel, progress="mini", prefetch=0,
                                    image_transform=lambda im: im[::2, ::2].astype(np.float32)))
  np.testing.assert_array_equal(np.concatenate([b.index for b in out]), sel)
  assert out[0].images.shape == (2, 8, 8, 3) and out[0].images.dtype == np.float32
  pixels, scalars = loader.load_labels(probe, sel)
  np.testing.assert_array_equal(pixels, np.concatenate([b.pixels for b in out]))
  np.testing.assert_array_equal(scalars, np.concatenate([b.scalars for b in out]))
  images = loader.load_images(probe, np.array(sel))
  assert images.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(images[1], broden.decode_image(probe.image_paths[0], 16))
  # S is at least 1 even without image-level categories.
  sub = load_probe(mini, categories=("color", "object"))
  assert loader.load_labels(sub)[1].shape == (3, 1)
  assert list(loader.iterate_batches(probe, 2, indices=[], progress=False)) == []
  with pytest.raises(ValueError, match="out of range"):
    loader.load_labels(probe, [4])
  with pytest.raises(ValueError, match="batch_size"):
    next(loader.iterate_batches(probe, 0))


def test_loader_stops_cleanly_when_closed_early(mini: Path):
  probe = load_probe(mini)
  it = loader.iterate_batches(probe, 1, progress=False, prefetch=2)
  first = next(it)
  assert first.index.tolist() == [0]
  it.close()  # shuts the executor down; no hang


# ----------------------------------------------------------------------------------------------
# Synthetic round trip (224/112 and 227/113)


@pytest.fixture(scope="module")
def synth224(tmp_path_factory) -> Path:
  return synthetic.make_probe_set(tmp_path_factory.mktemp("s224") / "probe", num_images=24,
                                  seed=0)


def _read_rows(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_synthetic_round_trip(synth224: Path):
  probe = load_probe(synth224)
  assert probe.category_names == synthetic.CATEGORIES
  assert probe.num_images == 24 and probe.seg_size == (112, 112) and probe.image_size == (224, 224)
  inventory = synthetic.label_inventory(4)
  assert probe.num_labels == max(lab.number for lab in inventory) + 1
  for lab in inventory:
    assert probe.label_names[lab.number] == lab.name
    assert set(probe.label_categories[lab.number]) == set(lab.categories)
  assert probe.label_defined.sum() == len(inventory)
  # Primary categories from the c_*.csv coverages, read independently.
  cov = {}
  for c, cat in enumerate(probe.category_names):
    for row in _read_rows(synth224 / f"c_{cat}.csv"):
      cov[(int(row["number"]), c)] = float(row["coverage"])
  for lab in inventory:
    best = max((cov.get((lab.number, c), 0.0), c) for c in range(6))[1]
    assert probe.primary_category[lab.number] == best
  grass = [lab.number for lab in inventory if lab.name == "grass"][0]
  assert probe.label_categories[grass].keys() == {"object", "material"}
  assert probe.primary_category[grass] == 3  # material: the background covers more
  assert probe.primary_category[0] == 5      # label 0: all-zero tie -> last category (texture)
  # K = color + object + 2 part layers + material; S = scene + up to two textures.
  assert probe.max_layers == 5 and probe.max_scalars == 3
  rows = _read_rows(synth224 / "index.csv")
  assert any(r["object"] == "" for r in rows) and any(r["part"] == "" for r in rows)
  assert any(r["texture"] == "" for r in rows) and any(";" in r["texture"] for r in rows)
  # Loader over the whole set: label numbers decode to defined labels, including >= 256.
  seen = set()
  for b in loader.iterate_batches(probe, 10, pad_last=True, progress=False):
    assert b.images.shape == (10, 224, 224, 3) and b.pixels.shape == (10, 5, 112, 112)
    assert b.scalars.shape == (10, 3)
    seen |= set(np.unique(b.pixels).tolist())
  assert max(seen) >= 256
  assert all(probe.label_defined[n] for n in seen if n)


def test_synthetic_227(tmp_path: Path):
  root = synthetic.make_probe_set(tmp_path / "p227", num_images=6, image_size=227, seg_size=113,
                                  seed=3)
  probe = load_probe(root)
  assert probe.seg_size == (113, 113) and probe.image_size == (227, 227)
  batch = next(loader.iterate_batches(probe, 6, progress=False))
  assert batch.images.shape == (6, 227, 227, 3) and batch.pixels.shape[2:] == (113, 113)
  with pytest.raises(BrodenFormatError, match=r"227x227 \(height x width\), expected 224x224"):
    next(loader.iterate_batches(load_probe(root, image_size=224), 2, progress=False))


# ----------------------------------------------------------------------------------------------
# Errors: each names the file, the line (where one applies) and the reason.


def test_error_missing_paths(tmp_path: Path):
  _raises(lambda: load_probe(tmp_path / "nope"), "nope", None, "probe directory not found",
          BrodenMissingFileError)
  (tmp_path / "noimg").mkdir()
  _raises(lambda: load_probe(tmp_path / "noimg"), "images", None, "images directory not found",
          BrodenMissingFileError)
  for name in MINI_FILES:
    root = make_mini(tmp_path / f"miss_{name}")
    (root / name).unlink()
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
      load_probe(root)
    _raises(lambda: load_probe(root), name, None, "file not found", BrodenMissingFileError)


@pytest.mark.parametrize("name,old,new,expected", [
    ("index.csv", "image,split,ih", "img,split,ih", "expected image,split,ih,iw,sh,sw,<categories"),
    ("category.csv", "name,first", "nom,first", r"expected name,first,last,count,frequency, got nom"),
    ("label.csv", "number,name,category", "number,name,cat",
     r"expected number,name,category,frequency,coverage,syns, got number,name,cat,.*"
     r"\(missing: category\)"),
    ("c_object.csv", "code,number", "cod,number", r"expected code,number,name,frequency,coverage"),
])
def test_error_bad_header(tmp_path: Path, name, old, new, expected):
  root = make_mini(tmp_path / "m", **_edit(name, old, new))
  e = _raises(lambda: load_probe(root), name, 1, "bad header: " + expected)
  assert new.split(",")[0] in str(e)  # the header we got is shown


def test_error_index_missing_category_column(tmp_path: Path):
  text = MINI_FILES["index.csv"].replace(",scene\n", ",scenes\n", 1)
  root = make_mini(tmp_path / "m", index_csv=text)
  _raises(lambda: load_probe(root), "index.csv", 1, "no column for category scene")
  assert load_probe(root, categories=["color"]).num_images == 2  # fine without scene


@pytest.mark.parametrize("name,old,new,line,reason", [
    ("index.csv", "b.jpg,val,16,16,8,8,b_color.png,,", "b.jpg,val,16,16,8,8,b_color.png,", 3,
     r"expected 9 columns .*, got 8"),
    ("index.csv", "d.jpg,train,16,16,8,8", "d.jpg,train,16,16,8,x8", 5,
     r"column 'sw' must be an integer, got 'x8'"),
    ("index.csv", "c.jpg,train,16,16,8,8", "c.jpg,train,16,1.5,8,8", 4,
     r"column 'iw' must be an integer, got '1.5'"),  # dropped rows are parsed too
    ("label.csv", "4,tree", "4x,tree", 5, r"column 'number' must be an integer, got '4x'"),
    ("label.csv", "tree,object(1),1", "tree,object(1),one", 5,
     r"column 'frequency' must be an integer, got 'one'"),
    ("label.csv", "object(2),3", "object[2],3", 4, r"column 'category' must look like cat\(n\)"),
    ("label.csv", "5,beach,scene(2),2,2.0", "5,beach,scene(2),2,2.0,extra", 6,
     r"expected 6 columns"),
    ("label.csv", "300,bigthing", "4,bigthing", 7, r"label number 4 is listed twice"),
    ("c_object.csv", "2,4,tree", "two,4,tree", 3, r"column 'code' must be an integer, got 'two'"),
    ("c_object.csv", "2,4,tree,1,0.25", "2,4,tree,1,lots", 3,
     r"column 'coverage' must be a finite number, got 'lots'"),
    ("category.csv", "scene,5,5,1,2", "color,5,5,1,2", 4, r"category 'color' is listed twice"),
])
def test_error_bad_rows(tmp_path: Path, name, old, new, line, reason):
  root = make_mini(tmp_path / "m", **_edit(name, old, new))
  _raises(lambda: load_probe(root), name, line, reason)


def test_error_unknown_label_numbers(tmp_path: Path):
  root = make_mini(tmp_path / "a", **_edit("index.csv", "8,8,,,5", "8,8,,,7"))
  _raises(lambda: load_probe(root), "index.csv", 6,
          r"image-level label 7 in column 'scene' is not in label\.csv")
  root = make_mini(tmp_path / "b", **_edit("c_object.csv", "2,4,tree", "2,44,tree"))
  _raises(lambda: load_probe(root), "c_object.csv", 3, r"label number 44 is not in label\.csv")


def test_error_missing_referenced_files(tmp_path: Path):
  root = make_mini(tmp_path / "a")
  (root / "images/d.jpg").unlink()
  e = _raises(lambda: load_probe(root), "index.csv", 5, r"image file 'd\.jpg' not found",
              BrodenMissingFileError)
  assert str(root / "images/d.jpg") in str(e)
  root = make_mini(tmp_path / "b")
  (root / "images/d_obj2.png").unlink()
  _raises(lambda: load_probe(root), "index.csv", 5,
          r"label PNG 'd_obj2\.png' in column 'object' not found", BrodenMissingFileError)
  # Missing files of a dropped row are never looked at.
  assert load_probe(make_mini(tmp_path / "c")).num_images == 4


def test_error_seg_size_mismatch(tmp_path: Path):
  root = make_mini(tmp_path / "m", **_edit("index.csv", "d.jpg,train,16,16,8,8", "d.jpg,train,16,16,8,9"))
  _raises(lambda: load_probe(root), "index.csv", 5, r"sh,sw = 8,9 differs from 8,8 \(line 2\)")


def test_error_unknown_category_requested(mini: Path):
  e = _raises(lambda: load_probe(mini, categories=["object", "texture"]), "category.csv", None,
              r"requested category 'texture' not in category\.csv; available: color, object, scene")
  assert isinstance(e, ValueError)


def test_error_no_rows(mini: Path, tmp_path: Path):
  text = "image,split,ih,iw,sh,sw,color,object,scene\nc.jpg,train,16,16,8,8,,,\n"
  root = make_mini(tmp_path / "m", index_csv=text)
  _raises(lambda: load_probe(root), "index.csv", None, "no row has a value")


def test_error_decode_sizes_and_values(tmp_path: Path):
  # A label PNG of the wrong size: raised while loading, naming the PNG, the sizes and the row.
  root = make_mini(tmp_path / "a")
  _write_png(root / "images/d_obj1.png", np.zeros((8, 9), np.int32))
  probe = load_probe(root)
  _raises(lambda: list(loader.iterate_batches(probe, 2, progress=False)), "d_obj1.png", None,
          r"label PNG is 8x9 \(height x width\), expected the segmentation size 8x8.*"
          r"index\.csv line 5")
  _raises(lambda: loader.load_labels(probe, [2]), "d_obj1.png", None, "expected the segmentation")
  # An image of the wrong size.
  root = make_mini(tmp_path / "b")
  _write_jpg(root / "images/b.jpg", size=15)
  probe = load_probe(root)
  _raises(lambda: loader.load_images(probe), "b.jpg", None,
          r"image is 15x15 \(height x width\), expected 16x16.*index\.csv line 3")
  # The default image size comes from the first kept image.
  assert probe.image_size == (16, 16)
  # A PNG label value (R + 256*G) missing from label.csv.
  root = make_mini(tmp_path / "c")
  bad = MINI_PNGS["a_object.png"].copy()
  bad[0, 0], bad[1, 1] = 7, 256 + 6
  _write_png(root / "images/a_object.png", bad)
  probe = load_probe(root)
  _raises(lambda: next(loader.iterate_batches(probe, 4, progress=False, num_workers=2)),
          "a_object.png", None, r"label number\(s\) 7, 262 \(R \+ 256\*G\) that are not in label\.csv")
  # decode_label_png on its own: mode and missing file.
  grey = tmp_path / "grey.png"
  Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(grey)
  _raises(lambda: broden.decode_label_png(grey, 8), "grey.png", None, "mode L; expected RGB")
  _raises(lambda: broden.decode_label_png(tmp_path / "none.png", 8), "none.png", None,
          "not found", BrodenMissingFileError)


def test_error_pickles(mini: Path):
  import pickle
  e = BrodenMissingFileError("x/index.csv", 3, "why")
  e2 = pickle.loads(pickle.dumps(e))
  assert type(e2) is BrodenMissingFileError and str(e2) == "x/index.csv:3: why"
