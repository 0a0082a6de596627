"""matplotlib on the non-interactive Agg backend, and atomic PNG writes, for every report figure.

matplotlib is imported only when a figure is drawn (it is an optional ``experiments`` extra)::

  plt = figures.pyplot()
  fig, ax = plt.subplots()
  ...
  figures.save_png(fig, out_dir / "plot.png", dpi=110)
"""
from __future__ import annotations

import io
import os
from typing import Any

from nemjax.files import atomic_write_bytes

__all__ = ["pyplot", "save_png", "save_grid"]


def pyplot() -> Any:
  """``matplotlib.pyplot`` with the Agg backend selected (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
  """Render ``fig`` to PNG, close it, and write ``path`` atomically (temp file + rename)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  pyplot().close(fig)
  atomic_write_bytes(path, buf.getvalue())


def save_grid(fig: Any, axes: Any, path: str | os.PathLike, title: str, dpi: int = 90) -> None:
  """An image grid's finish: no ticks on any of ``axes`` (an array of axes), ``title`` above,
  tight layout, :func:`save_png`."""
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  save_png(fig, path, dpi=dpi)
