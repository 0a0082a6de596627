"""Small numerical building blocks shared by the kernels (NumPy only; imports nothing above).

- :mod:`nemjax.ops.resample`  Pillow's BILINEAR resampling coefficients (both directions), as
                              per-output tap tables and as dense matrices.
"""
from nemjax.ops import resample
from nemjax.ops.resample import TapTable, pillow_coeffs, resample_matrix, tap_table

__all__ = ["resample", "TapTable", "pillow_coeffs", "resample_matrix", "tap_table"]
