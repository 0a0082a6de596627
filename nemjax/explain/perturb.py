"""Perturbation attributions, as Captum 0.9's ``Occlusion``, ``FeatureAblation``,
``FeaturePermutation`` and ``ShapleyValueSampling`` compute them.

Same calling convention as the gradient methods. Perturbed copies of the batch are evaluated
``perturbations_per_eval`` at a time (Captum's name; each copy is one N-image forward), so
memory stays at that many batches whatever the number of features; the loop is a
``lax.map``, so the whole method jits. Feature masks hold integer feature ids 0..F−1 and must be
concrete arrays (their number F fixes the loop length): (H, W) shared by all images and
channels, (N, H, W), (H, W, C) or (N, H, W, C). Maps are summed over colour channels (as
Captum users do with its (N, C, H, W) output); ``reduce='none'`` keeps (N, H, W, C).
Random draws (permutations) come from an explicit key or are passed in.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.explain import _core
from nemjax.explain._core import ApplyFn

__all__ = ["occlusion", "feature_ablation", "feature_permutation", "shapley_value_sampling",
           "feature_mask_4d"]


def feature_mask_4d(feature_mask: Any, x: jax.Array, fn: str) -> tuple[jax.Array, int]:
  """Feature ids as an int32 array broadcastable to x (N|1, H, W, C|1) and their count F.

  None gives every element its own feature, numbered in Captum's (C, H, W) order.
  """
  n, h, w, c = x.shape
  if feature_mask is None:
    ids = np.arange(c * h * w, dtype=np.int32).reshape(c, h, w).transpose(1, 2, 0)[None]
    return jnp.asarray(ids), c * h * w
  m = np.asarray(feature_mask)
  if not np.issubdtype(m.dtype, np.integer):
    raise ValueError(f"feature_mask: must hold integer feature ids, got {m.dtype}")
  if m.shape == (h, w):
    m = m[None, :, :, None]
  elif m.shape == (n, h, w):
    m = m[..., None]
  elif m.shape == (h, w, c):
    m = m[None]
  elif m.shape != (n, h, w, c):
    raise ValueError(f"feature_mask: must be (H, W), (N, H, W), (H, W, C) or (N, H, W, C) for x "
                     f"{x.shape}, got {m.shape}")
  if m.min() < 0:
    raise ValueError(f"feature_mask: ids must be >= 0, got min {m.min()}")
  return jnp.asarray(m.astype(np.int32)), int(m.max()) + 1


def _scores(apply_fn, params, target):
  fn = _core.logit_fn(apply_fn)
  return lambda z: jnp.take_along_axis(fn(params, z), target[:, None], axis=1)[:, 0]


def _per_eval(k: int | None) -> int:
  k = 1 if k is None else int(k)
  if k < 1:
    raise ValueError(f"perturbations_per_eval must be >= 1, got {k}")
  return k


def _checked_features(x, target, baselines, feature_mask, reduce: str, fn: str):
  """The checked inputs of a feature-replacement method: ``(x, target, baselines, mask
  (N, H, W, C) int, number of features)``; ValueError naming the bad argument."""
  x, target = _core.check_x_target(x, target, fn)
  _core.check_reduce(reduce, fn)
  b = _core.as_baseline(baselines, x, fn)
  mask, nf = feature_mask_4d(feature_mask, x, fn)
  return x, target, b, mask, nf


def feature_ablation(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                     baselines: Any = None, feature_mask: Any = None,
                     perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """Captum ``FeatureAblation``: each feature's elements get ``f(x)_t − f(x with the feature set
  to the baseline)_t``.

  Args:
    baselines: None (zeros), a scalar or an array broadcastable to x.
    feature_mask: feature ids (see the module docstring); None = every element separately.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target, b, mask, nf = _checked_features(x, target, baselines, feature_mask, reduce,
                                             "feature_ablation")
  score = _scores(apply_fn, params, target)
  base = score(x)

  def one(f):
    return base - score(jnp.where(mask == f, b, x))

  diffs = _core.batched(one, jnp.arange(nf), _per_eval(perturbations_per_eval))   # (F, N)
  attr = jnp.take_along_axis(diffs.T, jnp.broadcast_to(mask, x.shape).reshape(x.shape[0], -1), axis=1)
  return _core.reduce_map(attr.reshape(x.shape), reduce)


def _windows(shape: Sequence[int], window: Sequence[int], strides: Sequence[int]) -> list:
  """Captum's window offsets per axis: k·stride for k < ceil((dim − win)/stride) + 1."""
  axes = []
  for dim, win, st in zip(shape, window, strides):
    if win > dim or win < 1:
      raise ValueError(f"sliding_window_shapes: window {tuple(window)} must fit the input {tuple(shape)}")
    if st < 1 or (dim > win and st > win):
      raise ValueError(f"strides: {tuple(strides)} must be >= 1 and <= the window {tuple(window)}")
    count = int(np.ceil((dim - win) / st)) + 1
    axes.append([(k * st, min(k * st + win, dim)) for k in range(count)])
  return list(itertools.product(*axes))


def occlusion(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
              sliding_window_shapes: Sequence[int], strides: Any = 1, baselines: Any = None,
              perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """Captum ``Occlusion``: slide a window of baseline values over the image; every element gets
  the mean of ``f(x)_t − f(occluded)_t`` over the windows that cover it.

  Args:
    sliding_window_shapes: ``(h, w, c)`` in x's NHWC order (Captum takes (c, h, w)); ``(h, w)``
      means every channel.
    strides: an int or ``(sh, sw[, sc])``.
    baselines: None (zeros), a scalar or an array broadcastable to x.

  Returns:
    (N, H, W) (or (N, H, W, C)); elements no window covers are NaN (0/0, as in Captum).
  """
  x, target = _core.check_x_target(x, target, "occlusion")
  _core.check_reduce(reduce, "occlusion")
  shape = x.shape[1:]
  win = tuple(int(v) for v in sliding_window_shapes)
  if len(win) == 2:
    win = win + (shape[2],)
  if len(win) != 3:
    raise ValueError(f"sliding_window_shapes: must be (h, w) or (h, w, c), got {sliding_window_shapes}")
  st = (int(strides),) * 3 if np.isscalar(strides) else tuple(int(v) for v in strides)
  if len(st) == 2:
    st = st + (shape[2],)
  if len(st) != 3:
    raise ValueError(f"strides: must be an int, (sh, sw) or (sh, sw, sc), got {strides}")
  pos = _windows(shape, win, st)
  masks = np.zeros((len(pos),) + tuple(shape), np.float32)
  for i, ((y0, y1), (x0, x1), (c0, c1)) in enumerate(pos):
    masks[i, y0:y1, x0:x1, c0:c1] = 1.0
  b = _core.as_baseline(baselines, x, "occlusion")
  score = _scores(apply_fn, params, target)
  base = score(x)
  masks_j = jnp.asarray(masks, x.dtype)

  def one(m):
    return base - score(x * (1 - m) + b * m)

  diffs = _core.batched(one, masks_j, _per_eval(perturbations_per_eval))      # (P, N)
  total = jnp.einsum("pn,phwc->nhwc", diffs, masks_j, precision=jax.lax.Precision.HIGHEST)
  return _core.reduce_map(total / jnp.asarray(masks.sum(0), x.dtype), reduce)


def feature_permutation(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                        key: jax.Array | None = None, perms: Any = None, feature_mask: Any = None,
                        perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """Captum ``FeaturePermutation``: each feature's values are shuffled across the batch
  (``x[perm]``, one permutation per feature, never the identity) and its elements get
  ``f(x)_t − f(permuted)_t``.

  Args:
    key: PRNG key for the permutations (unless ``perms`` is given).
    perms: (F, N) int, explicit permutations per feature (feature order 0..F−1).
    feature_mask: feature ids (see the module docstring); None = every element separately.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "feature_permutation")
  _core.check_reduce(reduce, "feature_permutation")
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"x: feature_permutation needs a batch of at least 2 images, got {n}")
  mask, nf = feature_mask_4d(feature_mask, x, "feature_permutation")
  if perms is None:
    if key is None:
      raise ValueError("feature_permutation: key is required when perms is not given")
    keys = jax.random.split(key, nf)

    def draw(k):      # a uniform non-identity permutation: a random one, shifted if identity
      p = jax.random.permutation(k, n)
      return jnp.where(jnp.all(p == jnp.arange(n)), jnp.roll(p, 1), p)
    perms = jax.vmap(draw)(keys)
  perms = jnp.asarray(perms)
  if perms.shape != (nf, n):
    raise ValueError(f"perms: must be ({nf}, {n}), got {perms.shape}")
  score = _scores(apply_fn, params, target)
  base = score(x)

  def one(args):
    f, p = args
    return base - score(jnp.where(mask == f, x[p], x))

  diffs = _core.batched(one, (jnp.arange(nf), perms), _per_eval(perturbations_per_eval))
  attr = jnp.take_along_axis(diffs.T, jnp.broadcast_to(mask, x.shape).reshape(n, -1), axis=1)
  return _core.reduce_map(attr.reshape(x.shape), reduce)


def shapley_value_sampling(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                           key: jax.Array | None = None, perms: Any = None, n_samples: int = 25,
                           baselines: Any = None, feature_mask: Any = None,
                           perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """Captum ``ShapleyValueSampling``: for each sampled feature order, features are switched from
  the baseline to the input one by one; a feature gets the change in the target logit when it
  is switched on, averaged over the orders.

  Args:
    key: PRNG key for the orders (unless ``perms`` is given).
    perms: (n_samples, F) int feature orders (Captum's ``torch.randperm(F)`` draws).
    n_samples: number of orders (Captum's 25).
    baselines: None (zeros), a scalar or an array broadcastable to x.
    feature_mask: feature ids; None = every element separately (F = H·W·C forwards per order).

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target, b, mask, nf = _checked_features(x, target, baselines, feature_mask, reduce,
                                             "shapley_value_sampling")
  if perms is None:
    if key is None:
      raise ValueError("shapley_value_sampling: key is required when perms is not given")
    perms = jax.vmap(lambda k: jax.random.permutation(k, nf))(jax.random.split(key, int(n_samples)))
  perms = jnp.asarray(perms)
  if perms.ndim != 2 or perms.shape[1] != nf:
    raise ValueError(f"perms: must be (n_samples, {nf}), got {perms.shape}")
  score = _scores(apply_fn, params, target)
  s = perms.shape[0]
  ranks = jnp.zeros_like(perms).at[jnp.arange(s)[:, None], perms].set(jnp.arange(nf)[None])
  flat_mask = jnp.broadcast_to(mask, x.shape).reshape(x.shape[0], -1)

  def one(args):                 # sample i, step k: the first k features of order i switched on
    i, k = args
    on = ranks[i][mask] < k
    return score(jnp.where(on, x, b))

  ii, kk = np.meshgrid(np.arange(s), np.arange(nf + 1), indexing="ij")
  evals = _core.batched(one, (jnp.asarray(ii.ravel()), jnp.asarray(kk.ravel())),
                        _per_eval(perturbations_per_eval)).reshape(s, nf + 1, -1)   # (S, F+1, N)
  gains = evals[:, 1:] - evals[:, :-1]                                    # (S, F, N) by rank
  by_feature = jnp.take_along_axis(gains, ranks[:, :, None], axis=1)      # (S, F, N) by feature
  mean = jnp.mean(by_feature, axis=0).T                                  # (N, F)
  attr = jnp.take_along_axis(mean, flat_mask, axis=1)
  return _core.reduce_map(attr.reshape(x.shape), reduce)
