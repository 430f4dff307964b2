"""The DES's streaming metrics: binned quantiles against numpy's on the same values."""

from __future__ import annotations

import numpy as np
import pytest

from opscale.sim.recorder import (
    BIN_VALUES_S,
    NUM_BINS,
    LogSketch,
    StreamGaps,
    TbtHistograms,
    gap_bin,
    gap_bins,
)


@pytest.mark.parametrize("size", [1, 2, 7, 100, 5_000])
@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_sketch_quantile_is_the_bin_of_numpys_lower_percentile(size: int, quantile: float) -> None:
    rng = np.random.default_rng(size)
    values = rng.lognormal(mean=np.log(0.03), sigma=1.0, size=size)
    sketch = LogSketch()
    for value in values:
        sketch.add(float(value))
    # the sketch's rank rule is floor(q * (n - 1)): numpy's "lower" method, read on the value's bin
    expected = BIN_VALUES_S[gap_bin(float(np.percentile(values, 100 * quantile, method="lower")))]
    assert sketch.quantile(quantile) == expected
    assert sketch.mean == pytest.approx(values.mean())


def test_bins_are_two_percent_wide_and_clamped() -> None:
    values = np.array([1e-6, 1e-4, 0.0123, 5.0, 1e4])
    bins = gap_bins(values)
    assert list(bins) == [gap_bin(float(v)) for v in values]
    assert bins[0] == bins[1] == 0 and bins[-1] == NUM_BINS - 1
    for value, index in zip(values[2:4], bins[2:4], strict=True):
        assert BIN_VALUES_S[index] == pytest.approx(value, rel=0.011)


def test_request_histogram_banks_the_stream_gaps_seen_while_joined() -> None:
    histograms = TbtHistograms(initial_rows=1)
    stream = StreamGaps()
    stream.add(0.5)  # before the request joins: not its gap
    row = histograms.allocate()
    assert histograms.quantiles(row) == (0.0, 0.0)
    histograms.join(row, stream)
    for gap in (0.02, 0.02, 0.03):
        stream.add(gap)
    histograms.leave(row, stream)
    histograms.add_own(row, 0.2)
    p50, p99 = histograms.quantiles(row)
    assert p50 == BIN_VALUES_S[gap_bin(0.02)]
    assert p99 == BIN_VALUES_S[gap_bin(0.03)]  # rank floor(0.99 * 3) = 2 of 4 gaps
    other = histograms.allocate()  # grows past the initial row
    assert other != row and histograms.quantiles(other) == (0.0, 0.0)
