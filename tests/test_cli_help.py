"""Every flag of every script says what it does and, where it has one, its default, in
``--help`` (the README points there for the full list)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = ["dissect", "pgd_sweep", "noise_sweep", "manipulate", "prune_defence", "convert",
           "heo_fooling", "attribute", "trojan_bench"]

# Collects each script's parser (patched parse_args) in a child process: importing a script
# bootstraps the venv and sets XLA flags, which must not leak into the test process.
_COLLECT = r"""
import argparse, importlib.util, json, sys
sys.path.insert(0, "experiments")
class Got(Exception):
  pass
def grab(self, *a, **k):
  raise Got(self)
argparse.ArgumentParser.parse_args = grab
name = sys.argv[1]
if name == "convert":
  from nemjax.convert.__main__ import main as parse
  from experiments._common import HelpFormatter
else:
  spec = importlib.util.spec_from_file_location(name, f"experiments/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  parse = module.parse_args
try:
  parse([])
except Got as got:
  parser = got.args[0]
  flags = [{"flag": a.option_strings[-1], "help": a.help or "",
            "default": None if a.default in (None, False, argparse.SUPPRESS) else str(a.default)}
           for a in parser._actions if a.option_strings]
  print(json.dumps({"flags": flags, "help": parser.format_help()}))
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default(script):
  done = subprocess.run([sys.executable, "-c", _COLLECT, script], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  info = json.loads(done.stdout.strip().splitlines()[-1])
  entries = option_entries(info["help"])
  assert len(info["flags"]) > 2
  for f in info["flags"]:
    assert f["help"].strip(), f"{script}: {f['flag']} has no help text"
    assert f["flag"] in entries, f"{script}: {f['flag']} not listed"
  missing = [f["flag"] for f in info["flags"]
             if f["default"] is not None and "default" not in entries[f["flag"]]]
  assert not missing, f"{script}: defaults not shown for {missing}"


def option_entries(help_text: str) -> dict[str, str]:
  """``{flag: its entry's text}`` from the options section of an argparse ``--help``."""
  entries: dict[str, str] = {}
  current: list[str] = []
  body = help_text.split("options:", 1)[1]
  for line in body.splitlines():
    m = re.match(r"^  (-[^ ].*?)(?:  +(.*))?$", line)
    if m:
      current = [w.rstrip(",") for w in m.group(1).split() if w.startswith("-")]
      for flag in current:
        entries[flag] = m.group(2) or ""
    elif current:
      for flag in current:
        entries[flag] += " " + line.strip()
  return entries
