"""Interval arrival statistics of a trace in O(log n): the fluid simulator's view of the workload.

:class:`ArrivalIndex` precomputes, once per trace, cumulative sums over requests (sorted by arrival)
of the count and of the prompt and output tokens. The arrivals of any window ``[start_s, end_s)``
are then two binary searches and one row difference, so the cost of a fluid step does not depend on
how many requests arrive in it.

Length *distributions* are represented by ``quantiles`` equal-probability points (the
``(i + 0.5) / quantiles`` empirical quantiles). Their *shape* (points divided by their mean) is
taken from the block of :data:`SHAPE_BLOCK_S` seconds of the trace that holds the window (the whole
trace when the block has fewer than :data:`MIN_SHAPE_REQUESTS` requests), precomputed once; their
*level* is the window's mean. Real length distributions are far from lognormal (the Azure conv
prompts cluster around 400 and 1,000 tokens), and the shape is what the TTFT tail and the share of
long prefill iterations depend on. A window with few arrivals borrows strength for its means from
the whole trace: they are blended with the trace-wide means with a prior weight of
:data:`PRIOR_REQUESTS` requests.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["MIN_SHAPE_REQUESTS", "PRIOR_REQUESTS", "SHAPE_BLOCK_S", "ArrivalIndex", "ArrivalWindow"]

#: Weight (in requests) of the trace-wide mean lengths blended into each window's means.
PRIOR_REQUESTS = 8.0
#: Length of the trace blocks whose empirical length distributions give the windows' shapes, s.
SHAPE_BLOCK_S = 600.0
#: Fewest requests a block needs for its own shape (else the trace-wide shape is used).
MIN_SHAPE_REQUESTS = 64

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class ArrivalWindow:
    """Arrivals of one window and their length statistics.

    :param count: requests arriving in the window.
    :param prompt_tokens: total prompt tokens of those requests.
    :param output_tokens: total output tokens of those requests.
    :param prompt_mean: blended mean prompt length, tokens.
    :param output_mean: blended mean output length, tokens.
    :param prompt_shape: equal-probability prompt-length points divided by their mean (mean 1).
    :param output_shape: the same for output lengths.
    :param prompt_shape_list: ``prompt_shape`` as a Python list (for scalar loops).
    :param output_shape_list: ``output_shape`` as a Python list.
    """

    count: int
    prompt_tokens: float
    output_tokens: float
    prompt_mean: float
    output_mean: float
    prompt_shape: FloatArray
    output_shape: FloatArray
    prompt_shape_list: list[float]
    output_shape_list: list[float]


def quantiles_of(values: FloatArray, levels: FloatArray) -> FloatArray:
    """``np.quantile(values, levels)`` (its default ``"linear"`` method), bit for bit, from one sort: numpy
    partitions around every requested index, ~4x slower for 16 levels (and a new simulator per episode
    computes a few of these). ``levels`` in ``[0, 1]``, ``values`` not empty and free of NaN."""
    ordered = np.sort(values)
    virtual = (ordered.size - 1) * levels
    below = np.floor(virtual)
    gamma = virtual - below
    lower = below.astype(np.intp)
    low = ordered[lower]
    high = ordered[np.minimum(lower + 1, ordered.size - 1)]
    step = high - low
    # numpy's _lerp: from the nearer end, so that the result is monotone in the level
    points: FloatArray = low + step * gamma
    np.subtract(high, step * (1.0 - gamma), out=points, where=gamma >= 0.5)
    return points


def _shape(values: FloatArray, levels: FloatArray) -> FloatArray:
    points = quantiles_of(values, levels)
    result: FloatArray = points / points.mean()
    return result


class ArrivalIndex:
    """Cumulative per-request sums and per-block length shapes of a trace.

    :param arrival_s: arrival times, sorted ascending (as :class:`opscale.traces.RequestTrace` keeps them).
    :param prompt_tokens: prompt tokens per request (>= 1).
    :param output_tokens: output tokens per request (>= 1).
    :param quantiles: equal-probability points per length distribution.
    """

    def __init__(
        self, arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray, quantiles: int = 16
    ) -> None:
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        prompt = np.asarray(prompt_tokens, dtype=np.float64)
        output = np.asarray(output_tokens, dtype=np.float64)
        if not (self.arrival_s.size == prompt.size == output.size):
            raise ValueError(
                f"arrival_s, prompt_tokens, output_tokens differ in length: {self.arrival_s.size}, {prompt.size}, {output.size}"
            )
        if prompt.size and (prompt.min() < 1 or output.min() < 1):
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        if np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrival_s must be sorted ascending")
        if quantiles < 1:
            raise ValueError(f"quantiles must be >= 1, got {quantiles}")
        columns = np.stack([np.ones_like(prompt), prompt, output], axis=1)
        self._cumulative = np.vstack([np.zeros((1, 3)), np.cumsum(columns, axis=0)])
        #: cumulative arrival times, with a leading 0 (the FCFS fluid's mean arrival time of a range)
        self.cumulative_arrival_s = np.concatenate(([0.0], np.cumsum(self.arrival_s)))
        self._cumulative.setflags(write=False)
        self._cumulative_prompt = self._cumulative[:, 1].tolist()
        self._cumulative_output = self._cumulative[:, 2].tolist()
        self.num_requests = int(prompt.size)
        self.last_arrival_s = float(self.arrival_s[-1]) if prompt.size else 0.0
        self._arrival_list = self.arrival_s.tolist()
        levels = (np.arange(quantiles) + 0.5) / quantiles
        if prompt.size:
            self._prior = [1.0, float(prompt.mean()), float(output.mean())]
            trace_shapes = (_shape(prompt, levels), _shape(output, levels))
        else:
            # an empty trace: a neutral prior (1,000-token prompts, 200-token outputs, no spread)
            self._prior = [1.0, 1000.0, 200.0]
            trace_shapes = (np.ones(quantiles), np.ones(quantiles))
        blocks = int(self.last_arrival_s // SHAPE_BLOCK_S) + 1
        edges = np.searchsorted(self.arrival_s, np.arange(blocks + 1) * SHAPE_BLOCK_S)
        self._shapes: list[tuple[FloatArray, FloatArray]] = []
        for block in range(blocks):
            first, last = int(edges[block]), int(edges[block + 1])
            if last - first >= MIN_SHAPE_REQUESTS:
                self._shapes.append((_shape(prompt[first:last], levels), _shape(output[first:last], levels)))
            else:
                self._shapes.append(trace_shapes)
        self._shape_lists = [
            (prompt_shape.tolist(), output_shape.tolist()) for prompt_shape, output_shape in self._shapes
        ]

    def count_before(self, time_s: float) -> int:
        """Requests arriving strictly before ``time_s``."""
        return bisect_left(self._arrival_list, time_s)

    def window(self, start_s: float, end_s: float) -> ArrivalWindow:
        """Arrivals with ``start_s <= arrival < end_s`` and their length statistics."""
        # bisect on a Python list: O(log n) without numpy call overhead
        first = bisect_left(self._arrival_list, start_s)
        last = bisect_left(self._arrival_list, end_s, lo=first)
        count = last - first
        prompt_tokens = self._cumulative_prompt[last] - self._cumulative_prompt[first]
        output_tokens = self._cumulative_output[last] - self._cumulative_output[first]
        weight = 1.0 / (count + PRIOR_REQUESTS)
        block = min(max(int(0.5 * (start_s + end_s) // SHAPE_BLOCK_S), 0), len(self._shapes) - 1)
        prompt_shape, output_shape = self._shapes[block]
        prompt_list, output_list = self._shape_lists[block]
        return ArrivalWindow(
            count=count,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            prompt_mean=(prompt_tokens + PRIOR_REQUESTS * self._prior[1]) * weight,
            output_mean=(output_tokens + PRIOR_REQUESTS * self._prior[2]) * weight,
            prompt_shape=prompt_shape,
            output_shape=output_shape,
            prompt_shape_list=prompt_list,
            output_shape_list=output_list,
        )
