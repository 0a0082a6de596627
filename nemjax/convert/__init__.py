"""PyTorch (torchvision-layout) state dicts -> nemjax models and orbax checkpoints.

::

  from nemjax import convert
  sd = convert.load_state_dict("resnet18_places365.pth.tar")   # .pth / .pth.tar / .npz / .safetensors
  model = convert.convert_state_dict("resnet18", sd)            # num_classes inferred (365)
  convert.convert_file("resnet18", "resnet18_places365.pth.tar", "ckpt/resnet18_places365")

or from the shell: ``python -m nemjax.convert --arch resnet18 --num-classes 365 IN OUT_DIR``.
Conversion is strict: missing, unexpected or mis-shaped keys are all listed in one ValueError.
"""
from __future__ import annotations

import os
from pathlib import Path

from nemjax.convert.state_dict import convert_state_dict, expected_keys, load_state_dict, normalize_keys

__all__ = ["convert_file", "convert_state_dict", "expected_keys", "load_state_dict", "normalize_keys"]


def convert_file(arch: str, in_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 num_classes: int | None = None, overwrite: bool = False) -> Path:
  """Convert a state-dict file into a nemjax checkpoint directory (written atomically).

  Args:
    arch: one of ``nemjax.models.ARCHS``.
    in_path: ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.npz`` / ``.safetensors`` state dict.
    out_dir: checkpoint directory to create (must not exist unless ``overwrite``).
    num_classes: expected output classes (checked); inferred when None.
    overwrite: replace an existing ``out_dir``.

  Returns:
    The absolute checkpoint path; load it with ``nemjax.models.checkpoint.load``.
  """
  from nemjax.models import checkpoint
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:  # fail before the (slow) read
    raise FileExistsError(f"output directory already exists: {out} (use --overwrite / overwrite=True)")
  sd = load_state_dict(in_path)
  model = convert_state_dict(arch, sd, num_classes)
  return checkpoint.save(model, out, arch=arch, num_classes=model.num_classes, overwrite=overwrite,
                         extra_meta={"converted_from": str(Path(in_path).absolute())})
