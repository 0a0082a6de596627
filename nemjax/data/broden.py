"""Reader for Broden-format probe sets, exactly as NetDissect-Lite reads them.

A probe set directory holds ``index.csv``, ``category.csv``, ``label.csv``, one ``c_<cat>.csv``
per category and an ``images/`` folder (see ``shared/spec/netdissect.md``)::

    probe = load_probe("broden1_224", categories=("object", "part", "texture"))
    probe.num_images, probe.seg_size, probe.labelcat.shape   # N, (sh, sw), (L+1, C)
    mask = decode_label_png(probe.pixel_layers[0][0], probe.seg_size, probe.label_defined)

``load_probe`` parses and validates every table and checks that every referenced file exists,
but decodes no image: pixel data is read by ``decode_image`` / ``decode_label_png`` (used by
``nemjax.data.loader``), which check sizes and label numbers as they decode.

Every problem with the files raises ``BrodenFormatError`` (a ``ValueError``) whose message
starts with ``<file>:<line>:`` (or ``<file>:`` when no line applies) followed by the reason.
A missing file or directory raises ``BrodenMissingFileError``, which is also a
``FileNotFoundError``.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BrodenFormatError",
    "BrodenMissingFileError",
    "ProbeSet",
    "load_probe",
    "decode_label_png",
    "decode_image",
    "INDEX_META_COLUMNS",
]

# index.csv starts with these columns; every other column is a category.
INDEX_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_COLUMNS = ("name", "first", "last", "count", "frequency")
_LABEL_COLUMNS = ("number", "name", "category", "frequency", "coverage", "syns")
_CODE_COLUMNS = ("code", "number", "name", "frequency", "coverage")

_DIGITS = re.compile(r"^[0-9]+$")
_INTEGER = re.compile(r"^-?[0-9]+$")
_CATEGORY_FIELD = re.compile(r"^([^()]*)\(\s*([0-9]+)\s*\)$")


class BrodenFormatError(ValueError):
  """A Broden-format file is missing or malformed.

  Attributes:
    path: the offending file (or directory), as a string.
    line: 1-based line number in ``path`` (the header is line 1), or None.
    reason: what is wrong, in words.
  """

  def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
    self.path = str(path)
    self.line = line
    self.reason = reason
    super().__init__(self._message())

  def _message(self) -> str:
    where = self.path if self.line is None else f"{self.path}:{self.line}"
    return f"{where}: {self.reason}"

  def __str__(self) -> str:
    return self._message()

  def __reduce__(self):
    return (type(self), (self.path, self.line, self.reason))


class BrodenMissingFileError(BrodenFormatError, FileNotFoundError):
  """A file or directory that the probe set needs does not exist."""


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeSet:
  """A parsed Broden-format probe set (host-side metadata only; no pixels).

  N is the number of kept rows (after dropping rows with no value in any kept category),
  C the number of kept categories, L the largest label number in label.csv. Every per-row
  field is indexed by the filtered row order. Arrays are read-only NumPy arrays.
  """
  root: str                          # absolute path of the probe directory
  category_names: tuple[str, ...]    # (C,) kept categories, in category.csv order
  image_paths: tuple[str, ...]       # (N,) absolute paths of images/<image>
  row_numbers: np.ndarray            # int64 (N,) line of each row in index.csv (header = 1)
  splits: tuple[str, ...]            # (N,) the `split` column (unused by dissection)
  category_layers: tuple[tuple[tuple[str, ...], ...], ...]  # [N][C] absolute label-PNG paths
  category_scalars: tuple[tuple[tuple[int, ...], ...], ...]  # [N][C] image-level label numbers
  pixel_layers: tuple[tuple[str, ...], ...]  # [N] PNG paths over all categories, in category order
  scalars: tuple[tuple[int, ...], ...]       # [N] image-level labels over all categories, in order
  seg_size: tuple[int, int]          # (sh, sw) label-map size shared by all rows
  image_size: tuple[int, int]        # (H, W) size every image must have (not resized)
  label_names: np.ndarray            # str (L+1,) '' at 0 and for numbers absent from label.csv
  label_defined: np.ndarray          # bool (L+1,) True where label.csv has a row (False at 0)
  label_categories: tuple[dict[str, int], ...]  # (L+1,) label.csv `category` field as {cat: n}
  label_frequency: np.ndarray        # int64 (L+1,) label.csv `frequency` (0 where empty)
  label_coverage: np.ndarray         # float64 (L+1,) label.csv `coverage` (0 where empty)
  label_syns: tuple[tuple[str, ...], ...]  # (L+1,) label.csv `syns`, split on ';'
  category_codes: np.ndarray         # int64 (C, L+1) c_<cat>.csv code of each number (0: absent)
  category_frequency: np.ndarray     # int64 (C, L+1) c_<cat>.csv frequency (0: absent/empty)
  category_coverage: np.ndarray      # float64 (C, L+1) c_<cat>.csv coverage (0: absent)
  primary_category: np.ndarray       # int64 (L+1,) index into category_names (max coverage,
                                     #   ties, including all-zero, go to the later category)
  labelcat: np.ndarray               # float64 (L+1, C) one-hot of primary_category
  max_layers: int                    # K: most label-PNG layers of any row (0 if none)
  max_scalars: int                   # S: most image-level labels of any row (0 if none)

  @property
  def num_images(self) -> int:
    """N, the number of kept rows."""
    return len(self.image_paths)

  @property
  def num_labels(self) -> int:
    """L+1, the length of the dense label arrays (label 0 included)."""
    return int(self.label_names.shape[0])

  @property
  def num_categories(self) -> int:
    """C, the number of kept categories."""
    return len(self.category_names)

  def __len__(self) -> int:
    return self.num_images

  def category_index(self, name: str) -> int:
    """Index of a kept category in ``category_names``; ValueError naming the kept ones."""
    try:
      return self.category_names.index(name)
    except ValueError as err:
      raise ValueError(
          f"category {name!r} is not kept in this probe set; kept: "
          f"{', '.join(self.category_names)}") from err

  def labels_of_category(self, category: str | int) -> np.ndarray:
    """int64 (n,) label numbers whose primary category is ``category``."""
    c = category if isinstance(category, int) else self.category_index(category)
    nums = np.flatnonzero(self.primary_category == c)
    return nums[self.label_defined[nums]]

  def row_description(self, i: int) -> str:
    """'row i (index.csv line n)', for error messages."""
    return f"row {i} (index.csv line {int(self.row_numbers[i])})"


# ----------------------------------------------------------------------------------------------
# CSV helpers


def _read_csv(
    path: Path, required: Sequence[str], *, prefix: bool = False
) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """Reads a CSV file and checks its header.

  Args:
    path: the file.
    required: column names that must be in the header. With ``prefix=True`` they must be the
      first columns, in this order (index.csv); otherwise they may appear in any order, and
      extra columns are ignored by the callers (as NetDissect-Lite's ``csv.DictReader`` does).
    prefix: see ``required``.

  Returns:
    (header, rows): rows are (line number, fields) for each non-blank record; every record
    has exactly ``len(header)`` fields.
  """
  if not path.is_file():
    raise BrodenMissingFileError(path, None, "file not found")
  expected = ",".join(required) + (",<categories...>" if prefix else "")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration as err:
      raise BrodenFormatError(path, 1, f"empty file; expected the header {expected}") from err
    except csv.Error as e:
      raise BrodenFormatError(path, reader.line_num, f"CSV syntax error: {e}") from e
    got = ",".join(header)
    if prefix:
      bad = tuple(header[:len(required)]) != tuple(required)
      why = ""
    else:
      missing = [c for c in required if c not in header]
      bad = bool(missing)
      why = f" (missing: {', '.join(missing)})" if missing else ""
    if bad:
      raise BrodenFormatError(path, 1, f"bad header: expected {expected}, got {got}{why}")
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
      raise BrodenFormatError(path, 1, f"bad header: duplicate column(s) {', '.join(dups)}")
    rows = []
    try:
      for fields in reader:
        if not fields:
          continue  # blank line
        if len(fields) != len(header):
          raise BrodenFormatError(
              path, reader.line_num,
              f"expected {len(header)} columns ({got}), got {len(fields)}")
        rows.append((reader.line_num, fields))
    except csv.Error as e:
      raise BrodenFormatError(path, reader.line_num, f"CSV syntax error: {e}") from e
  return header, rows


def _parse_int(path: Path, line: int, column: str, value: str, *, allow_empty: bool = False,
               minimum: int | None = None) -> int:
  value = value.strip()
  if allow_empty and value == "":
    return 0
  if not _INTEGER.match(value):
    raise BrodenFormatError(path, line, f"column '{column}' must be an integer, got {value!r}")
  n = int(value)
  if minimum is not None and n < minimum:
    raise BrodenFormatError(path, line, f"column '{column}' must be >= {minimum}, got {n}")
  return n


def _parse_float(path: Path, line: int, column: str, value: str, *,
                 allow_empty: bool = False) -> float:
  value = value.strip()
  if allow_empty and value == "":
    return 0.0
  try:
    x = float(value)
  except ValueError:
    x = math.nan
  if not math.isfinite(x):
    raise BrodenFormatError(path, line, f"column '{column}' must be a finite number, got {value!r}")
  return x


def _parse_category_field(path: Path, line: int, value: str) -> dict[str, int]:
  """'cat(n);cat2(n2)' -> {'cat': n, 'cat2': n2} (empty -> {})."""
  result: dict[str, int] = {}
  for part in value.split(";"):
    part = part.strip()
    if not part:
      continue
    m = _CATEGORY_FIELD.match(part)
    if not m:
      raise BrodenFormatError(
          path, line, f"column 'category' must look like cat(n);cat2(n2), got {value!r}")
    result[m.group(1)] = int(m.group(2))
  return result


# ----------------------------------------------------------------------------------------------
# Tables


def _read_categories(root: Path) -> list[str]:
  path = root / "category.csv"
  header, rows = _read_csv(path, _CATEGORY_COLUMNS)
  col = header.index("name")
  names: list[str] = []
  for line, fields in rows:
    name = fields[col].strip()
    if not name:
      raise BrodenFormatError(path, line, "empty category name")
    if name in names:
      raise BrodenFormatError(path, line, f"category {name!r} is listed twice")
    names.append(name)
  if not names:
    raise BrodenFormatError(path, None, "no categories listed")
  return names


@dataclasses.dataclass(frozen=True)
class _LabelTable:
  names: np.ndarray
  defined: np.ndarray
  categories: tuple[dict[str, int], ...]
  frequency: np.ndarray
  coverage: np.ndarray
  syns: tuple[tuple[str, ...], ...]


def _read_labels(root: Path) -> _LabelTable:
  path = root / "label.csv"
  header, rows = _read_csv(path, _LABEL_COLUMNS)
  col = {c: header.index(c) for c in _LABEL_COLUMNS}
  parsed: dict[int, tuple[str, dict[str, int], int, float, tuple[str, ...]]] = {}
  for line, fields in rows:
    number = _parse_int(path, line, "number", fields[col["number"]])
    if number < 1:
      raise BrodenFormatError(path, line, f"label number must be >= 1 (0 means unlabeled), got {number}")
    if number in parsed:
      raise BrodenFormatError(path, line, f"label number {number} is listed twice")
    cats = _parse_category_field(path, line, fields[col["category"]])
    freq = _parse_int(path, line, "frequency", fields[col["frequency"]], allow_empty=True)
    cov = _parse_float(path, line, "coverage", fields[col["coverage"]], allow_empty=True)
    syns = tuple(s for s in fields[col["syns"]].split(";") if s)
    parsed[number] = (fields[col["name"]], cats, freq, cov, syns)
  if not parsed:
    raise BrodenFormatError(path, None, "no labels listed")
  size = max(parsed) + 1
  names = [""] * size
  cats_list: list[dict[str, int]] = [{} for _ in range(size)]
  syns_list: list[tuple[str, ...]] = [() for _ in range(size)]
  defined = np.zeros(size, bool)
  frequency = np.zeros(size, np.int64)
  coverage = np.zeros(size, np.float64)
  for number, (name, cats, freq, cov, syns) in parsed.items():
    names[number], cats_list[number], syns_list[number] = name, cats, syns
    defined[number], frequency[number], coverage[number] = True, freq, cov
  return _LabelTable(
      names=_frozen(np.array(names, dtype=str)), defined=_frozen(defined),
      categories=tuple(cats_list), frequency=_frozen(frequency), coverage=_frozen(coverage),
      syns=tuple(syns_list))


def _read_category_codes(root: Path, category: str, defined: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """c_<category>.csv -> code, frequency, coverage, each (L+1,) indexed by global number."""
  path = root / f"c_{category}.csv"
  header, rows = _read_csv(path, _CODE_COLUMNS)
  col = {c: header.index(c) for c in _CODE_COLUMNS}
  size = defined.shape[0]
  codes = np.zeros(size, np.int64)
  freq = np.zeros(size, np.int64)
  cov = np.zeros(size, np.float64)
  seen_codes: set[int] = set()
  seen_numbers: set[int] = set()
  for line, fields in rows:
    code = _parse_int(path, line, "code", fields[col["code"]], minimum=0)
    number = _parse_int(path, line, "number", fields[col["number"]])
    if not (0 < number < size and defined[number]):
      raise BrodenFormatError(path, line, f"label number {number} is not in label.csv")
    if number in seen_numbers:
      raise BrodenFormatError(path, line, f"label number {number} is listed twice")
    if code in seen_codes:
      raise BrodenFormatError(path, line, f"code {code} is listed twice")
    seen_codes.add(code)
    seen_numbers.add(number)
    codes[number] = code
    freq[number] = _parse_int(path, line, "frequency", fields[col["frequency"]], allow_empty=True)
    cov[number] = _parse_float(path, line, "coverage", fields[col["coverage"]])
  return codes, freq, cov


def primary_categories(codes: np.ndarray, coverage: np.ndarray) -> np.ndarray:
  """Primary category of each label, as NetDissect-Lite's ``primary_categories_per_index``.

  Args:
    codes: int (C, L+1) per-category code of each global number (0 = not in the category).
    coverage: float (C, L+1) per-category coverage.

  Returns:
    int64 (L+1,) the category with the largest coverage; a tie (including all-zero, as for
    label 0 and labels absent from every category) goes to the *later* category.
  """
  cov = np.where(codes != 0, coverage, 0.0)
  num_cats = cov.shape[0]
  return (num_cats - 1 - np.argmax(cov[::-1], axis=0)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# index.csv


def _split_cell(value: str) -> list[str]:
  return [s for s in value.split(";") if s]


def load_probe(
    root: str | os.PathLike,
    categories: Iterable[str] | str | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> ProbeSet:
  """Reads and validates a Broden-format probe set.

  Args:
    root: the probe directory (holding index.csv, category.csv, label.csv, c_*.csv, images/).
    categories: the categories to keep (default: all of category.csv). They are kept in
      category.csv order whatever the order given here.
    image_size: the size every image must have: an int for square images or (H, W). Default:
      the size of the first kept image (images are never resized, so all must share it).

  Returns:
    A ``ProbeSet``. Rows with no value in any kept category are dropped first.

  Raises:
    BrodenFormatError: a file is missing or malformed, a label number is not in label.csv, a
      referenced image or PNG does not exist, or rows disagree on (sh, sw).
  """
  root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
  if not root.is_dir():
    raise BrodenMissingFileError(root, None, "probe directory not found")
  images_dir = root / "images"
  if not images_dir.is_dir():
    raise BrodenMissingFileError(images_dir, None, "images directory not found")

  # category.csv: the kept categories, in category.csv order.
  all_categories = _read_categories(root)
  if categories is None:
    kept = list(all_categories)
  else:
    requested = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in requested if c not in all_categories]
    if unknown:
      raise BrodenFormatError(
          root / "category.csv", None,
          f"requested categor{'y' if len(unknown) == 1 else 'ies'} "
          f"{', '.join(map(repr, unknown))} not in category.csv; available: "
          f"{', '.join(all_categories)}")
    kept = [c for c in all_categories if c in requested]
    if not kept:
      raise ValueError("load_probe: `categories` is empty; pass None to keep all categories")

  labels = _read_labels(root)
  num_labels = labels.names.shape[0]
  codes = np.zeros((len(kept), num_labels), np.int64)
  cat_freq = np.zeros((len(kept), num_labels), np.int64)
  cat_cov = np.zeros((len(kept), num_labels), np.float64)
  for c, cat in enumerate(kept):
    codes[c], cat_freq[c], cat_cov[c] = _read_category_codes(root, cat, labels.defined)
  primary = primary_categories(codes, cat_cov)
  labelcat = np.zeros((num_labels, len(kept)), np.float64)
  labelcat[np.arange(num_labels), primary] = 1.0

  # index.csv: parse every row, then drop rows without data in the kept categories.
  index_path = root / "index.csv"
  header, rows = _read_csv(index_path, INDEX_META_COLUMNS, prefix=True)
  missing = [c for c in kept if c not in header[len(INDEX_META_COLUMNS):]]
  if missing:
    raise BrodenFormatError(
        index_path, 1,
        f"bad header: no column for categor{'y' if len(missing) == 1 else 'ies'} "
        f"{', '.join(missing)} (listed in category.csv); got {','.join(header)}")
  cat_cols = [header.index(c) for c in kept]
  col_sh, col_sw = header.index("sh"), header.index("sw")
  col_ih, col_iw = header.index("ih"), header.index("iw")

  image_paths: list[str] = []
  row_numbers: list[int] = []
  splits: list[str] = []
  cat_layers: list[tuple[tuple[str, ...], ...]] = []
  cat_scalars: list[tuple[tuple[int, ...], ...]] = []
  seg_size: tuple[int, int] | None = None
  seg_line = 0
  for line, fields in rows:
    sh = _parse_int(index_path, line, "sh", fields[col_sh], minimum=1)
    sw = _parse_int(index_path, line, "sw", fields[col_sw], minimum=1)
    _parse_int(index_path, line, "ih", fields[col_ih])
    _parse_int(index_path, line, "iw", fields[col_iw])
    cells = [_split_cell(fields[j]) for j in cat_cols]
    if not any(cells):
      continue  # no value in any kept category: dropped before anything else
    if seg_size is None:
      seg_size, seg_line = (sh, sw), line
    elif (sh, sw) != seg_size:
      raise BrodenFormatError(
          index_path, line,
          f"segmentation size sh,sw = {sh},{sw} differs from {seg_size[0]},{seg_size[1]} "
          f"(line {seg_line}); all rows must share one label-map size")
    image = fields[0].strip()
    if not image:
      raise BrodenFormatError(index_path, line, "empty 'image' column")
    image_path = images_dir / image
    if not image_path.is_file():
      raise BrodenMissingFileError(
          index_path, line, f"image file {image!r} not found (looked for {image_path})")
    row_layers: list[tuple[str, ...]] = []
    row_scalars: list[tuple[int, ...]] = []
    for cat, values in zip(kept, cells):
      pngs: list[str] = []
      nums: list[int] = []
      for v in values:
        if _DIGITS.match(v):
          n = int(v)
          if not (0 < n < num_labels and labels.defined[n]):
            raise BrodenFormatError(
                index_path, line,
                f"image-level label {n} in column '{cat}' is not in label.csv")
          nums.append(n)
        else:
          png = images_dir / v
          if not png.is_file():
            raise BrodenMissingFileError(
                index_path, line,
                f"label PNG {v!r} in column '{cat}' not found (looked for {png})")
          pngs.append(str(png))
      row_layers.append(tuple(pngs))
      row_scalars.append(tuple(nums))
    image_paths.append(str(image_path))
    row_numbers.append(line)
    splits.append(fields[1])
    cat_layers.append(tuple(row_layers))
    cat_scalars.append(tuple(row_scalars))

  if seg_size is None:
    raise BrodenFormatError(
        index_path, None,
        f"no row has a value in any of the categories {', '.join(kept)}")

  if image_size is None:
    image_size_hw = _image_header_size(Path(image_paths[0]), index_path, row_numbers[0])
  else:
    image_size_hw = _as_hw(image_size, "image_size")

  pixel_layers = tuple(tuple(p for layers in row for p in layers) for row in cat_layers)
  scalars = tuple(tuple(n for nums in row for n in nums) for row in cat_scalars)
  return ProbeSet(
      root=str(root),
      category_names=tuple(kept),
      image_paths=tuple(image_paths),
      row_numbers=_frozen(np.array(row_numbers, np.int64)),
      splits=tuple(splits),
      category_layers=tuple(cat_layers),
      category_scalars=tuple(cat_scalars),
      pixel_layers=pixel_layers,
      scalars=scalars,
      seg_size=seg_size,
      image_size=image_size_hw,
      label_names=labels.names,
      label_defined=labels.defined,
      label_categories=labels.categories,
      label_frequency=labels.frequency,
      label_coverage=labels.coverage,
      label_syns=labels.syns,
      category_codes=_frozen(codes),
      category_frequency=_frozen(cat_freq),
      category_coverage=_frozen(cat_cov),
      primary_category=_frozen(primary),
      labelcat=_frozen(labelcat),
      max_layers=max(len(p) for p in pixel_layers),
      max_scalars=max(len(s) for s in scalars),
  )


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def _as_hw(size: int | Sequence[int], what: str) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    hw = (int(size), int(size))
  else:
    hw = tuple(int(s) for s in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"{what} must be a positive int or (height, width), got {size!r}")
  return hw  # type: ignore[return-value]


def _image_header_size(path: Path, index_path: Path, line: int) -> tuple[int, int]:
  """(H, W) of an image, reading only its header."""
  try:
    with Image.open(path) as im:
      w, h = im.size
  except (UnidentifiedImageError, OSError) as e:
    raise BrodenFormatError(path, None, f"cannot read image (index.csv line {line}): {e}") from e
  return h, w


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_label_png(
    path: str | os.PathLike,
    seg_size: int | tuple[int, int],
    label_defined: np.ndarray | None = None,
) -> np.ndarray:
  """Decodes one label-PNG layer: label = R + 256*G (B unused, 0 = unlabeled).

  Args:
    path: the PNG file (RGB or RGBA; a palette PNG is converted to RGB first).
    seg_size: (sh, sw) the PNG must have (an int for square).
    label_defined: optional bool (L+1,) of numbers present in label.csv
      (``ProbeSet.label_defined``); any other non-zero value raises.

  Returns:
    int32 (sh, sw) global label numbers.
  """
  sh, sw = _as_hw(seg_size, "seg_size")
  try:
    with Image.open(path) as im:
      if im.size != (sw, sh):
        raise BrodenFormatError(
            path, None,
            f"label PNG is {im.size[1]}x{im.size[0]} (height x width), expected the "
            f"segmentation size {sh}x{sw} (sh x sw)")
      if im.mode == "P":
        im = im.convert("RGB")
      if im.mode not in ("RGB", "RGBA"):
        raise BrodenFormatError(
            path, None, f"label PNG has mode {im.mode}; expected RGB (label = R + 256*G)")
      rgb = np.asarray(im)
  except FileNotFoundError as err:
    raise BrodenMissingFileError(path, None, "label PNG not found") from err
  except (UnidentifiedImageError, OSError) as e:
    raise BrodenFormatError(path, None, f"cannot decode label PNG: {e}") from e
  labels = rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)
  if label_defined is not None:
    size = label_defined.shape[0]
    ok = (labels == 0) | ((labels < size) & label_defined[np.minimum(labels, size - 1)])
    if not ok.all():
      bad = np.unique(labels[~ok])
      shown = ", ".join(str(int(b)) for b in bad[:10]) + (", ..." if bad.size > 10 else "")
      raise BrodenFormatError(
          path, None,
          f"label PNG holds label number(s) {shown} (R + 256*G) that are not in label.csv")
  return labels


def decode_image(path: str | os.PathLike, image_size: int | tuple[int, int]) -> np.ndarray:
  """Decodes one probe image as RGB, never resizing or cropping it.

  Args:
    path: the image file (any mode Pillow can convert to RGB; greyscale is replicated).
    image_size: the size the image must have: an int for square, or (H, W).

  Returns:
    uint8 (H, W, 3).
  """
  h, w = _as_hw(image_size, "image_size")
  try:
    with Image.open(path) as im:
      if im.size != (w, h):
        raise BrodenFormatError(
            path, None,
            f"image is {im.size[1]}x{im.size[0]} (height x width), expected {h}x{w}; "
            f"probe images are never resized")
      if im.mode != "RGB":
        im = im.convert("RGB")
      rgb = np.asarray(im, dtype=np.uint8)
  except FileNotFoundError as err:
    raise BrodenMissingFileError(path, None, "image not found") from err
  except (UnidentifiedImageError, OSError) as e:
    raise BrodenFormatError(path, None, f"cannot decode image: {e}") from e
  return rgb
