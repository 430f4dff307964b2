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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from opscale.sim.fluid_kernel import ttft_quantiles

__all__ = [
    "LogHistogram",
    "PoissonTailTable",
    "TtftMixture",
    "poisson_at_least",
    "shared_poisson_tail_table",
]

FloatArray = NDArray[np.float64]


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

    def quantiles(self, levels: Sequence[float]) -> tuple[float, ...]:
        """Quantiles by interpolating the CDF on the fixed parts and a tail grid past each of them
        (:func:`opscale.sim.fluid_kernel.ttft_quantiles`, which the interval model calls)."""
        values = ttft_quantiles(
            np.asarray(self.fixed_s, dtype=np.float64),
            self.prob_wait,
            self.wait_mean_s,
            self.late_share,
            self.late_s,
            np.asarray(levels, dtype=np.float64),
        )
        return tuple(float(value) for value in values)


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
        #: the table, row ``m - 1`` for count ``m``, flattened (the compiled interval model reads it)
        self.flat = table.ravel()
        self.flat.setflags(write=False)
        #: grid points per row
        self.row = self.MEANS.size
        #: log of the smallest mean, grid points per unit of log mean, the smallest mean
        self.log_low = float(np.log(self.MEANS[0]))
        self.per_log = (self.MEANS.size - 1) / float(np.log(self.MEANS[-1] / self.MEANS[0]))
        self.mean_low = float(self.MEANS[0])

    def lookup(self, mean: FloatArray, needed: FloatArray) -> FloatArray:
        """``P(N >= needed)`` elementwise (``needed`` integers >= 1; means clipped to the grid)."""
        mean = np.asarray(mean, dtype=np.float64)
        position = np.clip((np.log(mean + 1e-300) - self.log_low) * self.per_log, 0.0, self.row - 1.000001)
        index = position.astype(np.int64)
        flat = np.minimum(needed, self.max_count).astype(np.int64) * self.row + (index - self.row)
        low = self.flat[flat]
        # below the grid (mean < 1e-4, or 0) the tail is ~mean^m/m!: 0 to table precision
        result: FloatArray = (low + (position - index) * (self.flat[flat + 1] - low)) * (
            mean >= self.mean_low
        )
        return result


@lru_cache(maxsize=2)
def shared_poisson_tail_table(max_count: int = 128) -> PoissonTailTable:
    """One read-only :class:`PoissonTailTable` per size, built on first use (~0.1 s) and shared."""
    return PoissonTailTable(max_count)


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
