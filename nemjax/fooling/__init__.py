"""Fooling explanations by fine-tuning (Heo, Joo & Moon, NeurIPS 2019).

* :mod:`nemjax.fooling.losses`: location / uniform / top-k / centre-mass / active losses on
  heatmaps and the fine-tuning penalty (for :mod:`nemjax.manipulate.penalised`);
* :mod:`nemjax.fooling.metrics`: sign / location / bi-target correlation, entropy, per-image
  fooling scores and the Fooling Success Rate, top-k accuracy;
* :mod:`nemjax.fooling.config`: :class:`FoolingConfig` (frozen, checked when built);
* :mod:`nemjax.fooling.maps`, :mod:`nemjax.fooling.report`: heatmaps of many images and
  methods, the transfer table and PNG panels;
* :mod:`nemjax.fooling.experiment`: the end-to-end run (``experiments/heo_fooling.py``).
"""
from nemjax.fooling import config, losses, metrics
from nemjax.fooling.config import FoolingConfig

__all__ = ["FoolingConfig", "config", "losses", "metrics"]
