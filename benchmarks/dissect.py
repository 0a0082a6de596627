"""Network Dissection speed: nemjax kernels vs the NumPy oracle on the same activations, and the
whole dissection end to end.

    .venv/bin/python benchmarks/dissect.py [--images 320] [--out FILE.md]

A random-weight ResNet18 (365 classes) is run over a synthetic Broden-format probe set
(224 images, 112 label maps); the activations of layer3 (14×14×256) and layer4 (7×7×512)
are fed (a) to ``tests/oracle_netdissect.py`` — a per-image NumPy loop that, like
NetDissect-Lite, upsamples only the (image, unit) pairs whose max exceeds the threshold — and
(b) to nemjax's threshold + tally + IoU kernels. Both give identical tallies (checked here).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=320)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--out", type=Path)
  args = p.parse_args()

  import jax
  from flax import nnx

  import oracle_netdissect as oracle
  from nemjax.data import broden, loader, synthetic
  from nemjax.dissect import quantile as quantile_lib
  from nemjax.dissect import tally as tally_lib
  from nemjax.dissect.driver import dissect
  from nemjax.models import build

  tmp = Path(tempfile.mkdtemp(prefix="nemjax-bench-"))
  probe = broden.load_probe(synthetic.make_probe_set(tmp / "probe", num_images=args.images, seed=0))
  model = build("resnet18", num_classes=365, rngs=nnx.Rngs(0))
  layers = ["layer3", "layer4"]

  dissect(model, probe, layers, batch_size=args.batch_size, progress=False)  # compile
  t0 = time.perf_counter()
  results, acts = dissect(model, probe, layers, batch_size=args.batch_size, progress=False,
                          keep_activations=True)
  end_to_end = time.perf_counter() - t0
  acts = {k: np.array(v) for k, v in acts.items()}
  pixels, scalars = loader.load_labels(probe, np.arange(probe.num_images))

  rows = []
  for layer in layers:
    a = acts[layer]
    # nemjax: thresholds (streaming, batch by batch) + tally + IoU, labels preloaded
    def run_kernels():
      st = quantile_lib.threshold_init(a.shape[-1], a.shape[0] * a.shape[1] * a.shape[2], 0.995)
      for s in range(0, len(a), args.batch_size):
        st = quantile_lib.threshold_update(st, a[s:s + args.batch_size])
      thr = quantile_lib.threshold_finalize(st)
      t = tally_lib.tally_init(a.shape[-1], probe.num_labels, probe.num_categories)
      for s in range(0, len(a), 64):
        t = tally_lib.tally_update(t, a[s:s + 64], thr, pixels[s:s + 64], scalars[s:s + 64],
                                   probe.labelcat)
      return thr, t, tally_lib.compute_iou(t, probe.labelcat)
    run_kernels()  # compile
    t0 = time.perf_counter()
    thr, t, iou = run_kernels()
    kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    a_nuhw = np.moveaxis(a, 3, 1)
    thr_o = oracle.thresholds(a_nuhw, 0.995)
    t_o = oracle.tally(a_nuhw, thr_o, pixels, scalars, probe.labelcat)
    iou_o = oracle.iou(t_o, probe.labelcat)
    oracle_s = time.perf_counter() - t0
    exact = (np.array_equal(thr, thr_o) and np.array_equal(iou, iou_o)
             and all(np.array_equal(np.asarray(getattr(t, k)), v) for k, v in t_o.items()))
    active = float((a.reshape(len(a), -1, a.shape[-1]).max(1) > thr).mean())
    rows.append((layer, a.shape[1:], active, oracle_s, kernel_s, exact))

  lines = [
      f"ResNet18 (random weights), synthetic probe set, {probe.num_images} images, "
      f"label maps {probe.seg_size[0]}×{probe.seg_size[1]}, jax {jax.__version__}, "
      f"{jax.devices()[0].platform} × {len(jax.devices())}",
      "",
      "| layer | h×w×U | active (image, unit) pairs | NumPy oracle s | nemjax s | speed-up | identical |",
      "|---|---|---|---|---|---|---|",
  ]
  for layer, shape, active, o, k, exact in rows:
    lines.append(f"| {layer} | {'×'.join(map(str, shape))} | {active:.1%} | {o:.2f} | {k:.3f} | "
                 f"{o / k:.1f}× | {exact} |")
  lines += ["", f"End to end (`dissect`, model forward + thresholds + tally + IoU, both layers): "
            f"{end_to_end:.1f} s = {probe.num_images / end_to_end:.1f} images/s"]
  text = "\n".join(lines)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
