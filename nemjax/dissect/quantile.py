"""Exact streaming top-η quantile thresholds, one per unit.

Network Dissection thresholds unit ``u`` at the ``q = 1 - η`` quantile (η = 0.005) of all
``n = N·h·w`` values the unit takes over the probe set. NetDissect-Lite approximates it with a
KLL sketch; nemjax computes it **exactly**: the result equals
``numpy.quantile(values_of_unit.astype(float64), q, method=method)`` bit for bit.

Only the ``k`` largest values of each unit can enter the interpolation (``k ≈ η·n + 2``, known
up front from the probe-set size), so the stream keeps a running top-``k`` per unit: memory
``U·k`` floats, independent of how the values are batched.

Streaming use (the dissection driver does this)::

  state = threshold_init(num_units=U, total_count=N * h * w)
  for acts in batches:                      # (B, h, w, U) float32, NHWC
    state = threshold_update(state, acts, valid=valid)
  thr = threshold_finalize(state)           # (U,) float64 numpy

One shot: ``thr = quantile_thresholds(acts_all, q=0.995)``.

``q``: the default ``1 - 0.005`` is the paper's top-0.5 %. NetDissect-Lite's sketch effectively
reads out ``q = 994/999`` (index 994 of ``linspace(0, 1, 1000)``), exported as
:data:`NETDISSECT_LITE_Q`; with that ``q``, ``method='hazen'`` equals the sketch's readout when
it does no compaction and the extremes sort first/last (see the spec), ``'linear'`` when data
values do.

Two update implementations, both exact:

* ``impl='host'`` (``'auto'`` on CPU): NumPy. Keeps only the values above a lower bound ``t``
  of the final k-th largest value (the running k-th largest, or for a fresh state the k-th
  largest block maximum of the batch: block maxima are data values, so that is a valid lower
  bound) and pools those few candidates, merging them into the running top-k (one
  ``np.partition``) once the pool holds k per unit. Cost ≈ one compare pass over the batch.
* ``impl='device'`` (``'auto'`` on accelerators): ``jax.lax.top_k`` over the running top-k
  concatenated with the batch, jitted. On this CPU it measured 30-50 ms per 64-image
  ResNet18 layer3 batch, 5-10x the host path.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemjax.dissect._checks import check_finite

__all__ = [
    "DEFAULT_Q",
    "NETDISSECT_LITE_Q",
    "QUANTILE_METHODS",
    "ThresholdState",
    "threshold_init",
    "threshold_update",
    "threshold_merge",
    "threshold_finalize",
    "quantile_thresholds",
    "required_top_k",
    "check_top_fraction",
    "quantile_of",
    "DEFAULT_TOP_FRACTION",
]

DEFAULT_TOP_FRACTION = 0.005
"""η, the top fraction of each unit's values above its threshold (the paper's 0.5 %): the one
home of this default; everything above this module speaks of ``top_fraction``."""
DEFAULT_Q = 1 - DEFAULT_TOP_FRACTION
"""Top-0.5 % quantile of the Network Dissection paper (``1 - DEFAULT_TOP_FRACTION``)."""
NETDISSECT_LITE_Q = 994 / 999
"""The quantile NetDissect-Lite's ``readout(1000)[:, 994]`` actually reads out."""

# numpy.quantile's continuous methods as (alpha, beta) of ``_compute_virtual_index``.
_ALPHA_BETA = {
    "interpolated_inverted_cdf": (0.0, 1.0),
    "hazen": (0.5, 0.5),
    "weibull": (0.0, 0.0),
    "median_unbiased": (1 / 3.0, 1 / 3.0),
    "normal_unbiased": (3 / 8.0, 3 / 8.0),
}
QUANTILE_METHODS = ("linear", "lower", "higher", "nearest", "midpoint") + tuple(_ALPHA_BETA)
"""``numpy.quantile`` methods reproduced exactly."""


class ThresholdState(NamedTuple):
  """Running state of the streaming top-k (host NumPy arrays).

  The k largest values seen per unit are the k largest of ``top`` ∪ ``pool``: candidates
  are pooled and merged into ``top`` only once the pool holds ``k`` columns.
  """
  top: np.ndarray  # (U, k) float32, k largest values of the merged part (unsorted), -inf fill
  pool: np.ndarray  # (U, p) float32, not yet merged candidates (p < k), -inf fill
  count: int  # number of values seen per unit so far
  total_count: int  # n, the number of values per unit in the whole probe set
  q: float  # quantile in [0, 1]


def _order_statistics(n: int, q: float, method: str):
  """Which sorted (ascending) values ``numpy.quantile`` reads and how it mixes them.

  Mirrors ``numpy/lib/_function_base_impl.py`` (``_quantile``, ``_get_indexes``,
  ``_get_gamma``) operation by operation.

  Returns:
    ``(prev, nxt, gamma)``: ascending 0-based indices in ``[0, n)`` and the float64
    interpolation weight, or ``gamma=None`` for the discrete methods (value = sorted[prev]).
  """
  qa = np.asanyarray(q, dtype=np.float64)
  if method == "linear":
    vi = (n - 1) * qa
  elif method in _ALPHA_BETA:
    alpha, beta = _ALPHA_BETA[method]
    vi = n * qa + (alpha + qa * (1 - alpha - beta)) - 1
  elif method == "lower":
    return int(np.floor((n - 1) * qa).astype(np.intp)), None, None
  elif method == "higher":
    return int(np.ceil((n - 1) * qa).astype(np.intp)), None, None
  elif method == "nearest":
    return int(np.around((n - 1) * qa).astype(np.intp)), None, None
  elif method == "midpoint":
    vi = 0.5 * (np.floor((n - 1) * qa) + np.ceil((n - 1) * qa))
  else:
    raise ValueError(f"method {method!r} is not supported; use one of {QUANTILE_METHODS}")
  vi = np.float64(vi)
  prev = np.floor(vi)
  nxt = prev + 1
  if vi >= n - 1:
    prev = nxt = np.float64(-1)
  if vi < 0:
    prev = nxt = np.float64(0)
  gamma = np.float64(vi - prev)
  if method == "midpoint":
    gamma = np.float64(0.0 if vi % 1 == 0 else 0.5)
  p, x = int(prev), int(nxt)
  return (p + n if p < 0 else p), (x + n if x < 0 else x), gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.float64) -> np.ndarray:
  """numpy's ``_lerp``: a + (b - a)·t, or b - (b - a)·(1 - t) where t >= 0.5."""
  diff = b - a
  out = a + diff * t
  if t >= 0.5:
    out = b - diff * (1 - t)
  return out


def check_top_fraction(top_fraction: float, name: str = "top_fraction") -> float:
  """``top_fraction`` as a float; ValueError ``"{name}: ..."`` unless it lies in (0, 1)."""
  if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float, np.floating)) \
      or not 0.0 < float(top_fraction) < 1.0:
    raise ValueError(f"{name}: η, the top fraction of a unit's activations above its "
                     f"threshold, must lie in (0, 1), got {top_fraction!r}")
  return float(top_fraction)


def quantile_of(top_fraction: float) -> float:
  """The quantile ``q = 1 - η`` a unit's threshold sits at (the only place it is computed)."""
  return 1.0 - check_top_fraction(top_fraction)


def required_top_k(total_count: int, q: float) -> int:
  """Number of largest values per unit that every supported method may read at ``q``."""
  if total_count < 1:
    raise ValueError(f"total_count must be >= 1, got {total_count}")
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"q must lie in [0, 1], got {q}")
  lowest = total_count - 1
  for m in QUANTILE_METHODS:
    prev, nxt, _ = _order_statistics(total_count, q, m)
    lowest = min(lowest, prev, nxt if nxt is not None else prev)
  return total_count - lowest


def threshold_init(num_units: int, total_count: int, q: float = DEFAULT_Q,
                   k: int | None = None) -> ThresholdState:
  """Empty streaming state.

  Args:
    num_units: U.
    total_count: n, the number of values each unit will see (``N·h·w`` for conv layers).
    q: quantile in [0, 1] (default: top 0.5 %).
    k: override of the number of kept values (default :func:`required_top_k`); must be
      at least that.

  Returns:
    ThresholdState with ``top`` (U, k) filled with -inf.
  """
  need = required_top_k(total_count, q)
  if k is None:
    k = need
  if k < need:
    raise ValueError(f"k={k} is too small: q={q} with total_count={total_count} needs k>={need}")
  if num_units < 1:
    raise ValueError(f"num_units must be >= 1, got {num_units}")
  top = np.full((num_units, min(k, total_count)), -np.inf, np.float32)
  pool = np.zeros((num_units, 0), np.float32)
  return ThresholdState(top=top, pool=pool, count=0, total_count=int(total_count), q=float(q))


def _as_rows(acts, num_units: int, layout: str, valid) -> np.ndarray:
  """acts (B,h,w,U) | (B,U,h,w) | (B,U) -> values (m, U) float32 of the valid images."""
  a = np.asarray(acts)
  if a.ndim not in (2, 4):
    raise ValueError(f"acts must be (B,h,w,U), (B,U,h,w) or (B,U); got shape {a.shape}")
  if a.ndim == 4 and layout == "NCHW":
    a = a.transpose(0, 2, 3, 1)
  elif layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if a.shape[-1] != num_units:
    raise ValueError(f"acts {np.shape(acts)} ({layout}) has {a.shape[-1]} units, state has "
                     f"{num_units}")
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != (a.shape[0],):
      raise ValueError(f"valid must have shape ({a.shape[0]},), got {valid.shape}")
    if not valid.all():
      a = a[valid]
  vals = np.ascontiguousarray(a.reshape(-1, num_units), dtype=np.float32)
  check_finite(vals, "acts (NHWC, valid rows)", a.shape)
  return vals



def _top_k_merge(top: np.ndarray, pool: np.ndarray) -> np.ndarray:
  """Exact k largest per row of ``top`` (U, k) ∪ ``pool`` (U, p), unsorted."""
  if pool.shape[1] == 0:
    return top
  k = top.shape[1]
  merged = np.concatenate([top, pool], axis=1)
  wdt = merged.shape[1]
  return np.ascontiguousarray(np.partition(merged, wdt - k, axis=1)[:, wdt - k:])


def _merge_host(top: np.ndarray, pool: np.ndarray, vals: np.ndarray,
                count: int) -> tuple[np.ndarray, np.ndarray]:
  """Adds the columns of ``vals`` (m, U) to the running ``(top, pool)``, in NumPy.

  Only values above a lower bound ``t`` of the final k-th largest can matter: ``t`` is the
  k-th largest of ``top``, or (fresh state) the k-th largest of this batch's block maxima,
  which are data values. With the latter, ``k`` copies of ``t`` stand in for the batch values
  ``== t`` that the strict filter drops: there are at least ``k`` batch values ``>= t``, so the
  top-k multiset is unchanged. Values ``== t`` of the former case cannot change it either.
  """
  u_n, k = top.shape
  m = vals.shape[0]
  if m == 0:
    return top, pool
  g = max(1, min(16, m // (2 * k)))  # blocks of g values, at least k blocks when m >= k
  if count == 0 and g == 1 and m >= k:  # fresh state, small batch: its exact top-k
    return np.ascontiguousarray(np.partition(vals, m - k, axis=0)[m - k:].T), pool
  t = top.min(axis=1)
  parts = [pool]
  nb = m // g
  if count < m and nb >= k:
    bmax = vals[:nb * g].reshape(nb, g, u_n).max(axis=1) if g > 1 else vals
    t_blk = np.partition(bmax, nb - k, axis=0)[nb - k]
    use = t_blk > t
    if use.any():
      t = np.where(use, t_blk, t)
      parts.append(np.repeat(np.where(use, t_blk, -np.inf).astype(np.float32)[:, None], k, 1))
  flat = np.flatnonzero(vals > t[None, :])
  if flat.size:
    cand_u = (flat % u_n).astype(np.int16 if u_n < 2**15 else np.int32)
    order = np.argsort(cand_u, kind="stable")  # radix sort on small ints
    cu = cand_u[order].astype(np.intp)
    cv = vals.reshape(-1)[flat[order]]
    per = np.bincount(cu, minlength=u_n)
    first = np.cumsum(per) - per
    dense = np.full((u_n, int(per.max())), -np.inf, np.float32)
    dense[cu, np.arange(cu.size) - first[cu]] = cv
    parts.append(dense)
  pool = np.concatenate(parts, axis=1) if len(parts) > 1 else pool
  if pool.shape[1] >= k:
    return _top_k_merge(top, pool), pool[:, :0]
  return top, pool


@jax.jit
def _merge_device(top: jax.Array, vals: jax.Array) -> jax.Array:
  """top (U,k) f32, vals (m,U) f32 -> top-k per unit of their union (U,k)."""
  both = jnp.concatenate([top, vals.T], axis=1)
  return jax.lax.top_k(both, top.shape[1])[0]


def threshold_update(state: ThresholdState, acts, valid=None, layout: str = "NHWC",
                     impl: str = "auto") -> ThresholdState:
  """Adds one batch of activations to the running top-k.

  Args:
    state: from :func:`threshold_init` / a previous update.
    acts: (B, h, w, U) float32 (``layout='NHWC'``), (B, U, h, w) (``'NCHW'``) or (B, U).
    valid: optional (B,) bool; rows with False (padding of a last batch) are ignored.
    layout: 'NHWC' (default) or 'NCHW'.
    impl: 'host' (NumPy candidate filter, fast on CPU), 'device' (``jax.lax.top_k``) or
      'auto' (host on a CPU backend, device otherwise). All are exact.

  Returns:
    The new state.
  """
  vals = _as_rows(acts, state.top.shape[0], layout, valid)
  new_count = state.count + vals.shape[0]
  if new_count > state.total_count:
    raise ValueError(f"more values than announced: {new_count} > total_count="
                     f"{state.total_count}")
  if impl == "auto":
    impl = "host" if jax.default_backend() == "cpu" else "device"
  if impl == "host":
    top, pool = _merge_host(state.top, state.pool, vals, state.count)
  elif impl == "device":
    top = _top_k_merge(state.top, state.pool)
    top, pool = np.asarray(_merge_device(jnp.asarray(top), jnp.asarray(vals))), state.pool[:, :0]
  else:
    raise ValueError(f"impl must be 'auto', 'host' or 'device', got {impl!r}")
  return state._replace(top=top, pool=pool, count=new_count)


def threshold_merge(a: ThresholdState, b: ThresholdState) -> ThresholdState:
  """The state of the values of ``a`` and ``b`` together (states of disjoint values of the same
  units, e.g. two processes' shards of the probe set, both from :func:`threshold_init` with the
  same ``total_count``, ``q`` and ``k``).

  Exact: the k largest values of a union are the k largest of the parts' k largest, so the
  finalized thresholds equal those of one stream over all the values, bit for bit.
  """
  if a.top.shape != b.top.shape or (a.total_count, a.q) != (b.total_count, b.q):
    raise ValueError(f"threshold states differ: top {a.top.shape} vs {b.top.shape}, "
                     f"(total_count, q) {(a.total_count, a.q)} vs {(b.total_count, b.q)}")
  if a.count + b.count > a.total_count:
    raise ValueError(f"more values than announced: {a.count + b.count} > total_count="
                     f"{a.total_count}")
  top = _top_k_merge(_top_k_merge(a.top, a.pool), np.concatenate([b.top, b.pool], axis=1))
  return a._replace(top=top, pool=a.pool[:, :0], count=a.count + b.count)


def threshold_finalize(state: ThresholdState, method: str = "linear",
                       q: float | None = None) -> np.ndarray:
  """Thresholds equal to ``numpy.quantile(values.astype(float64), q, method=method)``.

  Args:
    state: after all ``total_count`` values were added.
    method: one of :data:`QUANTILE_METHODS` (default numpy's 'linear').
    q: optional quantile other than the state's (needs ``required_top_k(n, q) <= k``).

  Returns:
    (U,) float64 numpy thresholds.
  """
  n = state.total_count
  if state.count != n:
    raise ValueError(f"saw {state.count} values per unit, expected total_count={n}")
  q = state.q if q is None else float(q)
  k = state.top.shape[1]
  top = _top_k_merge(state.top, state.pool)
  desc = -np.sort(-top.astype(np.float64), axis=1)  # (U, k), largest first

  def at(i: int) -> np.ndarray:
    r = n - 1 - i
    if r >= k:
      raise ValueError(f"q={q}, method={method!r} needs the {r + 1}-th largest value, the "
                       f"state keeps k={k}; pass a larger k to threshold_init")
    return desc[:, r]

  prev, nxt, gamma = _order_statistics(n, q, method)
  if gamma is None:
    return at(prev).copy()
  return _lerp(at(prev), at(nxt), gamma)


def quantile_thresholds(acts, q: float = DEFAULT_Q, method: str = "linear",
                        layout: str = "NHWC", valid=None) -> np.ndarray:
  """One-shot exact per-unit quantile of (N, h, w, U) (or NCHW / (N, U)) activations.

  Returns:
    (U,) float64, equal to ``numpy.quantile`` over each unit's N·h·w values.
  """
  a = np.asarray(acts)
  if a.ndim not in (2, 4):
    raise ValueError(f"acts must be (N,h,w,U), (N,U,h,w) or (N,U); got shape {a.shape}")
  units = a.shape[1] if (a.ndim == 4 and layout == "NCHW") else a.shape[-1]
  n_img = a.shape[0] if valid is None else int(np.asarray(valid, bool).sum())
  per = int(np.prod(a.shape[1:])) // units
  state = threshold_init(units, n_img * per, q)
  state = threshold_update(state, a, valid=valid, layout=layout)
  return threshold_finalize(state, method)
