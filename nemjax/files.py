"""Atomic replacement of whole directories (checkpoints), shared by every writer in nemjax.

A directory is first written completely under a temporary name next to its destination, then
swapped in with :func:`replace_dir`. A kill at any moment leaves either the old directory at the
destination, the new one, or — between the two renames of a swap — the old one moved aside
under ``.<name>.old-*/dir``, which :func:`moved_aside` finds so a reader can still recover it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["new_temp_dir", "replace_dir", "moved_aside"]


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
