"""Assembling an experiment's model and data from paths (what ``experiments/manipulate.py``
and ``experiments/prune_defence.py`` take on the command line)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import preprocess
from nemjax.data import broden, loader, synthetic
from nemjax.manipulate import data as mdata
from nemjax.manipulate.checkpoints import fingerprint
from nemjax.manipulate.experiment import ExperimentInputs, ManipulateConfig, TrainBatches
from nemjax.models import checkpoint

__all__ = ["array_stream", "concept_groups", "load_inputs"]


def array_stream(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int
                 ) -> tuple[TrainBatches, int]:
  """A reproducible training stream over in-memory arrays.

  Returns:
    ``(batches(epoch), steps_per_epoch)``: epoch ``e`` is the permutation drawn by
    ``np.random.default_rng([seed, 0x7261696E, e])``, cut into full batches (the remainder is
    dropped).
  """
  n = int(np.shape(images)[0])
  if n < batch_size:
    raise ValueError(f"training set has {n} images, fewer than one batch of {batch_size}")
  steps = n // batch_size

  def batches(epoch: int):
    order = np.random.default_rng([int(seed), 0x7261696E, int(epoch)]).permutation(n)
    for s in range(steps):
      idx = np.sort(order[s * batch_size:(s + 1) * batch_size])
      yield images[idx], labels[idx]

  return batches, steps


def _normalizer(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "netdissect":
    return preprocess.netdissect_normalize
  if name == "imagenet":
    return lambda x: preprocess.imagenet_normalize(jnp.asarray(x, jnp.float32) / 255.0)
  raise ValueError(f"normalize must be 'netdissect' or 'imagenet', got {name!r}")


def concept_groups(probe: Any, concept: str) -> np.ndarray:
  """``(N,)`` int32 group ids: 1 where a probe image shows label ``concept`` (in a label map or
  as an image-level label), else 0."""
  numbers = np.flatnonzero(np.asarray(probe.label_names) == concept)
  if numbers.size == 0:
    names = sorted({str(n) for n in probe.label_names if n})
    raise ValueError(f"group concept {concept!r} is not a label of the probe set; labels "
                     f"include {names[:12]}")
  pixels, scalars = loader.load_labels(probe)
  hit = np.isin(pixels.reshape(pixels.shape[0], -1), numbers).any(1)
  hit |= np.isin(scalars, numbers).any(1)
  return hit.astype(np.int32)


def _resolve_class(spec: str, class_names: Sequence[str] | None) -> int:
  if class_names is not None and spec in class_names:
    return list(class_names).index(spec)
  if spec.isdigit():
    k = int(spec)
    if class_names is None or k < len(class_names):
      return k
  raise ValueError(f"decoy class {spec!r} is not one of the training classes "
                   f"{list(class_names or [])}")


def load_inputs(config: ManipulateConfig, *, probe_dir: str | os.PathLike,
                weights: str | os.PathLike, normalize: str = "netdissect",
                embedded_train_dir: str | os.PathLike | None = None,
                train_folder: str | os.PathLike | None = None, tfds_name: str | None = None,
                tfds_split: str = "train", tfds_dir: str | os.PathLike | None = None,
                decoy_class: str | None = None, decoy_folder: str | os.PathLike | None = None,
                num_decoys: int = 100, group_concept: str | None = None
                ) -> tuple[ExperimentInputs, dict]:
  """Assemble :class:`ExperimentInputs` from paths (what ``experiments/manipulate.py`` needs).

  * evaluation (ranking) images: every probe image; labels = the scene targets when the probe
    has a ``classes.json`` with as many classes as the model, else unlabelled (accuracy becomes
    agreement with the original model);
  * training stream: the embedded default's training set, ``train_folder``
    (:func:`nemjax.manipulate.data.image_folder_batches`), ``tfds_name``
    (:func:`nemjax.manipulate.data.tfds_batches`) or, by default, the probe images;
  * decoys (push-up): the first ``num_decoys`` training images of ``decoy_class`` or the first
    ``num_decoys`` images (sorted by path) of ``decoy_folder``;
  * groups (fairwash): probe images showing ``group_concept``.

  Returns:
    ``(inputs, run_info)``; ``run_info`` records the sources (stored in ``config.json``).
  """

  model = checkpoint.load(weights)
  probe = broden.load_probe(probe_dir)
  images = loader.load_images(probe)
  h, w = probe.image_size
  labels = np.full((images.shape[0],), -1, np.int32)
  class_names = None
  classes_path = Path(probe_dir) / "classes.json"
  if classes_path.is_file():
    names = list(json.loads(classes_path.read_text(encoding="utf-8"))["classes"])
    if len(names) == int(model.num_classes):
      labels = np.asarray(synthetic.scene_targets(probe, names), np.int32)
      class_names = names
  bs, seed = config.batch_size, config.seed
  stream_names = class_names
  train_arrays = None
  if embedded_train_dir is not None:
    xtr, ytr, stream_names = mdata.probe_classification_arrays(embedded_train_dir,
                                                               normalize=None)
    batches, steps = array_stream(xtr, ytr, bs, seed)
    train_arrays, source = (xtr, ytr), f"embedded training set {embedded_train_dir}"
  elif train_folder is not None:
    if h != w:
      raise ValueError(f"--train-folder needs square probe images, got {h}x{w}")
    paths, ylab, stream_names = mdata.list_image_folder(train_folder)
    steps = len(paths) // bs
    key = jax.random.fold_in(jax.random.key(seed), 0x7261696E)
    batches = lambda e: mdata.image_folder_batches(train_folder, bs, image_size=h,
                                                   key=jax.random.fold_in(key, e))
    source = f"image folder {train_folder}"
  elif tfds_name is not None:
    if h != w:
      raise ValueError(f"--tfds needs square probe images, got {h}x{w}")
    steps = mdata.tfds_num_examples(tfds_name, tfds_split, tfds_dir) // bs
    key = jax.random.fold_in(jax.random.key(seed), 0x7261696E)
    batches = lambda e: mdata.tfds_batches(tfds_name, tfds_split, tfds_dir, bs, image_size=h,
                                           key=jax.random.fold_in(key, e))
    stream_names, source = None, f"tfds {tfds_name}:{tfds_split}"
  else:
    batches, steps = array_stream(images, labels, bs, seed)
    train_arrays, source = (images, labels), "the probe images"
  if steps < 1:
    raise ValueError(f"the training stream ({source}) has fewer images than one batch of {bs}")

  decoys = None
  if config.attack == "push-up":
    if decoy_folder is not None:
      if h != w:
        raise ValueError(f"--decoy-folder needs square probe images, got {h}x{w}")
      decoys = mdata.load_image_files(mdata.list_images(decoy_folder)[:num_decoys], h)
    elif decoy_class is not None:
      if embedded_train_dir is None and train_folder is None and tfds_name is None:
        raise ValueError("--decoy-class takes decoys from the training stream; with the probe "
                         "as the stream use --decoy-folder (or give --train-folder / --tfds)")
      c = _resolve_class(str(decoy_class), stream_names)
      if train_arrays is not None:
        decoys = train_arrays[0][train_arrays[1] == c][:num_decoys]
      elif train_folder is not None:
        paths, ylab, _ = mdata.list_image_folder(train_folder)
        decoys = mdata.load_image_files([p for p, y in zip(paths, ylab) if y == c][:num_decoys],
                                        h)
      else:
        found = []
        for xb, yb in batches(0):
          found += list(xb[yb == c])
          if len(found) >= num_decoys:
            break
        decoys = np.asarray(found[:num_decoys], np.uint8)
      if len(decoys) == 0:
        raise ValueError(f"no training image of decoy class {decoy_class!r}")
    else:
      raise ValueError("push-up needs decoy_class or decoy_folder")

  groups = None
  if config.attack == "fairwash":
    if not group_concept:
      raise ValueError("fairwash needs a group concept")
    groups = concept_groups(probe, group_concept)

  inputs = ExperimentInputs(
      model=model, normalize=_normalizer(normalize), eval_images=images, eval_labels=labels,
      train_batches=batches, steps_per_epoch=steps, class_names=class_names,
      decoy_images=decoys, groups=groups, group_name=group_concept or "")
  run_info = {"probe": str(Path(probe_dir).resolve()), "weights": str(Path(weights).resolve()),
              "normalize": normalize, "train_stream": source,
              "decoys": None if decoys is None else
              f"{len(decoys)} images of {decoy_class if decoy_class is not None else decoy_folder}",
              "group_concept": group_concept,
              "accuracy": "scene labels" if class_names else "agreement with the original model"}
  run_info["data_fingerprint"] = fingerprint(run_info)
  return inputs, run_info
