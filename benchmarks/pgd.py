"""act-avg PGD throughput: nemjax (JAX) against the same attack in PyTorch, on CPU.

    .venv/bin/python benchmarks/pgd.py --out pgd.md        # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/pgd.py --quick             # 4 images, 2 steps: a smoke run

Both sides attack the same ResNet18 (random weights from ``tests/torch_models.py``, converted
with ``nemjax.convert``), run only up to ``layer4``, on the same images (224², in [0, 1],
NetDissect normalisation inside the model function), the same units (a different unit per image)
and the same 112² source/target masks, with the targeted objective (Eq. 9), ε = 4/255 and step
2ε/steps. PyTorch is the paper's formulation (``F.interpolate`` the unit's map to 112², average
over each mask, per-image losses summed, ``autograd.grad``, sign step, clamp to the ε-ball then
[0, 1]) with ``torch.set_num_threads(2)``.

Throughput is image·steps per second, best of ``--reps`` timed runs after one warm-up (compile)
run; the machine may be shared, so PyTorch is timed at the start and at the end. JAX
configurations that need different ``XLA_FLAGS`` run in subprocesses (flags must be set before
JAX starts). Sanity: the per-image losses at step 0 are compared between PyTorch and JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

EPS = 4 / 255
SEG = 112  # label-map size for 224² Broden images

# JAX configurations: name -> options. "flags" are XLA_FLAGS (a separate process each).
CONFIGS = {
  # Loop structure, plain model function (XLA's own gradients).
  "jit(grad) once x steps, no loop (floor)": dict(loop="grad1"),
  "fori_loop": dict(loop="fori"),
  "scan": dict(loop="scan"),
  "unrolled in one jit": dict(loop="unroll"),
  "Python loop over jitted step, donated x_adv": dict(loop="python"),
  # Gradient rewrites (nemjax.ops.fastgrad).
  "python + fast max-pool grad": dict(loop="python", fast="pool"),
  "python + fast max-pool + polyphase stem grad": dict(loop="python", fast="pool+stem"),
  "python + fast max-pool + polyphase stem + HWIO conv grads (default)": dict(
    loop="python", fast="pool+stem+hwio"),
  "python + fast max-pool + polyphase every strided conv": dict(loop="python",
                                                                fast="pool+allstrided"),
  "unrolled + fast max-pool + polyphase stem": dict(loop="unroll", fast="pool+stem"),
  "fori_loop + fast max-pool + polyphase stem": dict(loop="fori", fast="pool+stem"),
  "fori_loop + fast max-pool + polyphase stem + HWIO conv grads": dict(loop="fori",
                                                                       fast="pool+stem+hwio"),
  "unrolled + fast max-pool + polyphase stem + HWIO conv grads": dict(loop="unroll",
                                                                      fast="pool+stem+hwio"),
  # Objective, network cut, batch size.
  "default, explicit upsample act_avg (unrolled)": dict(loop="unroll", fast="pool+stem",
                                                         act="upsample"),
  "default, full forward (no upto; fc is dead code)": dict(loop="python", fast="pool+stem",
                                                           upto=False),
  "default, batch 8 (4 calls)": dict(loop="python", fast="pool+stem", batch=8),
  "default, batch 16 (2 calls)": dict(loop="python", fast="pool+stem", batch=16),
  # XLA CPU flags (each in its own process).
  "default + --xla_cpu_enable_fast_math=true": dict(
    loop="python", fast="pool+stem", flags="--xla_cpu_enable_fast_math=true"),
  "default + --xla_cpu_use_onednn=true": dict(
    loop="python", fast="pool+stem", flags="--xla_cpu_use_onednn=true"),
  "default + --xla_cpu_multi_thread_eigen=false": dict(
    loop="python", fast="pool+stem", flags="--xla_cpu_multi_thread_eigen=false"),
  "default + YNNPACK fusions off (--xla_cpu_experimental_ynn_fusion_type=)": dict(
    loop="python", fast="pool+stem", flags="--xla_cpu_experimental_ynn_fusion_type="),
  "default + HWIO conv grads + YNNPACK fusions off (the scripts)": dict(
    loop="python", fast="pool+stem+hwio", flags="--xla_cpu_experimental_ynn_fusion_type="),
  "fori_loop + HWIO conv grads + YNNPACK fusions off": dict(
    loop="fori", fast="pool+stem+hwio", flags="--xla_cpu_experimental_ynn_fusion_type="),
  "default + XNNPACK graph fusion (GREEDY)": dict(
    loop="python", fast="pool+stem",
    flags="--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
  "default + --xla_cpu_use_thunk_runtime=false": dict(
    loop="python", fast="pool+stem", flags="--xla_cpu_use_thunk_runtime=false"),
}


# ---------------------------------------------------------------------------------------------
# Shared problem.

def make_problem(n: int, seed: int = 0):
  """Images (N, 224, 224, 3) in [0, 1], units (N,), source/target masks (N, 112, 112)."""
  rng = np.random.RandomState(seed)
  x = rng.rand(n, 224, 224, 3).astype(np.float32)
  units = rng.randint(0, 512, n).astype(np.int32)
  masks = []
  for _ in range(2):
    m = np.zeros((n, SEG, SEG), np.float32)
    for i in range(n):
      y0, x0 = rng.randint(0, SEG // 2, 2)
      m[i, y0:y0 + rng.randint(8, SEG // 2), x0:x0 + rng.randint(8, SEG // 2)] = 1.0
    masks.append(m)
  return x, units, masks[0], masks[1]


def torch_model(arch: str):
  import torch
  import torch_models
  torch.manual_seed(0)
  return torch_models.randomize_(torch_models.build(arch, 365), seed=0).eval()


def to_nemjax(arch: str, sd: dict):
  """torch state dict -> nemjax model, via ``nemjax.convert``."""
  from nemjax import convert
  return convert.convert_state_dict(arch, sd)


def time_best(fn, reps: int) -> tuple[float, float, float]:
  """(first call s, best of reps wall s, best of reps process CPU s, all threads)."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  best, best_cpu = float("inf"), float("inf")
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    fn()
    best = min(best, time.perf_counter() - t)
    best_cpu = min(best_cpu, time.process_time() - c)
  return first, best, best_cpu


# ---------------------------------------------------------------------------------------------
# PyTorch side.

def torch_run(args, channels_last: bool) -> dict:
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(2)
  model = torch_model(args.arch)
  for p in model.parameters():
    p.requires_grad_(False)
  x_np, units_np, src_np, tgt_np = make_problem(args.images)
  mean = torch.tensor([124.6901, 118.6897, 109.5388]).view(1, 3, 1, 1)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  if channels_last:
    model = model.to(memory_format=torch.channels_last)

  def features(x01):  # ResNet up to layer4, NCHW
    x = (x01 * 255.0 - mean) / (255.0 * 0.224)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))

  def losses(x01, units, src, tgt):
    a = features(x01)
    a = a[torch.arange(a.shape[0]), units][:, None]
    up = F.interpolate(a, size=src.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    avg = lambda m: (up * m).sum((1, 2)) / m.sum((1, 2))
    return avg(src) - avg(tgt)

  def pgd(x, units, src, tgt):
    alpha = 2 * EPS / args.steps
    xa = x.clone()
    for _ in range(args.steps):
      xa.requires_grad_(True)
      g, = torch.autograd.grad(losses(xa, units, src, tgt).sum(), xa)
      xa = xa.detach() - alpha * g.sign()
      xa = torch.clamp(x + torch.clamp(xa - x, -EPS, EPS), 0, 1)
    return xa

  x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  units = torch.from_numpy(units_np).long()
  src, tgt = torch.from_numpy(src_np), torch.from_numpy(tgt_np)
  with torch.no_grad():
    loss0 = losses(x, units, src, tgt).numpy()
  out = {}
  first, best, cpu = time_best(lambda: out.__setitem__("x", pgd(x, units, src, tgt)), args.reps)
  x_adv = out["x"].permute(0, 2, 3, 1).numpy()
  return dict(first=first, best=best, cpu=cpu, loss0=loss0.tolist(), x_adv=x_adv)


# ---------------------------------------------------------------------------------------------
# JAX side.

def jax_run(args, cfg: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from nemjax import models, preprocess
  from nemjax.attacks import act_avg as aa
  from nemjax.ops import fastgrad
  from nemjax.attacks import pgd as P

  tm = torch_model(args.arch)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  model = to_nemjax(args.arch, sd)
  upto = "layer4" if cfg.get("upto", True) else None
  apply_fn, state = models.pure_apply(model, taps=("layer4",), upto=upto)

  def features_fn(x01):
    return apply_fn(state, preprocess.from_unit_interval_netdissect(x01))[1]["layer4"]

  fast = cfg.get("fast", "")
  if fast:
    features_fn = fastgrad.cpu_fast_grad(
      features_fn, fast_max_pool="pool" in fast,
      polyphase_max_in_channels=(1 << 30 if "allstrided" in fast else
                                 4 if "stem" in fast else 0),
      hwio_conv_grads="hwio" in fast)

  x_np, units_np, src_np, tgt_np = make_problem(args.images)
  x, units = jnp.asarray(x_np), jnp.asarray(units_np)
  src, tgt = jnp.asarray(src_np), jnp.asarray(tgt_np)
  loss_ref = jax.jit(lambda x: aa.act_avg_upsampled(features_fn(x), src, units)
                     - aa.act_avg_upsampled(features_fn(x), tgt, units))
  loss0 = np.asarray(loss_ref(x))

  loop = cfg["loop"]
  if loop == "grad1":  # one jitted gradient call: the floor for one step
    g = jax.jit(jax.grad(lambda z: jnp.sum(P.targeted_loss(features_fn, x, units, src, tgt)(z))))
    first, best, cpu = time_best(lambda: g(x).block_until_ready(), args.reps)
    return dict(first=first, best=best * args.steps, cpu=cpu * args.steps, loss0=loss0.tolist(),
                x_adv=None)

  if cfg.get("act") == "upsample":  # the explicit upsample-then-average objective
    @jax.jit
    def attack_fn(x, units, src, tgt):
      loss = lambda z: (aa.act_avg_upsampled(features_fn(z), src, units)
                        - aa.act_avg_upsampled(features_fn(z), tgt, units))
      return P.pgd(loss, x, eps=EPS, steps=args.steps, loop=loop)
  else:
    attack_fn = P.make_act_avg_attack(features_fn, eps=EPS, steps=args.steps,
                                      objective="targeted", loop=loop, fast_grad=False)
  b = cfg.get("batch", args.images)

  def run():
    outs = [attack_fn(x[i:i + b], units[i:i + b], src[i:i + b], tgt[i:i + b])
            for i in range(0, args.images, b)]
    return np.asarray(jnp.concatenate(outs) if len(outs) > 1 else outs[0])
  out = {}
  first, best, cpu = time_best(lambda: out.__setitem__("x", run()), args.reps)
  return dict(first=first, best=best, cpu=cpu, loss0=loss0.tolist(), x_adv=out["x"])


def worker(args) -> None:
  """Runs the JAX configs named in --worker (all with the current XLA_FLAGS) and the checks."""
  names = json.loads(args.worker)
  ref = np.load(args.ref) if args.ref else None
  for name in names:
    try:
      r = jax_run(args, CONFIGS[name])
    except Exception as e:  # pylint: disable=broad-except
      # A benchmark reports a failing configuration as a failed row (with its error and, on
      # stderr, the traceback) and goes on with the next one.
      traceback.print_exc(file=sys.stderr)
      err = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
      print("FAILED " + json.dumps({"name": name, "error": err}), flush=True)
      continue
    rec = dict(name=name, first=r["first"], best=r["best"], cpu=r["cpu"], loss0=r["loss0"])
    if ref is not None and r["x_adv"] is not None:
      rec["same_pixels"] = float(np.mean(np.abs(r["x_adv"] - ref["x_adv"]) < 1e-6))
    print("RESULT " + json.dumps(rec), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--arch", default="resnet18")
  ap.add_argument("--images", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--configs", default="all", help="comma-separated config names, or 'all'")
  ap.add_argument("--out", default=None, help="also write the markdown table here")
  ap.add_argument("--quick", action="store_true", help="4 images, 2 steps, 1 rep, 3 configs")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.arch != "resnet18":
    raise SystemExit("--arch: the layer4 cut is written for resnet18 only")
  if args.worker:
    return worker(args)
  if args.quick:
    args.images, args.steps, args.reps = 4, 2, 1
  names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
  if args.quick and args.configs == "all":
    names = ["fori_loop", "python + fast max-pool + polyphase stem + HWIO conv grads (default)",
             "default + --xla_cpu_enable_fast_math=true"]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    raise SystemExit(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
  n_work = args.images * args.steps

  import torch
  print(f"# act-avg PGD, {args.arch} up to layer4, {args.images} images 224², {args.steps} steps, "
        f"CPU ({os.cpu_count()} cores visible), torch {torch.__version__}", flush=True)
  torch_rows = []
  t_nchw = torch_run(args, channels_last=False)
  torch_rows.append(("PyTorch NCHW (start)", t_nchw))
  print(f"torch NCHW: {n_work / t_nchw['best']:.1f} img·steps/s", flush=True)
  t_cl = torch_run(args, channels_last=True)
  torch_rows.append(("PyTorch channels_last (start)", t_cl))
  print(f"torch channels_last: {n_work / t_cl['best']:.1f} img·steps/s", flush=True)

  ref_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgd_bench_ref_{os.getpid()}.npz"
  np.savez(ref_path, x_adv=t_nchw["x_adv"])
  groups: dict[str, list[str]] = {}
  for n in names:
    groups.setdefault(CONFIGS[n].get("flags", ""), []).append(n)
  results, failed = {}, {}
  for flags, group in groups.items():
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))  # suite.py: '' = any
    cmd = [sys.executable, __file__, "--worker", json.dumps(group), "--ref", str(ref_path),
           "--images", str(args.images), "--steps", str(args.steps), "--reps", str(args.reps),
           "--arch", args.arch]
    with tempfile.TemporaryFile("w+") as err_file:
      proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
      for line in proc.stdout:
        if line.startswith("RESULT "):
          rec = json.loads(line[7:])
          results[rec["name"]] = rec
          print(f"{rec['name']}: {n_work / rec['best']:.1f} img·steps/s "
                f"(first call {rec['first']:.1f}s)", flush=True)
        elif line.startswith("FAILED "):
          rec = json.loads(line[7:])
          failed[rec["name"]] = rec["error"]
          print(f"FAILED {rec['name']}: {rec['error']}", flush=True)
      if proc.wait() != 0:
        err_file.seek(0)
        tail = " ".join(err_file.read().strip().splitlines()[-1:])[:300] or "no stderr"
        for n in group:
          if n not in results and n not in failed:
            failed[n] = f"worker (XLA_FLAGS={flags!r}) exited with {proc.returncode}: {tail}"
        print(f"worker for XLA_FLAGS={flags!r} exited with {proc.returncode}: {tail}", flush=True)
  ref_path.unlink(missing_ok=True)
  t_end = torch_run(args, channels_last=True)
  torch_rows.append(("PyTorch channels_last (end)", t_end))
  print(f"torch channels_last (end): {n_work / t_end['best']:.1f} img·steps/s", flush=True)

  torch_best = min(r["best"] for _, r in torch_rows)
  loss_t = np.asarray(t_nchw["loss0"])
  lines = [
    f"act-avg PGD (targeted, ε=4/255), {args.arch} cut at layer4, {args.images} images 224², "
    f"{args.steps} steps; CPU, {os.cpu_count()} cores visible, torch threads 2; "
    f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}.",
    "",
    "| implementation | img·steps/s | vs best PyTorch | CPU s per attack (all threads) | first call (s) | step-0 loss max rel. diff vs torch | x_adv pixels equal to torch |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for label, r in torch_rows:
    lines.append(f"| {label} | {n_work / r['best']:.1f} | {torch_best / r['best']:.2f}× | "
                 f"{r['cpu']:.1f} | {r['first']:.1f} | – | – |")
  for n in names:
    if n not in results:
      err = failed.get(n, "no result reported").replace("|", "\\|")
      lines.append(f"| JAX: {n} | failed: {err} | | | | | |")
      continue
    rec = results[n]
    l0 = np.asarray(rec["loss0"])
    rel = float(np.max(np.abs(l0 - loss_t)) / max(np.max(np.abs(loss_t)), 1e-12))
    same = f"{100 * rec['same_pixels']:.2f} %" if "same_pixels" in rec else "–"
    lines.append(f"| JAX: {n} | {n_work / rec['best']:.1f} | {torch_best / rec['best']:.2f}× | "
                 f"{rec['cpu']:.1f} | {rec['first']:.1f} | {rel:.1e} | {same} |")
  table = "\n".join(lines)
  print("\n" + table)
  if args.out:
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
  main()
