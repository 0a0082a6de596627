"""Atomic file writes, whole-directory replacement and run records, shared by every writer.

Files are written to a temporary sibling and renamed into place (:func:`atomic_write_bytes`,
:func:`atomic_write_text`, :func:`write_json`), so a kill never leaves a half-written file.
A run's settings are pinned in a JSON record (:func:`claim_record`): a later run with other
settings in the same place is refused instead of mixing results.

A directory is first written completely under a temporary name next to its destination, then
swapped in with :func:`replace_dir`. A kill at any moment leaves either the old directory at the
destination, the new one, or — between the two renames of a swap — the old one moved aside
under ``.<name>.old-*/dir``, which :func:`moved_aside` finds so a reader can still recover it.

Files follow the process umask (as ``open`` would), not ``mkstemp``'s 0600. A run that writes
into an output directory first takes :func:`output_lock` (an advisory ``fcntl.flock`` on
``<dir>/.nemjax.lock``: a second concurrent run is refused), then removes the temporary files a
killed run left behind (:func:`remove_stale_temps`). :func:`check_output_dir` checks, before any
work, that the directory can be created and written and that the disk has room.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_json", "check_record",
           "claim_record", "new_temp_dir", "replace_dir", "moved_aside", "check_output_dir",
           "output_lock", "remove_stale_temps", "OutputError", "disk_full_error"]

LOCK_NAME = ".nemjax.lock"
# What this module's writers leave behind when killed: ".<name>.<random>.tmp" files,
# ".<name>.tmp-<random>" directories (new_temp_dir) and ".<name>.old-<random>" (replace_dir).
_STALE = re.compile(r"^\..+\.(tmp|tmp-[A-Za-z0-9_]+|old-[A-Za-z0-9_]+)$")


class OutputError(ValueError):
  """An output location that cannot be used (not a directory, not writable, full, locked)."""


def _umask() -> int:
  """The process umask, read without changing it (Linux), else by setting it back at once."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


def disk_full_error(path: str | os.PathLike, e: BaseException) -> "OutputError":
  """The one-line error for a write of ``path`` that ran out of disk space (``e`` the cause)."""
  reason = getattr(e, "strerror", None) or "No space left on device"
  return OutputError(f"cannot write {path}: the disk is full ({reason}); the previous complete "
                     "results are untouched — free some space and run the same command again")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
  """Writes ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

  ``fsync=False`` skips flushing to the disk before the rename (for many small derived files,
  e.g. report thumbnails: a crash can lose them but never leaves one half-written).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    Path(tmp).unlink(missing_ok=True)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise disk_full_error(path, e) from e
    raise
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
    old, new = _flatten(old), _flatten(new)
    missing = object()
    diff = "; ".join(f"{k}: stored {old.get(k, missing)!r}, requested {new.get(k, missing)!r}"
                     .replace(repr(missing), "(none)")
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    raise ValueError(f"{path.parent} holds {what} of another configuration ({diff}); {remedy}")


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
  flat: dict[str, Any] = {}
  for k, v in record.items():
    if isinstance(v, Mapping) and v:
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def claim_record(path: str | os.PathLike, record: Mapping[str, Any], **kwargs: str) -> None:
  """:func:`check_record`, then writes ``record`` to ``path`` if it is not there yet."""
  check_record(path, record, **kwargs)
  if not Path(path).exists():
    write_json(path, dict(record))


def new_temp_dir(dest: str | os.PathLike) -> Path:
  """An empty directory next to ``dest`` (same file system) to build its new contents in."""
  dest = Path(dest).absolute()
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


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


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out",
                     expected_bytes: int = 0, margin: float = 1.5) -> Path:
  """Checks, before any work, that ``path`` is (or can be created as) a writable directory on
  a disk with room for ``expected_bytes`` x ``margin``. Creates nothing.

  Raises:
    OutputError: naming ``flag`` and the problem, in one line.
  """
  path = Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise OutputError(f"{flag} {path}: exists and is not a directory")
  parent = path
  while not parent.exists():  # the nearest existing ancestor is where it would be created
    parent = parent.parent
  if not parent.is_dir():
    raise OutputError(f"{flag} {path}: cannot be created, {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"{flag} {path}: {parent} is not writable")
  free = shutil.disk_usage(parent).free
  need = int(expected_bytes * margin)
  if need and free < need:
    raise OutputError(f"{flag} {path}: {free / 2**20:.0f} MiB free on its disk, the run needs "
                      f"about {need / 2**20:.0f} MiB")
  return path


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
  """Removes what killed writers of this module left under ``directory`` (its own temp files
  and directories, at any depth; never other files); call it while holding :func:`output_lock`.
  Returns what it removed."""
  directory = Path(directory)
  removed: list[Path] = []
  if not directory.is_dir():
    return removed
  for root, dirs, names in os.walk(directory):
    for name in list(dirs) + names:
      p = Path(root) / name
      if not _STALE.match(name) or name == LOCK_NAME:
        continue
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
        dirs.remove(name)
      else:
        p.unlink(missing_ok=True)
      removed.append(p)
  return removed


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, *, flag: str = "--out",
                name: str = LOCK_NAME) -> Iterator[Path]:
  """Holds an exclusive advisory lock on ``directory`` (created if needed) for a run
  (``name``: the lock file; one process of a multi-process run other than process 0 takes
  its own).

  Raises:
    OutputError: another process holds it (a second run on the same output is refused).
  """
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  lock = directory / name
  fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
      raise OutputError(f"{flag} {directory}: another nemjax run (pid {holder}) is writing "
                        "there; wait for it to finish or choose another output") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
      yield directory
    finally:
      os.ftruncate(fd, 0)  # released: the (kept, reused) lock file names no holder
  finally:
    os.close(fd)  # closing releases the lock
