"""The planners' latency model: Erlang-C (M/M/c) queueing per scaling unit on top of the cost model.

Used by ``operator-greedy`` (the paper's planner), ``oracle`` (exhaustive search under the same model),
``static`` (peak sizing) and the default targets of the model-level autoscalers. It mirrors the serving
semantics of DESIGN.md 2.4 at steady state:

* **Streams.** Every attention replica is a stream iterating back to back (continuous batching). A
  stream that iterates every ``tau`` seconds carries per iteration ``nd = rate x O x tau / S`` decodes
  (Little's law: a request decodes ``O`` tokens, one per iteration) and ``np = rate x P x tau / S``
  prefill tokens, ``j = nd + np`` tokens in all (``S`` streams, mean prompt ``P``, mean output ``O``).
* **Stateless pools** (operator level). One iteration of a stream sends one job of ``j`` tokens through
  each stateless unit (all layers as one job, as the engine does). A unit's pool of ``c`` replicas
  therefore receives ``S / tau`` jobs/s and merges queued jobs into calls up to its batch cap: its mean
  wait and call time come from :func:`opscale.sim.queueing.batch_service` (M/M/c with the batching
  fixed point). The pool is really a closed loop (a stream has at most one job out), so a call merges
  at most ``S`` jobs and the wait is capped by the time to serve the other ``S - 1`` streams' jobs in
  full calls (exact for one stream, where the open model would invent a queue). The sojourn of a
  stream at the unit is wait + call time.
* **Iteration time.** ``g(tau) = engine overhead + attention(nd, np) + sum_u sojourn_u + transfers``;
  every unit boundary is counted as an NVLink hop per layer (conservative: packed units share a GPU).
* **Budgets.** The planner provisions for a target iteration time ``tau_b = tbt_share x TBT SLO``: the
  deployment keeps up if ``g(tau_b) <= tau_b`` (then the stream's true fixed point ``g(tau) = tau`` lies
  below ``tau_b``). The TBT estimate adds the *prefill bump*, the extra time of an iteration that carries
  a prefill chunk of the whole free budget ``budget - nd``: a request's p99 gap is such an iteration
  whatever the mean rate, because arrivals come in bursts (a burst queues prompts that fill the
  budget, and every stream's chunks pass through the shared pools). TTFT: the mean prompt needs ``P / (budget - nd)``
  iterations, stretched by ``1 / (1 - rho_B)`` with ``rho_B = j / budget`` the share of the token budget
  in use. Budgets: mean iteration <= ``tbt_share`` x TBT SLO, bump iteration <= ``tbt_tail_share`` x
  TBT SLO, TTFT <= ``ttft_share`` x TTFT SLO.
* **Contention.** The planner places replicas so that no GPU is busy more than ``max_gpu_busy`` of the
  time (contention-aware best fit); a call then shares its GPU with at most ``max_gpu_busy - rho_u``
  other busy replicas on average, and the engine's processor-sharing model slows it by
  ``1 + contention_factor x (max_gpu_busy - rho_u)``. Using this placement bound rather than the
  config's own packing keeps the units' terms independent of each other, which the oracle's exhaustive
  search relies on.
* **GPUs.** ``G = max(G_memory, G_compute, largest TP)``: memory = replica weights and activation
  buffers plus the KV cache of the requests in flight (``rate x (TTFT + O x tau)`` of them, each holding
  ``P + O/2`` tokens) at ``kv_share`` of the remaining memory; compute = busy GPU-seconds per second
  (attention and every unit call, without the slowdown, which is shared time) over ``max_gpu_busy``.

**Model level** (:class:`ModelLevelLatencyModel`): an instance is one stream whose units are its own,
co-located and run one after the other, so an iteration is the plain sum of the unit times (no pool
queueing, no transfers, no contention between instances); it serves the largest ``j`` whose iteration
(with the prefill bump) fits ``tau_b``.

What it leaves out: the prompt-length tail beyond the 3x-mean chunk, preemptions, cold starts, the
engine's capacity-weighted routing (streams are assumed to share load evenly) and its actual
placement (it assumes the planner's). Nor does it know the engine's local routing (a job goes to an
idle replica on its stream's GPU first, with no transfer): it prices a pool with a replica beside
every stream like any shared pool, so it overstates co-located deployments. For Qwen2-7B on 8 A100s
at ~45 req/s it predicts a TBT p99 of 0.147 s for every unit at 8 replicas (budget 1,024), where the
engine, one chain per GPU (exactly a model-level deployment), measures 0.085 s; the greedy plan it
prefers instead ([1, 2, 2, 8, 1, 6, 2] replicas) measures 0.18 s. ``operator-greedy`` therefore also
prices co-located chains with :class:`ModelLevelLatencyModel` (a chain serves as an instance) and
takes them where they need no more GPUs (:mod:`opscale.agents.operator_greedy`, point 5); pools
shared by several streams keep this model's optimism. It evaluates at ``tau_b``, not at the stream's fixed point, so
it is conservative at light load. Tests hold it to the closed forms (M/M/c, one-stream closed loop,
sum of unit times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from opscale.sim.config import ContentionModel, SimConfig
from opscale.sim.costmodel_api import CostModel
from opscale.sim.hardware import ClusterSpec, GPUSpec
from opscale.sim.metrics import SLO
from opscale.sim.models import ModelSpec, UnitKind
from opscale.sim.overhead import engine_overhead
from opscale.sim.queueing import batch_service

__all__ = [
    "ModelLevelLatencyModel",
    "OperatorLatencyModel",
    "PlannerTargets",
    "StreamLoad",
    "UnitTable",
    "Workload",
]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Workload:
    """A steady load: Poisson arrivals with mean request lengths.

    :param rate_per_s: requests per second.
    :param prompt_tokens: mean prompt length, tokens.
    :param output_tokens: mean output length, tokens.
    """

    rate_per_s: float
    prompt_tokens: float
    output_tokens: float

    def __post_init__(self) -> None:
        if not (self.rate_per_s >= 0 and self.prompt_tokens >= 1 and self.output_tokens >= 1):
            raise ValueError(
                f"workload needs rate >= 0 and mean lengths >= 1 token, got rate={self.rate_per_s}, "
                f"prompt={self.prompt_tokens}, output={self.output_tokens}"
            )

    @property
    def tokens_per_s(self) -> float:
        """Prompt plus output tokens per second through every unit."""
        return self.rate_per_s * (self.prompt_tokens + self.output_tokens)


@dataclass(frozen=True)
class PlannerTargets:
    """How much of the SLO the planner spends, and how hard it may load GPUs.

    :param tbt_share: the mean iteration must fit in this share of the TBT SLO (queueing headroom).
    :param tbt_tail_share: an iteration carrying a prefill chunk (a request's p99 gap) must fit in this
        share of the TBT SLO.
    :param ttft_share: the TTFT estimate must fit in this share of the TTFT SLO.
    :param max_gpu_busy: the busy fraction contention-aware placement allows per GPU.
    :param kv_share: the share of free memory the KV cache of in-flight requests may fill.
    :param removal_margin: a replica is removed only if the budgets still hold with this extra slack.
    """

    tbt_share: float = 0.5
    tbt_tail_share: float = 0.9
    ttft_share: float = 0.5
    max_gpu_busy: float = 0.75
    kv_share: float = 0.8
    removal_margin: float = 0.15

    def __post_init__(self) -> None:
        for name in ("tbt_share", "tbt_tail_share", "ttft_share", "max_gpu_busy", "kv_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"PlannerTargets.{name} must be in (0, 1], got {value}")
        if not 0.0 <= self.removal_margin < 1.0:
            raise ValueError(f"PlannerTargets.removal_margin must be in [0, 1), got {self.removal_margin}")


@dataclass(frozen=True)
class StreamLoad:
    """Per-iteration work of one stream at iteration time ``tau_s`` (arrays broadcast over candidates).

    :param tau_s: iteration time.
    :param decodes: decode requests per iteration (``nd``).
    :param prefill_tokens: prefill tokens per iteration (``np``).
    :param tokens: ``nd + np``.
    :param attention_s: attention kernel time of the iteration.
    :param overhead_s: engine host time of the iteration.
    :param chunk_tokens: tokens of the prefill chunk that makes a TBT-bump iteration.
    :param chunk_attention_s: extra attention time of that chunk.
    :param budget_use: ``tokens / token budget``.
    """

    tau_s: FloatArray
    decodes: FloatArray
    prefill_tokens: FloatArray
    tokens: FloatArray
    attention_s: FloatArray
    overhead_s: FloatArray
    chunk_tokens: FloatArray
    chunk_attention_s: FloatArray
    budget_use: FloatArray


@dataclass(frozen=True)
class UnitTable:
    """One stateless unit's pool at ``tau_b`` for a range of replica counts (one entry per count).

    :param replicas: the counts.
    :param sojourn_s: a stream's mean wait + call time at the unit.
    :param bump_s: extra call time when a prefill chunk rides along.
    :param busy: busy replica-seconds per second (Erlangs, without contention slowdown).
    :param memory_bytes: weights + activation buffers of all replicas, summed over their GPUs.
    :param stable: whether the pool keeps up.
    """

    replicas: NDArray[np.int64]
    sojourn_s: FloatArray
    bump_s: FloatArray
    busy: FloatArray
    memory_bytes: FloatArray
    stable: NDArray[np.bool_]


class _StreamModel:
    """What both granularities share: the stream's per-iteration work, attention, overhead, memory."""

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        slo: SLO,
        cost_model: CostModel,
        sim_config: SimConfig,
        targets: PlannerTargets,
    ) -> None:
        self.model = model
        self.cluster = cluster
        self.gpu: GPUSpec = cluster.gpu_of(0)
        self.slo = slo
        self.cost_model = cost_model
        self.sim_config = sim_config
        self.targets = targets
        self.overhead = engine_overhead(sim_config.engine_overhead, self.gpu)
        self.usable_bytes = self.gpu.memory_bytes * sim_config.gpu_memory_fraction
        self.contention_factor = (
            sim_config.contention_factor
            if sim_config.contention is ContentionModel.PROCESSOR_SHARING
            else 0.0
        )

    @property
    def tau_budget_s(self) -> float:
        """The planned iteration time ``tau_b``."""
        return self.targets.tbt_share * self.slo.tbt_s

    def within_budgets(
        self, iteration_s: FloatArray, tbt_s: FloatArray, ttft_s: FloatArray, slack: float = 0.0
    ) -> NDArray[np.bool_]:
        """Mean iteration, bump iteration and TTFT each within their share of the SLO, every share
        shrunk by ``slack`` (as :meth:`OperatorEstimate.excess` shrinks them)."""
        targets, slo, keep = self.targets, self.slo, 1.0 - slack
        return (
            (iteration_s <= targets.tbt_share * slo.tbt_s * keep)
            & (tbt_s <= targets.tbt_tail_share * slo.tbt_s * keep)
            & (ttft_s <= targets.ttft_share * slo.ttft_s * keep)
        )

    def _attention_s(
        self, tp: int, decodes: FloatArray, context: float, prefill: FloatArray, prompt: float
    ) -> FloatArray:
        """Attention time of an iteration with ``decodes`` decodes at ``context`` KV tokens each and
        ``prefill`` new prompt tokens from prompts of ``prompt`` tokens (causal pairs ``(P + 1) / 2``
        per token)."""
        prefills = prefill / prompt
        arrays = {
            "num_decodes": decodes,
            "decode_context_tokens": decodes * context,
            "prefill_tokens": prefill,
            "prefill_attention_pairs": prefill * (prompt + 1.0) / 2.0,
            "num_prefills": prefills,
        }
        vectorised = getattr(self.cost_model, "attention_time_s_array", None)
        if vectorised is not None:
            return np.asarray(vectorised(self.model, self.gpu, tp, **arrays), dtype=np.float64)
        from opscale.sim.costmodel_api import AttentionBatch

        flat = {
            key: np.broadcast_to(value, np.broadcast(*arrays.values()).shape).ravel()
            for key, value in arrays.items()
        }
        times = [
            self.cost_model.attention_time_s(
                self.model,
                self.gpu,
                tp,
                AttentionBatch(
                    num_decodes=round(flat["num_decodes"][i]),
                    decode_context_tokens=max(
                        round(flat["decode_context_tokens"][i]), round(flat["num_decodes"][i])
                    ),
                    prefill_tokens=round(flat["prefill_tokens"][i]),
                    prefill_attention_pairs=float(
                        max(flat["prefill_attention_pairs"][i], round(flat["prefill_tokens"][i]))
                    ),
                    num_prefills=max(1, round(flat["num_prefills"][i]))
                    if round(flat["prefill_tokens"][i])
                    else 0,
                ),
            )
            for i in range(flat["num_decodes"].size)
        ]
        return np.asarray(times, dtype=np.float64).reshape(np.broadcast(*arrays.values()).shape)

    def stream_load(
        self, workload: Workload, streams: FloatArray, tau_s: FloatArray, token_budget: FloatArray, tp: int
    ) -> StreamLoad:
        """The per-iteration work of one of ``streams`` streams iterating every ``tau_s``."""
        streams = np.maximum(np.asarray(streams, dtype=np.float64), 1.0)
        tau = np.asarray(tau_s, dtype=np.float64)
        budget = np.asarray(token_budget, dtype=np.float64)
        rate, prompt, output = workload.rate_per_s, workload.prompt_tokens, workload.output_tokens
        decodes = rate * output * tau / streams
        prefill = rate * prompt * tau / streams
        tokens = decodes + prefill
        context = prompt + output / 2.0
        attention = self._attention_s(tp, decodes, context, prefill, prompt)
        # an iteration that finds prompts queued (a burst, or the backlog of a quiet spell) fills its
        # whole free budget with prefill, several prompts at once: capping the chunk at a multiple of the
        # mean prompt let the planner pick budgets whose bursts broke the TBT SLO (Azure code, H100)
        chunk = np.maximum(budget - decodes, 1.0)
        with_chunk = self._attention_s(tp, decodes, context, prefill + chunk, prompt)
        prefills_per_iteration = rate * tau / streams
        return StreamLoad(
            tau_s=np.broadcast_to(tau, tokens.shape).astype(np.float64),
            decodes=decodes,
            prefill_tokens=prefill,
            tokens=tokens,
            attention_s=attention,
            overhead_s=self.overhead.iteration_s(tp, 0)
            + self.overhead.per_request_s * (decodes + prefills_per_iteration),
            chunk_tokens=chunk,
            chunk_attention_s=with_chunk - attention,
            budget_use=tokens / budget,
        )

    def ttft_s(
        self,
        load: StreamLoad,
        iteration_s: FloatArray,
        bump_s: FloatArray,
        workload: Workload,
        token_budget: FloatArray,
    ) -> FloatArray:
        """TTFT estimate: ``(1 + P / (budget - nd))`` prefill iterations, stretched by ``1 / (1 - rho_B)``."""
        free = np.maximum(np.asarray(token_budget, dtype=np.float64) - load.decodes, 1.0)
        iterations = 1.0 + workload.prompt_tokens / free
        with np.errstate(divide="ignore"):
            stretch = np.where(load.budget_use < 1.0, 1.0 / np.maximum(1.0 - load.budget_use, 1e-12), np.inf)
        return (iteration_s + bump_s) * iterations * stretch

    def kv_bytes(
        self, workload: Workload, ttft_s: FloatArray, iteration_s: FloatArray, tp: int
    ) -> FloatArray:
        """KV bytes (all GPUs) of the requests in flight, at ``kv_share`` headroom."""
        in_flight = workload.rate_per_s * (ttft_s + workload.output_tokens * iteration_s)
        tokens = in_flight * (workload.prompt_tokens + workload.output_tokens / 2.0)
        return tokens * self.model.kv_bytes_per_token(tp) * tp / self.targets.kv_share

    def replica_bytes(self, unit: UnitKind, tp: int, batch_cap_tokens: float) -> float:
        """Weights + activation buffers of one replica over its ``tp`` GPUs (as the engine reserves)."""
        weights = self.model.weight_bytes(unit, tp)
        activations = 2.0 * self.model.activation_bytes_per_token(unit) * batch_cap_tokens / tp
        return (weights + activations) * tp


@dataclass(frozen=True)
class OperatorEstimate:
    """The model's verdict on operator-level candidates (one entry per candidate).

    :param iteration_s: ``g(tau_b)``, the iteration time the deployment needs at the planned load.
    :param tbt_s: iteration time plus the prefill bump where it sets the p99 gap.
    :param ttft_s: TTFT estimate.
    :param gpus: fractional GPUs: max of the memory share and the compute share.
    :param gpus_needed: ``ceil(gpus)``, at least the largest TP degree.
    :param busy: busy GPU-seconds per second.
    :param stable: every pool and the token budget keep up, and the in-flight requests fit the streams.
    """

    iteration_s: FloatArray
    tbt_s: FloatArray
    ttft_s: FloatArray
    gpus: FloatArray
    gpus_needed: NDArray[np.int64]
    busy: FloatArray
    stable: NDArray[np.bool_]

    def excess(self, slo: SLO, targets: PlannerTargets, slack: float = 0.0) -> FloatArray:
        """Sum of the relative overshoots of the three budgets (each shrunk by ``slack``): mean
        iteration vs ``tbt_share``, bump iteration vs ``tbt_tail_share`` of the TBT SLO, TTFT vs
        ``ttft_share``; ``inf`` where unstable, ``0`` where all hold."""
        keep = 1.0 - slack
        over = (
            np.maximum(self.iteration_s / (targets.tbt_share * slo.tbt_s * keep) - 1.0, 0.0)
            + np.maximum(self.tbt_s / (targets.tbt_tail_share * slo.tbt_s * keep) - 1.0, 0.0)
            + np.maximum(self.ttft_s / (targets.ttft_share * slo.ttft_s * keep) - 1.0, 0.0)
        )
        return np.where(self.stable, over, np.inf)


@dataclass(frozen=True)
class StreamTables:
    """Everything the model needs for candidates with ``streams`` attention replicas: the streams'
    own terms and, per stateless unit, a :class:`UnitTable` over replica counts ``1 .. max_replicas``.

    :param streams: attention replicas.
    :param iteration_s: the streams' own share of an iteration (attention + engine overhead).
    :param bump_s: the prefill chunk's extra attention time.
    :param busy: the streams' busy GPU-seconds per second.
    :param memory_bytes: the streams' weights and activation buffers (their KV is added per candidate).
    :param load: the per-iteration work of one stream at ``tau_b``.
    :param units: per stateless unit, its table (entry ``c - 1`` is ``c`` replicas).
    """

    streams: int
    iteration_s: float
    bump_s: float
    busy: float
    memory_bytes: float
    load: StreamLoad
    units: dict[UnitKind, UnitTable]


class OperatorLatencyModel(_StreamModel):
    """Latency and GPU estimates of operator-level deployments (see the module docstring).

    Candidates are replica vectors in :attr:`units` order. The work is organised in
    :class:`StreamTables` (one per attention-replica count, every stateless unit's pool tabulated over
    its replica counts), so the greedy planner and the oracle evaluate thousands of candidates by
    table lookups.

    :param model: the served model.
    :param cluster: the cluster (GPU type, size, NVLink).
    :param slo: the latency objective.
    :param cost_model: operator timings.
    :param sim_config: engine constants (overhead preset, memory fraction, contention, running cap).
    :param units: the model's units in the order replica vectors use.
    :param tp: per-unit TP degree (missing: 1).
    :param targets: budgets and limits.
    """

    #: Token grid on which unit times are tabulated once (interpolated in between; exact at the knots).
    _TOKEN_GRID = np.concatenate([[0.0], np.geomspace(1.0, 1 << 20, 1201)])

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        slo: SLO,
        cost_model: CostModel,
        sim_config: SimConfig,
        units: Sequence[UnitKind],
        tp: Mapping[UnitKind, int] | None = None,
        targets: PlannerTargets | None = None,
    ) -> None:
        super().__init__(model, cluster, slo, cost_model, sim_config, targets or PlannerTargets())
        self.units = tuple(units)
        if UnitKind.ATTENTION not in self.units:
            raise ValueError(f"units {[u.value for u in self.units]} lack 'attention' (the streams)")
        self.attention_index = self.units.index(UnitKind.ATTENTION)
        self.stateless = tuple(u for u in self.units if u is not UnitKind.ATTENTION)
        self.tp = {unit: int((tp or {}).get(unit, 1)) for unit in self.units}
        self.link = cluster.nodes[0].link
        self._unit_times = {
            unit: np.asarray(
                cost_model.unit_time_s_array(model, unit, self.gpu, self.tp[unit], self._TOKEN_GRID),
                dtype=np.float64,
            )
            for unit in self.stateless
        }

    def unit_time_s(self, unit: UnitKind, tokens: FloatArray) -> FloatArray:
        """The cost model's call time of ``unit``, interpolated on :attr:`_TOKEN_GRID`."""
        result: FloatArray = np.interp(tokens, self._TOKEN_GRID, self._unit_times[unit])
        return result

    # ------------------------------------------------------------------ tables
    def _pool_tables(
        self,
        load: StreamLoad,
        streams: int,
        max_replicas: int,
        batch_caps: Mapping[UnitKind, float],
    ) -> dict[UnitKind, UnitTable]:
        """Every stateless pool at ``tau_b`` with ``1 .. max_replicas`` replicas, in one vectorised
        :func:`batch_service` pass (rows: units, columns: replica counts)."""
        units = self.stateless
        counts = np.arange(1, max_replicas + 1, dtype=np.int64)
        grid_counts = np.broadcast_to(counts, (len(units), counts.size))
        times = np.stack([self._unit_times[unit] for unit in units])
        job_tokens = max(float(load.tokens), 1e-6)
        # a call can merge at most one job per stream (each stream has one job out at a time)
        caps = np.array([[min(float(batch_caps[unit]), streams * job_tokens)] for unit in units])
        calls_per_s = streams / self.tau_budget_s

        def nominal(tokens: FloatArray) -> FloatArray:
            tokens = np.broadcast_to(tokens, grid_counts.shape)
            return np.stack(
                [np.interp(tokens[row], self._TOKEN_GRID, times[row]) for row in range(len(units))]
            )

        # a replica's own utilisation sets how many other busy replicas it meets under the placement bound
        plain = batch_service(calls_per_s, job_tokens, grid_counts, caps, nominal)
        slowdown = 1.0 + self.contention_factor * np.maximum(
            self.targets.max_gpu_busy - plain.utilisation, 0.0
        )
        shared = batch_service(
            calls_per_s, job_tokens, grid_counts, caps, lambda tokens: nominal(tokens) * slowdown
        )
        # closed loop: each stream has at most one job out, so a job never waits behind more than the
        # other S - 1 streams' jobs, served in full calls (the open M/M/c wait overstates small S)
        jobs_per_full_call = np.maximum(1.0, np.floor(caps / job_tokens))
        full_calls_ahead = np.ceil((streams - 1) / (grid_counts * jobs_per_full_call))
        closed_wait = full_calls_ahead * nominal(jobs_per_full_call * job_tokens) * slowdown
        wait = np.minimum(shared.mean_wait_s, closed_wait)
        bump = (nominal(shared.call_tokens + load.chunk_tokens) - nominal(shared.call_tokens)) * slowdown
        tables: dict[UnitKind, UnitTable] = {}
        for row, unit in enumerate(units):
            tp = self.tp[unit]
            hops = self.model.layers_of(unit)
            transfer = hops * self.link.latency_s + (
                self.model.activation_bytes_per_token(unit)
                * job_tokens
                * hops
                / self.link.bandwidth_bytes_per_s
            )
            tables[unit] = UnitTable(
                replicas=counts,
                sojourn_s=np.where(
                    shared.stable[row], wait[row] + shared.service_time_s[row] + transfer, np.inf
                ),
                bump_s=bump[row],
                busy=shared.utilisation[row] * counts / slowdown[row] * tp,
                memory_bytes=counts.astype(np.float64)
                * self.replica_bytes(unit, tp, float(batch_caps[unit])),
                stable=shared.stable[row],
            )
        return tables

    def stream_tables(
        self,
        workload: Workload,
        streams: int,
        batch_caps: Mapping[UnitKind, float],
        token_budget: float,
        max_replicas: int,
    ) -> StreamTables:
        """The streams' terms and every stateless unit's table for ``streams`` attention replicas."""
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        tp = self.tp[UnitKind.ATTENTION]
        load = self.stream_load(
            workload, np.array(float(streams)), np.array(self.tau_budget_s), np.array(token_budget), tp
        )
        # the stream's attention call shares its GPU like any other replica's (placement bound)
        own_busy = float(load.attention_s) / self.tau_budget_s
        slowdown = 1.0 + self.contention_factor * max(self.targets.max_gpu_busy - own_busy, 0.0)
        return StreamTables(
            streams=streams,
            iteration_s=float(load.attention_s) * slowdown + float(load.overhead_s),
            bump_s=float(load.chunk_attention_s) * slowdown,
            busy=streams * own_busy * tp,
            memory_bytes=streams * self.replica_bytes(UnitKind.ATTENTION, tp, token_budget),
            load=load,
            units=self._pool_tables(load, streams, max_replicas, batch_caps),
        )

    def min_stable_replicas(self, tables: StreamTables, unit: UnitKind) -> int:
        """Fewest replicas of ``unit`` whose pool keeps up (one past the table if none does)."""
        table = tables.units[unit]
        stable = np.flatnonzero(table.stable)
        return int(table.replicas[stable[0]]) if stable.size else int(table.replicas[-1]) + 1

    # ------------------------------------------------------------------ candidates
    def evaluate(
        self, workload: Workload, tables: StreamTables, counts: NDArray[np.int64], token_budget: float
    ) -> OperatorEstimate:
        """Candidates ``counts`` (shape ``(k, units)`` or ``(units,)``) sharing ``tables.streams`` streams.

        :raises ValueError: if a candidate's stream count differs from the tables' or a count is outside them.
        """
        counts = np.atleast_2d(np.asarray(counts, dtype=np.int64))
        if counts.shape[1] != len(self.units):
            raise ValueError(
                f"replica vectors need {len(self.units)} entries ({[u.value for u in self.units]}), got {counts.shape[1]}"
            )
        if np.any(counts[:, self.attention_index] != tables.streams):
            raise ValueError(
                f"candidates must all have {tables.streams} attention replicas (the tables' streams)"
            )
        k = counts.shape[0]
        iteration = np.full(k, tables.iteration_s)
        bump = np.full(k, tables.bump_s)
        busy = np.full(k, tables.busy)
        memory = np.full(k, tables.memory_bytes)
        stable = np.ones(k, dtype=bool)
        for index, unit in enumerate(self.units):
            if unit is UnitKind.ATTENTION:
                continue
            table = tables.units[unit]
            column = counts[:, index]
            if column.min() < 1 or column.max() > table.replicas[-1]:
                raise ValueError(
                    f"{unit.value} counts {column.min()}..{column.max()} outside the table's 1..{table.replicas[-1]}"
                )
            rows = column - 1
            iteration += table.sojourn_s[rows]
            bump += table.bump_s[rows]
            busy += table.busy[rows]
            memory += table.memory_bytes[rows]
            stable &= table.stable[rows]
        return self.combine(
            workload, tables.load, iteration, bump, busy, memory, stable, token_budget, tables.streams
        )

    def combine(
        self,
        workload: Workload,
        load: StreamLoad,
        iteration: FloatArray,
        bump: FloatArray,
        busy: FloatArray,
        memory: FloatArray,
        stable: NDArray[np.bool_],
        token_budget: float,
        streams: int,
    ) -> OperatorEstimate:
        """Turn summed per-unit terms into TBT, TTFT, GPUs and stability (arrays over candidates)."""
        tp_attention = self.tp[UnitKind.ATTENTION]
        ttft = self.ttft_s(load, iteration, bump, workload, np.array(token_budget))
        # unstable candidates have infinite latencies; their memory is sized at the budgets instead
        finite_ttft = np.where(np.isfinite(ttft), ttft, 0.0)
        finite_iteration = np.where(np.isfinite(iteration), iteration, self.tau_budget_s)
        kv = self.kv_bytes(workload, finite_ttft, finite_iteration, tp_attention)
        gpus = np.maximum((memory + kv) / self.usable_bytes, busy / self.targets.max_gpu_busy)
        needed = np.maximum(np.ceil(gpus - 1e-9), max(self.tp.values())).astype(np.int64)
        in_flight = workload.rate_per_s * (finite_ttft + workload.output_tokens * finite_iteration)
        fits = (in_flight <= streams * self.sim_config.max_running_requests) & bool(load.budget_use < 1.0)
        return OperatorEstimate(
            iteration_s=iteration,
            tbt_s=iteration + bump,
            ttft_s=ttft,
            gpus=gpus,
            gpus_needed=needed,
            busy=busy,
            stable=stable & fits & np.isfinite(iteration) & (needed <= self.cluster.num_gpus),
        )

    def estimate(
        self,
        workload: Workload,
        replicas: NDArray[np.int64],
        batch_caps: Mapping[UnitKind, float],
        token_budget: float,
    ) -> OperatorEstimate:
        """Evaluate arbitrary candidates (any stream counts): builds the tables each stream count needs."""
        counts = np.atleast_2d(np.asarray(replicas, dtype=np.int64))
        k = counts.shape[0]
        fields: dict[str, np.ndarray] = {}
        for streams in np.unique(counts[:, self.attention_index]):
            rows = np.flatnonzero(counts[:, self.attention_index] == streams)
            tables = self.stream_tables(
                workload, int(streams), batch_caps, token_budget, int(counts[rows].max())
            )
            part = self.evaluate(workload, tables, counts[rows], token_budget)
            for name, values in vars(part).items():
                fields.setdefault(name, np.empty(k, dtype=values.dtype))[rows] = values
        return OperatorEstimate(**fields)


class ModelLevelLatencyModel(_StreamModel):
    """Capacity of model-level instances (one stream each, units co-located, run in sequence).

    :param tp: TP degree of an instance.
    """

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        slo: SLO,
        cost_model: CostModel,
        sim_config: SimConfig,
        tp: int = 1,
        targets: PlannerTargets | None = None,
    ) -> None:
        super().__init__(model, cluster, slo, cost_model, sim_config, targets or PlannerTargets())
        model.validate_tp(tp)
        self.tp = tp
        self.stateless = tuple(u for u in model.units if u is not UnitKind.ATTENTION)

    def iteration_s(
        self, workload: Workload, instances: FloatArray, token_budget: float
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``(iteration, tbt, ttft)`` at ``tau_b`` for each instance count (array)."""
        count = np.maximum(np.asarray(instances, dtype=np.float64), 1.0)
        load = self.stream_load(
            workload, count, np.full(count.shape, self.tau_budget_s), np.array(token_budget), self.tp
        )
        units = np.zeros(count.shape)
        bump = load.chunk_attention_s.copy()
        for unit in self.stateless:
            base = np.asarray(
                self.cost_model.unit_time_s_array(self.model, unit, self.gpu, self.tp, load.tokens),
                dtype=np.float64,
            )
            with_chunk = np.asarray(
                self.cost_model.unit_time_s_array(
                    self.model, unit, self.gpu, self.tp, load.tokens + load.chunk_tokens
                ),
                dtype=np.float64,
            )
            units += base
            bump += with_chunk - base
        iteration = load.overhead_s + load.attention_s + units
        ttft = self.ttft_s(load, iteration, bump, workload, np.array(token_budget))
        return iteration, iteration + bump, ttft

    def fewest_instances(
        self, workload: Workload, token_budget: float, limit: int, slack: float = 0.0
    ) -> int | None:
        """Fewest instances (up to ``limit``) meeting the budgets (shrunk by ``slack``) and fitting the
        KV cache; ``None`` if none does."""
        counts = np.arange(1, limit + 1, dtype=np.float64)
        iteration, tbt, ttft = self.iteration_s(workload, counts, token_budget)
        kv = self.kv_bytes(
            workload,
            np.where(np.isfinite(ttft), ttft, 0.0),
            np.minimum(iteration, self.tau_budget_s),
            self.tp,
        )
        weights = self.model.total_weight_bytes(self.tp) * self.tp
        memory_ok = kv <= counts * (self.usable_bytes * self.tp - weights)
        ok = self.within_budgets(iteration, tbt, ttft, slack) & memory_ok
        hits = np.flatnonzero(ok)
        return int(counts[hits[0]]) if hits.size else None

    def instances_needed(self, workload: Workload, token_budget: float, limit: int) -> int:
        """:meth:`fewest_instances`, or ``limit`` if none does."""
        fewest = self.fewest_instances(workload, token_budget, limit)
        return limit if fewest is None else fewest

    def best_token_budget(self, workload: Workload, buckets: Sequence[int], limit: int) -> tuple[int, int]:
        """``(token budget, instances)``: the bucket needing the fewest instances for ``workload``
        (the smaller budget on ties: it bounds the prefill spikes that set the TBT tail)."""
        instances, budget = min(
            (self.instances_needed(workload, budget, limit), budget) for budget in buckets
        )
        return budget, instances

    def capacity(self, workload: Workload, token_budget: float) -> tuple[float, float]:
        """``(requests in system, decode tokens/s)`` one instance sustains within the budgets.

        Scales the workload's rate until one instance stops meeting them (bisection on the rate).
        """
        low, high = 0.0, max(workload.rate_per_s, 1.0)
        while self._meets(high, workload, token_budget) and high < 1e6:
            high *= 2.0
        for _ in range(40):
            mid = 0.5 * (low + high)
            if self._meets(mid, workload, token_budget):
                low = mid
            else:
                high = mid
        rate = low
        single = Workload(max(rate, 1e-9), workload.prompt_tokens, workload.output_tokens)
        iteration, _, ttft = self.iteration_s(single, np.array([1.0]), token_budget)
        in_system = rate * (float(ttft[0]) + workload.output_tokens * float(iteration[0]))
        return in_system, rate * workload.output_tokens

    def _meets(self, rate: float, workload: Workload, token_budget: float) -> bool:
        single = Workload(rate, workload.prompt_tokens, workload.output_tokens)
        iteration, tbt, ttft = self.iteration_s(single, np.array([1.0]), token_budget)
        return bool(self.within_budgets(iteration, tbt, ttft)[0])
