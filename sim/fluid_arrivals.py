"""Interval arrival statistics of a trace in O(log n): the fluid simulator's view of the workload.

:class:`ArrivalIndex` precomputes, once per trace, cumulative sums over requests (sorted by arrival)
of the count, prompt and output tokens and the first two moments of their logarithms. The arrivals
of any window ``[start_s, end_s)`` are then two ``searchsorted`` calls and one row difference, so the
cost of a fluid step does not depend on how many requests arrive in it.

Length *distributions* inside a window are summarised as lognormal (mean and variance of
``log(tokens)``). A window with few arrivals borrows strength from the whole trace: its moments are
blended with the trace-wide ones with a prior weight of :data:`PRIOR_REQUESTS` requests, so a
window with one arrival does not pretend to know a variance.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

__all__ = ["PRIOR_REQUESTS", "ArrivalIndex", "ArrivalWindow"]

#: Weight (in requests) of the trace-wide length moments blended into each window's moments.
PRIOR_REQUESTS = 8.0

# Columns of the cumulative table.
_COUNT, _PROMPT, _OUTPUT, _LOG_PROMPT, _LOG_PROMPT_SQ, _LOG_OUTPUT, _LOG_OUTPUT_SQ = range(7)


@dataclass(frozen=True)
class ArrivalWindow:
    """Arrivals of one window and their (blended) length statistics.

    :param count: requests arriving in the window.
    :param prompt_tokens: total prompt tokens of those requests.
    :param output_tokens: total output tokens of those requests.
    :param prompt_mean: blended mean prompt length, tokens.
    :param output_mean: blended mean output length, tokens.
    :param prompt_log_mean: blended mean of ``log(prompt)``.
    :param prompt_log_std: blended standard deviation of ``log(prompt)``.
    :param output_log_mean: blended mean of ``log(output)``.
    :param output_log_std: blended standard deviation of ``log(output)``.
    """

    count: int
    prompt_tokens: float
    output_tokens: float
    prompt_mean: float
    output_mean: float
    prompt_log_mean: float
    prompt_log_std: float
    output_log_mean: float
    output_log_std: float


class ArrivalIndex:
    """Cumulative per-request sums of a trace for O(log n) window queries.

    :param arrival_s: arrival times, sorted ascending (as :class:`opscale.traces.RequestTrace` keeps them).
    :param prompt_tokens: prompt tokens per request (>= 1).
    :param output_tokens: output tokens per request (>= 1).
    """

    def __init__(self, arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> None:
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
        log_prompt = np.log(prompt)
        log_output = np.log(output)
        columns = np.stack(
            [np.ones_like(prompt), prompt, output, log_prompt, log_prompt**2, log_output, log_output**2], axis=1
        )
        self._cumulative = np.vstack([np.zeros((1, columns.shape[1])), np.cumsum(columns, axis=0)])
        self._cumulative.setflags(write=False)
        total = self._cumulative[-1]
        count = max(1.0, float(total[_COUNT]))
        #: trace-wide per-request means of the table columns (the blending prior)
        self._prior = total / count
        if prompt.size == 0:
            # an empty trace: a neutral prior (1,000-token prompts, 200-token outputs, no spread)
            self._prior = np.array([1.0, 1000.0, 200.0, np.log(1000.0), np.log(1000.0) ** 2, np.log(200.0), np.log(200.0) ** 2])
        self._prior_list = [float(v) for v in self._prior]
        self._arrival_list = self.arrival_s.tolist()
        self.num_requests = int(prompt.size)
        self.last_arrival_s = float(self.arrival_s[-1]) if prompt.size else 0.0

    def count_before(self, time_s: float) -> int:
        """Requests arriving strictly before ``time_s``."""
        return int(np.searchsorted(self.arrival_s, time_s, side="left"))

    def window(self, start_s: float, end_s: float) -> ArrivalWindow:
        """Arrivals with ``start_s <= arrival < end_s`` and their blended length statistics."""
        # bisect on a Python list: O(log n) without numpy call overhead
        first = bisect_left(self._arrival_list, start_s)
        last = bisect_left(self._arrival_list, end_s, lo=first)
        sums = (self._cumulative[last] - self._cumulative[first]).tolist()
        count = sums[_COUNT]
        weight = 1.0 / (count + PRIOR_REQUESTS)
        blended = [(value + PRIOR_REQUESTS * prior) * weight for value, prior in zip(sums, self._prior_list, strict=True)]
        prompt_log_var = max(0.0, blended[_LOG_PROMPT_SQ] - blended[_LOG_PROMPT] ** 2)
        output_log_var = max(0.0, blended[_LOG_OUTPUT_SQ] - blended[_LOG_OUTPUT] ** 2)
        return ArrivalWindow(
            count=int(count),
            prompt_tokens=sums[_PROMPT],
            output_tokens=sums[_OUTPUT],
            prompt_mean=blended[_PROMPT],
            output_mean=blended[_OUTPUT],
            prompt_log_mean=blended[_LOG_PROMPT],
            prompt_log_std=prompt_log_var**0.5,
            output_log_mean=blended[_LOG_OUTPUT],
            output_log_std=output_log_var**0.5,
        )
