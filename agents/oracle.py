"""``oracle``: exhaustive search over per-unit replica counts, for small cases.

Same controller as ``operator-greedy`` (same observations, load estimate, batch caps, token budget
and placement), but each interval the replica counts come from an exhaustive search instead of
greedy steps. Candidates are scored with **the planner's latency model**
(:class:`opscale.agents.latency_model.OperatorLatencyModel`), not with a simulator, so the oracle is
the exact optimum *of that model* and the gap between it and ``operator-greedy`` measures how far the
greedy search is from optimal (OpScale reports within 8 %), not modelling error.

The search box: streams (attention replicas) from 1 to ``greedy + extra_replicas``; every stateless
unit from its fewest stable replicas to ``max(fewest stable + extra_replicas, greedy's count)``. The
box always contains the greedy plan, so the oracle's plan never needs more GPUs than greedy's under
the model. Objective, lexicographic: budgets met, fewest whole GPUs, fewest fractional GPUs
(the larger of the memory and compute shares), fewest replicas, shortest iteration. The box is enumerated in numpy; more than
``max_candidates`` candidates per stream count raises ``ValueError`` (use ``operator-greedy`` for
large models or clusters).
"""

from __future__ import annotations

import itertools

import numpy as np
from numpy.typing import NDArray

from opscale.agents.base import ControlContext
from opscale.agents.latency_model import PlannerTargets
from opscale.agents.operator_greedy import OperatorGreedyPolicy, OperatorPlan, PlanSearch, greedy_plan
from opscale.sim.models import UnitKind

__all__ = ["OraclePolicy", "exhaustive_plan"]


def exhaustive_plan(
    search: PlanSearch,
    start: NDArray[np.int64],
    extra_replicas: int = 3,
    max_candidates: int = 2_000_000,
    allow_add: bool = True,
) -> OperatorPlan:
    """The model-optimal plan in the box around the greedy plan from ``start`` (module docstring).

    :param allow_add: ``False``: no unit may exceed its count in ``start`` (scale-up not allowed now).
    :raises ValueError: if a stream count's box holds more than ``max_candidates`` candidates.
    """
    model = search.model
    greedy = greedy_plan(search, start, allow_add)
    attention = model.attention_index
    best: tuple[tuple[float, ...], NDArray[np.int64]] | None = None
    stream_limit = min(int(greedy.replicas[attention]) + extra_replicas, search.max_replicas)
    if not allow_add:
        stream_limit = min(stream_limit, int(start[attention]))
    for streams in range(1, stream_limit + 1):
        tables = search.tables(streams)
        ranges: list[NDArray[np.int64]] = []
        for index, unit in enumerate(model.units):
            if unit is UnitKind.ATTENTION:
                ranges.append(np.array([streams]))
                continue
            low = min(model.min_stable_replicas(tables, unit), search.max_replicas)
            high = min(max(low + extra_replicas, int(greedy.replicas[index])), search.max_replicas)
            if not allow_add:
                low, high = min(low, int(start[index])), min(high, int(start[index]))
            ranges.append(np.arange(low, high + 1))
        size = int(np.prod([r.size for r in ranges]))
        if size > max_candidates:
            raise ValueError(
                f"oracle: {size} candidates for {streams} streams exceed max_candidates={max_candidates}; "
                "the oracle is for small cases, use operator-greedy"
            )
        grid = np.array(list(itertools.product(*ranges)), dtype=np.int64)
        estimate = search.evaluate(grid)
        ok = np.flatnonzero(search.excess(estimate) == 0.0)
        if ok.size == 0:
            continue
        total = grid.sum(axis=1)
        order = np.lexsort((estimate.iteration_s[ok], total[ok], estimate.gpus[ok], estimate.gpus_needed[ok]))
        pick = ok[order[0]]
        key = (
            float(estimate.gpus_needed[pick]),
            float(estimate.gpus[pick]),
            float(total[pick]),
            float(estimate.iteration_s[pick]),
        )
        if best is None or key < best[0]:
            best = (key, grid[pick])
    if best is None:
        # nothing in the box meets the budgets: greedy's best effort
        return OperatorPlan(greedy.replicas, greedy.estimate, greedy.feasible, search.evaluations)
    chosen = best[1]
    return OperatorPlan(chosen, search.evaluate(chosen), True, search.evaluations)


class OraclePolicy(OperatorGreedyPolicy):
    """:class:`OperatorGreedyPolicy` with :func:`exhaustive_plan` as its planner.

    :param context: the environment's control context.
    :param targets: budgets and limits of the latency model.
    :param extra_replicas: how far beyond the fewest stable replicas (and greedy's plan) the box reaches.
    :param max_candidates: refuse boxes larger than this per stream count.
    """

    name = "oracle"

    def __init__(
        self,
        context: ControlContext,
        targets: PlannerTargets | None = None,
        extra_replicas: int = 3,
        max_candidates: int = 2_000_000,
    ) -> None:
        super().__init__(context, targets)
        if extra_replicas < 0:
            raise ValueError(f"extra_replicas must be >= 0, got {extra_replicas}")
        self.extra_replicas = extra_replicas
        self.max_candidates = max_candidates

    def plan(self, search: PlanSearch, start: NDArray[np.int64], allow_add: bool = True) -> OperatorPlan:
        return exhaustive_plan(search, start, self.extra_replicas, self.max_candidates, allow_add)
