"""Shared start-up for the experiment scripts: venv bootstrap, error reporting."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from tools.bootstrap import ensure_env  # noqa: E402


def bootstrap() -> None:
  """Re-runs the calling script inside the project venv (created on first use)."""
  ensure_env(extras=("experiments",))


def fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
