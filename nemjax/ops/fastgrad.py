"""Faster input gradients on CPU: a forward-preserving rewrite of a features function.

PGD spends all its time in ``∇_x`` of a CNN. On XLA's CPU backend two pieces of that backward
pass are slow, whatever the model:

- **max-pool**: the gradient of ``reduce_window_max`` is ``select_and_scatter``, which the CPU
  backend runs as a generic, barely parallel loop -- about 1 s for ResNet18's stem pool on 32
  images at 224², more than a third of the whole gradient;
- **strided convolutions with few input channels** (the 7×7/2 stem): their input gradient is a
  convolution over a zero-dilated input with 3 output channels, which the fast convolution
  kernels do not take;
- **every convolution's input gradient inside a loop body** (``lax.map`` chunks, ``fori_loop``,
  ``scan``): JAX writes it with the flipped kernel read in (kh, kw, C_out, C_in) order; outside
  loops XLA:CPU copies that kernel into the layout its fast convolution takes, inside a while
  body it does not, and the convolution falls to a generic loop about 2.7× slower.

:func:`cpu_fast_grad` wraps a function so that, when traced, every ``reduce_window_max`` is
replaced by :func:`max_pool`, whose backward pass is written with strided slices and
phase-wise shifts (no ``select_and_scatter``), and strided convolutions with at most
``polyphase_max_in_channels`` input channels get a backward pass that is one stride-1
convolution (polyphase decomposition of the transposed convolution) followed by a
depth-to-space shuffle. Every other NHWC/HWIO convolution gets :func:`conv`, whose input
gradient convolves with the flipped kernel materialised in HWIO order behind an optimisation
barrier, so XLA keeps the fast kernel in loops too. Forward values are bit-identical (the
forward ops are the original primitives). Gradients equal XLA's up to float32 summation
order; at exact ties within a pooling window the gradient goes to the first maximal element in
row-major window order, as ``select_and_scatter`` does.

The rewrite works on the function's jaxpr (:mod:`nemjax.ops.interpret`; ``jit`` nesting is
inlined), so it needs no change to the model code::

  features_fn = fastgrad.cpu_fast_grad(features_fn)   # same outputs, faster jax.grad on CPU

Anything it does not recognise is evaluated unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nemjax.ops import interpret

__all__ = ["cpu_fast_grad", "by_backend", "max_pool", "max_pool_geometry", "strided_conv", "conv"]

_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs NHWC, rhs HWIO, out NHWC


# ---------------------------------------------------------------------------------------------
# Max pool with a slice-based backward pass.

def _window_slices(xp: jax.Array, k: Sequence[int], s: Sequence[int],
                   out_hw: Sequence[int]) -> list[tuple[int, int, jax.Array]]:
  """Strided views ``xp[:, dy::s, dx::s]`` (output-sized) for each window offset, row-major."""
  n, _, _, c = xp.shape
  ho, wo = out_hw
  views = []
  for dy in range(k[0]):
    for dx in range(k[1]):
      v = lax.slice(xp, (0, dy, dx, 0), (n, dy + s[0] * (ho - 1) + 1, dx + s[1] * (wo - 1) + 1, c),
                    (1, s[0], s[1], 1))
      views.append((dy, dx, v))
  return views


def _pool_geometry(x_shape, k, s, pad):
  _, h, w, _ = x_shape
  hp, wp = h + pad[0][0] + pad[0][1], w + pad[1][0] + pad[1][1]
  ho, wo = (hp - k[0]) // s[0] + 1, (wp - k[1]) // s[1] + 1
  return hp, wp, ho, wo


def _phase_sizes(hp, wp, ho, wo, k, s):
  # Phase grids must hold every x_pad position and every shifted output (o + m).
  qy = max(-(-hp // s[0]), ho + (k[0] - 1) // s[0])
  qx = max(-(-wp // s[1]), wo + (k[1] - 1) // s[1])
  return qy, qx


def _interleave_phases(phases: dict, n: int, qy: int, qx: int, s: Sequence[int], c: int,
                       dtype) -> jax.Array:
  """{(ry, rx): (n, qy, qx, c)} -> (n, qy·sy, qx·sx, c) with out[s·q + r] = phases[r][q]."""
  zero = None
  rows = []
  for ry in range(s[0]):
    cols = []
    for rx in range(s[1]):
      p = phases.get((ry, rx))
      if p is None:
        zero = jnp.zeros((n, qy, qx, c), dtype) if zero is None else zero
        p = zero
      cols.append(p)
    rows.append(jnp.stack(cols, axis=3))           # (n, qy, qx, sx, c)
  out = jnp.stack(rows, axis=2)                      # (n, qy, sy, qx, sx, c)
  return out.reshape(n, qy * s[0], qx * s[1], c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """NHWC max pooling (-inf padding) with a backward pass free of ``select_and_scatter``.

  The forward is ``lax.reduce_window(x, -inf, lax.max, ...)`` itself. The backward finds, once
  per window, the first maximal offset in row-major window order (``select_and_scatter``'s
  choice), then routes ``g`` to it phase by phase: input row ``s·q + r`` only receives from
  windows ``q − m`` through offsets ``s·m + r``, so each of the s² phases is a sum of shifted,
  masked copies of ``g`` -- elementwise work on output-sized arrays, then one interleave.
  Windows that do not overlap (k ≤ s, VGG's and SmallCNN's 2×2/2) need no phases: one
  broadcast pass (:func:`_route_disjoint`), 20-60 % faster.

  Args:
    x: (N, H, W, C).
    kernel: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (N, (H + top + bottom − kh)//sh + 1, (W + left + right − kw)//sw + 1, C).
  """
  return _reduce_window_max(x, kernel, strides, padding)


def _reduce_window_max(x, kernel, strides, padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + tuple(kernel) + (1,),
                           (1,) + tuple(strides) + (1,), ((0, 0),) + tuple(padding) + ((0, 0),))


def _max_pool_fwd(x, kernel, strides, padding):
  y = _reduce_window_max(x, kernel, strides, padding)
  return y, (x, y)


def _max_pool_bwd(kernel, strides, padding, res, g):
  x, y = res
  n, h, w, c = x.shape
  hp, wp, ho, wo = _pool_geometry(x.shape, kernel, strides, padding)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
  views = _window_slices(xp, kernel, strides, (ho, wo))
  idx_dtype = jnp.int8 if len(views) < 128 else jnp.int32
  first = jnp.full(y.shape, len(views) - 1, idx_dtype)   # first maximal offset per window
  for d in reversed(range(len(views))):
    first = jnp.where(views[d][2] == y, jnp.asarray(d, idx_dtype), first)
  first, g = lax.optimization_barrier((first, g))         # computed once, not per consumer
  if all(k <= st for k, st in zip(kernel, strides)):
    return (_route_disjoint(first, g, x.shape, kernel, strides, padding),)
  qy, qx = _phase_sizes(hp, wp, ho, wo, kernel, strides)
  phases: dict = {}
  zero = jnp.zeros((), g.dtype)
  for d, (dy, dx, _) in enumerate(views):
    contrib = jnp.where(first == d, g, zero)
    my, ry = divmod(dy, strides[0])
    mx, rx = divmod(dx, strides[1])
    contrib = jnp.pad(contrib, ((0, 0), (my, qy - ho - my), (mx, qx - wo - mx), (0, 0)))
    phases[(ry, rx)] = contrib if (ry, rx) not in phases else phases[(ry, rx)] + contrib
  gp = _interleave_phases(phases, n, qy, qx, strides, c, g.dtype)
  return (gp[:, padding[0][0]:padding[0][0] + h, padding[1][0]:padding[1][0] + w, :],)


def _route_disjoint(first: jax.Array, g: jax.Array, x_shape, kernel, strides, padding
                    ) -> jax.Array:
  """Max-pool input gradient when windows do not overlap (k ≤ s, e.g. VGG's 2×2/2 pools).

  Each input position lies in at most one window, so ``g`` of window (i, j) goes to the
  position of its ``first`` maximal offset within the window's s×s cell: one broadcast compare
  over (N, Ho, sy, Wo, sx, C), whose rows reshape to the padded input's, then a crop of the
  padding (zeros past the last window). The overlapping case needs the phase sums of
  :func:`_max_pool_bwd`, whose interleave costs several passes more.

  Args:
    first: (N, Ho, Wo, C) int offset ``dy·kw + dx`` of each window's first maximum.
    g: (N, Ho, Wo, C) cotangent.
    x_shape: (N, H, W, C) of the pooled input.

  Returns:
    (N, H, W, C).
  """
  n, h, w, c = x_shape
  (ky, kx), (sy, sx) = kernel, strides
  ho, wo = g.shape[1], g.shape[2]
  dy, dx = jnp.arange(sy)[:, None], jnp.arange(sx)[None, :]
  offset = jnp.where((dy < ky) & (dx < kx), dy * kx + dx, -1).astype(first.dtype)   # (sy, sx)
  hit = first[:, :, None, :, None, :] == offset[None, None, :, None, :, None]
  cells = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  rows = cells.reshape(n, ho * sy, wo * sx, c)             # padded-input rows [0, ho·sy)
  (top, _), (left, _) = padding
  return lax.pad(rows, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (-top, top + h - ho * sy, 0), (-left, left + w - wo * sx, 0),
                  (0, 0, 0)))


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ---------------------------------------------------------------------------------------------
# Strided convolution whose input gradient is a stride-1 convolution.

def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=precision)


def _polyphase_input_grad(g: jax.Array, w: jax.Array, x_shape, strides, padding,
                          precision) -> jax.Array:
  """Input gradient of an NHWC/HWIO strided convolution as one stride-1 convolution.

  With ``x_pad[s·q + r]`` the phase-r sample of the padded input and ``W_r[m] = W[s·m + r]``,
  ``∂x_pad[s·q + r] = Σ_m g[q − m] · W_r[m]``: all s² phases are one stride-1 convolution of
  ``g`` with the flipped, phase-split kernel (ceil(k/s)² taps, s²·C_in output channels), then
  a depth-to-space shuffle and a crop of the padding.
  """
  n, h, wdt, ci = x_shape
  (kh, kw), co = w.shape[:2], w.shape[3]
  sy, sx = strides
  hp, wp = h + padding[0][0] + padding[0][1], wdt + padding[1][0] + padding[1][1]
  ho, wo = g.shape[1], g.shape[2]
  my_, mx_ = -(-kh // sy), -(-kw // sx)
  qy, qx = max(-(-hp // sy), ho + my_ - 1), max(-(-wp // sx), wo + mx_ - 1)
  wpad = jnp.pad(w, ((0, my_ * sy - kh), (0, mx_ * sx - kw), (0, 0), (0, 0)))
  wr = wpad.reshape(my_, sy, mx_, sx, ci, co)[::-1, :, ::-1]          # flip taps m
  k2 = wr.transpose(0, 2, 5, 1, 3, 4).reshape(my_, mx_, co, sy * sx * ci)
  r = _conv(g, k2, (1, 1), ((my_ - 1, qy - ho), (mx_ - 1, qx - wo)), precision)
  r = r.reshape(n, qy, qx, sy, sx, ci).transpose(0, 1, 3, 2, 4, 5).reshape(n, qy * sy, qx * sx, ci)
  return r[:, padding[0][0]:padding[0][0] + h, padding[1][0]:padding[1][0] + wdt, :]


def _pair(v) -> tuple[int, int]:
  return tuple(int(a) for a in v)


def _pairs(v) -> tuple[tuple[int, int], tuple[int, int]]:
  return tuple(_pair(p) for p in v)


def _conv_with_input_grad(input_grad: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``(x, w, strides, padding, precision) -> _conv(...)`` as a ``custom_vjp`` whose input
  cotangent is ``input_grad(g, w, x.shape, strides, padding, precision)`` and whose weight
  cotangent is XLA's (dead code unless asked for); strides, padding and precision are static."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def f(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision)

  def fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)

  def bwd(strides, padding, precision, res, g):
    x, w = res
    gx = input_grad(g, w, x.shape, strides, padding, precision)
    _, vjp_w = jax.vjp(lambda ww: _conv(x, ww, strides, padding, precision), w)
    return gx, vjp_w(g)[0]
  f.defvjp(fwd, bwd)
  return f


_polyphase_conv = _conv_with_input_grad(_polyphase_input_grad)


def strided_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]], precision: Any = None
                 ) -> jax.Array:
  """NHWC/HWIO convolution (forward = ``lax.conv_general_dilated``) with a polyphase input VJP.

  Args:
    x: (N, H, W, C_in).
    w: (kh, kw, C_in, C_out).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    precision: passed to the convolutions.

  Returns:
    (N, Ho, Wo, C_out).
  """
  return _polyphase_conv(x, w, _pair(strides), _pairs(padding), precision)


# ---------------------------------------------------------------------------------------------
# Any convolution, with its input gradient on an HWIO-materialised kernel.

# Kernels with at least this many elements are transposed alone and the activations flipped
# instead (see _hwio_input_grad). XLA:CPU fuses a kernel's flip and transpose into one loop:
# 0.3-0.7 ns per element up to (3, 3, 256, 256), 1.5 ns from (3, 3, 256, 512) up, against
# 0.15-0.35 ns for the transpose alone (2 cores, AVX-512).
_FLIP_ACTIVATIONS_MIN_KERNEL = 2**20


def _flip_activations(kernel_size: int, spatial_size: int, activation_size: int) -> bool:
  """Whether an input gradient flips its (small) activations rather than its (large) kernel:
  the kernel is big enough that its fused flip and transpose is slow, and the two activation
  flips (about 0.27 ns per element) cost less than the ~1.3 ns per kernel element saved."""
  return (spatial_size > 1 and kernel_size >= _FLIP_ACTIVATIONS_MIN_KERNEL
          and activation_size <= 4 * kernel_size)


def _hwio_input_grad(g: jax.Array, w: jax.Array, x_shape, strides, padding, precision
                     ) -> jax.Array:
  """Input gradient of an NHWC/HWIO convolution: ``g`` (zero-dilated by the strides) convolved
  with the spatially flipped kernel, transposed to (kh, kw, C_out, C_in) and materialised (an
  optimisation barrier keeps XLA from folding the transpose back into the convolution's
  dimension labels, the layout XLA:CPU's fast kernel does not take inside loop bodies).

  For large kernels (:func:`_flip_activations`) the kernel is only transposed, and the flip
  moves to the activations: correlating with a flipped kernel is flipping ``g``, correlating
  with the kernel as it is (the two paddings swapped) and flipping the result. Same sums, in
  another order."""
  (kh, kw), (sy, sx) = w.shape[:2], strides
  h, wdt = x_shape[1], x_shape[2]
  ho, wo = g.shape[1], g.shape[2]
  pad = ((kh - 1 - padding[0][0], h - 1 - (ho - 1) * sy + padding[0][0]),
         (kw - 1 - padding[1][0], wdt - 1 - (wo - 1) * sx + padding[1][0]))
  conv_t = functools.partial(lax.conv_general_dilated, window_strides=(1, 1),
                             lhs_dilation=(sy, sx), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             precision=precision)
  if _flip_activations(w.size, kh * kw, g.size + math.prod(x_shape)):
    wt = lax.optimization_barrier(jnp.transpose(w, (0, 1, 3, 2)))
    swapped = tuple((hi, lo) for lo, hi in pad)
    return conv_t(g[:, ::-1, ::-1], wt, padding=swapped)[:, ::-1, ::-1]
  wt = lax.optimization_barrier(jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)))
  return conv_t(g, wt, padding=pad)


_hwio_conv = _conv_with_input_grad(_hwio_input_grad)


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
         padding: tuple[tuple[int, int], tuple[int, int]], precision: Any = None) -> jax.Array:
  """NHWC/HWIO convolution (forward = ``lax.conv_general_dilated``) whose input VJP keeps
  XLA:CPU's fast convolution kernel inside loop bodies (:func:`_hwio_input_grad`).

  Args: as :func:`strided_conv`. Returns: (N, Ho, Wo, C_out).
  """
  return _hwio_conv(x, w, _pair(strides), _pairs(padding), precision)


# ---------------------------------------------------------------------------------------------
# The jaxpr rewrite.

def max_pool_geometry(eqn: Any, x: Any) -> tuple | None:
  """``(kernel, strides, padding)`` of an NHWC spatial ``reduce_window_max`` equation, else None.

  Args:
    eqn: a jaxpr equation whose primitive is ``reduce_window_max``.
    x: its operand (anything with ``ndim`` and ``dtype``).

  Returns:
    ``((kh, kw), (sh, sw), ((top, bottom), (left, right)))``, or None when the window also spans
    the batch or channel axis, is dilated, or ``x`` is not a floating (N, H, W, C) array.
  """
  p = eqn.params
  if (x.ndim != 4 or p["window_dimensions"][0] != 1 or p["window_dimensions"][3] != 1
      or p["window_strides"][0] != 1 or p["window_strides"][3] != 1
      or any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"])
      or tuple(p["padding"][0]) != (0, 0) or tuple(p["padding"][3]) != (0, 0)
      or not jnp.issubdtype(x.dtype, jnp.floating)):
    return None
  k = tuple(int(v) for v in p["window_dimensions"][1:3])
  s = tuple(int(v) for v in p["window_strides"][1:3])
  pad = tuple(tuple(int(a) for a in pr) for pr in p["padding"][1:3])
  return k, s, pad


def _rule_max_pool(eqn, invals, opts):
  x, = invals
  geom = max_pool_geometry(eqn, x)
  return None if geom is None else max_pool(x, *geom)


def _rule_conv(eqn, invals, opts):
  p = eqn.params
  x, w = invals
  dn = p["dimension_numbers"]
  specs = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) if dn is not None else None
  if (specs != _NHWC_SPECS or x.ndim != 4
      or any(d != 1 for d in p["lhs_dilation"]) or any(d != 1 for d in p["rhs_dilation"])
      or p["feature_group_count"] != 1 or p["batch_group_count"] != 1
      or p.get("preferred_element_type") is not None):
    return None
  strides, pad = _pair(p["window_strides"]), _pairs(p["padding"])
  if any(s != 1 for s in strides) and x.shape[3] <= opts["polyphase_max_in_channels"]:
    return strided_conv(x, w, strides, pad, p.get("precision"))
  if opts["hwio_conv_grads"]:
    return conv(x, w, strides, pad, p.get("precision"))
  return None


_RULES = {"reduce_window_max": _rule_max_pool, "conv_general_dilated": _rule_conv}
def cpu_fast_grad(fn: Callable[..., Any], *, fast_max_pool: bool = True,
                  polyphase_max_in_channels: int = 4, hwio_conv_grads: bool = True
                  ) -> Callable[..., Any]:
  """Wraps ``fn`` so that its gradients avoid XLA CPU's slow paths; forward values unchanged.

  Args:
    fn: a pure, traceable function of arrays (e.g. ``features_fn(x01) -> acts``).
    fast_max_pool: replace ``reduce_window_max`` by :func:`max_pool`.
    polyphase_max_in_channels: strided NHWC convolutions with at most this many input
      channels (the stem) get :func:`strided_conv`'s polyphase input gradient; 0 disables.
    hwio_conv_grads: every other NHWC/HWIO convolution becomes :func:`conv` (input gradient on
      an HWIO-materialised kernel; what keeps ``lax.map``/``fori_loop`` bodies fast).

  Returns:
    A function with ``fn``'s signature and outputs.
  """
  rules = dict(_RULES)
  if not fast_max_pool:
    rules.pop("reduce_window_max")
  if polyphase_max_in_channels <= 0 and not hwio_conv_grads:
    rules.pop("conv_general_dilated")
  opts = {"rules": rules, "polyphase_max_in_channels": int(polyphase_max_in_channels),
          "hwio_conv_grads": bool(hwio_conv_grads)}

  @functools.wraps(fn)
  def wrapped(*args):
    return interpret.rewrite(fn, rules, opts)(*args)
  return wrapped


def by_backend(fn: Callable[..., Any], fast_grad: bool | None = None) -> Callable[..., Any]:
  """``fn`` wrapped in :func:`cpu_fast_grad` when ``fast_grad`` is True, or when it is None
  (every caller's default) and JAX's default backend is the CPU; else ``fn`` unchanged.

  The rewrite only helps XLA:CPU (the accelerators' max-pool and convolution gradients are
  already fast), and it never changes forward values."""
  if fast_grad is None:
    fast_grad = jax.default_backend() == "cpu"
  return cpu_fast_grad(fn) if fast_grad else fn
