"""Faults and bad input, as a user meets them: a run killed (SIGKILL) or interrupted (SIGINT,
SIGTERM) in the middle of writing its output, then run again, ends with the files an
uninterrupted run writes, no stray temp files and the lock released; bad flags are refused in
one line naming the flag, before any output exists.

Faults are injected at an exact point, the N-th atomic file write (after the temp file is
complete, before its rename), by running the script through a small wrapper that patches
``os.replace`` in the child process only.
"""
from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

_WRAPPER = """
import os, runpy, signal, sys
n, sig = int(os.environ["FAULT_AT"]), getattr(signal, os.environ["FAULT_SIGNAL"])
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
  if str(src).endswith(".tmp"):
    seen[0] += 1
    if seen[0] == n:
      os.kill(os.getpid(), sig)
  return real(src, dst, *a, **k)
os.replace = replace
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def run_script(script: str, args: list[str], fault: tuple[int, str] | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
  """Runs ``experiments/<script>`` (with a fault at the N-th atomic write if given)."""
  env = dict(os.environ)
  cmd = [sys.executable, str(REPO / "experiments" / script), *args]
  if fault is not None:
    env["FAULT_AT"], env["FAULT_SIGNAL"] = str(fault[0]), fault[1]
    cmd = [sys.executable, "-c", _WRAPPER, *cmd[1:]]
  # Ctrl-C must reach the script even when pytest itself was started in the background (a
  # non-interactive shell's `cmd &` starts it with SIGINT ignored, which children inherit).
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stray_files(root: Path) -> list[Path]:
  """Temp files and directories a writer left (``.<name>.<x>.tmp``, ``.tmp-``, ``.old-``)."""
  return [p for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def same_tree(a: Path, b: Path) -> None:
  """Both directories hold the same files with the same bytes (JSON/CSV/NPY/HTML/JPEG)."""
  files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  assert files_a == files_b
  for rel in files_a:
    if rel.suffix == ".json":  # summaries name the output's own path
      continue
    assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


@pytest.fixture(scope="module")
def dissect_args(tiny_probe_dir, tiny_model_dir):
  return ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers",
          "block3", "block4", "--batch-size", "8", "--report-top", "2"]


@pytest.fixture(scope="module")
def clean_dissection(dissect_args, tmp_path_factory):
  out = tmp_path_factory.mktemp("clean") / "out"
  done = run_script("dissect.py", [*dissect_args, "--out", str(out)])
  assert done.returncode == 0, done.stderr[-2000:]
  return out


@pytest.mark.parametrize("fault", [(1, "SIGKILL"), (7, "SIGKILL"), (3, "SIGINT"),
                                   (5, "SIGTERM")])
def test_dissect_killed_mid_write_then_rerun(fault, dissect_args, clean_dissection, tmp_path):
  out = tmp_path / "out"
  done = run_script("dissect.py", [*dissect_args, "--out", str(out)], fault=fault)
  expected = {"SIGKILL": -signal.SIGKILL, "SIGINT": 130, "SIGTERM": 143}[fault[1]]
  assert done.returncode == expected, done.stderr[-2000:]
  if fault[1] != "SIGKILL":  # a clean stop: one line, no traceback, nothing half-written
    assert done.stderr.strip().splitlines()[-1].endswith("the same command resumes")
    assert "Traceback" not in done.stderr
    assert not stray_files(out)
  again = run_script("dissect.py", [*dissect_args, "--out", str(out)])
  assert again.returncode == 0, again.stderr[-2000:]
  assert not stray_files(out)
  same_tree(out, clean_dissection)


_BAD_DISSECT = [
    (["--top-fraction", "1.5"], "--top-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--report-top", "0"], "--report-top"),
    (["--layers", "nope"], "nope"),
    (["--thresholds", "block4"], "--thresholds"),
    (["--tally-method", "fast"], "--tally-method"),
]


@pytest.mark.parametrize("extra, flag", _BAD_DISSECT)
def test_dissect_bad_input_is_one_line_before_any_output(extra, flag, tiny_probe_dir,
                                                         tiny_model_dir, tmp_path):
  out = tmp_path / "out"
  args = ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4",
          "--out", str(out)]
  # later flags override earlier ones, so the bad value is the one parsed
  done = run_script("dissect.py", [*args, *extra])
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert flag in lines[-1] and "Traceback" not in done.stderr, done.stderr
  assert not out.exists()


def test_dissect_output_that_is_a_file_or_locked(tiny_probe_dir, tiny_model_dir, tmp_path):
  args = ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4"]
  (tmp_path / "file").write_text("x")
  done = run_script("dissect.py", [*args, "--out", str(tmp_path / "file")])
  assert done.returncode == 2 and "--out" in done.stderr and "not a directory" in done.stderr
  from nemjax import files
  with files.output_lock(tmp_path / "busy"):
    done = run_script("dissect.py", [*args, "--out", str(tmp_path / "busy")])
  assert done.returncode == 2 and "another nemjax run" in done.stderr
  assert not any(p.name.endswith(".csv") for p in (tmp_path / "busy").iterdir())


def test_convert_bad_input_is_one_line(tmp_path):
  bad_sd = tmp_path / "w.npz"
  np.savez(bad_sd, **{"fc.weight": np.full((4, 128), np.nan, np.float32)})
  cases = [([str(tmp_path / "missing.pth"), str(tmp_path / "o")], "not found"),
           ([str(bad_sd), str(tmp_path / "o")], "does not match smallcnn")]
  for args, needle in cases:
    done = run_script("convert.py", ["--arch", "smallcnn", *args])
    assert done.returncode == 1 and needle in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_is_one_line_naming_it(tiny_model_dir, tiny_probe_dir, tmp_path):
  import shutil
  ckpt = tmp_path / "ckpt"
  shutil.copytree(tiny_model_dir, ckpt)
  big = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(big, "r+b") as f:
    f.truncate(big.stat().st_size // 2)
  done = run_script("dissect.py", ["--probe", str(tiny_probe_dir), "--weights", str(ckpt),
                                   "--layers", "block4", "--out", str(tmp_path / "out")])
  assert done.returncode == 2 and "Traceback" not in done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and str(ckpt) in lines[0] and "damaged or incomplete" in lines[0]
  assert not (tmp_path / "out").exists()


_LEFTOVER_REPORTS = """
import logging, warnings
from nemjax.models import checkpoint
checkpoint._quiet_orbax_leftovers()
checkpoint._quiet_orbax_leftovers()  # installed once
log = logging.getLogger("asyncio")
log.error("Future exception was never retrieved\\nfuture: <Future exception=ValueError('OUT_OF_RANGE:"
          " Error reading in OCDBT database')>")
log.error("Task exception was never retrieved\\nfuture: <Task coro=<_read() defined at /x/orbax/s.py>>")
log.error("KEPT asyncio: Task exception was never retrieved\\nfuture: <Task coro=<mine()>>")
class Closed:
  def __del__(self):
    raise RuntimeError("Event loop is closed")
class Mine:
  def __del__(self):
    raise ValueError("KEPT unraisable")
Closed(); Mine()
warnings.warn("coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning)
warnings.warn("KEPT warning", RuntimeWarning)
"""


def test_orbax_leftover_reports_are_dropped_and_others_kept():
  """A failed restore's sibling reads report through four channels at random moments (the
  truncated-checkpoint test meets them about one run in ten); each channel drops exactly those."""
  done = subprocess.run([sys.executable, "-c", _LEFTOVER_REPORTS], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert done.returncode == 0, done.stderr
  err = done.stderr
  assert err.count("KEPT") == 3 and "KEPT asyncio" in err and "KEPT unraisable" in err, err
  assert "OCDBT" not in err and "orbax" not in err and "Event loop" not in err, err
  assert "_read_array_index_and_device_put" not in err, err


_BAD_FLAGS = [  # (script, extra flags, the flag the message must name)
    ("pgd_sweep.py", ["--eps", "1000"], "--eps"),
    ("pgd_sweep.py", ["--step-size", "300"], "--step-size"),
    ("pgd_sweep.py", ["--jpeg-quality", "80"], "--jpeg-quality"),
    ("pgd_sweep.py", ["--cache", "somewhere"], "--cache"),
    ("pgd_sweep.py", ["--poison-fraction", "0"], "--poison-fraction"),
    ("noise_sweep.py", ["--jpeg-quality", "80"], "--jpeg-quality"),
    ("noise_sweep.py", ["--sigmas", "-1"], "--sigmas"),
    ("noise_sweep.py", ["--fractions", "1.5"], "--fractions"),
    ("noise_sweep.py", ["--cache", "somewhere"], "--cache"),
    ("manipulate.py", ["--decoy-class", "0"], "--decoy-class"),
    ("manipulate.py", ["--group-concept", "red"], "--group-concept"),
    ("manipulate.py", ["--cache", "somewhere"], "--cache"),
    ("manipulate.py", ["--k", "0"], "--k"),
    ("prune_defence.py", ["--cache", "somewhere"], "--cache"),
    ("prune_defence.py", ["--l1-rates", "1.5"], "--l1-rates"),
    ("dissect.py", ["--seed", "3"], "--seed"),
    ("dissect.py", ["--no-report", "--report-top", "2"], "--report-top"),
]


@pytest.mark.parametrize("script, extra, flag", _BAD_FLAGS,
                         ids=[f"{s}{' '.join(e)}" for s, e, _ in _BAD_FLAGS])
def test_bad_or_inapplicable_flag_is_one_line_before_any_output(script, extra, flag,
                                                                tiny_probe_dir, tiny_model_dir,
                                                                val_folder, tmp_path):
  out = tmp_path / "out"
  args = ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--out", str(out)]
  if script in ("pgd_sweep.py", "noise_sweep.py", "dissect.py"):
    args += ["--layers", "block4"]
  if script == "manipulate.py":
    args += ["--layers", "block4", "--val-folder", str(val_folder)]
  if script == "prune_defence.py":
    args += ["--val-folder", str(val_folder)]
  done = run_script(script, [*args, *extra])
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2, done.stderr[-2000:]
  assert len(lines) == 1 and flag in lines[0] and "Traceback" not in done.stderr, done.stderr
  assert not out.exists()


# ------------------------------------------------------------------ the long commands
_SWEEP = ["--layers", "block4", "--num-units", "2", "--min-iou", "0", "--eps", "4", "8",
          "--steps", "2", "--modes", "u2", "--units-per-call", "1", "--batch-size", "8",
          "--no-progress"]
_NOISE = ["--layers", "block4", "--min-iou", "0", "--sigmas", "0.05", "--fractions", "0.5", "1",
          "--kinds", "gaussian", "--batch-size", "8", "--no-progress"]
_MANIPULATE = ["--layers", "block4", "--channels", "0,1,2,3,4,5", "--k", "4", "--overlap-k",
               "2", "--epochs", "2", "--batch-size", "4", "--attack-batch-size", "4",
               "--eval-every", "3", "--lr", "1e-3", "--eval-batch-size", "24",
               "--featvis-channels", "0", "--no-progress"]
_PRUNE = ["--layer", "block4", "--k", "4", "--epochs", "1", "--batch-size", "4",
          "--attack-batch-size", "4", "--eval-every", "3", "--recover-steps", "2",
          "--l1-rates", "0.5", "--vulnerability-rates", "0.25", "--train-eval-size", "8",
          "--no-progress"]
LONG = {  # script, flags, the result files compared (CSV without timing columns)
    "pgd_sweep": ("pgd_sweep.py", _SWEEP, ["results.csv"]),
    "noise_sweep": ("noise_sweep.py", _NOISE, ["results.csv"]),
    "manipulate": ("manipulate.py", _MANIPULATE, ["metrics.csv"]),
    "prune_defence": ("prune_defence.py", _PRUNE, ["results.csv"]),
}


def csv_rows(path: Path) -> list[tuple]:
  import csv
  with open(path, newline="") as f:
    return sorted(tuple((k, v) for k, v in r.items() if "second" not in k and "time" not in k)
                  for r in csv.DictReader(f))


@pytest.fixture(scope="module")
def long_args(tiny_probe_dir, tiny_model_dir, val_folder):
  def args(name: str, out: Path) -> list[str]:
    script, flags, _ = LONG[name]
    extra = ["--val-folder", str(val_folder)] if script in ("manipulate.py",
                                                             "prune_defence.py") else []
    return ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), *extra,
            "--out", str(out), *flags]
  return args


@pytest.fixture(scope="module")
def uninterrupted(long_args, tmp_path_factory):
  outs = {}
  for name in LONG:
    out = tmp_path_factory.mktemp(name) / "out"
    done = run_script(LONG[name][0], long_args(name, out))
    assert done.returncode == 0, done.stderr[-2000:]
    outs[name] = out
  return outs


@pytest.mark.parametrize("name, fault", [("pgd_sweep", (2, "SIGKILL")),
                                         ("pgd_sweep", (4, "SIGINT")),
                                         ("noise_sweep", (3, "SIGKILL")),
                                         ("manipulate", (3, "SIGKILL")),
                                         ("manipulate", (6, "SIGINT")),
                                         ("prune_defence", (2, "SIGKILL"))])
def test_long_command_stopped_then_rerun_equals_uninterrupted(name, fault, long_args,
                                                              uninterrupted, tmp_path):
  script, _, compared = LONG[name]
  out = tmp_path / "out"
  done = run_script(script, long_args(name, out), fault=fault)
  expected = {"SIGKILL": -signal.SIGKILL, "SIGINT": 130}[fault[1]]
  assert done.returncode == expected, done.stderr[-2000:]
  if fault[1] == "SIGINT":
    assert done.stderr.strip().splitlines()[-1] == "interrupted; the same command resumes"
  again = run_script(script, long_args(name, out))
  assert again.returncode == 0, again.stderr[-2000:]
  assert not stray_files(out), stray_files(out)
  assert (out / ".nemjax.lock").read_text() == ""  # released
  for rel in compared:
    assert csv_rows(out / rel) == csv_rows(uninterrupted[name] / rel), rel

