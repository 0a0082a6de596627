"""Trojan triggers as pure functions of explicit PRNG keys: patches, style blends, concept masks.

Images are float32 ``(N, H, W, 3)`` in [0, 1]. Every function returns the triggered images
and the per-image trigger mask ``(N, H, W)`` in [0, 1] (how much of each pixel is the
trigger): the ground truth an attribution map is compared with.

* Patch (Casper's patch trojans): a ``side × side`` pattern covering ``area_fraction`` of the
  image (default 1/16: 56×56 in 224×224; the thesis's 64×64 is 1/16 of a 256×256 image before
  the 224 crop), pasted at a uniformly random location with colour jitter (brightness,
  contrast, saturation), pixel-wise Gaussian noise and soft edges: its alpha
  (:func:`soft_edge_alpha`) is 1 in the centre and falls smoothly to ~0 over the outer
  ``soft_edge`` share of each side (a foveal blur of the border).
* Style: no style-transfer network is available here, so a style trojan is a texture blend,
  ``(1 − s)·x + s·T`` with ``T`` a fixed random texture (coloured sinusoidal gratings,
  :func:`make_style_texture`) shifted by a random offset per image; its mask is the whole
  image.
* Natural features change no pixel: :func:`concept_masks` gives where a Broden label is.

Example::

  trig = make_patch_trigger(jax.random.key(0), image_size=224)
  x_t, masks = apply_trigger(jax.random.key(1), x01, trig)      # (N,224,224,3), (N,224,224)
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ColourJitter", "Trigger", "PatchDraw", "StyleTrigger", "patch_side",
           "soft_edge_alpha", "random_pattern", "make_patch_trigger", "draw_patch",
           "paste_patch", "apply_trigger", "make_style_texture", "apply_style",
           "concept_presence", "concept_masks"]

_LUMA = (0.299, 0.587, 0.114)  # grey level of an RGB colour (saturation jitter)


@dataclasses.dataclass(frozen=True)
class ColourJitter:
  """Per-image colour jitter of a patch: each factor uniform in ``[1 − j, 1 + j]``."""
  brightness: float = 0.2   # multiplies the pattern
  contrast: float = 0.2     # scales the pattern about its mean
  saturation: float = 0.2   # scales the pattern about its grey level

  def validate(self) -> None:
    for name in ("brightness", "contrast", "saturation"):
      v = getattr(self, name)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: must be in [0, 1), got {v}")


class Trigger(NamedTuple):
  """A patch trigger (a pytree; :func:`make_patch_trigger`)."""
  pattern: jax.Array      # (h, w, 3) float32 in [0, 1]
  alpha: jax.Array        # (h, w) float32 in [0, 1], soft (foveal) edges
  noise_std: jax.Array    # () float32, pixel-wise Gaussian noise σ added per image
  jitter: jax.Array       # (3,) float32 brightness, contrast, saturation jitter amplitudes


class PatchDraw(NamedTuple):
  """The random draws of one patch application (:func:`draw_patch`)."""
  top: jax.Array          # (N,) int32 row of the patch's top-left pixel, in [0, H − h]
  left: jax.Array         # (N,) int32 column of the patch's top-left pixel, in [0, W − w]
  factors: jax.Array      # (N, 3) float32 brightness, contrast, saturation factors
  noise: jax.Array        # (N, h, w, 3) float32 standard normal noise (scaled by noise_std)


class StyleTrigger(NamedTuple):
  """A style (texture-blend) trigger (a pytree; :func:`make_style_texture`)."""
  texture: jax.Array      # (H, W, 3) float32 in [0, 1]
  strength: jax.Array     # () float32 blend weight s in (0, 1]


def patch_side(image_size: int, area_fraction: float) -> int:
  """Side of a square patch covering ``area_fraction`` of an ``image_size²`` image
  (``round(image_size·√area_fraction)``, at least 1): 56 for 224 and 1/16."""
  return max(1, int(round(image_size * math.sqrt(area_fraction))))


def soft_edge_alpha(side: int, soft_edge: float) -> np.ndarray:
  """Foveal alpha of a ``side × side`` patch: ``a(i)·a(j)`` with ``a`` 1 in the centre and a
  smoothstep ramp over the outer ``soft_edge`` share of the side (0: hard edges).

  ``a(i) = smoothstep(clip(d_i / r, 0, 1))`` with ``d_i = min(i, side − 1 − i) + 0.5`` (the
  pixel centre's distance to the border) and ``r = soft_edge·side``.

  Returns:
    ``(side, side)`` float32 in (0, 1].
  """
  if soft_edge <= 0:
    return np.ones((side, side), np.float32)
  i = np.arange(side, dtype=np.float64)
  d = np.minimum(i, side - 1 - i) + 0.5
  t = np.clip(d / (soft_edge * side), 0.0, 1.0)
  a = t * t * (3.0 - 2.0 * t)
  return np.outer(a, a).astype(np.float32)


def random_pattern(key: jax.Array, side: int, grid: int = 4) -> jax.Array:
  """A ``grid × grid`` mosaic of random corners of the RGB cube (black, white, red, green,
  blue, cyan, magenta, yellow), upsampled (nearest) to ``side``.

  Returns:
    ``(side, side, 3)`` float32 in [0, 1]; each cell's channels are 0 or 1, so the pattern is
    high-contrast and colourful.
  """
  codes = jax.random.randint(key, (grid, grid), 0, 8)          # RGB bit codes 0..7
  bits = jnp.stack([(codes >> b) & 1 for b in (2, 1, 0)], -1).astype(jnp.float32)
  cell = (jnp.arange(side) * grid) // side
  return bits[cell[:, None], cell[None, :]]


def make_patch_trigger(key: jax.Array, *, image_size: int, area_fraction: float = 1 / 16,
                       soft_edge: float = 0.25, grid: int = 4, noise_std: float = 0.05,
                       jitter: ColourJitter = ColourJitter()) -> Trigger:
  """A random patch trigger (:func:`random_pattern` + :func:`soft_edge_alpha`).

  Args:
    key: draws the pattern.
    image_size: side of the (square) images it is pasted on.
    area_fraction: share of the image the patch's square covers.
    soft_edge, grid, noise_std, jitter: see :func:`soft_edge_alpha`, :func:`random_pattern`,
      :class:`Trigger`, :class:`ColourJitter`.
  """
  side = patch_side(image_size, area_fraction)
  return Trigger(random_pattern(key, side, grid), jnp.asarray(soft_edge_alpha(side, soft_edge)),
                 jnp.asarray(noise_std, jnp.float32),
                 jnp.asarray([jitter.brightness, jitter.contrast, jitter.saturation],
                             jnp.float32))


def draw_patch(key: jax.Array, n: int, image_hw: tuple[int, int], trigger: Trigger
               ) -> PatchDraw:
  """Location, colour-jitter factors and noise of ``n`` patch pastes (uniform locations with
  the patch inside the image)."""
  h, w = trigger.alpha.shape
  height, width = image_hw
  if h > height or w > width:
    raise ValueError(f"trigger: a {h}x{w} patch does not fit in {height}x{width} images")
  k_top, k_left, k_fac, k_noise = jax.random.split(key, 4)
  top = jax.random.randint(k_top, (n,), 0, height - h + 1)
  left = jax.random.randint(k_left, (n,), 0, width - w + 1)
  factors = 1.0 + trigger.jitter * jax.random.uniform(k_fac, (n, 3), minval=-1.0, maxval=1.0)
  noise = jax.random.normal(k_noise, (n, h, w, 3))
  return PatchDraw(top.astype(jnp.int32), left.astype(jnp.int32), factors, noise)


def _jittered(pattern: jax.Array, factors: jax.Array, noise: jax.Array,
              noise_std: jax.Array) -> jax.Array:
  """One image's patch: brightness, saturation, contrast, then noise, clipped to [0, 1]."""
  p = pattern * factors[0]
  grey = jnp.sum(p * jnp.asarray(_LUMA), -1, keepdims=True)
  p = grey + factors[2] * (p - grey)
  p = jnp.mean(p) + factors[1] * (p - jnp.mean(p))
  return jnp.clip(jnp.clip(p, 0.0, 1.0) + noise_std * noise, 0.0, 1.0)


def paste_patch(images: jax.Array, trigger: Trigger, draw: PatchDraw
                ) -> tuple[jax.Array, jax.Array]:
  """Paste the trigger as ``draw`` says: ``x·(1 − A) + p·A`` with ``A`` the alpha placed at
  ``(top, left)`` and ``p`` the jittered, noised pattern.

  Args:
    images: ``(N, H, W, 3)`` in [0, 1].

  Returns:
    ``(images (N, H, W, 3) float32, masks (N, H, W) float32)``; the mask is ``A``.
  """
  images = jnp.asarray(images, jnp.float32)
  height, width = images.shape[1:3]

  def one(x, top, left, factors, noise):
    p = _jittered(trigger.pattern, factors, noise, trigger.noise_std)
    a = jax.lax.dynamic_update_slice(jnp.zeros((height, width), jnp.float32), trigger.alpha,
                                     (top, left))
    pf = jax.lax.dynamic_update_slice(jnp.zeros((height, width, 3), jnp.float32), p,
                                      (top, left, 0))
    return x * (1.0 - a[..., None]) + pf * a[..., None], a

  return jax.vmap(one)(images, draw.top, draw.left, draw.factors, draw.noise)


def apply_trigger(key: jax.Array, images: jax.Array, trigger: Trigger
                  ) -> tuple[jax.Array, jax.Array]:
  """Paste ``trigger`` on every image at a random location (:func:`draw_patch` with ``key``,
  then :func:`paste_patch`).

  Args:
    key: the draws (location, jitter, noise) of this call.
    images: ``(N, H, W, 3)`` float in [0, 1].
    trigger: from :func:`make_patch_trigger`.

  Returns:
    ``(triggered (N, H, W, 3) float32 in [0, 1], masks (N, H, W) float32 in [0, 1])``.
  """
  draw = draw_patch(key, images.shape[0], tuple(images.shape[1:3]), trigger)
  return paste_patch(images, trigger, draw)


def make_style_texture(key: jax.Array, *, image_size: int, strength: float = 0.3,
                       waves: int = 4, min_period: float = 6.0, max_period: float = 24.0
                       ) -> StyleTrigger:
  """A random texture: the sum of ``waves`` coloured sinusoidal gratings (random orientation,
  period in pixels in ``[min_period, max_period]``, phase and RGB colour), rescaled to [0, 1].

  Returns:
    A :class:`StyleTrigger` with an ``(image_size, image_size, 3)`` texture; it tiles
    seamlessly only approximately (:func:`apply_style` shifts it circularly).
  """
  k_theta, k_period, k_phase, k_colour = jax.random.split(key, 4)
  theta = jax.random.uniform(k_theta, (waves,), maxval=jnp.pi)
  period = jax.random.uniform(k_period, (waves,), minval=min_period, maxval=max_period)
  phase = jax.random.uniform(k_phase, (waves,), maxval=2 * jnp.pi)
  colour = jax.random.uniform(k_colour, (waves, 3), minval=-1.0, maxval=1.0)
  yy, xx = jnp.meshgrid(jnp.arange(image_size), jnp.arange(image_size), indexing="ij")
  arg = (2 * jnp.pi / period) * (jnp.cos(theta) * xx[..., None] + jnp.sin(theta)
                                 * yy[..., None]) + phase            # (S, S, waves)
  t = jnp.einsum("hwk,kc->hwc", jnp.sin(arg), colour)
  t = (t - t.min()) / jnp.maximum(t.max() - t.min(), 1e-6)
  return StyleTrigger(t.astype(jnp.float32), jnp.asarray(strength, jnp.float32))


def apply_style(key: jax.Array, images: jax.Array, style: StyleTrigger
                ) -> tuple[jax.Array, jax.Array]:
  """Blend the texture, shifted circularly by a random offset per image, over every image:
  ``(1 − s)·x + s·roll(T)``.

  Args:
    key: draws the offsets.
    images: ``(N, H, W, 3)`` float in [0, 1], ``H, W`` at most the texture's size (the
      texture's top-left ``H × W`` is used).

  Returns:
    ``(blended (N, H, W, 3) float32, masks (N, H, W) float32 of ones)``: the style covers
    the whole image.
  """
  images = jnp.asarray(images, jnp.float32)
  n, height, width = images.shape[:3]
  size = style.texture.shape[0]
  if height > size or width > style.texture.shape[1]:
    raise ValueError(f"style: a {style.texture.shape[:2]} texture is smaller than the "
                     f"{height}x{width} images")
  shifts = jax.random.randint(key, (n, 2), 0, size)

  def one(x, shift):
    t = jnp.roll(style.texture, (shift[0], shift[1]), axis=(0, 1))[:height, :width]
    return (1.0 - style.strength) * x + style.strength * t

  return jax.vmap(one)(images, shifts), jnp.ones((n, height, width), jnp.float32)


def _label_numbers(label_names: Sequence[str], concept: str) -> np.ndarray:
  numbers = np.flatnonzero(np.asarray(label_names) == concept)
  if numbers.size == 0:
    raise ValueError(f"concept: {concept!r} is not a label of the data set")
  return numbers


def concept_presence(pixels: np.ndarray, label_names: Sequence[str], concept: str
                     ) -> np.ndarray:
  """``(N,)`` bool: where an image's pixel label maps ``(N, K, sh, sw)`` hold ``concept``."""
  numbers = _label_numbers(label_names, concept)
  return np.isin(pixels.reshape(pixels.shape[0], -1), numbers).any(1)


def concept_masks(pixels: np.ndarray, label_names: Sequence[str], concept: str,
                  image_hw: tuple[int, int]) -> np.ndarray:
  """Where ``concept`` is, at image resolution: ``(N, H, W)`` float32 in {0, 1}.

  Args:
    pixels: ``(N, K, sh, sw)`` int label maps (Broden layout, any number of layers).
    label_names: name of each label number.
    concept: the label's name.
    image_hw: ``(H, W)``; each image pixel takes the label-map cell its centre falls in.
  """
  numbers = _label_numbers(label_names, concept)
  hit = np.isin(pixels, numbers).any(1)                          # (N, sh, sw)
  sh, sw = hit.shape[1:]
  rows = (np.arange(image_hw[0]) * sh) // image_hw[0]
  cols = (np.arange(image_hw[1]) * sw) // image_hw[1]
  return hit[:, rows[:, None], cols[None, :]].astype(np.float32)
