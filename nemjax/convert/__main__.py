"""``python -m nemjax.convert --arch ARCH [--num-classes N] [--overwrite] IN OUT_DIR``.

Converts a torchvision-layout PyTorch state dict (``.pth`` / ``.pth.tar`` / ``.npz`` /
``.safetensors``) into a nemjax orbax checkpoint directory. Errors are printed as one line on
stderr with exit status 1; OUT_DIR is only created once complete.
"""
from __future__ import annotations

import argparse
import sys

from nemjax.models.registry import ARCHS


def main(argv: list[str] | None = None, prog: str = "python -m nemjax.convert") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--arch", required=True, choices=ARCHS, help="architecture of the state dict")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="number of output classes (checked against the file; inferred if omitted)")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
  parser.add_argument("input", metavar="IN", help="state dict file")
  parser.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to create")
  args = parser.parse_args(argv)
  from nemjax.convert import convert_file
  try:
    out = convert_file(args.arch, args.input, args.out_dir, num_classes=args.num_classes, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError, OSError) as e:
    msg = " ".join(str(e).split())  # one line
    print(f"nemjax.convert: error: {msg}", file=sys.stderr)
    return 1
  from nemjax.models import checkpoint
  meta = checkpoint.read_metadata(out)
  print(f"wrote {out} ({meta['arch']}, {meta['num_classes']} classes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
