"""Scale-free attack objectives for fine-tuning attacks on feature visualisation.

The papers' push-down loss (:func:`nemjax.manipulate.push_down_loss`) is a plain sum of channel
energies. When the next layer can undo a rescaling (a BatchNorm, or a linear classifier after
global pooling), minimising that sum shrinks the whole channel and leaves its ranking — the
explanation — unchanged: on the embedded SmallCNN the mean energy of block4 fell to 7·10⁻⁴ of its
value with the top-5 sets still half unchanged. The objectives here divide every attack term by
the batch's mean energy of the channel (gradient through both), which cancels the rescaling
direction, so only re-ranking lowers the loss. Each is a pure function of activations with the
``attack_loss_fn(acts, batch, decoy_acts)`` signature of :func:`nemjax.manipulate.make_train_step`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.manipulate import losses

__all__ = ["relative_push_down_objective", "relative_push_up_objective",
           "relative_fairwash_terms", "relative_fairwash_objective"]


def _batch_scale(e: jax.Array, eps: jax.Array) -> jax.Array:
  """(C,) mean channel energy of the batch (+ eps): the scale the relative losses divide by."""
  return jnp.mean(e, axis=0) + eps


def relative_push_down_objective(eps: Mapping[str, np.ndarray], *,
                                 mask_key: str = "topk_mask") -> losses.AttackLossFn:
  r"""Push-down made invariant to rescaling a channel.

  .. math:: L = \sum_{n, j} w_{nj} \, \frac{E[n, j]}{\bar E_j + \epsilon_j}, \qquad
            \bar E_j = \operatorname{mean}_{n' \in \text{batch}} E[n', j]

  The plain sum of :func:`nemjax.manipulate.push_down_loss` is minimised by shrinking the whole
  channel, which leaves its ranking — the explanation — unchanged when the next layer can undo
  the scale; dividing by the batch's mean energy (gradient flowing through both) cancels that
  direction, so only re-ranking lowers the loss.

  Args:
    eps: ``{layer: (C,)}`` positive floors of the denominator.
    mask_key: batch key of ``{layer: (N, C) weights w}``.
  """
  eps = {k: jnp.asarray(v, jnp.float32) for k, v in eps.items()}

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del decoy_acts
    total = 0.0
    for name, ep in eps.items():
      e = losses.channel_energy(acts[name].astype(jnp.float32))
      w = jnp.asarray(batch[mask_key][name], jnp.float32)
      total = total + jnp.sum(w * e / _batch_scale(e, ep)[None, :])
    return total

  return attack_loss_fn


def relative_push_up_objective(weights: Mapping[str, np.ndarray],
                               eps: Mapping[str, np.ndarray]) -> losses.AttackLossFn:
  r"""Push-up hinge divided by the batch's mean channel energy (see
  :func:`relative_push_down_objective`):
  ``Σ_j c_j Σ_{x*, x} [E(x, j) − E(x*, j)]₊ / (Ē_j + ε_j)``, Ē over batch and decoys."""
  weights = {k: jnp.asarray(v, jnp.float32) for k, v in weights.items()}
  eps = {k: jnp.asarray(v, jnp.float32) for k, v in eps.items()}

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del batch
    total = 0.0
    for name, c in weights.items():
      e = losses.channel_energy(acts[name].astype(jnp.float32))
      d = losses.channel_energy(decoy_acts[name].astype(jnp.float32))
      scale = _batch_scale(jnp.concatenate([e, d]), eps[name])
      total = total + losses.push_up_loss(e, d, c / scale)
    return total

  return attack_loss_fn


def _group_moments(mu: jax.Array, rho: jax.Array, groups: jax.Array):
  """Group means of per-image spatial means ``mu`` and mean squares ``rho`` (N, C)."""
  out = []
  for gid in (0, 1):
    w = (groups == gid).astype(mu.dtype)
    n = jnp.sum(w)
    safe = jnp.where(n > 0, n, 1.0)
    out.append((w @ mu / safe, w @ rho / safe, n))
  return out


def relative_fairwash_terms(mu, rho, groups, eps):
  r"""Per-channel scale-free fairwashing term
  ``(μ₀ − μ₁)² / s + (ρ₀ − ρ₁)² / s²`` with ``s = mean(ρ) + ε`` over the samples; 0 when a
  group is empty. Works on NumPy or JAX ``(N, C)`` inputs."""
  mu, rho = jnp.asarray(mu, jnp.float32), jnp.asarray(rho, jnp.float32)
  g = jnp.asarray(groups).astype(jnp.int32)
  (m0, r0, n0), (m1, r1, n1) = _group_moments(mu, rho, g)
  member = ((g == 0) | (g == 1)).astype(mu.dtype)
  s = member @ rho / jnp.maximum(jnp.sum(member), 1.0) + eps
  terms = jnp.square(m0 - m1) / s + jnp.square(r0 - r1) / jnp.square(s)
  return jnp.where((n0 > 0) & (n1 > 0), terms, 0.0)


def relative_fairwash_objective(weights: Mapping[str, np.ndarray], eps: Mapping[str, np.ndarray],
                                *, group_key: str = "group") -> losses.AttackLossFn:
  """Fairwashing (first and second moments of pre-activations matched across groups) made
  scale-free by dividing by the batch's mean square (see :func:`relative_fairwash_terms`)."""
  weights = {k: jnp.asarray(v, jnp.float32) for k, v in weights.items()}

  def attack_loss_fn(acts, batch, decoy_acts=None):
    del decoy_acts
    total = 0.0
    for name, c in weights.items():
      a = acts[name].astype(jnp.float32)
      a = a.reshape(a.shape[0], -1, a.shape[-1])
      terms = relative_fairwash_terms(jnp.mean(a, 1), jnp.mean(jnp.square(a), 1),
                                      batch[group_key], eps[name])
      total = total + jnp.sum(c * terms)
    return total

  return attack_loss_fn
