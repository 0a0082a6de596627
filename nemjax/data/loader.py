"""Batched, background-decoded loading of a Broden-format probe set.

Images and label PNGs are decoded by a ``ThreadPoolExecutor`` (Pillow releases the GIL while
decoding) with a bounded number of batches in flight, so memory stays bounded however large
the probe set is::

    probe = broden.load_probe(root)
    for batch in iterate_batches(probe, 64, pad_last=True, progress="dissect layer4"):
      x = preprocess.netdissect_normalize(batch.images)   # (B, H, W, 3)
      ...  # batch.pixels (B, K, sh, sw), batch.scalars (B, S), batch.valid (B,)

Label layout per row, as NetDissect-Lite's ``tally_job`` sees it: ``pixels`` stacks every
label-PNG layer of every kept category (category order, then layer order) and zero-pads to
K = ``probe.max_layers``; ``scalars`` holds the image-level label numbers, zero-padded to
S = max(``probe.max_scalars``, 1). 0 means "no label" in both.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from nemjax.data.broden import BrodenFormatError, ProbeSet, decode_image, decode_label_png

__all__ = ["ProbeBatch", "iterate_batches", "load_labels", "load_images", "num_scalar_slots"]


class ProbeBatch(NamedTuple):
  """One batch of probe rows (host NumPy arrays)."""
  images: np.ndarray   # uint8 (B, H, W, 3) (or the image_transform's output, stacked)
  pixels: np.ndarray   # int32 (B, K, sh, sw) global label numbers, 0 = unlabeled
  scalars: np.ndarray  # int32 (B, S) image-level label numbers, 0 = padding
  index: np.ndarray    # int32 (B,) row index into the probe set; -1 for padding rows
  valid: np.ndarray    # bool (B,) False for padding rows (only with pad_last=True)


def num_scalar_slots(probe: ProbeSet) -> int:
  """S = max(probe.max_scalars, 1), the width of ``ProbeBatch.scalars``."""
  return max(probe.max_scalars, 1)


def _check_indices(probe: ProbeSet, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
  n = probe.num_images
  if indices is None:
    return np.arange(n, dtype=np.int64)
  idx = np.asarray(indices)
  if idx.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
  if idx.size == 0:
    return idx.astype(np.int64)
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
  bad = idx[(idx < 0) | (idx >= n)]
  if bad.size:
    raise ValueError(f"indices out of range [0, {n}): {bad[:10].tolist()}")
  return idx.astype(np.int64)


def _with_row_context(probe: ProbeSet, row: int, e: BrodenFormatError) -> BrodenFormatError:
  return type(e)(e.path, e.line, f"{e.reason} [{probe.row_description(row)}]")


def _row_image(probe: ProbeSet, row: int,
               image_transform: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
  try:
    image = decode_image(probe.image_paths[row], probe.image_size)
  except BrodenFormatError as e:
    raise _with_row_context(probe, row, e) from e
  if image_transform is not None:
    image = np.asarray(image_transform(image))
  return image


def _row_labels(probe: ProbeSet, row: int, out_pixels: np.ndarray, out_scalars: np.ndarray
                ) -> None:
  """Fills int32 (K, sh, sw) and (S,) (zero-initialised) with row `row`'s labels."""
  for k, path in enumerate(probe.pixel_layers[row]):
    try:
      out_pixels[k] = decode_label_png(path, probe.seg_size, probe.label_defined)
    except BrodenFormatError as e:
      raise _with_row_context(probe, row, e) from e
  nums = probe.scalars[row]
  out_scalars[:len(nums)] = nums


def _decode_row(probe: ProbeSet, row: int,
                image_transform: Callable[[np.ndarray], np.ndarray] | None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  sh, sw = probe.seg_size
  pixels = np.zeros((probe.max_layers, sh, sw), np.int32)
  scalars = np.zeros((num_scalar_slots(probe),), np.int32)
  _row_labels(probe, row, pixels, scalars)
  return _row_image(probe, row, image_transform), pixels, scalars


def iterate_batches(
    probe: ProbeSet,
    batch_size: int,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    pad_last: bool = False,
    num_workers: int = 2,
    prefetch: int = 2,
    progress: bool | str = True,
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[ProbeBatch]:
  """Yields the probe rows in order, in batches, decoding in background threads.

  Args:
    probe: from ``broden.load_probe``.
    batch_size: rows per batch (B).
    indices: optional row indices to load, in the order given (default: all rows).
    pad_last: pad the last batch to ``batch_size`` with zero rows (``valid`` False,
      ``index`` -1), so every batch has one shape (one compilation under ``jax.jit``).
    num_workers: decoding threads; 0 decodes in the calling thread.
    prefetch: batches decoded ahead of the one being consumed (memory holds at most
      ``prefetch + 1`` batches besides those the caller keeps).
    progress: show a tqdm bar over images; a string is used as its description; False hides it.
    image_transform: optional function applied to each decoded uint8 (H, W, 3) image in the
      worker thread; its outputs (all one shape) are stacked into ``images``.

  Yields:
    ``ProbeBatch`` per batch. Decoding errors (wrong sizes, unknown label numbers) are raised
    here as ``BrodenFormatError`` naming the file and the index.csv line.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if num_workers < 0 or prefetch < 0:
    raise ValueError(f"num_workers and prefetch must be >= 0, got {num_workers}, {prefetch}")
  batch_size = int(batch_size)
  idx = _check_indices(probe, indices)
  chunks = [idx[s:s + batch_size] for s in range(0, idx.size, batch_size)]
  desc = progress if isinstance(progress, str) else "probe images"
  bar = tqdm(total=int(idx.size), desc=desc, unit="img", disable=not progress)
  executor = (concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="nemjax-probe")
              if num_workers > 0 else None)
  pending: collections.deque = collections.deque()

  def submit(chunk: np.ndarray) -> None:
    if executor is None:
      pending.append((chunk, None))
    else:
      pending.append((chunk, [executor.submit(_decode_row, probe, int(r), image_transform)
                              for r in chunk]))

  try:
    next_chunk = 0
    while pending or next_chunk < len(chunks):
      while next_chunk < len(chunks) and len(pending) < prefetch + 1:
        submit(chunks[next_chunk])
        next_chunk += 1
      chunk, futures = pending.popleft()
      if futures is None:
        rows = [_decode_row(probe, int(r), image_transform) for r in chunk]
      else:
        rows = [f.result() for f in futures]
      # Keep the workers busy while the caller consumes this batch.
      while next_chunk < len(chunks) and len(pending) < prefetch:
        submit(chunks[next_chunk])
        next_chunk += 1
      yield _assemble(rows, chunk, batch_size if pad_last else len(chunk))
      bar.update(len(chunk))
  finally:
    for _, futures in pending:
      for f in futures or ():
        f.cancel()
    if executor is not None:
      executor.shutdown(wait=True, cancel_futures=True)
    bar.close()


def _assemble(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], chunk: np.ndarray,
              size: int) -> ProbeBatch:
  n = len(rows)
  first_image, first_pixels, first_scalars = rows[0]
  images = np.zeros((size,) + first_image.shape, first_image.dtype)
  pixels = np.zeros((size,) + first_pixels.shape, np.int32)
  scalars = np.zeros((size,) + first_scalars.shape, np.int32)
  for b, (image, pix, sca) in enumerate(rows):
    if image.shape != first_image.shape:
      raise ValueError(
          f"image_transform returned shape {image.shape} for row {int(chunk[b])} but "
          f"{first_image.shape} for row {int(chunk[0])}; all outputs must share one shape")
    images[b], pixels[b], scalars[b] = image, pix, sca
  index = np.full((size,), -1, np.int32)
  index[:n] = chunk
  valid = np.zeros((size,), bool)
  valid[:n] = True
  return ProbeBatch(images, pixels, scalars, index, valid)


def _map(fn: Callable, rows: np.ndarray, num_workers: int) -> list:
  if num_workers <= 0 or rows.size <= 1:
    return [fn(int(r)) for r in rows]
  with concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="nemjax-probe") as ex:
    return list(ex.map(fn, (int(r) for r in rows)))


def load_labels(
    probe: ProbeSet,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    num_workers: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the labels of some rows (no images).

  Args:
    probe: from ``broden.load_probe``.
    indices: row indices (default: all rows), order kept.
    num_workers: decoding threads (0: the calling thread).

  Returns:
    (pixels int32 (n, K, sh, sw), scalars int32 (n, S)), laid out as in ``ProbeBatch``.
  """
  idx = _check_indices(probe, indices)
  sh, sw = probe.seg_size
  pixels = np.zeros((idx.size, probe.max_layers, sh, sw), np.int32)
  scalars = np.zeros((idx.size, num_scalar_slots(probe)), np.int32)

  def fill(j: int) -> None:
    _row_labels(probe, int(idx[j]), pixels[j], scalars[j])

  _map(fill, np.arange(idx.size), num_workers)
  return pixels, scalars


def load_images(
    probe: ProbeSet,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    num_workers: int = 2,
) -> np.ndarray:
  """Decodes the images of some rows.

  Args:
    probe: from ``broden.load_probe``.
    indices: row indices (default: all rows), order kept.
    num_workers: decoding threads (0: the calling thread).

  Returns:
    uint8 (n, H, W, 3).
  """
  idx = _check_indices(probe, indices)
  h, w = probe.image_size
  images = np.zeros((idx.size, h, w, 3), np.uint8)

  def fill(j: int) -> None:
    images[j] = _row_image(probe, int(idx[j]), None)

  _map(fill, np.arange(idx.size), num_workers)
  return images
