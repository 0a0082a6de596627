"""The fixed-length Adam loop shared by the image optimisations (feature visualisation,
adversarial patches, trigger reconstruction): pure and jittable."""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

__all__ = ["adam_minimise"]


def adam_minimise(loss_fn: Callable[[Any, jax.Array], jax.Array], params: Any, key: jax.Array,
                  steps: int, lr: float) -> Any:
  """Minimise ``loss_fn`` with ``steps`` Adam steps inside one ``lax.fori_loop``.

  Args:
    loss_fn: ``loss_fn(params, key) -> scalar``; step ``i`` gets ``fold_in(key, i)``.
    params: initial parameters (a pytree).
    key: PRNG key of the per-step draws.
    steps: number of steps (static or traced).
    lr: Adam learning rate.

  Returns:
    The parameters after ``steps`` steps (the same pytree structure).
  """
  opt = optax.adam(lr)

  def body(i, carry):
    p, opt_state = carry
    g = jax.grad(loss_fn)(p, jax.random.fold_in(key, i))
    updates, opt_state = opt.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
  return params
