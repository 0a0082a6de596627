"""Network Dissection of a model over a Broden-format probe set.

One forward pass of the model serves every requested layer: activations are stored (in RAM,
or in a float32 memmap when they would exceed ``max_ram_bytes``) while the exact streaming
thresholds are updated; a second pass over the stored activations and the label maps runs
the tally. The forward pass is data-parallel over ``jax.devices()`` (a 1-D ``Mesh`` with
the batch sharded); every count is exact, so results do not depend on the device count.

Example::

    probe = nemjax.data.broden.load_probe("broden1_224")
    model = nemjax.models.checkpoint.load("ckpt/resnet18_places365")
    results = dissect(model, probe, ["layer3", "layer4"])
    results["layer4"].best_label        # (U,) global label numbers
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from nemjax import preprocess
from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect import tally as tally_lib

DEFAULT_QUANTILE = 0.005


@dataclasses.dataclass(frozen=True)
class LayerDissection:
  """Everything Network Dissection finds for one layer (host NumPy arrays).

  U units, L+1 labels (index = global label number), C categories.
  """
  layer: str
  thresholds: np.ndarray        # (U,) float64
  tally: tally_lib.TallyState   # int64 counts
  iou: np.ndarray               # (U, L+1) float64
  category_labels: np.ndarray   # (U, C) best label per category (first index wins ties)
  category_scores: np.ndarray   # (U, C) its IoU
  best_category: np.ndarray     # (U,) category index (last category wins ties, as NetDissect-Lite)
  best_label: np.ndarray        # (U,) global label number
  score: np.ndarray             # (U,) IoU of best_label

  @property
  def num_units(self) -> int:
    return int(self.thresholds.shape[0])


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: all local devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  return Mesh(np.array(devices), ("data",))


def activation_fn(model, layers: Sequence[str], normalize: Callable = preprocess.netdissect_normalize,
                  mesh: Mesh | None = None):
  """A jitted ``fn(images uint8 (B,H,W,3)) -> {layer: (B,h,w,U) float32}``, batch-sharded.

  The model is cut after the deepest requested layer. ``B`` must be divisible by the
  number of devices in ``mesh``.
  """
  from nemjax import models as models_lib
  taps = tuple(layers)
  upto = models_lib.last_layer(model.arch, taps)
  apply_fn, state = models_lib.pure_apply(model, taps=taps, upto=upto)
  mesh = make_mesh() if mesh is None else mesh
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  state = jax.device_put(state, replicated)

  @jax.jit
  def run(state, images):
    x = normalize(images)
    _, acts = apply_fn(state, x)
    return {name: acts[name] for name in taps}

  def fn(images: np.ndarray) -> dict[str, jax.Array]:
    if images.shape[0] % mesh.size:
      raise ValueError(f"batch of {images.shape[0]} images is not divisible by the "
                       f"{mesh.size} devices of the mesh")
    # Always float32 on the host: one compiled program whatever the images' dtype, so a
    # row's activations do not depend on whether its batch holds corrupted images.
    images = np.asarray(images, np.float32)
    return run(state, jax.device_put(images, batch_sharding))

  return fn


class _ActivationStore:
  """(N, h, w, U) float32 per layer, in RAM or in a memmap under ``workdir``."""

  def __init__(self, max_ram_bytes: int, workdir: Path | None):
    self.max_ram_bytes = max_ram_bytes
    self.workdir = workdir
    self._tmp: tempfile.TemporaryDirectory | None = None
    self.arrays: dict[str, np.ndarray] = {}

  def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    for i, (name, shape) in enumerate(shapes.items()):
      if total <= self.max_ram_bytes:
        self.arrays[name] = np.empty(shape, np.float32)
      else:
        if self._tmp is None:
          self._tmp = tempfile.TemporaryDirectory(prefix="nemjax-acts-", dir=self.workdir)
        self.arrays[name] = np.lib.format.open_memmap(
            Path(self._tmp.name) / f"{i}.npy", mode="w+", dtype=np.float32, shape=shape)

  def close(self) -> None:
    self.arrays.clear()
    if self._tmp is not None:
      self._tmp.cleanup()


def extract_activations(
    model,
    probe: ProbeSet,
    layers: Sequence[str],
    *,
    batch_size: int = 32,
    quantile: float = DEFAULT_QUANTILE,
    mesh: Mesh | None = None,
    normalize: Callable = preprocess.netdissect_normalize,
    max_ram_bytes: int = 4 << 30,
    workdir: Path | None = None,
    progress: bool = True,
    image_overrides: Mapping[int, np.ndarray] | None = None,
):
  """One model pass: returns ``(store, threshold_states)`` for every layer.

  ``image_overrides`` maps probe rows to replacement images ((H,W,3), 0..255, uint8 or
  float32) — a corrupted probe set without writing it to disk.

  ``store.arrays[layer]`` is the (N, h, w, U) float32 activation array (NHWC) in probe row
  order; vector layers are stored as (N, 1, 1, U).
  """
  mesh = make_mesh() if mesh is None else mesh
  if batch_size % mesh.size:
    batch_size += mesh.size - batch_size % mesh.size
  fn = activation_fn(model, layers, normalize=normalize, mesh=mesh)
  store = _ActivationStore(max_ram_bytes, workdir)
  states: dict[str, quantile_lib.ThresholdState] = {}
  n = probe.num_images
  batches = loader.iterate_batches(probe, batch_size, pad_last=True,
                                   progress="activations" if progress else False)
  for batch in batches:
    images = batch.images
    if image_overrides:
      hit = [j for j, r in enumerate(batch.index) if int(r) in image_overrides]
      if hit:
        images = images.astype(np.float32)
        for j in hit:
          images[j] = image_overrides[int(batch.index[j])]
    acts = {k: np.asarray(v) for k, v in fn(images).items()}
    acts = {k: v[:, None, None, :] if v.ndim == 2 else v for k, v in acts.items()}
    if not store.arrays:
      store.allocate({k: (n, *v.shape[1:]) for k, v in acts.items()})
      states = {k: quantile_lib.threshold_init(v.shape[-1], n * v.shape[1] * v.shape[2],
                                               1.0 - quantile) for k, v in acts.items()}
    rows = batch.index[batch.valid]
    for name, a in acts.items():
      store.arrays[name][rows] = a[batch.valid]
      states[name] = quantile_lib.threshold_update(states[name], a, valid=batch.valid)
  return store, states


def tally_layers(
    acts: Mapping[str, np.ndarray],
    probe: ProbeSet,
    thresholds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 64,
    method: str = "auto",
    progress: bool | str = True,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, tally_lib.TallyState]:
  """Exact NetDissect tallies of several layers in one pass over the label maps.

  Each batch's labels are decoded and prepared once and shared by every layer.

  Args:
    acts: ``{layer: (N, h, w, U)}`` arrays in probe row order (RAM or memmap).
    probe: the probe set the activations came from (labels are decoded from it).
    thresholds: ``{layer: (U,) float64}``.
    labels: optional preloaded ``(pixels (N,K,sh,sw), scalars (N,S))`` of the whole probe set
      (from ``loader.load_labels``); default: decoded batch by batch.
  """
  n = probe.num_images
  states, thr = {}, {}
  for layer, a in acts.items():
    shape = np.shape(a)
    if len(shape) != 4 or shape[0] != n:
      raise ValueError(f"activations of {layer} must be (N={n}, h, w, U); got {shape}")
    thr[layer] = np.asarray(thresholds[layer], np.float64)
    if thr[layer].shape != (shape[-1],):
      raise ValueError(f"thresholds of {layer} must be ({shape[-1]},); got {thr[layer].shape}")
    states[layer] = tally_lib.tally_init(shape[-1], probe.num_labels, probe.num_categories)
  bar = tqdm(range(0, n, batch_size), desc=progress if isinstance(progress, str) else "tally",
             disable=not progress, unit="batch")
  for s in bar:
    idx = np.arange(s, min(s + batch_size, n))
    if labels is None:
      pixels, scalars = loader.load_labels(probe, idx)
    else:
      pixels, scalars = labels[0][idx], labels[1][idx]
    lab = tally_lib.prepare_labels(pixels, scalars, probe.num_labels)
    for layer, a in acts.items():
      states[layer] = tally_lib.tally_update(states[layer], np.asarray(a[s:s + len(idx)]),
                                             thr[layer], labelcat=probe.labelcat, method=method,
                                             labels=lab)
  return states


def tally_layer(acts: np.ndarray, probe: ProbeSet, thresholds: np.ndarray, **kwargs
                ) -> tally_lib.TallyState:
  """:func:`tally_layers` for one (N, h, w, U) activation array."""
  return tally_layers({"": acts}, probe, {"": thresholds}, **kwargs)[""]


def finish_layer(layer: str, probe: ProbeSet, thresholds: np.ndarray,
                 state: tally_lib.TallyState) -> LayerDissection:
  iou = tally_lib.compute_iou(state, probe.labelcat)
  b = tally_lib.best_labels(iou, probe.primary_category, probe.num_categories)
  return LayerDissection(layer, np.asarray(thresholds, np.float64), state, iou, b.label, b.score,
                         b.best_category, b.best_label, b.best_score)


def dissect(
    model,
    probe: ProbeSet,
    layers: Sequence[str],
    *,
    batch_size: int = 32,
    quantile: float = DEFAULT_QUANTILE,
    quantile_method: str = "linear",
    thresholds: Mapping[str, np.ndarray] | None = None,
    tally_method: str = "auto",
    mesh: Mesh | None = None,
    normalize: Callable = preprocess.netdissect_normalize,
    max_ram_bytes: int = 4 << 30,
    workdir: Path | None = None,
    progress: bool = True,
    keep_activations: bool = False,
    image_overrides: Mapping[int, np.ndarray] | None = None,
):
  """Dissects ``layers`` of ``model`` on ``probe``.

  Args:
    thresholds: optional ``{layer: (U,) float64}`` used instead of the computed quantiles
      (to compare with another implementation fed the same thresholds).
    quantile: η; the threshold is the (1 − η) quantile of each unit's N·h·w values.
    quantile_method: ``numpy.quantile`` method reproduced exactly (default 'linear').
    keep_activations: also return the ``{layer: (N,h,w,U)}`` activations (RAM or memmap).
    image_overrides: ``{row: image (H,W,3) 0..255}`` replacing probe images (see
      :func:`extract_activations`).

  Returns:
    ``{layer: LayerDissection}`` (and the activations dict if ``keep_activations``).
  """
  layers = list(dict.fromkeys(layers))
  if not layers:
    raise ValueError("dissect: no layers given")
  thresholds = dict(thresholds or {})
  unknown = set(thresholds) - set(layers)
  if unknown:
    raise ValueError(f"thresholds given for layers not dissected: {sorted(unknown)}")
  store, states = extract_activations(
      model, probe, layers, batch_size=batch_size, quantile=quantile, mesh=mesh,
      normalize=normalize, max_ram_bytes=max_ram_bytes, workdir=workdir, progress=progress,
      image_overrides=image_overrides)
  results = {}
  try:
    thr = {layer: (np.asarray(thresholds[layer], np.float64) if layer in thresholds
                   else quantile_lib.threshold_finalize(states[layer], method=quantile_method))
           for layer in layers}
    tallies = tally_layers({l: store.arrays[l] for l in layers}, probe, thr, method=tally_method,
                           progress="tally" if progress else False)
    for layer in layers:
      results[layer] = finish_layer(layer, probe, thr[layer], tallies[layer])
    if keep_activations:
      return results, {k: np.asarray(v) for k, v in store.arrays.items()}
    return results
  finally:
    store.close()
