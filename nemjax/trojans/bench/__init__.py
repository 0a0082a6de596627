"""Casper's trojan-rediscovery benchmark (parts 2 and 4 of the trojan issue).

- settings: :class:`TrojanBenchConfig` (nested :class:`~nemjax.trojans.TrojanConfig`,
  :class:`AttributionSettings`, :class:`SynthesisSettings`), frozen, checked once when built;
- scoring (NumPy): :func:`scale_maps`, :func:`pearson` (NaN-safe: a constant map scores 0),
  :func:`wilcoxon` (paired signed-rank test, scipy's ``method="approx"``);
- the attribution benchmark: :func:`score_trojan`, :func:`summarise`;
- the synthesis benchmark: :func:`synthesize`, :func:`option_sets`, :func:`score_tools`;
- :func:`run`: implant, both benchmarks, tables, box plot and panels (resumable).
"""
from nemjax.trojans.bench.attribution import score_trojan, summarise
from nemjax.trojans.bench.config import (BASELINES, BENCH_TROJANS, CASPER_METHODS,
                                         SYNTHESIS_TOOLS, AttributionSettings,
                                         SynthesisSettings, TrojanBenchConfig)
from nemjax.trojans.bench.run import run
from nemjax.trojans.bench.scoring import pearson, scale_maps, wilcoxon
from nemjax.trojans.bench.synthesis import option_sets, score_tools, synthesize

__all__ = ["score_trojan", "summarise", "BASELINES", "BENCH_TROJANS", "CASPER_METHODS",
           "SYNTHESIS_TOOLS", "AttributionSettings", "SynthesisSettings", "TrojanBenchConfig",
           "run", "pearson", "scale_maps", "wilcoxon", "option_sets", "score_tools",
           "synthesize"]
