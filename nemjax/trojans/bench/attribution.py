"""The attribution benchmark: every method's maps of triggered held-out images, scored by their
pixel-wise Pearson correlation with the trigger masks, and tested against the edge detector.

For each patch trojan, the first ``settings.images`` of its triggered held-out images
(:func:`nemjax.trojans.heldout_sets`: the same images and masks its ASR is measured on) are
explained for the trojan's target class by every method (one jitted function per method, in
batches of ``settings.batch_size``; keys folded from the seed, the method and the trojan's
names), each map scaled to [−1, 1] (:func:`~nemjax.trojans.bench.scoring.scale_maps`) and
correlated with its mask. A method *beats* the edge detector when the one-sided paired
Wilcoxon signed-rank test of its scores against the baseline's over all scored images is below
``settings.alpha``. GradientSHAP and DeepLIFT-SHAP take ``settings.shap_baselines`` uniform
grey images (0 to 1, evenly spaced) as their baseline distribution; the other methods Captum's default baseline (0 in model-input
space).
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import explain
from nemjax.fooling.maps import maps_of
from nemjax.trojans.bench.config import AttributionSettings
from nemjax.trojans.bench.scoring import pearson, scale_maps, wilcoxon

__all__ = ["KEYED", "MethodScores", "map_function", "score_trojan", "summarise"]

KEYED = ("smoothgrad", "gradient_shap", "feature_permutation", "shapley_value_sampling", "lime",
         "kernel_shap")
_SHAP_BASELINES = ("gradient_shap", "deeplift_shap")


class MethodScores(NamedTuple):
  """One method on one trojan."""
  scores: np.ndarray        # (n,) Pearson correlation per image
  maps: np.ndarray          # (p, H, W) scaled maps of the first p images (panels)
  seconds_per_image: float  # wall time per image, compile excluded


def map_function(method: str, apply_fn: Callable, settings: AttributionSettings,
                 image_size: int, normalize: Callable
                 ) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
  """Jitted ``(params, x (N,S,S,3) model inputs, target (N,), key) -> maps (N, S, S)`` (the
  key is an argument, so every trojan reuses one compiled program)."""
  opts = settings.method_options(method, image_size)
  if method in _SHAP_BASELINES:
    grey = jnp.linspace(0.0, 1.0, settings.shap_baselines)[:, None, None, None]
    opts["baselines"] = normalize(jnp.broadcast_to(
        grey, (settings.shap_baselines, image_size, image_size, 3)))

  def fn(p, x, t, key):
    keyed = {"key": jax.random.fold_in(key, zlib.crc32(method.encode()))} if method in KEYED \
        else {}
    return explain.explain(method, apply_fn, p, x, t, **opts, **keyed)

  return jax.jit(fn)


def score_trojan(apply_fn: Callable, params: Any, images: np.ndarray, masks: np.ndarray,
                 target: int, settings: AttributionSettings, key: jax.Array,
                 normalize: Callable, keep_maps: int = 0,
                 log: Callable[[str], None] = print,
                 functions: dict[str, Callable] | None = None) -> dict[str, MethodScores]:
  """Every method of ``settings`` on one trojan's triggered images.

  Args:
    apply_fn: ``(params, model inputs) -> logits`` or ``(logits, {tap: acts})`` (the layer of
      Grad-CAM among the taps).
    params: the trojaned model's parameters.
    images: ``(n, S, S, 3)`` float32 triggered images in [0, 1].
    masks: ``(n, S, S)`` their trigger masks.
    target: the trojan's target class (the class explained).
    settings: methods and their options.
    key: this trojan's key (each method folds its name in).
    normalize: images in [0, 1] -> model inputs.
    keep_maps: scaled maps kept per method (for the panels).
    functions: ``{method: map_function(...)}`` reused across trojans (built here if missing).

  Returns:
    ``{method: MethodScores}`` in the order of ``settings.methods``.
  """
  n, size = len(images), int(images.shape[1])
  targets = np.full((n,), target, np.int32)
  out = {}
  functions = {} if functions is None else functions
  for method in settings.methods:
    if method not in functions:
      functions[method] = map_function(method, apply_fn, settings, size, normalize)
    fn = lambda p, x, t, f=functions[method]: f(p, x, t, key)
    b = min(settings.batch_size, n)
    maps_of(fn, params, images[:b], targets[:b], normalize, b)       # compile
    t0 = time.perf_counter()
    maps = maps_of(fn, params, images, targets, normalize, b)
    sec = (time.perf_counter() - t0) / n
    if not np.all(np.isfinite(maps)):
      raise ValueError(f"attribution.methods: {method} gave non-finite maps")
    out[method] = MethodScores(pearson(maps, masks), scale_maps(maps[:keep_maps]).astype(
        np.float32), sec)
    log(f"  {method}: mean Pearson {out[method].scores.mean():+.3f} ({sec * 1e3:.1f} ms/image)")
  return out


def summarise(scores: dict[str, np.ndarray], baseline: str, alpha: float) -> list[dict]:
  """One row per method: mean / median Pearson over every scored image (all trojans pooled),
  and the one-sided Wilcoxon test against ``baseline``.

  Args:
    scores: ``{method: (n,) scores}``, the same images in the same order for every method.
    baseline: the method tested against (the edge detector).
    alpha: the test's level.

  Returns:
    Rows ``{method, n, mean, median, std, wilcoxon_p, beats_baseline}``, best mean first.
  """
  base = scores[baseline]
  rows = []
  for m, s in scores.items():
    test = wilcoxon(s, base, "greater") if m != baseline else None
    p = float("nan") if test is None else test.pvalue
    rows.append({"method": m, "n": int(s.size), "mean": float(np.mean(s)),
                 "median": float(np.median(s)), "std": float(np.std(s)), "wilcoxon_p": p,
                 "beats_baseline": bool(p < alpha)})
  return sorted(rows, key=lambda r: -r["mean"])
