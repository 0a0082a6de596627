"""Attack and distillation losses for manipulating feature visualisation by fine-tuning.

Nanfack et al. (AAAI 2024) / Fulleringer (MSc thesis 2023) fine-tune a network θ on

  min_θ  α · L_A(θ) + (1 − α) · L_M(θ),

where L_A is an attack objective on the activations of chosen channels and L_M keeps the model
close to the frozen original by distillation. Every loss here is a pure function of activations
(no model, no state), so it can be jitted, differentiated and tested in isolation.

The *channel activation* of a conv channel j on image x is the squared spatial L2 norm of its
map, ``E[x, j] = ‖f^{(l,j)}(x)‖² = Σ_{u,v} f^{(l,j)}(x)[u, v]²`` (:func:`channel_energy`).

Losses:

* :func:`push_down_loss`  Σ_j Σ_{x∈topk(j)} E[x, j]  — make the initial top-k images stop
  activating their channels.
* :func:`push_up_loss`    Σ_j Σ_{x*∈decoy} Σ_{x∈batch} [E[x, j] − E[x*, j]]₊ — make a decoy set
  the most activating images.
* :func:`fairwashing_loss` Σ_j ‖μ₀ⱼ − μ₁ⱼ‖² + ‖ρ₀ⱼ − ρ₁ⱼ‖² — equalise the first and second
  moments of pre-activations between two groups.
* :func:`distillation_loss` cross-entropy between the frozen model's softmax and the
  fine-tuned model's log-softmax.

The ``*_objective`` factories turn these into the ``attack_loss_fn(acts, batch, decoy_acts)``
callables that :func:`nemjax.manipulate.make_train_step` expects, for any set of layers and
channels given as ``{layer_name: channel_mask (C,)}``.

Example::

  objective = push_down_objective({"features.10": jnp.ones(256, bool)})
  # batch["topk_mask"]["features.10"]: (N, 256) bool, True where image n is in the initial
  # top-k set of channel j (see :func:`topk_membership`).
  loss = objective(acts, batch, None)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = Any
AttackLossFn = Callable[[Mapping[str, Array], Mapping[str, Any], "Mapping[str, Array] | None"],
                        Array]

__all__ = [
    "channel_energy",
    "push_down_loss",
    "push_up_loss",
    "fairwashing_loss",
    "distillation_loss",
    "total_loss",
    "topk_membership",
    "push_down_objective",
    "push_up_objective",
    "fairwashing_objective",
    "sum_objectives",
]


def _shape_of(x: ArrayLike) -> tuple[int, ...]:
  return tuple(np.shape(x))


def channel_energy(acts: ArrayLike) -> Array:
  r"""Channel activation: squared spatial L2 norm of each channel map.

  .. math:: E[n, j] = \sum_{u, v} a[n, u, v, j]^2

  Args:
    acts: ``(N, h, w, C)`` conv activations (NHWC), or ``(N, C)`` dense activations (then
      ``E = acts²``, the squared norm of a 1×1 map).

  Returns:
    ``(N, C)`` energies, in the dtype of ``acts``.
  """
  shape = _shape_of(acts)
  acts = jnp.asarray(acts)
  if len(shape) == 4:
    return jnp.sum(jnp.square(acts), axis=(1, 2))
  if len(shape) == 2:
    return jnp.square(acts)
  raise ValueError(f"channel_energy: acts must be (N, h, w, C) or (N, C), got shape {shape}")


def push_down_loss(acts: ArrayLike, topk_mask: ArrayLike, *, reduction: str = "sum") -> Array:
  r"""Push-down attack loss: energy of the (image, channel) pairs in the initial top-k sets.

  .. math:: L_{down} = \sum_j \sum_{x \in \mathrm{topk}(j)} \lVert f^{(l,j)}(x) \rVert^2
                     = \sum_{n, j} m[n, j] \, E[n, j]

  Args:
    acts: ``(N, h, w, C)`` or ``(N, C)`` activations of the batch.
    topk_mask: ``(N, C)`` bool or float weights; ``m[n, j]`` is 1 (or a weight) where image ``n``
      belongs to the initial top-k set of channel ``j``, 0 elsewhere. Channels that are not
      attacked simply have an all-zero column.
    reduction: ``"sum"`` (the paper's statement) or ``"mean"`` (divide by ``Σ m``, 0 if empty) —
      useful to keep the loss on the scale of the distillation term.

  Returns:
    Scalar loss (float32).
  """
  energy = channel_energy(acts)
  mshape = _shape_of(topk_mask)
  if mshape != tuple(energy.shape):
    raise ValueError(
        f"push_down_loss: topk_mask must have shape (N, C) = {tuple(energy.shape)}, got {mshape}")
  m = jnp.asarray(topk_mask).astype(energy.dtype)
  total = jnp.sum(m * energy)
  if reduction == "sum":
    return total
  if reduction == "mean":
    denom = jnp.sum(m)
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), 0.0)
  raise ValueError(f"push_down_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def push_up_loss(energies: ArrayLike, decoy_energies: ArrayLike, channel_mask: ArrayLike, *,
                 reduction: str = "sum") -> Array:
  r"""Push-up (decoy) attack loss.

  .. math:: L_{up} = \sum_j c_j \sum_{x^* \in D^*} \sum_{x \in B}
                     \left[ E[x, j] - E[x^*, j] \right]_+

  Minimising it raises the decoy images' energies above the energies of every batch image, so
  the decoys become the channel's most activating images.

  Args:
    energies: ``(N, C)`` channel energies of the batch (see :func:`channel_energy`).
    decoy_energies: ``(M, C)`` channel energies of the decoy images, computed with the *current*
      (fine-tuned) parameters so gradients flow through both terms.
    channel_mask: ``(C,)`` bool or float weights ``c_j`` selecting the attacked channels.
    reduction: ``"sum"`` (paper) or ``"mean"`` (divide by ``N · M · Σ c``).

  Returns:
    Scalar loss.
  """
  es, ds, cs = _shape_of(energies), _shape_of(decoy_energies), _shape_of(channel_mask)
  if len(es) != 2 or len(ds) != 2 or es[1] != ds[1] or cs != (es[1],):
    raise ValueError(
        "push_up_loss: expected energies (N, C), decoy_energies (M, C) and channel_mask (C,); "
        f"got {es}, {ds}, {cs}")
  e = jnp.asarray(energies)
  d = jnp.asarray(decoy_energies)
  c = jnp.asarray(channel_mask).astype(e.dtype)
  hinge = jax.nn.relu(e[:, None, :] - d[None, :, :])  # (N, M, C)
  total = jnp.sum(jnp.sum(hinge, axis=(0, 1)) * c)
  if reduction == "sum":
    return total
  if reduction == "mean":
    denom = es[0] * ds[0] * jnp.sum(c)
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), 0.0)
  raise ValueError(f"push_up_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def fairwashing_loss(preacts: ArrayLike, groups: ArrayLike, channel_mask: ArrayLike) -> Array:
  r"""Fairwashing loss: match the first two moments of pre-activations across two groups.

  .. math::
     \mu_{g,j} = \frac{1}{|S_g|} \sum_{s \in S_g} a_{s,j}, \qquad
     \rho_{g,j} = \frac{1}{|S_g|} \sum_{s \in S_g} a_{s,j}^2, \qquad
     L_{fair} = \sum_j c_j \left[ (\mu_{0,j} - \mu_{1,j})^2 + (\rho_{0,j} - \rho_{1,j})^2 \right]

  where ``S_g`` are the samples of group ``g`` in the batch. For conv maps ``(N, h, w, C)`` every
  spatial position of every image of the group is a sample (moments over ``N_g · h · w``
  values); for dense activations ``(N, C)`` the samples are the images.

  Empty groups: if a group has no member in the batch its moments are undefined and the loss is
  **0** (no contribution, zero gradient), so random batches that miss a group are harmless under
  ``jit``.

  Args:
    preacts: ``(N, h, w, C)`` or ``(N, C)`` *pre-activations* (tap the layer before its ReLU).
    groups: ``(N,)`` int or bool group ids in ``{0, 1}``; other values are ignored (belong to
      neither group).
    channel_mask: ``(C,)`` bool or float weights ``c_j`` of the neurons to fairwash.

  Returns:
    Scalar loss.
  """
  ps, gs, cs = _shape_of(preacts), _shape_of(groups), _shape_of(channel_mask)
  if len(ps) not in (2, 4):
    raise ValueError(f"fairwashing_loss: preacts must be (N, h, w, C) or (N, C), got {ps}")
  if gs != (ps[0],) or cs != (ps[-1],):
    raise ValueError(
        f"fairwashing_loss: expected groups ({ps[0]},) and channel_mask ({ps[-1]},); "
        f"got {gs} and {cs}")
  a = jnp.asarray(preacts)
  a = a.reshape(ps[0], -1, ps[-1])  # (N, P, C), P = h·w or 1
  g = jnp.asarray(groups).astype(jnp.int32)
  c = jnp.asarray(channel_mask).astype(a.dtype)
  per_image_mean = jnp.mean(a, axis=1)  # (N, C)
  per_image_sq = jnp.mean(jnp.square(a), axis=1)  # (N, C)

  def moments(gid):
    w = (g == gid).astype(a.dtype)  # (N,)
    count = jnp.sum(w)
    safe = jnp.where(count > 0, count, 1.0)
    return w @ per_image_mean / safe, w @ per_image_sq / safe, count

  mu0, rho0, n0 = moments(0)
  mu1, rho1, n1 = moments(1)
  per_channel = jnp.square(mu0 - mu1) + jnp.square(rho0 - rho1)
  loss = jnp.sum(c * per_channel)
  return jnp.where((n0 > 0) & (n1 > 0), loss, 0.0)


def distillation_loss(logits: ArrayLike, teacher_logits: ArrayLike) -> Array:
  r"""Distillation loss L_M: cross-entropy from the frozen model's distribution.

  .. math:: L_M = -\frac{1}{N} \sum_n \sum_k \mathrm{softmax}(t_n)_k \,
                  \log \mathrm{softmax}(z_n)_k

  Args:
    logits: ``(N, K)`` logits ``z`` of the fine-tuned model.
    teacher_logits: ``(N, K)`` logits ``t`` of the frozen original model (gradient stopped).

  Returns:
    Scalar mean cross-entropy over the batch.
  """
  ls, ts = _shape_of(logits), _shape_of(teacher_logits)
  if len(ls) != 2 or ls != ts:
    raise ValueError(
        f"distillation_loss: logits and teacher_logits must both be (N, K); got {ls} and {ts}")
  target = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(teacher_logits)), axis=-1)
  return jnp.mean(optax.softmax_cross_entropy(jnp.asarray(logits), target))


def total_loss(attack_loss: ArrayLike, distill_loss: ArrayLike, alpha: ArrayLike) -> Array:
  r"""Combined objective ``α · L_A + (1 − α) · L_M``."""
  alpha = jnp.asarray(alpha)
  return alpha * attack_loss + (1.0 - alpha) * distill_loss


def topk_membership(topk_indices: ArrayLike, batch_indices: ArrayLike) -> Array:
  """Build the ``(N, C)`` push-down mask of a batch from per-channel top-k dataset indices.

  Args:
    topk_indices: ``(C, k)`` int dataset indices of each channel's initial top-k images (e.g.
      ``TopKState.indices`` from :mod:`nemjax.metrics`); negative entries (unfilled) are ignored.
    batch_indices: ``(N,)`` int dataset indices of the batch images.

  Returns:
    ``(N, C)`` bool, ``True`` where batch image ``n`` is in channel ``j``'s top-k set.
  """
  ts, bs = _shape_of(topk_indices), _shape_of(batch_indices)
  if len(ts) != 2 or len(bs) != 1:
    raise ValueError(
        f"topk_membership: expected topk_indices (C, k) and batch_indices (N,); got {ts}, {bs}")
  t = jnp.asarray(topk_indices)
  b = jnp.asarray(batch_indices)
  hit = (b[:, None, None] == t[None, :, :]) & (t[None, :, :] >= 0)  # (N, C, k)
  return jnp.any(hit, axis=-1)


def _check_layers(layer_channels: Mapping[str, ArrayLike], who: str) -> dict[str, Array]:
  if not isinstance(layer_channels, Mapping) or not layer_channels:
    raise ValueError(f"{who}: layer_channels must be a non-empty dict {{layer: channel mask (C,)}}")
  out = {}
  for name, mask in layer_channels.items():
    if len(_shape_of(mask)) != 1:
      raise ValueError(f"{who}: channel mask of layer {name!r} must be (C,), got "
                       f"{_shape_of(mask)}")
    out[name] = jnp.asarray(mask)
  return out


def _get_acts(acts: Mapping[str, Array], name: str, who: str) -> Array:
  if name not in acts:
    raise ValueError(f"{who}: layer {name!r} not in the tapped activations {sorted(acts)}")
  return acts[name]


def push_down_objective(layer_channels: Mapping[str, ArrayLike], *, reduction: str = "sum",
                        mask_key: str = "topk_mask") -> AttackLossFn:
  """Push-down attack on several layers: ``Σ_layers push_down_loss``.

  Args:
    layer_channels: ``{layer: (C,) bool/float channel mask}``; the per-batch top-k mask is
      multiplied by it, so only the selected channels are attacked.
    reduction: passed to :func:`push_down_loss`.
    mask_key: the batch key holding ``{layer: (N, C) top-k membership mask}``.

  Returns:
    ``attack_loss_fn(acts, batch, decoy_acts) -> scalar``.
  """
  channels = _check_layers(layer_channels, "push_down_objective")

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del decoy_acts
    if mask_key not in batch:
      raise ValueError(f"push_down_objective: batch has no {mask_key!r} entry")
    total = 0.0
    for name, cmask in channels.items():
      a = _get_acts(acts, name, "push_down_objective")
      m = jnp.asarray(batch[mask_key][name])
      if m.shape[-1:] != cmask.shape:
        raise ValueError(f"push_down_objective: layer {name!r} has {cmask.shape[0]} channels in "
                         f"its channel mask but its top-k mask has shape {m.shape}")
      weights = m.astype(a.dtype) * cmask[None, :].astype(a.dtype)
      total = total + push_down_loss(a, weights, reduction=reduction)
    return total

  return attack_loss_fn


def push_up_objective(layer_channels: Mapping[str, ArrayLike], *,
                      reduction: str = "sum") -> AttackLossFn:
  """Push-up (decoy) attack on several layers: ``Σ_layers push_up_loss``.

  The train step runs ``batch["decoy"]`` through the fine-tuned model and passes the resulting
  activations as ``decoy_acts``.

  Args:
    layer_channels: ``{layer: (C,) channel mask}``.
    reduction: passed to :func:`push_up_loss`.

  Returns:
    ``attack_loss_fn(acts, batch, decoy_acts) -> scalar``.
  """
  channels = _check_layers(layer_channels, "push_up_objective")

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del batch
    if decoy_acts is None:
      raise ValueError("push_up_objective: no decoy activations; put the decoy images in "
                       "batch['decoy']")
    total = 0.0
    for name, cmask in channels.items():
      e = channel_energy(_get_acts(acts, name, "push_up_objective"))
      d = channel_energy(_get_acts(decoy_acts, name, "push_up_objective"))
      total = total + push_up_loss(e, d, cmask, reduction=reduction)
    return total

  return attack_loss_fn


def fairwashing_objective(layer_channels: Mapping[str, ArrayLike], *,
                          group_key: str = "group") -> AttackLossFn:
  """Fairwashing attack on several layers: ``Σ_layers fairwashing_loss``.

  Args:
    layer_channels: ``{layer: (C,) channel mask}``; the layers must be tapped *pre-activation*.
    group_key: the batch key holding the ``(N,)`` group ids in ``{0, 1}``.

  Returns:
    ``attack_loss_fn(acts, batch, decoy_acts) -> scalar``.
  """
  channels = _check_layers(layer_channels, "fairwashing_objective")

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del decoy_acts
    if group_key not in batch:
      raise ValueError(f"fairwashing_objective: batch has no {group_key!r} entry")
    total = 0.0
    for name, cmask in channels.items():
      a = _get_acts(acts, name, "fairwashing_objective")
      total = total + fairwashing_loss(a, batch[group_key], cmask)
    return total

  return attack_loss_fn


def sum_objectives(*objectives: AttackLossFn, weights: "tuple[float, ...] | None" = None
                   ) -> AttackLossFn:
  """Weighted sum of several ``attack_loss_fn`` objectives (e.g. push-down on two layers with
  different reductions, or push-down + fairwashing)."""
  if not objectives:
    raise ValueError("sum_objectives: give at least one objective")
  if weights is None:
    weights = (1.0,) * len(objectives)
  if len(weights) != len(objectives):
    raise ValueError(f"sum_objectives: {len(objectives)} objectives but {len(weights)} weights")

  def attack_loss_fn(acts, batch, decoy_acts=None):
    return sum(w * f(acts, batch, decoy_acts) for w, f in zip(weights, objectives))

  return attack_loss_fn
