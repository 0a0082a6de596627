"""DeepLIFT (rescale rule) and DeepLIFT-SHAP, as Captum 0.9's ``DeepLift`` / ``DeepLiftShap``.

The model is traced once on the stacked batch (inputs; references) (2N) and re-evaluated with
DeepLIFT's multipliers as the VJPs of every ReLU and max-pool (:mod:`nemjax.explain.rules`);
linear pieces (convolutions, BatchNorm, dense layers, average pools, additions) keep their
ordinary gradients, which are their exact multipliers. As Captum, the score differentiated is
the target logit of both halves, and the attribution is ``(x − x') · multiplier``.

Max-pool: Captum 0.9 defines a rescale rule for ``MaxPool2d`` (above, ``maxpool='rescale'``),
but its result does not reach the input gradient: Captum's maps equal the ordinary max-pool
gradient with rescaled ReLUs to 1e-6, and violate summation-to-delta (Σ attributions ≠
f(x) − f(x')) on max-pool networks. ``maxpool='captum'`` (the default) reproduces what Captum
computes; ``maxpool='rescale'`` applies the stated rule and sums to f(x) − f(x') exactly.

Captum hooks modules, so it needs every ReLU / max-pool module to be called once per forward
(a ResNet's shared ``relu`` breaks it); here every ReLU primitive gets the rule, so ResNets are
handled (by the same per-primitive rules). Overlapping max-pool windows: the multiplier routes
through the ordinary max-pool VJP (summing where windows share a maximum), where Captum's
``max_unpool`` writes one value per position -- the two agree for non-overlapping pools.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemjax.explain import _core, rules
from nemjax.explain._core import ApplyFn

__all__ = ["deeplift", "deeplift_shap"]


def _multipliers(apply_fn, params, x, ref, target, eps, maxpool):
  if maxpool not in ("captum", "rescale"):
    raise ValueError(f"maxpool must be 'captum' or 'rescale', got {maxpool!r}")
  table = rules.DEEPLIFT if maxpool == "captum" else rules.DEEPLIFT_POOL
  fn = rules.with_rules(_core.logit_fn(apply_fn), table, eps)
  t2 = jnp.concatenate([target, target])
  return jax.grad(lambda z: _core.target_score(fn(params, jnp.concatenate([z, ref])), t2))(x)


def deeplift(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
             baselines: Any = None, eps: float = 1e-10, maxpool: str = "captum",
             reduce: str = "sum") -> jax.Array:
  """Captum ``DeepLift`` (rescale rule, ``multiply_by_inputs=True``).

  Args:
    baselines: None (zeros, Captum's default), a scalar or an array broadcastable to x.
    eps: below this |Δx| a ReLU / max-pool passes its ordinary gradient (Captum's 1e-10).
    maxpool: ``'captum'`` (ordinary max-pool gradient, what Captum 0.9 computes) or
      ``'rescale'`` (DeepLIFT's max-pool rule as Captum states it; sums to f(x) − f(x')).

  Returns:
    (N, H, W) (or (N, H, W, C) with ``reduce='none'``).
  """
  x, target = _core.check_x_target(x, target, "deeplift")
  _core.check_reduce(reduce, "deeplift")
  ref = _core.as_baseline(baselines, x, "deeplift")
  return _core.reduce_map((x - ref) * _multipliers(apply_fn, params, x, ref, target, eps, maxpool), reduce)


def deeplift_shap(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array, *,
                  baselines: jax.Array, eps: float = 1e-10, maxpool: str = "captum",
                  reduce: str = "sum") -> jax.Array:
  """Captum ``DeepLiftShap``: the mean of DeepLIFT over every baseline of a distribution.

  Args:
    baselines: (B, H, W, C); image i is paired with each of them (one N·B batch).

  Returns:
    (N, H, W) (or (N, H, W, C)).
  """
  x, target = _core.check_x_target(x, target, "deeplift_shap")
  _core.check_reduce(reduce, "deeplift_shap")
  baselines = _core.check_baselines(baselines, x)
  n, nb = x.shape[0], baselines.shape[0]
  xr = jnp.repeat(x, nb, axis=0)
  br = jnp.tile(baselines, (n, 1, 1, 1))
  a = (xr - br) * _multipliers(apply_fn, params, xr, br, jnp.repeat(target, nb), eps, maxpool)
  return _core.reduce_map(jnp.mean(a.reshape((n, nb) + x.shape[1:]), axis=1), reduce)
