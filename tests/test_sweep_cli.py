"""The sweep scripts end to end: SIGKILL + re-run equals an uninterrupted run; every bad flag
fails before any work (on the embedded default: without training or writing the cache); the
embedded cache is keyed by seed; a sweep sharded over two devices equals the one-device run."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO


def _sweep_cmd(probe, ckpt, out, extra=()):
  return [sys.executable, "experiments/pgd_sweep.py", "--probe", str(probe), "--weights", str(ckpt),
          "--layers", "block4", "--num-units", "3", "--eps", "4", "8", "--steps", "2",
          "--modes", "u2", "--units-per-call", "1", "--batch-size", "8", "--out", str(out),
          "--no-progress", *extra]


def _rows(path):
  with open(path, newline="") as f:
    return sorted((tuple((k, v) for k, v in r.items() if k != "seconds") for r in csv.DictReader(f)))


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tiny_probe_dir, tiny_model_dir, tmp_path):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_sweep_cmd(tiny_probe_dir, tiny_model_dir, killed), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  results = killed / "results.csv"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if results.exists() and len(results.read_text().splitlines()) >= 3:  # header + 2 rows
      break
    time.sleep(0.05)
  assert proc.poll() is None, "sweep finished before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  partial = _rows(results)
  assert 2 <= len(partial) < 6
  r = subprocess.run(_sweep_cmd(tiny_probe_dir, tiny_model_dir, killed), cwd=REPO,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  whole = tmp_path / "whole"
  r2 = subprocess.run(_sweep_cmd(tiny_probe_dir, tiny_model_dir, whole), cwd=REPO,
                      capture_output=True, text=True)
  assert r2.returncode == 0, r2.stderr[-2000:]
  assert _rows(killed / "results.csv") == _rows(whole / "results.csv")
  assert set(partial) <= set(_rows(whole / "results.csv"))
  assert (whole / "pgd_sweep.png").exists() and (whole / "summary.json").exists()
  assert "block4" in r2.stdout
  # a different configuration in the same output directory is refused
  r3 = subprocess.run(_sweep_cmd(tiny_probe_dir, tiny_model_dir, whole, ["--steps", "3"]), cwd=REPO,
                      capture_output=True, text=True)
  assert r3.returncode == 2 and "another configuration" in r3.stderr


def _fails_early(cmd, message, tmp_path):
  t0 = time.time()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one clear line
  assert not (tmp_path / "o" / "results.csv").exists()
  return time.time() - t0


@pytest.mark.parametrize("extra, message", [
    (["--layers", "nope"], "nope"),
    (["--layers", "fc"], "spatial"),
    (["--eps", "0"], "--eps"),
    (["--units", "block4:999"], "out of range"),
    (["--steps", "0"], "--steps"),
    (["--modes", "sideways"], "modes"),
    (["--jpeg-quality", "101"], "--jpeg-quality"),
    (["--export-unit", "block4:128", "--export-dir", "EXPORT"], "out of range"),
    (["--export-unit", "block4:1", "--export-dir", "EXPORT", "--export-mode", "u1"], "--export-mode"),
    (["--export-eps", "4"], "--export-eps"),
    (["--min-iou", "-0.1"], "--min-iou"),
    (["--poison-order", "random"], "--poison-order"),
    (["--min-iou", "0.9"], "labelled with IoU > 0.9"),  # no fallback to weaker units
])
def test_bad_flags_fail_before_work(tiny_probe_dir, tiny_model_dir, tmp_path, extra, message):
  extra = [str(tmp_path / "export") if e == "EXPORT" else e for e in extra]
  _fails_early(_sweep_cmd(tiny_probe_dir, tiny_model_dir, tmp_path / "o", extra), message,
               tmp_path)


def test_missing_weights_fail(tiny_probe_dir, tmp_path):
  r = subprocess.run(_sweep_cmd(tiny_probe_dir, tmp_path / "missing", tmp_path / "o"), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.parametrize("script, extra, message", [
    ("pgd_sweep", ["--layers", "nope"], "unknown layer 'nope'"),
    ("pgd_sweep", ["--units", "block3:64"], "out of range for layer block3 with 64 units"),
    ("pgd_sweep", ["--units", "block2:1"], "not attacked"),
    ("pgd_sweep", ["--export-unit", "block4:128", "--export-dir", "EXPORT"], "128 units"),
    ("pgd_sweep", ["--export-unit", "block4", "--export-dir", "EXPORT"], "LAYER:UNIT"),
    ("pgd_sweep", ["--export-unit", "block4:1", "--export-dir", "EXPORT", "--export-mode", "u1"],
     "--export-mode"),
    ("pgd_sweep", ["--jpeg-quality", "0"], "--jpeg-quality"),
    ("pgd_sweep", ["--arch", "vgg16"], "embedded default"),
    ("pgd_sweep", ["--seed", "-1"], "--seed"),
    ("noise_sweep", ["--layers", "nope"], "unknown layer 'nope'"),
    ("noise_sweep", ["--kinds", "pink"], "noise kinds"),
])
def test_embedded_default_bad_flags_fail_without_training(tmp_path, script, extra, message):
  """No --probe: the flags are checked on a shape-only SmallCNN; nothing is generated or
  trained (training takes minutes; these fail in seconds) and the cache stays untouched."""
  cache = tmp_path / "cache"
  extra = [str(tmp_path / "export") if e == "EXPORT" else e for e in extra]
  cmd = [sys.executable, f"experiments/{script}.py", "--cache", str(cache),
         "--out", str(tmp_path / "o"), "--no-progress", *extra]
  seconds = _fails_early(cmd, message, tmp_path)
  assert not cache.exists() and not (tmp_path / "export").exists()
  assert seconds < 60


def test_embedded_cache_is_keyed_by_seed_and_settings(tmp_path, tiny_model_dir):
  import shutil
  from nemjax import embedded
  a, b = embedded.cache_paths(tmp_path, 0), embedded.cache_paths(tmp_path, 1)
  assert a.checkpoint_dir != b.checkpoint_dir and a.probe_dir != b.probe_dir
  assert a.root == tmp_path / "seed0"
  small = dict(num_probe_images=4, num_train_images=4, num_heldout_images=4, progress=False)
  # A checkpoint that was not trained with this seed is refused, not silently reused.
  paths = embedded.cache_paths(tmp_path, 2)
  paths.root.mkdir(parents=True)
  shutil.copytree(tiny_model_dir, paths.checkpoint_dir)
  with pytest.raises(ValueError, match="seed"):
    embedded.build_embedded_default(tmp_path, seed=2, **small)
  assert (paths.probe_dir / "index.csv").exists()       # generated atomically, then kept
  # Other settings for the same seed are refused too.
  with pytest.raises(ValueError, match="num_probe_images"):
    embedded.build_embedded_default(tmp_path, seed=2, **{**small, "num_probe_images": 5})
  with pytest.raises(ValueError, match="seed"):
    embedded.cache_paths(tmp_path, -1)


_DEVICE_DRIVER = """
import sys
import jax
from nemjax.data import broden
from nemjax.models import checkpoint
from nemjax.sweep.config import PGDAttack, PGDSweepConfig, ProbePass
from nemjax.sweep.pgd_sweep import run_pgd_sweep
probe_dir, ckpt, out, n = sys.argv[1:5]
assert jax.device_count() == int(n), jax.devices()
cfg = PGDSweepConfig(layers=("block3", "block4"), num_units=3,
                     attack=PGDAttack(eps=(4 / 255, 8 / 255), steps=2),
                     modes=("u2", "targeted", "noise"), poison_fraction=0.25,
                     probe_pass=ProbePass(batch_size=8, delivery="uint8"), units_per_call=2)
run_pgd_sweep(checkpoint.load(ckpt), broden.load_probe(probe_dir), cfg, out, progress=False)
"""


@pytest.mark.slow
def test_two_devices_give_the_one_device_results(tiny_probe_dir, tiny_model_dir, tmp_path):
  """The sweep shards attacks and activations over a Mesh of all local devices; two forced
  host devices must give exactly the single-device rows."""
  outs = {}
  for n in (1, 2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    outs[n] = tmp_path / f"dev{n}"
    r = subprocess.run([sys.executable, "-c", _DEVICE_DRIVER, str(tiny_probe_dir),
                        str(tiny_model_dir), str(outs[n]), str(n)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
  one, two = _rows(outs[1] / "results.csv"), _rows(outs[2] / "results.csv")
  assert len(one) == 2 * 3 * 2 * 3
  assert one == two
