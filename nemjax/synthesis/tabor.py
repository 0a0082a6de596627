"""TABOR-style trigger reconstruction (Guo, Wang, Xing, Du & Song 2019, "TABOR: A Highly
Accurate Approach to Inspecting and Restoring Trojan Backdoors in AI Systems"), built on Neural
Cleanse (Wang et al. 2019).

A mask ``m`` (``(H, W)``) and a pattern ``p`` (``(H, W, 3)``), both ``sigmoid`` of free
parameters, are optimised with Adam so that ``x' = (1 − m)·x + m·p`` is classified as the
target ``t``:

.. math::
   L = \\mathrm{CE}(f(x'), t) + λ_{NC}\\|m\\|_1 / (HW)
       + λ_1 (\\|m\\|_1 + \\|m\\|_2^2) + λ_2 (\\|q\\|_1 + \\|q\\|_2^2)
       + λ_3\\, s(m) + λ_4\\, s(q)
       + λ_5\\, \\mathrm{CE}(f((1 − m)·x), y) + λ_6\\, \\mathrm{CE}(f(m·p), t)

with ``q = (1 − m)·p`` the pattern outside the mask and ``s(·)`` the sum of squared differences
of vertical and horizontal neighbours. The terms, as TABOR names them and as included here:

* Neural Cleanse's mask size, here as the mask's area fraction ``λ_NC‖m‖₁/(HW)`` so that one
  weight suits every image size (a fixed weight: Neural Cleanse's schedule that raises and
  lowers it with the attack success is not included);
* R1, "overly large triggers": elastic net of the mask and of the pattern outside it;
* R2, "scattered triggers": smoothness of the mask and of the pattern outside it;
* R3, "blocking triggers" (the trigger must not cover the object): the image with the mask's
  region removed should keep its class ``y``. TABOR's labels are the true ones; without labels
  the model's predictions on the clean images stand in, so no object masks are needed;
* R4, "overlaying triggers": the trigger alone, ``m·p`` on black, should be classified as ``t``.

TABOR's later explanation-based pruning of false triggers (and its anomaly index over classes)
is not included. Default weights λ1..λ6 are TrojanZoo's TABOR hyper-parameters (sums over
pixels, as TABOR writes them). ``λ_NC = 16`` (a trigger covering 6 % of the image costs about 1
nat) is what localised a 6×6 trigger in a 24×24 image in the tests; on a sum scale that is
``0.028`` there, where Neural Cleanse's starting cost ``1e-3`` (before its schedule raises it)
left the mask diffuse.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nemjax.manipulate.featvis import FEATVIS_LEARNING_RATE
from nemjax.ops.adam import adam_minimise
from nemjax.synthesis import _common as C

__all__ = ["TaborConfig", "TaborResult", "tabor", "tabor_objective"]


class TaborConfig(NamedTuple):
  """Weights of TABOR's objective (see the module docstring)."""
  mask_l1: float = 16.0          # λ_NC: Neural Cleanse's ‖m‖₁, as a mean over the H·W pixels
  mask_elastic: float = 1e-6     # λ1: R1, ‖m‖₁ + ‖m‖₂²
  pattern_elastic: float = 1e-5  # λ2: R1, elastic net of (1 − m)·p
  mask_smooth: float = 1e-7      # λ3: R2, s(m)
  pattern_smooth: float = 1e-8   # λ4: R2, s((1 − m)·p)
  blocking: float = 0.0          # λ5: R3, CE(f((1 − m)·x), y)
  overlay: float = 1e-2          # λ6: R4, CE(f(m·p), t)


class TaborResult(NamedTuple):
  """A reconstructed trigger."""
  mask: jax.Array     # (H, W) float32 in [0, 1]
  pattern: jax.Array  # (H, W, 3) float32 in [0, 1]
  image: jax.Array    # (H, W, 3) float32 m·p: the masked pattern on black


def _smooth(a: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(a[1:] - a[:-1])) + jnp.sum(jnp.square(a[:, 1:] - a[:, :-1]))


def _elastic(a: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(a)) + jnp.sum(jnp.square(a))


def tabor_objective(apply_fn: C.ApplyFn, params: Any, mask: jax.Array, pattern: jax.Array,
                    images: jax.Array, labels: jax.Array, target: jax.Array | int,
                    config: TaborConfig = TaborConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TABOR's loss for one mask and pattern on a batch.

  Args:
    apply_fn: ``apply_fn(params, images (N, H, W, 3) in [0, 1]) -> (N, K)`` logits (or a tuple
      led by them).
    params: its parameters.
    mask: ``(H, W)`` in ``[0, 1]``.
    pattern: ``(H, W, 3)`` in ``[0, 1]``.
    images: ``(N, H, W, 3)`` clean images.
    labels: ``(N,)`` int classes of the clean images (R3).
    target: target class.
    config: weights.

  Returns:
    ``(loss, terms)``: the scalar loss and each unweighted term (``"attack"``, ``"mask_l1"``,
    ``"mask_elastic"``, ``"pattern_elastic"``, ``"mask_smooth"``, ``"pattern_smooth"``,
    ``"blocking"``, ``"overlay"``).
  """
  m = mask[..., None]
  outside = (1 - m) * pattern
  terms = {
      "attack": C.target_cross_entropy(
          C.logits_of(apply_fn(params, (1 - m) * images + m * pattern)), target),
      "mask_l1": jnp.mean(jnp.abs(mask)),
      "mask_elastic": _elastic(mask),
      "pattern_elastic": _elastic(outside),
      "mask_smooth": _smooth(mask),
      "pattern_smooth": _smooth(outside),
  }
  # R3 and R4 cost a forward pass each: skipped (zero) when their weight is 0.
  terms["blocking"] = (C.target_cross_entropy(
      C.logits_of(apply_fn(params, (1 - m) * images)), labels)
      if config.blocking else jnp.zeros((), jnp.float32))
  terms["overlay"] = (C.target_cross_entropy(
      C.logits_of(apply_fn(params, (m * pattern)[None])), target)
      if config.overlay else jnp.zeros((), jnp.float32))
  loss = terms["attack"] + sum(getattr(config, name) * terms[name] for name in TaborConfig._fields)
  return loss, terms


def _optimise(apply_fn, params, images, labels, target, key, steps, lr, batch_size, config):
  k_mask, k_pattern, k_loop = jax.random.split(key, 3)
  h, w = images.shape[1:3]
  z = {"mask": jax.random.normal(k_mask, (h, w), jnp.float32),
       "pattern": jax.random.normal(k_pattern, (h, w, 3), jnp.float32)}

  def loss_fn(z, k):
    idx = (jnp.arange(images.shape[0]) if batch_size is None or batch_size >= images.shape[0]
           else jax.random.choice(k, images.shape[0], (batch_size,), replace=False))
    return tabor_objective(apply_fn, params, jax.nn.sigmoid(z["mask"]),
                           jax.nn.sigmoid(z["pattern"]), images[idx], labels[idx], target,
                           config)[0]

  z = adam_minimise(loss_fn, z, k_loop, steps, lr)
  mask, pattern = jax.nn.sigmoid(z["mask"]), jax.nn.sigmoid(z["pattern"])
  return TaborResult(mask, pattern, mask[..., None] * pattern)


_optimise_jit = jax.jit(_optimise, static_argnames=("apply_fn", "steps", "lr", "batch_size",
                                                    "config"))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _predict(apply_fn, params, images):
  return jnp.argmax(C.logits_of(apply_fn(params, images)), axis=-1).astype(jnp.int32)


def tabor(apply_fn: C.ApplyFn, params: Any, images: Any, target: int | jax.Array,
          key: jax.Array, *, steps: int = 300, lr: float = FEATVIS_LEARNING_RATE,
          batch_size: int | None = None, labels: Any | None = None,
          config: TaborConfig = TaborConfig()) -> TaborResult:
  """Reconstruct a trigger for ``target`` (mask, pattern and the masked pattern as an image).

  One jitted program per ``apply_fn``, shapes and config (``target`` is traced). Initial
  ``z_m, z_p ~ N(0, 1)`` from ``key``; step ``i``'s minibatch comes from ``fold_in(key, i)``.

  Args:
    apply_fn: ``apply_fn(params, images (N, H, W, 3) in [0, 1]) -> (N, K)`` logits (or a tuple
      led by them), hashable (see :func:`nemjax.synthesis.adversarial_patch`).
    params: its parameters.
    images: ``(N, H, W, 3)`` clean float images in ``[0, 1]`` (best without the target class).
    target: class index.
    key: PRNG key.
    steps: Adam steps.
    lr: Adam learning rate (on the logits of mask and pattern).
    batch_size: images per step; ``None`` uses all of them.
    labels: ``(N,)`` classes of ``images`` for R3; ``None`` uses the model's predictions.
    config: weights of the terms.

  Returns:
    :class:`TaborResult` (``mask (H, W)``, ``pattern (H, W, 3)``, ``image = mask·pattern``).
  """
  n, _, _ = C.check_images("images", images)
  C.check_positive("lr", lr)
  for name, value in config._asdict().items():
    if not value >= 0:
      raise ValueError(f"config.{name} must be >= 0, got {value}")
  x = jnp.asarray(images, jnp.float32)
  if labels is None:
    labels = _predict(apply_fn, params, x)
  elif jnp.shape(labels) != (n,):
    raise ValueError(f"labels must be ({n},) class indices, got shape {jnp.shape(labels)}")
  return _optimise_jit(apply_fn, params, x, jnp.asarray(labels, jnp.int32),
                       jnp.asarray(target, jnp.int32), key, C.check_steps(steps), float(lr),
                       C.check_batch_size(batch_size), config)
