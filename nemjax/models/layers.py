"""PyTorch-exact building blocks (NHWC, float32, inference mode) and the layer-tap machinery.

Each layer mirrors a ``torch.nn`` module in eval mode, with Flax parameter names:

| here                | torch.nn                      | variables (shape)                                 |
|---------------------|-------------------------------|---------------------------------------------------|
| ``Conv2d``          | ``Conv2d``                    | ``kernel`` (kh, kw, in, out) HWIO, ``bias`` (out,) |
| ``BatchNorm2d``     | ``BatchNorm2d`` (eval)        | ``scale``/``bias`` Param, ``mean``/``var`` BatchStat (C,) |
| ``Linear``          | ``Linear``                    | ``kernel`` (in, out), ``bias`` (out,)              |
| ``MaxPool2d``       | ``MaxPool2d`` (-inf padding, floor mode) | none                                   |
| ``AdaptiveAvgPool2d`` | ``AdaptiveAvgPool2d``       | none                                               |
| ``ReLU``, ``Dropout`` (identity) | ``ReLU``, ``Dropout`` (eval) | none                                   |

Precision: convolutions and matmuls use JAX's default precision (exact float32 on CPU). On GPUs
that default may use TF32; wrap calls in ``jax.default_matmul_precision("highest")`` (or set
``jax_default_matmul_precision``) for full float32, e.g. when comparing with PyTorch.

The tap machinery: a model's ``__call__`` creates a fresh :class:`Tapper` per call and passes
every named intermediate through it; the tapper keeps the requested ones and raises
:class:`StopForward` after the ``upto`` layer, which the model catches to return early.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

__all__ = [
  "Conv2d", "BatchNorm2d", "Linear", "ReLU", "Dropout", "MaxPool2d", "AdaptiveAvgPool2d",
  "adaptive_avg_pool2d", "flatten_chw", "Tapper", "StopForward", "resolve_layer",
  "check_model_input", "run_sequential", "FeaturesClassifier",
]

# torchvision's kaiming_normal_(mode="fan_out") for convs; N(0, 0.01) for linears (registry.build
# draws the same distributions in one batch, see registry._random_state).
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_LINEAR_INIT = nnx.initializers.normal(0.01)


class Conv2d(nnx.Module):
  """``torch.nn.Conv2d`` with symmetric zero padding, on NHWC input."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               padding: int = 0, *, bias: bool = True, rngs: nnx.Rngs):
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = padding
    self.kernel = nnx.Param(_CONV_INIT(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, H, W, in) -> (N, H', W', out), H' = floor((H + 2p - k) / s) + 1."""
    _check_window(x, self.kernel_size, self.padding, f"Conv2d(kernel {self.kernel_size}, stride {self.stride}, padding {self.padding})")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"Conv2d expects {self.in_channels} input channels, got input of shape {tuple(x.shape)}")
    p = self.padding
    y = lax.conv_general_dilated(
      x, self.kernel[...], window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class BatchNorm2d(nnx.Module):
  """``torch.nn.BatchNorm2d`` in eval mode (running statistics), channels last; eps 1e-5."""

  def __init__(self, num_features: int, eps: float = 1e-5, *, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic initialisation, kept for a uniform constructor signature
    self.num_features = num_features
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., C) -> (..., C): ``x * a + b`` with ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a`` (torch's CPU form)."""
    a = self.scale[...] / jnp.sqrt(self.var[...] + self.eps)
    b = self.bias[...] - self.mean[...] * a
    return x * a + b


class Linear(nnx.Module):
  """``torch.nn.Linear`` with the kernel stored (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(_LINEAR_INIT(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, in) -> (N, out)."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f"Linear expects {self.in_features} input features, got input of shape {tuple(x.shape)}")
    return x @ self.kernel[...] + self.bias[...]


class ReLU(nnx.Module):
  """``torch.nn.ReLU``."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


class Dropout(nnx.Module):
  """``torch.nn.Dropout`` in eval mode: the identity (nemjax models are inference-only)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class MaxPool2d(nnx.Module):
  """``torch.nn.MaxPool2d(kernel_size, stride, padding)`` (floor mode; padding counts as -inf)."""

  def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
    self.kernel_size = kernel_size
    self.stride = kernel_size if stride is None else stride
    self.padding = padding

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, H, W, C) -> (N, floor((H + 2p - k) / s) + 1, ..., C)."""
    k, s, p = self.kernel_size, self.stride, self.padding
    _check_window(x, k, p, f"MaxPool2d(kernel {k}, stride {s}, padding {p})")
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0)))


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging matrix with PyTorch's bins [floor(i*in/out), ceil((i+1)*in/out))."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool2d(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """``torch.nn.functional.adaptive_avg_pool2d`` on NHWC input.

  Args:
    x: (N, H, W, C).
    output_size: (oh, ow).

  Returns:
    (N, oh, ow, C). Identity when (H, W) == (oh, ow); a reshape-mean when the bins tile evenly;
    otherwise two small averaging matmuls (bins may overlap, as in PyTorch).
  """
  n, h, w, c = x.shape
  oh, ow = output_size
  if h == 0 or w == 0:
    raise ValueError(f"adaptive_avg_pool2d: empty spatial input {tuple(x.shape)}; the input image is too small for this network")
  if (h, w) == (oh, ow):
    return x
  if oh == 1 and ow == 1:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  if h % oh == 0 and w % ow == 0:
    return jnp.mean(x.reshape(n, oh, h // oh, ow, w // ow, c), axis=(2, 4))
  mh = jnp.asarray(_adaptive_matrix(h, oh))
  mw = jnp.asarray(_adaptive_matrix(w, ow))
  y = jnp.einsum("oh,nhwc->nowc", mh, x, precision=lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mw, y, precision=lax.Precision.HIGHEST)


class AdaptiveAvgPool2d(nnx.Module):
  """``torch.nn.AdaptiveAvgPool2d(output_size)``; output stays NHWC (N, oh, ow, C)."""

  def __init__(self, output_size: int | tuple[int, int]):
    self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return adaptive_avg_pool2d(x, self.output_size)


def flatten_chw(x: jax.Array) -> jax.Array:
  """``torch.flatten(x_nchw, 1)`` for NHWC x: (N, H, W, C) -> (N, C*H*W) in (C, H, W) order.

  Flattening in torchvision's order keeps converted ``classifier`` weights a plain transpose of
  PyTorch's and makes the flattened taps equal PyTorch's element for element.
  """
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _check_window(x: jax.Array, k: int, p: int, what: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{what}: expected NHWC input (N, H, W, C), got shape {tuple(x.shape)}")
  h, w = x.shape[1], x.shape[2]
  if h + 2 * p < k or w + 2 * p < k:
    raise ValueError(f"{what}: spatial input {h}x{w} is smaller than the window; the input image is too small for this network")


def check_model_input(x: jax.Array, arch: str) -> None:
  """Raise ValueError unless x is a float (N, H, W, 3) batch."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"{arch}: expected normalised NHWC images of shape (N, H, W, 3), got shape {None if shape is None else tuple(shape)}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{arch}: expected float images (normalise them first, e.g. nemjax.preprocess.netdissect_normalize), got dtype {dtype}")


class StopForward(Exception):
  """Raised by :class:`Tapper` after the ``upto`` layer; caught by the model's ``__call__``."""


def resolve_layer(arch: str, names: Sequence[str], aliases: Mapping[str, str], name: str) -> str:
  """Canonical name for ``name`` (a canonical name or an alias); ValueError listing the valid ones."""
  if not isinstance(name, str):
    raise ValueError(f"{arch}: layer names are strings, got {name!r}")
  if name in aliases:
    return aliases[name]
  if name in names:
    return name
  listing = ", ".join(names)
  alias_listing = ", ".join(f"{a}->{c}" for a, c in aliases.items())
  msg = f"{arch}: unknown layer {name!r}. Valid layers (forward order): {listing}"
  if alias_listing:
    msg += f". Aliases: {alias_listing}"
  raise ValueError(msg)


class Tapper:
  """Collects requested activations during one forward pass (a fresh one per call).

  Args:
    arch: architecture name (for messages).
    names: canonical layer names in forward (completion) order.
    aliases: alias -> canonical name.
    taps: requested names (canonical or alias); the result dict is keyed by these.
    upto: stop after this layer (canonical or alias), or None for the full forward.
  """

  def __init__(self, arch: str, names: Sequence[str], aliases: Mapping[str, str],
               taps: Sequence[str], upto: str | None):
    if isinstance(taps, str):
      raise ValueError(f"{arch}: taps must be a sequence of layer names, not the string {taps!r} (use ({taps!r},))")
    order = {n: i for i, n in enumerate(names)}
    self.wanted: dict[str, list[str]] = {}
    for t in taps:
      self.wanted.setdefault(resolve_layer(arch, names, aliases, t), []).append(t)
    self.upto = None if upto is None else resolve_layer(arch, names, aliases, upto)
    if self.upto is not None:
      late = [t for c, given in self.wanted.items() for t in given if order[c] > order[self.upto]]
      if late:
        raise ValueError(f"{arch}: taps {late} come after upto={upto!r} in the forward pass and would never be computed")
    self.out: dict[str, jax.Array] = {}

  def __call__(self, name: str, x: jax.Array) -> jax.Array:
    """Record ``x`` as layer ``name``'s output if requested; stop after ``upto``. Returns x."""
    for given in self.wanted.get(name, ()):
      self.out[given] = x
    if name == self.upto:
      raise StopForward
    return x



def run_sequential(tap: Tapper, prefix: str, modules: Sequence[nnx.Module], x: jax.Array
                   ) -> jax.Array:
  """Runs ``modules`` in order, tapping output ``i`` as ``{prefix}.{i}`` (an ``nn.Sequential``)."""
  for i, layer in enumerate(modules):
    x = tap(f"{prefix}.{i}", layer(x))
  return x


class FeaturesClassifier(nnx.Module):
  """The forward pass torchvision's AlexNet and VGGs share: ``features`` (a Sequential),
  ``avgpool``, flatten in PyTorch's (C, H, W) order, ``classifier`` (a Sequential).

  Subclasses set ``self.arch``, ``self.features``, ``self.avgpool``, ``self.classifier`` and
  define ``tap_table() -> (layer names in forward order, aliases)``.
  """

  arch: str

  def tap_table(self) -> tuple[Sequence[str], Mapping[str, str]]:
    raise NotImplementedError

  def __call__(self, x: jax.Array, *, taps: tuple[str, ...] = (), upto: str | None = None
               ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """x: (N, H, W, 3) normalised float -> (logits (N, num_classes) or None if upto, {tap: activation})."""
    check_model_input(x, self.arch)
    tap = Tapper(self.arch, *self.tap_table(), taps, upto)
    try:
      x = run_sequential(tap, "features", self.features, x)
      x = flatten_chw(tap("avgpool", self.avgpool(x)))
      x = run_sequential(tap, "classifier", self.classifier, x)
    except StopForward:
      return None, tap.out
    return x, tap.out
