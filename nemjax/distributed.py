"""Several processes under ``jax.distributed`` (JAX's multi-controller runtime): who this
process is, which probe rows it loads, and exact exchange of host data between processes.

nemjax never starts processes or schedules work itself: every process runs the same program
(``experiments/*.py --coordinator HOST:PORT --num-processes N --process-id I`` calls
:func:`initialize`), loads its own contiguous shard of the probe rows (:func:`shard_rows`) and
meets the others only in the collectives below. With one process (no ``jax.distributed``)
every function here is the identity, so single-process runs are unchanged.

Host data travels as bytes: :func:`allgather_objects` pickles any Python object (NumPy arrays,
NamedTuple states, rows), sends the bytes through ``multihost_utils.process_allgather`` as a
``uint8`` array and unpickles them, so every value arrives bit for bit (``process_allgather``
alone would turn int64 / float64 into 32 bits unless x64 is on). Byte buffers are padded to a
power of two (at most :data:`CHUNK_BYTES`) and sent in chunks of at most that size, so few
programs are compiled and no collective grows with the data.

CPU: JAX 0.10 does cross-process collectives on the CPU backend with Gloo by default
(``jax_cpu_collectives_implementation='gloo'``, the default since 0.4.3x); nothing else is
needed. One machine can test N processes with a localhost coordinator, each with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` devices.

Example (every process)::

  distributed.initialize("host0:12355", num_processes=2, process_id=i)
  rows = distributed.shard_rows(probe.num_images)          # this process's rows
  parts = distributed.allgather_objects(local_state)       # [state of process 0, 1, ...]
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np

__all__ = ["Processes", "current", "initialize", "check_launch", "shard_rows",
           "allgather_objects", "combine", "combine_dicts", "fill_rows", "barrier", "split_work",
           "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 26
"""Largest byte buffer of one collective (64 MiB); larger payloads go in several."""
_MIN_BYTES = 1 << 10

T = TypeVar("T")


class Processes(NamedTuple):
  """This process's place among the processes of a run."""
  index: int  # jax.process_index()
  count: int  # jax.process_count()

  @property
  def single(self) -> bool:
    """Whether this is the only process (every exchange is the identity)."""
    return self.count == 1

  @property
  def leader(self) -> bool:
    """Whether this process writes the run's shared files (process 0)."""
    return self.index == 0


def current() -> Processes:
  """The running processes as JAX's runtime knows them (``Processes(0, 1)`` without
  ``jax.distributed``)."""
  import jax  # pylint: disable=import-outside-toplevel
  return Processes(int(jax.process_index()), int(jax.process_count()))


def check_launch(coordinator: str | None, num_processes: int, process_id: int) -> None:
  """ValueError ``"field: ..."`` for the first bad launch setting (no process is started).

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordinator (None: one process).
    num_processes: N >= 1; > 1 needs ``coordinator``.
    process_id: this process's index in [0, N).
  """
  if isinstance(num_processes, bool) or int(num_processes) != num_processes or num_processes < 1:
    raise ValueError(f"num_processes: must be an integer >= 1, got {num_processes!r}")
  if isinstance(process_id, bool) or int(process_id) != process_id \
      or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id: must lie in [0, {num_processes}) (num_processes = "
                     f"{num_processes}), got {process_id!r}")
  if coordinator is None:
    if num_processes > 1:
      raise ValueError("coordinator: HOST:PORT of process 0 is needed with num_processes > 1")
    return
  host, sep, port = str(coordinator).rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator: must be HOST:PORT with a port in 1..65535, got "
                     f"{coordinator!r}")


def initialize(coordinator: str | None, num_processes: int = 1, process_id: int = 0,
               *, timeout_s: int = 300) -> Processes:
  """Joins the run: ``jax.distributed.initialize`` when there are several processes (call it
  before anything else uses JAX); nothing for one process. Returns :func:`current`."""
  check_launch(coordinator, num_processes, process_id)
  if num_processes > 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
  return current()


def shard_rows(n: int, procs: Processes | None = None) -> np.ndarray:
  """(n_i,) int64: the contiguous block of rows ``0 .. n-1`` that process ``procs.index`` loads
  (sizes differ by at most one; all of them with one process)."""
  procs = current() if procs is None else procs
  lo, hi = (n * procs.index) // procs.count, (n * (procs.index + 1)) // procs.count
  return np.arange(lo, hi, dtype=np.int64)


def _pad_size(n: int) -> int:
  """Padded length of one collective's buffer: a power of two in [1 KiB, CHUNK_BYTES]."""
  return min(CHUNK_BYTES, max(_MIN_BYTES, 1 << max(0, n - 1).bit_length()))


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's ``data``, in process order (exact: ``uint8`` on the wire)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  size = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
  sizes = [int(np.frombuffer(s.tobytes(), np.int64)[0])
           for s in multihost_utils.process_allgather(size)]
  buf = np.frombuffer(data, np.uint8)
  parts: list[list[np.ndarray]] = [[] for _ in sizes]
  for start in range(0, max(sizes), CHUNK_BYTES):
    width = _pad_size(min(CHUNK_BYTES, max(sizes) - start))
    chunk = np.zeros(width, np.uint8)
    mine = buf[start:start + width]
    chunk[:mine.size] = mine
    gathered = multihost_utils.process_allgather(chunk)  # (P, width) uint8
    for p, s in enumerate(sizes):
      parts[p].append(gathered[p, :max(0, min(width, s - start))])
  return [np.concatenate(p).tobytes() if p else b"" for p in parts]


def allgather_objects(obj: Any, procs: Processes | None = None) -> list[Any]:
  """``[obj of process 0, obj of process 1, ...]`` on every process (pickled, bit-exact);
  ``[obj]`` with one process. Every process must call it, in the same order."""
  procs = current() if procs is None else procs
  if procs.single:
    return [obj]
  return [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(obj, protocol=5))]


def combine(local: T, merge: Callable[[T, T], T], procs: Processes | None = None) -> T:
  """``merge`` folded over every process's ``local`` in process order (the same result on
  every process; ``local`` itself with one process). ``merge`` of states of disjoint probe
  rows, e.g. ``quantile.threshold_merge`` or ``tally.tally_merge``, makes it exact."""
  parts = allgather_objects(local, procs)
  out = parts[0]
  for p in parts[1:]:
    out = merge(out, p)
  return out


def combine_dicts(local: dict[str, T], merge: Callable[[T, T], T],
                  procs: Processes | None = None) -> dict[str, T]:
  """:func:`combine` per key of ``{name: state}``; a process may lack a key (it saw no rows),
  the result holds every key some process has, in first-seen order."""
  out: dict[str, T] = {}
  for part in allgather_objects(local, procs):
    for k, v in part.items():
      out[k] = merge(out[k], v) if k in out else v
  return out


def fill_rows(full: np.ndarray, rows: np.ndarray, procs: Processes | None = None) -> None:
  """Completes ``full`` (n, ...) in place on every process: each holds its own probe ``rows``
  (disjoint across processes, together 0..n-1) and receives the others', in chunks of about
  :data:`CHUNK_BYTES` (``full`` may be a memmap). Nothing to do with one process."""
  procs = current() if procs is None else procs
  if procs.single:
    return
  rows = np.asarray(rows, np.int64)
  per_row = max(1, int(np.prod(full.shape[1:], dtype=np.int64)) * full.dtype.itemsize)
  step = max(1, CHUNK_BYTES // per_row)
  counts = allgather_objects(len(rows), procs)
  for s in range(0, max(counts), step):
    mine = rows[s:s + step]
    parts = allgather_objects((mine, np.asarray(full[mine])), procs)
    for p, (r, v) in enumerate(parts):
      if p != procs.index and len(r):
        full[r] = v


def barrier(name: str, procs: Processes | None = None) -> None:
  """Waits until every process has reached the barrier ``name`` (nothing with one process)."""
  procs = current() if procs is None else procs
  if not procs.single:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def split_work(items: Sequence[T], procs: Processes | None = None) -> list[T]:
  """This process's share of ``items`` (the same list on every process): every ``count``-th
  item from position ``index``, so shares differ by at most one item."""
  procs = current() if procs is None else procs
  return list(items[procs.index::procs.count])
