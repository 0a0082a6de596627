"""Deterministic synthetic Broden-format probe sets, drawn procedurally.

Each image's background is one or (mostly) two regions split by a wavy line, each of its own
*material* (a colour pair with its own shading: wood grain, brushed metal, woven fabric, water
ripples, brick mortar, grass noise, stone blotches, sand grain, tile grout, carpet pile), laid out
in one *texture* pattern (striped, checkered, dotted, speckled, wavy; sometimes two overlaid,
sometimes plain), with 0-3 *objects* (circle, square, triangle, star, ring, cross in a named
colour, or a grass patch). Two regions of ten materials keep each material's share of all
pixels near 5-15 %, so a unit that detects one can pass NetDissect's IoU bar (with the top
0.5 % of activations as its mask, IoU <= 0.005 / the label's share of pixels).
Objects have *parts* in two layers: top/bottom halves, and rim/core (the rim is drawn darker).
The *scene* (one of ``num_scenes``) biases the first region's material and the object shapes,
so a small CNN can learn to classify the scene from pixels; this is the task the embedded
default CNN is trained on (``classes.json``, ``scene_targets``).

Label maps are computed at the image resolution and sampled (nearest pixel centre) at the
segmentation resolution, so they agree with the drawn image. All six Broden categories are
written: color, object, part, material (label PNGs, part with two layers), scene and texture
(image-level labels in index.csv). ``grass`` is both an object and a material, and the material
labels are numbered from 256 so the PNG G channel is exercised.

Everything is a function of ``seed``: the same arguments give byte-identical files::

    root = make_probe_set("/tmp/probe", num_images=320, seed=0)
    probe = broden.load_probe(root)
    y = scene_targets(probe)          # int32 (N,)

Command line: ``python -m nemjax.data.synthetic OUT_DIR [--num-images N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw

from nemjax.data.broden import ProbeSet

__all__ = [
    "make_probe_set",
    "scene_targets",
    "label_inventory",
    "SyntheticLabel",
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "PARTS",
    "MATERIALS",
    "TEXTURES",
    "SCENES",
]

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")

# Named colours (label name, nominal RGB).
COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (205, 40, 40)),
    ("orange", (240, 135, 30)),
    ("yellow", (235, 215, 50)),
    ("green", (50, 160, 60)),
    ("blue", (40, 80, 200)),
    ("purple", (125, 50, 165)),
    ("pink", (240, 150, 185)),
    ("brown", (125, 80, 40)),
    ("white", (238, 238, 238)),
    ("gray", (128, 128, 128)),
    ("black", (28, 28, 28)),
    ("cyan", (60, 195, 215)),
)
OBJECT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black",
                 "cyan")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
GRASS = "grass"  # both an object (grass patch) and a material
PARTS = ("top", "bottom", "rim", "core")  # layer 1: top/bottom; layer 2: rim/core
# Material -> (primary colour, secondary colour) of the background pattern.
MATERIALS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("wood", ("brown", "orange")),
    ("grass", ("green", "yellow")),
    ("brick", ("red", "gray")),
    ("water", ("blue", "cyan")),
    ("metal", ("gray", "white")),
    ("fabric", ("purple", "pink")),
    ("stone", ("brown", "gray")),
    ("sand", ("yellow", "white")),
    ("tile", ("white", "cyan")),
    ("carpet", ("red", "purple")),
)
TEXTURES = ("striped", "checkered", "dotted", "speckled", "wavy")
# Scene -> (two favoured object shapes, favoured material).
SCENES: tuple[tuple[str, tuple[str, str], str], ...] = (
    ("kitchen", ("circle", "square"), "wood"),
    ("park", ("star", "triangle"), "grass"),
    ("street", ("cross", "ring"), "brick"),
    ("beach", ("ring", "circle"), "water"),
    ("office", ("square", "cross"), "metal"),
    ("bedroom", ("circle", "star"), "fabric"),
    ("garage", ("cross", "triangle"), "metal"),
    ("harbor", ("square", "star"), "water"),
)
SYNONYMS = {"gray": "grey", "circle": "disc", "grass": "lawn;turf", "fabric": "cloth;textile"}

FIRST_MATERIAL_NUMBER = 256  # material labels (except grass) get numbers >= 256 (G channel = 1)
P_MATERIAL_FAVOURED = 0.85   # P(the first background region's material = the scene's material)
P_ONE_REGION = 0.15          # P(the background is one material region instead of two)
P_SHAPE_FAVOURED = 0.85      # P(an object's shape is one of the scene's two shapes)
P_GRASS_PATCH = 0.1          # P(an object is a grass patch)
P_NO_OBJECTS = 0.1           # P(an image has no object)
P_PLAIN = 0.1                # P(no texture: plain background, empty texture cell)
P_TWO_TEXTURES = 0.15        # P(a base pattern overlaid with dots: two texture labels)
P_VAL = 0.3                  # P(split = val)
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 6


@dataclasses.dataclass(frozen=True)
class SyntheticLabel:
  number: int                     # global label number (label.csv)
  name: str
  categories: tuple[str, ...]     # categories the label belongs to


def label_inventory(num_scenes: int = 4) -> tuple[SyntheticLabel, ...]:
  """The labels of a synthetic set, in number order.

  Numbers: colours 1-12, object shapes 13-18, grass 19 (object and material), parts 20-23,
  other materials from 256, then textures, then the ``num_scenes`` scenes.
  """
  _check_num_scenes(num_scenes)
  labels: list[SyntheticLabel] = []
  n = 1
  for name, _ in COLORS:
    labels.append(SyntheticLabel(n, name, ("color",)))
    n += 1
  for name in SHAPES:
    labels.append(SyntheticLabel(n, name, ("object",)))
    n += 1
  labels.append(SyntheticLabel(n, GRASS, ("object", "material")))
  n += 1
  for name in PARTS:
    labels.append(SyntheticLabel(n, name, ("part",)))
    n += 1
  n = FIRST_MATERIAL_NUMBER
  for name, _ in MATERIALS:
    if name != GRASS:
      labels.append(SyntheticLabel(n, name, ("material",)))
      n += 1
  for name in TEXTURES:
    labels.append(SyntheticLabel(n, name, ("texture",)))
    n += 1
  for name, _, _ in SCENES[:num_scenes]:
    labels.append(SyntheticLabel(n, name, ("scene",)))
    n += 1
  return tuple(labels)


def _check_num_scenes(num_scenes: int) -> None:
  if not 1 <= num_scenes <= len(SCENES):
    raise ValueError(f"num_scenes must be in 1..{len(SCENES)}, got {num_scenes}")


# ----------------------------------------------------------------------------------------------
# Drawing


@dataclasses.dataclass(frozen=True)
class _Canvas:
  size: int              # image side S
  seg: int               # label-map side
  yy: np.ndarray         # float32 (S, S) pixel-centre row coordinate
  xx: np.ndarray         # float32 (S, S) pixel-centre column coordinate
  seg_index: np.ndarray  # int64 (seg,) nearest full-resolution pixel of each label-map pixel


def _canvas(size: int, seg: int) -> _Canvas:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  seg_index = np.minimum(((np.arange(seg) + 0.5) * size / seg).astype(np.int64), size - 1)
  return _Canvas(size, seg, yy, xx, seg_index)


def _pattern(kind: str, rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
  """bool (S, S): True where the background shows its secondary colour."""
  s = cv.size / 224.0
  yy, xx = cv.yy, cv.xx
  if kind == "striped":
    period = rng.uniform(14, 30) * s
    angle = math.radians(float(rng.choice([0, 45, 90, 135])))
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
    return (u % period) < period / 2
  if kind == "checkered":
    c = rng.uniform(14, 30) * s
    ox, oy = rng.uniform(0, c, 2)
    return ((np.floor((xx + ox) / c) + np.floor((yy + oy) / c)) % 2) == 1
  if kind == "dotted":
    g = rng.uniform(18, 32) * s
    r = g * rng.uniform(0.22, 0.32)
    ox, oy = rng.uniform(0, g, 2)
    dx = (xx + ox) % g - g / 2
    dy = (yy + oy) % g - g / 2
    return dx * dx + dy * dy < r * r
  if kind == "speckled":
    b = max(2, int(round(rng.integers(4, 9) * s)))
    cells = -(-cv.size // b)
    grid = rng.random((cells, cells)) < 0.4
    return np.repeat(np.repeat(grid, b, 0), b, 1)[:cv.size, :cv.size]
  if kind == "wavy":
    period = rng.uniform(16, 30) * s
    amp = rng.uniform(4, 9) * s
    lam = rng.uniform(30, 60) * s
    a, b = (yy, xx) if rng.random() < 0.5 else (xx, yy)
    u = a + amp * np.sin(2 * np.pi * b / lam + rng.uniform(0, 2 * np.pi)) + rng.uniform(0, period)
    return (u % period) < period / 2
  raise AssertionError(kind)


def _material_shading(material: str, rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
  """float32 (S, S) multiplicative brightness of a material (close to 1)."""
  s = cv.size / 224.0
  yy, xx = cv.yy, cv.xx
  ph = rng.uniform(0, 2 * np.pi)
  if material == "wood":
    return 1 + 0.10 * np.sin(2 * np.pi * (yy + 5 * s * np.sin(xx / (17 * s) + ph)) / (9 * s))
  if material == "metal":
    return 0.88 + 0.22 * (xx + yy) / (2 * cv.size) + 0.03 * np.sin(2 * np.pi * yy / (3 * s) + ph)
  if material == "fabric":
    weave = (np.floor(xx / (2 * s)) + np.floor(yy / (2 * s))) % 2
    return 1 + 0.08 * (2 * weave - 1)
  if material == "water":
    return 1 + 0.10 * np.sin(xx / (7 * s) + 2 * np.sin(yy / (11 * s) + ph))
  if material == "brick":
    course = 16 * s
    return 1 - 0.2 * (((yy + ph * course) % course) < 2 * s)
  if material == GRASS:
    return 1 + 0.28 * (rng.random((cv.size, cv.size), dtype=np.float32) - 0.5)
  if material == "stone":  # smooth blotches
    cells = rng.random((7, 7), dtype=np.float32)
    blotch = np.asarray(Image.fromarray(cells, "F").resize((cv.size, cv.size), Image.BILINEAR))
    return 0.88 + 0.24 * blotch
  if material == "sand":  # fine grain on gentle ripples
    grain = rng.random((cv.size, cv.size), dtype=np.float32) - 0.5
    return 1 + 0.12 * grain + 0.05 * np.sin(2 * np.pi * (xx + 0.3 * yy) / (23 * s) + ph)
  if material == "tile":  # dark grout grid
    c = 28 * s
    return 1 - 0.25 * ((((xx + ph * c) % c) < 2 * s) | (((yy + ph * c) % c) < 2 * s))
  if material == "carpet":  # fine diagonal pile
    return 1 + 0.09 * np.sign(np.sin(2 * np.pi * (xx + yy) / (4 * s) + ph))
  raise AssertionError(material)


def _polygon(kind: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
  if kind == "square":
    radii, angles = [0.85 * r * math.sqrt(2)] * 4, [theta + math.pi / 4 + k * math.pi / 2
                                                    for k in range(4)]
  elif kind == "triangle":
    radii, angles = [1.1 * r] * 3, [theta + k * 2 * math.pi / 3 for k in range(3)]
  elif kind == "star":
    radii = [1.2 * r if k % 2 == 0 else 0.5 * r for k in range(10)]
    angles = [theta + k * math.pi / 5 for k in range(10)]
  elif kind == "cross":
    w, ln = 0.32 * r, 1.05 * r
    local = [(w, ln), (w, w), (ln, w), (ln, -w), (w, -w), (w, -ln), (-w, -ln), (-w, -w),
             (-ln, -w), (-ln, w), (-w, w), (-w, ln)]
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in local]
  else:
    raise AssertionError(kind)
  return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)]


def _shape_mask(kind: str, cx: float, cy: float, r: float, theta: float,
                rng: np.random.Generator, size: int) -> np.ndarray:
  """bool (S, S) full (unoccluded) mask of one object."""
  img = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(img)
  if kind == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
  elif kind == "ring":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    q = 0.55 * r
    draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
  elif kind == GRASS:
    for _ in range(5):
      ex, ey = cx + rng.normal(0, 0.35 * r), cy + rng.normal(0, 0.35 * r)
      ax, ay = rng.uniform(0.4, 0.75, 2) * r
      draw.ellipse((ex - ax, ey - ay, ex + ax, ey + ay), fill=1)
  else:
    draw.polygon(_polygon(kind, cx, cy, r, theta), fill=1)
  return np.asarray(img, dtype=bool)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
  """bool (S, S) erosion of `mask` by a (2k+1)x(2k+1) square (outside counts as False)."""
  p = np.pad(mask, k, constant_values=False)
  rows = sliding_window_view(p, 2 * k + 1, axis=0).min(axis=-1)
  return sliding_window_view(rows, 2 * k + 1, axis=1).min(axis=-1)


def _background_regions(num_regions: int, rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
  """int8 (S, S): 0 everywhere, or 0 / 1 on the two sides of a wavy line across the image."""
  if num_regions == 1:
    return np.zeros((cv.size, cv.size), np.int8)
  s = cv.size / 224.0
  angle = rng.uniform(0, 2 * np.pi)
  c, d = math.cos(angle), math.sin(angle)
  along = -cv.xx * d + cv.yy * c
  offset = rng.uniform(-0.25, 0.25) * cv.size
  wave = rng.uniform(4, 14) * s * np.sin(2 * np.pi * along / (rng.uniform(60, 140) * s)
                                         + rng.uniform(0, 2 * np.pi))
  u = (cv.xx - cv.size / 2) * c + (cv.yy - cv.size / 2) * d
  return (u > offset + wave).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class _Rendered:
  image: np.ndarray                  # uint8 (S, S, 3)
  maps: dict[str, list[np.ndarray]]  # category -> layers, int32 (seg, seg) global numbers
  textures: tuple[int, ...]          # texture label numbers


def _render(rng: np.random.Generator, scene: int, cv: _Canvas, numbers: dict[str, int]
            ) -> _Rendered:
  """Draws one image and its label maps."""
  S = cv.size
  color_rgb = {name: np.array(rgb, np.float32) for name, rgb in COLORS}
  _, fav_shapes, fav_material = SCENES[scene]
  material_names = [m for m, _ in MATERIALS]

  # Background: one or two material regions (colour pair + shading each), split by a wavy
  # line, under one texture pattern. The first region's material is biased by the scene.
  materials = [fav_material if rng.random() < P_MATERIAL_FAVOURED
               else material_names[rng.integers(len(material_names))]]
  if rng.random() >= P_ONE_REGION:
    others = [m for m in material_names if m != materials[0]]
    materials.append(others[rng.integers(len(others))])
  region = _background_regions(len(materials), rng, cv)     # int (S, S) index into materials
  u = rng.random()
  if u < P_PLAIN:
    textures: list[str] = []
    alt = np.zeros((S, S), bool)
  elif u < P_PLAIN + P_TWO_TEXTURES:
    base = ("striped", "checkered", "wavy")[rng.integers(3)]
    textures = [base, "dotted"]
    alt = _pattern(base, rng, cv) ^ _pattern("dotted", rng, cv)
  else:
    textures = [TEXTURES[rng.integers(len(TEXTURES))]]
    alt = _pattern(textures[0], rng, cv)
  color_map = np.zeros((S, S), np.int32)
  rgb = np.zeros((S, S, 3), np.float32)
  shading = np.ones((S, S), np.float32)
  material_map = np.zeros((S, S), np.int32)
  background_colours: set[str] = set()
  for k, material in enumerate(materials):
    primary, secondary = dict(MATERIALS)[material]
    background_colours |= {primary, secondary}
    sel = region == k
    color_map[sel] = np.where(alt, numbers[secondary], numbers[primary])[sel]
    rgb[sel] = np.where(alt[..., None], color_rgb[secondary], color_rgb[primary])[sel]
    shading[sel] = _material_shading(material, rng, cv)[sel]
    material_map[sel] = numbers[material]
  object_map = np.zeros((S, S), np.int32)
  part1 = np.zeros((S, S), np.int32)
  part2 = np.zeros((S, S), np.int32)

  # Objects, drawn in order (later ones occlude earlier ones).
  num_objects = 0 if rng.random() < P_NO_OBJECTS else int(rng.integers(1, 4))
  objects = []
  for _ in range(num_objects):
    if rng.random() < P_GRASS_PATCH:
      kind = GRASS
    elif rng.random() < P_SHAPE_FAVOURED:
      kind = fav_shapes[rng.integers(2)]
    else:
      kind = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(0.10, 0.19) * S
    cx, cy = rng.uniform(r, S - r, 2)
    theta = rng.uniform(0, 2 * np.pi)
    choices = [c for c in OBJECT_COLORS if c not in background_colours]
    colour = choices[rng.integers(len(choices))]
    full = _shape_mask(kind, cx, cy, r, theta, rng, S)
    objects.append((kind, colour, cx, cy, r, full))
  covered = np.zeros((S, S), bool)
  for kind, colour, cx, cy, r, full in reversed(objects):
    visible = full & ~covered
    covered |= full
    if not visible.any():
      continue
    object_map[visible] = numbers[kind]
    if kind == GRASS:
      speck = _pattern("speckled", rng, cv)
      gcol = np.where(speck, numbers["yellow"], numbers["green"])
      color_map[visible] = gcol[visible]
      rgb[visible] = np.where(speck[..., None], color_rgb["yellow"], color_rgb["green"])[visible]
      shading[visible] = _material_shading(GRASS, rng, cv)[visible]
      material_map[visible] = numbers[GRASS]
      continue
    core = _erode(full, max(1, int(round(0.13 * r))))
    rim = visible & ~core
    color_map[visible] = numbers[colour]
    rgb[visible] = color_rgb[colour]
    dist = np.hypot(cv.xx - cx, cv.yy - cy) / r
    shading[visible] = (1.08 - 0.12 * np.minimum(dist, 1.3))[visible]
    shading[rim] *= 0.78
    material_map[visible] = 0
    part1[visible] = np.where(cv.yy < cy, numbers["top"], numbers["bottom"])[visible]
    part2[visible] = numbers["core"]
    part2[rim] = numbers["rim"]

  noise = rng.normal(0.0, 4.0, (S, S, 3)).astype(np.float32)
  image = np.clip(np.rint(rgb * shading[..., None] + noise), 0, 255).astype(np.uint8)
  ix = np.ix_(cv.seg_index, cv.seg_index)
  maps = {
      "color": [color_map[ix]],
      "object": [object_map[ix]],
      "part": [part1[ix], part2[ix]],
      "material": [material_map[ix]],
  }
  return _Rendered(image, maps, tuple(numbers[t] for t in textures))


# ----------------------------------------------------------------------------------------------
# Writing


def _label_png(labels: np.ndarray) -> Image.Image:
  rgb = np.zeros(labels.shape + (3,), np.uint8)
  rgb[..., 0] = labels % 256
  rgb[..., 1] = labels // 256
  return Image.fromarray(rgb, "RGB")


def _remove_outputs(out: Path) -> None:
  """Removes only the files and folder this generator writes."""
  for name in ("index.csv", "index.csv.tmp", "category.csv", "label.csv", "classes.json",
               "README.txt"):
    (out / name).unlink(missing_ok=True)
  for cat in CATEGORIES:
    (out / f"c_{cat}.csv").unlink(missing_ok=True)
  if (out / "images" / "synth").is_dir():
    shutil.rmtree(out / "images" / "synth")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


def make_probe_set(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 320,
    image_size: int = 224,
    seg_size: int = 112,
    seed: int = 0,
    num_scenes: int = 4,
    overwrite: bool = False,
) -> Path:
  """Writes a synthetic Broden-format probe set.

  Args:
    out_dir: the directory to write (created if missing).
    num_images: number of images (N).
    image_size: image side S (224 for ResNet/VGG sets, 227 for AlexNet).
    seg_size: label-map side (112, resp. 113).
    seed: non-negative int; the same arguments give byte-identical files.
    num_scenes: number of scene classes (1..8).
    overwrite: if `out_dir` is not empty, remove this generator's outputs there and write
      again (other files are left alone); otherwise a non-empty `out_dir` is an error.

  Returns:
    The probe directory, holding index.csv, category.csv, label.csv, c_<cat>.csv for the six
    categories, classes.json, README.txt and images/synth/*. index.csv is written last, so its
    presence means the set is complete.
  """
  _check_num_scenes(num_scenes)
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  if not 16 <= image_size <= 4096:
    raise ValueError(f"image_size must be in 16..4096, got {image_size}")
  if not 1 <= seg_size <= image_size:
    raise ValueError(f"seg_size must be in 1..image_size ({image_size}), got {seg_size}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace the probe set")
    _remove_outputs(out)
  img_dir = out / "images" / "synth"
  img_dir.mkdir(parents=True, exist_ok=True)

  labels = label_inventory(num_scenes)
  numbers = {lab.name: lab.number for lab in labels}
  cv = _canvas(image_size, seg_size)
  scenes = np.random.default_rng([seed, 0]).permutation(np.arange(num_images) % num_scenes)
  area = float(seg_size * seg_size)
  # (category, number) -> [images with the label, summed coverage]
  stats: dict[tuple[str, int], list] = {
      (cat, lab.number): [0, 0.0] for lab in labels for cat in lab.categories}
  index_rows = []
  for i in range(num_images):
    rng = np.random.default_rng([seed, 1, i])
    split = "val" if rng.random() < P_VAL else "train"
    scene = int(scenes[i])
    r = _render(rng, scene, cv, numbers)
    stem = f"synth/{i:05d}"
    Image.fromarray(r.image, "RGB").save(
        out / "images" / f"{stem}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=2,
        optimize=False, progressive=False)
    cells: dict[str, str] = {}
    for cat in PIXEL_CATEGORIES:
      layers = r.maps[cat]
      if not any(layer.any() for layer in layers):
        cells[cat] = ""
        continue
      names = ([f"{stem}_{cat}.png"] if len(layers) == 1
               else [f"{stem}_{cat}_{k + 1}.png" for k in range(len(layers))])
      for name, layer in zip(names, layers):
        _label_png(layer).save(out / "images" / name, format="PNG",
                               compress_level=PNG_COMPRESS_LEVEL)
      cells[cat] = ";".join(names)
      counts: dict[int, int] = {}
      for layer in layers:
        nums, cnt = np.unique(layer, return_counts=True)
        for n, c in zip(nums.tolist(), cnt.tolist()):
          if n:
            counts[n] = counts.get(n, 0) + c
      for n, c in sorted(counts.items()):
        st = stats[(cat, n)]
        st[0] += 1
        st[1] += c / area
    scene_number = numbers[SCENES[scene][0]]
    for cat, nums in (("scene", (scene_number,)), ("texture", r.textures)):
      cells[cat] = ";".join(str(n) for n in nums)
      for n in nums:
        st = stats[(cat, n)]
        st[0] += 1
        st[1] += 1.0
    index_rows.append([f"{stem}.jpg", split, image_size, image_size, seg_size, seg_size]
                      + [cells[c] for c in CATEGORIES])

  # category.csv
  cat_rows = []
  for cat in CATEGORIES:
    members = [lab for lab in labels if cat in lab.categories]
    cat_rows.append([cat, min(m.number for m in members), max(m.number for m in members),
                     len(members), sum(stats[(cat, m.number)][0] for m in members)])
  _write_csv(out / "category.csv", ("name", "first", "last", "count", "frequency"), cat_rows)
  # label.csv
  label_rows = []
  for lab in labels:
    per_cat = sorted(((cat, stats[(cat, lab.number)]) for cat in lab.categories),
                     key=lambda t: -t[1][0])
    label_rows.append([
        lab.number, lab.name, ";".join(f"{cat}({st[0]})" for cat, st in per_cat),
        sum(st[0] for _, st in per_cat), f"{sum(st[1] for _, st in per_cat):.6f}",
        SYNONYMS.get(lab.name, "")])
  _write_csv(out / "label.csv", ("number", "name", "category", "frequency", "coverage", "syns"),
             label_rows)
  # c_<cat>.csv
  for cat in CATEGORIES:
    members = [lab for lab in labels if cat in lab.categories]
    rows = [[code, m.number, m.name, stats[(cat, m.number)][0],
             f"{stats[(cat, m.number)][1]:.6f}"] for code, m in enumerate(members, start=1)]
    _write_csv(out / f"c_{cat}.csv", ("code", "number", "name", "frequency", "coverage"), rows)
  classes = [name for name, _, _ in SCENES[:num_scenes]]
  (out / "classes.json").write_text(
      json.dumps({"task": "scene", "classes": classes}, indent=2) + "\n", encoding="utf-8")
  (out / "README.txt").write_text(_readme(num_images, image_size, seg_size, seed, num_scenes),
                                  encoding="utf-8")
  tmp = out / "index.csv.tmp"
  _write_csv(tmp, ("image", "split", "ih", "iw", "sh", "sw") + CATEGORIES, index_rows)
  os.replace(tmp, out / "index.csv")
  return out


def _readme(num_images: int, image_size: int, seg_size: int, seed: int, num_scenes: int) -> str:
  scenes = "\n".join(f"  {name}: objects {a}, {b}; material {m}"
                     for name, (a, b), m in SCENES[:num_scenes])
  return (
      "Synthetic Broden-format probe set written by nemjax.data.synthetic.make_probe_set\n"
      f"num_images={num_images} image_size={image_size} seg_size={seg_size} seed={seed} "
      f"num_scenes={num_scenes}\n\n"
      "Categories: color, object, part (two layers: top/bottom, rim/core), material "
      "(label PNGs, label = R + 256*G); scene, texture (image-level labels in index.csv).\n"
      "Classification task (classes.json): the scene, which biases material and object shapes:\n"
      f"{scenes}\n")


def scene_targets(probe: ProbeSet, classes: Sequence[str] | None = None) -> np.ndarray:
  """Scene class index of each probe row (the embedded CNN's classification target).

  Args:
    probe: a probe set that keeps the ``scene`` category.
    classes: class names in class-index order (default: ``classes.json`` in the probe root).

  Returns:
    int32 (N,): index into ``classes`` of each row's (first) scene label; -1 if it has none.
  """
  if classes is None:
    path = Path(probe.root) / "classes.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found; pass `classes` explicitly")
    classes = json.loads(path.read_text(encoding="utf-8"))["classes"]
  class_of = {name: k for k, name in enumerate(classes)}
  c = probe.category_index("scene")
  out = np.full((probe.num_images,), -1, np.int32)
  for i, per_cat in enumerate(probe.category_scalars):
    nums = per_cat[c]
    if not nums:
      continue
    name = str(probe.label_names[nums[0]])
    if name not in class_of:
      raise ValueError(
          f"{probe.row_description(i)}: scene label {nums[0]} ({name!r}) is not one of the "
          f"classes {list(classes)}")
    out[i] = class_of[name]
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m nemjax.data.synthetic",
      description="Write a deterministic synthetic Broden-format probe set.")
  parser.add_argument("out_dir", type=Path)
  parser.add_argument("--num-images", type=int, default=320)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--seg-size", type=int, default=112)
  parser.add_argument("--num-scenes", type=int, default=4)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    out = make_probe_set(args.out_dir, num_images=args.num_images, image_size=args.image_size,
                         seg_size=args.seg_size, seed=args.seed, num_scenes=args.num_scenes,
                         overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
