"""Random-noise corruption of probe images (Srivastava et al., ICCV 2023, Sec. 4).

Images are NHWC float32 in [0, 1]. Noise is drawn independently for every element (pixel and
channel) and the result is clipped back to [0, 1], as in the paper's public code:

- ``gaussian``:  x + σ·N(0, 1)                        (std σ)
- ``uniform``:   x + U(−σ, σ)                         (bounded by σ; std σ/√3)
- ``bernoulli``: x + σ·(2b − 1), b ~ Bernoulli(p)      (±σ; the paper uses p = ½, std σ)

The paper reports Bernoulli (the largest perturbation for a given bound) as the strongest of
the three. A fraction of the probe set is corrupted: :func:`select_fraction` picks exactly
``round(fraction·n)`` images (the paper's code takes ``int(fraction·n)``; they differ only when
``fraction·n`` has a fractional part) and :func:`corrupt` applies noise to those only.

Example::

  import jax
  from nemjax.attacks import noise
  k_sel, k_noise = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (10, 224, 224, 3))
  mask = noise.select_fraction(k_sel, 10, 0.2)            # 2 images
  x_noisy = noise.corrupt(k_noise, x, "bernoulli", 0.05, mask)
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.attacks._checks import check_images, is_number

__all__ = ["NOISE_KINDS", "gaussian_noise", "uniform_noise", "bernoulli_noise",
           "select_fraction", "corrupt"]

NoiseKind = Literal["gaussian", "uniform", "bernoulli"]
NOISE_KINDS = ("gaussian", "uniform", "bernoulli")


def _check_sigma(sigma, fn: str) -> None:
  if is_number(sigma) and not sigma >= 0:
    raise ValueError(f"{fn}: sigma must be >= 0, got {sigma}")


def gaussian_noise(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  """``clip(x + σ·N(0, 1), 0, 1)``; x (N, H, W, C) -> same shape and dtype."""
  x = check_images(x, "gaussian_noise")
  _check_sigma(sigma, "gaussian_noise")
  eps = jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(x + sigma * eps, 0.0, 1.0)


def uniform_noise(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  """``clip(x + U(−σ, σ), 0, 1)``; x (N, H, W, C) -> same shape and dtype.

  σ is the bound of the noise (its std is σ/√3), as in the paper's ``(2u − 1)·σ``.
  """
  x = check_images(x, "uniform_noise")
  _check_sigma(sigma, "uniform_noise")
  eps = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
  return jnp.clip(x + sigma * eps, 0.0, 1.0)


def bernoulli_noise(key: jax.Array, x: jax.Array, sigma: float, p: float = 0.5) -> jax.Array:
  """``clip(x ± σ, 0, 1)`` with +σ drawn with probability ``p`` per element.

  The paper's bounded Bernoulli noise is ``σ·(2b − 1)``, ``b ~ Bernoulli(½)``: every element
  moves by exactly σ, up or down with equal probability.

  Args:
    key: PRNG key.
    x: (N, H, W, C) images in [0, 1].
    sigma: noise magnitude, >= 0.
    p: probability of +σ, in [0, 1].

  Returns:
    (N, H, W, C), dtype of x.
  """
  x = check_images(x, "bernoulli_noise")
  _check_sigma(sigma, "bernoulli_noise")
  if is_number(p) and not 0.0 <= p <= 1.0:
    raise ValueError(f"bernoulli_noise: p must be in [0, 1], got {p}")
  b = jax.random.bernoulli(key, p, x.shape)
  return jnp.clip(x + jnp.where(b, sigma, -sigma).astype(x.dtype), 0.0, 1.0)


def select_fraction(key: jax.Array, n: int, fraction: float) -> jax.Array:
  """Chooses exactly ``round(fraction·n)`` of ``n`` images uniformly at random.

  Rounds half up (``floor(fraction·n + ½)``).

  Args:
    key: PRNG key.
    n: number of images (>= 0).
    fraction: in [0, 1].

  Returns:
    bool (n,) with ``round(fraction·n)`` True entries.
  """
  if int(n) != n or n < 0:
    raise ValueError(f"select_fraction: n must be a non-negative int, got {n!r}")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"select_fraction: fraction must be in [0, 1], got {fraction}")
  n = int(n)
  k = int(np.floor(fraction * n + 0.5))
  chosen = jax.random.permutation(key, n)[:k]
  return jnp.zeros((n,), bool).at[chosen].set(True)


def corrupt(key: jax.Array, x: jax.Array, kind: NoiseKind, sigma: float,
            mask: jax.Array | None = None) -> jax.Array:
  """Applies ``kind`` noise of magnitude ``sigma`` to the images selected by ``mask``.

  Args:
    key: PRNG key.
    x: (N, H, W, C) images in [0, 1].
    kind: "gaussian", "uniform" or "bernoulli" (p = ½).
    sigma: noise std (gaussian) or bound (uniform, bernoulli), >= 0.
    mask: bool (N,) images to corrupt; None corrupts all.

  Returns:
    (N, H, W, C): noisy and clipped where ``mask``, ``x`` unchanged elsewhere.
  """
  x = check_images(x, "corrupt")
  fns = {"gaussian": gaussian_noise, "uniform": uniform_noise, "bernoulli": bernoulli_noise}
  if kind not in fns:
    raise ValueError(f"corrupt: kind must be one of {NOISE_KINDS}, got {kind!r}")
  noisy = fns[kind](key, x, sigma)
  if mask is None:
    return noisy
  mask = jnp.asarray(mask)
  if mask.shape != (x.shape[0],):
    raise ValueError(f"corrupt: mask must be ({x.shape[0]},) to match x {x.shape}, "
                     f"got {mask.shape}")
  return jnp.where(mask.astype(bool)[:, None, None, None], noisy, x)
