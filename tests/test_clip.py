"""CLIP image tower (nemjax.models.clip_vit) against a PyTorch re-statement of OpenAI's
VisionTransformer, the strict converter (nemjax.convert.clip) and the --embedder path."""
import collections
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from conftest import REPO  # noqa: E402
from nemjax import metrics  # noqa: E402
from nemjax.convert import clip as cclip  # noqa: E402
from nemjax.models import clip_vit  # noqa: E402

TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=1, embed_dim=16)  # heads = 64 // 64


# ------------------------------------------------------------- PyTorch re-statement of CLIP's ViT
class _QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
  def __init__(self, w, h, act):
    super().__init__()
    self.ln_1 = nn.LayerNorm(w)
    self.attn = nn.MultiheadAttention(w, h)
    self.ln_2 = nn.LayerNorm(w)
    self.mlp = nn.Sequential(collections.OrderedDict([
        ("c_fc", nn.Linear(w, 4 * w)), ("gelu", act()), ("c_proj", nn.Linear(4 * w, w))]))

  def forward(self, x):  # (L, N, W)
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
  def __init__(self, w, layers, h, act):
    super().__init__()
    self.resblocks = nn.Sequential(*[_Block(w, h, act) for _ in range(layers)])


class _Visual(nn.Module):
  def __init__(self, image_size, patch_size, width, layers, heads, embed_dim, act=_QuickGELU):
    super().__init__()
    g = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
    self.positional_embedding = nn.Parameter(torch.randn(g * g + 1, width) * width ** -0.5)
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = _Transformer(width, layers, heads, act)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

  def forward(self, x):  # (N, 3, S, S), CLIP-normalised
    x = self.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
    x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0]) @ self.proj


class _CLIP(nn.Module):
  """Image tower + one text-tower tensor (ignored by the converter)."""

  def __init__(self, act=_QuickGELU, **cfg):
    super().__init__()
    self.visual = _Visual(**cfg, act=act)
    self.token_embedding = nn.Embedding(10, 8)

  def forward(self, x):
    return self.visual(x)


def _torch_clip(seed=0, act=_QuickGELU, **cfg):
  torch.manual_seed(seed)
  m = _CLIP(act=act, **cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorm and bias values
    for name, p in m.named_parameters():
      if name.endswith("bias") or ".ln_" in name or "ln_p" in name:
        p.add_(0.1 * torch.randn_like(p))
  return m


def _torch_embed(m, images01):
  """(N, S, S, 3) float [0, 1] at the model's size -> (N, D) L2-normalised, float64."""
  mean = torch.tensor(clip_vit.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(clip_vit.CLIP_STD).view(1, 3, 1, 1)
  x = (torch.from_numpy(np.asarray(images01, np.float32)).permute(0, 3, 1, 2) - mean) / std
  with torch.no_grad():
    e = m(x).double().numpy()
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _max_rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _images(n, size, seed=1):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------- parity
def test_tiny_parity_through_a_saved_state_dict(tmp_path):
  m = _torch_clip(**TINY)
  path = tmp_path / "clip.pt"
  torch.save(m.state_dict(), path)
  emb = metrics.load_embedder(f"clip:{path}")
  assert "CLIP ViT" in emb.description
  x8 = _images(3, 32)
  ref = _torch_embed(m, x8 / 255.0)
  got8 = emb(x8)                                    # uint8 0..255
  got01 = emb((x8 / 255.0).astype(np.float32))      # float [0, 1]
  assert got8.shape == (3, 16) and got8.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got8, axis=1), 1.0, rtol=1e-6)
  assert _max_rel(got8, ref) < 1e-4 and _max_rel(got01, ref) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "jit"])
def test_other_file_formats_and_gelu(tmp_path, fmt):
  cfg = dict(TINY, heads=2, width=128, layers=1)  # heads = 128 // 64
  act = nn.GELU if fmt == "safetensors" else _QuickGELU
  m = _torch_clip(seed=3, act=act, **cfg)
  x8 = _images(2, 32, seed=4)
  if fmt == "safetensors":
    from safetensors.torch import save_file
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    spec = f"clip-gelu:{path}"
  else:  # an OpenAI-style TorchScript archive (clip.load's ViT-B-32.pt)
    path = tmp_path / "clip_jit.pt"
    mean = torch.zeros(1, 3, 32, 32)
    torch.jit.save(torch.jit.trace(m, mean), str(path))
    spec = f"clip:{path}"
  emb = metrics.load_embedder(spec)
  assert _max_rel(emb(x8), _torch_embed(m, x8 / 255.0)) < 1e-4


def test_vit_b32_full_size_parity():
  t0 = time.time()
  m = _torch_clip(seed=5, image_size=224, patch_size=32, width=768, layers=12, heads=12,
                  embed_dim=512)
  model = cclip.convert_clip_state_dict({k: v.numpy() for k, v in m.state_dict().items()})
  assert model.config == clip_vit.CLIPVisionConfig()  # ViT-B/32 read from the shapes
  x8 = _images(2, 224, seed=6)
  got = metrics.clip_embedder(model)(x8)
  err = _max_rel(got, _torch_embed(m, x8 / 255.0))
  print(f"ViT-B/32 parity: max relative error {err:.2e} ({time.time() - t0:.1f} s)")
  assert err < 1e-4


# ------------------------------------------------------------------------------- preprocessing
def test_preprocess_resizes_shorter_side_and_centre_crops():
  import jax.numpy as jnp
  rng = np.random.default_rng(7)
  wide = rng.uniform(size=(2, 20, 30, 3)).astype(np.float32)
  out = np.asarray(clip_vit.preprocess(jnp.asarray(wide), 10))
  assert out.shape == (2, 10, 10, 3)
  # same size: no resampling, only the normalisation; uint8 and [0, 1] floats agree
  x8 = _images(1, 16)
  a = np.asarray(clip_vit.preprocess(jnp.asarray(x8), 16))
  b = np.asarray(clip_vit.preprocess(jnp.asarray(x8 / 255.0), 16))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a[0, 3, 5], (x8[0, 3, 5] / 255.0 - clip_vit.CLIP_MEAN)
                             / clip_vit.CLIP_STD, rtol=1e-5)
  # a 2x larger copy of a smooth image is embedded almost like the original
  big = np.repeat(np.repeat(wide[:, :, :20], 2, axis=1), 2, axis=2)   # (2, 40, 40, 3)
  np.testing.assert_allclose(np.asarray(clip_vit.preprocess(jnp.asarray(big), 20)),
                             np.asarray(clip_vit.preprocess(jnp.asarray(wide[:, :, :20]), 20)),
                             atol=1.5)
  with pytest.raises(ValueError, match="uint8"):
    clip_vit.preprocess(jnp.zeros((1, 8, 8, 3), jnp.int32), 8)


@pytest.mark.parametrize("hw,size", [((64, 80), 32), ((20, 30), 32), ((375, 500), 224)])
def test_preprocess_equals_torch_antialiased_bicubic(hw, size):
  # torchvision's tensor Resize(antialias=True): PIL's bicubic filter without uint8 rounding
  import jax.numpy as jnp
  x = np.random.default_rng(8).uniform(size=(1, *hw, 3)).astype(np.float32)
  h, w = hw
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  t = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(nh, nw),
                                      mode="bicubic", antialias=True, align_corners=False)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  t = t.clamp(0, 1)[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1).numpy()
  ref = (t - np.asarray(clip_vit.CLIP_MEAN)) / np.asarray(clip_vit.CLIP_STD)
  got = np.asarray(clip_vit.preprocess(jnp.asarray(x), size))
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_embedder_refuses_bad_images():
  sd = {k: v.numpy() for k, v in _torch_clip(**TINY).state_dict().items()}
  emb = metrics.clip_embedder(cclip.convert_clip_state_dict(sd))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    emb(np.full((1, 32, 32, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="uint8"):
    emb(np.zeros((1, 32, 32, 3), np.int64))
  with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
    emb(np.zeros((32, 32, 3), np.uint8))


# ------------------------------------------------------------------------------ strict converter
def test_converter_lists_every_problem_in_one_error():
  sd = {k: v.numpy().copy() for k, v in _torch_clip(**TINY).state_dict().items()}
  assert "token_embedding.weight" in sd  # text tower: ignored
  del sd["visual.ln_post.bias"]
  sd["visual.transformer.resblocks.0.extra"] = np.zeros(3, np.float32)
  sd["visual.transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros(7, np.float32)
  sd["visual.transformer.resblocks.0.attn.out_proj.weight"][0, 0] = np.nan
  with pytest.raises(ValueError) as info:
    cclip.convert_clip_state_dict(sd)
  msg = str(info.value)
  for part in ("1 missing [visual.ln_post.bias", "unexpected [visual.transformer.resblocks.0.extra",
               "mis-shaped [visual.transformer.resblocks.1.mlp.c_fc.bias: expected (256,), got (7,)",
               "NaN or inf [visual.transformer.resblocks.0.attn.out_proj.weight: 1 NaN"):
    assert part in msg, (part, msg)
  with pytest.raises(ValueError, match="not a CLIP ViT"):
    cclip.convert_clip_state_dict({"visual.layer1.0.conv1.weight": np.zeros((2, 2, 1, 1))})


def test_load_embedder_specs(tmp_path):
  sentinel = object()
  assert metrics.load_embedder("model", sentinel) is sentinel
  assert metrics.load_embedder("model") is None
  with pytest.raises(ValueError, match="'model', 'clip:PATH'"):
    metrics.load_embedder("openclip:ViT-B-32")
  with pytest.raises(FileNotFoundError, match="no CLIP state dict"):
    metrics.load_embedder(f"clip:{tmp_path / 'missing.pt'}")
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="cannot read"):
    metrics.load_embedder(f"clip:{bad}")


# ----------------------------------------------------------------------------------- end to end
def test_embedder_reaches_clip_metrics_of_the_experiment(tiny_probe_dir, tiny_model_dir, val_folder,
                                                         tmp_path):
  from nemjax.manipulate import experiment as X
  from nemjax.manipulate import inputs as minputs
  m = _torch_clip(seed=8, **TINY)
  path = tmp_path / "clip.pt"
  torch.save(m.state_dict(), path)
  from nemjax.manipulate.config import ManipulateConfig
  cfg = ManipulateConfig(attack="push-down", layers=("block4",), k=4, overlap_k=2,
                           eval_batch_size=24)
  inputs, _ = minputs.load_inputs(cfg, probe_dir=tiny_probe_dir, weights=tiny_model_dir,
                                  val_folder=val_folder)
  inputs.embedder = metrics.load_embedder(f"clip:{path}")
  evaluate = X.make_evaluator(inputs.model, inputs.normalize, ["features.14"], cfg.embed_layer, 24)
  from flax import nnx
  ref = X.make_reference(cfg, inputs, evaluate, nnx.state(inputs.model), log=lambda s: None)
  images = np.asarray(ref.images)
  assert images.dtype == np.uint8 and ref.embeddings.shape == (images.shape[0], 16)
  assert images.shape[1] != 32  # the probe images are resized to the CLIP input inside
  np.testing.assert_allclose(ref.embeddings, inputs.embedder(images), rtol=1e-6, atol=1e-6)
  rows, _, _ = X.attack_metrics(cfg, ref, ref.before, ref.accuracy)  # "after" = unchanged model
  t0 = ref.topk["features.14"]
  att = ref.attacked["features.14"]
  e = inputs.embedder(images)
  want = metrics.clip_delta(e[t0], e[t0])
  assert rows[0]["clip_delta"] == pytest.approx(float(np.nanmean(np.asarray(want)[att])),
                                                rel=1e-4)
  assert np.isfinite(rows[0]["clip_w"])
  assert "CLIP ViT" in X.embedder_description(inputs, cfg)


@pytest.mark.parametrize("script", ["manipulate.py", "prune_defence.py"])
def test_bad_embedder_flag_fails_before_work(tiny_probe_dir, tiny_model_dir, val_folder, tmp_path,
                                            script):
  for spec, message in (("clip:" + str(tmp_path / "none.pt"), "no CLIP state dict file"),
                        ("clap:x", "must be 'model', 'clip:PATH'")):
    cmd = [sys.executable, str(REPO / "experiments" / script), "--probe", str(tiny_probe_dir),
           "--weights", str(tiny_model_dir), "--val-folder", str(val_folder),
           "--out", str(tmp_path / "o"), "--no-progress", "--embedder", spec]
    if script == "manipulate.py":
      cmd += ["--layers", "block4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "--embedder" in lines[-1] and message in lines[-1], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()
