"""Architecture registry: build models by name, list and resolve their tappable layer names.

``layer_names(arch)`` lists canonical names (torchvision module names) in forward order, i.e. the
order in which the layers' outputs become available (PyTorch forward-hook order): a container such
as ResNet's ``layer1`` comes after everything inside it. So for a set of taps, the one latest in
this order is the ``upto`` that computes them all (see :func:`last_layer`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemjax.models import alexnet, resnet, smallcnn, vgg
from nemjax.models import layers as L

__all__ = ["ARCHS", "build", "build_abstract", "fill", "torchvision_init", "layer_names", "layer_aliases", "canonical_layer", "last_layer"]

# Every model module exposes the same names: ARCHS (the architectures it builds), LAYER_NAMES and
# ALIASES ({arch: ...}) and Model(arch, num_classes, rngs=...). A new model is one more entry here.
_MODULES = (alexnet, vgg, resnet, smallcnn)
_MODULE_OF = {arch: module for module in _MODULES for arch in module.ARCHS}
ARCHS: tuple[str, ...] = tuple(_MODULE_OF)


def _check_arch(arch: str) -> None:
  if arch not in ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def fill(abstract: nnx.Module,
         value: Callable[[tuple[Any, ...], tuple[int, ...]], np.ndarray]) -> nnx.Module:
  """A model shaped like ``abstract`` whose every array is ``value(path, shape)``.

  ``path`` is the leaf's NNX state path (e.g. ``('features', 0, 'kernel')``); values are cast to
  float32 jax arrays. Used by :func:`build` (random init) and the weight converters.
  """
  graphdef, state = nnx.split(abstract)
  pure: dict = {}
  for path, v in nnx.to_flat_state(state):
    node = pure
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(np.asarray(value(tuple(path), tuple(v.shape)), np.float32))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def torchvision_init(key: jax.Array) -> Callable[[tuple[Any, ...], tuple[int, ...]], np.ndarray]:
  """torchvision-style random values for :func:`fill`, deterministic in ``key``.

  Conv kernels (kh, kw, I, O) ~ N(0, 2 / (kh*kw*O)) (kaiming normal, fan_out); linear kernels
  (I, O) ~ N(0, 0.01^2); biases, BN shifts and running means 0; BN scales and running variances 1.
  The normals come from a NumPy generator seeded with ``key``'s bits: free of the per-shape XLA
  compiles (and slow CPU threefry) of sampling each kernel with jax.random. Leaves are drawn in
  state order, so call it once per model.
  """
  seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel().tolist()
  gen = np.random.default_rng(seed)

  def value(path: tuple[Any, ...], shape: tuple[int, ...]) -> np.ndarray:
    leaf = path[-1]
    if leaf == "kernel":
      std = math.sqrt(2.0 / (shape[0] * shape[1] * shape[3])) if len(shape) == 4 else 0.01
      return gen.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if leaf in ("scale", "var"):
      return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)

  return value


def _construct(arch: str, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  return _MODULE_OF[arch].Model(arch, num_classes, rngs=rngs)


def build(arch: str, num_classes: int = 1000, *, rngs: nnx.Rngs) -> nnx.Module:
  """A randomly initialised model (torchvision-style init, see :func:`torchvision_init`).

  Args:
    arch: one of ``ARCHS``.
    num_classes: size of the final linear layer.
    rngs: ``nnx.Rngs``; one key is taken from its ``params`` stream.

  Returns:
    The NNX module; ``model(x, taps=..., upto=...)`` maps (N, H, W, 3) normalised float32 images
    to ``(logits (N, num_classes) or None, {tap: activation})``.
  """
  _check_arch(arch)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  abstract = nnx.eval_shape(lambda: _construct(arch, num_classes, nnx.Rngs(0)))
  return fill(abstract, torchvision_init(rngs.params()))


def build_abstract(arch: str, num_classes: int = 1000) -> nnx.Module:
  """The model with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute): for shapes and loaders."""
  _check_arch(arch)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return nnx.eval_shape(lambda: _construct(arch, num_classes, nnx.Rngs(0)))


def layer_names(arch: str) -> tuple[str, ...]:
  """Canonical tappable layer names of ``arch`` in forward (completion) order."""
  _check_arch(arch)
  return _MODULE_OF[arch].LAYER_NAMES[arch]


def layer_aliases(arch: str) -> dict[str, str]:
  """Alias -> canonical name for ``arch`` (e.g. VGG16 ``conv5_3`` -> ``features.28``)."""
  _check_arch(arch)
  return dict(_MODULE_OF[arch].ALIASES[arch])


def canonical_layer(arch: str, name: str) -> str:
  """The canonical name of ``name`` (itself if canonical); ValueError listing the valid names."""
  _check_arch(arch)
  module = _MODULE_OF[arch]
  return L.resolve_layer(arch, module.LAYER_NAMES[arch], module.ALIASES[arch], name)


def last_layer(arch: str, names: Sequence[str]) -> str:
  """Of ``names`` (canonical or aliases), the canonical one computed last: the ``upto`` that covers them all."""
  if isinstance(names, str) or not names:
    raise ValueError(f"last_layer needs a non-empty sequence of layer names, got {names!r}")
  order = {n: i for i, n in enumerate(layer_names(arch))}
  return max((canonical_layer(arch, n) for n in names), key=order.__getitem__)
