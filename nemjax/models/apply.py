"""Pure (state, x) -> (logits, acts) functions for ``jax.jit`` / ``jax.grad`` hot loops.

::

  apply_fn, state = models.pure_apply(model, taps=("layer4",), upto="layer4")
  f = jax.jit(apply_fn)
  _, acts = f(state, x)      # acts["layer4"]: (N, 7, 7, 512)

The model is split once (``nnx.split``) and merged again only while tracing, so a jitted
``apply_fn`` has no per-call NNX overhead and compiles once per input shape.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nemjax.models import layers as L
from nemjax.models import registry

__all__ = ["pure_apply", "activation_shapes"]

ApplyFn = Callable[[nnx.State, jax.Array], tuple[jax.Array | None, dict[str, jax.Array]]]


def pure_apply(model: nnx.Module, taps: Sequence[str] = (), upto: str | None = None) -> tuple[ApplyFn, nnx.State]:
  """Split ``model`` into a pure apply function and its state.

  Args:
    model: a model from :func:`nemjax.models.build` (or a converter / checkpoint).
    taps: layer names (canonical or aliases) to return; validated now (ValueError if unknown).
    upto: stop after this layer (logits are then None), or None for the full forward.

  Returns:
    ``(apply_fn, state)`` where ``apply_fn(state, x)`` maps x (N, H, W, 3) float32 to
    ``(logits (N, C) or None, {tap: (N, h, w, C) or (N, C)})`` without side effects, and ``state``
    is the model's ``nnx.State`` (params and batch statistics), a pytree.
  """
  arch = getattr(model, "arch", None)
  if arch not in registry.ARCHS:
    raise ValueError(f"pure_apply: expected a nemjax model (with .arch in {registry.ARCHS}), got {type(model).__name__}")
  if isinstance(taps, str):
    raise ValueError(f"pure_apply: taps must be a sequence of layer names, not the string {taps!r}")
  taps = tuple(taps)
  # Validate eagerly so a bad name fails here rather than at trace time.
  L.Tapper(arch, registry.layer_names(arch), registry.layer_aliases(arch), taps, upto)
  graphdef, state = nnx.split(model)

  def apply_fn(state: nnx.State, x: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    return nnx.merge(graphdef, state)(x, taps=taps, upto=upto)

  return apply_fn, state


def activation_shapes(model: nnx.Module, layers: Sequence[str], image_size: Sequence[int]
                      ) -> dict[str, tuple[int, ...]]:
  """Per-image activation shape of each of ``layers`` for ``(H, W)`` images, without computing.

  Traced with ``jax.eval_shape``, so an abstract model (``registry.build_abstract``) is enough.

  Args:
    model: a nemjax model, concrete or abstract.
    layers: canonical names or aliases (unknown names raise ValueError listing the valid ones).
    image_size: ``(H, W)`` (a trailing channel count, as in ``images.shape[1:]``, is ignored).

  Returns:
    ``{layer: (h, w, C)}`` for convolutional layers and ``{layer: (C,)}`` for dense ones, keyed
    by the names as given (duplicates dropped).
  """
  taps = tuple(dict.fromkeys(layers))
  arch = getattr(model, "arch", None)
  apply_fn, state = pure_apply(model, taps=taps, upto=registry.last_layer(arch, taps))
  x = jax.ShapeDtypeStruct((1, *tuple(image_size)[:2], 3), jnp.float32)
  _, acts = jax.eval_shape(apply_fn, state, x)
  return {name: tuple(int(d) for d in acts[name].shape[1:]) for name in taps}
