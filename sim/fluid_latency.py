"""Latency distributions of the fluid simulator: TTFT mixtures, TBT tail counts, run-level histograms.

* :class:`TtftMixture`: the TTFT of a request decided in an interval. A served request of prompt
  quantile ``q`` waits a fixed time ``fixed_s[q]`` (backlog drain, residual iteration, its prefill
  iterations) plus an admission wait that is 0 with probability ``1 - prob_wait`` and otherwise
  exponential with mean ``wait_mean_s`` (Erlang-C); a share ``late_share`` of the decided requests are
  queued requests decided at their TTFT deadline, at ``late_s``.
* :func:`poisson_at_least`: ``P(N >= m)`` for Poisson counts (long TBT gaps per request).
* :class:`LogHistogram`: probability mass on log-spaced bins for run-level percentiles; memory and
  cost per interval are constant.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np
from numpy.typing import NDArray

from opscale.sim.queueing import ErlangCTable

__all__ = [
    "ErlangRows",
    "LogHistogram",
    "PoissonTailTable",
    "TtftMixture",
    "interp_scalar",
    "poisson_at_least",
    "shared_poisson_tail_table",
    "weighted_quantile",
]

FloatArray = NDArray[np.float64]

#: Multiples of the mean admission wait at which the TTFT CDF is probed (exponential tail up to ~1e-4).
_TAIL_STEPS = np.array([0.05, 0.15, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.7, 3.5, 4.6, 6.0, 7.5, 9.2])
_TAIL_STEP_LIST = _TAIL_STEPS.tolist()


def interp_scalar(
    x: float, xp: Sequence[float], fp: Sequence[float], left: float | None = None, right: float | None = None
) -> float:
    """:func:`numpy.interp` for one ``x`` over Python sequences (``xp`` non-decreasing), with numpy's
    rules: ``left`` / ``right`` (default the end values) strictly outside, ``fp[-1]`` at ``xp[-1]``, and
    between tied points the last ``xp[j] <= x``. Pure Python: faster than numpy for one value."""
    if x > xp[-1]:
        return fp[-1] if right is None else right
    if x < xp[0]:
        return fp[0] if left is None else left
    above = bisect_right(xp, x)
    if above == len(xp):
        return fp[-1]
    below = above - 1
    slope = (fp[above] - fp[below]) / (xp[above] - xp[below])
    return slope * (x - xp[below]) + fp[below]


@dataclass(frozen=True)
class TtftMixture:
    """TTFT distribution of the requests decided in one interval (see the module docstring).

    :param fixed_s: per prompt quantile (equally likely), the deterministic part, s.
    :param prob_wait: probability of an admission wait.
    :param wait_mean_s: mean admission wait given a wait, s.
    :param late_share: share of decided requests decided at their deadline while still queued.
    :param late_s: their TTFT (time waited), s.
    """

    fixed_s: FloatArray
    prob_wait: float
    wait_mean_s: float
    late_share: float = 0.0
    late_s: float = 0.0

    def cdf(self, t: FloatArray) -> FloatArray:
        """``P(TTFT <= t)`` for every entry of ``t``."""
        t = np.asarray(t, dtype=np.float64)
        slack = t[..., None] - self.fixed_s
        if self.prob_wait > 0 and self.wait_mean_s > 0:
            inside = 1.0 - self.prob_wait * np.exp(-np.maximum(slack, 0.0) / self.wait_mean_s)
        else:
            inside = np.ones_like(slack)
        served = np.where(slack >= 0.0, inside, 0.0).sum(axis=-1) / self.fixed_s.size
        if self.late_share <= 0:
            return served
        result: FloatArray = (1.0 - self.late_share) * served + self.late_share * (t >= self.late_s)
        return result

    def mean_s(self) -> float:
        """Mean TTFT."""
        served = float(self.fixed_s.sum()) / self.fixed_s.size + self.prob_wait * self.wait_mean_s
        return (1.0 - self.late_share) * served + self.late_share * self.late_s

    def cdf_scalar(self, t: float, fixed_s: Sequence[float]) -> float:
        """:meth:`cdf` at one ``t`` in pure Python; ``fixed_s``: :attr:`fixed_s` as a list (the caller
        converts it once)."""
        prob_wait, wait_mean_s = self.prob_wait, self.wait_mean_s
        total = 0.0
        if prob_wait > 0 and wait_mean_s > 0:
            for fixed in fixed_s:
                if t >= fixed:
                    total += 1.0 - prob_wait * math.exp(-(t - fixed) / wait_mean_s)
        else:
            for fixed in fixed_s:
                if t >= fixed:
                    total += 1.0
        served = total / len(fixed_s)
        if self.late_share <= 0:
            return served
        return (1.0 - self.late_share) * served + self.late_share * float(t >= self.late_s)

    def quantiles(self, levels: tuple[float, ...]) -> tuple[float, ...]:
        """Quantiles by interpolating the CDF on the fixed parts and a tail grid past each of them.

        The CDF is non-decreasing, so each level's bracket on the sorted grid is found by bisection,
        evaluating the CDF at a few grid points only, cached across levels; the interpolation is
        :func:`numpy.interp`'s on the whole grid. Pure Python: a vectorised CDF over the whole grid
        costs several times more at this size."""
        fixed_s = sorted(self.fixed_s.tolist())
        cdf_at = self._sorted_cdf(fixed_s)
        top, wait_mean_s, late_s = fixed_s[-1], self.wait_mean_s, self.late_s
        # just below each point mass too, so that a jump of the CDF is crossed at (almost) its location
        grid = [
            *fixed_s,
            *[fixed * (1.0 - 1e-9) for fixed in fixed_s],
            *[top + wait_mean_s * step for step in _TAIL_STEP_LIST],
            late_s,
            late_s * (1.0 - 1e-9),
        ]
        grid.sort()
        cdf: dict[int, float] = {}

        def value(index: int) -> float:
            if index not in cdf:
                cdf[index] = cdf_at(grid[index])
            return cdf[index]

        last = len(grid) - 1
        result = []
        for level in levels:
            if value(last) < level:
                result.append(grid[last])
                continue
            low, high = 0, last + 1  # bisect for the first grid point whose CDF exceeds the level
            while low < high:
                middle = (low + high) // 2
                if value(middle) > level:
                    high = middle
                else:
                    low = middle + 1
            if low == 0:
                result.append(grid[0])
            elif low > last:
                result.append(grid[last])
            else:
                slope = (grid[low] - grid[low - 1]) / (value(low) - value(low - 1))
                result.append(slope * (level - value(low - 1)) + grid[low - 1])
        return tuple(result)

    def _sorted_cdf(self, fixed_s: list[float]) -> Callable[[float], float]:
        """:meth:`cdf_scalar` for ``fixed_s`` sorted ascending, in O(log Q) per point: with ``k`` fixed
        parts at or below ``t``, the served CDF is ``(k - p sum_{j<k} exp(-(t - f_j) / w)) / Q``, and the
        sum is ``S_k exp(-(t - f_{k-1}) / w)`` with ``S_k = sum_{j<k} exp(-(f_{k-1} - f_j) / w)``,
        accumulated once (every exponent <= 0: no overflow)."""
        count = len(fixed_s)
        prob_wait, wait_mean_s, late_share, late_s = (
            self.prob_wait,
            self.wait_mean_s,
            self.late_share,
            self.late_s,
        )
        waits = prob_wait > 0 and wait_mean_s > 0
        sums = [1.0]
        if waits:
            for previous, fixed in pairwise(fixed_s):
                sums.append(sums[-1] * math.exp((previous - fixed) / wait_mean_s) + 1.0)

        def cdf(t: float) -> float:
            below = bisect_right(fixed_s, t)
            if below == 0:
                served = 0.0
            elif waits:
                served = (
                    below - prob_wait * sums[below - 1] * math.exp((fixed_s[below - 1] - t) / wait_mean_s)
                ) / count
            else:
                served = below / count
            if late_share <= 0:
                return served
            return (1.0 - late_share) * served + late_share * float(t >= late_s)

        return cdf


class ErlangRows:
    """Rows of an :class:`opscale.sim.queueing.ErlangCTable` as Python lists (built when first asked,
    per server count), for scalar lookups in hot loops without numpy indexing.

    :param table: the table.
    :param grid_points: its utilisation grid points (as it was built with).
    """

    def __init__(self, table: ErlangCTable, grid_points: int) -> None:
        self._table = table
        self._grid = np.linspace(0.0, 1.0, grid_points)
        #: grid intervals: ``rho`` lies between points ``int(rho * steps)`` and the next
        self.steps = grid_points - 1
        self._rows: dict[int, list[float]] = {}

    def row(self, servers: int) -> list[float]:
        """``C(c, c * rho)`` at the grid points for ``c = servers`` (clipped to the table's largest)."""
        servers = min(int(servers), self._table.max_servers)
        row = self._rows.get(servers)
        if row is None:
            row = self._table.lookup(np.full(self._grid.size, servers), self._grid).tolist()
            self._rows[servers] = row
        return row

    def at(self, row: list[float], utilisation: float) -> float:
        """:meth:`ErlangCTable.lookup_scalar` on a row from :meth:`row` (linear in ``rho``)."""
        position = (0.0 if utilisation < 0.0 else 1.0 if utilisation > 1.0 else utilisation) * self.steps
        index = int(position)
        if index >= self.steps:
            index = self.steps - 1
        low = row[index]
        return low + (position - index) * (row[index + 1] - low)


def poisson_at_least(mean: FloatArray, needed: FloatArray) -> FloatArray:
    """``P(N >= needed)`` for ``N ~ Poisson(mean)``, elementwise (``needed``: integers >= 1)."""
    mean = np.maximum(np.asarray(mean, dtype=np.float64), 0.0)
    needed = np.asarray(needed, dtype=np.float64)
    k = np.arange(int(needed.max()))
    log_factorial = np.cumsum(np.log(np.maximum(k, 1)))
    with np.errstate(divide="ignore"):
        log_terms = -mean[..., None] + k * np.log(np.maximum(mean[..., None], 1e-300)) - log_factorial
    below = np.where(k < needed[..., None], np.exp(log_terms), 0.0).sum(axis=-1)
    result: FloatArray = np.clip(1.0 - below, 0.0, 1.0)
    return result


class PoissonTailTable:
    """``P(N >= m)`` for ``N ~ Poisson(mean)``, tabulated for ``m = 1 .. max_count`` on a log grid of
    means (40 per decade, 1e-4 .. 1e4) and interpolated linearly in ``log(mean)``; counts above
    ``max_count`` use the last row. Exact at the grid points (see :func:`poisson_at_least`).

    :param max_count: largest ``m`` tabulated.
    """

    MEANS = np.geomspace(1e-4, 1e4, 8 * 40 + 1)

    def __init__(self, max_count: int = 128) -> None:
        self.max_count = max_count
        counts = np.arange(1, max_count + 1, dtype=np.float64)
        table = np.vstack([poisson_at_least(self.MEANS, np.full(self.MEANS.size, m)) for m in counts])
        self._flat = table.ravel()
        self._flat_list = self._flat.tolist()
        self._row = self.MEANS.size
        self._log_low = float(np.log(self.MEANS[0]))
        self._mean_low = float(self.MEANS[0])
        self._per_log = (self.MEANS.size - 1) / float(np.log(self.MEANS[-1] / self.MEANS[0]))

    def lookup_scalar(self, mean: float, needed: int) -> float:
        """:meth:`lookup` for one mean and count, in pure Python."""
        if mean < self._mean_low:
            return 0.0
        position = min(
            max((math.log(mean + 1e-300) - self._log_low) * self._per_log, 0.0), self._row - 1.000001
        )
        index = int(position)
        flat = min(needed, self.max_count) * self._row + (index - self._row)
        low = self._flat_list[flat]
        return low + (position - index) * (self._flat_list[flat + 1] - low)

    def total_at_least(self, rate: float, counts: Sequence[float], needed: Sequence[int]) -> float:
        """``sum_j P(N_j >= needed[j])`` with ``N_j ~ Poisson(counts[j] * rate)``: :meth:`lookup_scalar`
        over a list in one call (the TBT tails of the length quantiles)."""
        if rate <= 0.0:
            return 0.0
        log, flat_list, row, max_count = math.log, self._flat_list, self._row, self.max_count
        log_low, per_log, mean_low, top = self._log_low, self._per_log, self._mean_low, self._row - 1.000001
        total = 0.0
        for count, count_needed in zip(counts, needed, strict=True):
            mean = count * rate
            if mean < mean_low:
                continue
            position = (log(mean + 1e-300) - log_low) * per_log
            position = 0.0 if position < 0.0 else top if position > top else position
            index = int(position)
            flat = (count_needed if count_needed < max_count else max_count) * row + (index - row)
            low = flat_list[flat]
            total += low + (position - index) * (flat_list[flat + 1] - low)
        return total

    def lookup(self, mean: FloatArray, needed: FloatArray) -> FloatArray:
        """``P(N >= needed)`` elementwise (``needed`` integers >= 1; means clipped to the grid)."""
        mean = np.asarray(mean, dtype=np.float64)
        position = np.clip((np.log(mean + 1e-300) - self._log_low) * self._per_log, 0.0, self._row - 1.000001)
        index = position.astype(np.int64)
        flat = np.minimum(needed, self.max_count).astype(np.int64) * self._row + (index - self._row)
        low = self._flat[flat]
        # below the grid (mean < 1e-4, or 0) the tail is ~mean^m/m!: 0 to table precision
        result: FloatArray = (low + (position - index) * (self._flat[flat + 1] - low)) * (
            mean >= self._mean_low
        )
        return result


@lru_cache(maxsize=2)
def shared_poisson_tail_table(max_count: int = 128) -> PoissonTailTable:
    """One read-only :class:`PoissonTailTable` per size, built on first use (~0.1 s) and shared."""
    return PoissonTailTable(max_count)


def weighted_quantile(values: Sequence[float], weights: Sequence[float], quantile: float) -> float:
    """Quantile of a discrete distribution (``values`` with probability ``weights``); 0 if empty. Pure
    Python: faster than numpy for the few dozen points it is called with."""
    pairs = sorted(zip(values, weights, strict=True), key=lambda pair: pair[0])
    cumulative = []
    total = 0.0
    for _, weight in pairs:
        total += weight
        cumulative.append(total)
    if not pairs or total <= 0:
        return 0.0
    index = bisect_left(cumulative, quantile * total)
    return float(pairs[min(index, len(pairs) - 1)][0])


class LogHistogram:
    """Mass on log-spaced bins from 0.1 ms to 10,000 s (24 per decade, ~10 % wide) for run percentiles."""

    EDGES_S = np.geomspace(1e-4, 1e4, 8 * 24 + 1)

    def __init__(self) -> None:
        self.mass = np.zeros(self.EDGES_S.size)

    def add_cdf(self, cdf_at_edges: FloatArray, weight: float) -> None:
        """Add ``weight`` times a distribution given by its CDF at :attr:`EDGES_S`."""
        self.mass += weight * np.diff(cdf_at_edges, prepend=0.0)

    def add_points(self, values: FloatArray, weights: FloatArray) -> None:
        """Add point masses."""
        bins = np.minimum(np.searchsorted(self.EDGES_S, values), self.EDGES_S.size - 1)
        np.add.at(self.mass, bins, weights)

    def quantile(self, quantile: float) -> float:
        """The upper edge of the bin holding ``quantile`` of the mass (0 when empty)."""
        total = float(self.mass.sum())
        if total <= 0:
            return 0.0
        index = int(np.searchsorted(np.cumsum(self.mass), quantile * total))
        return float(self.EDGES_S[min(index, self.EDGES_S.size - 1)])
