"""Every flag of every experiment script: a bad value is refused with one line naming that
flag, before any work (no output directory, no embedded default built). A flag the tables
below do not cover fails the coverage test, so a new flag comes with its bad value."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import cli_error, import_script, parser_flags

# Flags that take no value that could be bad.
EXEMPT = {"--help", "--no-progress", "--no-report"}

# One process of a jax.distributed run (every script has them).
PROCESS_FLAGS = {
    "--coordinator": ["--num-processes", "2", "--coordinator", "localhost"],
    "--num-processes": ["--num-processes", "0"],
    "--process-id": ["--process-id", "1"],
}

# script -> {flag: extra argv with a bad (or inapplicable) value}; "{tmp}" is a fresh directory.
BAD: dict[str, dict[str, list[str]]] = {
    "pgd_sweep": {
        "--probe": ["--probe", "{tmp}/nope"], "--weights": ["--weights", "{tmp}/nope"],
        "--arch": ["--arch", "alexnet"], "--layers": ["--layers", "nope"],
        "--units": ["--units", "block4:99999"], "--num-units": ["--num-units", "0"],
        "--min-iou": ["--min-iou", "1.5"], "--eps": ["--eps", "1000"],
        "--steps": ["--steps", "0"], "--step-size": ["--step-size", "300"],
        "--modes": ["--modes", "bogus"], "--mask-source": ["--mask-source", "bogus"],
        "--poison-fraction": ["--poison-fraction", "0"],
        "--poison-order": ["--poison-order", "random"],
        "--delivery": ["--delivery", "png"],
        "--jpeg-quality": ["--delivery", "jpeg", "--jpeg-quality", "0"],
        "--batch-size": ["--batch-size", "0"], "--top-fraction": ["--top-fraction", "1.5"],
        "--quantile-method": ["--quantile-method", "bogus"],
        "--units-per-call": ["--units-per-call", "0"],
        "--export-unit": ["--export-unit", "block4:99999", "--export-dir", "{tmp}/e"],
        "--export-dir": ["--export-dir", "{tmp}/e"], "--export-eps": ["--export-eps", "4"],
        "--export-mode": ["--export-mode", "u2"], "--overwrite": ["--overwrite"],
        "--seed": ["--seed", "-1"], "--out": ["--out", "{tmp}/file"],
        "--cache": ["--cache", "{tmp}/cache"], **PROCESS_FLAGS,
    },
    "noise_sweep": {
        "--probe": ["--probe", "{tmp}/nope"], "--weights": ["--weights", "{tmp}/nope"],
        "--arch": ["--arch", "alexnet"], "--layers": ["--layers", "nope"],
        "--sigmas": ["--sigmas", "-1"], "--fractions": ["--fractions", "1.5"],
        "--kinds": ["--kinds", "pink"], "--delivery": ["--delivery", "png"],
        "--jpeg-quality": ["--delivery", "jpeg", "--jpeg-quality", "101"],
        "--batch-size": ["--batch-size", "0"], "--top-fraction": ["--top-fraction", "0"],
        "--quantile-method": ["--quantile-method", "bogus"], "--min-iou": ["--min-iou", "-1"],
        "--seed": ["--seed", "-1"], "--out": ["--out", "{tmp}/file"],
        "--cache": ["--cache", "{tmp}/cache"], **PROCESS_FLAGS,
    },
    "dissect": {
        "--probe": ["--probe", "{tmp}/nope"], "--weights": ["--weights", "{tmp}/nope"],
        "--arch": ["--arch", "alexnet"], "--layers": ["--layers", "nope"],
        "--out": ["--out", "{tmp}/file"], "--thresholds": ["--thresholds", "block4"],
        "--top-fraction": ["--top-fraction", "1"],
        "--quantile-method": ["--quantile-method", "bogus"],
        "--categories": ["--categories", "smell"], "--batch-size": ["--batch-size", "0"],
        "--tally-method": ["--tally-method", "fast"], "--report-top": ["--report-top", "0"],
        "--cache": ["--cache", "{tmp}/cache"], "--seed": ["--seed", "3"], **PROCESS_FLAGS,
    },
}


@pytest.mark.parametrize("script", sorted(BAD) + ["heo_fooling", "attribute", "trojan_bench"])
def test_every_flag_has_a_bad_value(script):
  flags = parser_flags(import_script(script))
  table = BAD.get(script) or {**BAD_LAYER_SCRIPTS, "trojan_bench": BAD_TROJAN_BENCH}[script]
  missing = sorted(flags - EXEMPT - set(table))
  assert not missing, f"{script}: add a bad value for {missing} to BAD"
  assert not set(table) - flags, f"{script}: BAD names flags the script no longer has"


CASES = [(s, f) for s in sorted(BAD) for f in sorted(BAD[s])]


def assert_refused_before_work(script, argv, flag, tmp_path, capsys, kept):
  """One error line naming ``flag``; nothing written under ``tmp_path`` but ``kept``."""
  line = cli_error(import_script(script), capsys, argv)
  assert flag in line, line
  for made in ("out", "cache", "e"):
    assert not (tmp_path / made).exists(), made
  assert sorted(p.name for p in tmp_path.iterdir()) == kept


@pytest.mark.parametrize("script, flag", CASES, ids=[f"{s}{f}" for s, f in CASES])
def test_bad_flag_is_one_line_naming_it_before_any_work(script, flag, tiny_probe_dir,
                                                        tiny_model_dir, tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  extra = [a.replace("{tmp}", str(tmp_path)) for a in BAD[script][flag]]
  out = tmp_path / "out"
  argv = ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4",
          "--out", str(out), "--no-progress"] if script != "dissect" else [
          "--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4",
          "--out", str(out), "--no-report"]
  if flag == "--report-top":
    argv.remove("--no-report")
  # later flags override earlier ones
  assert_refused_before_work(script, [*argv, *extra], flag, tmp_path, capsys, ["file"])


# --------------------------------------------------------------------------------------------
# heo_fooling.py and attribute.py: "E" = on the embedded default (never built: each bad value
# is refused first), "P" = on the tiny probe set and model (--layer, held-out --val-folder).
E, P = "embedded", "probe"
_MODEL = {
    "--probe": (P, ["--probe", "{tmp}/nope"]), "--weights": (P, ["--weights", "{tmp}/nope"]),
    "--arch": (E, ["--arch", "alexnet"]), "--layer": (E, ["--layer", "nope"]),
    "--seed": (E, ["--seed", "-1"]), "--out": (E, ["--out", "{tmp}/file"]),
    "--cache": (P, ["--cache", "{tmp}/cache"]),
}
BAD_LAYER_SCRIPTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "heo_fooling": {
        **_MODEL,
        "--method": (E, ["--method", "occlusion"]), "--fooling": (E, ["--fooling", "nope"]),
        "--lam": (E, ["--lam", "-1"]), "--lr": (E, ["--lr", "0"]),
        "--distill": (E, ["--distill", "-1"]),
        "--epochs": (E, ["--epochs", "0"]), "--eval-every": (E, ["--eval-every", "0"]),
        "--batch-size": (E, ["--batch-size", "0"]),
        "--c1": (E, ["--fooling", "active", "--c1", "-1"]),
        "--c2": (E, ["--fooling", "active", "--c2", "0"]),
        "--mosaics-per-step": (E, ["--fooling", "active", "--mosaics-per-step", "0"]),
        "--measure": (E, ["--measure", "lime"]), "--threshold": (E, ["--threshold", "2"]),
        "--panel-images": (E, ["--panel-images", "0"]),
        "--eval-images": (E, ["--eval-images", "0"]),
        "--eval-batch-size": (E, ["--eval-batch-size", "0"]),
        "--train-folder": (P, ["--train-folder", "{tmp}/nope"]),
        "--val-folder": (P, ["--val-folder", "{tmp}/nope"]),
        "--val-unlabelled": (E, ["--val-unlabelled"]), "--val-size": (P, ["--val-size", "0"]),
        "--train-eval-size": (E, ["--train-eval-size", "0"]),
        "--normalize": (P, ["--normalize", "nope"]),
    },
    "attribute": {
        **_MODEL,
        "--method": (E, ["--method", "nope"]), "--target": (E, ["--target", "dog"]),
        "--opt": (E, ["--opt", "n_steps"]), "--images": (E, ["--images", "{tmp}/nope"]),
        "--image-size": (E, ["--image-size", "0"]), "--num-images": (E, ["--num-images", "0"]),
        "--grid-images": (E, ["--grid-images", "0"]), "--batch-size": (E, ["--batch-size", "0"]),
        "--normalize": (E, ["--normalize", "nope"]),
    },
}


LAYER_CASES = [(s, f) for s in sorted(BAD_LAYER_SCRIPTS) for f in sorted(BAD_LAYER_SCRIPTS[s])]


@pytest.mark.parametrize("script, flag", LAYER_CASES, ids=[f"{s}{f}" for s, f in LAYER_CASES])
def test_layer_script_bad_flag_is_one_line_before_any_work(script, flag, tiny_probe_dir,
                                                           tiny_model_dir, tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  (tmp_path / "val").mkdir()
  mode, extra = BAD_LAYER_SCRIPTS[script][flag]
  out = tmp_path / "out"
  base = {E: ["--cache", str(tmp_path / "cache"), "--out", str(out)],
          P: ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layer",
              "block4", "--out", str(out)] + (["--val-folder", str(tmp_path / "val")]
                                              if script == "heo_fooling" else [])}
  argv = base[mode] + [a.replace("{tmp}", str(tmp_path)) for a in extra] + ["--no-progress"]
  assert_refused_before_work(script, argv, flag, tmp_path, capsys, ["file", "val"])


# trojan_bench.py: the embedded default only (never built: each bad value is refused first).
BAD_TROJAN_BENCH: dict[str, list[str]] = {
    "--trojans": ["--trojans", "nope"], "--epochs": ["--epochs", "0"], "--lr": ["--lr", "0"],
    "--batch-size": ["--batch-size", "0"], "--methods": ["--methods", "nope"],
    "--images": ["--images", "0"], "--attr-batch-size": ["--attr-batch-size", "0"],
    "--feature-grid": ["--feature-grid", "0"], "--occlusion-window": ["--occlusion-window", "0"],
    "--occlusion-stride": ["--occlusion-stride", "0"], "--samples": ["--samples", "0"],
    "--shapley-samples": ["--shapley-samples", "0"], "--ig-steps": ["--ig-steps", "0"],
    "--tools": ["--tools", "cppn"], "--synthesis-steps": ["--synthesis-steps", "0"],
    "--synthesis-images": ["--synthesis-images", "0"],
    "--random-distractors": ["--random-distractors", "-1"],
    "--panel-images": ["--panel-images", "-1"], "--seed": ["--seed", "-1"],
    "--out": ["--out", "{tmp}/file"], "--cache": ["--cache", "{tmp}/file"],
}


@pytest.mark.parametrize("flag", sorted(BAD_TROJAN_BENCH))
def test_trojan_bench_bad_flag_is_one_line_before_any_work(flag, tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  out = tmp_path / "out"
  argv = (["--cache", str(tmp_path / "cache"), "--out", str(out)]
          + [a.replace("{tmp}", str(tmp_path)) for a in BAD_TROJAN_BENCH[flag]]
          + ["--no-progress"])
  assert_refused_before_work("trojan_bench", argv, flag, tmp_path, capsys, ["file"])
