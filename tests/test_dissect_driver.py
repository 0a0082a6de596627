"""The dissection driver through a real model on the synthetic probe set: equals the NumPy
oracle exactly, is identical on 1 and 4 devices, and writes NetDissect-Lite's files."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import oracle_netdissect as oracle
from conftest import REPO
from nemjax.data import broden, loader
from nemjax.dissect.driver import dissect
from nemjax.dissect.outputs import write_layer_outputs
from nemjax.models import checkpoint

LAYERS = ["block3", "block4"]


@pytest.fixture(scope="module")
def dissected(tiny_probe_dir, tiny_model_dir):
  probe = broden.load_probe(tiny_probe_dir)
  model = checkpoint.load(tiny_model_dir)
  results, acts = dissect(model, probe, LAYERS, batch_size=8, progress=False, keep_activations=True)
  return probe, model, results, {k: np.array(v) for k, v in acts.items()}


def test_driver_equals_oracle_exactly(dissected):
  probe, _, results, acts = dissected
  pixels, scalars = loader.load_labels(probe, np.arange(probe.num_images))
  for layer in LAYERS:
    a = np.moveaxis(acts[layer], 3, 1)  # (N, U, h, w)
    res = results[layer]
    thr = oracle.thresholds(a, 0.995)
    np.testing.assert_array_equal(res.thresholds, thr)
    t = oracle.tally(a, thr, pixels, scalars, probe.labelcat)
    for k, v in t.items():
      np.testing.assert_array_equal(np.asarray(getattr(res.tally, k)), v, err_msg=f"{layer} {k}")
    iou = oracle.iou(t, probe.labelcat)
    np.testing.assert_array_equal(res.iou, iou)
    best = oracle.best_labels(iou, probe.primary_category, probe.num_categories)
    np.testing.assert_array_equal(res.category_labels, best["label"])
    np.testing.assert_array_equal(res.category_scores, best["score"])
    np.testing.assert_array_equal(res.score, best["score"].max(axis=1))
    assert (res.best_label > 0).any(), "a random SmallCNN should label some units"


def test_layer_outputs_have_netdissect_format(dissected, tmp_path):
  probe, _, results, _ = dissected
  res = results["block4"]
  write_layer_outputs(tmp_path, res, probe)
  with open(tmp_path / "block4_tally.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  cats = probe.category_names
  expected = ["unit", "category", "label", "score"] + [
      f"{c}-{f}" for c in cats for f in ("label", "truth", "activation", "intersect", "iou")]
  assert list(rows[0].keys()) == expected
  assert len(rows) == res.num_units
  scores = [float(r["score"]) for r in rows]
  assert scores == sorted(scores, reverse=True)
  for r in rows[:5]:
    u = int(r["unit"]) - 1
    assert r["label"] == probe.label_names[res.best_label[u]]
    assert float(r["score"]) == res.score[u]
    assert r[f"{cats[0]}-truth"].endswith(".0")  # float64 counts, as NetDissect-Lite writes them
  np.testing.assert_array_equal(np.load(tmp_path / "block4_iou.npy"), res.iou)
  np.testing.assert_array_equal(np.load(tmp_path / "block4_thresholds.npy"), res.thresholds)
  summary = json.loads((tmp_path / "block4_summary.json").read_text())
  assert summary["num_units"] == res.num_units


def test_sharded_equals_single_device(tiny_probe_dir, tiny_model_dir, tmp_path):
  """4 forced host devices give the same thresholds, tallies and IoU as 1 device."""
  script = (
      "import sys, numpy as np, jax\n"
      "from nemjax.data import broden\n"
      "from nemjax.models import checkpoint\n"
      "from nemjax.dissect.driver import dissect\n"
      "probe = broden.load_probe(sys.argv[1]); model = checkpoint.load(sys.argv[2])\n"
      "res = dissect(model, probe, ['block3', 'block4'], batch_size=8, progress=False)\n"
      "np.savez(sys.argv[3], n=len(jax.devices()), **{f'{l}_{k}': np.asarray(v) for l, r in res.items()"
      " for k, v in [('thr', r.thresholds), ('both', r.tally.tally_both), ('cat', r.tally.tally_units_cat),"
      " ('iou', r.iou)]})\n")
  outs = []
  for n in (1, 4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    out = tmp_path / f"d{n}.npz"
    subprocess.run([sys.executable, "-c", script, str(tiny_probe_dir), str(tiny_model_dir), str(out)],
                   check=True, env=env, cwd=REPO)
    outs.append(np.load(out))
  assert int(outs[0]["n"]) == 1 and int(outs[1]["n"]) == 4
  for k in (f for f in outs[0].files if f != "n"):
    np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)


def test_dissect_cli(tiny_probe_dir, tiny_model_dir, tmp_path):
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "experiments/dissect.py", "--probe", str(tiny_probe_dir),
                      "--weights", str(tiny_model_dir), "--layers", "block4", "--out", str(out),
                      "--batch-size", "8", "--report-top", "2"],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  for suffix in ("_tally.csv", "_thresholds.npy", "_iou.npy", "_summary.json", "_report.html"):
    assert (out / f"block4{suffix}").exists(), suffix
  assert len(list((out / "block4_report").glob("unit*.png"))) == 128
  # given thresholds are used as they are
  thr = np.load(out / "block4_thresholds.npy") * 0.5
  np.save(tmp_path / "thr.npy", thr)
  out2 = tmp_path / "out2"
  r = subprocess.run([sys.executable, "experiments/dissect.py", "--probe", str(tiny_probe_dir),
                      "--weights", str(tiny_model_dir), "--layers", "block4", "--out", str(out2),
                      "--thresholds", f"block4={tmp_path / 'thr.npy'}", "--no-report"],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  np.testing.assert_array_equal(np.load(out2 / "block4_thresholds.npy"), thr)


@pytest.mark.parametrize("args, message", [
    (["--layers", "nope"], "nope"),
    (["--layers", "block4", "--quantile", "2"], "--quantile"),
])
def test_dissect_cli_bad_input(tiny_probe_dir, tiny_model_dir, tmp_path, args, message):
  r = subprocess.run([sys.executable, "experiments/dissect.py", "--probe", str(tiny_probe_dir),
                      "--weights", str(tiny_model_dir), "--out", str(tmp_path), *args],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr
