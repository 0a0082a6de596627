"""PGD and noise sweeps (library level): incremental re-dissection equals full re-dissection
exactly (delivered and float), the export is what a fresh dissection finds and what the sweep
stored, survival is summarised, the noise sweep covers every noise kind and guards its output.
The command-line scripts are tested in test_sweep_cli.py."""
import dataclasses
import json

import numpy as np
import pytest

from nemjax.data import broden
from nemjax.dissect.driver import dissect
from nemjax.models import checkpoint
from nemjax.sweep import delivery, poison, store
from nemjax.sweep.config import NoiseSweepConfig, PGDAttack, PGDSweepConfig, ProbePass
from nemjax.sweep.pgd_sweep import (KEY_FIELDS, RESULT_FIELDS, format_survival_table, prepare, run_attack_group,
                                    run_pgd_sweep, summarise)
from nemjax.sweep.verify import export_and_verify


@pytest.fixture(scope="module")
def setup(tiny_probe_dir, tiny_model_dir):
  probe = broden.load_probe(tiny_probe_dir)
  model = checkpoint.load(tiny_model_dir)
  return probe, model


@pytest.mark.parametrize("mode, mask_source, deliver_as", [
    ("u2", "labels", "float"), ("targeted", "clean", "uint8"), ("u1", "labels", "jpeg"),
    ("noise", "labels", "uint8")])
def test_incremental_equals_full_redissection(setup, mode, mask_source, deliver_as):
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), attack=PGDAttack(eps=(8 / 255,), steps=3),
                       poison_fraction=0.25, mask_source=mask_source, modes=tuple(dict.fromkeys((mode, "u2"))),
                       probe_pass=ProbePass(batch_size=8, delivery=deliver_as))
  inputs, layers = prepare(model, probe, cfg, None, progress=False)
  ctx = layers["block4"]
  units = [u for u in range(128) if ctx.clean.best_label[u] > 0 and ctx.clean.thresholds[u] > 0][:2]
  rows_out, images = run_attack_group(inputs, ctx, units, 8 / 255, mode, return_images=True)
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
    # The undelivered (float) measurement of the same run.
    floats = dict(zip(rows.tolist(), delivery.deliver(x_adv, "float")))
    full_f = dissect(model, probe, ["block4"], batch_size=8, progress=False,
                     image_overrides=floats)["block4"]
    assert row["new_label_float"] == full_f.best_label[u]
    assert row["changed_float"] == (full_f.best_label[u] != row["clean_label"])
  if mode == "noise":  # the control poisons U2's images with ±ε noise
    _, u2_images = run_attack_group(inputs, ctx, units, 8 / 255, "u2", return_images=True)
    for u in units:
      assert np.array_equal(images[u][0], u2_images[u][0])
      d = np.abs(images[u][1] - probe_images(probe, images[u][0]))
      assert np.all((np.isclose(d, 8 / 255, atol=1e-6)) | (d < 8 / 255))
      assert np.mean(np.isclose(d, 8 / 255, atol=1e-6)) > 0.5


def probe_images(probe, rows):
  from nemjax.data import loader
  return loader.load_images(probe, rows).astype(np.float32) / 255


def _first_unit(ctx):
  return int(next(u for u in range(128) if ctx.clean.best_label[u] > 0 and ctx.clean.thresholds[u] > 0))


def test_export_is_what_a_fresh_dissection_finds(setup, tmp_path):
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), attack=PGDAttack(steps=3), poison_fraction=0.25,
                       probe_pass=ProbePass(batch_size=8, delivery="uint8"))
  ctx = prepare(model, probe, cfg, None, progress=False)[1]["block4"]
  unit = _first_unit(ctx)
  rep = export_and_verify(model, probe, cfg, "block4", unit, 8 / 255, "u2", tmp_path / "export",
                          progress=False)
  assert rep["match"], rep
  assert not rep["quantised"] and rep["stored_match"] is None
  exported = broden.load_probe(tmp_path / "export")
  assert exported.num_images == probe.num_images
  assert sum("nemjax_poisoned" in p for p in exported.image_paths) == rep["n_poisoned"]
  with pytest.raises(FileExistsError):
    export_and_verify(model, probe, cfg, "block4", unit, 8 / 255, "u2", tmp_path / "export",
                      progress=False)


@pytest.mark.parametrize("deliver_as", ["jpeg", "float"])
def test_export_matches_the_sweeps_stored_row(setup, tmp_path, deliver_as):
  """A sweep's results.csv row is what a fresh dissection of the export finds (JPEG files);
  a float sweep is exported quantised to uint8, and the report says so."""
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), units={"block4": (0,)},
                       attack=PGDAttack(eps=(8 / 255,), steps=3), modes=("u2",),
                       poison_fraction=0.25,
                       probe_pass=ProbePass(batch_size=8, delivery=deliver_as, jpeg_quality=75))
  ctx = prepare(model, probe, cfg, None, progress=False)[1]["block4"]
  unit = _first_unit(ctx)
  cfg = dataclasses.replace(cfg, units={"block4": (unit,)})
  run_pgd_sweep(model, probe, cfg, tmp_path / "sweep", progress=False)
  results = store.ResultsStore(tmp_path / "sweep" / "results.csv", RESULT_FIELDS, KEY_FIELDS)
  stored = results.get(layer="block4", unit=unit, eps=8 / 255, mode="u2")
  assert stored is not None
  rep = export_and_verify(model, probe, cfg, "block4", unit, 8 / 255, "u2", tmp_path / "export",
                          stored_row=stored, progress=False)
  assert rep["match"] and rep["stored_consistent"], rep
  exported = broden.load_probe(tmp_path / "export")
  poisoned = [p for p in exported.image_paths if "nemjax_poisoned" in p]
  assert len(poisoned) == rep["n_poisoned"] > 0
  if deliver_as == "jpeg":
    assert not rep["quantised"] and rep["stored_match"] and rep["stored_survives"]
    assert all(p.endswith(".jpg") for p in poisoned)
    assert all(open(p, "rb").read(2) == b"\xff\xd8" for p in poisoned)  # JPEG files
  else:
    assert rep["quantised"] and rep["export_delivery"] == "uint8" and "uint8" in rep["note"]
    assert rep["stored_match"] is None and isinstance(rep["stored_survives"], bool)
    assert all(p.endswith(".png") for p in poisoned)
  saved = json.loads((tmp_path / "export_verify.json").read_text())
  assert saved["quantised"] == rep["quantised"]


def test_summary_reports_delivery_survival():
  def row(unit, success, success_float, deliv="jpeg"):
    return {"layer": "l", "eps": "0.1", "mode": "u2", "unit": str(unit), "delivery": deliv,
            "poison_order": "concept",
            "success": str(success), "success_float": str(success_float), "changed": str(success),
            "clean_category": "color", "clean_iou": "0.1", "source_iou_after": "0.05",
            "n_poisoned": "3"}
  rows = [row(0, 1, 1), row(1, 0, 1), row(2, 0, 0), row(3, 1, 0), row(4, 1, 1)]
  (t,) = summarise(rows, ["color"])["table"]
  assert t["pct_manipulated"] == 60.0 and t["pct_manipulated_float"] == 60.0
  assert t["poison_order"] == "concept"
  assert (t["n_survived"], t["n_success_float"]) == (2, 3)
  assert t["survival_pct"] == pytest.approx(200 / 3)
  assert "60.0 -> 60.0, survived 2/3" in format_survival_table({"table": [t]})
  (f,) = summarise([row(0, 1, 1, "float")], ["color"])["table"]
  assert f["survival_pct"] is None and format_survival_table({"table": [f]}) == ""


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
  assert s2.get(a="x", b=1) == {"a": "x", "b": "1", "v": "0.5"} and s2.get(a="y", b=1) is None
  with pytest.raises(ValueError, match="columns"):
    store.ResultsStore(tmp_path / "r.csv", ["a", "c"], ["a"])
  assert list(poison.choose_poisoned(np.array([1, 0, 1, 1], bool), np.array([1., 9, 3, 3]), 2)) == [2, 3]
  assert poison.poison_cap(200, 0.1) == 20


def test_noise_sweep_all_kinds_resume_guard_and_plot(setup, tmp_path):
  from nemjax.attacks.noise import NOISE_KINDS
  from nemjax.sweep.noise_sweep import FIELDS, KEYS, format_noise_table, run_noise_sweep
  probe, model = setup
  cfg = NoiseSweepConfig(layers=("block4",), sigmas=(0.05,), fractions=(0.5, 1.0),
                         kinds=NOISE_KINDS, probe_pass=ProbePass(batch_size=8))
  rows = run_noise_sweep(model, probe, cfg, tmp_path, progress=False)
  assert len(rows) == 6 and {r["kind"] for r in rows} == set(NOISE_KINDS)
  assert {int(r["n_corrupted"]) for r in rows} == {12, 24}
  assert all(0 <= float(r["pct_changed"]) <= 100 for r in rows)
  assert all(float(r["mean_iou_after"]) != float(r["mean_iou_before"]) for r in rows)
  assert (tmp_path / "noise_sweep.png").stat().st_size > 0
  before = (tmp_path / "results.csv").read_text()
  again = run_noise_sweep(model, probe, cfg, tmp_path, progress=False)  # all done: nothing re-run
  assert (tmp_path / "results.csv").read_text() == before and again == rows
  assert "100%" in format_noise_table(rows, "block4", "gaussian")
  # Delivery and seed are part of the key: other values add rows next to the old ones.
  more = run_noise_sweep(model, probe, dataclasses.replace(
      cfg, kinds=("bernoulli",), fractions=(1.0,), seed=1,
      probe_pass=ProbePass(batch_size=8, delivery="uint8")), tmp_path, progress=False)
  assert len(more) == 1 and more[0]["seed"] == "1" and more[0]["delivery"] == "uint8"
  assert len(store.ResultsStore(tmp_path / "results.csv", FIELDS, KEYS).rows) == 7
  # Settings outside the key are guarded by config.json.
  with pytest.raises(ValueError, match="another configuration"):
    run_noise_sweep(model, probe, dataclasses.replace(cfg, probe_pass=ProbePass(batch_size=4)),
                    tmp_path, progress=False)
  with pytest.raises(ValueError, match="kinds: unknown noise kinds"):
    dataclasses.replace(cfg, kinds=("pink",))


def test_noise_is_independent_of_batching():
  import jax
  from nemjax.sweep.noise_sweep import noisy_images
  x = np.random.default_rng(0).random((5, 8, 8, 3)).astype(np.float32)
  rows = np.array([3, 7, 8, 20, 21])
  key = jax.random.key(4)
  whole = noisy_images(key, rows, x, "bernoulli", 0.1)
  parts = np.concatenate([noisy_images(key, rows[:2], x[:2], "bernoulli", 0.1),
                          noisy_images(key, rows[2:], x[2:], "bernoulli", 0.1)])
  np.testing.assert_array_equal(whole, parts)
  assert np.allclose(np.abs(whole - x)[(x > 0.1) & (x < 0.9)], 0.1, atol=1e-6)


def test_sweep_attack_compiles_once_for_every_eps_mode_and_group(setup):
  """One compiled PGD step serves every ε, mode (U1: empty target masks) and group size, and a
  row's attack does not depend on which chunk it shares (the chunk is only a batch)."""
  from nemjax.attacks.pgd import make_act_avg_attack
  from nemjax.sweep.attack import SweepAttack
  from nemjax.sweep.pgd_sweep import features_fn_for
  probe, model = setup
  fn = features_fn_for(model, "block4")
  attack = SweepAttack(fn, steps=2, chunk=8)
  rng = np.random.default_rng(0)
  h = probe.image_size[0]
  sh, sw = probe.seg_size
  x = rng.random((11, h, h, 3)).astype(np.float32)
  units = rng.integers(0, 128, 11).astype(np.int32)
  src = (rng.random((11, sh, sw)) < 0.3).astype(np.float32)
  tgt = (rng.random((11, sh, sw)) < 0.3).astype(np.float32)
  outs = {}
  for eps, n, masks in ((2 / 255, 5, tgt), (4 / 255, 11, tgt), (4 / 255, 11, None)):
    outs[(eps, n, masks is None)] = attack(x[:n], units[:n], src[:n], None if masks is None
                                           else masks[:n], eps=eps, step_size=eps)
  assert attack._step._cache_size() == 1 and attack._prepare._cache_size() == 1
  for objective, u1 in (("targeted", False), ("u1", True)):
    ref = make_act_avg_attack(fn, eps=4 / 255, steps=2, step_size=4 / 255, objective=objective)
    ref_x = np.asarray(ref(x[:8], units[:8], src[:8], None if u1 else tgt[:8]))
    np.testing.assert_array_equal(outs[(4 / 255, 11, u1)][:8], ref_x)
