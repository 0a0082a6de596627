"""CLIP state dicts (OpenAI / OpenCLIP ViT layout) -> :class:`nemjax.models.clip_vit.CLIPVisionTransformer`.

::

  from nemjax.convert import clip as cclip
  model = cclip.load_clip_vision("ViT-B-32.pt")     # OpenAI JIT archive, state dict or safetensors
  model = cclip.convert_clip_state_dict(sd)         # name -> array; config read from the shapes

Key mapping (strict; ``visual.`` prefix, ``module.`` prefixes removed first):

| PyTorch key (``visual.`` + …)                        | Flax variable                   | transform   |
|------------------------------------------------------|---------------------------------|-------------|
| ``conv1.weight`` (W, 3, p, p)                        | ``conv1/kernel`` (p, p, 3, W)   | OIHW → HWIO |
| ``class_embedding`` (W,), ``positional_embedding`` (g²+1, W), ``proj`` (W, D) | same name | none |
| ``ln_pre`` / ``ln_post`` / ``….ln_1`` / ``….ln_2`` ``.weight`` / ``.bias`` | ``scale`` / ``bias`` | none |
| ``transformer.resblocks.{i}.attn.in_proj_weight`` / ``in_proj_bias`` | same name (PyTorch layout) | none |
| ``….attn.out_proj`` / ``….mlp.c_fc`` / ``….mlp.c_proj`` ``.weight`` (O, I) | ``kernel`` (I, O) | transpose |

Config inference (as OpenAI's ``clip.model.build_model``): width and patch from
``conv1.weight``, layers = number of ``in_proj_weight`` keys, grid from the positional
embedding (image size = patch · grid), embed dim from ``proj``, heads = width // 64. A full CLIP
state dict also holds the text tower (keys outside ``visual.``), which is not used and ignored;
every ``visual.*`` key must map, and anything missing, extra, mis-shaped, non-float or holding
NaN/inf is listed in one ValueError.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nemjax.convert.state_dict import (_first_line, _tensor_to_numpy, expected_torch_keys,
                                       fill_from_torch, load_state_dict, mismatch_parts)
from nemjax.models import clip_vit

__all__ = ["clip_config_from_state_dict", "convert_clip_state_dict", "load_clip_state_dict",
           "load_clip_vision"]

_PREFIX = "visual."
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a CLIP checkpoint: a state dict (``.pt`` / ``.pth`` / ``.npz`` / ``.safetensors``) or
  an OpenAI TorchScript archive (``clip.load``'s ``ViT-B-32.pt``, read with ``torch.jit.load``).

  Returns:
    name -> NumPy array (float16 / bfloat16 tensors become float32).
  """
  p = Path(path)
  if not (p.is_file() and _is_torchscript(p)):
    return load_state_dict(p)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"reading the TorchScript archive {p} needs PyTorch: pip install "
                      "'nemjax[torch]'") from None
  try:
    sd = torch.jit.load(str(p), map_location="cpu").state_dict()
  except Exception as e:  # noqa: BLE001 - any reader failure is reported as one line
    raise ValueError(f"cannot read {p} as a TorchScript archive: {_first_line(e)}") from None
  return {str(k): _tensor_to_numpy(v) for k, v in sd.items()}


def _is_torchscript(p: Path) -> bool:
  try:
    with zipfile.ZipFile(p) as z:
      return any(re.search(r"(^|/)(code|constants\.pkl)(/|$)", n) for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def _visual(sd: Mapping[str, Any]) -> dict[str, Any]:
  """The ``visual.*`` entries without that prefix (``module.`` prefixes dropped first); a state
  dict of the image tower alone (``model.visual.state_dict()``, no prefix) is taken whole."""
  out = {}
  for key, v in sd.items():
    k = str(key)
    while k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  if any(k.startswith(_PREFIX) for k in out) or "conv1.weight" not in out:
    return {k[len(_PREFIX):]: v for k, v in out.items() if k.startswith(_PREFIX)}
  return out


def clip_config_from_state_dict(sd: Mapping[str, Any], act: str = "quick_gelu"
                                ) -> clip_vit.CLIPVisionConfig:
  """The :class:`CLIPVisionConfig` a CLIP state dict describes (read from its tensor shapes)."""
  v = _visual(sd)
  need = ("conv1.weight", "positional_embedding", "proj")
  absent = [_PREFIX + k for k in need if k not in v]
  if absent:
    hint = " (a ResNet CLIP? only ViT image towers are supported)" if "attnpool" in str(
        list(v)) else ""
    raise ValueError(f"not a CLIP ViT state dict: no {', '.join(absent)}{hint}")
  conv, pos, proj = (np.shape(v[k]) for k in need)
  if len(conv) != 4 or len(pos) != 2 or len(proj) != 2:
    raise ValueError(f"not a CLIP ViT state dict: {_PREFIX}conv1.weight {conv}, "
                     f"{_PREFIX}positional_embedding {pos}, {_PREFIX}proj {proj}")
  width, patch = int(conv[0]), int(conv[-1])
  grid = int(round((pos[0] - 1) ** 0.5))
  layers = len([k for k in v if re.fullmatch(r"transformer\.resblocks\.\d+\.attn\.in_proj_weight",
                                             k)])
  return clip_vit.CLIPVisionConfig(image_size=patch * grid, patch_size=patch, width=width,
                                   layers=layers, heads=max(1, width // 64),
                                   embed_dim=int(proj[1]), act=act)


def _torch_name(path: tuple[Any, ...]) -> str:
  leaf = str(path[-1])
  return _PREFIX + ".".join(str(p) for p in path[:-1] + (_LEAF.get(leaf, leaf),))


def convert_clip_state_dict(sd: Mapping[str, Any], act: str = "quick_gelu", *,
                            config: clip_vit.CLIPVisionConfig | None = None
                            ) -> clip_vit.CLIPVisionTransformer:
  """The CLIP image tower holding a state dict's ``visual.*`` weights (strict).

  Args:
    sd: name -> array (the whole CLIP state dict, or only its ``visual.*`` part).
    act: MLP activation, ``"quick_gelu"`` (OpenAI weights) or ``"gelu"`` (OpenCLIP models
      trained without ``-quickgelu``); not recorded in the weights.
    config: expected shape; inferred from ``sd`` when None.

  Returns:
    The model, float32 parameters.

  Raises:
    ValueError: every problem listed in one message (see the module docstring).
  """
  if not isinstance(sd, Mapping):
    raise ValueError(f"convert_clip_state_dict: expected a mapping of names to arrays, got "
                     f"{type(sd).__name__}")
  cfg = config if config is not None else clip_config_from_state_dict(sd, act)
  cfg.validate()
  abstract = nnx.eval_shape(lambda: clip_vit.CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0)))
  expected = expected_torch_keys(abstract, _torch_name)
  visual = {_PREFIX + k: v for k, v in _visual(sd).items()}
  parts = mismatch_parts({k: shape for k, (_, shape) in expected.items()}, visual)
  if parts:
    raise ValueError(f"CLIP state dict does not match a ViT with {cfg} (read from its shapes): "
                     + "; ".join(parts))
  return fill_from_torch(abstract, expected, visual)


def load_clip_vision(path: str | os.PathLike, act: str = "quick_gelu"
                     ) -> clip_vit.CLIPVisionTransformer:
  """:func:`load_clip_state_dict` then :func:`convert_clip_state_dict`."""
  return convert_clip_state_dict(load_clip_state_dict(path), act)
