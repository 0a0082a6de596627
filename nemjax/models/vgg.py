"""torchvision VGG16 (``torchvision.models.vgg16``, configuration D, no batch norm), NHWC.

::

  features:   13 Conv(3x3, p1) + ReLU, MaxPool(2) after each block; indices 0..30
              conv1_1 0, conv1_2 2, pool1 4, conv2_1 5, conv2_2 7, pool2 9,
              conv3_1 10, conv3_2 12, conv3_3 14, pool3 16, conv4_1 17, conv4_2 19, conv4_3 21, pool4 23,
              conv5_1 24, conv5_2 26, conv5_3 28, pool5 30   (reluX_Y = convX_Y + 1)
  avgpool:    AdaptiveAvgPool(7, 7)
  classifier: 0 Linear(25088,4096) 1 ReLU 2 Dropout 3 Linear(4096,4096) 4 ReLU 5 Dropout 6 Linear(4096,C)

Aliases ``convX_Y`` name the conv output before its ReLU (what a NetDissect forward hook on the conv
module records), ``reluX_Y`` the ReLU output, ``poolX`` the max-pools and fc6/relu6/fc7/relu7/fc8 the
classifier. The pooled map is flattened in PyTorch's (C, H, W) order. At 224 input conv5_3 is 14x14.
"""
from __future__ import annotations

import jax
from flax import nnx

from nemjax.models import layers as L

ARCH = "vgg16"
_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _feature_aliases() -> dict[str, str]:
  aliases: dict[str, str] = {}
  idx, block, conv = 0, 1, 1
  for v in _CFG_D:
    if v == "M":
      aliases[f"pool{block}"] = f"features.{idx}"
      idx, block, conv = idx + 1, block + 1, 1
    else:
      aliases[f"conv{block}_{conv}"] = f"features.{idx}"
      aliases[f"relu{block}_{conv}"] = f"features.{idx + 1}"
      idx, conv = idx + 2, conv + 1
  return aliases


N_FEATURES = sum(1 if v == "M" else 2 for v in _CFG_D)  # 31
LAYER_NAMES: tuple[str, ...] = (tuple(f"features.{i}" for i in range(N_FEATURES)) + ("avgpool",)
                                + tuple(f"classifier.{i}" for i in range(7)))
ALIASES: dict[str, str] = {
  **_feature_aliases(),
  "fc6": "classifier.0", "relu6": "classifier.1", "fc7": "classifier.3", "relu7": "classifier.4",
  "fc8": "classifier.6",
}
# features index of every conv, in order (used by the Places365 named-layer converter).
CONV_NAMES: tuple[str, ...] = tuple(a for a in ALIASES if a.startswith("conv"))


class VGG16(nnx.Module):
  """torchvision VGG16. Call: ``model(x, taps=(), upto=None) -> (logits, acts)``."""

  arch = ARCH

  def __init__(self, num_classes: int = 1000, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    feats: list[nnx.Module] = []
    c_in = 3
    for v in _CFG_D:
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

  def __call__(self, x: jax.Array, *, taps: tuple[str, ...] = (), upto: str | None = None
               ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """x: (N, H, W, 3) normalised float -> (logits (N, num_classes) or None if upto, {tap: activation})."""
    L.check_model_input(x, ARCH)
    tap = L.Tapper(ARCH, LAYER_NAMES, ALIASES, taps, upto)
    try:
      for i, layer in enumerate(self.features):
        x = tap(f"features.{i}", layer(x))
      x = L.flatten_chw(tap("avgpool", self.avgpool(x)))
      for i, layer in enumerate(self.classifier):
        x = tap(f"classifier.{i}", layer(x))
    except L.StopForward:
      return None, tap.out
    return x, tap.out
