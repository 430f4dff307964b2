"""Default starting deployments of the environments, sized from the trace's rate with the cost model.

An episode has to start somewhere; a deployment far from the load makes the first minutes of every
episode a rescue. The defaults here are a quick analytic sizing (not the greedy planner of
:mod:`opscale.agents`), aiming at ``target_utilisation`` for the trace's **mean** rate and a TBT of
half the SLO:

* tokens per second through every unit: ``T = rate x (mean prompt + mean output)`` tokens;
* requests in flight (Little's law): ``C = rate x (TTFT_SLO / 2 + mean output x TBT_SLO / 2)``;
* **operator level**: attention replicas (the streams) so that the KV cache of ``C`` requests at half
  their output fits (each replica gets ``kv_share`` of one GPU's usable memory) and each runs at most
  ``max_running_requests``; each stream iterates every ``TBT_SLO / 2`` with ``T x TBT_SLO / 2 / streams``
  tokens per iteration, so a stateless unit receives ``streams / (TBT_SLO / 2)`` calls per second
  and needs ``ceil(calls x t_unit(tokens per call) / target_utilisation)`` replicas;
* **model level**: the smallest TP degree whose weight shard leaves ``kv_share`` of the GPU for KV; an
  instance's iteration time is the sum of its units' times plus decode attention, and it serves the
  largest token batch whose iteration fits in ``TBT_SLO / 2``; instances = tokens per second over that
  throughput (and over the KV need), divided by ``target_utilisation``.

Counts are capped at what the cluster holds; a cap that binds is reported with ``gymnasium.logger.warn``.
"""

from __future__ import annotations

import math

import gymnasium as gym
from opscale.sim.config import SimConfig
from opscale.sim.costmodel_api import AttentionBatch, CostModel
from opscale.sim.deployment import DEFAULT_BATCH_CAP_TOKENS, DEFAULT_TOKEN_BUDGET, Deployment
from opscale.sim.hardware import ClusterSpec
from opscale.sim.metrics import SLO
from opscale.sim.models import ModelSpec, UnitKind
from opscale.traces.trace import RequestTrace

__all__ = ["WorkloadFigures", "size_model_level", "size_operator_level"]

#: Share of one GPU's usable memory an attention replica's KV cache is assumed to get when sizing.
KV_SHARE = 0.5


class WorkloadFigures:
    """Mean-rate figures of a trace against an SLO (see the module docstring).

    :param trace: the workload.
    :param slo: the latency objective (sets the assumed iteration time and latencies).
    """

    def __init__(self, trace: RequestTrace, slo: SLO) -> None:
        self.rate_per_s = trace.mean_rate_per_s if len(trace) else 0.0
        self.mean_prompt_tokens = float(trace.prompt_tokens.mean()) if len(trace) else 0.0
        self.mean_output_tokens = float(trace.output_tokens.mean()) if len(trace) else 0.0
        self.iteration_s = slo.tbt_s / 2.0
        self.tokens_per_s = self.rate_per_s * (self.mean_prompt_tokens + self.mean_output_tokens)
        self.in_flight = self.rate_per_s * (slo.ttft_s / 2.0 + self.mean_output_tokens * self.iteration_s)
        #: KV tokens a request holds on average over its life (its prompt plus half its output)
        self.kv_tokens_per_request = self.mean_prompt_tokens + self.mean_output_tokens / 2.0


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
    target_utilisation: float,
    max_replicas: int,
) -> Deployment:
    """Per-unit replica counts for the trace's mean rate (TP 1, default batch caps, pack placement)."""
    gpu = cluster.gpu_of(0)
    figures = WorkloadFigures(trace, slo)
    usable_bytes = gpu.memory_bytes * sim_config.gpu_memory_fraction
    kv_tokens_per_replica = KV_SHARE * usable_bytes / model.kv_bytes_per_token(1)
    by_kv = figures.in_flight * figures.kv_tokens_per_request / kv_tokens_per_replica
    by_slots = figures.in_flight / sim_config.max_running_requests
    streams = _capped(
        math.ceil(max(by_kv, by_slots) / target_utilisation), max_replicas, "attention replicas"
    )
    tokens_per_call = max(
        1, min(DEFAULT_BATCH_CAP_TOKENS, round(figures.tokens_per_s * figures.iteration_s / streams))
    )
    calls_per_s = streams / figures.iteration_s
    replicas: dict[UnitKind, int] = {UnitKind.ATTENTION: streams}
    for unit in model.units:
        if unit is UnitKind.ATTENTION:
            continue
        busy_per_s = calls_per_s * cost_model.unit_time_s(model, unit, gpu, 1, tokens_per_call)
        replicas[unit] = _capped(
            math.ceil(busy_per_s / target_utilisation), max_replicas, f"{unit.value} replicas"
        )
    return Deployment.operator_level(
        model.name,
        gpu.name,
        replicas=replicas,
        num_nodes=len(cluster.nodes),
        gpus_per_node=cluster.nodes[0].gpus_per_node,
    )


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
    target_utilisation: float,
) -> Deployment:
    """Whole instances (TP from :func:`model_level_tp`) for the trace's mean rate."""
    gpu = cluster.gpu_of(0)
    figures = WorkloadFigures(trace, slo)
    tp = model_level_tp(model, cluster, sim_config)
    max_instances = cluster.num_gpus // tp
    usable_bytes = gpu.memory_bytes * sim_config.gpu_memory_fraction
    kv_tokens = (usable_bytes - model.total_weight_bytes(tp)) / model.kv_bytes_per_token(tp)
    context = max(1, round(figures.kv_tokens_per_request))

    def iteration_s(tokens: int) -> float:
        # decode-dominated iteration: `tokens` requests each reading `context` KV tokens
        attention = cost_model.attention_time_s(
            model, gpu, tp, AttentionBatch(num_decodes=tokens, decode_context_tokens=tokens * context)
        )
        others = sum(
            cost_model.unit_time_s(model, u, gpu, tp, tokens)
            for u in model.units
            if u is not UnitKind.ATTENTION
        )
        return attention + others

    batch = 1
    while batch * 2 <= DEFAULT_TOKEN_BUDGET and iteration_s(batch * 2) <= figures.iteration_s:
        batch *= 2
    throughput = batch / iteration_s(batch)
    by_tokens = figures.tokens_per_s / throughput
    by_kv = figures.in_flight * figures.kv_tokens_per_request / max(kv_tokens, 1.0)
    instances = _capped(math.ceil(max(by_tokens, by_kv) / target_utilisation), max_instances, "instances")
    return Deployment.model_level(
        model.name,
        gpu.name,
        instances=instances,
        tp=tp,
        num_nodes=len(cluster.nodes),
        gpus_per_node=cluster.nodes[0].gpus_per_node,
    )
