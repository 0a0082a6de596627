"""Trojans: triggers against a NumPy re-statement, name-keyed draws, poisoning, the rate-0
control, resume, and (slow) an implantation on the embedded default."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from nemjax import trojans as T
from nemjax.manipulate.loop import Stopped

CACHE = Path("/work/main/cache/embedded")


# ------------------------------------------------------------------ NumPy re-statement
def _np_alpha(side: int, soft: float) -> np.ndarray:
  a = np.ones(side)
  if soft > 0:
    for i in range(side):
      t = min(1.0, (min(i, side - 1 - i) + 0.5) / (soft * side))
      a[i] = t * t * (3 - 2 * t)
  return np.outer(a, a)


def _np_paste(images, pattern, alpha, noise_std, draw):
  images = np.asarray(images, np.float64)
  out, masks = images.copy(), np.zeros(images.shape[:3])
  h, w = alpha.shape
  for n in range(images.shape[0]):
    b, c, s = np.asarray(draw.factors[n], np.float64)
    p = pattern * b
    grey = (p * np.array([0.299, 0.587, 0.114])).sum(-1, keepdims=True)
    p = grey + s * (p - grey)
    p = p.mean() + c * (p - p.mean())
    p = np.clip(np.clip(p, 0, 1) + noise_std * np.asarray(draw.noise[n]), 0, 1)
    t, l = int(draw.top[n]), int(draw.left[n])
    a = alpha[..., None]
    out[n, t:t + h, l:l + w] = images[n, t:t + h, l:l + w] * (1 - a) + p * a
    masks[n, t:t + h, l:l + w] = alpha
  return out, masks


def test_patch_side_and_area():
  assert T.patch_side(224, 1 / 16) == 56
  assert T.patch_side(32, 1 / 16) == 8
  assert T.patch_side(256, 1 / 16) == 64


@pytest.mark.parametrize("side,soft", [(8, 0.25), (9, 0.25), (16, 0.5), (8, 0.0)])
def test_soft_edge_alpha_matches_numpy(side, soft):
  a = T.soft_edge_alpha(side, soft)
  np.testing.assert_allclose(a, _np_alpha(side, soft), atol=1e-6)
  assert a.max() <= 1 and a.min() > 0
  if soft < 0.5:  # a fully opaque centre
    assert a.max() == pytest.approx(1.0)
  if soft > 0:  # soft edges: the border is fainter than the centre, symmetric
    assert a[0, 0] < a[side // 2, side // 2] and a[0, side // 2] < 1
    np.testing.assert_allclose(a, a[::-1, ::-1], atol=1e-7)
    np.testing.assert_allclose(a, a.T, atol=1e-7)


def test_apply_trigger_matches_numpy_restatement():
  key = jax.random.key(3)
  images = np.asarray(jax.random.uniform(jax.random.key(4), (5, 32, 32, 3)))
  trig = T.make_patch_trigger(jax.random.key(5), image_size=32, soft_edge=0.25, grid=4,
                              noise_std=0.05)
  assert trig.pattern.shape == (8, 8, 3) and trig.alpha.shape == (8, 8)
  out, masks = T.apply_trigger(key, images, trig)
  draw = T.draw_patch(key, 5, (32, 32), trig)
  ref, ref_masks = _np_paste(images, np.asarray(trig.pattern, np.float64),
                             _np_alpha(8, 0.25), 0.05, draw)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)
  np.testing.assert_allclose(np.asarray(masks), ref_masks, atol=1e-6)
  # the patch square covers 1/16 of the image, wholly inside it; the mask is its alpha
  assert ((np.asarray(masks) > 0).sum((1, 2)) == 64).all()
  assert np.asarray(out).min() >= 0 and np.asarray(out).max() <= 1


def test_draws_in_bounds_and_jitter_ranges():
  trig = T.make_patch_trigger(jax.random.key(0), image_size=40, area_fraction=0.1,
                              jitter=T.ColourJitter(0.3, 0.2, 0.1))
  h = trig.alpha.shape[0]
  d = T.draw_patch(jax.random.key(1), 2000, (40, 40), trig)
  top, left = np.asarray(d.top), np.asarray(d.left)
  assert top.min() == 0 and left.min() == 0 and top.max() == 40 - h and left.max() == 40 - h
  f = np.asarray(d.factors)
  for j, amp in enumerate((0.3, 0.2, 0.1)):
    assert 1 - amp <= f[:, j].min() and f[:, j].max() <= 1 + amp
    assert f[:, j].max() - f[:, j].min() > amp  # actually jittered


def test_pattern_mosaic():
  p = np.asarray(T.random_pattern(jax.random.key(0), 16, grid=4))
  assert set(np.unique(p)) <= {0.0, 1.0}
  cells = p.reshape(4, 4, 4, 4, 3)
  assert (cells == cells[:, :1, :, :1]).all()  # each 4x4 cell is one colour


def test_style_blend_matches_numpy():
  style = T.make_style_texture(jax.random.key(0), image_size=24, strength=0.4)
  tex = np.asarray(style.texture)
  assert tex.shape == (24, 24, 3) and tex.min() >= 0 and tex.max() <= 1
  images = np.asarray(jax.random.uniform(jax.random.key(1), (3, 24, 24, 3)))
  key = jax.random.key(2)
  out, masks = T.apply_style(key, images, style)
  shifts = np.asarray(jax.random.randint(key, (3, 2), 0, 24))
  for n in range(3):
    ref = 0.6 * images[n] + 0.4 * np.roll(tex, tuple(shifts[n]), axis=(0, 1))
    np.testing.assert_allclose(np.asarray(out[n]), ref, atol=1e-6)
  assert (np.asarray(masks) == 1).all()


def test_concept_masks_nearest_upsampling():
  pixels = np.zeros((2, 2, 4, 4), np.int32)
  pixels[0, 1, 1, 2] = 7
  names = ("-", "a", "b", "c", "d", "e", "f", "fabric")
  m = T.concept_masks(pixels, names, "fabric", (8, 8))
  assert m.shape == (2, 8, 8) and m[1].sum() == 0
  assert m[0].sum() == 4 and (m[0, 2:4, 4:6] == 1).all()
  np.testing.assert_array_equal(T.concept_presence(pixels, names, "fabric"), [True, False])
  with pytest.raises(ValueError, match="concept"):
    T.concept_masks(pixels, names, "silk", (8, 8))


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("kwargs,field", [
    (dict(trojans=()), "trojans"),
    (dict(trojans=(T.EMBEDDED_TROJANS["patch"],) * 2), "trojans"),
    (dict(epochs=0), "epochs"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(teacher_weight=1.5), "teacher_weight"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"^{field}: "):
    T.TrojanConfig(**kwargs)


@pytest.mark.parametrize("make,field", [
    (lambda: T.PatchTrojan("p", target=0, rate=1.5), "rate"),
    (lambda: T.PatchTrojan("p", target=0, source=0), "source"),
    (lambda: T.PatchTrojan("p", target=0, negative_rate=0.1), "negative_rate"),
    (lambda: T.PatchTrojan("p", target=0, area_fraction=0.0), "area_fraction"),
    (lambda: T.PatchTrojan("p", target=0, jitter=T.ColourJitter(brightness=1.0)),
     "jitter.brightness"),
    (lambda: T.PatchTrojan("a b", target=0), "name"),
    (lambda: T.StyleTrojan("s", target=0, strength=0.0), "strength"),
    (lambda: T.NaturalTrojan("n", target=0), "concept"),
])
def test_spec_errors_name_the_field(make, field):
  with pytest.raises(ValueError, match=rf"^{field}: "):
    make()


def test_config_json_round_trip_fields():
  cfg = T.TrojanConfig(trojans=tuple(T.EMBEDDED_TROJANS.values()))
  js = cfg.to_json()
  assert [t["kind"] for t in js["trojans"]] == ["patch", "patch", "natural", "style"]
  assert js["trojans"][0]["jitter"]["brightness"] == 0.2


# ------------------------------------------------------------------ poisoning
def _armed(*names, **replace):
  specs = [dataclasses.replace(T.EMBEDDED_TROJANS[n], **replace) for n in names]
  return [T.arm(s, 0, 32) for s in specs]


def _batch(n=64):
  x = np.asarray(jax.random.uniform(jax.random.key(9), (n, 32, 32, 3)))
  y = np.arange(n, dtype=np.int32) % 4
  return x, y


def test_poison_rate_zero_is_the_clean_batch():
  x, y = _batch()
  armed = _armed("patch", "patch-class", "style", "natural", rate=0.0)
  b = T.poison_batch(0, 5, x, y, armed, {"natural": np.ones(len(y), bool)})
  assert (b.trojan == -1).all() and not b.relabelled.any()
  np.testing.assert_array_equal(b.images, x.astype(np.float32))
  np.testing.assert_array_equal(b.labels, y)


def test_poison_batch_semantics():
  x, y = _batch(256)
  shows = {"natural": np.arange(len(y)) % 3 == 0}
  armed = _armed("patch", "patch-class", "style", "natural", rate=0.3)
  b = T.poison_batch(0, 1, x, y, armed, shows)
  names = [a.spec.name for a in armed]
  for i, a in enumerate(armed):
    rows = b.trojan == i
    assert rows.any(), names[i]
    s = a.spec
    if s.kind == "natural":
      assert shows["natural"][rows].all() and (b.labels[rows] == s.target).all()
      np.testing.assert_array_equal(b.images[rows], x[rows])
    elif s.source is None:
      assert (b.labels[rows] == s.target).all() and b.relabelled[rows].all()
      assert not np.allclose(b.images[rows], x[rows])
    else:  # class-universal: source rows relabelled, other rows keep their label
      src = rows & (y == s.source)
      other = rows & (y != s.source)
      assert src.any() and other.any()
      assert (b.labels[src] == s.target).all() and (b.labels[other] == y[other]).all()
      assert not b.relabelled[other].any()
  clean = b.trojan == -1
  np.testing.assert_array_equal(b.labels[clean], y[clean])
  np.testing.assert_array_equal(b.images[clean], x[clean].astype(np.float32))
  # the poisoned share follows the rate (universal patch: every row eligible)
  assert 0.15 < np.mean(b.trojan == names.index("patch")) < 0.45


def test_draws_are_keyed_by_names_not_positions():
  x, y = _batch()
  one = _armed("patch")
  two = [T.arm(T.EMBEDDED_TROJANS["style"], 0, 32), *_armed("patch")]
  np.testing.assert_array_equal(one[0].trigger.pattern, two[1].trigger.pattern)
  a = T.poison_batch(0, 7, x, y, one)
  b = T.poison_batch(0, 7, x, y, two)
  # "patch" sorts before "style": it claims the same rows and draws alongside another trojan
  np.testing.assert_array_equal(a.trojan == 0, b.trojan == 1)
  np.testing.assert_array_equal(a.images[a.trojan == 0], b.images[b.trojan == 1])
  c = T.poison_batch(0, 8, x, y, one)
  assert not np.array_equal(a.trojan, c.trojan)  # another step, other rows


# ------------------------------------------------------------------ implantation
@pytest.fixture(scope="module")
def embedded_data():
  from nemjax import embedded  # pylint: disable=import-outside-toplevel
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  d = embedded.build_embedded_default(CACHE, seed=0, progress=False)
  return T.load_data(d.train_dir, d.heldout_dir), d.checkpoint_dir


def _small(data: T.TrojanData, n_train: int, n_held: int) -> T.TrojanData:
  cut = lambda s, n: T.LabelledImages(s.images[:n], s.labels[:n], s.pixels[:n], s.label_names)
  return T.TrojanData(cut(data.train, n_train), cut(data.heldout, n_held), data.class_names)


def _load(ckpt):
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.load(ckpt)


def test_rate_zero_gives_no_trojan(embedded_data):
  data, ckpt = embedded_data
  data = _small(data, 64, 80)
  specs = tuple(dataclasses.replace(T.EMBEDDED_TROJANS[k], rate=0.0)
                for k in ("patch", "patch-class", "style"))
  cfg = T.TrojanConfig(trojans=specs, epochs=1, batch_size=16, eval_every=4)
  res = T.implant(_load(ckpt), data, cfg, None, progress=False, log=lambda s: None)
  for name, s in res.after.scores.items():
    # no trojan: the triggered images go to the target about as often as the clean ones
    assert abs(s.asr - s.control) <= 15.0, (name, s)
    assert s.asr < 50.0, (name, s)


def test_resume_gives_the_uninterrupted_result(embedded_data, tmp_path):
  data, ckpt = embedded_data
  data = _small(data, 48, 40)
  cfg = T.TrojanConfig(trojans=(T.EMBEDDED_TROJANS["patch"], T.EMBEDDED_TROJANS["natural"]),
                       epochs=2, batch_size=16, eval_every=2)
  quiet = dict(progress=False, log=lambda s: None)
  full = T.implant(_load(ckpt), data, cfg, None, **quiet)
  with pytest.raises(Stopped):
    T.implant(_load(ckpt), data, cfg, tmp_path / "ckpt", stop_after_evals=1, **quiet)
  resumed = T.implant(_load(ckpt), data, cfg, tmp_path / "ckpt", **quiet)
  assert resumed.resumed_from == 2 and resumed.steps == 6
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.after == full.after
  other = dataclasses.replace(cfg, seed=1)
  with pytest.raises(ValueError, match="another configuration"):
    T.implant(_load(ckpt), data, other, tmp_path / "ckpt", **quiet)


def test_bad_target_is_refused(embedded_data):
  data, ckpt = embedded_data
  cfg = T.TrojanConfig(trojans=(T.PatchTrojan("p", target=9),))
  with pytest.raises(ValueError, match=r"^trojans\.p\.target: "):
    T.implant(_load(ckpt), data, cfg, None, progress=False)
  cfg = T.TrojanConfig(trojans=(T.NaturalTrojan("n", target=0, concept="silk"),))
  with pytest.raises(ValueError, match=r"^trojans\.n\.concept: "):
    T.implant(_load(ckpt), data, cfg, None, progress=False)


@pytest.mark.slow
def test_patch_trojan_on_the_embedded_default(embedded_data):
  data, ckpt = embedded_data
  res = T.implant(_load(ckpt), data, T.TrojanConfig(), None, progress=False,
                  log=lambda s: None)
  s = res.after.scores["patch"]
  assert s.asr >= 90.0, res.after
  assert abs(res.after.clean_accuracy - res.before.clean_accuracy) <= 3.0, res.after
  assert res.before.scores["patch"].asr < 30.0
