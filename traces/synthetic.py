"""Synthetic workloads: rate curves, arrival processes and request-length distributions.

Arrivals with a time-varying rate are made by *time rescaling*: draw a unit-rate process (Poisson, or a
renewal process with Gamma / Weibull gaps of a chosen CV) and map its event times through the inverse
of the cumulative rate ``Λ(t) = ∫ rate``. For Poisson this is the exact non-homogeneous Poisson process;
for renewal processes it keeps the inter-arrival CV at every rate, which is how burstiness is usually
defined for a load that changes over the day. The renewal process starts in equilibrium (the first
gap is drawn length-biased and cut at a uniform point), so a short window is not biased by a fresh
renewal at ``t = 0``.

Every draw comes from the ``numpy.random.Generator`` passed in; no scipy (Gamma and Weibull come from
numpy's Generator, ``math.gamma`` gives the Weibull mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from opscale.traces.trace import RequestTrace

#: Standard-normal quantile at 0.99, for fitting a lognormal to a (p50, p99) pair.
_NORMAL_Z_99 = 2.3263478740408408

# ---------------------------------------------------------------------------------------------- rate curves


class RateCurve(Protocol):
    """A request rate over time, in requests per second."""

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        """Rate at each time in ``time_s`` (>= 0)."""
        ...


@dataclass(frozen=True)
class ConstantRate:
    """The same rate at all times.

    :param requests_per_s: the rate (req/s), >= 0.
    """

    requests_per_s: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.requests_per_s) and self.requests_per_s >= 0):
            raise ValueError(f"ConstantRate needs a finite rate >= 0, got {self.requests_per_s}")

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        return np.full(np.shape(time_s), self.requests_per_s, dtype=np.float64)


def _check_knots(kind: str, times_s: np.ndarray, rates_per_s: np.ndarray) -> None:
    if times_s.ndim != 1 or times_s.shape != rates_per_s.shape or times_s.size == 0:
        raise ValueError(f"{kind} needs equal-length, non-empty 1-D times_s and rates_per_s")
    if np.any(np.diff(times_s) <= 0):
        raise ValueError(f"{kind} times_s must be strictly increasing, got {times_s.tolist()}")
    if not (np.all(np.isfinite(rates_per_s)) and np.all(rates_per_s >= 0)):
        raise ValueError(f"{kind} rates_per_s must be finite and >= 0, got {rates_per_s.tolist()}")


@dataclass(frozen=True)
class StepRate:
    """A rate that jumps at given times: ``rates_per_s[i]`` holds from ``times_s[i]`` until the next step.

    Before ``times_s[0]`` the first rate holds.

    :param times_s: step times (s), strictly increasing.
    :param rates_per_s: rate from each step time on (req/s), >= 0.
    """

    times_s: tuple[float, ...]
    rates_per_s: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_knots("StepRate", np.asarray(self.times_s, float), np.asarray(self.rates_per_s, float))

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        index = np.searchsorted(np.asarray(self.times_s), time_s, side="right") - 1
        return np.asarray(self.rates_per_s, dtype=np.float64)[np.clip(index, 0, None)]


@dataclass(frozen=True)
class PiecewiseLinearRate:
    """A rate interpolated linearly between knots and held flat outside them.

    :param times_s: knot times (s), strictly increasing.
    :param rates_per_s: rate at each knot (req/s), >= 0.
    """

    times_s: tuple[float, ...]
    rates_per_s: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_knots(
            "PiecewiseLinearRate", np.asarray(self.times_s, float), np.asarray(self.rates_per_s, float)
        )

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        return np.interp(time_s, np.asarray(self.times_s), np.asarray(self.rates_per_s))


@dataclass(frozen=True)
class DiurnalSineRate:
    """``mean · (1 + amplitude · sin(2π (t − peak_time + period/4) / period))``: a daily cycle.

    :param mean_rate_per_s: average rate over a period (req/s).
    :param relative_amplitude: swing as a fraction of the mean, in [0, 1] (1: rate touches 0 at the trough).
    :param period_s: cycle length (default one day).
    :param peak_time_s: time of the daily peak (default 14:00 if t = 0 is midnight).
    """

    mean_rate_per_s: float
    relative_amplitude: float
    period_s: float = 86_400.0
    peak_time_s: float = 14 * 3600.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean_rate_per_s) and self.mean_rate_per_s >= 0):
            raise ValueError(
                f"DiurnalSineRate mean_rate_per_s must be finite and >= 0, got {self.mean_rate_per_s}"
            )
        if not 0 <= self.relative_amplitude <= 1:
            raise ValueError(
                f"DiurnalSineRate relative_amplitude must be in [0, 1], got {self.relative_amplitude}"
            )
        if not self.period_s > 0:
            raise ValueError(f"DiurnalSineRate period_s must be > 0, got {self.period_s}")

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        phase = (
            2 * np.pi * (np.asarray(time_s, dtype=np.float64) - self.peak_time_s) / self.period_s + np.pi / 2
        )
        return self.mean_rate_per_s * (1 + self.relative_amplitude * np.sin(phase))


@dataclass(frozen=True)
class ReflectedRate:
    """Extend a curve known on ``[0, span_s]`` to any time by playing it forward, then backward, and so on.

    The extension is continuous and stays inside the curve's observed range, unlike holding the last
    value (which would freeze a ramp at its end) or wrapping around (which would jump).

    :param curve: the curve on ``[0, span_s]``.
    :param span_s: the span it is known on (s), > 0.
    """

    curve: RateCurve
    span_s: float

    def __post_init__(self) -> None:
        if not self.span_s > 0:
            raise ValueError(f"ReflectedRate span_s must be > 0, got {self.span_s}")

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        phase_s = np.mod(np.asarray(time_s, dtype=np.float64), 2 * self.span_s)
        return self.curve.rate_per_s(np.where(phase_s > self.span_s, 2 * self.span_s - phase_s, phase_s))


@dataclass(frozen=True)
class ScaledRate:
    """Another curve multiplied by a constant factor.

    :param curve: the curve to scale.
    :param factor: the multiplier, >= 0.
    """

    curve: RateCurve
    factor: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.factor) and self.factor >= 0):
            raise ValueError(f"ScaledRate factor must be finite and >= 0, got {self.factor}")

    def rate_per_s(self, time_s: np.ndarray) -> np.ndarray:
        return self.factor * self.curve.rate_per_s(time_s)


def cumulative_rate(
    rate_curve: RateCurve, duration_s: float, *, max_points: int = 2_000_001
) -> tuple[np.ndarray, np.ndarray]:
    """Tabulate ``Λ(t) = ∫_0^t rate`` on a grid (trapezoid rule, step <= 1 s): ``(grid_s, cumulative)``.

    A 1-s step is far finer than any curve here changes (the error of the trapezoid rule on a
    piecewise-linear curve is zero between knots and below one request per knot otherwise).
    """
    if not (np.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive finite number, got {duration_s}")
    points = int(min(max_points, max(2, math.ceil(duration_s) + 1)))
    grid_s = np.linspace(0.0, duration_s, points)
    rates = rate_curve.rate_per_s(grid_s)
    if np.any(rates < 0) or not np.all(np.isfinite(rates)):
        raise ValueError("rate curve returned a negative or non-finite rate")
    cumulative = np.concatenate([[0.0], np.cumsum((rates[1:] + rates[:-1]) * 0.5 * np.diff(grid_s))])
    return grid_s, cumulative


# ---------------------------------------------------------------------------------------------- arrivals


class ArrivalProcess(str, Enum):
    """The law of the gaps of the unit-rate process that is mapped through the rate curve."""

    POISSON = "poisson"  # exponential gaps, CV 1
    GAMMA = "gamma"  # Gamma gaps of a chosen CV (shape 1 / CV²)
    WEIBULL = "weibull"  # Weibull gaps of a chosen shape


def _unit_mean_gaps(process: ArrivalProcess, shape: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` gaps with mean 1 from the process (``shape``: Gamma or Weibull shape parameter)."""
    if process is ArrivalProcess.POISSON:
        return rng.exponential(1.0, size)
    if process is ArrivalProcess.GAMMA:
        return rng.gamma(shape, 1.0 / shape, size)
    return rng.weibull(shape, size) / math.gamma(1.0 + 1.0 / shape)


def _first_event(process: ArrivalProcess, shape: float, rng: np.random.Generator) -> float:
    """Time to the first event of a stationary (equilibrium) unit-rate renewal process.

    The gap straddling the origin is length-biased; the origin falls uniformly inside it. For Gamma(k)
    the length-biased law is Gamma(k + 1) (exact); for Weibull it is drawn by weighted resampling of
    4,096 gaps.
    """
    if process is ArrivalProcess.POISSON:
        return float(rng.exponential(1.0))
    if process is ArrivalProcess.GAMMA:
        straddling = float(rng.gamma(shape + 1.0, 1.0 / shape))
    else:
        candidates = _unit_mean_gaps(process, shape, 4096, rng)
        straddling = float(rng.choice(candidates, p=candidates / candidates.sum()))
    return straddling * float(rng.random())


def unit_rate_events(
    expected_events: float,
    rng: np.random.Generator,
    *,
    process: ArrivalProcess = ArrivalProcess.POISSON,
    shape: float = 1.0,
) -> np.ndarray:
    """Event times in ``[0, expected_events)`` of a stationary unit-rate process (gaps of mean 1).

    :param expected_events: length of the unit-time horizon (= expected count).
    :param rng: random source.
    :param process: gap law.
    :param shape: Gamma shape (``1 / CV²``) or Weibull shape; ignored for Poisson.
    """
    if not (np.isfinite(shape) and shape > 0):
        raise ValueError(f"arrival process shape must be a positive finite number, got {shape}")
    if expected_events <= 0:
        return np.zeros(0)
    first = _first_event(process, shape, rng)
    if first >= expected_events:
        return np.zeros(0)
    pieces = [np.asarray([first])]
    last = first
    while last < expected_events:
        # Draw a few standard deviations more than needed at once, so one or two passes suffice.
        remaining = expected_events - last
        batch = int(remaining + 6 * math.sqrt(remaining / min(shape, 1.0)) + 16)
        times = last + np.cumsum(_unit_mean_gaps(process, shape, batch, rng))
        pieces.append(times)
        last = float(times[-1])
    events = np.concatenate(pieces)
    return events[: int(np.searchsorted(events, expected_events, side="left"))]


def generate_arrivals(
    rate_curve: RateCurve,
    duration_s: float,
    rng: np.random.Generator,
    *,
    process: ArrivalProcess | str = ArrivalProcess.POISSON,
    cv: float = 1.0,
    weibull_shape: float | None = None,
) -> np.ndarray:
    """Arrival times (s, sorted) in ``[0, duration_s)`` following ``rate_curve``.

    :param rate_curve: the rate over time.
    :param duration_s: horizon (s).
    :param rng: random source.
    :param process: ``"poisson"``, ``"gamma"`` (gaps with coefficient of variation ``cv``) or
        ``"weibull"`` (gaps with shape ``weibull_shape``).
    :param cv: inter-arrival CV for the Gamma process (> 0; 1 is Poisson-like, > 1 bursty).
    :param weibull_shape: Weibull shape (< 1 bursty, 1 Poisson).
    """
    process = ArrivalProcess(process)
    if process is ArrivalProcess.GAMMA:
        if not (np.isfinite(cv) and cv > 0):
            raise ValueError(f"Gamma arrivals need a positive finite cv, got {cv}")
        shape = 1.0 / cv**2
    elif process is ArrivalProcess.WEIBULL:
        if weibull_shape is None:
            raise ValueError("Weibull arrivals need weibull_shape")
        shape = weibull_shape
    else:
        shape = 1.0
    grid_s, cumulative = cumulative_rate(rate_curve, duration_s)
    events = unit_rate_events(float(cumulative[-1]), rng, process=process, shape=shape)
    arrival_s = np.interp(events, cumulative, grid_s)
    return np.minimum(arrival_s, np.nextafter(duration_s, 0.0))


def poisson_arrivals(
    rate_curve: RateCurve | float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """(Non-homogeneous) Poisson arrivals; a number is taken as a constant rate in req/s."""
    curve = ConstantRate(float(rate_curve)) if isinstance(rate_curve, int | float) else rate_curve
    return generate_arrivals(curve, duration_s, rng, process=ArrivalProcess.POISSON)


def gamma_arrivals(
    rate_curve: RateCurve | float, duration_s: float, cv: float, rng: np.random.Generator
) -> np.ndarray:
    """Gamma-renewal arrivals with inter-arrival CV ``cv``, time-rescaled to follow ``rate_curve``."""
    curve = ConstantRate(float(rate_curve)) if isinstance(rate_curve, int | float) else rate_curve
    return generate_arrivals(curve, duration_s, rng, process=ArrivalProcess.GAMMA, cv=cv)


# ---------------------------------------------------------------------------------------------- lengths


class LengthDistribution(Protocol):
    """A distribution of token counts."""

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``size`` token counts (int64)."""
        ...


@dataclass(frozen=True)
class LognormalLengths:
    """Token counts ``round(exp(N(mu, sigma²)))`` clipped to ``[min_tokens, max_tokens]``.

    :param mu: mean of the log (``log`` of the median).
    :param sigma: standard deviation of the log.
    :param min_tokens: smallest count (>= 0; 1 for prompts and outputs).
    :param max_tokens: largest count (a context limit), or ``None``.
    """

    mu: float
    sigma: float
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mu) and np.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(
                f"LognormalLengths needs finite mu and sigma >= 0, got mu={self.mu}, sigma={self.sigma}"
            )
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"LognormalLengths max_tokens {self.max_tokens} < min_tokens {self.min_tokens}")

    @classmethod
    def from_median_p99(
        cls, median: float, p99: float, *, min_tokens: int = 1, max_tokens: int | None = None
    ) -> LognormalLengths:
        """The lognormal with this median and 99th percentile (``sigma = ln(p99/p50) / z_0.99``)."""
        if not 0 < median <= p99:
            raise ValueError(f"need 0 < median <= p99, got median={median}, p99={p99}")
        return cls(math.log(median), math.log(p99 / median) / _NORMAL_Z_99, min_tokens, max_tokens)

    @property
    def mean(self) -> float:
        """Mean of the unclipped lognormal, ``exp(mu + sigma²/2)``."""
        return math.exp(self.mu + self.sigma**2 / 2)

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        values = np.rint(rng.lognormal(self.mu, self.sigma, size))
        upper = np.inf if self.max_tokens is None else self.max_tokens
        return np.clip(values, self.min_tokens, upper).astype(np.int64)


@dataclass(frozen=True)
class EmpiricalLengths:
    """Resample (with replacement) token counts observed in a trace.

    :param values: the observed counts.
    """

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("EmpiricalLengths needs at least one value")

    @classmethod
    def from_array(cls, values: np.ndarray) -> EmpiricalLengths:
        return cls(tuple(int(v) for v in np.asarray(values).ravel()))

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(self.values, dtype=np.int64)[rng.integers(0, len(self.values), size)]


@dataclass(frozen=True)
class QuantileLengths:
    """Inverse-CDF sampling from a quantile table, linear between knots.

    :param levels: cumulative probabilities, strictly increasing from 0 to 1.
    :param quantiles: token count at each level (non-decreasing).
    """

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]

    def __post_init__(self) -> None:
        levels = np.asarray(self.levels, dtype=np.float64)
        quantiles = np.asarray(self.quantiles, dtype=np.float64)
        if levels.shape != quantiles.shape or levels.size < 2:
            raise ValueError("QuantileLengths needs equal-length levels and quantiles (>= 2 knots)")
        if levels[0] != 0 or levels[-1] != 1 or np.any(np.diff(levels) <= 0):
            raise ValueError(f"QuantileLengths levels must rise strictly from 0 to 1, got {self.levels}")
        if np.any(np.diff(quantiles) < 0) or quantiles[0] < 0:
            raise ValueError(
                f"QuantileLengths quantiles must be >= 0 and non-decreasing, got {self.quantiles}"
            )

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        values = np.interp(rng.random(size), self.levels, self.quantiles)
        return np.maximum(np.rint(values), 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------- traces


def synthetic_trace(
    rate_curve: RateCurve | float,
    duration_s: float,
    prompt_lengths: LengthDistribution,
    output_lengths: LengthDistribution,
    rng: np.random.Generator,
    *,
    process: ArrivalProcess | str = ArrivalProcess.POISSON,
    cv: float = 1.0,
    weibull_shape: float | None = None,
    image_lengths: LengthDistribution | None = None,
    name: str = "synthetic",
) -> RequestTrace:
    """A synthetic trace over ``[0, duration_s)``: arrivals from the rate curve, independent lengths.

    :param rate_curve: rate over time, or a number (constant req/s).
    :param duration_s: horizon (s); it becomes the trace's time range.
    :param prompt_lengths: prompt-token distribution.
    :param output_lengths: output-token distribution.
    :param rng: random source (arrivals first, then prompts, outputs, images).
    :param process: arrival process (see :func:`generate_arrivals`), with ``cv`` / ``weibull_shape``.
    :param image_lengths: image-token distribution for a multimodal trace.
    :param name: trace name.
    """
    curve = ConstantRate(float(rate_curve)) if isinstance(rate_curve, int | float) else rate_curve
    arrival_s = generate_arrivals(curve, duration_s, rng, process=process, cv=cv, weibull_shape=weibull_shape)
    count = arrival_s.size
    prompt_tokens = prompt_lengths.sample(count, rng)
    output_tokens = output_lengths.sample(count, rng)
    image_tokens = None if image_lengths is None else image_lengths.sample(count, rng)
    return RequestTrace(
        arrival_s=arrival_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        image_tokens=image_tokens,
        name=name,
        time_range_s=(0.0, float(duration_s)),
    )
