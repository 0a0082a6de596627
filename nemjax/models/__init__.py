"""Flax NNX vision models with named layer taps: AlexNet, VGG16/19, ResNet-18/50, SmallCNN.

::

  from flax import nnx
  from nemjax import models
  model = models.build("resnet18", num_classes=365, rngs=nnx.Rngs(0))
  logits, acts = model(x, taps=("layer3", "layer4"))      # x (N, H, W, 3) float32, normalised
  apply_fn, state = models.pure_apply(model, taps=("layer4",), upto="layer4")
  _, acts = jax.jit(apply_fn)(state, x)                    # acts["layer4"]: (N, 7, 7, 512)

Architectures are exactly torchvision's (NHWC, inference-mode BatchNorm, dropout = identity);
layer names are torchvision module names (see ``layer_names``). Checkpoints: ``from
nemjax.models import checkpoint`` (orbax; imported on demand because orbax is slow to import).
"""
from nemjax.models.apply import activation_shapes, pure_apply
from nemjax.models.registry import ARCHS, build, build_abstract, canonical_layer, last_layer, layer_aliases, layer_names

__all__ = ["ARCHS", "activation_shapes", "build", "build_abstract", "canonical_layer", "last_layer", "layer_aliases", "layer_names", "pure_apply"]
