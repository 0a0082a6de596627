"""nemjax.models and nemjax.preprocess against PyTorch re-statements (tests/torch_models.py).

Parity: random torchvision-layout weights with non-trivial BatchNorm statistics, converted through
a ``.pth`` file, must reproduce PyTorch's logits and every layer's forward-hook output within 1e-4
relative (max|a - b| / max|b|).
"""
from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest  # noqa: E402  (tests/ is on sys.path)

torch = conftest.import_torch()

import torch_models as tm  # noqa: E402  (tests/ is on sys.path via rootdir conftest)
from nemjax import convert, models, preprocess  # noqa: E402
from nemjax.models import checkpoint  # noqa: E402
from nemjax.models import layers as L  # noqa: E402

torch.set_num_threads(2)
RTOL = 1e-4


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max|a - b| / max|b| (b is the PyTorch reference)."""
  denom = float(np.abs(b).max())
  return float(np.abs(a - b).max()) / (denom if denom > 0 else 1.0)


def nchw_to_nhwc(t: "torch.Tensor") -> np.ndarray:
  a = t.numpy()
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch (conversion through a .pth file)

# (arch, input size, batch, extra alias taps -> canonical module they must equal)
PARITY = [
  ("alexnet", 227, 2, {"conv1": "features.0", "conv5": "features.10", "fc7": "classifier.4"}),
  ("alexnet", 256, 1, {}),  # features end at 7x7: exercises the overlapping AdaptiveAvgPool(6, 6)
  ("vgg16", 224, 1, {"conv1_1": "features.0", "conv4_3": "features.21", "conv5_3": "features.28",
                     "relu5_3": "features.29", "pool5": "features.30", "fc6": "classifier.0"}),
  ("vgg19", 224, 1, {"conv3_4": "features.16", "conv4_4": "features.25", "conv5_4": "features.34",
                     "pool5": "features.36", "fc8": "classifier.6"}),
  ("resnet18", 224, 2, {}),
  ("resnet50", 224, 2, {}),
  ("smallcnn", 224, 2, {"block1": "features.2", "block2": "features.6", "block3": "features.10", "block4": "features.14"}),
]


@pytest.mark.parametrize("arch,size,batch,aliases", PARITY, ids=[f"{p[0]}-{p[1]}" for p in PARITY])
def test_parity_with_pytorch(arch, size, batch, aliases, tmp_path):
  torch.manual_seed(0)
  tmodel = tm.randomize_(tm.build(arch, num_classes=11), seed=1)
  pth = tmp_path / f"{arch}.pth"
  torch.save(tmodel.state_dict(), pth)
  model = convert.convert_state_dict(arch, convert.load_state_dict(pth))
  assert model.num_classes == 11
  pth.unlink()

  x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  canon = list(models.layer_names(arch))  # every canonical layer is a torch module here
  logits_t, acts_t = tm.forward_with_hooks(tmodel, torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(), canon)
  apply_fn, state = models.pure_apply(model, taps=tuple(canon) + tuple(aliases))
  logits_j, acts_j = jax.jit(apply_fn)(state, jnp.asarray(x))

  assert logits_j.shape == (batch, 11)
  assert rel_err(np.asarray(logits_j), logits_t.numpy()) < RTOL
  errs = {}
  for name in canon:
    ref = nchw_to_nhwc(acts_t[name])
    got = np.asarray(acts_j[name])
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    errs[name] = rel_err(got, ref)
  for alias, target in aliases.items():
    assert models.canonical_layer(arch, alias) == target
    np.testing.assert_array_equal(np.asarray(acts_j[alias]), np.asarray(acts_j[target]))
  bad = {k: v for k, v in errs.items() if v >= RTOL}
  assert not bad, f"layers off by more than {RTOL} relative: {bad}"
  del tmodel, model, state, acts_j, acts_t
  gc.collect()


# ---------------------------------------------------------------------------------------------
# Layer names, aliases, taps, upto, pure_apply


@pytest.fixture(scope="module")
def resnet18():
  return models.build("resnet18", num_classes=7, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def smallcnn():
  return models.build("smallcnn", num_classes=5, rngs=nnx.Rngs(1))


def test_layer_names_and_aliases():
  assert models.ARCHS == ("alexnet", "vgg16", "vgg19", "resnet18", "resnet50", "smallcnn")
  assert len(models.layer_names("vgg19")) == 37 + 1 + 7
  assert models.canonical_layer("vgg16", "conv5_3") == "features.28"
  assert models.canonical_layer("vgg16", "relu5_3") == "features.29"
  assert models.canonical_layer("vgg16", "conv1_2") == "features.2"
  assert models.canonical_layer("vgg16", "features.28") == "features.28"
  assert [models.canonical_layer("alexnet", f"conv{i}") for i in range(1, 6)] == [
    "features.0", "features.3", "features.6", "features.8", "features.10"]
  assert [models.canonical_layer("smallcnn", f"block{i}") for i in range(1, 5)] == [
    "features.2", "features.6", "features.10", "features.14"]
  r18 = models.layer_names("resnet18")
  assert r18[:5] == ("conv1", "bn1", "relu", "maxpool", "layer1.0.conv1")
  assert r18[-3:] == ("layer4", "avgpool", "fc")
  for name in ("layer1", "layer1.0", "layer2.0.downsample.0", "layer4.1.bn2"):
    assert name in r18
  # completion order: a block's internals come before the block, the block before its layer
  assert r18.index("layer1.0.bn2") < r18.index("layer1.0") < r18.index("layer1.1") < r18.index("layer1")
  r50 = models.layer_names("resnet50")
  assert "layer4.2.conv2" in r50 and "layer3.5" in r50 and "layer1.0.downsample.1" in r50
  assert len(models.layer_names("vgg16")) == 31 + 1 + 7
  assert models.last_layer("resnet18", ["layer3", "layer2.1.conv1", "bn1"]) == "layer3"
  assert models.last_layer("vgg16", ["conv5_3", "conv4_3"]) == "features.28"


def test_unknown_names_raise_listing_valid_ones():
  with pytest.raises(ValueError, match=r"unknown layer 'conv6_1'.*features\.28.*conv5_3->features\.28"):
    models.canonical_layer("vgg16", "conv6_1")
  with pytest.raises(ValueError, match="unknown architecture 'resnet34'.*resnet18"):
    models.layer_names("resnet34")
  with pytest.raises(ValueError, match="unknown architecture"):
    models.build("vit", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_classes"):
    models.build("smallcnn", 0, rngs=nnx.Rngs(0))


def test_smallcnn_block_sizes(smallcnn):
  x = jnp.zeros((1, 224, 224, 3))
  logits, acts = smallcnn(x, taps=("block1", "block2", "block3", "block4", "avgpool"))
  assert logits.shape == (1, 5)
  assert {k: v.shape for k, v in acts.items()} == {
    "block1": (1, 112, 112, 16), "block2": (1, 56, 56, 32), "block3": (1, 28, 28, 64),
    "block4": (1, 14, 14, 128), "avgpool": (1, 1, 1, 128)}


def test_upto_matches_full_forward(resnet18):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 3)), jnp.float32)
  taps = ("layer2", "layer3.0.conv2", "relu")
  logits, full = resnet18(x, taps=taps)
  assert logits is not None
  none, cut = resnet18(x, taps=taps, upto="layer3.0.conv2")
  assert none is None
  assert set(cut) == set(taps)
  for t in taps:
    np.testing.assert_array_equal(np.asarray(cut[t]), np.asarray(full[t]))
  _, last = resnet18(x, taps=("fc",), upto="fc")
  np.testing.assert_array_equal(np.asarray(last["fc"]), np.asarray(logits))


def test_bad_taps_raise(resnet18):
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match=r"unknown layer 'layer5'.*layer4"):
    resnet18(x, taps=("layer5",))
  with pytest.raises(ValueError, match="unknown layer 'layer9'"):
    resnet18(x, upto="layer9")
  with pytest.raises(ValueError, match="after upto"):
    resnet18(x, taps=("layer4",), upto="layer2")
  with pytest.raises(ValueError, match="not the string"):
    models.pure_apply(resnet18, taps="layer4")
  with pytest.raises(ValueError, match="unknown layer"):
    models.pure_apply(resnet18, taps=("nope",))


def test_bad_inputs_raise(smallcnn):
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    smallcnn(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="float"):
    smallcnn(jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="too small"):
    models.build("alexnet", 3, rngs=nnx.Rngs(0))(jnp.zeros((1, 20, 20, 3)))


def test_pure_apply_jits_once_and_differentiates(smallcnn):
  apply_fn, state = models.pure_apply(smallcnn, taps=("block3",), upto="block3")
  f = jax.jit(apply_fn)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  out1 = f(state, x)
  out2 = f(state, x + 1.0)
  assert out1[0] is None and out1[1]["block3"].shape == (2, 8, 8, smallcnn.features[8].out_channels)
  assert f._cache_size() == 1  # the second call did not recompile
  np.testing.assert_array_equal(np.asarray(out1[1]["block3"]), np.asarray(smallcnn(x, taps=("block3",))[1]["block3"]))
  g = jax.grad(lambda x: apply_fn(state, x)[1]["block3"][..., 0].sum())(x)
  assert g.shape == x.shape and bool(jnp.any(g != 0))
  del out2


# ---------------------------------------------------------------------------------------------
# Layers against torch.nn.functional


@pytest.mark.parametrize("h,w,out", [(7, 7, 6), (13, 9, 6), (5, 3, 6), (1, 1, 7), (14, 14, 7), (9, 8, 1)])
def test_adaptive_avg_pool_matches_torch(h, w, out):
  x = np.random.default_rng(h * 100 + w).standard_normal((2, h, w, 4)).astype(np.float32)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), (out, out))
  got = np.asarray(L.adaptive_avg_pool2d(jnp.asarray(x), (out, out)))
  np.testing.assert_allclose(got, nchw_to_nhwc(ref), rtol=1e-6, atol=1e-6)


def test_maxpool_pads_with_minus_inf():
  x = -1.0 - np.random.default_rng(0).random((1, 9, 9, 2)).astype(np.float32)  # all negative
  ref = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, 2, 1)
  got = np.asarray(L.MaxPool2d(3, 2, 1)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, nchw_to_nhwc(ref))
  assert got.max() < 0


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints


def _leaves(model):
  return dict(nnx.to_flat_state(nnx.state(model)))


def test_checkpoint_round_trip_is_bit_identical(smallcnn, tmp_path):
  out = checkpoint.save(smallcnn, tmp_path / "ck", arch="smallcnn", num_classes=5, extra_meta={"note": "t"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs left
  meta = checkpoint.read_metadata(out)
  assert meta["arch"] == "smallcnn" and meta["num_classes"] == 5 and meta["extra"] == {"note": "t"}
  assert meta["nemjax_version"]
  loaded = checkpoint.load(out, arch="smallcnn")
  a, b = _leaves(smallcnn), _leaves(loaded)
  assert a.keys() == b.keys()
  for k in a:
    assert type(a[k]) is type(b[k]), k
    assert np.array_equal(np.asarray(a[k][...]), np.asarray(b[k][...])), k
  x = jnp.ones((1, 32, 32, 3))
  np.testing.assert_array_equal(np.asarray(smallcnn(x)[0]), np.asarray(loaded(x)[0]))


def test_checkpoint_errors(smallcnn, tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    checkpoint.load(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a nemjax checkpoint"):
    checkpoint.load(tmp_path / "empty")
  out = checkpoint.save(smallcnn, tmp_path / "ck", arch="smallcnn", num_classes=5)
  with pytest.raises(ValueError, match="holds arch 'smallcnn', expected 'resnet18'"):
    checkpoint.load(out, arch="resnet18")
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoint.save(smallcnn, out, arch="smallcnn", num_classes=5)
  with pytest.raises(ValueError, match="model is 'smallcnn'"):
    checkpoint.save(smallcnn, tmp_path / "x", arch="resnet18", num_classes=5)
  assert not (tmp_path / "x").exists()
  checkpoint.save(smallcnn, out, arch="smallcnn", num_classes=5, overwrite=True)
  assert checkpoint.load(out).num_classes == 5


def test_checkpoint_failed_save_leaves_nothing(smallcnn, tmp_path, monkeypatch):
  class Exploding:
    def save(self, path, tree):
      os.makedirs(path)
      (path / "partial").write_text("half")
      raise OSError("disk full")

    def wait_until_finished(self):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

  monkeypatch.setattr(checkpoint, "_checkpointer", Exploding)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save(smallcnn, tmp_path / "ck", arch="smallcnn", num_classes=5)
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _netdissect_lite_reference(rgb_uint8: np.ndarray) -> np.ndarray:
  """NetDissect-Lite's normalize_image + feature_extraction division, step by step (NHWC out)."""
  img = np.array(rgb_uint8, dtype=np.float32)
  img = img[..., ::-1]
  img -= np.array([109.5388, 118.6897, 124.6901])  # float64 mean, in place on float32
  t = torch.from_numpy(np.ascontiguousarray(img[..., ::-1]))
  t.div_(255.0 * 0.224)
  return t.numpy()


def test_netdissect_normalize_is_exact():
  every = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), 0)[0]  # (256, 3): value v in each channel
  imgs = np.broadcast_to(every[None, :, None, :], (1, 256, 1, 3)).astype(np.uint8)
  rnd = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
  for u in (imgs, rnd):
    ref = _netdissect_lite_reference(u)
    np.testing.assert_array_equal(preprocess.netdissect_normalize(u), ref)
    np.testing.assert_array_equal(np.asarray(preprocess.netdissect_normalize(jnp.asarray(u))), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(preprocess.netdissect_normalize)(jnp.asarray(u))), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(preprocess.netdissect_normalize)(jnp.asarray(u, jnp.float32))), ref)
    assert preprocess.netdissect_normalize(u).dtype == np.float32
  x01 = np.random.default_rng(1).random((2, 4, 4, 3)).astype(np.float32)
  a = preprocess.from_unit_interval_netdissect(x01)
  b = np.asarray(jax.jit(preprocess.from_unit_interval_netdissect)(jnp.asarray(x01)))
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
  np.testing.assert_allclose(a, (x01 * 255 - np.array([124.6901, 118.6897, 109.5388])) / 57.12, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda z: preprocess.from_unit_interval_netdissect(z).sum())(jnp.asarray(x01))
  np.testing.assert_allclose(np.asarray(g), 255 / 57.12, rtol=1e-6)


def test_imagenet_normalize():
  x = np.random.default_rng(2).random((2, 3, 4, 3)).astype(np.float32)
  ref = ((torch.from_numpy(x) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).numpy()
  np.testing.assert_array_equal(preprocess.imagenet_normalize(x), ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(preprocess.imagenet_normalize)(jnp.asarray(x))), ref)


def test_preprocess_rejects_bad_shapes():
  with pytest.raises(ValueError, match="last axis of size 3"):
    preprocess.netdissect_normalize(np.zeros((1, 3, 4, 4), np.uint8))
  with pytest.raises(ValueError, match="last axis of size 3"):
    preprocess.imagenet_normalize(jnp.zeros((2, 2)))


def test_build_is_deterministic_in_the_key():
  a = models.build("smallcnn", 4, rngs=nnx.Rngs(0))
  b = models.build("smallcnn", 4, rngs=nnx.Rngs(0))
  c = models.build("smallcnn", 4, rngs=nnx.Rngs(1))
  ka, kb, kc = (np.asarray(m.features[4].kernel[...]) for m in (a, b, c))
  assert np.array_equal(ka, kb) and not np.array_equal(ka, kc)
  assert abs(ka.std() / np.sqrt(2 / (9 * ka.shape[-1])) - 1) < 0.1  # kaiming normal, fan_out
  assert np.all(np.asarray(a.features[5].var[...]) == 1) and np.all(np.asarray(a.fc.bias[...]) == 0)
  abstract = models.build_abstract("resnet50", 3)
  assert abstract.fc.kernel.shape == (2048, 3)
