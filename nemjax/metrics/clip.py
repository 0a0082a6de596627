"""CLIP-δ and CLIP-W: how far a channel's top-k images moved in an embedding space.

Nanfack et al. (2024) embed the top-k images of every channel (initial model and fine-tuned
model) with CLIP and compare mean pairwise cosine similarities. With ``T^init_a``, ``T^final_a``
the top-k image sets of channel ``a`` and ``ê`` unit-normalised embeddings,

.. math::
   \\bar C^{P,Q}_{ab} = \\operatorname{mean}_{u \\in T^P_a,\\, v \\in T^Q_b} \\langle ê_u, ê_v \\rangle

   \\text{CLIP-}\\delta_j = \\frac{\\bar C^{init,init}_{jj} - \\bar C^{init,final}_{jj}}
                            {\\operatorname{mean}_{p \\ne j} \\bar C^{init,init}_{jp}}, \\qquad
   \\text{CLIP-W}_j = \\frac{\\max_{i \\ne j} \\bar C^{init,final}_{ji}}
                          {\\max_{i \\ne j} \\bar C^{init,init}_{ji}}

Decision on self-pairs: ``C̄^{init,init}_{jj}`` compares a set with *itself*, so its ``k`` pairs
``(u, u)`` (cosine exactly 1) are excluded and the mean runs over the ``k(k−1)`` ordered pairs
of distinct images — the "mean over pairs of the initial top-k set" of the paper. Every other
entry (``a ≠ b``, or init vs final) averages all ``k·k'`` pairs, so an image present in both
sets counts with cosine 1, as it should for a measure of how much the set changed.

The mean pairwise cosine of two sets is the dot product of their mean unit embeddings,
``C̄_ab = m_a · m_b`` with ``m_a = mean_u ê_u``, so all ``C × C`` entries cost one small matmul.

Embedders: any callable ``images (n, H, W, 3) -> (n, D)``. :func:`penultimate_embedder` (a
model's pooled features) is the default stand-in for CLIP that needs no extra weights;
:func:`clip_embedder` embeds with a CLIP ViT image tower in Flax
(:mod:`nemjax.models.clip_vit`, weights from a local state dict via :mod:`nemjax.convert.clip`);
:func:`load_embedder` turns a command-line spec (``model`` / ``clip:PATH``) into either.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "mean_embeddings",
    "set_similarity",
    "clip_delta",
    "clip_w",
    "embed_sets",
    "penultimate_embedder",
    "clip_embedder",
    "load_embedder",
]

Embedder = Callable[[Any], Any]


def _check_sets(name: str, e: Any) -> tuple[int, int, int]:
  s = np.shape(e)
  if len(s) != 3 or min(s) < 1:
    raise ValueError(f"{name}: embeddings must be (C, k, D), got {s}")
  return s


def mean_embeddings(embeddings: Any, eps: float = 1e-12) -> jax.Array:
  """Mean of the unit-normalised embeddings of each set.

  Args:
    embeddings: ``(C, k, D)`` embeddings of ``C`` sets of ``k`` images.
    eps: floor on the norm (zero vectors stay zero).

  Returns:
    ``(C, D)`` float32 ``m_a = mean_u e_u / ‖e_u‖``.
  """
  _check_sets("mean_embeddings", embeddings)
  e = jnp.asarray(embeddings, jnp.float32)
  unit = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)
  return jnp.mean(unit, axis=1)


def set_similarity(emb_p: Any, emb_q: Any | None = None, eps: float = 1e-12) -> jax.Array:
  """``C̄^{P,Q}``: mean pairwise cosine similarity between every pair of sets.

  Args:
    emb_p: ``(C, k, D)`` embeddings of the sets ``T^P_a``.
    emb_q: ``(C', k', D)`` embeddings of ``T^Q_b``; ``None`` means ``Q = P`` and the diagonal
      excludes self-pairs (see the module docstring).
    eps: norm floor.

  Returns:
    ``(C, C')`` float32 matrix ``[a, b] = C̄_ab``.
  """
  cp, kp, dp = _check_sets("set_similarity", emb_p)
  e = jnp.asarray(emb_p, jnp.float32)
  unit_p = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)
  m_p = jnp.mean(unit_p, axis=1)
  hp = jax.lax.Precision.HIGHEST
  if emb_q is None:
    sim = jnp.matmul(m_p, m_p.T, precision=hp)
    if kp < 2:
      raise ValueError("set_similarity: a set compared with itself needs k >= 2 images")
    s = jnp.sum(unit_p, axis=1)  # (C, D)
    self_sq = jnp.sum(jnp.square(unit_p), axis=(1, 2))  # Σ_u ‖ê_u‖² (= k for nonzero e)
    diag = (jnp.sum(s * s, axis=-1) - self_sq) / (kp * (kp - 1))
    return sim.at[jnp.arange(cp), jnp.arange(cp)].set(diag)
  cq, kq, dq = _check_sets("set_similarity", emb_q)
  if dq != dp:
    raise ValueError(f"set_similarity: embedding sizes differ ({dp} vs {dq})")
  return jnp.matmul(m_p, mean_embeddings(emb_q, eps).T, precision=hp)


def _off_diag(m: jax.Array, fill: float) -> jax.Array:
  return jnp.where(jnp.eye(m.shape[0], dtype=bool), fill, m)


def _pair(name: str, init: Any, final: Any) -> None:
  si, sf = _check_sets(name, init), _check_sets(name, final)
  if si[0] != sf[0] or si[2] != sf[2]:
    raise ValueError(f"{name}: initial and final embeddings must share C and D, got {si}, {sf}")
  if si[0] < 2:
    raise ValueError(f"{name}: needs at least 2 channels, got C={si[0]}")


def clip_delta(init_embeddings: Any, final_embeddings: Any) -> jax.Array:
  r"""CLIP-δ per channel.

  .. math:: \delta_j = \frac{\bar C^{init,init}_{jj} - \bar C^{init,final}_{jj}}
                            {\frac{1}{C-1}\sum_{p \ne j} \bar C^{init,init}_{jp}}

  Args:
    init_embeddings: ``(C, k, D)`` embeddings of each channel's initial top-k images.
    final_embeddings: ``(C, k', D)`` embeddings of its top-k images after the attack.

  Returns:
    ``(C,)`` float32.
  """
  _pair("clip_delta", init_embeddings, final_embeddings)
  ii = set_similarity(init_embeddings)
  if_ = set_similarity(init_embeddings, final_embeddings)
  c = ii.shape[0]
  baseline = jnp.sum(_off_diag(ii, 0.0), axis=1) / (c - 1)
  return (jnp.diagonal(ii) - jnp.diagonal(if_)) / baseline


def clip_w(init_embeddings: Any, final_embeddings: Any) -> jax.Array:
  r"""CLIP-W per channel.

  .. math:: W_j = \frac{\max_{i \ne j} \bar C^{init,final}_{ji}}
                       {\max_{i \ne j} \bar C^{init,init}_{ji}}

  Args:
    init_embeddings: ``(C, k, D)``.
    final_embeddings: ``(C, k', D)``.

  Returns:
    ``(C,)`` float32.
  """
  _pair("clip_w", init_embeddings, final_embeddings)
  ii = set_similarity(init_embeddings)
  if_ = set_similarity(init_embeddings, final_embeddings)
  return (jnp.max(_off_diag(if_, -jnp.inf), axis=1) /
          jnp.max(_off_diag(ii, -jnp.inf), axis=1))


def embed_sets(embedder: Embedder, images: Any, batch_size: int = 256) -> jax.Array:
  """Embed ``C`` sets of ``k`` images with any embedder, in batches.

  Args:
    embedder: callable ``images (n, H, W, 3) -> (n, D)``.
    images: ``(C, k, H, W, 3)`` top-k images per channel (e.g. gathered with
      ``TopKState.indices``).
    batch_size: images per embedder call.

  Returns:
    ``(C, k, D)`` float32 embeddings.
  """
  s = np.shape(images)
  if len(s) != 5:
    raise ValueError(f"embed_sets: images must be (C, k, H, W, 3), got {s}")
  if batch_size < 1:
    raise ValueError(f"embed_sets: batch_size must be >= 1, got {batch_size}")
  flat = np.reshape(np.asarray(images), (s[0] * s[1],) + s[2:])
  outs = []
  for i in range(0, flat.shape[0], batch_size):
    e = np.asarray(embedder(flat[i: i + batch_size]), np.float32)
    if e.ndim != 2 or e.shape[0] != min(batch_size, flat.shape[0] - i):
      raise ValueError(f"embed_sets: embedder must return (n, D), got {e.shape}")
    outs.append(e)
  return jnp.asarray(np.concatenate(outs).reshape(s[0], s[1], -1))


def penultimate_embedder(apply_fn: Callable, state: Any, layer: str) -> Embedder:
  """Embed images with a model's own features (the default stand-in for CLIP).

  ``embedder(images) = spatial mean of apply_fn(state, images)[1][layer]`` — the global-average
  pooled (penultimate) features, a semantic embedding that needs no extra weights. It measures
  similarity as seen by the model under test (usually the *original* model), not by CLIP, so
  absolute values differ from the paper's CLIP numbers.

  Args:
    apply_fn: ``apply_fn(state, images) -> (logits, {layer: acts})`` (e.g. from
      ``nemjax.models.pure_apply`` with ``taps=(layer,)``); it must include any input
      normalisation the model expects.
    state: its variables.
    layer: tapped layer whose ``(n, h, w, C)`` (pooled) or ``(n, C)`` output is the embedding.

  Returns:
    A jitted ``embedder(images (n, H, W, 3)) -> (n, C)``.
  """

  @jax.jit
  def embed(images):
    _, acts = apply_fn(state, images)
    if layer not in acts:
      raise ValueError(f"penultimate_embedder: layer {layer!r} not tapped; got {sorted(acts)}")
    a = acts[layer]
    return jnp.mean(a, axis=(1, 2)) if a.ndim == 4 else a.reshape(a.shape[0], -1)

  return embed


def clip_embedder(model: Any, *, description: str = "CLIP") -> Embedder:
  """Embed images with a CLIP image tower (:class:`nemjax.models.clip_vit.CLIPVisionTransformer`).

  Preprocessing happens inside: images are ``(n, H, W, 3)`` RGB, uint8 (0..255) or floating
  point in [0, 1] (told apart by the dtype), resized (shorter side, bicubic) and centre-cropped
  to the model's input size and CLIP-normalised (:func:`nemjax.models.clip_vit.preprocess`).

  Args:
    model: the CLIP image tower (e.g. from ``nemjax.convert.clip.load_clip_vision``).
    description: what the embedder is, for reports (``embedder.description``).

  Returns:
    ``embedder(images) -> (n, D)`` NumPy float32 L2-normalised embeddings, jitted once per
    input shape; ``embedder.description`` says what it is.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from nemjax.models import clip_vit  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  size = model.config.image_size

  @jax.jit
  def forward(state, images):
    e = nnx.merge(graphdef, state)(clip_vit.preprocess(images, size))
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def embed(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"clip_embedder: expected (n, H, W, 3) images, got {x.shape}")
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"clip_embedder: images must be uint8 (0..255) or float in [0, 1], got "
                         f"dtype {x.dtype}")
      if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or not np.isfinite(x).all()):
        raise ValueError(f"clip_embedder: float images must lie in [0, 1] (uint8 for 0..255), got "
                         f"values in [{np.nanmin(x)}, {np.nanmax(x)}]")
    return np.asarray(forward(state, x), np.float32)

  embed.description = description
  return embed


def load_embedder(spec: str, model_embedder: Embedder | None = None) -> Embedder | None:
  """The image embedder a command-line spec names.

  Args:
    spec: ``"model"`` — ``model_embedder`` (the original model's pooled features, a stand-in
      for CLIP; ``None`` lets the experiment use its own); ``"clip:PATH"`` — the CLIP ViT image
      tower of the state dict file PATH (OpenAI JIT archive, ``.pt``/``.pth``, ``.npz`` or
      ``.safetensors``; QuickGELU, as OpenAI's weights); ``"clip-gelu:PATH"`` — the same with
      exact GELU (OpenCLIP models trained without ``-quickgelu``).
    model_embedder: what ``"model"`` returns.

  Returns:
    The embedder (see :func:`clip_embedder`), or ``model_embedder`` for ``"model"``.

  Raises:
    ValueError / FileNotFoundError: unknown spec, missing file or a state dict that does not
      convert (every mismatch listed).
  """
  if spec == "model":
    return model_embedder
  kind, sep, path = str(spec).partition(":")
  if not sep or kind not in ("clip", "clip-gelu") or not path:
    raise ValueError(f"embedder spec {spec!r} must be 'model', 'clip:PATH' or 'clip-gelu:PATH'")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"embedder {spec!r}: no CLIP state dict file at {path!r}")
  from nemjax.convert import clip as cclip  # pylint: disable=import-outside-toplevel
  act = "gelu" if kind == "clip-gelu" else "quick_gelu"
  model = cclip.load_clip_vision(path, act)
  c = model.config
  return clip_embedder(model, description=(
      f"CLIP ViT image embeddings (patch {c.patch_size}, {c.image_size} px, width {c.width}, "
      f"{c.layers} layers, {c.heads} heads, dim {c.embed_dim}, {act}) of `{path}`"))
