"""The embedded default workload: fitted to Azure conv, needs no file, same seed same trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opscale.traces import default_trace, load_trace, trace_stats
from opscale.traces.default import CONV_REQUESTS, CONV_SPAN_S, default_rate_curve
from opscale.traces.synthetic import cumulative_rate

# shared/traces/README.md section 1, conv row: mean rate, prompt p50 / p99, output p50 / p99.
AZURE_CONV_RATE_PER_S = 5.53
AZURE_CONV_LENGTHS = {"prompt_tokens": (1_020, 4_142), "output_tokens": (129, 601)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_matches_azure_conv_within_tolerance(seed: int) -> None:
    stats = trace_stats(load_trace("default", seed=seed))
    assert stats["mean_rate_per_s"] == pytest.approx(AZURE_CONV_RATE_PER_S, rel=0.05)
    for key, (p50, p99) in AZURE_CONV_LENGTHS.items():
        assert stats[key]["p50"] == pytest.approx(p50, rel=0.10)
        assert stats[key]["p99"] == pytest.approx(p99, rel=0.10)
    # Non-homogeneous Poisson: IAT CV near the real 1.09, per-minute CV near the real 0.22.
    assert stats["iat_cv"] == pytest.approx(1.09, abs=0.1)
    assert stats["per_minute_cv"] == pytest.approx(0.22, abs=0.05)


@pytest.mark.shared
def test_default_is_close_to_the_real_trace_it_was_fitted_to(traces_dir: Path) -> None:
    real = load_trace("azure-conv", data_dir=traces_dir)
    synthetic = default_trace(seed=0, duration_s=real.duration_s)
    # Per-minute rates follow the real ones (5-min knots smooth the minute-to-minute noise).
    real_minutes = np.bincount((real.arrival_s // 60).astype(int))[:58]
    synthetic_minutes = np.bincount((synthetic.arrival_s // 60).astype(int))[:58]
    assert np.corrcoef(real_minutes, synthetic_minutes)[0, 1] > 0.8
    assert np.mean(np.abs(synthetic_minutes - real_minutes) / real_minutes) < 0.12
    # Whole length distributions, not just two percentiles: Kolmogorov-Smirnov distance below 0.03.
    for column in ("prompt_tokens", "output_tokens"):
        ours, theirs = np.sort(getattr(synthetic, column)), np.sort(getattr(real, column))
        grid = np.union1d(ours, theirs)
        ks = np.max(
            np.abs(
                np.searchsorted(ours, grid, "right") / ours.size
                - np.searchsorted(theirs, grid, "right") / theirs.size
            )
        )
        assert ks < 0.03, column


def test_fitted_curve_integrates_to_the_real_request_count() -> None:
    _, cumulative = cumulative_rate(default_rate_curve(), CONV_SPAN_S)
    assert cumulative[-1] == pytest.approx(CONV_REQUESTS, rel=1e-3)


def test_same_seed_same_trace_and_aliases() -> None:
    first = load_trace("default", seed=4)
    assert np.array_equal(first.arrival_s, default_trace(seed=4).arrival_s)
    assert np.array_equal(first.output_tokens, load_trace("azure-conv-synthetic", seed=4).output_tokens)
    assert not np.array_equal(first.arrival_s[:20], default_trace(seed=5).arrival_s[:20])


def test_duration_and_rate_scale() -> None:
    long = default_trace(duration_s=4 * 3600.0)
    assert long.duration_s == 4 * 3600.0
    # Reflection keeps the rate inside the fitted range (3.3-8 req/s) over any horizon.
    _, hourly = long.rate_curve(3600.0)
    assert np.all((hourly > 4.5) & (hourly < 6.5))
    doubled = default_trace(rate_scale=2.0)
    assert len(doubled) / len(default_trace()) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError, match="rate_scale"):
        default_trace(rate_scale=0.0)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['day'\]"):
        load_trace("default", day=2)
