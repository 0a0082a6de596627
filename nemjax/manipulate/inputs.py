"""Assembling an experiment's model and data from paths (what ``experiments/manipulate.py``
and ``experiments/prune_defence.py`` take on the command line): :func:`load_sources` reads a
config's :class:`~nemjax.manipulate.config.DataSources`, :func:`load_inputs` takes the paths."""
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
from nemjax.manipulate.config import ExperimentInputs, ManipulateConfig, TrainBatches
from nemjax.manipulate.evaluation import accuracy_kind, check_disjoint
from nemjax.models import checkpoint

__all__ = ["array_stream", "concept_groups", "load_inputs", "load_sources", "train_sample"]


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


def _heldout_from_probe_set(heldout_dir: str | os.PathLike, num_classes: int
                            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Labelled images of a Broden-format held-out set with ``classes.json`` (the embedded
  default's): rows without a scene label are dropped."""
  images, labels, names = mdata.probe_classification_arrays(heldout_dir, normalize=None)
  if len(names) != num_classes:
    raise ValueError(f"held-out set {heldout_dir} has {len(names)} classes, the model "
                     f"{num_classes} outputs")
  if len(labels) == 0:
    raise ValueError(f"held-out set {heldout_dir} has no image with a scene label")
  return images, labels, names


def _subsample(n: int, size: int | None, seed: int, stream: int) -> np.ndarray:
  """Sorted rows of a fixed random subset of ``size`` of ``n`` (all rows if ``size`` is None or
  at least ``n``)."""
  if size is None or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng([int(seed), stream]).choice(n, size, replace=False))


def _inside(a: Path, b: Path) -> bool:
  a, b = a.resolve(), b.resolve()
  return a == b or b in a.parents


def train_sample(batches: TrainBatches, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``size`` images (and labels) of epoch 0 of a training stream: the fixed sample
  whose accuracy is reported as the train accuracy."""
  if size < 1:
    raise ValueError(f"train_sample: size must be >= 1, got {size}")
  xs, ys, got = [], [], 0
  for x, y in batches(0):
    xs.append(np.asarray(x))
    ys.append(np.asarray(y, np.int32))
    got += len(xs[-1])
    if got >= size:
      break
  if not xs:
    raise ValueError("train_sample: the training stream yielded no batch")
  return np.concatenate(xs)[:size], np.concatenate(ys)[:size]


def load_inputs(config: ManipulateConfig, *, probe_dir: str | os.PathLike,
                weights: str | os.PathLike, normalize: str = "netdissect",
                embedded_train_dir: str | os.PathLike | None = None,
                heldout_dir: str | os.PathLike | None = None,
                train_folder: str | os.PathLike | None = None,
                val_folder: str | os.PathLike | None = None, val_unlabelled: bool = False,
                val_size: int | None = None, train_eval_size: int = 200,
                decoy_class: str | None = None, decoy_folder: str | os.PathLike | None = None,
                num_decoys: int = 100, group_concept: str | None = None
                ) -> tuple[ExperimentInputs, dict]:
  """Assemble :class:`ExperimentInputs` from paths (what ``experiments/manipulate.py`` needs).

  * probe (ranking) images: every probe image; their labels (scene targets when the probe has
    a ``classes.json`` with as many classes as the model) only caption the figures;
  * held-out images (accuracy, the α rule), exactly one source:

    - ``heldout_dir``: a Broden-format set with ``classes.json`` (the embedded default's
      ``heldout/``), labelled by its scene targets;
    - ``val_folder``: a class-per-subfolder tree whose sorted sub-directory names are the
      model's classes (as torchvision's ``ImageFolder`` orders them), or, with
      ``val_unlabelled=True``, any images under it, scored as top-1 *agreement* with the
      original model (the report says so); ``val_size`` keeps a fixed random subset;

    a run without one is refused: accuracy on images the fine-tune or the rankings saw would
    say nothing about the model;
  * training stream: the embedded default's training set, ``train_folder`` (needs
    ``val_folder``; same class sub-directories unless ``val_unlabelled``) or, by default, the
    probe images; its first ``train_eval_size`` images of epoch 0 give the train accuracy;
  * decoys (push-up): the first ``num_decoys`` training images of ``decoy_class`` or the first
    ``num_decoys`` images (sorted by path) of ``decoy_folder``;
  * groups (fairwash): probe images showing ``group_concept``.

  The held-out images are checked to share no image (pixel fingerprints) with the probe, the
  decoys and the training set (in-memory streams) or training sample (image folders, which
  must also not contain one another).

  Returns:
    ``(inputs, run_info)``; ``run_info`` records the sources (stored in ``config.json``).
  """
  if (heldout_dir is None) == (val_folder is None):
    raise ValueError("give exactly one held-out source: heldout_dir (the embedded default's "
                     "held-out set) or val_folder (--val-folder); accuracy is only measured on "
                     "images that no fine-tuning step, distillation batch or ranking sees")
  if train_folder is not None and val_folder is None:
    raise ValueError("--train-folder needs --val-folder (held-out images, same class "
                     "sub-directories)")
  if val_unlabelled and val_folder is None:
    raise ValueError("val_unlabelled applies to val_folder only")
  model = checkpoint.load(weights)
  num_classes = int(model.num_classes)
  probe = broden.load_probe(probe_dir)
  images = loader.load_images(probe)
  h, w = probe.image_size
  labels = np.full((images.shape[0],), -1, np.int32)
  class_names = None
  classes_path = Path(probe_dir) / "classes.json"
  if classes_path.is_file():
    names = list(json.loads(classes_path.read_text(encoding="utf-8"))["classes"])
    if len(names) == num_classes:
      labels = np.asarray(synthetic.scene_targets(probe, names), np.int32)
      class_names = names

  # ---- held-out images
  if heldout_dir is not None:
    held_x, held_y, held_names = _heldout_from_probe_set(heldout_dir, num_classes)
    rows = _subsample(len(held_y), val_size, config.seed, 0x68656C64)
    held_x, held_y = held_x[rows], held_y[rows]
    class_names = class_names or held_names
    held_source = f"Broden-format set {heldout_dir}"
  else:
    if h != w:
      raise ValueError(f"--val-folder needs square probe images, got {h}x{w}")
    if val_unlabelled:
      paths = mdata.list_images(val_folder)
      ylab = np.full((len(paths),), -1, np.int32)
      held_names = None
      held_source = f"image folder {val_folder}, unlabelled"
    else:
      paths, ylab, val_names = mdata.list_image_folder(val_folder)
      if len(val_names) != num_classes:
        raise ValueError(f"--val-folder {val_folder} has {len(val_names)} class "
                         f"sub-directories, the model {num_classes} outputs; use the model's "
                         "classes (sorted names = class order) or --val-unlabelled to report "
                         "agreement with the original model instead of accuracy")
      class_names = class_names or val_names
      held_names = val_names
      held_source = f"image folder {val_folder}"
    rows = _subsample(len(paths), val_size, config.seed, 0x68656C64)
    held_x = mdata.load_image_files([paths[i] for i in rows], h)
    held_y = ylab[rows]

  # ---- training stream
  bs, seed = config.batch_size, config.seed
  stream_names = class_names
  stream_labelled = True
  train_arrays = None
  if embedded_train_dir is not None:
    xtr, ytr, stream_names = mdata.probe_classification_arrays(embedded_train_dir,
                                                               normalize=None)
    batches, steps = array_stream(xtr, ytr, bs, seed)
    train_arrays, source = (xtr, ytr), f"embedded training set {embedded_train_dir}"
  elif train_folder is not None:
    if h != w:
      raise ValueError(f"--train-folder needs square probe images, got {h}x{w}")
    if _inside(Path(train_folder), Path(val_folder)) or _inside(Path(val_folder),
                                                                Path(train_folder)):
      raise ValueError(f"--val-folder {val_folder} and --train-folder {train_folder} overlap; "
                       "held-out images must not be in the training stream")
    paths, ylab, stream_names = mdata.list_image_folder(train_folder)
    if not val_unlabelled and stream_names != held_names:
      raise ValueError(f"--train-folder classes {stream_names[:8]} differ from --val-folder "
                       f"classes {held_names[:8]}")
    stream_labelled = not val_unlabelled
    steps = len(paths) // bs
    key = jax.random.fold_in(jax.random.key(seed), 0x7261696E)
    batches = lambda e: mdata.image_folder_batches(train_folder, bs, image_size=h,
                                                   key=jax.random.fold_in(key, e))
    source = f"image folder {train_folder}"
  else:
    batches, steps = array_stream(images, labels, bs, seed)
    train_arrays, source = (images, labels), "the probe images"
  if steps < 1:
    raise ValueError(f"the training stream ({source}) has fewer images than one batch of {bs}")
  tr_x, tr_y = train_sample(batches, train_eval_size)
  if not stream_labelled:
    tr_y = np.full_like(tr_y, -1)
  check_disjoint(held_x, {"probe images": images,
                          "training-stream images": tr_x if train_arrays is None
                          else train_arrays[0]})

  decoys = None
  if config.attack == "push-up":
    if decoy_folder is not None:
      if h != w:
        raise ValueError(f"--decoy-folder needs square probe images, got {h}x{w}")
      decoys = mdata.load_image_files(mdata.list_images(decoy_folder)[:num_decoys], h)
    elif decoy_class is not None:
      if embedded_train_dir is None and train_folder is None:
        raise ValueError("--decoy-class takes decoys from the training stream; with the probe "
                         "as the stream use --decoy-folder (or give --train-folder)")
      c = _resolve_class(str(decoy_class), stream_names)
      if train_arrays is not None:
        decoys = train_arrays[0][train_arrays[1] == c][:num_decoys]
      else:
        paths, ylab, _ = mdata.list_image_folder(train_folder)
        decoys = mdata.load_image_files([p for p, y in zip(paths, ylab) if y == c][:num_decoys],
                                        h)
      if len(decoys) == 0:
        raise ValueError(f"no training image of decoy class {decoy_class!r}")
    else:
      raise ValueError("push-up needs decoy_class or decoy_folder")
    check_disjoint(held_x, {"decoy images": decoys})

  groups = None
  if config.attack == "fairwash":
    if not group_concept:
      raise ValueError("fairwash needs a group concept")
    groups = concept_groups(probe, group_concept)

  inputs = ExperimentInputs(
      model=model, normalize=_normalizer(normalize), probe_images=images, probe_labels=labels,
      heldout_images=held_x, heldout_labels=np.asarray(held_y, np.int32),
      train_eval_images=tr_x, train_eval_labels=np.asarray(tr_y, np.int32),
      train_batches=batches, steps_per_epoch=steps, class_names=class_names,
      decoy_images=decoys, groups=groups, group_name=group_concept or "",
      heldout_source=held_source)
  run_info = {"probe": str(Path(probe_dir).resolve()), "weights": str(Path(weights).resolve()),
              "normalize": normalize, "train_stream": source, "heldout": held_source,
              "num_heldout_images": int(len(held_x)), "val_size": val_size,
              "train_eval_size": int(train_eval_size),
              "decoys": None if decoys is None else
              f"{len(decoys)} images of {decoy_class if decoy_class is not None else decoy_folder}",
              "group_concept": group_concept,
              "heldout_accuracy": accuracy_kind(held_y),
              "train_accuracy": accuracy_kind(tr_y)}
  run_info["data_fingerprint"] = fingerprint(run_info)
  return inputs, run_info


def load_sources(config: ManipulateConfig, default: Any = None) -> tuple[ExperimentInputs, dict]:
  """:func:`load_inputs` for ``config.data``: the embedded default's sets (``default``, a built
  ``nemjax.embedded.EmbeddedDefault``: ``probe_dir``, ``checkpoint_dir``, ``train_dir``,
  ``heldout_dir``) when ``config.data`` names no probe set, else its paths."""
  d = config.data
  extra = dict(train_eval_size=d.train_eval_size, decoy_class=d.decoy_class,
               decoy_folder=d.decoy_folder, num_decoys=d.num_decoys,
               group_concept=d.group_concept)
  if d.embedded:
    if default is None:
      raise ValueError("the embedded default must be built first (nemjax.embedded)")
    return load_inputs(config, probe_dir=default.probe_dir, weights=default.checkpoint_dir,
                       embedded_train_dir=default.train_dir, heldout_dir=default.heldout_dir,
                       **extra)
  return load_inputs(config, probe_dir=d.probe, weights=d.weights, normalize=d.normalize,
                     train_folder=d.train_folder, val_folder=d.val_folder,
                     val_unlabelled=d.val_unlabelled, val_size=d.val_size, **extra)
