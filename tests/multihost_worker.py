"""One process of the multi-process tests (tests/test_multihost.py): joins a ``jax.distributed``
run, runs the dissection (three driver paths) and both sweeps on a small probe set, and pickles
what it got to ``OUT/results.<process>.pkl``.

    python tests/multihost_worker.py COORDINATOR N I PROBE_DIR CKPT OUT

``N = 1`` (no coordinator used) gives the single-process reference of the same calls.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

from nemjax import distributed


def run_all(probe_dir: Path, ckpt: Path, out: Path) -> dict:
  """``{name: result}`` of every call the test compares (the same on every process)."""
  from nemjax.data import broden  # pylint: disable=import-outside-toplevel
  from nemjax.dissect import dissect  # pylint: disable=import-outside-toplevel
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  from nemjax.sweep import config as cfg  # pylint: disable=import-outside-toplevel
  from nemjax.sweep.noise_sweep import run_noise_sweep  # pylint: disable=import-outside-toplevel
  from nemjax.sweep.pgd_sweep import run_pgd_sweep  # pylint: disable=import-outside-toplevel
  probe, model = broden.load_probe(probe_dir), checkpoint.load(ckpt)
  layers = ["block3", "block4"]
  res = {
      "ram": dissect(model, probe, layers, batch_size=8, progress=False, num_top_images=3),
      "stream": dissect(model, probe, layers, batch_size=8, progress=False, max_ram_bytes=0,
                        num_top_images=3),
      "keep": dissect(model, probe, ["block4"], batch_size=8, progress=False,
                      keep_activations=True),
  }
  pp = cfg.ProbePass(batch_size=8)
  res["pgd"] = run_pgd_sweep(
      model, probe, cfg.PGDSweepConfig(layers=("block4",), num_units=2, modes=("u2",),
                                       attack=cfg.PGDAttack(eps=(4 / 255, 8 / 255), steps=2),
                                       probe_pass=pp, units_per_call=1),
      out / "pgd", progress=False)
  res["noise"] = run_noise_sweep(
      model, probe, cfg.NoiseSweepConfig(layers=("block4",), sigmas=(0.05,), fractions=(0.5, 1.0),
                                         kinds=("gaussian",), probe_pass=pp),
      out / "noise", progress=False)
  return res


def main(argv: list[str]) -> None:
  coordinator, n, i, probe_dir, ckpt, out = argv
  procs = distributed.initialize(coordinator if int(n) > 1 else None, int(n), int(i))
  out = Path(out)
  res = run_all(Path(probe_dir), Path(ckpt), out)
  (out / f"results.{procs.index}.pkl").write_bytes(pickle.dumps(res))


if __name__ == "__main__":
  main(sys.argv[1:])
