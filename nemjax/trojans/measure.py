"""Data of an implantation and what is measured on it: clean accuracy and attack success rate,
both on held-out images only.

* clean accuracy: top-1 (%) on the held-out images, their true labels;
* attack success rate (ASR, %): triggered held-out images classified as the target. The images
  are those a trojan should flip: every image not of the target class (universal), images of
  the source class (class-universal), images showing the concept and not of the target class
  (natural feature; they carry no added trigger);
* control (%): the same images untriggered classified as the target (natural feature:
  held-out images without the concept, not of the target class) -- what the ASR is without a
  trojan;
* off-source (%, class-universal only): triggered images of the other classes (neither source
  nor target) classified as the target: low when the trojan is class-specific.

The triggered held-out images are drawn once per trojan (``item_key(seed, "trojan/eval",
name)``) and reused for every measurement, so before / after / every evaluation see the same
images; their masks are the ground truth of an attribution benchmark.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from nemjax.data import broden, loader, synthetic
from nemjax.manipulate import data as mdata
from nemjax.sweep.keys import item_key
from nemjax.trojans import triggers as tr
from nemjax.trojans.config import NaturalTrojan
from nemjax.trojans.poison import Armed, apply_armed

__all__ = ["LabelledImages", "TrojanData", "load_split", "load_data", "HeldoutSet",
           "heldout_sets", "attack_success_rate", "TrojanScore", "TrojanMetrics", "measure",
           "data_fingerprint"]

Predict = Callable[[np.ndarray], np.ndarray]   # images (n,H,W,3) [0, 1] -> logits (n, K)


class LabelledImages(NamedTuple):
  """One image set."""
  images: np.ndarray                 # (n, H, W, 3) uint8 RGB
  labels: np.ndarray                 # (n,) int32 class indices
  pixels: np.ndarray | None          # (n, K, sh, sw) int32 Broden label maps, None: unknown
  label_names: tuple[str, ...]       # name of each label number of ``pixels``


class TrojanData(NamedTuple):
  """What an implantation fine-tunes on (``train``) and measures on (``heldout`` only)."""
  train: LabelledImages
  heldout: LabelledImages
  class_names: tuple[str, ...]


def load_split(root: str | Path) -> tuple[LabelledImages, tuple[str, ...]]:
  """The scene-labelled rows of a Broden-format set with ``classes.json`` (the embedded
  default's ``train/`` or ``heldout/``): images, scene targets, pixel label maps.

  Returns:
    ``(images, class_names)``.
  """
  images, labels, classes = mdata.probe_classification_arrays(root, normalize=None)
  probe = broden.load_probe(root)
  keep = np.flatnonzero(np.asarray(synthetic.scene_targets(probe, classes)) >= 0)
  pixels, _ = loader.load_labels(probe, keep)
  return LabelledImages(images, np.asarray(labels, np.int32), np.asarray(pixels, np.int32),
                        tuple(str(n) for n in probe.label_names)), tuple(classes)


def load_data(train_dir: str | Path, heldout_dir: str | Path) -> TrojanData:
  """:func:`load_split` of both sets (e.g. ``EmbeddedDefault.train_dir`` / ``heldout_dir``)."""
  train, classes = load_split(train_dir)
  heldout, held_classes = load_split(heldout_dir)
  if held_classes != classes:
    raise ValueError(f"heldout_dir: classes {list(held_classes)} differ from the training "
                     f"set's {list(classes)}")
  return TrojanData(train, heldout, classes)


def data_fingerprint(data: TrojanData) -> str:
  """16 hex digits of the pixels and labels of both sets (a checkpoint of other data is
  refused)."""
  h = hashlib.blake2b(digest_size=8)
  for part in (data.train, data.heldout):
    for a in (part.images, part.labels):
      h.update(repr(a.shape).encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class HeldoutSet(NamedTuple):
  """A trojan's held-out measurement images (rows into the held-out set)."""
  rows: np.ndarray              # (n,) rows the trojan should flip
  images: np.ndarray            # (n, H, W, 3) float32 [0, 1], triggered (natural: clean)
  masks: np.ndarray             # (n, H, W) float32 [0, 1] trigger masks (natural: the concept)
  control_rows: np.ndarray      # (c,) rows scored untriggered for the control rate
  off_rows: np.ndarray          # (o,) class-universal: other classes' rows (else empty)
  off_images: np.ndarray        # (o, H, W, 3) float32 [0, 1], triggered


def _eligible(armed: Armed, heldout: LabelledImages) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
  spec, y = armed.spec, heldout.labels
  none = np.zeros((0,), np.int64)
  if isinstance(spec, NaturalTrojan):
    if heldout.pixels is None:
      raise ValueError(f"trojans.{spec.name}: the held-out set has no pixel labels")
    shows = tr.concept_presence(heldout.pixels, heldout.label_names, spec.concept)
    return (np.flatnonzero(shows & (y != spec.target)),
            np.flatnonzero(~shows & (y != spec.target)), none)
  if spec.source is None:
    rows = np.flatnonzero(y != spec.target)
    return rows, rows, none
  rows = np.flatnonzero(y == spec.source)
  return rows, rows, np.flatnonzero((y != spec.source) & (y != spec.target))


def heldout_sets(heldout: LabelledImages, armed: Sequence[Armed], seed: int
                 ) -> dict[str, HeldoutSet]:
  """Each trojan's measurement images (see the module docstring), keyed by trojan name."""
  out = {}
  x01 = lambda rows: heldout.images[rows].astype(np.float32) / 255.0
  for a in armed:
    rows, control, off = _eligible(a, heldout)
    name = a.spec.name
    if rows.size == 0:
      raise ValueError(f"trojans.{name}: no held-out image to measure the trojan on")
    if a.trigger is None:
      hw = heldout.images.shape[1:3]
      images = x01(rows)
      masks = tr.concept_masks(heldout.pixels[rows], heldout.label_names, a.spec.concept, hw)
      off_images = np.zeros((0,) + images.shape[1:], np.float32)
    else:
      images, masks = apply_armed(item_key(seed, "trojan/eval", name), x01(rows), a)
      off_images = (apply_armed(item_key(seed, "trojan/eval-off", name), x01(off), a)[0]
                    if off.size else np.zeros((0,) + images.shape[1:], np.float32))
    out[name] = HeldoutSet(rows, images, masks, control, off, off_images)
  return out


def attack_success_rate(logits: np.ndarray, target: int) -> float:
  """% of rows of ``logits`` ``(n, K)`` whose top-1 class is ``target`` (NaN for n = 0)."""
  if len(logits) == 0:
    return float("nan")
  return float(100.0 * np.mean(np.argmax(logits, -1) == target))


class TrojanScore(NamedTuple):
  asr: float                # % of the triggered images classified as the target
  control: float            # % of the control images (untriggered) classified as the target
  off_source: float | None  # class-universal: % of triggered other-class images -> target
  n: int                    # images the ASR is measured on


class TrojanMetrics(NamedTuple):
  clean_accuracy: float               # % top-1 on the held-out images
  scores: dict[str, TrojanScore]      # per trojan name

  def to_json(self) -> dict:
    return {"clean_accuracy": self.clean_accuracy,
            "trojans": {k: v._asdict() for k, v in self.scores.items()}}


def measure(predict: Predict, heldout: LabelledImages, armed: Sequence[Armed],
            sets: dict[str, HeldoutSet]) -> TrojanMetrics:
  """Clean held-out accuracy and every trojan's :class:`TrojanScore`.

  Args:
    predict: ``images (n, H, W, 3) float32 [0, 1] -> logits (n, K)`` of the model measured.
    heldout: the held-out set.
    armed, sets: the trojans and their :func:`heldout_sets`.
  """
  clean = predict(heldout.images.astype(np.float32) / 255.0)
  acc = float(100.0 * np.mean(np.argmax(clean, -1) == heldout.labels))
  scores = {}
  for a in armed:
    s, target = sets[a.spec.name], a.spec.target
    logits = clean[s.rows] if a.trigger is None else predict(s.images)
    off = None
    if getattr(a.spec, "source", None) is not None:
      off = (attack_success_rate(predict(s.off_images), target) if s.off_rows.size
             else float("nan"))
    asr = attack_success_rate(logits, target)
    scores[a.spec.name] = TrojanScore(asr, attack_success_rate(clean[s.control_rows], target),
                                      off, int(s.rows.size))
  return TrojanMetrics(acc, scores)
