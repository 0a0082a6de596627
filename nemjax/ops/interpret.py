"""A small jaxpr interpreter: re-evaluate a traced function with some primitives substituted.

The shared machinery behind :mod:`nemjax.ops.fastgrad` (faster CPU gradients) and
:mod:`nemjax.explain` (modified backward rules: guided backprop, deconvolution, DeepLIFT, LRP).
A function is traced once to its jaxpr (``jax.make_jaxpr``), then evaluated equation by
equation; an equation whose primitive has a *rule* is handed to that rule, which returns the
outputs (typically a ``jax.custom_vjp`` op with the same forward and another backward pass) or
None to evaluate the equation unchanged. ``jit`` / ``pjit`` / ``closed_call`` sub-jaxprs are
inlined recursively, so rules see the primitives inside them too; ``custom_jvp_call`` (e.g.
``jax.nn.relu``) is handed to a rule as one equation (:func:`relu_operand` recognises ReLU).
With ``inline_custom_vjp=True`` a ``custom_vjp_call`` (e.g. an op of :mod:`nemjax.ops.fastgrad`)
whose forward function uses a primitive that has a rule is replaced by that function, inlined
likewise: the modified-rule explanations define their own backward pass and must see those
primitives under a custom VJP. Any other ``custom_vjp_call`` is bound unchanged, its VJP kept
(so guided backprop keeps fastgrad's fast max-pool and convolution gradients).

Model code is never touched::

  fn2 = interpret.rewrite(fn, {"reduce_window_max": my_rule})   # same signature and outputs

``inject`` adds a value to chosen variables as they are produced (:func:`with_delta` uses it to
differentiate with respect to an intermediate activation a model returns as a tap).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jcore

__all__ = ["Rule", "eval_jaxpr", "rewrite", "relu_operand", "with_delta", "bind", "inner_jaxpr",
           "read", "uses_primitives", "CALL_PRIMITIVES", "CUSTOM_VJP_PRIMITIVES"]

Rule = Callable[[Any, list, Mapping[str, Any]], Any]
CALL_PRIMITIVES = ("pjit", "jit", "closed_call")
CUSTOM_VJP_PRIMITIVES = ("custom_vjp_call", "custom_vjp_call_jaxpr")


def read(env: dict, v: Any) -> Any:
  """The value of variable or literal ``v`` in ``env``."""
  return v.val if isinstance(v, jcore.Literal) else env[v]


def bind(eqn: Any, invals: Sequence[Any]) -> Any:
  """Evaluates ``eqn``'s primitive (unchanged) on ``invals``."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def inner_jaxpr(eqn: Any, inline_custom_vjp: bool = False) -> tuple[Any, Sequence[Any]] | None:
  """(jaxpr, consts) of a call equation to inline, else None.

  With ``inline_custom_vjp`` a ``custom_vjp_call``'s forward function counts as one (its
  invars are the equation's, consts included), so its custom VJP is dropped.
  """
  name = eqn.primitive.name
  if name in CALL_PRIMITIVES and "jaxpr" in eqn.params:
    inner = eqn.params["jaxpr"]
  elif inline_custom_vjp and name in CUSTOM_VJP_PRIMITIVES:
    inner = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    if inner is None:
      return None
  else:
    return None
  return (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())


def uses_primitives(jaxpr: Any, names: Any) -> bool:
  """Whether ``jaxpr`` (or a call or custom-VJP/JVP sub-jaxpr in it) has an equation whose
  primitive name is in ``names``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      return True
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      inner = eqn.params.get(key)
      if inner is not None and uses_primitives(getattr(inner, "jaxpr", inner), names):
        return True
  return False


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], rules: Mapping[str, Rule],
               opts: Mapping[str, Any], inject: Mapping[Any, Callable[[Any], Any]] | None = None,
               inline_custom_vjp: bool = False) -> list:
  """Evaluates ``jaxpr`` on ``args`` with ``rules`` substituted (call primitives inlined).

  Args:
    jaxpr: a ``jax.extend.core.Jaxpr``.
    consts: values of its constvars.
    args: values of its invars.
    rules: primitive name -> ``rule(eqn, invals, opts)`` returning the equation's output(s), or
      None to evaluate the equation unchanged.
    opts: passed to every rule.
    inject: top-level variable -> ``f(value)`` applied to that variable's value as soon as it is
      defined (an input or an equation's output).
    inline_custom_vjp: evaluate ``custom_vjp_call`` equations whose forward function uses a
      primitive of ``rules`` through that function (rules see inside; the custom VJP is
      dropped) instead of binding them unchanged.

  Returns:
    The values of ``jaxpr.outvars``.
  """
  inject = inject or {}
  env: dict = {}

  def write(v, val):
    if isinstance(v, jcore.DropVar):
      return
    env[v] = inject[v](val) if v in inject else val

  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  for eqn in jaxpr.eqns:
    invals = [read(env, v) for v in eqn.invars]
    name = eqn.primitive.name
    out = None
    if name in rules:
      out = rules[name](eqn, invals, opts)
    if out is None:
      inner = inner_jaxpr(eqn, inline_custom_vjp)
      if (inner is not None and name in CUSTOM_VJP_PRIMITIVES
          and not uses_primitives(inner[0], rules)):
        inner = None                         # nothing to substitute inside: keep its VJP
      if inner is not None:
        out = eval_jaxpr(inner[0], inner[1], invals, rules, opts,
                         inline_custom_vjp=inline_custom_vjp)
    if out is None:
      out = bind(eqn, invals)
    if not isinstance(out, (list, tuple)):   # one array (a rule may return one for a
      out = [out]                            # multiple-results call such as custom_jvp_call)
    for v, o in zip(eqn.outvars, out):
      write(v, o)
  return [read(env, v) for v in jaxpr.outvars]


def rewrite(fn: Callable[..., Any], rules: Mapping[str, Rule],
            opts: Mapping[str, Any] | None = None, inline_custom_vjp: bool = False
            ) -> Callable[..., Any]:
  """``fn`` re-evaluated through :func:`eval_jaxpr` with ``rules`` (same signature and outputs).

  Args:
    fn: a pure, traceable function of array pytrees.
    rules: primitive name -> rule (see :func:`eval_jaxpr`).
    opts: passed to every rule.
    inline_custom_vjp: see :func:`eval_jaxpr`.

  Returns:
    A function with ``fn``'s signature; it traces ``fn`` on every call (cheap under ``jit``).
  """
  opts = dict(opts or {})

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = eval_jaxpr(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), rules, opts,
                     inline_custom_vjp=inline_custom_vjp)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)
  return wrapped


def relu_operand(eqn: Any, invals: Sequence[Any]) -> Any | None:
  """The input of a ReLU equation, or None if ``eqn`` is not one.

  ReLU is ``max(x, 0)`` with a literal zero, either bare or inside the ``custom_jvp_call`` that
  ``jax.nn.relu`` traces to (possibly through one ``jit``).
  """
  name = eqn.primitive.name
  if name == "max" and len(eqn.invars) == 2:
    for i, v in enumerate(eqn.invars):
      if isinstance(v, jcore.Literal) and getattr(v, "val", None) is not None and float(v.val) == 0.0:
        other = invals[1 - i]
        if getattr(other, "shape", ()) == tuple(eqn.outvars[0].aval.shape):
          return other
    return None
  if name == "custom_jvp_call" and len(eqn.invars) == 1:
    inner = eqn.params.get("call_jaxpr")
    inner = getattr(inner, "jaxpr", inner)
    while inner is not None and len(inner.eqns) == 1 and inner_jaxpr(inner.eqns[0]) is not None:
      inner = inner_jaxpr(inner.eqns[0])[0]
    if (inner is not None and len(inner.eqns) == 1 and inner.eqns[0].primitive.name == "max"
        and relu_operand(inner.eqns[0], [invals[0], invals[0]]) is not None):
      return invals[0]
  return None


def with_delta(fn: Callable[..., Any], select: Callable[[Any], Any]) -> Callable[..., Any]:
  """``fn`` with a perturbation added to one of its outputs where it is computed.

  ``select(out)`` picks one array leaf of ``fn``'s output (e.g. ``lambda o: o[1]["layer4"]``);
  ``wrapped(*args, delta)`` returns ``fn(*args)`` in which that array had ``delta`` added where
  it was produced, so everything computed from it downstream sees the perturbed value, and the
  selected output is the perturbed value too. ``jax.grad`` with respect to ``delta`` at zero is
  the gradient with respect to the intermediate activation.

  Args:
    fn: pure traceable function of array pytrees.
    select: picks the output leaf to perturb (an intermediate that ``fn`` also returns).

  Returns:
    ``wrapped(*args, delta)`` with ``fn``'s output structure; ``delta`` has the leaf's shape.
  """

  def wrapped(*args):
    *args, delta = args
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    leaves = jax.tree_util.tree_leaves(out_shape)
    target = select(out_shape)
    idx = next(i for i, leaf in enumerate(leaves) if leaf is target)
    var = closed.jaxpr.outvars[idx]
    if isinstance(var, jcore.Literal):
      raise ValueError("with_delta: the selected output is a constant, not an intermediate")
    out = eval_jaxpr(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), {}, {},
                     inject={var: lambda v: v + delta})
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)
  return wrapped
