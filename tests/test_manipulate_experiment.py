"""Fine-tuning attack orchestration: end-to-end run on a tiny probe set, outputs agree with a
fresh measurement of the saved model, held-out images are never trained or ranked on,
SIGKILL + re-run continues from the checkpoint and ends where an uninterrupted run ends, bad
flags fail early, the pruning defence end to end, data adapters, scale-free objectives,
feature-visualisation similarity."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

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
from nemjax.manipulate import alpha as alpha_rule
from nemjax.manipulate import attack as A
from nemjax.manipulate import config as C
from nemjax.manipulate import evaluation as E
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
              eval_every=3, eval_batch_size=24, featvis=C.FeatVisReport(channels=2, steps=3))
  base.update(kw)
  return C.ManipulateConfig(**base)


# the scripts' XLA:CPU tuning flags would change float rounding against the in-process run
SCRIPT_ENV = dict(os.environ, NEMJAX_XLA_TUNING="0")


def _script(probe, weights, val, out, extra=(), name="manipulate.py", flags=FLAGS):
  return [sys.executable, str(REPO / "experiments" / name), "--probe", str(probe),
          "--weights", str(weights), "--val-folder", str(val), "--out", str(out),
          "--no-progress", *flags, *extra]


@pytest.fixture(scope="module")
def whole_run(tiny_probe_dir, tiny_model_dir, val_folder, tmp_path_factory):
  """The uninterrupted in-process run (probe images as the training stream)."""
  out = tmp_path_factory.mktemp("whole")
  cfg = _config()
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                     val_folder=val_folder)
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
  e0 = _energies(tiny_model_dir, inputs.probe_images)
  e1 = _energies(out / "model", inputs.probe_images)
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
  # both accuracies, before and after, recomputed from the saved models: held-out on the
  # held-out images, train on the first images of the training stream
  assert (inputs.heldout_labels >= 0).all() and len(inputs.heldout_labels) == 10
  for col, model_dir in (("before", tiny_model_dir), ("after", out / "model")):
    model = checkpoint.load(model_dir)
    ev = X.make_evaluator(model, preprocess.netdissect_normalize, ["block4"], None, 24)
    for kind, x, y in (("heldout", inputs.heldout_images, inputs.heldout_labels),
                       ("train", inputs.train_eval_images, inputs.train_eval_labels)):
      pred = ev(nnx.state(model), x).logits.argmax(1)
      assert float(rows[0][f"{kind}_acc_{col}"]) == pytest.approx(
          100 * np.mean(pred[y >= 0] == y[y >= 0]), abs=1e-4), (kind, col)
  assert summary["history"][-1]["heldout_accuracy"] == pytest.approx(
      float(rows[0]["heldout_acc_after"]), abs=1e-4)
  # the table reports train and held-out accuracy side by side, and says what they are
  md = (out / "metrics.md").read_text()
  for title in ("train acc. before (%)", "train acc. after (%)", "held-out acc. before (%)",
                "held-out acc. after (%)"):
    assert title in md
  assert "top-1 accuracy on 10 held-out images" in md and "agreement" not in md


def test_alpha_zero_baseline_moves_less_than_push_down(tiny_probe_dir, tiny_model_dir, tmp_path,
                                                       whole_run, heldout_probe_dir):
  cfg = _config(alpha=C.AlphaConfig(fixed=0.0), epochs=1, eval_every=6)
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                     heldout_dir=heldout_probe_dir)
  summary = X.run_experiment(cfg, inputs, tmp_path, run_info=info, progress=False,
                             log=lambda s: None)
  base, attacked = summary["rows"][0], whole_run[1]["rows"][0]
  assert base["alpha"] == 0.0
  assert base["kendall_tau"] > attacked["kendall_tau"]
  assert base["top2_overlap"] >= attacked["top2_overlap"]


@pytest.mark.slow
def test_sigkill_resume_continues_from_checkpoint(tiny_probe_dir, tiny_model_dir, tmp_path,
                                                  whole_run, val_folder):
  out = tmp_path / "killed"
  proc = subprocess.Popen(_script(tiny_probe_dir, tiny_model_dir, val_folder, out), cwd=REPO,
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
  r = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, val_folder, out), cwd=REPO,
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
  r2 = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, val_folder, out, ["--seed", "1"]),
                      cwd=REPO,
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
    (["--train-folder", "/nonexistent-train"], "--train-folder"),
    (["--val-size", "0"], "--val-size"),
])
def test_bad_flags_fail_before_work(tiny_probe_dir, tiny_model_dir, val_folder, tmp_path, extra,
                                    message):
  r = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, val_folder, tmp_path / "o", extra),
                     cwd=REPO,
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


@pytest.mark.parametrize("name", ["manipulate.py", "prune_defence.py"])
def test_probe_run_without_heldout_images_is_refused(tiny_probe_dir, tiny_model_dir, tmp_path,
                                                     name):
  r = subprocess.run([sys.executable, str(REPO / "experiments" / name), "--probe",
                      str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--out",
                      str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and "--val-folder" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("attack", ["push-up", "fairwash"])
def test_push_up_and_fairwash_run(tiny_probe_dir, tiny_model_dir, heldout_probe_dir, tmp_path,
                                  attack):
  decoys = tmp_path / "decoys"
  decoys.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(decoys / f"{i}.png")
  layer = "block4" if attack == "push-up" else "features.12"
  data = (C.DataSources(decoy_folder=decoys) if attack == "push-up"
          else C.DataSources(group_concept="red"))
  cfg = _config(attack=attack, layers=(layer,), channels=None, epochs=1, eval_every=6,
                decoys_per_step=2, data=data)
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                     heldout_dir=heldout_probe_dir,
                                     decoy_folder=decoys if attack == "push-up" else None,
                                     group_concept="red" if attack == "fairwash" else None)
  summary = X.run_experiment(cfg, inputs, tmp_path / "out", run_info=info, progress=False,
                             log=lambda s: None)
  row = summary["rows"][0]
  if attack == "push-up":
    assert 0 <= row["decoy_share_before"] <= 1 and 0 <= row["decoy_share_after"] <= 1
  else:
    assert 0 <= row["ks_before"] <= 1 and 0 <= row["ks_after"] <= 1
    # DDI / DEO before and after, as a fresh measurement of both models on the probe images
    from nemjax import metrics as nm
    classes = np.arange(4)
    for side, model_dir in (("before", tiny_model_dir), ("after", tmp_path / "out" / "model")):
      model = checkpoint.load(model_dir)
      logits = X.make_evaluator(model, preprocess.netdissect_normalize, [layer], None, 24)(
          nnx.state(model), inputs.probe_images).logits
      ddi = np.asarray(nm.ddi(logits, inputs.groups, classes))
      deo = np.asarray(nm.deo(logits, inputs.probe_labels, inputs.groups, classes))
      assert row[f"ddi_{side}"] == pytest.approx(np.nanmean(ddi), abs=1e-6)
      assert row[f"deo_{side}"] == pytest.approx(np.nanmean(deo), abs=1e-6, nan_ok=True)
      assert 0 <= row[f"ddi_{side}"] <= 1
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| DDI before | DDI after | DEO before | DEO after |" in md
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
  mask = trainable_mask(state, A.trainable_from("smallcnn", "features.12"))
  flat = dict(zip(leaf_paths(state), map(bool, jax.tree.leaves(mask))))
  on = sorted(k for k, v in flat.items() if v)
  assert on == ["fc/bias", "fc/kernel", "features/12/bias", "features/12/kernel",
                "features/13/bias", "features/13/scale"], on
  assert A.trainable_from("smallcnn", None) is None


def test_feature_visualisations_same_start_for_both_models(tiny_model_dir):
  model = checkpoint.load(tiny_model_dir)
  params = nnx.state(model)
  key = jax.random.key(5)
  vis = lambda p: X.feature_visualisations(model, preprocess.netdissect_normalize, p, "block4",
                                           [0, 3], key, size=32, steps=2)
  a, b = vis(params), vis(params)
  assert a.shape == (2, 32, 32, 3) and a.min() >= 0.0 and a.max() <= 1.0
  np.testing.assert_array_equal(a, b)  # deterministic in the key
  np.testing.assert_allclose(X.pixel_correlation(a, b), 1.0, rtol=1e-6)
  other = jax.tree.map(lambda v: v * 1.5 if jnp.issubdtype(v.dtype, jnp.floating) else v, params)
  assert not np.array_equal(vis(other), a)  # another model, another visualisation


# ------------------------------------------------------------------------- held-out images
def test_heldout_images_are_never_trained_or_ranked_on(tiny_probe_dir, tiny_model_dir,
                                                       heldout_probe_dir, tmp_path, monkeypatch):
  """Every image a train step sees and every image ranked is fingerprinted: none is held-out;
  the accuracy (and so the α rule) is computed on exactly the held-out images."""
  from nemjax.manipulate import train as mtrain
  cfg = _config(epochs=1, eval_every=3, featvis=C.FeatVisReport(channels=0))
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                     heldout_dir=heldout_probe_dir, train_eval_size=8)
  held = E.image_fingerprints(inputs.heldout_images)
  trained, ranked, scored = [], [], []
  make_step = mtrain.make_train_step

  def spy_step(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def wrapped(state, batch, alpha):
      trained.append(E.image_fingerprints(np.asarray(batch["image"])))
      return step(state, batch, alpha)
    return wrapped

  make_eval = X.make_evaluator

  def spy_evaluator(*args, **kwargs):
    evaluate = make_eval(*args, **kwargs)

    def wrapped(params, images, logits_only=False):
      (scored if logits_only else ranked).append(E.image_fingerprints(images))
      return evaluate(params, images, logits_only)
    return wrapped

  fed_to_alpha = []
  alpha_update = alpha_rule.alpha_update

  def spy_alpha(state, accuracy, cfg):
    fed_to_alpha.append(float(accuracy))
    return alpha_update(state, accuracy, cfg)

  monkeypatch.setattr(mtrain, "make_train_step", spy_step)
  monkeypatch.setattr(X, "make_evaluator", spy_evaluator)
  monkeypatch.setattr(alpha_rule, "alpha_update", spy_alpha)
  summary = X.run_experiment(cfg, inputs, tmp_path, run_info=info, progress=False,
                             log=lambda s: None)
  assert len(trained) == 6 and len(ranked) >= 3
  assert all(not (f & held) for f in trained + ranked)
  assert held in scored                                   # accuracy: the held-out set itself
  assert E.image_fingerprints(inputs.train_eval_images) in scored
  assert all(f == held or f == E.image_fingerprints(inputs.train_eval_images) for f in scored)
  # the stream's images over every epoch and the probe are disjoint from the held-out set
  for e in range(2):
    for x, _ in inputs.train_batches(e):
      assert not (E.image_fingerprints(x) & held)
  assert not (E.image_fingerprints(inputs.probe_images) & held)
  # the α rule is fed the held-out accuracy of every evaluation (the train one only reported)
  assert fed_to_alpha == [h["heldout_accuracy"] for h in summary["history"]]
  assert len(fed_to_alpha) == 2 and all("train_accuracy" in h for h in summary["history"])


def test_heldout_images_shared_with_probe_or_stream_are_refused(tiny_probe_dir, tiny_model_dir,
                                                                tmp_path):
  cfg = _config()
  with pytest.raises(ValueError, match="also probe images"):   # the probe as "held-out"
    minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                        heldout_dir=tiny_probe_dir)
  with pytest.raises(ValueError, match="exactly one held-out source"):
    minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir)
  # one probe image copied into an otherwise unseen folder
  x = loader.load_images(broden.load_probe(tiny_probe_dir))
  (tmp_path / "val").mkdir()
  Image.fromarray(np.full((224, 224, 3), 7, np.uint8)).save(tmp_path / "val" / "a.png")
  Image.fromarray(x[5]).save(tmp_path / "val" / "b.png")
  with pytest.raises(ValueError, match="1 of the 2 held-out images are also probe images"):
    minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                        val_folder=tmp_path / "val", val_unlabelled=True)
  with pytest.raises(ValueError, match="class sub-directories, the model 4 outputs"):
    minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                        val_folder=tmp_path)


def test_unlabelled_heldout_images_report_agreement(tiny_probe_dir, tiny_model_dir, val_folder):
  cfg = _config()
  inputs, info = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                     val_folder=val_folder, val_unlabelled=True, val_size=6)
  assert (inputs.heldout_labels == -1).all() and len(inputs.heldout_images) == 6
  assert info["heldout_accuracy"] == "top-1 agreement with the original model"
  note = X.accuracy_note(inputs)
  assert "agreement with the original model" in note and "not accuracy" in note
  logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
  other = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 3, 3]]
  assert E.accuracy_percent(other, inputs.heldout_labels, logits) == pytest.approx(400 / 6)


# ------------------------------------------------------------------------- pruning defence
def test_prune_defence_cli_end_to_end(tiny_probe_dir, tiny_model_dir, val_folder, tmp_path):
  out = tmp_path / "prune"
  flags = ["--layer", "block4", "--k", "4", "--epochs", "1", "--batch-size", "4",
           "--attack-batch-size", "4", "--eval-every", "3", "--recover-steps", "2",
           "--l1-rates", "0.5", "--vulnerability-rates", "0.25", "--train-eval-size", "8"]
  r = subprocess.run(_script(tiny_probe_dir, tiny_model_dir, val_folder, out,
                             name="prune_defence.py", flags=flags),
                     cwd=REPO, capture_output=True, text=True, timeout=600, env=SCRIPT_ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], float(r["rate"])) for r in rows] == [
      ("none", 0.0), ("l1", 0.5), ("vulnerability", 0.25)]
  assert float(rows[0]["pruned_fraction"]) == 0.0
  assert float(rows[1]["pruned_fraction"]) == pytest.approx(0.5, abs=1e-3)
  assert 0 < float(rows[2]["pruned_fraction"]) < 0.5
  # the original model's held-out and train accuracy, measured afresh
  x, y = [], []
  paths, labels, _ = mdata.list_image_folder(val_folder)
  held = mdata.load_image_files(paths, 224)
  model = checkpoint.load(tiny_model_dir)
  ev = X.make_evaluator(model, preprocess.netdissect_normalize, ["block4"], None, 24)
  acc = 100 * np.mean(ev(nnx.state(model), held).logits.argmax(1) == labels)
  for row in rows:
    assert float(row["heldout_acc_original"]) == pytest.approx(acc, abs=1e-3)
    for col in ("train_acc_original", "heldout_acc_pruned", "train_acc_pruned",
                "heldout_acc_attacked", "train_acc_attacked"):
      assert 0.0 <= float(row[col]) <= 100.0, col
    assert float(row["delta_heldout_acc"]) == pytest.approx(
        float(row["heldout_acc_attacked"]) - float(row["heldout_acc_pruned"]), abs=1e-3)
    assert np.isfinite(float(row["clip_delta"])) and int(row["channels"]) > 0
  assert float(rows[0]["heldout_acc_pruned"]) == pytest.approx(acc, abs=1e-3)
  md = (out / "results.md").read_text()
  assert "held-out acc. after attack (%)" in md and "train acc. after attack (%)" in md
  assert "top-1 accuracy on" in md and "held-out images" in md
  Image.open(out / "prune_defence.png").verify()


# ---------------------------------------------------------------- feature-visualisation r
def test_pixel_correlation_of_a_constant_image_is_undefined():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
  b = a.copy()
  b[1] = 0.5                                                      # blank grey
  b[2] = 0.3 + rng.normal(scale=1e-7, size=b[2].shape)            # grey + rounding noise
  b[3] = 1.0 - a[3]
  a[0] = a[0]
  r = X.pixel_correlation(a, b)
  assert r[0] == pytest.approx(1.0) and r[3] == pytest.approx(-1.0, abs=1e-6)
  assert np.isnan(r[1]) and np.isnan(r[2])
  grey = np.full((2, 8, 8, 3), 0.5, np.float32)
  assert np.isnan(X.pixel_correlation(grey, grey)).all()        # never r = 1 for two blanks
  np.testing.assert_allclose(r[0], np.corrcoef(a[0].ravel(), b[0].ravel())[0, 1], rtol=1e-6)
  from nemjax.manipulate import report
  table = report.format_table([{"layer": "l", "featvis_corr": E.nanmean(r[1:3]),
                                "featvis_undefined": 2}])
  assert "| l | undefined | 2 |" in table
  with pytest.raises(ValueError, match="one shape"):
    X.pixel_correlation(a, b[:2])
