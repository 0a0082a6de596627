"""Shared pytest configuration and fixtures."""
import os
import sys
from pathlib import Path

# Tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def import_torch():
  """``torch`` for the PyTorch parity tests.

  Under ``run_tests.py`` (which installs the ``torch`` extra and sets ``NEMJAX_REQUIRE_TORCH=1``)
  a missing torch is an error, so parity tests can never pass by being skipped; elsewhere
  (a bare ``pytest`` in an environment without torch) they are skipped.
  """
  if os.environ.get("NEMJAX_REQUIRE_TORCH") == "1":
    import torch  # pylint: disable=import-outside-toplevel
    return torch
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_probe_dir(tmp_path_factory) -> Path:
  """A 24-image synthetic Broden-format probe set (224 images, 112 label maps)."""
  from nemjax.data import synthetic
  return synthetic.make_probe_set(tmp_path_factory.mktemp("probe") / "probe", num_images=24, seed=3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
  """An orbax checkpoint of a random-weight SmallCNN with 4 classes."""
  from flax import nnx
  from nemjax.models import build, checkpoint
  model = build("smallcnn", num_classes=4, rngs=nnx.Rngs(7))
  out = tmp_path_factory.mktemp("ckpt") / "smallcnn"
  checkpoint.save(model, out, arch="smallcnn", num_classes=4)
  return out


@pytest.fixture(scope="session")
def heldout_probe_dir(tmp_path_factory) -> Path:
  """A second synthetic Broden-format set (another seed): held-out images as the embedded
  default has them."""
  from nemjax.data import synthetic
  return synthetic.make_probe_set(tmp_path_factory.mktemp("heldout") / "heldout", num_images=10,
                                  seed=11)


@pytest.fixture(scope="session")
def val_folder(heldout_probe_dir, tmp_path_factory) -> Path:
  """The held-out set as a class-per-subfolder tree (sorted names = the model's class order)."""
  from PIL import Image
  from nemjax.manipulate import data as mdata
  root = tmp_path_factory.mktemp("val") / "val"
  x, y, classes = mdata.probe_classification_arrays(heldout_probe_dir, normalize=None)
  for k, name in enumerate(classes):
    (root / f"{k}_{name}").mkdir(parents=True)
  for i, (img, k) in enumerate(zip(x, y)):
    Image.fromarray(img).save(root / f"{k}_{classes[k]}" / f"{i:03d}.png")
  return root
