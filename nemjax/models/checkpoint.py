"""Orbax checkpoints of nemjax models: ``OUT_DIR/state/`` (params + batch stats) + ``OUT_DIR/metadata.json``.

::

  from nemjax.models import checkpoint
  checkpoint.save(model, "runs/resnet18_places", arch="resnet18", num_classes=365)
  model = checkpoint.load("runs/resnet18_places")

``metadata.json`` holds ``{"format": "nemjax-model", "format_version": 1, "arch", "num_classes",
"nemjax_version", "extra": {...}}``. Writes are atomic: everything is written into a temporary
directory next to OUT_DIR and renamed into place at the end, so a failed save leaves nothing at
OUT_DIR (and an existing OUT_DIR untouched unless the new one is complete).
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import sys
import threading
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from nemjax import files
from nemjax.models import registry

__all__ = ["save", "load", "read_metadata", "FORMAT", "FORMAT_VERSION"]

FORMAT = "nemjax-model"
FORMAT_VERSION = 1
_META = "metadata.json"
_STATE = "state"


def _version() -> str:
  import nemjax  # the package root; imported lazily to keep the import graph one-way at load time
  return getattr(nemjax, "__version__", "unknown")


_ORBAX_MARKS = ("orbax", "tensorstore", "TensorStore", "OCDBT")


def _is_orbax_leftover(exc: BaseException | None, obj: Any = None) -> bool:
  """A report from a failed restore's leftovers: orbax's read coroutines, or the threads that
  post TensorStore results to orbax's closed event loop."""
  code = getattr(obj, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


class _OrbaxTaskReportFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" reports of orbax's reads (logged when a
  failed restore's sibling tasks and futures are collected); every other asyncio record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "never retrieved" not in message:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    tb = exc.__traceback__ if exc is not None else None
    files = " ".join(f.filename for f in traceback.extract_tb(tb)) if tb is not None else ""
    return not any(mark in message or mark in files for mark in _ORBAX_MARKS)


def _quiet_orbax_leftovers() -> None:
  """When one array of a restore fails, orbax leaves the other arrays' reads behind: coroutines,
  tasks and futures whose errors nobody retrieves, and TensorStore threads that post to orbax's
  closed event loop. Python reports each of them with a traceback -- as an unraisable error, a
  thread error, an asyncio log record or a "never awaited" warning -- during the restore, when
  they are collected, or at exit. Installed (once) before a restore, this drops only the reports
  of such leftovers; every other report still reaches the previous hooks, and the one error that
  matters is raised to the caller."""
  if getattr(sys.unraisablehook, "_nemjax_filter", False):
    return
  logging.getLogger("asyncio").addFilter(_OrbaxTaskReportFilter())
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=r"coroutine '_read_array_index_and_device_put' was never awaited")
  prev_unraisable, prev_thread = sys.unraisablehook, threading.excepthook

  def unraisable(u):
    if not _is_orbax_leftover(u.exc_value, u.object):
      prev_unraisable(u)

  def thread(args):
    if not _is_orbax_leftover(args.exc_value):
      prev_thread(args)
  unraisable._nemjax_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook, threading.excepthook = unraisable, thread


def _collect_orphaned_reads() -> None:
  """Collects a failed restore's leftover reads now (see ``_quiet_orbax_leftovers``), with every
  unraisable report of the collection dropped."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def save_arrays(path: Path, tree: Any) -> None:
  """Writes the pytree of arrays ``tree`` as an orbax checkpoint at ``path`` (a new directory;
  callers build it under a temporary name and swap it in) and waits until it is complete."""
  try:
    with _checkpointer() as ckptr:
      ckptr.save(path, tree)
      ckptr.wait_until_finished()
  except Exception as e:  # orbax wraps I/O errors in its own types
    if "No space left on device" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
      raise files.disk_full_error(path, e) from e
    raise


def restore_arrays(path: Path, target: Any, *, what: str, remedy: str) -> Any:
  """Restores the orbax pytree at ``path`` shaped like ``target`` (``jax.ShapeDtypeStruct``
  leaves); any failure is one ValueError line naming ``what`` and ``remedy``."""
  _quiet_orbax_leftovers()  # a failed read's siblings report during the restore, later or at exit
  try:
    with _checkpointer() as ckptr:  # closed (its threads stopped) even when the read fails
      return ckptr.restore(path, target)
  except Exception as e:  # orbax raises many types; report one clear line
    _collect_orphaned_reads()
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"cannot restore {what}: {type(e).__name__}: {first} (the files are "
                     f"damaged or incomplete: {remedy})") from e


def _checkpointer():
  import orbax.checkpoint as ocp  # slow import, only when checkpoints are used
  return ocp.StandardCheckpointer()


def save(model: nnx.Module, out_dir: str | os.PathLike, *, arch: str, num_classes: int,
         extra_meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
  """Write ``model``'s params and batch statistics to ``out_dir`` atomically.

  Args:
    model: a nemjax model (``model.arch`` and ``model.num_classes`` must match arch / num_classes).
    out_dir: the checkpoint directory to create.
    arch: architecture name, one of ``nemjax.models.ARCHS``.
    num_classes: size of the model's output layer.
    extra_meta: JSON-serialisable extra metadata, stored under ``"extra"``.
    overwrite: replace an existing ``out_dir`` (only once the new checkpoint is complete).

  Returns:
    The absolute path of the checkpoint directory.
  """
  if arch not in registry.ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(registry.ARCHS)}")
  m_arch, m_classes = getattr(model, "arch", None), getattr(model, "num_classes", None)
  if m_arch != arch or m_classes != num_classes:
    raise ValueError(f"checkpoint.save: model is {m_arch!r} with {m_classes} classes, but arch={arch!r}, num_classes={num_classes}")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "num_classes": int(num_classes),
          "nemjax_version": _version(), "extra": dict(extra_meta or {})}
  try:
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"checkpoint.save: extra_meta is not JSON-serialisable: {e}") from e
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"checkpoint directory already exists: {out} (pass overwrite=True to replace it)")
  tmp = files.new_temp_dir(out)
  try:
    save_arrays(tmp / _STATE, nnx.to_pure_dict(nnx.state(model)))
    (tmp / _META).write_text(meta_text + "\n")
    files.replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  """``metadata.json`` of a checkpoint; FileNotFoundError / ValueError if it is not one."""
  d = Path(ckpt_dir)
  if not d.exists():
    raise FileNotFoundError(f"checkpoint directory not found: {d}")
  if not d.is_dir():
    raise ValueError(f"not a nemjax checkpoint: {d} is a file, expected a directory")
  meta_path = d / _META
  if not meta_path.is_file():
    raise ValueError(f"not a nemjax checkpoint: {d} has no {_META}")
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"not a nemjax checkpoint: cannot parse {meta_path}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"not a nemjax checkpoint: {meta_path} has no \"format\": \"{FORMAT}\"")
  for key in ("arch", "num_classes"):
    if key not in meta:
      raise ValueError(f"corrupt nemjax checkpoint: {meta_path} lacks {key!r}")
  return meta


def load(ckpt_dir: str | os.PathLike, *, arch: str | None = None) -> nnx.Module:
  """Rebuild the model saved in ``ckpt_dir``.

  Args:
    ckpt_dir: a directory written by :func:`save` (or ``python -m nemjax.convert``).
    arch: if given, the architecture the checkpoint must hold (ValueError otherwise).

  Returns:
    The model with the saved params and batch statistics (float32 ``jax.Array`` leaves).
  """
  d = Path(ckpt_dir).absolute()
  meta = read_metadata(d)
  if arch is not None and meta["arch"] != arch:
    raise ValueError(f"checkpoint {d} holds arch {meta['arch']!r}, expected {arch!r}")
  if meta["arch"] not in registry.ARCHS:
    raise ValueError(f"checkpoint {d} has unknown arch {meta['arch']!r}; this nemjax knows {', '.join(registry.ARCHS)}")
  if not (d / _STATE).is_dir():
    raise ValueError(f"corrupt nemjax checkpoint: {d} has no {_STATE}/ directory")
  abstract = registry.build_abstract(meta["arch"], int(meta["num_classes"]))
  graphdef, state = nnx.split(abstract)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), nnx.to_pure_dict(state))
  restored = restore_arrays(
      d / _STATE, target,
      what=f"checkpoint {d} as {meta['arch']} with {meta['num_classes']} classes",
      remedy="convert or train it again; a cached embedded default is rebuilt once its "
             "directory is deleted")
  got = jax.tree.map(np.shape, restored)
  want = jax.tree.map(np.shape, nnx.to_pure_dict(state))
  if got != want:
    raise ValueError(f"checkpoint {d}: restored arrays do not match {meta['arch']} with {meta['num_classes']} classes")
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
