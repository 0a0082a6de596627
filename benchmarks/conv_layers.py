"""Each convolution of a model alone, XLA:CPU against PyTorch: forward and input gradient.

  .venv/bin/python benchmarks/conv_layers.py [--arch resnet18] [--size 224] [--batch 4]
      [--xla-flags=--xla_cpu_experimental_ynn_fusion_type=] [--out FILE.md]

Runtime: about 1 minute for ResNet18 at batch 4 on 2 CPU cores. The convolutions and their
input shapes are those of the PyTorch twin (``tests/torch_models.py``, forward hooks on every
``nn.Conv2d``), with the same random weights on both sides. JAX: ``lax.conv_general_dilated``
in NHWC/HWIO, and the input gradient through ``ops.fastgrad.cpu_fast_grad`` (what nemjax's
attributions and attacks run); PyTorch: ``F.conv2d`` and ``aten.convolution_backward`` with only
the input gradient asked for, NCHW (what Captum runs). Timing: ``_sidebyside.interleaved_best``.
Identical layers are timed once and counted as often as they occur. The totals are the
convolution part of one saliency call, which shows where a whole-model gap comes from.
"""
from __future__ import annotations

import argparse
import sys

import _sidebyside as sbs  # benchmarks/ is on sys.path when a script in it runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="resnet18",
                 choices=["alexnet", "vgg16", "vgg19", "resnet18", "resnet50", "smallcnn"])
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=4)
  sbs.add_common_args(p, min_seconds=0.3)
  return p.parse_args(argv)


def conv_shapes(tmodel, size: int, batch: int) -> list[tuple]:
  """[(name, (N, C, H, W) input shape, conv module)] of every Conv2d, in call order."""
  import torch  # pylint: disable=import-outside-toplevel
  found, hooks = [], []
  for name, m in tmodel.named_modules():
    if isinstance(m, torch.nn.Conv2d):
      hooks.append(m.register_forward_hook(
          lambda mod, inp, out, name=name: found.append((name, tuple(inp[0].shape), mod))))
  with torch.no_grad():
    tmodel(torch.zeros(batch, 3, size, size))
  for h in hooks:
    h.remove()
  return found


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  sbs.set_up(args)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from jax import lax

  import torch_models as tm
  from nemjax.ops import fastgrad

  torch.manual_seed(0)
  tmodel = tm.build(args.arch, 10)
  groups: dict[tuple, tuple] = {}     # layer configuration -> (a module of it, layer names)
  for name, shape, mod in conv_shapes(tmodel, args.size, args.batch):
    key = (shape, tuple(mod.weight.shape), mod.stride, mod.padding, mod.groups)
    groups.setdefault(key, (mod, []))[1].append(name)
  rng = np.random.default_rng(0)
  rows, tot = [], {"jf": 0.0, "tf": 0.0, "jb": 0.0, "tb": 0.0}
  for (shape, _, stride, padding, groups_), (mod, names) in groups.items():
    if groups_ != 1:
      continue
    pad = tuple((p, p) for p in padding)
    x = rng.standard_normal(shape).astype(np.float32)
    w = mod.weight.detach().numpy()
    xj, wj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0))

    def conv(z, k, stride=stride, pad=pad):
      return lax.conv_general_dilated(z, k, stride, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    gj = jnp.asarray(rng.standard_normal(fwd(xj, wj).shape).astype(np.float32))
    fast = fastgrad.cpu_fast_grad(conv)
    bwd = jax.jit(lambda g, k, fast=fast, xj=xj: jax.vjp(lambda z: fast(z, k), xj)[1](g)[0])
    bwd(gj, wj).block_until_ready()
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    gt = torch.from_numpy(np.ascontiguousarray(np.asarray(gj).transpose(0, 3, 1, 2)))

    def t_fwd(xt=xt, wt=wt, stride=stride, padding=padding):
      with torch.no_grad():
        torch.nn.functional.conv2d(xt, wt, None, stride, padding)

    def t_bwd(gt=gt, xt=xt, wt=wt, stride=stride, padding=padding):
      torch.ops.aten.convolution_backward(gt, xt, wt, None, list(stride), list(padding), [1, 1],
                                          False, [0, 0], 1, [True, False, False])

    best = sbs.interleaved_best({
        "jf": sbs.timed(lambda fwd=fwd, xj=xj, wj=wj: fwd(xj, wj).block_until_ready()),
        "tf": sbs.timed(t_fwd),
        "jb": sbs.timed(lambda bwd=bwd, gj=gj, wj=wj: bwd(gj, wj).block_until_ready()),
        "tb": sbs.timed(t_bwd)}, args.min_reps, args.min_seconds)
    for k in tot:
      tot[k] += best[k] * len(names)
    _, c, h, wd = shape
    kh, kw = w.shape[2:]
    desc = f"{kh}×{kw}/{stride[0]} {c}→{w.shape[0]} at {h}×{wd}"
    rows.append((desc, len(names), best))
    print(f"{desc} ×{len(names)}: XLA {best['jf'] * 1e3:.2f} / {best['jb'] * 1e3:.2f} ms, "
          f"PyTorch {best['tf'] * 1e3:.2f} / {best['tb'] * 1e3:.2f} ms", file=sys.stderr, flush=True)

  ms = lambda v: f"{v * 1e3:.2f}"
  lines = [f"Convolutions of {args.arch} one at a time, {args.size}², batch {args.batch}, CPU "
           f"(XLA_FLAGS={args.xla_flags or ''}; torch threads {args.threads}); ms, best of "
           f"settled turns", "",
           "| convolution | count | XLA forward | PyTorch forward | XLA / PyTorch | XLA input grad "
           "| PyTorch input grad | XLA / PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for desc, count, b in rows:
    lines.append(f"| {desc} | {count} | {ms(b['jf'])} | {ms(b['tf'])} | {b['jf'] / b['tf']:.2f} | "
                 f"{ms(b['jb'])} | {ms(b['tb'])} | {b['jb'] / b['tb']:.2f} |")
  lines.append(f"| **all, × count** | | {ms(tot['jf'])} | {ms(tot['tf'])} | "
               f"{tot['jf'] / tot['tf']:.2f} | {ms(tot['jb'])} | {ms(tot['tb'])} | "
               f"{tot['jb'] / tot['tb']:.2f} |")
  sbs.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
