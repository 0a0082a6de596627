"""Probe-set corruption sweeps (Srivastava et al.): which images to poison, exact incremental
re-dissection, delivery as uint8/JPEG, a resumable results store, and Broden export.

The orchestration lives in :mod:`nemjax.sweep.pgd_sweep` and :mod:`nemjax.sweep.noise_sweep`;
``experiments/*.py`` only parse flags and call them.
"""
