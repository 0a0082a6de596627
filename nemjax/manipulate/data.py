"""Training-stream adapters for fine-tuning attacks.

The fine-tuning loop (:mod:`nemjax.manipulate.loop`) consumes any iterable of
``(images, labels)`` batches:

* ``images``: ``(B, H, W, 3)`` **uint8 RGB in 0..255** by default (the model function applies
  its own normalisation, e.g. :func:`nemjax.preprocess.netdissect_normalize`, inside ``jit``);
  pass ``normalize=`` to get float32 model inputs instead.
* ``labels``: ``(B,)`` int32 class indices, ``-1`` where a label is unknown.

Adapters:

* :func:`image_folder_batches` — a class-per-subfolder tree (``root/<class>/<image>``, classes
  in sorted order as torchvision's ``ImageFolder``), decoded with Pillow, resized (shorter side
  to ``image_size``, bilinear) and centre-cropped to ``image_size × image_size``.
* :func:`probe_classification_arrays` — the images and scene targets of a synthetic
  Broden-format probe set (the embedded default's classification task).

Every shuffle is a function of an explicit ``jax.random`` key, so epoch ``e`` of a stream is
reproducible (``key = jax.random.fold_in(base_key, e)``), which is what lets an interrupted
fine-tune resume on exactly the batches it would have seen.

Example::

  key = jax.random.key(0)
  for epoch in range(3):
    for images, labels in image_folder_batches("data/train", 32, image_size=224,
                                               key=jax.random.fold_in(key, epoch)):
      ...
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_folder",
    "list_images",
    "load_image",
    "load_image_files",
    "image_folder_batches",
    "probe_classification_arrays",
    "shuffled_order",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

Batch = tuple[np.ndarray, np.ndarray]
Normalize = Callable[[np.ndarray], Any]


def _is_image(p: Path) -> bool:
  return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(root: str | os.PathLike) -> list[Path]:
  """All image files under ``root`` (recursively), sorted by path.

  Raises:
    FileNotFoundError: ``root`` is not a directory or holds no image file.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder not found: {root}")
  files = sorted(p for p in root.rglob("*") if _is_image(p))
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
  return files


def list_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None
                      ) -> tuple[list[Path], np.ndarray, list[str]]:
  """Files and labels of a class-per-subfolder tree.

  Args:
    root: directory whose sub-directories are the classes (``root/<class>/**/<image>``).
    classes: class names in label order (default: the sub-directory names, sorted); a listed
      class with no sub-directory is an error, sub-directories not listed are skipped.

  Returns:
    ``(paths, labels int32 (n,), class_names)``, paths sorted within each class.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder not found: {root}")
  found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
  if classes is None:
    classes = found
  else:
    missing = [c for c in classes if c not in found]
    if missing:
      raise FileNotFoundError(f"{root}: no sub-directory for class(es) {missing}")
  if not classes:
    raise FileNotFoundError(f"{root}: expected one sub-directory per class, found none")
  paths, labels = [], []
  for k, name in enumerate(classes):
    files = sorted(p for p in (root / name).rglob("*") if _is_image(p))
    paths += files
    labels += [k] * len(files)
  if not paths:
    raise FileNotFoundError(f"no image files under the class directories of {root}")
  return paths, np.asarray(labels, np.int32), list(classes)


def _resize_crop(im: Image.Image, s: int) -> np.ndarray:
  """Resize the shorter side of an RGB image to ``s`` (bilinear) and centre-crop ``s × s``."""
  w, h = im.size
  scale = s / min(w, h)
  nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
  if (nw, nh) != (w, h):
    im = im.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - s) // 2, (nh - s) // 2
  return np.asarray(im.crop((left, top, left + s, top + s)), np.uint8)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
  """Decode an image as RGB, resize its shorter side to ``image_size`` and centre-crop.

  Args:
    path: any image Pillow can open (greyscale / palette / alpha converted to RGB).
    image_size: side of the square output.

  Returns:
    uint8 ``(image_size, image_size, 3)``.
  """
  if int(image_size) < 1:
    raise ValueError(f"load_image: image_size must be >= 1, got {image_size}")
  try:
    with Image.open(path) as im:
      return _resize_crop(im.convert("RGB"), int(image_size))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"image not found: {path}") from e
  except OSError as e:
    raise ValueError(f"cannot decode image {path}: {e}") from e


def load_image_files(paths: Sequence[str | os.PathLike], image_size: int, *,
                     num_workers: int = 2) -> np.ndarray:
  """Decode several files with :func:`load_image` (threads; Pillow releases the GIL).

  Returns:
    uint8 ``(n, image_size, image_size, 3)``.
  """
  out = np.zeros((len(paths), int(image_size), int(image_size), 3), np.uint8)

  def fill(i: int) -> None:
    out[i] = load_image(paths[i], image_size)

  if num_workers > 0 and len(paths) > 1:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as ex:
      list(ex.map(fill, range(len(paths))))
  else:
    for i in range(len(paths)):
      fill(i)
  return out


def shuffled_order(n: int, key: jax.Array | None) -> np.ndarray:
  """``arange(n)`` permuted by ``key`` (identity for ``key=None``)."""
  if key is None:
    return np.arange(n)
  return np.asarray(jax.random.permutation(key, n))


def _finish(images: np.ndarray, normalize: Normalize | None) -> Any:
  return images if normalize is None else np.asarray(normalize(images), np.float32)


def image_folder_batches(root: str | os.PathLike, batch_size: int, *, image_size: int,
                         key: jax.Array | None, classes: Sequence[str] | None = None,
                         drop_remainder: bool = True, normalize: Normalize | None = None,
                         num_workers: int = 2) -> Iterator[Batch]:
  """One epoch of ``(images, labels)`` batches from a class-per-subfolder tree.

  Args:
    root: ``root/<class>/**/<image>`` (see :func:`list_image_folder`).
    batch_size: images per batch.
    image_size: square side after resize + centre crop (:func:`load_image`).
    key: ``jax.random`` key of this epoch's shuffle (``None``: file order).
    classes: class names in label order (default: sorted sub-directory names).
    drop_remainder: skip the last partial batch (static shapes: no recompilation).
    normalize: ``None`` to yield uint8 0..255 images (default), or a function applied to each
      uint8 batch (e.g. ``nemjax.preprocess.imagenet_normalize`` after ``/255``), whose result
      is yielded as float32.
    num_workers: decoding threads.

  Yields:
    ``(images (B, S, S, 3) uint8 or float32, labels (B,) int32)``.
  """
  if int(batch_size) < 1:
    raise ValueError(f"image_folder_batches: batch_size must be >= 1, got {batch_size}")
  paths, labels, _ = list_image_folder(root, classes)
  order = shuffled_order(len(paths), key)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  for start in range(0, stop, batch_size):
    idx = order[start:start + batch_size]
    images = load_image_files([paths[i] for i in idx], image_size, num_workers=num_workers)
    yield _finish(images, normalize), labels[idx]


def probe_classification_arrays(probe_dir: str | os.PathLike, *,
                                normalize: Normalize | None | str = "netdissect",
                                keep_unlabelled: bool = False
                                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Images and scene targets of a synthetic Broden-format probe set (the embedded task).

  Args:
    probe_dir: a probe set with ``classes.json`` (written by
      :func:`nemjax.data.synthetic.make_probe_set`).
    normalize: ``"netdissect"`` (default: :func:`nemjax.preprocess.netdissect_normalize`, the
      embedded SmallCNN's input normalisation, float32), ``None`` (raw uint8 0..255) or any
      function of the uint8 batch.
    keep_unlabelled: keep rows without a scene label (target ``-1``); by default they are
      dropped.

  Returns:
    ``(images (n, H, W, 3), targets int32 (n,), class_names)``; row ``i`` is probe row
    ``i`` when ``keep_unlabelled``.
  """
  from nemjax import preprocess  # pylint: disable=import-outside-toplevel
  from nemjax.data import broden, loader, synthetic  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  probe_dir = Path(probe_dir)
  classes_path = probe_dir / "classes.json"
  if not classes_path.is_file():
    raise FileNotFoundError(f"{classes_path} not found: not a classification probe set")
  classes = list(json.loads(classes_path.read_text(encoding="utf-8"))["classes"])
  probe = broden.load_probe(probe_dir)
  targets = np.asarray(synthetic.scene_targets(probe, classes), np.int32)
  keep = np.arange(targets.size) if keep_unlabelled else np.flatnonzero(targets >= 0)
  images = loader.load_images(probe, keep)
  if normalize == "netdissect":
    normalize = preprocess.netdissect_normalize
  elif isinstance(normalize, str):
    raise ValueError(f"probe_classification_arrays: normalize must be 'netdissect', None or a "
                     f"function, got {normalize!r}")
  return _finish(images, normalize), targets[keep], classes
