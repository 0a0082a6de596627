"""The embedded default: a synthetic Broden-format probe set and a SmallCNN trained on it.

Everything runs offline. Artefacts are cached in an explicit directory chosen by the caller
(``experiments/`` scripts use ``./cache/embedded``), so a second run skips generation and
training::

    default = build_embedded_default(Path("cache/embedded"), seed=0)
    model = nemjax.models.checkpoint.load(default.checkpoint_dir)

Layout of the cache directory::

    probe/       synthetic probe set (Broden format) that is dissected and attacked
    train/       a second synthetic set (another seed) the classifier is trained on
    smallcnn/    orbax checkpoint + metadata.json (includes train/probe accuracy)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import preprocess
from nemjax.data import broden, loader, synthetic
from nemjax.models import build, checkpoint
from nemjax.training import evaluate_accuracy, fit_classifier

ARCH = "smallcnn"
LAYERS = ("block3", "block4")


@dataclasses.dataclass(frozen=True)
class EmbeddedDefault:
  probe_dir: Path
  train_dir: Path
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


def _hflip(key: jax.Array, x: jax.Array) -> jax.Array:
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def build_embedded_default(
    cache_dir: Path,
    *,
    seed: int = 0,
    num_probe_images: int = 200,
    num_train_images: int = 480,
    epochs: int = 4,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    progress: bool = True,
) -> EmbeddedDefault:
  """Generates (once) the probe and training sets and trains (once) the SmallCNN."""
  cache_dir = Path(cache_dir)
  probe_dir, train_dir, ckpt_dir = cache_dir / "probe", cache_dir / "train", cache_dir / ARCH
  if not (probe_dir / "index.csv").exists():
    synthetic.make_probe_set(probe_dir, num_images=num_probe_images, seed=seed, overwrite=True)
  if not (train_dir / "index.csv").exists():
    synthetic.make_probe_set(train_dir, num_images=num_train_images, seed=seed + 1000, overwrite=True)
  if not (ckpt_dir / "metadata.json").exists():
    x_train, y_train = _scene_dataset(train_dir, progress)
    x_probe, y_probe = _scene_dataset(probe_dir, progress)
    num_classes = int(max(y_train.max(), y_probe.max()) + 1)
    model = build(ARCH, num_classes=num_classes, rngs=nnx.Rngs(seed))
    model, history = fit_classifier(
        model, x_train, y_train, key=jax.random.key(seed), epochs=epochs, batch_size=batch_size,
        optimizer=optax.adam(learning_rate), augment=_hflip, progress=progress)
    batches = lambda x, y: ((x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64))
    meta = {
        "train_loss": history,
        "train_accuracy": evaluate_accuracy(model, batches(x_train, y_train)),
        "probe_accuracy": evaluate_accuracy(model, batches(x_probe, y_probe)),
        "seed": seed,
        "task": "scene classification on the synthetic probe set",
    }
    checkpoint.save(model, ckpt_dir, arch=ARCH, num_classes=num_classes, extra_meta=meta)
  metadata = json.loads((ckpt_dir / "metadata.json").read_text())
  return EmbeddedDefault(probe_dir, train_dir, ckpt_dir, ARCH, LAYERS, metadata)
