"""Broden-format probe sets: reader, batched loader, synthetic generator.

- ``broden``    ``load_probe(root, categories=None, image_size=None) -> ProbeSet`` (tables only),
                ``decode_label_png`` / ``decode_image``, ``BrodenFormatError``.
- ``loader``    ``iterate_batches(probe, batch_size, ...)`` yielding ``ProbeBatch`` with
                background decoding; ``load_labels`` / ``load_images``.
- ``synthetic`` ``make_probe_set(out_dir, ...)`` (deterministic from the seed), ``scene_targets``.
"""
from nemjax.data import broden, loader
from nemjax.data.broden import (
    BrodenFormatError,
    BrodenMissingFileError,
    ProbeSet,
    decode_image,
    decode_label_png,
    load_probe,
)
from nemjax.data.loader import ProbeBatch, iterate_batches, load_images, load_labels

__all__ = [
    "broden",
    "loader",
    "synthetic",
    "BrodenFormatError",
    "BrodenMissingFileError",
    "ProbeSet",
    "decode_image",
    "decode_label_png",
    "load_probe",
    "ProbeBatch",
    "iterate_batches",
    "load_images",
    "load_labels",
    "make_probe_set",
    "scene_targets",
]


def __getattr__(name: str):
  # `synthetic` is imported lazily so that `python -m nemjax.data.synthetic` runs cleanly.
  if name in ("synthetic", "make_probe_set", "scene_targets"):
    import importlib
    mod = importlib.import_module("nemjax.data.synthetic")
    return mod if name == "synthetic" else getattr(mod, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
