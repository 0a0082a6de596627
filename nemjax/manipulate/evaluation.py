"""Measuring a model for a fine-tuning attack: one jitted forward pass over image sets
(:func:`make_evaluator`), accuracy on the held-out images and the training sample, the original
model's reference rankings (:func:`make_reference`) and the before/after metrics
(:func:`attack_metrics`).

Accuracy is top-1 (%) on the held-out images (``heldout_*``: they must share no image with the
probe, the decoys or the training sample, checked by pixel fingerprints), next to the same on a
fixed sample of the training stream (``train_*``). A set without labels (every label ``-1``)
reports top-1 *agreement* (%) with the original model's predictions instead, and the report
says so (:func:`accuracy_kind`). Channels that are constant on the ranking set (dead after a
ReLU) have no top-k set and are left out of the attack and the means.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemjax import metrics as nm
from nemjax import models
from nemjax.manipulate import losses
from nemjax.manipulate.config import ExperimentInputs, ManipulateConfig

__all__ = ["EvalOutputs", "make_evaluator", "Accuracies", "accuracy_kind", "image_fingerprints",
           "check_disjoint", "accuracy_percent", "Reference", "canonical_layers",
           "measure_accuracy", "accuracy_note", "make_reference", "topk_overlap",
           "attack_metrics", "embedder_description", "nanmean"]

PyTree = Any

# -------------------------------------------------------------------------------- evaluation
class EvalOutputs(NamedTuple):
  """One forward pass of a model over a set of images."""
  energy: dict[str, np.ndarray]   # {layer: (n, C) float32 ‖f^{(l,j)}(x)‖²}
  mean: dict[str, np.ndarray]     # {layer: (n, C) float32 spatial mean of the map}
  logits: np.ndarray              # (n, K) float32
  embedding: np.ndarray | None    # (n, D) float32 pooled embed-layer features


def make_evaluator(model: nnx.Module, normalize: Callable, layers: Sequence[str],
                   embed_layer: str | None, batch_size: int):
  """``evaluate(params, images, logits_only=False) -> EvalOutputs`` over ``images``
  (n, H, W, 3) uint8.

  ``logits_only=True`` runs a second program that taps nothing (energies ``{}``, embedding
  ``None``), for accuracy sets. Each program is jitted once per batch shape; the last batch is
  padded, so every call compiles at most once.
  """
  taps = tuple(dict.fromkeys(tuple(layers) + ((embed_layer,) if embed_layer else ())))
  apply_fn, _ = models.pure_apply(model, taps=taps)

  @jax.jit
  def forward(params, x):
    logits, acts = apply_fn(params, normalize(x))
    energy, mean = {}, {}
    for name in layers:
      a = acts[name].astype(jnp.float32)
      energy[name] = losses.channel_energy(a)
      mean[name] = jnp.mean(a, axis=(1, 2)) if a.ndim == 4 else a
    emb = None
    if embed_layer:
      e = acts[embed_layer]
      emb = jnp.mean(e, axis=(1, 2)) if e.ndim == 4 else e.reshape(e.shape[0], -1)
    return logits, energy, mean, emb

  logits_fn, _ = models.pure_apply(model, taps=())

  @jax.jit
  def forward_logits(params, x):
    return logits_fn(params, normalize(x))[0], {}, {}, None

  def evaluate(params, images: np.ndarray, logits_only: bool = False) -> EvalOutputs:
    n = int(images.shape[0])
    if n == 0:
      raise ValueError("evaluate: no images")
    fn, names = (forward_logits, ()) if logits_only else (forward, tuple(layers))
    parts = []
    for start in range(0, n, batch_size):
      x = images[start:start + batch_size]
      m = x.shape[0]
      if m < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], x.dtype)])
      out = jax.device_get(fn(params, jnp.asarray(x)))
      parts.append(jax.tree.map(lambda a, m=m: np.asarray(a)[:m], out))
    cat = lambda *xs: np.concatenate(xs, axis=0)
    logits = cat(*[p[0] for p in parts])
    energy = {k: cat(*[p[1][k] for p in parts]) for k in names}
    mean = {k: cat(*[p[2][k] for p in parts]) for k in names}
    emb = cat(*[p[3] for p in parts]) if embed_layer and not logits_only else None
    return EvalOutputs(energy, mean, logits.astype(np.float32), emb)

  return evaluate


class Accuracies(NamedTuple):
  """Accuracy (%) of one model on the held-out images and on the training sample."""
  heldout: float
  train: float


def accuracy_kind(labels: np.ndarray) -> str:
  """What :func:`accuracy_percent` measures on a set with these labels: ``"top-1 accuracy"``
  or, with no label, ``"top-1 agreement with the original model"``."""
  return ("top-1 accuracy" if (np.asarray(labels) >= 0).any()
          else "top-1 agreement with the original model")


def image_fingerprints(images: np.ndarray) -> set[bytes]:
  """A 16-byte BLAKE2 digest of the pixels (and shape) of each image ``(n, H, W, 3)``."""
  import hashlib  # pylint: disable=import-outside-toplevel
  images = np.ascontiguousarray(images)
  return {hashlib.blake2b(repr(x.shape).encode() + x.tobytes(), digest_size=16).digest()
          for x in images}


def check_disjoint(heldout: np.ndarray, others: Mapping[str, np.ndarray | None],
                   where: str = "held-out images") -> None:
  """ValueError if an image of ``heldout`` (pixel for pixel) is also in one of ``others``
  (``{name: (n, H, W, 3) or None}``): held-out accuracy must come from unseen images."""
  held = image_fingerprints(heldout)
  for name, imgs in others.items():
    if imgs is None or len(imgs) == 0:
      continue
    shared = len(held & image_fingerprints(imgs))
    if shared:
      raise ValueError(f"{shared} of the {len(heldout)} {where} are also {name}; held-out "
                       "accuracy needs images the fine-tune and the rankings never see")


def accuracy_percent(logits: np.ndarray, labels: np.ndarray,
                     reference_logits: np.ndarray | None = None) -> float:
  """Top-1 accuracy (%) over labelled rows; with none, top-1 agreement (%) with the
  reference model's predictions."""
  pred = np.argmax(logits, axis=-1)
  keep = labels >= 0
  if keep.any():
    return float(100.0 * np.mean(pred[keep] == labels[keep]))
  if reference_logits is None:
    raise ValueError("accuracy_percent: no labelled images and no reference predictions")
  return float(100.0 * np.mean(pred == np.argmax(reference_logits, axis=-1)))


# ------------------------------------------------------------------------- reference (before)
@dataclasses.dataclass
class Reference:
  """The original model on the ranking set, and each layer's initial top-k sets."""
  layers: tuple[str, ...]            # canonical layer names
  attacked: dict[str, np.ndarray]    # {layer: (C,) bool} attacked channels
  images: np.ndarray                 # (n_rank, H, W, 3) uint8: probe images then decoys
  labels: np.ndarray                 # (n_rank,) int32, -1 for decoys / unlabelled
  num_probe: int                     # rows [0, num_probe) are probe images
  before: EvalOutputs                # original model on the ranking set
  topk: dict[str, np.ndarray]        # {layer: (C, k) int32 initial top-k row indices}
  accuracy: Accuracies               # original accuracy (%), held-out and training sample
  heldout_logits: np.ndarray         # (m, K) original logits on the held-out images
  train_logits: np.ndarray           # (t, K) original logits on the training sample
  embeddings: np.ndarray             # (n_rank, D) float32 image embeddings (CLIP stand-in)
  groups: np.ndarray | None          # (n_rank,) fairwash groups (-1 for decoys)
  spatial: dict[str, float]          # {layer: h·w} positions per channel map (1 for dense)


def canonical_layers(model: nnx.Module, layers: Sequence[str]) -> tuple[str, ...]:
  """Canonical names of ``layers`` (aliases resolved; ValueError listing valid names)."""
  return tuple(models.canonical_layer(model.arch, name) for name in layers)


def _channel_masks(config: ManipulateConfig, model: nnx.Module, layers: tuple[str, ...],
                   widths: Mapping[str, int]) -> dict[str, np.ndarray]:
  given = {}
  for name, chans in (config.channels or {}).items():
    given[models.canonical_layer(model.arch, name)] = chans
  out = {}
  for name in layers:
    c = widths[name]
    mask = np.zeros((c,), bool)
    chans = given.get(name)
    if chans is None:
      mask[:] = True
    else:
      bad = [j for j in chans if not 0 <= j < c]
      if bad:
        raise ValueError(f"channels {bad} out of range for layer {name} with {c} channels")
      mask[list(chans)] = True
    out[name] = mask
  return out


def measure_accuracy(evaluate, params: PyTree, inputs: ExperimentInputs,
                     heldout_logits: np.ndarray | None = None,
                     train_logits: np.ndarray | None = None) -> tuple[Accuracies, np.ndarray,
                                                                      np.ndarray]:
  """Accuracy of ``params`` on the held-out images and the training sample.

  Args:
    evaluate: from :func:`make_evaluator`.
    params: the model's variables.
    inputs: the held-out and training-sample images and labels.
    heldout_logits, train_logits: the original model's logits, the reference of an
      unlabelled set (``None``: ``params`` is the original model).

  Returns:
    ``(Accuracies, heldout logits (m, K), train-sample logits (t, K))``.
  """
  lh = evaluate(params, inputs.heldout_images, logits_only=True).logits
  lt = evaluate(params, inputs.train_eval_images, logits_only=True).logits
  acc = Accuracies(
      accuracy_percent(lh, inputs.heldout_labels, lh if heldout_logits is None else heldout_logits),
      accuracy_percent(lt, inputs.train_eval_labels, lt if train_logits is None else train_logits))
  return acc, lh, lt


def accuracy_note(inputs: ExperimentInputs) -> str:
  """One sentence per accuracy column of the tables: what is measured, on how many images."""
  held, train = accuracy_kind(inputs.heldout_labels), accuracy_kind(inputs.train_eval_labels)
  text = (f"Held-out accuracy: {held} on {len(inputs.heldout_images)} held-out images "
          f"({inputs.heldout_source}) that no fine-tuning step, distillation batch or top-k "
          f"reference sees; the α rule reads it. Train accuracy: {train} on a fixed sample of "
          f"{len(inputs.train_eval_images)} training-stream images.")
  if "agreement" in held:
    text += (" The held-out images have no labels of the model's classes, so the held-out "
             "column is agreement with the original model's predictions, not accuracy.")
  return text


def _check_inputs(inputs: ExperimentInputs) -> None:
  """Shapes of the image sets and their labels; held-out images seen nowhere else."""
  for name in ("probe", "heldout", "train_eval"):
    images = np.asarray(getattr(inputs, f"{name}_images"))
    labels = np.asarray(getattr(inputs, f"{name}_labels"))
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
      raise ValueError(f"{name}_images must be a non-empty (n, H, W, 3) array, got "
                       f"{images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{name}_labels must be ({images.shape[0]},), got {labels.shape}")
  check_disjoint(inputs.heldout_images, {"probe images": inputs.probe_images,
                                         "decoy images": inputs.decoy_images,
                                         "training-stream images": inputs.train_eval_images})


def make_reference(config: ManipulateConfig, inputs: ExperimentInputs, evaluate,
                   params: PyTree, *, log: Callable[[str], None] = print) -> Reference:
  """Evaluate the original model and take each channel's initial top-k sets."""
  model = inputs.model
  layers = canonical_layers(model, config.layers)
  _check_inputs(inputs)
  images = np.asarray(inputs.probe_images)
  labels = np.asarray(inputs.probe_labels, np.int32)
  n_eval = images.shape[0]
  groups = None
  if config.attack == "push-up":
    if inputs.decoy_images is None or len(inputs.decoy_images) == 0:
      raise ValueError("push-up needs decoy images")
    decoys = np.asarray(inputs.decoy_images)
    if decoys.shape[1:] != images.shape[1:]:
      raise ValueError(f"decoy images are {decoys.shape[1:]}, probe images {images.shape[1:]}")
    images = np.concatenate([images, decoys])
    labels = np.concatenate([labels, np.full((decoys.shape[0],), -1, np.int32)])
  if config.attack == "fairwash":
    g = None if inputs.groups is None else np.asarray(inputs.groups, np.int32)
    if g is None or g.shape != (n_eval,):
      raise ValueError(f"fairwash needs groups of shape ({n_eval},)")
    if not ((g == 0).any() and (g == 1).any()):
      raise ValueError("fairwash needs probe images in both groups 0 and 1")
    groups = g
  if images.shape[0] <= config.k:
    raise ValueError(f"the ranking set has {images.shape[0]} images; need more than k={config.k}")
  shapes = models.activation_shapes(model, layers, images.shape[1:])  # per image
  widths = {name: shp[-1] for name, shp in shapes.items()}
  spatial = {name: float(np.prod(shp[:-1])) for name, shp in shapes.items()}
  attacked = _channel_masks(config, model, layers, widths)
  t0 = time.time()
  before = evaluate(params, images)
  log(f"original model evaluated on {images.shape[0]} images in {time.time() - t0:.1f} s")
  acc, heldout_logits, train_logits = measure_accuracy(evaluate, params, inputs)
  for name in layers:  # a constant channel (e.g. dead after its ReLU) has no ranking to attack
    e = before.energy[name]
    const = e.max(0) == e.min(0)
    dropped = int((attacked[name] & const).sum())
    if dropped:
      log(f"{name}: {dropped} of {int(attacked[name].sum())} selected channels are constant on "
          "the ranking set (no top-k to manipulate) and are left out")
      attacked[name] = attacked[name] & ~const
  if not any(m.any() for m in attacked.values()):
    raise ValueError("every selected channel is constant on the ranking set; nothing to attack")
  topk = {name: np.asarray(nm.topk_from_scores(before.energy[name], config.k).indices)
          for name in layers}
  if inputs.embedder is None:
    emb = before.embedding
  else:
    emb = np.concatenate([np.asarray(inputs.embedder(images[i:i + 64]), np.float32)
                          for i in range(0, images.shape[0], 64)])
  return Reference(layers, attacked, images, labels, n_eval, before, topk, acc, heldout_logits,
                   train_logits, emb, groups, spatial)


def topk_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(C,) fraction of the entries of each row of ``a`` that are in the same row of ``b``."""
  return np.mean((a[:, :, None] == b[:, None, :]).any(-1), axis=1)


# ---------------------------------------------------------------------------------- metrics
def attack_metrics(config: ManipulateConfig, ref: Reference, after: EvalOutputs,
                   accuracy_after: Accuracies) -> tuple[list[dict], list[dict], dict]:
  """Before/after metrics of one attack (``config``: its attack, k and overlap_k).

  Accuracy columns: ``train_acc_*`` on the training sample and ``heldout_acc_*`` on the
  held-out images (``delta_heldout_acc`` = after − before). Fairwash adds the KS distance and
  top-k balance per channel and the model's DDI / DEO on the probe images (the images the
  groups are defined on): ``|p(ŷ=c | z=0) − p(ŷ=c | z=1)|`` and the same given ``y = c``,
  averaged over the classes ``c`` where defined (DEO needs labelled probe images, else NaN).

  Returns:
    ``(rows, channel_rows, topk_after)``: one summary row per layer (means over attacked
    channels; the papers' Table 1 columns), one row per attacked channel, and
    ``{layer: (C, k) top-k rows after}``.
  """
  rows, channel_rows, topk_after = [], [], {}
  n_eval = ref.num_probe
  fair = {}
  if config.attack == "fairwash":
    classes = np.arange(ref.before.logits.shape[1])
    y = ref.labels[:n_eval]
    sides = (("before", ref.before.logits[:n_eval]), ("after", after.logits[:n_eval]))
    for side, logits in sides:
      fair[f"ddi_{side}"] = nanmean(nm.ddi(logits, ref.groups, classes))
    for side, logits in sides:
      fair[f"deo_{side}"] = nanmean(nm.deo(logits, y, ref.groups, classes))
  for name in ref.layers:
    att = np.flatnonzero(ref.attacked[name])
    e0, e1 = ref.before.energy[name], after.energy[name]
    t0 = ref.topk[name]
    t1 = np.asarray(nm.topk_from_scores(e1, config.k).indices)
    topk_after[name] = t1
    ok = config.overlap_k
    overlap = topk_overlap(t0[:, :ok], t1[:, :ok])
    tau = np.asarray(nm.kendall_tau(e0, e1))
    c = e0.shape[1]
    tau_w = np.asarray(nm.kendall_tau_w(e0, e1)) if c >= 2 else np.full((c,), np.nan)
    emb0, emb1 = ref.embeddings[t0], ref.embeddings[t1]
    if c >= 2:
      cd = np.asarray(nm.clip_delta(emb0, emb1))
      cw = np.asarray(nm.clip_w(emb0, emb1))
    else:
      cd = cw = np.full((c,), np.nan)
    # attacked channels the fine-tune made constant on the ranking set (e.g. dead after their
    # ReLU): their top-k "after" is then an arbitrary tie order, so they are counted apart
    silenced = e1.max(0) == e1.min(0)
    row = {"attack": config.attack, "layer": name, "channels": int(att.size),
           "silenced": int(silenced[att].sum()), "alpha": None,
           f"top{ok}_overlap": nanmean(overlap[att]),
           "kendall_tau": nanmean(tau[att]), "kendall_tau_w": nanmean(tau_w[att]),
           "clip_delta": nanmean(cd[att]), "clip_w": nanmean(cw[att]),
           "train_acc_before": ref.accuracy.train, "train_acc_after": accuracy_after.train,
           "heldout_acc_before": ref.accuracy.heldout,
           "heldout_acc_after": accuracy_after.heldout,
           "delta_heldout_acc": accuracy_after.heldout - ref.accuracy.heldout}
    extra_cols = {}
    if config.attack == "push-up":
      is_decoy = np.arange(ref.images.shape[0]) >= n_eval
      d0, d1 = is_decoy[t0[att]].mean(1), is_decoy[t1[att]].mean(1)
      row["decoy_share_before"], row["decoy_share_after"] = nanmean(d0), nanmean(d1)
      extra_cols = {"decoy_share_before": d0, "decoy_share_after": d1}
    if config.attack == "fairwash":
      g = ref.groups
      ks0 = np.asarray(nm.ks_distance_groups(ref.before.mean[name][:n_eval], g))
      ks1 = np.asarray(nm.ks_distance_groups(after.mean[name][:n_eval], g))
      minority = 1 if (g == 1).sum() <= (g == 0).sum() else 0
      b0 = np.asarray(nm.topk_balance(t0, g, minority=minority))
      b1 = np.asarray(nm.topk_balance(t1, g, minority=minority))
      row.update(ks_before=nanmean(ks0[att]), ks_after=nanmean(ks1[att]),
                 balance_before=nanmean(b0[att]), balance_after=nanmean(b1[att]), **fair)
      extra_cols = {"ks_before": ks0[att], "ks_after": ks1[att],
                    "balance_before": b0[att], "balance_after": b1[att]}
    rows.append(row)
    for i, j in enumerate(att):
      r = {"layer": name, "channel": int(j), f"top{ok}_overlap": float(overlap[j]),
           "kendall_tau": float(tau[j]), "kendall_tau_w": float(tau_w[j]),
           "clip_delta": float(cd[j]), "clip_w": float(cw[j]), "silenced": bool(silenced[j]),
           "topk_before": " ".join(map(str, t0[j])), "topk_after": " ".join(map(str, t1[j]))}
      r.update({k: float(v[i]) for k, v in extra_cols.items()})
      channel_rows.append(r)
  return rows, channel_rows, topk_after


def embedder_description(inputs: ExperimentInputs, config: ManipulateConfig) -> str:
  """What CLIP-δ / CLIP-W embed images with, for reports."""
  if inputs.embedder is None:
    return (f"the original model's pooled `{config.embed_layer}` features (stand-in for CLIP; "
            "`--embedder clip:PATH` for CLIP)")
  return getattr(inputs.embedder, "description", "a custom embedder")


def nanmean(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
