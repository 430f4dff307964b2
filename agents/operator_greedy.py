"""``operator-greedy``: the paper's operator-level planner, run every control interval.

Each interval the controller

1. **estimates the load** it must serve from what it observed (:class:`opscale.agents.base.LoadEstimator`:
   arrival rate from the observation, mean prompt / output lengths from ``info["interval"]``);
2. **plans replica counts** with :func:`greedy_plan` on the Erlang-C latency model of
   :class:`opscale.agents.latency_model.OperatorLatencyModel`: starting from the current deployment,
   it adds one replica at a time to the unit with the largest marginal latency gain per GPU until the
   TTFT and TBT budgets hold, then removes replicas while the budgets still hold with
   ``removal_margin`` slack (the hysteresis that keeps it from flapping);
3. **chooses batch caps per unit**: a stateless unit's cap is the smallest bucket that reaches the knee
   of its roofline (the call size where it turns compute-bound, beyond which merging more work buys no
   efficiency, only longer calls) or one iteration's tokens, whichever is larger; the attention token
   budget is the bucket whose plan needs the fewest GPUs (re-chosen every ``budget_period_s``);
4. **places** new replicas best fit (``pack``) while the powered GPUs cover the plan's compute need at
   ``max_gpu_busy``, and ``spread-gpu`` (onto the least-loaded, possibly new, GPU) when they do not:
   contention-aware best fit.

The action moves each unit towards its planned count by the largest representable delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from opscale.agents.base import ControlContext, HeuristicPolicy, LoadEstimator
from opscale.agents.latency_model import (
    OperatorEstimate,
    OperatorLatencyModel,
    PlannerTargets,
    StreamTables,
    Workload,
)
from opscale.sim.deployment import Placement, ScalingAction, UnitAction
from opscale.sim.models import UnitKind

__all__ = ["OperatorGreedyPolicy", "OperatorPlan", "PlanSearch", "greedy_plan"]

#: Per-token time ratio between doubled call sizes above which a unit counts as compute-bound.
_COMPUTE_BOUND_RATIO = 1.8


@dataclass(frozen=True)
class OperatorPlan:
    """A planned operator-level configuration.

    :param replicas: replicas per unit, in the model's unit order.
    :param estimate: the latency model's verdict on it (single entry).
    :param feasible: whether every budget holds.
    :param evaluations: candidates the search evaluated.
    """

    replicas: NDArray[np.int64]
    estimate: OperatorEstimate
    feasible: bool
    evaluations: int

    @property
    def gpus_needed(self) -> int:
        return int(self.estimate.gpus_needed[0])


@dataclass
class PlanSearch:
    """Table cache for one planning call: one :class:`StreamTables` per attention-replica count.

    :param model: the latency model.
    :param workload: the load to plan for.
    :param batch_caps: per unit, the batch cap (tokens per call).
    :param token_budget: per-iteration token budget of a stream.
    :param max_replicas: the most replicas of any unit.
    """

    model: OperatorLatencyModel
    workload: Workload
    batch_caps: Mapping[UnitKind, float]
    token_budget: float
    max_replicas: int
    evaluations: int = 0
    _tables: dict[int, StreamTables] = field(default_factory=dict)

    def tables(self, streams: int) -> StreamTables:
        if streams not in self._tables:
            self._tables[streams] = self.model.stream_tables(
                self.workload, streams, self.batch_caps, self.token_budget, self.max_replicas
            )
        return self._tables[streams]

    def evaluate(self, candidates: NDArray[np.int64]) -> OperatorEstimate:
        """Candidates sharing one stream count (rows of ``candidates``)."""
        candidates = np.atleast_2d(candidates)
        self.evaluations += candidates.shape[0]
        streams = int(candidates[0, self.model.attention_index])
        return self.model.evaluate(self.workload, self.tables(streams), candidates, self.token_budget)

    def excess(self, estimate: OperatorEstimate, slack: float = 0.0) -> NDArray[np.float64]:
        return estimate.excess(self.model.slo, self.model.targets, slack)


def _neighbours(counts: NDArray[np.int64], step: int, max_replicas: int) -> list[tuple[int, NDArray[np.int64]]]:
    """``(unit index, counts with that unit changed by step)`` for every unit where the change is legal."""
    out = []
    for index in range(counts.size):
        changed = counts.copy()
        changed[index] += step
        if 1 <= changed[index] <= max_replicas:
            out.append((index, changed))
    return out


def _score(search: PlanSearch, candidates: list[tuple[int, NDArray[np.int64]]]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(excess, fractional GPUs)`` of single-unit changes (grouped by stream count for the tables)."""
    excess = np.empty(len(candidates))
    gpus = np.empty(len(candidates))
    attention = search.model.attention_index
    streams = np.array([c[attention] for _, c in candidates])
    for value in np.unique(streams):
        rows = np.flatnonzero(streams == value)
        estimate = search.evaluate(np.stack([candidates[r][1] for r in rows]))
        excess[rows] = search.excess(estimate)
        gpus[rows] = estimate.gpus
    return excess, gpus


def _replica_gpu_cost(search: PlanSearch, unit: UnitKind) -> float:
    """Memory of one replica as a share of a GPU: the floor of a replica's marginal GPU cost."""
    model = search.model
    cap = search.token_budget if unit is UnitKind.ATTENTION else float(search.batch_caps[unit])
    return model.replica_bytes(unit, model.tp[unit], cap) / model.usable_bytes


def _repair_instability(search: PlanSearch, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Jump every unstable stateless pool to its fewest stable replicas (no marginal gain is finite
    while a pool cannot keep up, so greedy steps cannot rank them)."""
    model = search.model
    tables = search.tables(int(counts[model.attention_index]))
    repaired = counts.copy()
    for index, unit in enumerate(model.units):
        if unit is UnitKind.ATTENTION:
            continue
        repaired[index] = max(repaired[index], min(model.min_stable_replicas(tables, unit), search.max_replicas))
    return repaired


def greedy_plan(search: PlanSearch, start: NDArray[np.int64]) -> OperatorPlan:
    """The paper's greedy planner from ``start`` (see the module docstring).

    Add phase: while a budget is exceeded, add the replica with the largest reduction of the budget
    excess per GPU it costs (its fractional-GPU increase, at least its own memory share). While the
    stream count cannot keep up (token budget or running-request cap), streams come first. Remove
    phase: while some unit can lose a replica with every budget holding at ``removal_margin`` slack,
    remove the one that frees the most GPU.
    """
    model = search.model
    counts = np.clip(np.asarray(start, dtype=np.int64).copy(), 1, search.max_replicas)
    counts = _repair_instability(search, counts)
    current = search.evaluate(counts)
    while float(search.excess(current)[0]) > 0.0:
        options = _neighbours(counts, +1, search.max_replicas)
        if not options:
            break
        excess_now = float(search.excess(current)[0])
        excess, gpus = _score(search, options)
        if not np.isfinite(excess_now):
            # still unstable after the pool repair: only the streams (budget / running cap) can help
            finite = np.isfinite(excess)
            if not finite.any():
                attention = [i for i, (index, _) in enumerate(options) if index == model.attention_index]
                if not attention:
                    break
                counts = _repair_instability(search, options[attention[0]][1])
                current = search.evaluate(counts)
                continue
            choice = int(np.argmin(np.where(finite, gpus, np.inf)))
        else:
            gain = excess_now - excess
            cost = np.maximum(
                gpus - float(current.gpus[0]),
                [_replica_gpu_cost(search, model.units[index]) for index, _ in options],
            )
            ratio = np.where(gain > 1e-12, gain / cost, -np.inf)
            if not np.isfinite(ratio).any() or ratio.max() <= 0:
                break
            choice = int(np.argmax(ratio))
        counts = _repair_instability(search, options[choice][1])
        current = search.evaluate(counts)
    slack = model.targets.removal_margin
    while float(search.excess(current, slack)[0]) == 0.0:
        options = _neighbours(counts, -1, search.max_replicas)
        if not options:
            break
        excess_with_slack = np.empty(len(options))
        gpus = np.empty(len(options))
        for position, (_, candidate) in enumerate(options):
            estimate = search.evaluate(candidate)
            excess_with_slack[position] = float(search.excess(estimate, slack)[0])
            gpus[position] = float(estimate.gpus[0])
        allowed = excess_with_slack == 0.0
        if not allowed.any():
            break
        saving = np.array([_replica_gpu_cost(search, model.units[index]) for index, _ in options])
        choice = int(np.argmax(np.where(allowed, saving + (float(current.gpus[0]) - gpus), -np.inf)))
        counts = options[choice][1]
        current = search.evaluate(counts)
    return OperatorPlan(counts, current, bool(search.excess(current)[0] == 0.0), search.evaluations)


def knee_batch_cap(model: OperatorLatencyModel, unit: UnitKind, buckets: tuple[int, ...], min_tokens: float) -> int:
    """The smallest bucket at or above both the unit's compute-bound knee and ``min_tokens``."""
    tokens = 2.0 ** np.arange(0, 17)
    per_token = model.unit_time_s(unit, tokens) / tokens
    ratio = per_token[1:] / per_token[:-1]
    knee_index = np.flatnonzero(ratio * 2.0 > _COMPUTE_BOUND_RATIO)
    knee = float(tokens[knee_index[0]]) if knee_index.size else float(tokens[-1])
    need = max(knee, min_tokens)
    for bucket in buckets:
        if bucket >= need:
            return bucket
    return buckets[-1]


@dataclass
class _GreedyMemory:
    load: LoadEstimator
    token_budget: int | None = None
    steps_since_budget: int = 0
    last_plan: OperatorPlan | None = None


class OperatorGreedyPolicy(HeuristicPolicy):
    """The paper's planner as a :class:`Policy` (see the module docstring).

    Reads the observation (replicas, arrival rate, GPUs powered) and ``info["interval"]`` (token counts
    for the mean request lengths).

    :param context: the environment's control context.
    :param targets: budgets and limits of the latency model.
    :param budget_period_s: how often the attention token budget is re-chosen.
    """

    granularity = "operator"
    name = "operator-greedy"

    def __init__(self, context: ControlContext, targets: PlannerTargets | None = None, budget_period_s: float = 60.0) -> None:
        super().__init__(context)
        tp = {unit: context.initial_deployment.units[unit].tp for unit in context.units}
        self.latency_model = OperatorLatencyModel(
            context.model, context.cluster, context.slo, context.cost_model, context.sim_config, context.units, tp, targets
        )
        self.budget_period_steps = self.decision_steps(budget_period_s)

    def new_memory(self) -> _GreedyMemory:
        return _GreedyMemory(load=self.new_load_estimator())

    # ------------------------------------------------------------------ planning
    def workload(self, load: LoadEstimator) -> Workload:
        """The load to plan for (a floor of 0.05 req/s keeps an idle service at its minimum)."""
        return Workload(max(load.rate_per_s, 0.05), max(load.mean_prompt_tokens, 1.0), max(load.mean_output_tokens, 1.0))

    def batch_caps(self, workload: Workload, streams: int, token_budget: float) -> dict[UnitKind, int]:
        """Per stateless unit: :func:`knee_batch_cap` with one iteration's tokens as the floor."""
        tokens = workload.tokens_per_s * self.latency_model.tau_budget_s / max(streams, 1)
        buckets = self.context.batch_cap_buckets_tokens
        return {unit: knee_batch_cap(self.latency_model, unit, buckets, tokens) for unit in self.latency_model.stateless}

    def search(self, workload: Workload, streams: int, token_budget: int) -> PlanSearch:
        caps = self.batch_caps(workload, streams, token_budget)
        return PlanSearch(self.latency_model, workload, caps, float(token_budget), self.context.max_replicas)

    def plan(self, search: PlanSearch, start: NDArray[np.int64]) -> OperatorPlan:
        """The replica counts to move to (the oracle overrides this with an exhaustive search)."""
        return greedy_plan(search, start)

    def choose_token_budget(self, workload: Workload, start: NDArray[np.int64]) -> int:
        """The budget bucket whose plan needs the fewest GPUs (feasible first; larger budget on ties,
        since it shortens TTFT)."""
        best: tuple[tuple[float, ...], int] | None = None
        streams = int(start[self.latency_model.attention_index])
        for budget in self.context.batch_cap_buckets_tokens:
            plan = greedy_plan(self.search(workload, streams, budget), start)
            key = (0.0 if plan.feasible else 1.0, float(plan.gpus_needed), float(plan.estimate.gpus[0]), -budget)
            if best is None or key < best[0]:
                best = (key, budget)
        assert best is not None
        return best[1]

    # ------------------------------------------------------------------ control
    def observe_interval(self, memory: Any, interval: Mapping[str, Any]) -> None:
        memory.load.observe_interval(interval)

    def decide(self, memory: Any, observation: Mapping[str, Any]) -> ScalingAction:
        memory.load.observe_rate(float(observation["arrival_rate"]))
        current = self.unit_replicas(observation)
        start = np.array([current[unit] for unit in self.context.units], dtype=np.int64)
        workload = self.workload(memory.load)
        if memory.token_budget is None or memory.steps_since_budget >= self.budget_period_steps:
            memory.token_budget = self.choose_token_budget(workload, start)
            memory.steps_since_budget = 0
        memory.steps_since_budget += 1
        budget = int(memory.token_budget)
        search = self.search(workload, int(start[self.latency_model.attention_index]), budget)
        plan = self.plan(search, start)
        memory.last_plan = plan
        spread = plan.gpus_needed > round(float(observation["gpus_powered"]))
        placement = Placement.SPREAD_GPU if spread else Placement.PACK
        caps = {**search.batch_caps, UnitKind.ATTENTION: budget}
        units: dict[UnitKind, UnitAction] = {}
        for index, unit in enumerate(self.context.units):
            delta = self.context.clip_delta(int(plan.replicas[index]) - current[unit])
            cap = int(caps[unit])
            observed_cap = round(float(observation[unit.value]["batch_cap"]))
            units[unit] = UnitAction(
                replica_delta=delta,
                batch_cap_tokens=None if cap == observed_cap else cap,
                placement=placement,
            )
        return ScalingAction(units=units)
