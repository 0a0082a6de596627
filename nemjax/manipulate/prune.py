"""Pruning defences against feature-visualisation manipulation (Nanfack et al. 2024, §defences).

Two ways of building pruning masks (bool pytrees with the structure of the params, ``True`` =
keep), applied with :func:`apply_masks`:

* :func:`l1_unstructured_masks` — class-blind *global* magnitude pruning: the ``round(rate · n)``
  smallest-|w| weights among all conv / linear kernels are removed (``torch.nn.utils.prune.
  global_unstructured`` with ``L1Unstructured`` and a float amount prunes the same count).
* :func:`vulnerability_masks` — structured pruning of the attacked layer: zero the output
  channels with the highest vulnerability score (e.g. CLIP-δ from :mod:`nemjax.metrics`).

Fine-tuning after pruning re-uses the train step, wrapped by
:func:`nemjax.manipulate.masked` so masks are re-applied after every update.

Leaf paths are strings such as ``"features/10/kernel"`` or ``"layer4/1/bn2/scale"`` (the
``/value`` suffix of NNX variables dropped); :func:`leaf_paths` lists them.

Example::

  masks = l1_unstructured_masks(params, rate=0.5)
  params = apply_masks(params, masks)
  vmask = vulnerability_masks(params, ["features/10"], clip_delta_scores, count=32)
  masks = combine_masks(masks, vmask)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "leaf_paths",
    "apply_masks",
    "combine_masks",
    "l1_unstructured_masks",
    "vulnerability_masks",
    "pruned_fraction",
]

PyTree = Any


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  s = jax.tree_util.keystr(path, simple=True, separator="/")
  return s[: -len("/value")] if s.endswith("/value") else s


def _nodes(params: PyTree) -> list[tuple[str, Any, int]]:
  """(path, node, number of array leaves) for each variable / array leaf, in leaf order."""
  out = []
  for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
    out.append((_path_str(path), node, len(jax.tree.leaves(node))))
  return out


def leaf_paths(params: PyTree) -> list[str]:
  """The path string of every leaf of ``params`` (in flattening order)."""
  return [p for p, _, _ in _nodes(params)]


def _is_weight(node: Any) -> bool:
  if isinstance(node, nnx.Variable):
    return isinstance(node, nnx.Param)
  return True


def _default_prunable(path: str, node: Any) -> bool:
  """Conv / linear kernels: NNX ``Param`` (or plain) floating leaves with ndim >= 2."""
  del path
  if not _is_weight(node):
    return False
  leaves = jax.tree.leaves(node)
  return len(leaves) == 1 and leaves[0].ndim >= 2 and jnp.issubdtype(leaves[0].dtype,
                                                                      jnp.inexact)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zero the pruned weights: ``where(mask, w, 0)`` leaf by leaf.

  Args:
    params: pytree of arrays (or an ``nnx.State``).
    masks: bool pytree of the same structure and leaf shapes.

  Returns:
    Params with masked-out entries set to 0 (dtypes preserved). Jittable.
  """
  pl, pt = jax.tree.flatten(params)
  ml, mt = jax.tree.flatten(masks)
  if pt != mt:
    raise ValueError("apply_masks: masks must have the same pytree structure as params")
  out = []
  for i, (p, m) in enumerate(zip(pl, ml)):
    if np.shape(p) != np.shape(m):
      raise ValueError(f"apply_masks: leaf {i} has shape {np.shape(p)} but its mask "
                       f"{np.shape(m)}")
    out.append(jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)))
  return pt.unflatten(out)


def combine_masks(*masks: PyTree) -> PyTree:
  """Logical AND of several mask pytrees of the same structure."""
  if not masks:
    raise ValueError("combine_masks: give at least one mask pytree")
  return jax.tree.map(_and_all, *masks)


def _and_all(*ms: jax.Array) -> jax.Array:
  out = jnp.asarray(ms[0], bool)
  for m in ms[1:]:
    out = out & jnp.asarray(m, bool)
  return out


def l1_unstructured_masks(params: PyTree, rate: float, *,
                          prunable: Callable[[str, Any], bool] | None = None) -> PyTree:
  r"""Global (class-blind) unstructured L1 magnitude pruning masks.

  All prunable weights are ranked together by ``|w|``; the ``n_prune = round(rate · n)``
  smallest are pruned (ties broken by position in flattening order, so the count is exact even
  with repeated magnitudes, e.g. weights already zero).

  Args:
    params: pytree of arrays or an ``nnx.State``.
    rate: fraction in ``[0, 1]`` of the prunable weights to remove (the paper goes to 0.875).
    prunable: ``prunable(path, node) -> bool``; default: conv / linear kernels (``nnx.Param`` or
      plain floating arrays with ``ndim >= 2``). Other leaves get all-``True`` masks.

  Returns:
    Bool masks with the structure of ``params`` (``True`` = keep).
  """
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f"l1_unstructured_masks: rate must be in [0, 1], got {rate}")
  rule = _default_prunable if prunable is None else prunable
  nodes = _nodes(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = []
  for path, node, n in nodes:
    flags += [bool(rule(path, node))] * n
  chosen = [l for l, f in zip(leaves, flags) if f]
  if not chosen:
    raise ValueError("l1_unstructured_masks: no prunable leaves in params "
                     f"(paths: {leaf_paths(params)[:10]}...)")
  sizes = [int(np.size(l)) for l in chosen]
  total = sum(sizes)
  n_prune = int(round(float(rate) * total))
  mags = jnp.concatenate([jnp.abs(jnp.ravel(l)).astype(jnp.float32) for l in chosen])
  order = jnp.argsort(mags, stable=True)
  keep = jnp.ones((total,), bool).at[order[:n_prune]].set(False)
  masks, offset, it = [], 0, iter(range(len(chosen)))
  for leaf, flag in zip(leaves, flags):
    if flag:
      i = next(it)
      masks.append(keep[offset: offset + sizes[i]].reshape(np.shape(leaf)))
      offset += sizes[i]
    else:
      masks.append(jnp.ones(np.shape(leaf), bool))
  return treedef.unflatten(masks)


def vulnerability_masks(params: PyTree, layers: str | Sequence[str], scores: Any, *,
                        count: int | None = None, rate: float | None = None) -> PyTree:
  """Masks that zero the output channels of the attacked layer with the highest scores.

  The ``count`` (or ``round(rate · C)``) channels with the largest score (e.g. CLIP-δ: the
  channels whose explanation moved most under the attack) are pruned; ties go to the lower
  channel index, NaN scores are never chosen before finite ones. Every weight leaf under one of
  the ``layers`` path prefixes whose last axis has size ``C`` is masked on that axis — give the
  conv's prefix *and* its BatchNorm's (scale and bias) so the channel's output is exactly 0.
  NNX non-``Param`` variables (BatchNorm running statistics) are left alone.

  Args:
    params: pytree of arrays or an ``nnx.State``.
    layers: one path prefix or several (component-wise, e.g. ``"features/10"`` matches
      ``"features/10/kernel"`` but not ``"features/100/kernel"``).
    scores: ``(C,)`` per-channel vulnerability scores.
    count: number of channels to prune, or
    rate: fraction of the ``C`` channels to prune (exactly one of ``count`` / ``rate``).

  Returns:
    Bool masks with the structure of ``params``.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 1:
    raise ValueError(f"vulnerability_masks: scores must be (C,), got shape {s.shape}")
  c = s.shape[0]
  if (count is None) == (rate is None):
    raise ValueError("vulnerability_masks: give exactly one of count or rate")
  if rate is not None:
    if not 0.0 <= float(rate) <= 1.0:
      raise ValueError(f"vulnerability_masks: rate must be in [0, 1], got {rate}")
    count = int(round(float(rate) * c))
  if not 0 <= int(count) <= c:
    raise ValueError(f"vulnerability_masks: count must be in [0, {c}], got {count}")
  prefixes = [layers] if isinstance(layers, str) else list(layers)
  if not prefixes:
    raise ValueError("vulnerability_masks: give at least one layer path prefix")
  key = np.where(np.isnan(s), -np.inf, s)
  order = np.lexsort((np.arange(c), -key))  # highest score first, lower index on ties
  keep_c = np.ones((c,), bool)
  keep_c[order[: int(count)]] = False

  treedef = jax.tree.structure(params)
  masks, matched = [], []
  for path, node, n in _nodes(params):
    hit = any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
    for leaf in jax.tree.leaves(node):
      shape = np.shape(leaf)
      if hit and _is_weight(node) and len(shape) >= 1 and shape[-1] == c:
        masks.append(jnp.broadcast_to(jnp.asarray(keep_c), shape))
        matched.append(path)
      else:
        masks.append(jnp.ones(shape, bool))
  if not matched:
    raise ValueError(f"vulnerability_masks: no weight with {c} output channels under "
                     f"{prefixes}; leaf paths include {leaf_paths(params)[:12]}")
  return treedef.unflatten(masks)


def pruned_fraction(masks: PyTree, params: PyTree | None = None, *,
                    prunable: Callable[[str, Any], bool] | None = None) -> float:
  """Fraction of ``False`` entries, over all mask leaves or (given ``params``) over the leaves
  ``prunable`` selects (default: conv / linear kernels)."""
  ml = jax.tree.leaves(masks)
  if params is not None:
    rule = _default_prunable if prunable is None else prunable
    flags = []
    for path, node, n in _nodes(params):
      flags += [bool(rule(path, node))] * n
    if len(flags) != len(ml):
      raise ValueError("pruned_fraction: masks and params differ in structure")
    ml = [m for m, f in zip(ml, flags) if f]
  total = sum(int(np.size(m)) for m in ml)
  kept = sum(int(np.sum(np.asarray(m))) for m in ml)
  return (total - kept) / max(total, 1)
