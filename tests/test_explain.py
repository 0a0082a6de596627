"""nemjax.explain against Captum 0.9 on the same random-weight PyTorch models converted to Flax.

Captum's maps (N, 3, H, W) are summed over channels, as nemjax's (N, H, W). Where Captum draws
noise, baselines or masks, its draws are recorded (the drawing function wrapped) and passed to
nemjax explicitly, so both use identical samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest  # noqa: E402  (tests/ is on sys.path)

torch = conftest.import_torch()
captum_attr = pytest.importorskip("captum.attr")

import torch_models as tm  # noqa: E402
from nemjax import convert, explain, models  # noqa: E402
from nemjax.explain import gradient  # noqa: E402

RTOL = 1e-4


def close(a, b, rtol=RTOL):
  """Equal within rtol relative to the reference's largest magnitude (float32 maps)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  scale = max(np.abs(b).max(), 1e-12)
  err = np.abs(a - b).max() / scale
  assert err <= rtol, f"max |diff| / max |ref| = {err:.3g} > {rtol}"


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def csum(t):
  """Captum (N, C, H, W) -> (N, H, W) channel sum."""
  return t.detach().numpy().sum(1)


class Pair:
  """A torch model and its nemjax conversion (pure apply function with taps)."""

  def __init__(self, arch, num_classes, taps, size, seed=0):
    torch.manual_seed(seed)
    self.torch = tm.randomize_(tm.build(arch, num_classes), seed)
    sd = {k: v.numpy().copy() for k, v in self.torch.state_dict().items()}
    self.model = convert.convert_state_dict(arch, sd)
    self.apply, self.params = models.pure_apply(self.model, taps=taps)
    rng = np.random.default_rng(seed)
    self.x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    self.target = np.array([1, 3], np.int32)
    self.tx = nchw(self.x)
    self.tt = torch.from_numpy(self.target.astype(np.int64))


@pytest.fixture(scope="module")
def small():
  return Pair("smallcnn", 5, ("block3", "block4"), 32)


def test_forward_matches(small):
  logits, _ = small.apply(small.params, jnp.asarray(small.x))
  with torch.no_grad():
    close(logits, small.torch(small.tx).numpy(), 1e-5)


@pytest.mark.parametrize("abs_", [True, False])
def test_saliency(small, abs_):
  ref = captum_attr.Saliency(small.torch).attribute(small.tx, target=small.tt, abs=abs_)
  got = explain.explain("saliency", small.apply, small.params, small.x, small.target, abs=abs_)
  close(got, csum(ref))
  none = explain.saliency(small.apply, small.params, small.x, small.target, abs=abs_, reduce="none")
  close(none, nhwc(ref))


def test_input_x_gradient(small):
  ref = captum_attr.InputXGradient(small.torch).attribute(small.tx, target=small.tt)
  close(explain.input_x_gradient(small.apply, small.params, small.x, small.target), csum(ref))


@pytest.mark.parametrize("method, n_steps", [("gausslegendre", 50), ("riemann_trapezoid", 7),
                                             ("riemann_left", 5), ("riemann_right", 5),
                                             ("riemann_middle", 5)])
def test_integrated_gradients(small, method, n_steps):
  # A non-constant baseline: a constant image ties inside max-pool windows, where PyTorch and
  # XLA route the gradient to different (equally maximal) elements.
  base = (0.25 + 0.1 * np.random.default_rng(9).standard_normal(small.x.shape)).astype(np.float32)
  ref = captum_attr.IntegratedGradients(small.torch).attribute(
    small.tx, baselines=nchw(base), target=small.tt, n_steps=n_steps, method=method)
  got = explain.integrated_gradients(small.apply, small.params, small.x, small.target,
                                     baselines=base, n_steps=n_steps, method=method)
  close(got, csum(ref))
  if n_steps == 7:
    chunked = explain.integrated_gradients(small.apply, small.params, small.x, small.target,
                                           baselines=base, n_steps=n_steps, method=method,
                                           internal_batch_size=3)
    close(chunked, got, 1e-5)


def test_integrated_gradients_default_zero_baseline(small):
  """Zero baseline (Captum's default). Right Riemann sums: Gauss-Legendre's first nodes
  (α ≈ 5e-4 at 50 steps) put near-ties in max-pool windows, where float32 rounding of either
  library may pick another maximum (6.6e-4 relative there)."""
  ref = captum_attr.IntegratedGradients(small.torch).attribute(small.tx, target=small.tt,
                                                               method="riemann_right", n_steps=6)
  close(explain.integrated_gradients(small.apply, small.params, small.x, small.target,
                                     method="riemann_right", n_steps=6), csum(ref))


def test_auto_chunking_follows_the_pixel_budget(small, monkeypatch):
  """``'auto'`` (the default for IG, noise tunnel, GradientSHAP): every step at once when they
  fit ``AUTO_PIXELS_PER_CALL``, else the largest chunk that does (one step at the least); the
  maps equal the all-at-once ones (Captum's default) within float32 summation order."""
  from nemjax.explain import _core
  n, h, w, _ = small.x.shape
  assert _core.items_per_call("auto", 7, small.x, "internal_batch_size") is None
  whole = explain.integrated_gradients(small.apply, small.params, small.x, small.target, n_steps=7,
                                       internal_batch_size=None)
  monkeypatch.setattr(_core, "AUTO_PIXELS_PER_CALL", 3 * n * h * w + 1)
  assert _core.items_per_call("auto", 7, small.x, "internal_batch_size") == 3   # 3 + 3 + 1
  assert _core.items_per_call("auto", 8, small.x, "internal_batch_size") == 3   # 3 + 3 + 2
  monkeypatch.setattr(_core, "AUTO_PIXELS_PER_CALL", 5 * n * h * w)
  assert _core.items_per_call("auto", 7, small.x, "internal_batch_size") == 4   # 4 + 3, not 5 + 2
  assert _core.items_per_call("auto", 2, small.x, "internal_batch_size") is None
  monkeypatch.setattr(_core, "AUTO_PIXELS_PER_CALL", 1)
  assert _core.items_per_call("auto", 7, small.x, "internal_batch_size") == 1
  monkeypatch.setattr(_core, "AUTO_PIXELS_PER_CALL", 3 * n * h * w)
  close(explain.integrated_gradients(small.apply, small.params, small.x, small.target, n_steps=7),
        whole, 1e-5)
  for bad in ("big", 0):
    with pytest.raises(ValueError, match="internal_batch_size"):
      explain.integrated_gradients(small.apply, small.params, small.x, small.target,
                                   internal_batch_size=bad)


class Recorder:
  """Wraps a drawing function, keeping what it returns."""

  def __init__(self, fn):
    self.fn, self.out = fn, []

  def __call__(self, *a, **k):
    r = self.fn(*a, **k)
    self.out.append(r)
    return r


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad(small, nt_type, monkeypatch):
  rec = Recorder(torch.normal)
  monkeypatch.setattr(torch, "normal", rec)
  torch.manual_seed(1)
  ref = captum_attr.NoiseTunnel(captum_attr.Saliency(small.torch)).attribute(
    small.tx, nt_type=nt_type, nt_samples=4, stdevs=0.3, target=small.tt)
  monkeypatch.undo()
  noise = nhwc(rec.out[0]).reshape(2, 4, *small.x.shape[1:])  # repeat_interleave order
  got = explain.smoothgrad(small.apply, small.params, small.x, small.target, noise=noise,
                           nt_type=nt_type)
  close(got, csum(ref))
  chunked = explain.smoothgrad(small.apply, small.params, small.x, small.target, noise=noise,
                               nt_type=nt_type, nt_samples_batch_size=3)
  close(chunked, got, 1e-5)


def test_noise_tunnel_keyed_draws_are_reproducible(small):
  a = explain.smoothgrad(small.apply, small.params, small.x, small.target, key=jax.random.key(3),
                         nt_samples=2, stdevs=0.2)
  b = explain.smoothgrad(small.apply, small.params, small.x, small.target, key=jax.random.key(3),
                         nt_samples=2, stdevs=0.2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="key is required"):
    explain.smoothgrad(small.apply, small.params, small.x, small.target)
  # The keyed noise is gradient.gaussian_noise, the same under either threefry counter setting.
  shape = (small.x.shape[0], 2) + small.x.shape[1:]
  noise = 0.2 * gradient.gaussian_noise(jax.random.key(3), shape)
  c = explain.smoothgrad(small.apply, small.params, small.x, small.target, noise=noise)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
  with jax.threefry_partitionable(True):
    d = explain.smoothgrad(small.apply, small.params, small.x, small.target,
                           key=jax.random.key(3), nt_samples=2, stdevs=0.2)
  np.testing.assert_array_equal(np.asarray(d), np.asarray(a))


def test_gaussian_noise_is_standard_normal_and_keyed():
  """``gaussian_noise``: N(0, 1) values (scipy's normality test), a function of the key alone."""
  from scipy import stats
  z = np.asarray(gradient.gaussian_noise(jax.random.key(0), (4, 1000)))
  assert z.dtype == np.float32 and z.shape == (4, 1000)
  assert stats.normaltest(z.ravel()).pvalue > 1e-3
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: gradient.gaussian_noise(k, (4, 1000)))(
      jax.random.key(0))), z)
  assert not np.array_equal(np.asarray(gradient.gaussian_noise(jax.random.key(1), (4, 1000))), z)


def test_gradient_shap(small, monkeypatch):
  normal, choice, uniform = Recorder(torch.normal), Recorder(np.random.choice), Recorder(np.random.uniform)
  monkeypatch.setattr(torch, "normal", normal)
  monkeypatch.setattr(np.random, "choice", choice)
  monkeypatch.setattr(np.random, "uniform", uniform)
  rng = np.random.default_rng(5)
  base = rng.standard_normal((3, *small.x.shape[1:])).astype(np.float32)
  np.random.seed(0)
  torch.manual_seed(0)
  ref = captum_attr.GradientShap(small.torch).attribute(small.tx, baselines=nchw(base),
                                                        target=small.tt, n_samples=4, stdevs=0.1)
  monkeypatch.undo()
  noise = nhwc(normal.out[0]).reshape(2, 4, *small.x.shape[1:])
  idx = np.asarray(choice.out[0]).reshape(2, 4)
  alphas = np.asarray(uniform.out[0], np.float32).reshape(2, 4)
  got = explain.gradient_shap(small.apply, small.params, small.x, small.target, baselines=base,
                              n_samples=4, noise=noise, baseline_index=idx, alphas=alphas)
  close(got, csum(ref))
  keyed = explain.gradient_shap(small.apply, small.params, small.x, small.target, baselines=base,
                                key=jax.random.key(0), n_samples=4)
  assert keyed.shape == (2, 32, 32) and np.isfinite(np.asarray(keyed)).all()


@pytest.mark.parametrize("name, cls", [("guided_backprop", "GuidedBackprop"),
                                       ("deconvolution", "Deconvolution")])
def test_guided_and_deconvolution(small, name, cls):
  ref = getattr(captum_attr, cls)(small.torch).attribute(small.tx, target=small.tt)
  close(explain.explain(name, small.apply, small.params, small.x, small.target), csum(ref))


@pytest.mark.parametrize("relu", [False, True])
def test_grad_cam(small, relu):
  ref = captum_attr.LayerGradCam(small.torch, small.torch.features[10]).attribute(
    small.tx, target=small.tt, relu_attributions=relu)
  got = explain.grad_cam(small.apply, small.params, small.x, small.target, layer="block3",
                         relu_attributions=relu)
  close(got, ref.detach().numpy()[:, 0])


def test_grad_cam_heo_numpy(small):
  """Heo et al.'s Grad-CAM re-stated in NumPy from PyTorch's layer activations and gradients."""
  acts = {}
  h = small.torch.features[10].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
  x = small.tx.clone().requires_grad_(False)
  out = small.torch(x)
  h.remove()
  a = acts["a"]
  g, = torch.autograd.grad(out.gather(1, small.tt[:, None]).sum(), a)
  a, g = a.detach().numpy(), g.numpy()                             # (N, C, h, w)
  cam = np.maximum((g.mean(axis=(2, 3), keepdims=True) * a).sum(1), 0)
  mx = cam.max(axis=(1, 2), keepdims=True)
  assert (mx > 0).any()
  cam = np.where(mx > 0, cam / np.where(mx > 0, mx, 1), 0)       # an all-zero map stays zero
  got = explain.grad_cam_heo(small.apply, small.params, small.x, small.target, layer="block3")
  close(got, cam)
  assert float(np.max(np.asarray(got))) == pytest.approx(1.0)


def test_guided_grad_cam(small):
  ref = captum_attr.GuidedGradCam(small.torch, small.torch.features[10]).attribute(
    small.tx, target=small.tt)
  got = explain.guided_grad_cam(small.apply, small.params, small.x, small.target, layer="block3")
  close(got, csum(ref))


def test_interpolate_nearest_matches_torch():
  m = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
  for out in ((7, 11), (6, 10), (64, 64)):
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[:, None], size=out, mode="nearest")
    np.testing.assert_array_equal(np.asarray(explain.gradient.interpolate_nearest(jnp.asarray(m), out)),
                                  ref.numpy()[:, 0])


def test_sobel_matches_scipy(small):
  from scipy import ndimage
  grey = small.x.mean(-1).astype(np.float64)
  ref = np.stack([np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1)) for g in grey])
  close(explain.explain("sobel", None, None, small.x, small.target), ref, 1e-5)
  np.testing.assert_array_equal(np.asarray(explain.blank(None, None, small.x, small.target)),
                                np.zeros(small.x.shape[:3]))


def test_jit_and_plain_logit_function(small):
  logits_only = lambda p, x: small.apply(p, x)[0]
  f = jax.jit(lambda p, x, t: explain.saliency(logits_only, p, x, t))
  close(f(small.params, small.x, small.target),
        explain.saliency(small.apply, small.params, small.x, small.target), 1e-6)
  g = jax.jit(lambda p, x, t: explain.grad_cam(small.apply, p, x, t, layer="block4"))
  close(g(small.params, small.x, small.target),
        explain.grad_cam(small.apply, small.params, small.x, small.target, layer="block4"), 1e-6)


def test_bad_arguments(small):
  with pytest.raises(ValueError, match="method must be one of"):
    explain.explain("nope", small.apply, small.params, small.x, small.target)
  with pytest.raises(ValueError, match="target must be"):
    explain.saliency(small.apply, small.params, small.x, small.target[:1])
  with pytest.raises(ValueError, match="x must be"):
    explain.saliency(small.apply, small.params, small.x[0], small.target)
  with pytest.raises(ValueError, match="not among apply_fn's taps"):
    explain.grad_cam(small.apply, small.params, small.x, small.target, layer="block1")
  with pytest.raises(ValueError, match="must return \\(logits"):
    explain.grad_cam(lambda p, x: small.apply(p, x)[0], small.params, small.x, small.target,
                     layer="block4")
  with pytest.raises(ValueError, match="method must be one of"):
    explain.integrated_gradients(small.apply, small.params, small.x, small.target, method="simpson")


# --------------------------------------------------------------------------------------------
# Differentiability with respect to parameters: jax.grad of a scalar of the map equals float64
# central differences on a tiny conv-ReLU-maxpool-dense model.

def tiny_apply(p, x):
  z = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b1"]
  a = jax.nn.relu(z)
  m = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  h = jax.nn.relu(m.reshape(m.shape[0], -1) @ p["w2"] + p["b2"])
  return h @ p["w3"] + p["b3"], {"conv": a}


def tiny_params(dtype):
  r = np.random.default_rng(0)
  shapes = {"w1": (3, 3, 3, 4), "b1": (4,), "w2": (4 * 4 * 4, 6), "b2": (6,), "w3": (6, 3), "b3": (3,)}
  return {k: jnp.asarray(r.standard_normal(s) * 0.5, dtype) for k, s in shapes.items()}


GRAD_CASES = {
  "saliency": dict(abs=False), "input_x_gradient": {}, "guided_backprop": {},
  "grad_cam": dict(layer="conv"), "grad_cam_heo": dict(layer="conv"),
  "integrated_gradients": dict(n_steps=4), "deeplift": dict(baselines=0.1, maxpool="rescale"),
  "lrp": {}, "lrp_layer": dict(layer="conv"), "deconvolution": {},
  "guided_grad_cam": dict(layer="conv"), "deeplift_shap": dict(baselines=np.full((2, 8, 8, 3), 0.1)),
  "occlusion": dict(sliding_window_shapes=(4, 4), strides=2, perturbations_per_eval=3),
  "feature_ablation": dict(feature_mask=np.arange(64).reshape(8, 8) // 16),
  "smoothgrad": dict(noise=np.random.default_rng(7).standard_normal((2, 3, 8, 8, 3)) * 0.1),
  "kernel_shap": dict(key=jax.random.key(0), feature_mask=np.arange(64).reshape(8, 8) // 8,
                      n_samples=30),
}


SLOW_GRAD = {"deeplift_shap", "kernel_shap", "smoothgrad", "occlusion", "integrated_gradients",
             "guided_grad_cam", "deconvolution", "input_x_gradient"}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_GRAD else m
                                    for m in sorted(GRAD_CASES)])
def test_param_gradient_matches_central_differences(method):
  with jax.enable_x64(True):
    p = tiny_params(jnp.float64)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float64)
    t = jnp.array([0, 2])
    loss = lambda q: jnp.sum(explain.explain(method, tiny_apply, q, x, t, **GRAD_CASES[method]) ** 2)
    g = jax.grad(loss)(p)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(np.random.default_rng(2).standard_normal(a.shape), a.dtype), p)
    h = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * h * b, p, v)
    fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
    an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
    assert abs(float(an) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd))), (float(an), float(fd))


# --------------------------------------------------------------------------------------------
# DeepLIFT family.

def test_deeplift(small):
  base = (0.1 * np.random.default_rng(4).standard_normal(small.x.shape)).astype(np.float32)
  ref = captum_attr.DeepLift(small.torch).attribute(small.tx, baselines=nchw(base), target=small.tt)
  close(explain.deeplift(small.apply, small.params, small.x, small.target, baselines=base), csum(ref))


def test_deeplift_rescale_maxpool_sums_to_delta(small):
  """maxpool='rescale': Σ attributions = f(x) − f(x') per image (Captum's maps do not)."""
  base = (0.1 * np.random.default_rng(4).standard_normal(small.x.shape)).astype(np.float32)
  got = explain.deeplift(small.apply, small.params, small.x, small.target, baselines=base,
                         maxpool="rescale")
  with torch.no_grad():
    d = (small.torch(small.tx) - small.torch(nchw(base))).numpy()[[0, 1], small.target]
  np.testing.assert_allclose(np.asarray(got).sum((1, 2)), d, rtol=1e-4, atol=1e-6)


def test_deeplift_shap(small):
  base = (0.1 * np.random.default_rng(6).standard_normal((3, *small.x.shape[1:]))).astype(np.float32)
  ref = captum_attr.DeepLiftShap(small.torch).attribute(small.tx, baselines=nchw(base), target=small.tt)
  close(explain.deeplift_shap(small.apply, small.params, small.x, small.target, baselines=base),
        csum(ref))


# --------------------------------------------------------------------------------------------
# LRP.

def canonised_torch_smallcnn(pair):
  """The torch SmallCNN with every BatchNorm folded into the preceding conv and removed."""
  import copy
  m = copy.deepcopy(pair.torch)
  feats = list(m.features)
  keep = []
  with torch.no_grad():
    for i, layer in enumerate(feats):
      if isinstance(layer, torch.nn.BatchNorm2d):
        conv = keep[-1]
        a = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        conv.weight.mul_(a[:, None, None, None])
        conv.bias.copy_((conv.bias - layer.running_mean) * a + layer.bias)
      else:
        keep.append(layer)
  m.features = torch.nn.Sequential(*keep)
  return m.eval()


def captum_lrp(model, x, target):
  from captum.attr._utils import lrp_rules
  for layer in model.modules():
    if isinstance(layer, torch.nn.Conv2d):
      layer.rule = lrp_rules.Alpha1_Beta0_Rule()
    elif isinstance(layer, torch.nn.Linear):
      layer.rule = lrp_rules.EpsilonRule(epsilon=0.01)
  return captum_attr.LRP(model).attribute(x, target=target)


def test_lrp_smallcnn_canonised_vs_captum(small):
  tmodel = canonised_torch_smallcnn(small)
  with torch.no_grad():
    close(tmodel(small.tx).numpy(), small.torch(small.tx).numpy(), 1e-5)
  ref = captum_lrp(tmodel, small.tx, small.tt)
  got = explain.explain("lrp", small.apply, small.params, small.x, small.target)
  close(got, csum(ref))


def tiny_resnet_apply(p, x):
  """conv-BN-ReLU, then a residual block (conv-BN + skip, ReLU), 2x2 max-pool, mean, dense."""
  conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h1 = jax.nn.relu((conv(x, p["w1"]) + p["b1"]) * p["s1"] + p["t1"])
  u = conv(h1, p["w2"]) * p["s2"] + p["t2"]
  h2 = jax.nn.relu(h1 + u)
  m = jax.lax.reduce_window(h2, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return jnp.mean(m, axis=(1, 2)) @ p["w3"] + p["b3"], {"block": h2}


def tiny_resnet_params():
  r = np.random.default_rng(3)
  p = {"w1": r.standard_normal((3, 3, 3, 4)) * 0.5, "b1": r.standard_normal(4) * 0.1,
       "s1": r.uniform(0.5, 1.5, 4), "t1": r.standard_normal(4) * 0.2,
       "w2": r.standard_normal((3, 3, 4, 4)) * 0.5, "s2": r.uniform(0.5, 1.5, 4),
       "t2": r.standard_normal(4) * 0.2, "w3": r.standard_normal((4, 3)), "b3": r.standard_normal(3) * 0.1}
  return {k: np.asarray(v, np.float32) for k, v in p.items()}


def lrp_restated(p, x, target):
  """The composite's rules written layer by layer in float64 (torch.nn.functional ops)."""
  F = torch.nn.functional
  T = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  w1, w2 = (T(p[k]).permute(3, 2, 0, 1) for k in ("w1", "w2"))          # OIHW
  b1, s1, t1, s2, t2 = (T(p[k])[None, :, None, None] for k in ("b1", "s1", "t1", "s2", "t2"))
  w3, b3 = T(p["w3"]), T(p["b3"])
  stab = lambda z, e: z + e * torch.where(z >= 0, 1.0, -1.0)
  x = T(x).permute(0, 3, 1, 2)
  z1 = (F.conv2d(x, w1, padding=1) + b1) * s1 + t1
  h1 = F.relu(z1)
  u = F.conv2d(h1, w2, padding=1) * s2 + t2
  ssum = h1 + u
  h2 = F.relu(ssum)
  pm, idx = F.max_pool2d(h2, 2, return_indices=True)
  m = pm.mean((2, 3))
  z = m @ w3 + b3
  r = torch.zeros_like(z)
  r[torch.arange(len(target)), torch.as_tensor(target)] = z[torch.arange(len(target)), torch.as_tensor(target)]
  r_m = m * ((r / stab(z, 0.01)) @ w3.T)                                   # dense, ε = 0.01
  r_p = pm * (r_m / stab(m, 1e-9))[:, :, None, None] / (pm.shape[2] * pm.shape[3])   # mean
  r_h2 = h2 * F.max_unpool2d(r_p / stab(pm, 1e-9), idx, 2, output_size=h2.shape[2:])  # max-pool
  r_sum = r_h2                                                             # ReLU
  r_u, r_skip = u * r_sum / stab(ssum, 1e-9), h1 * r_sum / stab(ssum, 1e-9)           # addition
  fold = lambda w, s: (w * s.reshape(-1, 1, 1, 1)).clamp(min=0)           # BN folded, then W⁺
  w2p = fold(w2, s2)
  z2m = F.conv2d(h1, w2p, padding=1) + t2                                  # α1β0
  r_h1 = r_skip + h1 * F.conv_transpose2d(r_u / stab(z2m, 1e-9), w2p, padding=1)
  w1p = fold(w1, s1)
  z1m = F.conv2d(x, w1p, padding=1) + b1 * s1 + t1
  r_x = x * F.conv_transpose2d(r_h1 / stab(z1m, 1e-9), w1p, padding=1)
  return r_x.permute(0, 2, 3, 1).numpy(), r_h2.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("negative_scales", [False, True])
def test_lrp_residual_vs_restatement(negative_scales):
  """Skip additions (which Captum's LRP cannot take) against a float64 layer-by-layer statement
  of the BN-folded model, with positive or partly negative BatchNorm scales."""
  p = tiny_resnet_params()
  if negative_scales:
    p = {**p, "s1": p["s1"] * np.array([1, -1, 1, -1], np.float32),
         "s2": p["s2"] * np.array([-1, 1, 1, 1], np.float32)}
  x = np.random.default_rng(4).standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([0, 2], np.int32)
  ref_x, ref_layer = lrp_restated(p, x, t)
  close(explain.lrp(tiny_resnet_apply, p, x, t, reduce="none"), ref_x, 1e-4)
  close(explain.lrp_relevance(tiny_resnet_apply, p, x, t, layer="block"), ref_layer, 1e-4)
  m = np.maximum(ref_layer.sum(-1), 0)
  lo, hi = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
  close(explain.lrp_layer(tiny_resnet_apply, p, x, t, layer="block"), (m - lo) / (hi - lo), 1e-4)


@pytest.mark.parametrize("method,opts", [
    ("lrp", {}), ("lrp_layer", dict(layer="block3")), ("guided_backprop", {}),
    ("deconvolution", {}), ("deeplift", dict(maxpool="rescale"))])
def test_modified_rules_through_cpu_fast_grad(small, method, opts):
  """The rule methods see through the custom VJPs of ops.fastgrad (max-pool, strided stem)."""
  from nemjax.ops import fastgrad
  fast = fastgrad.cpu_fast_grad(small.apply)
  assert "custom_vjp_call" in str(jax.make_jaxpr(fast)(small.params, jnp.asarray(small.x)))
  want = explain.explain(method, small.apply, small.params, small.x, small.target, **opts)
  close(explain.explain(method, fast, small.params, small.x, small.target, **opts), want, 1e-6)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvolution", "deeplift"])
def test_relu_rules_keep_the_fast_max_pool_gradient(small, method):
  """ReLU-only rule tables leave ops.fastgrad's custom VJPs whole: no ``select_and_scatter``
  (XLA:CPU's slow max-pool gradient) in the program, unlike XLA's own gradient."""
  from nemjax.ops import fastgrad
  fast = fastgrad.cpu_fast_grad(small.apply)
  run = lambda fn: explain.explain(method, fn, small.params, small.x, small.target, fast_grad=False)
  assert "select_and_scatter" in jax.jit(lambda: run(small.apply)).lower().as_text()
  assert "select_and_scatter" not in jax.jit(lambda: run(fast)).lower().as_text()


def test_relu_rules_reach_inside_a_custom_vjp_that_holds_a_relu():
  """A user's ``custom_vjp`` around a ReLU is still inlined, so the guided rule applies there."""
  from nemjax.explain import rules
  w1 = jax.random.normal(jax.random.key(0), (6, 5))
  w2 = jax.random.normal(jax.random.key(1), (5, 3))

  @jax.custom_vjp
  def layer(h):
    return jax.nn.relu(h @ w1)
  layer.defvjp(lambda h: (layer(h), h),
               lambda h, g: (jax.vjp(lambda z: jax.nn.relu(z @ w1), h)[1](g)[0],))
  plain = lambda h: jnp.sum(jax.nn.relu(h @ w1) @ w2)
  wrapped = lambda h: jnp.sum(layer(h) @ w2)
  x = jax.random.normal(jax.random.key(2), (4, 6))
  want = jax.grad(rules.with_rules(plain, rules.GUIDED))(x)
  np.testing.assert_allclose(np.asarray(jax.grad(rules.with_rules(wrapped, rules.GUIDED))(x)),
                             np.asarray(want), rtol=1e-6)
  assert not np.allclose(np.asarray(want), np.asarray(jax.grad(plain)(x)))   # the rule mattered


# --------------------------------------------------------------------------------------------
# Perturbation family (32x32 images: SmallCNN needs at least 16 pixels).

def block_mask(size, block):
  """(size, size) ids of block x block squares, row-major."""
  idx = np.arange(size) // block
  return (idx[:, None] * (size // block) + idx[None, :]).astype(np.int64)


def test_occlusion(small):
  s = small
  for win, st in (((3, 8, 8), (3, 4, 4)), ((1, 6, 6), (1, 5, 5))):
    ref = captum_attr.Occlusion(s.torch).attribute(s.tx, sliding_window_shapes=win, strides=st,
                                                   target=s.tt, baselines=0.5,
                                                   perturbations_per_eval=4)
    got = explain.occlusion(s.apply, s.params, s.x, s.target, sliding_window_shapes=win[1:] + win[:1],
                            strides=st[1:] + st[:1], baselines=0.5, perturbations_per_eval=4)
    close(got, csum(ref))


def test_feature_ablation(small):
  s = small
  mask = block_mask(32, 4)
  ref = captum_attr.FeatureAblation(s.torch).attribute(
    s.tx, target=s.tt, feature_mask=torch.from_numpy(mask)[None, None], baselines=0.1)
  got = explain.feature_ablation(s.apply, s.params, s.x, s.target, feature_mask=mask,
                                 baselines=0.1, perturbations_per_eval=16)
  close(got, csum(ref))
  one = explain.feature_ablation(s.apply, s.params, s.x, s.target, feature_mask=mask, baselines=0.1)
  close(one, got)   # other batch sizes: float32 rounding of other conv schedules


def test_feature_permutation(small, monkeypatch):
  s = small
  x = np.concatenate([s.x, s.x[::-1] * 0.5 + 0.1])
  t = np.array([1, 3, 0, 2], np.int32)
  mask = block_mask(32, 8)
  rec = Recorder(torch.randperm)
  monkeypatch.setattr(torch, "randperm", rec)
  torch.manual_seed(0)
  ref = captum_attr.FeaturePermutation(s.torch).attribute(
    nchw(x), target=torch.from_numpy(t.astype(np.int64)), feature_mask=torch.from_numpy(mask)[None, None])
  monkeypatch.undo()
  perms = [p.numpy() for p in rec.out if not (p.numpy() == np.arange(4)).all()]
  assert len(perms) == 16
  got = explain.feature_permutation(s.apply, s.params, x, t, feature_mask=mask, perms=np.stack(perms))
  close(got, csum(ref))
  keyed = explain.feature_permutation(s.apply, s.params, x, t, feature_mask=mask, key=jax.random.key(0))
  assert np.isfinite(np.asarray(keyed)).all()


def test_shapley_value_sampling(small, monkeypatch):
  s = small
  mask = block_mask(32, 8)
  rec = Recorder(torch.randperm)
  monkeypatch.setattr(torch, "randperm", rec)
  torch.manual_seed(0)
  ref = captum_attr.ShapleyValueSampling(s.torch).attribute(
    s.tx, target=s.tt, feature_mask=torch.from_numpy(mask)[None, None], n_samples=3, baselines=0.2)
  monkeypatch.undo()
  perms = np.stack([p.numpy() for p in rec.out])
  got = explain.shapley_value_sampling(s.apply, s.params, s.x, s.target, feature_mask=mask,
                                       perms=perms, baselines=0.2, perturbations_per_eval=8)
  close(got, csum(ref))
  # Efficiency: the features' values (each repeated on its 8·8 pixels · 3 channels) sum to
  # f(x) − f(baseline).
  logits = np.asarray(s.apply(s.params, jnp.asarray(s.x))[0])[[0, 1], s.target]
  base = np.asarray(s.apply(s.params, jnp.full_like(jnp.asarray(s.x), 0.2))[0])[[0, 1], s.target]
  np.testing.assert_allclose(np.asarray(got).sum((1, 2)) / 192, logits - base, rtol=1e-4, atol=1e-5)


def test_perturbation_methods_jit(small):
  s = small
  mask = block_mask(32, 16)
  f = jax.jit(lambda p, x, t: explain.feature_ablation(s.apply, p, x, t, feature_mask=mask))
  close(f(s.params, s.x, s.target),
        explain.feature_ablation(s.apply, s.params, s.x, s.target, feature_mask=mask), 1e-5)
  with pytest.raises(ValueError, match="feature_mask"):
    explain.feature_ablation(s.apply, s.params, s.x, s.target, feature_mask=mask[:3])


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_lime_and_kernel_shap(small, name):
  s = small
  mask = block_mask(32, 8)
  from captum_helpers import WeightedLeastSquares
  wls = WeightedLeastSquares()
  torch.manual_seed(0)
  cls = captum_attr.Lime if name == "lime" else captum_attr.KernelShap
  explainer = cls(s.torch, interpretable_model=wls) if name == "lime" else cls(s.torch)
  if name == "kernel_shap":
    explainer.interpretable_model = wls
  ref = explainer.attribute(s.tx, target=s.tt, feature_mask=torch.from_numpy(mask)[None, None],
                            baselines=0.1, n_samples=40)
  samples = np.stack(wls.seen)                                  # (N, S, F)
  got = explain.explain(name, s.apply, s.params, s.x, s.target, samples=samples, baselines=0.1,
                        feature_mask=mask, perturbations_per_eval=8)
  close(got, csum(ref))
  keyed = explain.explain(name, s.apply, s.params, s.x, s.target, key=jax.random.key(1),
                          baselines=0.1, feature_mask=mask, n_samples=20, perturbations_per_eval=20)
  assert keyed.shape == (2, 32, 32) and np.isfinite(np.asarray(keyed)).all()


# --------------------------------------------------------------------------------------------
# Deeper torchvision-layout models at small inputs (slow: building VGG16 alone takes seconds).

@pytest.fixture(scope="module")
def resnet18():
  return Pair("resnet18", 5, ("layer4", "layer3"), 32)


@pytest.fixture(scope="module")
def vgg16():
  return Pair("vgg16", 5, ("features.29",), 32)


@pytest.mark.slow
def test_resnet18_gradient_family(resnet18):
  s = resnet18
  close(explain.saliency(s.apply, s.params, s.x, s.target),
        csum(captum_attr.Saliency(s.torch).attribute(s.tx, target=s.tt)))
  close(explain.integrated_gradients(s.apply, s.params, s.x, s.target, n_steps=4, method="riemann_right"),
        csum(captum_attr.IntegratedGradients(s.torch).attribute(s.tx, target=s.tt, n_steps=4,
                                                                method="riemann_right")))
  for layer in ("layer4", "layer3"):
    ref = captum_attr.LayerGradCam(s.torch, getattr(s.torch, layer)).attribute(s.tx, target=s.tt)
    close(explain.grad_cam(s.apply, s.params, s.x, s.target, layer=layer), ref.detach().numpy()[:, 0])
  # LRP through the skip additions (checked against a restatement on a small residual net above).
  lrp = np.asarray(explain.lrp(s.apply, s.params, s.x, s.target))
  lrp16 = np.asarray(explain.lrp_layer(s.apply, s.params, s.x, s.target, layer="layer3"))
  assert np.isfinite(lrp).all() and lrp16.shape == (2, 2, 2) and lrp16.max() == pytest.approx(1.0)


@pytest.mark.slow
def test_resnet18_deeplift_sums_to_delta(resnet18):
  """Captum's DeepLift refuses a ResNet (one ReLU module used twice per block); nemjax's
  per-primitive rules take it, and with maxpool='rescale' the map sums to f(x) − f(x')."""
  s = resnet18
  got = explain.deeplift(s.apply, s.params, s.x, s.target, baselines=0.1, maxpool="rescale")
  with torch.no_grad():
    d = (s.torch(s.tx) - s.torch(torch.full_like(s.tx, 0.1))).numpy()[[0, 1], s.target]
  np.testing.assert_allclose(np.asarray(got).sum((1, 2)), d, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_vgg16_guided_deeplift_lrp_vs_captum(vgg16):
  s = vgg16
  close(explain.guided_backprop(s.apply, s.params, s.x, s.target),
        csum(captum_attr.GuidedBackprop(s.torch).attribute(s.tx, target=s.tt)))
  base = (0.1 * np.random.default_rng(2).standard_normal(s.x.shape)).astype(np.float32)
  close(explain.deeplift(s.apply, s.params, s.x, s.target, baselines=base),
        csum(captum_attr.DeepLift(s.torch).attribute(s.tx, baselines=nchw(base), target=s.tt)))
  close(explain.lrp(s.apply, s.params, s.x, s.target), csum(captum_lrp(s.torch, s.tx, s.tt)))
  ref = captum_attr.LayerGradCam(s.torch, s.torch.features[29]).attribute(s.tx, target=s.tt)
  close(explain.grad_cam(s.apply, s.params, s.x, s.target, layer="features.29"), ref.detach().numpy()[:, 0])


@pytest.mark.parametrize("method, opts", [
  ("lrp", {}), pytest.param("guided_backprop", {}, marks=pytest.mark.slow),
  pytest.param("grad_cam_heo", dict(layer="block4"), marks=pytest.mark.slow),
  pytest.param("deeplift", dict(baselines=0.1), marks=pytest.mark.slow)])
def test_vmap_over_batches(small, method, opts):
  xs = jnp.stack([jnp.asarray(small.x), jnp.asarray(small.x[::-1])])
  got = jax.vmap(lambda xx: explain.explain(method, small.apply, small.params, xx, small.target, **opts))(xs)
  for i in range(2):
    close(got[i], explain.explain(method, small.apply, small.params, xs[i], small.target, **opts), 1e-5)
