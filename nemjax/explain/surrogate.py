"""Surrogate-model attributions: LIME and KernelSHAP, as Captum 0.9's ``Lime`` / ``KernelShap``
sample and weight them.

Each image i gets S binary interpretable samples ``z`` (S, F) over its F features; sample s
is the input with the features where ``z = 1`` kept and the others set to the baseline; a
weighted linear model with intercept, ``y_s ≈ b + z_s · c`` (y = the target logit), is fitted
and feature f's elements get ``c_f`` (Captum's ``return_input_shape=True``).

- LIME: ``z`` ~ Bernoulli(1/2); weight ``exp(−d²/(2·kernel_width²))`` with ``d`` the cosine
  distance (1 − cosine similarity) between the flattened image and the perturbed one.
- KernelSHAP: the first two samples are all ones and all zeros (weight ``inf_weight``, 1e6),
  then k ~ p(k) ∝ (F − 1)/(k (F − k)) features chosen uniformly (weight 1): the Shapley kernel.

The fit is weighted least squares (Captum's ``SkLearnLinearRegression``, KernelSHAP's default);
Captum's LIME defaults to a Lasso (α = 0.01) fitted by scikit-learn's coordinate descent,
which is not reproduced here: LIME here is that surrogate without the L1 penalty, and
``ridge`` adds an L2 penalty if wanted. Draws come from ``key`` or are passed as ``samples``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.explain import _core
from nemjax.explain._core import ApplyFn
from nemjax.explain.perturb import _per_eval, feature_mask_4d

__all__ = ["lime", "kernel_shap", "weighted_linear_fit"]


def weighted_linear_fit(z: jax.Array, y: jax.Array, w: jax.Array, ridge: float = 0.0) -> jax.Array:
  """Coefficients c (F,) of ``min Σ_s w_s (y_s − b − z_s·c)² + ridge·|c|²`` (intercept b free).

  Args:
    z: (S, F) samples; y: (S,) targets; w: (S,) non-negative weights.
  """
  a = jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)
  sw = jnp.sqrt(w)[:, None]
  aw, yw = a * sw, y * sw[:, 0]
  if ridge > 0:
    reg = jnp.sqrt(ridge) * jnp.eye(a.shape[1], dtype=z.dtype)[:-1]
    aw = jnp.concatenate([aw, reg])
    yw = jnp.concatenate([yw, jnp.zeros(reg.shape[0], z.dtype)])
  hp = jax.lax.Precision.HIGHEST
  pinv = jnp.linalg.pinv(aw)
  theta = jnp.matmul(pinv, yw, precision=hp)
  for _ in range(2):   # iterative refinement: heavy weights (KernelSHAP's 1e6) cost float32 digits
    theta = theta + jnp.matmul(pinv, yw - jnp.matmul(aw, theta, precision=hp), precision=hp)
  return theta[:-1]


def _surrogate(apply_fn, params, x, target, samples, weights_fn, baselines, feature_mask,
               perturbations_per_eval, ridge, reduce, fn):
  b = _core.as_baseline(baselines, x, fn)
  mask, nf = feature_mask_4d(feature_mask, x, fn)
  samples = jnp.asarray(samples, x.dtype)
  n = x.shape[0]
  if samples.ndim != 3 or samples.shape[0] != n or samples.shape[2] != nf:
    raise ValueError(f"samples: must be ({n}, n_samples, {nf}), got {samples.shape}")
  full_mask = jnp.broadcast_to(mask, x.shape)
  logits_fn = _core.logit_fn(apply_fn)

  def perturbed(z):                         # z (N, F) -> (N, H, W, C)
    keep = jnp.take_along_axis(z, full_mask.reshape(n, -1), axis=1).reshape(x.shape)
    return keep * x + (1 - keep) * b

  def one(z):
    xs = perturbed(z)
    return jnp.take_along_axis(logits_fn(params, xs), target[:, None], axis=1)[:, 0], xs

  def score_and_weight(z):
    y, xs = one(z)
    return y, weights_fn(z, xs)

  ys, ws = _core.batched(score_and_weight, jnp.swapaxes(samples, 0, 1),
                         _per_eval(perturbations_per_eval))                    # (S, N) each
  coef = jax.vmap(lambda z, y, w: weighted_linear_fit(z, y, w, ridge))(samples, ys.T, ws.T)  # (N, F)
  attr = jnp.take_along_axis(coef, full_mask.reshape(n, -1), axis=1).reshape(x.shape)
  return _core.reduce_map(attr, reduce)


def lime(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
         key: jax.Array | None = None, samples: Any = None, n_samples: int = 50,
         baselines: Any = None, feature_mask: Any = None, kernel_width: float = 1.0,
         ridge: float = 0.0, perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """LIME with Captum's sampling and similarity kernel and a weighted least-squares surrogate.

  Args:
    key: PRNG key for the samples (unless ``samples`` is given).
    samples: (N, n_samples, F) binary interpretable samples.
    baselines: None (zeros), a scalar or an array broadcastable to x.
    feature_mask: feature ids (see :mod:`nemjax.explain.perturb`); None = every element.
    kernel_width: width of the exponential kernel on the cosine distance (Captum's 1.0).
    ridge: L2 penalty on the coefficients (0 = plain weighted least squares).

  Returns:
    (N, H, W) (or (N, H, W, C)): each element holds its feature's coefficient.
  """
  x, target = _core.check_x_target(x, target, "lime")
  _core.check_reduce(reduce, "lime")
  if samples is None:
    if key is None:
      raise ValueError("lime: key is required when samples is not given")
    _, nf = feature_mask_4d(feature_mask, x, "lime")
    samples = jax.random.bernoulli(key, 0.5, (x.shape[0], int(n_samples), nf)).astype(x.dtype)
  flat = x.reshape(x.shape[0], -1)

  def weights(z, xs):
    p = xs.reshape(xs.shape[0], -1)
    cos = jnp.sum(flat * p, 1) / jnp.maximum(jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(p, axis=1), 1e-8)
    d = 1.0 - cos
    return jnp.exp(-(d ** 2) / (2 * kernel_width ** 2))

  return _surrogate(apply_fn, params, x, target, samples, weights, baselines, feature_mask,
                    perturbations_per_eval, ridge, reduce, "lime")


def kernel_shap(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                key: jax.Array | None = None, samples: Any = None, n_samples: int = 25,
                baselines: Any = None, feature_mask: Any = None, inf_weight: float = 1e6,
                perturbations_per_eval: int = 1, reduce: str = "sum") -> jax.Array:
  """KernelSHAP as Captum's ``KernelShap``: Shapley-kernel samples, weighted least squares.

  Args:
    key: PRNG key for the samples (unless ``samples`` is given).
    samples: (N, n_samples, F) binary samples; an all-ones or all-zeros sample gets
      ``inf_weight``, every other one weight 1 (the kernel is in the sampling).
    baselines, feature_mask: as :func:`lime`.

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "kernel_shap")
  _core.check_reduce(reduce, "kernel_shap")
  _, nf = feature_mask_4d(feature_mask, x, "kernel_shap")
  if samples is None:
    if key is None:
      raise ValueError("kernel_shap: key is required when samples is not given")
    if nf < 2:
      raise ValueError(f"feature_mask: kernel_shap needs at least 2 features, got {nf}")
    ks = np.arange(1, nf)
    p = (nf - 1) / (ks * (nf - ks))
    n, s = x.shape[0], int(n_samples) - 2
    k1, k2 = jax.random.split(key)
    k = jax.random.choice(k1, jnp.asarray(ks), (n, s), p=jnp.asarray(p / p.sum()))
    ranks = jnp.argsort(jnp.argsort(jax.random.normal(k2, (n, s, nf)), axis=-1), axis=-1)
    rand = (ranks >= nf - k[..., None]).astype(x.dtype)
    samples = jnp.concatenate([jnp.ones((n, 1, nf), x.dtype), jnp.zeros((n, 1, nf), x.dtype), rand], 1)

  def weights(z, xs):
    k = jnp.sum(z, axis=1)
    return jnp.where((k == 0) | (k == z.shape[1]), inf_weight, 1.0).astype(x.dtype)

  return _surrogate(apply_fn, params, x, target, samples, weights, baselines, feature_mask,
                    perturbations_per_eval, 0.0, reduce, "kernel_shap")
