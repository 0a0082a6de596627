"""End-to-end fine-tuning attack on feature visualisation (Nanfack et al. 2024, Table 1).

``experiments/manipulate.py`` is a thin CLI over :func:`nemjax.manipulate.inputs.load_inputs`
(model and data from paths) and :func:`run_experiment`, which

1. evaluates the original model on the *ranking set* (the probe images, plus the decoys for
   push-up): per-channel activations ``E[n, j] = ‖f^{(l,j)}(x_n)‖²``, logits and pooled
   features for the embedder; and its accuracy on the *held-out images* (which no fine-tuning
   step, distillation batch or top-k reference ever sees) and on a fixed sample of the
   training stream;
2. takes each channel's initial top-k images and builds the attack (push-down on the top-k
   images, push-up towards decoy images, or fairwashing between two groups);
3. fine-tunes with ``α · L_A + (1 − α) · L_M`` (:func:`nemjax.manipulate.make_train_step`), each
   step on ``batch_size`` images of the training stream plus ``attack_batch_size`` images of the
   ranking set (and ``decoys_per_step`` decoys), evaluating every ``eval_every`` steps; after an
   evaluation α follows the dynamic rule (:func:`nemjax.manipulate.alpha_update`), driven by
   the held-out accuracy, unless it is fixed, and the train state is checkpointed
   (:mod:`nemjax.manipulate.checkpoints`:
   ``OUT/checkpoints/last``, written next to it and swapped in, so a kill at any point leaves a
   complete checkpoint);
4. re-evaluates and reports, per attacked layer (means over attacked channels): overlap of the
   top-5 sets before/after, Kendall-τ and τ-W of the activation rankings, CLIP-δ and CLIP-W,
   train and held-out accuracy before/after (fairwash: also DDI / DEO); writes
   ``metrics.csv``/``metrics.md``, ``channels.csv``, ``topk_before_after.png``
   (:mod:`nemjax.manipulate.report`), and — as the thesis compares them —
   activation-maximisation images of a few attacked channels for the original and the
   fine-tuned model from the same random start (``featvis_before_after.png``, and their pixel
   correlation in the table, undefined for a constant image); then ``history.json``,
   ``summary.json`` and the fine-tuned model (``OUT/model``, a :mod:`nemjax.models.checkpoint`).

The pruning defence built on the same pieces is :mod:`nemjax.manipulate.defence`.

Decisions (documented departures from the papers, all switchable):

* **Embedder.** CLIP-δ / CLIP-W use the *original* model's pooled features (``embed_layer``,
  default ``avgpool``) as the image embedding — :func:`nemjax.metrics.penultimate_embedder`'s
  definition, computed from the same forward pass as the initial activations. It stands in for
  CLIP, which needs weights nemjax cannot download; any ``embedder(images uint8) -> (n, D)`` can
  be passed instead, e.g. CLIP ViT-B/32 from a local state dict
  (:func:`nemjax.metrics.load_embedder` ``("clip:PATH")``, the CLIs' ``--embedder``).
* **Loss scale.** The papers' push-down loss is a plain sum of energies. Minimised as stated
  on the embedded SmallCNN (block4 feeds a linear classifier through global pooling) it shrinks
  every channel uniformly — we measured the mean energy fall to 7·10⁻⁴ of its value with the
  top-5 sets still half unchanged — because the classifier undoes the scale, so the
  distillation term does not object and the rankings (the explanations) barely move. With
  ``loss_scale="relative"`` (default; :mod:`nemjax.manipulate.relative`) every attack term is
  divided by the batch's mean energy of the channel (gradient through both), which cancels the
  rescaling direction, and weighted
  so ``L_A`` starts near 1 like the distillation cross-entropy: push-down weights each (image,
  channel) pair by ``Ē₀_j / (E₀[n, j] · #pairs)``, push-up averages the hinge over its terms,
  fairwashing divides ``(μ₀−μ₁)²`` by the mean square ``s`` and ``(ρ₀−ρ₁)²`` by ``s²``, then
  each channel by its initial value. ``"sum"`` is the papers' statement
  (:mod:`nemjax.manipulate.losses`). Channels that are constant on the ranking set (dead
  after a ReLU) have no top-k set and are left out of the attack and the means.
* **Accuracy.** Top-1 (%) on the held-out images (``heldout_*``: they must share no image
  with the probe, the decoys or the training sample, checked by pixel fingerprints), next to
  the same on a fixed sample of the training stream (``train_*``). A set without labels
  (every label ``-1``) reports top-1 *agreement* (%) with the original model's predictions
  instead, and the report says so (:func:`accuracy_kind`). The α rule reads the held-out
  accuracy.
* **Resume.** Batches are a pure function of ``(seed, step)`` (training stream: one seeded
  permutation per epoch; ranking-set and decoy samples from a generator seeded with
  ``(seed, stream, step)``), so a run resumed from ``OUT/checkpoints/last`` sees exactly the
  batches an uninterrupted run sees and, on the same machine, ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax import metrics as nm
from nemjax import models
from nemjax.files import atomic_write_text, check_record, write_json
from nemjax.manipulate import alpha as alpha_rule
from nemjax.manipulate import checkpoints as ckpt
from nemjax.manipulate import featvis
from nemjax.manipulate import losses
from nemjax.manipulate import report
from nemjax.manipulate import train
from nemjax.manipulate.relative import (relative_fairwash_objective, relative_fairwash_terms,
                                        relative_push_down_objective, relative_push_up_objective)

__all__ = [
    "ATTACKS",
    "ManipulateConfig",
    "ExperimentInputs",
    "EvalOutputs",
    "Reference",
    "canonical_layers",
    "make_evaluator",
    "Accuracies",
    "accuracy_percent",
    "accuracy_kind",
    "measure_accuracy",
    "accuracy_note",
    "image_fingerprints",
    "check_disjoint",
    "make_reference",
    "build_attack",
    "trainable_from",
    "finetune",
    "attack_metrics",
    "feature_visualisations",
    "run_experiment",
]

ATTACKS = ("push-down", "push-up", "fairwash")
PyTree = Any
TrainBatches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


# ---------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ManipulateConfig:
  """Settings of one fine-tuning attack (JSON-serialisable; see :meth:`to_json`)."""
  attack: str = "push-down"              # push-down | push-up | fairwash
  layers: tuple[str, ...] = ("block4",)  # attacked layers (canonical names or aliases)
  channels: Mapping[str, tuple[int, ...]] | None = None  # {layer: channels}; None/missing: all
  k: int = 10                            # top-k set size (attack and CLIP metrics)
  overlap_k: int = 5                     # top-n sets compared for the overlap / PNG grid
  epochs: int = 3                        # passes over the training stream
  learning_rate: float = 1e-5            # Adam
  batch_size: int = 16                   # training-stream images per step
  attack_batch_size: int = 16            # ranking-set images per step
  decoys_per_step: int = 8               # push-up: decoy images per step
  eval_every: int | None = None          # steps between evaluations (None: once per epoch)
  alpha_init: float = 0.1
  alpha_min: float = 1e-3
  alpha_max: float = 0.9
  alpha_tolerance: float = 0.5           # accuracy points
  alpha_factor: float = 2.0
  alpha_fixed: float | None = None       # constant α (0: fine-tuning-only baseline)
  loss_scale: str = "relative"           # relative | sum
  train_from: str | None = None          # first module to train (None: all parameters)
  embed_layer: str = "avgpool"           # pooled features used as the CLIP stand-in
  eval_batch_size: int = 50
  featvis_channels: int = 4              # channels per layer visualised before/after (0: off)
  featvis_steps: int = 128               # activation-maximisation steps per visualisation
  featvis_tolerance: float = 1e-4        # pixel std below which a visualisation is "constant"
  seed: int = 0

  def validate(self) -> None:
    """ValueError naming the first bad setting."""
    if self.attack not in ATTACKS:
      raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
    if not self.layers:
      raise ValueError("give at least one layer to attack")
    if self.k < 1:
      raise ValueError(f"k must be >= 1, got {self.k}")
    if not 1 <= self.overlap_k <= self.k:
      raise ValueError(f"overlap_k must be in [1, k={self.k}], got {self.overlap_k}")
    for name in ("epochs", "batch_size", "attack_batch_size", "decoys_per_step",
                 "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.featvis_tolerance >= 0:
      raise ValueError(f"featvis_tolerance must be >= 0, got {self.featvis_tolerance}")
    if self.featvis_channels < 0 or self.featvis_steps < 1:
      raise ValueError(f"featvis_channels must be >= 0 and featvis_steps >= 1, got "
                       f"{self.featvis_channels} and {self.featvis_steps}")
    if self.eval_every is not None and self.eval_every < 1:
      raise ValueError(f"eval_every must be >= 1 step, got {self.eval_every}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.alpha_fixed is not None:
      if not 0.0 <= self.alpha_fixed <= 1.0:
        raise ValueError(f"alpha_fixed must be in [0, 1], got {self.alpha_fixed}")
    else:
      alpha_rule.alpha_init(0.0, self.alpha_config())  # raises on a bad rule
    if self.loss_scale not in ("relative", "sum"):
      raise ValueError(f"loss_scale must be 'relative' or 'sum', got {self.loss_scale!r}")
    if self.channels is not None:
      for layer, chans in self.channels.items():
        if layer not in self.layers:
          raise ValueError(f"channels given for {layer!r}, which is not an attacked layer "
                           f"{list(self.layers)}")
        if not chans or any(c < 0 for c in chans):
          raise ValueError(f"channels of {layer!r} must be a non-empty list of indices >= 0")

  def alpha_config(self) -> alpha_rule.AlphaConfig:
    return alpha_rule.AlphaConfig(init=self.alpha_init, tolerance=self.alpha_tolerance,
                                  factor=self.alpha_factor, min_alpha=self.alpha_min,
                                  max_alpha=self.alpha_max)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["layers"] = list(self.layers)
    d["channels"] = None if self.channels is None else {
        k: list(v) for k, v in self.channels.items()}
    return d


@dataclasses.dataclass
class ExperimentInputs:
  """Model and data of an experiment.

  Images are raw RGB ``(n, H, W, 3)`` in 0..255 (uint8); ``normalize`` maps them to model
  inputs inside ``jit``. Labels are int class indices of the model, ``-1`` for unknown; a set
  whose labels are all ``-1`` is scored as agreement with the original model.

  Three disjoint roles: the *probe* images are what is explained and attacked (top-k sets,
  CLIP-δ, the attack rows of every step); the *held-out* images only ever measure accuracy;
  ``train_eval_*`` is a fixed sample of the training stream whose accuracy is reported next to
  the held-out one.
  """
  model: nnx.Module
  normalize: Callable[[jax.Array], jax.Array]
  probe_images: np.ndarray                # (n, H, W, 3) uint8: images whose top-k is explained
  probe_labels: np.ndarray                # (n,) int32, -1 = unlabelled (figure captions only)
  heldout_images: np.ndarray              # (m, H', W', 3) uint8: accuracy only, never trained on
  heldout_labels: np.ndarray              # (m,) int32, all -1: agreement with the original
  train_eval_images: np.ndarray           # (t, H', W', 3) uint8: fixed sample of the stream
  train_eval_labels: np.ndarray           # (t,) int32, all -1: agreement with the original
  train_batches: TrainBatches             # epoch -> iterable of (images (B,H,W,3), labels (B,))
  steps_per_epoch: int                    # batches taken from each epoch of the stream
  class_names: Sequence[str] | None = None
  decoy_images: np.ndarray | None = None  # push-up: (m, H, W, 3) uint8
  groups: np.ndarray | None = None        # fairwash: (n,) group ids of probe images (0/1)
  group_name: str = ""                    # what group 1 is (for the report)
  embedder: Callable[[np.ndarray], Any] | None = None  # default: original pooled features
  heldout_source: str = "held-out images"  # where the held-out images come from (report)


# -------------------------------------------------------------------------------- evaluation
class EvalOutputs(NamedTuple):
  """One forward pass of a model over a set of images."""
  energy: dict[str, np.ndarray]   # {layer: (n, C) float32 ‖f^{(l,j)}(x)‖²}
  mean: dict[str, np.ndarray]     # {layer: (n, C) float32 spatial mean of the map}
  logits: np.ndarray              # (n, K) float32
  embedding: np.ndarray | None    # (n, D) float32 pooled embed-layer features


def make_evaluator(model: nnx.Module, normalize: Callable, layers: Sequence[str],
                   embed_layer: str | None, batch_size: int):
  """``evaluate(params, images, logits_only=False) -> EvalOutputs`` over ``images``
  (n, H, W, 3) uint8.

  ``logits_only=True`` runs a second program that taps nothing (energies ``{}``, embedding
  ``None``), for accuracy sets. Each program is jitted once per batch shape; the last batch is
  padded, so every call compiles at most once.
  """
  taps = tuple(dict.fromkeys(tuple(layers) + ((embed_layer,) if embed_layer else ())))
  apply_fn, _ = models.pure_apply(model, taps=taps)

  @jax.jit
  def forward(params, x):
    logits, acts = apply_fn(params, normalize(x))
    energy, mean = {}, {}
    for name in layers:
      a = acts[name].astype(jnp.float32)
      energy[name] = losses.channel_energy(a)
      mean[name] = jnp.mean(a, axis=(1, 2)) if a.ndim == 4 else a
    emb = None
    if embed_layer:
      e = acts[embed_layer]
      emb = jnp.mean(e, axis=(1, 2)) if e.ndim == 4 else e.reshape(e.shape[0], -1)
    return logits, energy, mean, emb

  logits_fn, _ = models.pure_apply(model, taps=())

  @jax.jit
  def forward_logits(params, x):
    return logits_fn(params, normalize(x))[0], {}, {}, None

  def evaluate(params, images: np.ndarray, logits_only: bool = False) -> EvalOutputs:
    n = int(images.shape[0])
    if n == 0:
      raise ValueError("evaluate: no images")
    fn, names = (forward_logits, ()) if logits_only else (forward, tuple(layers))
    parts = []
    for start in range(0, n, batch_size):
      x = images[start:start + batch_size]
      m = x.shape[0]
      if m < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], x.dtype)])
      out = jax.device_get(fn(params, jnp.asarray(x)))
      parts.append(jax.tree.map(lambda a, m=m: np.asarray(a)[:m], out))
    cat = lambda *xs: np.concatenate(xs, axis=0)
    logits = cat(*[p[0] for p in parts])
    energy = {k: cat(*[p[1][k] for p in parts]) for k in names}
    mean = {k: cat(*[p[2][k] for p in parts]) for k in names}
    emb = cat(*[p[3] for p in parts]) if embed_layer and not logits_only else None
    return EvalOutputs(energy, mean, logits.astype(np.float32), emb)

  return evaluate


class Accuracies(NamedTuple):
  """Accuracy (%) of one model on the held-out images and on the training sample."""
  heldout: float
  train: float


def accuracy_kind(labels: np.ndarray) -> str:
  """What :func:`accuracy_percent` measures on a set with these labels: ``"top-1 accuracy"``
  or, with no label, ``"top-1 agreement with the original model"``."""
  return ("top-1 accuracy" if (np.asarray(labels) >= 0).any()
          else "top-1 agreement with the original model")


def image_fingerprints(images: np.ndarray) -> set[bytes]:
  """A 16-byte BLAKE2 digest of the pixels (and shape) of each image ``(n, H, W, 3)``."""
  import hashlib  # pylint: disable=import-outside-toplevel
  images = np.ascontiguousarray(images)
  return {hashlib.blake2b(repr(x.shape).encode() + x.tobytes(), digest_size=16).digest()
          for x in images}


def check_disjoint(heldout: np.ndarray, others: Mapping[str, np.ndarray | None],
                   where: str = "held-out images") -> None:
  """ValueError if an image of ``heldout`` (pixel for pixel) is also in one of ``others``
  (``{name: (n, H, W, 3) or None}``): held-out accuracy must come from unseen images."""
  held = image_fingerprints(heldout)
  for name, imgs in others.items():
    if imgs is None or len(imgs) == 0:
      continue
    shared = len(held & image_fingerprints(imgs))
    if shared:
      raise ValueError(f"{shared} of the {len(heldout)} {where} are also {name}; held-out "
                       "accuracy needs images the fine-tune and the rankings never see")


def accuracy_percent(logits: np.ndarray, labels: np.ndarray,
                     reference_logits: np.ndarray | None = None) -> float:
  """Top-1 accuracy (%) over labelled rows; with none, top-1 agreement (%) with the
  reference model's predictions."""
  pred = np.argmax(logits, axis=-1)
  keep = labels >= 0
  if keep.any():
    return float(100.0 * np.mean(pred[keep] == labels[keep]))
  if reference_logits is None:
    raise ValueError("accuracy_percent: no labelled images and no reference predictions")
  return float(100.0 * np.mean(pred == np.argmax(reference_logits, axis=-1)))


# ------------------------------------------------------------------------- reference (before)
@dataclasses.dataclass
class Reference:
  """The original model on the ranking set, and each layer's initial top-k sets."""
  layers: tuple[str, ...]            # canonical layer names
  attacked: dict[str, np.ndarray]    # {layer: (C,) bool} attacked channels
  images: np.ndarray                 # (n_rank, H, W, 3) uint8: probe images then decoys
  labels: np.ndarray                 # (n_rank,) int32, -1 for decoys / unlabelled
  num_probe: int                     # rows [0, num_probe) are probe images
  before: EvalOutputs                # original model on the ranking set
  topk: dict[str, np.ndarray]        # {layer: (C, k) int32 initial top-k row indices}
  accuracy: Accuracies               # original accuracy (%), held-out and training sample
  heldout_logits: np.ndarray         # (m, K) original logits on the held-out images
  train_logits: np.ndarray           # (t, K) original logits on the training sample
  embeddings: np.ndarray             # (n_rank, D) float32 image embeddings (CLIP stand-in)
  groups: np.ndarray | None          # (n_rank,) fairwash groups (-1 for decoys)
  spatial: dict[str, float]          # {layer: h·w} positions per channel map (1 for dense)


def canonical_layers(model: nnx.Module, layers: Sequence[str]) -> tuple[str, ...]:
  """Canonical names of ``layers`` (aliases resolved; ValueError listing valid names)."""
  return tuple(models.canonical_layer(model.arch, name) for name in layers)


def _channel_masks(config: ManipulateConfig, model: nnx.Module, layers: tuple[str, ...],
                   widths: Mapping[str, int]) -> dict[str, np.ndarray]:
  given = {}
  for name, chans in (config.channels or {}).items():
    given[models.canonical_layer(model.arch, name)] = chans
  out = {}
  for name in layers:
    c = widths[name]
    mask = np.zeros((c,), bool)
    chans = given.get(name)
    if chans is None:
      mask[:] = True
    else:
      bad = [j for j in chans if not 0 <= j < c]
      if bad:
        raise ValueError(f"channels {bad} out of range for layer {name} with {c} channels")
      mask[list(chans)] = True
    out[name] = mask
  return out


def measure_accuracy(evaluate, params: PyTree, inputs: ExperimentInputs,
                     heldout_logits: np.ndarray | None = None,
                     train_logits: np.ndarray | None = None) -> tuple[Accuracies, np.ndarray,
                                                                      np.ndarray]:
  """Accuracy of ``params`` on the held-out images and the training sample.

  Args:
    evaluate: from :func:`make_evaluator`.
    params: the model's variables.
    inputs: the held-out and training-sample images and labels.
    heldout_logits, train_logits: the original model's logits, the reference of an
      unlabelled set (``None``: ``params`` is the original model).

  Returns:
    ``(Accuracies, heldout logits (m, K), train-sample logits (t, K))``.
  """
  lh = evaluate(params, inputs.heldout_images, logits_only=True).logits
  lt = evaluate(params, inputs.train_eval_images, logits_only=True).logits
  acc = Accuracies(
      accuracy_percent(lh, inputs.heldout_labels, lh if heldout_logits is None else heldout_logits),
      accuracy_percent(lt, inputs.train_eval_labels, lt if train_logits is None else train_logits))
  return acc, lh, lt


def accuracy_note(inputs: ExperimentInputs) -> str:
  """One sentence per accuracy column of the tables: what is measured, on how many images."""
  held, train = accuracy_kind(inputs.heldout_labels), accuracy_kind(inputs.train_eval_labels)
  text = (f"Held-out accuracy: {held} on {len(inputs.heldout_images)} held-out images "
          f"({inputs.heldout_source}) that no fine-tuning step, distillation batch or top-k "
          f"reference sees; the α rule reads it. Train accuracy: {train} on a fixed sample of "
          f"{len(inputs.train_eval_images)} training-stream images.")
  if "agreement" in held:
    text += (" The held-out images have no labels of the model's classes, so the held-out "
             "column is agreement with the original model's predictions, not accuracy.")
  return text


def _check_inputs(inputs: ExperimentInputs) -> None:
  """Shapes of the image sets and their labels; held-out images seen nowhere else."""
  for name in ("probe", "heldout", "train_eval"):
    images = np.asarray(getattr(inputs, f"{name}_images"))
    labels = np.asarray(getattr(inputs, f"{name}_labels"))
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
      raise ValueError(f"{name}_images must be a non-empty (n, H, W, 3) array, got "
                       f"{images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{name}_labels must be ({images.shape[0]},), got {labels.shape}")
  check_disjoint(inputs.heldout_images, {"probe images": inputs.probe_images,
                                         "decoy images": inputs.decoy_images,
                                         "training-stream images": inputs.train_eval_images})


def make_reference(config: ManipulateConfig, inputs: ExperimentInputs, evaluate,
                   params: PyTree, *, log: Callable[[str], None] = print) -> Reference:
  """Evaluate the original model and take each channel's initial top-k sets."""
  model = inputs.model
  layers = canonical_layers(model, config.layers)
  _check_inputs(inputs)
  images = np.asarray(inputs.probe_images)
  labels = np.asarray(inputs.probe_labels, np.int32)
  n_eval = images.shape[0]
  groups = None
  if config.attack == "push-up":
    if inputs.decoy_images is None or len(inputs.decoy_images) == 0:
      raise ValueError("push-up needs decoy images")
    decoys = np.asarray(inputs.decoy_images)
    if decoys.shape[1:] != images.shape[1:]:
      raise ValueError(f"decoy images are {decoys.shape[1:]}, probe images {images.shape[1:]}")
    images = np.concatenate([images, decoys])
    labels = np.concatenate([labels, np.full((decoys.shape[0],), -1, np.int32)])
  if config.attack == "fairwash":
    g = None if inputs.groups is None else np.asarray(inputs.groups, np.int32)
    if g is None or g.shape != (n_eval,):
      raise ValueError(f"fairwash needs groups of shape ({n_eval},)")
    if not ((g == 0).any() and (g == 1).any()):
      raise ValueError("fairwash needs probe images in both groups 0 and 1")
    groups = g
  if images.shape[0] <= config.k:
    raise ValueError(f"the ranking set has {images.shape[0]} images; need more than k={config.k}")
  shapes = models.activation_shapes(model, layers, images.shape[1:])  # per image
  widths = {name: shp[-1] for name, shp in shapes.items()}
  spatial = {name: float(np.prod(shp[:-1])) for name, shp in shapes.items()}
  attacked = _channel_masks(config, model, layers, widths)
  t0 = time.time()
  before = evaluate(params, images)
  log(f"original model evaluated on {images.shape[0]} images in {time.time() - t0:.1f} s")
  acc, heldout_logits, train_logits = measure_accuracy(evaluate, params, inputs)
  for name in layers:  # a constant channel (e.g. dead after its ReLU) has no ranking to attack
    e = before.energy[name]
    const = e.max(0) == e.min(0)
    dropped = int((attacked[name] & const).sum())
    if dropped:
      log(f"{name}: {dropped} of {int(attacked[name].sum())} selected channels are constant on "
          "the ranking set (no top-k to manipulate) and are left out")
      attacked[name] = attacked[name] & ~const
  if not any(m.any() for m in attacked.values()):
    raise ValueError("every selected channel is constant on the ranking set; nothing to attack")
  topk = {name: np.asarray(nm.topk_from_scores(before.energy[name], config.k).indices)
          for name in layers}
  if inputs.embedder is None:
    emb = before.embedding
  else:
    emb = np.concatenate([np.asarray(inputs.embedder(images[i:i + 64]), np.float32)
                          for i in range(0, images.shape[0], 64)])
  return Reference(layers, attacked, images, labels, n_eval, before, topk, acc, heldout_logits,
                   train_logits, emb, groups, spatial)


# ------------------------------------------------------------------------------ the attack
class Attack(NamedTuple):
  """The attack objective and the per-step batch extras that feed it."""
  objective: losses.AttackLossFn
  extras: Callable[[int, np.ndarray], tuple[np.ndarray, dict]]  # (step, n_train) -> (rows, batch)


def _step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
  """NumPy generator of one (seed, stream, step): the batch of a step never depends on history."""
  return np.random.default_rng([int(seed), int(stream), int(step)])


def _sample(rng: np.random.Generator, pool: np.ndarray, size: int) -> np.ndarray:
  return np.sort(rng.choice(pool, size=size, replace=pool.size < size))


def build_attack(config: ManipulateConfig, ref: Reference) -> Attack:
  """Objective and batch extras for ``config.attack`` (see the module docstring on scale).

  ``extras(step, n_train)`` returns the ranking-set rows appended to the training images of
  this step and the batch entries the objective reads, already laid out for a batch of
  ``n_train`` training images followed by those rows.
  """
  relative = config.loss_scale == "relative"
  layers = ref.layers
  nb = config.attack_batch_size
  n_eval = ref.num_probe
  mean0 = {n: ref.before.energy[n].mean(0) for n in layers}  # (C,) mean initial energy
  eps = {n: np.maximum(1e-3 * mean0[n], 1e-12).astype(np.float32) for n in layers}

  if config.attack == "push-down":
    member = {}
    for name in layers:
      topk = ref.topk[name]                                   # (C, k)
      m = np.zeros((ref.images.shape[0], topk.shape[0]), bool)
      rows, cols = topk.T.ravel(), np.tile(np.arange(topk.shape[0]), topk.shape[1])
      m[rows, cols] = True
      member[name] = m & ref.attacked[name][None, :]
    pool = np.flatnonzero(np.any(np.stack([m.any(1) for m in member.values()]), axis=0))
    # relative weights: the pair's initial energy relative to its channel's mean -> L_A ~ 1
    ratio0 = {n: np.maximum(ref.before.energy[n], eps[n]) / np.maximum(mean0[n], 1e-12)
              for n in layers}
    if relative:
      objective = relative_push_down_objective(eps)
    else:
      objective = losses.push_down_objective({n: np.ones(ref.attacked[n].shape, bool)
                                              for n in layers})

    def extras(step: int, n_train: int):
      rows = _sample(_step_rng(config.seed, step, 1), pool, nb)
      masks = {}
      for name in layers:
        m = member[name][rows].astype(np.float32)
        if relative:
          m = m / ratio0[name][rows] / max(1.0, float(m.sum()))
        masks[name] = np.concatenate([np.zeros((n_train, m.shape[1]), np.float32), m])
      return rows, {"topk_mask": masks}

    return Attack(objective, extras)

  if config.attack == "push-up":
    decoys = np.arange(n_eval, ref.images.shape[0])
    pool = np.arange(n_eval)
    weights = {}
    for name in layers:
      c = ref.attacked[name].astype(np.float32)
      if relative:
        c = c / ((config.batch_size + nb) * config.decoys_per_step * max(1.0, c.sum()))
      weights[name] = c
    if relative:
      objective = relative_push_up_objective(weights, eps)
    else:
      objective = losses.push_up_objective(weights)

    def extras(step: int, n_train: int):
      del n_train
      rows = _sample(_step_rng(config.seed, step, 1), pool, nb)
      drows = _sample(_step_rng(config.seed, step, 2), decoys, config.decoys_per_step)
      return rows, {"decoy": ref.images[drows]}

    return Attack(objective, extras)

  # fairwash: layers are tapped as given (use the pre-activation conv, e.g. features.12)
  g = ref.groups
  pools = (np.flatnonzero(g == 0), np.flatnonzero(g == 1))
  weights, feps = {}, {}
  for name in layers:
    c = ref.attacked[name].astype(np.float32)
    rho = ref.before.energy[name][:n_eval] / ref.spatial[name]  # per-image mean square
    feps[name] = np.maximum(1e-3 * rho.mean(0), 1e-12).astype(np.float32)
    if relative:
      l0 = np.asarray(relative_fairwash_terms(ref.before.mean[name][:n_eval], rho, g,
                                              feps[name]))
      floor = 1e-3 * float(np.max(l0[c > 0], initial=0.0)) + 1e-12
      c = c / np.maximum(l0, floor) / max(1.0, c.sum())
    weights[name] = c
  if relative:
    objective = relative_fairwash_objective(weights, feps)
  else:
    objective = losses.fairwashing_objective(weights)
  half = nb // 2

  def extras(step: int, n_train: int):
    rng = _step_rng(config.seed, step, 1)
    rows = np.concatenate([_sample(rng, pools[0], nb - half), _sample(rng, pools[1], half)])
    group = np.concatenate([np.full((n_train,), -1, np.int32), g[rows]])
    return rows, {"group": group}

  return Attack(objective, extras)


# ------------------------------------------------------------------------- trainable leaves
def trainable_from(arch: str, first: str | None) -> Callable[[str, Any], bool] | None:
  """Filter for :func:`nemjax.manipulate.make_train_step`: train ``nnx.Param`` leaves of
  modules at or after ``first`` in the forward order (``None``: every parameter).

  Args:
    arch: model architecture (``models.layer_names(arch)`` gives the order).
    first: canonical name or alias of the first module to train, e.g. ``"features.12"``.
  """
  if first is None:
    return None
  names = models.layer_names(arch)
  start = names.index(models.canonical_layer(arch, first))
  position = {n: i for i, n in enumerate(names)}

  def rule(path: str, node: Any) -> bool:
    if not isinstance(node, nnx.Param):
      return False
    parts = path.split("/")
    if parts[-1] == "value":
      parts = parts[:-1]
    parts = parts[:-1]  # drop the leaf name (kernel, bias, scale, ...)
    while parts:
      name = ".".join(parts)
      if name in position:
        return position[name] >= start
      parts = parts[:-1]
    return False

  return rule


# ------------------------------------------------------------------------------ checkpoints
# ------------------------------------------------------------------------------- fine-tuning
class FinetuneResult(NamedTuple):
  params: PyTree                # fine-tuned variables (nnx.State)
  after: EvalOutputs            # the last evaluation on the ranking set
  accuracy: Accuracies          # accuracy (%) at the last evaluation
  alpha: float                  # α used in the last steps
  history: list[dict]           # one record per evaluation
  steps: int                    # total steps
  resumed_from: int             # step the run started from (0: fresh)
  train_seconds: float          # wall time of steps + evaluations (summed over resumes)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(C,) fraction of the entries of each row of ``a`` that are in the same row of ``b``."""
  return np.mean((a[:, :, None] == b[:, None, :]).any(-1), axis=1)


def finetune(config: ManipulateConfig, inputs: ExperimentInputs, ref: Reference, evaluate,
             params: PyTree, *, teacher_params: PyTree | None = None,
             masks: PyTree | None = None, attack: bool = True,
             ckpt_root: Path | None = None, fingerprint: str = "",
             progress: bool = True, log: Callable[[str], None] = print,
             stop_after_evals: int | None = None) -> FinetuneResult:
  """The fine-tuning loop with evaluation cadence, α rule and (optional) checkpoints.

  Args:
    config: settings.
    inputs: model, training stream and data.
    ref: :func:`make_reference` of the model being attacked.
    evaluate: from :func:`make_evaluator`.
    params: variables to start from (the model's ``nnx.State``).
    teacher_params: variables of the distillation teacher (default: ``params``).
    masks: pruning masks re-applied after every update (:func:`nemjax.manipulate.masked`).
    attack: ``False`` runs distillation only (α = 0, no attack batch extras), e.g. to recover
      from pruning.
    ckpt_root: directory of the ``last`` checkpoint (``None``: no checkpoints, no resume).
    fingerprint: stored in checkpoints; a checkpoint with another one is refused.
    progress: show a progress bar.
    log: line printer.
    stop_after_evals: stop (without finishing) after this many evaluations (tests).

  Returns:
    A :class:`FinetuneResult`.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  model = inputs.model
  layers = ref.layers
  eval_every = config.eval_every or inputs.steps_per_epoch
  total = config.epochs * inputs.steps_per_epoch
  apply_fn, _ = models.pure_apply(model, taps=layers)
  normalize = inputs.normalize

  def train_apply(p, x):
    return apply_fn(p, normalize(x))

  optimizer = optax.adam(config.learning_rate)
  trainable = trainable_from(model.arch, config.train_from)
  the_attack = build_attack(config, ref) if attack else None
  objective = the_attack.objective if attack else (lambda acts, batch, decoy: jnp.zeros(()))
  step_fn = train.make_train_step(train_apply, None, objective, optimizer, trainable=trainable)
  if masks is not None:
    step_fn = train.masked(step_fn, masks)
  if teacher_params is not None:  # the state is donated: never hand it the caller's buffers
    teacher_params = jax.tree.map(jnp.array, teacher_params)
  state = train.train_init(params, optimizer, teacher_params=teacher_params, trainable=trainable)
  # Commit every leaf to the device: a mix of committed (restored) and uncommitted (fresh
  # optimizer state) inputs would compile the step a second time once its outputs come back.
  state = jax.device_put(state, jax.devices()[0])

  cfg = config.alpha_config()
  fixed = 0.0 if not attack else config.alpha_fixed
  alpha_state = None if fixed is not None else alpha_rule.alpha_init(ref.accuracy.heldout, cfg)
  history: list[dict] = []
  start, seconds = 0, 0.0
  if ckpt_root is not None and ckpt.find_checkpoint(ckpt_root) is not None:
    meta = ckpt.read_checkpoint_meta(ckpt_root)
    if meta.get("fingerprint") != fingerprint:
      raise ValueError(f"{ckpt_root} holds a checkpoint of another configuration; use a new "
                       "output directory or delete it")
    state, meta = ckpt.restore_checkpoint(ckpt_root, state)
    start, history, seconds = int(meta["step"]), list(meta["history"]), float(meta["seconds"])
    if alpha_state is not None:
      alpha_state = alpha_rule.AlphaState(
          alpha=jnp.asarray(meta["alpha"], jnp.float32),
          reference_accuracy=jnp.asarray(ref.accuracy.heldout, jnp.float32),
          count=jnp.asarray(meta["alpha_count"], jnp.int32))
    if int(state.step) != start:
      raise ValueError(f"corrupt checkpoint in {ckpt_root}: step {int(state.step)} != {start}")
    log(f"resuming from the checkpoint at step {start}/{total}")

  def current_alpha() -> float:
    return float(fixed) if alpha_state is None else float(alpha_state.alpha)

  after, acc = None, None
  bar = tqdm(total=total, initial=start, desc=f"fine-tune ({config.attack})" if attack
             else "fine-tune (distillation)", disable=not progress, unit="step")
  epoch, it, pending, evals_done = None, None, [], 0
  t_last = time.time()
  n_train = config.batch_size
  for s in range(start, total):
    e, i = divmod(s, inputs.steps_per_epoch)
    if epoch != e:
      epoch, it = e, iter(inputs.train_batches(e))
      for _ in range(i):  # resume inside an epoch: skip the batches already used
        next(it)
    try:
      x, _ = next(it)
    except StopIteration as stop:
      raise ValueError(f"the training stream yielded fewer than steps_per_epoch="
                       f"{inputs.steps_per_epoch} batches in epoch {e}") from stop
    x = np.asarray(x)
    if x.shape[0] != n_train:
      raise ValueError(f"training batch has {x.shape[0]} images, expected {n_train}")
    if attack:
      rows, extra = the_attack.extras(s, n_train)
      images = np.concatenate([x.astype(ref.images.dtype), ref.images[rows]])
    else:
      images, extra = x, {}
    batch = {"image": jnp.asarray(images), **jax.tree.map(jnp.asarray, extra)}
    alpha = current_alpha()
    state, m = step_fn(state, batch, alpha)
    pending.append(m)
    bar.update(1)
    done = s + 1
    if done % eval_every == 0 or done == total:
      after = evaluate(state.params, ref.images)
      acc = measure_accuracy(evaluate, state.params, inputs, ref.heldout_logits,
                             ref.train_logits)[0]
      train_m = {k: float(np.mean([float(p[k]) for p in pending])) for k in pending[0]}
      pending = []
      overlap = float(np.mean([
          _overlap(ref.topk[n][ref.attacked[n], :config.overlap_k],
                   np.asarray(nm.topk_from_scores(after.energy[n], config.overlap_k).indices)
                   [ref.attacked[n]]).mean() for n in layers]))
      record = {"step": done, "epoch": done / inputs.steps_per_epoch, "alpha": alpha,
                "heldout_accuracy": acc.heldout, "train_accuracy": acc.train,
                f"top{config.overlap_k}_overlap": overlap, **train_m}
      if alpha_state is not None:  # the rule reads the held-out accuracy, never the train one
        alpha_state = alpha_rule.alpha_update(alpha_state, acc.heldout, cfg)
      now = time.time()
      seconds += now - t_last
      t_last = now
      record["seconds"] = seconds
      history.append(record)
      bar.set_postfix(acc=f"{acc.heldout:.1f}", overlap=f"{overlap:.2f}", alpha=f"{alpha:.3g}")
      log(f"step {done}/{total}: held-out accuracy {acc.heldout:.2f}% (original "
          f"{ref.accuracy.heldout:.2f}%), train {acc.train:.2f}% ({ref.accuracy.train:.2f}%), "
          f"top-{config.overlap_k} overlap {overlap:.2f}, α {alpha:.3g} -> {current_alpha():.3g}, "
          f"L_A {train_m['attack_loss']:.4g}, L_M {train_m['distill_loss']:.4g}")
      if ckpt_root is not None:
        meta = {"step": done, "fingerprint": fingerprint, "history": history,
                "seconds": seconds, "alpha": current_alpha(),
                "alpha_count": 0 if alpha_state is None else int(alpha_state.count)}
        ckpt.save_checkpoint(ckpt_root, state, meta)
      evals_done += 1
      if stop_after_evals is not None and evals_done >= stop_after_evals and done < total:
        bar.close()
        raise _Stopped(done)
  bar.close()
  if after is None:  # resumed from a checkpoint of the finished run
    after = evaluate(state.params, ref.images)
    acc = measure_accuracy(evaluate, state.params, inputs, ref.heldout_logits,
                           ref.train_logits)[0]
  last_alpha = history[-1]["alpha"] if history else current_alpha()
  return FinetuneResult(state.params, after, acc, last_alpha, history, total, start, seconds)


class _Stopped(Exception):
  """Raised by :func:`finetune` when ``stop_after_evals`` is reached."""


# ---------------------------------------------------------------------------------- metrics
def attack_metrics(config: ManipulateConfig, ref: Reference, after: EvalOutputs,
                   accuracy_after: Accuracies) -> tuple[list[dict], list[dict], dict]:
  """Before/after metrics.

  Accuracy columns: ``train_acc_*`` on the training sample and ``heldout_acc_*`` on the
  held-out images (``delta_heldout_acc`` = after − before). Fairwash adds the KS distance and
  top-k balance per channel and the model's DDI / DEO on the probe images (the images the
  groups are defined on): ``|p(ŷ=c | z=0) − p(ŷ=c | z=1)|`` and the same given ``y = c``,
  averaged over the classes ``c`` where defined (DEO needs labelled probe images, else NaN).

  Returns:
    ``(rows, channel_rows, topk_after)``: one summary row per layer (means over attacked
    channels; the papers' Table 1 columns), one row per attacked channel, and
    ``{layer: (C, k) top-k rows after}``.
  """
  rows, channel_rows, topk_after = [], [], {}
  n_eval = ref.num_probe
  fair = {}
  if config.attack == "fairwash":
    classes = np.arange(ref.before.logits.shape[1])
    y = ref.labels[:n_eval]
    sides = (("before", ref.before.logits[:n_eval]), ("after", after.logits[:n_eval]))
    for side, logits in sides:
      fair[f"ddi_{side}"] = _nanmean(nm.ddi(logits, ref.groups, classes))
    for side, logits in sides:
      fair[f"deo_{side}"] = _nanmean(nm.deo(logits, y, ref.groups, classes))
  for name in ref.layers:
    att = np.flatnonzero(ref.attacked[name])
    e0, e1 = ref.before.energy[name], after.energy[name]
    t0 = ref.topk[name]
    t1 = np.asarray(nm.topk_from_scores(e1, config.k).indices)
    topk_after[name] = t1
    ok = config.overlap_k
    overlap = _overlap(t0[:, :ok], t1[:, :ok])
    tau = np.asarray(nm.kendall_tau(e0, e1))
    c = e0.shape[1]
    tau_w = np.asarray(nm.kendall_tau_w(e0, e1)) if c >= 2 else np.full((c,), np.nan)
    emb0, emb1 = ref.embeddings[t0], ref.embeddings[t1]
    if c >= 2:
      cd = np.asarray(nm.clip_delta(emb0, emb1))
      cw = np.asarray(nm.clip_w(emb0, emb1))
    else:
      cd = cw = np.full((c,), np.nan)
    # attacked channels the fine-tune made constant on the ranking set (e.g. dead after their
    # ReLU): their top-k "after" is then an arbitrary tie order, so they are counted apart
    silenced = e1.max(0) == e1.min(0)
    row = {"attack": config.attack, "layer": name, "channels": int(att.size),
           "silenced": int(silenced[att].sum()), "alpha": None, f"top{ok}_overlap": _nanmean(overlap[att]),
           "kendall_tau": _nanmean(tau[att]), "kendall_tau_w": _nanmean(tau_w[att]),
           "clip_delta": _nanmean(cd[att]), "clip_w": _nanmean(cw[att]),
           "train_acc_before": ref.accuracy.train, "train_acc_after": accuracy_after.train,
           "heldout_acc_before": ref.accuracy.heldout,
           "heldout_acc_after": accuracy_after.heldout,
           "delta_heldout_acc": accuracy_after.heldout - ref.accuracy.heldout}
    extra_cols = {}
    if config.attack == "push-up":
      is_decoy = np.arange(ref.images.shape[0]) >= n_eval
      d0, d1 = is_decoy[t0[att]].mean(1), is_decoy[t1[att]].mean(1)
      row["decoy_share_before"], row["decoy_share_after"] = _nanmean(d0), _nanmean(d1)
      extra_cols = {"decoy_share_before": d0, "decoy_share_after": d1}
    if config.attack == "fairwash":
      g = ref.groups
      ks0 = np.asarray(nm.ks_distance_groups(ref.before.mean[name][:n_eval], g))
      ks1 = np.asarray(nm.ks_distance_groups(after.mean[name][:n_eval], g))
      minority = 1 if (g == 1).sum() <= (g == 0).sum() else 0
      b0 = np.asarray(nm.topk_balance(t0, g, minority=minority))
      b1 = np.asarray(nm.topk_balance(t1, g, minority=minority))
      row.update(ks_before=_nanmean(ks0[att]), ks_after=_nanmean(ks1[att]),
                 balance_before=_nanmean(b0[att]), balance_after=_nanmean(b1[att]), **fair)
      extra_cols = {"ks_before": ks0[att], "ks_after": ks1[att],
                    "balance_before": b0[att], "balance_after": b1[att]}
    rows.append(row)
    for i, j in enumerate(att):
      r = {"layer": name, "channel": int(j), f"top{ok}_overlap": float(overlap[j]),
           "kendall_tau": float(tau[j]), "kendall_tau_w": float(tau_w[j]),
           "clip_delta": float(cd[j]), "clip_w": float(cw[j]), "silenced": bool(silenced[j]),
           "topk_before": " ".join(map(str, t0[j])), "topk_after": " ".join(map(str, t1[j]))}
      r.update({k: float(v[i]) for k, v in extra_cols.items()})
      channel_rows.append(r)
  return rows, channel_rows, topk_after


def embedder_description(inputs: ExperimentInputs, config: ManipulateConfig) -> str:
  """What CLIP-δ / CLIP-W embed images with, for reports."""
  if inputs.embedder is None:
    return (f"the original model's pooled `{config.embed_layer}` features (stand-in for CLIP; "
            "`--embedder clip:PATH` for CLIP)")
  return getattr(inputs.embedder, "description", "a custom embedder")


def _nanmean(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


# ---------------------------------------------------------------------------- pruning defence
# ------------------------------------------------------------------------------- data loading
# ------------------------------------------------------------------- feature visualisation
def feature_visualisations(model: nnx.Module, normalize: Callable, params: PyTree, layer: str,
                           channels: Sequence[int], key: jax.Array, *, size: int,
                           steps: int) -> np.ndarray:
  """Activation-maximisation images (:func:`nemjax.manipulate.visualize_channels`) of
  ``channels`` of ``layer`` for the model with variables ``params``.

  The same ``key`` gives the same initial spectra and transforms, so visualisations of the
  original and the fine-tuned model differ only by what the fine-tune changed.

  Returns:
    ``(len(channels), size, size, 3)`` float32 images in [0, 1].
  """
  apply_fn, _ = models.pure_apply(model, taps=(layer,), upto=layer)

  def features_fn(img):  # (B, H, W, 3) in [0, 1] -> (B, h, w, C)
    return apply_fn(params, normalize(img * 255.0))[1][layer]

  return np.asarray(featvis.visualize_channels(features_fn, None, np.asarray(channels), key,
                                               size=size, steps=steps))


def pixel_correlation(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
  """(n,) Pearson correlation of each pair of images ``a[i]``, ``b[i]`` (n, H, W, 3), in float64.

  A correlation with a constant image is undefined: where either image's pixel standard
  deviation is at most ``tolerance`` (pixel units; the default is 1/40 of an 8-bit level in
  [0, 1]), the result is NaN — never ±1 from rounding noise around a flat image.
  """
  if np.shape(a) != np.shape(b) or np.ndim(a) < 2:
    raise ValueError(f"pixel_correlation: expected two (n, ...) image arrays of one shape, got "
                     f"{np.shape(a)} and {np.shape(b)}")
  a = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
  b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  sa, sb = np.sqrt((a * a).mean(1)), np.sqrt((b * b).mean(1))
  ok = (sa > tolerance) & (sb > tolerance)
  den = np.where(ok, sa * sb, 1.0) * a.shape[1]
  return np.where(ok, (a * b).sum(1) / den, np.nan)


# ---------------------------------------------------------------------------- the experiment
def run_experiment(config: ManipulateConfig, inputs: ExperimentInputs, out_dir: str | os.PathLike,
                   *, run_info: Mapping[str, Any] | None = None, progress: bool = True,
                   log: Callable[[str], None] = print,
                   stop_after_evals: int | None = None) -> dict:
  """Run (or resume) one fine-tuning attack and write every output into ``out_dir``.

  Args:
    config: validated settings.
    inputs: model and data (see :class:`ExperimentInputs`).
    out_dir: output directory; re-running with the same configuration resumes from
      ``out_dir/checkpoints/last``, another configuration there is refused (ValueError).
    run_info: extra JSON-serialisable facts stored in ``config.json`` (e.g. paths).
    progress: progress bar.
    log: line printer.
    stop_after_evals: stop after that many evaluations (returns ``{"stopped_at": step}``).

  Returns:
    The summary dict also written to ``summary.json``.
  """
  config.validate()
  t_start = time.time()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  model = inputs.model
  layers = canonical_layers(model, config.layers)
  cfg_json = {"config": config.to_json(), "run": dict(run_info or {}),
              "arch": model.arch, "num_classes": int(model.num_classes),
              "steps_per_epoch": int(inputs.steps_per_epoch),
              "num_probe_images": int(len(inputs.probe_images)),
              "num_heldout_images": int(len(inputs.heldout_images)),
              "num_train_eval_images": int(len(inputs.train_eval_images)),
              "num_decoys": 0 if inputs.decoy_images is None else int(len(inputs.decoy_images))}
  # what the fine-tune depends on (the feature-visualisation settings only change the report)
  trained = {k: v for k, v in cfg_json["config"].items() if not k.startswith("featvis_")}
  fingerprint = ckpt.fingerprint({k: v for k, v in cfg_json.items() if k != "run"} |
                                 {"config": trained} |
                                 {"data": (run_info or {}).get("data_fingerprint")})
  ckpt_root = out / "checkpoints"
  old = ckpt.read_checkpoint_meta(ckpt_root) if ckpt_root.exists() else None
  if old is not None and old.get("fingerprint") != fingerprint:
    stored = out / "config.json"
    if stored.is_file():  # name the fields that differ (the check raises)
      check_record(stored, cfg_json | {"fingerprint": fingerprint},
                   what="a fine-tuning run", remedy="use another --out or delete it")
    raise ValueError(f"{out} holds a run of another configuration; use a new --out or delete it")
  write_json(out / "config.json", cfg_json | {"fingerprint": fingerprint})

  graphdef, params = nnx.split(model)
  evaluate = make_evaluator(model, inputs.normalize, layers, config.embed_layer,
                            config.eval_batch_size)
  ref = make_reference(config, inputs, evaluate, params, log=log)
  log(f"original model: held-out {accuracy_kind(inputs.heldout_labels)} "
      f"{ref.accuracy.heldout:.2f}% ({len(inputs.heldout_images)} images), train "
      f"{ref.accuracy.train:.2f}% ({len(inputs.train_eval_images)} images); "
      f"attacking {sum(int(m.sum()) for m in ref.attacked.values())} channels of "
      f"{', '.join(layers)} ({config.attack}, k={config.k})")
  try:
    result = finetune(config, inputs, ref, evaluate, params, ckpt_root=ckpt_root,
                      fingerprint=fingerprint, progress=progress, log=log,
                      stop_after_evals=stop_after_evals)
  except _Stopped as stop:
    return {"stopped_at": int(stop.args[0])}

  rows, channel_rows, topk_after = attack_metrics(config, ref, result.after, result.accuracy)
  for r in rows:
    r["alpha"] = float(result.alpha)
  if config.featvis_channels:
    shown = report.shown_channels(ref.attacked, config.featvis_channels)
    key = jax.random.key(config.seed)
    vis = {side: {name: feature_visualisations(model, inputs.normalize, p, name, js, key,
                                               size=ref.images.shape[1],
                                               steps=config.featvis_steps)
                  for name, js in shown.items()}
           for side, p in (("before", params), ("after", result.params))}
    corr = {name: pixel_correlation(vis["before"][name], vis["after"][name],
                                    config.featvis_tolerance) for name in shown}
    for r in rows:  # constant visualisations have no correlation: counted, not averaged
      c = corr.get(r["layer"], np.zeros((0,)))
      r["featvis_corr"] = _nanmean(c)
      r["featvis_undefined"] = int(np.isnan(c).sum())
    report.plot_featvis(out / "featvis_before_after.png", vis["before"], vis["after"], shown,
                        corr, title=f"{config.attack}: activation maximisation before / after")
  table = report.format_table(rows, overlap_k=config.overlap_k)
  atomic_write_text(out / "metrics.csv", report.csv_text(rows))
  atomic_write_text(out / "channels.csv", report.csv_text(channel_rows))
  note = (f"\n\n*CLIP-δ / CLIP-W computed with {embedder_description(inputs, config)} as the "
          "image embedding.* "
          f"Means over attacked channels; rankings over {ref.images.shape[0]} images; "
          f"{accuracy_note(inputs)}")
  if config.featvis_channels:
    note += (" Feature-visualisation r: mean pixel correlation of the defined pairs; a pair with "
             "a constant image has none (`featvis_undefined` counts them).")
  if config.attack == "fairwash":
    note += (" DDI / DEO: the model's disparate-impact / equal-opportunity differences between "
             "the two groups on the probe images, averaged over classes.")
  note += "\n"
  atomic_write_text(out / "metrics.md",
                    f"# {config.attack} fine-tuning attack ({model.arch})\n\n" + table + note)
  write_json(out / "history.json", result.history)
  report.plot_topk(out / "topk_before_after.png", ref, topk_after, overlap_k=config.overlap_k,
            class_names=inputs.class_names,
            title=f"{config.attack}: top-{config.overlap_k} images before / after fine-tuning")
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  tuned = nnx.merge(graphdef, result.params)
  checkpoint.save(tuned, out / "model", arch=model.arch, num_classes=int(model.num_classes),
                  extra_meta={"attack": config.attack, "layers": list(layers),
                              "fingerprint": fingerprint}, overwrite=True)
  summary = {"rows": rows, "history": result.history, "steps": result.steps,
             "resumed_from": result.resumed_from, "train_seconds": result.train_seconds,
             "seconds_this_run": time.time() - t_start, "fingerprint": fingerprint,
             "accuracy_note": accuracy_note(inputs)}
  write_json(out / "summary.json", summary)
  return summary
