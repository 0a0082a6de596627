"""Run the whole test suite: ``python run_tests.py [pytest args]``.

Creates/reuses the virtual environment (with the ``dev`` and ``torch`` extras) on first use.
Exits non-zero on any failure, including pytest's "no tests collected" (exit 5).
"""
import os
import sys

from tools.bootstrap import ensure_env

ensure_env(extras=("dev", "torch", "experiments"))

import pytest  # noqa: E402  (after the venv is ready)

os.environ["NEMJAX_REQUIRE_TORCH"] = "1"  # parity tests fail, never skip, without torch

code = pytest.main(["-n", "2", "--dist", "loadfile", *sys.argv[1:]])
if code == 5:
  print("run_tests.py: pytest collected no tests; treating as failure", file=sys.stderr)
  code = 1
sys.exit(int(code))
