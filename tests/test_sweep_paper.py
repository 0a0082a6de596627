"""The sweeps as the paper states them: the act-avg PGD sweep poisons the images a PyTorch
re-statement of the paper's loop poisons, with the same pixels; which units are attacked
(real concept detectors, no fallback); every random draw keyed by names, so a layer's rows do
not depend on the other layers of the run."""
import dataclasses

import numpy as np
import pytest

from conftest import import_torch
from nemjax.data import broden, loader
from nemjax.models import checkpoint
from nemjax.sweep import keys, poison, units as units_lib
from nemjax.sweep.config import NoiseSweepConfig, PGDAttack, PGDSweepConfig, ProbePass
from nemjax.sweep.pgd_sweep import contains, prepare, run_attack_group, run_pgd_sweep


@pytest.fixture(scope="module")
def setup(tiny_probe_dir, tiny_model_dir):
  return broden.load_probe(tiny_probe_dir), checkpoint.load(tiny_model_dir)


def test_poison_orders():
  src = np.array([0, 1, 0, 1, 0, 1, 0], bool)
  tgt = np.array([1, 1, 0, 0, 1, 0, 1], bool)
  # source holders (1, 3, 5) in probe order first, then target-only holders (0, 4, 6)
  assert poison.choose_by_concept(src, tgt, 4).tolist() == [0, 1, 3, 5]
  assert poison.choose_by_concept(src, tgt, 2).tolist() == [1, 3]
  assert poison.choose_by_concept(src, tgt, 99).tolist() == [0, 1, 3, 4, 5, 6]
  prio = np.array([9, 0, 0, 0, 8, 0, 7], float)
  assert poison.choose_poisoned(src | tgt, prio, 2).tolist() == [0, 4]
  with pytest.raises(ValueError, match="poison_order: must be one of"):
    PGDSweepConfig(layers=("block4",), poison_order="random")


def test_keys_are_names_not_positions():
  import jax
  k = lambda *p: jax.random.key_data(keys.item_key(0, *p)).tolist()
  assert k("t", "layer4", 3) == k("t", "layer4", 3)
  assert k("t", "layer4", 3) != k("t", "layer3", 3) != k("t", "layer4", 4)
  assert keys.name_code("layer4") == 0x0E303963  # zlib.crc32(b"layer4"): stable everywhere
  assert keys.eps_code(4 / 255) == 4000 and keys.eps_code(2.5 / 255) == 2500
  with pytest.raises(ValueError, match="parts"):
    keys.item_key(0, 1.5)
  with pytest.raises(ValueError, match="seed"):
    keys.item_key(-1, "x")


def test_choose_units_bar_and_no_fallback(setup):
  probe, model = setup
  cfg = PGDSweepConfig(layers=("block4",), probe_pass=ProbePass(batch_size=8))
  ctx = prepare(model, probe, cfg, None, progress=False)[1]["block4"]
  res = ctx.clean
  ok = units_lib.eligible_units(res, 0.04)
  assert ok.size >= 3 and np.all(res.score[ok] > 0.04) and np.all(res.best_label[ok] > 0)
  picked = units_lib.choose_units(res, 3, 0, layer="block4", arch="smallcnn")
  assert set(picked) <= set(ok.tolist()) and list(picked) == sorted(picked)
  assert picked == units_lib.choose_units(res, 3, 0, layer="block4", arch="smallcnn")
  with pytest.raises(ValueError, match=r"block4: only \d+ of 128 units are labelled with IoU > 0.04"):
    units_lib.choose_units(res, ok.size + 1, 0, layer="block4", arch="smallcnn")
  with pytest.raises(ValueError, match="IoU > 0.99"):
    units_lib.choose_units(res, 1, 0, layer="block4", arch="smallcnn", min_iou=0.99)


def _rows_of(out_dir, layer):
  import csv
  with open(out_dir / "results.csv", newline="") as f:
    return sorted(tuple((k, v) for k, v in r.items() if k != "seconds")
                  for r in csv.DictReader(f) if r["layer"] == layer)


def test_pgd_sweep_layer_rows_do_not_depend_on_other_layers(setup, tmp_path):
  probe, model = setup
  base = PGDSweepConfig(layers=("block4",), num_units=1, attack=PGDAttack(eps=(8 / 255,), steps=2),
                        modes=("u2", "noise"), poison_fraction=0.25,
                        probe_pass=ProbePass(batch_size=8))
  alone = run_pgd_sweep(model, probe, base, tmp_path / "alone", progress=False)
  three = dataclasses.replace(base, layers=("block2", "block3", "block4"))
  summary = run_pgd_sweep(model, probe, three, tmp_path / "three", progress=False)
  rows = _rows_of(tmp_path / "alone", "block4")
  assert len(rows) == 2 and rows == _rows_of(tmp_path / "three", "block4")
  assert dict(rows[0])["poison_order"] == "concept"
  assert summary["poison_order"] == "concept" and summary["min_iou"] == 0.04
  assert summary["eligible_units"]["block4"] == alone["eligible_units"]["block4"]
  assert set(summary["eligible_units"]) == {"block2", "block3", "block4"}
  assert all(t["poison_order"] == "concept" for t in summary["table"])


def test_noise_sweep_layer_rows_do_not_depend_on_other_layers_or_kinds(setup, tmp_path):
  from nemjax.sweep.noise_sweep import run_noise_sweep
  probe, model = setup
  base = NoiseSweepConfig(layers=("block4",), sigmas=(0.05,), fractions=(0.5,),
                          kinds=("bernoulli",), probe_pass=ProbePass(batch_size=8))
  alone = run_noise_sweep(model, probe, base, tmp_path / "a", progress=False)
  more = run_noise_sweep(model, probe, dataclasses.replace(
      base, layers=("block2", "block3", "block4"), kinds=("gaussian", "bernoulli")),
      tmp_path / "b", progress=False)
  pick = lambda rows: [r for r in rows if r["layer"] == "block4" and r["kind"] == "bernoulli"]
  assert pick(alone) == pick(more) and len(pick(alone)) == 1
  assert int(alone[0]["units"]) == units_lib.eligible_units(
      prepare(model, probe, PGDSweepConfig(layers=("block4",), probe_pass=ProbePass(batch_size=8)),
              None, progress=False)[1]["block4"].clean, 0.04).size


# ------------------------------------------------------------------------------------------------
# The paper's act-avg PGD, re-stated in PyTorch.

def _paper_pgd(torch, features, x01, unit, src_masks, tgt_masks, eps, steps):
  """The paper's loop: zero start, step 2ε/steps, sign of the gradient of
  act_avg(source) − act_avg(target) (bilinear F.interpolate, align_corners=False, per-image
  mean over the concept's pixels; an empty mask contributes 0), clamp to the ε-ball, then to
  [0, 1]. x01 (N, H, W, 3) in [0, 1], masks (N, sh, sw) -> x_adv (N, H, W, 3)."""
  F = torch.nn.functional
  alpha = 2 * eps / steps
  x = torch.from_numpy(x01).permute(0, 3, 1, 2).contiguous()
  src, tgt = torch.from_numpy(src_masks), torch.from_numpy(tgt_masks)

  def act_avg(up, m):
    total = m.sum((1, 2))
    return torch.where(total > 0, (up * m).sum((1, 2)) / total.clamp_min(1), torch.zeros_like(total))

  xa = x.clone()
  for _ in range(steps):
    xa.requires_grad_(True)
    a = features(xa)[:, unit:unit + 1]                       # (N, 1, h, w)
    up = F.interpolate(a, size=tuple(src.shape[1:]), mode="bilinear", align_corners=False)[:, 0]
    loss = act_avg(up, src) - act_avg(up, tgt)                # (N,): one loss per image
    grad, = torch.autograd.grad(loss.sum(), xa)
    xa = xa.detach() - alpha * grad.sign()
    xa = torch.clamp(x + torch.clamp(xa - x, -eps, eps), 0.0, 1.0)
  return xa.permute(0, 2, 3, 1).numpy()


def _paper_rows_and_masks(pixels, scalars, source, target, cap):
  """Images holding the source concept, then the target's, in probe order (at most cap), and
  the ground-truth masks (an image-level label covers the whole image)."""
  def mask(c):
    m = (pixels == c).any(axis=1)
    m[(scalars == c).any(axis=1)] = True
    return m.astype(np.float32)
  has_s, has_t = mask(source).any(axis=(1, 2)), mask(target).any(axis=(1, 2))
  rows = np.sort(np.concatenate([np.flatnonzero(has_s), np.flatnonzero(has_t & ~has_s)])[:cap])
  return rows, mask(source)[rows], mask(target)[rows]


def test_sweep_poisons_what_the_papers_pytorch_loop_poisons(tiny_probe_dir):
  torch = import_torch()
  import torch_models
  from nemjax import convert
  torch.manual_seed(0)
  tmodel = torch_models.randomize_(torch_models.build("smallcnn", 4), seed=1).eval()
  for p in tmodel.parameters():
    p.requires_grad_(False)
  model = convert.convert_state_dict(
      "smallcnn", {k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
  mean = torch.tensor([124.6901, 118.6897, 109.5388]).view(1, 3, 1, 1)
  features = lambda x01: tmodel.features[:11]((x01 * 255.0 - mean) / (255.0 * 0.224))  # block3

  probe = broden.load_probe(tiny_probe_dir)
  pixels, scalars = loader.load_labels(probe, np.arange(probe.num_images))
  eps = 8 / 255
  # One step isolates the gradient: its sign can flip only where the gradient is ~0 (float32
  # rounding differs between the two). Over 10 steps a flipped pixel changes the later
  # gradients of its image a little, so a few more flip (measured: 100 % and 99.975 % of
  # pixels equal); each difference is a whole number of steps.
  for steps, min_same in ((1, 0.9999), (10, 0.999)):
    cfg = PGDSweepConfig(layers=("block3",), attack=PGDAttack(eps=(eps,), steps=steps),
                         modes=("u2",), poison_fraction=0.25, probe_pass=ProbePass(batch_size=8))
    inputs, layers = prepare(model, probe, cfg, None, progress=False)
    ctx = layers["block3"]
    labelled = np.flatnonzero((ctx.clean.best_label > 0) & (ctx.clean.thresholds > 0))
    has = lambda u: contains(inputs, ctx, int(ctx.clean.best_label[u])).sum()
    unit = int(max(labelled, key=has))
    (row,), images = run_attack_group(inputs, ctx, [unit], eps, "u2", return_images=True)
    rows, x_adv = images[unit]
    ref_rows, src_m, tgt_m = _paper_rows_and_masks(pixels, scalars, row["clean_label"],
                                                   row["target_label"], ctx.cap)
    assert rows.tolist() == ref_rows.tolist() and len(rows) == ctx.cap
    x01 = loader.load_images(probe, rows).astype(np.float32) / np.float32(255.0)
    ref = _paper_pgd(torch, features, x01, unit, src_m, tgt_m, eps, steps)
    diff = np.abs(x_adv - ref)
    alpha = 2 * eps / steps
    same = float(np.mean(diff <= 1e-6))
    print(f"{steps} steps: pixels equal to the PyTorch loop: {100 * same:.3f} %, max |diff| "
          f"{diff.max() / alpha:.2f} steps")
    assert same >= min_same, (steps, same)
    steps_off = diff[diff > 1e-6] / alpha
    np.testing.assert_allclose(steps_off, np.round(steps_off), atol=1e-3)  # whole sign flips
    assert np.abs(x_adv - x01).max() > 0.5 * eps  # the attack did move the images
