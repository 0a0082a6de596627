"""Small numerical building blocks shared by the kernels (import nothing from nemjax above).

- :mod:`nemjax.ops.resample`  Pillow's BILINEAR resampling coefficients (both directions), as
                              per-output tap tables and as dense matrices (NumPy).
- :mod:`nemjax.ops.interpret` a jaxpr interpreter that re-evaluates a traced function with some
                              primitives substituted (fastgrad's and explain's rewrites).
- :mod:`nemjax.ops.fastgrad`  forward-preserving rewrite of max-pool / strided-stem-conv
                              gradients that avoids XLA:CPU's slow paths (PGD and fine-tuning).
- :mod:`nemjax.ops.adam`      the fixed-length Adam loop of the image optimisations (jittable).
"""
from nemjax.ops import adam, fastgrad, interpret, resample
from nemjax.ops.adam import adam_minimise
from nemjax.ops.fastgrad import cpu_fast_grad
from nemjax.ops.resample import TapTable, pillow_coeffs, resample_matrix, tap_table

__all__ = ["adam", "fastgrad", "interpret", "resample", "adam_minimise", "cpu_fast_grad",
           "TapTable", "pillow_coeffs", "resample_matrix", "tap_table"]
