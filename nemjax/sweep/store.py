"""A resumable results table: rows keyed by a tuple of columns, rewritten atomically.

A SIGKILL at any moment leaves either the previous or the new complete file on disk.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nemjax.files import atomic_write_text, check_output_dir, check_record, claim_record


OUTPUT_BYTES = 64 * 2**20  # a sweep's tables, summary, plot and clean dissection stay within this


def check_out_dir(out_dir: Path, record: Mapping[str, Any], fields: Sequence[str],
                  key_fields: Sequence[str]) -> None:
  """ValueError if ``out_dir`` cannot be a writable directory, holds results of another
  configuration (``config.json``) or with other columns (``results.csv``). Reads only."""
  check_output_dir(out_dir, expected_bytes=OUTPUT_BYTES)
  check_record(Path(out_dir) / "config.json", record)
  ResultsStore(Path(out_dir) / "results.csv", fields, key_fields)


def open_out_dir(out_dir: Path, record: Mapping[str, Any], fields: Sequence[str],
                 key_fields: Sequence[str]) -> "ResultsStore":
  """The run's :class:`ResultsStore` in ``out_dir``, once its columns and ``config.json`` are
  checked; ``config.json`` is written if the directory is new."""
  store = ResultsStore(Path(out_dir) / "results.csv", fields, key_fields)  # checks columns
  claim_record(Path(out_dir) / "config.json", record)
  return store


class ResultsStore:
  """Rows of ``fields`` in a CSV file; ``key_fields`` identify a finished piece of work."""

  def __init__(self, path: Path, fields: Sequence[str], key_fields: Sequence[str]):
    self.path = Path(path)
    self.fields = list(fields)
    self.key_fields = list(key_fields)
    self.rows: list[dict[str, str]] = []
    if self.path.exists():
      with open(self.path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != self.fields:
          raise ValueError(
              f"{self.path}: existing results have columns {reader.fieldnames}, expected "
              f"{self.fields}; use another output directory")
        self.rows = list(reader)
    self._by_key = {self._key(r): r for r in self.rows}

  def _key(self, row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_fmt(row[k]) for k in self.key_fields)

  def done(self, **key: Any) -> bool:
    """Whether the row of ``key`` (every key field, as values or their CSV strings) exists."""
    return self.get(**key) is not None

  def get(self, **key: Any) -> dict[str, str] | None:
    """The stored row (strings) of ``key``, or None."""
    return self._by_key.get(tuple(_fmt(key[k]) for k in self.key_fields))

  def add(self, rows: Iterable[dict[str, Any]]) -> None:
    """Appends rows and rewrites the file atomically."""
    new = [{k: _fmt(r[k]) for k in self.fields} for r in rows]
    self.rows.extend(new)
    self._by_key.update((self._key(r), r) for r in new)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, self.fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(self.rows)
    atomic_write_text(self.path, buf.getvalue())


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, bool):
    return str(int(v))
  return str(v)
