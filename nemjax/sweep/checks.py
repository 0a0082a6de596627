"""Checks of what a sweep will attack, made before any work starts: layer names, spatial
activation maps, unit ranges, ``LAYER:UNIT`` flag values.

Shapes come from ``jax.eval_shape``, so a model with ``jax.ShapeDtypeStruct`` leaves (e.g.
:func:`nemjax.models.registry.build_abstract`) is enough: nothing is computed or trained.

Example::

  from nemjax.models import registry
  widths = spatial_widths(registry.build_abstract("smallcnn", 4), ["block3"], (224, 224))
  check_units({"block3": (0, 5)}, widths)          # {"block3": 64}: fine
"""
from __future__ import annotations

from typing import Mapping, Sequence

from nemjax import models


def spatial_widths(model, layers: Sequence[str], image_size: tuple[int, int]) -> dict[str, int]:
  """``{layer: number of units}``; ValueError if a layer has no (h, w, U) activation map
  (act-avg and the dissection's masks need one)."""
  shapes = models.activation_shapes(model, layers, image_size)
  flat = {layer: s for layer, s in shapes.items() if len(s) != 3}
  if flat:
    raise ValueError(f"layers without a spatial activation map (per-image shapes {flat}); "
                     "pick convolutional layers")
  return {layer: s[-1] for layer, s in shapes.items()}


def parse_units(specs: Sequence[str], flag: str = "--units") -> dict[str, tuple[int, ...]]:
  """``["block3:0,5", "block4:7"]`` -> ``{"block3": (0, 5), "block4": (7,)}``."""
  units: dict[str, tuple[int, ...]] = {}
  for spec in specs:
    layer, sep, us = spec.partition(":")
    try:
      parsed = tuple(int(u) for u in us.split(",") if u)
    except ValueError:
      parsed = ()
    if not sep or not layer or not parsed:
      raise ValueError(f"{flag} entry {spec!r} must be LAYER:U1,U2,...")
    units[layer] = parsed
  return units


def parse_layer_unit(spec: str, flag: str = "--export-unit") -> tuple[str, int]:
  """``"block3:5"`` -> ``("block3", 5)``."""
  layer, sep, unit = spec.partition(":")
  if not sep or not layer or not unit.isdigit():
    raise ValueError(f"{flag} must be LAYER:UNIT (e.g. block3:5), got {spec!r}")
  return layer, int(unit)


def check_units(units: Mapping[str, Sequence[int]], widths: Mapping[str, int],
                flag: str = "--units") -> None:
  """ValueError unless every layer of ``units`` is in ``widths`` and every unit in range."""
  unknown = sorted(set(units) - set(widths))
  if unknown:
    raise ValueError(f"{flag} names layers not attacked: {unknown}; attacked layers are "
                     f"{list(widths)}")
  for layer, us in units.items():
    bad = [u for u in us if not 0 <= u < widths[layer]]
    if bad:
      raise ValueError(f"{flag}: units {bad} out of range for layer {layer} with "
                       f"{widths[layer]} units")
