"""Probe-set corruption: random noise and act-avg PGD (Srivastava et al., ICCV 2023).

- :mod:`nemjax.attacks.noise`    Gaussian / uniform / Bernoulli noise on a fraction of images.
- :mod:`nemjax.attacks.act_avg`  act-avg (Eq. 7), Pillow-bilinear interpolation matrices,
                                 concept masks from labels or from the clean run (Eq. 8).
- :mod:`nemjax.attacks.pgd`      L∞ PGD from parts, targeted / U1 / U2 objectives,
                                 :func:`make_act_avg_attack`.

The gradient rewrite PGD uses on CPU lives in :mod:`nemjax.ops.fastgrad` (fine-tuning uses it too).

The modules ``act_avg`` and ``pgd`` keep their names here (their namesake functions are
``attacks.act_avg.act_avg`` and ``attacks.pgd.pgd``); everything else is re-exported.

Example::

  from nemjax import attacks
  attack = attacks.make_act_avg_attack(features_fn, eps=4 / 255, steps=10, objective="u1")
  x_adv = attack(x01, units, source_masks)
"""

from nemjax.attacks import act_avg, noise, pgd
from nemjax.attacks.act_avg import (
  act_avg_upsampled,
  act_avg_weighted,
  concept_mask_from_labels,
  concept_mask_from_unit_masks,
  interp_matrices,
  interp_matrix,
  mask_weights,
  project_mask,
  upsample_bilinear,
)
from nemjax.attacks.noise import (
  NOISE_KINDS,
  bernoulli_noise,
  corrupt,
  gaussian_noise,
  select_fraction,
  uniform_noise,
)
from nemjax.attacks.pgd import (
  ActAvgAttack,
  check_unit_range,
  init_adv,
  make_act_avg_attack,
  objective_weights,
  pgd_step,
  project_linf,
  random_targets,
  sign_descent,
  targeted_loss,
  untargeted_loss,
  weighted_loss,
)

__all__ = [
  "act_avg", "noise", "pgd",
  "act_avg_upsampled", "act_avg_weighted", "concept_mask_from_labels",
  "concept_mask_from_unit_masks", "interp_matrices", "interp_matrix", "mask_weights",
  "project_mask", "upsample_bilinear",
  "NOISE_KINDS", "bernoulli_noise", "corrupt", "gaussian_noise", "select_fraction",
  "uniform_noise",
  "ActAvgAttack", "check_unit_range", "init_adv", "make_act_avg_attack", "objective_weights", "pgd_step",
  "project_linf", "random_targets", "sign_descent", "targeted_loss", "untargeted_loss",
  "weighted_loss",
]
