"""Fairness metrics for the fairwashing attack (Nanfack et al. 2024).

* :func:`ks_distance` / :func:`ks_distance_groups` — two-sample Kolmogorov–Smirnov distance
  ``sup_t |F_0(t) − F_1(t)|`` between the empirical distributions of a neuron's activations on
  two groups; equals ``scipy.stats.ks_2samp(x0, x1).statistic``.
* :func:`topk_balance` — within each channel's top-k images, (count of minority-group images) /
  (count of majority-group images).
* :func:`ddi` — disparate impact difference ``|p(ŷ=c | z=0) − p(ŷ=c | z=1)|``.
* :func:`deo` — equal-opportunity difference ``|p(ŷ=c | y=c, z=0) − p(ŷ=c | y=c, z=1)|``.

Group ids are ``z ∈ {0, 1}``; other values belong to neither group. Undefined quantities (a
group with no member, or no member with ``y = c``) are NaN rather than errors, so the metrics
stay jittable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ks_distance", "ks_distance_groups", "topk_balance", "ddi", "deo"]


@jax.jit
def _ks_groups(values: jax.Array, groups: jax.Array) -> jax.Array:
  n = values.shape[0]
  order = jnp.argsort(values, axis=0)  # (N, C)
  v = jnp.take_along_axis(values, order, axis=0)
  g = groups[order]  # (N, C)
  n0 = jnp.sum(groups == 0).astype(jnp.float32)
  n1 = jnp.sum(groups == 1).astype(jnp.float32)
  cdf0 = jnp.cumsum((g == 0).astype(jnp.float32), axis=0) / n0
  cdf1 = jnp.cumsum((g == 1).astype(jnp.float32), axis=0) / n1
  # Evaluate the ECDFs only after the last element of each run of equal values.
  last = jnp.concatenate([v[1:] != v[:-1], jnp.ones((1, v.shape[1]), bool)], axis=0)
  d = jnp.where(last, jnp.abs(cdf0 - cdf1), 0.0)
  out = jnp.max(d, axis=0) if n > 0 else jnp.zeros(values.shape[1])
  return jnp.where((n0 > 0) & (n1 > 0), out, jnp.nan)


def ks_distance_groups(values: Any, groups: Any) -> jax.Array:
  """Per-channel KS distance between the activations of group 0 and group 1.

  Args:
    values: ``(N, C)`` (or ``(N,)``) activations, e.g. channel energies or pre-activations.
    groups: ``(N,)`` group ids in ``{0, 1}`` (other ids ignored).

  Returns:
    ``(C,)`` float32 (a scalar for 1-D ``values``); NaN where a group is empty.
  """
  vs, gs = np.shape(values), np.shape(groups)
  if len(vs) not in (1, 2) or gs != (vs[0],):
    raise ValueError(f"ks_distance_groups: expected values (N, C) or (N,) and groups (N,), got "
                     f"{vs} and {gs}")
  v = jnp.asarray(values, jnp.float32)
  out = _ks_groups(v[:, None] if v.ndim == 1 else v, jnp.asarray(groups).astype(jnp.int32))
  return out[0] if v.ndim == 1 else out


def ks_distance(x0: Any, x1: Any) -> jax.Array:
  """KS distance ``sup_t |F_0(t) − F_1(t)|`` between two 1-D samples (``ks_2samp`` statistic)."""
  if np.ndim(x0) != 1 or np.ndim(x1) != 1:
    raise ValueError(f"ks_distance: expected two 1-D samples, got {np.shape(x0)}, {np.shape(x1)}")
  if np.size(x0) == 0 or np.size(x1) == 0:
    raise ValueError("ks_distance: both samples must be non-empty")
  v = jnp.concatenate([jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)])
  g = jnp.concatenate([jnp.zeros(np.size(x0), jnp.int32), jnp.ones(np.size(x1), jnp.int32)])
  return ks_distance_groups(v, g)


def topk_balance(topk_indices: Any, groups: Any, *, minority: int = 1) -> jax.Array:
  """Group balance of each channel's top-k set: ``#minority / #majority``.

  Args:
    topk_indices: ``(C, k)`` dataset indices (``-1`` = unfilled slot, ignored).
    groups: ``(N_dataset,)`` group id of every dataset image, in ``{0, 1}``.
    minority: id of the minority group (the other one is the majority).

  Returns:
    ``(C,)`` float32; 1 = balanced, 0 = no minority image; ``inf`` if the set has minority but
    no majority images, NaN if it has neither.
  """
  ts, gs = np.shape(topk_indices), np.shape(groups)
  if len(ts) != 2 or len(gs) != 1:
    raise ValueError(f"topk_balance: expected topk_indices (C, k) and groups (N,), got {ts}, {gs}")
  if minority not in (0, 1):
    raise ValueError(f"topk_balance: minority must be 0 or 1, got {minority}")
  t = jnp.asarray(topk_indices)
  g = jnp.asarray(groups).astype(jnp.int32)[jnp.clip(t, 0, gs[0] - 1)]
  filled = t >= 0
  n_min = jnp.sum(filled & (g == minority), axis=1).astype(jnp.float32)
  n_maj = jnp.sum(filled & (g == 1 - minority), axis=1).astype(jnp.float32)
  return n_min / n_maj


def _predictions(pred: Any, name: str) -> jax.Array:
  p = jnp.asarray(pred)
  if p.ndim == 2:
    return jnp.argmax(p, axis=-1)
  if p.ndim != 1:
    raise ValueError(f"{name}: predictions must be (N,) labels or (N, K) logits, got {p.shape}")
  return p


def _rate_gap(hit: jax.Array, cond: jax.Array, groups: jax.Array) -> jax.Array:
  """|p(hit | cond, z=0) − p(hit | cond, z=1)| for (N, K) hit/cond and (N,) groups."""
  def rate(gid):
    w = cond & (groups == gid)[:, None]
    return jnp.sum(hit & w, axis=0) / jnp.sum(w, axis=0)
  return jnp.abs(rate(0) - rate(1)).astype(jnp.float32)


def ddi(predictions: Any, groups: Any, cls: Any) -> jax.Array:
  """Disparate impact difference ``|p(ŷ=c | z=0) − p(ŷ=c | z=1)|``.

  Args:
    predictions: ``(N,)`` predicted labels or ``(N, K)`` logits (argmax taken).
    groups: ``(N,)`` group ids in ``{0, 1}``.
    cls: class ``c`` (int) or ``(K',)`` classes.

  Returns:
    Scalar (or ``(K',)``) float32; NaN if a group is empty.
  """
  p = _predictions(predictions, "ddi")
  if np.shape(groups) != p.shape:
    raise ValueError(f"ddi: groups must be {p.shape}, got {np.shape(groups)}")
  c = jnp.atleast_1d(jnp.asarray(cls))
  hit = p[:, None] == c[None, :]
  out = _rate_gap(hit, jnp.ones_like(hit), jnp.asarray(groups).astype(jnp.int32))
  return out[0] if np.ndim(cls) == 0 else out


def deo(predictions: Any, labels: Any, groups: Any, cls: Any) -> jax.Array:
  """Equal-opportunity difference ``|p(ŷ=c | y=c, z=0) − p(ŷ=c | y=c, z=1)|``.

  Args:
    predictions: ``(N,)`` predicted labels or ``(N, K)`` logits.
    labels: ``(N,)`` true labels ``y``.
    groups: ``(N,)`` group ids in ``{0, 1}``.
    cls: class ``c`` (int) or ``(K',)`` classes.

  Returns:
    Scalar (or ``(K',)``) float32; NaN if a group has no image with ``y = c``.
  """
  p = _predictions(predictions, "deo")
  if np.shape(groups) != p.shape or np.shape(labels) != p.shape:
    raise ValueError(f"deo: labels and groups must be {p.shape}, got {np.shape(labels)} and "
                     f"{np.shape(groups)}")
  c = jnp.atleast_1d(jnp.asarray(cls))
  y = jnp.asarray(labels)
  hit = p[:, None] == c[None, :]
  cond = y[:, None] == c[None, :]
  out = _rate_gap(hit, cond, jnp.asarray(groups).astype(jnp.int32))
  return out[0] if np.ndim(cls) == 0 else out
