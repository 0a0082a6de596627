"""torchvision VGG16 / VGG19 (``torchvision.models.vgg16/vgg19``, configurations D / E, no batch
norm), NHWC.

::

  features:   13 (VGG16) or 16 (VGG19) Conv(3x3, p1) + ReLU, MaxPool(2) after each of 5 blocks;
              VGG16 indices 0..30: conv1_1 0, conv1_2 2, pool1 4, conv2_1 5, conv2_2 7, pool2 9,
              conv3_1 10, conv3_2 12, conv3_3 14, pool3 16, conv4_1 17, conv4_2 19, conv4_3 21,
              pool4 23, conv5_1 24, conv5_2 26, conv5_3 28, pool5 30   (reluX_Y = convX_Y + 1);
              VGG19 indices 0..36 (conv3_4 16, conv4_4 25, conv5_4 34, pool5 36)
  avgpool:    AdaptiveAvgPool(7, 7)
  classifier: 0 Linear(25088,4096) 1 ReLU 2 Dropout 3 Linear(4096,4096) 4 ReLU 5 Dropout 6 Linear(4096,C)

Aliases ``convX_Y`` name the conv output before its ReLU (what a NetDissect forward hook on the conv
module records), ``reluX_Y`` the ReLU output, ``poolX`` the max-pools and fc6/relu6/fc7/relu7/fc8 the
classifier. The pooled map is flattened in PyTorch's (C, H, W) order. At 224 input conv5_3 is 14x14.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from flax import nnx

from nemjax.models import layers as L

_CFGS: dict[str, tuple[int | str, ...]] = {
  "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
            512, 512, 512, "M"),  # configuration D
  "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
            512, 512, 512, 512, "M"),  # configuration E
}
ARCHS: tuple[str, ...] = tuple(_CFGS)


def _feature_aliases(cfg: Sequence[int | str]) -> dict[str, str]:
  aliases: dict[str, str] = {}
  idx, block, conv = 0, 1, 1
  for v in cfg:
    if v == "M":
      aliases[f"pool{block}"] = f"features.{idx}"
      idx, block, conv = idx + 1, block + 1, 1
    else:
      aliases[f"conv{block}_{conv}"] = f"features.{idx}"
      aliases[f"relu{block}_{conv}"] = f"features.{idx + 1}"
      idx, conv = idx + 2, conv + 1
  return aliases


def _layer_names(cfg: Sequence[int | str]) -> tuple[str, ...]:
  n_features = sum(1 if v == "M" else 2 for v in cfg)
  return (tuple(f"features.{i}" for i in range(n_features)) + ("avgpool",)
          + tuple(f"classifier.{i}" for i in range(7)))


LAYER_NAMES: dict[str, tuple[str, ...]] = {a: _layer_names(c) for a, c in _CFGS.items()}
ALIASES: dict[str, dict[str, str]] = {
  a: {**_feature_aliases(c), "fc6": "classifier.0", "relu6": "classifier.1",
      "fc7": "classifier.3", "relu7": "classifier.4", "fc8": "classifier.6"}
  for a, c in _CFGS.items()}
# The conv aliases in forward order (the Places365 named-layer converter maps them to indices).
CONV_NAMES: dict[str, tuple[str, ...]] = {
  a: tuple(n for n in al if n.startswith("conv")) for a, al in ALIASES.items()}


class Model(L.FeaturesClassifier):
  """torchvision VGG16 / VGG19. Call: ``model(x, taps=(), upto=None) -> (logits, acts)``."""

  def __init__(self, arch: str = "vgg16", num_classes: int = 1000, *, rngs: nnx.Rngs):
    if arch not in _CFGS:
      raise ValueError(f"VGG: unknown arch {arch!r}; expected one of {list(ARCHS)}")
    self.arch = arch
    self.num_classes = num_classes
    feats: list[nnx.Module] = []
    c_in = 3
    for v in _CFGS[arch]:
      if v == "M":
        feats.append(L.MaxPool2d(2, 2))
      else:
        feats += [L.Conv2d(c_in, v, 3, 1, 1, rngs=rngs), L.ReLU()]
        c_in = v
    self.features = nnx.List(feats)
    self.avgpool = L.AdaptiveAvgPool2d(7)
    self.classifier = nnx.List([
      L.Linear(512 * 7 * 7, 4096, rngs=rngs), L.ReLU(), L.Dropout(),
      L.Linear(4096, 4096, rngs=rngs), L.ReLU(), L.Dropout(),
      L.Linear(4096, num_classes, rngs=rngs),
    ])

  def tap_table(self) -> tuple[Sequence[str], Mapping[str, str]]:
    return LAYER_NAMES[self.arch], ALIASES[self.arch]
