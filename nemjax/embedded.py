"""The embedded default: a synthetic Broden-format probe set and a SmallCNN trained on it.

Everything runs offline. Artefacts are cached in an explicit directory chosen by the caller
(``experiments/`` scripts use ``./cache/embedded``), one sub-directory per seed, so a second
run with the same seed skips generation and training and another seed never reuses them::

    default = build_embedded_default(Path("cache/embedded"), seed=0)
    model = nemjax.models.checkpoint.load(default.checkpoint_dir)

Layout of the cache directory::

    seed<S>/spec.json  what the artefacts were built with (seed, sizes, training settings);
                       a call with other settings is refused rather than silently served
    seed<S>/probe/     synthetic probe set (Broden format) that is dissected and attacked
    seed<S>/train/     a second synthetic set (seed S + 1000) the classifier is trained on
    seed<S>/heldout/   a third synthetic set (seed S + 2000) that no training, fine-tuning,
                       distillation or top-k reference ever sees: every accuracy is measured here
    seed<S>/smallcnn/  orbax checkpoint + metadata.json (train/probe/held-out scene accuracy)

Training. The SmallCNN learns the scene (cross-entropy), and, on the training set only, a
1x1 linear head on block4 predicts per 14x14 cell which objects, parts and materials cover it
(:mod:`nemjax.training.concepts`, positives and negatives weighted equally per concept, weight
``concept_weight``). Scene labels alone leave block3/block4 with colour units of IoU ~0.02
(none above NetDissect's 0.04 bar); the head makes block4 encode where objects, parts and
materials are, and many single units become detectors of them. The head is dropped after
training: the checkpoint is a plain SmallCNN, dissected blind to it on the probe set (a
different seed from the training set). ``tools/embedded_units.py`` prints the units' IoUs.

Before building anything, :func:`cache_paths` gives the paths and :func:`abstract_model` a
shape-only model (``jax.ShapeDtypeStruct`` leaves), enough to check layer names and unit
ranges without training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import files, preprocess
from nemjax.data import broden, loader, synthetic
from nemjax.models import activation_shapes, build, checkpoint, registry
from nemjax.training import ConceptTask, concept_targets, evaluate_accuracy, fit_classifier

ARCH = "smallcnn"
LAYERS = ("block3", "block4")
IMAGE_SIZE = 224      # side of the synthetic images (pixels)
NUM_SCENES = 4        # scene classes of the synthetic sets = the classifier's outputs
# Training-only concept heads: layer -> the pixel categories its 1x1 head predicts per cell
# (see nemjax.training.concepts). They are dropped after training; the checkpoint is a plain
# SmallCNN.
CONCEPT_HEADS: dict[str, tuple[str, ...]] = {"block4": ("object", "part", "material")}


@dataclasses.dataclass(frozen=True)
class EmbeddedPaths:
  """Where the embedded default of one seed lives (nothing need exist yet)."""
  root: Path            # <cache>/seed<S>
  probe_dir: Path
  train_dir: Path
  heldout_dir: Path
  checkpoint_dir: Path


def cache_paths(cache_dir: Path, seed: int = 0) -> EmbeddedPaths:
  """The paths :func:`build_embedded_default` uses for ``seed``; builds nothing."""
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"embedded default: seed must be an int >= 0, got {seed!r}")
  root = Path(cache_dir) / f"seed{seed}"
  return EmbeddedPaths(root, root / "probe", root / "train", root / "heldout", root / ARCH)


def abstract_model() -> nnx.Module:
  """The embedded SmallCNN with ``jax.ShapeDtypeStruct`` leaves: no memory, no training."""
  return registry.build_abstract(ARCH, NUM_SCENES)


@dataclasses.dataclass(frozen=True)
class EmbeddedDefault:
  probe_dir: Path
  train_dir: Path
  heldout_dir: Path       # images never trained, fine-tuned or ranked on: accuracy lives here
  checkpoint_dir: Path
  arch: str
  layers: tuple[str, ...]
  metadata: dict


def _scene_dataset(root: Path, progress: bool) -> tuple[np.ndarray, np.ndarray]:
  probe = broden.load_probe(root)
  targets = np.asarray(synthetic.scene_targets(probe))
  keep = np.flatnonzero(targets >= 0)
  images = loader.load_images(probe, keep)
  x = np.asarray(preprocess.netdissect_normalize(images), np.float32)
  return x, targets[keep]


def _hflip(key: jax.Array, batch):
  """Flips half of a batch left-right: images (B,H,W,3), or (images, {layer: (B,h,w,C)})."""
  x = batch[0] if isinstance(batch, tuple) else batch
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jax.tree.map(lambda a: jnp.where(flip, a[:, :, ::-1, :], a), batch)


def _concept_task(root: Path, heads: dict[str, tuple[str, ...]], weight: float) -> ConceptTask:
  """Per-cell concept targets of the scene-labelled rows of ``root`` for ``heads``' layers."""
  probe = broden.load_probe(root)
  keep = np.flatnonzero(np.asarray(synthetic.scene_targets(probe)) >= 0)
  pixels, _ = loader.load_labels(probe, keep)
  inventory = synthetic.label_inventory(NUM_SCENES)
  shapes = activation_shapes(abstract_model(), tuple(heads), (IMAGE_SIZE, IMAGE_SIZE))
  targets = {}
  for layer, cats in heads.items():
    numbers = [lab.number for lab in inventory if set(lab.categories) & set(cats)]
    targets[layer] = concept_targets(pixels, numbers, shapes[layer][0])
  return ConceptTask(targets, weight, balanced=True)


def _make_probe_set_atomic(out_dir: Path, **kwargs) -> None:
  """Generates a synthetic probe set in a temporary sibling directory, then renames it."""
  if (out_dir / "index.csv").exists():
    return
  if out_dir.exists():  # a partial set from an older, non-atomic writer
    shutil.rmtree(out_dir)
  tmp = files.new_temp_dir(out_dir)
  try:
    synthetic.make_probe_set(tmp, overwrite=True, **kwargs)
    try:
      os.rename(tmp, out_dir)
    except OSError:  # another process finished first: keep its (identical) set
      if not (out_dir / "index.csv").exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def build_embedded_default(
    cache_dir: Path,
    *,
    seed: int = 0,
    num_probe_images: int = 200,
    num_train_images: int = 480,
    num_heldout_images: int = 200,
    epochs: int = 6,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    concept_weight: float = 3.0,
    progress: bool = True,
) -> EmbeddedDefault:
  """Generates (once) the probe and training sets and trains (once) the SmallCNN.

  Args:
    cache_dir: cache root; artefacts go to ``cache_dir/seed<seed>/`` (see the module docstring).
    seed: seeds the probe set (``seed``), the training set (``seed + 1000``), the held-out
      set (``seed + 2000``), the initial
      weights and the training order.
    num_probe_images, num_train_images, num_heldout_images, epochs, batch_size, learning_rate,
      concept_weight: recorded in ``spec.json`` (with :data:`CONCEPT_HEADS`); a cache built
      with other values raises ValueError. ``concept_weight`` scales the training-only concept
      heads' loss against the scene cross-entropy (0: scene labels only).
    progress: progress bars while training.

  Returns:
    The paths and the checkpoint's metadata.
  """
  paths = cache_paths(cache_dir, seed)
  spec = {"arch": ARCH, "seed": seed, "image_size": IMAGE_SIZE, "num_scenes": NUM_SCENES,
          "num_probe_images": num_probe_images, "num_train_images": num_train_images,
          "num_heldout_images": num_heldout_images,
          "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
          "concept_heads": {k: list(v) for k, v in CONCEPT_HEADS.items()},
          "concept_weight": concept_weight}
  paths.root.mkdir(parents=True, exist_ok=True)
  files.claim_record(paths.root / "spec.json", spec, what="an embedded default",
                     remedy="use another cache directory")
  probe_dir, train_dir, ckpt_dir = paths.probe_dir, paths.train_dir, paths.checkpoint_dir
  heldout_dir = paths.heldout_dir
  _make_probe_set_atomic(probe_dir, num_images=num_probe_images, image_size=IMAGE_SIZE,
                         num_scenes=NUM_SCENES, seed=seed)
  _make_probe_set_atomic(train_dir, num_images=num_train_images, image_size=IMAGE_SIZE,
                         num_scenes=NUM_SCENES, seed=seed + 1000)
  _make_probe_set_atomic(heldout_dir, num_images=num_heldout_images, image_size=IMAGE_SIZE,
                         num_scenes=NUM_SCENES, seed=seed + 2000)
  if not (ckpt_dir / "metadata.json").exists():
    x_train, y_train = _scene_dataset(train_dir, progress)
    x_probe, y_probe = _scene_dataset(probe_dir, progress)
    x_held, y_held = _scene_dataset(heldout_dir, progress)
    concepts = (_concept_task(train_dir, CONCEPT_HEADS, concept_weight) if concept_weight > 0
                else None)
    model = build(ARCH, num_classes=NUM_SCENES, rngs=nnx.Rngs(seed))
    model, history = fit_classifier(
        model, x_train, y_train, key=jax.random.key(seed), epochs=epochs, batch_size=batch_size,
        optimizer=optax.adam(learning_rate), augment=_hflip, concepts=concepts,
        progress=progress)
    batches = lambda x, y: ((x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64))
    meta = {
        "train_loss": history,
        "train_accuracy": evaluate_accuracy(model, batches(x_train, y_train)),
        "probe_accuracy": evaluate_accuracy(model, batches(x_probe, y_probe)),
        "heldout_accuracy": evaluate_accuracy(model, batches(x_held, y_held)),
        "seed": seed,
        "task": "scene classification on the synthetic probe set",
        "training_only_heads": ({k: list(v) for k, v in CONCEPT_HEADS.items()}
                                if concept_weight > 0 else {}),
    }
    checkpoint.save(model, ckpt_dir, arch=ARCH, num_classes=NUM_SCENES, extra_meta=meta)
  metadata = json.loads((ckpt_dir / "metadata.json").read_text())
  cached_seed = metadata.get("extra", {}).get("seed")
  if cached_seed != seed:
    raise ValueError(f"embedded cache {ckpt_dir} holds a model trained with seed {cached_seed}, "
                     f"expected {seed}")
  return EmbeddedDefault(probe_dir, train_dir, heldout_dir, ckpt_dir, ARCH, LAYERS, metadata)
