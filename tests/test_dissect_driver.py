"""The dissection driver through a real model on the synthetic probe set: equals the NumPy
oracle exactly, streams (two passes, no stored activations) with bit-identical results, is
identical on 1 and 4 devices, writes NetDissect-Lite's files, and its CLI fails cleanly."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nemjax.dissect
import oracle_netdissect as oracle
from cli_helpers import cli_error, import_script
from conftest import REPO
from nemjax.data import broden, loader
from nemjax.dissect import driver
from nemjax.dissect.driver import dissect
from nemjax.dissect.html import write_layer_report
from nemjax.dissect.outputs import write_layer_outputs
from nemjax.dissect.topimages import top_images_from_acts
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


def _assert_same_results(a, b, layers=LAYERS):
  for layer in layers:
    ra, rb = a[layer], b[layer]
    np.testing.assert_array_equal(ra.thresholds, rb.thresholds, err_msg=layer)
    for f in ("tally_both", "tally_labels", "tally_units_cat", "tally_units"):
      np.testing.assert_array_equal(getattr(ra.tally, f), getattr(rb.tally, f), err_msg=f)
    for f in ("iou", "category_labels", "category_scores", "best_category", "best_label", "score"):
      np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f"{layer} {f}")


def test_public_streaming_dissect_is_bit_identical(dissected, monkeypatch):
  """``nemjax.dissect.dissect`` streaming (two passes, no activation store) and within its RAM
  budget (one pass) gives the results of the oracle-checked keep_activations path, and each
  unit's top images."""
  probe, model, kept, acts = dissected

  def no_store(*args, **kwargs):
    raise AssertionError("the streaming path must not store activations")

  monkeypatch.setattr(driver, "_ActivationStore", no_store)
  passes = []
  real = driver.loader.iterate_batches
  monkeypatch.setattr(driver.loader, "iterate_batches",
                      lambda *a, **k: passes.append(1) or real(*a, **k))
  streamed = nemjax.dissect.dissect(model, probe, LAYERS, batch_size=8, progress=False,
                                    num_top_images=3, max_ram_bytes=0)
  assert len(passes) == 2
  _assert_same_results(kept, streamed)
  for layer in LAYERS:
    top = streamed[layer].top_images
    ref = top_images_from_acts(acts[layer], 3)
    for f in ("value", "row", "maps"):
      np.testing.assert_array_equal(getattr(top, f), getattr(ref, f), err_msg=f)
    peak = acts[layer].max(axis=(1, 2))  # (N, U)
    for u in (0, 5, 63):
      np.testing.assert_array_equal(top.row[u], np.argsort(-peak[:, u], kind="stable")[:3])
      np.testing.assert_array_equal(top.maps[u], acts[layer][top.row[u], :, :, u])
  # Given thresholds for every layer: one pass only, same tally as with the stored path.
  thr = {layer: kept[layer].thresholds * 0.75 for layer in LAYERS}
  passes.clear()
  one = nemjax.dissect.dissect(model, probe, LAYERS, batch_size=8, progress=False,
                               thresholds=thr, num_top_images=2)
  assert len(passes) == 1 and one["block4"].top_images.row.shape == (128, 2)
  monkeypatch.undo()
  # Activations within the RAM budget (the default 1 GiB here): one pass, the same results.
  passes.clear()
  monkeypatch.setattr(driver.loader, "iterate_batches",
                      lambda *a, **k: passes.append(1) or real(*a, **k))
  cached = nemjax.dissect.dissect(model, probe, LAYERS, batch_size=8, progress=False)
  assert len(passes) == 1
  _assert_same_results(kept, cached)
  monkeypatch.undo()
  ref = dissect(model, probe, LAYERS, batch_size=8, progress=False, thresholds=thr,
                keep_activations=True)[0]
  _assert_same_results(ref, one)


def test_streaming_with_image_overrides_and_odd_batch(dissected):
  """Overridden images go through both passes; a batch size that does not divide N."""
  probe, model, _, _ = dissected
  rng = np.random.default_rng(0)
  overrides = {r: rng.integers(0, 256, (224, 224, 3)).astype(np.uint8) for r in (1, 9, 23)}
  kept, _ = dissect(model, probe, LAYERS, batch_size=7, progress=False, keep_activations=True,
                    image_overrides=overrides)
  streamed = dissect(model, probe, LAYERS, batch_size=7, progress=False,
                     image_overrides=overrides, max_ram_bytes=0)
  _assert_same_results(kept, streamed)


def test_streaming_detects_a_nondeterministic_forward(dissected, monkeypatch):
  probe, model, _, _ = dissected
  real = driver.activation_fn
  calls = []

  def flaky(*args, **kwargs):
    fn = real(*args, **kwargs)

    def run(images):
      calls.append(1)
      out = fn(images)
      return {k: v + (1e-3 if len(calls) > 3 else 0.0) for k, v in out.items()}  # 3 batches/pass
    return run

  monkeypatch.setattr(driver, "activation_fn", flaky)
  with pytest.raises(RuntimeError, match="differ between the two passes"):
    dissect(model, probe, LAYERS, batch_size=8, progress=False, max_ram_bytes=0)


def test_dissect_validates_before_running(dissected):
  probe, model, kept, _ = dissected
  thr = kept["block4"].thresholds
  cases = [
      (dict(thresholds={"block4": thr[:5]}), r"thresholds of block4 must have shape \(128,\)"),
      (dict(thresholds={"block4": np.where(np.arange(128) == 3, np.nan, thr)}), "finite"),
      (dict(thresholds={"block9": thr}), "not dissected"),
      (dict(quantile_method="bogus"), "quantile_method"),
      (dict(top_fraction=1.5), "top_fraction"),
      (dict(tally_method="fast"), "tally_method"),
      (dict(num_top_images=-1), "num_top_images"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      dissect(model, probe, ["block4"], progress=False, **kwargs)
  with pytest.raises(ValueError, match="nope"):
    dissect(model, probe, ["nope"], progress=False)


def test_report_from_top_images_and_stale_pngs(dissected, tmp_path):
  probe, model, _, acts = dissected
  res = dissect(model, probe, ["block4"], batch_size=8, progress=False, num_top_images=2)["block4"]
  a, b = tmp_path / "a", tmp_path / "b"
  write_layer_report(a, "block4", res, probe)
  write_layer_report(b, "block4", res, probe, acts=acts["block4"], top=2)
  strips = sorted(p.name for p in (a / "block4_report").glob("unit*.jpg"))
  assert len(strips) == 128
  for name in strips[:8]:
    assert (a / "block4_report" / name).read_bytes() == (b / "block4_report" / name).read_bytes()
  assert (a / "block4_report.html").read_text() == (b / "block4_report.html").read_text()
  (a / "block4_report" / "notes.txt").write_text("kept")
  write_layer_report(a, "block4", res, probe, max_units=5, top=1)
  left = sorted(p.name for p in (a / "block4_report").iterdir())
  assert len(left) == 6 and "notes.txt" in left  # stale unit strips removed, other files kept
  with pytest.raises(ValueError, match="top must lie"):
    write_layer_report(a, "block4", res, probe, top=3)


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
  assert len(list((out / "block4_report").glob("unit*.jpg"))) == 128
  index = (out / "index.html").read_text()
  assert index.count("<tr><td>block4</td>") == 128 and "threshold" in index
  units = json.loads((out / "units.json").read_text())
  assert len(units) == 128 and {"layer", "unit", "label", "category", "iou", "threshold"} <= set(units[0])
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
    (["--layers", "block4", "--top-fraction", "2"], "--top-fraction"),
])
def test_dissect_cli_bad_input(tiny_probe_dir, tiny_model_dir, tmp_path, args, message):
  r = subprocess.run([sys.executable, "experiments/dissect.py", "--probe", str(tiny_probe_dir),
                      "--weights", str(tiny_model_dir), "--out", str(tmp_path), *args],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- CLI errors
@pytest.fixture(scope="module")
def cli():
  """experiments/dissect.py imported in-process (its venv bootstrap disabled)."""
  return import_script("dissect")


def _cli_error(cli, capsys, argv) -> str:
  return cli_error(cli, capsys, argv)


def _thr_file(tmp_path, name, content):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    np.save(path, content)
  return path


@pytest.mark.parametrize("name, content, layers, message", [
    ("missing.npy", None, ["block4"], "file not found"),
    ("garbage.npy", b"this is not a npy file", ["block4"], "cannot load"),
    ("matrix.npy", np.zeros((128, 1)), ["block4"], "must be 1-D with one threshold per unit (128,)"),
    ("short.npy", np.zeros(100), ["block4"], "got shape (100,)"),
    ("ints.npy", np.zeros(128, np.int64), ["block4"], "must hold a float array"),
    ("nan.npy", np.full(128, np.nan), ["block4"], "NaN or inf"),
    ("inf.npy", np.full(128, np.inf), ["block4"], "NaN or inf"),
    ("other.npy", np.zeros(128), ["block3"], "is not among --layers"),
])
def test_dissect_cli_bad_thresholds(cli, capsys, tiny_probe_dir, tiny_model_dir, tmp_path,
                                    name, content, layers, message):
  path = tmp_path / name if content is None else _thr_file(tmp_path, name, content)
  line = _cli_error(cli, capsys, [
      "--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", *layers,
      "--out", str(tmp_path / "out"), "--thresholds", f"block4={path}"])
  assert message in line
  assert not (tmp_path / "out").exists()


def test_dissect_cli_bad_options(cli, capsys, tiny_probe_dir, tiny_model_dir, tmp_path):
  base = ["--probe", str(tiny_probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4",
          "--out", str(tmp_path / "out")]
  assert "LAYER=FILE.npy" in _cli_error(cli, capsys, base + ["--thresholds", "block4"])
  line = _cli_error(cli, capsys, base + ["--quantile-method", "bogus"])
  assert "--quantile-method: 'bogus'" in line and "hazen" in line
  assert "nope" in _cli_error(cli, capsys, [*base[:5], "nope", *base[6:]])
  assert "not found" in _cli_error(cli, capsys, ["--probe", str(tmp_path), *base[2:]])


def test_dissect_cli_wraps_errors_raised_during_dissection(cli, capsys, tiny_probe_dir,
                                                           tiny_model_dir, tmp_path):
  """A label PNG of the wrong size is found while the probe set streams: one-line error."""
  probe_dir = tmp_path / "probe"
  shutil.copytree(tiny_probe_dir, probe_dir)
  bad = probe_dir / "images" / "synth" / "00017_object.png"
  Image.new("RGB", (50, 50)).save(bad)
  line = _cli_error(cli, capsys, [
      "--probe", str(probe_dir), "--weights", str(tiny_model_dir), "--layers", "block4",
      "--out", str(tmp_path / "out"), "--batch-size", "8", "--no-report"])
  assert line.startswith("error: dissection failed:") and "00017_object.png" in line


# ----------------------------------------------------------------------------- large layers
def _save_conv_checkpoint(arch: str, out) -> None:
  """A 2-class ``arch`` checkpoint with random conv kernels (He normal) and zero linear
  layers: the dissected conv layers are non-trivial and the (unused) classifier compresses,
  so a VGG16 checkpoint stays ~50 MB."""
  import math
  from nemjax import models
  rng = np.random.default_rng(11)

  def value(path, shape):
    if path[-1] == "kernel" and len(shape) == 4:
      std = math.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if path[-1] == "bias":
      return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return np.ones(shape, np.float32) if path[-1] in ("scale", "var") else np.zeros(shape)

  model = models.registry.fill(models.build_abstract(arch, 2), value)
  checkpoint.save(model, out, arch=arch, num_classes=2)


@pytest.mark.parametrize("arch, layer, image_size, seg_size, maps", [
    # maps larger than the label maps: downsampled (~25 s)
    pytest.param("vgg16", "conv1_2", 224, 112, (224, 224), marks=pytest.mark.slow),
    ("alexnet", "conv1", 227, 113, (56, 56)),
])
def test_dissect_cli_at_first_layers_equals_oracle(arch, layer, image_size, seg_size, maps,
                                                    tmp_path):
  """experiments/dissect.py at VGG16 conv1_2 (224x224 maps, 112x112 labels: Pillow's wide
  downsampling filter) and AlexNet conv1 (against 113x113 labels) gives the NumPy oracle's
  thresholds, tally and IoU exactly; the network is cut after the layer."""
  from nemjax.data import synthetic
  from nemjax.dissect.quantile import DEFAULT_TOP_FRACTION
  probe_dir = synthetic.make_probe_set(tmp_path / "probe", num_images=3, image_size=image_size,
                                       seg_size=seg_size, seed=4)
  ckpt = tmp_path / "ckpt"
  _save_conv_checkpoint(arch, ckpt)
  out = tmp_path / "out"
  # The same XLA flags as this process (the CLI adds its tuning flags only when XLA_FLAGS is
  # unset), so both compile the same forward pass and see bit-identical activations.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  r = subprocess.run([sys.executable, "experiments/dissect.py", "--probe", str(probe_dir),
                      "--weights", str(ckpt), "--layers", layer, "--out", str(out),
                      "--batch-size", "3", "--report-top", "1"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out / f"{layer}_report.html").exists()
  probe = broden.load_probe(probe_dir)
  res, acts = dissect(checkpoint.load(ckpt), probe, [layer], batch_size=3, progress=False,
                      keep_activations=True)
  a = np.moveaxis(acts[layer], 3, 1)  # (N, U, h, w)
  assert a.shape[2:] == maps and probe.seg_size == (seg_size, seg_size)
  thr = oracle.thresholds(a, 1.0 - DEFAULT_TOP_FRACTION)
  np.testing.assert_array_equal(np.load(out / f"{layer}_thresholds.npy"), thr)
  pixels, scalars = loader.load_labels(probe, np.arange(probe.num_images))
  t = oracle.tally(a, thr, pixels, scalars, probe.labelcat)
  assert t["tally_units"].sum() > 0
  for k, v in t.items():
    np.testing.assert_array_equal(getattr(res[layer].tally, k), v, err_msg=k)
  iou = oracle.iou(t, probe.labelcat)
  np.testing.assert_array_equal(np.load(out / f"{layer}_iou.npy"), iou)
  np.testing.assert_array_equal(res[layer].iou, iou)
