"""torchvision ResNet-18 / ResNet-50 (``torchvision.models.resnet18/50``, v1.5), NHWC, inference mode.

Stem ``conv1`` (7x7 s2 p3) ``bn1`` ``relu`` ``maxpool`` (3x3 s2 p1, -inf padding), then ``layer1``..
``layer4`` of BasicBlocks (ResNet-18: 2,2,2,2) or Bottlenecks (ResNet-50: 3,4,6,3), stride on the 3x3
conv, projection shortcut ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN); ``avgpool`` (global,
kept as (N, 1, 1, C)) and ``fc``. At 224 input layer1..layer4 are 56/28/14/7.

Layer names (forward = completion order, the order PyTorch forward hooks fire) include every block
``layerX.Y`` and, inside it, its ``conv*`` / ``bn*`` / ``downsample.0`` / ``downsample.1``:
``... maxpool, layer1.0.conv1, layer1.0.bn1, layer1.0.conv2, layer1.0.bn2, layer1.0, layer1.1.conv1, ...,
layer1.1, layer1, layer2.0.conv1, ...``. A block's ReLU is applied twice in torchvision and is not a
tap; ``layerX.Y.bnK`` is the pre-activation, ``layerX.Y`` the block output.
"""
from __future__ import annotations

import jax
from flax import nnx

from nemjax.models import layers as L

_DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
ARCHS: tuple[str, ...] = tuple(_DEPTHS)
_PLANES = (64, 128, 256, 512)


class BasicBlock(nnx.Module):
  """torchvision BasicBlock: conv3x3(stride)-bn-relu-conv3x3-bn + shortcut, relu."""

  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = L.Conv2d(in_planes, planes, 3, stride, 1, bias=False, rngs=rngs)
    self.bn1 = L.BatchNorm2d(planes)
    self.conv2 = L.Conv2d(planes, planes, 3, 1, 1, bias=False, rngs=rngs)
    self.bn2 = L.BatchNorm2d(planes)
    needs_proj = stride != 1 or in_planes != planes
    self.downsample = (nnx.List([L.Conv2d(in_planes, planes, 1, stride, 0, bias=False, rngs=rngs), L.BatchNorm2d(planes)])
                       if needs_proj else None)

  def __call__(self, x: jax.Array, tap: L.Tapper, prefix: str) -> jax.Array:
    """x: (N, H, W, in) -> (N, H/stride, W/stride, planes)."""
    out = tap(f"{prefix}.conv1", self.conv1(x))
    out = jax.nn.relu(tap(f"{prefix}.bn1", self.bn1(out)))
    out = tap(f"{prefix}.conv2", self.conv2(out))
    out = tap(f"{prefix}.bn2", self.bn2(out))
    if self.downsample is not None:
      x = tap(f"{prefix}.downsample.0", self.downsample[0](x))
      x = tap(f"{prefix}.downsample.1", self.downsample[1](x))
    return jax.nn.relu(out + x)


class Bottleneck(nnx.Module):
  """torchvision Bottleneck (v1.5): conv1x1-bn-relu-conv3x3(stride)-bn-relu-conv1x1-bn + shortcut, relu."""

  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    out_planes = planes * self.expansion
    self.conv1 = L.Conv2d(in_planes, planes, 1, 1, 0, bias=False, rngs=rngs)
    self.bn1 = L.BatchNorm2d(planes)
    self.conv2 = L.Conv2d(planes, planes, 3, stride, 1, bias=False, rngs=rngs)
    self.bn2 = L.BatchNorm2d(planes)
    self.conv3 = L.Conv2d(planes, out_planes, 1, 1, 0, bias=False, rngs=rngs)
    self.bn3 = L.BatchNorm2d(out_planes)
    needs_proj = stride != 1 or in_planes != out_planes
    self.downsample = (nnx.List([L.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False, rngs=rngs), L.BatchNorm2d(out_planes)])
                       if needs_proj else None)

  def __call__(self, x: jax.Array, tap: L.Tapper, prefix: str) -> jax.Array:
    """x: (N, H, W, in) -> (N, H/stride, W/stride, 4*planes)."""
    out = tap(f"{prefix}.conv1", self.conv1(x))
    out = jax.nn.relu(tap(f"{prefix}.bn1", self.bn1(out)))
    out = tap(f"{prefix}.conv2", self.conv2(out))
    out = jax.nn.relu(tap(f"{prefix}.bn2", self.bn2(out)))
    out = tap(f"{prefix}.conv3", self.conv3(out))
    out = tap(f"{prefix}.bn3", self.bn3(out))
    if self.downsample is not None:
      x = tap(f"{prefix}.downsample.0", self.downsample[0](x))
      x = tap(f"{prefix}.downsample.1", self.downsample[1](x))
    return jax.nn.relu(out + x)


def _layer_names(arch: str) -> tuple[str, ...]:
  kind, blocks = _DEPTHS[arch]
  inner = ("conv1", "bn1", "conv2", "bn2") if kind == "basic" else ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
  expansion = 1 if kind == "basic" else 4
  names = ["conv1", "bn1", "relu", "maxpool"]
  in_planes = 64
  for li, (n_blocks, planes) in enumerate(zip(blocks, _PLANES)):
    for b in range(n_blocks):
      stride = 2 if (li > 0 and b == 0) else 1
      prefix = f"layer{li + 1}.{b}"
      names += [f"{prefix}.{n}" for n in inner]
      if stride != 1 or in_planes != planes * expansion:
        names += [f"{prefix}.downsample.0", f"{prefix}.downsample.1"]
      names.append(prefix)
      in_planes = planes * expansion
    names.append(f"layer{li + 1}")
  names += ["avgpool", "fc"]
  return tuple(names)


LAYER_NAMES: dict[str, tuple[str, ...]] = {a: _layer_names(a) for a in _DEPTHS}
ALIASES: dict[str, dict[str, str]] = {a: {} for a in _DEPTHS}


class Model(nnx.Module):
  """torchvision ResNet-18 or ResNet-50. Call: ``model(x, taps=(), upto=None) -> (logits, acts)``."""

  def __init__(self, arch: str = "resnet18", num_classes: int = 1000, *, rngs: nnx.Rngs):
    if arch not in _DEPTHS:
      raise ValueError(f"ResNet: unknown arch {arch!r}; expected one of {sorted(_DEPTHS)}")
    self.arch = arch
    self.num_classes = num_classes
    kind, blocks = _DEPTHS[arch]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    self.conv1 = L.Conv2d(3, 64, 7, 2, 3, bias=False, rngs=rngs)
    self.bn1 = L.BatchNorm2d(64)
    self.relu = L.ReLU()
    self.maxpool = L.MaxPool2d(3, 2, 1)
    in_planes = 64
    for li, (n_blocks, planes) in enumerate(zip(blocks, _PLANES)):
      layer = []
      for b in range(n_blocks):
        stride = 2 if (li > 0 and b == 0) else 1
        layer.append(block_cls(in_planes, planes, stride, rngs=rngs))
        in_planes = planes * block_cls.expansion
      setattr(self, f"layer{li + 1}", nnx.List(layer))
    self.avgpool = L.AdaptiveAvgPool2d(1)
    self.fc = L.Linear(in_planes, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, taps: tuple[str, ...] = (), upto: str | None = None
               ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """x: (N, H, W, 3) normalised float -> (logits (N, num_classes) or None if upto, {tap: activation})."""
    L.check_model_input(x, self.arch)
    tap = L.Tapper(self.arch, LAYER_NAMES[self.arch], ALIASES[self.arch], taps, upto)
    try:
      x = tap("conv1", self.conv1(x))
      x = tap("bn1", self.bn1(x))
      x = tap("relu", self.relu(x))
      x = tap("maxpool", self.maxpool(x))
      for li, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
        for b, block in enumerate(layer):
          x = tap(f"layer{li + 1}.{b}", block(x, tap, f"layer{li + 1}.{b}"))
        x = tap(f"layer{li + 1}", x)
      x = tap("avgpool", self.avgpool(x))
      logits = tap("fc", self.fc(x.reshape(x.shape[0], -1)))
    except L.StopForward:
      return None, tap.out
    return logits, tap.out
