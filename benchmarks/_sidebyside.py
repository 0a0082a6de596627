"""What the JAX-vs-PyTorch benchmarks share: their common flags, process set-up (XLA flags
before JAX starts, PyTorch threads and denormals), and interleaved best-of timing."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def add_common_args(p: argparse.ArgumentParser, min_seconds: float) -> None:
  """--threads, --min-seconds, --min-reps, --xla-flags, --out."""
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--min-seconds", type=float, default=min_seconds, help="per side and arch")
  p.add_argument("--min-reps", type=int, default=5)
  p.add_argument("--xla-flags", default=None, help="value for XLA_FLAGS (set before importing jax)")
  p.add_argument("--out", default=None, help="also write the markdown table to this file")


def set_up(args: argparse.Namespace, flush_denormal: bool = True) -> None:
  """XLA_FLAGS and the CPU platform before JAX is imported; PyTorch's threads and denormal mode
  (XLA:CPU flushes denormals; random-weight PyTorch models otherwise hit them and run ~2x
  slower, which would flatter JAX); ``tests/`` on ``sys.path`` for the PyTorch twins."""
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(REPO / "tests"))
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  torch.set_flush_denormal(flush_denormal)


def interleaved_best(calls: dict[str, Callable[[], float]], min_reps: int,
                     min_seconds: float, settle: int = 1) -> dict[str, float]:
  """Best (minimum) seconds of each call, the sides taking turns (so load from other processes
  hits every side alike) until each ran ``min_reps`` timed calls and ``min_seconds``.

  Each turn first makes ``settle`` untimed calls of that side, then one timed call. Without
  them a side's timed call would start while the other side's worker threads still spin:
  PyTorch's OpenMP (libgomp) threads busy-wait after each parallel region, and a JAX call
  timed right after a PyTorch call ran up to 35 % slower than back to back (a ResNet18 basic
  block, 2 cores: 13.0 against 9.8 ms), while PyTorch lost about 5 %. So the figures are
  back-to-back times, as a user who runs one library sees them.

  Each callable runs once and returns its own wall time in seconds."""
  times: dict[str, list[float]] = {name: [] for name in calls}
  while (min(len(v) for v in times.values()) < min_reps
         or min(sum(v) for v in times.values()) < min_seconds):
    for name, call in calls.items():
      for _ in range(settle):
        call()
      times[name].append(call())
  return {name: min(v) for name, v in times.items()}


def timed(fn: Callable[[], object]) -> Callable[[], float]:
  """``fn`` wrapped to return its wall time (``fn`` must block until its work is done)."""
  def run() -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
  return run


def emit(lines: list[str], out: str | None) -> None:
  """Prints the markdown table and, with ``out``, writes it there too."""
  table = "\n".join(lines)
  print(table)
  if out:
    Path(out).write_text(table + "\n")
