"""Attributions per second of nemjax.explain vs Captum 0.9, same model, weights and batch (CPU).

  .venv/bin/python benchmarks/explain.py [--arch smallcnn] [--size 64] [--batch 4]
      [--methods saliency,integrated_gradients,...] [--no-fast-grad] [--trojan-bench] [--out FILE.md]
  .venv/bin/python benchmarks/explain.py --memory [--batch 64] [--memory-limit GIB]   # IG / SmoothGrad

``--trojan-bench``: the 16 methods of Casper's trojan benchmark with the options
``experiments/trojan_bench.py`` uses (``nemjax.trojans.bench.AttributionSettings``: 4×4 feature
grid, 56-pixel occlusion window scaled to ``--size``, 32 LIME / KernelSHAP samples, ...), the
table in ms per image.

Runtime: about 1-3 minutes on 2 CPU cores at the defaults (SmallCNN, 64x64, batch 4). Both sides
explain the same images of the same random-weight model (the JAX model is converted from the
PyTorch twin in ``tests/torch_models.py``) with the same options (below); JAX calls are
``jax.jit``-compiled once (compile and a warm-up excluded) and end with ``block_until_ready``;
Captum runs with ``torch.set_num_threads(--threads)`` and denormals flushed, as XLA:CPU does.
``explain.explain`` differentiates the model through ``ops.fastgrad.cpu_fast_grad`` on the CPU
(same maps, faster gradients through max-pools and a strided stem); ``--no-fast-grad`` turns that
off (``fast_grad=False``). The table's heading names ``XLA_FLAGS`` (the experiment scripts run
with ``experiments._common.CPU_XLA_FLAGS``; pass them with ``--xla-flags``).
Timing is ``_sidebyside.interleaved_best`` (best of alternating calls). Sampling methods get
keys on the JAX side and draw their own samples in Captum (same counts, not the same draws;
the tests compare values with identical draws).

``--memory``: instead of timings, the peak resident memory that one call of
integrated_gradients and smoothgrad adds (a fresh process per row; the call runs once, the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), then it runs again and VmHWM −
VmRSS is read): Captum with its default ``internal_batch_size=None`` (all 50 steps, or all
samples, of the batch at once) and with nemjax's ``'auto'`` chunk (in Captum's units), nemjax
with Captum's default setting (one vmapped program), with its own
default ``'auto'`` (all at once while they fit ``explain._core.AUTO_PIXELS_PER_CALL``, else the
largest chunk that does) and with ``internal_batch_size=1`` / ``nt_samples_batch_size=1``
(``lax.map`` over steps / samples: one N-image batch at a time). ``--memory-limit GIB`` runs
each row under that address-space limit (``RLIMIT_AS``), so a row that needs more fails as it
would on a machine that small: "out of memory".
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import _sidebyside as sbs  # benchmarks/ is on sys.path when a script in it runs

LAYER = {"smallcnn": ("block4", "features.14"), "resnet18": ("layer4", "layer4"),
         "vgg16": ("features.29", "features.29"), "alexnet": ("features.11", "features.11")}


def cases(n_features: int):
  """name -> (nemjax options, Captum class name, Captum constructor kwargs, attribute kwargs).

  Option values stand for per-run objects filled in by ``main``: ``"KEY"`` (a PRNG key),
  ``"MASK"`` (the feature mask), ``"LAYER"`` (the tapped layer)."""
  base_mask = {"feature_mask": "MASK", "baselines": 0.0}
  return {
    "saliency": ({}, "Saliency", {}, {}),
    "input_x_gradient": ({}, "InputXGradient", {}, {}),
    "integrated_gradients": ({}, "IntegratedGradients", {}, {}),
    # nemjax's IG as one program whatever its size (Captum's default; the default 'auto' chunks
    # past AUTO_PIXELS_PER_CALL); "method" names the explain method when the row name does not
    "integrated_gradients_unchunked": ({"method": "integrated_gradients",
                                        "internal_batch_size": None}, "IntegratedGradients", {}, {}),
    "smoothgrad": ({"key": "KEY", "nt_samples": 5, "stdevs": 0.1}, "NoiseTunnel:Saliency", {},
                   {"nt_samples": 5, "stdevs": 0.1}),
    "gradient_shap": ({"key": "KEY", "baselines": "BASES"}, "GradientShap", {}, {"baselines": "BASES"}),
    "guided_backprop": ({}, "GuidedBackprop", {}, {}),
    "deconvolution": ({}, "Deconvolution", {}, {}),
    "grad_cam": ({"layer": "LAYER"}, "LayerGradCam", {"layer": "LAYER"}, {}),
    "guided_grad_cam": ({"layer": "LAYER"}, "GuidedGradCam", {"layer": "LAYER"}, {}),
    "deeplift": ({}, "DeepLift", {}, {}),
    "deeplift_shap": ({"baselines": "BASES"}, "DeepLiftShap", {}, {"baselines": "BASES"}),
    "lrp": ({}, "LRP", {}, {}),
    "occlusion": ({"sliding_window_shapes": (8, 8, 3), "strides": (4, 4, 3),
                   "perturbations_per_eval": 16}, "Occlusion", {},
                  {"sliding_window_shapes": (3, 8, 8), "strides": (3, 4, 4), "perturbations_per_eval": 16}),
    "feature_ablation": ({**base_mask, "perturbations_per_eval": 16}, "FeatureAblation", {},
                         {**base_mask, "perturbations_per_eval": 16}),
    "shapley_value_sampling": ({**base_mask, "key": "KEY", "n_samples": 2,
                                "perturbations_per_eval": 16}, "ShapleyValueSampling", {},
                               {**base_mask, "n_samples": 2, "perturbations_per_eval": 16}),
    "kernel_shap": ({**base_mask, "key": "KEY", "n_samples": 64, "perturbations_per_eval": 16},
                    "KernelShap", {}, {**base_mask, "n_samples": 64, "perturbations_per_eval": 16}),
  }


_CAPTUM = {"integrated_gradients": "IntegratedGradients", "deeplift": "DeepLift",
           "guided_grad_cam": "GuidedGradCam", "saliency": "Saliency",
           "gradient_shap": "GradientShap", "deeplift_shap": "DeepLiftShap",
           "guided_backprop": "GuidedBackprop", "deconvolution": "Deconvolution", "lrp": "LRP",
           "input_x_gradient": "InputXGradient", "feature_ablation": "FeatureAblation",
           "feature_permutation": "FeaturePermutation", "lime": "Lime", "occlusion": "Occlusion",
           "kernel_shap": "KernelShap", "shapley_value_sampling": "ShapleyValueSampling"}


def bench_cases(size: int):
  """:func:`cases` with the trojan benchmark's options (at ``size``: windows scaled by
  ``size / 224``); ``"MASK"`` stands for its feature grid (:func:`bench_mask`)."""
  from nemjax.trojans.bench import AttributionSettings  # pylint: disable=import-outside-toplevel
  st = AttributionSettings()
  w = max(1, round(st.occlusion_window * size / 224))
  st = dataclasses.replace(st, occlusion_window=w, occlusion_stride=max(1, w // 2))
  out = {}
  for name, cls in _CAPTUM.items():
    j = st.method_options(name, size)
    if "feature_mask" in j:
      j["feature_mask"] = "MASK"
    if name in ("gradient_shap", "deeplift_shap"):
      j["baselines"] = "BASES"
    if name in ("guided_grad_cam",):
      j["layer"] = "LAYER"
    if name in ("gradient_shap", "feature_permutation", "lime", "kernel_shap",
                "shapley_value_sampling"):
      j["key"] = "KEY"
    t = {k: v for k, v in j.items() if k not in ("key", "layer")}
    if name == "occlusion":
      t = {"sliding_window_shapes": (3, w, w), "strides": (3, w // 2 or 1, w // 2 or 1),
           "perturbations_per_eval": j["perturbations_per_eval"]}
    ctor = {"layer": "LAYER"} if name == "guided_grad_cam" else {}
    out[name] = (j, cls, ctor, t)
  return out


def bench_mask(size: int):
  """The trojan benchmark's feature grid at ``size`` (int64, (size, size))."""
  from nemjax.trojans.bench.config import grid_mask  # pylint: disable=import-outside-toplevel
  from nemjax.trojans.bench import AttributionSettings  # pylint: disable=import-outside-toplevel
  g = AttributionSettings().feature_grid
  return grid_mask(size, -(-size // g)).astype("int64")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="smallcnn", choices=sorted(LAYER))
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
  p.add_argument("--trojan-bench", action="store_true",
                 help="the trojan benchmark's methods and options; ms per image")
  p.add_argument("--no-fast-grad", action="store_true",
                 help="explain(..., fast_grad=False): XLA's own max-pool and strided-conv "
                      "gradients instead of the CPU rewrite (the default on CPU)")
  p.add_argument("--memory", action="store_true",
                 help="peak memory of integrated_gradients and smoothgrad instead of timings")
  p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                 help="with --memory: run each row under this address-space limit (GiB)")
  p.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)   # child process
  sbs.add_common_args(p, min_seconds=1.0)
  return p.parse_args(argv)


MEMORY_ROWS = [(method, side, ibs) for method in ("integrated_gradients", "smoothgrad")
               for side, ibs in (("captum", None), ("captum", "auto"), ("nemjax", None),
                                 ("nemjax", "auto"), ("nemjax", 1))]


def _peak_added(call) -> tuple[float, float, float]:
  """MiB of resident memory a second ``call()`` adds at its peak (Linux), its seconds, and the
  process's peak resident GiB over both calls (allocators that keep freed memory, as XLA's
  does, show their working set there rather than in the second call's increase)."""
  def status(key):
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
  call()
  first_peak = status("VmHWM")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                       # reset VmHWM to the current RSS
  rss = status("VmRSS")
  t0 = time.perf_counter()
  call()
  seconds = time.perf_counter() - t0
  peak = status("VmHWM")
  return (peak - rss) / 1024, seconds, max(first_peak, peak) / 2**20


def memory_table(args: argparse.Namespace) -> int:
  """Runs each row of MEMORY_ROWS in a fresh process; prints the markdown table."""
  import subprocess
  limit = "" if args.memory_limit is None else f", each under a {args.memory_limit:g} GiB address-space limit"
  lines = [f"Peak resident memory added by one call (MiB): {args.arch} {args.size}x{args.size}, "
           f"batch {args.batch}; IG 50 steps, SmoothGrad 50 samples{limit}", "",
           "| method | library | steps/samples at a time | peak MiB added | process peak GiB "
           "| seconds per call |", "|---|---|---|---|---|---|"]
  for method, side, ibs in MEMORY_ROWS:
    cmd = [sys.executable, __file__, "--arch", args.arch, "--size", str(args.size),
           "--batch", str(args.batch), "--threads", str(args.threads),
           "--memory-row", f"{method}:{side}:{ibs}"]
    if args.memory_limit is not None:
      cmd += ["--memory-limit", str(args.memory_limit)]
    if args.xla_flags is not None:
      cmd += [f"--xla-flags={args.xla_flags}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode == 0:
      got = res.stdout.strip().splitlines()[-1].replace(" ", " | ")
    elif any(s in res.stderr for s in ("bad_alloc", "can't allocate", "MemoryError", "RESOURCE_EXHAUSTED")):
      got = "out of memory | – | –"
    else:
      got = f"failed ({res.returncode}) | – | –"
    print(f"{method} {side} {ibs}: {got}", file=sys.stderr, flush=True)
    lines.append(f"| {method} | {side} | {'all' if ibs is None else ibs} | {got} |")
  sbs.emit(lines, args.out)
  return 0


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.memory:
    return memory_table(args)
  if args.memory_row is not None and args.memory_limit is not None:
    import resource
    cap = int(args.memory_limit * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  sbs.set_up(args)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import captum.attr as ca
  from captum.attr._utils import lrp_rules

  import torch_models as tm
  from nemjax import convert, explain, models

  table = bench_cases(args.size) if args.trojan_bench else cases(0)
  names = list(table) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in table]
  if unknown:
    print(f"explain.py: error: unknown methods {unknown}; choose from {', '.join(table)}", file=sys.stderr)
    return 2
  torch.manual_seed(0)
  tmodel = tm.randomize_(tm.build(args.arch, 10))
  if args.arch == "smallcnn" and "lrp" in names:
    print("note: Captum's LRP runs on the model with BatchNorm as its own ε layer; nemjax folds it "
          "into the conv (same work, other maps)", file=sys.stderr)
  jlayer, tlayer = LAYER[args.arch]
  model = convert.convert_state_dict(args.arch, {k: v.numpy() for k, v in tmodel.state_dict().items()})
  apply_fn, params = models.pure_apply(model, taps=(jlayer,))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  bases = rng.standard_normal((3, args.size, args.size, 3)).astype(np.float32) * 0.1
  t = np.arange(args.batch, dtype=np.int32) % 10
  blk = np.arange(args.size) // 8
  mask = (blk[:, None] * (args.size // 8) + blk[None, :]).astype(np.int64)
  if args.trojan_bench:
    mask = bench_mask(args.size)
    bases = np.stack([np.full((args.size, args.size, 3), v, np.float32)
                      for v in np.linspace(-1.0, 1.0, 2)])   # 2 grey baselines, as the bench
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  tt = torch.from_numpy(t.astype(np.int64))
  tvals = {"MASK": torch.from_numpy(mask)[None, None], "BASES": torch.from_numpy(bases.transpose(0, 3, 1, 2).copy()),
           "LAYER": dict(tmodel.named_modules())[tlayer]}
  jvals = {"MASK": mask, "BASES": bases, "LAYER": jlayer, "KEY": jax.random.key(0)}
  if args.memory_row is not None:
    method, side, ibs = args.memory_row.split(":")
    ibs = None if ibs == "None" else ibs if ibs == "auto" else int(ibs)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    smooth = method == "smoothgrad"
    chunk_opt = "nt_samples_batch_size" if smooth else "internal_batch_size"
    samples = {"nt_samples": 50, "stdevs": 0.1} if smooth else {}
    if side == "captum":
      chunk = {}
      if ibs == "auto":   # nemjax's 'auto' chunk, in Captum's unit (samples, or steps × N images)
        from nemjax.explain import _core
        steps = _core.items_per_call("auto", 50, xj, "auto") or 50
        chunk = {chunk_opt: steps if smooth else steps * args.batch}
      ex = ca.NoiseTunnel(ca.Saliency(tmodel)) if smooth else ca.IntegratedGradients(tmodel)
      call = lambda: ex.attribute(xt, target=tt, **samples, **chunk)
    else:
      opts = dict(samples, **{chunk_opt: ibs}, **({"key": jax.random.key(0)} if smooth else {}))
      f = jax.jit(lambda p, xx, tg: explain.explain(method, apply_fn, p, xx, tg, **opts))
      call = lambda: f(params, xj, tj).block_until_ready()
    added, seconds, peak = _peak_added(call)
    print(f"{added:.0f} {peak:.1f} {seconds:.1f}")
    return 0
  if "lrp" in names:
    for m in tmodel.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.rule = lrp_rules.Alpha1_Beta0_Rule()
      elif isinstance(m, torch.nn.Linear):
        m.rule = lrp_rules.EpsilonRule(epsilon=0.01)

  fast_grad = False if args.no_fast_grad else None
  rows = []
  for name in names:
    jopts, cls, ctor, kw = table[name]
    jopts = {k: jvals.get(v, v) if isinstance(v, str) else v for k, v in jopts.items()}
    ctor = {k: tvals.get(v, v) if isinstance(v, str) else v for k, v in ctor.items()}
    kw = {k: tvals.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    key = jopts.pop("key", None)
    method = jopts.pop("method", name)
    f = jax.jit(lambda p, xx, tg, k: explain.explain(method, apply_fn, p, xx, tg, **jopts,
                                                     fast_grad=fast_grad,
                                                     **({} if k is None else {"key": k})))
    t0 = time.perf_counter()
    f(params, jnp.asarray(x), jnp.asarray(t), key).block_until_ready()
    compile_s = time.perf_counter() - t0
    if cls in ("KernelShap", "Lime"):   # their default surrogates need scikit-learn
      from captum_helpers import WeightedLeastSquares
      explainer = getattr(ca, cls)(tmodel, **({"interpretable_model": WeightedLeastSquares()}
                                              if cls == "Lime" else {}))
      if cls == "KernelShap":
        explainer.interpretable_model = WeightedLeastSquares()
    elif cls.startswith("NoiseTunnel:"):
      explainer = ca.NoiseTunnel(getattr(ca, cls.split(":")[1])(tmodel))
    else:
      explainer = getattr(ca, cls)(tmodel, **ctor)

    def jax_call():
      f(params, jnp.asarray(x), jnp.asarray(t), key).block_until_ready()

    def torch_call():
      explainer.attribute(xt, target=tt, **kw)

    try:
      torch_call()
    except RuntimeError as e:   # e.g. Captum's DeepLift on a model that reuses a ReLU module
      best = sbs.interleaved_best({"jax": sbs.timed(jax_call)}, args.min_reps, args.min_seconds)
      rows.append((name, args.batch / best["jax"], float("nan"), float("nan"), compile_s))
      print(f"{name}: nemjax {rows[-1][1]:.1f}/s, captum fails: {str(e).splitlines()[0][:100]}",
            file=sys.stderr, flush=True)
      continue
    best = sbs.interleaved_best({"jax": sbs.timed(jax_call), "torch": sbs.timed(torch_call)},
                                args.min_reps, args.min_seconds)
    rows.append((name, args.batch / best["jax"], args.batch / best["torch"], best["torch"] / best["jax"], compile_s))
    print(f"{name}: nemjax {rows[-1][1]:.1f}/s, captum {rows[-1][2]:.1f}/s", file=sys.stderr, flush=True)

  lines = [
    f"Attributions per second on CPU: {args.arch} {args.size}x{args.size}, batch {args.batch}"
    f"{', no CPU gradient rewrite' if args.no_fast_grad else ''}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'} "
    f"({os.cpu_count()} cores visible; torch threads {args.threads}; jax {jax.__version__}, "
    f"torch {torch.__version__}, captum {ca.__dict__.get('__version__', '0.9')})",
    "",
    "| method | nemjax maps/s | Captum maps/s | nemjax/Captum | nemjax compile s |",
    "|---|---|---|---|---|",
  ] + [f"| {n} | {j:.1f} | {c:.1f} | {r:.2f} | {s:.1f} |" for n, j, c, r, s in rows]
  if args.trojan_bench:
    lines[2:] = ["| method | nemjax ms/image | Captum ms/image | Captum/nemjax | nemjax compile s |",
                 "|---|---|---|---|---|"] + [
        f"| {n} | {1e3 / j:.1f} | {1e3 / c:.1f} | {r:.2f} | {s:.1f} |" for n, j, c, r, s in rows]
  sbs.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
