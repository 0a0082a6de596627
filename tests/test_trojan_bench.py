"""The trojan-rediscovery benchmark: scoring sanity on a hand-built model that looks only at
one region, the edge detector's score against scipy's Sobel, the Wilcoxon test against
scipy.stats, the shared poisoning budget, and (slow) the multi-trojan implantation and a tiny
end-to-end run of experiments/trojan_bench.py."""
from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from nemjax import trojans as T
from nemjax.trojans import bench as B
from nemjax.trojans.bench.attribution import score_trojan

CACHE = Path("/work/main/cache/embedded")
S = 32                                    # image side of the hand-built model
REGION = (slice(8, 20), slice(12, 24))    # the only pixels it looks at


def _region_mask() -> np.ndarray:
  m = np.zeros((S, S), np.float32)
  m[REGION] = 1.0
  return m


def _region_model(params, x):
  """Logit 0 = Σ w·x over the region (linear, so gradients are exact), logit 1 = −logit 0."""
  z = jnp.sum(x[:, REGION[0], REGION[1], :] * params["w"], axis=(1, 2, 3))
  return jnp.stack([z, -z], axis=-1)


def _images(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.2, 1.0, (n, S, S, 3)).astype(np.float32)


@pytest.fixture(name="region_scores")
def _region_scores():
  methods = ("saliency", "guided_backprop", "integrated_gradients", "input_x_gradient",
             "deeplift", "occlusion", "feature_ablation", "sobel", "blank")
  settings = B.AttributionSettings(methods=methods, images=6, batch_size=3, feature_grid=8,
                                   occlusion_window=4, occlusion_stride=4)
  params = {"w": jnp.ones((12, 12, 3), jnp.float32)}
  x = _images(6)
  masks = np.repeat(_region_mask()[None], 6, 0)
  return score_trojan(_region_model, params, x, masks, 0, settings, jax.random.key(0),
                      lambda v: v, keep_maps=2, log=lambda s: None), x, masks


def test_region_model_exact_methods_score_one_blank_zero(region_scores):
  r, _, _ = region_scores
  for m in ("saliency", "guided_backprop"):          # the indicator of the region itself
    np.testing.assert_allclose(r[m].scores, 1.0, atol=1e-6, err_msg=m)
  for m in ("integrated_gradients", "input_x_gradient", "deeplift"):   # x·w: ≈ the region
    assert r[m].scores.min() > 0.9, (m, r[m].scores)
  for m in ("occlusion", "feature_ablation"):        # windows aligned with the region: exact
    assert r[m].scores.min() > 0.9, (m, r[m].scores)
  np.testing.assert_array_equal(r["blank"].scores, 0.0)   # constant map: 0 by definition
  assert abs(r["sobel"].scores.mean()) < 0.3
  assert r["saliency"].maps.shape == (2, S, S) and np.abs(r["saliency"].maps).max() == 1.0


def test_sobel_score_equals_scipy(region_scores):
  r, x, masks = region_scores
  grey = x.astype(np.float64).mean(-1)
  for i in range(len(x)):
    mag = np.hypot(scipy.ndimage.sobel(grey[i], 0), scipy.ndimage.sobel(grey[i], 1))
    want = np.corrcoef(mag.ravel(), masks[i].ravel())[0, 1]
    np.testing.assert_allclose(r["sobel"].scores[i], want, atol=1e-5)


def test_pearson_and_scaling():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 9, 9)), rng.uniform(size=(4, 9, 9))
  want = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(4)]
  np.testing.assert_allclose(B.pearson(a, b), want, atol=1e-12)
  np.testing.assert_allclose(B.pearson(B.scale_maps(a) * 7.0, b), want, atol=1e-12)
  s = B.scale_maps(np.concatenate([a, np.zeros((1, 9, 9))]))
  assert np.allclose(np.abs(s[:4]).reshape(4, -1).max(1), 1.0) and not s[4].any()
  const = np.ones((2, 9, 9))
  np.testing.assert_array_equal(B.pearson(const, b[:2]), 0.0)
  np.testing.assert_array_equal(B.pearson(a[:2], const), 0.0)
  with pytest.raises(ValueError, match="^masks: "):
    B.pearson(a, b[:, :3])


@pytest.mark.parametrize("n", [6, 40, 120])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_wilcoxon_matches_scipy(n, alternative):
  rng = np.random.default_rng(n)
  x = np.round(rng.normal(size=n), 1)                 # rounding: tied |d|
  y = np.round(rng.normal(size=n) + 0.2, 1)
  y[: n // 5] = x[: n // 5]                           # zero differences (dropped)
  got = B.wilcoxon(x, y, alternative)
  want = scipy.stats.wilcoxon(x, y, alternative=alternative, method="approx")
  assert got.statistic == pytest.approx(want.statistic)
  assert got.pvalue == pytest.approx(want.pvalue, rel=1e-9, abs=1e-15)
  assert got.z == pytest.approx(want.zstatistic, rel=1e-9)


def test_wilcoxon_edge_cases():
  assert np.isnan(B.wilcoxon(np.ones(5), np.ones(5)).pvalue)
  with pytest.raises(ValueError, match="^alternative: "):
    B.wilcoxon(np.ones(3), np.zeros(3), "bigger")
  with pytest.raises(ValueError, match="^y: "):
    B.wilcoxon(np.ones(3), np.zeros(4))


def test_summarise_flags_methods_above_the_baseline():
  rng = np.random.default_rng(0)
  base = rng.normal(0.0, 0.1, 60)
  rows = B.summarise({"good": base + 0.3, "same": base + rng.normal(0, 1e-3, 60),
                      "sobel": base}, "sobel", 0.05)
  got = {r["method"]: r for r in rows}
  assert got["good"]["beats_baseline"] and not got["same"]["beats_baseline"]
  assert rows[0]["method"] == "good" and np.isnan(got["sobel"]["wilcoxon_p"])


def test_shared_rates_divide_the_budget():
  specs = (T.PatchTrojan("a", target=0), T.StyleTrojan("b", target=1))
  x = np.random.default_rng(0).uniform(size=(200, 16, 16, 3)).astype(np.float32)
  y = np.full((200,), 2, np.int32)
  armed = [T.arm(s, 0, 16) for s in specs]
  full = T.poison_batch(0, 3, x, y, armed)
  half = T.poison_batch(0, 3, x, y, armed, rate_scale=0.5)
  assert (half.trojan >= 0).sum() < (full.trojan >= 0).sum()
  assert 0.4 < (half.trojan < 0).mean() < 0.7            # about (1 − 0.25)² clean
  assert T.TrojanConfig().shared_rates


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"^attribution\.methods: "):
    B.TrojanBenchConfig(attribution=B.AttributionSettings(methods=("nope", "sobel")))
  with pytest.raises(ValueError, match=r"^attribution\.baseline: "):
    B.TrojanBenchConfig(attribution=B.AttributionSettings(methods=("saliency",)))
  with pytest.raises(ValueError, match=r"^synthesis\.tools: "):
    B.TrojanBenchConfig(synthesis=B.SynthesisSettings(tools=("cppn",)))
  with pytest.raises(ValueError, match=r"^panel_images: "):
    B.TrojanBenchConfig(panel_images=-1)


def test_options_are_eight_with_the_trigger_first():
  armed = [T.arm(s, 0, 64) for s in B.BENCH_TROJANS]
  true, dis = B.option_sets(armed, B.SynthesisSettings(), jax.random.key(0))
  assert true.shape == (2, 64, 64, 3) and dis.shape == (2, 7, 64, 64, 3)
  np.testing.assert_array_equal(dis[0, 0], true[1])      # the other trojan's trigger
  np.testing.assert_array_equal(dis[1, 0], true[0])


@pytest.fixture(name="embedded_data", scope="module")
def _embedded_data():
  from nemjax.embedded import build_embedded_default  # pylint: disable=import-outside-toplevel
  d = build_embedded_default(CACHE, seed=0, progress=False)
  return T.load_data(d.train_dir, d.heldout_dir), d.checkpoint_dir


@pytest.mark.slow
def test_bench_trojans_implant_with_clean_accuracy_held(embedded_data):
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  data, ckpt = embedded_data
  res = T.implant(checkpoint.load(ckpt), data, B.TrojanBenchConfig().trojan, None,
                  progress=False, log=lambda s: None)
  assert res.after.scores["patch"].asr >= 90.0, res.after
  assert res.after.scores["style"].asr >= 80.0, res.after
  assert abs(res.after.clean_accuracy - res.before.clean_accuracy) <= 3.0, res.after


@pytest.mark.slow
def test_script_end_to_end_and_resume(tmp_path, capsys):
  from cli_helpers import import_script  # pylint: disable=import-outside-toplevel
  mod = import_script("trojan_bench")
  out = tmp_path / "out"
  argv = ["--cache", str(CACHE), "--out", str(out), "--epochs", "1", "--images", "4",
          "--attr-batch-size", "2", "--methods", "saliency", "occlusion", "sobel", "blank",
          "--tools", "adversarial_patch", "visualize_target", "--synthesis-steps", "2",
          "--synthesis-images", "8", "--panel-images", "2", "--no-progress"]
  mod.main(argv)
  for f in ("results.md", "attribution.csv", "attribution_summary.csv", "synthesis.csv",
            "boxplot.png", "panel_attribution_patch.png", "panel_synthesis_patch.png",
            "panel_synthesis_style.png", "implant.json", "summary.json"):
    assert (out / f).exists(), f
  with open(out / "attribution.csv", encoding="utf-8") as fh:
    rows = list(csv.DictReader(fh))
  assert len(rows) == 4 * 4 and {r["method"] for r in rows} == {"saliency", "occlusion",
                                                               "sobel", "blank"}
  with open(out / "synthesis.csv", encoding="utf-8") as fh:
    assert len(list(csv.DictReader(fh))) == 2 * 2
  first = (out / "results.md").read_text()
  capsys.readouterr()
  mod.main(argv)                                      # resumes: every stage stored
  assert (out / "results.md").read_text() == first
