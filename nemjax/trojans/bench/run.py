"""Casper's trojan-rediscovery benchmark end to end: implant, attribution benchmark, synthesis
benchmark, files. What ``experiments/trojan_bench.py`` runs.

``run(config, out, default=...)``: :func:`nemjax.trojans.implant` (checkpoints under
``OUT/checkpoints``), then per patch trojan :func:`~nemjax.trojans.bench.attribution.score_trojan`
and per trojan and tool :func:`~nemjax.trojans.bench.synthesis.synthesize`; each finished stage
is stored (``OUT/stages/*.npz``) so a killed run resumes where it stopped. ``OUT/config.json``
guards the settings (another configuration on the same ``OUT`` is refused, naming the fields).

Writes ``implant.json``, ``attribution.csv`` (one row per trojan, image and method),
``attribution_summary.csv``, ``synthesis.csv``, ``results.md`` (the three tables),
``boxplot.png``, ``panel_attribution_<trojan>.png`` (triggered image, trigger mask, each
method's map), ``panel_synthesis_<trojan>.png`` (trigger, each tool's images), ``summary.json``.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nemjax import models, preprocess
from nemjax.files import atomic_write_bytes, atomic_write_text, check_record, write_json
from nemjax.metrics.clip import penultimate_embedder
from nemjax.sweep.keys import item_key
from nemjax.trojans.bench import attribution as A
from nemjax.trojans.bench import report as R
from nemjax.trojans.bench import synthesis as S
from nemjax.trojans.bench.config import TrojanBenchConfig
from nemjax.trojans.config import PatchTrojan
from nemjax.trojans.implant import implant, trojaned_model
from nemjax.trojans.measure import heldout_sets, load_data

__all__ = ["run"]


def _stage(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """``compute()`` once: its arrays are stored at ``path`` (.npz) and read back on a re-run."""
  if path.exists():
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  arrays = compute()
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())
  return arrays


def run(config: TrojanBenchConfig, out_dir: str | os.PathLike, *, default: Any,
        progress: bool = True, log: Callable[[str], None] = print, **_: Any) -> dict:
  """The benchmark on the embedded default (``default``: the built
  :class:`nemjax.embedded.EmbeddedDefault`); returns the summary (tables as markdown)."""
  t0 = time.time()
  out = Path(out_dir)
  (out / "stages").mkdir(parents=True, exist_ok=True)
  record = config.to_json()
  check_record(out / "config.json", record, what="a trojan benchmark")
  write_json(out / "config.json", record)
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  data = load_data(default.train_dir, default.heldout_dir)
  model = checkpoint.load(default.checkpoint_dir)
  res = implant(model, data, config.trojan, out / "checkpoints", progress=progress, log=log)
  implant_json = {"before": res.before.to_json(), "after": res.after.to_json(),
                  "steps": res.steps, "train_seconds": res.train_seconds}
  write_json(out / "implant.json", implant_json)
  t_implant = time.time() - t0
  normalize = preprocess.from_unit_interval_netdissect
  att, syn = config.attribution, config.synthesis
  apply_fn, params = models.pure_apply(trojaned_model(model, res.params), taps=(att.layer,))
  sets = heldout_sets(data.heldout, res.armed, config.trojan.seed)

  # ---- attribution benchmark (patch trojans)
  t1 = time.time()
  patch = [a for a in res.armed if isinstance(a.spec, PatchTrojan)]
  per_image, scores, per_trojan, seconds, functions = [], {}, {}, {}, {}
  for a in patch:
    name, s = a.spec.name, sets[a.spec.name]
    n = min(att.images, len(s.rows))
    log(f"attribution: trojan {name}, {n} images")

    def compute(s=s, n=n, a=a):
      r = A.score_trojan(apply_fn, params, s.images[:n], s.masks[:n], a.spec.target, att,
                         item_key(config.seed, "bench/attribution", a.spec.name), normalize,
                         keep_maps=config.panel_images, log=log, functions=functions)
      return {**{f"scores/{m}": v.scores for m, v in r.items()},
              **{f"maps/{m}": v.maps for m, v in r.items()},
              **{f"seconds/{m}": np.float64(v.seconds_per_image) for m, v in r.items()}}

    st = _stage(out / "stages" / f"attribution_{name}.npz", compute)
    per_trojan[name] = {m: float(st[f"scores/{m}"].mean()) for m in att.methods}
    for m in att.methods:
      scores.setdefault(m, []).append(st[f"scores/{m}"])
      seconds.setdefault(m, []).append(float(st[f"seconds/{m}"]))
      per_image += [{"trojan": name, "image": int(s.rows[i]), "method": m,
                     "pearson": float(v)} for i, v in enumerate(st[f"scores/{m}"])]
    k = config.panel_images
    if k:
      R.attribution_panel(out / f"panel_attribution_{name}.png", s.images[:k], s.masks[:k],
                          {m: st[f"maps/{m}"] for m in att.methods},
                          f"trojan {name} (target {a.spec.target}): maps for the target class")
  pooled = {m: np.concatenate(v) for m, v in scores.items()}
  summary_rows = A.summarise(pooled, att.baseline, att.alpha) if pooled else []
  for r in summary_rows:
    r["ms_per_image"] = 1e3 * float(np.mean(seconds[r["method"]]))
  if pooled:
    R.write_csv(out / "attribution.csv", per_image)
    R.write_csv(out / "attribution_summary.csv", summary_rows)
    R.boxplot(out / "boxplot.png", pooled, att.baseline)
  t_attr = time.time() - t1

  # ---- synthesis benchmark (every trojan with a trigger)
  t2 = time.time()
  armed = [a for a in res.armed if a.trigger is not None]
  syn_scores: dict[str, np.ndarray] = {}
  if syn.tools and armed:
    emb_apply, emb_state = models.pure_apply(model, taps=(syn.embedder_layer,))
    embedder = penultimate_embedder(lambda st_, x: emb_apply(st_, normalize(x)), emb_state,
                                    syn.embedder_layer)

    def apply01(p, x):
      return apply_fn(p, normalize(x))[0]

    clean = data.heldout.images[:syn.images].astype(np.float32) / 255.0
    key = item_key(config.seed, "bench/synthesis")
    true, distractors = S.option_sets(armed, syn, key)
    made: dict[str, list[np.ndarray]] = {t: [] for t in syn.tools}
    for a in armed:
      log(f"synthesis: trojan {a.spec.name}")
      st = _stage(out / "stages" / f"synthesis_{a.spec.name}.npz", lambda a=a: {
          t: S.synthesize(t, apply01, params, a, clean, embedder, syn, key) for t in syn.tools})
      for t in syn.tools:
        made[t].append(st[t])
      R.synthesis_panel(out / f"panel_synthesis_{a.spec.name}.png", S.trigger_image(a),
                        {t: st[t] for t in syn.tools}, f"trojan {a.spec.name}: synthesis")
    syn_scores = S.score_tools(made, true, distractors, embedder)
    R.write_csv(out / "synthesis.csv", [
        {"tool": t, "trojan": a.spec.name, "credit": float(v[i])}
        for t, v in syn_scores.items() for i, a in enumerate(armed)])
  t_syn = time.time() - t2

  tables = {"implant": R.implant_table(implant_json["before"], implant_json["after"])}
  if summary_rows:
    tables["attribution"] = R.attribution_table(summary_rows, per_trojan, att.baseline, att.alpha)
  if syn_scores:
    tables["synthesis"] = R.synthesis_table(syn_scores, [a.spec.name for a in armed])
  text = "\n".join(f"## {k}\n\n{v}" for k, v in tables.items())
  atomic_write_text(out / "results.md", "# Trojan-rediscovery benchmark\n\n" + text)
  summary = {"implant": implant_json, "attribution": summary_rows,
             "synthesis": {t: v.tolist() for t, v in syn_scores.items()},
             "seconds": {"implant": t_implant, "attribution": t_attr, "synthesis": t_syn,
                         "total": time.time() - t0}, "table": text}
  write_json(out / "summary.json", summary)
  return summary
