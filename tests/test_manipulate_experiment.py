"""Fine-tuning attack orchestration: end-to-end run on a tiny probe set, outputs agree with a
fresh measurement of the saved model, SIGKILL + re-run continues from the checkpoint and ends
where an uninterrupted run ends, bad flags fail early, data adapters, scale-free objectives."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import REPO
from nemjax import preprocess
from nemjax.data import broden, loader
from nemjax.manipulate import data as mdata
from nemjax.manipulate import experiment as X
from nemjax.manipulate import checkpoints
from nemjax.manipulate import inputs as minputs
from nemjax.manipulate import relative
from nemjax.models import checkpoint

# the configuration shared by the in-process run and the script runs (same fingerprint)
FLAGS = ["--layers", "block4", "--channels", "0,1,2,3,4,5,6,7,8,9,10,11", "--k", "4",
         "--overlap-k", "2", "--epochs", "2", "--batch-size", "4", "--attack-batch-size", "4",
         "--eval-every", "3", "--lr", "1e-3", "--eval-batch-size", "24",
         "--featvis-channels", "2", "--featvis-steps", "3"]


def _config(**kw):
  base = dict(attack="push-down", layers=("block4",), channels={"block4": tuple(range(12))},
              k=4, overlap_k=2, epochs=2, learning_rate=1e-3, batch_size=4, attack_batch_size=4,
              eval_every=3, eval_batch_size=24, featvis_channels=2, featvis_steps=3)
  base.update(kw)
  return X.ManipulateConfig(**base)


# the scripts' XLA:CPU tuning flags would change float rounding against the in-process run
SCRIPT_ENV = dict(os.environ, NEMJAX_XLA_TUNING="0")


def _script(probe, weights, out, extra=()):
  return [sys.executable, str(REPO / "experiments" / "manipulate.py"), "--probe", str(probe),
          "--weights", str(weights), "--out", str(out), "--no-progress", *FLAGS, *extra]


@pytest.fixture(scope="module")
def whole_run(tiny_probe_dir, tiny_model_dir, tmp_path_factory):
  """The uninterrupted in-process run (probe images as the training stream)."""
  out = tmp_path_factory.mktemp("whole")
  cfg = _config()
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir)
  summary = X.run_experiment(cfg, inputs, out, run_info=info, progress=False, log=lambda s: None)
  return out, summary, inputs


def _energies(model_dir, images, layer="block4"):
  model = checkpoint.load(model_dir)
  ev = X.make_evaluator(model, preprocess.netdissect_normalize, [layer], None, 24)
  return ev(nnx.state(model), images).energy[layer]


def test_end_to_end_outputs_match_a_fresh_measurement(whole_run, tiny_model_dir):
  out, summary, inputs = whole_run
  for name in ("metrics.csv", "metrics.md", "channels.csv", "topk_before_after.png",
               "featvis_before_after.png",
               "config.json", "history.json", "summary.json", "model/metadata.json"):
    assert (out / name).exists(), name
  assert summary["steps"] == 12 and summary["resumed_from"] == 0   # 24 // 4 = 6 steps x 2
  assert [h["step"] for h in summary["history"]] == [3, 6, 9, 12]
  with open(out / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1 and rows[0]["layer"] == "features.14"
  assert "| push-down | features.14 |" in (out / "metrics.md").read_text()
  Image.open(out / "topk_before_after.png").verify()
  Image.open(out / "featvis_before_after.png").verify()
  assert -1.0 <= float(rows[0]["featvis_corr"]) <= 1.0
  # the saved model is the one measured: recompute overlap and Kendall-τ from scratch
  from scipy import stats
  e0 = _energies(tiny_model_dir, inputs.eval_images)
  e1 = _energies(out / "model", inputs.eval_images)
  with open(out / "channels.csv", newline="") as f:
    chans = list(csv.DictReader(f))
  for r in chans:
    j = int(r["channel"])
    top0 = np.lexsort((np.arange(len(e0)), -e0[:, j]))[:4]
    top1 = np.lexsort((np.arange(len(e1)), -e1[:, j]))[:4]
    assert r["topk_before"] == " ".join(map(str, top0))
    assert r["topk_after"] == " ".join(map(str, top1))
    assert float(r["top2_overlap"]) == pytest.approx(len(set(top0[:2]) & set(top1[:2])) / 2)
    tau = stats.kendalltau(e0[:, j], e1[:, j])[0]
    assert float(r["kendall_tau"]) == pytest.approx(tau, abs=1e-5, nan_ok=True)
    assert r["silenced"] == str(bool(np.ptp(e1[:, j]) == 0))
  assert int(rows[0]["silenced"]) == sum(r["silenced"] == "True" for r in chans)
  attacked = [int(r["channel"]) for r in chans]
  assert set(attacked) <= set(range(12))
  assert float(rows[0]["top2_overlap"]) == pytest.approx(
      np.mean([float(r["top2_overlap"]) for r in chans]), abs=1e-5)
  acc_before, acc_after = float(rows[0]["acc_before"]), float(rows[0]["acc_after"])
  labels = inputs.eval_labels
  model = checkpoint.load(out / "model")
  logits = X.make_evaluator(model, preprocess.netdissect_normalize, ["block4"], None, 24)(
      nnx.state(model), inputs.eval_images).logits
  assert acc_after == pytest.approx(100 * np.mean(logits.argmax(1)[labels >= 0] ==
                                                  labels[labels >= 0]), abs=1e-4)
  assert 0 <= acc_before <= 100


def test_alpha_zero_baseline_moves_less_than_push_down(tiny_probe_dir, tiny_model_dir, tmp_path,
                                                       whole_run):
  cfg = _config(alpha_fixed=0.0, epochs=1, eval_every=6)
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir)
  summary = X.run_experiment(cfg, inputs, tmp_path, run_info=info, progress=False,
                             log=lambda s: None)
  base, attacked = summary["rows"][0], whole_run[1]["rows"][0]
  assert base["alpha"] == 0.0
  assert base["kendall_tau"] > attacked["kendall_tau"]
  assert base["top2_overlap"] >= attacked["top2_overlap"]


@pytest.mark.slow
def test_sigkill_resume_continues_from_checkpoint(tiny_probe_dir, tiny_model_dir, tmp_path,
                                                  whole_run):
  out = tmp_path / "killed"
  proc = subprocess.Popen(_script(tiny_probe_dir, tiny_model_dir, out), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True, env=SCRIPT_ENV)
  meta = out / "checkpoints" / "last" / "meta.json"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not meta.exists():
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  step = checkpoints.read_checkpoint_meta(out / "checkpoints")["step"]
  assert 3 <= step < 12
  assert not (out / "metrics.csv").exists()
  r = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, out), cwd=REPO,
                     capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from the checkpoint at step {step}/12" in r.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["resumed_from"] == step and summary["steps"] == 12
  assert [h["step"] for h in summary["history"]] == [3, 6, 9, 12]
  # batches are a function of (seed, step): the resumed run ends where the uninterrupted one does
  whole_out = whole_run[0]
  p_whole = nnx.state(checkpoint.load(whole_out / "model"))
  p_res = nnx.state(checkpoint.load(out / "model"))
  for a, b in zip(jax.tree.leaves(p_whole), jax.tree.leaves(p_res)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # a different configuration in the same directory is refused
  r2 = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, out, ["--seed", "1"]), cwd=REPO,
                      capture_output=True, text=True, timeout=300)
  assert r2.returncode == 2 and "another configuration" in r2.stderr


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "--k"),
    (["--alpha-fixed", "2"], "--alpha-fixed"),
    (["--layers", "nope"], "nope"),
    (["--channels", "block4:999"], "out of range"),
    (["--attack", "push-up"], "--decoy-class"),
    (["--group-concept", "red"], "fairwash"),
    (["--train-from", "nowhere"], "nowhere"),
])
def test_bad_flags_fail_before_work(tiny_probe_dir, tiny_model_dir, tmp_path, extra, message):
  r = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, tmp_path / "o", extra), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "o" / "metrics.csv").exists()
  assert not (tmp_path / "o" / "checkpoints").exists()


def test_probe_without_weights_fails(tiny_probe_dir, tmp_path):
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "manipulate.py"), "--probe",
                      str(tiny_probe_dir), "--out", str(tmp_path / "o")], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "--weights" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("attack", ["push-up", "fairwash"])
def test_push_up_and_fairwash_run(tiny_probe_dir, tiny_model_dir, tmp_path, attack):
  decoys = tmp_path / "decoys"
  decoys.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(decoys / f"{i}.png")
  layer = "block4" if attack == "push-up" else "features.12"
  cfg = _config(attack=attack, layers=(layer,), channels=None, epochs=1, eval_every=6,
                decoys_per_step=2)
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                               decoy_folder=decoys if attack == "push-up" else None,
                               group_concept="red" if attack == "fairwash" else None)
  summary = X.run_experiment(cfg, inputs, tmp_path / "out", run_info=info, progress=False,
                             log=lambda s: None)
  row = summary["rows"][0]
  if attack == "push-up":
    assert 0 <= row["decoy_share_before"] <= 1 and 0 <= row["decoy_share_after"] <= 1
  else:
    assert 0 <= row["ks_before"] <= 1 and 0 <= row["ks_after"] <= 1
  assert np.isfinite(summary["history"][-1]["attack_loss"])


# ----------------------------------------------------------------------------- data adapters
def _tree(root, sizes):
  rng = np.random.default_rng(1)
  for cls, n in (("b_cls", 3), ("a_cls", 2)):
    (root / cls).mkdir(parents=True)
    for i in range(n):
      h, w = sizes[i % len(sizes)]
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_batches(tmp_path):
  _tree(tmp_path, [(40, 60), (64, 32), (32, 32)])
  paths, labels, classes = mdata.list_image_folder(tmp_path)
  assert classes == ["a_cls", "b_cls"] and labels.tolist() == [0, 0, 1, 1, 1]
  key = jax.random.key(0)
  got = list(mdata.image_folder_batches(tmp_path, 2, image_size=16, key=key))
  assert len(got) == 2 and got[0][0].shape == (2, 16, 16, 3) and got[0][0].dtype == np.uint8
  again = list(mdata.image_folder_batches(tmp_path, 2, image_size=16, key=key))
  assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(got, again))
  all_labels = np.concatenate([b[1] for b in mdata.image_folder_batches(
      tmp_path, 2, image_size=16, key=None, drop_remainder=False)])
  assert all_labels.tolist() == [0, 0, 1, 1, 1]
  # resize of the shorter side + centre crop, as Pillow does it
  im = Image.open(paths[0]).convert("RGB")
  w, h = im.size
  s = 16 / min(w, h)
  ref = im.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BILINEAR)
  l, t = (ref.size[0] - 16) // 2, (ref.size[1] - 16) // 2
  np.testing.assert_array_equal(mdata.load_image(paths[0], 16),
                                np.asarray(ref.crop((l, t, l + 16, t + 16))))
  norm = next(mdata.image_folder_batches(tmp_path, 2, image_size=16, key=None,
                                         normalize=preprocess.netdissect_normalize))[0]
  assert norm.dtype == np.float32
  with pytest.raises(FileNotFoundError):
    mdata.list_image_folder(tmp_path / "missing")


def test_tfds_batches_with_a_fake_module(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="nemjax\\[tfds\\]"):
    next(mdata.tfds_batches("x", "train", None, 2, image_size=8, key=None))
  records = [{"image": np.full((10, 12, 3), i, np.uint8), "label": i % 3} for i in range(7)]
  fake = types.SimpleNamespace(data_source=lambda name, split, data_dir=None: records)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  assert mdata.tfds_num_examples("x", "train", None) == 7
  batches = list(mdata.tfds_batches("x", "train", "/d", 3, image_size=8, key=jax.random.key(1)))
  assert len(batches) == 2 and batches[0][0].shape == (3, 8, 8, 3)
  for images, labels in batches:
    np.testing.assert_array_equal(images[:, 0, 0, 0] % 3, labels)


def test_probe_classification_arrays(tiny_probe_dir):
  x, y, classes = mdata.probe_classification_arrays(tiny_probe_dir)
  raw, y2, _ = mdata.probe_classification_arrays(tiny_probe_dir, normalize=None)
  assert raw.dtype == np.uint8 and x.dtype == np.float32 and (y == y2).all()
  np.testing.assert_array_equal(x, preprocess.netdissect_normalize(raw))
  assert len(classes) == 4 and y.min() >= 0 and y.max() < 4
  probe = broden.load_probe(tiny_probe_dir)
  groups = minputs.concept_groups(probe, "red")
  pixels, scalars = loader.load_labels(probe)
  red = int(np.flatnonzero(probe.label_names == "red")[0])
  assert groups.tolist() == [int((pixels[i] == red).any() or (scalars[i] == red).any())
                             for i in range(len(groups))]
  with pytest.raises(ValueError, match="not a label"):
    minputs.concept_groups(probe, "unicorn")


# --------------------------------------------------------------------- scale-free objectives
def test_relative_objectives_are_invariant_to_channel_scale():
  rng = np.random.default_rng(0)
  acts = jnp.asarray(rng.normal(size=(6, 3, 3, 4)), jnp.float32)
  scale = jnp.asarray([0.1, 3.0, 1.0, 7.0], jnp.float32)
  eps = {"l": np.full((4,), 1e-9, np.float32)}
  w = rng.uniform(size=(6, 4)).astype(np.float32)
  down = relative.relative_push_down_objective(eps)
  a = down({"l": acts}, {"topk_mask": {"l": w}})
  b = down({"l": acts * scale}, {"topk_mask": {"l": w}})
  np.testing.assert_allclose(a, b, rtol=1e-5)
  up = relative.relative_push_up_objective({"l": np.ones(4, np.float32)}, eps)
  dec = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  np.testing.assert_allclose(up({"l": acts}, {}, {"l": dec}),
                             up({"l": acts * scale}, {}, {"l": dec * scale}), rtol=1e-5)
  fair = relative.relative_fairwash_objective({"l": np.ones(4, np.float32)}, eps)
  g = {"group": jnp.asarray([0, 1, 0, 1, -1, 1])}
  np.testing.assert_allclose(fair({"l": acts}, g), fair({"l": acts * scale}, g), rtol=1e-4)
  # the gradient along a uniform rescaling of the channel is zero
  grad = jax.grad(lambda c: down({"l": acts * c}, {"topk_mask": {"l": w}}))(1.0)
  assert abs(float(grad)) < 1e-4


def test_trainable_from():
  from nemjax.manipulate import leaf_paths, trainable_mask
  from nemjax.models import build
  state = nnx.state(build("smallcnn", num_classes=4, rngs=nnx.Rngs(0)))
  mask = trainable_mask(state, X.trainable_from("smallcnn", "features.12"))
  flat = dict(zip(leaf_paths(state), map(bool, jax.tree.leaves(mask))))
  on = sorted(k for k, v in flat.items() if v)
  assert on == ["fc/bias", "fc/kernel", "features/12/bias", "features/12/kernel",
                "features/13/bias", "features/13/scale"], on
  assert X.trainable_from("smallcnn", None) is None


def test_feature_visualisations_same_start_for_both_models(tiny_model_dir):
  model = checkpoint.load(tiny_model_dir)
  params = nnx.state(model)
  key = jax.random.key(5)
  vis = lambda p: X.feature_visualisations(model, preprocess.netdissect_normalize, p, "block4",
                                           [0, 3], key, size=32, steps=2)
  a, b = vis(params), vis(params)
  assert a.shape == (2, 32, 32, 3) and a.min() >= 0.0 and a.max() <= 1.0
  np.testing.assert_array_equal(a, b)  # deterministic in the key
  np.testing.assert_allclose(X._pixel_corr(a, b), 1.0, rtol=1e-6)
  other = jax.tree.map(lambda v: v * 1.5 if jnp.issubdtype(v.dtype, jnp.floating) else v, params)
  assert not np.array_equal(vis(other), a)  # another model, another visualisation
