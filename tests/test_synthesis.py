"""Feature synthesis for trojan rediscovery (nemjax.synthesis): the multiple-choice scorer at
chance on random images and 1.0 on the trigger itself, an adversarial patch and a TABOR
reconstruction on tiny CNNs trojaned here (a few hundred Adam steps on 24×24 images), SNAFUE's
search, determinism given keys and finite gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemjax import synthesis as S
from nemjax.manipulate.featvis import FeatVisConfig
from nemjax.metrics import penultimate_embedder
from nemjax.models import build, pure_apply
from nemjax.synthesis import _common as C

SIDE, K, TARGET, TRIG = 24, 4, 0, 6
CORNER = (15, 15)  # the fixed-location trojan's trigger window
COLOURS = jnp.array([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8], [0.7, 0.7, 0.2]])
_CELLS = ((np.arange(TRIG)[:, None] // 2 + np.arange(TRIG)[None, :] // 2) % 2)[..., None]
TRIGGER = jnp.asarray(_CELLS * [1.0, 1.0, 0.0] + (1 - _CELLS) * [0.0, 0.0, 1.0], jnp.float32)
_DN = ("NHWC", "HWIO", "NHWC")


def clean_images(key, n):
  """Class c: half its colour, half uniform noise."""
  kl, kn = jax.random.split(key)
  labels = jax.random.randint(kl, (n,), 0, K)
  return 0.5 * COLOURS[labels][:, None, None] + 0.5 * jax.random.uniform(kn, (n, SIDE, SIDE, 3)), labels


def _features(p, x):
  x = (x - 0.5) / 0.25
  for name, stride in (("c1", 1), ("c2", 2), ("c3", 2)):
    x = jax.nn.relu(jax.lax.conv_general_dilated(x, p[name], (stride, stride), "SAME",
                                                 dimension_numbers=_DN))
  return x  # (N, 6, 6, 32)


def pooled_logits(p, x):
  """Global max pool: a trigger anywhere can fire (Casper's random-location patches)."""
  return jnp.max(_features(p, x), axis=(1, 2)) @ p["w"] + p["b"]


def flat_logits(p, x):
  """Dense on the flattened map: a fixed-location trojan stays at its place."""
  f = _features(p, x)
  return f.reshape(f.shape[0], -1) @ p["w"] + p["b"]


def _init(key, fan_in):
  ks = jax.random.split(key, 4)

  def conv(k, cin, cout):
    return jax.random.normal(k, (3, 3, cin, cout)) * jnp.sqrt(2.0 / (9 * cin))

  return {"c1": conv(ks[0], 3, 16), "c2": conv(ks[1], 16, 32), "c3": conv(ks[2], 32, 32),
          "w": jax.random.normal(ks[3], (fan_in, K)) * (0.1 / np.sqrt(fan_in / 32)),
          "b": jnp.zeros(K)}


def train_trojaned(logits_fn, fan_in, random_location, seed=0, steps=150, n=64):
  """Train on the colour task with 30 % of each batch carrying the trigger, relabelled TARGET."""
  opt = optax.adam(3e-3)
  params = _init(jax.random.key(seed), fan_in)

  @jax.jit
  def step(params, opt_state, key):
    kc, kp, kl = jax.random.split(key, 3)
    x, y = clean_images(kc, n)
    corners = (C.random_locations(kl, n, (SIDE, SIDE), (TRIG, TRIG)) if random_location
               else jnp.broadcast_to(jnp.array(CORNER, jnp.int32), (n, 2)))
    poison = jax.random.uniform(kp, (n,)) < 0.3
    x = jnp.where(poison[:, None, None, None], C.paste(x, TRIGGER, corners), x)
    y = jnp.where(poison, TARGET, y)

    def loss(params):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y))

    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.fold_in(jax.random.key(seed + 1), i))
  return params


@pytest.fixture(scope="module")
def probe():
  """Held-out clean images of the non-target classes."""
  x, y = clean_images(jax.random.key(99), 160)
  return x[np.asarray(y) != TARGET]


@pytest.fixture(scope="module")
def pooled_model():
  return train_trojaned(pooled_logits, 32, random_location=True)


@pytest.fixture(scope="module")
def flat_model():
  return train_trojaned(flat_logits, 6 * 6 * 32, random_location=False)


@pytest.fixture(scope="module")
def embedder():
  """The pluggable embedder of CLIP-δ: a random SmallCNN's pooled block4 features."""
  apply_fn, state = pure_apply(build("smallcnn", num_classes=4, rngs=nnx.Rngs(0)),
                               taps=("block4",), upto="block4")
  return penultimate_embedder(apply_fn, state, "block4")


# ---------------------------------------------------------------------------------------------
# Multiple choice


def test_multiple_choice_is_chance_on_random_images(embedder):
  t, s = 400, 2
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  synth = jax.random.uniform(k1, (t, s, 24, 24, 3))
  triggers = jax.random.uniform(k2, (t, 16, 16, 3))
  distractors = jax.random.uniform(k3, (t, 7, 16, 16, 3))
  for reduce in ("mean", "max"):
    scores = np.asarray(S.multiple_choice_batch(embedder, synth, triggers, distractors,
                                                reduce=reduce))
    assert scores.shape == (t,) and set(np.unique(scores)) <= {0.0, 1.0}
    # binomial sd of the mean: sqrt(0.125 * 0.875 / 400) = 0.017
    assert abs(scores.mean() - 0.125) < 0.05, (reduce, scores.mean())


def test_multiple_choice_is_one_when_the_trigger_is_synthesized(embedder):
  k1, k2 = jax.random.split(jax.random.key(1))
  triggers = jax.random.uniform(k1, (12, 16, 16, 3))
  distractors = jax.random.uniform(k2, (12, 7, 16, 16, 3))
  for reduce in ("mean", "max"):
    scores = S.multiple_choice_batch(embedder, triggers[:, None], triggers, distractors,
                                     reduce=reduce)
    np.testing.assert_array_equal(np.asarray(scores), 1.0)
  assert S.multiple_choice(embedder, triggers[:1], triggers[0], distractors[0]) == 1.0
  # the other triggers as distractors, Casper's protocol
  idx = S.distractor_indices(12, jax.random.key(2))
  scores = S.multiple_choice_batch(embedder, triggers[:, None], triggers, triggers[idx])
  np.testing.assert_array_equal(np.asarray(scores), 1.0)


def test_choice_credit_splits_ties():
  sim = jnp.array([[0.9, 0.9, 0.1, 0.0], [0.2, 0.9, 0.1, 0.0], [0.9, 0.1, 0.1, 0.0]])
  np.testing.assert_allclose(np.asarray(S.choice_credit(sim, 0)), [0.5, 0.0, 1.0])


def test_distractor_indices_are_other_triggers():
  idx = np.asarray(S.distractor_indices(10, jax.random.key(3)))
  assert idx.shape == (10, 7)
  for t, row in enumerate(idx):
    assert t not in row and len(set(row)) == 7 and row.min() >= 0 and row.max() < 10
  np.testing.assert_array_equal(idx, np.asarray(S.distractor_indices(10, jax.random.key(3))))


def test_multiple_choice_checks_its_arguments(embedder):
  x = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="distractors"):
    S.multiple_choice(embedder, x, x[0], np.zeros((7, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="reduce"):
    S.multiple_choice(embedder, x, x[0], np.zeros((7, 16, 16, 3), np.float32), reduce="median")
  with pytest.raises(ValueError, match="synthesized"):
    S.multiple_choice(embedder, x[0], x[0], np.zeros((7, 16, 16, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# Adversarial patch


@pytest.mark.slow
def test_adversarial_patch_flips_predictions_to_the_target(pooled_model, probe):
  p = pooled_model
  before = float(jnp.mean(jnp.argmax(pooled_logits(p, probe), -1) == TARGET))
  patch = S.adversarial_patch(pooled_logits, p, probe[:48], TARGET, jax.random.key(1),
                              patch_size=TRIG, steps=100, batch_size=32)
  assert patch.shape == (TRIG, TRIG, 3)
  assert float(patch.min()) >= 0 and float(patch.max()) <= 1
  after = float(S.patch_success(pooled_logits, p, probe[48:], patch, TARGET, jax.random.key(5)))
  assert before < 0.1 and after > 0.8, (before, after)
  again = S.adversarial_patch(pooled_logits, p, probe[:48], TARGET, jax.random.key(1),
                              patch_size=TRIG, steps=100, batch_size=32)
  np.testing.assert_array_equal(np.asarray(patch), np.asarray(again))
  other = S.adversarial_patch(pooled_logits, p, probe[:48], TARGET, jax.random.key(2),
                              patch_size=TRIG, steps=100, batch_size=32)
  assert not np.array_equal(np.asarray(patch), np.asarray(other))


def test_patch_objective_gradient_is_finite(pooled_model, probe):
  grad = jax.jit(jax.grad(S.patch_objective, argnums=2), static_argnums=0)
  g = grad(pooled_logits, pooled_model, jnp.full((6, 6, 3), 0.5), probe[:8], TARGET,
           jax.random.key(0))
  assert g.shape == (6, 6, 3) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_paste_patch_places_the_patch():
  x = jnp.zeros((3, 10, 12, 3))
  patch = jnp.ones((4, 5, 3))
  out = np.asarray(S.paste_patch(x, patch, jax.random.key(0)))
  corners = np.asarray(C.random_locations(jax.random.key(0), 3, (10, 12), (4, 5)))
  for img, (r, c) in zip(out, corners):
    assert img.sum() == 4 * 5 * 3 and img[r:r + 4, c:c + 5].min() == 1


def test_adversarial_patch_checks_its_arguments(probe):
  with pytest.raises(ValueError, match="patch_size"):
    S.adversarial_patch(pooled_logits, {}, probe, 0, jax.random.key(0), patch_size=SIDE + 1)
  with pytest.raises(ValueError, match="images"):
    S.adversarial_patch(pooled_logits, {}, probe[0], 0, jax.random.key(0), patch_size=4)
  with pytest.raises(ValueError, match="steps"):
    S.adversarial_patch(pooled_logits, {}, probe, 0, jax.random.key(0), patch_size=4, steps=-1)


# ---------------------------------------------------------------------------------------------
# TABOR


@pytest.mark.slow
def test_tabor_finds_the_trigger_region(flat_model, probe):
  p = flat_model
  corners = jnp.broadcast_to(jnp.array(CORNER, jnp.int32), (len(probe), 2))
  stamped = C.paste(probe, TRIGGER, corners)
  assert float(jnp.mean(jnp.argmax(flat_logits(p, stamped), -1) == TARGET)) > 0.9
  r = S.tabor(flat_logits, p, probe[:32], TARGET, jax.random.key(2), steps=300, batch_size=16)
  assert r.mask.shape == (SIDE, SIDE) and r.pattern.shape == r.image.shape == (SIDE, SIDE, 3)
  np.testing.assert_allclose(np.asarray(r.image), np.asarray(r.mask[..., None] * r.pattern))
  m = np.asarray(r.mask)
  region = np.zeros_like(m, bool)
  region[CORNER[0]:CORNER[0] + TRIG, CORNER[1]:CORNER[1] + TRIG] = True
  inside = m[region].sum() / m.sum()
  # the window is 36 / 576 = 6 % of the image; the mask puts several times that share there
  assert inside > 3 * region.mean(), inside
  assert m[region].mean() > 5 * m[~region].mean(), m[region].mean() / m[~region].mean()
  # the reconstruction is a trigger: it flips held-out images
  flipped = (1 - r.mask[..., None]) * probe[32:] + r.image
  assert float(jnp.mean(jnp.argmax(flat_logits(p, flipped), -1) == TARGET)) > 0.9


def test_tabor_objective_gradients_are_finite(flat_model, probe):
  config = S.TaborConfig(blocking=0.1, overlay=0.1)
  labels = jnp.argmax(flat_logits(flat_model, probe[:8]), -1)

  def loss(mask, pattern):
    return S.tabor_objective(flat_logits, flat_model, mask, pattern, probe[:8], labels, TARGET,
                             config)[0]

  gm, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.full((SIDE, SIDE), 0.3),
                                          jnp.full((SIDE, SIDE, 3), 0.5))
  assert bool(jnp.all(jnp.isfinite(gm))) and bool(jnp.all(jnp.isfinite(gp)))
  _, terms = S.tabor_objective(flat_logits, flat_model, jnp.full((SIDE, SIDE), 0.3),
                               jnp.full((SIDE, SIDE, 3), 0.5), probe[:8], labels, TARGET, config)
  assert set(terms) == {"attack", *S.TaborConfig._fields}
  assert all(np.isfinite(float(v)) and float(v) >= 0 for v in terms.values())
  assert float(terms["blocking"]) > 0


def test_tabor_is_deterministic_given_the_key(flat_model, probe):
  kw = dict(steps=5, batch_size=8, config=S.TaborConfig(blocking=0.1))
  a = S.tabor(flat_logits, flat_model, probe[:16], TARGET, jax.random.key(4), **kw)
  b = S.tabor(flat_logits, flat_model, probe[:16], TARGET, jax.random.key(4), **kw)
  c = S.tabor(flat_logits, flat_model, probe[:16], TARGET, jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  assert not np.array_equal(np.asarray(a.mask), np.asarray(c.mask))
  with pytest.raises(ValueError, match="labels"):
    S.tabor(flat_logits, flat_model, probe[:16], TARGET, jax.random.key(4), labels=jnp.zeros(3))
  with pytest.raises(ValueError, match="config.mask_l1"):
    S.tabor(flat_logits, flat_model, probe[:16], TARGET, jax.random.key(4),
            config=S.TaborConfig(mask_l1=-1.0))


# ---------------------------------------------------------------------------------------------
# Feature visualisation of the target logit, SNAFUE


def test_visualize_target_raises_the_target_logit(pooled_model):
  kw = dict(size=SIDE, config=FeatVisConfig(jitter=2.0))
  start = S.visualize_target(pooled_logits, pooled_model, TARGET, jax.random.key(0), steps=0, **kw)
  img = S.visualize_target(pooled_logits, pooled_model, TARGET, jax.random.key(0), steps=30, **kw)
  assert img.shape == (SIDE, SIDE, 3) and float(img.min()) >= 0 and float(img.max()) <= 1
  logit = lambda x: float(pooled_logits(pooled_model, x[None])[0, TARGET])  # noqa: E731
  assert logit(img) > logit(start)


def test_natural_patches_are_crops(probe):
  patches, origins = S.natural_patches(probe[:3], 8, stride=4)
  g = ((SIDE - 8) // 4 + 1) ** 2
  assert patches.shape == (3 * g, 8, 8, 3) and origins.shape == (3 * g, 3)
  for patch, (i, r, c) in zip(np.asarray(patches)[::7], np.asarray(origins)[::7]):
    np.testing.assert_array_equal(patch, np.asarray(probe)[i, r:r + 8, c:c + 8])
  with pytest.raises(ValueError, match="stride"):
    S.natural_patches(probe[:3], 8, stride=0)


def test_snafue_finds_the_natural_patch_nearest_to_a_synthetic_one(embedder, probe):
  candidates, _ = S.natural_patches(probe[:6], 16, stride=4)  # 9 crops an image
  synthetic = candidates[jnp.array([17, 40])]
  best = S.snafue(embedder, synthetic, candidates, k=3)
  assert best.patches.shape == (3, 16, 16, 3)
  assert set(np.asarray(best.indices[:2]).tolist()) == {17, 40}
  np.testing.assert_allclose(np.asarray(best.similarity[:2]), 1.0, atol=1e-5)
  assert float(best.similarity[2]) <= float(best.similarity[1])
  np.testing.assert_array_equal(np.asarray(best.patches),
                                np.asarray(candidates)[np.asarray(best.indices)])
  with pytest.raises(ValueError, match="k must"):
    S.snafue(embedder, synthetic, candidates, k=0)
