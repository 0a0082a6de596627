"""Network Dissection of a model over a Broden-format probe set.

Each forward pass of the model serves every requested layer. By default the driver streams
and holds no activations, so host memory does not grow with the probe set:

1. pass 1: forward, exact streaming thresholds (a running top-k per unit, ``≈ η·N·h·w``
   values each) and, optionally, each unit's top-activating images (a running top-k of the
   per-image max, with their maps, for the HTML report);
2. pass 2: forward again (the same compiled program on the same batches, so the same
   activations; a per-batch checksum of pass 1 verifies it), decode the label maps and tally
   each batch against the thresholds.

When all activations fit in ``max_ram_bytes`` (default 1 GiB) pass 1 keeps them in RAM and
the tally reads them from there instead of running the model again. Pass 1 is skipped when
every layer's thresholds are given. ``keep_activations=True`` instead
stores every activation (in RAM, or in a float32 memmap beyond ``max_ram_bytes``) during one
forward pass and tallies the stored arrays; it returns them too (the sweeps re-dissect from
them). Both paths give bit-identical results.

The forward pass is data-parallel over ``jax.local_devices()`` (a 1-D ``Mesh`` with the batch
sharded); every count is exact, so results do not depend on the device count.

Several processes (``jax.distributed``, :mod:`nemjax.distributed`): each process loads and
runs only its contiguous shard of the probe rows on its own devices, then the processes
combine their states exactly -- the thresholds' running top-k (``quantile.threshold_merge``:
the k largest of a union are the k largest of the parts' k largest), the top images
(``topimages.top_images_merge``) and the integer tallies (``tally.tally_merge``, a sum) -- so
every process ends with the same results, bit-identical to one process's (a row's
activations do not depend on which batch it is in). ``keep_activations=True`` also exchanges
the activations, so every process returns all N rows (the sweeps re-dissect from them).

Example::

    probe = nemjax.data.broden.load_probe("broden1_224")
    model = nemjax.models.checkpoint.load("ckpt/resnet18_places365")
    results = nemjax.dissect.dissect(model, probe, ["layer3", "layer4"])
    results["layer4"].best_label        # (U,) global label numbers
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from nemjax import distributed, preprocess
from nemjax.data import loader
from nemjax.data.broden import ProbeSet
from nemjax.dissect import quantile as quantile_lib
from nemjax.dissect import tally as tally_lib
from nemjax.dissect import topimages as topimages_lib
from nemjax.dissect._checks import check_finite

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
  top_images: topimages_lib.TopImagesState | None = None  # (U, k) rows/maps, if requested

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


def layer_shapes(model, layers: Sequence[str], image_size: tuple[int, int]
                 ) -> dict[str, tuple[int, int, int]]:
  """``{layer: (h, w, U)}`` of ``model``'s activations on (H, W) = ``image_size`` images
  (:func:`nemjax.models.activation_shapes`; vector layers give ``(1, 1, U)``, as the tally
  sees them). Unknown layer names raise ValueError listing the valid ones.
  """
  from nemjax import models as models_lib
  shapes = models_lib.activation_shapes(model, layers, image_size)
  return {k: (v if len(v) == 3 else (1, 1, v[-1])) for k, v in shapes.items()}


def _forward_batches(fn, probe: ProbeSet, batch_size: int,
                     image_overrides: Mapping[int, np.ndarray] | None,
                     progress: bool | str, rows: np.ndarray | None = None
                     ) -> Iterator[tuple[loader.ProbeBatch, dict[str, np.ndarray]]]:
  """Yields ``(batch, {layer: (B, h, w, U) float32 host array})`` over the probe set's
  ``rows`` (default all).

  Batches are padded to ``batch_size`` (``batch.valid`` marks the real rows). The next
  batch's forward pass is dispatched before the current one is handed out, so the device
  computes while the caller works on the host.
  """
  def launch(batch):
    images = batch.images
    if image_overrides:
      hit = [j for j, r in enumerate(batch.index) if int(r) in image_overrides]
      if hit:
        images = images.astype(np.float32)
        for j in hit:
          images[j] = image_overrides[int(batch.index[j])]
    return batch, fn(images)

  def to_host(acts):
    acts = {k: np.asarray(v) for k, v in acts.items()}
    return {k: v[:, None, None, :] if v.ndim == 2 else v for k, v in acts.items()}

  pending = None
  for batch in loader.iterate_batches(probe, batch_size, indices=rows, pad_last=True,
                                      progress=progress):
    current, pending = pending, launch(batch)
    if current is not None:
      yield current[0], to_host(current[1])
  if pending is not None:
    yield pending[0], to_host(pending[1])


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


@dataclasses.dataclass
class _Streams:
  """Per-layer streaming state of one pass (all optional, filled on the first batch)."""
  quantile_q: float | None = None  # update thresholds of ``threshold_layers`` at this q
  threshold_layers: tuple[str, ...] = ()
  top_k: int = 0  # running top-k images per unit (0: none)
  store: _ActivationStore | None = None
  thresholds: dict[str, quantile_lib.ThresholdState] = dataclasses.field(default_factory=dict)
  tops: dict[str, topimages_lib.TopImagesState] = dataclasses.field(default_factory=dict)

  def update(self, n: int, batch: loader.ProbeBatch, acts: Mapping[str, np.ndarray]) -> None:
    """Adds one batch; ``n`` = probe-set size (for the first batch's initialisation)."""
    valid = batch.valid
    for name, a in acts.items():
      if name in self.threshold_layers:
        if name not in self.thresholds:
          self.thresholds[name] = quantile_lib.threshold_init(
              a.shape[-1], n * a.shape[1] * a.shape[2], self.quantile_q)
        self.thresholds[name] = quantile_lib.threshold_update(self.thresholds[name], a,
                                                              valid=valid)
      if self.top_k:
        if name not in self.tops:
          self.tops[name] = topimages_lib.top_images_init(a.shape[-1], self.top_k, a.shape[1:3])
        self.tops[name] = topimages_lib.top_images_update(self.tops[name], a, batch.index,
                                                          valid=valid)
    if self.store is not None:
      if not self.store.arrays:
        self.store.allocate({k: (n, *v.shape[1:]) for k, v in acts.items()})
      rows = batch.index[valid]
      for name, a in acts.items():
        self.store.arrays[name][rows] = a[valid]


def _round_batch(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh's device count."""
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size) + (-int(batch_size)) % mesh.size


def tally_layers(
    acts: Mapping[str, np.ndarray],
    probe: ProbeSet,
    thresholds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 64,
    method: str = "auto",
    progress: bool | str = True,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, tally_lib.TallyState]:
  """Exact NetDissect tallies of several layers in one pass over the label maps.

  Each batch's labels are decoded and prepared once and shared by every layer.

  Args:
    acts: ``{layer: (N, h, w, U)}`` arrays in probe row order (RAM or memmap).
    probe: the probe set the activations came from (labels are decoded from it).
    thresholds: ``{layer: (U,) float64}``.
    labels: optional preloaded ``(pixels (N,K,sh,sw), scalars (N,S))`` of the whole probe set
      (from ``loader.load_labels``); default: decoded batch by batch.
    rows: tally only these probe rows (a process's shard; default all N).
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
  todo = np.arange(n) if rows is None else np.asarray(rows, np.int64)
  bar = tqdm(range(0, len(todo), batch_size),
             desc=progress if isinstance(progress, str) else "tally", disable=not progress,
             unit="batch")
  for s in bar:
    idx = todo[s:s + batch_size]
    if labels is None:
      pixels, scalars = loader.load_labels(probe, idx)
    else:
      pixels, scalars = labels[0][idx], labels[1][idx]
    lab = tally_lib.prepare_labels(pixels, scalars, probe.num_labels)
    for layer, a in acts.items():
      part = a[s:s + len(idx)] if rows is None else a[idx]
      states[layer] = tally_lib.tally_update(states[layer], np.asarray(part),
                                             thr[layer], labelcat=probe.labelcat, method=method,
                                             labels=lab)
  return states


def tally_layer(acts: np.ndarray, probe: ProbeSet, thresholds: np.ndarray, **kwargs
                ) -> tally_lib.TallyState:
  """:func:`tally_layers` for one (N, h, w, U) activation array."""
  return tally_layers({"": acts}, probe, {"": thresholds}, **kwargs)[""]


def finish_layer(layer: str, probe: ProbeSet, thresholds: np.ndarray,
                 state: tally_lib.TallyState,
                 top_images: topimages_lib.TopImagesState | None = None) -> LayerDissection:
  """IoU and best labels of one tallied layer, as a :class:`LayerDissection`."""
  iou = tally_lib.compute_iou(state, probe.labelcat)
  b = tally_lib.best_labels(iou, probe.primary_category, probe.num_categories)
  return LayerDissection(layer, np.asarray(thresholds, np.float64), state, iou, b.label, b.score,
                         b.best_category, b.best_label, b.best_score, top_images)


def _check_thresholds(shapes: Mapping[str, tuple[int, int, int]],
                      thresholds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Given thresholds as (U,) finite float64, checked against the layers' unit counts
  (``shapes``: :func:`layer_shapes` of the dissected layers)."""
  layers = list(shapes)
  unknown = [k for k in thresholds if k not in layers]
  if unknown:
    raise ValueError(f"thresholds given for layers not dissected: {sorted(unknown)} "
                     f"(dissected: {list(layers)})")
  if not thresholds:
    return {}
  out = {}
  for layer, t in thresholds.items():
    try:
      arr = np.asarray(t, np.float64)
    except (TypeError, ValueError) as err:
      raise ValueError(f"thresholds of {layer} must be a numeric (U,) array, got "
                       f"{type(t).__name__}") from err
    units = shapes[layer][-1]
    if arr.shape != (units,):
      raise ValueError(f"thresholds of {layer} must have shape ({units},) (one per unit), got "
                       f"{arr.shape}")
    check_finite(arr, f"thresholds of {layer}")
    out[layer] = arr
  return out


def _tally_pass(fn, probe: ProbeSet, batch_size: int, thresholds: Mapping[str, np.ndarray],
                image_overrides, method: str, progress: bool, streams: _Streams,
                fingerprints: list[float] | None, rows: np.ndarray | None = None):
  """Forward pass + tally of every batch against ``thresholds``; feeds ``streams`` too.

  ``fingerprints``: per-batch activation sums of pass 1 to check that this pass saw the same
  activations (a nondeterministic forward pass would make the result inexact).
  """
  n = probe.num_images
  states: dict[str, tally_lib.TallyState] = {}
  for i, (batch, acts) in enumerate(_forward_batches(fn, probe, batch_size, image_overrides,
                                                     "tally" if progress else False, rows)):
    if fingerprints is not None and _fingerprint(acts) != fingerprints[i]:
      raise RuntimeError(
          f"the model's activations on probe rows {batch.index[batch.valid][[0, -1]].tolist()} "
          "differ between the two passes (a nondeterministic forward pass?), so thresholds and "
          "tally would not match; use keep_activations=True or deterministic XLA flags")
    lab = tally_lib.prepare_labels(batch.pixels, batch.scalars, probe.num_labels,
                                   valid=batch.valid)
    for name, a in acts.items():
      if name not in states:
        states[name] = tally_lib.tally_init(a.shape[-1], probe.num_labels, probe.num_categories)
      states[name] = tally_lib.tally_update(states[name], a, thresholds[name],
                                            labelcat=probe.labelcat, valid=batch.valid,
                                            method=method, labels=lab)
    streams.update(n, batch, acts)
  return states


def _fingerprint(acts: Mapping[str, np.ndarray]) -> float:
  """A float64 sum of every activation of a batch (deterministic for equal inputs)."""
  return float(sum(np.add.reduce(a, axis=None, dtype=np.float64) for a in acts.values()))


TALLY_METHODS = ("auto", "sparse", "dense")


def check_options(*, top_fraction: float, quantile_method: str, tally_method: str = "auto",
                  num_top_images: int = 0, batch_size: int = 1) -> None:
  """ValueError ``"field: ..."`` for the first bad option of :func:`dissect` (the one check,
  shared with the dissection script's config)."""
  quantile_lib.check_top_fraction(top_fraction)
  if quantile_method not in quantile_lib.QUANTILE_METHODS:
    raise ValueError(f"quantile_method: {quantile_method!r} is not one of "
                     f"{', '.join(quantile_lib.QUANTILE_METHODS)}")
  if tally_method not in TALLY_METHODS:
    raise ValueError(f"tally_method: must be one of {', '.join(TALLY_METHODS)}, got "
                     f"{tally_method!r}")
  for name, v, low in (("num_top_images", num_top_images, 0), ("batch_size", batch_size, 1)):
    if isinstance(v, bool) or int(v) != v or v < low:
      raise ValueError(f"{name}: must be an integer >= {low}, got {v!r}")


def dissect(
    model,
    probe: ProbeSet,
    layers: Sequence[str],
    *,
    batch_size: int = 32,
    top_fraction: float = quantile_lib.DEFAULT_TOP_FRACTION,
    quantile_method: str = "linear",
    thresholds: Mapping[str, np.ndarray] | None = None,
    tally_method: str = "auto",
    mesh: Mesh | None = None,
    normalize: Callable = preprocess.netdissect_normalize,
    max_ram_bytes: int = 1 << 30,
    workdir: Path | None = None,
    progress: bool = True,
    keep_activations: bool = False,
    image_overrides: Mapping[int, np.ndarray] | None = None,
    num_top_images: int = 0,
):
  """Dissects ``layers`` of ``model`` on ``probe``.

  Activations within ``max_ram_bytes`` are kept for one pass; beyond it two streaming passes
  (see the module docstring), so host memory stays bounded as the probe set grows (apart from
  the exact thresholds' top-k, ≈ η of the activations).

  Args:
    model: a nemjax model (``model.arch`` names its architecture).
    probe: from ``nemjax.data.broden.load_probe``.
    layers: layer names (canonical or aliases), in any order; duplicates are dropped.
    batch_size: images per forward batch (rounded up to a multiple of the device count).
    top_fraction: η; the threshold is the (1 − η) quantile of each unit's N·h·w values.
    quantile_method: ``numpy.quantile`` method reproduced exactly (default 'linear').
    thresholds: optional ``{layer: (U,) float}`` used instead of the computed quantiles
      (to compare with another implementation fed the same thresholds).
    tally_method: 'auto', 'sparse' or 'dense' (see ``tally.tally_update``).
    mesh: 1-D device mesh of the forward pass (default all local devices). Under
      ``jax.distributed`` each process dissects its shard of the rows on its own mesh and
      the results are combined exactly (module docstring); every process must call this.
    max_ram_bytes: RAM budget for activations. When all of them (N·Σ h·w·U float32) fit,
      one forward pass keeps them in RAM and the tally reads them back; beyond it the tally
      takes a second forward pass and nothing is stored (0: always stream).
    workdir: ``keep_activations`` beyond ``max_ram_bytes``: the activations go to a float32
      memmap in a temporary directory under ``workdir``.
    keep_activations: one forward pass storing every activation, returned as
      ``{layer: (N,h,w,U)}`` (RAM, or memmap beyond ``max_ram_bytes``); disk grows with the
      probe set.
    image_overrides: ``{row: image (H,W,3) 0..255, uint8 or float32}`` replacing probe images
      in every pass — a corrupted probe set without writing it to disk.
    num_top_images: keep each unit's ``k`` top-activating images (per-image max) with their
      maps in ``LayerDissection.top_images`` (for the HTML report); 0 = none.

  Returns:
    ``{layer: LayerDissection}`` (and the activations dict if ``keep_activations``).
  """
  layers = list(dict.fromkeys(layers))
  if not layers:
    raise ValueError("dissect: no layers given")
  if probe.num_images < 1:
    raise ValueError(f"dissect: the probe set {probe.root} has no images")
  try:
    check_options(top_fraction=top_fraction, quantile_method=quantile_method,
                  tally_method=tally_method, num_top_images=num_top_images,
                  batch_size=batch_size)
  except ValueError as e:
    raise ValueError(f"dissect: {e}") from None
  q = quantile_lib.quantile_of(top_fraction)
  mesh = make_mesh() if mesh is None else mesh
  batch_size = _round_batch(batch_size, mesh)
  fn = activation_fn(model, layers, normalize=normalize, mesh=mesh)  # validates layer names
  shapes = layer_shapes(model, layers, probe.image_size)
  given = _check_thresholds(shapes, dict(thresholds or {}))
  computed = tuple(layer for layer in layers if layer not in given)
  n = probe.num_images
  procs = distributed.current()
  rows = None if procs.single else distributed.shard_rows(n, procs)
  # Activations that fit in max_ram_bytes are kept in RAM during one forward pass and tallied
  # from there; larger ones take the second, streaming pass (memory stays at the budget).
  total_bytes = 4 * n * sum(int(np.prod(s)) for s in shapes.values())
  store_acts = keep_activations or (bool(computed) and total_bytes <= max_ram_bytes)
  # Pass 1 is needed for thresholds or to store activations; the top images go with the
  # first pass that runs.
  first = _Streams(quantile_q=q, threshold_layers=computed,
                   top_k=int(num_top_images),
                   store=_ActivationStore(max_ram_bytes, workdir) if store_acts else None)
  run_first = bool(computed) or keep_activations
  fingerprints: list[float] | None = [] if run_first and not store_acts else None
  try:
    if run_first:
      if first.store is not None and rows is not None:  # a shard may be empty: allocate now
        first.store.allocate({layer: (n, *shapes[layer]) for layer in layers})
      for batch, acts in _forward_batches(fn, probe, batch_size, image_overrides,
                                          "activations" if progress else False, rows):
        first.update(n, batch, acts)
        if fingerprints is not None:
          fingerprints.append(_fingerprint(acts))
      if rows is not None:  # every process: the thresholds and top images of all N rows
        first.thresholds = distributed.combine_dicts(first.thresholds,
                                                     quantile_lib.threshold_merge, procs)
        first.tops = distributed.combine_dicts(first.tops, topimages_lib.top_images_merge,
                                               procs)
    thr = {layer: (given[layer] if layer in given else
                   quantile_lib.threshold_finalize(first.thresholds[layer],
                                                   method=quantile_method))
           for layer in layers}
    if store_acts:
      tallies = tally_layers({l: first.store.arrays[l] for l in layers}, probe, thr,
                             method=tally_method, progress="tally" if progress else False,
                             rows=rows)
      tops = first.tops
    else:
      second = _Streams(top_k=0 if run_first else int(num_top_images))
      tallies = _tally_pass(fn, probe, batch_size, thr, image_overrides, tally_method, progress,
                            second, fingerprints, rows)
      if rows is not None and not run_first:
        second.tops = distributed.combine_dicts(second.tops, topimages_lib.top_images_merge,
                                                procs)
      tops = first.tops if run_first else second.tops
    if rows is not None:
      tallies = distributed.combine_dicts(tallies, tally_lib.tally_merge, procs)
      if keep_activations:
        for layer in layers:
          distributed.fill_rows(first.store.arrays[layer], rows, procs)
    results = {layer: finish_layer(layer, probe, thr[layer], tallies[layer], tops.get(layer))
               for layer in layers}
    if keep_activations:
      return results, {k: np.asarray(v) for k, v in first.store.arrays.items()}
    return results
  finally:
    if first.store is not None:
      first.store.close()
