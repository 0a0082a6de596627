"""act-avg PGD sweep throughput: nemjax's sweep against a PyTorch re-statement of the original
pipeline, side by side in one run, and the per-stage time split of nemjax's sweep.

    .venv/bin/python benchmarks/sweep.py --out sweep.md            # 320 and 1,280 images
    .venv/bin/python benchmarks/sweep.py --images 5120 --out s.md  # the largest probe set
    .venv/bin/python benchmarks/sweep.py --profile profile.json    # the split only (320 images)
    .venv/bin/python benchmarks/sweep.py --profile p.json --baseline-rev REV  # before / after
    .venv/bin/python benchmarks/sweep.py --quick                   # smoke run: 64 images, 2 units

Both sides attack the same ResNet18 (random weights from ``tests/torch_models.py``, converted
with ``nemjax.convert``) at ``layer4`` on the same synthetic probe set
(``nemjax.data.synthetic.make_probe_set``, 224² images, 112² labels, cached under --cache): the
same units, ε, mode (U2, random target), steps (step 2ε/steps) and the same poisoned rows (the
sweep's ``concept`` order, at most 10 % of the probe set), masks from the ground-truth labels.

- nemjax: :func:`nemjax.sweep.pgd_sweep.run_pgd_sweep` into a fresh directory (its attacks
  compile in every run, so compile time is counted), minus its clean dissection (timed apart).
- PyTorch, the original pipeline (Srivastava et al.'s public code re-dissects the whole
  corrupted probe set per attack): per unit and ε, concept masks from the labels (NumPy), the
  paper's PGD on the poisoned images (``F.interpolate``, per-image act-avg loss,
  ``autograd.grad``, sign step, clamp; channels-last, ``torch.set_num_threads(2)``), then the
  whole probe set forward again with the poisoned images swapped in, the attacked unit's
  threshold (``np.quantile``) and its tally, IoU and best label with the NumPy pieces of
  ``tests/oracle_netdissect.py`` (one unit: generous to PyTorch).

``--baseline-rev`` (with ``--profile``): the same split for the nemjax of a git revision
(``git archive`` into a temporary directory) and for the working tree, each run in a fresh
process, alternating, best of --reps by attack-phase time.

Sides alternate run by run (best of --reps); attacks per hour = attacks / attack-phase seconds.
The rows of both sides are compared (same new label in how many attacks): PGD differs in float
rounding between frameworks, so a few labels may differ.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
# the nemjax to measure: this tree's, or a --baseline-rev copy's (set for the worker process)
sys.path.insert(0, os.environ.get("NEMJAX_BENCH_ROOT", str(REPO)))

import _sidebyside  # noqa: E402

LAYER = "layer4"


def probe_dir(cache: Path, n: int) -> Path:
  """The cached synthetic probe set of ``n`` images (made on first use)."""
  from nemjax.data.synthetic import make_probe_set
  d = cache / f"probe{n}"
  if not (d / "index.csv").exists():
    make_probe_set(d, num_images=n, overwrite=True)
  return d


def models(seed: int = 0):
  """(torch ResNet18 in eval mode, channels-last, the same weights as a nemjax model)."""
  import torch
  import torch_models
  from nemjax import convert
  torch.manual_seed(seed)
  tm = torch_models.randomize_(torch_models.build("resnet18", 365), seed=seed).eval()
  for p in tm.parameters():
    p.requires_grad_(False)
  model = convert.convert_state_dict("resnet18", {k: v.detach().numpy()
                                                  for k, v in tm.state_dict().items()})
  return tm.to(memory_format=torch.channels_last), model


def sweep_config(args):
  from nemjax.preprocess import eps_from_255
  from nemjax.sweep.config import PGDAttack, PGDSweepConfig, ProbePass
  return PGDSweepConfig(
      layers=(LAYER,), units={LAYER: tuple(args.units)}, modes=("u2",),
      attack=PGDAttack(eps=tuple(eps_from_255(e) for e in args.eps), steps=args.steps),
      probe_pass=ProbePass(batch_size=32), units_per_call=args.units_per_call)


def run_nemjax(model, probe, config, timer=None) -> tuple[float, list[dict], dict]:
  """One fresh sweep: (attack-phase seconds, result rows, timer report)."""
  from nemjax.sweep import pgd_sweep
  from nemjax.sweep.profile import StageTimer
  from nemjax.sweep.store import ResultsStore
  timer = StageTimer() if timer is None else timer
  with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    pgd_sweep.run_pgd_sweep(model, probe, config, Path(out), progress=False, timer=timer)
    wall = time.perf_counter() - t
    rows = ResultsStore(Path(out) / "results.csv", pgd_sweep.RESULT_FIELDS,
                        pgd_sweep.KEY_FIELDS).finish([])
  setup = sum(timer.seconds.get(k, 0.0) for k in ("clean dissection", "labels + layer set-up"))
  import resource
  return wall - setup, rows, timer.report(
      attack_phase_s=wall - setup,
      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class TorchPipeline:
  """The original pipeline in PyTorch + NumPy: attack, then re-dissect the whole probe set."""

  def __init__(self, tm, probe, labels, plans, eps_list, steps: int, batch_size: int = 32):
    import torch
    from nemjax.data import loader
    self.torch, self.tm, self.probe = torch, tm, probe
    self.pixels, self.scalars = labels
    self.images = loader.load_images(probe)  # (N, H, W, 3) uint8
    self.plans, self.eps_list, self.steps, self.bs = plans, eps_list, steps, batch_size
    self.mean = torch.tensor([124.6901, 118.6897, 109.5388]).view(1, 3, 1, 1)

  def features(self, x01):
    """(B, 3, H, W) in [0, 1] -> (B, 512, h, w) layer4 activations (NetDissect normalisation)."""
    m = self.tm
    x = (x01 * 255.0 - self.mean) / (255.0 * 0.224)
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))

  def masks(self, concept: int, rows: np.ndarray) -> np.ndarray:
    """(P, sh, sw) float32: pixels labelled ``concept`` (all of them if an image-level label)."""
    pix, scal = self.pixels[rows], self.scalars[rows]
    m = (pix == concept).any(axis=1) | (scal == concept).any(axis=1)[:, None, None]
    return m.astype(np.float32)

  def pgd(self, x, unit: int, src, tgt, eps: float):
    torch, F = self.torch, self.torch.nn.functional
    alpha = 2 * eps / self.steps

    def losses(z):
      up = F.interpolate(self.features(z)[:, unit:unit + 1], size=src.shape[1:],
                         mode="bilinear", align_corners=False)[:, 0]
      avg = lambda m: (up * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1e-12)
      return avg(src) - avg(tgt)
    xa = x.clone()
    for _ in range(self.steps):
      xa.requires_grad_(True)
      g, = torch.autograd.grad(losses(xa).sum(), xa)
      xa = xa.detach() - alpha * g.sign()
      xa = torch.clamp(x + torch.clamp(xa - x, -eps, eps), 0, 1)
    return xa

  def redissect(self, unit: int, rows: np.ndarray, x_adv: np.ndarray, top_fraction: float):
    """Best label of ``unit`` on the whole probe set with ``rows`` replaced by ``x_adv``."""
    import oracle_netdissect as oracle
    torch = self.torch
    acts = []
    where = {int(r): i for i, r in enumerate(rows)}
    with torch.no_grad():
      for s in range(0, len(self.images), self.bs):
        x = self.images[s:s + self.bs].astype(np.float32) / np.float32(255.0)
        for i in range(s, s + len(x)):
          if i in where:
            x[i - s] = x_adv[where[i]]
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        acts.append(self.features(xt)[:, unit:unit + 1].numpy())
    acts = np.concatenate(acts)  # (N, 1, h, w)
    thr = oracle.thresholds(acts, 1 - top_fraction)
    t = oracle.tally(acts, thr, self.pixels, self.scalars, self.probe.labelcat)
    best = oracle.best_labels(oracle.iou(t, self.probe.labelcat), self.probe.primary_category,
                              self.probe.num_categories)
    return int(best["best_label"][0])

  def run(self, top_fraction: float) -> tuple[float, dict]:
    """(seconds, {(unit, ε): new label}) of every planned attack."""
    torch = self.torch
    t, labels = time.perf_counter(), {}
    for eps in self.eps_list:
      for unit, src, tgt, rows in self.plans:
        x = torch.from_numpy(self.images[rows].astype(np.float32) / np.float32(255.0))
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        sm, tm_ = (torch.from_numpy(self.masks(c, rows)) for c in (src, tgt))
        x_adv = self.pgd(x, unit, sm, tm_, eps).permute(0, 2, 3, 1).numpy()
        labels[(unit, eps)] = self.redissect(unit, rows, x_adv, top_fraction)
    return time.perf_counter() - t, labels


def plans_of(model, probe, config) -> list[tuple[int, int, int, np.ndarray]]:
  """``[(unit, source, target, poisoned rows)]`` as the sweep chooses them (its own code)."""
  from nemjax.sweep import pgd_sweep
  inputs, layers = pgd_sweep.prepare(model, probe, config, None, progress=False)
  data, out = layers[LAYER], []
  for u in config.units[LAYER]:
    src, tgt = int(data.clean.best_label[u]), pgd_sweep.target_for(inputs, data, u, "u2")
    out.append((u, src, tgt, pgd_sweep.poisoned_rows(inputs, data, src, tgt, u)[0]))
  return out


def compare(n: int, args, tm, model) -> dict:
  """Both sides on the probe set of ``n`` images, interleaved, best of ``args.reps``."""
  from nemjax.data import broden, loader
  probe = broden.load_probe(probe_dir(args.cache, n))
  config = sweep_config(args)
  plans = plans_of(model, probe, config)
  torch_side = TorchPipeline(tm, probe, loader.load_labels(probe), plans, config.attack.eps,
                             args.steps)
  n_attacks = len(plans) * len(config.attack.eps)
  res = {"nemjax": [], "torch": []}
  for _ in range(args.reps):
    s, rows, report = run_nemjax(model, probe, config)
    res["nemjax"].append((s, rows, report))
    print(f"  {n} images: nemjax {s:.1f} s for {n_attacks} attacks", flush=True)
    s, labels = torch_side.run(config.probe_pass.top_fraction)
    res["torch"].append((s, labels))
    print(f"  {n} images: torch {s:.1f} s for {n_attacks} attacks", flush=True)
  best_j = min(res["nemjax"], key=lambda r: r[0])
  best_t = min(res["torch"], key=lambda r: r[0])
  same = sum(int(r["new_label"]) == best_t[1][(int(r["unit"]), float(r["eps"]))]
             for r in best_j[1])
  poisoned = float(np.mean([len(p[3]) for p in plans]))
  return dict(images=n, attacks=n_attacks, poisoned=poisoned, nemjax_s=best_j[0],
              torch_s=best_t[0], same_label=same, profile=best_j[2])


def table(results: list[dict], args) -> list[str]:
  import jax
  import torch
  lines = [f"ResNet18 (random weights) at {LAYER}, U2, ε ∈ {{{', '.join(f'{e:g}' for e in args.eps)}}}/255, "
           f"{args.steps} steps, units {list(args.units)}, {args.units_per_call} units per call; "
           f"jax {jax.__version__} {jax.default_backend()}, torch {torch.__version__} "
           f"({args.threads} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
           f"best of {args.reps}, sides interleaved; load average "
           f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", "",
           "| probe images | attacks | poisoned per attack | nemjax s/attack | PyTorch s/attack "
           "| nemjax attacks/h | PyTorch attacks/h | nemjax / PyTorch speed | same new label |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    a = r["attacks"]
    lines.append(f"| {r['images']} | {a} | {r['poisoned']:.1f} | {r['nemjax_s'] / a:.2f} | "
                 f"{r['torch_s'] / a:.2f} | {3600 * a / r['nemjax_s']:.0f} | "
                 f"{3600 * a / r['torch_s']:.0f} | {r['torch_s'] / r['nemjax_s']:.2f}× | "
                 f"{r['same_label']}/{a} |")
  return lines


def profile_lines(report: dict, title: str) -> list[str]:
  total = report["attack_phase_s"]
  lines = [title, "", "| stage | calls | wall s | of which compile s | share of attack phase |",
           "|---|---:|---:|---:|---:|"]
  for s in report["stages"]:
    if s["stage"] in ("clean dissection", "labels + layer set-up"):
      continue
    lines.append(f"| {s['stage']} | {s['calls']} | {s['wall_s']:.2f} | {s['compile_s']:.2f} | "
                 f"{100 * s['wall_s'] / total:.1f} % |")
  lines.append(f"| attack phase (all of the above + loop) | | {total:.2f} | | 100 % |")
  if "peak_rss_mib" in report:
    lines.append(f"\npeak RSS of the process: {report['peak_rss_mib']:.0f} MiB")
  return lines


def profile_sides(args, n: int) -> None:
  """``--profile``: the split of the working tree's sweep (and of ``--baseline-rev``'s),
  each run in a fresh process, alternating; best of --reps by attack-phase time."""
  import subprocess
  probe_dir(args.cache, n)  # made once, before any timing
  sides = {"working tree": REPO}
  with tempfile.TemporaryDirectory() as tmp:
    if args.baseline_rev:
      base = Path(tmp) / "base"
      base.mkdir()
      archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "nemjax"],
                               check=True, capture_output=True).stdout
      subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
      sides = {f"nemjax at {args.baseline_rev}": base, **sides}
    best: dict[str, dict] = {}
    for rep in range(args.reps):
      for label, root in sides.items():
        out = Path(tmp) / f"{rep}_{len(best)}.json"
        cmd = [sys.executable, __file__, "--profile-worker", *sys.argv[1:], "--profile", str(out)]
        env = dict(os.environ, NEMJAX_BENCH_ROOT=str(root))
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
        print(f"  {label}: attack phase {report['attack_phase_s']:.1f} s", flush=True)
        if label not in best or report["attack_phase_s"] < best[label]["attack_phase_s"]:
          best[label] = report
  lines = []
  attacks = len(args.units) * len(args.eps)
  for label, report in best.items():
    lines += profile_lines(report, f"{label}: {n} images, {attacks} attacks, best of "
                                   f"{args.reps}, load average {os.getloadavg()[0]:.1f}") + [""]
  args.profile.write_text(json.dumps(best, indent=1) + "\n")
  _sidebyside.emit(lines, args.out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--images", default="320,1280", help="probe-set sizes, comma-separated")
  ap.add_argument("--units", type=int, nargs="+", default=[3, 17, 42, 77, 100, 211, 300, 480],
                  help="layer4 units attacked")
  ap.add_argument("--eps", type=float, nargs="+", default=[4.0], help="ε values in /255")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--units-per-call", type=int, default=4)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--xla-flags", default="--xla_cpu_experimental_ynn_fusion_type=",
                  help="XLA_FLAGS (the experiment scripts' default)")
  ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nemjax_sweepbench")
  ap.add_argument("--profile", type=Path, default=None,
                  help="only profile nemjax's sweep on the first --images size; write JSON here")
  ap.add_argument("--baseline-rev", default=None,
                  help="with --profile: also profile this git revision's nemjax, interleaved")
  ap.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--quick", action="store_true", help="64 images, 2 units, 2 steps, 1 rep")
  ap.add_argument("--out", default=None, help="also write the markdown tables to this file")
  args = ap.parse_args()
  if args.quick:
    args.images, args.units, args.steps, args.reps = "64", [3, 17], 2, 1
  try:
    sizes = [int(s) for s in args.images.split(",")]
  except ValueError:
    raise SystemExit(f"--images: comma-separated integers, got {args.images!r}") from None
  if min(sizes) < 16 or args.steps < 1 or args.reps < 1 or args.units_per_call < 1:
    raise SystemExit("--images >= 16, --steps, --reps and --units-per-call >= 1")
  _sidebyside.set_up(argparse.Namespace(xla_flags=args.xla_flags, threads=args.threads))
  args.cache.mkdir(parents=True, exist_ok=True)
  if args.profile is not None and not args.profile_worker:
    return profile_sides(args, sizes[0])
  tm, model = models()
  if args.profile is not None:
    from nemjax.data import broden
    probe = broden.load_probe(probe_dir(args.cache, sizes[0]))
    _, _, report = run_nemjax(model, probe, sweep_config(args))
    lines = profile_lines(report, f"nemjax sweep, {sizes[0]} images, "
                          f"{len(args.units) * len(args.eps)} attacks")
    args.profile.write_text(json.dumps(report, indent=1) + "\n")
    _sidebyside.emit(lines, args.out)
    return
  results = [compare(n, args, tm, model) for n in sizes]
  lines = table(results, args)
  for r in results:
    lines += [""] + profile_lines(r["profile"], f"nemjax split, {r['images']} images (best run)")
  _sidebyside.emit(lines, args.out)


if __name__ == "__main__":
  main()
