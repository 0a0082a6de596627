"""Forward throughput (images/s) of the nemjax models vs the same PyTorch models, on CPU.

  .venv/bin/python benchmarks/forward.py [--archs alexnet,resnet18] [--out FILE.md] [--xla-flags "..."]

Runtime: about 2-4 minutes on 2 CPU cores. Both sides run the same architecture with the same
weights (the JAX model is converted from the PyTorch one), float32, batch-size-matched input
(alexnet at 227, the others at 224), logits only:

- JAX: ``jax.jit(pure_apply(model)[0])`` on NHWC input; compile and one warm-up call excluded;
  each call ends with ``block_until_ready``.
- PyTorch: ``torch.inference_mode()``, ``torch.set_num_threads(--threads)``, NCHW input, one warm-up,
  denormals flushed to zero (``torch.set_flush_denormal(True)``) as XLA:CPU does; random weights
  otherwise produce denormals that slow PyTorch down about 2x (``--torch-denormals`` to see it).

Each side is timed for at least ``--min-seconds`` and ``--min-reps`` calls, alternating between
the two call by call so that load from other processes hits both alike; the best (minimum) seconds
per call is reported, the statistic least disturbed by other processes on a shared machine. ``--xla-flags`` sets ``XLA_FLAGS`` before JAX is imported (to compare XLA CPU options).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _sidebyside as sbs  # benchmarks/ is on sys.path when a script in it runs

DEFAULT_BATCH = {"alexnet": 8, "vgg16": 2, "resnet18": 8, "resnet50": 4, "smallcnn": 8}
SIZE = {"alexnet": 227}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="alexnet,vgg16,resnet18,resnet50,smallcnn")
  p.add_argument("--batch", type=int, default=None, help="override every arch's batch size")
  p.add_argument("--torch-denormals", action="store_true",
                 help="leave PyTorch's denormal handling on (default: flush to zero, as XLA:CPU does)")
  sbs.add_common_args(p, min_seconds=3.0)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  sbs.set_up(args, flush_denormal=not args.torch_denormals)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import torch_models as tm  # the torchvision-layout PyTorch twins
  from nemjax import convert, models

  archs = [a.strip() for a in args.archs.split(",") if a.strip()]
  unknown = [a for a in archs if a not in models.ARCHS]
  if unknown:
    print(f"forward.py: error: unknown archs {unknown}; choose from {', '.join(models.ARCHS)}", file=sys.stderr)
    return 2

  rows = []
  for arch in archs:
    batch = args.batch or DEFAULT_BATCH[arch]
    size = SIZE.get(arch, 224)
    torch.manual_seed(0)
    tmodel = tm.randomize_(tm.build(arch, 1000))
    model = convert.convert_state_dict(arch, {k: v.numpy() for k, v in tmodel.state_dict().items()})
    apply_fn, state = models.pure_apply(model)
    fwd = jax.jit(lambda s, x: apply_fn(s, x)[0])
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    xj = jnp.asarray(x)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    t0 = time.perf_counter()
    fwd(state, xj).block_until_ready()  # compile + first run
    compile_s = time.perf_counter() - t0
    fwd(state, xj).block_until_ready()  # warm-up
    with torch.inference_mode():
      tmodel(xt)  # warm-up

    def jax_call():
      fwd(state, xj).block_until_ready()

    def torch_call():
      with torch.inference_mode():
        tmodel(xt)

    best = sbs.interleaved_best({"jax": sbs.timed(jax_call), "torch": sbs.timed(torch_call)},
                                args.min_reps, args.min_seconds)
    jax_s, torch_s = best["jax"], best["torch"]
    rows.append((arch, size, batch, batch / jax_s, batch / torch_s, torch_s / jax_s, compile_s))
    print(f"{arch}: jax {batch / jax_s:.1f} img/s, torch {batch / torch_s:.1f} img/s", file=sys.stderr, flush=True)

  header = [
    f"Forward throughput on CPU ({os.cpu_count()} cores visible; torch threads {args.threads}; "
    f"torch flush-denormal {not args.torch_denormals}; jax {jax.__version__}, torch {torch.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'})",
    "",
    "| arch | input | batch | JAX img/s | PyTorch img/s | JAX/PyTorch | JAX compile s |",
    "|---|---|---|---|---|---|---|",
  ]
  lines = header + [f"| {a} | {s}x{s} | {b} | {j:.1f} | {t:.1f} | {r:.2f} | {c:.1f} |" for a, s, b, j, t, r, c in rows]
  sbs.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
