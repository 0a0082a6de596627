"""PRNG keys of the sweeps' random draws, keyed by names, never by list position.

Every draw of a sweep (which units are attacked, U2 / targeted targets, noise) starts from
``jax.random.key(seed)`` and folds in, one by one, a purpose tag and the names of the item it
belongs to -- architecture, layer *name*, unit, mode, ε -- so adding a layer, a unit or an ε
to a sweep never changes another item's draw. Strings are folded in as the CRC-32 of their
UTF-8 bytes (stable across processes and Python versions, unlike ``hash()``); ints as
themselves; ε, σ and fractions as exact integer codes (:func:`eps_code`, :func:`micro_code`).

Example::

  key = item_key(0, "pgd/target", "resnet18", "layer4", 17, "u2")
  key2 = item_key(0, "pgd/noise", "resnet18", "layer4", 17, eps_code(4 / 255))
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

from nemjax.preprocess import eps_to_255

__all__ = ["name_code", "eps_code", "micro_code", "item_key"]


def name_code(name: str) -> int:
  """CRC-32 of ``name``'s UTF-8 bytes, in [0, 2³²)."""
  return zlib.crc32(name.encode("utf-8"))


def eps_code(eps: float) -> int:
  """ε in [0, 1] as an integer: its /255 value in thousandths (exact for ε in 1/1000 steps of
  /255)."""
  return int(round(eps_to_255(eps) * 1000))


def micro_code(x: float) -> int:
  """A σ or a fraction as an integer: ``round(x·10⁶)``."""
  return int(round(float(x) * 1e6))


def item_key(seed: int, *parts: str | int) -> jax.Array:
  """``fold_in`` of each part (strings by :func:`name_code`, ints as themselves) into
  ``jax.random.key(seed)``.

  Args:
    seed: the sweep's seed (int >= 0).
    parts: strings (tags, architecture, layer, mode, noise kind) and ints in [0, 2³²)
      (units, :func:`eps_code` values).

  Returns:
    A typed PRNG key.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"item_key: seed must be an int >= 0, got {seed!r}")
  key = jax.random.key(int(seed))
  for p in parts:
    if isinstance(p, str):
      v = name_code(p)
    elif isinstance(p, (int, np.integer)) and not isinstance(p, bool) and 0 <= p < 2 ** 32:
      v = int(p)
    else:
      raise ValueError(f"item_key: parts must be strings or ints in [0, 2**32), got {p!r} "
                       f"in {parts!r}")
    key = jax.random.fold_in(key, np.uint32(v))
  return key
