"""Modified backward rules for ReLU and max-pool, substituted into a traced model.

Each rule keeps the forward value of the primitive and changes its VJP (a ``jax.custom_vjp``);
:func:`with_rules` rewrites any traced function through :mod:`nemjax.ops.interpret`, so model
code is untouched. ReLU is ``max(x, 0)`` (bare or as ``jax.nn.relu``); max-pool is an NHWC
``reduce_window_max``.

- guided backprop (Springenberg et al.; Captum ``GuidedBackprop``): ReLU passes
  ``relu(g * 1[x > 0])``;
- deconvolution (Zeiler & Fergus; Captum ``Deconvolution``): ReLU passes ``relu(g)``;
- DeepLIFT rescale (Shrikumar et al.; Captum ``DeepLift``): the traced batch is the input batch
  followed by the reference batch (2N); ReLU passes ``g · Δy/Δx`` (the ordinary gradient where
  ``|Δx| < eps``), max-pool passes Captum's rule: ``(unpool_x(g_x·(max(y, y') − y')) +
  unpool_x'(g_x'·(y − max(y, y')))) / Δx`` to both halves (the ordinary gradient where
  ``|Δx| < eps``), where ``unpool`` routes to each half's own window maximum.

A ``custom_vjp`` op in ``fn`` that holds a ReLU or (for :data:`DEEPLIFT_POOL`) a max-pool is
evaluated through its forward function, so the rules reach inside it. Others, such as the CPU
rewrite's convolutions and (for the ReLU-only tables) its max-pools
(:func:`nemjax.ops.fastgrad.cpu_fast_grad`), keep their fast VJPs. With those inlined, guided
backprop on ResNet18 ran at the speed of XLA's slow ``select_and_scatter``.

All backward passes are plain JAX expressions of the residuals, so a map built from them can be
differentiated again (with respect to model parameters).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from nemjax.ops import fastgrad, interpret

__all__ = ["guided_relu", "deconv_relu", "deeplift_relu", "deeplift_max_pool", "with_rules",
           "GUIDED", "DECONV", "DEEPLIFT", "DEEPLIFT_POOL"]


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """ReLU whose VJP is ``relu(g * 1[x > 0])``."""
  return jnp.maximum(x, 0.0)


guided_relu.defvjp(lambda x: (jnp.maximum(x, 0.0), x),
                   lambda x, g: (jnp.maximum(jnp.where(x > 0, g, 0.0), 0.0),))


@jax.custom_vjp
def deconv_relu(x: jax.Array) -> jax.Array:
  """ReLU whose VJP is ``relu(g)``."""
  return jnp.maximum(x, 0.0)


deconv_relu.defvjp(lambda x: (jnp.maximum(x, 0.0), None), lambda _, g: (jnp.maximum(g, 0.0),))


def _halves(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  n = a.shape[0] // 2
  return a[:n], a[n:]


def _safe_div(num: jax.Array, den: jax.Array, small: jax.Array) -> jax.Array:
  return num / jnp.where(small, 1.0, den)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def deeplift_relu(z: jax.Array, eps: float = 1e-10) -> jax.Array:
  """ReLU on a stacked (input; reference) batch (2N, ...) with DeepLIFT's rescale VJP."""
  return jnp.maximum(z, 0.0)


def _dl_relu_fwd(z, eps):
  return jnp.maximum(z, 0.0), z


def _dl_relu_bwd(eps, z, g):
  zx, zr = _halves(z)
  dx = zx - zr
  dy = jnp.maximum(zx, 0.0) - jnp.maximum(zr, 0.0)
  small = jnp.abs(dx) < eps
  m = jnp.concatenate([_safe_div(dy, dx, small)] * 2)
  small2 = jnp.concatenate([small] * 2)
  return (jnp.where(small2, jnp.where(z > 0, g, 0.0), g * m),)


deeplift_relu.defvjp(_dl_relu_fwd, _dl_relu_bwd)


def _pool(x, k, s, pad):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + k + (1,), (1,) + s + (1,),
                           ((0, 0),) + pad + ((0, 0),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def deeplift_max_pool(z: jax.Array, kernel: tuple, strides: tuple, padding: tuple,
                      eps: float = 1e-10) -> jax.Array:
  """NHWC max-pool on a stacked (input; reference) batch with Captum's DeepLIFT max-pool VJP."""
  return _pool(z, kernel, strides, padding)


def _dl_pool_fwd(z, k, s, pad, eps):
  y = _pool(z, k, s, pad)
  return y, (z, y)


def _dl_pool_bwd(k, s, pad, eps, res, g):
  z, y = res
  zx, zr = _halves(z)
  yx, yr = _halves(y)
  gx, gr = _halves(g)
  ymax = jnp.maximum(yx, yr)
  _, vjp_x = jax.vjp(lambda a: _pool(a, k, s, pad), zx)
  _, vjp_r = jax.vjp(lambda a: _pool(a, k, s, pad), zr)
  u = vjp_x(gx * (ymax - yr))[0] + vjp_r(gr * (yx - ymax))[0]
  dx = zx - zr
  small = jnp.abs(dx) < eps
  plain = jnp.concatenate([vjp_x(gx)[0], vjp_r(gr)[0]])
  return (jnp.where(jnp.concatenate([small] * 2), plain,
                    jnp.concatenate([_safe_div(u, dx, small)] * 2)),)


deeplift_max_pool.defvjp(_dl_pool_fwd, _dl_pool_bwd)


def _relu_rule(op: Callable[..., jax.Array]):
  def rule(eqn, invals, opts):
    x = interpret.relu_operand(eqn, invals)
    return None if x is None else op(x, **opts.get("relu_kw", {}))
  return rule


def _dl_pool_rule(eqn, invals, opts):
  x, = invals
  geom = fastgrad.max_pool_geometry(eqn, x)
  return None if geom is None else deeplift_max_pool(x, *geom, opts.get("eps", 1e-10))


GUIDED = {"max": _relu_rule(guided_relu), "custom_jvp_call": _relu_rule(guided_relu)}
DECONV = {"max": _relu_rule(deconv_relu), "custom_jvp_call": _relu_rule(deconv_relu)}
DEEPLIFT = {"max": _relu_rule(deeplift_relu), "custom_jvp_call": _relu_rule(deeplift_relu)}
DEEPLIFT_POOL = {**DEEPLIFT, "reduce_window_max": _dl_pool_rule}


def with_rules(fn: Callable[..., Any], rules: dict, eps: float = 1e-10) -> Callable[..., Any]:
  """``fn`` with ``rules`` (:data:`GUIDED`, :data:`DECONV`, :data:`DEEPLIFT` (ReLU only) or
  :data:`DEEPLIFT_POOL` (ReLU and max-pool)) substituted."""
  deeplift = rules is DEEPLIFT or rules is DEEPLIFT_POOL
  opts = {"eps": eps, "relu_kw": {"eps": eps}} if deeplift else {}
  return interpret.rewrite(fn, rules, opts, inline_custom_vjp=True)
