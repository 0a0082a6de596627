"""CLIP's image tower (a ViT, OpenAI / OpenCLIP layout) in Flax NNX, for CLIP embeddings.

::

  from nemjax.models import clip_vit
  cfg = clip_vit.CLIPVisionConfig()                      # ViT-B/32: 224 px, width 768, 12 x 12
  model = clip_vit.CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0))
  x = clip_vit.preprocess(images, cfg.image_size)        # (N, H, W, 3) uint8 or [0, 1] floats
  e = model(x)                                           # (N, 512) unnormalised embeddings

Weights come from a CLIP state dict through ``nemjax.convert.clip`` (strict; the config is read
from the tensor shapes). The forward pass is OpenAI's ``VisionTransformer.forward``:

  patches = conv1(x) (stride = kernel = patch, no bias) -> (N, g², W)
  x = [class_embedding; patches] + positional_embedding -> ln_pre
  per block: x += out_proj(MHA(ln_1(x))); x += c_proj(act(c_fc(ln_2(x))))
  embedding = ln_post(x[:, 0]) @ proj                         # (N, embed_dim)

``act`` is QuickGELU (``x·σ(1.702x)``) for OpenAI's weights and OpenCLIP's ``-quickgelu``
models, exact GELU for OpenCLIP's other models (it cannot be read from the weights).
LayerNorms use ε = 1e-5 (PyTorch's default).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["CLIP_MEAN", "CLIP_STD", "ACTIVATIONS", "CLIPVisionConfig", "CLIPVisionTransformer",
           "preprocess"]

# OpenAI CLIP's input normalisation (RGB, of [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Shape of a CLIP ViT image tower (defaults: OpenAI ViT-B/32)."""
  image_size: int = 224    # input resolution (square)
  patch_size: int = 32     # conv1 kernel = stride
  width: int = 768         # token width
  layers: int = 12         # residual attention blocks
  heads: int = 12          # attention heads (OpenAI: width // 64)
  embed_dim: int = 512     # output (joint embedding) dimension
  act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI) or "gelu"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def validate(self) -> None:
    """ValueError naming the field if the config cannot describe a CLIP ViT."""
    for name in ("image_size", "patch_size", "width", "layers", "heads", "embed_dim"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"CLIPVisionConfig.{name} must be a positive int, got {v!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.width % self.heads:
      raise ValueError(f"CLIPVisionConfig: width {self.width} is not divisible by heads "
                       f"{self.heads}")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"CLIPVisionConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")


class _Attention(nnx.Module):
  """``torch.nn.MultiheadAttention`` self-attention, weights in PyTorch's layout."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    init = nnx.initializers.normal(width ** -0.5)
    self.in_proj_weight = nnx.Param(init(rngs.params(), (3 * width, width)))  # (3W, W): q; k; v
    self.in_proj_bias = nnx.Param(jnp.zeros((3 * width,)))
    self.out_proj = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (N, L, W) -> (N, L, W)``."""
    n, l, w = x.shape
    qkv = x @ self.in_proj_weight[...].T + self.in_proj_bias[...]
    q, k, v = (t.reshape(n, l, self.heads, w // self.heads) for t in jnp.split(qkv, 3, -1))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(w // self.heads).astype(np.float32)
    out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.out_proj(out.reshape(n, l, w))


class _MLP(nnx.Module):
  def __init__(self, width: int, act: str, *, rngs: nnx.Rngs):
    self.act = act
    self.c_fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.c_proj = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.c_fc(x)
    h = h * jax.nn.sigmoid(1.702 * h) if self.act == "quick_gelu" else \
        jax.nn.gelu(h, approximate=False)
    return self.c_proj(h)


class _Block(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.ln_1 = nnx.LayerNorm(cfg.width, epsilon=1e-5, rngs=rngs)
    self.attn = _Attention(cfg.width, cfg.heads, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(cfg.width, epsilon=1e-5, rngs=rngs)
    self.mlp = _MLP(cfg.width, cfg.act, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class _Transformer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.resblocks = nnx.List([_Block(cfg, rngs=rngs) for _ in range(cfg.layers)])


class CLIPVisionTransformer(nnx.Module):
  """CLIP ViT image tower; attribute paths mirror the ``visual.*`` state-dict keys.

  Call: ``model(x (N, S, S, 3) float32, CLIP-normalised, S = image_size) -> (N, embed_dim)``
  (not L2-normalised; :func:`nemjax.metrics.clip_embedder` normalises).
  """

  def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig(), *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    w, p = cfg.width, cfg.patch_size
    scale = w ** -0.5
    self.conv1 = nnx.Conv(3, w, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          rngs=rngs)
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)))
    self.positional_embedding = nnx.Param(
        scale * jax.random.normal(rngs.params(), (cfg.grid ** 2 + 1, w)))
    self.ln_pre = nnx.LayerNorm(w, epsilon=1e-5, rngs=rngs)
    self.transformer = _Transformer(cfg, rngs=rngs)
    self.ln_post = nnx.LayerNorm(w, epsilon=1e-5, rngs=rngs)
    self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (w, cfg.embed_dim)))

  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.config.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError(f"CLIPVisionTransformer: expected (N, {s}, {s}, 3) inputs, got {x.shape}")
    n = x.shape[0]
    t = self.conv1(x).reshape(n, -1, self.config.width)       # (N, g², W), row-major patches
    cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, self.config.width))
    t = jnp.concatenate([cls, t], axis=1) + self.positional_embedding[...]
    t = self.ln_pre(t)
    for block in self.transformer.resblocks:
      t = block(t)
    return self.ln_post(t[:, 0]) @ self.proj[...]


def preprocess(images: jax.Array, size: int) -> jax.Array:
  """CLIP's image transform: shorter side to ``size`` (bicubic), centre crop, normalise.

  Args:
    images: ``(N, H, W, 3)`` RGB, uint8 (0..255) or floating point in [0, 1] (decided by the
      dtype: any floating dtype is taken as [0, 1]).
    size: model input resolution.

  Returns:
    ``(N, size, size, 3)`` float32, ``(x - CLIP_MEAN) / CLIP_STD``.

  Differences from CLIP's PIL pipeline (``Resize(size, BICUBIC)``, ``CenterCrop``): the resize
  is ``jax.image.resize(..., "bicubic")`` (Keys cubic a = −0.5, antialiased when shrinking) on
  float pixels, clipped to [0, 1]. It equals ``torch.nn.functional.interpolate(mode="bicubic",
  antialias=True)`` (torchvision's tensor ``Resize``, a port of PIL's filter) to ~1e-6 (tested);
  PIL itself works on uint8 and rounds the resized image to 1/255 steps, so CLIP's own
  preprocessing differs by up to half a grey level per pixel. Images already ``size × size``
  are not resampled at all.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"preprocess: expected (N, H, W, 3) images, got {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"preprocess: images must be uint8 (0..255) or float in [0, 1], got "
                     f"dtype {images.dtype}")
  n, h, w, _ = x.shape
  if min(h, w) != size:  # torchvision Resize(size): shorter side -> size, int() of the longer
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = jnp.clip(jax.image.resize(x, (n, nh, nw, 3), method="bicubic"), 0.0, 1.0)  # as PIL
    h, w = nh, nw
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  x = x[:, top:top + size, left:left + size]
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)
  std = jnp.asarray(CLIP_STD, jnp.float32)
  return (x - mean) / std
