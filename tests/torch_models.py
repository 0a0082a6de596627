"""PyTorch reference models with torchvision's module names and state-dict keys (no torchvision).

Written from scratch with ``torch.nn`` to mirror ``torchvision.models`` AlexNet, VGG16/19 (configs D/E),
ResNet-18/50 (v1.5) and nemjax's SmallCNN, so their ``state_dict()`` is what a torchvision (or
Places365) checkpoint holds. ``randomize_`` gives every parameter and BatchNorm buffer non-trivial
values, so a converter that mixes up BN statistics, transposes or flatten order is caught.
"""
from __future__ import annotations

import torch
from torch import nn


class AlexNet(nn.Module):
  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.features = nn.Sequential(
      nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
      nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
      nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(
      nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
      nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


_CFGS = {
  "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
  "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
            512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
  def __init__(self, num_classes: int = 1000, cfg: str = "vgg16"):
    super().__init__()
    layers: list[nn.Module] = []
    c = 3
    for v in _CFGS[cfg]:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
        c = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
      nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
      nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.features = nn.Sequential(
      nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
      nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(128, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def build(arch: str, num_classes: int = 1000) -> nn.Module:
  """The PyTorch twin of ``nemjax.models.build(arch, num_classes)`` (eval mode)."""
  if arch == "alexnet":
    m = AlexNet(num_classes)
  elif arch in _CFGS:
    m = VGG(num_classes, arch)
  elif arch == "resnet18":
    m = ResNet(BasicBlock, [2, 2, 2, 2], num_classes)
  elif arch == "resnet50":
    m = ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
  elif arch == "smallcnn":
    m = SmallCNN(num_classes)
  else:
    raise ValueError(f"unknown arch {arch!r}")
  return m.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Give BatchNorm running mean/var, weight and bias non-trivial random values (in place).

  Conv / linear weights keep PyTorch's (random) default init. BN: weight ~ U(0.5, 1.5),
  bias ~ N(0, 0.2), running_mean ~ N(0, 0.2), running_var ~ U(0.5, 2.0); num_batches_tracked = 7.
  """
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      m.weight.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.copy_(torch.randn(n, generator=g) * 0.2)
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
      m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
      m.num_batches_tracked.fill_(7)
  return model


def forward_with_hooks(model: nn.Module, x_nchw: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """Logits and the outputs of the named modules (cloned: several ReLUs are in place).

  Hooks keep the last call of a module; every name here is called once per forward.
  """
  modules = dict(model.named_modules())
  out: dict[str, torch.Tensor] = {}
  handles = []
  for name in names:
    def hook(_m, _i, o, name=name):
      out[name] = o.detach().clone()
    handles.append(modules[name].register_forward_hook(hook))
  try:
    with torch.inference_mode():
      logits = model(x_nchw)
  finally:
    for h in handles:
      h.remove()
  return logits, out
