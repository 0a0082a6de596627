"""Shared pieces of the attribution methods: argument checks, logits and layer functions, reduction.

An ``apply_fn(params, x)`` returns either logits (N, C) or ``(logits, {tap: acts})`` -- the
function :func:`nemjax.models.pure_apply` builds. Layer methods name a tap of the latter.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nemjax.ops import interpret

__all__ = ["ApplyFn", "check_x_target", "logits_of", "logit_fn", "target_score", "input_grad",
           "layer_grad_and_acts", "reduce_map", "check_reduce", "as_baseline", "batched", "items_per_call",
           "AUTO_PIXELS_PER_CALL"]

ApplyFn = Callable[[Any, jax.Array], Any]


def check_x_target(x: jax.Array, target: jax.Array, fn: str) -> tuple[jax.Array, jax.Array]:
  """x (N, H, W, C) float and target (N,) int, else a one-line ValueError naming the argument."""
  x = jnp.asarray(x)
  target = jnp.asarray(target)
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: x must be float images (N, H, W, C), got {x.dtype} {x.shape}")
  if target.ndim == 0:
    target = jnp.broadcast_to(target, (x.shape[0],))
  if target.shape != (x.shape[0],) or not jnp.issubdtype(target.dtype, jnp.integer):
    raise ValueError(f"{fn}: target must be ({x.shape[0]},) integers, got {target.dtype} {target.shape}")
  return x, target


def check_reduce(reduce: str, fn: str) -> None:
  if reduce not in ("sum", "none"):
    raise ValueError(f"{fn}: reduce must be 'sum' or 'none', got {reduce!r}")


def check_baselines(baselines: Any, x: jax.Array) -> jax.Array:
  """``baselines`` as a (B, H, W, C) array of ``x``'s dtype; ValueError naming it otherwise."""
  baselines = jnp.asarray(baselines, x.dtype)
  if baselines.ndim != 4 or baselines.shape[1:] != x.shape[1:]:
    raise ValueError(f"baselines: must be (B, {', '.join(map(str, x.shape[1:]))}), "
                     f"got {baselines.shape}")
  return baselines


def reduce_map(a: jax.Array, reduce: str) -> jax.Array:
  """(N, H, W, C) -> (N, H, W) summed over channels (Captum users' convention), or unchanged."""
  return jnp.sum(a, axis=-1) if reduce == "sum" else a


def logits_of(out: Any) -> jax.Array:
  """Logits from an apply function's output: the array itself or the first of a pair."""
  return out[0] if isinstance(out, (tuple, list)) else out


def logit_fn(apply_fn: ApplyFn) -> Callable[[Any, jax.Array], jax.Array]:
  """``(params, x) -> logits (N, C)`` for either kind of apply function."""
  return lambda params, x: logits_of(apply_fn(params, x))


def target_score(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Sum over the batch of each image's target logit (its gradient is per-image)."""
  if logits is None or logits.ndim != 2:
    raise ValueError(f"apply_fn must return logits (N, C), got {None if logits is None else logits.shape}")
  return jnp.sum(jnp.take_along_axis(logits, target[:, None], axis=1))


def input_grad(fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array,
               target: jax.Array) -> jax.Array:
  """d(target logit)/dx for ``fn(params, x) -> logits``: (N, H, W, C)."""
  return jax.grad(lambda z: target_score(fn(params, z), target))(x)


def layer_grad_and_acts(apply_fn: ApplyFn, params: Any, x: jax.Array, target: jax.Array,
                        layer: str) -> tuple[jax.Array, jax.Array]:
  """Activations at tap ``layer`` and the gradient of the target logit with respect to them.

  ``apply_fn(params, x)`` must return ``(logits, {layer: acts})`` (``models.pure_apply(model,
  taps=(layer,))``); the gradient is taken by adding a zero perturbation where the tap is computed
  (:func:`nemjax.ops.interpret.with_delta`), so the model code is unchanged.

  Returns:
    ``(grad, acts)``, both (N, h, w, C) (or (N, C) for a dense tap).
  """
  out = jax.eval_shape(apply_fn, params, x)
  if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[1], dict):
    raise ValueError(f"layer: apply_fn must return (logits, {{tap: acts}}) for layer={layer!r} "
                     "(use nemjax.models.pure_apply(model, taps=(layer,)))")
  if layer not in out[1]:
    raise ValueError(f"layer: {layer!r} is not among apply_fn's taps {sorted(out[1])}")
  pert = interpret.with_delta(apply_fn, lambda o: o[1][layer])
  delta0 = jnp.zeros(out[1][layer].shape, out[1][layer].dtype)

  def score(delta):
    logits, acts = pert(params, x, delta)
    return target_score(logits, target), acts[layer]

  grad, acts = jax.grad(score, has_aux=True)(delta0)
  return grad, acts


def as_baseline(baselines: Any, x: jax.Array, fn: str) -> jax.Array:
  """None -> zeros; a scalar or an array broadcastable to x -> that array (x's shape and dtype)."""
  if baselines is None:
    return jnp.zeros_like(x)
  b = jnp.asarray(baselines, x.dtype)
  try:
    return jnp.broadcast_to(b, x.shape)
  except ValueError:
    raise ValueError(f"{fn}: baselines must broadcast to x {x.shape}, got {b.shape}") from None


#: Pixels one call of a multi-step method (IG steps, noise-tunnel or GradientSHAP samples) takes
#: at once by default: 128 images of 224² (ResNet18 IG at batch 8 in such chunks peaked at 3.2 GiB
#: of process memory on XLA:CPU). ``'auto'`` chunk sizes keep a call under it (BENCHMARKS.md
#: section 8).
AUTO_PIXELS_PER_CALL = 128 * 224 * 224


def items_per_call(batch_size: int | str | None, n_items: int, x: jax.Array, name: str) -> int | None:
  """How many of ``n_items`` N-image evaluations (of images like ``x`` (N, H, W, C)) run at once.

  ``None`` is Captum's default, all at once; an int is that many at a time; ``'auto'`` (nemjax's
  default) is the fewest chunks of (nearly) equal size that fit :data:`AUTO_PIXELS_PER_CALL`
  pixels (at least one item each; None when all do). Results do not depend on it beyond
  float32 summation order; peak memory does.

  Returns:
    None (all at once, one vmapped program) or a chunk size >= 1 (``lax.map``).
  """
  if batch_size is None:
    return None
  if isinstance(batch_size, str):
    if batch_size != "auto":
      raise ValueError(f"{name}: must be an int >= 1, None or 'auto', got {batch_size!r}")
    per_item = max(1, x.shape[0] * x.shape[1] * x.shape[2])
    fit = max(1, AUTO_PIXELS_PER_CALL // per_item)
    if fit >= n_items:
      return None
    calls = -(-n_items // fit)
    return -(-n_items // calls)        # chunks as even as that many calls allow, each within budget
  if int(batch_size) < 1:
    raise ValueError(f"{name}: must be >= 1, got {batch_size}")
  return int(batch_size)


def batched(f: Callable[[Any], Any], xs: Any, batch_size: int | None) -> Any:
  """``f`` over the leading axis of ``xs``: all at once (vmap) or ``batch_size`` at a time
  (``lax.map``: one chunk's memory at a time). On XLA:CPU the chunks cost no more than one
  vmapped program when the model is differentiated through :func:`nemjax.ops.fastgrad.cpu_fast_grad`
  (``explain``'s CPU default; without it the loop body's convolution gradients run about 2.7x
  slower, BENCHMARKS.md section 8). Writing the chunks out one after another instead kept every
  chunk's buffers alive, even behind an optimisation barrier."""
  if batch_size is None:
    return jax.vmap(f)(xs)
  if int(batch_size) < 1:
    raise ValueError(f"batch size must be >= 1, got {batch_size}")
  return jax.lax.map(f, xs, batch_size=int(batch_size))
