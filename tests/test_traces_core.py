"""RequestTrace: validation and operations (window, time/rate scaling, truncation, concat, rate curve)."""

from __future__ import annotations

import numpy as np
import pytest

from opscale.traces import ConstantRate, RequestTrace, gamma_arrivals, poisson_arrivals, trace_stats


def _trace(
    arrival_s: list[float], prompts: list[int] | None = None, outputs: list[int] | None = None, **kw: object
) -> RequestTrace:
    count = len(arrival_s)
    return RequestTrace(
        arrival_s=np.asarray(arrival_s, dtype=float),
        prompt_tokens=np.asarray(prompts if prompts is not None else [100] * count),
        output_tokens=np.asarray(outputs if outputs is not None else [10] * count),
        name="t",
        **kw,
    )


def test_columns_are_typed_read_only_copies() -> None:
    arrivals = np.array([0.0, 1.0, 2.5])
    trace = _trace(list(arrivals))
    assert trace.arrival_s.dtype == np.float64 and trace.prompt_tokens.dtype == np.int64
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 5.0
    assert len(trace) == 3
    assert trace.duration_s == 2.5
    assert trace.mean_rate_per_s == pytest.approx(3 / 2.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arrival_s": [0.0, 2.0, 1.0]}, "sorted ascending: index 2"),
        ({"arrival_s": [-1.0, 2.0, 3.0]}, "must be >= 0"),
        ({"arrival_s": [0.0, np.nan, 3.0]}, "non-finite"),
        ({"prompts": [1, 0, 5]}, "prompt_tokens must be >= 1, got 0 at index 1"),
        ({"outputs": [1, 5, -3]}, "output_tokens must be >= 1, got -3 at index 2"),
        ({"prompts": [1, 2]}, "prompt_tokens has 2 entries"),
    ],
)
def test_invalid_columns_are_rejected(kwargs: dict, message: str) -> None:
    arrival_s = kwargs.pop("arrival_s", [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=message):
        _trace(arrival_s, **kwargs)


def test_image_and_prefix_columns_are_validated() -> None:
    with pytest.raises(ValueError, match="image_tokens must be >= 0"):
        _trace([0.0, 1.0], image_tokens=np.array([0, -1]))
    with pytest.raises(ValueError, match="prefix_block_ids has 1 entries"):
        _trace([0.0, 1.0], prefix_block_ids=(np.array([1, 2]),))
    with pytest.raises(ValueError, match="outside time_range_s"):
        _trace([0.0, 5.0], time_range_s=(0.0, 4.0))


def test_window_selects_half_open_interval_and_keeps_its_span() -> None:
    trace = _trace([0.0, 1.0, 2.0, 3.0, 4.0], prompts=[1, 2, 3, 4, 5])
    window = trace.window(1.0, 3.0)
    assert window.arrival_s.tolist() == [0.0, 1.0]
    assert window.prompt_tokens.tolist() == [2, 3]
    assert window.duration_s == 2.0 and window.mean_rate_per_s == 1.0
    kept = trace.window(1.0, 3.0, rebase=False)
    assert kept.arrival_s.tolist() == [1.0, 2.0] and kept.time_range_s == (1.0, 3.0)
    # A quiet window still has its full span, so its rate is 0, not undefined.
    quiet = trace.window(10.0, 20.0)
    assert len(quiet) == 0 and quiet.duration_s == 10.0
    with pytest.raises(ValueError, match="start_s < end_s"):
        trace.window(3.0, 1.0)


def test_scale_time_divides_the_rate() -> None:
    rng = np.random.default_rng(1)
    arrival_s = poisson_arrivals(10.0, 1000.0, rng)
    trace = RequestTrace(
        arrival_s, np.ones(arrival_s.size, int), np.ones(arrival_s.size, int), time_range_s=(0.0, 1000.0)
    )
    slower = trace.scale_time(2.0)
    assert slower.duration_s == 2000.0
    assert slower.mean_rate_per_s == pytest.approx(trace.mean_rate_per_s / 2)
    with pytest.raises(ValueError, match="positive"):
        trace.scale_time(0.0)


@pytest.mark.parametrize("factor", [0.3, 1.0, 2.0, 3.5])
def test_scale_rate_hits_the_target_rate_and_keeps_bursts(factor: float) -> None:
    rng = np.random.default_rng(7)
    arrival_s = gamma_arrivals(ConstantRate(5.0), 4000.0, 4.0, rng)
    trace = RequestTrace(
        arrival_s, np.arange(1, arrival_s.size + 1), np.ones(arrival_s.size, int), time_range_s=(0.0, 4000.0)
    )
    scaled = trace.scale_rate(factor, np.random.default_rng(3))
    assert len(scaled) / len(trace) == pytest.approx(factor, rel=0.03)
    assert scaled.duration_s == trace.duration_s
    # Burstiness survives: the IAT CV stays far above Poisson's 1 (thinning pulls it down only a bit).
    assert trace_stats(scaled)["iat_cv"] > 2.0
    # Every request is a copy of an original one (its lengths come along).
    assert set(scaled.prompt_tokens.tolist()) <= set(trace.prompt_tokens.tolist())


def test_scale_rate_replicas_get_disjoint_prefix_ids() -> None:
    trace = _trace([0.0, 1.0, 2.0], prefix_block_ids=(np.array([0, 1]), np.array([0, 2]), np.array([3])))
    doubled = trace.scale_rate(2.0, np.random.default_rng(0))
    assert len(doubled) == 6
    ids = np.concatenate(doubled.prefix_block_ids or ())
    original_share = 1 - np.unique(np.concatenate(trace.prefix_block_ids or ())).size / 5
    assert 1 - np.unique(ids).size / ids.size == pytest.approx(original_share)
    # Extra copies sit between their original and the next request, never on top of another arrival.
    assert np.all(np.diff(doubled.arrival_s) > 0)


def test_scale_rate_is_seeded() -> None:
    trace = _trace(list(np.arange(100.0)))
    first = trace.scale_rate(0.5, np.random.default_rng(11))
    second = trace.scale_rate(0.5, np.random.default_rng(11))
    assert np.array_equal(first.arrival_s, second.arrival_s)


def test_truncate_lengths_policies() -> None:
    trace = _trace([0.0, 1.0, 2.0], prompts=[100, 5000, 9000], outputs=[10, 200, 9000],
                   prefix_block_ids=(np.arange(1), np.arange(10), np.arange(18)))  # fmt: skip
    clipped = trace.truncate_lengths(4096)
    assert clipped.prompt_tokens.tolist() == [100, 3896, 1]
    assert clipped.output_tokens.tolist() == [10, 200, 4095]
    assert np.all(clipped.prompt_tokens + clipped.output_tokens <= 4096)
    assert [ids.size for ids in clipped.prefix_block_ids or ()] == [1, 8, 1]
    assert "2 of 3 requests clipped (2 prompts, 1 outputs" in clipped.notes[-1]
    dropped = trace.truncate_lengths(4096, policy="drop")
    assert len(dropped) == 1 and "dropped 2 of 3" in dropped.notes[-1]
    with pytest.raises(ValueError, match=r"request 1 .* 5200 context tokens .* 2 requests exceed"):
        trace.truncate_lengths(4096, policy="error")
    with pytest.raises(ValueError, match="unknown truncation policy"):
        trace.truncate_lengths(4096, policy="cut")
    assert trace.truncate_lengths(100_000) is trace


def test_concat_offsets_the_second_trace() -> None:
    first = _trace([0.0, 1.0, 4.0])
    second = _trace([2.0, 3.0], image_tokens=np.array([5, 6]))
    joined = first.concat(second, gap_s=1.0)
    assert joined.arrival_s.tolist() == [0.0, 1.0, 4.0, 5.0, 6.0]
    assert joined.image_tokens is not None and joined.image_tokens.tolist() == [0, 0, 0, 5, 6]
    windowed = first.window(0.0, 10.0).concat(first.window(0.0, 10.0))
    assert windowed.duration_s == 20.0 and windowed.arrival_s.tolist() == [0.0, 1.0, 4.0, 10.0, 11.0, 14.0]
    with pytest.raises(ValueError, match="only one of them has prefix_block_ids"):
        first.concat(_trace([0.0], prefix_block_ids=(np.array([1]),)))


def test_rate_curve_counts_per_bin() -> None:
    trace = _trace([0.0, 0.5, 1.2, 3.9], time_range_s=(0.0, 4.0))
    starts, rates = trace.rate_curve(1.0)
    assert starts.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert rates.tolist() == [2.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        trace.rate_curve(0.0)


def test_stats_of_a_tiny_trace_follow_the_readme_definitions() -> None:
    trace = _trace([0.0, 0.2, 0.4, 61.0, 62.0], prompts=[1, 2, 3, 4, 100], outputs=[5, 5, 5, 5, 5])
    stats = trace_stats(trace)
    assert stats["requests"] == 5 and stats["span_s"] == 62.0
    assert stats["mean_rate_per_s"] == pytest.approx(5 / 62)
    assert stats["peak_1s_requests"] == 3 and stats["peak_1min_requests"] == 3
    gaps = np.array([0.2, 0.2, 60.6, 1.0])
    assert stats["iat_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert stats["prompt_tokens"]["p50"] == 3 and stats["prompt_tokens"]["p99"] == pytest.approx(
        np.percentile([1, 2, 3, 4, 100], 99)
    )
    empty = trace_stats(trace.window(100.0, 200.0))
    assert empty["requests"] == 0 and np.isnan(empty["iat_cv"])
