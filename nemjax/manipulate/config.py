"""Settings of the fine-tuning experiments, each default said once, and what a run is given.

:class:`ManipulateConfig` is one fine-tuning attack (``experiments/manipulate.py``),
:class:`PruneDefenceConfig` the pruning defence around it (``experiments/prune_defence.py``).
Both (and :class:`DataSources`) are frozen and check every value once, when they are built
(``__post_init__`` calls ``validate()``, the only place values are checked): a bad one is a ``ValueError("field: ...")``
naming the field (``alpha.init``, ``data.val_size``, ... for nested settings), which the CLIs
turn into a one-line error naming the flag. :class:`ExperimentInputs` holds the model and the
image sets a run works on (:mod:`nemjax.manipulate.inputs` assembles it from paths).

Defaults that depend on where the model comes from (:class:`Schedule`): the papers'
(:data:`PAPER_SCHEDULE`: Adam lr 1e-5, 5 epochs, one evaluation per epoch) for your own model,
:data:`EMBEDDED_SCHEDULE` for the embedded SmallCNN (lr 3e-4, the largest rate at which
fine-tuning alone still leaves its rankings almost unchanged) and
:data:`PRUNE_DEFENCE_SCHEDULE` for the pruning defence.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from nemjax.manipulate.alpha import AlphaConfig
from nemjax.manipulate.train import PAPER_LEARNING_RATE

__all__ = ["ATTACKS", "LOSS_SCALES", "NORMALIZATIONS", "Schedule", "PAPER_SCHEDULE",
           "EMBEDDED_SCHEDULE", "PRUNE_DEFENCE_SCHEDULE", "EMBEDDED_LAYERS",
           "FAIRWASH_GROUP_CONCEPT", "AlphaConfig",
           "FeatVisReport", "DataSources", "ManipulateConfig", "PruneDefenceConfig",
           "ExperimentInputs", "TrainBatches", "embedded_layers"]

ATTACKS = ("push-down", "push-up", "fairwash")
LOSS_SCALES = ("relative", "sum")
NORMALIZATIONS = ("netdissect", "imagenet")
TrainBatches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Learning rate, length and evaluation cadence of a fine-tune."""
  learning_rate: float    # Adam
  epochs: int             # passes over the training stream
  eval_every: int | None  # steps between evaluations (None: once per epoch)


PAPER_SCHEDULE = Schedule(learning_rate=PAPER_LEARNING_RATE, epochs=5, eval_every=None)
EMBEDDED_SCHEDULE = Schedule(learning_rate=3e-4, epochs=3, eval_every=15)
PRUNE_DEFENCE_SCHEDULE = Schedule(learning_rate=1e-3, epochs=1, eval_every=10)
# the embedded SmallCNN's attacked layer per attack: block4, or for fairwashing the block4 conv
# before its ReLU (the groups' mean and spread need signed activations)
FAIRWASH_GROUP_CONCEPT = "red"   # fairwash: group 1 = probe images showing this label
EMBEDDED_LAYERS = {"push-down": ("block4",), "push-up": ("block4",),
                   "fairwash": ("features.12",)}


def embedded_layers(attack: str) -> tuple[str, ...]:
  """The embedded default's attacked layers for ``attack``."""
  return EMBEDDED_LAYERS.get(attack, EMBEDDED_LAYERS["push-down"])


def _at_least(obj: Any, names: Sequence[str], low: int = 1) -> None:
  for name in names:
    v = getattr(obj, name)
    if v is not None and v < low:
      raise ValueError(f"{name}: must be >= {low}, got {v}")


def _nested(prefix: str, settings: Any) -> None:
  """``settings.validate()`` with its field names prefixed (``alpha.init: ...``)."""
  try:
    settings.validate()
  except ValueError as e:
    raise ValueError(f"{prefix}.{e}") from None


@dataclasses.dataclass(frozen=True)
class FeatVisReport:
  """Activation-maximisation images of attacked channels, original vs fine-tuned (report only;
  the transforms are :class:`nemjax.manipulate.featvis.FeatVisConfig`)."""
  channels: int = 4         # channels per layer visualised (0: off)
  steps: int = 128          # activation-maximisation steps per visualisation
  tolerance: float = 1e-4   # pixel std below which a visualisation is "constant"

  def validate(self) -> None:
    _at_least(self, ("channels",), 0)
    _at_least(self, ("steps",))
    if not self.tolerance >= 0:
      raise ValueError(f"tolerance: must be >= 0, got {self.tolerance}")


@dataclasses.dataclass(frozen=True)
class DataSources:
  """Where the model and the image sets come from (see :func:`nemjax.manipulate.inputs.load_inputs`).

  No ``probe``/``weights``: the embedded default (built into ``cache``). Otherwise the held-out
  images are ``val_folder`` and the training stream ``train_folder`` or the probe images.
  """
  probe: Path | None = None          # Broden-format probe directory
  weights: Path | None = None        # orbax model checkpoint
  normalize: str = "netdissect"      # input normalisation the model expects
  train_folder: Path | None = None   # class-per-subfolder training stream
  val_folder: Path | None = None     # held-out images (accuracy, α rule)
  val_unlabelled: bool = False       # val_folder images carry no labels: agreement instead
  val_size: int | None = None        # fixed random subset of the held-out images
  train_eval_size: int = 200         # training-stream images whose accuracy is reported
  decoy_class: str | None = None     # push-up: decoys = training images of this class
  decoy_folder: Path | None = None   # push-up: decoys = the images in this folder
  num_decoys: int = 100              # push-up: decoy set size
  group_concept: str | None = None   # fairwash: group 1 = probe images showing this label
  embedder: str = "model"            # CLIP-δ/W embedder spec (nemjax.metrics.load_embedder)
  cache: Path = Path("cache/embedded")  # the embedded default's cache

  def __post_init__(self) -> None:
    self.validate()

  @property
  def embedded(self) -> bool:
    return self.probe is None

  def validate(self) -> None:
    """``ValueError("field: ...")`` for the first bad source (run once, when built; whether
    the attack needs decoys or groups is :meth:`ManipulateConfig.validate`'s check)."""
    if (self.probe is None) != (self.weights is None):
      raise ValueError("probe: give both --probe and --weights, or neither (embedded default)")
    if not self.embedded and self.val_folder is None:
      raise ValueError("val_folder: --probe/--weights need --val-folder: accuracy (and the α "
                       "rule) is measured only on held-out images no fine-tuning step or ranking "
                       "sees (--val-unlabelled for images without class labels: agreement with "
                       "the original model)")
    if self.val_unlabelled and self.val_folder is None:
      raise ValueError("val_unlabelled: applies to --val-folder")
    if self.train_folder is not None and self.val_folder is None:
      raise ValueError("train_folder: needs --val-folder (held-out images, same class "
                       "sub-directories)")
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f"normalize: must be one of {NORMALIZATIONS}, got {self.normalize!r}")
    _at_least(self, ("val_size", "train_eval_size", "num_decoys"))
    for name in ("train_folder", "val_folder", "decoy_folder"):
      d = getattr(self, name)
      if d is not None and not Path(d).is_dir():
        raise ValueError(f"{name}: directory not found: {d}")

  def to_json(self) -> dict:
    return {k: str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class ManipulateConfig:
  """Settings of one fine-tuning attack, checked when built (JSON: :meth:`to_json`)."""
  attack: str = "push-down"                               # push-down | push-up | fairwash
  layers: tuple[str, ...] = EMBEDDED_LAYERS["push-down"]  # attacked layers (names or aliases)
  channels: Mapping[str, tuple[int, ...]] | None = None   # {layer: channels}; None/missing: all
  k: int = 10                            # top-k set size (attack and CLIP metrics)
  overlap_k: int = 5                     # top-n sets compared for the overlap / PNG grid
  epochs: int = PAPER_SCHEDULE.epochs
  learning_rate: float = PAPER_SCHEDULE.learning_rate
  eval_every: int | None = PAPER_SCHEDULE.eval_every
  batch_size: int = 16                   # training-stream images per step
  attack_batch_size: int = 16            # ranking-set images per step
  decoys_per_step: int = 8               # push-up: decoy images per step
  alpha: AlphaConfig = AlphaConfig()     # the dynamic α rule (or a fixed α)
  loss_scale: str = "relative"           # relative | sum
  train_from: str | None = None          # first module to train (None: all parameters)
  embed_layer: str = "avgpool"           # pooled features used as the CLIP stand-in
  eval_batch_size: int = 50              # images per forward pass when evaluating
  featvis: FeatVisReport = FeatVisReport()
  data: DataSources = DataSources()      # checked when built
  arch: str | None = None                # the model's architecture: layer names checked on it
  seed: int = 0

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    """``ValueError("field: ...")`` naming the first bad setting (run once, when built)."""
    if self.attack not in ATTACKS:
      raise ValueError(f"attack: must be one of {ATTACKS}, got {self.attack!r}")
    if not self.layers:
      raise ValueError("layers: give at least one layer to attack")
    _at_least(self, ("k", "epochs", "eval_every", "batch_size", "attack_batch_size",
                     "decoys_per_step", "eval_batch_size"))
    if not 1 <= self.overlap_k <= self.k:
      raise ValueError(f"overlap_k: must be in [1, k={self.k}], got {self.overlap_k}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
    if self.loss_scale not in LOSS_SCALES:
      raise ValueError(f"loss_scale: must be one of {LOSS_SCALES}, got {self.loss_scale!r}")
    _nested("alpha", self.alpha)
    _nested("featvis", self.featvis)
    if self.attack == "push-up" and (self.data.decoy_class is None) == (
        self.data.decoy_folder is None):
      raise ValueError("data.decoy_class: push-up needs exactly one of --decoy-class or "
                       "--decoy-folder")
    if self.attack == "fairwash" and not self.data.group_concept:
      raise ValueError("data.group_concept: fairwash needs a group concept")
    for layer, chans in (self.channels or {}).items():
      if layer not in self.layers:
        raise ValueError(f"channels: given for {layer!r}, which is not an attacked layer "
                         f"{list(self.layers)}")
      if not chans or any(c < 0 for c in chans):
        raise ValueError(f"channels: those of {layer!r} must be a non-empty list of "
                         "indices >= 0")
    if self.arch is not None:
      from nemjax.models import registry  # pylint: disable=import-outside-toplevel
      for name, value in (("layers", self.layers), ("train_from", (self.train_from,)),
                          ("embed_layer", (self.embed_layer,))):
        for layer in value:
          if layer is not None:
            try:
              registry.canonical_layer(self.arch, layer)
            except ValueError as e:
              raise ValueError(f"{name}: {e}") from None

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d.update(layers=list(self.layers), alpha=dataclasses.asdict(self.alpha),
             featvis=dataclasses.asdict(self.featvis), data=self.data.to_json(),
             channels=None if self.channels is None else {
                 k: list(v) for k, v in self.channels.items()})
    return d


@dataclasses.dataclass(frozen=True)
class PruneDefenceConfig:
  """The pruning defence (:func:`nemjax.manipulate.defence.run_prune_defence`): prune at each
  rate, recover by distillation, run ``attack`` again; checked when built."""
  attack: ManipulateConfig = ManipulateConfig(
      learning_rate=PRUNE_DEFENCE_SCHEDULE.learning_rate, epochs=PRUNE_DEFENCE_SCHEDULE.epochs,
      eval_every=PRUNE_DEFENCE_SCHEDULE.eval_every)
  l1_rates: tuple[float, ...] = (0.5, 0.875)          # global L1 unstructured pruning rates
  vulnerability_rates: tuple[float, ...] = (0.25, 0.5)  # share of the most vulnerable channels
  recover_steps: int = 15                              # distillation-only steps after pruning

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    """``ValueError("field: ...")`` naming the first bad setting (``attack`` checked itself
    when built)."""
    for name in ("l1_rates", "vulnerability_rates"):
      bad = [r for r in getattr(self, name) if not 0 < r < 1]
      if bad:
        raise ValueError(f"{name}: must lie in (0, 1), got {bad}")
    _at_least(self, ("recover_steps",))
    if self.attack.attack != "push-down":
      raise ValueError(f"attack: the pruning defence runs push-down, got {self.attack.attack!r}")
    if len(self.attack.layers) != 1:
      raise ValueError("layers: the pruning defence attacks one layer at a time")

  def to_json(self) -> dict:
    return {"config": self.attack.to_json(), "l1_rates": list(self.l1_rates),
            "vulnerability_rates": list(self.vulnerability_rates),
            "recover_steps": self.recover_steps}


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
