"""What the two probe-corruption sweeps run: frozen configs, checked once, when built.

Each config's ``validate()`` (called by ``__post_init__``, so no config object can hold a bad
value) is the only place a value is checked. A bad field raises ``ValueError("field: ...")``
whose field name is the script's flag without ``--`` (``experiments/_common.as_flag_error``
turns it into the flag). Every default lives here; the scripts read them from the fields.

Units: ε, step sizes and σ are in [0, 1] pixel units everywhere inside the library; the
``/255`` scale exists only at the command line and in reports (:func:`eps_to_255`,
:func:`eps_from_255`, :func:`format_eps`).

Example::

  cfg = PGDSweepConfig(layers=("layer4",), attack=PGDAttack(eps=(eps_from_255(4),), steps=10),
                       probe_pass=ProbePass(batch_size=64))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from nemjax.attacks.noise import NOISE_KINDS
from nemjax.preprocess import PIXEL_LEVELS, eps_from_255, eps_to_255, format_eps
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect.driver import check_options
from nemjax.sweep.delivery import DELIVERY_MODES
from nemjax.sweep.poison import POISON_ORDERS
from nemjax.sweep.units import DEFAULT_MIN_IOU

__all__ = ["MODES", "MASK_SOURCES", "PIXEL_LEVELS", "eps_to_255", "eps_from_255", "format_eps",
           "ProbePass", "PGDAttack", "PGDSweepConfig", "NoiseSweepConfig", "field_default"]

MODES = ("u2", "targeted", "u1", "noise")
MASK_SOURCES = ("labels", "clean")
def field_default(cls: type, name: str) -> Any:
  """The default of dataclass ``cls``'s field ``name`` (what a script shows as its flag's)."""
  for f in dataclasses.fields(cls):
    if f.name == name:
      if f.default is not dataclasses.MISSING:
        return f.default
      if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
      raise ValueError(f"{cls.__name__}.{name} has no default")
  raise ValueError(f"{cls.__name__} has no field {name!r}")


def _positive_ints(obj: Any, names: Sequence[str]) -> None:
  for name in names:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")


def _check_min_iou_seed(min_iou: float, seed: int) -> None:
  if not 0 <= min_iou < 1:
    raise ValueError(f"min_iou: must lie in [0, 1), got {min_iou}")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")


@dataclasses.dataclass(frozen=True)
class ProbePass:
  """How a sweep dissects the probe set and delivers corrupted images to the model."""
  batch_size: int = 32          # probe images per forward pass
  top_fraction: float = quantile_lib.DEFAULT_TOP_FRACTION  # η of the thresholds
  quantile_method: str = "linear"  # numpy.quantile method of the thresholds
  delivery: str = "float"       # 'float' | 'uint8' | 'jpeg'
  jpeg_quality: int = 90        # of 'jpeg' delivery

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    """ValueError ``"field: ..."`` for the first bad field."""
    check_options(top_fraction=self.top_fraction, quantile_method=self.quantile_method,
                  batch_size=self.batch_size)
    if self.delivery not in DELIVERY_MODES:
      raise ValueError(f"delivery: must be one of {DELIVERY_MODES}, got {self.delivery!r}")
    if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) \
        or not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality: must be an integer in [1, 100], got {self.jpeg_quality!r}")


@dataclasses.dataclass(frozen=True)
class PGDAttack:
  """The L∞ PGD attack of every unit: radii, steps, step size (all in [0, 1] pixel units)."""
  eps: tuple[float, ...] = (2 / PIXEL_LEVELS, 4 / PIXEL_LEVELS, 6 / PIXEL_LEVELS)
  steps: int = 10
  step_size: float | None = None  # None: 2·ε/steps

  def __post_init__(self) -> None:
    object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
    self.validate()

  def validate(self) -> None:
    """ValueError ``"field: ..."`` for the first bad field."""
    if not self.eps or any(not 0 < e <= 1 for e in self.eps):
      raise ValueError("eps: every ε must lie in (0, 1] of the pixel range, i.e. (0, 255]/255; "
                       f"got {', '.join(format_eps(e) for e in self.eps) or 'none'}")
    if len(set(self.eps)) != len(self.eps):
      raise ValueError(f"eps: values repeat: {', '.join(format_eps(e) for e in self.eps)}")
    _positive_ints(self, ("steps",))
    if self.step_size is not None and not 0 < self.step_size <= 1:
      raise ValueError("step_size: must lie in (0, 1] of the pixel range, i.e. (0, 255]/255; "
                       f"got {format_eps(self.step_size)}")


@dataclasses.dataclass(frozen=True)
class PGDSweepConfig:
  """What the act-avg PGD sweep runs. Everything that changes results is in ``config.json``."""
  layers: tuple[str, ...]
  units: Mapping[str, tuple[int, ...]] | None = None  # explicit units per layer (bypass min_iou)
  num_units: int = 8            # else: this many eligible units per layer, seeded choice
  min_iou: float = DEFAULT_MIN_IOU  # eligible: labelled with clean IoU > min_iou
  modes: tuple[str, ...] = ("u2", "targeted", "noise")
  attack: PGDAttack = PGDAttack()
  mask_source: str = "labels"   # 'labels' (ground truth) or 'clean' (Eq. 8)
  poison_fraction: float = 0.1  # cap on poisoned images / N
  poison_order: str = "concept"  # 'concept' (the paper's code) or 'activation'
  probe_pass: ProbePass = ProbePass()
  seed: int = 0
  units_per_call: int = 4       # units attacked in one compiled call

  def __post_init__(self) -> None:
    object.__setattr__(self, "layers", tuple(self.layers))
    object.__setattr__(self, "modes", tuple(self.modes))
    if self.units is not None:
      object.__setattr__(self, "units", {k: tuple(int(u) for u in v)
                                         for k, v in self.units.items()})
    self.validate()

  def validate(self) -> None:
    """ValueError ``"field: ..."`` for the first bad field (nothing is loaded or computed)."""
    if not self.layers:
      raise ValueError("layers: no layers to attack")
    if not isinstance(self.attack, PGDAttack) or not isinstance(self.probe_pass, ProbePass):
      raise ValueError("attack and probe_pass must be PGDAttack and ProbePass objects")
    bad = [m for m in self.modes if m not in MODES]
    if bad or not self.modes:
      raise ValueError(f"modes: must be among {list(MODES)}, got {list(self.modes)}")
    if self.mask_source not in MASK_SOURCES:
      raise ValueError(f"mask_source: must be one of {list(MASK_SOURCES)}, "
                       f"got {self.mask_source!r}")
    if not 0 < self.poison_fraction <= 1:
      raise ValueError(f"poison_fraction: must lie in (0, 1], got {self.poison_fraction}")
    if self.poison_order not in POISON_ORDERS:
      raise ValueError(f"poison_order: must be one of {list(POISON_ORDERS)}, "
                       f"got {self.poison_order!r}")
    _check_min_iou_seed(self.min_iou, self.seed)
    _positive_ints(self, ("num_units", "units_per_call"))
    if self.units is not None:
      extra = sorted(set(self.units) - set(self.layers))
      if extra:
        raise ValueError(f"units: given for layers not attacked: {extra}")
      neg = [u for us in self.units.values() for u in us if u < 0]
      if neg or not all(self.units.values()):
        raise ValueError("units: every listed layer needs unit indices >= 0")

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["units"] = None if self.units is None else {k: list(v) for k, v in self.units.items()}
    return d


@dataclasses.dataclass(frozen=True)
class NoiseSweepConfig:
  """What the random-noise sweep runs (σ in [0, 1] pixel units)."""
  layers: tuple[str, ...]
  sigmas: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.05)
  fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
  kinds: tuple[str, ...] = NOISE_KINDS
  min_iou: float = DEFAULT_MIN_IOU
  probe_pass: ProbePass = ProbePass()
  seed: int = 0

  KEY_FIELDS = ("layers", "sigmas", "fractions", "kinds", "seed")
  """Fields that are part of a results row's key (with ``probe_pass.delivery``): other values
  add rows to the same table rather than conflict with it."""

  def __post_init__(self) -> None:
    for name in ("layers", "sigmas", "fractions", "kinds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    """ValueError ``"field: ..."`` for the first bad field (nothing is loaded or computed)."""
    if not self.layers:
      raise ValueError("layers: no layers to dissect")
    if not isinstance(self.probe_pass, ProbePass):
      raise ValueError("probe_pass must be a ProbePass")
    bad = [k for k in self.kinds if k not in NOISE_KINDS]
    if bad or not self.kinds:
      raise ValueError(f"kinds: unknown noise kinds {bad}; expected among {NOISE_KINDS}")
    if not self.sigmas or any(not 0 < s <= 1 for s in self.sigmas):
      raise ValueError(f"sigmas: every σ must lie in (0, 1] (pixel units), "
                       f"got {list(self.sigmas)}")
    if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
      raise ValueError(f"fractions: must lie in (0, 1], got {list(self.fractions)}")
    _check_min_iou_seed(self.min_iou, self.seed)

  def record(self) -> dict:
    """The settings outside the row key (what ``config.json`` guards across re-runs)."""
    probe_pass = {k: v for k, v in dataclasses.asdict(self.probe_pass).items()
                  if k != "delivery"}
    return {"min_iou": self.min_iou, "probe_pass": probe_pass}
