"""Tests for nemjax.manipulate: losses vs NumPy statements, α rule, train step, featvis, pruning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemjax import manipulate as M


def _rng(seed=0):
  return np.random.default_rng(seed)


# ------------------------------------------------------------------------------ a tiny NNX net
class TinyNet(nnx.Module):
  """conv1 -> bn1 -> relu -> conv2 -> relu -> GAP -> fc, same call signature as nemjax.models."""

  def __init__(self, rngs: nnx.Rngs, num_classes: int = 5):
    self.conv1 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
    self.conv2 = nnx.Conv(6, 8, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x, taps=(), upto=None):
    acts = {}
    h = self.conv1(x)
    acts["conv1"] = h
    h = nnx.relu(self.bn1(h))
    h = self.conv2(h)
    acts["conv2"] = h  # pre-activation
    h = nnx.relu(h)
    acts["relu2"] = h
    logits = self.fc(jnp.mean(h, axis=(1, 2)))
    return logits, {k: acts[k] for k in taps}


@functools.lru_cache(maxsize=None)
def _tiny(seed=0, taps=("conv2",)):
  model = TinyNet(nnx.Rngs(seed))
  model.bn1.mean[...] = jnp.linspace(-0.1, 0.1, 6)
  model.bn1.var[...] = jnp.linspace(0.5, 1.5, 6)
  graphdef, state = nnx.split(model)

  def apply_fn(variables, x):
    return nnx.merge(graphdef, variables)(x, taps=taps)

  return apply_fn, state


def _images(n, size=10, seed=0):
  return jnp.asarray(_rng(seed).uniform(size=(n, size, size, 3)), jnp.float32)


# -------------------------------------------------------------------------------------- losses
def test_channel_energy():
  a = _rng(1).normal(size=(3, 4, 5, 6)).astype(np.float32)
  ref = np.array([[np.sum(a[n, :, :, j] ** 2) for j in range(6)] for n in range(3)])
  np.testing.assert_allclose(M.channel_energy(a), ref, rtol=1e-5)
  np.testing.assert_allclose(M.channel_energy(a[:, 0, 0]), a[:, 0, 0] ** 2, rtol=1e-6)
  with pytest.raises(ValueError):
    M.channel_energy(a[0])


def test_push_down_loss():
  rng = _rng(2)
  a = rng.normal(size=(5, 3, 3, 4)).astype(np.float32)
  mask = rng.uniform(size=(5, 4)) < 0.4
  ref = sum(np.sum(a[n, :, :, j] ** 2) for n in range(5) for j in range(4) if mask[n, j])
  np.testing.assert_allclose(M.push_down_loss(a, mask), ref, rtol=1e-5)
  np.testing.assert_allclose(M.push_down_loss(a, mask, reduction="mean"), ref / mask.sum(),
                             rtol=1e-5)
  w = rng.uniform(size=(5, 4)).astype(np.float32)
  ref_w = sum(w[n, j] * np.sum(a[n, :, :, j] ** 2) for n in range(5) for j in range(4))
  np.testing.assert_allclose(M.push_down_loss(a, w), ref_w, rtol=1e-5)
  assert float(M.push_down_loss(a, np.zeros((5, 4)), reduction="mean")) == 0.0
  with pytest.raises(ValueError):
    M.push_down_loss(a, mask[:, :3])
  with pytest.raises(ValueError):
    M.push_down_loss(a, mask, reduction="max")


def test_push_up_loss():
  rng = _rng(3)
  e = rng.uniform(size=(6, 4)).astype(np.float32)
  d = rng.uniform(size=(3, 4)).astype(np.float32)
  c = np.array([True, False, True, True])
  ref = 0.0
  for j in range(4):
    if not c[j]:
      continue
    for m in range(3):
      for n in range(6):
        ref += max(e[n, j] - d[m, j], 0.0)
  np.testing.assert_allclose(M.push_up_loss(e, d, c), ref, rtol=1e-5)
  np.testing.assert_allclose(M.push_up_loss(e, d, c, reduction="mean"), ref / (6 * 3 * 3),
                             rtol=1e-5)
  with pytest.raises(ValueError):
    M.push_up_loss(e, d[:, :3], c)
  with pytest.raises(ValueError):
    M.push_up_loss(e, d, c[:3])


def test_fairwashing_loss():
  rng = _rng(4)
  a = rng.normal(size=(8, 2, 3, 4)).astype(np.float32)
  g = np.array([0, 1, 1, 0, 2, 1, 0, 0])
  c = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
  ref = 0.0
  for j in range(4):
    x0 = a[g == 0, :, :, j].ravel()
    x1 = a[g == 1, :, :, j].ravel()
    ref += c[j] * ((x0.mean() - x1.mean()) ** 2 + ((x0 ** 2).mean() - (x1 ** 2).mean()) ** 2)
  np.testing.assert_allclose(M.fairwashing_loss(a, g, c), ref, rtol=1e-5)
  # Dense pre-activations.
  b = a[:, 0, 0]
  ref2 = sum(c[j] * ((b[g == 0, j].mean() - b[g == 1, j].mean()) ** 2 +
                     ((b[g == 0, j] ** 2).mean() - (b[g == 1, j] ** 2).mean()) ** 2)
             for j in range(4))
  np.testing.assert_allclose(M.fairwashing_loss(b, g, c), ref2, rtol=1e-5)
  # An empty group contributes nothing (and has zero gradient).
  assert float(M.fairwashing_loss(a, np.zeros(8, int), c)) == 0.0
  grad = jax.grad(lambda x: M.fairwashing_loss(x, np.zeros(8, int), c))(jnp.asarray(a))
  assert np.all(np.asarray(grad) == 0)
  with pytest.raises(ValueError):
    M.fairwashing_loss(a, g[:-1], c)
  with pytest.raises(ValueError):
    M.fairwashing_loss(a, g, c[:2])


def test_distillation_and_total():
  rng = _rng(5)
  z = rng.normal(size=(4, 6)).astype(np.float32)
  t = rng.normal(size=(4, 6)).astype(np.float32)
  p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
  logq = z - np.log(np.exp(z).sum(1, keepdims=True))
  ref = -np.mean(np.sum(p * logq, axis=1))
  np.testing.assert_allclose(M.distillation_loss(z, t), ref, rtol=1e-5)
  np.testing.assert_allclose(M.total_loss(2.0, 4.0, 0.25), 0.25 * 2 + 0.75 * 4)
  with pytest.raises(ValueError):
    M.distillation_loss(z, t[:, :5])


def test_topk_membership_and_objectives():
  topk = np.array([[3, 7, -1], [0, 3, 9]])
  batch_idx = np.array([7, 3, 5, 0])
  ref = np.array([[b in [i for i in topk[j] if i >= 0] for j in range(2)] for b in batch_idx])
  np.testing.assert_array_equal(M.topk_membership(topk, batch_idx), ref)
  rng = _rng(6)
  acts = {"a": jnp.asarray(rng.normal(size=(4, 2, 2, 2)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  masks = {"a": ref, "b": rng.uniform(size=(4, 3)) < 0.5}
  cm = {"a": np.array([True, False]), "b": np.ones(3, bool)}
  obj = M.push_down_objective(cm)
  expect = (M.push_down_loss(acts["a"], ref & cm["a"][None]) +
            M.push_down_loss(acts["b"], masks["b"]))
  np.testing.assert_allclose(obj(acts, {"topk_mask": masks}, None), expect, rtol=1e-6)
  with pytest.raises(ValueError):
    M.push_down_objective({"zz": np.ones(2)})(acts, {"topk_mask": masks}, None)
  with pytest.raises(ValueError):
    M.push_up_objective({"a": np.ones(2)})(acts, {}, None)
  with pytest.raises(ValueError):
    M.push_down_objective({})


# ----------------------------------------------------------------------------------------- α
def test_alpha_rule_sequence():
  cfg = M.AlphaConfig()
  s = M.alpha_init(80.0, cfg)
  assert float(s.alpha) == pytest.approx(0.1)
  got = []
  for acc in [80.0, 79.6, 79.5, 79.4, 70.0, 81.0]:
    s = M.alpha_update(s, acc, cfg)
    got.append(float(s.alpha))
  # drop 0 -> x2; 0.4 -> x2; 0.5 (not > 0.5) -> x2; 0.6 -> /2; 10 -> /2; gain -> x2
  np.testing.assert_allclose(got, [0.2, 0.4, 0.8, 0.4, 0.2, 0.4], rtol=1e-6)
  assert int(s.count) == 6


def test_alpha_rule_bounds_jit_and_errors():
  cfg = M.AlphaConfig(init=0.5, min_alpha=0.2, max_alpha=0.9, tolerance=0.005)
  s = M.alpha_init(0.8, cfg)
  upd = jax.jit(M.alpha_update, static_argnums=2)
  s = upd(s, 0.8, cfg)
  assert float(s.alpha) == pytest.approx(0.9)
  for _ in range(3):
    s = upd(s, 0.5, cfg)
  assert float(s.alpha) == pytest.approx(0.2)
  with pytest.raises(ValueError):
    M.alpha_init(1.0, M.AlphaConfig(init=2.0))
  with pytest.raises(ValueError):
    M.alpha_init(1.0, M.AlphaConfig(min_alpha=0.0))
  with pytest.raises(ValueError):
    M.alpha_init(1.0, M.AlphaConfig(factor=1.0))
  with pytest.raises(ValueError):
    M.alpha_update(s, np.ones(2), cfg)


# ---------------------------------------------------------------------------------- train step
def _push_down_setup(seed=0, n=12, k=2):
  apply_fn, variables = _tiny(seed)
  x = _images(n, seed=seed)
  _, acts = apply_fn(variables, x)
  energy = np.asarray(M.channel_energy(acts["conv2"]))  # (n, 8)
  top = np.argsort(-energy, axis=0, kind="stable")[:k].T  # (8, k) indices into the batch
  batch = {"image": x, "topk_mask": {"conv2": M.topk_membership(top, np.arange(n))}}
  obj = M.push_down_objective({"conv2": np.ones(8, bool)})
  return apply_fn, variables, batch, obj


def test_trainable_mask_excludes_batch_stats():
  _, variables = _tiny()
  mask = M.trainable_mask(variables)
  assert bool(mask["bn1"]["scale"][...]) is True
  assert bool(mask["bn1"]["mean"][...]) is False
  assert bool(mask["conv1"]["kernel"][...]) is True


def test_train_step_decreases_attack_loss_and_does_not_recompile():
  apply_fn, variables, batch, obj = _push_down_setup()
  opt = optax.adam(1e-2)
  state = M.train_init(variables, opt)
  bn_mean = np.asarray(variables["bn1"]["mean"][...])
  step = M.make_train_step(apply_fn, None, obj, opt)
  state, m0 = step(state, batch, 0.9)
  first = float(m0["attack_loss"])
  for i in range(15):
    state, m = step(state, batch, jnp.float32(0.9) if i % 2 else 0.9)
  assert float(m["attack_loss"]) < 0.5 * first
  assert step.jitted._cache_size() == 1  # python float or f32 alpha: one compilation
  assert int(state.step) == 16
  # BatchNorm running statistics are not trained; the teacher is frozen.
  np.testing.assert_array_equal(state.params["bn1"]["mean"][...], bn_mean)
  np.testing.assert_array_equal(state.teacher_params["conv2"]["kernel"][...],
                                variables["conv2"]["kernel"][...])
  assert set(m) == {"loss", "attack_loss", "distill_loss", "agreement", "grad_norm"}


def test_train_step_fast_grad_matches_xla_gradients():
  """The CPU fast-gradient rewrite (max pool, strided stem conv) gives the step XLA's update."""
  from nemjax import models
  model = models.build("smallcnn", num_classes=3, rngs=nnx.Rngs(0))
  apply_fn, variables = models.pure_apply(model, taps=("features.14",))
  x = _images(6, seed=2, size=64)
  _, acts = apply_fn(variables, x)
  top = np.argsort(-np.asarray(M.channel_energy(acts["features.14"])), axis=0)[:2].T
  batch = {"image": x, "topk_mask": {"features.14": M.topk_membership(top, np.arange(6))}}
  obj = M.push_down_objective({"features.14": np.ones(top.shape[0], bool)})
  opt = optax.sgd(1e-3)
  out = {}
  for fast in (False, True):
    state = M.train_init(variables, opt)
    step = M.make_train_step(apply_fn, None, obj, opt, fast_grad=fast)
    for _ in range(2):
      state, m = step(state, batch, 0.5)
    out[fast] = (state.params, float(m["grad_norm"]))
  assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[True][0], out[False][0])


def test_train_step_alpha_zero_keeps_outputs_and_distillation_recovers():
  apply_fn, variables, batch, obj = _push_down_setup(seed=1)
  x = batch["image"]
  ref_logits = np.asarray(apply_fn(variables, x)[0])
  # Pure distillation from the original model with the paper's optimizer (Adam, lr 1e-5): the
  # gradient is ~0 at the teacher, so outputs stay put (Adam rescales the float noise to at
  # most ~lr per step, hence the default small learning rate matters here).
  state = M.train_init(variables)
  step = M.make_train_step(apply_fn, None, obj)
  for _ in range(5):
    state, m = step(state, batch, 0.0)
  assert float(m["agreement"]) == 1.0
  np.testing.assert_allclose(apply_fn(state.params, x)[0], ref_logits, atol=1e-3)
  opt = optax.adam(1e-2)
  step = M.make_train_step(apply_fn, None, obj, opt)
  state = M.train_init(variables, opt)
  # After an attack has moved the model, α = 0 pulls its outputs back towards the teacher.
  for _ in range(10):
    state, m = step(state, batch, 1.0)
  moved = float(m["distill_loss"])
  for _ in range(20):
    state, m = step(state, batch, 0.0)
  assert float(m["distill_loss"]) < moved


def test_push_up_step_with_decoys():
  apply_fn, variables = _tiny(2)
  x = _images(8, seed=2)
  decoy = _images(3, seed=3) * 0.2
  obj = M.push_up_objective({"conv2": np.ones(8, bool)})
  opt = optax.adam(1e-2)
  state = M.train_init(variables, opt)
  step = M.make_train_step(apply_fn, None, obj, opt)
  batch = {"image": x, "decoy": decoy}
  state, m0 = step(state, batch, 0.9)
  for _ in range(15):
    state, m = step(state, batch, 0.9)
  assert float(m["attack_loss"]) < float(m0["attack_loss"])
  with pytest.raises(ValueError):
    step(state, {"image": x}, 0.9)  # push-up needs decoys
  with pytest.raises(ValueError):
    step(state, {"x": x}, 0.9)
  with pytest.raises(ValueError):
    step(state, batch, np.ones(2))


def test_fairwashing_step():
  apply_fn, variables = _tiny(3)
  x = _images(10, seed=4)
  group = np.array([0, 1] * 5)
  x = x.at[group == 1].multiply(0.3)  # groups differ in their statistics
  obj = M.fairwashing_objective({"conv2": np.ones(8, bool)})
  opt = optax.adam(5e-3)
  state = M.train_init(variables, opt)
  step = M.make_train_step(apply_fn, None, obj, opt)
  batch = {"image": x, "group": group}
  state, m0 = step(state, batch, 0.9)
  for _ in range(15):
    state, m = step(state, batch, 0.9)
  assert float(m["attack_loss"]) < float(m0["attack_loss"])


# -------------------------------------------------------------------------------------- prune
def test_l1_unstructured_exact_rate_and_masked_step():
  apply_fn, variables, batch, obj = _push_down_setup(seed=4)
  kernels = [variables[n]["kernel"][...] for n in ("conv1", "conv2", "fc")]
  total = sum(k.size for k in kernels)
  for rate in (0.0, 0.3, 0.875, 1.0):
    masks = M.l1_unstructured_masks(variables, rate)
    assert M.pruned_fraction(masks, variables) == pytest.approx(round(rate * total) / total)
    assert bool(jnp.all(masks["conv1"]["bias"][...]))  # biases are not pruned
  masks = M.l1_unstructured_masks(variables, 0.5)
  # Global magnitude order: every kept weight is at least as large as every pruned one.
  mags = np.concatenate([np.abs(np.asarray(k)).ravel() for k in kernels])
  keep = np.concatenate([np.asarray(masks[n]["kernel"][...]).ravel()
                         for n in ("conv1", "conv2", "fc")])
  assert mags[keep].min() >= mags[~keep].max()
  # Masks stay applied through fine-tuning.
  opt = optax.adam(1e-2)
  state = M.train_init(M.apply_masks(variables, masks), opt)
  step = M.masked(M.make_train_step(apply_fn, None, obj, opt), masks)
  for _ in range(3):
    state, _ = step(state, batch, 0.9)
  for n in ("conv1", "conv2", "fc"):
    w = np.asarray(state.params[n]["kernel"][...])
    m = np.asarray(masks[n]["kernel"][...])
    assert np.all(w[~m] == 0) and np.any(w[m] != 0)
  assert step.jitted._cache_size() == 1
  with pytest.raises(ValueError):
    M.l1_unstructured_masks(variables, 1.5)


def test_l1_unstructured_ties_plain_pytree():
  params = {"w": jnp.zeros((4, 5)), "v": jnp.ones((3, 3)), "b": jnp.ones((7,))}
  masks = M.l1_unstructured_masks(params, 0.4)
  assert M.pruned_fraction(masks, params) == pytest.approx(round(0.4 * 29) / 29)
  # The 12 smallest magnitudes are 12 of the tied zeros of "w", taken in flattening order.
  assert np.sum(~np.asarray(masks["w"])) == 12 and np.all(np.asarray(masks["v"]))
  assert np.all(~np.asarray(masks["w"]).ravel()[:12])
  np.testing.assert_array_equal(M.apply_masks(params, masks)["b"], params["b"])
  with pytest.raises(ValueError):
    M.apply_masks(params, {"w": masks["w"]})


def test_vulnerability_masks():
  apply_fn, variables = _tiny(5)
  scores = np.array([0.1, 0.9, np.nan, 0.5, 0.9, 0.0, 0.2, 0.3])
  masks = M.vulnerability_masks(variables, "conv2", scores, count=3)
  kept = np.asarray(masks["conv2"]["kernel"][...])[0, 0, 0]
  np.testing.assert_array_equal(kept, [1, 0, 1, 0, 0, 1, 1, 1])  # 0.9, 0.9 (ties), 0.5
  np.testing.assert_array_equal(np.asarray(masks["conv2"]["bias"][...]), kept)
  assert bool(jnp.all(masks["conv1"]["kernel"][...]))
  pruned = M.apply_masks(variables, masks)
  _, acts = apply_fn(pruned, _images(2))
  a = np.asarray(acts["conv2"])
  assert np.all(a[..., ~kept.astype(bool)] == 0)
  # A conv + its BatchNorm: BN scale/bias masked, running stats untouched.
  m2 = M.vulnerability_masks(variables, ["conv1", "bn1"], np.arange(6.0), rate=0.5)
  np.testing.assert_array_equal(np.asarray(m2["bn1"]["scale"][...]), [1, 1, 1, 0, 0, 0])
  assert bool(jnp.all(m2["bn1"]["var"][...]))
  with pytest.raises(ValueError):
    M.vulnerability_masks(variables, "conv9", scores, count=1)
  with pytest.raises(ValueError):
    M.vulnerability_masks(variables, "conv2", scores, count=1, rate=0.5)
  with pytest.raises(ValueError):
    M.vulnerability_masks(variables, "conv2", scores, count=9)
  assert "conv2/kernel" in M.leaf_paths(variables)


# ------------------------------------------------------------------------------------ featvis
def test_spectrum_to_image_and_color_matrix():
  spec = M.init_spectrum(jax.random.key(0), (12, 10))
  assert spec.shape == (12, 6, 3, 2)
  img = M.spectrum_to_image(spec, (12, 10))
  assert img.shape == (12, 10, 3)
  assert float(img.min()) > 0.0 and float(img.max()) < 1.0
  with pytest.raises(ValueError):
    M.spectrum_to_image(spec, 12)
  norms = np.linalg.norm(M.COLOR_CORRELATION_SVD_SQRT, axis=0)
  assert norms.max() == pytest.approx(np.linalg.norm([0.26, 0.27, 0.27]))
  t = M.random_transform(jax.random.key(1), img)
  assert t.shape == img.shape


def test_visualize_channel_increases_activation():
  apply_fn, variables = _tiny(6, taps=("relu2",))

  def features_fn(img):
    return apply_fn(variables, img)[1]

  cfg = M.FeatVisConfig(jitter=2.0)
  key = jax.random.key(3)
  act = lambda img, c: float(jnp.mean(features_fn(img[None])["relu2"][0, ..., c]))
  for c in (5,):
    img0 = M.visualize_channel(features_fn, ("relu2", c), key, size=16, steps=0, config=cfg)
    img = M.visualize_channel(features_fn, ("relu2", c), key, size=16, steps=30, lr=0.1,
                              config=cfg)
    assert img.shape == (16, 16, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert act(img, c) > act(img0, c) + 1e-3
  many = M.visualize_channels(features_fn, "relu2", jnp.array([0, 5]), key, size=16, steps=3,
                              config=cfg)
  assert many.shape == (2, 16, 16, 3)
  with pytest.raises(ValueError):
    M.visualize_channel(features_fn, ("relu2", 0), key, size=16, steps=-1)
  with pytest.raises(ValueError):
    M.visualize_channel(features_fn, ("nope", 0), key, size=16, steps=1)
