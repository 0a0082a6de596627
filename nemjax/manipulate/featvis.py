"""Synthetic feature visualisation: activation maximisation of a channel.

The image is parameterised in a decorrelated space (Olah, Mordvintsev & Schubert, "Feature
Visualization", Distill 2017; the ``lucid`` library):

* **Fourier basis**: a complex ``rfft2`` spectrum ``S`` (``(H, W//2+1, 3)``, real and
  imaginary parts as parameters, initialised ``N(0, 0.01²)``) scaled by ``1/max(|f|, 1/max(H,W))``
  (a 1/f power law, so all frequencies start with similar energy in pixel space) and by
  ``√(HW)``, then ``x = irfft2(scale · S) / 4``.
* **Colour decorrelation**: the three channels of ``x`` are mixed by a fixed 3×3 matrix, the
  square root of the colour covariance of ImageNet images as published in lucid
  (``color_correlation_svd_sqrt``), normalised by its largest column norm.
* **Sigmoid** to map to valid pixel values in ``[0, 1]``.

Each optimisation step applies random transforms (explicit keys): translation jitter, scaling
and rotation by one bilinear resampling with grey (0.5) fill, which makes the result robust
rather than adversarial. The objective is optimised with ``optax.adam``.

Example::

  def features_fn(img):                       # (B, H, W, 3) in [0, 1]
    return apply_fn(state, preprocess(img))[1]
  img = visualize_channel(features_fn, ("layer4", 7), jax.random.key(0), size=128)
  imgs = visualize_channels(features_fn, "layer4", jnp.arange(16), jax.random.key(0))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.ops.adam import adam_minimise

__all__ = [
    "FEATVIS_LEARNING_RATE",
    "COLOR_CORRELATION_SVD_SQRT",
    "FeatVisConfig",
    "init_spectrum",
    "spectrum_to_image",
    "random_transform",
    "visualize_channel",
    "visualize_channels",
]

FEATVIS_LEARNING_RATE = 0.05
"""Adam's step on the image parameterisation (lucid's default): the one home of this default."""

# Square root of the ImageNet RGB colour covariance (lucid.optvis.param.color).
COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]], np.float32)
_COLOR = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))

FeaturesFn = Callable[[jax.Array], Any]


class FeatVisConfig(NamedTuple):
  """Random transforms applied before every forward pass."""
  jitter: float = 12.0                    # max |translation| in pixels, per axis
  scale: tuple[float, float] = (0.9, 1.1)  # uniform scale range
  max_angle: float = 10.0                 # max |rotation| in degrees
  init_sd: float = 0.01                   # std of the initial spectrum
  objective: str = "mean"                 # "mean" activation or "energy" (squared L2 norm)


def _freq_scale(h: int, w: int) -> np.ndarray:
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.rfftfreq(w)[None, :]
  freqs = np.sqrt(fx * fx + fy * fy)
  scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w))
  return (scale * math.sqrt(h * w)).astype(np.float32)  # (h, w//2+1)


def init_spectrum(key: jax.Array, size: int | tuple[int, int], sd: float = 0.01) -> jax.Array:
  """Random initial spectrum parameters.

  Args:
    key: PRNG key.
    size: image side ``H = W`` or ``(H, W)``.
    sd: standard deviation of the real and imaginary parts.

  Returns:
    ``(H, W//2+1, 3, 2)`` float32 (real, imaginary).
  """
  h, w = _hw(size)
  return sd * jax.random.normal(key, (h, w // 2 + 1, 3, 2), jnp.float32)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, int):
    size = (size, size)
  if len(size) != 2 or min(size) < 2:
    raise ValueError(f"size must be an int or (H, W) with sides >= 2, got {size}")
  return int(size[0]), int(size[1])


def spectrum_to_image(spectrum: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  r"""Map spectrum parameters to an image in ``[0, 1]``.

  .. math:: x = \sigma\big(\mathrm{irfft2}(s \odot S) / 4 \cdot M^\top\big)

  with ``s`` the 1/f · √(HW) scale and ``M`` the normalised colour matrix.

  Args:
    spectrum: ``(H, W//2+1, 3, 2)`` parameters.
    size: ``H`` or ``(H, W)``.

  Returns:
    ``(H, W, 3)`` float32 image in ``[0, 1]``.
  """
  h, w = _hw(size)
  if spectrum.shape != (h, w // 2 + 1, 3, 2):
    raise ValueError(f"spectrum must have shape {(h, w // 2 + 1, 3, 2)}, got {spectrum.shape}")
  scale = jnp.asarray(_freq_scale(h, w))[:, :, None]
  spec = jax.lax.complex(spectrum[..., 0], spectrum[..., 1]) * scale
  x = jnp.fft.irfft2(spec, s=(h, w), axes=(0, 1)) / 4.0  # (h, w, 3)
  x = x @ jnp.asarray(_COLOR).T
  return jax.nn.sigmoid(x)


def random_transform(key: jax.Array, image: jax.Array,
                     config: FeatVisConfig = FeatVisConfig()) -> jax.Array:
  """Random translation + scale + rotation about the centre (one bilinear resampling).

  Args:
    key: PRNG key.
    image: ``(H, W, 3)`` image.
    config: transform ranges.

  Returns:
    ``(H, W, 3)`` transformed image; pixels sampled from outside are 0.5 (grey).
  """
  h, w = image.shape[:2]
  kt, ks, ka = jax.random.split(key, 3)
  t = jax.random.uniform(kt, (2,), minval=-config.jitter, maxval=config.jitter)
  s = jax.random.uniform(ks, (), minval=config.scale[0], maxval=config.scale[1])
  a = jax.random.uniform(ka, (), minval=-config.max_angle, maxval=config.max_angle)
  a = a * (math.pi / 180.0)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  dy, dx = yy - cy - t[0], xx - cx - t[1]
  c, sn = jnp.cos(a), jnp.sin(a)
  sy = (c * dy - sn * dx) / s + cy  # inverse rotation and scaling of the output grid
  sx = (sn * dy + c * dx) / s + cx
  out = [jax.scipy.ndimage.map_coordinates(image[..., k], [sy, sx], order=1, mode="constant",
                                           cval=0.5) for k in range(image.shape[-1])]
  return jnp.stack(out, axis=-1)


def _channel_objective(out: Any, layer: str | None, channel: jax.Array, kind: str) -> jax.Array:
  if isinstance(out, Mapping):
    if layer is None:
      raise ValueError("features_fn returned a dict of layers: give layer_channel=(layer, c)")
    if layer not in out:
      raise ValueError(f"layer {layer!r} not in features_fn's outputs {sorted(out)}")
    acts = out[layer]
  else:
    acts = out
  acts = acts[0]  # single image
  a = acts[..., channel]  # (h, w) or ()
  if kind == "mean":
    return jnp.mean(a)
  if kind == "energy":
    return jnp.sum(jnp.square(a))
  raise ValueError(f"objective must be 'mean' or 'energy', got {kind!r}")


def _optimise(features_fn: FeaturesFn, layer: str | None, channel: jax.Array, key: jax.Array,
              size: tuple[int, int], steps: int, lr: float, config: FeatVisConfig) -> jax.Array:
  k_init, k_loop = jax.random.split(key)
  spectrum = init_spectrum(k_init, size, config.init_sd)

  def loss_fn(spec, k):
    img = random_transform(k, spectrum_to_image(spec, size), config)
    return -_channel_objective(features_fn(img[None]), layer, channel, config.objective)

  return spectrum_to_image(adam_minimise(loss_fn, spectrum, k_loop, steps, lr), size)


_optimise_jit = jax.jit(_optimise, static_argnames=("features_fn", "layer", "size", "steps", "lr",
                                                    "config"))


def _check(steps: int, lr: float, config: FeatVisConfig) -> None:
  if int(steps) < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if not lr > 0:
    raise ValueError(f"lr must be > 0, got {lr}")
  if config.objective not in ("mean", "energy"):
    raise ValueError(f"objective must be 'mean' or 'energy', got {config.objective!r}")
  if not 0 < config.scale[0] <= config.scale[1]:
    raise ValueError(f"scale range must satisfy 0 < lo <= hi, got {config.scale}")


def visualize_channel(features_fn: FeaturesFn, layer_channel: Any, key: jax.Array, *,
                      size: int | tuple[int, int] = 128, steps: int = 256,
                      lr: float = FEATVIS_LEARNING_RATE,
                      config: FeatVisConfig = FeatVisConfig()) -> jax.Array:
  r"""Synthesise the image that maximises one channel.

  .. math:: x^* = \arg\max_S \; \mathbb{E}_{T}\, \phi_c\big(f_l(T(x(S)))\big)

  with ``φ_c`` the spatial mean of channel ``c`` (``config.objective="mean"``, lucid's channel
  objective) or its squared L2 norm (``"energy"``, the paper's channel activation).

  Pure and jittable; vmap over ``(channel, key)`` for several channels
  (:func:`visualize_channels`). ``steps=0`` returns the initial image for ``key``.

  Args:
    features_fn: ``features_fn(images (B, H, W, 3) in [0, 1]) -> {layer: acts}`` or an acts
      array ``(B, h, w, C)`` / ``(B, C)``; it must include the model's input normalisation and
      run the model in inference mode.
    layer_channel: ``(layer, channel)``, or a channel index when ``features_fn`` returns an
      array. ``channel`` may be a traced int.
    key: PRNG key (initial spectrum and per-step transforms).
    size: image side or ``(H, W)``.
    steps: Adam steps.
    lr: Adam learning rate.
    config: transform ranges and objective.

  Returns:
    ``(H, W, 3)`` float32 image in ``[0, 1]``.
  """
  _check(steps, lr, config)
  if isinstance(layer_channel, tuple):
    if len(layer_channel) != 2:
      raise ValueError(f"layer_channel must be (layer, channel), got {layer_channel}")
    layer, channel = layer_channel
  else:
    layer, channel = None, layer_channel
  return _optimise_jit(features_fn, layer, jnp.asarray(channel, jnp.int32), key, _hw(size),
                       int(steps), float(lr), config)


def visualize_channels(features_fn: FeaturesFn, layer: str | None, channels: Sequence[int] | jax.Array,
                       key: jax.Array, *, size: int | tuple[int, int] = 128, steps: int = 256,
                       lr: float = FEATVIS_LEARNING_RATE,
                       config: FeatVisConfig = FeatVisConfig()) -> jax.Array:
  """Visualise several channels of one layer at once (``jax.vmap`` of :func:`visualize_channel`
  over channels, each with its own key from ``jax.random.split(key, len(channels))``).

  Returns:
    ``(len(channels), H, W, 3)`` images in ``[0, 1]``.
  """
  _check(steps, lr, config)
  channels = jnp.asarray(channels, jnp.int32)
  if channels.ndim != 1:
    raise ValueError(f"channels must be a 1-D list of indices, got shape {channels.shape}")
  keys = jax.random.split(key, channels.shape[0])
  hw = _hw(size)

  def one(c, k):
    return _optimise(features_fn, layer, c, k, hw, int(steps), float(lr), config)

  return jax.jit(jax.vmap(one))(channels, keys)
