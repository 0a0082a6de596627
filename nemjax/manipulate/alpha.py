"""Dynamic α rule for the attack / distillation trade-off (Fulleringer 2023, Nanfack et al. 2024).

The fine-tuning objective is ``α · L_A + (1 − α) · L_M``. α starts at 0.1; after each
evaluation of the fine-tuned model,

  α ← α / 2   if  acc_ref − acc > tolerance   (accuracy fell by more than 0.5 points),
  α ← α · 2   otherwise,

clipped to ``[min_alpha, max_alpha]``. The rule is an optax-style pair of pure functions over a
small ``AlphaState`` pytree, so it can live inside a jitted loop or on the host.

Example::

  cfg = AlphaConfig()                       # 0.1 start, 0.5-point tolerance, ×2 / ÷2 in [1e-3, 0.9]
  state = alpha_init(reference_accuracy=56.6, config=cfg)
  for epoch in range(5):
    ...train with alpha=state.alpha...
    state = alpha_update(state, accuracy=evaluate(), config=cfg)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["AlphaConfig", "AlphaState", "alpha_init", "alpha_update"]


@dataclasses.dataclass(frozen=True)
class AlphaConfig:
  """Settings of the dynamic α rule (frozen, hashable: a static argument of ``jax.jit``).

  ``tolerance`` is in the units of the accuracies given to :func:`alpha_init` and
  :func:`alpha_update`: 0.5 means half a percentage point when accuracies are percentages
  (0..100), as in the thesis. Use 0.005 for accuracies given as fractions. ``fixed`` replaces
  the rule by a constant α for the caller (the fine-tuning loop); :func:`alpha_init` and
  :func:`alpha_update` only implement the rule and ignore it.
  """
  init: float = 0.1           # starting α
  tolerance: float = 0.5      # allowed accuracy drop vs the original model
  factor: float = 2.0         # α ← α·factor when within tolerance, α/factor otherwise
  min_alpha: float = 1e-3     # lower bound of α
  max_alpha: float = 0.9      # upper bound of α (< 1 keeps some distillation)
  fixed: float | None = None  # constant α instead of the rule (0: fine-tuning only)

  def validate(self) -> None:
    """``ValueError("field: ...")`` naming the first bad setting (the rule's settings are
    not read, and not checked, when α is fixed)."""
    if self.fixed is not None:
      if not 0.0 <= self.fixed <= 1.0:
        raise ValueError(f"fixed: must be in [0, 1], got {self.fixed}")
      return
    _check_rule(self)


class AlphaState(NamedTuple):
  """State of the dynamic α rule."""
  alpha: jax.Array               # () float32, current α
  reference_accuracy: jax.Array  # () float32, accuracy of the original (frozen) model
  count: jax.Array               # () int32, number of updates applied


def _check_rule(config: AlphaConfig) -> None:
  if not 0.0 < config.min_alpha <= 1.0:
    raise ValueError(f"min_alpha: must be in (0, 1], got {config.min_alpha}")
  if not config.min_alpha <= config.max_alpha <= 1.0:
    raise ValueError(f"max_alpha: must be in [min_alpha={config.min_alpha}, 1], got "
                     f"{config.max_alpha}")
  if not config.min_alpha <= config.init <= config.max_alpha:
    raise ValueError(f"init: {config.init} outside [min_alpha, max_alpha] = "
                     f"[{config.min_alpha}, {config.max_alpha}]")
  if not config.factor > 1.0:
    raise ValueError(f"factor: must be > 1, got {config.factor}")
  if not config.tolerance >= 0.0:
    raise ValueError(f"tolerance: must be >= 0, got {config.tolerance}")


def alpha_init(reference_accuracy: Any, config: AlphaConfig = AlphaConfig()) -> AlphaState:
  """Start the rule at ``config.init`` with the original model's accuracy as the reference.

  Args:
    reference_accuracy: scalar accuracy of the frozen original model (same units as the
      accuracies later given to :func:`alpha_update`).
    config: rule settings.

  Returns:
    The initial :class:`AlphaState`.
  """
  _check_rule(config)
  return AlphaState(alpha=jnp.asarray(config.init, jnp.float32),
                    reference_accuracy=jnp.asarray(reference_accuracy, jnp.float32),
                    count=jnp.zeros((), jnp.int32))


def alpha_update(state: AlphaState, accuracy: Any,
                 config: AlphaConfig = AlphaConfig()) -> AlphaState:
  r"""Apply one step of the rule after an evaluation.

  .. math::
     \alpha' = \mathrm{clip}\Big(\alpha \cdot \begin{cases} 1/\gamma & acc_{ref} - acc > \tau \\
     \gamma & \text{otherwise} \end{cases}, \alpha_{min}, \alpha_{max}\Big)

  with γ = ``config.factor`` and τ = ``config.tolerance``. Jittable (no Python branching on
  values).

  Args:
    state: current :class:`AlphaState`.
    accuracy: scalar accuracy of the fine-tuned model at this evaluation.
    config: rule settings (the same as given to :func:`alpha_init`).

  Returns:
    The updated :class:`AlphaState`.
  """
  _check_rule(config)
  acc = jnp.asarray(accuracy, jnp.float32)
  if acc.ndim != 0:
    raise ValueError(f"alpha_update: accuracy must be a scalar, got shape {acc.shape}")
  fell = (state.reference_accuracy - acc) > config.tolerance
  scale = jnp.where(fell, 1.0 / config.factor, config.factor)
  alpha = jnp.clip(state.alpha * scale, config.min_alpha, config.max_alpha)
  return AlphaState(alpha=alpha.astype(jnp.float32),
                    reference_accuracy=state.reference_accuracy,
                    count=state.count + 1)
