"""Attribution maps of any :mod:`nemjax.explain` method for a set of images and a model, saved
as ``.npy`` and a PNG grid (``experiments/attribute.py``: what a Captum user runs every day).

::

  cfg = AttributeConfig(method="integrated_gradients", options={"n_steps": 32})
  summary = run_attribution(cfg, model, images_uint8, out_dir, names=[...])

Targets: ``"pred"`` (each image's predicted class, the default) or a class index. Writes
``maps.npy`` (n, h, w) float32, ``targets.npy``, ``images.txt`` (one name per row),
``grid.png`` (image / map pairs) and ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import explain, models
from nemjax.files import atomic_write_bytes, atomic_write_text, write_json

__all__ = ["LAYER_METHODS", "KEYED_METHODS", "AttributeConfig", "run_attribution"]

LAYER_METHODS = ("grad_cam", "grad_cam_heo", "lrp_layer", "guided_grad_cam")
KEYED_METHODS = ("smoothgrad", "gradient_shap", "feature_permutation",
                 "shapley_value_sampling", "lime", "kernel_shap")


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
  """One attribution run, checked when built (``ValueError("field: ...")``)."""
  method: str = "saliency"
  layer: str | None = None            # layer methods (grad_cam, lrp_layer, ...)
  target: str = "pred"                # "pred" or a class index
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the method's options
  num_images: int | None = 16         # images attributed (None: all)
  grid_images: int = 16               # pairs shown in grid.png
  batch_size: int = 8
  normalize: str = "netdissect"
  seed: int = 0

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    if self.method not in explain.METHODS:
      raise ValueError(f"method: must be one of {sorted(explain.METHODS)}, got {self.method!r}")
    if self.method in LAYER_METHODS and not self.layer:
      raise ValueError(f"layer: {self.method} needs a layer")
    if self.target != "pred" and not str(self.target).isdigit():
      raise ValueError(f"target: must be 'pred' or a class index >= 0, got {self.target!r}")
    for name in ("num_images", "grid_images", "batch_size"):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f"{name}: must be >= 1, got {v}")
    if self.normalize not in ("netdissect", "imagenet"):
      raise ValueError(f"normalize: must be 'netdissect' or 'imagenet', got {self.normalize!r}")
    if self.seed < 0:
      raise ValueError(f"seed: must be >= 0, got {self.seed}")
    if "key" in self.options or "layer" in self.options:
      raise ValueError("options: key and layer are set by --seed and --layer")

  def method_options(self) -> dict:
    opts = dict(self.options)
    if self.method in LAYER_METHODS:
      opts["layer"] = self.layer
    if self.method in KEYED_METHODS:
      opts["key"] = jax.random.fold_in(jax.random.key(self.seed),
                                       zlib.crc32(self.method.encode()))
    return opts


def run_attribution(config: AttributeConfig, model: Any, normalize: Callable,
                    images: np.ndarray, out_dir: str | Path, *,
                    names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                    log: Callable[[str], None] = print) -> dict:
  """Maps of ``config.method`` for uint8 images (n, H, W, 3); files in ``out_dir``.

  Returns:
    The summary written to ``summary.json``.
  """
  from nemjax.fooling import report  # pylint: disable=import-outside-toplevel
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  model.eval()
  taps = () if config.layer is None else (models.canonical_layer(model.arch, config.layer),)
  opts = config.method_options()
  if taps and "layer" in opts:
    opts["layer"] = taps[0]
  apply_fn, params = models.pure_apply(model, taps=taps)
  n = len(images) if config.num_images is None else min(config.num_images, len(images))
  images = images[:n]
  logits_fn = jax.jit(lambda p, x: explain._core.logits_of(apply_fn(p, normalize(x))))  # pylint: disable=protected-access
  fn = jax.jit(lambda p, x, t: explain.explain(config.method, apply_fn, p, normalize(x), t,
                                               **opts))
  maps, targets = [], []
  for s in range(0, n, config.batch_size):
    x = jnp.asarray(images[s:s + config.batch_size])
    if config.target == "pred":
      t = jnp.argmax(logits_fn(params, x), -1).astype(jnp.int32)
    else:
      t = jnp.full((x.shape[0],), int(config.target), jnp.int32)
    if int(jnp.max(t)) >= int(model.num_classes):
      raise ValueError(f"target: class {int(jnp.max(t))} >= the model's {model.num_classes}")
    maps.append(np.asarray(fn(params, x, t), np.float32))
    targets.append(np.asarray(t))
  maps_a, targets_a = np.concatenate(maps), np.concatenate(targets)
  import io  # pylint: disable=import-outside-toplevel
  for name, arr in (("maps.npy", maps_a), ("targets.npy", targets_a)):
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(out / name, buf.getvalue())
  names = list(names or [f"image {i}" for i in range(n)])[:n]
  atomic_write_text(out / "images.txt", "".join(f"{m}\n" for m in names))
  k = min(config.grid_images, n)
  label = lambda t: class_names[t] if class_names is not None and t < len(class_names) else str(t)
  report.grid_png(out / "grid.png", images[:k], maps_a[:k],
                  [f"{Path(str(names[i])).name[:18]} → {label(int(targets_a[i]))}" for i in range(k)],
                  f"{config.method} ({model.arch})")
  summary = {"method": config.method, "options": {k: v for k, v in opts.items() if k != "key"},
             "images": n, "map_shape": list(maps_a.shape), "target": config.target}
  write_json(out / "summary.json", summary)
  log(f"{config.method}: {n} maps {maps_a.shape[1:]} -> {out}/maps.npy, grid.png")
  return summary
