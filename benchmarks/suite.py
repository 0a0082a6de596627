"""Every side-by-side benchmark at quick sizes, plus an accelerator-vs-CPU equality check: the
one command to run on a GPU machine.

    .venv/bin/python benchmarks/suite.py --quick --out suite.md   # < 8 min on one GPU

1. Equality check (in this process): the same small problems on JAX's default backend and on
   its CPU backend -- Network Dissection tallies and thresholds (must be identical), the sweep's
   act-avg PGD (pixels: ≥ 99 % equal, the rest whole sign steps, as float rounding can flip a
   sign where the gradient is ≈ 0) and three fine-tuning steps (losses within 1e-4
   relative). Without an accelerator both sides are the CPU and the check is trivial (it says
   so); each benchmark below still checks nemjax against its own reference (NumPy oracle or
   PyTorch).
2. The benchmarks, each in its own process with JAX's default platform (``JAX_PLATFORMS``
   left to JAX unless set): forward, dissection (dense vs sparse tally kernels, with what
   ``method='auto'`` picks on this backend against which was faster, and the driver), PGD, fine-tuning step, explanation methods, the sweep. Their tables are printed
   and, with --out, written to one file; a failing benchmark is a failed row, not the end.

Exit status 1 if the equality check or any benchmark failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"

# name -> (script, quick argv, full argv)
BENCHMARKS = {
    "forward": ("forward.py", ["--archs", "resnet18,smallcnn", "--min-seconds", "1",
                               "--min-reps", "2"], []),
    "dissect (driver vs oracle)": ("dissect.py", ["--quick", "--no-scaling"], []),
    "dissect kernels (dense vs sparse tally)": ("dissect_kernels.py", ["--quick"], []),
    "pgd": ("pgd.py", ["--quick"], []),
    "fine-tuning step": ("finetune.py", ["--archs", "smallcnn,resnet18", "--min-seconds", "1",
                                         "--min-reps", "2", "--check-steps", "2"], []),
    "explanation methods": ("explain.py", ["--min-seconds", "0.5", "--min-reps", "2"], []),
    "convolution layers": ("conv_layers.py", ["--min-seconds", "0.1", "--min-reps", "2"], []),
    "sweep": ("sweep.py", ["--quick"], []),
}


def _small_problem(tmp: Path):
  """(smallcnn model, 32-image 64² probe set): small enough for both backends in seconds."""
  from flax import nnx
  from nemjax.data import broden
  from nemjax.data.synthetic import make_probe_set
  from nemjax.models import build
  probe = broden.load_probe(make_probe_set(tmp / "probe", num_images=32, image_size=64,
                                           seg_size=32))
  return build("smallcnn", num_classes=10, rngs=nnx.Rngs(0)), probe


def equality_check(tmp: Path) -> tuple[bool, list[str]]:
  """Default backend vs CPU on dissection, PGD and a fine-tuning step; (ok, markdown lines)."""
  import jax
  import numpy as np
  import optax
  from nemjax import manipulate, models
  from nemjax.data import loader
  from nemjax.dissect import tally as tally_lib
  from nemjax.dissect.driver import dissect, make_mesh
  from nemjax.sweep.attack import SweepAttack
  from nemjax.sweep.pgd_sweep import features_fn_for

  model, probe = _small_problem(tmp)
  backend, cpu = jax.default_backend(), jax.devices("cpu")
  lines = [f"Default backend {backend} ({jax.devices()[0].device_kind}) vs CPU"
           + (" -- no accelerator: both sides are the CPU, the check is trivial"
              if backend == "cpu" else ""), "",
           "| check | result | ok |", "|---|---|---|"]
  ok = True

  def row(name: str, result: str, good: bool) -> None:
    nonlocal ok
    ok &= bool(good)
    lines.append(f"| {name} | {result} | {'yes' if good else 'NO'} |")

  layers = ["block3", "block4"]
  runs = [dissect(model, probe, layers, batch_size=8, progress=False, mesh=make_mesh(devs))
          for devs in (jax.devices(), cpu)]
  for layer in layers:
    a, b = runs[0][layer], runs[1][layer]
    same = (np.array_equal(a.thresholds, b.thresholds)
            and all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(a.tally, b.tally)))
    row(f"dissection {layer}: thresholds + tallies", "identical" if same else "differ", same)
  by_method = {m: dissect(model, probe, layers, batch_size=8, progress=False, tally_method=m,
                          mesh=make_mesh(jax.devices())) for m in ("sparse", "dense")}
  same = all(np.array_equal(np.asarray(x), np.asarray(y))
             for layer in layers
             for x, y in zip(by_method["sparse"][layer].tally, by_method["dense"][layer].tally))
  row(f"dissection on {backend}: sparse and dense tallies ('auto' picks "
      f"{tally_lib.auto_method(backend)})", "identical" if same else "differ", same)

  x = loader.load_images(probe, np.arange(16)).astype(np.float32) / np.float32(255.0)
  rng = np.random.default_rng(0)
  units = rng.integers(0, 128, 16).astype(np.int32)
  src = (rng.random((16, 32, 32)) < 0.3).astype(np.float32)
  tgt = (rng.random((16, 32, 32)) < 0.3).astype(np.float32)
  eps, steps = 8 / 255, 5
  outs = []
  for devs in (jax.devices(), cpu):
    with jax.default_device(devs[0]):
      attack = SweepAttack(features_fn_for(model, "block4"), steps=steps, chunk=8,
                           mesh=make_mesh(devs[:1]))
      outs.append(attack(x, units, src, tgt, eps=eps, step_size=2 * eps / steps))
  diff = np.abs(outs[0] - outs[1]) / (2 * eps / steps)
  same = float(np.mean(diff < 1e-3))
  whole = bool(np.allclose(diff, np.round(diff), atol=1e-3))
  row("sweep PGD (16 images, 5 steps): pixels equal", f"{100 * same:.3f} %, others whole steps: "
      f"{whole}", same >= 0.99 and whole)

  apply_fn, variables = models.pure_apply(model, taps=("block4",))
  xb = rng.standard_normal((8, 64, 64, 3)).astype(np.float32)
  mask = (rng.random((8, 128)) < 0.1).astype(np.float32)
  losses = []
  for devs in (jax.devices(), cpu):
    with jax.default_device(devs[0]):
      step = manipulate.make_train_step(
          apply_fn, None, manipulate.push_down_objective({"block4": np.ones(128, bool)}),
          optax.adam(1e-5), donate=False)
      state = manipulate.train_init(jax.device_put(variables, devs[0]), optax.adam(1e-5))
      batch = {"image": jax.device_put(xb, devs[0]),
               "topk_mask": {"block4": jax.device_put(mask, devs[0])}}
      ls = []
      for _ in range(3):
        state, metrics = step(state, batch, 0.5)
        ls.append(float(metrics["loss"]))
      losses.append(np.asarray(ls))
  rel = float(np.max(np.abs(losses[0] - losses[1]) / np.maximum(np.abs(losses[1]), 1e-12)))
  row("fine-tuning, 3 steps: loss max rel. diff", f"{rel:.1e}", rel < 1e-4)
  return ok, lines


def run_benchmark(name: str, script: str, argv: list[str], timeout: float
                  ) -> tuple[bool, float, str]:
  """(ok, seconds, its stdout) of one benchmark in a fresh process."""
  t = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, str(HERE / script), *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return False, time.perf_counter() - t, f"{name}: timed out after {timeout:.0f} s"
  out = proc.stdout
  if proc.returncode:
    out += f"\nexit status {proc.returncode}: " + " ".join(proc.stderr.strip().splitlines()[-3:])
  return proc.returncode == 0, time.perf_counter() - t, out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="quick sizes (the < 8 min GPU check)")
  ap.add_argument("--only", default=None,
                  help=f"comma-separated subset of: check, {', '.join(BENCHMARKS)}")
  ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
  ap.add_argument("--out", type=Path, default=None, help="also write everything here")
  args = ap.parse_args()
  names = ["check", *BENCHMARKS] if args.only is None else [
      n.strip() for n in args.only.split(",")]
  unknown = [n for n in names if n != "check" and n not in BENCHMARKS]
  if unknown:
    raise SystemExit(f"--only: unknown {unknown}; known: check, {', '.join(BENCHMARKS)}")
  sys.path.insert(0, str(REPO))
  report, summary, all_ok = [], ["| part | seconds | ok |", "|---|---:|---|"], True
  if "check" in names:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      ok, lines = equality_check(Path(tmp))
    print("\n".join(lines), flush=True)
    report += ["## accelerator vs CPU", "", *lines, ""]
    summary.append(f"| equality check | {time.perf_counter() - t:.0f} | {'yes' if ok else 'NO'} |")
    all_ok &= ok
  for name in [n for n in names if n != "check"]:
    script, quick, full = BENCHMARKS[name]
    ok, seconds, out = run_benchmark(name, script, quick if args.quick else full, args.timeout)
    print(f"\n## {name} ({seconds:.0f} s)\n{out}", flush=True)
    report += [f"## {name}", "", out.strip(), ""]
    summary.append(f"| {name} | {seconds:.0f} | {'yes' if ok else 'NO'} |")
    all_ok &= ok
  print("\n" + "\n".join(summary))
  if args.out:
    args.out.write_text("\n".join(report + ["## summary", "", *summary]) + "\n")
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main())
