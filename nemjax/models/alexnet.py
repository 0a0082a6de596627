"""torchvision AlexNet (``torchvision.models.alexnet``), NHWC, inference mode.

::

  features:   0 Conv(3,64,11,s4,p2) 1 ReLU 2 MaxPool(3,2)
              3 Conv(64,192,5,p2)   4 ReLU 5 MaxPool(3,2)
              6 Conv(192,384,3,p1)  7 ReLU
              8 Conv(384,256,3,p1)  9 ReLU
              10 Conv(256,256,3,p1) 11 ReLU 12 MaxPool(3,2)
  avgpool:    AdaptiveAvgPool(6, 6)
  classifier: 0 Dropout 1 Linear(9216,4096) 2 ReLU 3 Dropout 4 Linear(4096,4096) 5 ReLU 6 Linear(4096,C)

The pooled map is flattened in PyTorch's (C, H, W) order, so ``classifier.1`` takes torchvision's
weight transposed and the ``classifier.0`` tap equals PyTorch's. At 224 or 227 input (NetDissect
uses 227) conv1..conv5 are 55/27/13/13/13 (56 at 227 for conv1) and the pool output is 6x6.
Aliases: conv1..conv5 (pre-ReLU), relu1..relu5, pool1/pool2/pool5, fc6/fc7/fc8.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from flax import nnx

from nemjax.models import layers as L

ARCHS: tuple[str, ...] = ("alexnet",)

_CONV_IDX = (0, 3, 6, 8, 10)
LAYER_NAMES: dict[str, tuple[str, ...]] = {"alexnet": (
  tuple(f"features.{i}" for i in range(13)) + ("avgpool",)
  + tuple(f"classifier.{i}" for i in range(7)))}
ALIASES: dict[str, dict[str, str]] = {"alexnet": {
  **{f"conv{k + 1}": f"features.{i}" for k, i in enumerate(_CONV_IDX)},
  **{f"relu{k + 1}": f"features.{i + 1}" for k, i in enumerate(_CONV_IDX)},
  "pool1": "features.2", "pool2": "features.5", "pool5": "features.12",
  "fc6": "classifier.1", "relu6": "classifier.2", "fc7": "classifier.4", "relu7": "classifier.5",
  "fc8": "classifier.6",
}}


class Model(L.FeaturesClassifier):
  """torchvision AlexNet. Call: ``model(x, taps=(), upto=None) -> (logits, acts)``."""

  def __init__(self, arch: str = "alexnet", num_classes: int = 1000, *, rngs: nnx.Rngs):
    if arch not in ARCHS:
      raise ValueError(f"AlexNet: unknown arch {arch!r}; expected one of {list(ARCHS)}")
    self.arch = arch
    self.num_classes = num_classes
    self.features = nnx.List([
      L.Conv2d(3, 64, 11, 4, 2, rngs=rngs), L.ReLU(), L.MaxPool2d(3, 2),
      L.Conv2d(64, 192, 5, 1, 2, rngs=rngs), L.ReLU(), L.MaxPool2d(3, 2),
      L.Conv2d(192, 384, 3, 1, 1, rngs=rngs), L.ReLU(),
      L.Conv2d(384, 256, 3, 1, 1, rngs=rngs), L.ReLU(),
      L.Conv2d(256, 256, 3, 1, 1, rngs=rngs), L.ReLU(), L.MaxPool2d(3, 2),
    ])
    self.avgpool = L.AdaptiveAvgPool2d(6)
    self.classifier = nnx.List([
      L.Dropout(), L.Linear(256 * 6 * 6, 4096, rngs=rngs), L.ReLU(),
      L.Dropout(), L.Linear(4096, 4096, rngs=rngs), L.ReLU(),
      L.Linear(4096, num_classes, rngs=rngs),
    ])

  def tap_table(self) -> tuple[Sequence[str], Mapping[str, str]]:
    return LAYER_NAMES[self.arch], ALIASES[self.arch]
