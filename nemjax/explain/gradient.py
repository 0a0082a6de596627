"""Gradient attributions, named and defaulted as Captum 0.9 names them.

Every method is ``method(apply_fn, params, x, target, **opts)`` with ``x`` (N, H, W, C) float
images, ``target`` (N,) int class indices and ``apply_fn(params, x)`` returning logits (N, K) or
``(logits, {tap: acts})``. Input maps are summed over the colour channel, as Captum users do
with its (N, C, H, W) output (``reduce='none'`` keeps (N, H, W, C)); layer maps are (N, h, w).
All are pure JAX (jit / vmap-able) and differentiable with respect to ``params``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.explain import _core, rules
from nemjax.explain._core import ApplyFn

__all__ = ["saliency", "input_x_gradient", "integrated_gradients", "ig_steps", "noise_tunnel",
           "smoothgrad", "gradient_shap", "gaussian_noise", "guided_backprop", "deconvolution",
           "grad_cam", "grad_cam_heo", "guided_grad_cam", "interpolate_nearest"]

_IG_METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
               "gausslegendre")


def saliency(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
             abs: bool = True, reduce: str = "sum") -> jax.Array:  # noqa: A002 (Captum's name)
  """Captum ``Saliency``: ``|d logit_t / dx|`` (``abs=True``, the default) or the raw gradient.

  Returns:
    (N, H, W) channel sums (``reduce='none'``: (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "saliency")
  _core.check_reduce(reduce, "saliency")
  g = _core.input_grad(_core.logit_fn(apply_fn), params, x, target)
  return _core.reduce_map(jnp.abs(g) if abs else g, reduce)


def input_x_gradient(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                     reduce: str = "sum") -> jax.Array:
  """Captum ``InputXGradient``: ``x * d logit_t / dx``. Returns (N, H, W) (or (N, H, W, C))."""
  x, target = _core.check_x_target(x, target, "input_x_gradient")
  _core.check_reduce(reduce, "input_x_gradient")
  return _core.reduce_map(x * _core.input_grad(_core.logit_fn(apply_fn), params, x, target), reduce)


def ig_steps(n_steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
  """Captum's quadrature: ``(step_sizes (n,), alphas (n,))`` float64 for ``method``.

  Riemann rules use equal steps 1/n (halved at both ends for the trapezoid) at alphas
  ``linspace(0, 1, n)`` (trapezoid), ``[0, 1 − 1/n]`` (left), ``[1/2n, 1 − 1/2n]`` (middle),
  ``[1/n, 1]`` (right); Gauss-Legendre uses the n-point nodes and weights mapped to [0, 1].
  """
  if method not in _IG_METHODS:
    raise ValueError(f"method must be one of {list(_IG_METHODS)}, got {method!r}")
  n = int(n_steps)
  if n < (1 if method == "gausslegendre" else 2):
    raise ValueError(f"n_steps must be >= {1 if method == 'gausslegendre' else 2} for {method}, got {n_steps}")
  if method == "gausslegendre":
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return 0.5 * weights, 0.5 * (1 + nodes)
  steps = np.full(n, 1.0 / n)
  if method == "riemann_trapezoid":
    steps[0] /= 2
    steps[-1] /= 2
    alphas = np.linspace(0, 1, n)
  elif method == "riemann_left":
    alphas = np.linspace(0, 1 - 1 / n, n)
  elif method == "riemann_middle":
    alphas = np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
  else:
    alphas = np.linspace(1 / n, 1, n)
  return steps, alphas


def integrated_gradients(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                         baselines: Any = None, n_steps: int = 50, method: str = "gausslegendre",
                         internal_batch_size: int | str | None = "auto", reduce: str = "sum"
                         ) -> jax.Array:
  """Captum ``IntegratedGradients``: ``(x − b) · Σ_k w_k ∇f(b + α_k (x − b))``.

  Args:
    baselines: None (zeros, Captum's default), a scalar or an array broadcastable to x.
    n_steps, method: see :func:`ig_steps` (Captum's defaults: 50, ``'gausslegendre'``).
    internal_batch_size: steps evaluated at a time (each is an N-image batch); None = all at
      once (one (n_steps · N)-image batch, Captum's default); ``'auto'`` (the default) = all at
      once when they fit ``_core.AUTO_PIXELS_PER_CALL``, else as many as do.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "integrated_gradients")
  _core.check_reduce(reduce, "integrated_gradients")
  b = _core.as_baseline(baselines, x, "integrated_gradients")
  steps, alphas = ig_steps(n_steps, method)
  fn = _core.logit_fn(apply_fn)
  alphas = jnp.asarray(alphas, x.dtype)

  def grad_at(alpha):
    return _core.input_grad(fn, params, b + alpha * (x - b), target)

  chunk = _core.items_per_call(internal_batch_size, len(steps), x, "internal_batch_size")
  grads = _core.batched(grad_at, alphas, chunk)                     # (n, N, H, W, C)
  total = jnp.tensordot(jnp.asarray(steps, x.dtype), grads, axes=1)
  return _core.reduce_map((x - b) * total, reduce)


def gaussian_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Standard normal draws of ``shape`` from ``key``: the noise of the noise tunnel and
  GradientSHAP.

  ``jax.random.normal`` with threefry's sequential counters
  (``jax.threefry_partitionable(False)``, scoped to this draw): one threefry2x32 evaluation per
  two values rather than one per value. On a 2-core CPU it draws SmoothGrad's 8 × 5 × 64² × 3
  values in 1.4 ms instead of 4.4 ms, a quarter of a SmallCNN call saved. A key's draws
  are fixed by this choice, whatever the process's ``jax_threefry_partitionable`` setting.
  """
  with jax.threefry_partitionable(False):
    return jax.random.normal(key, shape, dtype)


def _base_method(name: str) -> Callable[..., jax.Array]:
  """The method NoiseTunnel wraps (looked up when called: they are defined below)."""
  table = {"saliency": saliency, "input_x_gradient": input_x_gradient,
           "integrated_gradients": integrated_gradients, "guided_backprop": guided_backprop,
           "deconvolution": deconvolution}
  if name not in table:
    raise ValueError(f"method must be one of {sorted(table)}, got {name!r}")
  return table[name]


def noise_tunnel(method: str, apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                 key: jax.Array | None = None, noise: jax.Array | None = None, nt_samples: int = 5,
                 stdevs: float = 1.0, nt_type: str = "smoothgrad",
                 nt_samples_batch_size: int | str | None = "auto", reduce: str = "sum",
                 **method_opts: Any) -> jax.Array:
  """Captum ``NoiseTunnel(method)``: statistics of ``method`` over noisy copies of x.

  Sample j of image i is ``x_i + noise[i, j]``, noise ~ N(0, stdevs²) (absolute, as Captum);
  ``nt_type`` ``'smoothgrad'`` averages the per-channel maps, ``'smoothgrad_sq'`` averages their
  squares, ``'vargrad'`` takes mean(a²) − mean(a)²; the channel sum comes last.

  Args:
    method: ``'saliency'``, ``'input_x_gradient'``, ``'integrated_gradients'``,
      ``'guided_backprop'`` or ``'deconvolution'``; ``method_opts`` go to it.
    key: PRNG key for the noise, drawn by :func:`gaussian_noise` (required unless ``noise``
      is given).
    noise: (N, nt_samples, H, W, C) explicit noise (then ``key`` and ``stdevs`` are unused).
    nt_samples_batch_size: samples per batch (each an N-image batch); None = all at once
      (Captum's default); ``'auto'`` (the default): see :func:`integrated_gradients`.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "noise_tunnel")
  _core.check_reduce(reduce, "noise_tunnel")
  if nt_type not in ("smoothgrad", "smoothgrad_sq", "vargrad"):
    raise ValueError(f"nt_type must be 'smoothgrad', 'smoothgrad_sq' or 'vargrad', got {nt_type!r}")
  base = _base_method(method)
  if noise is None:
    if key is None:
      raise ValueError("noise_tunnel: key is required when noise is not given")
    noise = stdevs * gaussian_noise(key, (x.shape[0], int(nt_samples)) + x.shape[1:], x.dtype)
  noise = jnp.asarray(noise, x.dtype)
  if noise.ndim != 5 or noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
    raise ValueError(f"noise: must be ({x.shape[0]}, nt_samples, {', '.join(map(str, x.shape[1:]))}),"
                     f" got {noise.shape}")

  def one(nz):
    return base(apply_fn, params, x + nz, target, reduce="none", **method_opts)

  chunk = _core.items_per_call(nt_samples_batch_size, noise.shape[1], x, "nt_samples_batch_size")
  maps = _core.batched(one, jnp.swapaxes(noise, 0, 1), chunk)       # (S, N, H, W, C)
  mean = jnp.mean(maps, axis=0)
  mean_sq = jnp.mean(maps * maps, axis=0)
  out = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean * mean}[nt_type]
  return _core.reduce_map(out, reduce)


def smoothgrad(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, **opts: Any
               ) -> jax.Array:
  """SmoothGrad: :func:`noise_tunnel` over :func:`saliency` (Captum ``NoiseTunnel(Saliency)``)."""
  return noise_tunnel("saliency", apply_fn, params, x, target, **opts)


def gradient_shap(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                  baselines: jax.Array, key: jax.Array | None = None, n_samples: int = 5,
                  stdevs: float = 0.0, noise: jax.Array | None = None,
                  baseline_index: jax.Array | None = None, alphas: jax.Array | None = None,
                  internal_batch_size: int | str | None = "auto", reduce: str = "sum"
                  ) -> jax.Array:
  """Captum ``GradientShap``: mean over samples of ``(x̃ − b) · ∇f(b + α (x̃ − b))``.

  Sample j of image i draws ``x̃ = x_i + noise[i, j]`` (N(0, stdevs²)), a baseline
  ``baselines[baseline_index[i, j]]`` (uniform) and ``α = alphas[i, j]`` ~ U(0, 1).

  Args:
    baselines: (B, H, W, C) the baseline distribution.
    key: PRNG key for whichever of noise / baseline_index / alphas is not given.
    noise: (N, n_samples, H, W, C); baseline_index: (N, n_samples) int; alphas: (N, n_samples).
    internal_batch_size: samples per batch (each N images); None = all at once (Captum's
      default); ``'auto'`` (the default): see :func:`integrated_gradients`.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "gradient_shap")
  _core.check_reduce(reduce, "gradient_shap")
  baselines = _core.check_baselines(baselines, x)
  n, s = x.shape[0], int(n_samples)
  if key is None and (noise is None or baseline_index is None or alphas is None):
    raise ValueError("gradient_shap: key is required unless noise, baseline_index and alphas are given")
  k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None,) * 3
  if noise is None and isinstance(stdevs, (int, float)) and stdevs == 0:
    noise = jnp.zeros((n, s) + x.shape[1:], x.dtype)   # Captum's default: no draw needed
  elif noise is None:
    noise = stdevs * gaussian_noise(k1, (n, s) + x.shape[1:], x.dtype)
  if baseline_index is None:
    baseline_index = jax.random.randint(k2, (n, s), 0, baselines.shape[0])
  if alphas is None:
    alphas = jax.random.uniform(k3, (n, s), x.dtype)
  noise, alphas = jnp.asarray(noise, x.dtype), jnp.asarray(alphas, x.dtype)
  baseline_index = jnp.asarray(baseline_index)
  if noise.shape != (n, s) + x.shape[1:]:
    raise ValueError(f"noise: must be {(n, s) + x.shape[1:]}, got {noise.shape}")
  if baseline_index.shape != (n, s) or alphas.shape != (n, s):
    raise ValueError(f"baseline_index and alphas must be ({n}, {s}), got {baseline_index.shape}"
                     f" and {alphas.shape}")
  fn = _core.logit_fn(apply_fn)

  def one(args):
    nz, bi, a = args
    xn = x + nz
    b = baselines[bi]
    g = _core.input_grad(fn, params, b + a[:, None, None, None] * (xn - b), target)
    return (xn - b) * g

  chunk = _core.items_per_call(internal_batch_size, s, x, "internal_batch_size")
  maps = _core.batched(one, (jnp.swapaxes(noise, 0, 1), baseline_index.T, alphas.T), chunk)
  return _core.reduce_map(jnp.mean(maps, axis=0), reduce)


def _rule_grad(apply_fn, params, x, target, table):
  fn = rules.with_rules(_core.logit_fn(apply_fn), table)
  return _core.input_grad(fn, params, x, target)


def guided_backprop(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                    reduce: str = "sum") -> jax.Array:
  """Captum ``GuidedBackprop``: the gradient with every ReLU passing ``relu(g · 1[x > 0])``.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "guided_backprop")
  _core.check_reduce(reduce, "guided_backprop")
  return _core.reduce_map(_rule_grad(apply_fn, params, x, target, rules.GUIDED), reduce)


def deconvolution(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                  reduce: str = "sum") -> jax.Array:
  """Captum ``Deconvolution``: the gradient with every ReLU passing ``relu(g)``.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "deconvolution")
  _core.check_reduce(reduce, "deconvolution")
  return _core.reduce_map(_rule_grad(apply_fn, params, x, target, rules.DECONV), reduce)


def _cam_parts(apply_fn, params, x, target, layer, fn_name):
  x, target = _core.check_x_target(x, target, fn_name)
  g, a = _core.layer_grad_and_acts(apply_fn, params, x, target, layer)
  if a.ndim != 4:
    raise ValueError(f"layer: {fn_name} needs a convolutional tap (N, h, w, C), {layer!r} is {a.shape}")
  return g, a


def grad_cam(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *, layer: str,
             relu_attributions: bool = False) -> jax.Array:
  """Captum ``LayerGradCam``: ``Σ_c mean_hw(∂logit_t/∂A_c) · A_c`` at tap ``layer``.

  ``relu_attributions=False`` is Captum's default (no ReLU). ``apply_fn`` must return
  ``(logits, {layer: acts})``.

  Returns:
    (N, h, w) at the layer's resolution.
  """
  g, a = _cam_parts(apply_fn, params, x, target, layer, "grad_cam")
  cam = jnp.sum(jnp.mean(g, axis=(1, 2), keepdims=True) * a, axis=-1)
  return jnp.maximum(cam, 0.0) if relu_attributions else cam


def grad_cam_heo(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                 layer: str) -> jax.Array:
  """Grad-CAM as Heo et al. (NeurIPS 2019) compute it: ReLU of the channel sum weighted by the
  spatial mean gradient of the target logit, divided by its per-image maximum (all zeros when
  the map is zero everywhere).

  Returns:
    (N, h, w) in [0, 1].
  """
  cam = grad_cam(apply_fn, params, x, target, layer=layer, relu_attributions=True)
  mx = jnp.max(cam, axis=(1, 2), keepdims=True)
  return jnp.where(mx > 0, cam / jnp.where(mx > 0, mx, 1.0), 0.0)


def interpolate_nearest(m: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """``torch.nn.functional.interpolate(mode='nearest')`` of (N, h, w) maps to (N, H, W).

  Source index ``min(floor(i · h / H), h − 1)`` per axis (float32 scale, as PyTorch).
  """
  h, w = m.shape[1:3]
  iy = np.minimum(np.floor(np.arange(out_hw[0], dtype=np.float32) * np.float32(h / out_hw[0])), h - 1)
  ix = np.minimum(np.floor(np.arange(out_hw[1], dtype=np.float32) * np.float32(w / out_hw[1])), w - 1)
  return m[:, iy.astype(np.int32)][:, :, ix.astype(np.int32)]


def guided_grad_cam(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                    layer: str, reduce: str = "sum") -> jax.Array:
  """Captum ``GuidedGradCam``: guided backprop times the ReLU'd Grad-CAM upsampled (nearest).

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  cam = grad_cam(apply_fn, params, x, target, layer=layer, relu_attributions=True)
  gb = guided_backprop(apply_fn, params, x, target, reduce="none")
  up = interpolate_nearest(cam, x.shape[1:3])
  return _core.reduce_map(gb * up[..., None], reduce)
