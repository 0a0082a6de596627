"""Network Dissection kernels: exact thresholds, Pillow-exact resizing, tally, IoU.

Pure functions on host/JAX arrays, exact against NetDissect-Lite (see
``/work/shared/spec/netdissect.md``)::

  from nemjax import dissect
  st = dissect.threshold_init(U, total_count=N * h * w)           # q = 1 - 0.005
  for acts in batches: st = dissect.threshold_update(st, acts)    # (B, h, w, U) f32
  thr = dissect.threshold_finalize(st)                            # (U,) f64 == np.quantile

  t = dissect.tally_init(U, num_labels=L + 1, num_categories=C)
  for acts, pixels, scalars, valid in batches:
    t = dissect.tally_update(t, acts, thr, pixels, scalars, labelcat, valid=valid)
  iou = dissect.compute_iou(t, labelcat)                          # (U, L+1) f64
  best = dissect.best_labels(iou, primary_category, C)

  # or in one call, from arrays or any iterable of (acts, pixels, scalars) batches:
  t = dissect.tally_batches(batches, thr, labelcat, layout="NCHW")

The driver runs a model over a probe set and calls these, streaming (host memory does not
grow with the probe set)::

  results = dissect.dissect(model, probe, ["layer3", "layer4"])   # {layer: LayerDissection}
  results["layer4"].best_label                                    # (U,) global label numbers
"""
from nemjax.dissect.driver import (
    LayerDissection,
    dissect,
    make_mesh,
)
from nemjax.dissect.quantile import (
    DEFAULT_Q,
    DEFAULT_TOP_FRACTION,
    NETDISSECT_LITE_Q,
    QUANTILE_METHODS,
    ThresholdState,
    check_top_fraction,
    quantile_of,
    quantile_thresholds,
    required_top_k,
    threshold_finalize,
    threshold_init,
    threshold_update,
)
from nemjax.dissect.tally import (
    BestLabels,
    LabelBatch,
    TallyState,
    best_labels,
    compute_iou,
    floor_to_float32,
    prepare_labels,
    tally_batches,
    tally_init,
    tally_update,
)
from nemjax.dissect.upsample import (
    PillowTaps,
    pillow_coeffs,
    pillow_taps,
    resize_bilinear_pillow,
    upsample_bilinear_pillow,
)

__all__ = [
    "LayerDissection",
    "dissect",
    "make_mesh",
    "DEFAULT_Q",
    "DEFAULT_TOP_FRACTION",
    "NETDISSECT_LITE_Q",
    "QUANTILE_METHODS",
    "ThresholdState",
    "check_top_fraction",
    "quantile_of",
    "quantile_thresholds",
    "required_top_k",
    "threshold_finalize",
    "threshold_init",
    "threshold_update",
    "BestLabels",
    "LabelBatch",
    "TallyState",
    "best_labels",
    "compute_iou",
    "floor_to_float32",
    "prepare_labels",
    "tally_batches",
    "tally_init",
    "tally_update",
    "PillowTaps",
    "pillow_coeffs",
    "pillow_taps",
    "resize_bilinear_pillow",
    "upsample_bilinear_pillow",
]
