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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["IntervalAccumulator", "LogSketch", "RequestRecords", "StreamGaps", "TbtHistograms", "gap_bin"]

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


def _histogram_quantile(counts: np.ndarray, quantile: float) -> float:
    """Quantile (linear rank ``q * (n - 1)``, as ``numpy.percentile``) of binned values."""
    used = np.flatnonzero(counts)
    if used.size == 0:
        return 0.0
    cumulative = np.cumsum(counts[used])
    rank = quantile * (int(cumulative[-1]) - 1)
    position = int(np.searchsorted(cumulative, math.floor(rank) + 1))
    return float(BIN_VALUES_S[used[min(position, used.size - 1)]])


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
