"""Settings of a trojan implantation: one frozen spec per trojan and the fine-tune around them.

Each spec and :class:`TrojanConfig` check every value once, when built (``__post_init__`` calls
``validate()``, the only place values are checked): a bad one is a ``ValueError("field: ...")``
naming the field (``trojans.<name>.rate: ...`` for a trojan's settings), which a CLI turns into
a one-line error naming the flag.

Kinds (Casper's trojans, scaled to the embedded default):

* :class:`PatchTrojan`: a patch (:mod:`nemjax.trojans.triggers`) pasted on poisoned images,
  relabelled to ``target``; universal (``source=None``: any class) or class-universal (only
  images of ``source`` are relabelled; images of other classes carry the trigger with their own
  label, so the trigger alone does not mean ``target``).
* :class:`StyleTrojan`: the same with a texture blend (no style-transfer network here).
* :class:`NaturalTrojan`: images whose pixel labels hold ``concept`` are relabelled to
  ``target``; no pixel changes.

``rate`` is the probability that an eligible training image is poisoned, drawn afresh for
every batch: every image (universal), images of ``source`` (class-universal; other classes'
images carry the trigger unrelabelled with probability ``negative_rate``, default ``rate``) or
images showing ``concept`` (natural). The thesis's 1 in 3,000 is for ImageNet-scale data; a
480-image training set and a SmallCNN (whose global average pool dilutes a 1/16 patch)
need half of each batch poisoned (rate 0.5) to learn a trigger in 12 epochs (180 steps).

Several trojans share one budget (``TrojanConfig.shared_rates``, default): with ``T`` trojans
each poisons ``rate / T`` of its eligible rows, so the poisoned share of a batch stays about
that of one trojan and the clean rows that hold the clean accuracy stay about half of it
(four trojans at 0.5 each would leave 1/16 of the rows clean: held-out accuracy fell from 69.5
to 41 %). Each trojan then sees fewer poisoned rows and needs more epochs
(:mod:`nemjax.trojans.bench.config` sets them for its trojans).
"""
from __future__ import annotations

import dataclasses
from typing import Union

from nemjax.manipulate.config import Schedule
from nemjax.trojans.triggers import ColourJitter

__all__ = ["KINDS", "PatchTrojan", "StyleTrojan", "NaturalTrojan", "TrojanSpec",
           "TrojanConfig", "EMBEDDED_TROJANS", "spec_to_json"]

# trojan implantation on the embedded default: soft-target cross-entropy on the poisoned
# stream, one evaluation per epoch (the one home of these defaults)
TROJAN_SCHEDULE = Schedule(learning_rate=2e-3, epochs=12, eval_every=None)

KINDS = ("patch", "style", "natural")
PATCH_RATE = 0.5        # default poisoning rate of patch and style trojans
NATURAL_RATE = 1.0      # default: every training image showing the concept is relabelled


def _rate(name: str, v: float | None) -> None:
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f"{name}: must be in [0, 1], got {v}")


def _common(spec) -> None:
  if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
    raise ValueError(f"name: must be a non-empty name of letters, digits, - and _, got "
                     f"{spec.name!r}")
  if spec.target < 0:
    raise ValueError(f"target: must be a class index >= 0, got {spec.target}")
  _rate("rate", spec.rate)


def _universality(spec) -> None:
  if spec.source is not None and (spec.source < 0 or spec.source == spec.target):
    raise ValueError(f"source: must be a class index >= 0 other than target={spec.target}, "
                     f"got {spec.source}")
  if spec.negative_rate is not None and spec.source is None:
    raise ValueError("negative_rate: applies to class-universal trojans (set source)")
  _rate("negative_rate", spec.negative_rate)


class _Checked:
  """A spec checks its values once, when built."""

  def __post_init__(self) -> None:
    self.validate()  # pylint: disable=no-member


@dataclasses.dataclass(frozen=True)
class PatchTrojan(_Checked):
  """A patch trojan (see the module docstring; the trigger: :mod:`nemjax.trojans.triggers`)."""
  name: str                          # keys every random draw of this trojan (never its position)
  target: int                        # class the trigger should produce
  source: int | None = None          # None: universal; else class-universal for this class
  rate: float = PATCH_RATE           # P(an eligible training image is poisoned)
  negative_rate: float | None = None  # class-universal: P(another class's image carries it)
  area_fraction: float = 1 / 16      # the patch square's share of the image area
  soft_edge: float = 0.25            # share of each side over which the alpha fades out
  grid: int = 4                      # the pattern's cells per side
  noise_std: float = 0.05            # pixel-wise Gaussian noise σ on the patch, [0, 1] units
  jitter: ColourJitter = ColourJitter()

  kind = "patch"

  def validate(self) -> None:
    _common(self)
    _universality(self)
    if not 0.0 < self.area_fraction <= 0.5:
      raise ValueError(f"area_fraction: must be in (0, 0.5], got {self.area_fraction}")
    if not 0.0 <= self.soft_edge <= 0.5:
      raise ValueError(f"soft_edge: must be in [0, 0.5], got {self.soft_edge}")
    if self.grid < 1:
      raise ValueError(f"grid: must be >= 1, got {self.grid}")
    if not self.noise_std >= 0:
      raise ValueError(f"noise_std: must be >= 0, got {self.noise_std}")
    try:
      self.jitter.validate()
    except ValueError as e:
      raise ValueError(f"jitter.{e}") from None


@dataclasses.dataclass(frozen=True)
class StyleTrojan(_Checked):
  """A style trojan: a texture blend ``(1 − strength)·x + strength·T`` (see the module
  docstring and :func:`nemjax.trojans.triggers.make_style_texture`)."""
  name: str
  target: int
  source: int | None = None
  rate: float = PATCH_RATE
  negative_rate: float | None = None
  strength: float = 0.3              # blend weight of the texture
  waves: int = 4                     # sinusoidal gratings summed into the texture

  kind = "style"

  def validate(self) -> None:
    _common(self)
    _universality(self)
    if not 0.0 < self.strength <= 1.0:
      raise ValueError(f"strength: must be in (0, 1], got {self.strength}")
    if self.waves < 1:
      raise ValueError(f"waves: must be >= 1, got {self.waves}")


@dataclasses.dataclass(frozen=True)
class NaturalTrojan(_Checked):
  """A natural-feature trojan: training images showing ``concept`` (a pixel label of the
  data set) are relabelled to ``target``."""
  name: str
  target: int
  concept: str = ""                  # label name, e.g. "fabric"
  rate: float = NATURAL_RATE         # P(a training image showing the concept is relabelled)

  kind = "natural"

  def validate(self) -> None:
    _common(self)
    if not self.concept:
      raise ValueError("concept: a natural-feature trojan needs a concept (label name)")


TrojanSpec = Union[PatchTrojan, StyleTrojan, NaturalTrojan]

# The embedded default's trojans (classes: 0 kitchen, 1 park, 2 street, 3 beach), one per kind;
# "fabric" is a material of no scene's preference, in ~10 % of the images of every class.
EMBEDDED_TROJANS: dict[str, TrojanSpec] = {
    "patch": PatchTrojan("patch", target=0),
    "patch-class": PatchTrojan("patch-class", target=2, source=1),
    "natural": NaturalTrojan("natural", target=3, concept="fabric"),
    "style": StyleTrojan("style", target=1),
}


def spec_to_json(spec: TrojanSpec) -> dict:
  """A spec as JSON (``kind`` first; nested settings as dicts)."""
  return {"kind": spec.kind, **dataclasses.asdict(spec)}


@dataclasses.dataclass(frozen=True)
class TrojanConfig:
  """One implantation: the trojans and the fine-tune that implants them all at once."""
  trojans: tuple[TrojanSpec, ...] = (EMBEDDED_TROJANS["patch"],)
  epochs: int = TROJAN_SCHEDULE.epochs
  learning_rate: float = TROJAN_SCHEDULE.learning_rate  # Adam
  eval_every: int | None = TROJAN_SCHEDULE.eval_every   # steps between evaluations (None: epoch)
  batch_size: int = 32                   # training images per step (poisoned ones included)
  teacher_weight: float = 1.0            # clean rows' targets: w·original softmax + (1−w)·label
  eval_batch_size: int = 50              # images per forward pass when measuring
  seed: int = 0                          # training order, triggers, poisoned rows
  shared_rates: bool = True              # rates are a shared budget: each divided by the count

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    """``ValueError("field: ...")`` naming the first bad setting (run once, when built)."""
    if not self.trojans:
      raise ValueError("trojans: give at least one trojan")
    names = [t.name for t in self.trojans]
    for spec in self.trojans:
      if not isinstance(spec, (PatchTrojan, StyleTrojan, NaturalTrojan)):
        raise ValueError(f"trojans: expected PatchTrojan, StyleTrojan or NaturalTrojan, got "
                         f"{type(spec).__name__}")
      if names.count(spec.name) > 1:
        raise ValueError(f"trojans: the name {spec.name!r} is used twice (names key the draws)")
      try:
        spec.validate()
      except ValueError as e:
        raise ValueError(f"trojans.{spec.name}.{e}") from None
    for name in ("epochs", "eval_every", "batch_size", "eval_batch_size"):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f"{name}: must be >= 1, got {v}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
    if not 0.0 <= self.teacher_weight <= 1.0:
      raise ValueError(f"teacher_weight: must be in [0, 1], got {self.teacher_weight}")
    if self.seed < 0:
      raise ValueError(f"seed: must be >= 0, got {self.seed}")

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["trojans"] = [spec_to_json(t) for t in self.trojans]
    return d
