"""Attribution methods as pure, jit-able, batched, parameter-differentiable JAX kernels.

One calling convention::

  from nemjax import explain, models
  apply_fn, params = models.pure_apply(model, taps=("layer4",))
  m = explain.explain("integrated_gradients", apply_fn, params, x, target)   # (N, H, W)
  cam = explain.explain("grad_cam", apply_fn, params, x, target, layer="layer4")  # (N, h, w)

``apply_fn(params, x)`` returns logits (N, K) or ``(logits, {tap: acts})``
(:func:`nemjax.models.pure_apply`); layer methods (``layer=``) need the latter with the layer
among the taps. Input maps are summed over the colour channel as Captum users do with Captum's
(N, C, H, W) output; ``reduce='none'`` keeps (N, H, W, C). Names and defaults follow Captum 0.9
so results compare one to one; sampling methods take an explicit PRNG ``key`` and accept their
draws (noise, baselines, masks, permutations) explicitly. Every map is a differentiable function
of ``params``: ``jax.grad`` of a loss on a map is a fooling attack's gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from nemjax.explain import baselines, gradient, rules
from nemjax.ops import fastgrad
from nemjax.explain.baselines import blank, sobel
from nemjax.explain.rescale import deeplift, deeplift_shap
from nemjax.explain.relevance import lrp, lrp_layer, lrp_relevance
from nemjax.explain.surrogate import kernel_shap, lime
from nemjax.explain.perturb import (feature_ablation, feature_permutation, occlusion,
                                    shapley_value_sampling)
from nemjax.explain.gradient import (deconvolution, grad_cam, grad_cam_heo, gradient_shap,
                                     guided_backprop, guided_grad_cam, input_x_gradient,
                                     integrated_gradients, noise_tunnel, saliency, smoothgrad)

METHODS: dict[str, Callable[..., jax.Array]] = {
  "saliency": saliency, "input_x_gradient": input_x_gradient,
  "integrated_gradients": integrated_gradients, "smoothgrad": smoothgrad,
  "gradient_shap": gradient_shap, "guided_backprop": guided_backprop,
  "deconvolution": deconvolution, "grad_cam": grad_cam, "grad_cam_heo": grad_cam_heo,
  "guided_grad_cam": guided_grad_cam, "deeplift": deeplift, "deeplift_shap": deeplift_shap,
  "lrp": lrp, "lrp_layer": lrp_layer, "occlusion": occlusion,
  "feature_ablation": feature_ablation, "feature_permutation": feature_permutation,
  "shapley_value_sampling": shapley_value_sampling, "lime": lime, "kernel_shap": kernel_shap, "sobel": sobel, "blank": blank,
}

__all__ = ["explain", "METHODS", *sorted(METHODS), "noise_tunnel", "lrp_relevance", "baselines", "gradient", "rules"]


def explain(method: str, apply_fn: Callable[..., Any], params: Any, x: jax.Array,
            target: jax.Array, *, fast_grad: bool | None = None, **opts: Any) -> jax.Array:
  """Runs attribution ``method`` (a key of :data:`METHODS`) with ``opts``.

  Args:
    method: method name, e.g. ``'saliency'``, ``'integrated_gradients'``, ``'grad_cam'``.
    apply_fn: ``(params, x) -> logits (N, K)`` or ``-> (logits, {tap: acts})``.
    params: its parameters (any pytree, e.g. the ``nnx.State`` of ``pure_apply``).
    x: (N, H, W, C) float images, preprocessed as ``apply_fn`` expects.
    target: (N,) int class per image (a scalar is broadcast).
    fast_grad: differentiate ``apply_fn`` through :func:`nemjax.ops.fastgrad.cpu_fast_grad`
      (same forward values, gradients equal up to float32 summation order; faster on XLA:CPU
      for models with max-pools or a strided RGB stem, BENCHMARKS.md section 8). None (the
      default): on the CPU backend only. Calling a method function directly never rewrites.
    **opts: the method's options (``layer=``, ``key=``, ...).

  Returns:
    (N, H, W) maps, or (N, h, w) at a layer.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
  model = apply_fn if apply_fn is None else fastgrad.by_backend(apply_fn, fast_grad)
  return METHODS[method](model, params, x, target, **opts)
