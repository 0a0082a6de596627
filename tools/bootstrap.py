"""Create or reuse the project's virtual environment and re-run the caller inside it.

Used by the README's two commands so that a fresh machine with only Python needs no
other set-up step::

    from tools.bootstrap import ensure_env
    ensure_env(extras=("experiments",))   # returns when already inside a ready venv

The venv lives in ``$NEMJAX_VENV`` (default ``<repo>/.venv``). A stamp file records the
hash of ``pyproject.toml`` and the extras installed; a change re-installs.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _venv_dir() -> Path:
  return Path(os.environ.get("NEMJAX_VENV", REPO / ".venv")).resolve()


def _venv_python(venv: Path) -> Path:
  return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _stamp_text(extras: tuple[str, ...]) -> str:
  digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
  return f"{digest} {','.join(sorted(extras))}\n"


def _installed_extras(stamp: Path) -> tuple[str, set[str]]:
  if not stamp.exists():
    return "", set()
  digest, _, extras = stamp.read_text().strip().partition(" ")
  return digest, set(filter(None, extras.split(",")))


def ensure_env(extras: tuple[str, ...] = ()) -> None:
  """Make sure the venv exists with ``nemjax[extras]`` installed; exec into it if needed."""
  venv = _venv_dir()
  python = _venv_python(venv)
  stamp = venv / ".nemjax-stamp"
  wanted = set(extras)
  digest_now = _stamp_text(()).split()[0]
  digest, have = _installed_extras(stamp)
  if not (python.exists() and digest == digest_now and wanted <= have):
    all_extras = tuple(sorted(wanted | (have if digest == digest_now else set())))
    print(f"[nemjax] setting up {venv} with extras {list(all_extras)} (one-time) ...", flush=True)
    if not python.exists():
      subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
      subprocess.check_call([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    spec = f"{REPO}[{','.join(all_extras)}]" if all_extras else str(REPO)
    subprocess.check_call([str(python), "-m", "pip", "install", "-q", "-e", spec])
    stamp.write_text(_stamp_text(all_extras))
  if Path(sys.prefix).resolve() != venv:
    os.execv(str(python), [str(python), *sys.argv])
