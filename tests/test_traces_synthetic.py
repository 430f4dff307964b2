"""Synthetic generators: arrival-process statistics, rate curves followed, length laws, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opscale.traces import (
    ArrivalProcess,
    ConstantRate,
    DiurnalSineRate,
    EmpiricalLengths,
    LognormalLengths,
    PiecewiseLinearRate,
    QuantileLengths,
    ReflectedRate,
    StepRate,
    gamma_arrivals,
    generate_arrivals,
    poisson_arrivals,
    synthetic_trace,
)


def _iat_cv(arrival_s: np.ndarray) -> float:
    gaps = np.diff(arrival_s)
    return float(gaps.std() / gaps.mean())


def test_poisson_counts_and_cv() -> None:
    arrival_s = poisson_arrivals(20.0, 5_000.0, np.random.default_rng(0))
    # 100,000 expected arrivals: the count is within 4 sigma (sigma = sqrt(100,000) ~ 316).
    assert abs(arrival_s.size - 100_000) < 4 * math.sqrt(100_000)
    assert _iat_cv(arrival_s) == pytest.approx(1.0, abs=0.02)
    # Counts per 1-s bin are Poisson: variance equals the mean.
    counts = np.bincount(arrival_s.astype(int), minlength=5_000)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.05)
    assert arrival_s.min() >= 0 and arrival_s.max() < 5_000.0 and np.all(np.diff(arrival_s) >= 0)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_arrivals_have_the_requested_cv_and_rate(cv: float) -> None:
    arrival_s = gamma_arrivals(10.0, 20_000.0, cv, np.random.default_rng(1))
    assert _iat_cv(arrival_s) == pytest.approx(cv, rel=0.05)
    # Higher CV means a noisier count; the tolerance grows with it (count sd ~ cv * sqrt(n)).
    assert arrival_s.size / 20_000.0 == pytest.approx(10.0, rel=0.03 * cv)


def test_weibull_arrivals_have_the_cv_of_their_shape() -> None:
    shape = 0.5  # CV of Weibull(0.5) = sqrt(Gamma(1 + 2/k) / Gamma(1 + 1/k)^2 - 1) = sqrt(5)
    arrival_s = generate_arrivals(
        ConstantRate(10.0), 20_000.0, np.random.default_rng(2), process="weibull", weibull_shape=shape
    )
    expected_cv = math.sqrt(math.gamma(1 + 2 / shape) / math.gamma(1 + 1 / shape) ** 2 - 1)
    assert _iat_cv(arrival_s) == pytest.approx(expected_cv, rel=0.08)
    assert arrival_s.size / 20_000.0 == pytest.approx(10.0, rel=0.1)


def test_stationary_start_does_not_put_an_arrival_at_zero() -> None:
    # A renewal process started fresh would put its first event after one gap (mean 1 / rate); in
    # equilibrium the first event comes after the mean residual life E[X^2] / (2 E[X]) = (1 + cv^2) / (2 rate).
    rate, cv = 2.0, 3.0
    firsts = [gamma_arrivals(rate, 1_000.0, cv, np.random.default_rng(seed))[0] for seed in range(400)]
    assert np.mean(firsts) == pytest.approx((1 + cv**2) / (2 * rate), rel=0.2)


def test_step_rate_is_followed() -> None:
    curve = StepRate((0.0, 1_000.0, 2_000.0), (5.0, 20.0, 1.0))
    arrival_s = poisson_arrivals(curve, 3_000.0, np.random.default_rng(3))
    counts = np.histogram(arrival_s, bins=[0, 1_000, 2_000, 3_000])[0]
    for observed, expected in zip(counts, (5_000, 20_000, 1_000), strict=True):
        assert abs(observed - expected) < 4 * math.sqrt(expected)


def test_diurnal_sine_rate_is_followed() -> None:
    curve = DiurnalSineRate(
        mean_rate_per_s=2.0, relative_amplitude=0.8, period_s=86_400.0, peak_time_s=14 * 3600
    )
    assert curve.rate_per_s(np.array([14 * 3600.0]))[0] == pytest.approx(3.6)
    assert curve.rate_per_s(np.array([2 * 3600.0]))[0] == pytest.approx(0.4)
    arrival_s = gamma_arrivals(curve, 86_400.0, 1.5, np.random.default_rng(4))
    hourly = np.bincount((arrival_s // 3600).astype(int), minlength=24) / 3600.0
    expected = curve.rate_per_s(np.arange(24) * 3600.0 + 1800.0)
    # Hour by hour within 10 % (an hour holds 1,400-13,000 arrivals), and the CV is kept at every rate.
    assert np.allclose(hourly, expected, rtol=0.1)
    assert _iat_cv(arrival_s[(arrival_s > 12 * 3600) & (arrival_s < 16 * 3600)]) == pytest.approx(
        1.5, rel=0.1
    )


def test_piecewise_linear_rate_is_followed_and_reflected() -> None:
    ramp = PiecewiseLinearRate((0.0, 600.0), (1.0, 11.0))
    assert ramp.rate_per_s(np.array([300.0, 900.0])).tolist() == [6.0, 11.0]
    reflected = ReflectedRate(ramp, 600.0)
    assert reflected.rate_per_s(np.array([700.0, 1200.0, 1500.0])).tolist() == pytest.approx(
        [9.33333333, 1.0, 6.0]
    )
    arrival_s = poisson_arrivals(reflected, 1_200.0, np.random.default_rng(5))
    # Integral of the ramp up and down: 2 * 600 * 6 = 7,200.
    assert abs(arrival_s.size - 7_200) < 4 * math.sqrt(7_200)
    per_minute = np.bincount((arrival_s // 60).astype(int), minlength=20)
    assert per_minute[9] > 4 * per_minute[0] and per_minute[10] > 4 * per_minute[19]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: StepRate((0.0, 0.0), (1.0, 2.0)),
        lambda: PiecewiseLinearRate((0.0, 1.0), (1.0, -2.0)),
        lambda: DiurnalSineRate(1.0, 1.5),
        lambda: ConstantRate(-1.0),
        lambda: generate_arrivals(ConstantRate(1.0), 10.0, np.random.default_rng(0), process="gamma", cv=0.0),
        lambda: generate_arrivals(ConstantRate(1.0), 10.0, np.random.default_rng(0), process="pareto"),
    ],
)
def test_bad_generator_parameters_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_lognormal_lengths_hit_median_and_p99() -> None:
    lengths = LognormalLengths.from_median_p99(600, 5_400, max_tokens=131_072)
    sample = lengths.sample(200_000, np.random.default_rng(6))
    assert np.median(sample) == pytest.approx(600, rel=0.02)
    assert np.percentile(sample, 99) == pytest.approx(5_400, rel=0.04)
    assert sample.min() >= 1 and sample.max() <= 131_072 and sample.dtype == np.int64


def test_empirical_and_quantile_lengths() -> None:
    observed = np.array([10, 20, 20, 40])
    sample = EmpiricalLengths.from_array(observed).sample(40_000, np.random.default_rng(7))
    assert set(np.unique(sample).tolist()) == {10, 20, 40}
    assert np.mean(sample == 20) == pytest.approx(0.5, abs=0.01)
    table = QuantileLengths((0.0, 0.5, 1.0), (100.0, 200.0, 1_000.0))
    sample = table.sample(100_000, np.random.default_rng(8))
    assert np.median(sample) == pytest.approx(200, abs=3)
    assert np.mean(sample <= 150) == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
        QuantileLengths((0.1, 1.0), (1.0, 2.0))


def test_synthetic_trace_is_seeded_and_covers_its_duration() -> None:
    def make(seed: int):
        return synthetic_trace(5.0, 600.0, LognormalLengths(6.0, 1.0), LognormalLengths(4.0, 1.0),
                               np.random.default_rng(seed), process=ArrivalProcess.GAMMA, cv=2.0,
                               image_lengths=LognormalLengths(6.0, 0.2, min_tokens=0))  # fmt: skip

    first, again, other = make(9), make(9), make(10)
    assert np.array_equal(first.arrival_s, again.arrival_s) and np.array_equal(
        first.prompt_tokens, again.prompt_tokens
    )
    assert not np.array_equal(first.arrival_s[:10], other.arrival_s[:10])
    assert first.time_range_s == (0.0, 600.0) and first.image_tokens is not None
