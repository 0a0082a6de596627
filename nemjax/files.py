"""Atomic file writes, whole-directory replacement and run records, shared by every writer.

Files are written to a temporary sibling and renamed into place (:func:`atomic_write_bytes`,
:func:`atomic_write_text`, :func:`write_json`), so a kill never leaves a half-written file.
A run's settings are pinned in a JSON record (:func:`claim_record`): a later run with other
settings in the same place is refused instead of mixing results.

A directory is first written completely under a temporary name next to its destination, then
swapped in with :func:`replace_dir`. A kill at any moment leaves either the old directory at the
destination, the new one, or — between the two renames of a swap — the old one moved aside
under ``.<name>.old-*/dir``, which :func:`moved_aside` finds so a reader can still recover it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_json", "check_record",
           "claim_record", "new_temp_dir", "replace_dir", "moved_aside"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
  """Writes ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

  ``fsync=False`` skips flushing to the disk before the rename (for many small derived files,
  e.g. report thumbnails: a crash can lose them but never leaves one half-written).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def _json_default(o: Any) -> Any:
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """``obj`` as indented JSON (NumPy scalars/arrays and paths allowed), written atomically."""
  atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def check_record(path: str | os.PathLike, record: Mapping[str, Any], *, what: str = "results",
                 remedy: str = "use another --out or delete it") -> None:
  """ValueError if the JSON record at ``path`` exists and differs from ``record`` (naming the
  differing keys, stored vs requested). Reads only."""
  path = Path(path)
  if not path.exists():
    return
  old = json.loads(path.read_text())
  new = json.loads(json.dumps(dict(record), default=_json_default))
  if old != new:
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}
    raise ValueError(f"{path.parent} holds {what} of another configuration (see {path}; "
                     f"stored vs requested: {diff}); {remedy}")


def claim_record(path: str | os.PathLike, record: Mapping[str, Any], **kwargs: str) -> None:
  """:func:`check_record`, then writes ``record`` to ``path`` if it is not there yet."""
  check_record(path, record, **kwargs)
  if not Path(path).exists():
    write_json(path, dict(record))


def new_temp_dir(dest: str | os.PathLike) -> Path:
  """An empty directory next to ``dest`` (same file system) to build its new contents in."""
  dest = Path(dest).absolute()
  dest.parent.mkdir(parents=True, exist_ok=True)
  return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Move the complete directory ``new`` to ``dest``, replacing an existing ``dest``.

  The old ``dest`` is first renamed aside (``.<name>.old-*/dir``), then ``new`` is renamed into
  place, then the old one is deleted; both renames are atomic on one file system.
  """
  new, dest = Path(new), Path(dest).absolute()
  if dest.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / "dir")
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(new, dest)


def moved_aside(dest: str | os.PathLike) -> Path | None:
  """The newest copy of ``dest`` that a swap interrupted by a kill left moved aside, if any."""
  dest = Path(dest).absolute()
  found = [p / "dir" for p in dest.parent.glob(f".{dest.name}.old-*") if (p / "dir").is_dir()]
  return max(found, key=lambda p: p.stat().st_mtime) if found else None
