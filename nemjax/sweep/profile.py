"""Where a sweep's time goes: wall seconds per named stage, and the XLA compile seconds spent
inside each (from JAX's own compile events), so "compile" and "run" are told apart.

Example::

  timer = StageTimer()
  with timer.stage("attack"):
    x_adv = np.asarray(attack(x, units, src, tgt))   # block until done inside the stage
  print(timer.format())   # stage | calls | wall s | of which compile s | share
  write_json(path, timer.report())

Stages may nest; a nested stage's seconds are also counted in its parent's. The default
:data:`NULL_TIMER` does nothing, so library code takes ``timer=NULL_TIMER`` at no cost.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import jax

# JAX's duration events that are compilation (tracing, lowering to MLIR, XLA's compile).
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                   "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")
_compile_seconds = [0.0]  # running total of this process's compile seconds
_listening = [False]


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += seconds


def compile_seconds() -> float:
  """Seconds this process has spent compiling (tracing, lowering, XLA) since the first
  :class:`StageTimer` was made."""
  return _compile_seconds[0]


class StageTimer:
  """Accumulates ``{stage: (calls, wall s, compile s)}`` over a run."""

  def __init__(self) -> None:
    if not _listening[0]:
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      _listening[0] = True
    self.calls: dict[str, int] = {}
    self.seconds: dict[str, float] = {}
    self.compile: dict[str, float] = {}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    """Times the block as ``name`` (the block must wait for its device work to finish)."""
    t, c = time.perf_counter(), compile_seconds()
    try:
      yield
    finally:
      self.calls[name] = self.calls.get(name, 0) + 1
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
      self.compile[name] = self.compile.get(name, 0.0) + compile_seconds() - c

  def report(self, **extra) -> dict:
    """JSON-ready ``{"total_s", "stages": [{stage, calls, wall_s, compile_s}], **extra}``."""
    return {"total_s": time.perf_counter() - self._start,
            "stages": [{"stage": k, "calls": self.calls[k], "wall_s": self.seconds[k],
                        "compile_s": self.compile[k]} for k in self.seconds], **extra}

  def format(self, total: float | None = None) -> str:
    """Markdown table of the stages, shares of ``total`` (default: the timer's lifetime)."""
    total = self.report()["total_s"] if total is None else total
    lines = ["| stage | calls | wall s | of which compile s | share of total |",
             "|---|---:|---:|---:|---:|"]
    for k, s in self.seconds.items():
      lines.append(f"| {k} | {self.calls[k]} | {s:.2f} | {self.compile[k]:.2f} | "
                   f"{100 * s / max(total, 1e-9):.1f} % |")
    lines.append(f"| total | | {total:.2f} | {compile_seconds():.2f} (process) | |")
    return "\n".join(lines)


class _NullTimer(StageTimer):
  """A timer that records nothing."""

  def __init__(self) -> None:  # pylint: disable=super-init-not-called
    self.calls, self.seconds, self.compile = {}, {}, {}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    yield


NULL_TIMER = _NullTimer()
