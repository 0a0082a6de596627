"""Resumable fine-tuning checkpoints: ``ROOT/last/{state/, meta.json}``.

The whole :class:`nemjax.manipulate.TrainState` (params, optimizer state, teacher, step) is saved
with orbax as a flat ``{"00000": leaf, ...}`` dict, next to a ``meta.json`` holding the step, the
run's fingerprint, the evaluation history and the α rule's state. Writes are atomic
(:func:`nemjax.files.replace_dir`): a kill at any moment leaves a complete checkpoint, and
:func:`find_checkpoint` also finds the previous one if the kill fell between the swap's renames.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nemjax import files
from nemjax.manipulate import train
from nemjax.models import checkpoint

__all__ = ["fingerprint", "save_checkpoint", "find_checkpoint", "read_checkpoint_meta",
           "restore_checkpoint"]

_META = "meta.json"
_LAST = "last"


def fingerprint(obj: Any) -> str:
  """16 hex digits identifying a JSON-serialisable configuration."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(ckpt_root: Path, state: train.TrainState, meta: dict) -> None:
  """Write ``ckpt_root/last`` atomically: a complete new directory, then a swap."""
  dest = Path(ckpt_root) / _LAST
  tmp = files.new_temp_dir(dest)
  try:
    checkpoint.save_arrays(tmp / "state",
                           {f"{i:05d}": l for i, l in enumerate(jax.tree.leaves(state))})
    (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
    files.replace_dir(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def find_checkpoint(ckpt_root: Path) -> Path | None:
  """``ckpt_root/last``, or the copy a kill in the middle of a swap left moved aside."""
  last = Path(ckpt_root) / _LAST
  if (last / _META).is_file():
    return last
  aside = files.moved_aside(last)
  return aside if aside is not None and (aside / _META).is_file() else None


def read_checkpoint_meta(ckpt_root: Path) -> dict | None:
  """The ``meta.json`` of the checkpoint under ``ckpt_root`` (``None`` if there is none)."""
  found = find_checkpoint(ckpt_root)
  return None if found is None else json.loads((found / _META).read_text())


def restore_checkpoint(ckpt_root: Path, template: train.TrainState
                       ) -> tuple[train.TrainState, dict]:
  """The saved train state, shaped like ``template``, and its ``meta.json``."""
  found = find_checkpoint(ckpt_root)
  if found is None:
    raise FileNotFoundError(f"no fine-tuning checkpoint under {ckpt_root}")
  leaves, treedef = jax.tree.flatten(template)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(l), l.dtype, sharding=sharding)
            for i, l in enumerate(leaves)}
  restored = checkpoint.restore_arrays(
      found / "state", target, what=f"the fine-tuning checkpoint {found}",
      remedy=f"delete {ckpt_root} to start the fine-tuning over")
  state = treedef.unflatten([restored[f"{i:05d}"] for i in range(len(leaves))])
  return state, json.loads((found / _META).read_text())
