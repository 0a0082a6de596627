"""Attribution maps of any method for a probe set or an image folder and a model.

    python experiments/attribute.py --method integrated_gradients --opt n_steps=32
    python experiments/attribute.py --method grad_cam --layer block4 --images DIR \\
        --weights CKPT

With no --probe/--images/--weights: the embedded default (its probe images and SmallCNN, cached
in cache/embedded). Every nemjax.explain method is available under Captum 0.9's names and
defaults; --opt KEY=VALUE passes an option (a Python literal, e.g. n_samples=8,
baselines=0.0). Writes OUT/maps.npy ((n, H, W) input maps, (n, h, w) at a layer), targets.npy,
images.txt, grid.png (image / map pairs) and summary.json.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

import _common

_common.bootstrap()

from nemjax.attribution import AttributeConfig  # noqa: E402  (after the venv bootstrap)

D = AttributeConfig


def build_parser() -> argparse.ArgumentParser:
  """The flags; every default comes from :class:`nemjax.attribution.AttributeConfig`."""
  from nemjax import explain  # pylint: disable=import-outside-toplevel
  p = _common.ArgumentParser(description=__doc__)
  p.add_argument("--method", default=D.method, help=f"attribution method, one of "
                                                   f"{sorted(explain.METHODS)}")
  p.add_argument("--layer", help="layer of layer methods (grad_cam, grad_cam_heo, lrp_layer, "
                                 "guided_grad_cam)")
  p.add_argument("--target", default=D.target,
                 help="class explained: 'pred' (each image's prediction) or a class index")
  p.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE",
                 help="method options as Python literals, e.g. n_steps=32")
  p.add_argument("--probe", type=Path, help="Broden-format probe directory (default: embedded)")
  p.add_argument("--images", type=Path, help="a folder of images instead of a probe set")
  p.add_argument("--weights", type=Path, help="orbax model checkpoint (default: embedded)")
  p.add_argument("--image-size", type=int, default=224,
                 help="--images: side the images are resized to")
  p.add_argument("--arch", help="architecture check against the checkpoint's metadata")
  p.add_argument("--num-images", type=int, default=D.num_images,
                 help="images attributed (the first ones, sorted)")
  p.add_argument("--grid-images", type=int, default=D.grid_images,
                 help="image / map pairs shown in grid.png")
  p.add_argument("--batch-size", type=int, default=D.batch_size, help="images per batch")
  p.add_argument("--normalize", default=D.normalize,
                 help="input normalisation the model expects: netdissect or imagenet")
  _common.add_run_flags(p, "runs/attribute", "output directory")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def parse_opts(items: list[str]) -> dict:
  """``KEY=VALUE`` items as a dict of Python literals; ValueError naming --opt."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
      raise ValueError(f"--opt: expected KEY=VALUE, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise ValueError(f"--opt: {key}'s value {value!r} is not a Python literal") from None
  return out


def make_config(args: argparse.Namespace, argv=None) -> AttributeConfig:
  """The flags as a config (and the model flags checked); ValueError naming the flag."""
  if args.images is not None and args.probe is not None:
    raise ValueError("--images: give --images or --probe, not both")
  if args.images is not None and not args.images.is_dir():
    raise ValueError(f"--images: directory not found: {args.images}")
  if args.images is not None and args.weights is None:
    raise ValueError("--images: needs --weights (the embedded default has its own images)")
  _common.refuse_inapplicable(argv, [
      ("--cache", args.weights is None, _common.EMBEDDED_ONLY)])
  if args.image_size < 1:
    raise ValueError(f"--image-size: must be >= 1, got {args.image_size}")
  if args.images is None:
    target = _common.resolve_target(args, default_layers=(), layer_flag="--layer")
  else:
    target = _resolve_images(args)
  layer = target.layers[0] if target.layers else None
  return AttributeConfig(method=args.method, layer=layer, target=args.target,
                         options=parse_opts(args.opt), num_images=args.num_images,
                         grid_images=args.grid_images, batch_size=args.batch_size,
                         normalize=args.normalize, seed=args.seed)


def _resolve_images(args) -> "_common.Target":
  """--images with --weights: the checkpoint's architecture and --layer checked."""
  from nemjax.models import checkpoint, registry  # pylint: disable=import-outside-toplevel
  if not args.weights.exists():
    raise ValueError(f"--weights: checkpoint directory not found: {args.weights}")
  try:
    arch = checkpoint.read_metadata(args.weights)["arch"]
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise ValueError(f"--weights {args.weights}: {e}") from None
  if args.arch is not None and args.arch != arch:
    raise ValueError(f"--arch {args.arch} but the checkpoint --weights holds {arch}")
  if args.layer is not None:
    try:
      registry.canonical_layer(arch, args.layer)
    except ValueError as e:
      raise ValueError(f"--layer: {e}") from None
  return _common.Target(False, args.images, args.weights, arch,
                        () if args.layer is None else (args.layer,))


def main(argv=None) -> None:
  args = parse_args(argv)
  config = _common.make_config(lambda: make_config(args, argv))
  _common.check_output(args.out)
  from nemjax.attribution import run_attribution  # pylint: disable=import-outside-toplevel
  from nemjax.manipulate import data as mdata  # pylint: disable=import-outside-toplevel
  from nemjax.manipulate.inputs import _normalizer as normalizer  # pylint: disable=import-outside-toplevel,protected-access
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  progress = not args.no_progress
  with _common.locked_output(args.out):
    try:
      if args.weights is None:
        from nemjax.embedded import build_embedded_default  # pylint: disable=import-outside-toplevel
        default = build_embedded_default(args.cache, seed=args.seed, progress=progress)
        probe_dir, weights = default.probe_dir, default.checkpoint_dir
      else:
        probe_dir, weights = args.probe, args.weights
      model = checkpoint.load(weights)
      if args.images is not None:
        paths = mdata.list_images(args.images)[:config.num_images]
        images = mdata.load_image_files(paths, args.image_size)
        names = [str(p) for p in paths]
      else:
        import numpy as np  # pylint: disable=import-outside-toplevel
        from nemjax.data import broden, loader  # pylint: disable=import-outside-toplevel
        probe = broden.load_probe(probe_dir)
        rows = np.arange(min(config.num_images or probe.num_images, probe.num_images))
        images = loader.load_images(probe, rows)
        names = [probe.image_paths[i] for i in rows]
      run_attribution(config, model, normalizer(config.normalize), images, args.out,
                      names=names)
    except (ValueError, FileNotFoundError) as e:
      _common.fail(str(e))


if __name__ == "__main__":
  _common.run(main)
