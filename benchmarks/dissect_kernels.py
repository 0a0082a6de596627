"""Network Dissection kernels vs the plain NumPy oracle: threshold + tally + IoU per layer.

Run: ``.venv/bin/python benchmarks/dissect_kernels.py [--images 320] [--scales 1,4,16]
[--out FILE.md]`` (about 3-4 minutes on 2 CPU cores, most of it the oracle; ``--quick`` for a
smoke run). The tables are markdown; ``--out`` also writes them to a file.

Inputs are synthetic but shaped like the real thing: ResNet18-like activations (ReLU of
spatially correlated Gaussian fields with per-unit gain/bias, many exact zeros) at layer3
(14x14x256) and layer4 (7x7x512), and Broden-like label maps (112x112, 4 label layers of
random blobs, ~5-8 labels per image out of 60, plus image-level labels). For each layer the
table gives the time of (a) the oracle (``tests/oracle_netdissect.py``: ``np.quantile`` +
per-image/per-unit loop as in NetDissect-Lite) and (b) nemjax's streaming thresholds +
sparse tally + IoU, with outputs checked equal (kernel: best of 5 runs, compiled). A second
table shares the label preparation of each batch between the two layers, as a driver
dissecting several layers does (``prepare_labels`` + ``tally_update(..., labels=...)``).
Then the kernel alone on 4x and 16x the images (oracle only at 1x), each in a fresh process
with activations generated batch by batch, with peak RSS: linear time, flat memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nemjax.dissect import quantile as quantile_lib  # noqa: E402
from nemjax.dissect import tally as tally_lib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracle_netdissect as oracle  # noqa: E402

LAYERS = {"layer3": (14, 256), "layer4": (7, 512)}
NUM_LABELS = 61  # 60 labels + label 0
NUM_CATS = 5  # 4 pixel categories + 1 image-level category
SEG = 112
K = 4
BATCH = 64


def _smooth(x: np.ndarray, axis: int, taps=(0.25, 0.5, 0.25), reps: int = 2) -> np.ndarray:
  for _ in range(reps):
    x = sum(t * np.roll(x, s, axis=axis) for t, s in zip(taps, (-1, 0, 1)))
  return x


def make_acts(rng: np.random.Generator, n: int, size: int, units: int,
              unit_seed: int = 12345) -> np.ndarray:
  """ReLU of correlated Gaussian fields: (n, size, size, units) float32, NHWC.

  Per-unit gain and bias come from ``unit_seed`` (the same units in every batch), the
  fields and per-image offsets from ``rng``.
  """
  urng = np.random.default_rng(unit_seed + units)
  gain = urng.lognormal(0.0, 0.5, units).astype(np.float32)
  bias = urng.normal(-0.7, 0.6, units).astype(np.float32)
  z = rng.standard_normal((n, size, size, units), dtype=np.float32)
  z = _smooth(_smooth(z, 1), 2)
  z /= np.float32(0.2734)  # unit variance after the two 2-pass smoothings
  img = rng.standard_normal((n, 1, 1, units), dtype=np.float32) * 0.5  # per-image offsets
  return np.maximum(gain * (z + img) + bias, 0).astype(np.float32)


def make_labels(rng: np.random.Generator, n: int):
  """Blob label maps (n, K, 112, 112) int32, scalars (n, 2) int32, labelcat, primary."""
  yy, xx = np.mgrid[0:SEG, 0:SEG]
  pix = np.zeros((n, K, SEG, SEG), np.int32)
  per_cat = (NUM_LABELS - 1) // NUM_CATS  # 12 labels per category
  for i in range(n):
    for k in range(K):
      nb = rng.integers(1, 4)
      cy, cx = rng.integers(0, SEG, (2, nb))
      lab = 1 + k * per_cat + rng.integers(0, per_cat, nb)
      d = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
      near = d.argmin(0)
      r = rng.uniform(20, 70, nb)
      inside = d.min(0) < r[near] ** 2 if k else np.ones((SEG, SEG), bool)
      pix[i, k] = np.where(inside, lab[near], 0)
  scal = np.zeros((n, 2), np.int32)
  scal[:, 0] = 1 + 4 * per_cat + rng.integers(0, per_cat, n)
  primary = np.concatenate([[NUM_CATS - 1], np.repeat(np.arange(NUM_CATS), per_cat)])
  labelcat = np.eye(NUM_CATS)[primary]
  return pix, scal, labelcat, primary


def run_oracle(acts, pix, scal, labelcat):
  t0 = time.perf_counter()
  nchw = acts.transpose(0, 3, 1, 2)
  thr = oracle.thresholds(nchw, quantile_lib.DEFAULT_Q)
  t1 = time.perf_counter()
  tl = oracle.tally(nchw, thr, pix, scal, labelcat)
  iou = oracle.iou(tl, labelcat)
  t2 = time.perf_counter()
  return thr, tl, iou, (t1 - t0, t2 - t1)


def run_kernel(acts, pix, scal, labelcat, batch=BATCH, method="auto"):
  """Streaming thresholds, then tally (labels prepared inside, ``method`` as
  ``tally.tally_update`` takes it) and IoU: (thr, state, iou, t)."""
  n, h, w, u = acts.shape
  t0 = time.perf_counter()
  st = quantile_lib.threshold_init(u, n * h * w)
  for s in range(0, n, batch):
    st = quantile_lib.threshold_update(st, acts[s:s + batch])
  thr = quantile_lib.threshold_finalize(st)
  t1 = time.perf_counter()
  ts = tally_lib.tally_init(u, NUM_LABELS, NUM_CATS)
  for s in range(0, n, batch):
    ts = tally_lib.tally_update(ts, acts[s:s + batch], thr, pix[s:s + batch],
                                scal[s:s + batch], labelcat, method=method)
  iou = tally_lib.compute_iou(ts, labelcat)
  t2 = time.perf_counter()
  return thr, ts, iou, (t1 - t0, t2 - t1)


def tally_methods(layer_acts: dict, pix, scal, labelcat, reps: int = 3) -> list[tuple]:
  """Sparse against dense tally on this backend, per layer: best tally+IoU seconds of each,
  whether their tallies are identical, and what ``method='auto'`` picks here."""
  rows = []
  for name, acts in layer_acts.items():
    best, states = {}, {}
    for method in ("sparse", "dense"):
      run_kernel(acts[:BATCH], pix[:BATCH], scal[:BATCH], labelcat, method=method)  # compile
      runs = [run_kernel(acts, pix, scal, labelcat, method=method) for _ in range(reps)]
      best[method] = min(r[3][1] for r in runs)
      states[method] = runs[0][1]
    same = all(np.array_equal(getattr(states["sparse"], f), getattr(states["dense"], f))
               for f in states["sparse"]._fields)
    rows.append((name, best["sparse"], best["dense"], same, min(best, key=best.get),
                 tally_lib.auto_method(jax.default_backend())))
  return rows


def run_shared_labels(layer_acts: dict, thr: dict, pix, scal, labelcat, batch=BATCH):
  """Driver-style tally: labels prepared once per batch for all layers.

  Returns:
    (label preparation seconds, {layer: tally + IoU seconds}).
  """
  states = {k: tally_lib.tally_init(a.shape[-1], NUM_LABELS, NUM_CATS)
            for k, a in layer_acts.items()}
  t_lab, t_layer = 0.0, dict.fromkeys(layer_acts, 0.0)
  n = len(pix)
  for s in range(0, n, batch):
    t = time.perf_counter()
    lab = tally_lib.prepare_labels(pix[s:s + batch], scal[s:s + batch], NUM_LABELS)
    t_lab += time.perf_counter() - t
    for k, a in layer_acts.items():
      t = time.perf_counter()
      states[k] = tally_lib.tally_update(states[k], a[s:s + batch], thr[k], labelcat=labelcat,
                                         labels=lab)
      t_layer[k] += time.perf_counter() - t
  for k in layer_acts:
    t = time.perf_counter()
    tally_lib.compute_iou(states[k], labelcat)
    t_layer[k] += time.perf_counter() - t
  return t_lab, t_layer


def scale_run(layer: str, images: int, base_images: int) -> None:
  """Kernel only on ``images`` images, activations generated batch by batch (two passes, as
  the driver does), labels tiled from ``base_images``; prints one JSON line."""
  import json
  size, units = LAYERS[layer]
  pix, scal, labelcat, _ = make_labels(np.random.default_rng(0), base_images)

  def acts_batch(i):
    return make_acts(np.random.default_rng(1000 + i), BATCH, size, units)

  def lab(i):
    j = (i * BATCH) % base_images
    return pix[j:j + BATCH], scal[j:j + BATCH]

  nb = images // BATCH
  # Warm-up (compilation) on one batch.
  run_kernel(acts_batch(0), *lab(0), labelcat)
  t_thr = t_tally = 0.0
  st = quantile_lib.threshold_init(units, images * size * size)
  for i in range(nb):
    a = acts_batch(i)
    t = time.perf_counter()
    st = quantile_lib.threshold_update(st, a)
    t_thr += time.perf_counter() - t
  t = time.perf_counter()
  thr = quantile_lib.threshold_finalize(st)
  t_thr += time.perf_counter() - t
  ts = tally_lib.tally_init(units, NUM_LABELS, NUM_CATS)
  for i in range(nb):
    a = acts_batch(i)
    p, s = lab(i)
    t = time.perf_counter()
    ts = tally_lib.tally_update(ts, a, thr, p, s, labelcat)
    t_tally += time.perf_counter() - t
  t = time.perf_counter()
  tally_lib.compute_iou(ts, labelcat)
  t_tally += time.perf_counter() - t
  print(json.dumps(dict(layer=layer, images=images, thr=t_thr, tally=t_tally,
                        rss=peak_rss_mib())))


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=320)
  ap.add_argument("--scales", default="1,4,16", help="kernel-only image multiples")
  ap.add_argument("--quick", action="store_true", help="64 images, scales 1,2")
  ap.add_argument("--out", type=Path, help="also write the markdown to this file")
  ap.add_argument("--scale-run", nargs=2, metavar=("LAYER", "IMAGES"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  lines: list[str] = []

  def emit(text: str = "") -> None:
    """Prints ``text`` and keeps it for ``--out``."""
    print(text, flush=True)
    lines.append(text)

  if args.scale_run:
    scale_run(args.scale_run[0], int(args.scale_run[1]), args.images)
    return
  if args.quick:
    args.images, args.scales = 64, "1,2"
  rng = np.random.default_rng(0)
  n = args.images
  pix, scal, labelcat, _ = make_labels(rng, n)
  emit(f"{n} images, labels {pix.shape}, {NUM_LABELS} labels, {NUM_CATS} categories, "
       f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
  rows, all_acts, all_thr = [], {}, {}
  for name, (size, units) in LAYERS.items():
    acts = make_acts(rng, n, size, units)
    othr, otl, oiou, ot = run_oracle(acts, pix, scal, labelcat)
    run_kernel(acts[:BATCH], pix[:BATCH], scal[:BATCH], labelcat)  # compile
    kthr, kts, kiou, kt = min((run_kernel(acts, pix, scal, labelcat) for _ in range(5)),
                              key=lambda r: sum(r[3]))
    same = (np.array_equal(othr, kthr) and np.array_equal(oiou, kiou)
            and all(np.array_equal(otl[f], getattr(kts, f)) for f in otl))
    frac = float((acts > othr).mean())
    rows.append((name, acts.shape, frac, ot, kt, same))
    all_acts[name], all_thr[name] = acts, kthr
  shared = min((run_shared_labels(all_acts, all_thr, pix, scal, labelcat) for _ in range(5)),
               key=lambda r: r[0] + sum(r[1].values()))
  emit("| layer | acts (N,h,w,U) | >thr | oracle thr | oracle tally+IoU | oracle total "
       "| nemjax thr | nemjax tally+IoU | nemjax total | speed-up | exact |")
  emit("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, shape, frac, ot, kt, same in rows:
    emit(f"| {name} | {shape} | {frac:.2%} | {ot[0]:.3f} s | {ot[1]:.3f} s | {sum(ot):.3f} s "
         f"| {kt[0]:.3f} s | {kt[1]:.3f} s | {sum(kt):.3f} s | {sum(ot) / sum(kt):.1f}x "
         f"| {same} |")
  t_lab, t_layer = shared
  emit(f"\nDriver-style: labels prepared once per batch for both layers ({t_lab:.3f} s, "
       f"split evenly):\n")
  emit("| layer | nemjax thr | labels/2 | tally+IoU | total | speed-up vs oracle |")
  emit("|---|---|---|---|---|---|")
  for name, shape, frac, ot, kt, same in rows:
    tot = kt[0] + t_lab / len(rows) + t_layer[name]
    emit(f"| {name} | {kt[0]:.3f} s | {t_lab / len(rows):.3f} s | {t_layer[name]:.3f} s "
         f"| {tot:.3f} s | {sum(ot) / tot:.1f}x |")
  emit(f"\nTally method on this backend ({jax.default_backend()}): tally+IoU, best of 3, "
       "thresholds fixed:\n")
  emit("| layer | sparse | dense | identical | faster | 'auto' picks |")
  emit("|---|---|---|---|---|---|")
  for name, ts, td, same, fast, auto in tally_methods(all_acts, pix, scal, labelcat):
    emit(f"| {name} | {ts:.3f} s | {td:.3f} s | {same} | {fast} ({max(ts, td) / min(ts, td):.1f}x) "
         f"| {auto}{'' if auto == fast else ' (not the faster one here)'} |")
  del all_acts
  emit("\nKernel only, more images (fresh process per run; activations generated per batch, "
       "two passes; labels tiled):\n")
  emit("| layer | images | threshold | tally+IoU | total | per 1k images | peak RSS |")
  emit("|---|---|---|---|---|---|---|")
  import json
  import subprocess
  for name in LAYERS:
    for sc in [int(x) for x in args.scales.split(",")]:
      out = subprocess.run([sys.executable, __file__, "--images", str(n), "--scale-run", name,
                            str(n * sc)], capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      tot = r["thr"] + r["tally"]
      emit(f"| {name} | {r['images']} | {r['thr']:.3f} s | {r['tally']:.3f} s | {tot:.3f} s "
           f"| {tot / r['images'] * 1000:.3f} s | {r['rss']:.0f} MiB |")
  if args.out:
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
