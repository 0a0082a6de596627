"""act-avg: the mean upsampled activation of a unit over a concept's pixels.

Srivastava, Oikarinen & Weng (ICCV 2023), Eq. 7::

  act_avg_{i,c}(x) = sum_k B(f_i(x))_k * L_c(x)_k / sum_k L_c(x)_k

where ``f_i(x)`` is unit i's activation map (h, w), ``B`` resizes it bilinearly to the label-map
size (sh, sw) and ``L_c(x)`` is the concept's (sh, sw) mask. ``B`` here uses the weights of
Pillow's BILINEAR resize (:mod:`nemjax.ops.resample`, shared with the dissection) -- the resize
Network Dissection applies before thresholding: half-pixel centres (``align_corners=False``), a
triangle filter, weights renormalised over the taps that fall inside the image (edge clamping).
For upsampling this is also exactly ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``; for a layer larger than the label maps (VGG16 ``conv1_*``: 224 -> 112)
Pillow widens the filter by ``h / sh`` (an antialiasing downsample), and so does ``B``.

The resize is separable, ``B(a) = R_y a R_xᵀ`` with interpolation matrices ``R_y`` (sh, h) and
``R_x`` (sw, w), so::

  sum_k B(a)_k L_k = sum_ij a_ij (R_yᵀ L R_x)_ij.

act-avg therefore never needs the upsampled map: :func:`project_mask` moves the mask to the
activation grid once (divided by ``sum L``, :func:`mask_weights`), and act-avg is a dot product
over h·w numbers (:func:`act_avg_weighted`). This is exact in real arithmetic and differs from
the explicit upsample-then-average path (:func:`act_avg_upsampled`) only by float32 rounding.

Example::

  import jax, jax.numpy as jnp
  from nemjax.attacks import act_avg
  acts = jax.random.uniform(jax.random.key(0), (2, 7, 7, 512))   # (N, h, w, U)
  masks = jnp.zeros((2, 112, 112)).at[:, 30:60, 40:90].set(1.0)  # (N, sh, sw)
  units = jnp.array([3, 17])                                    # (N,)
  act_avg.act_avg(acts, masks, units)                           # (N,)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.ops.resample import resample_matrix

__all__ = [
  "interp_matrix",
  "interp_matrices",
  "upsample_bilinear",
  "project_mask",
  "mask_weights",
  "normalised_masks",
  "project_normalised",
  "act_avg",
  "act_avg_weighted",
  "act_avg_upsampled",
  "concept_mask_from_labels",
  "concept_mask_from_unit_masks",
]


def _float_dtype(*arrays) -> jnp.dtype:
  """float32, or float64 when an input is float64 (under ``jax.enable_x64``, for tests)."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays
                                         if jnp.issubdtype(a.dtype, jnp.floating)])


def interp_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Pillow BILINEAR resampling weights as a dense (out_size, in_size) float64 matrix.

  :func:`nemjax.ops.resample.resample_matrix`, the coefficients the dissection's Pillow-exact
  resize uses too: half-pixel centres, a triangle filter widened by ``in / out`` when
  downsampling, weights renormalised over the taps inside the image (edge clamping). For
  ``out >= in`` this is bilinear interpolation (``align_corners=False``).
  Resizing a 1-D signal ``a`` (in_size,) is ``R @ a``.
  """
  return resample_matrix(in_size, out_size)


def interp_matrices(act_hw: Sequence[int], out_hw: Sequence[int],
                    dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """``(R_y (sh, h), R_x (sw, w))`` (float32 by default) for resizing (h, w) to (sh, sw)."""
  (h, w), (sh, sw) = act_hw, out_hw
  return interp_matrix(h, sh).astype(dtype), interp_matrix(w, sw).astype(dtype)


def upsample_bilinear(a: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Differentiable float32 Pillow-BILINEAR resize of maps (the explicit path).

  Args:
    a: (N, h, w) or (N, h, w, U) maps.
    out_hw: (sh, sw).

  Returns:
    (N, sh, sw) or (N, sh, sw, U), float32 (float64 for float64 input).
  """
  a = jnp.asarray(a)
  a = a.astype(_float_dtype(a))
  if a.ndim not in (3, 4):
    raise ValueError(f"upsample_bilinear: a must be (N,h,w) or (N,h,w,U), got shape {a.shape}")
  ry, rx = interp_matrices(a.shape[1:3], out_hw, a.dtype)
  hp = jax.lax.Precision.HIGHEST
  if a.ndim == 3:
    return jnp.einsum("yh,nhw,xw->nyx", ry, a, rx, precision=hp)
  return jnp.einsum("yh,nhwu,xw->nyxu", ry, a, rx, precision=hp)


def project_mask(masks: jax.Array, r_y: jax.Array, r_x: jax.Array) -> jax.Array:
  """Moves label-resolution masks onto the activation grid: ``R_yᵀ L R_x``.

  Args:
    masks: (N, sh, sw) float masks ``L``.
    r_y: (sh, h) interpolation matrix.
    r_x: (sw, w) interpolation matrix.

  Returns:
    (N, h, w) with ``sum_k B(a)_k L_k == sum_ij a_ij out_ij`` for any (h, w) map ``a``.
  """
  masks = jnp.asarray(masks)
  masks = masks.astype(_float_dtype(masks))
  if masks.ndim != 3 or masks.shape[1:] != (r_y.shape[0], r_x.shape[0]):
    raise ValueError(
      f"project_mask: masks must be (N, {r_y.shape[0]}, {r_x.shape[0]}) to match r_y {r_y.shape}"
      f" and r_x {r_x.shape}, got {masks.shape}")
  return jnp.einsum("yh,nyx,xw->nhw", r_y, masks, r_x, precision=jax.lax.Precision.HIGHEST)


def normalised_masks(masks: jax.Array) -> jax.Array:
  """``L / sum L`` per mask (all zeros for an empty mask). (N, sh, sw) -> same shape, float."""
  masks = jnp.asarray(masks)
  masks = masks.astype(_float_dtype(masks))
  if masks.ndim != 3:
    raise ValueError(f"normalised_masks: masks must be (N, sh, sw), got shape {masks.shape}")
  total = jnp.sum(masks, axis=(1, 2))
  inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  return masks * inv[:, None, None]


def mask_weights(masks: jax.Array, act_hw: Sequence[int]) -> jax.Array:
  """Projected, normalised masks: act-avg of a map ``a`` is then ``sum(a * weights)``.

  ``weights = R_yᵀ (L / sum L) R_x``; an empty mask (``sum L == 0``) gives all-zero weights, so
  act-avg over an absent concept is 0 (and contributes no gradient). Differences of masks
  (a targeted objective) can be projected at once: ``project_mask(normalised_masks(src) -
  normalised_masks(tgt), ...)``, which is exactly zero where the two masks are equal.

  Args:
    masks: (N, sh, sw) float masks.
    act_hw: (h, w) of the activation maps.

  Returns:
    (N, h, w) float32 (float64 for float64 masks).
  """
  return project_normalised(normalised_masks(masks), act_hw)


def project_normalised(normalised: jax.Array, act_hw: Sequence[int]) -> jax.Array:
  """``R_yᵀ M R_x`` of (N, sh, sw) normalised masks (or their differences) -> (N, h, w)."""
  ry, rx = interp_matrices(act_hw, normalised.shape[1:], normalised.dtype)
  return project_mask(normalised, jnp.asarray(ry), jnp.asarray(rx))


def _check_acts_units(acts: jax.Array, units: jax.Array, fn: str) -> None:
  if acts.ndim != 4:
    raise ValueError(f"{fn}: acts must be (N, h, w, U), got shape {acts.shape}")
  if units.shape != (acts.shape[0],):
    raise ValueError(f"{fn}: units must be ({acts.shape[0]},) to match acts {acts.shape}, "
                     f"got {units.shape}")
  if not jnp.issubdtype(units.dtype, jnp.integer):
    raise ValueError(f"{fn}: units must be integers, got dtype {units.dtype}")


def _unit_maps(acts: jax.Array, units: jax.Array) -> jax.Array:
  """(N, h, w, U), (N,) -> (N, h, w): each image's own unit."""
  return jnp.take_along_axis(acts, units[:, None, None, None], axis=3)[..., 0]


def act_avg_weighted(acts: jax.Array, weights: jax.Array, units: jax.Array) -> jax.Array:
  """act-avg from precomputed :func:`mask_weights` (the fast path used inside PGD).

  Args:
    acts: (N, h, w, U) activations.
    weights: (N, h, w) from :func:`mask_weights`.
    units: (N,) int, the unit attacked in each image.

  Returns:
    (N,) float32 (float64 if acts or weights are).
  """
  acts, units = jnp.asarray(acts), jnp.asarray(units)
  _check_acts_units(acts, units, "act_avg_weighted")
  if weights.shape != acts.shape[:3]:
    raise ValueError(f"act_avg_weighted: weights must be {acts.shape[:3]} to match acts "
                     f"{acts.shape}, got {weights.shape}")
  maps = _unit_maps(acts, units)
  return jnp.sum(maps.astype(_float_dtype(maps, weights)) * weights, axis=(1, 2))


def act_avg(acts: jax.Array, masks: jax.Array, units: jax.Array) -> jax.Array:
  """act-avg of each image's unit over its concept mask (Eq. 7), via the projected mask.

  Args:
    acts: (N, h, w, U) activations.
    masks: (N, sh, sw) float concept masks ``L_c`` at label-map resolution.
    units: (N,) int unit index per image.

  Returns:
    (N,) float32; 0 for images whose mask is empty.
  """
  acts, masks, units = jnp.asarray(acts), jnp.asarray(masks), jnp.asarray(units)
  _check_acts_units(acts, units, "act_avg")
  if masks.ndim != 3 or masks.shape[0] != acts.shape[0]:
    raise ValueError(f"act_avg: masks must be ({acts.shape[0]}, sh, sw) to match acts "
                     f"{acts.shape}, got {masks.shape}")
  return act_avg_weighted(acts, mask_weights(masks, acts.shape[1:3]), units)


def act_avg_upsampled(acts: jax.Array, masks: jax.Array, units: jax.Array) -> jax.Array:
  """Reference path: upsample the unit's map to (sh, sw), then average over the mask.

  Same arguments and result as :func:`act_avg` (up to float32 rounding); sh·sw/(h·w) times
  more work.
  """
  acts, masks, units = jnp.asarray(acts), jnp.asarray(masks), jnp.asarray(units)
  masks = masks.astype(_float_dtype(masks, acts))
  _check_acts_units(acts, units, "act_avg_upsampled")
  if masks.ndim != 3 or masks.shape[0] != acts.shape[0]:
    raise ValueError(f"act_avg_upsampled: masks must be ({acts.shape[0]}, sh, sw), "
                     f"got {masks.shape}")
  up = upsample_bilinear(_unit_maps(acts, units), masks.shape[1:])
  total = jnp.sum(masks, axis=(1, 2))
  num = jnp.sum(up * masks, axis=(1, 2))
  return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0)


def concept_mask_from_labels(pixels: jax.Array, scalars: jax.Array, concept: int) -> jax.Array:
  """Ground-truth concept mask ``L_c`` from Broden-format labels.

  A pixel is in the mask when any label layer holds ``concept`` there; when ``concept`` is an
  image-level label of the image (a Broden ``scene``/``texture`` number in ``scalars``), the
  whole image is the mask -- as the paper's code builds it.

  Args:
    pixels: (N, K, sh, sw) int global label numbers, 0 = unlabelled.
    scalars: (N, S) int image-level label numbers, padded with 0 (or any value < 1).
    concept: global label number, >= 1.

  Returns:
    (N, sh, sw) float32 in {0, 1}.
  """
  pixels, scalars = jnp.asarray(pixels), jnp.asarray(scalars)
  if pixels.ndim != 4:
    raise ValueError(f"concept_mask_from_labels: pixels must be (N, K, sh, sw), got {pixels.shape}")
  if scalars.ndim != 2 or scalars.shape[0] != pixels.shape[0]:
    raise ValueError(f"concept_mask_from_labels: scalars must be ({pixels.shape[0]}, S), "
                     f"got {scalars.shape}")
  if isinstance(concept, (int, np.integer)) and concept < 1:
    raise ValueError(f"concept_mask_from_labels: concept must be a label number >= 1, got {concept}")
  in_pixels = jnp.any(pixels == concept, axis=1)
  image_level = jnp.any(scalars == concept, axis=1)
  return jnp.where(image_level[:, None, None], True, in_pixels).astype(jnp.float32)


def concept_mask_from_unit_masks(clean_acts: jax.Array, thresholds: jax.Array,
                                 unit_ids: Sequence[int], out_hw: Sequence[int]) -> jax.Array:
  """Concept mask estimated from the clean run, for when ground truth is hidden (Eq. 8).

  Definition used here: the pixels of concept c in image x are approximated by the union of the
  clean-run Network Dissection masks of the units whose (clean) label is c::

    L_c(x) = OR_{j : label(j) = c} [ B(f_j(x)) > T_j ]

  with ``B`` the float32 bilinear upsample of :func:`upsample_bilinear` and ``T_j`` the units'
  dissection thresholds (NetDissect compares with ``>``). For a single unit this is that unit's
  own clean mask, which is how the paper's MILAN experiments build source and target masks.
  ``B`` is float32 here, so a pixel whose upsampled value ties with ``T_j`` to within float32
  rounding may differ from a Pillow-computed mask.

  Args:
    clean_acts: (N, h, w, U) activations of the clean images.
    thresholds: (U,) per-unit thresholds.
    unit_ids: the units labelled c (non-empty).
    out_hw: (sh, sw) label-map size.

  Returns:
    (N, sh, sw) float32 in {0, 1}.
  """
  clean_acts, thresholds = jnp.asarray(clean_acts), jnp.asarray(thresholds)
  if clean_acts.ndim != 4:
    raise ValueError(f"concept_mask_from_unit_masks: clean_acts must be (N, h, w, U), "
                     f"got {clean_acts.shape}")
  if thresholds.shape != (clean_acts.shape[3],):
    raise ValueError(f"concept_mask_from_unit_masks: thresholds must be ({clean_acts.shape[3]},),"
                     f" got {thresholds.shape}")
  ids = np.asarray(unit_ids, np.int64).reshape(-1)
  if ids.size == 0:
    raise ValueError("concept_mask_from_unit_masks: unit_ids is empty")
  if ids.min() < 0 or ids.max() >= clean_acts.shape[3]:
    raise ValueError(f"concept_mask_from_unit_masks: unit_ids must lie in [0, "
                     f"{clean_acts.shape[3]}), got {ids.tolist()}")
  up = upsample_bilinear(clean_acts[..., ids], out_hw)  # (N, sh, sw, len(ids))
  return jnp.any(up > thresholds[ids], axis=-1).astype(jnp.float32)
