"""Default starting deployments of the environments, sized from the trace's rate with the cost model.

An episode has to start somewhere; a deployment far from the load makes the first minutes of every
episode a rescue. The defaults here are a quick analytic sizing (not the greedy planner of
:mod:`opscale.agents`) for the trace's **mean** rate at ``target_utilisation``:

* tokens per second through every unit: ``T = rate x (mean prompt + mean output)``;
* requests in flight (Little's law): ``C = rate x (TTFT_SLO / 2 + mean output x TBT_SLO / 2)``,
  each holding the KV of its prompt plus half its output on average;
* an iteration costs the engine's host overhead plus every unit's time plus attention;
* **token budget** (tokens per iteration of a stream / instance): the largest candidate whose
  worst iteration (a full prefill chunk at half the mean prompt's prior context, plus the stream's
  decodes) takes at most half the TBT SLO. A chunk of prefill rides along with every request's decode
  step, so the budget bounds every TBT gap: the default 2,048 tokens would put Qwen2-7B on an A100 at
  ~165 ms per iteration, over a 100 ms TBT SLO;
* **operator level**: each unit at the smallest TP degree whose shard leaves :data:`KV_SHARE` of a
  GPU free (MoE experts of Mixtral-8x7B need TP 4 on an 80-GB GPU), raised for all units together
  until an iteration at the smallest token budget fits the iteration budget (the fastest degree
  when none does); streams
  (attention replicas) for the larger of the KV need (each stream gets
  :data:`KV_SHARE` of a GPU), the running-request slots and the token throughput (budget tokens per
  worst iteration); then the iteration time ``t`` at the fixed point of ``b = T x t / streams`` tokens
  per iteration, and for each stateless unit ``ceil(streams / t x t_unit(b) / target_utilisation)``
  replicas, at most one per stream (one stream's iteration visits the units in sequence, so replicas
  beyond the number of streams would idle); replicas are then placed by load (first-fit decreasing
  of busy shares at ``target_utilisation`` per GPU, within memory), not by the simulators' memory-only
  ``pack``;
* **model level**: the smallest TP degree whose weight shard leaves :data:`KV_SHARE` of each GPU for
  KV; instances for the larger of the token throughput and the KV need.

Counts are capped at what the cluster holds; a cap that binds is reported with ``gymnasium.logger.warn``.
Operator-level counts whose memory does not fit the cluster (each stream reserves :data:`KV_SHARE` of
its GPUs) are scaled down together until they do, with a warning; only a deployment that does not fit
with one replica of every unit is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import gymnasium as gym

from opscale.sim.cluster import ClusterState
from opscale.sim.config import SimConfig
from opscale.sim.costmodel_api import AttentionBatch, CostModel
from opscale.sim.deployment import DEFAULT_BATCH_CAP_TOKENS, Deployment
from opscale.sim.hardware import ClusterSpec, GPUSpec
from opscale.sim.metrics import SLO
from opscale.sim.models import ModelSpec, UnitKind
from opscale.sim.overhead import EngineOverhead, engine_overhead
from opscale.traces.trace import RequestTrace

__all__ = [
    "KV_SHARE",
    "IterationModel",
    "WorkloadFigures",
    "model_level_tp",
    "size_model_level",
    "size_operator_level",
    "unit_tp",
]

#: Share of one GPU's usable memory an attention replica's KV cache is assumed to get when sizing.
KV_SHARE = 0.5
#: Fixed-point iterations for the per-iteration token count (converges in a handful).
_FIXED_POINT_ROUNDS = 30


class WorkloadFigures:
    """Mean-rate figures of a trace against an SLO (see the module docstring).

    :param trace: the workload.
    :param slo: the latency objective (sets the assumed iteration time and latencies).
    """

    def __init__(self, trace: RequestTrace, slo: SLO) -> None:
        if len(trace) == 0:
            raise ValueError(f"cannot size a deployment for the empty trace {trace.name!r}")
        self.rate_per_s = trace.mean_rate_per_s
        self.mean_prompt_tokens = float(trace.prompt_tokens.mean())
        self.mean_output_tokens = float(trace.output_tokens.mean())
        self.iteration_budget_s = slo.tbt_s / 2.0
        self.tokens_per_s = self.rate_per_s * (self.mean_prompt_tokens + self.mean_output_tokens)
        self.in_flight = self.rate_per_s * (
            slo.ttft_s / 2.0 + self.mean_output_tokens * self.iteration_budget_s
        )
        #: KV tokens a request holds on average over its life (its prompt plus half its output)
        self.kv_tokens_per_request = self.mean_prompt_tokens + self.mean_output_tokens / 2.0


class IterationModel:
    """Time of one iteration of a stream (all units in sequence), from the cost model.

    :param model: the served model; ``gpu`` its GPU type.
    :param tp: TP degree per unit (``attention`` included).
    :param cost_model: unit and attention times.
    :param figures: workload figures (prompt lengths and KV per request).
    :param overhead: the engine's host time per iteration (``SimConfig.engine_overhead``).
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        tp: Mapping[UnitKind, int],
        cost_model: CostModel,
        figures: WorkloadFigures,
        overhead: EngineOverhead,
    ):
        self.model, self.gpu, self.tp = model, gpu, dict(tp)
        self.cost_model, self.figures, self.overhead = cost_model, figures, overhead
        self.stateless_units = tuple(u for u in model.units if u is not UnitKind.ATTENTION)

    def unit_s(self, unit: UnitKind, tokens: int) -> float:
        return self.cost_model.unit_time_s(self.model, unit, self.gpu, self.tp[unit], tokens)

    def iteration_s(self, tokens: int, decodes: int) -> float:
        """``decodes`` decode tokens (each reading the mean KV of a request) plus a prefill chunk of the
        remaining ``tokens - decodes`` tokens after half the mean prompt of prior context."""
        decodes = min(decodes, tokens)
        chunk = tokens - decodes
        prior = self.figures.mean_prompt_tokens / 2.0
        context = max(1, round(self.figures.kv_tokens_per_request))
        batch = AttentionBatch(
            num_decodes=decodes,
            decode_context_tokens=decodes * context,
            prefill_tokens=chunk,
            prefill_attention_pairs=chunk * prior + chunk * (chunk + 1) / 2.0,
            num_prefills=1 if chunk else 0,
        )
        attention = self.cost_model.attention_time_s(self.model, self.gpu, self.tp[UnitKind.ATTENTION], batch)
        host = self.overhead.iteration_s(self.tp[UnitKind.ATTENTION], decodes + (1 if chunk else 0))
        return host + attention + sum(self.unit_s(unit, tokens) for unit in self.stateless_units)

    def token_budget(self, candidates: Sequence[int], decodes: int) -> int:
        """The largest candidate whose full iteration fits the iteration budget (the smallest if none does)."""
        fitting = [
            b
            for b in sorted(candidates)
            if self.iteration_s(b, min(decodes, b)) <= self.figures.iteration_budget_s
        ]
        return fitting[-1] if fitting else min(candidates)


#: Factor by which :func:`_fit_by_shrinking` scales every replica count per attempt.
_SHRINK_FACTOR = 0.8


def _capped(count: int, cap: int, what: str) -> int:
    if count > cap:
        gym.logger.warn(
            f"default deployment: the trace needs ~{count} {what}, the cluster holds {cap}; using {cap}"
        )
        return cap
    return max(1, count)


def size_operator_level(
    model: ModelSpec,
    cluster: ClusterSpec,
    trace: RequestTrace,
    slo: SLO,
    cost_model: CostModel,
    sim_config: SimConfig,
    *,
    budget_candidates: Sequence[int],
    target_utilisation: float,
    max_replicas: int,
) -> Deployment:
    """Per-unit replica counts, TP degrees and placement, and the streams' token budget; see the module doc."""
    gpu = cluster.gpu_of(0)
    figures = WorkloadFigures(trace, slo)
    memory = ClusterState(cluster, model, sim_config)
    usable_bytes = gpu.memory_bytes * sim_config.gpu_memory_fraction
    overhead = engine_overhead(sim_config.engine_overhead, gpu)
    memory_tp = {unit: unit_tp(model, unit, cluster, memory, usable_bytes) for unit in model.units}

    def streams_for_memory(attention_tp: int) -> float:
        # a stream's KV lives on its TP group: KV_SHARE of each of its GPUs
        kv_tokens_per_stream = KV_SHARE * usable_bytes / model.kv_bytes_per_token(attention_tp)
        by_kv = figures.in_flight * figures.kv_tokens_per_request / kv_tokens_per_stream
        return max(by_kv, figures.in_flight / sim_config.max_running_requests)

    iterations = _latency_tp(
        model,
        gpu,
        memory_tp,
        cost_model,
        figures,
        overhead,
        min(budget_candidates),
        cluster,
        streams_for_memory,
    )
    tp = iterations.tp
    by_memory = streams_for_memory(tp[UnitKind.ATTENTION])
    decodes = math.ceil(figures.in_flight / max(1.0, math.ceil(by_memory)))
    budget = iterations.token_budget(budget_candidates, decodes)
    by_tokens = figures.tokens_per_s * iterations.iteration_s(budget, min(decodes, budget)) / budget
    streams = _capped(
        math.ceil(max(by_memory, by_tokens) / target_utilisation), max_replicas, "attention replicas"
    )
    # fixed point: an iteration carries the tokens that arrive while it runs
    iteration_s = iterations.iteration_s(1, 1)
    tokens = 1
    for _ in range(_FIXED_POINT_ROUNDS):
        tokens = max(1, min(budget, round(figures.tokens_per_s * iteration_s / streams)))
        iteration_s = iterations.iteration_s(tokens, min(tokens, math.ceil(figures.in_flight / streams)))
    replicas: dict[UnitKind, int] = {UnitKind.ATTENTION: streams}
    busy_per_replica: dict[UnitKind, float] = {
        UnitKind.ATTENTION: _attention_share(iterations, tokens, streams, figures, iteration_s)
    }
    for unit in iterations.stateless_units:
        busy = streams / iteration_s * iterations.unit_s(unit, tokens)
        replicas[unit] = min(
            streams, _capped(math.ceil(busy / target_utilisation), max_replicas, f"{unit.value} replicas")
        )
        busy_per_replica[unit] = busy / replicas[unit]
    bytes_per_replica = {
        unit: memory.replica_bytes_per_gpu(
            unit, tp[unit], budget if unit is UnitKind.ATTENTION else DEFAULT_BATCH_CAP_TOKENS
        )
        for unit in model.units
    }
    bytes_per_replica[UnitKind.ATTENTION] += KV_SHARE * usable_bytes

    def place(
        counts: Mapping[UnitKind, int], shares: Mapping[UnitKind, float]
    ) -> dict[UnitKind, list[tuple[int, ...]]]:
        return _place_by_load(
            counts, tp, shares, bytes_per_replica, usable_bytes, cluster, target_utilisation
        )

    replicas, gpus = _fit_by_shrinking(replicas, busy_per_replica, place)
    return Deployment.operator_level(
        model.name,
        gpu.name,
        replicas=replicas,
        tp=tp,
        batch_caps={UnitKind.ATTENTION: budget},
        num_nodes=len(cluster.nodes),
        gpus=gpus,
        gpus_per_node=cluster.nodes[0].gpus_per_node,
    )


def _attention_share(
    iterations: IterationModel, tokens: int, streams: int, figures: WorkloadFigures, iteration_s: float
) -> float:
    """Busy share of one stream's attention replica: its attention time over the iteration time."""
    decodes = min(tokens, math.ceil(figures.in_flight / streams))
    attention_s = iterations.iteration_s(tokens, decodes) - sum(
        iterations.unit_s(unit, tokens) for unit in iterations.stateless_units
    )
    return attention_s / iteration_s


def unit_tp(
    model: ModelSpec, unit: UnitKind, cluster: ClusterSpec, memory: ClusterState, usable_bytes: float
) -> int:
    """Smallest valid TP degree at which one shard of a ``unit`` replica (weights and activations at the
    default batch cap) takes at most ``1 - KV_SHARE`` of a GPU (attention: 1, it holds no weights).

    :raises ValueError: if even a whole node's TP degree is too small (the unit does not fit a node).
    """
    if unit is UnitKind.ATTENTION:
        return 1
    gpus_per_node = cluster.nodes[0].gpus_per_node
    for tp in model.valid_tp_degrees(gpus_per_node):
        if (
            memory.replica_bytes_per_gpu(unit, tp, DEFAULT_BATCH_CAP_TOKENS)
            <= (1.0 - KV_SHARE) * usable_bytes
        ):
            return tp
    raise ValueError(
        f"default deployment: a {unit.value} replica of {model.name!r} does not fit a node of {gpus_per_node} "
        f"{cluster.gpu_of(0).name} GPUs; give an explicit initial_deployment"
    )


def _latency_tp(
    model: ModelSpec,
    gpu: GPUSpec,
    memory_tp: Mapping[UnitKind, int],
    cost_model: CostModel,
    figures: WorkloadFigures,
    overhead: EngineOverhead,
    smallest_budget: int,
    cluster: ClusterSpec,
    streams_for_memory: Callable[[int], float],
) -> IterationModel:
    """Raise every unit's TP degree together (never below what memory needs) until an iteration at the
    smallest token budget, carrying its stream's share of the decodes, fits the iteration budget.
    When no degree of a node gets there, the degree with the fastest such iteration (the model is too
    slow for the SLO on this GPU whatever the degree; the simulator will show it)."""
    fastest: tuple[float, IterationModel] | None = None
    for degree in model.valid_tp_degrees(cluster.nodes[0].gpus_per_node):
        tp = {unit: max(memory_tp[unit], degree) for unit in model.units}
        iterations = IterationModel(model, gpu, tp, cost_model, figures, overhead)
        streams = max(1.0, math.ceil(streams_for_memory(tp[UnitKind.ATTENTION])))
        decodes = min(smallest_budget, math.ceil(figures.in_flight / streams))
        seconds = iterations.iteration_s(smallest_budget, decodes)
        if seconds <= figures.iteration_budget_s:
            return iterations
        if fastest is None or seconds < fastest[0]:
            fastest = (seconds, iterations)
    if fastest is None:
        raise ValueError(f"model {model.name!r} has no valid TP degree within a node")
    return fastest[1]


def _fit_by_shrinking(
    replicas: Mapping[UnitKind, int],
    busy_per_replica: Mapping[UnitKind, float],
    place: Callable[
        [Mapping[UnitKind, int], Mapping[UnitKind, float]], dict[UnitKind, list[tuple[int, ...]]]
    ],
) -> tuple[dict[UnitKind, int], dict[UnitKind, list[tuple[int, ...]]]]:
    """``place(replicas, busy per replica)`` (:func:`_place_by_load`), or, when their memory does not
    fit the cluster, the same of every
    count scaled down by the same factor (at least one replica each; each replica then carries its
    unit's whole load), reported with ``gymnasium.logger.warn``: a trace too heavy for the cluster
    still gets a starting deployment (the simulator shows the overload), as the count caps do.

    :raises ValueError: when even one replica of every unit does not fit.
    """
    counts = dict(replicas)
    scale = 1.0
    while True:
        shares = {unit: busy_per_replica[unit] * replicas[unit] / counts[unit] for unit in counts}
        try:
            gpus = place(counts, shares)
        except ValueError:
            if all(count == 1 for count in counts.values()):
                raise
            scale *= _SHRINK_FACTOR
            counts = {unit: max(1, math.floor(count * scale)) for unit, count in replicas.items()}
            continue
        if counts != dict(replicas):
            wanted = ", ".join(f"{unit.value}={count}" for unit, count in replicas.items())
            used = ", ".join(f"{unit.value}={count}" for unit, count in counts.items())
            gym.logger.warn(
                f"default deployment: the sized replicas ({wanted}) do not fit the cluster's memory; using {used}"
            )
        return counts, gpus


def _place_by_load(
    replicas: Mapping[UnitKind, int],
    tp: Mapping[UnitKind, int],
    busy_per_replica: Mapping[UnitKind, float],
    bytes_per_replica: Mapping[UnitKind, float],
    usable_bytes: float,
    cluster: ClusterSpec,
    target_utilisation: float,
) -> dict[UnitKind, list[tuple[int, ...]]]:
    """First-fit decreasing by busy share: each replica goes to the first TP group (``tp`` GPUs of one
    node) whose GPUs' summed busy shares stay within ``target_utilisation`` and whose memory holds a shard.

    The simulators' ``pack`` policy fills GPUs by memory alone, which for small operator replicas puts a
    whole model's compute on one GPU; placing by load keeps co-located replicas from contending. If no
    group satisfies both limits, the replica goes to the least busy GPUs that have the memory (a cluster
    too small for the load still gets a deployment; the simulator shows the overload).

    :raises ValueError: when no node has ``tp`` GPUs with room for a shard.
    """
    busy = [0.0] * cluster.num_gpus
    used = [0.0] * cluster.num_gpus
    placed: dict[UnitKind, list[tuple[int, ...]]] = {unit: [] for unit in replicas}
    order = sorted(
        ((unit, copy) for unit, count in replicas.items() for copy in range(count)),
        key=lambda item: (-busy_per_replica[item[0]] * tp[item[0]], item[0].value, item[1]),
    )
    for unit, _ in order:
        share, need, size = busy_per_replica[unit], bytes_per_replica[unit], tp[unit]
        group: tuple[int, ...] | None = None
        fallback: tuple[int, ...] | None = None
        for node in range(len(cluster.nodes)):
            roomy = [g for g in cluster.gpus_of_node(node) if used[g] + need <= usable_bytes]
            within = [g for g in roomy if busy[g] + share <= target_utilisation]
            if len(within) >= size:
                group = tuple(within[:size])
                break
            if len(roomy) >= size:
                candidate = tuple(sorted(roomy, key=lambda g: busy[g])[:size])
                if fallback is None or max(busy[g] for g in candidate) < max(busy[g] for g in fallback):
                    fallback = candidate
        chosen = group or fallback
        if chosen is None:
            raise ValueError(
                f"default deployment: no node has {size} GPU(s) with {need / 1e9:.1f} GB free for a "
                f"{unit.value} replica; use more nodes or give an explicit initial_deployment"
            )
        for g in chosen:
            busy[g] += share
            used[g] += need
        placed[unit].append(tuple(sorted(chosen)))
    return placed


def model_level_tp(model: ModelSpec, cluster: ClusterSpec, sim_config: SimConfig) -> int:
    """Smallest valid TP degree whose weight shard leaves :data:`KV_SHARE` of a GPU for the KV cache.

    :raises ValueError: if even a whole node's TP degree does not fit the model.
    """
    gpus_per_node = cluster.nodes[0].gpus_per_node
    usable_bytes = cluster.gpu_of(0).memory_bytes * sim_config.gpu_memory_fraction
    for tp in model.valid_tp_degrees(gpus_per_node):
        if model.total_weight_bytes(tp) <= (1.0 - KV_SHARE) * usable_bytes:
            return tp
    raise ValueError(
        f"model {model.name!r} does not fit one node of {gpus_per_node} x {cluster.gpu_of(0).name} "
        f"with room for a KV cache; give an explicit initial_deployment"
    )


def size_model_level(
    model: ModelSpec,
    cluster: ClusterSpec,
    trace: RequestTrace,
    slo: SLO,
    cost_model: CostModel,
    sim_config: SimConfig,
    *,
    budget_candidates: Sequence[int],
    target_utilisation: float,
) -> Deployment:
    """Whole instances (TP from :func:`model_level_tp`) and their token budget; see the module doc."""
    gpu = cluster.gpu_of(0)
    figures = WorkloadFigures(trace, slo)
    tp = model_level_tp(model, cluster, sim_config)
    overhead = engine_overhead(sim_config.engine_overhead, gpu)
    iterations = IterationModel(model, gpu, dict.fromkeys(model.units, tp), cost_model, figures, overhead)
    usable_bytes = gpu.memory_bytes * sim_config.gpu_memory_fraction
    kv_tokens = (usable_bytes - model.total_weight_bytes(tp)) / model.kv_bytes_per_token(tp)
    by_kv = figures.in_flight * figures.kv_tokens_per_request / kv_tokens
    decodes = math.ceil(figures.in_flight / max(1.0, math.ceil(by_kv)))
    budget = iterations.token_budget(budget_candidates, decodes)
    by_tokens = figures.tokens_per_s * iterations.iteration_s(budget, min(decodes, budget)) / budget
    instances = _capped(
        math.ceil(max(by_tokens, by_kv) / target_utilisation), cluster.num_gpus // tp, "instances"
    )
    return Deployment.model_level(
        model.name,
        gpu.name,
        instances=instances,
        tp=tp,
        num_nodes=len(cluster.nodes),
        token_budget=budget,
        gpus_per_node=cluster.nodes[0].gpus_per_node,
    )
