"""Universal adversarial patches (Brown et al. 2017, "Adversarial Patch"; the patch tool of
Casper et al.'s trojan-rediscovery benchmark).

One patch ``P`` (``(p, p, 3)`` in ``[0, 1]``, parameterised as ``sigmoid(z)``) is pasted into
every image at a random location, redrawn at every step from explicit keys, and optimised with
Adam to make the model predict ``target``:

.. math:: P^* = \\arg\\min_P \\; \\mathbb{E}_{x,\\,\\ell}\\; \\mathrm{CE}\\big(f(A(x, P, \\ell)), t\\big)

with ``A`` the opaque paste at location ``ℓ``. Brown et al. also draw random rotations and
scales; here only the location is random (what Casper's patch trojans vary).

Example::

  patch = adversarial_patch(logits_fn, params, images, 3, jax.random.key(0), patch_size=16)
  rate = patch_success(logits_fn, params, images, patch, 3, jax.random.key(1))
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nemjax.manipulate.featvis import FEATVIS_LEARNING_RATE
from nemjax.ops.adam import adam_minimise
from nemjax.synthesis import _common as C

__all__ = ["adversarial_patch", "patch_objective", "patch_success", "paste_patch"]


def paste_patch(images: jax.Array, patch: jax.Array, key: jax.Array) -> jax.Array:
  """Paste ``patch`` into each image at a uniformly random location.

  Args:
    images: ``(N, H, W, 3)`` in ``[0, 1]``.
    patch: ``(p, q, 3)`` in ``[0, 1]``, ``p <= H``, ``q <= W``.
    key: PRNG key of the locations.

  Returns:
    ``(N, H, W, 3)`` patched images.
  """
  corners = C.random_locations(key, images.shape[0], images.shape[1:3], patch.shape[:2])
  return C.paste(images, patch, corners)


def patch_objective(apply_fn: C.ApplyFn, params: Any, patch: jax.Array, images: jax.Array,
                    target: jax.Array | int, key: jax.Array) -> jax.Array:
  """Mean cross-entropy towards ``target`` of the images with ``patch`` pasted at random places.

  Args:
    apply_fn: ``apply_fn(params, images (N, H, W, 3) in [0, 1]) -> (N, K)`` logits (or a tuple
      led by them).
    params: its parameters (a pytree).
    patch: ``(p, q, 3)`` in ``[0, 1]``.
    images: ``(N, H, W, 3)``.
    target: class index (may be traced).
    key: PRNG key of the locations.

  Returns:
    Scalar loss (differentiable in ``patch``).
  """
  logits = C.logits_of(apply_fn(params, paste_patch(images, patch, key)))
  return C.target_cross_entropy(logits, target)


def _optimise(apply_fn, params, images, target, key, patch_size, steps, lr, batch_size):
  k_init, k_loop = jax.random.split(key)
  z = jax.random.normal(k_init, (patch_size, patch_size, 3), jnp.float32)

  def loss_fn(z, k):
    k_batch, k_loc = jax.random.split(k)
    batch = C.minibatch(k_batch, images, batch_size)
    return patch_objective(apply_fn, params, jax.nn.sigmoid(z), batch, target, k_loc)

  return jax.nn.sigmoid(adam_minimise(loss_fn, z, k_loop, steps, lr))


_optimise_jit = jax.jit(_optimise, static_argnames=("apply_fn", "patch_size", "steps", "lr",
                                                    "batch_size"))


def adversarial_patch(apply_fn: C.ApplyFn, params: Any, images: Any, target: int | jax.Array,
                      key: jax.Array, *, patch_size: int, steps: int = 200,
                      lr: float = FEATVIS_LEARNING_RATE,
                      batch_size: int | None = None) -> jax.Array:
  """Optimise a universal patch that makes the model predict ``target`` wherever it is pasted.

  The whole optimisation (``steps`` Adam steps on ``z``, ``patch = sigmoid(z)``, ``z₀ ~ N(0, 1)``)
  is one jitted program per ``apply_fn`` and shapes (``target`` is traced: other targets reuse
  it). Step ``i`` draws its minibatch and locations from ``fold_in(key, i)``.

  Args:
    apply_fn: ``apply_fn(params, images (N, H, W, 3) in [0, 1]) -> (N, K)`` logits (or a tuple
      led by them); it normalises inputs itself and must be hashable (a module-level function or
      one closure reused across calls, else every call compiles again).
    params: its parameters (a pytree).
    images: ``(N, H, W, 3)`` float images in ``[0, 1]``.
    target: class index.
    key: PRNG key (initial patch, minibatches, locations).
    patch_size: side ``p`` of the square patch, ``1 <= p <= min(H, W)``.
    steps: Adam steps.
    lr: Adam learning rate (on the logits ``z``).
    batch_size: images per step (drawn without replacement); ``None`` uses all of them.

  Returns:
    ``(p, p, 3)`` float32 patch in ``[0, 1]``.
  """
  _, h, w = C.check_images("images", images)
  if int(patch_size) != patch_size or not 1 <= int(patch_size) <= min(h, w):
    raise ValueError(f"patch_size must be an int in [1, {min(h, w)}], got {patch_size}")
  C.check_positive("lr", lr)
  return _optimise_jit(apply_fn, params, jnp.asarray(images, jnp.float32),
                       jnp.asarray(target, jnp.int32), key, int(patch_size), C.check_steps(steps),
                       float(lr), C.check_batch_size(batch_size))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _success(apply_fn, params, images, patch, target, key):
  logits = C.logits_of(apply_fn(params, paste_patch(images, patch, key)))
  return jnp.mean(jnp.argmax(logits, axis=-1) == target)


def patch_success(apply_fn: C.ApplyFn, params: Any, images: Any, patch: Any,
                  target: int | jax.Array, key: jax.Array) -> jax.Array:
  """Fraction of images classified as ``target`` once ``patch`` is pasted at random places.

  Args:
    apply_fn: as in :func:`adversarial_patch`.
    params: its parameters.
    images: ``(N, H, W, 3)`` in ``[0, 1]``.
    patch: ``(p, q, 3)`` in ``[0, 1]``.
    target: class index.
    key: PRNG key of the locations.

  Returns:
    Scalar float32 in ``[0, 1]``.
  """
  _, h, w = C.check_images("images", images)
  ps = jnp.shape(patch)
  if len(ps) != 3 or ps[-1] != 3 or ps[0] > h or ps[1] > w:
    raise ValueError(f"patch must be (p, q, 3) with p <= {h}, q <= {w}, got shape {ps}")
  return _success(apply_fn, params, jnp.asarray(images, jnp.float32),
                  jnp.asarray(patch, jnp.float32), jnp.asarray(target, jnp.int32), key)
