"""torchvision-layout PyTorch state dicts -> nemjax Flax NNX models.

Key mapping (strict, after normalisation):

| Flax variable (path)                 | PyTorch key                    | transform                    |
|--------------------------------------|--------------------------------|------------------------------|
| ``.../kernel`` of a conv (kh,kw,I,O) | ``....weight`` (O,I,kh,kw)     | OIHW -> HWIO                 |
| ``.../kernel`` of a linear (I,O)     | ``....weight`` (O,I)           | transpose                    |
| ``.../bias``                         | ``....bias``                   | none                         |
| ``.../scale`` / ``mean`` / ``var``   | ``....weight`` / ``running_mean`` / ``running_var`` | none    |

Path elements join with ``.``, so ``('layer1', 0, 'downsample', 1, 'mean')`` is
``layer1.0.downsample.1.running_mean``. ``num_batches_tracked`` buffers are ignored. The AlexNet /
VGG models flatten their pooled map in PyTorch's (C, H, W) order, so the first classifier linear
needs no permutation.

Accepted key layouts: plain torchvision; any ``module.`` prefix (DataParallel, as in the Places365
``{'state_dict': ...}`` checkpoints); VGG-Places365 named layers (``features.conv1_1`` ..
``features.conv5_3`` (``conv5_4`` for VGG19), ``classifier.fc6`` / ``fc7`` / ``fc8a``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nemjax.models import registry, vgg

__all__ = ["load_state_dict", "normalize_keys", "convert_state_dict", "expected_keys",
           "mismatch_parts"]

# Final classifier weight of each arch: its first dimension is num_classes.
_FINAL = {"alexnet": "classifier.6.weight", "vgg16": "classifier.6.weight",
          "vgg19": "classifier.6.weight", "resnet18": "fc.weight",
          "resnet50": "fc.weight", "smallcnn": "fc.weight"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_VGG_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6", "fc8a": "classifier.6"}
_IGNORED_SUFFIX = "num_batches_tracked"


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _tensor_to_numpy(v: Any) -> np.ndarray:
  import torch
  t = v.detach().cpu()
  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.numpy()


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a state dict from ``.pth`` / ``.pth.tar`` / ``.pt`` (PyTorch), ``.npz`` or ``.safetensors``.

  PyTorch files are read with ``torch.load(..., weights_only=True)``; a ``{'state_dict': sd}`` (or
  ``{'model': sd}``) wrapper is unwrapped. Keys are returned as stored (``module.`` prefixes are
  removed later by :func:`normalize_keys`).

  Returns:
    name -> NumPy array (as stored; bfloat16/float16 tensors become float32).
  """
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"state dict file not found: {p}")
  if p.is_dir():
    raise ValueError(f"expected a state dict file (.pth, .pth.tar, .npz, .safetensors), got a directory: {p}")
  name = p.name.lower()
  if name.endswith(".npz"):
    try:
      with np.load(p, allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:
      raise ValueError(f"cannot read {p} as .npz: {_first_line(e)}") from e
  if name.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as err:
      raise ImportError("reading .safetensors needs the safetensors package: pip install 'nemjax[safetensors]'") from err
    try:
      return dict(load_file(str(p)))
    except Exception as e:
      raise ValueError(f"cannot read {p} as .safetensors: {_first_line(e)}") from e
  try:
    import torch
  except ImportError as err:
    raise ImportError(f"reading the PyTorch checkpoint {p} needs PyTorch: pip install 'nemjax[torch]' "
                      "(or convert it to .npz / .safetensors elsewhere)") from err
  try:
    obj = torch.load(p, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"cannot read {p} as a PyTorch state dict (torch.load with weights_only=True): {_first_line(e)}") from e
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{p} holds a {type(obj).__name__}, expected a state dict (a mapping of names to tensors)")
  out: dict[str, np.ndarray] = {}
  bad = []
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[str(k)] = _tensor_to_numpy(v)
    else:
      bad.append(str(k))
  if bad:
    raise ValueError(f"{p}: entries that are not tensors: {', '.join(bad)}")
  return out


def normalize_keys(arch: str, sd: Mapping[str, Any]) -> dict[str, Any]:
  """Strip ``module.`` prefixes and map VGG-Places365 named layers to torchvision indices."""
  out: dict[str, Any] = {}
  conv_idx = ({name: vgg.ALIASES[arch][name].split(".")[1] for name in vgg.CONV_NAMES[arch]}
              if arch in vgg.ARCHS else {})
  for key, v in sd.items():
    k = str(key)
    while k.startswith("module."):
      k = k[len("module."):]
    if arch in vgg.ARCHS:
      m = re.fullmatch(r"features\.(conv\d_\d)\.(\w+)", k)
      if m and m.group(1) in conv_idx:
        k = f"features.{conv_idx[m.group(1)]}.{m.group(2)}"
      m = re.fullmatch(r"classifier\.(fc\w+)\.(\w+)", k)
      if m and m.group(1) in _VGG_FC:
        k = f"{_VGG_FC[m.group(1)]}.{m.group(2)}"
    if k in out:
      raise ValueError(f"state dict key {key!r} maps to {k!r}, which is already present (duplicate after normalising keys)")
    out[k] = v
  return out


def mismatch_parts(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, Any]) -> list[str]:
  """What keeps ``sd`` from matching ``expected`` (name -> shape), one entry per kind of problem.

  Lists missing, unexpected and mis-shaped keys, non-floating tensors and tensors holding
  NaN / ±inf (named); an empty list means a strict match. Callers join the parts into one
  ValueError.
  """
  missing = [f"{k} {shape}" for k, shape in expected.items() if k not in sd]
  unexpected = [f"{k} {tuple(np.shape(sd[k]))}" for k in sd if k not in expected]
  misshaped, bad_dtype, non_finite = [], [], []
  for k, shape in expected.items():
    if k in sd:
      got = tuple(np.shape(sd[k]))
      arr = np.asarray(sd[k])
      if got != shape:
        misshaped.append(f"{k}: expected {shape}, got {got}")
      elif not np.issubdtype(arr.dtype, np.floating):
        bad_dtype.append(f"{k}: {arr.dtype}")
      elif not np.isfinite(arr).all():
        non_finite.append(f"{k}: {int(np.isnan(arr).sum())} NaN, {int(np.isinf(arr).sum())} inf")
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing [{', '.join(missing)}]")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected [{', '.join(unexpected)}]")
  if misshaped:
    parts.append(f"{len(misshaped)} mis-shaped [{'; '.join(misshaped)}]")
  if bad_dtype:
    parts.append(f"{len(bad_dtype)} not floating point [{'; '.join(bad_dtype)}]")
  if non_finite:
    parts.append(f"{len(non_finite)} holding NaN or inf [{'; '.join(non_finite)}]")
  return parts


def _torch_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path[:-1]) + "." + _LEAF[str(path[-1])]


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == "kernel" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if leaf == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return np.ascontiguousarray(np.transpose(arr, (2, 3, 1, 0)))
  if leaf == "kernel" and arr.ndim == 2:
    return np.ascontiguousarray(arr.T)
  return arr


def expected_keys(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys (without ``num_batches_tracked``) and shapes ``arch`` needs."""
  return {k: shape for k, (_, shape)
          in expected_torch_keys(registry.build_abstract(arch, num_classes)).items()}


def convert_state_dict(arch: str, sd: Mapping[str, Any], num_classes: int | None = None) -> nnx.Module:
  """Build a nemjax model holding the weights of a torchvision-layout state dict.

  Args:
    arch: one of ``nemjax.models.ARCHS``.
    sd: name -> array (NumPy, or anything ``np.asarray`` accepts, e.g. CPU torch tensors).
    num_classes: output classes; inferred from the final layer's weight when None.

  Returns:
    The model (float32 parameters, inference mode).

  Raises:
    ValueError: unknown arch, or keys missing / unexpected / of the wrong shape (all listed in one
      message with expected vs got shapes), non-float weights, or weights holding NaN/inf
      (each such tensor named with its counts).
  """
  if arch not in registry.ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(registry.ARCHS)}")
  if not isinstance(sd, Mapping):
    raise ValueError(f"convert_state_dict: expected a mapping of names to arrays, got {type(sd).__name__}")
  sd = normalize_keys(arch, sd)
  sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIX)}
  inferred_note = ""
  if num_classes is None:
    final = sd.get(_FINAL[arch])
    if final is not None and np.ndim(final) == 2:
      num_classes = int(np.shape(final)[0])
    else:
      num_classes = 1000
      inferred_note = f" (num_classes could not be inferred from {_FINAL[arch]!r}; assumed 1000)"
  abstract = registry.build_abstract(arch, num_classes)
  expected = expected_torch_keys(abstract)
  parts = mismatch_parts({k: shape for k, (_, shape) in expected.items()}, sd)
  if parts:
    missing = [k for k in expected if k not in sd]
    hint = ""
    if len(missing) > len(expected) // 2:
      hint = " (is the architecture right?)"
    raise ValueError(f"state dict does not match {arch} with {num_classes} classes{inferred_note}{hint}: "
                     + "; ".join(parts))
  return fill_from_torch(abstract, expected, sd)


def expected_torch_keys(abstract: nnx.Module, torch_name: Callable[[tuple[Any, ...]], str] | None = None
                        ) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
  """``{torch name: (NNX state path, torch shape)}`` of every array of ``abstract``; names are
  torchvision's unless ``torch_name`` maps a path otherwise."""
  name = torch_name or _torch_name
  return {name(tuple(path)): (tuple(path), _torch_shape(tuple(v.shape), str(path[-1])))
          for path, v in nnx.to_flat_state(nnx.state(abstract))}


def fill_from_torch(abstract: nnx.Module, expected: Mapping[str, tuple[tuple[Any, ...], Any]],
                    sd: Mapping[str, Any]) -> nnx.Module:
  """``abstract`` holding ``sd``'s tensors (checked to match ``expected`` first), in Flax layout."""
  torch_name = {path: k for k, (path, _) in expected.items()}
  return registry.fill(abstract, lambda path, shape: _to_flax(
      np.asarray(sd[torch_name[path]], dtype=np.float32), str(path[-1])))
