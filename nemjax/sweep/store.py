"""A resumable results table: rows keyed by a tuple of columns, rewritten atomically.

A SIGKILL at any moment leaves either the previous or the new complete file on disk.

Several processes (``jax.distributed``, :mod:`nemjax.distributed`): the processes first agree
on the finished keys (every process sends the rows it can read -- ``results.csv`` and any
``results.<i>.csv`` shard in its output directory -- to all), then each writes the rows of its
share of the work to its own shard ``results.<process>.csv`` (atomically, per finished group),
so a killed process loses at most its work in flight and a re-run, with any number of
processes, skips every key found in any shard or in ``results.csv``. At the end
(:meth:`ShardedResults.finish`) every process sends its rows to all, process 0 writes
``results.csv`` once (old rows first, then this run's in the sweep's own order, as one process
would have written them) and, after a barrier, each process removes the shards it read. The
output directory need not be shared between hosts: nothing is read from another host's disk.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nemjax import distributed
from nemjax.files import atomic_write_text, check_output_dir, check_record, claim_record

RESULTS_NAME = "results.csv"
_SHARD = re.compile(r"^results\.(\d+)\.csv$")


OUTPUT_BYTES = 64 * 2**20  # a sweep's tables, summary, plot and clean dissection stay within this


def check_out_dir(out_dir: Path, record: Mapping[str, Any], fields: Sequence[str],
                  key_fields: Sequence[str]) -> None:
  """ValueError if ``out_dir`` cannot be a writable directory, holds results of another
  configuration (``config.json``) or with other columns (``results.csv``). Reads only."""
  check_output_dir(out_dir, expected_bytes=OUTPUT_BYTES)
  check_record(Path(out_dir) / "config.json", record)
  ResultsStore(Path(out_dir) / "results.csv", fields, key_fields)


def shard_path(out_dir: Path, process: int) -> Path:
  """``out_dir/results.<process>.csv``: the rows one process of a multi-process run wrote."""
  return Path(out_dir) / f"results.{int(process)}.csv"


def _shards(out_dir: Path, fields: Sequence[str], key_fields: Sequence[str]
            ) -> list["ResultsStore"]:
  """The shard files in ``out_dir`` (any process count), in process order."""
  found = [(int(m.group(1)), p) for p in Path(out_dir).glob("results.*.csv")
           if (m := _SHARD.match(p.name))]
  return [ResultsStore(p, fields, key_fields) for _, p in sorted(found)]


def open_out_dir(out_dir: Path, record: Mapping[str, Any], fields: Sequence[str],
                 key_fields: Sequence[str], procs: distributed.Processes | None = None
                 ) -> "ResultsStore | ShardedResults":
  """The run's results in ``out_dir``, once its columns and ``config.json`` are checked;
  ``config.json`` is written if the directory is new.

  One process: a :class:`ResultsStore` of ``results.csv``, into which the shards a killed
  multi-process run left are folded first. Several processes (``procs``, default
  :func:`nemjax.distributed.current`): a :class:`ShardedResults` (every process must call this).
  """
  out_dir = Path(out_dir)
  procs = distributed.current() if procs is None else procs
  store = ResultsStore(out_dir / RESULTS_NAME, fields, key_fields)  # checks columns
  shards = _shards(out_dir, fields, key_fields)
  claim_record(out_dir / "config.json", record)
  if not procs.single:
    return ShardedResults(store, shards, procs)
  if shards:
    store.add([r for sh in shards for r in sh.rows if not store.done(**r)])
    for sh in shards:
      sh.path.unlink(missing_ok=True)
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
    self._write()

  def _write(self) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, self.fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(self.rows)
    atomic_write_text(self.path, buf.getvalue())

  def finish(self, order: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    """Every row (one process: the file is already complete; ``order`` is not used)."""
    return self.rows


class ShardedResults:
  """The results of one process of a multi-process run (see the module docstring): ``done``
  / ``get`` see every process's finished keys as they were at the start, ``add`` writes this
  process's shard, ``finish`` (every process) gathers all rows and process 0 writes
  ``results.csv``."""

  def __init__(self, merged: ResultsStore, shards: Sequence[ResultsStore],
               procs: distributed.Processes):
    self.merged, self.procs = merged, procs
    self.fields, self.key_fields = merged.fields, merged.key_fields
    mine = shard_path(merged.path.parent, procs.index)
    self.mine = next((sh for sh in shards if sh.path == mine), None) or ResultsStore(
        mine, self.fields, self.key_fields)
    self._read = [merged, *shards]  # this process's files; their rows go to every process
    self.rows = self._union(distributed.allgather_objects(self._local_rows(), procs))
    self._by_key = {merged._key(r): r for r in self.rows}

  def _local_rows(self) -> list[dict[str, str]]:
    seen = [sh for sh in self._read if sh is not self.mine] + [self.mine]
    return [r for sh in seen for r in sh.rows]

  def _union(self, parts: Sequence[Sequence[dict[str, str]]]) -> list[dict[str, str]]:
    """Rows of every part, the first of each key (in process order), as ``results.csv``'s
    rows come first."""
    out, keys = [], set()
    for part in parts:
      for r in part:
        key = self.merged._key(r)
        if key not in keys:
          keys.add(key)
          out.append(r)
    return out

  def done(self, **key: Any) -> bool:
    """Whether some process had the row of ``key`` when the run started (or this one added it)."""
    return self.get(**key) is not None

  def get(self, **key: Any) -> dict[str, str] | None:
    """The row (strings) of ``key`` as known to this process, or None."""
    return self._by_key.get(tuple(_fmt(key[k]) for k in self.key_fields))

  def add(self, rows: Iterable[dict[str, Any]]) -> None:
    """Appends rows to this process's shard (atomic rewrite)."""
    rows = list(rows)
    self.mine.add(rows)
    new = self.mine.rows[len(self.mine.rows) - len(rows):]
    self.rows.extend(new)
    self._by_key.update((self.merged._key(r), r) for r in new)

  def finish(self, order: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    """Every row of every process, on every process (a collective). Process 0 writes them to
    ``results.csv``: rows of keys outside ``order`` first (earlier runs, in their order), then
    those of ``order`` (this run's keys, as one process would have written them); after a
    barrier each process removes the shard files it read."""
    rows = self._union(distributed.allgather_objects(self._local_rows(), self.procs))
    rank = {tuple(_fmt(k[f]) for f in self.key_fields): i for i, k in enumerate(order)}
    key = self.merged._key
    rows = ([r for r in rows if key(r) not in rank]
            + sorted((r for r in rows if key(r) in rank), key=lambda r: rank[key(r)]))
    if self.procs.leader:
      self.merged.rows = rows
      self.merged._write()
    distributed.barrier("nemjax results.csv written", self.procs)
    for sh in self._read[1:] + [self.mine]:
      sh.path.unlink(missing_ok=True)
    self.rows = rows
    self._by_key = {key(r): r for r in rows}
    return rows


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, bool):
    return str(int(v))
  return str(v)
