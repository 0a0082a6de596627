"""A training-only per-pixel concept objective: 1x1 linear heads on tapped layers.

Scene labels alone teach a small CNN little about *where* objects, parts and materials are, so
its units end up as colour detectors. This auxiliary task asks each chosen layer's activations
(after ReLU, exactly what Network Dissection thresholds) to predict, at the layer's own
resolution, which concepts cover each cell: a 1x1 linear head per layer maps the U units to C
concept logits, trained with sigmoid cross-entropy against the covered fraction of each cell.
The heads are discarded after training, so the saved model keeps its layout.

An L1 penalty on the head weights makes each concept read from few units, which pushes the
layer towards single units that detect single concepts (what dissection measures) instead of
concepts spread thinly over many units.

Example::

    targets = concept_targets(pixels, numbers, out_size=14)     # (N, 14, 14, C) in [0, 1]
    task = ConceptTask({"block4": targets}, weight=1.0, l1=1e-3)
    heads = init_heads(jax.random.key(0), {"block4": (128, len(numbers))})
    loss = concept_loss(acts, heads, batch_targets, l1=1e-3)
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ConceptTask(NamedTuple):
  """Per-pixel concept targets of a training set and how much they weigh."""
  targets: Mapping[str, np.ndarray]  # layer -> float32 (N, h, w, C_layer) covered fraction per cell
  weight: float                      # multiplies the summed per-layer concept loss
  l1: float = 0.0                    # L1 penalty on each head's weights (U, C)
  nonneg: bool = False               # non-negative head weights (see concept_loss)
  balanced: bool = False             # positives and negatives weigh equally per concept
  tied: int = 0                      # > 0: concept c is read from units c*tied..(c+1)*tied-1 only


def concept_targets(pixels: np.ndarray, numbers: Sequence[int], out_size: int) -> np.ndarray:
  """Fraction of each output cell covered by each concept.

  Args:
    pixels: int32 (N, K, sh, sw) global label numbers of every label layer (``load_labels``),
      with sh and sw multiples of ``out_size``.
    numbers: (C,) global label numbers of the concepts, in head order.
    out_size: side of the target maps (the tapped layer's spatial size).

  Returns:
    float32 (N, out_size, out_size, C): the share of each cell's label pixels that carry the
    concept in any layer (1 where every pixel does).
  """
  pixels = np.asarray(pixels)
  if pixels.ndim != 4:
    raise ValueError(f"concept_targets: pixels must be (N, K, sh, sw), got {pixels.shape}")
  n, _, sh, sw = pixels.shape
  if out_size < 1 or sh % out_size or sw % out_size:
    raise ValueError(f"concept_targets: label maps {sh}x{sw} are not a multiple of {out_size}")
  fy, fx = sh // out_size, sw // out_size
  out = np.zeros((n, out_size, out_size, len(numbers)), np.float32)
  for c, number in enumerate(numbers):
    present = (pixels == number).any(axis=1).astype(np.float32)          # (N, sh, sw)
    out[..., c] = present.reshape(n, out_size, fy, out_size, fx).mean(axis=(2, 4))
  return out


def init_heads(key: jax.Array, shapes: Mapping[str, tuple[int, int]], nonneg: bool = False,
               tied: int = 0) -> dict[str, dict[str, jax.Array]]:
  """One 1x1 linear head per layer: ``{layer: {"w": (U, C), "b": (C,)}}``.

  Args:
    shapes: layer -> (U units, C concepts).
    nonneg: ``w`` holds raw values whose softplus is small (≈ 1/U) instead of LeCun-normal
      weights.
    tied: > 0 (with ``nonneg``): raw values whose softplus is 1, since each concept reads only
      its own ``tied`` units.
  """
  heads = {}
  for k, (layer, (units, num_concepts)) in zip(jax.random.split(key, max(len(shapes), 1)),
                                               sorted(shapes.items())):
    w = jax.random.normal(k, (units, num_concepts), jnp.float32)
    if nonneg:
      w = w * 0.1 + np.log(np.expm1(1.0)) if tied else w * 0.5 - np.log(units)
    else:
      w = w / np.sqrt(units)
    heads[layer] = {"w": w, "b": jnp.full((num_concepts,), -2.0, jnp.float32)}
  return heads


def tied_mask(units: int, num_concepts: int, tied: int) -> np.ndarray:
  """float32 (U, C): 1 where unit u belongs to concept c's group ``c*tied <= u < (c+1)*tied``."""
  if num_concepts * tied > units:
    raise ValueError(f"tied concept heads: {num_concepts} concepts x {tied} units need "
                     f"{num_concepts * tied} units, the layer has {units}")
  mask = np.zeros((units, num_concepts), np.float32)
  for c in range(num_concepts):
    mask[c * tied:(c + 1) * tied, c] = 1.0
  return mask


def head_weights(head: Mapping[str, jax.Array], nonneg: bool, tied: int = 0) -> jax.Array:
  """(U, C) effective weights of a head: ``softplus(w)`` when ``nonneg``, else ``w``; with
  ``tied`` > 0, zero outside each concept's unit group (:func:`tied_mask`)."""
  w = jax.nn.softplus(head["w"]) if nonneg else head["w"]
  if tied:
    w = w * tied_mask(w.shape[0], w.shape[1], tied)
  return w


def balanced_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(C,) sigmoid cross-entropy per concept, positives and negatives weighted equally.

  Args:
    logits, targets: (..., C); targets are covered fractions in [0, 1] (soft labels).

  Returns:
    float32 (C,): ½ (mean over positive mass + mean over negative mass) of each concept, so a
    concept that covers 1 % of the cells weighs as much as one that covers half of them.
  """
  axes = tuple(range(logits.ndim - 1))
  pos = -jax.nn.log_sigmoid(logits)
  neg = -jax.nn.log_sigmoid(-logits)
  eps = 1e-6
  pos_mean = (targets * pos).sum(axes) / (targets.sum(axes) + eps)
  neg_mean = ((1 - targets) * neg).sum(axes) / ((1 - targets).sum(axes) + eps)
  return 0.5 * (pos_mean + neg_mean)


def concept_loss(acts: Mapping[str, jax.Array], heads: Mapping[str, Mapping[str, jax.Array]],
                 targets: Mapping[str, jax.Array], l1: float = 0.0, *,
                 nonneg: bool = False, balanced: bool = False, tied: int = 0) -> jax.Array:
  """Summed over layers: mean sigmoid cross-entropy of the heads' logits + ``l1`` · Σ|w|/U.

  Args:
    acts: layer -> (B, h, w, U) activations.
    heads: layer -> {"w": (U, C), "b": (C,)} (from :func:`init_heads`).
    targets: layer -> (B, h, w, C) covered fractions in [0, 1].
    l1: weight of the L1 penalty on each head's effective weights, normalised by U.
    nonneg: effective weights ``softplus(w)`` >= 0, so a concept's logit can only rise with a
      unit's activation: a unit that feeds a concept must stay quiet where the concept is absent.
    balanced: :func:`balanced_bce` instead of the plain mean over cells.
    tied: > 0: concept c reads only units ``c*tied .. (c+1)*tied - 1`` (:func:`tied_mask`), so
      those units are trained to detect it; the other units are left to the main task.

  Returns:
    scalar float32.
  """
  total = jnp.float32(0.0)
  for layer, head in heads.items():
    w = head_weights(head, nonneg, tied)
    logits = jnp.einsum("bhwu,uc->bhwc", acts[layer], w) + head["b"]
    if balanced:
      total += balanced_bce(logits, targets[layer]).mean()
    else:
      total += optax.sigmoid_binary_cross_entropy(logits, targets[layer]).mean()
    total += l1 * jnp.abs(w).sum() / w.shape[0]
  return total
