"""nemjax: fast, exact JAX kernels for measuring how robust neuron explanations are.

Subpackages (import what you need; nothing heavy happens at import time):

- ``nemjax.models``   Flax NNX AlexNet / VGG16/19 / ResNet18/50 / SmallCNN with layer taps.
- ``nemjax.convert``  torchvision-layout PyTorch state dicts -> orbax checkpoints.
- ``nemjax.data``     Broden-format probe sets (reader, loader, synthetic generator).
- ``nemjax.dissect``  Network Dissection kernels and driver.
- ``nemjax.attacks``  probe-set corruption: noise and act-avg PGD.
"""

__version__ = "0.1.0"
