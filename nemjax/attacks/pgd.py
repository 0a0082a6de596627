"""L∞ PGD in pixel space and the act-avg objectives of Srivastava et al. (ICCV 2023).

The attack is built from small pure parts, in the manner of DeepMind's
``adversarial_robustness/jax/attacks.py``:

- :func:`init_adv`        start point: ``x`` (the paper) or a uniform draw in the ε-ball;
- :func:`sign_descent`    ``x − α·sign(g)``;
- :func:`project_linf`    ``δ = clip(x_adv − x, −ε, ε)``, then ``clip(x + δ, 0, 1)`` (the paper's
                          code order);
- :func:`pgd`             loops the step (``lax.fori_loop`` by default) on a framework-free
                          ``loss_fn(x_adv) -> (N,)`` and returns ``stop_gradient(x_adv)``.

``loss_fn`` returns one loss per image, to be *minimised*; the gradient is taken of their sum, so
each image's update depends only on its own loss (the paper attacks one image at a time).

Objectives (``features_fn(x01) -> acts (N, h, w, U)`` takes [0, 1] images and applies the
model's normalisation itself):

- targeted and U2 (Eq. 9): ``act_avg(source) − act_avg(target)`` of each image's unit
  (:func:`targeted_loss`); U2 draws the target concept at random (:func:`random_targets`);
- U1 (Eq. 10): ``act_avg(source)`` (:func:`untargeted_loss`).

Every image carries its own unit index and masks, so one call attacks images of many units.
Masks are projected onto the activation grid once per call (:func:`~nemjax.attacks.act_avg.
mask_weights`), so each step costs one forward and one input-gradient pass and a dot product.

Example::

  import jax, jax.numpy as jnp
  from nemjax.attacks import pgd
  w = jax.random.normal(jax.random.key(0), (8, 8, 3, 16)) * 0.1
  def features_fn(x01):  # (N, 64, 64, 3) -> (N, 8, 8, 16)
    return jax.nn.relu(jax.lax.conv_general_dilated(
        x01 - 0.5, w, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  attack = pgd.make_act_avg_attack(features_fn, eps=4 / 255, steps=10, objective="targeted")
  x = jax.random.uniform(jax.random.key(1), (4, 64, 64, 3))
  src = jnp.zeros((4, 32, 32)).at[:, :16].set(1.0)
  tgt = 1.0 - src
  x_adv = attack(x, jnp.array([0, 1, 2, 3]), src, tgt)
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.attacks import act_avg as aa
from nemjax.ops import fastgrad
from nemjax.attacks._checks import check_images, is_number, is_traced

__all__ = [
  "ActAvgAttack",
  "LossFn",
  "FeaturesFn",
  "LOOPS",
  "OBJECTIVES",
  "init_adv",
  "sign_descent",
  "project_linf",
  "pgd_step",
  "pgd",
  "targeted_loss",
  "untargeted_loss",
  "objective_weights",
  "weighted_loss",
  "check_unit_range",
  "random_targets",
  "make_act_avg_attack",
]

LossFn = Callable[[jax.Array], jax.Array]          # x_adv (N, H, W, C) -> losses (N,)
FeaturesFn = Callable[[jax.Array], jax.Array]      # x01 (N, H, W, C) -> acts (N, h, w, U)
Loop = Literal["fori", "scan", "unroll", "python"]
Objective = Literal["targeted", "u1", "u2"]
LOOPS = ("fori", "scan", "unroll", "python")
OBJECTIVES = ("targeted", "u1", "u2")


# ---------------------------------------------------------------------------------------------
# Argument checks (raise before anything reaches JAX).

def _check_hparams(eps, steps, step_size, fn: str) -> float:
  """Validates eps, steps, step_size; returns the step size (default 2·eps/steps)."""
  if not is_number(eps) or not eps > 0:
    raise ValueError(f"{fn}: eps must be a number > 0, got {eps!r}")
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"{fn}: steps must be an int >= 1, got {steps!r}")
  if step_size is None:
    return 2.0 * float(eps) / int(steps)
  if not is_number(step_size) or not step_size > 0:
    raise ValueError(f"{fn}: step_size must be a number > 0 (or None for 2*eps/steps), "
                     f"got {step_size!r}")
  return float(step_size)


# ---------------------------------------------------------------------------------------------
# Parts.

def init_adv(x: jax.Array, eps: float, random_start: bool = False,
             key: jax.Array | None = None) -> jax.Array:
  """Start point: ``x`` itself (the paper), or ``clip(x + U(−ε, ε), 0, 1)``.

  Args:
    x: (N, H, W, C) clean images in [0, 1].
    eps: L∞ radius.
    random_start: draw a uniform start in the ε-ball (needs ``key``).
    key: PRNG key, used only when ``random_start``.

  Returns:
    (N, H, W, C).
  """
  if not random_start:
    return x
  if key is None:
    raise ValueError("init_adv: random_start=True needs a PRNG key (key=None given)")
  delta = jax.random.uniform(key, x.shape, x.dtype, minval=-eps, maxval=eps)
  return jnp.clip(x + delta, 0.0, 1.0)


def sign_descent(x_adv: jax.Array, grad: jax.Array, step_size: float) -> jax.Array:
  """One signed-gradient descent step: ``x_adv − α·sign(grad)``."""
  return x_adv - step_size * jnp.sign(grad)


def project_linf(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """Projects onto the ε-ball around ``x``, then onto [0, 1] (the paper's code order).

  ``δ = clip(x_adv − x, −ε, ε)``, returns ``clip(x + δ, 0, 1)``; all (N, H, W, C).
  """
  delta = jnp.clip(x_adv - x, -eps, eps)
  return jnp.clip(x + delta, 0.0, 1.0)


def pgd_step(loss_fn: LossFn, x: jax.Array, x_adv: jax.Array, eps: float,
             step_size: float) -> jax.Array:
  """``project(x_adv − α·sign(∇ Σ_n loss_n(x_adv)))``; all arrays (N, H, W, C)."""
  grad = jax.grad(lambda xa: jnp.sum(loss_fn(xa)))(x_adv)
  return project_linf(sign_descent(x_adv, grad, step_size), x, eps)


def _check_loss_fn(loss_fn: LossFn, x: jax.Array, fn: str) -> None:
  out = jax.eval_shape(loss_fn, x)
  if not hasattr(out, "shape") or out.shape != (x.shape[0],):
    raise ValueError(f"{fn}: loss_fn must return per-image losses ({x.shape[0]},), got "
                     f"{getattr(out, 'shape', type(out))}")


def pgd(loss_fn: LossFn, x: jax.Array, *, eps: float, steps: int,
        step_size: float | None = None, random_start: bool = False,
        key: jax.Array | None = None, loop: Literal["fori", "scan", "unroll"] = "fori",
        return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """L∞ projected (signed) gradient descent of per-image losses, in pixel space [0, 1].

  Each step: ``x_adv ← x_adv − α·sign(∇ Σ_n loss_n(x_adv))``, then ``δ = clip(x_adv − x, ±ε)``
  and ``x_adv = clip(x + δ, 0, 1)``. Jit the caller (``loss_fn`` closed over) for speed.

  Args:
    loss_fn: ``x_adv (N, H, W, C) -> (N,)`` losses to minimise (image n's loss may depend
      only on image n).
    x: (N, H, W, C) clean images in [0, 1].
    eps: L∞ radius (> 0).
    steps: number of steps (>= 1).
    step_size: α (> 0); default ``2·eps/steps`` (the paper's).
    random_start: start from a uniform draw in the ε-ball instead of ``x`` (needs ``key``).
    key: PRNG key for ``random_start``.
    loop: "fori" (``lax.fori_loop``), "scan" (``lax.scan``) or "unroll" (a Python loop traced
      into one program); results are identical. On XLA:CPU, differentiate the model through
      :func:`nemjax.ops.fastgrad.cpu_fast_grad`: without it the convolution input gradients
      inside a ``while`` loop (fori, scan) run about 2.3x slower than at top level (XLA leaves
      their kernels in a layout its fast convolution does not take; BENCHMARKS.md section 3).
    return_trajectory: also return every iterate.

  Returns:
    ``x_adv`` (N, H, W, C), ``stop_gradient``-ed; with ``return_trajectory``, also
    ``trajectory`` (steps + 1, N, H, W, C) holding the start point and each step's iterate
    (the scan loop is then used).
  """
  x = check_images(x, "pgd")
  alpha = _check_hparams(eps, steps, step_size, "pgd")
  if loop not in ("fori", "scan", "unroll"):
    raise ValueError(f"pgd: loop must be 'fori', 'scan' or 'unroll', got {loop!r}")
  if random_start and key is None:
    raise ValueError("pgd: random_start=True needs a PRNG key (key=None given)")
  _check_loss_fn(loss_fn, x, "pgd")
  eps = float(eps)

  x_adv = init_adv(x, eps, random_start, key)
  step = functools.partial(pgd_step, loss_fn, x, eps=eps, step_size=alpha)

  if return_trajectory:
    def scan_body(xa, _):
      xa = step(x_adv=xa)
      return xa, xa
    x_adv, traj = jax.lax.scan(scan_body, x_adv, None, length=steps)
    traj = jnp.concatenate([init_adv(x, eps, random_start, key)[None], traj], axis=0)
    return jax.lax.stop_gradient(x_adv), jax.lax.stop_gradient(traj)

  if loop == "fori":
    x_adv = jax.lax.fori_loop(0, steps, lambda _, xa: step(x_adv=xa), x_adv)
  elif loop == "scan":
    x_adv, _ = jax.lax.scan(lambda xa, _: (step(x_adv=xa), None), x_adv, None, length=steps)
  else:
    for _ in range(steps):
      x_adv = step(x_adv=x_adv)
  return jax.lax.stop_gradient(x_adv)


# ---------------------------------------------------------------------------------------------
# act-avg objectives.

def _act_shape(features_fn: FeaturesFn, x: jax.Array, fn: str) -> tuple[int, int, int]:
  out = jax.eval_shape(features_fn, x)
  if not hasattr(out, "shape") or len(out.shape) != 4 or out.shape[0] != x.shape[0]:
    raise ValueError(f"{fn}: features_fn must map x {x.shape} to acts ({x.shape[0]}, h, w, U), "
                     f"got {getattr(out, 'shape', type(out))}")
  return tuple(out.shape[1:])  # (h, w, U)


def _check_units_masks(x: jax.Array, units, masks, name: str, fn: str
                       ) -> tuple[jax.Array, jax.Array]:
  """Shape and dtype checks of ``units`` (N,) int and ``masks`` (N, sh, sw) against x."""
  units, masks = jnp.asarray(units), jnp.asarray(masks)
  n = x.shape[0]
  if units.shape != (n,) or not jnp.issubdtype(units.dtype, jnp.integer):
    raise ValueError(f"{fn}: units must be int ({n},) to match x {x.shape}, got "
                     f"{units.dtype}{units.shape}")
  if masks.ndim != 3 or masks.shape[0] != n:
    raise ValueError(f"{fn}: {name} must be ({n}, sh, sw) to match x {x.shape}, "
                     f"got {masks.shape}")
  return units, masks


def check_unit_range(units, n_units: int, fn: str) -> None:
  """Raises ValueError unless every entry of the concrete ``units`` lies in [0, n_units).

  The range of a traced array cannot be read, so this refuses one: check on the host, before
  ``jax.jit`` (out-of-range indices inside a jitted gather are clamped silently).
  """
  if is_traced(units):
    raise ValueError(f"{fn}: units must be concrete to check their range against the layer's "
                     f"{n_units} units; check them before jax.jit")
  u = np.asarray(units)
  if u.size and (u.min() < 0 or u.max() >= n_units):
    raise ValueError(f"{fn}: units must lie in [0, {n_units}), got min {u.min()} max {u.max()}")


def objective_weights(features_fn: FeaturesFn, objective: Objective, x: jax.Array, units,
                      source_masks, target_masks=None, *, fn: str = "objective_weights"
                      ) -> tuple[jax.Array, jax.Array]:
  """Validates the per-image inputs of an objective and projects its masks onto the
  activation grid once: ``act_avg`` is linear in the weights, so
  ``act_avg(src) − act_avg(tgt) = <a, w_src − w_tgt>``.

  Args:
    features_fn: ``x01 (N, H, W, C) -> acts (N, h, w, U)``.
    objective: "targeted" / "u2" (``w_src − w_tgt``) or "u1" (``w_src``; ``target_masks``
      ignored).
    x: (N, H, W, C) images (only the shape is used).
    units: (N,) int, each image's unit. Its range is checked when concrete; under tracing it
      cannot be (use :func:`check_unit_range` before jit).
    source_masks, target_masks: (N, sh, sw).

  Returns:
    ``(units (N,) int, weights (N, h, w) float32)``.
  """
  x = check_images(x, fn)
  h, w, n_units = _act_shape(features_fn, x, fn)
  units, source_masks = _check_units_masks(x, units, source_masks, "source_masks", fn)
  if not is_traced(units):
    check_unit_range(units, n_units, fn)
  normalised = aa.normalised_masks(source_masks)
  if objective != "u1":
    if target_masks is None:
      raise ValueError(f"{fn}: objective {objective!r} needs target_masks")
    _, target_masks = _check_units_masks(x, units, target_masks, "target_masks", fn)
    # one projection of the difference: equal source and target masks give exactly zero
    # weights (no gradient, the image stays clean), as the paper's per-image loss does
    normalised = normalised - aa.normalised_masks(target_masks)
  return units, aa.project_normalised(normalised, (h, w))


def weighted_loss(features_fn: FeaturesFn, units: jax.Array, weights: jax.Array) -> LossFn:
  """``loss_fn(x_adv) -> (N,)``: ``<features_fn(x_adv)[n, :, :, units[n]], weights[n]>``."""
  def loss_fn(x_adv: jax.Array) -> jax.Array:
    return aa.act_avg_weighted(features_fn(x_adv), weights, units)
  return loss_fn


def targeted_loss(features_fn: FeaturesFn, x: jax.Array, units: jax.Array,
                  source_masks: jax.Array, target_masks: jax.Array) -> LossFn:
  """Eq. 9 (targeted and U2): ``loss_n = act_avg(source_n) − act_avg(target_n)``.

  Projects the masks onto the activation grid once, here; call it inside the jitted function
  that runs :func:`pgd`.

  Args:
    features_fn: ``x01 (N, H, W, C) -> acts (N, h, w, U)``.
    x: (N, H, W, C) clean images (only their shape is used, to find (h, w)).
    units: (N,) int, each image's attacked unit (range checked when concrete).
    source_masks: (N, sh, sw) the unit's current concept's mask per image.
    target_masks: (N, sh, sw) the target concept's mask per image.

  Returns:
    ``loss_fn(x_adv) -> (N,)``.
  """
  units, weights = objective_weights(features_fn, "targeted", x, units, source_masks,
                                     target_masks, fn="targeted_loss")
  return weighted_loss(features_fn, units, weights)


def untargeted_loss(features_fn: FeaturesFn, x: jax.Array, units: jax.Array,
                    source_masks: jax.Array) -> LossFn:
  """Eq. 10 (U1): ``loss_n = act_avg(source_n)``; arguments as :func:`targeted_loss`."""
  units, weights = objective_weights(features_fn, "u1", x, units, source_masks,
                                     fn="untargeted_loss")
  return weighted_loss(features_fn, units, weights)


def random_targets(key: jax.Array, candidates: Sequence[int] | jax.Array,
                   exclude: Sequence[int] | jax.Array) -> jax.Array:
  """U2's random target concepts: one uniform draw from ``candidates`` per entry of ``exclude``,
  never equal to that entry and never concept 0 (Broden's "no label"). The one target picker
  of nemjax; :mod:`nemjax.sweep` draws its targets with it.

  Args:
    key: PRNG key (same key, same targets).
    candidates: (C,) int concept ids to choose from (duplicates make an id more likely).
    exclude: (M,) int, e.g. each attacked unit's current (source) concept.

  Returns:
    (M,) int32 targets with ``targets[m] != exclude[m]`` and ``targets[m] != 0``. With
    concrete inputs, an entry with no allowed candidate raises ValueError; under tracing it
    cannot be detected (the draw is then ``candidates[0]``).
  """
  cand = jnp.asarray(candidates).reshape(-1)
  excl = jnp.asarray(exclude).reshape(-1)
  if cand.size == 0:
    raise ValueError("random_targets: candidates is empty")
  if not jnp.issubdtype(cand.dtype, jnp.integer) or not jnp.issubdtype(excl.dtype, jnp.integer):
    raise ValueError(f"random_targets: candidates and exclude must be int concept ids, got "
                     f"{cand.dtype} and {excl.dtype}")
  allowed = (cand[None, :] != excl[:, None]) & (cand[None, :] != 0)  # (M, C)
  if not (is_traced(cand) or is_traced(excl)):
    none = np.flatnonzero(~np.asarray(allowed).any(axis=1))
    if none.size:
      bad = sorted({int(e) for e in np.asarray(excl)[none]})
      raise ValueError(f"random_targets: no candidate other than 0 differs from exclude "
                       f"value(s) {bad}; candidates = {np.asarray(cand).tolist()}")
  logits = jnp.where(allowed, 0.0, -jnp.inf)
  idx = jax.random.categorical(key, logits, axis=-1)
  return cand[idx].astype(jnp.int32)


class ActAvgAttack(NamedTuple):
  """An act-avg PGD attack as three functions (from :func:`make_act_avg_attack`).

  ``prepare`` and ``step`` are jitted and pure; ``run`` is the host driver that checks its
  arguments and calls them (calling the tuple itself calls ``run``).
  """
  prepare: Callable  # (x, units, source_masks, target_masks, key) -> (x_adv0, weights (N, sh·sw))
  step: Callable     # (x, x_adv, units, weights) -> x_adv, one signed-gradient step; x_adv donated
  run: Callable      # (x, units, source_masks, target_masks=None, key=None) -> x_adv (N,H,W,C)

  def __call__(self, x, units, source_masks, target_masks=None, key=None) -> jax.Array:
    return self.run(x, units, source_masks, target_masks, key)


def make_act_avg_attack(features_fn: FeaturesFn, *, eps: float, steps: int,
                        step_size: float | None = None, objective: Objective = "targeted",
                        random_start: bool = False, loop: Loop = "python",
                        fast_grad: bool | None = None) -> ActAvgAttack:
  """A ready-to-call act-avg PGD attack, jitted with ``features_fn`` closed over.

  Args:
    features_fn: ``x01 (N, H, W, C) -> acts (N, h, w, U)``, pure and jittable.
    eps: L∞ radius (> 0), e.g. 4/255.
    steps: PGD steps (>= 1).
    step_size: α; default ``2·eps/steps``.
    objective: "targeted" or "u2" (Eq. 9, ``target_masks`` required; for U2 pass the masks of
      targets drawn with :func:`random_targets`), or "u1" (Eq. 10, ``target_masks`` ignored).
    random_start: uniform start in the ε-ball (``key`` required at call time).
    loop: "python" (default: a Python loop over one jitted step whose ``x_adv`` buffer is
      donated; compiles once for any ``steps``), or "fori", "scan", "unroll" (the whole attack
      as one jitted program). With the CPU gradient rewrite (``fast_grad``) all four run at
      the same speed on XLA:CPU ("fori" 2.3x slower without it); "unroll" compiles ``steps``
      copies of the step. See ``benchmarks/pgd.py``.
    fast_grad: wrap ``features_fn`` in :func:`nemjax.ops.fastgrad.cpu_fast_grad` (same
      forward values; max-pool, stem-convolution and in-loop convolution gradients without XLA
      CPU's slow paths).
      None: only when JAX's default backend is the CPU.

  Returns:
    An :class:`ActAvgAttack`; ``attack(x (N, H, W, C), units (N,), source_masks (N, sh, sw),
    target_masks (N, sh, sw) | None = None, key = None) -> x_adv (N, H, W, C)`` runs it. Every
    argument, the unit range included, is checked on the host before anything is jitted, so
    ``attack`` is called outside ``jax.jit``; its ``prepare`` and ``step`` are the jitted
    pieces (with a non-Python ``loop``, ``run`` calls one jitted program of the whole attack).
    Recompiles only for new shapes.
  """
  alpha = _check_hparams(eps, steps, step_size, "make_act_avg_attack")
  if objective not in OBJECTIVES:
    raise ValueError(f"make_act_avg_attack: objective must be one of {OBJECTIVES}, "
                     f"got {objective!r}")
  if loop not in LOOPS:
    raise ValueError(f"make_act_avg_attack: loop must be one of {LOOPS}, got {loop!r}")
  eps = float(eps)
  features_fn = fastgrad.by_backend(features_fn, fast_grad)

  def check_call(x, units, source_masks, target_masks, key) -> jax.Array:
    """Host-side validation of one call (shapes, unit range, key); returns x as an array."""
    x = check_images(x, "attack")
    if random_start and key is None:
      raise ValueError("attack: random_start=True needs key")
    if objective != "u1" and target_masks is None:
      raise ValueError(f"attack: objective {objective!r} needs target_masks")
    _, _, n_units = _act_shape(features_fn, x, "attack")
    units, _ = _check_units_masks(x, units, source_masks, "source_masks", "attack")
    if objective != "u1":
      _check_units_masks(x, units, target_masks, "target_masks", "attack")
    check_unit_range(units, n_units, "attack")
    return x

  def weights_for(x, units, source_masks, target_masks):
    return objective_weights(features_fn, objective, x, units, source_masks, target_masks,
                             fn="attack")

  @jax.jit
  def prepare(x, units, source_masks, target_masks, key):
    _, weights = weights_for(x, units, source_masks, target_masks)
    return init_adv(x, eps, random_start, key), weights

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(x, x_adv, units, weights):
    return pgd_step(weighted_loss(features_fn, units, weights), x, x_adv, eps, alpha)

  @jax.jit
  def whole(x, units, source_masks, target_masks, key):
    units, weights = weights_for(x, units, source_masks, target_masks)
    return pgd(weighted_loss(features_fn, units, weights), x, eps=eps, steps=steps,
               step_size=alpha, random_start=random_start, key=key, loop=loop)

  def run(x, units, source_masks, target_masks=None, key=None):
    x = check_call(x, units, source_masks, target_masks, key)
    if loop != "python":
      return whole(x, units, source_masks, target_masks, key)
    units = jnp.asarray(units)
    x_adv, weights = prepare(x, units, source_masks, target_masks, key)
    if not random_start:  # jit may forward x itself; never donate the caller's buffer
      x_adv = jnp.array(x_adv, copy=True)
    for _ in range(steps):
      x_adv = step(x, x_adv, units, weights)
    return x_adv

  return ActAvgAttack(prepare, step, run)
