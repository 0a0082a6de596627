"""Network Dissection speed: nemjax kernels vs the NumPy oracle on the same activations, the
whole dissection end to end, and its scaling with the probe-set size.

    .venv/bin/python benchmarks/dissect.py [--images 320] [--scales 1,4,16] [--out FILE.md]
    .venv/bin/python benchmarks/dissect.py --quick        # smoke run: 32 images, scales 1,2

A random-weight ResNet18 (365 classes) is run over a synthetic Broden-format probe set
(224 images, 112 label maps); the activations of layer3 (14×14×256) and layer4 (7×7×512)
are fed (a) to ``tests/oracle_netdissect.py`` — a per-image NumPy loop that, like
NetDissect-Lite, upsamples only the (image, unit) pairs whose max exceeds the threshold — and
(b) to nemjax's threshold + tally + IoU kernels. Both give identical tallies (checked here).

End to end: ``nemjax.dissect.dissect`` by default (activations within its 1 GiB budget: one
forward pass, kept in RAM), streaming (``max_ram_bytes=0``: two forward passes, nothing stored)
and ``keep_activations=True`` (one forward pass, activations stored and returned).

Scaling (on by default, ``--no-scaling`` to skip): the streaming dissection through the driver on
the probe set tiled ``--scales`` times (index.csv rows repeated, the image files shared), each
in a fresh process (compiled first on one batch), reporting wall time, images/s and peak RSS
(``resource.getrusage``): time should grow linearly and memory stay flat.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
LAYERS = ["layer3", "layer4"]


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tile_probe(base: Path, out: Path, times: int | None = None, rows: int | None = None) -> Path:
  """A Broden-format directory whose index.csv repeats ``base``'s rows ``times`` times (or keeps
  the first ``rows``); tables copied, ``images/`` a symlink to ``base``'s."""
  out.mkdir(parents=True)
  for f in base.glob("*.csv"):
    if f.name != "index.csv":
      shutil.copy(f, out / f.name)
  (out / "images").symlink_to((base / "images").resolve(), target_is_directory=True)
  header, *lines = (base / "index.csv").read_text().splitlines()
  lines = lines * times if times is not None else lines[:rows]
  (out / "index.csv").write_text("\n".join([header, *lines]) + "\n")
  return out


def _model():
  from flax import nnx
  from nemjax.models import build
  return build("resnet18", num_classes=365, rngs=nnx.Rngs(0))


def scale_run(probe_dir: Path, warmup_dir: Path, batch_size: int) -> None:
  """Child process: warm up on ``warmup_dir``, then time one streaming dissection of
  ``probe_dir``; prints one JSON line."""
  import nemjax.dissect
  from nemjax.data import broden
  model = _model()
  nemjax.dissect.dissect(model, broden.load_probe(warmup_dir), LAYERS, batch_size=batch_size,
                         progress=False)
  probe = broden.load_probe(probe_dir)
  rss_before = peak_rss_mib()
  t0 = time.perf_counter()
  nemjax.dissect.dissect(model, probe, LAYERS, batch_size=batch_size, progress=False,
                         max_ram_bytes=0)
  wall = time.perf_counter() - t0
  print(json.dumps(dict(images=probe.num_images, wall=wall, rss_before=rss_before,
                        rss_peak=peak_rss_mib())))


def scaling_rows(base: Path, tmp: Path, scales: list[int], batch_size: int) -> list[str]:
  warmup = tile_probe(base, tmp / "warmup", rows=batch_size)
  lines = ["", "Scaling through the driver (`nemjax.dissect.dissect`, streaming path "
           "`max_ram_bytes=0`, "
           "layer3 + layer4; fresh process per run, compiled on one batch first; peak RSS "
           "from `resource.getrusage`):", "",
           "| probe images | wall s | images/s | s per 1k images | peak RSS MiB "
           "| RSS before the run MiB |", "|---|---|---|---|---|---|"]
  for sc in scales:
    probe_dir = tile_probe(base, tmp / f"x{sc}", times=sc)
    out = subprocess.run([sys.executable, __file__, "--scale-run", str(probe_dir), str(warmup),
                          "--batch-size", str(batch_size)], capture_output=True, text=True)
    if out.returncode:
      raise RuntimeError(f"scale run ×{sc} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    lines.append(f"| {r['images']} | {r['wall']:.1f} | {r['images'] / r['wall']:.1f} "
                 f"| {r['wall'] / r['images'] * 1000:.1f} | {r['rss_peak']:.0f} "
                 f"| {r['rss_before']:.0f} |")
    print(lines[-1], flush=True)
  return lines


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=320)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--scales", default="1,4,16", help="probe-set multiples of the scaling runs")
  p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                 help="run the scaling table (default on)")
  p.add_argument("--quick", action="store_true", help="smoke run: 32 images, scales 1,2")
  p.add_argument("--out", type=Path, help="also write the markdown to this file")
  p.add_argument("--scale-run", nargs=2, type=Path, metavar=("PROBE", "WARMUP"),
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.scale_run:
    scale_run(*args.scale_run, args.batch_size)
    return
  if args.quick:
    args.images, args.scales = 32, "1,2"
  scales = [int(s) for s in args.scales.split(",") if s]

  import jax

  import nemjax.dissect
  import oracle_netdissect as oracle
  from nemjax.data import broden, loader, synthetic
  from nemjax.dissect import quantile as quantile_lib
  from nemjax.dissect import tally as tally_lib

  with tempfile.TemporaryDirectory(prefix="nemjax-bench-") as tmp_name:
    tmp = Path(tmp_name)
    probe_dir = synthetic.make_probe_set(tmp / "probe", num_images=args.images, seed=0)
    probe = broden.load_probe(probe_dir)
    model = _model()
    bs = args.batch_size

    nemjax.dissect.dissect(model, probe, LAYERS, batch_size=bs, progress=False)  # compile
    t0 = time.perf_counter()
    nemjax.dissect.dissect(model, probe, LAYERS, batch_size=bs, progress=False)
    default_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nemjax.dissect.dissect(model, probe, LAYERS, batch_size=bs, progress=False, max_ram_bytes=0)
    streaming_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, acts = nemjax.dissect.dissect(model, probe, LAYERS, batch_size=bs, progress=False,
                                     keep_activations=True)
    kept_s = time.perf_counter() - t0
    acts = {k: np.array(v) for k, v in acts.items()}
    pixels, scalars = loader.load_labels(probe, np.arange(probe.num_images))

    def run_kernels():
      """Thresholds (streaming, batch by batch) + tally + IoU of both layers; labels decoded
      beforehand (as for the oracle) and prepared once per batch for both layers."""
      thr = {}
      for layer in LAYERS:
        a = acts[layer]
        st = quantile_lib.threshold_init(a.shape[-1], a.shape[0] * a.shape[1] * a.shape[2],
                                         quantile_lib.DEFAULT_Q)
        for s in range(0, len(a), bs):
          st = quantile_lib.threshold_update(st, a[s:s + bs])
        thr[layer] = quantile_lib.threshold_finalize(st)
      tallies = {l: tally_lib.tally_init(acts[l].shape[-1], probe.num_labels,
                                         probe.num_categories) for l in LAYERS}
      for s in range(0, probe.num_images, 64):
        lab = tally_lib.prepare_labels(pixels[s:s + 64], scalars[s:s + 64], probe.num_labels)
        for l in LAYERS:
          tallies[l] = tally_lib.tally_update(tallies[l], acts[l][s:s + 64], thr[l],
                                              labelcat=probe.labelcat, labels=lab)
      return {l: (thr[l], tallies[l], tally_lib.compute_iou(tallies[l], probe.labelcat))
              for l in LAYERS}

    run_kernels()  # compile
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      got = run_kernels()
      times.append(time.perf_counter() - t0)
    kernel_s = min(times)
    rows = []
    oracle_total = 0.0
    for layer in LAYERS:
      a = acts[layer]
      t0 = time.perf_counter()
      a_nuhw = np.moveaxis(a, 3, 1)
      thr_o = oracle.thresholds(a_nuhw, quantile_lib.DEFAULT_Q)
      t_o = oracle.tally(a_nuhw, thr_o, pixels, scalars, probe.labelcat)
      iou_o = oracle.iou(t_o, probe.labelcat)
      oracle_s = time.perf_counter() - t0
      oracle_total += oracle_s
      thr, t, iou = got[layer]
      exact = (np.array_equal(thr, thr_o) and np.array_equal(iou, iou_o)
               and all(np.array_equal(np.asarray(getattr(t, k)), v) for k, v in t_o.items()))
      active = float((a.reshape(len(a), -1, a.shape[-1]).max(1) > thr).mean())
      rows.append((layer, a.shape[1:], active, oracle_s, exact))
    acts.clear()  # the scaling runs below happen in child processes

    lines = [
        f"ResNet18 (random weights), synthetic probe set, {probe.num_images} images, "
        f"label maps {probe.seg_size[0]}×{probe.seg_size[1]}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform} × {len(jax.devices())}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
        "| layer | h×w×U | active (image, unit) pairs | NumPy oracle s | identical to oracle |",
        "|---|---|---|---|---|",
    ]
    for layer, shape, active, o, exact in rows:
      lines.append(f"| {layer} | {'×'.join(map(str, shape))} | {active:.1%} | {o:.2f} | {exact} |")
    lines += ["", f"Threshold + tally + IoU, both layers: NumPy oracle {oracle_total:.2f} s, "
              f"nemjax {kernel_s:.3f} s (best of 3) → **{oracle_total / kernel_s:.1f}×**"]
    lines += ["", "End to end (model forward + thresholds + tally + IoU, both layers): "
              f"`dissect` (default: activations within the 1 GiB budget, one forward pass) "
              f"{default_s:.1f} s = {probe.num_images / default_s:.1f} images/s; "
              f"`max_ram_bytes=0` (streaming, two forward passes) {streaming_s:.1f} s = "
              f"{probe.num_images / streaming_s:.1f} images/s; `keep_activations=True` (one "
              f"pass, activations stored) {kept_s:.1f} s = {probe.num_images / kept_s:.1f} "
              "images/s"]
    print("\n".join(lines), flush=True)
    if args.scaling:
      lines += scaling_rows(probe_dir, tmp, scales, bs)
  text = "\n".join(lines)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
