"""PGD sweep: incremental re-dissection equals full re-dissection exactly, the export is what a
fresh dissection finds, SIGKILL + re-run equals an uninterrupted run, bad flags fail early."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from nemjax.data import broden
from nemjax.dissect.driver import dissect
from nemjax.models import checkpoint
from nemjax.sweep import delivery, poison, store
from nemjax.sweep.pgd_sweep import PGDSweepConfig, prepare, run_attack_group
from nemjax.sweep.verify import export_and_verify


@pytest.fixture(scope="module")
def setup(tiny_probe_dir, tiny_model_dir):
  probe = broden.load_probe(tiny_probe_dir)
  model = checkpoint.load(tiny_model_dir)
  return probe, model


@pytest.mark.parametrize("mode, mask_source, deliver_as", [
    ("u2", "labels", "float"), ("targeted", "clean", "uint8"), ("u1", "labels", "jpeg")])
def test_incremental_equals_full_redissection(setup, mode, mask_source, deliver_as):
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), steps=3, poison_fraction=0.25, batch_size=8,
                       mask_source=mask_source, delivery=deliver_as, modes=(mode,))
  ctx = prepare(model, probe, cfg, None, progress=False)["block4"]
  units = [u for u in range(128) if ctx.clean.best_label[u] > 0 and ctx.clean.thresholds[u] > 0][:2]
  rows_out, images = run_attack_group(ctx, units, 8 / 255, mode, return_images=True)
  for row, u in zip(rows_out, units):
    rows, x_adv = images[u]
    assert row["n_poisoned"] == len(rows) > 0
    assert np.abs(x_adv - probe_images(probe, rows)).max() <= 8 / 255 + 1e-6
    overrides = dict(zip(rows.tolist(), delivery.deliver(x_adv, deliver_as)))
    full = dissect(model, probe, ["block4"], batch_size=8, progress=False,
                   image_overrides=overrides)["block4"]
    assert row["threshold_after"] == full.thresholds[u]
    assert row["new_label"] == full.best_label[u]
    assert row["new_iou"] == full.score[u]
    assert row["source_iou_after"] == full.iou[u, row["clean_label"]]


def probe_images(probe, rows):
  from nemjax.data import loader
  return loader.load_images(probe, rows).astype(np.float32) / 255


def test_export_is_what_a_fresh_dissection_finds(setup, tmp_path):
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), steps=3, poison_fraction=0.25, batch_size=8,
                       delivery="uint8")
  ctx = prepare(model, probe, cfg, None, progress=False)["block4"]
  unit = int(next(u for u in range(128) if ctx.clean.best_label[u] > 0 and ctx.clean.thresholds[u] > 0))
  rep = export_and_verify(model, probe, cfg, "block4", unit, 8 / 255, "u2", tmp_path / "export",
                          progress=False)
  assert rep["match"], rep
  exported = broden.load_probe(tmp_path / "export")
  assert exported.num_images == probe.num_images
  assert sum("nemjax_poisoned" in p for p in exported.image_paths) == rep["n_poisoned"]
  with pytest.raises(FileExistsError):
    export_and_verify(model, probe, cfg, "block4", unit, 8 / 255, "u2", tmp_path / "export",
                      progress=False)


def test_delivery_and_store(tmp_path):
  x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
  assert delivery.deliver(x, "uint8").dtype == np.uint8
  np.testing.assert_array_equal(delivery.deliver(x, "uint8"), np.rint(x * 255).astype(np.uint8))
  j = delivery.deliver(x, "jpeg", 95)
  assert j.shape == x.shape and np.abs(j.astype(float) - x * 255).mean() < 20
  with pytest.raises(ValueError, match="delivery"):
    delivery.deliver(x, "png")
  s = store.ResultsStore(tmp_path / "r.csv", ["a", "b", "v"], ["a", "b"])
  s.add([{"a": "x", "b": 1, "v": 0.5}])
  s2 = store.ResultsStore(tmp_path / "r.csv", ["a", "b", "v"], ["a", "b"])
  assert s2.done(a="x", b=1) and not s2.done(a="x", b=2)
  with pytest.raises(ValueError, match="columns"):
    store.ResultsStore(tmp_path / "r.csv", ["a", "c"], ["a"])
  assert list(poison.choose_poisoned(np.array([1, 0, 1, 1], bool), np.array([1., 9, 3, 3]), 2)) == [2, 3]
  assert poison.poison_cap(200, 0.1) == 20


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


@pytest.mark.parametrize("extra, message", [
    (["--layers", "nope"], "nope"),
    (["--eps", "0"], "--eps"),
    (["--units", "block4:999"], "out of range"),
    (["--steps", "0"], "--steps"),
    (["--modes", "sideways"], "modes"),
])
def test_bad_flags_fail_before_work(tiny_probe_dir, tiny_model_dir, tmp_path, extra, message):
  r = subprocess.run(_sweep_cmd(tiny_probe_dir, tiny_model_dir, tmp_path / "o", extra), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "o" / "results.csv").exists()


def test_missing_weights_fail(tiny_probe_dir, tmp_path):
  r = subprocess.run(_sweep_cmd(tiny_probe_dir, tmp_path / "missing", tmp_path / "o"), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "not found" in r.stderr


def test_noise_sweep_runs_and_resumes(setup, tmp_path):
  from nemjax.sweep.noise_sweep import format_noise_table, run_noise_sweep
  probe, model = setup
  kw = dict(sigmas=(0.05,), fractions=(0.5, 1.0), kinds=("gaussian",), batch_size=8, progress=False)
  rows = run_noise_sweep(model, probe, ["block4"], tmp_path, **kw)
  assert len(rows) == 2
  assert {int(r["n_corrupted"]) for r in rows} == {12, 24}
  assert all(0 <= float(r["pct_changed"]) <= 100 for r in rows)
  before = (tmp_path / "results.csv").read_text()
  again = run_noise_sweep(model, probe, ["block4"], tmp_path, **kw)  # all done: nothing re-run
  assert (tmp_path / "results.csv").read_text() == before and len(again) == 2
  assert "100%" in format_noise_table(rows, "block4", "gaussian")
  with pytest.raises(ValueError, match="noise kinds"):
    run_noise_sweep(model, probe, ["block4"], tmp_path / "x", kinds=("pink",))
