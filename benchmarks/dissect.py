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

  def run_kernels():
    """Thresholds (streaming, batch by batch) + tally + IoU of both layers; labels decoded
    beforehand (as for the oracle) and prepared once per batch for both layers."""
    out = {}
    thr = {}
    for layer in layers:
      a = acts[layer]
      st = quantile_lib.threshold_init(a.shape[-1], a.shape[0] * a.shape[1] * a.shape[2], 0.995)
      for s in range(0, len(a), args.batch_size):
        st = quantile_lib.threshold_update(st, a[s:s + args.batch_size])
      thr[layer] = quantile_lib.threshold_finalize(st)
    tallies = {l: tally_lib.tally_init(acts[l].shape[-1], probe.num_labels, probe.num_categories)
               for l in layers}
    for s in range(0, probe.num_images, 64):
      lab = tally_lib.prepare_labels(pixels[s:s + 64], scalars[s:s + 64], probe.num_labels)
      for l in layers:
        tallies[l] = tally_lib.tally_update(tallies[l], acts[l][s:s + 64], thr[l],
                                            labelcat=probe.labelcat, labels=lab)
    for l in layers:
      out[l] = (thr[l], tallies[l], tally_lib.compute_iou(tallies[l], probe.labelcat))
    return out

  run_kernels()  # compile
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    got = run_kernels()
    times.append(time.perf_counter() - t0)
  kernel_s = min(times)
  rows = []
  oracle_total = 0.0
  for layer in layers:
    a = acts[layer]
    t0 = time.perf_counter()
    a_nuhw = np.moveaxis(a, 3, 1)
    thr_o = oracle.thresholds(a_nuhw, 0.995)
    t_o = oracle.tally(a_nuhw, thr_o, pixels, scalars, probe.labelcat)
    iou_o = oracle.iou(t_o, probe.labelcat)
    oracle_s = time.perf_counter() - t0
    oracle_total += oracle_s
    thr, t, iou = got[layer]
    exact = (np.array_equal(thr, thr_o) and np.array_equal(iou, iou_o)
             and all(np.array_equal(np.asarray(getattr(t, k)), v) for k, v in t_o.items()))
    active = float((a.reshape(len(a), -1, a.shape[-1]).max(1) > thr).mean())
    rows.append((layer, a.shape[1:], active, oracle_s, exact))

  lines = [
      f"ResNet18 (random weights), synthetic probe set, {probe.num_images} images, "
      f"label maps {probe.seg_size[0]}×{probe.seg_size[1]}, jax {jax.__version__}, "
      f"{jax.devices()[0].platform} × {len(jax.devices())}",
      "",
      "| layer | h×w×U | active (image, unit) pairs | NumPy oracle s | identical to oracle |",
      "|---|---|---|---|---|",
  ]
  for layer, shape, active, o, exact in rows:
    lines.append(f"| {layer} | {'×'.join(map(str, shape))} | {active:.1%} | {o:.2f} | {exact} |")
  lines += ["", f"Threshold + tally + IoU, both layers: NumPy oracle {oracle_total:.2f} s, nemjax "
            f"{kernel_s:.3f} s (best of 3) → **{oracle_total / kernel_s:.1f}×**"]
  lines += ["", f"End to end (`dissect`, model forward + thresholds + tally + IoU, both layers): "
            f"{end_to_end:.1f} s = {probe.num_images / end_to_end:.1f} images/s"]
  text = "\n".join(lines)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
