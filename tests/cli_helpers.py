"""In-process runs of the experiment scripts for tests: import one (venv bootstrap off) and
read the one-line error a bad flag ends it with."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def import_script(name: str) -> ModuleType:
  """``experiments/<name>.py`` as a module (its venv bootstrap disabled: the tests already run
  inside the venv)."""
  sys.path.insert(0, str(REPO / "experiments"))
  import _common  # pylint: disable=import-outside-toplevel
  real, _common.bootstrap = _common.bootstrap, lambda *a, **k: None
  try:
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / f"experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    _common.bootstrap = real
  return mod


def cli_error(mod: ModuleType, capsys, argv: list[str]) -> str:
  """The one ``error: ...`` line ``mod.main(argv)`` exits with (status 2, no traceback)."""
  with pytest.raises(SystemExit) as e:
    mod.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  lines = err.strip().splitlines()  # progress bars may come first
  assert "Traceback" not in err and lines[-1].startswith("error: "), err
  assert sum(line.startswith("error") for line in lines) == 1, err
  return lines[-1]


def parser_flags(mod: ModuleType) -> set[str]:
  """Every long flag of the script's parser (``parse_args`` run with ``--help`` captured)."""
  flags: set[str] = set()
  real = argparse.ArgumentParser.parse_args

  def grab(self, args=None, namespace=None):
    flags.update(o for a in self._actions for o in a.option_strings if o.startswith("--"))
    raise SystemExit(0)
  argparse.ArgumentParser.parse_args = grab
  try:
    with pytest.raises(SystemExit):
      mod.parse_args([])
  finally:
    argparse.ArgumentParser.parse_args = real
  return flags
