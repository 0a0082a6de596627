"""nemjax.convert: file formats, key layouts, strict errors and the ``python -m nemjax.convert`` CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest  # noqa: E402  (tests/ is on sys.path)

torch = conftest.import_torch()

import torch_models as tm  # noqa: E402
from nemjax import convert, models  # noqa: E402
from nemjax.convert.__main__ import main as cli_main  # noqa: E402
from nemjax.models import checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def leaves(model: nnx.Module) -> dict:
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert np.array_equal(la[k], lb[k]), k


@pytest.fixture(scope="module")
def r18_sd() -> dict[str, np.ndarray]:
  """A torchvision-layout ResNet-18 (5 classes) state dict with random BN statistics."""
  torch.manual_seed(0)
  return {k: v.numpy().copy() for k, v in tm.randomize_(tm.build("resnet18", 5)).state_dict().items()}


@pytest.fixture(scope="module")
def r18_ref(r18_sd) -> nnx.Module:
  return convert.convert_state_dict("resnet18", r18_sd)


def test_convert_layout(r18_sd, r18_ref):
  assert r18_ref.num_classes == 5
  np.testing.assert_array_equal(np.asarray(r18_ref.conv1.kernel[...]), r18_sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(r18_ref.fc.kernel[...]), r18_sd["fc.weight"].T)
  np.testing.assert_array_equal(np.asarray(r18_ref.layer2[0].downsample[1].var[...]), r18_sd["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(np.asarray(r18_ref.layer4[1].bn2.mean[...]), r18_sd["layer4.1.bn2.running_mean"])
  assert set(convert.expected_keys("resnet18", 5)) == {k for k in r18_sd if not k.endswith("num_batches_tracked")}


def test_file_formats_agree(r18_sd, r18_ref, tmp_path):
  """.pth, Places365-style {'state_dict': module.*} .pth.tar, .npz and .safetensors give the same model."""
  from safetensors.numpy import save_file
  tensors = {k: torch.from_numpy(v) for k, v in r18_sd.items()}
  torch.save(tensors, tmp_path / "plain.pth")
  torch.save({"epoch": 90, "arch": "resnet18", "best_prec1": 54.7,
              "state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "places.pth.tar")
  np.savez(tmp_path / "w.npz", **{f"module.{k}": v for k, v in r18_sd.items()})
  save_file({k: np.ascontiguousarray(v) for k, v in r18_sd.items()}, str(tmp_path / "w.safetensors"))
  for name in ("plain.pth", "places.pth.tar", "w.npz", "w.safetensors"):
    model = convert.convert_state_dict("resnet18", convert.load_state_dict(tmp_path / name))
    assert_same_params(model, r18_ref)


@pytest.mark.parametrize("arch, last_conv, index", [("vgg16", "conv5_3", 28),
                                                     ("vgg19", "conv5_4", 34)])
def test_vgg_places365_named_layout(arch, last_conv, index):
  """features.convX_Y / classifier.fc6,fc7,fc8a (+ module. prefix) convert like torchvision keys."""
  rng = np.random.default_rng(0)
  shapes = convert.expected_keys(arch, 365)
  sd = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
  conv_idx = {v: a for a, v in models.layer_aliases(arch).items() if a.startswith("conv")}
  fc = {"classifier.0": "classifier.fc6", "classifier.3": "classifier.fc7", "classifier.6": "classifier.fc8a"}
  named = {}
  for k, v in sd.items():
    mod, leaf = k.rsplit(".", 1)
    mod = f"features.{conv_idx[mod]}" if mod in conv_idx else fc[mod]
    named[f"module.{mod}.{leaf}"] = v
  assert f"module.features.{last_conv}.weight" in named and "module.classifier.fc8a.bias" in named
  assert set(convert.normalize_keys(arch, named)) == set(sd)
  a = convert.convert_state_dict(arch, named)
  assert a.num_classes == 365
  np.testing.assert_array_equal(np.asarray(a.features[index].kernel[...]),
                                sd[f"features.{index}.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(a.classifier[6].kernel[...]), sd["classifier.6.weight"].T)
  del a, sd, named


def test_strict_errors_list_every_bad_key(r18_sd):
  sd = dict(r18_sd)
  del sd["layer1.0.bn1.running_var"]
  del sd["layer3.1.conv2.weight"]
  sd["foo.weight"] = np.zeros((2, 2), np.float32)
  sd["layer2.0.conv1.weight"] = np.zeros((128, 64, 5, 5), np.float32)
  with pytest.raises(ValueError) as info:
    convert.convert_state_dict("resnet18", sd)
  msg = str(info.value)
  assert "\n" not in msg
  for needle in ("2 missing", "layer1.0.bn1.running_var (64,)", "layer3.1.conv2.weight (256, 256, 3, 3)",
                 "1 unexpected", "foo.weight (2, 2)",
                 "1 mis-shaped", "layer2.0.conv1.weight: expected (128, 64, 3, 3), got (128, 64, 5, 5)"):
    assert needle in msg, (needle, msg)


def test_non_finite_weights_are_refused_by_name(r18_sd):
  sd = dict(r18_sd)
  w = np.array(sd["layer4.1.conv2.weight"], np.float32)
  w[0, 0, 0, :2] = [np.nan, np.inf]
  sd["layer4.1.conv2.weight"] = w
  sd["bn1.running_var"] = np.full_like(np.asarray(sd["bn1.running_var"]), np.inf)
  with pytest.raises(ValueError) as info:
    convert.convert_state_dict("resnet18", sd)
  msg = str(info.value)
  assert "2 holding NaN or inf" in msg and "\n" not in msg
  assert "layer4.1.conv2.weight: 1 NaN, 1 inf" in msg and "bn1.running_var: 0 NaN, 64 inf" in msg


def test_num_classes_mismatch_and_inference(r18_sd):
  with pytest.raises(ValueError, match=r"fc\.weight: expected \(365, 512\), got \(5, 512\)"):
    convert.convert_state_dict("resnet18", r18_sd, num_classes=365)
  assert convert.convert_state_dict("resnet18", r18_sd, num_classes=5).num_classes == 5


def test_wrong_arch_and_unknown_arch(r18_sd):
  with pytest.raises(ValueError, match=r"does not match resnet50.*is the architecture right\?"):
    convert.convert_state_dict("resnet50", r18_sd)
  with pytest.raises(ValueError, match="unknown architecture 'resnet101'"):
    convert.convert_state_dict("resnet101", r18_sd)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    convert.load_state_dict(tmp_path / "nope.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
  with pytest.raises(ValueError, match="cannot read .*junk.pth as a PyTorch state dict"):
    convert.load_state_dict(tmp_path / "junk.pth")
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(ValueError, match="holds a list, expected a state dict"):
    convert.load_state_dict(tmp_path / "list.pth")
  (tmp_path / "junk.npz").write_bytes(b"zzz")
  with pytest.raises(ValueError, match="as .npz"):
    convert.load_state_dict(tmp_path / "junk.npz")
  with pytest.raises(ValueError, match="got a directory"):
    convert.load_state_dict(tmp_path)


def test_cli_success_in_process(r18_sd, r18_ref, tmp_path, capsys):
  np.savez(tmp_path / "w.npz", **r18_sd)
  out = tmp_path / "ck"
  assert cli_main(["--arch", "resnet18", "--num-classes", "5", str(tmp_path / "w.npz"), str(out)]) == 0
  assert "wrote" in capsys.readouterr().out
  loaded = checkpoint.load(out, arch="resnet18")
  assert_same_params(loaded, r18_ref)
  assert checkpoint.read_metadata(out)["extra"]["converted_from"].endswith("w.npz")
  # existing OUT_DIR: refused, untouched
  assert cli_main(["--arch", "resnet18", str(tmp_path / "w.npz"), str(out)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert cli_main(["--arch", "resnet18", "--overwrite", str(tmp_path / "w.npz"), str(out)]) == 0


def test_cli_errors_leave_no_output(r18_sd, tmp_path, capsys):
  np.savez(tmp_path / "w.npz", **r18_sd)
  cases = [
    (["--arch", "resnet18", "--num-classes", "365", str(tmp_path / "w.npz")], "mis-shaped"),
    (["--arch", "resnet50", str(tmp_path / "w.npz")], "does not match resnet50"),
    (["--arch", "resnet18", str(tmp_path / "missing.pth")], "not found"),
  ]
  for args, needle in cases:
    out = tmp_path / "out" / "ck"
    assert cli_main([*args, str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nemjax.convert: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_cli_subprocess(tmp_path):
  """The real ``python -m nemjax.convert`` entry point: exit codes, one-line error, no traceback."""
  torch.manual_seed(0)
  torch.save(tm.build("smallcnn", 3).state_dict(), tmp_path / "s.pth")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run([sys.executable, "-m", "nemjax.convert", "--arch", "smallcnn", str(tmp_path / "s.pth"),
                       str(tmp_path / "ck")], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  model = checkpoint.load(tmp_path / "ck")
  assert model.num_classes == 3
  _ = model(jnp.zeros((1, 32, 32, 3)))
  bad = subprocess.run([sys.executable, "-m", "nemjax.convert", "--arch", "vgg16", str(tmp_path / "s.pth"),
                        str(tmp_path / "ck2")], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode == 1
  assert "Traceback" not in bad.stderr
  assert bad.stderr.startswith("nemjax.convert: error: state dict does not match vgg16")
  assert not (tmp_path / "ck2").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "s.pth"]


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / "w.pth").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match=r"needs PyTorch: pip install 'nemjax\[torch\]'"):
    convert.load_state_dict(tmp_path / "w.pth")
