"""The sweep's act-avg PGD: one compiled program per layer for every ε, mode and group.

:func:`nemjax.attacks.pgd.make_act_avg_attack` closes over ε and compiles for each batch
shape, so a sweep of ε ∈ {2, 4, 6}/255 × {u2, targeted, u1} with groups of varying poisoned
counts compiled a new step for almost every group (a ResNet18 step compiles in ≈ 10 s on
2 cores, about as long as the attack itself). Here ε and the step size are arguments of the
jitted step, U1 is Eq. 9 with empty target masks (``act_avg`` of an empty mask is 0, so the
weights are exactly U1's), and the poisoned images go through in fixed chunks of ``chunk``
rows (the last zero-padded): one compiled ``prepare`` and one ``step`` serve the whole layer,
and memory is bounded by the chunk, not the group. Each image's attack depends only on its
own row (the model runs in inference mode), so chunking changes which images share a batch,
not the objective.

Example::

  attack = SweepAttack(features_fn, steps=10, chunk=32)
  x_adv = attack(x01, units, source_masks, target_masks, eps=4 / 255, step_size=0.8 / 255)
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nemjax.attacks.pgd import check_unit_range, objective_weights, pgd_step, weighted_loss
from nemjax.ops import fastgrad


class SweepAttack:
  """act-avg PGD (Eq. 9 / Eq. 10, zero start, sign steps, ε-ball then [0, 1] projection)
  whose compiled pieces are shared by every call with the same ``chunk``."""

  def __init__(self, features_fn: Callable[[jax.Array], jax.Array], *, steps: int, chunk: int,
               mesh=None, fast_grad: bool | None = None):
    """Args:
      features_fn: ``x01 (N, H, W, 3) -> (N, h, w, U)``, pure and jittable.
      steps: PGD steps (>= 1).
      chunk: images per compiled call (a multiple of the mesh's device count).
      mesh: a ``Mesh`` with a ``data`` axis the chunks are sharded over (None: one device).
      fast_grad: :func:`nemjax.ops.fastgrad.cpu_fast_grad` (None: only on the CPU backend).
    """
    if steps < 1 or chunk < 1:
      raise ValueError(f"SweepAttack: steps and chunk must be >= 1, got {steps}, {chunk}")
    features_fn = fastgrad.by_backend(features_fn, fast_grad)
    self.steps, self.chunk = steps, chunk
    self._sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))
    self._features_fn = features_fn

    @jax.jit
    def prepare(x, units, source_masks, target_masks):
      return objective_weights(features_fn, "targeted", x, units, source_masks, target_masks,
                               fn="SweepAttack")[1]

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(x, x_adv, units, weights, eps, step_size):
      return pgd_step(weighted_loss(features_fn, units, weights), x, x_adv, eps, step_size)

    self._prepare, self._step = prepare, step

  def _put(self, a: np.ndarray) -> jax.Array:
    return jnp.asarray(a) if self._sharding is None else jax.device_put(a, self._sharding)

  def __call__(self, x: np.ndarray, units: np.ndarray, source_masks: np.ndarray,
               target_masks: np.ndarray | None, *, eps: float, step_size: float) -> np.ndarray:
    """Attacks every row.

    Args:
      x: (P, H, W, 3) float32 clean images in [0, 1].
      units: (P,) int, each image's unit.
      source_masks: (P, sh, sw) float32 masks of each image's source concept.
      target_masks: (P, sh, sw) of the target concept, or None for U1 (Eq. 10).
      eps, step_size: L∞ radius and α, in [0, 1] pixel units.

    Returns:
      (P, H, W, 3) float32 x_adv in [0, 1].
    """
    n = len(x)
    units = np.asarray(units, np.int32)
    if n == 0:
      return np.zeros_like(x)
    check_unit_range(units, jax.eval_shape(self._features_fn, jax.ShapeDtypeStruct(
        (1, *x.shape[1:]), jnp.float32)).shape[-1], "SweepAttack")
    if target_masks is None:
      target_masks = np.zeros_like(source_masks)
    pad = (-n) % self.chunk
    padded = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
              for a in (np.asarray(x, np.float32), units, np.asarray(source_masks, np.float32),
                        np.asarray(target_masks, np.float32))]
    eps32, alpha32 = jnp.float32(eps), jnp.float32(step_size)
    out = []
    for s in range(0, n + pad, self.chunk):
      xc, uc, sc, tc = (self._put(a[s:s + self.chunk]) for a in padded)
      weights = self._prepare(xc, uc, sc, tc)
      x_adv = jnp.array(xc, copy=True)  # the step donates x_adv; never xc itself
      for _ in range(self.steps):
        x_adv = self._step(xc, x_adv, uc, weights, eps32, alpha32)
      out.append(np.asarray(x_adv))
    return np.concatenate(out)[:n]
