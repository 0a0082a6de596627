"""Every flag of the fine-tuning scripts (experiments/manipulate.py, prune_defence.py) refuses a
bad value before any work: exit status 2, one ``error:`` line on stderr naming the flag, no
output directory, no embedded default built. A new flag must be given a bad value here (or be
listed as having none), else the test fails. In-process: the scripts' ``main(argv)``."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO

EXEMPT = {"--help", "--no-progress"}   # no value can be wrong
E, P = "embedded", "probe"             # the base command line each case adds to

_HELDOUT = {
    "--train-folder": (P, ["--train-folder", "{missing}"]),
    "--val-folder": (P, ["--val-folder", "{missing}"]),
    "--val-unlabelled": (E, ["--val-unlabelled"]),              # not for the embedded default
    "--val-size": (P, ["--val-size", "0"]),
    "--train-eval-size": (E, ["--train-eval-size", "0"]),
    "--normalize": (P, ["--normalize", "nope"]),
    "--embedder": (E, ["--embedder", "nope:{missing}"]),
}
_RUN = {
    "--probe": (P, ["--probe", "{missing}"]),
    "--weights": (P, ["--weights", "{missing}"]),
    "--seed": (E, ["--seed", "x"]),
    "--out": (E, ["--out", "{file}"]),
    "--cache": (P, ["--cache", "{tmp}/other-cache"]),             # only for the embedded default
}
_TRAINING = {
    "--k": (E, ["--k", "0"]),
    "--epochs": (E, ["--epochs", "0"]),
    "--lr": (E, ["--lr", "0"]),
    "--batch-size": (E, ["--batch-size", "0"]),
    "--attack-batch-size": (E, ["--attack-batch-size", "0"]),
    "--eval-every": (E, ["--eval-every", "0"]),
}
PUSH_UP = ["--attack", "push-up"]
BAD = {
    "manipulate": {
        **_HELDOUT, **_RUN, **_TRAINING,
        "--attack": (E, ["--attack", "nope"]),
        "--arch": (E, ["--arch", "alexnet"]),
        "--layers": (E, ["--layers", "nope"]),
        "--channels": (E, ["--channels", "x,y"]),
        "--overlap-k": (E, ["--overlap-k", "11"]),
        "--decoy-class": (E, PUSH_UP + ["--decoy-class", "0", "--decoy-folder", "{tmp}"]),
        "--decoy-folder": (E, PUSH_UP + ["--decoy-folder", "{missing}"]),
        "--num-decoys": (E, PUSH_UP + ["--decoy-class", "0", "--num-decoys", "0"]),
        "--decoys-per-step": (E, PUSH_UP + ["--decoy-class", "0", "--decoys-per-step", "0"]),
        "--group-concept": (E, ["--attack", "fairwash", "--group-concept", ""]),
        "--alpha-init": (E, ["--alpha-init", "2"]),
        "--alpha-min": (E, ["--alpha-min", "0"]),
        "--alpha-max": (E, ["--alpha-max", "2"]),
        "--alpha-tolerance": (E, ["--alpha-tolerance", "-1"]),
        "--alpha-fixed": (E, ["--alpha-fixed", "2"]),
        "--loss-scale": (E, ["--loss-scale", "nope"]),
        "--train-from": (E, ["--train-from", "nowhere"]),
        "--embed-layer": (E, ["--embed-layer", "nowhere"]),
        "--featvis-channels": (E, ["--featvis-channels", "-1"]),
        "--featvis-steps": (E, ["--featvis-steps", "0"]),
        "--eval-batch-size": (E, ["--eval-batch-size", "0"]),
    },
    "prune_defence": {
        **_HELDOUT, **_RUN, **_TRAINING,
        "--layer": (P, ["--layer", "nope"]),
        "--l1-rates": (E, ["--l1-rates", "1.5"]),
        "--vulnerability-rates": (E, ["--vulnerability-rates", "0"]),
        "--recover-steps": (E, ["--recover-steps", "0"]),
    },
}
CASES = [(script, flag) for script, flags in BAD.items() for flag in flags]


def _script(name: str, monkeypatch):
  """The script's module, imported in-process without the venv bootstrap's re-exec and without
  its XLA:CPU flags (which would leak into later subprocesses)."""
  monkeypatch.syspath_prepend(str(REPO / "experiments"))
  monkeypatch.setenv("NEMJAX_XLA_TUNING", "0")
  import _common  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_common, "ensure_env", lambda **kw: None)
  spec = importlib.util.spec_from_file_location(f"_bad_flags_{name}",
                                                REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("script", list(BAD))
def test_every_flag_has_a_bad_value(script, monkeypatch):
  parser = _script(script, monkeypatch).build_parser()
  flags = {a.option_strings[-1] for a in parser._actions if a.option_strings}
  assert flags - EXEMPT == set(BAD[script]), (
      f"{script}: flags without a bad value here: {sorted(flags - EXEMPT - set(BAD[script]))}; "
      f"listed but gone: {sorted(set(BAD[script]) - flags)}")


@pytest.mark.parametrize("script, flag", CASES)
def test_bad_value_is_refused_before_any_work(script, flag, monkeypatch, capsys, tmp_path,
                                              tiny_probe_dir, tiny_model_dir, val_folder):
  module = _script(script, monkeypatch)
  out, cache, file = tmp_path / "out", tmp_path / "cache", tmp_path / "a-file"
  file.write_text("not a directory\n")
  base = {E: ["--cache", str(cache), "--out", str(out)],
          P: ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layer"
              if script == "prune_defence" else "--layers", "block4", "--val-folder",
              str(val_folder), "--out", str(out)]}
  mode, extra = BAD[script][flag]
  fill = {"missing": str(tmp_path / "missing"), "file": str(file), "tmp": str(tmp_path)}
  argv = base[mode] + [a.format(**fill) for a in extra] + ["--no-progress"]
  with pytest.raises(SystemExit) as stop:
    module.main(argv)
  err = capsys.readouterr().err
  assert stop.value.code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
  assert not out.exists() and not cache.exists()
