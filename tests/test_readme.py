"""Every command that README.md shows runs, as written, from a fresh copy of the project.

The copy holds what a clone would (git's tracked and not-ignored files) and no venv of its
own: ``NEMJAX_VENV`` points its bootstrap at the suite's venv, so nothing is installed, but the
scripts' own set-up path (``tools/bootstrap.py``, the extras they ask for) is what runs. The
README's placeholders are filled with small local inputs: ``PROBE_DIR`` a synthetic probe set,
``IN.pth`` a random-weight torchvision-layout ResNet18 state dict, ``CKPT_DIR`` its converted
checkpoint, ``OUT_DIR`` a new directory. The test command itself is run with ``--collect-only``
(running the suite inside the suite would recurse); everything else runs to completion,
the embedded-default experiments included (they share the copy's ``cache/``).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, import_torch

pytestmark = pytest.mark.slow


def readme_commands(text: str) -> list[str]:
  """The ``python ...`` lines of README.md's bash code blocks, comments stripped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith("python "):
        commands.append(line)
  return commands


def fresh_copy(dest: Path) -> Path:
  """Copies what ``git clone`` of the working tree would hold (tracked + not-ignored files)."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
  for rel in filter(None, listed):
    src = REPO / rel
    if src.is_file():
      (dest / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / rel)
  return dest


def test_readme_lists_the_two_setup_commands():
  commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
  assert commands[:2] == ["python experiments/pgd_sweep.py", "python run_tests.py"]


@pytest.fixture(scope="module")
def readme_inputs(tmp_path_factory):
  """Placeholders of the README's commands -> small local inputs."""
  torch = import_torch()
  import torch_models
  from nemjax.convert import convert_file
  from nemjax.data import synthetic
  root = tmp_path_factory.mktemp("readme")
  probe = synthetic.make_probe_set(root / "probe", num_images=6, seed=5)
  state_dict = root / "resnet18_places365.pth"
  torch.save(torch_models.randomize_(torch_models.build("resnet18", 365), seed=1).state_dict(),
             state_dict)
  ckpt = convert_file("resnet18", state_dict, root / "ckpt", num_classes=365)
  return {"PROBE_DIR": probe, "CKPT_DIR": ckpt, "IN.pth": state_dict}


def test_every_readme_command_runs_from_a_fresh_copy(tmp_path, readme_inputs):
  clone = fresh_copy(tmp_path / "clone")
  env = {**os.environ, "NEMJAX_VENV": sys.prefix}
  env.pop("XLA_FLAGS", None)
  commands = readme_commands((clone / "README.md").read_text(encoding="utf-8"))
  assert len(commands) >= 8, commands
  for i, command in enumerate(commands):
    args = shlex.split(command)
    args = [str(readme_inputs.get(a, a)) for a in args]
    args = [str(tmp_path / f"out{i}") if a == "OUT_DIR" else a for a in args]
    if args[1] == "run_tests.py":
      args += ["--collect-only", "-q"]
    args[0] = getattr(sys, "_base_executable", sys.executable)  # the Python outside the venv
    done = subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (f"README command failed: {command}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
