"""Convert a torchvision-layout PyTorch state dict into a nemjax checkpoint.

``python experiments/convert.py --arch resnet18 --num-classes 365 IN.pth OUT_DIR``

Like the other scripts here it sets up the project venv on first use, with the ``torch`` extra
that reading ``.pth`` files needs; the flags are those of ``python -m nemjax.convert``
(``--help`` lists them).
"""
from __future__ import annotations

import _common

if __name__ == "__main__":
  _common.bootstrap(extras=("experiments", "torch"))
  from nemjax.convert.__main__ import main
  _common.run(lambda: main(prog="python experiments/convert.py"))
