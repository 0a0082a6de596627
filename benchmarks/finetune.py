"""Fine-tuning train-step throughput (images/s): nemjax's jitted step vs the same step in PyTorch.

    .venv/bin/python benchmarks/finetune.py [--archs alexnet,resnet18,smallcnn] [--out FILE.md]

Runtime: about 3 minutes on 2 CPU cores. One step of the push-down manipulation attack
(Nanfack et al. 2024), on both sides from the same weights (the JAX model is converted from
the PyTorch one) and the same batch:

  loss = α · Σ_{n,j} m[n,j] · ‖f^{(l,j)}(x_n)‖² + (1 − α) · CE(softmax(teacher(x)), student(x))

then one Adam update (lr 1e-5) of every trainable parameter; BatchNorm in inference mode.

- JAX: :func:`nemjax.manipulate.make_train_step` (one ``jax.jit`` with the train state donated)
  over ``models.pure_apply(model, taps=(layer,))``.
- PyTorch: the paper's formulation — a forward hook on the attacked module, the frozen teacher
  under ``torch.no_grad()``, ``loss.backward()``, ``torch.optim.Adam.step()``;
  ``torch.set_num_threads(--threads)``, denormals flushed to zero as XLA:CPU does.

Calls alternate between the two sides so that other load on the machine hits both alike; the best
(minimum) seconds per step are reported. As a correctness check, the losses of the first
``--check-steps`` steps from the same start are compared (relative difference).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import _sidebyside as sbs  # benchmarks/ is on sys.path when a script in it runs

# arch -> (input size, batch, attacked layer: torchvision module name)
SETUPS = {
    "alexnet": (227, 16, "features.11"),   # conv5 after its ReLU, the papers' AlexNet layer
    "resnet18": (224, 16, "layer4"),
    "smallcnn": (224, 16, "features.14"),  # block4 (the embedded default's attacked layer)
}
ALPHA = 0.5
LR = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default=",".join(SETUPS))
  p.add_argument("--batch", type=int, default=None, help="override every arch's batch size")
  p.add_argument("--check-steps", type=int, default=3)
  sbs.add_common_args(p, min_seconds=4.0)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  sbs.set_up(args)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import torch.nn.functional as F

  import torch_models as tm  # the torchvision-layout PyTorch twins
  from nemjax import convert, manipulate, models

  archs = [a.strip() for a in args.archs.split(",") if a.strip()]
  unknown = [a for a in archs if a not in SETUPS]
  if unknown:
    print(f"finetune.py: error: unknown archs {unknown}; choose from {list(SETUPS)}",
          file=sys.stderr)
    return 2

  rows = []
  for arch in archs:
    size, batch, layer = SETUPS[arch]
    batch = args.batch or batch
    num_classes = 10 if arch == "smallcnn" else 1000
    torch.manual_seed(0)
    student = tm.randomize_(tm.build(arch, num_classes))
    model = convert.convert_state_dict(
        arch, {k: v.numpy() for k, v in student.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    apply_fn, variables = models.pure_apply(model, taps=(layer,))
    _, acts = jax.eval_shape(apply_fn, variables, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    width = int(acts[layer].shape[-1])
    mask = (rng.random((batch, width)) < 0.1).astype(np.float32)

    # --- JAX: nemjax's train step ----------------------------------------------------------
    objective = manipulate.push_down_objective({layer: np.ones((width,), bool)})
    step = manipulate.make_train_step(apply_fn, None, objective, optax.adam(LR))
    jbatch = {"image": jnp.asarray(x), "topk_mask": {layer: jnp.asarray(mask)}}
    jstate = [manipulate.train_init(variables, optax.adam(LR))]
    jax_losses = []

    def run_jax(record: bool = False) -> float:
      t = time.perf_counter()
      jstate[0], metrics = step(jstate[0], jbatch, ALPHA)
      loss = float(metrics["loss"])  # blocks until the step is done
      if record:
        jax_losses.append(loss)
      return time.perf_counter() - t

    # --- PyTorch: the same step -------------------------------------------------------------
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
      p.requires_grad_(False)
    student.eval()  # inference-mode BatchNorm and no dropout, as on the JAX side
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    tapped = {}
    dict(student.named_modules())[layer].register_forward_hook(
        lambda _m, _i, o: tapped.__setitem__("a", o))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    mt = torch.from_numpy(mask)
    torch_losses = []

    def run_torch(record: bool = False) -> float:
      t = time.perf_counter()
      with torch.no_grad():
        target = F.softmax(teacher(xt), dim=-1)
      logits = student(xt)
      energy = tapped["a"].square().sum((2, 3))
      l_a = (mt * energy).sum()
      l_m = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
      loss = ALPHA * l_a + (1 - ALPHA) * l_m
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      if record:
        torch_losses.append(float(loss))
      return time.perf_counter() - t

    t0 = time.perf_counter()
    run_jax(record=True)  # compile + first step
    compile_s = time.perf_counter() - t0
    run_torch(record=True)
    for _ in range(args.check_steps - 1):
      run_jax(record=True)
      run_torch(record=True)
    l_j, l_t = np.asarray(jax_losses), np.asarray(torch_losses)
    rel = float(np.max(np.abs(l_j - l_t) / np.maximum(np.abs(l_t), 1e-12)))

    best = sbs.interleaved_best({"jax": run_jax, "torch": run_torch}, args.min_reps,
                                args.min_seconds)
    jax_s, torch_s = best["jax"], best["torch"]
    rows.append((arch, layer, size, batch, batch / jax_s, batch / torch_s, torch_s / jax_s,
                 compile_s, rel))
    print(f"{arch}: jax {batch / jax_s:.1f} img/s, torch {batch / torch_s:.1f} img/s, "
          f"loss rel. diff {rel:.1e}", file=sys.stderr, flush=True)

  header = [
      f"Push-down fine-tuning step on CPU ({os.cpu_count()} cores visible; torch threads "
      f"{args.threads}; α={ALPHA}, Adam lr {LR}; jax {jax.__version__}, torch {torch.__version__}; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'})",
      "",
      "| arch | attacked layer | input | batch | JAX img/s | PyTorch img/s | JAX/PyTorch "
      f"| JAX compile s | loss rel. diff, first {args.check_steps} steps |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  lines = header + [f"| {a} | {l} | {s}x{s} | {b} | {j:.1f} | {t:.1f} | {r:.2f} | {c:.1f} "
                    f"| {d:.1e} |" for a, l, s, b, j, t, r, c, d in rows]
  sbs.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
