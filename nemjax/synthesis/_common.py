"""Shared pieces of the feature-synthesis tools: the logits convention, input checks, patch
pasting at random locations (explicit keys) and the target cross-entropy.

Every tool takes ``apply_fn(params, images) -> logits``: ``images`` are ``(N, H, W, 3)`` in
``[0, 1]`` (``apply_fn`` does any input normalisation the model needs) and the result is
``(N, K)`` logits, or a tuple whose first item is (what :func:`nemjax.models.pure_apply`'s
``(logits, acts)`` gives).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

ApplyFn = Callable[[Any, jax.Array], Any]


def logits_of(out: Any) -> jax.Array:
  """``(N, K)`` logits from ``apply_fn``'s output (an array, or a tuple led by the logits)."""
  if isinstance(out, (tuple, list)):
    out = out[0]
  if out is None or getattr(out, "ndim", 0) != 2:
    raise ValueError(f"apply_fn must return (N, K) logits or (logits, ...), got "
                     f"{None if out is None else getattr(out, 'shape', type(out).__name__)}")
  return out


def check_images(name: str, images: Any) -> tuple[int, int, int]:
  """``(N, H, W)`` of float ``(N, H, W, 3)`` images; ValueError naming ``name`` otherwise."""
  s = np.shape(images)
  if len(s) != 4 or s[-1] != 3 or min(s) < 1:
    raise ValueError(f"{name} must be (N, H, W, 3) images in [0, 1], got shape {s}")
  if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point in [0, 1], got dtype {jnp.asarray(images).dtype}")
  return int(s[0]), int(s[1]), int(s[2])


def check_positive(name: str, value: Any) -> None:
  """ValueError naming ``name`` unless ``value > 0``."""
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def check_steps(steps: int) -> int:
  """``steps`` as an int; ValueError unless ``>= 0``."""
  if int(steps) != steps or int(steps) < 0:
    raise ValueError(f"steps must be an int >= 0, got {steps}")
  return int(steps)


def random_locations(key: jax.Array, n: int, image_hw: tuple[int, int],
                     patch_hw: tuple[int, int]) -> jax.Array:
  """Top-left corners of ``n`` patches placed uniformly inside the image.

  Args:
    key: PRNG key.
    n: number of locations.
    image_hw: ``(H, W)``.
    patch_hw: ``(p, q)`` with ``p <= H``, ``q <= W``.

  Returns:
    ``(n, 2)`` int32 ``(row, col)``, rows in ``[0, H − p]``, cols in ``[0, W − q]``.
  """
  kr, kc = jax.random.split(key)
  rows = jax.random.randint(kr, (n,), 0, image_hw[0] - patch_hw[0] + 1)
  cols = jax.random.randint(kc, (n,), 0, image_hw[1] - patch_hw[1] + 1)
  return jnp.stack([rows, cols], axis=1).astype(jnp.int32)


def paste(images: jax.Array, patch: jax.Array, corners: jax.Array,
          alpha: jax.Array | None = None) -> jax.Array:
  """Paste one patch into every image at its own corner.

  ``out = (1 − α)·x + α·patch`` on the ``(p, q)`` window at ``corners[n]``, the image elsewhere.

  Args:
    images: ``(N, H, W, 3)``.
    patch: ``(p, q, 3)``.
    corners: ``(N, 2)`` int ``(row, col)`` (traced values allowed).
    alpha: ``(p, q)`` blending mask in ``[0, 1]``; ``None`` pastes opaquely (α = 1).

  Returns:
    ``(N, H, W, 3)``; differentiable in ``images``, ``patch`` and ``alpha``.
  """
  p, q = patch.shape[:2]
  a = jnp.ones((p, q, 1), images.dtype) if alpha is None else alpha[..., None]

  def one(x, rc):
    start = (rc[0], rc[1], jnp.zeros((), rc.dtype))
    window = jax.lax.dynamic_slice(x, start, (p, q, x.shape[-1]))
    return jax.lax.dynamic_update_slice(x, (1 - a) * window + a * patch, start)

  return jax.vmap(one)(images, corners)


def target_cross_entropy(logits: jax.Array, target: jax.Array | int) -> jax.Array:
  """Mean cross-entropy of ``(N, K)`` logits against one class (or ``(N,)`` classes)."""
  labels = jnp.broadcast_to(jnp.asarray(target, jnp.int32), logits.shape[:1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def minibatch(key: jax.Array, images: jax.Array, batch_size: int | None) -> jax.Array:
  """``batch_size`` images drawn without replacement (all of them, in order, for ``None``)."""
  if batch_size is None or batch_size >= images.shape[0]:
    return images
  idx = jax.random.choice(key, images.shape[0], (batch_size,), replace=False)
  return images[idx]


def check_batch_size(batch_size: int | None) -> int | None:
  """``batch_size`` as an int or ``None``; ValueError unless ``>= 1``."""
  if batch_size is None:
    return None
  if int(batch_size) != batch_size or int(batch_size) < 1:
    raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size}")
  return int(batch_size)
