"""Jitted fine-tuning step for manipulating feature visualisation.

One step minimises ``α · L_A + (1 − α) · L_M`` (Nanfack et al. 2024): an attack loss on the
tapped activations of the fine-tuned model plus distillation from the frozen original model.

The train state is a plain ``NamedTuple`` pytree (params, optimizer state, the frozen teacher's
params, a step counter) and is **donated** to the jitted update, so the old buffers are reused.

Example (with a Flax NNX model split once into a pure function)::

  model.eval()                                        # BatchNorm uses running stats
  graphdef, variables = nnx.split(model)
  def apply_fn(variables, x):
    return nnx.merge(graphdef, variables)(x, taps=("features.10",))

  objective = push_down_objective({"features.10": jnp.ones(256, bool)})
  state = train_init(variables)                       # teacher = a copy of the variables
  step = make_train_step(apply_fn, None, objective)   # teacher runs apply_fn too
  for batch in batches:                               # {"image": (N,H,W,3), "topk_mask": {...}}
    state, metrics = step(state, batch, alpha)

BatchNorm: the step runs the model exactly as ``apply_fn`` does and never writes running
statistics back; build ``apply_fn`` from a model in inference mode (``model.eval()`` /
``use_running_average=True``) so normalisation uses the frozen running statistics, as in the
paper (fine-tuning with batch statistics would move the network for reasons unrelated to the
attack). By default only ``nnx.Param`` leaves (and, in plain pytrees, floating-point leaves)
are trained; ``nnx.BatchStat`` and integer leaves pass through unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemjax.ops import fastgrad
from nemjax.manipulate import losses
from nemjax.manipulate import prune

__all__ = [
    "PAPER_LEARNING_RATE",
    "TrainState",
    "default_optimizer",
    "trainable_mask",
    "train_init",
    "make_train_step",
    "masked",
]

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
TrainableFn = Callable[[str, Any], bool]

# Adam's learning rate in the papers (Nanfack et al. 2024; Fulleringer 2023): the one home of a
# default learning rate (the experiments' schedules in nemjax.manipulate.config build on it).
PAPER_LEARNING_RATE = 1e-5


class TrainState(NamedTuple):
  """Fine-tuning state (a pytree; donated to the jitted step)."""
  params: PyTree          # every variable apply_fn needs (trainable + frozen leaves)
  opt_state: PyTree       # optimizer state over the trainable leaves (others are None)
  teacher_params: PyTree  # variables of the frozen original model, for frozen_apply_fn
  step: jax.Array         # () int32, number of updates applied


def default_optimizer(learning_rate: float = PAPER_LEARNING_RATE
                      ) -> optax.GradientTransformation:
  """Adam with the papers' learning rate (:data:`PAPER_LEARNING_RATE`)."""
  return optax.adam(learning_rate)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _default_trainable(path: str, node: Any) -> bool:
  del path
  if isinstance(node, nnx.Variable):
    if not isinstance(node, nnx.Param):
      return False
    leaves = jax.tree.leaves(node)
    return all(jnp.issubdtype(l.dtype, jnp.inexact) for l in leaves)
  return bool(jnp.issubdtype(jnp.result_type(node), jnp.inexact))


def _flags(params: PyTree, trainable: TrainableFn | None) -> list[bool]:
  """One static bool per array leaf of ``params``."""
  rule = _default_trainable if trainable is None else trainable
  flags = []
  for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    n = len(jax.tree.leaves(node))
    flag = bool(rule(name, node))
    if flag:
      for leaf in jax.tree.leaves(node):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
          raise ValueError(f"trainable leaf {name!r} has non-float dtype {leaf.dtype}")
    flags += [flag] * n
  return flags


def trainable_mask(params: PyTree, trainable: TrainableFn | None = None) -> PyTree:
  """Bool pytree (same structure as ``params``): ``True`` on leaves the step trains.

  Args:
    params: the variables pytree (plain arrays or an ``nnx.State``).
    trainable: ``trainable(path, node) -> bool`` with ``path`` like ``"conv1/kernel"`` (the
      ``nnx`` ``/value`` suffix included for NNX states) and ``node`` the ``nnx.Variable`` or
      array. Default: ``nnx.Param`` variables and floating-point plain arrays.
  """
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([np.array(f) for f in _flags(params, trainable)])


def _partition(params: PyTree, flags: list[bool]) -> tuple[PyTree, list[Any]]:
  leaves, treedef = jax.tree.flatten(params)
  if len(leaves) != len(flags):
    raise ValueError("params structure changed between train_init and the step")
  train = treedef.unflatten([l if f else None for l, f in zip(leaves, flags)])
  return train, leaves


def _combine(train: PyTree, leaves: list[Any], flags: list[bool], treedef) -> PyTree:
  train_leaves = iter(jax.tree.leaves(train))
  return treedef.unflatten([next(train_leaves) if f else l for l, f in zip(leaves, flags)])


def train_init(params: PyTree, optimizer: optax.GradientTransformation | None = None, *,
               teacher_params: PyTree | None = None,
               trainable: TrainableFn | None = None) -> TrainState:
  """Build the initial :class:`TrainState`.

  Args:
    params: variables of the model to fine-tune (as ``apply_fn`` takes them).
    optimizer: optax transformation (default :func:`default_optimizer`, Adam at :data:`PAPER_LEARNING_RATE`); it only
      sees the trainable leaves (a pytree with ``None`` at frozen leaves).
    teacher_params: variables for ``frozen_apply_fn``; default a copy of ``params`` (the
      frozen original model). Leaves shared with ``params`` are copied, since the state is
      donated and a buffer cannot be donated twice.
    trainable: the same filter given to :func:`make_train_step` (see :func:`trainable_mask`).

  Returns:
    A :class:`TrainState` with ``step = 0``.
  """
  optimizer = default_optimizer() if optimizer is None else optimizer
  flags = _flags(params, trainable)
  if not any(flags):
    raise ValueError("train_init: no trainable leaves in params")
  # Fresh buffers for the state: it is donated, so it must not alias the caller's arrays.
  params = jax.tree.map(jnp.array, params)
  if teacher_params is None:
    teacher_params = jax.tree.map(jnp.array, params)
  else:
    ids = {id(l) for l in jax.tree.leaves(params)}
    teacher_params = jax.tree.map(lambda l: jnp.array(l) if id(l) in ids else l, teacher_params)
  train, _ = _partition(params, flags)
  return TrainState(params=params, opt_state=optimizer.init(train),
                    teacher_params=teacher_params, step=jnp.zeros((), jnp.int32))


def _logits_of(out: Any) -> jax.Array:
  return out[0] if isinstance(out, tuple) else out


def make_train_step(apply_fn: ApplyFn, frozen_apply_fn: Callable[[PyTree, jax.Array], Any] | None,
                    attack_loss_fn: losses.AttackLossFn,
                    optimizer: optax.GradientTransformation | None = None, *,
                    trainable: TrainableFn | None = None, donate: bool = True,
                    fast_grad: bool | None = None):
  r"""Build the jitted fine-tuning step.

  For a batch with images ``x`` (and optional decoys ``x*``):

  .. math::
     z, A = f_\theta(x),\quad t = f_{\theta_0}(x),\quad
     L = \alpha \cdot L_A(A, \mathrm{batch}, f_\theta(x^*)) + (1-\alpha)\cdot
         \mathrm{CE}(\mathrm{softmax}(t), \mathrm{log\,softmax}(z))

  then one optimizer update of the trainable leaves of θ.

  Args:
    apply_fn: ``apply_fn(params, x (N,H,W,3)) -> (logits (N,K), {layer: acts})``, run in
      inference mode (see the module docstring on BatchNorm); it must tap every layer the
      attack loss reads.
    frozen_apply_fn: ``frozen_apply_fn(teacher_params, x) -> logits`` (or ``(logits, acts)``)
      of the frozen original model; ``None`` = ``apply_fn`` with the teacher's params.
    attack_loss_fn: ``attack_loss_fn(acts, batch, decoy_acts) -> scalar`` (see the
      ``*_objective`` factories in :mod:`nemjax.manipulate.losses`); ``decoy_acts`` is ``None``
      unless the batch has a ``"decoy"`` entry.
    optimizer: the optax transformation used in :func:`train_init` (default: :func:`default_optimizer`).
    trainable: the filter used in :func:`train_init`.
    donate: donate the train state's buffers (default ``True``).
    fast_grad: run ``apply_fn`` through :func:`nemjax.ops.fastgrad.cpu_fast_grad` (same
      forward values; max-pool and strided-stem gradients without XLA:CPU's slow paths).
      Default: on when JAX's default backend is the CPU.

  Returns:
    ``step(train_state, batch, alpha) -> (train_state, metrics)`` where ``batch`` is a mapping
    with ``"image"`` ``(N,H,W,3)``, optionally ``"decoy"`` ``(M,H,W,3)`` (run through the
    fine-tuned model in the same forward pass, excluded from distillation) and whatever the
    attack loss reads; ``alpha`` is a scalar (converted to float32, so changing it never
    recompiles); ``metrics`` has scalar ``loss``, ``attack_loss``, ``distill_loss``,
    ``agreement`` (top-1 agreement with the teacher) and ``grad_norm``. The jitted function is
    available as ``step.jitted``.
  """
  optimizer = default_optimizer() if optimizer is None else optimizer
  if frozen_apply_fn is None:
    frozen_apply_fn = apply_fn
  # only the differentiated model is rewritten; the frozen teacher runs forward only
  apply_fn = fastgrad.by_backend(apply_fn, fast_grad)

  def _update(state: TrainState, batch: Mapping[str, Any], alpha: jax.Array):
    if "image" not in batch:
      raise ValueError(f"train step: batch needs an 'image' entry, has {sorted(batch)}")
    x = batch["image"]
    n = x.shape[0]
    decoy = batch.get("decoy")
    flags = _flags(state.params, trainable)
    train, leaves = _partition(state.params, flags)
    treedef = jax.tree.structure(state.params)
    teacher_logits = jax.lax.stop_gradient(
        _logits_of(frozen_apply_fn(state.teacher_params, x)))

    def loss_fn(train_params):
      params = _combine(train_params, leaves, flags, treedef)
      inputs = x if decoy is None else jnp.concatenate([x, decoy.astype(x.dtype)], axis=0)
      logits, acts = apply_fn(params, inputs)
      decoy_acts = None
      if decoy is not None:
        decoy_acts = {k: v[n:] for k, v in acts.items()}
        acts = {k: v[:n] for k, v in acts.items()}
        logits = logits[:n]
      l_a = attack_loss_fn(acts, batch, decoy_acts)
      l_m = losses.distillation_loss(logits, teacher_logits)
      loss = losses.total_loss(l_a, l_m, alpha)
      agree = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
      return loss, (l_a, l_m, agree)

    (loss, (l_a, l_m, agree)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
    updates, opt_state = optimizer.update(grads, state.opt_state, train)
    train = optax.apply_updates(train, updates)
    params = _combine(train, leaves, flags, treedef)
    metrics = {"loss": loss, "attack_loss": l_a, "distill_loss": l_m,
               "agreement": agree.astype(jnp.float32), "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, opt_state, state.teacher_params, state.step + 1), metrics

  return jitted_step(_update, donate, "train step: alpha")


def jitted_step(update: Callable, donate: bool, what: str) -> Callable:
  """``step(state, batch, scalar)`` over ``jax.jit(update)`` (state donated when ``donate``):
  the scalar is checked (ValueError naming ``what``) and passed as float32, so changing it never
  recompiles; ``step.jitted`` and ``step.update_fn`` expose the pieces."""
  jitted = jax.jit(update, donate_argnums=(0,) if donate else ())

  def step(train_state: TrainState, batch: Mapping[str, Any], scalar: Any):
    if np.ndim(scalar) != 0:
      raise ValueError(f"{what} must be a scalar, got shape {np.shape(scalar)}")
    return jitted(train_state, batch, jnp.asarray(scalar, jnp.float32))

  step.jitted = jitted
  step.update_fn = update
  return step


def masked(step: Callable, masks: PyTree, *, donate: bool = True):
  """Wrap a train step so pruning masks are re-applied to the params after every update.

  Args:
    step: a step from :func:`make_train_step`.
    masks: bool pytree with the structure of ``train_state.params`` (``True`` = keep), e.g.
      from :func:`nemjax.manipulate.l1_unstructured_masks`. Apply them once to the initial
      params too (:func:`nemjax.manipulate.apply_masks`).
    donate: donate the train state (default ``True``).

  Returns:
    ``masked_step(train_state, batch, alpha) -> (train_state, metrics)``, jitted, with the masks
    passed as a device argument (not baked into the program as constants).
  """
  update = getattr(step, "update_fn", None)
  if update is None:
    raise ValueError("masked: step must come from make_train_step")

  def _masked_update(state, batch, alpha, masks):
    state, metrics = update(state, batch, alpha)
    return state._replace(params=prune.apply_masks(state.params, masks)), metrics

  jitted = jax.jit(_masked_update, donate_argnums=(0,) if donate else ())
  masks = jax.tree.map(jnp.asarray, masks)

  def masked_step(train_state: TrainState, batch: Mapping[str, Any], alpha: Any):
    if jax.tree.structure(train_state.params) != jax.tree.structure(masks):
      raise ValueError("masked: masks must have the structure of train_state.params")
    if np.ndim(alpha) != 0:
      raise ValueError(f"train step: alpha must be a scalar, got shape {np.shape(alpha)}")
    return jitted(train_state, batch, jnp.asarray(alpha, jnp.float32), masks)

  masked_step.jitted = jitted
  masked_step.update_fn = functools.partial(_masked_update, masks=masks)
  return masked_step
