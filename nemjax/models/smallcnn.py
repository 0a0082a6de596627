"""SmallCNN: nemjax's embedded default model (4 conv blocks + global average pool + linear).

Trained by nemjax on its synthetic probe set; 224x224 input. torchvision-style layout::

  features: 0 Conv(3,16,3,s2,p1) 1 BN 2 ReLU 3 MaxPool(2)      -> 112 (block1), 56
            4 Conv(16,32,3,p1)   5 BN 6 ReLU 7 MaxPool(2)      -> 56 (block2), 28
            8 Conv(32,64,3,p1)   9 BN 10 ReLU 11 MaxPool(2)    -> 28 (block3), 14
            12 Conv(64,128,3,p1) 13 BN 14 ReLU                 -> 14 (block4)
  avgpool:  global average pool -> (N, 1, 1, 128)
  fc:       Linear(128, num_classes) on the flattened pool

Spatial sizes at 224 input: block1 112x112x16, block2 56x56x32, block3 28x28x64,
block4 14x14x128 (aliases for features.2 / .6 / .10 / .14).
"""
from __future__ import annotations

import jax
from flax import nnx

from nemjax.models import layers as L

ARCHS: tuple[str, ...] = ("smallcnn",)
WIDTHS = (16, 32, 64, 128)  # ~50 M MACs per 224 image: trains and attacks in minutes on a CPU

LAYER_NAMES: dict[str, tuple[str, ...]] = {
  "smallcnn": tuple(f"features.{i}" for i in range(15)) + ("avgpool", "fc")}
ALIASES: dict[str, dict[str, str]] = {"smallcnn": {
  "block1": "features.2", "block2": "features.6", "block3": "features.10", "block4": "features.14"}}


class Model(nnx.Module):
  """SmallCNN (see the module docstring). Call: ``model(x, taps=(), upto=None) -> (logits, acts)``."""

  def __init__(self, arch: str = "smallcnn", num_classes: int = 10, *, rngs: nnx.Rngs):
    if arch not in ARCHS:
      raise ValueError(f"SmallCNN: unknown arch {arch!r}; expected one of {list(ARCHS)}")
    self.arch = arch
    self.num_classes = num_classes
    feats: list[nnx.Module] = []
    c_in = 3
    for b, c in enumerate(WIDTHS):
      feats += [L.Conv2d(c_in, c, 3, 2 if b == 0 else 1, 1, rngs=rngs), L.BatchNorm2d(c), L.ReLU()]
      if b < len(WIDTHS) - 1:
        feats.append(L.MaxPool2d(2))
      c_in = c
    self.features = nnx.List(feats)
    self.avgpool = L.AdaptiveAvgPool2d(1)
    self.fc = L.Linear(WIDTHS[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, taps: tuple[str, ...] = (), upto: str | None = None
               ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """x: (N, H, W, 3) normalised float -> (logits (N, num_classes) or None if upto, {tap: activation})."""
    L.check_model_input(x, self.arch)
    tap = L.Tapper(self.arch, LAYER_NAMES[self.arch], ALIASES[self.arch], taps, upto)
    try:
      x = L.run_sequential(tap, "features", self.features, x)
      x = tap("avgpool", self.avgpool(x))
      logits = tap("fc", self.fc(x.reshape(x.shape[0], -1)))
    except L.StopForward:
      return None, tap.out
    return logits, tap.out
