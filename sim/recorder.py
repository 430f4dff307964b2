"""Streaming metrics of the discrete-event engine.

Memory grows only with the number of requests (and only when per-request records are kept):

* :class:`TbtHistograms` keeps, per *active* request, a fixed-size histogram of its time-between-token
  gaps on log-spaced bins (2 % wide, 0.1 ms .. 1,000 s) plus its exact maximum; rows are recycled when
  requests finish, so memory follows concurrency. Per-request p50/p99 come from the histogram
  (within 1 % relative error), the maximum is exact.
* :class:`LogSketch` is the same binning for run-level quantiles of TTFT / TBT when per-request records
  are off.
* :class:`RequestRecords` holds one row per finished request (``SimConfig.record_requests``).
* :class:`IntervalAccumulator` gathers one control interval's figures.
* :class:`MetricsRecorder` turns request events into :class:`IntervalMetrics` and a
  :class:`RunSummary` (the "decided" rule of :mod:`opscale.sim.metrics`; interval TTFT figures
  include requests decided by a passed TTFT deadline at their waiting time so far, a lower bound;
  interval TBT and end-to-end figures cover requests that completed; run-level ``tbt_p99_s`` is the
  99th percentile over requests of their TBT statistic) and GPU time integrals into energy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from opscale.sim.hardware import GPUSpec
from opscale.sim.metrics import SLO, IntervalMetrics, RunSummary, UnitIntervalMetrics
from opscale.sim.models import UnitKind
from opscale.sim.power import PowerModel

if TYPE_CHECKING:
    from opscale.sim.streams import ActiveRequest

__all__ = [
    "IntervalAccumulator",
    "LogSketch",
    "MetricsRecorder",
    "RequestRecords",
    "StreamGaps",
    "TbtHistograms",
    "gap_bin",
]

#: Smallest binned value, s; smaller gaps land in bin 0.
_BIN_FLOOR_S = 1e-4
#: Relative bin width.
_BIN_RATIO = 1.02
_LOG_RATIO = math.log(_BIN_RATIO)
#: Bins cover 0.1 ms .. 1,000 s.
NUM_BINS = math.ceil(math.log(1e3 / _BIN_FLOOR_S) / _LOG_RATIO) + 1
#: Representative value of each bin (geometric centre).
BIN_VALUES_S = _BIN_FLOOR_S * _BIN_RATIO ** (np.arange(NUM_BINS) + 0.5)


def gap_bin(value_s: float) -> int:
    """Bin index of a positive duration."""
    if value_s <= _BIN_FLOOR_S:
        return 0
    return min(NUM_BINS - 1, int(math.log(value_s / _BIN_FLOOR_S) / _LOG_RATIO))


def gap_bins(values_s: np.ndarray) -> np.ndarray:
    """Vectorised :func:`gap_bin`."""
    scaled = np.log(np.maximum(values_s, _BIN_FLOOR_S) / _BIN_FLOOR_S) / _LOG_RATIO
    return np.minimum(NUM_BINS - 1, scaled.astype(np.int64))


@njit(cache=True)
def _quantile_bin(counts: np.ndarray, quantile: float) -> int:
    """Bin holding the value of rank ``floor(q * (n - 1))`` (0-based) among the binned values; -1 when
    there are none. Compiled: it runs for every finished request, over ~700 bins."""
    total = 0
    last = -1
    for i in range(counts.size):
        if counts[i]:
            total += counts[i]
            last = i
    if total == 0:
        return -1
    target = math.floor(quantile * (total - 1)) + 1
    cumulative = 0
    for i in range(counts.size):
        cumulative += counts[i]
        if cumulative >= target:
            return i
    return last


def _histogram_quantile(counts: np.ndarray, quantile: float) -> float:
    """Quantile of binned values: the value of rank ``floor(q * (n - 1))``, numpy's ``"lower"``
    percentile, read as its bin's centre (0 when there are none)."""
    index = _quantile_bin(counts, quantile)
    return 0.0 if index < 0 else float(BIN_VALUES_S[index])


class StreamGaps:
    """Cumulative histogram of one stream's iteration gaps (every decoding member shares them)."""

    def __init__(self) -> None:
        self.counts = np.zeros(NUM_BINS, dtype=np.int64)

    def add(self, gap_s: float) -> None:
        self.counts[gap_bin(gap_s)] += 1

    def add_ramp(self, first_gap_s: float, last_gap_s: float, count: int) -> None:
        """``count`` gaps growing linearly from ``first_gap_s`` to ``last_gap_s`` (a decode run)."""
        first, last = gap_bin(first_gap_s), gap_bin(last_gap_s)
        if first == last:
            self.counts[first] += count
        else:
            self.counts += np.bincount(
                gap_bins(np.linspace(first_gap_s, last_gap_s, count)), minlength=NUM_BINS
            )


class TbtHistograms:
    """Per-active-request TBT gap histograms, rows recycled on completion.

    A decoding request sees exactly its stream's iteration gaps, so its histogram is kept as
    ``banked + (stream histogram now - stream histogram when it joined)``: a stream iteration (or a
    whole fast-forwarded run) costs one update of the stream's histogram, not one per request. Gaps a
    request does not share with its stream (after a preemption or a migration) are banked alone.
    """

    def __init__(self, initial_rows: int = 256) -> None:
        self.banked = np.zeros((initial_rows, NUM_BINS), dtype=np.int64)
        self.joined = np.zeros((initial_rows, NUM_BINS), dtype=np.int64)
        self._free: list[int] = list(range(initial_rows - 1, -1, -1))

    def allocate(self) -> int:
        """A zeroed row for a new request."""
        if not self._free:
            old = self.banked.shape[0]
            self.banked = np.concatenate([self.banked, np.zeros_like(self.banked)])
            self.joined = np.concatenate([self.joined, np.zeros_like(self.joined)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def release(self, row: int) -> None:
        self.banked[row].fill(0)
        self._free.append(row)

    def join(self, row: int, stream: StreamGaps) -> None:
        """The request starts sharing ``stream``'s gaps."""
        self.joined[row] = stream.counts

    def leave(self, row: int, stream: StreamGaps) -> None:
        """The request stops sharing ``stream``'s gaps: bank what it saw."""
        self.banked[row] += stream.counts - self.joined[row]

    def add_own(self, row: int, gap_s: float) -> None:
        """A gap only this request saw."""
        self.banked[row, gap_bin(gap_s)] += 1

    def replace_shared(self, row: int, shared_gap_s: float, own_gap_s: float) -> None:
        """The request (joined) saw ``own_gap_s`` in an iteration whose shared gap is ``shared_gap_s``."""
        self.joined[row, gap_bin(shared_gap_s)] -= 1
        self.banked[row, gap_bin(own_gap_s)] += 1

    def quantiles(self, row: int) -> tuple[float, float]:
        """(p50, p99) of the row's banked gaps (0 when it has none)."""
        counts = self.banked[row]
        return _histogram_quantile(counts, 0.5), _histogram_quantile(counts, 0.99)


class LogSketch:
    """Streaming quantiles of positive values on the TBT bins (1 % relative error)."""

    def __init__(self) -> None:
        self.counts = np.zeros(NUM_BINS, dtype=np.int64)
        self.total = 0.0
        self.n = 0

    def add(self, value_s: float) -> None:
        self.counts[gap_bin(value_s)] += 1
        self.total += value_s
        self.n += 1

    def quantile(self, quantile: float) -> float:
        return _histogram_quantile(self.counts, quantile)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


@dataclass
class RequestRecords:
    """One row per finished request (column arrays, sized to the trace).

    ``ttft_s`` etc. are ``nan`` for requests that never finished.
    """

    size: int
    arrival_s: np.ndarray = field(init=False)
    prompt_tokens: np.ndarray = field(init=False)
    output_tokens: np.ndarray = field(init=False)
    ttft_s: np.ndarray = field(init=False)
    e2e_s: np.ndarray = field(init=False)
    tbt_p50_s: np.ndarray = field(init=False)
    tbt_p99_s: np.ndarray = field(init=False)
    tbt_max_s: np.ndarray = field(init=False)
    preemptions: np.ndarray = field(init=False)
    stream: np.ndarray = field(init=False)
    slo_met: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        nan = np.full(self.size, np.nan)
        self.arrival_s = nan.copy()
        self.prompt_tokens = np.zeros(self.size, dtype=np.int64)
        self.output_tokens = np.zeros(self.size, dtype=np.int64)
        self.ttft_s = nan.copy()
        self.e2e_s = nan.copy()
        self.tbt_p50_s = nan.copy()
        self.tbt_p99_s = nan.copy()
        self.tbt_max_s = nan.copy()
        self.preemptions = np.zeros(self.size, dtype=np.int32)
        self.stream = np.full(self.size, -1, dtype=np.int32)
        self.slo_met = np.zeros(self.size, dtype=bool)

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array, in CSV order."""
        return {
            "request": np.arange(self.size),
            "arrival_s": self.arrival_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "tbt_p50_s": self.tbt_p50_s,
            "tbt_p99_s": self.tbt_p99_s,
            "tbt_max_s": self.tbt_max_s,
            "preemptions": self.preemptions,
            "attention_replica": self.stream,
            "slo_met": self.slo_met,
        }


@dataclass
class IntervalAccumulator:
    """Figures of the control interval in progress (reset at each boundary)."""

    arrivals: int = 0
    completions: int = 0
    slo_met: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tbt_s: list[float] = field(default_factory=list)
    tbt_mean_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    @property
    def decided(self) -> int:
        return len(self.ttft_s)


@dataclass
class _RunTotals:
    """Whole-run aggregates (streaming)."""

    decided: int = 0
    slo_met: int = 0
    completed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    gpu_seconds: float = 0.0
    energy_j: float = 0.0
    gpus_peak: int = 0
    ttft: LogSketch = field(default_factory=LogSketch)
    tbt: LogSketch = field(default_factory=LogSketch)
    e2e: LogSketch = field(default_factory=LogSketch)
    unit_busy_s: dict[UnitKind, float] = field(default_factory=dict)
    unit_capacity_s: dict[UnitKind, float] = field(default_factory=dict)


class MetricsRecorder:
    """Request-level and GPU-level metrics of one run, aggregated as they stream in.

    :param slo: the latency SLO that decides attainment.
    :param power_model: GPU power levels (energy).
    :param num_requests: requests in the trace (size of the per-request records).
    :param record_requests: keep :class:`RequestRecords`.
    """

    def __init__(self, slo: SLO, power_model: PowerModel, num_requests: int, record_requests: bool) -> None:
        self.slo = slo
        self.power_model = power_model
        self.tbt = TbtHistograms()
        self.records = RequestRecords(num_requests) if record_requests else None
        self.interval = IntervalAccumulator()
        self.interval_start_s = 0.0
        self.totals = _RunTotals()
        #: per global GPU index, busy fraction over the last closed interval
        self.gpu_utilisation: list[float] = []

    # ------------------------------------------------------------------ request events
    def tokens(self, prompt_tokens: int, output_tokens: int, preemptions: int) -> None:
        interval = self.interval
        interval.prompt_tokens += prompt_tokens
        interval.output_tokens += output_tokens
        interval.preemptions += preemptions

    def first_token(self, request: ActiveRequest, now_s: float) -> None:
        ttft = now_s - request.arrival_s
        self.totals.ttft.add(ttft)
        if ttft > self.slo.ttft_s and not request.ttft_decided:
            self._decide_violation(request, ttft)

    def _decide_violation(self, request: ActiveRequest, ttft_s: float) -> None:
        request.ttft_decided = True
        self.interval.ttft_s.append(ttft_s)
        self.totals.decided += 1

    def decide_deadlines(self, waiting: Iterable[ActiveRequest], now_s: float) -> None:
        """Requests still without a first token whose TTFT deadline passed are decided now (violations)."""
        deadline = self.slo.ttft_s
        for request in waiting:
            if (
                request.first_token_s < 0
                and not request.ttft_decided
                and now_s - request.arrival_s > deadline
            ):
                self._decide_violation(request, now_s - request.arrival_s)

    def reject(self, request: ActiveRequest, now_s: float) -> None:
        """A request leaves unserved: decided (as a violation) now unless it already was."""
        self.tbt.release(request.hist_row)
        if not request.ttft_decided:
            first_s = request.first_token_s if request.first_token_s >= 0 else now_s
            self._decide_violation(request, first_s - request.arrival_s)

    def complete(self, request: ActiveRequest, now_s: float, stream_id: int) -> None:
        """A request finished: its figures go to the interval, the run and the records."""
        p50, p99 = self.tbt.quantiles(request.hist_row)
        tbt_max = request.tbt_max_s
        p99 = min(p99, tbt_max) if request.gap_count else 0.0
        p50 = min(p50, tbt_max) if request.gap_count else 0.0
        self.tbt.release(request.hist_row)
        ttft = request.first_token_s - request.arrival_s
        e2e = now_s - request.arrival_s
        statistic = tbt_max if self.slo.tbt_statistic == "max" else p99
        met = ttft <= self.slo.ttft_s and statistic <= self.slo.tbt_s
        interval = self.interval
        totals = self.totals
        if not request.ttft_decided:
            interval.ttft_s.append(ttft)
            totals.decided += 1
            if met:
                interval.slo_met += 1
                totals.slo_met += 1
        interval.completions += 1
        interval.e2e_s.append(e2e)
        if request.gap_count:
            interval.tbt_s.append(statistic)
            interval.tbt_mean_s.append(request.gap_sum_s / request.gap_count)
            totals.tbt.add(statistic)
        totals.e2e.add(e2e)
        totals.completed += 1
        totals.preemptions += request.preemptions
        records = self.records
        if records is not None:
            i = request.index
            records.arrival_s[i] = request.arrival_s
            records.prompt_tokens[i] = request.prompt
            records.output_tokens[i] = request.output
            records.ttft_s[i] = ttft
            records.e2e_s[i] = e2e
            records.tbt_p50_s[i] = p50
            records.tbt_p99_s[i] = p99
            records.tbt_max_s[i] = tbt_max
            records.preemptions[i] = request.preemptions
            records.stream[i] = stream_id
            records.slo_met[i] = met

    # ------------------------------------------------------------------ intervals and the run
    def close_interval(
        self,
        end_s: float,
        gpu_rows: list[tuple[GPUSpec, float, float, float]],
        units: dict[UnitKind, UnitIntervalMetrics],
        *,
        running: int,
        waiting: int,
        gpus_powered: int,
    ) -> IntervalMetrics:
        """Close ``[interval_start_s, end_s)``.

        :param gpu_rows: per GPU ``(spec, powered_s, busy_s, compute_bound_s)`` over the interval.
        :param units: per-unit figures over the interval.
        """
        start = self.interval_start_s
        duration = end_s - start
        acc = self.interval
        totals = self.totals
        energy = 0.0
        gpu_seconds = 0.0
        self.gpu_utilisation = [
            min(1.0, busy_s / duration) if duration > 0 else 0.0 for _, _, busy_s, _ in gpu_rows
        ]
        for spec, powered_s, busy_s, compute_s in gpu_rows:
            if powered_s <= 0:
                continue
            gpu_seconds += powered_s
            busy_fraction = min(1.0, busy_s / powered_s)
            compute_fraction = compute_s / busy_s if busy_s > 0 else 0.0
            energy += self.power_model.energy_j(spec, powered_s, busy_fraction, min(1.0, compute_fraction))
        ttft = np.asarray(acc.ttft_s)
        tbt = np.asarray(acc.tbt_s)
        metrics = IntervalMetrics(
            start_s=start,
            end_s=end_s,
            arrivals=acc.arrivals,
            completions=acc.completions,
            decided=acc.decided,
            slo_met=acc.slo_met,
            slo_attainment=acc.slo_met / acc.decided if acc.decided else 1.0,
            ttft_mean_s=float(ttft.mean()) if ttft.size else 0.0,
            ttft_p50_s=float(np.percentile(ttft, 50)) if ttft.size else 0.0,
            ttft_p99_s=float(np.percentile(ttft, 99)) if ttft.size else 0.0,
            tbt_mean_s=float(np.mean(acc.tbt_mean_s)) if acc.tbt_mean_s else 0.0,
            tbt_p99_s=float(np.percentile(tbt, 99)) if tbt.size else 0.0,
            e2e_mean_s=float(np.mean(acc.e2e_s)) if acc.e2e_s else 0.0,
            prompt_tokens_served=acc.prompt_tokens,
            output_tokens_served=acc.output_tokens,
            preemptions=acc.preemptions,
            running_requests=running,
            waiting_requests=waiting,
            gpus_powered=gpus_powered,
            gpus_powered_mean=gpu_seconds / duration if duration > 0 else 0.0,
            gpu_seconds=gpu_seconds,
            energy_j=energy,
            units=units,
        )
        totals.prompt_tokens += acc.prompt_tokens
        totals.output_tokens += acc.output_tokens
        totals.gpu_seconds += gpu_seconds
        totals.energy_j += energy
        totals.gpus_peak = max(totals.gpus_peak, gpus_powered)
        for unit, unit_metrics in units.items():
            capacity = unit_metrics.replicas * duration
            totals.unit_busy_s[unit] = totals.unit_busy_s.get(unit, 0.0) + unit_metrics.utilisation * capacity
            totals.unit_capacity_s[unit] = totals.unit_capacity_s.get(unit, 0.0) + capacity
        self.interval = IntervalAccumulator()
        self.interval_start_s = end_s
        return metrics

    def note_gpus_powered(self, gpus_powered: int) -> None:
        self.totals.gpus_peak = max(self.totals.gpus_peak, gpus_powered)

    def summary(self, duration_s: float, arrived: int) -> RunSummary:
        """Whole-run figures (percentiles exact from records when kept, else 1 % sketches)."""
        totals = self.totals
        records = self.records
        if records is not None and totals.completed:
            done = ~np.isnan(records.e2e_s)
            ttft = records.ttft_s[done]
            statistic = records.tbt_max_s if self.slo.tbt_statistic == "max" else records.tbt_p99_s
            has_gaps = done & (records.output_tokens > 1)
            ttft_p99 = float(np.percentile(ttft, 99))
            ttft_mean = float(ttft.mean())
            tbt_p99 = float(np.percentile(statistic[has_gaps], 99)) if has_gaps.any() else 0.0
            e2e_mean = float(records.e2e_s[done].mean())
        else:
            ttft_p99, ttft_mean = totals.ttft.quantile(0.99), totals.ttft.mean
            tbt_p99 = totals.tbt.quantile(0.99)
            e2e_mean = totals.e2e.mean
        tokens = totals.prompt_tokens + totals.output_tokens
        per_s = 1.0 / duration_s if duration_s > 0 else 0.0
        return RunSummary(
            duration_s=duration_s,
            requests=arrived,
            completed=totals.completed,
            slo_attainment=totals.slo_met / totals.decided if totals.decided else 1.0,
            ttft_mean_s=ttft_mean,
            ttft_p99_s=ttft_p99,
            tbt_p99_s=tbt_p99,
            e2e_mean_s=e2e_mean,
            throughput_requests_per_s=totals.completed * per_s,
            throughput_tokens_per_s=tokens * per_s,
            goodput_requests_per_s=totals.slo_met * per_s,
            preemptions=totals.preemptions,
            gpus_mean=totals.gpu_seconds * per_s,
            gpus_peak=totals.gpus_peak,
            gpu_seconds=totals.gpu_seconds,
            energy_j=totals.energy_j,
            unit_utilisation={
                unit: totals.unit_busy_s[unit] / capacity if capacity > 0 else 0.0
                for unit, capacity in totals.unit_capacity_s.items()
            },
        )
