"""``operator-greedy``: the paper's operator-level planner, run every control interval.

Each interval the controller

1. **estimates the load** it must serve from what it observed (:class:`opscale.agents.base.LoadEstimator`:
   arrival rate from the observation, mean prompt / output lengths from ``info["interval"]``);
2. **plans replica counts** with :func:`greedy_plan` on the Erlang-C latency model of
   :class:`opscale.agents.latency_model.OperatorLatencyModel`: starting from the current deployment,
   it adds one replica at a time to the unit with the largest marginal latency gain per GPU until the
   TTFT and TBT budgets hold, then removes replicas while the budgets still hold with
   ``removal_margin`` slack (the hysteresis that keeps it from flapping). Adds are gated by feedback
   (:meth:`OperatorGreedyPolicy.scale_up_allowed`): only under observed latency pressure or a real
   rise of the rate. Sustained pressure on a deployment the model certified also shrinks the budgets
   the plan may use (:meth:`OperatorGreedyPolicy.update_correction`, integral feedback on the model's
   bias), released slowly once the SLO holds again;
3. **chooses batch caps per unit**: a stateless unit's cap is the smallest bucket that reaches the knee
   of its roofline (the call size where it turns compute-bound, beyond which merging more work buys no
   efficiency, only longer calls) or one iteration's tokens, whichever is larger; the attention token
   budget is the bucket whose plan needs the fewest GPUs (re-chosen every ``budget_period_s``);
4. **places** replicas contention-aware, best fit: the starting deployment gets explicit GPUs
   (:func:`contention_aware_placement`: every replica on an aligned TP group inside a node, attention
   replicas one per group, stateless replicas in order of decreasing busy time onto the group whose
   busiest GPU is least busy, opening GPUs rather than exceed ``max_gpu_busy`` or stack a pool's
   replicas); at run time new replicas ``pack`` (best fit by memory, on aligned groups) unless the
   plan needs more GPUs than are powered, when the busiest added unit uses ``spread-gpu`` and so
   opens one more GPU.

5. **falls back to co-located chains** where they are the cheaper or safer plan. The engine serves a job on an
   idle replica on its stream's own GPU first, with no transfer, so a *chain* (one replica of every
   unit on the GPUs of one stream) serves exactly as a model-level instance: no pool queueing, no
   transfer, no contention between streams. The Erlang-C model prices every pool as shared and cannot
   see this (:mod:`opscale.agents.latency_model`), so the starting plan is compared with the
   fewest chains :class:`~opscale.agents.latency_model.ModelLevelLatencyModel` certifies (every unit at
   the model-level TP degree of :func:`opscale.envs.sizing.model_level_tp`, the chain on one aligned
   group of that many GPUs); when the chains need fewer GPUs, or as many while the plan shares a pool
   among streams (:meth:`OperatorGreedyPolicy.prefers_chains`), or fewer at the trace's 90th
   percentile per-minute rate (:meth:`OperatorGreedyPolicy.scales_worse`), the episode
   runs in *chain mode*: whole chains are added (each on a group of its own, several per interval
   when the plan needs them: streams ``spread-gpu``, the other units ``colocate``) and removed (one
   per interval), with the same feedback guard, correction and removal margin as the per-unit plan, and
   every unit's batch cap at the token budget (a stream's job is one call). Qwen2-7B on 8 A100s at
   ~45 req/s: the greedy plan ``[1, 2, 2, 8, 1, 6, 2]`` fails the TBT SLO on the DES (p99 0.18 s),
   8 chains meet it (0.085 s).

A correction step (point 2) whose replicas leave the observed latency no better is taken back with
the replicas it bought: more attention streams of a bandwidth-bound model cut the pools' batches and
add co-located calls, and an integral that kept adding ran Llama-2-70B up to 28 GPUs at SLO 0.02.

The action moves each unit towards its planned count by the largest representable delta.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from opscale.agents.base import ControlContext, HeuristicPolicy, LoadEstimator
from opscale.agents.latency_model import (
    ModelLevelLatencyModel,
    OperatorEstimate,
    OperatorLatencyModel,
    PlannerTargets,
    StreamTables,
    Workload,
)
from opscale.envs.sizing import model_level_tp
from opscale.sim.cluster import aligned_tp_groups
from opscale.sim.deployment import Deployment, Placement, ScalingAction, UnitAction
from opscale.sim.models import UnitKind

__all__ = [
    "OperatorGreedyPolicy",
    "OperatorPlan",
    "PlanSearch",
    "chain_placement",
    "contention_aware_placement",
    "greedy_plan",
    "knee_batch_cap",
]

#: An add must remove at least this share of the budget excess (no diminishing-return replicas).
MIN_RELATIVE_GAIN = 0.05
#: Call-time ratio between doubled call sizes above which a unit counts as compute-bound (2 = linear).
_COMPUTE_BOUND_RATIO = 1.8
#: Observed p99 latency, as a share of its SLO, that counts as pressure.
PRESSURE_SHARE = 0.95
#: Interval SLO attainment below which the deployment is under pressure.
PRESSURE_ATTAINMENT = 0.99
#: Consecutive intervals of pressure before it allows a scale-up (one bad interval is often a
#: single long prompt's TTFT, which more replicas would not have prevented).
PRESSURE_INTERVALS = 2
#: A planned-for rate this much above the validated rate allows scaling up without pressure.
RATE_MARGIN = 1.1
#: Per-interval decay of the validated rate (it forgets a peak over a few minutes).
VALIDATED_RATE_DECAY = 0.99
#: Per-interval decay of the recent peak rate the token budget is chosen for.
PEAK_RATE_DECAY = 0.99
#: Budget share the feedback correction takes away per interval of sustained pressure.
CORRECTION_STEP = 0.1
#: Budget share it gives back per calm interval (ten calm intervals undo one step).
CORRECTION_RELEASE = 0.01
#: Largest correction: the planner keeps at least half of every budget (with the removal margin,
#: :meth:`PlanSearch.excess`'s total slack stays below 1).
MAX_CORRECTION = 0.5
#: A correction step is taken back when the observed latency level (p99 latency over SLO, the worse
#: of TTFT and TBT) rose above this multiple of its level when the step was taken (a clear worsening:
#: one interval's p99 moves by a few per cent on its own).
CORRECTION_WORSE = 1.05
#: Per-interval rise of the correction's ceiling after a step was taken back (ten intervals allow the
#: next whole step: the load, and so what replicas buy, changes).
CORRECTION_CEILING_RELEASE = 0.01
#: Quantile of the trace's per-minute arrival rates the starting mode is also checked at
#: (:meth:`OperatorGreedyPolicy.scales_worse`).
PEAK_RATE_QUANTILE = 0.9


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
    :param table_size: replica counts tabulated per unit at first (grown on demand, up to
        ``max_replicas``; the Erlang recursions cost grows with it).
    :param slack: share by which every budget is shrunk (the controller's feedback correction of the
        latency model, see :meth:`OperatorGreedyPolicy.update_correction`).
    """

    model: OperatorLatencyModel
    workload: Workload
    batch_caps: Mapping[UnitKind, float]
    token_budget: float
    max_replicas: int
    table_size: int = 8
    slack: float = 0.0
    evaluations: int = 0
    _tables: dict[int, StreamTables] = field(default_factory=dict)

    def tables(self, streams: int, need: int = 1) -> StreamTables:
        """The tables for ``streams`` streams, covering at least ``need`` replicas per unit."""
        if need > self.table_size:
            self.table_size = min(self.max_replicas, max(need, 2 * self.table_size))
            self._tables.clear()
        if streams not in self._tables:
            self._tables[streams] = self.model.stream_tables(
                self.workload,
                streams,
                self.batch_caps,
                self.token_budget,
                min(self.table_size, self.max_replicas),
            )
        return self._tables[streams]

    def evaluate(self, candidates: NDArray[np.int64]) -> OperatorEstimate:
        """Candidates sharing one stream count (rows of ``candidates``)."""
        candidates = np.atleast_2d(candidates)
        self.evaluations += candidates.shape[0]
        streams = int(candidates[0, self.model.attention_index])
        tables = self.tables(streams, int(candidates.max()))
        return self.model.evaluate(self.workload, tables, candidates, self.token_budget)

    def excess(self, estimate: OperatorEstimate, slack: float = 0.0) -> NDArray[np.float64]:
        """Budget excess with the search's :attr:`slack` plus ``slack`` (the removal margin)."""
        return estimate.excess(self.model.slo, self.model.targets, self.slack + slack)


def _neighbours(
    counts: NDArray[np.int64], step: int, max_replicas: int
) -> list[tuple[int, NDArray[np.int64]]]:
    """``(unit index, counts with that unit changed by step)`` for every unit where the change is legal."""
    out = []
    for index in range(counts.size):
        changed = counts.copy()
        changed[index] += step
        if 1 <= changed[index] <= max_replicas:
            out.append((index, changed))
    return out


def _score(
    search: PlanSearch, candidates: list[NDArray[np.int64]]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(excess, fractional GPUs)`` of candidates (grouped by stream count for the tables)."""
    excess = np.empty(len(candidates))
    gpus = np.empty(len(candidates))
    attention = search.model.attention_index
    streams = np.array([c[attention] for c in candidates])
    for value in np.unique(streams):
        rows = np.flatnonzero(streams == value)
        estimate = search.evaluate(np.stack([candidates[r] for r in rows]))
        excess[rows] = search.excess(estimate)
        gpus[rows] = estimate.gpus
    return excess, gpus


def _best_add(
    search: PlanSearch, counts: NDArray[np.int64], current: OperatorEstimate
) -> NDArray[np.int64] | None:
    """The add move with the largest excess reduction per GPU it costs: single stateless replicas
    first; when none helps, one more stream (attention replica); then pairs of replicas (a stream and
    the pool it would queue at only help together). A move helps if it removes at least :data:`MIN_RELATIVE_GAIN` of the excess.
    ``None`` when nothing helps."""
    model = search.model
    excess_now = float(search.excess(current)[0])
    # a stream is the last resort for latency: it opens a GPU whose whole free memory becomes its KV
    # cache, and capacity-weighted routing then sends it more than its share of requests
    neighbours = _neighbours(counts, +1, search.max_replicas)
    singles = [changed for index, changed in neighbours if index != model.attention_index]
    streams = [changed for index, changed in neighbours if index == model.attention_index]
    everything = singles + streams
    pairs = [
        first + second - counts
        for i, first in enumerate(everything)
        for second in everything[i:]
        if (first + second - counts).max() <= search.max_replicas
    ]
    for moves in (singles, streams, pairs):
        if not moves:
            continue
        excess, gpus = _score(search, moves)
        memory_floor = np.array(
            [
                sum(_replica_gpu_cost(search, model.units[i]) * int(d) for i, d in enumerate(m - counts) if d)
                for m in moves
            ]
        )
        if not np.isfinite(excess_now):
            # still unstable after the pool repair: the cheapest move that makes it stable
            finite = np.isfinite(excess)
            if finite.any():
                return moves[int(np.argmin(np.where(finite, gpus + memory_floor, np.inf)))]
            continue
        gain = excess_now - excess
        useful = gain > max(MIN_RELATIVE_GAIN * excess_now, 1e-12)
        ratio = np.where(useful, gain / np.maximum(gpus - float(current.gpus[0]), memory_floor), -np.inf)
        if np.isfinite(ratio).any() and ratio.max() > 0:
            return moves[int(np.argmax(ratio))]
    return None


def _replica_gpu_cost(search: PlanSearch, unit: UnitKind) -> float:
    """Memory of one replica as a share of a GPU: the floor of a replica's marginal GPU cost."""
    model = search.model
    cap = search.token_budget if unit is UnitKind.ATTENTION else float(search.batch_caps[unit])
    return model.replica_bytes(unit, model.tp[unit], cap) / model.usable_bytes


def _repair_instability(search: PlanSearch, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Jump every unstable stateless pool to its fewest stable replicas (no marginal gain is finite
    while a pool cannot keep up, so greedy steps cannot rank them); tables grow until they show it."""
    model = search.model
    streams = int(counts[model.attention_index])
    repaired = counts.copy()
    for index, unit in enumerate(model.units):
        if unit is UnitKind.ATTENTION:
            continue
        tables = search.tables(streams, int(counts.max()))
        fewest = model.min_stable_replicas(tables, unit)
        while fewest > search.table_size and search.table_size < search.max_replicas:
            tables = search.tables(streams, fewest)
            fewest = model.min_stable_replicas(tables, unit)
        repaired[index] = max(repaired[index], min(fewest, search.max_replicas))
    return repaired


def greedy_plan(search: PlanSearch, start: NDArray[np.int64], allow_add: bool = True) -> OperatorPlan:
    """The paper's greedy planner from ``start`` (see the module docstring).

    Add phase (skipped unless ``allow_add``): while a budget is exceeded, add the replica (or, when no
    single one helps, the pair of replicas) with the largest reduction of the budget excess per GPU it
    costs (its fractional-GPU increase, at least its own memory share). While the stream count cannot
    keep up (token budget or running-request cap), streams come first. Remove phase: while some unit can lose a replica with every budget holding at
    ``removal_margin`` slack, remove the one that frees the most GPU.
    """
    model = search.model
    counts = np.clip(np.asarray(start, dtype=np.int64).copy(), 1, search.max_replicas)
    if allow_add:
        counts = _repair_instability(search, counts)
    current = search.evaluate(counts)
    while allow_add and float(search.excess(current)[0]) > 0.0:
        move = _best_add(search, counts, current)
        if move is None:
            unstable_streams = not np.isfinite(float(search.excess(current)[0]))
            if not (unstable_streams and counts[model.attention_index] < search.max_replicas):
                break
            # the token budget or running cap of the streams binds: only more streams can help
            move = counts.copy()
            move[model.attention_index] += 1
        counts = _repair_instability(search, move)
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


def _aligned_groups(num_gpus: int, gpus_per_node: int, tp: int) -> list[tuple[int, ...]]:
    """Every GPU group a TP-``tp`` replica may take: the aligned groups of each node
    (:func:`opscale.sim.cluster.aligned_tp_groups`, the engine's own rule), so a TP call shares its
    GPUs with as few other groups as possible."""
    return [
        group
        for node_start in range(0, num_gpus, gpus_per_node)
        for group in aligned_tp_groups(range(node_start, min(node_start + gpus_per_node, num_gpus)), tp)
    ]


def contention_aware_placement(
    search: PlanSearch,
    replicas: NDArray[np.int64],
    num_gpus: int,
    attention_reserve_bytes: float,
    gpus_per_node: int = 8,
) -> dict[UnitKind, list[tuple[int, ...]]]:
    """Explicit GPUs for a planned deployment: best fit with a busy-time balance.

    Every replica takes an aligned group of TP GPUs inside one node (:func:`_aligned_groups`).
    Attention replicas (the streams, which take their GPU's leftover memory as KV cache) go one per
    group, round robin over the groups inside the ``G`` GPUs the plan needs; stateless replicas
    follow in order of decreasing busy time, each onto the group whose busiest GPU is least busy
    among those with the memory on every GPU (weights + activations, keeping
    ``attention_reserve_bytes`` per resident attention replica), so replicas of one pool land on
    different GPUs and no GPU collects the hot units. A TP call runs at the pace of its most shared
    GPU (:mod:`opscale.sim.sharing`), hence the balance on the busiest GPU of a group. A replica that
    fits in no group inside the GPUs opened so far, or only by making a GPU busier than the planner's
    ``max_gpu_busy``, opens the next ones; so does one that would share a group with a replica of
    its own pool while the plan's GPUs, rounded up to whole groups of its TP degree, have a free
    group.

    :param search: the plan's search (tables give per-replica busy time and memory).
    :param replicas: planned replicas per unit.
    :param num_gpus: GPUs the cluster has.
    :param attention_reserve_bytes: memory an attention replica needs beyond its buffers (its
        smallest KV cache, over all its GPUs).
    :param gpus_per_node: GPUs per node (TP groups never cross a node).
    :raises ValueError: when a replica fits on no group of the cluster.
    """
    model = search.model
    estimate = search.evaluate(replicas)
    wanted = max(1, min(int(estimate.gpus_needed[0]), num_gpus))
    max_busy = model.targets.max_gpu_busy
    tables = search.tables(int(replicas[model.attention_index]), int(replicas.max()))
    busy = [0.0] * num_gpus
    used = [0.0] * num_gpus
    groups_by_tp = {
        tp: _aligned_groups(num_gpus, gpus_per_node, tp) for tp in {model.tp[unit] for unit in model.units}
    }

    def take(group: tuple[int, ...], busy_per_gpu: float, bytes_per_gpu: float) -> None:
        for gpu in group:
            busy[gpu] += busy_per_gpu
            used[gpu] += bytes_per_gpu

    placement: dict[UnitKind, list[tuple[int, ...]]] = {}
    attention_tp = model.tp[UnitKind.ATTENTION]
    streams = int(replicas[model.attention_index])
    all_stream_groups = groups_by_tp[attention_tp]
    stream_groups = [g for g in all_stream_groups if g[-1] < wanted] or all_stream_groups[:1]
    if not stream_groups:
        raise ValueError(f"no group of {attention_tp} GPUs for an attention replica in {num_gpus} GPUs")
    need = (
        model.replica_bytes(UnitKind.ATTENTION, attention_tp, search.token_budget) + attention_reserve_bytes
    ) / attention_tp
    # tables' busy is GPU-seconds per second over all of a replica's GPUs; each GPU of the group is busy that long / tp
    per_stream_busy = tables.busy / max(streams, 1) / attention_tp
    placement[UnitKind.ATTENTION] = []
    for stream in range(streams):
        stream_group = stream_groups[stream % len(stream_groups)]
        placement[UnitKind.ATTENTION].append(stream_group)
        take(stream_group, per_stream_busy, need)
    opened = max(wanted, stream_groups[-1][-1] + 1)
    items: list[tuple[float, float, UnitKind]] = []
    for index, unit in enumerate(model.units):
        if unit is UnitKind.ATTENTION:
            continue
        count, tp = int(replicas[index]), model.tp[unit]
        per_gpu_busy = float(tables.units[unit].busy[count - 1]) / count / tp
        per_gpu_bytes = model.replica_bytes(unit, tp, float(search.batch_caps[unit])) / tp
        items += [(per_gpu_busy, per_gpu_bytes, unit)] * count
    for per_gpu_busy, per_gpu_bytes, unit in sorted(
        items, key=lambda item: (-item[0], -item[1], item[2].value)
    ):
        tp = model.tp[unit]
        taken = placement.setdefault(unit, [])
        # the plan's GPUs rounded up to whole groups of this unit's TP: room to keep its replicas apart
        own_limit = min(-(-wanted // tp) * tp, num_gpus)
        while True:
            fits = [
                g
                for g in groups_by_tp[tp]
                if g[-1] < opened and all(used[i] + per_gpu_bytes <= model.usable_bytes for i in g)
            ]
            group = (
                min(
                    fits, key=lambda g: (taken.count(g), max(busy[i] for i in g), -min(used[i] for i in g), g)
                )
                if fits
                else None
            )
            # the planner's contention term assumes no GPU busier than max_gpu_busy and co-located work
            # independent of the unit's own; replicas of one pool are busy together (the pool hands
            # queued jobs to every free replica at once), so two on one group halve each other's speed
            crowded = group is not None and group in taken and opened < own_limit
            balanced = group is not None and max(busy[i] for i in group) + per_gpu_busy <= max_busy + 1e-9
            if (balanced and not crowded) or opened >= num_gpus:
                break
            # open just the next group: ``opened + tp`` from an unaligned count overshot into a group
            # of GPUs that the small replicas placed next then spread onto (busy 0 looks best)
            opened = min((g[-1] + 1 for g in groups_by_tp[tp] if g[-1] >= opened), default=num_gpus)
        if group is None:
            raise ValueError(
                f"planned deployment does not fit {num_gpus} GPUs (no room for a {unit.value} replica)"
            )
        taken.append(group)
        take(group, per_gpu_busy, per_gpu_bytes)
    return placement


def chain_placement(
    units: tuple[UnitKind, ...], tp: int, chains: int, num_gpus: int, gpus_per_node: int = 8
) -> dict[UnitKind, list[tuple[int, ...]]]:
    """Explicit GPUs for ``chains`` co-located chains: chain ``k`` puts one replica of every unit on the
    ``k``-th aligned TP group (:func:`_aligned_groups`), the layout of a model-level instance.

    :raises ValueError: when the cluster has fewer than ``chains`` groups of ``tp`` GPUs.
    """
    groups = _aligned_groups(num_gpus, gpus_per_node, tp)
    if chains > len(groups):
        raise ValueError(f"{chains} chains of {tp} GPUs do not fit {num_gpus} GPUs ({len(groups)} groups)")
    return {unit: groups[:chains] for unit in units}


def knee_batch_cap(
    model: OperatorLatencyModel, unit: UnitKind, buckets: tuple[int, ...], min_tokens: float
) -> int:
    """The smallest bucket at or above both the unit's compute-bound knee and ``min_tokens``."""
    tokens = 2.0 ** np.arange(0, 17)
    times = model.unit_time_s(unit, tokens)
    knee_index = np.flatnonzero(times[1:] / times[:-1] > _COMPUTE_BOUND_RATIO)
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
    #: highest recent arrival rate the deployment served without latency pressure (decays)
    validated_rate_per_s: float = 0.0
    #: consecutive intervals under latency pressure
    pressure_streak: int = 0
    #: highest recent arrival rate (decays): the burst the token budget must absorb
    peak_rate_per_s: float = 0.0
    #: the rate the running token budget was chosen for
    budget_rate_per_s: float = 0.0
    #: feedback correction: share of every budget the plan may not use (grows under pressure)
    correction: float = 0.0
    #: ceiling of the correction (lowered when a step made latency no better)
    correction_ceiling: float = MAX_CORRECTION
    #: observed latency level (worse of TTFT and TBT p99 over its SLO) of the last interval
    latency_level: float = 0.0
    #: latency level when the correction last grew (``None``: no step to judge)
    level_at_step: float | None = None
    #: replicas per unit when the correction last grew (the deployment a step taken back returns to)
    replicas_at_step: NDArray[np.int64] | None = None
    #: set when a step is taken back: the next plan keeps at most these replicas per unit
    revert_to: NDArray[np.int64] | None = None
    #: chain mode: scale whole co-located chains (module docstring, point 5)
    chains: bool = False


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

    def __init__(
        self, context: ControlContext, targets: PlannerTargets | None = None, budget_period_s: float = 60.0
    ) -> None:
        super().__init__(context)
        tp = {unit: context.initial_deployment.units[unit].tp for unit in context.units}
        self.latency_model = OperatorLatencyModel(
            context.model,
            context.cluster,
            context.slo,
            context.cost_model,
            context.sim_config,
            context.units,
            tp,
            targets,
        )
        self.budget_period_steps = self.decision_steps(budget_period_s)
        self.chain_tp = self.chain_degree(context)
        self.chain_model = (
            None
            if self.chain_tp is None
            else ModelLevelLatencyModel(
                context.model,
                context.cluster,
                context.slo,
                context.cost_model,
                context.sim_config,
                self.chain_tp,
                self.latency_model.targets,
            )
        )
        #: whether :meth:`initial_deployment` chose chains (episodes then start in chain mode)
        self.starts_with_chains = False

    @staticmethod
    def chain_degree(context: ControlContext) -> int | None:
        """TP degree of a chain: the model-level degree (the smallest whose weights leave room for a KV
        cache), one aligned group of that many GPUs; ``None`` when the model needs pipeline stages."""
        try:
            return model_level_tp(context.model, context.cluster, context.sim_config)
        except ValueError:
            return None

    def new_memory(self) -> _GreedyMemory:
        return _GreedyMemory(load=self.new_load_estimator(), chains=self.starts_with_chains)

    # ------------------------------------------------------------------ planning
    def workload(self, load: LoadEstimator) -> Workload:
        """The load to plan for (a floor of 0.05 req/s keeps an idle service at its minimum)."""
        return Workload(
            max(load.rate_per_s, 0.05), max(load.mean_prompt_tokens, 1.0), max(load.mean_output_tokens, 1.0)
        )

    def batch_caps(self, workload: Workload, streams: int, token_budget: float) -> dict[UnitKind, int]:
        """Per stateless unit: :func:`knee_batch_cap` with one iteration's tokens as the floor."""
        tokens = workload.tokens_per_s * self.latency_model.tau_budget_s / max(streams, 1)
        buckets = self.context.batch_cap_buckets_tokens
        return {
            unit: knee_batch_cap(self.latency_model, unit, buckets, tokens)
            for unit in self.latency_model.stateless
        }

    def search(
        self, workload: Workload, start: NDArray[np.int64], token_budget: int, slack: float = 0.0
    ) -> PlanSearch:
        """A :class:`PlanSearch` for ``workload`` with tables sized around ``start`` and budgets shrunk by ``slack``."""
        streams = int(start[self.latency_model.attention_index])
        caps = self.batch_caps(workload, streams, token_budget)
        size = min(self.context.max_replicas, int(start.max()) + 4)
        return PlanSearch(
            self.latency_model, workload, caps, float(token_budget), self.context.max_replicas, size, slack
        )

    def plan(self, search: PlanSearch, start: NDArray[np.int64], allow_add: bool = True) -> OperatorPlan:
        """The replica counts to move to (the oracle overrides this with an exhaustive search)."""
        return greedy_plan(search, start, allow_add)

    def choose_token_budget(
        self, workload: Workload, start: NDArray[np.int64], around: int | None = None, slack: float = 0.0
    ) -> int:
        """The budget bucket whose plan needs the fewest whole GPUs (feasible first), and on ties the one
        with the most headroom on its tighter latency budget (the larger of TTFT / its budget and the
        TBT tail / its budget): a small budget stretches long prompts and bursts over many iterations
        (TTFT), a large one lengthens the iterations that carry them (TBT tail). With ``around``, only
        that bucket and its two neighbours compete."""
        buckets = self.context.batch_cap_buckets_tokens
        if around is not None and around in buckets:
            position = buckets.index(around)
            buckets = buckets[max(position - 1, 0) : position + 2]
        best: tuple[tuple[float, ...], int] | None = None
        for budget in buckets:
            plan = greedy_plan(self.search(workload, start, budget, slack), start)
            key = (
                0.0 if plan.feasible else 1.0,
                float(plan.gpus_needed),
                self._latency_pressure(plan),
                budget,
            )
            if best is None or key < best[0]:
                best = (key, budget)
        assert best is not None
        return best[1]

    @property
    def max_chains(self) -> int:
        """Chains the cluster holds (0 without a chain model)."""
        if self.chain_tp is None:
            return 0
        return min(self.context.cluster.num_gpus // self.chain_tp, self.context.max_replicas)

    def chain_budget(self, workload: Workload, slack: float = 0.0) -> tuple[int, int | None]:
        """``(token budget, chains)``: the budget bucket whose chains the model certifies with the fewest
        (the smaller budget on ties), budgets shrunk by ``slack``. When no count up to
        :attr:`max_chains` meets them at any budget, chains is ``None`` and the budget is the one with
        the most decode throughput per chain (what the cluster's every chain then has to deliver)."""
        assert self.chain_model is not None
        chain_model = self.chain_model
        buckets = self.context.batch_cap_buckets_tokens
        limit = self.max_chains
        fewest = {budget: chain_model.fewest_instances(workload, budget, limit, slack) for budget in buckets}
        certified = [(chains, budget) for budget, chains in fewest.items() if chains is not None]
        if certified:
            chains, budget = min(certified)
            return budget, chains
        return max(buckets, key=lambda budget: (chain_model.capacity(workload, budget)[1], -budget)), None

    def _latency_pressure(self, plan: OperatorPlan) -> float:
        """The larger of the plan's TTFT and TBT-tail estimates as shares of their planning budgets."""
        slo, targets = self.context.slo, self.latency_model.targets
        return max(
            float(plan.estimate.ttft_s[0]) / (targets.ttft_share * slo.ttft_s),
            float(plan.estimate.tbt_s[0]) / (targets.tbt_tail_share * slo.tbt_s),
        )

    def plan_from_scratch(self, workload: Workload) -> tuple[int, PlanSearch, OperatorPlan]:
        """``(token budget, search, plan)`` for ``workload`` from one replica per unit, at the budget
        :meth:`choose_token_budget` picks."""
        ones = np.ones(len(self.context.units), dtype=np.int64)
        budget = self.choose_token_budget(workload, ones)
        search = self.search(workload, ones, budget)
        return budget, search, self.plan(search, ones)

    def planned_deployment(self, workload: Workload, peak: Workload | None = None) -> Deployment:
        """A deployment for a steady ``workload``: greedy plan from one replica per unit, the best
        token budget, knee batch caps and :func:`contention_aware_placement`; or co-located chains
        (:meth:`chain_deployment`) where they need no more GPUs (module docstring, point 5), or where
        at the ``peak`` load the plan would need more GPUs than chains (:meth:`scales_worse`)."""
        context = self.context
        budget, search, plan = self.plan_from_scratch(workload)
        chains = self.chain_deployment(workload)
        if chains is not None and (
            self.prefers_chains(plan, chains.units[UnitKind.ATTENTION].replicas)
            or (peak is not None and self.scales_worse(peak))
        ):
            return chains
        caps: dict[UnitKind, int] = {
            **{u: int(c) for u, c in search.batch_caps.items()},
            UnitKind.ATTENTION: budget,
        }
        longest = (
            float((context.trace.prompt_tokens + context.trace.output_tokens).max())
            if len(context.trace)
            else 0.0
        )
        reserve = max(longest, 16.0 * context.sim_config.kv_block_tokens) * context.model.kv_bytes_per_token(
            1
        )
        initial = context.initial_deployment
        return Deployment.operator_level(
            context.model.name,
            context.gpu.name,
            replicas={unit: int(plan.replicas[i]) for i, unit in enumerate(context.units)},
            tp={unit: initial.units[unit].tp for unit in context.units},
            batch_caps=caps,
            num_nodes=initial.num_nodes,
            gpus=contention_aware_placement(
                search,
                plan.replicas,
                context.cluster.num_gpus,
                reserve,
                context.cluster.nodes[0].gpus_per_node,
            ),
            gpus_per_node=context.cluster.nodes[0].gpus_per_node,
        )

    def prefers_chains(self, plan: OperatorPlan, chains: int) -> bool:
        """Whether ``chains`` co-located chains beat the per-unit ``plan``: the plan is not certified,
        or the chains need fewer GPUs, or as many while the plan has a pool shared by several streams
        (fewer replicas than streams), whose latency the Erlang-C model understates (module docstring,
        point 5). A plan without shared pools is priced exactly and may run units at narrower TP."""
        if self.chain_tp is None:
            return False
        chain_gpus = chains * self.chain_tp
        streams = int(plan.replicas[self.latency_model.attention_index])
        shares_pools = bool((plan.replicas < streams).any())
        return (
            not plan.feasible
            or chain_gpus < plan.gpus_needed
            or (chain_gpus == plan.gpus_needed and shares_pools)
        )

    def scales_worse(self, peak: Workload) -> bool:
        """Whether the per-unit plan for ``peak`` needs more GPUs than the chains certified for it.

        The episode runs in one mode (chosen at the start), so a plan that ties with chains at the
        mean load but needs more GPUs when the load rises is the worse choice. Qwen2-57B on A100s with
        Azure code: both need 4 GPUs at the mean (2.6 req/s); at the 90th percentile of the per-minute
        rates (6.7 req/s) the plan needs 10 (TP-4 MoE replicas for TP-1 streams) against 4 for one
        chain, and on the DES the per-unit controller averaged 9.1 GPUs against 5.5 in chain mode, at
        the same SLO attainment."""
        if self.chain_tp is None:
            return False
        plan = self.plan_from_scratch(peak)[2]
        _, chains = self.chain_budget(peak)
        return chains is not None and chains * self.chain_tp < plan.gpus_needed

    def chain_deployment(self, workload: Workload) -> Deployment | None:
        """The fewest co-located chains the model certifies for ``workload`` (:func:`chain_placement`,
        every batch cap at the chosen token budget), or as many as the cluster holds when no count is
        certified; ``None`` without a chain model."""
        if self.chain_tp is None:
            return None
        budget, certified = self.chain_budget(workload)
        chains = self.max_chains if certified is None else certified
        context = self.context
        gpus_per_node = context.cluster.nodes[0].gpus_per_node
        return Deployment.operator_level(
            context.model.name,
            context.gpu.name,
            replicas=dict.fromkeys(context.units, chains),
            tp=dict.fromkeys(context.units, self.chain_tp),
            batch_caps=dict.fromkeys(context.units, budget),
            num_nodes=context.initial_deployment.num_nodes,
            gpus=chain_placement(
                context.units, self.chain_tp, chains, context.cluster.num_gpus, gpus_per_node
            ),
            gpus_per_node=gpus_per_node,
        )

    def initial_deployment(self) -> Deployment | None:
        """The episode's starting deployment: :meth:`planned_deployment` for the trace's mean rate
        (the same information the environment's default sizing uses), with the
        :data:`PEAK_RATE_QUANTILE` of its per-minute rates as the peak. ``None`` (start from the
        environment's default, with a warning) when the plan does not fit the cluster. Episodes run
        in chain mode when it is a chain deployment."""
        prompt, output = max(self._prior_lengths[0], 1.0), max(self._prior_lengths[1], 1.0)
        trace = self.context.trace
        rate = trace.mean_rate_per_s if len(trace) else 0.0
        peak_rate = float(np.quantile(trace.rate_curve(60.0)[1], PEAK_RATE_QUANTILE)) if len(trace) else 0.0
        self.starts_with_chains = False
        try:
            deployment = self.planned_deployment(
                Workload(max(rate, 0.05), prompt, output),
                peak=Workload(max(peak_rate, rate, 0.05), prompt, output),
            )
            self.starts_with_chains = self.chain_tp is not None and _is_chain_layout(deployment)
            self.reset()
            return deployment
        except ValueError as error:
            import gymnasium as gym

            gym.logger.warn(
                f"{self.name}: planned starting deployment unusable ({error}); starting from the env's default"
            )
            return None

    # ------------------------------------------------------------------ control
    def observe_interval(self, memory: Any, interval: Mapping[str, Any]) -> None:
        memory.load.observe_interval(interval)

    def decide(self, memory: Any, observation: Mapping[str, Any]) -> ScalingAction:
        memory.load.observe_rate(float(observation["arrival_rate"]))
        current = self.unit_replicas(observation)
        start = np.array([current[unit] for unit in self.context.units], dtype=np.int64)
        workload = self.workload(memory.load)
        allow_add = self.scale_up_allowed(memory, observation)
        correction_before = memory.correction
        self.update_correction(memory)
        if memory.correction > correction_before:
            memory.replicas_at_step = start
        memory.peak_rate_per_s = max(
            float(observation["arrival_rate"]), memory.peak_rate_per_s * PEAK_RATE_DECAY
        )
        # the budget is chosen for the recent peak, not the smoothed rate (after a quiet spell the
        # smoothed rate is near zero, every budget looks fast, and the smallest would meet the next
        # burst's long prompts), and re-chosen at once when a burst beats the rate it was chosen for
        burst_rate = max(workload.rate_per_s, memory.peak_rate_per_s)
        if memory.chains:
            chains = current[UnitKind.ATTENTION]
            budget, target = self.chain_target(memory, chains, workload, burst_rate, allow_add)
            return self.chain_action(observation, current, budget, target)
        # the first choice starts from the budget the deployment runs with
        around = memory.token_budget or round(float(observation[UnitKind.ATTENTION.value]["batch_cap"]))
        budget = self._token_budget(
            memory,
            workload,
            burst_rate,
            lambda burst: self.choose_token_budget(burst, start, around=around, slack=memory.correction),
        )
        search = self.search(workload, start, budget, memory.correction)
        plan = self.plan(search, start, allow_add)
        if memory.revert_to is not None:
            # a correction step taken back: drop the replicas it bought (the model would keep them)
            plan = replace(plan, replicas=np.minimum(plan.replicas, memory.revert_to))
            memory.revert_to = None
        memory.last_plan = plan
        caps = {**search.batch_caps, UnitKind.ATTENTION: budget}
        deltas = {
            unit: self.context.clip_delta(int(plan.replicas[index]) - current[unit])
            for index, unit in enumerate(self.context.units)
        }
        spread_unit = self._spread_unit(search, plan, deltas, observation)
        units: dict[UnitKind, UnitAction] = {}
        for unit in self.context.units:
            cap = int(caps[unit])
            observed_cap = round(float(observation[unit.value]["batch_cap"]))
            units[unit] = UnitAction(
                replica_delta=deltas[unit],
                batch_cap_tokens=None if cap == observed_cap else cap,
                placement=Placement.SPREAD_GPU if unit is spread_unit else Placement.PACK,
            )
        return ScalingAction(units=units)

    def _token_budget(
        self, memory: _GreedyMemory, workload: Workload, burst_rate: float, choose: Callable[[Workload], int]
    ) -> int:
        """The token budget to run with: ``choose(burst workload)`` at the first decision, every
        ``budget_period_s`` and at once when a burst beats the rate it was chosen for by
        :data:`RATE_MARGIN`, else the running one."""
        if (
            memory.token_budget is None
            or memory.steps_since_budget >= self.budget_period_steps
            or burst_rate > RATE_MARGIN * memory.budget_rate_per_s
        ):
            memory.token_budget = choose(replace(workload, rate_per_s=burst_rate))
            memory.budget_rate_per_s = burst_rate
            memory.steps_since_budget = 0
        memory.steps_since_budget += 1
        return int(memory.token_budget)

    def chain_target(
        self, memory: _GreedyMemory, chains: int, workload: Workload, burst_rate: float, allow_add: bool
    ) -> tuple[int, int]:
        """Chain mode's ``(token budget, chains to move to)`` from ``chains`` (module docstring, point 5):
        the fewest chains the model certifies at the budgets shrunk by the correction, adding only when
        :meth:`scale_up_allowed` said so and removing only down to what holds with the removal margin
        too; the token budget is re-chosen as in :meth:`decide`."""
        budget = self._token_budget(
            memory, workload, burst_rate, lambda burst: self.chain_budget(burst, memory.correction)[0]
        )
        assert self.chain_model is not None
        limit = self.max_chains
        needed = self.chain_model.fewest_instances(workload, budget, limit, memory.correction)
        target = needed if needed is not None else min(chains + 1, limit)
        if target > chains and not allow_add:
            target = chains
        elif target < chains:
            margin = memory.correction + self.latency_model.targets.removal_margin
            keep = self.chain_model.fewest_instances(workload, budget, limit, margin)
            target = chains if keep is None else max(target, min(keep, chains))
        if memory.revert_to is not None:
            target = min(target, int(memory.revert_to.max()))
            memory.revert_to = None
        return budget, target

    def chain_action(
        self, observation: Mapping[str, Any], current: Mapping[UnitKind, int], budget: int, target: int
    ) -> ScalingAction:
        """Chain mode's action: every unit towards ``target`` chains (from :meth:`chain_target`), every
        batch cap at ``budget``. Chains are added as many at once as one action's delta allows: each
        new stream opens the least-occupied GPU group (``spread-gpu``) and the other units'
        replicas join the streams that lack them (``colocate``, placed after the streams). They are
        removed one per interval: the engine removes from the GPU that empties soonest, so the units
        leave the same group one after another."""
        chains = current[UnitKind.ATTENTION]
        step = max(-1, target - chains)
        units = {
            unit: UnitAction(
                replica_delta=self.context.clip_delta(chains + step - current[unit]),
                batch_cap_tokens=None
                if round(float(observation[unit.value]["batch_cap"])) == budget
                else budget,
                placement=Placement.SPREAD_GPU if unit is UnitKind.ATTENTION else Placement.COLOCATE,
            )
            for unit in self.context.units
        }
        return ScalingAction(units=units)

    def under_pressure(self, observation: Mapping[str, Any]) -> bool:
        """Whether the last interval shows latency pressure: p99 TBT or TTFT beyond
        :data:`PRESSURE_SHARE` of its SLO, or SLO attainment below :data:`PRESSURE_ATTAINMENT`."""
        slo = self.context.slo
        return (
            float(observation["tbt_p99"]) > PRESSURE_SHARE * slo.tbt_s
            or float(observation["ttft_p99"]) > PRESSURE_SHARE * slo.ttft_s
            or float(observation["slo_attainment"]) < PRESSURE_ATTAINMENT
        )

    def scale_up_allowed(self, memory: Any, observation: Mapping[str, Any]) -> bool:
        """Feedback guard on the model: add replicas only under observed latency pressure sustained for
        :data:`PRESSURE_INTERVALS` intervals, or when the
        planned-for rate exceeds the highest rate recently served without pressure by
        :data:`RATE_MARGIN` (a real rise, planned for before it hurts). The latency model is
        conservative for some operators (it overstates MoE calls, see the report); without the guard a
        model that cannot certify the running deployment would keep adding replicas that do not help."""
        pressure = self.under_pressure(observation)
        slo = self.context.slo
        memory.latency_level = max(
            float(observation["tbt_p99"]) / slo.tbt_s, float(observation["ttft_p99"]) / slo.ttft_s
        )
        memory.pressure_streak = memory.pressure_streak + 1 if pressure else 0
        observed_rate = float(observation["arrival_rate"])
        memory.validated_rate_per_s *= VALIDATED_RATE_DECAY
        if not pressure:
            memory.validated_rate_per_s = max(memory.validated_rate_per_s, observed_rate)
        sustained = memory.pressure_streak >= PRESSURE_INTERVALS
        # before any calm interval there is no served rate to compare with: pressure alone decides
        rising = (
            memory.validated_rate_per_s > 0
            and memory.load.rate_per_s > RATE_MARGIN * memory.validated_rate_per_s
        )
        return sustained or rising

    @staticmethod
    def update_correction(memory: Any) -> None:
        """Integral feedback on the latency model's bias: while latency pressure is sustained (the
        deployment misses its SLO although the model certified it, e.g. GPU contention beyond what the
        model charges), shrink every budget by :data:`CORRECTION_STEP` more, up to
        :data:`MAX_CORRECTION`; give :data:`CORRECTION_RELEASE` back per calm interval so that the
        replicas added under pressure can go again once the load allows.

        A step is judged at the next interval of sustained pressure: if the observed latency level rose
        above :data:`CORRECTION_WORSE` times its level when the step was taken, the replicas it bought
        made things worse (more attention streams of a bandwidth-bound model cut each pool's
        batches and add co-located calls), so the step is taken back and the correction's ceiling
        drops to it, rising again by :data:`CORRECTION_CEILING_RELEASE` per interval. Without this
        the integral runs away, adding replicas that make latency worse. Call after
        :meth:`scale_up_allowed` (which counts the pressure streak and the latency level); a step taken
        back also removes the replicas added since it (``memory.revert_to``, read by :meth:`decide`)."""
        memory.correction_ceiling = min(
            memory.correction_ceiling + CORRECTION_CEILING_RELEASE, MAX_CORRECTION
        )
        if memory.pressure_streak >= PRESSURE_INTERVALS:
            if (
                memory.level_at_step is not None
                and memory.latency_level > CORRECTION_WORSE * memory.level_at_step
            ):
                memory.correction_ceiling = max(memory.correction - CORRECTION_STEP, 0.0)
                memory.correction = memory.correction_ceiling
                memory.level_at_step = None
                memory.revert_to = memory.replicas_at_step
                return
            # whole steps only: a sliver under a lowered ceiling would buy a replica, be judged, be
            # taken back, and flap every interval
            raised = min(memory.correction + CORRECTION_STEP, MAX_CORRECTION)
            if raised > memory.correction and raised <= memory.correction_ceiling + 1e-12:
                memory.level_at_step = memory.latency_level
                memory.correction = raised
            else:
                memory.level_at_step = None
        else:
            memory.level_at_step = None
            if memory.pressure_streak == 0:
                memory.correction = max(memory.correction - CORRECTION_RELEASE, 0.0)

    def _spread_unit(
        self,
        search: PlanSearch,
        plan: OperatorPlan,
        deltas: Mapping[UnitKind, int],
        observation: Mapping[str, Any],
    ) -> UnitKind | None:
        """The unit whose new replicas open a new GPU: when the plan needs more GPUs than are powered,
        the added stateless unit with the busiest replicas; ``None`` otherwise (everything packs, best
        fit; packing still opens a GPU when nothing else has room). One GPU per interval at most,
        because ``spread-gpu`` puts every replica of the unit on its own least-loaded GPU."""
        if plan.gpus_needed <= round(float(observation["gpus_powered"])):
            return None
        model = self.latency_model
        tables = search.tables(int(plan.replicas[model.attention_index]), int(plan.replicas.max()))
        added = [
            (float(tables.units[unit].busy[int(plan.replicas[index]) - 1]) / int(plan.replicas[index]), unit)
            for index, unit in enumerate(self.context.units)
            if deltas[unit] > 0 and unit is not UnitKind.ATTENTION
        ]
        return max(added, key=lambda item: item[0])[1] if added else None


def _is_chain_layout(deployment: Deployment) -> bool:
    """Whether every unit of ``deployment`` has the same replicas on the same explicit GPU groups."""
    layouts = {tuple(config.gpus or ()) for config in deployment.units.values()}
    return len(layouts) == 1 and bool(next(iter(layouts)))
