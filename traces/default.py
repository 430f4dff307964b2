"""The embedded default workload: an Azure-conv-like trace that needs no data file.

Source of every constant: the Azure LLM inference trace 2023, conversation service
(``AzureLLMInferenceTrace_conv.csv``, Splitwise, ISCA'24, CC-BY 4.0; ``shared/traces/README.md``
section 1), fitted by ``experiments/fit_default_trace.py`` (rerun it to regenerate the numbers).

* Arrivals: a non-homogeneous Poisson process (the real trace's IAT CV is 1.09, close to Poisson at
  short scales) following a piecewise-linear rate with a knot every 5 minutes, least-squares fitted to
  the per-minute counts: it climbs from ~4 req/s to a peak of ~8 req/s around minute 30 and falls back
  to ~3.3 req/s. Beyond the fitted 3,501.7 s the curve is played backward, then forward again
  (:class:`~opscale.traces.synthetic.ReflectedRate`), so any duration works and the rate stays in the
  observed range.
* Lengths: prompt and output tokens drawn independently from 46-knot quantile tables (the real
  Spearman rank correlation between them is 0.07, so independence loses little).

Same seed, same trace. With the defaults (3,600 s) it matches the real trace's mean rate within ~1 %
and its prompt and output p50 / p99 within a few percent (``tests/test_traces_default.py``).
"""

from __future__ import annotations

import numpy as np

from opscale.traces.synthetic import (
    PiecewiseLinearRate,
    QuantileLengths,
    ReflectedRate,
    ScaledRate,
    synthetic_trace,
)
from opscale.traces.trace import RequestTrace

# ---- constants printed by experiments/fit_default_trace.py from AzureLLMInferenceTrace_conv.csv ----
# fmt: off
#: Span of the real conv trace (first to last arrival, s) and its request count.
CONV_SPAN_S = 3501.722
CONV_REQUESTS = 19366
#: Piecewise-linear rate knots: time (s) and rate (req/s).
RATE_KNOT_TIMES_S = (
    0.000, 300.000, 600.000, 900.000, 1200.000, 1500.000, 1800.000, 2100.000, 2400.000, 2700.000,
    3000.000, 3300.000, 3501.722,
)
RATE_KNOT_REQUESTS_PER_S = (
    4.0107, 5.1118, 5.0641, 4.8538, 5.7666, 6.8230, 7.9975, 7.0474, 5.2442, 5.8983, 3.8987, 4.4784,
    3.2612,
)
#: Cumulative probabilities of the length quantile tables.
QUANTILE_LEVELS = (
    0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.225, 0.25, 0.275, 0.3, 0.325, 0.35,
    0.375, 0.4, 0.425, 0.45, 0.475, 0.5, 0.525, 0.55, 0.575, 0.6, 0.625, 0.65, 0.675, 0.7, 0.725, 0.75,
    0.775, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 0.985, 0.99, 0.995, 0.999, 1,
)
#: Prompt tokens at each level (multimodal: clusters near 400, 1,050 and 4,100 tokens).
PROMPT_TOKEN_QUANTILES = (
    2.0, 29.0, 120.0, 181.0, 200.0, 207.0, 235.0, 372.0, 379.0, 387.0, 393.0, 396.0, 400.0, 403.0,
    407.0, 414.0, 428.0, 703.0, 922.0, 984.0, 1005.0, 1020.0, 1033.6, 1045.0, 1058.0, 1071.0, 1083.0,
    1097.0, 1112.0, 1130.0, 1153.0, 1189.0, 1276.9, 1315.0, 1434.2, 1876.2, 2309.4, 2734.5, 4075.0,
    4083.0, 4092.0, 4110.0, 4142.0, 4831.0, 6179.1, 14050.0,
)
#: Output tokens at each level (the service caps generation at 1,000).
OUTPUT_TOKEN_QUANTILES = (
    7.0, 16.0, 28.0, 41.0, 48.0, 54.0, 60.0, 67.0, 72.0, 77.0, 82.0, 85.0, 88.0, 91.0, 93.0, 96.0, 99.0,
    103.0, 108.0, 113.0, 120.0, 129.0, 138.6, 151.0, 162.0, 177.0, 195.1, 217.0, 373.0, 384.0, 391.0,
    395.0, 396.0, 400.0, 406.0, 411.0, 416.0, 424.0, 430.0, 451.0, 522.0, 571.0, 601.0, 643.2, 954.0,
    1000.0,
)
# fmt: on

#: Name of the default trace (also registered as ``azure-conv-synthetic``).
DEFAULT_TRACE_NAME = "default"


def default_rate_curve(rate_scale: float = 1.0) -> ReflectedRate | ScaledRate:
    """The fitted Azure conv rate curve (req/s), extended by reflection, times ``rate_scale``."""
    curve = ReflectedRate(PiecewiseLinearRate(RATE_KNOT_TIMES_S, RATE_KNOT_REQUESTS_PER_S), CONV_SPAN_S)
    return curve if rate_scale == 1.0 else ScaledRate(curve, rate_scale)


def default_prompt_lengths() -> QuantileLengths:
    """Prompt-token distribution of the Azure conv trace (quantile table)."""
    return QuantileLengths(QUANTILE_LEVELS, PROMPT_TOKEN_QUANTILES)


def default_output_lengths() -> QuantileLengths:
    """Output-token distribution of the Azure conv trace (quantile table)."""
    return QuantileLengths(QUANTILE_LEVELS, OUTPUT_TOKEN_QUANTILES)


def default_trace(*, seed: int = 0, duration_s: float = 3600.0, rate_scale: float = 1.0) -> RequestTrace:
    """The embedded default workload (no data file needed).

    :param seed: seed of the ``numpy.random.default_rng`` that draws arrivals and lengths.
    :param duration_s: horizon (s); the trace covers ``[0, duration_s)``.
    :param rate_scale: multiplier on the fitted rate curve (> 0), e.g. 2.0 for twice the traffic.
    """
    if not (np.isfinite(rate_scale) and rate_scale > 0):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale}")
    return synthetic_trace(
        default_rate_curve(rate_scale),
        duration_s,
        default_prompt_lengths(),
        default_output_lengths(),
        np.random.default_rng(seed),
        name=DEFAULT_TRACE_NAME,
    )
