"""Kendall rank correlations between activation rankings (Nanfack et al. 2024).

For two score vectors ``x, y`` over the same ``n`` images, Kendall's τ-b is

.. math::
   \\tau_b(x, y) = \\frac{\\sum_{a<b} \\mathrm{sgn}(x_a - x_b)\\,\\mathrm{sgn}(y_a - y_b)}
                      {\\sqrt{(n_0 - n_x)(n_0 - n_y)}}

with ``n_0 = n(n-1)/2`` and ``n_x``, ``n_y`` the numbers of tied pairs in ``x`` and ``y`` —
exactly ``scipy.stats.kendalltau(x, y)`` (variant ``"b"``), NaN when ``x`` or ``y`` is constant.
τ depends on the scores only through their ranking, so activations are used directly.

The kernels are O(n²) but vectorised: pairs are processed in blocks of anchor images
(``(block, n, C)`` sign tensors), and the numerator of every channel pair ``(j, i)`` is one
matrix product of sign tensors. Counts are accumulated exactly in int32 (valid for
``n ≤ 46340``).

* :func:`kendall_tau` — ``(C,)`` τ between column ``j`` of two matrices (initial vs final
  activation ranking of each channel).
* :func:`kendall_tau_cross` — ``(C, D)`` τ between every column of one and every column of the
  other.
* :func:`kendall_tau_w` — ``τ-W_j = max_{i≠j} τ(R^init_j, R^final_i) / max_{i≠j} τ(R^init_j,
  R^init_i)``: does channel j's initial ranking reappear in *another* channel after the attack,
  relative to how similar channels were to begin with.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["kendall_tau", "kendall_tau_cross", "kendall_tau_w"]

_MAX_BLOCK_ELEMS = 1 << 22


def _check2(name: str, a: Any, b: Any, same_cols: bool) -> tuple[int, int, int]:
  sa, sb = np.shape(a), np.shape(b)
  if len(sa) == 1:
    sa = (sa[0], 1)
  if len(sb) == 1:
    sb = (sb[0], 1)
  if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[0]:
    raise ValueError(f"{name}: expected (n, C) and (n, D) with the same n, got "
                     f"{np.shape(a)} and {np.shape(b)}")
  if same_cols and sa[1] != sb[1]:
    raise ValueError(f"{name}: both inputs need the same number of columns, got {sa} and {sb}")
  if sa[0] < 2:
    raise ValueError(f"{name}: need at least 2 images, got n={sa[0]}")
  if sa[0] > 46340:
    raise ValueError(f"{name}: n={sa[0]} too large for exact int32 pair counts (max 46340)")
  return sa[0], sa[1], sb[1]


def _block(n: int, width: int) -> int:
  return int(max(1, min(n, _MAX_BLOCK_ELEMS // max(1, n * width))))


@functools.partial(jax.jit, static_argnames=("block", "paired"))
def _tau_kernel(a: jax.Array, b: jax.Array, block: int, paired: bool):
  """Numerator and tie-corrected pair counts, accumulated over anchor blocks."""
  n = a.shape[0]
  nb = -(-n // block)
  pad = nb * block - n
  valid = jnp.arange(nb * block) < n
  ap = jnp.pad(a, ((0, pad), (0, 0)))
  bp = jnp.pad(b, ((0, pad), (0, 0)))

  def body(carry, r):
    num, nza, nzb = carry
    rows = r * block + jnp.arange(block)
    v = valid[rows].astype(jnp.float32)[:, None, None]
    sa = jnp.sign(ap[rows][:, None, :] - a[None, :, :]) * v  # (block, n, C)
    sb = jnp.sign(bp[rows][:, None, :] - b[None, :, :]) * v  # (block, n, D)
    if paired:
      part = jnp.sum(sa * sb, axis=(0, 1))
    else:
      part = jnp.einsum("rmc,rmd->cd", sa, sb, precision=jax.lax.Precision.HIGHEST)
    num = num + part.astype(jnp.int32)
    nza = nza + jnp.sum(jnp.abs(sa), axis=(0, 1)).astype(jnp.int32)
    nzb = nzb + jnp.sum(jnp.abs(sb), axis=(0, 1)).astype(jnp.int32)
    return (num, nza, nzb), None

  c, d = a.shape[1], b.shape[1]
  num0 = jnp.zeros((c,) if paired else (c, d), jnp.int32)
  init = (num0, jnp.zeros((c,), jnp.int32), jnp.zeros((d,), jnp.int32))
  (num, nza, nzb), _ = jax.lax.scan(body, init, jnp.arange(nb))
  return num, nza, nzb


def _as_matrix(x: Any) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x[:, None] if x.ndim == 1 else x


def kendall_tau(initial: Any, final: Any) -> jax.Array:
  """Per-channel Kendall τ-b between two rankings of the same images.

  Args:
    initial: ``(n, C)`` (or ``(n,)``) scores of the images before the attack.
    final: ``(n, C)`` (or ``(n,)``) scores of the same images after it.

  Returns:
    ``(C,)`` float32 τ-b of column ``j`` of ``initial`` vs column ``j`` of ``final`` (a scalar
    for 1-D inputs); NaN for a constant column.
  """
  n, c, _ = _check2("kendall_tau", initial, final, same_cols=True)
  a, b = _as_matrix(initial), _as_matrix(final)
  num, nza, nzb = _tau_kernel(a, b, block=_block(n, 2 * c), paired=True)
  tau = num.astype(jnp.float32) / jnp.sqrt(nza.astype(jnp.float32) * nzb.astype(jnp.float32))
  return tau[0] if np.ndim(initial) == 1 else tau


def kendall_tau_cross(a: Any, b: Any) -> jax.Array:
  """Kendall τ-b between every column of ``a`` and every column of ``b``.

  Args:
    a: ``(n, C)`` scores.
    b: ``(n, D)`` scores of the same images.

  Returns:
    ``(C, D)`` float32 matrix, ``[j, i] = τ_b(a[:, j], b[:, i])``.
  """
  n, c, d = _check2("kendall_tau_cross", a, b, same_cols=False)
  a, b = _as_matrix(a), _as_matrix(b)
  num, nza, nzb = _tau_kernel(a, b, block=_block(n, c + d), paired=False)
  den = jnp.sqrt(nza.astype(jnp.float32)[:, None] * nzb.astype(jnp.float32)[None, :])
  return num.astype(jnp.float32) / den


def _max_off_diagonal(m: jax.Array) -> jax.Array:
  c = m.shape[0]
  m = jnp.where(jnp.isnan(m) | jnp.eye(c, dtype=bool), -jnp.inf, m)
  return jnp.max(m, axis=1)


def kendall_tau_w(initial: Any, final: Any) -> jax.Array:
  r"""Kendall-τ-W per channel.

  .. math::
     \tau W_j = \frac{\max_{i \ne j} \tau_b(R^{init}_j, R^{final}_i)}
                     {\max_{i \ne j} \tau_b(R^{init}_j, R^{init}_i)}

  NaN correlations (constant channels) are skipped in both maxima.

  Args:
    initial: ``(n, C)`` activations before the attack, ``C >= 2``.
    final: ``(n, C)`` activations of the same images after it.

  Returns:
    ``(C,)`` float32.
  """
  n, c, _ = _check2("kendall_tau_w", initial, final, same_cols=True)
  if c < 2 or np.ndim(initial) != 2:
    raise ValueError(f"kendall_tau_w: needs (n, C) inputs with C >= 2, got {np.shape(initial)}")
  a, b = _as_matrix(initial), _as_matrix(final)
  both = jnp.concatenate([b, a], axis=1)  # one pass: init vs (final | init)
  num, nza, nzb = _tau_kernel(a, both, block=_block(n, 3 * c), paired=False)
  den = jnp.sqrt(nza.astype(jnp.float32)[:, None] * nzb.astype(jnp.float32)[None, :])
  cross = num.astype(jnp.float32) / den
  return _max_off_diagonal(cross[:, :c]) / _max_off_diagonal(cross[:, c:])
