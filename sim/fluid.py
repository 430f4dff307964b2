"""The fast fidelity (``fluid``): a per-interval analytic model of operator-level LLM serving.

:class:`FluidSimulator` implements :class:`opscale.sim.simulator.ServingSimulator` with the same
inputs (cluster, model, deployment, trace, SLO, cost model, :class:`SimConfig`) and the same metric
structures as the discrete-event engine (:mod:`opscale.sim.engine`), but its cost per
:meth:`~FluidSimulator.advance` does not depend on the request rate: no request is simulated.

Model, per control interval (one solve per :meth:`~FluidSimulator.advance`; the replicas serving are
those ready by the middle of the interval, see the approximations below):

1. **Arrivals** (:mod:`opscale.sim.fluid_arrivals`): count and mean lengths of the window from
   cumulative sums (two binary searches). Prompt and output lengths are represented by
   :data:`LENGTH_QUANTILES` equal-probability points: the empirical shape of the trace block holding
   the window, scaled to the window's means.
2. **Backlog** (fluid): requests not yet admitted are carried across intervals. The streams admit
   at most their capacity ``x_cap`` per second (token budget, KV cache, ``max_running_requests``
   and, operator-level, the slowest unit pool); the excess stays queued, so overload and bursts
   show up as a growing queue and TTFT, and drain later. When the capacity does not bind, the whole
   demand is admitted (no floating-point residue is left queued to count as a backlog).
3. **Streams** (attention replicas, or model-level instances x ``pp``): continuous batching with
   chunked prefill, solved as a fixed point of the mean busy iteration time ``T``. With admission
   rate ``x`` per stream, the stream is busy with probability ``beta = 1 - exp(-x * E2E)`` (M/G/inf
   occupancy); a busy iteration carries ``D = x (O - 1) T / beta`` decodes (Little's law) and, in a
   share of iterations, prefill chunks of ``c_eff`` tokens (one prompt's chunk at light load, the
   whole remaining budget ``B - D`` when the prefill utilisation ``rho_p = x P T / (beta (B - D))``
   nears one). ``T`` is the renewal mean of decode-only and prefill iterations; each iteration's
   time is ``overhead + units + attention (+ transfers)`` from the calibrated cost model
   (:mod:`opscale.sim.fluid_tables`).
4. **Unit pools** (operator level): a stateless unit with ``c`` replicas receives one job per busy
   stream iteration (rate ``S beta / T``, ``k`` tokens). Replicas batch queued jobs up to the batch
   cap: the jobs per call ``n`` follow the fixed point of :func:`opscale.sim.queueing.batch_service`
   (one damped step per outer iteration), the service time is the cost model's time for ``n k``
   tokens (slowed by ``1 + f * busy co-located replicas`` under processor-sharing contention, less
   for long calls that lead a convoy), and
   the wait is the Erlang-C (M/M/c) queue of calls scaled by 1/2 (Allen-Cunneen for deterministic
   service), capped by the closed population (a stream has one job in flight, so at most
   ``S beta - c`` jobs wait: none when a pool has as many replicas as there are busy streams). The
   population is closed in two more ways: an arriving job finds only the other busy streams' load
   (Erlang-C at ``rho (S beta - 1) / S beta``, the arrival theorem: a lone stream never waits), and a
   call batches only the jobs waiting when its replica frees, while the ``c n`` jobs of the calls
   just ended or running are away, so ``n <= S beta / (c + 1)`` (two streams sharing one replica take
   turns, one job per call, as the engine shows). A pool that cannot
   keep up even at the cap bounds ``T`` from below (``T >= S beta s / (c n)``). Transfers between
   GPUs (latency per layer + bytes / link bandwidth) use the probability that consecutive units of
   an iteration sit on different GPUs or nodes, from the placement. Co-located work of the calling
   stream does not contend: a share ``1/S`` of it is the caller's own, except on a GPU whose units
   only serve its own ``k`` streams (each with a local replica, as in a chain: one replica of every
   unit per stream GPU), where the share is ``1/k``.
5. **Latency**: TTFT of a prompt quantile = backlog wait (FCFS drain of the fluid queue) + admission
   wait (Erlang-C over the ``S`` streams, service = the prompt's share of the prefill budget,
   Allen-Cunneen correction from the prompt-length spread) + the residual of the running iteration
   + its prefill iterations. The admission wait is 0 with probability ``1 - C`` and otherwise
   exponential, so TTFT's distribution (mean, p50, p99, share within the SLO) is a mixture over
   prompt quantiles. TBT: every gap is an iteration; a decoding request's gap carries another
   request's prefill chunk with probability ``phi_gap = x E[chunks] T`` (the others arrive at rate
   ``x``, Poisson). A request with ``g`` gaps has its p99 (max) gap above the SLO when at least
   ``g - floor(0.99 (g - 1))`` (one) of its gaps are over it (the engine's rank rule for the p99 of a
   request's gaps): Poisson counts over output quantiles.
6. **SLO attainment** with the "decided" rule of :mod:`opscale.sim.metrics`: served requests are
   decided (at completion, approximated as the interval they are admitted in) with probability
   ``P(TTFT ok) x P(TBT ok)`` of meeting the SLO; queued requests whose wait passes the TTFT SLO are
   decided as violations in the interval their deadline passes.
7. **GPUs and energy**: GPUs powered come from the same placement as the engine
   (:mod:`opscale.sim.fluid_layout`); GPUs are busy for kernels only (not host overhead or
   transfers): ``beta`` less the host share (instances) or, for pools under processor sharing, the
   uncontended kernel work per second on the GPU (work-conserving), but no less than its busiest
   replica's contended load (a TP call slowed by another GPU of its group keeps this one busy), without interference
   ``1 - (1 - L / S) ** S`` (``L``: summed kernel loads; a stream runs one call at a time); the
   compute-bound time is the engine's: whole unit calls from their compute-bound size on (the
   roofline's bound, as the power calibration flags them) and attention calls carrying prefill
   chunks, at either granularity; power follows the engine's power function.

Approximations to keep in mind (the agreement with the engine is measured by
``experiments/fidelity_report.py``): completions are counted when requests are admitted (a lag of
one end-to-end latency); a replica that becomes ready inside an interval serves all of it when it is
ready by the middle of the interval, else from the next interval on (its start shifts by at most half an
interval: operator-level replicas load in well under a second, so they serve the interval they are
added in; a model-level instance's ~10 s start is rounded to the nearest interval boundary); removed
replicas leave at once (the engine drains them); preemption is not
modelled (the KV limit only caps admission); the stream load is split evenly over streams; the
contention of long calls follows the convoy argument of :meth:`FluidSimulator._pooled_times` (a
heuristic, not a derivation); admission waits near saturation are approximate. ``SimConfig`` fields
about individual requests or calls (``attention_drain``, ``service_time_distribution``,
``record_requests``, ``fast_forward_decode``) do not apply; image tokens join the prompt as in the
engine.

Cost: one solve per :meth:`~FluidSimulator.advance` (under a millisecond of CPU; its cost depends on
neither the request rate nor the replica count); what depends only on the deployment (which replicas serve,
transfer terms, co-location, batch caps) is recomputed only after an action changed it or a loading
replica started serving. The model's arithmetic runs in plain Python over the handful of units and
the :data:`LENGTH_QUANTILES` length points, with table lookups inlined in the hot loops: at these sizes
numpy's per-call overhead would dominate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from opscale.sim.config import ContentionModel, SimConfig
from opscale.sim.costmodel import CostModel, default_cost_model
from opscale.sim.deployment import ApplyReport, Deployment, Placement, ScalingAction, UnitDeployment
from opscale.sim.fluid_arrivals import ArrivalIndex
from opscale.sim.fluid_latency import (
    ErlangRows,
    LogHistogram,
    TtftMixture,
    interp_scalar,
    shared_poisson_tail_table,
    weighted_quantile,
)
from opscale.sim.fluid_layout import FluidLayout, PlacedReplica
from opscale.sim.fluid_tables import GRID_POINTS_PER_OCTAVE, AttentionSurrogate, TokenLine, UnitTimeTable
from opscale.sim.hardware import ClusterSpec
from opscale.sim.inputs import check_deployment, prepare_requests
from opscale.sim.metrics import SLO, IntervalMetrics, RunSummary, UnitIntervalMetrics, default_slo
from opscale.sim.models import ModelSpec, UnitKind, get_model
from opscale.sim.overhead import engine_overhead
from opscale.sim.power import PowerModel
from opscale.sim.queueing import shared_erlang_c_table
from opscale.sim.simulator import Snapshot

__all__ = ["LENGTH_QUANTILES", "FluidSimulator"]

FloatArray = NDArray[np.float64]

#: Equal-probability quantile points representing prompt and output length distributions.
LENGTH_QUANTILES = 16
#: Outer fixed-point iterations per interval (warm-started from the previous interval).
FIXED_POINT_ITERATIONS = 3
#: Utilisation at which queueing formulas are evaluated at most (beyond it the backlog takes over).
UTILISATION_CEILING = 0.98
#: Allen-Cunneen factor ``(ca^2 + cs^2) / 2`` of unit pools: Poisson-like job arrivals, deterministic service.
POOL_WAIT_FACTOR = 0.5
#: Largest replica count the Erlang-C table covers (more replicas use its last row).
MAX_TABLE_SERVERS = 128
#: Utilisation grid points of the Erlang-C table.
ERLANG_GRID_POINTS = 1025
#: Batch caps an action may set, tokens (the engine's limit).
MAX_BATCH_CAP_TOKENS = 1 << 17

_QUANTILE_LEVEL_LIST = ((np.arange(LENGTH_QUANTILES) + 0.5) / LENGTH_QUANTILES).tolist()


@dataclass(eq=False)
class _Pending:
    """A replica (or instance) that is loading or serving, with its placement record."""

    unit: UnitKind | None
    placed: PlacedReplica


@dataclass
class _Solution:
    """Results of the interval model over one control interval."""

    duration_s: float
    arrivals: int
    served: float
    decided: float
    slo_met: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_mean_s: float
    tbt_p99_s: float
    e2e_mean_s: float
    prompt_tokens: float
    output_tokens: float
    running: float
    waiting: float
    gpu_seconds: float
    energy_j: float
    unit_utilisation: list[float]
    unit_queue_tokens: list[float]
    unit_batch_fill: list[float]
    unit_wait_s: list[float]
    unit_service_s: list[float]
    unit_replicas: list[float]
    ttft: TtftMixture
    served_ttft: TtftMixture
    served_ttft_mean_s: float
    tbt_values: list[float]
    tbt_weights: list[float]


@dataclass
class _PoolState:
    """One step of the unit-pool model (operator level), per stateless unit in model order (Python
    lists: the fixed point reads them a few at a time; the interval's figures convert them once).

    :param rho: utilisation of a replica.
    :param service_s: mean call time (kernel x contention + inbound transfer).
    :param queue_jobs: mean jobs waiting.
    :param wait_unit_s: mean wait of a job.
    :param wait_s: summed waits over the units (one iteration's pool waiting).
    :param bound_s: smallest iteration time the pools can sustain (their throughput limit).
    :param decode_call_s: call time of a decode-only job (before contention).
    :param decode_call_tokens: tokens of such a call.
    """

    rho: list[float]
    service_s: list[float]
    queue_jobs: list[float]
    wait_unit_s: list[float]
    wait_s: float
    bound_s: float
    decode_call_s: list[float]
    decode_call_tokens: list[float]

    @classmethod
    def idle(cls, units: int) -> _PoolState:
        zeros = [0.0] * units
        return cls(zeros, zeros, zeros, zeros, 0.0, 0.0, zeros, [1.0] * units)


class FluidSimulator:
    """Per-interval analytic simulation of one deployment serving one trace (see module docstring).

    :param cluster: the GPU cluster (must have the deployment's GPU type and enough GPUs).
    :param model: the served model (spec or catalog name); must match ``deployment.model``.
    :param deployment: the initial deployment (model- or operator-level).
    :param trace: the requests (:class:`opscale.traces.RequestTrace` or any object with numpy
        ``arrival_s``, ``prompt_tokens``, ``output_tokens``).
    :param slo: latency SLO; default :func:`opscale.sim.metrics.default_slo`.
    :param cost_model: operator times; default :func:`opscale.sim.costmodel.default_cost_model`.
    :param config: engine constants shared with the engine; default :class:`SimConfig()`.
    :param seed: accepted for interface parity; the fluid model draws no random numbers.
    :param power_model: GPU power levels; default :class:`opscale.sim.power.PowerModel()` (as the
        engine's), evaluated for all GPUs in one vectorised expression.
    :raises ValueError: the same bad inputs the engine rejects (unknown or foreign units, GPU type
        other than the cluster's, a deployment that does not fit, a request longer than the context
        limit unless ``config.clip_long_requests``).
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec | str,
        deployment: Deployment,
        trace: object,
        *,
        slo: SLO | None = None,
        cost_model: CostModel | None = None,
        config: SimConfig | None = None,
        seed: int = 0,
        power_model: PowerModel | None = None,
    ) -> None:
        self.cluster = cluster
        self.model = get_model(model) if isinstance(model, str) else model
        self.slo = slo or default_slo(self.model)
        self.config = config or SimConfig()
        self.cost_model: CostModel = cost_model or default_cost_model()
        self.seed = seed
        self.power_model = power_model or PowerModel()
        check_deployment(deployment, cluster, self.model)
        self._granularity = deployment.granularity
        self._tp = deployment.tp
        self._pp = deployment.pp
        self._unit_configs: dict[UnitKind, UnitDeployment] = {
            u: replace(c) for u, c in deployment.units.items()
        }
        self._gpu = cluster.gpu_of(0)
        profile = self.power_model.profile(self._gpu)
        self._power_levels = (profile.idle_w, profile.memory_bound_w, profile.compute_bound_w)
        self._load_trace(trace)
        self._units = self.model.units
        self._stateless = tuple(u for u in self._units if u is not UnitKind.ATTENTION)
        self._lm_head_row = self._stateless.index(UnitKind.LM_HEAD)
        self._pool_columns_list = [self._units.index(u) for u in self._stateless]
        self._attention_column = self._units.index(UnitKind.ATTENTION)
        self._overhead = engine_overhead(self.config.engine_overhead, self._gpu)
        self._erlang_rows = ErlangRows(
            shared_erlang_c_table(MAX_TABLE_SERVERS, ERLANG_GRID_POINTS), ERLANG_GRID_POINTS
        )
        self._poisson = shared_poisson_tail_table()
        self._build_tables()
        self._build_transfer_constants()
        self.layout = FluidLayout(cluster, self.model, self.config, min_kv_tokens=self._max_request_tokens)
        self._now_s = 0.0
        self._pending: list[_Pending] = []
        #: load time of an added operator-level replica, per (unit, TP) (asked once)
        self._replica_load_s: dict[tuple[UnitKind, int], float] = {}
        self._place_initial(deployment)
        self._check_requests_fit()
        #: the layout figures (:meth:`_refresh_layout`) need recomputing before the next solve
        self._layout_stale = True
        self._layout_valid_until_s = math.inf
        # fluid state carried across intervals
        self._backlog = 0.0
        #: requests admitted and not yet complete, all streams (fluid)
        self._in_service = 0.0
        self._backlog_decided = 0.0
        self._iteration_s = 0.0
        self._ttft_s = 0.0
        #: admission capacity of one stream, requests/s (last interval; inf before the first)
        self._capacity_per_stream = math.inf
        #: mean prefill-iteration time over the chunk distribution / time at the mean chunk (last interval)
        self._prefill_correction = 1.0
        self._jobs_per_call_list = [1.0] * len(self._stateless)
        self._mean_job_tokens_list = [1.0] * len(self._stateless)
        #: per pool, mean call time of a prefill job (from the last interval's chunk mix)
        self._prefill_call_list = [
            self._table.scalar_time_s(row, 1024.0) for row in range(len(self._stateless))
        ]
        #: contention slowdown of each pool's calls and of attention (operator level; last interval)
        self._slowdown_list = [1.0] * len(self._stateless)
        self._attention_slowdown = 1.0
        #: the streams' iteration cycle (s): the convoy effect of long calls (_pooled_times)
        self._cycle_s = 0.0
        self._served_total = 0.0
        self._last_interval: IntervalMetrics | None = None
        self._totals = _RunTotals(len(self._units))
        self._counts = _WholeCounts()
        self._totals.gpus_peak = self.layout.state.gpus_powered

    # ------------------------------------------------------------------ construction
    def _load_trace(self, trace: object) -> None:
        requests = prepare_requests(trace, self.model, clip_long_requests=self.config.clip_long_requests)
        self.clipped_requests = requests.clipped
        self._arrivals = ArrivalIndex(
            requests.arrival_s, requests.prompt, requests.output, quantiles=LENGTH_QUANTILES
        )
        self._max_request_tokens = requests.max_request_tokens

    def _build_tables(self) -> None:
        model, gpu = self.model, self._gpu
        if self._granularity == "model":
            tps = [self._tp] * len(self._stateless)
            attention_tp = self._tp
        else:
            tps = [self._unit_configs[u].tp for u in self._stateless]
            attention_tp = self._unit_configs[UnitKind.ATTENTION].tp
        self._table = UnitTimeTable(model, gpu, self.cost_model, self._stateless, tps)
        self._attention = AttentionSurrogate(model, gpu, attention_tp, self.cost_model)
        self._attention_tp = attention_tp
        # model level: every unit but the LM head at the iteration's tokens, plus the pipeline hops
        dense = np.delete(self._table.time_s, self._lm_head_row, axis=0).sum(axis=0)
        if self._granularity == "model" and self._pp > 1:
            hop_bytes = model.hidden_size * model.dtype_bytes
            hop = [self.cost_model.send_recv_time_s(gpu, hop_bytes * k, False) for k in (1.0, 1025.0)]
            per_token = (hop[1] - hop[0]) / 1024.0
            dense = dense + (self._pp - 1) * (hop[0] - per_token + per_token * self._table.tokens)
        self._dense_line = TokenLine(self._table.tokens, dense)

    # ------------------------------------------------------------------ placement
    def _place_initial(self, deployment: Deployment) -> None:
        layout = self.layout
        if self._granularity == "model":
            budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
            for _ in range(deployment.instances):
                placed = layout.place_instance(self._tp, self._pp, budget, 0.0, 0.0)
                if placed is None:
                    need = self.model.total_weight_bytes(self._tp) / self._pp
                    raise layout.placement_error(
                        f"an instance of {self.model.name!r}", self._tp * self._pp, need
                    )
                self._pending.append(_Pending(None, placed))
            return
        for unit in (*self._stateless, UnitKind.ATTENTION):
            config = self._unit_configs[unit]
            for index in range(config.replicas):
                explicit = None if config.gpus is None else tuple(config.gpus[index])
                placed = self._place_unit(
                    unit, config, explicit, 0.0, share_later=True, policy=config.placement
                )
                if placed is None:
                    need = layout.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
                    raise layout.placement_error(f"a replica of unit {unit.value!r}", config.tp, need)
        layout.share_attention_memory()

    def _place_unit(
        self,
        unit: UnitKind,
        config: UnitDeployment,
        explicit: tuple[int, ...] | None,
        ready_s: float,
        *,
        share_later: bool,
        policy: Placement,
    ) -> PlacedReplica | None:
        if unit is UnitKind.ATTENTION:
            placed = self.layout.place_attention(
                config.tp,
                config.batch_cap_tokens,
                policy,
                ready_s,
                self._now_s,
                share_later=share_later,
                explicit=explicit,
            )
        else:
            placed = self.layout.place_stateless(
                unit, config.tp, config.batch_cap_tokens, policy, ready_s, self._now_s, explicit
            )
        if placed is not None:
            self._pending.append(_Pending(unit, placed))
        return placed

    def _check_requests_fit(self) -> None:
        kv = [
            r.placed.kv_tokens / (self._pp if r.unit is None else 1)
            for r in self._pending
            if r.unit in (None, UnitKind.ATTENTION)
        ]
        if kv and self._arrivals.num_requests and self._max_request_tokens > max(kv):
            raise ValueError(
                f"a request needs {self._max_request_tokens} tokens of KV cache; the largest attention "
                f"replica holds {int(max(kv))} tokens (raise TP, or give attention replicas more memory)"
            )

    def _refresh_layout(self, serving_at_s: float) -> None:
        """Recompute what depends only on the deployment and on which replicas serve (those ready at
        ``serving_at_s``): batch caps, stream and replica counts, transfer terms, co-location. Called
        only when the deployment changed or a loading replica starts serving (:meth:`advance`)."""
        summary = self.layout.serving_summary(self._units, serving_at_s)
        self._layout_stale = False
        self._layout_valid_until_s = summary.next_ready_s
        self._serving_summary = summary
        self._serving_gpus = float(summary.active_gpus)
        self._powered_count = float(self.layout.state.gpus_powered)
        self._replicas = [float(count) for count in summary.replicas]
        kv_tokens = summary.kv_tokens
        if self._granularity == "model":
            instances = summary.replicas[0]
            self._streams = instances * self._pp
            self._stream_erlang_row = self._erlang_rows.row(max(self._streams, 1))
            self._kv_per_stream = sum(kv_tokens) / (instances * self._pp) if instances else 0.0
            self._ready = self._streams > 0
            return
        self._streams = summary.replicas[self._attention_column]
        self._stream_erlang_row = self._erlang_rows.row(max(self._streams, 1))
        self._ready = self._streams > 0 and all(summary.replicas)
        self._kv_per_stream = sum(kv_tokens) / len(kv_tokens) if kv_tokens else 0.0
        fixed, per_token = self._transfer_terms(summary.homes)
        self._transfer_fixed_s, self._transfer_per_token_s = fixed, per_token
        self._attention_transfer_fixed_s = fixed[self._attention_column]
        self._attention_transfer_per_token_s = per_token[self._attention_column]
        self._pool_transfer_fixed = [fixed[column] for column in self._pool_columns_list]
        self._pool_transfer_per_token = [per_token[column] for column in self._pool_columns_list]
        #: per unit, (unit, its shards on the unit's GPUs per own shard) where non-zero (contention in the fixed point)
        columns = len(self._units)
        colocation = [[0.0] * columns for _ in range(columns)]
        local = self._local_columns(summary.homes)
        # the fixed point counts (1 - 1/S) of co-located work as other streams'; on a GPU whose k
        # streams are the only users of its local units, (1 - 1/k) is (a chain: none)
        others_share = 1.0 - 1.0 / max(self._streams, 1)
        for gpus, mix in summary.gpu_groups:
            local_streams = dict(mix).get(self._attention_column, 0)
            own_scale = (
                (1.0 - 1.0 / local_streams) / others_share if local_streams and others_share > 0 else 1.0
            )
            for column, shards in mix:
                row = colocation[column]
                for other, other_shards in mix:
                    weight = gpus * shards * other_shards
                    row[other] += weight * own_scale if column in local and other in local else weight
        self._colocation_rows = [
            [(other, value / max(own, 1.0)) for other, value in enumerate(row) if value]
            for row, own in zip(colocation, summary.shards_per_unit, strict=True)
        ]
        self._pool_replicas = [self._replicas[column] for column in self._pool_columns_list]
        self._pool_erlang_rows = [self._erlang_rows.row(int(replicas)) for replicas in self._pool_replicas]
        # share of the other streams a pool still serves while one of its replicas is held
        other_streams = max(self._streams - 1, 1)
        self._contention_free_list = [
            min(max(replicas - 1.0, 0.0) / other_streams, 1.0) for replicas in self._pool_replicas
        ]
        self._pool_caps = [float(self._unit_configs[u].batch_cap_tokens) for u in self._stateless]

    def _local_columns(self, homes: Sequence[dict[int, int]]) -> set[int]:
        """Columns whose every job is served beside its stream: attention, and each pool with the same
        replicas per GPU as the attention replicas whose source unit is local too (the engine takes an
        idle replica on the job's GPU first, and each such GPU has one per stream there). Its work on
        a GPU belongs to that GPU's streams only."""
        attention = self._attention_column
        local = {attention}
        for column in range(len(homes)):  # sources come first in model order (the first: attention)
            if (
                column != attention
                and homes[column] == homes[attention]
                and self._transfer_source_rows[column] in local
            ):
                local.add(column)
        return local

    def _build_transfer_constants(self) -> None:
        """What :meth:`_transfer_terms` needs that depends only on the cluster and the model: per unit
        the hops and bytes per token of its inbound transfer and the unit its jobs come from; per GPU its
        node; per node the ``(latency_s, 1 / bandwidth_bytes_per_s)`` of its intra-node link, and the same
        for the interconnect (:meth:`ClusterSpec.link_between`'s rule: none on the same GPU, the node's
        link inside a node, the interconnect across nodes)."""
        units = self._units
        model = self.model
        hops: list[float] = []
        per_token_bytes: list[float] = []
        for column, unit in enumerate(units):
            if unit is UnitKind.ATTENTION:
                hops.append(float(model.num_layers))
                per_token_bytes.append(model.activation_bytes_per_token(UnitKind.QKV_PROJ) * model.num_layers)
            else:
                previous = units[column - 1] if column > 0 else None
                hops.append(float(model.layers_of(unit)))
                per_token_bytes.append(
                    (4.0 if previous is None else model.activation_bytes_per_token(previous)) * hops[-1]
                )
        self._transfer_hops = hops
        self._transfer_bytes_per_token = per_token_bytes
        # a job comes from the previous unit's replica (the first unit's from the attention replica)
        attention_row = units.index(UnitKind.ATTENTION)
        self._transfer_source_rows = [attention_row, *range(len(units) - 1)]
        cluster = self.cluster
        self._node_of_gpu = [cluster.node_of(gpu) for gpu in range(cluster.num_gpus)]
        self._intra_node_link = [
            (node.link.latency_s, 1.0 / node.link.bandwidth_bytes_per_s) for node in cluster.nodes
        ]
        self._inter_node_link = (
            cluster.interconnect.latency_s,
            1.0 / cluster.interconnect.bandwidth_bytes_per_s,
        )

    def _transfer_terms(self, homes: Sequence[dict[int, int]]) -> tuple[list[float], list[float]]:
        """Per unit (model order): expected inbound transfer ``fixed + per_token * tokens`` of one job.

        A job comes from the previous unit's replica (the first unit's from the stream's attention
        replica); a pool serves it on a replica of the same GPU when it has one (the engine prefers an
        idle one there), else on any replica (uniformly). ``homes``: per unit, first GPU -> replicas.
        From a source GPU without a local replica, ``n`` of the pool's ``N`` replicas sit on its node
        (its link) and ``N - n`` on other nodes (the interconnect).
        """
        node_of, intra, inter_latency_s, inter_inverse = (
            self._node_of_gpu,
            self._intra_node_link,
            *self._inter_node_link,
        )
        fixed: list[float] = []
        per_token: list[float] = []
        for column, destinations in enumerate(homes):
            sources = homes[self._transfer_source_rows[column]]
            total = 0
            on_node: dict[int, int] = {}
            for gpu, count in destinations.items():
                node = node_of[gpu]
                on_node[node] = on_node.get(node, 0) + count
                total += count
            latency_sum = inverse_bandwidth_sum = 0.0
            sources_total = 0
            for source_gpu, source_count in sources.items():
                sources_total += source_count
                if source_gpu in destinations:
                    continue  # served on the same GPU: no transfer
                node = node_of[source_gpu]
                near = on_node.get(node, 0)
                latency_s, inverse_bandwidth = intra[node]
                latency_sum += source_count * (near * latency_s + (total - near) * inter_latency_s)
                inverse_bandwidth_sum += source_count * (
                    near * inverse_bandwidth + (total - near) * inter_inverse
                )
            # source and destination shares: replicas per GPU over the unit's replicas
            scale = 1.0 / (max(sources_total, 1) * max(total, 1))
            fixed.append(self._transfer_hops[column] * latency_sum * scale)
            per_token.append(self._transfer_bytes_per_token[column] * inverse_bandwidth_sum * scale)
        return fixed, per_token

    # ------------------------------------------------------------------ protocol
    @property
    def now_s(self) -> float:
        return self._now_s

    @property
    def finished(self) -> bool:
        arrivals = self._arrivals
        return (
            self._now_s > arrivals.last_arrival_s
            and self._backlog < 0.5
            and self._served_total >= arrivals.num_requests - 0.5
            and self._in_service < 0.5
        )

    @property
    def deployment(self) -> Deployment:
        gpus_per_node = self.cluster.nodes[0].gpus_per_node
        if self._granularity == "model":
            instances = len(self.layout.instances)
            units = {u: replace(c, replicas=instances, gpus=None) for u, c in self._unit_configs.items()}
        else:
            units = {
                u: replace(c, replicas=len(self.layout.replicas[u]), gpus=None)
                for u, c in self._unit_configs.items()
            }
            instances = 0
        return Deployment(
            model=self.model.name,
            gpu=self._gpu.name,
            num_nodes=self.cluster.num_gpus // gpus_per_node,
            granularity=self._granularity,
            units=units,
            instances=instances,
            tp=self._tp,
            pp=self._pp,
        )

    def apply(self, action: ScalingAction) -> ApplyReport:
        """Apply a scaling action now; infeasible parts are repaired and counted (as the engine does)."""
        report = ApplyReport()
        for unit, unit_action in action.units_in_apply_order():
            unit = UnitKind(unit)
            if unit not in self._unit_configs:
                report.repairs += 1
                report.messages.append(f"unit {unit.value!r} is not a unit of {self.model.name!r}; ignored")
                continue
            if unit_action.batch_cap_tokens is not None:
                self._set_batch_cap(unit, unit_action.batch_cap_tokens, report)
            if self._granularity == "operator" and unit_action.replica_delta:
                self._scale_unit(unit, unit_action.replica_delta, unit_action.placement, report)
            elif unit_action.replica_delta:
                report.repairs += 1
                report.messages.append(
                    f"replica_delta for {unit.value!r} ignored: model-level deployments scale by instance_delta"
                )
        if action.instance_delta:
            if self._granularity == "model":
                self._scale_instances(action.instance_delta, report)
            else:
                report.repairs += 1
                report.messages.append("instance_delta ignored: operator-level deployments scale per unit")
        if report.replicas_added or report.replicas_removed:
            self._layout_stale = True
        self._totals.gpus_peak = max(self._totals.gpus_peak, self.layout.state.gpus_powered)
        return report

    def _set_batch_cap(self, unit: UnitKind, cap: int, report: ApplyReport) -> None:
        clipped = min(max(int(cap), 1), MAX_BATCH_CAP_TOKENS)
        if clipped != cap:
            report.repairs += 1
            report.messages.append(
                f"batch cap {cap} for {unit.value!r} clipped to {clipped} (1..{MAX_BATCH_CAP_TOKENS})"
            )
        if clipped != self._unit_configs[unit].batch_cap_tokens:
            self._unit_configs[unit] = replace(self._unit_configs[unit], batch_cap_tokens=clipped)
            self._layout_stale = True

    def _scale_unit(
        self, unit: UnitKind, delta: int, placement: Placement | None, report: ApplyReport
    ) -> None:
        config = self._unit_configs[unit]
        if delta > 0:
            load_s = self._replica_load_s.get((unit, config.tp))
            if load_s is None:
                weight_bytes = 0.0 if unit is UnitKind.ATTENTION else self.model.weight_bytes(unit, config.tp)
                load_s = self._replica_load_s[unit, config.tp] = self.config.replica_load_time_s(
                    weight_bytes, whole_instance=False
                )
            added = 0
            for _ in range(delta):
                placed = self._place_unit(
                    unit,
                    config,
                    None,
                    self._now_s + load_s,
                    share_later=False,
                    policy=placement or config.placement,
                )
                if placed is None:
                    break
                added += 1
            if added < delta:
                report.repairs += 1
                report.messages.append(
                    f"{unit.value}: asked +{delta} replicas, added {added} (no GPU with "
                    f"{self.layout.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens) / 1e9:.2f} GB free)"
                )
            if added:
                report.replicas_added[unit] = added
            return
        live = [r for r in self._pending if r.unit is unit]
        # the engine's rule: loading replicas first, then the one whose GPU empties soonest
        # (ClusterState.release_order), then the most recently added
        live.sort(
            key=lambda r: (
                r.placed.ready_s <= self._now_s,
                self.layout.state.release_order(r.placed.gpus),
                -r.placed.ready_s,
            )
        )
        removable = live[: max(0, min(-delta, len(live) - 1))]
        for record in removable:
            self._pending.remove(record)
            self.layout.remove(unit, record.placed, self._now_s)
        if len(removable) < -delta:
            report.repairs += 1
            report.messages.append(
                f"{unit.value}: asked {delta} replicas, removed {len(removable)} (keeps at least one)"
            )
        if removable:
            report.replicas_removed[unit] = len(removable)

    def _scale_instances(self, delta: int, report: ApplyReport) -> None:
        if delta > 0:
            weights = self.model.total_weight_bytes(self._tp) / self._pp
            ready_s = self._now_s + self.config.replica_load_time_s(weights, whole_instance=True)
            budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
            added = 0
            for _ in range(delta):
                placed = self.layout.place_instance(self._tp, self._pp, budget, ready_s, self._now_s)
                if placed is None:
                    break
                self._pending.append(_Pending(None, placed))
                added += 1
            if added < delta:
                report.repairs += 1
                report.messages.append(
                    f"instances: asked +{delta}, added {added} (no free GPUs of tp*pp={self._tp * self._pp})"
                )
            if added:
                for unit in self._unit_configs:
                    report.replicas_added[unit] = added
            return
        live = sorted(self._pending, key=lambda r: (r.placed.ready_s <= self._now_s, -r.placed.ready_s))
        removable = live[: max(0, min(-delta, len(live) - 1))]
        for record in removable:
            self._pending.remove(record)
            self.layout.remove(None, record.placed, self._now_s)
        if len(removable) < -delta:
            report.repairs += 1
            report.messages.append(f"instances: asked {delta}, removed {len(removable)} (keeps at least one)")
        if removable:
            for unit in self._unit_configs:
                report.replicas_removed[unit] = len(removable)

    # ------------------------------------------------------------------ advance
    def advance(self, dt_s: float) -> IntervalMetrics:
        """Advance ``dt_s`` simulated seconds and return the interval's metrics (one solve of the interval
        model; see the module docstring for when loading replicas count as serving)."""
        if not dt_s > 0:
            raise ValueError(f"advance needs dt_s > 0, got {dt_s}")
        start = self._now_s
        end = start + dt_s
        # replicas ready by the middle of the interval serve all of it, later ones from the next interval
        serving_at_s = start + 0.5 * dt_s
        if self._layout_stale or serving_at_s >= self._layout_valid_until_s:
            self._refresh_layout(serving_at_s)
        solution = self._solve(start, end)
        self._now_s = end
        metrics = self._interval_metrics(start, end, solution)
        self._totals.add(solution)
        self._totals.gpus_peak = max(self._totals.gpus_peak, metrics.gpus_powered)
        self._last_interval = metrics
        return metrics

    def _pool_step(
        self, streams: int, beta: float, iteration_s: float, decodes: float, phi: float, chunk_tokens: float
    ) -> _PoolState:
        """One damped step of the pools' batching / Erlang-C model (module docstring, point 4), in
        plain Python over the units (a handful of floats each: faster than numpy at this size; the
        table lookups are inlined, every call size here is >= 1 token and every utilisation in
        [0, UTILISATION_CEILING]). Updates the jobs per call and the mean job size; returns the pools'
        state."""
        lines = self._table.lines
        lm_head = self._lm_head_row
        log2, floor, sqrt, per_octave = math.log2, math.floor, math.sqrt, GRID_POINTS_PER_OCTAVE
        job_rate = streams * beta / iteration_s
        busy_streams = streams * beta
        wait_per_queued_job = POOL_WAIT_FACTOR / (job_rate if job_rate > 1e-12 else 1e-12)
        others_share = (busy_streams - 1.0) / busy_streams if busy_streams > 1.0 else 0.0
        decode_tokens = decodes if decodes > 1.0 else 1.0
        prefill_tokens = decodes + phi * chunk_tokens
        if prefill_tokens < 1.0:
            prefill_tokens = 1.0
        lm_head_tokens = decodes + phi if decodes + phi > 1.0 else 1.0
        jobs_per_call = self._jobs_per_call_list
        slowdown = self._slowdown_list
        prefill_call = self._prefill_call_list
        fixed, per_token = self._pool_transfer_fixed, self._pool_transfer_per_token
        caps, replicas, erlang_rows = self._pool_caps, self._pool_replicas, self._pool_erlang_rows
        erlang_steps = self._erlang_rows.steps
        units = len(lines)
        rho_out, service_out, queue_out = [0.0] * units, [0.0] * units, [0.0] * units
        wait_out, decode_out, decode_tokens_out = [0.0] * units, [0.0] * units, [0.0] * units
        mean_tokens_out = [0.0] * units
        bound_s = wait_total = 0.0
        for u in range(units):
            line = lines[u]
            intercepts, slopes, last = line.intercepts, line.slopes, line.last_segment
            tokens = lm_head_tokens if u == lm_head else prefill_tokens
            calls = jobs_per_call[u]
            servers = replicas[u]
            unit_slowdown = slowdown[u]
            transfer = fixed[u] + per_token[u] * tokens
            decode_call_tokens = decode_tokens + (calls - 1.0) * tokens
            index = int(log2(decode_call_tokens) * per_octave)
            if index > last:
                index = last
            decode_call = intercepts[index] + slopes[index] * decode_call_tokens
            service = ((1.0 - phi) * decode_call + phi * prefill_call[u]) * unit_slowdown + transfer
            rho = job_rate * service / (calls * servers)
            max_jobs = float(floor(caps[u] / tokens))
            if max_jobs < 1.0:
                max_jobs = 1.0
            # closed population: a call takes the jobs waiting when its replica frees; the jobs of the
            # calls just ended or running (c n of them) are not back yet, so n <= S beta - c n
            batch_limit = busy_streams / (servers + 1.0)
            if batch_limit > max_jobs:
                batch_limit = max_jobs
            elif batch_limit < 1.0:
                batch_limit = 1.0
            full_tokens = max_jobs * tokens
            index = int(log2(full_tokens) * per_octave)
            if index > last:
                index = last
            full = (intercepts[index] + slopes[index] * full_tokens) * unit_slowdown + transfer
            bound = busy_streams * full / (max_jobs * servers)
            if bound > bound_s:
                bound_s = bound
            # arrival theorem (closed population): an arriving job finds the load of the other
            # busy streams only, (S beta - 1) / S beta of the pool's (a lone stream never waits)
            seen = rho * others_share
            capped = seen if seen < UTILISATION_CEILING else UTILISATION_CEILING
            # Erlang-C probability of waiting (ErlangRows.at inlined)
            erlang_row = erlang_rows[u]
            position = capped * erlang_steps
            index = int(position)
            low = erlang_row[index]
            waiting_calls = (
                (low + (position - index) * (erlang_row[index + 1] - low)) * capped / (1.0 - capped)
            )
            # closed population: at most one job per busy stream is anywhere in the pools
            queue = waiting_calls * calls
            waiting_limit = busy_streams - servers
            if queue > waiting_limit:
                queue = waiting_limit if waiting_limit > 0.0 else 0.0
            wait = queue * wait_per_queued_job
            target = 1.0 + queue / servers
            if target > batch_limit:
                target = batch_limit
            jobs_per_call[u] = sqrt(calls * target)
            rho_out[u], service_out[u], queue_out[u], wait_out[u] = rho, service, queue, wait
            decode_out[u], decode_tokens_out[u], mean_tokens_out[u] = decode_call, decode_call_tokens, tokens
            wait_total += wait
        self._mean_job_tokens_list = mean_tokens_out
        return _PoolState(
            rho=rho_out,
            service_s=service_out,
            queue_jobs=queue_out,
            wait_unit_s=wait_out,
            wait_s=wait_total,
            bound_s=bound_s,
            decode_call_s=decode_out,
            decode_call_tokens=decode_tokens_out,
        )

    def _iteration_triple(
        self,
        decodes: float,
        chunk_s: float,
        full_chunk: float,
        prior: float,
        context: float,
        jobs_wait_s: float,
    ) -> tuple[float, float, float]:
        """Times of a decode-only iteration, one with a prefill chunk of ``chunk_s`` tokens and one with
        a full chunk of ``full_chunk`` tokens (the fixed point's inner evaluation; scalar fast path for
        model-level instances)."""
        if self._granularity == "operator":
            prefill = self._attention.prefill_scalar_s
            decode, with_chunk, full = self._pooled_times(
                decodes,
                (0.0, chunk_s, full_chunk),
                (0.0, prefill(chunk_s, prior), prefill(full_chunk, prior)),
                (decodes, decodes + 1.0, decodes + 1.0),
                context,
                jobs_wait_s,
            )[0]
            return decode, with_chunk, full
        overhead = self._overhead
        host = overhead.fixed_s + overhead.per_tp_rank_s * self._ranks + overhead.per_request_s * decodes
        decode_attention = self._attention.decode_s(decodes, decodes * context)
        dense = self._dense_line.at
        lm_head = self._table.lines[self._lm_head_row].at
        decode = host + dense(decodes) + lm_head(decodes) + decode_attention
        base = host + overhead.per_request_s + decode_attention + lm_head(decodes + 1.0)
        with_chunk = base + dense(decodes + chunk_s) + self._attention.prefill_scalar_s(chunk_s, prior)
        full = base + dense(decodes + full_chunk) + self._attention.prefill_scalar_s(full_chunk, prior)
        return decode, with_chunk, full

    def _pooled_times(
        self,
        decodes: float,
        chunks: Sequence[float],
        attention_prefills_s: Sequence[float],
        sequences: Sequence[float],
        context: float,
        jobs_wait_s: float,
        mix_weights: Sequence[float] | None = None,
    ) -> tuple[list[float], list[float], list[float]]:
        """Operator level: iteration time of a busy stream with ``decodes`` decodes and, per entry, one
        prefill chunk of ``chunks[j]`` tokens (0: none) whose attention takes ``attention_prefills_s[j]``
        (uncontended), sampling ``sequences[j]`` tokens at the LM head; ``context``: mean KV read per
        decode; ``jobs_wait_s``: summed pool waits. Plain Python over the units (a handful: faster than
        numpy).

        With ``mix_weights`` (one per entry: a mix of calls) it also returns, per unit, the weighted
        mean over the entries of the kernel time of the unit's call and of its compute-bound part (no
        contention, no transfer): the prefill-call figures of :meth:`_solve`, from the same lookups.
        Without, those two lists are empty.

        A job shares its call with ``n - 1`` jobs of the mean size. Contention: under processor sharing
        a call is slowed by ``f`` per call running beside it; on average that is the pool's ``1 + f k``
        (``k``: the other streams' busy replicas on its GPUs). A call much longer than the other streams'
        iteration cycle (a prefill) holds one replica of its pool while the other streams cycle: those
        that the pool's other ``c - 1`` replicas cannot serve queue behind it (a convoy) and stop
        running, so only ``cycle / (2 x call)`` of their load overlaps it; those the other replicas serve
        keep running beside it. Short (decode) calls keep the mean.
        """
        overhead = self._overhead
        attention = self._attention
        attention_slowdown = self._attention_slowdown
        attention_decode = attention.decode_s(decodes, decodes * context)
        base = (
            overhead.fixed_s
            + overhead.per_tp_rank_s * self._ranks
            + jobs_wait_s
            + self._attention_transfer_fixed_s
        )
        per_request, per_token_in = overhead.per_request_s, self._attention_transfer_per_token_s
        compositions = [decodes + chunk for chunk in chunks]
        totals = [
            base
            + per_request * sequence
            + (attention_decode + prefill_s) * attention_slowdown
            + per_token_in * tokens
            for prefill_s, sequence, tokens in zip(attention_prefills_s, sequences, compositions, strict=True)
        ]
        mix_call_s: list[float] = []
        mix_compute_s: list[float] = []
        # each unit's call time over the entries: TokenLine.at inlined (hundreds of lookups per interval)
        log2, per_octave = math.log2, GRID_POINTS_PER_OCTAVE
        half_cycle = 0.5 * self._cycle_s
        lm_head = self._lm_head_row
        compute_lines = self._table.compute_lines
        for u, line in enumerate(self._table.lines):
            intercepts, slopes, last = line.intercepts, line.slopes, line.last_segment
            compute_intercepts, compute_slopes = compute_lines[u].intercepts, compute_lines[u].slopes
            others = (self._jobs_per_call_list[u] - 1.0) * self._mean_job_tokens_list[u]
            excess = self._slowdown_list[u] - 1.0
            free = self._contention_free_list[u]
            # contended time = kernel (1 + shared + convoy overlap), overlap = min(1, cycle / (2 kernel (1 + excess)))
            shared, convoy, contended = excess * free, excess * (1.0 - free), 1.0 + excess
            fixed, per_token = self._pool_transfer_fixed[u], self._pool_transfer_per_token[u]
            previous_job = -1.0
            kernel = compute_kernel = time_s = call_sum = compute_sum = 0.0
            for j, job in enumerate(sequences if u == lm_head else compositions):
                if job != previous_job:  # equal jobs (the LM head's) take the same time
                    previous_job = job
                    tokens = job + others
                    if tokens > 0.0:
                        if tokens < 1.0:
                            tokens = 1.0
                        index = int(log2(tokens) * per_octave)
                        if index > last:
                            index = last
                        kernel = intercepts[index] + slopes[index] * tokens
                        compute_kernel = compute_intercepts[index] + compute_slopes[index] * tokens
                    else:
                        kernel = compute_kernel = 0.0
                    time_s = kernel
                    if excess > 0.0:
                        overlap = half_cycle / (kernel * contended + 5e-13)
                        time_s *= 1.0 + shared + convoy * (overlap if overlap < 1.0 else 1.0)
                    time_s += fixed + per_token * job
                totals[j] += time_s
                if mix_weights is not None:
                    weight = mix_weights[j]
                    call_sum += weight * kernel
                    compute_sum += weight * compute_kernel
            mix_call_s.append(call_sum)
            mix_compute_s.append(compute_sum)
        if mix_weights is None:
            mix_call_s, mix_compute_s = [], []
        return totals, mix_call_s, mix_compute_s

    @staticmethod
    def _prefill_share_over(
        limit_s: float, full_s: float, last_chunks: list[float], last_times: list[float], full_weight: float
    ) -> float:
        """Share of prefill iterations longer than ``limit_s``: full chunks by their time; last chunks by
        the chunk size ``c*`` whose iteration takes ``limit_s`` and a piecewise-linear CDF through the
        quantile points (a step CDF would make the share jump by 1/Q as ``c*`` crosses a point)."""
        pairs = sorted(zip(last_chunks, last_times, strict=True), key=lambda pair: pair[0])
        if pairs[-1][1] <= limit_s:
            last_over = 0.0
        elif pairs[0][1] > limit_s:
            last_over = 1.0
        else:
            chunks = [chunk for chunk, _ in pairs]
            running_max: list[float] = []
            longest = -math.inf
            for _, time_s in pairs:
                longest = max(longest, time_s)
                running_max.append(longest)
            threshold = interp_scalar(limit_s, running_max, chunks)
            last_over = 1.0 - interp_scalar(threshold, chunks, _QUANTILE_LEVEL_LIST, left=0.0, right=1.0)
        return full_weight * float(full_s > limit_s) + (1.0 - full_weight) * last_over

    def _instance_iteration_times(
        self, decodes: float, chunks: list[float], attention_prefills_s: list[float], context: float
    ) -> list[float]:
        """Model level: iteration time of a busy stream with ``decodes`` decodes and one prefill chunk
        (> 0 tokens) per entry of ``chunks`` whose attention takes ``attention_prefills_s``; ``context``:
        mean KV read per decode."""
        sequences = decodes + 1.0  # every entry carries a prefill chunk that samples one token
        overhead = self._overhead
        host = overhead.fixed_s + overhead.per_tp_rank_s * self._ranks + overhead.per_request_s * sequences
        attention = self._attention
        attention_decode = attention.decode_s(decodes, decodes * context)
        fixed = host + self._table.scalar_time_s(self._lm_head_row, sequences)
        dense = self._dense_line.at
        return [
            fixed + dense(decodes + chunk) + (attention_decode + prefill_s)
            for chunk, prefill_s in zip(chunks, attention_prefills_s, strict=True)
        ]

    # ------------------------------------------------------------------ the interval model
    def _solve(self, start_s: float, end_s: float) -> _Solution:
        """The fluid model over ``[start_s, end_s)`` with the replicas serving at ``start_s``."""
        dt = end_s - start_s
        window = self._arrivals.window(start_s, end_s)
        streams = self._streams
        operator = self._granularity == "operator"
        attention_config = self._unit_configs[UnitKind.ATTENTION]
        budget = float(attention_config.batch_cap_tokens)
        self._ranks = self._attention_tp if operator else self._tp * self._pp
        # length quantile points (plain Python lists: 16 floats, faster than numpy at this size)
        prompt_level, output_level = window.prompt_mean, window.output_mean
        prompts = [max(shape * prompt_level, 1.0) for shape in window.prompt_shape_list]
        outputs = [max(shape * output_level, 1.0) for shape in window.output_shape_list]
        inverse_quantiles = 1.0 / LENGTH_QUANTILES
        prompt_mean = sum(prompts) * inverse_quantiles
        output_mean = sum(outputs) * inverse_quantiles
        gaps_per_request = max(output_mean - 1.0, 0.0)
        context = prompt_mean + sum(output * output for output in outputs) * inverse_quantiles / (
            2.0 * output_mean
        )
        kv_per_request = prompt_mean + output_mean / 2.0 + self.config.kv_block_tokens / 2.0
        running_limit = min(float(self.config.max_running_requests), self._kv_per_stream / kv_per_request)
        demand = window.count + self._backlog
        ready = self._ready
        x_demand = demand / (streams * dt) if ready else 0.0
        n_units = len(self._stateless)
        if operator:
            contention = (
                self.config.contention_factor
                if self.config.contention is ContentionModel.PROCESSOR_SHARING
                else 0.0
            )
        pool_wait = 0.0
        pools = _PoolState.idle(n_units)

        self._cycle_s = self._iteration_s or 0.0
        iteration_s = self._iteration_s or self._iteration_triple(1.0, 0.0, 0.0, 0.0, context, 0.0)[0]
        self._cycle_s = iteration_s
        ttft_s = self._ttft_s or iteration_s
        # the streams' admission capacity per stream, warm-started from the last interval (starting at
        # infinity under overload would make the fixed point swing between empty and jammed streams)
        x_cap = self._capacity_per_stream
        x = 0.0
        in_service_start = self._in_service / streams if streams else 0.0
        beta = decodes = rho_prefill = chunk_eff = prefill_rate = 0.0
        decode_s = prefill_iteration_s = prefill_at_mean_chunk_s = full_s = iteration_s
        available = budget
        chunks = [1.0] * LENGTH_QUANTILES
        for _ in range(FIXED_POINT_ITERATIONS if ready else 0):
            x = min(x_demand, x_cap)
            # requests in service per stream relax towards x * R with time constant R (the residence
            # time): the decode population carries over between intervals, as in the engine
            residence_s = ttft_s + gaps_per_request * iteration_s
            settle = residence_s / dt * -math.expm1(-dt / residence_s)
            in_service = x * residence_s + (in_service_start - x * residence_s) * settle
            beta = max(-math.expm1(-in_service), 1e-9)
            decodes = in_service * (gaps_per_request * iteration_s / residence_s) / beta
            available = max(budget - decodes, 1.0)
            rho_prefill = min(x * prompt_mean * iteration_s / (beta * available), 1.0) if x > 0 else 0.0
            chunks = [float(math.ceil(prompt / available)) for prompt in prompts]
            mean_chunks = sum(chunks) * inverse_quantiles
            chunk_light = prompt_mean / mean_chunks
            chunk_eff = chunk_light + rho_prefill * max(available - chunk_light, 0.0)
            decode_s, prefill_iteration_s, full_s = self._iteration_triple(
                decodes, chunk_eff, available, 0.5 * prompt_mean, context, pool_wait
            )
            prefill_at_mean_chunk_s = prefill_iteration_s
            prefill_iteration_s *= self._prefill_correction
            prefill_s_mean = (mean_chunks - 1.0) * full_s + prefill_iteration_s
            prefill_rate = x * prompt_mean / (beta * chunk_eff) if x > 0 else 0.0
            prefill_share = prefill_rate * prefill_iteration_s
            new_iteration_s = (
                prefill_iteration_s
                if prefill_share >= 1.0
                else 1.0 / (prefill_rate + (1.0 - prefill_share) / decode_s)
            )
            if operator:
                phi = min(prefill_rate * new_iteration_s, 1.0)
                pools = self._pool_step(streams, beta, new_iteration_s, decodes, phi, chunk_eff)
                new_iteration_s = max(new_iteration_s, pools.bound_s)
                pool_wait = pools.wait_s
                overhead = self._overhead
                attention_call_s = (
                    overhead.fixed_s
                    + overhead.per_tp_rank_s * self._ranks
                    + overhead.per_request_s * (decodes + phi)
                    + self._attention.decode_s(decodes, decodes * context)
                    + phi * self._attention.prefill_scalar_s(chunk_eff, 0.5 * prompt_mean)
                ) * self._attention_slowdown
                if contention:
                    rho_all = [0.0] * len(self._units)
                    for column, rho in zip(self._pool_columns_list, pools.rho, strict=True):
                        rho_all[column] = min(rho, 1.0)
                    rho_all[self._attention_column] = min(beta * attention_call_s / new_iteration_s, 1.0)
                    # busy replicas on each unit's GPUs (per shard), less the calling stream's own share (one
                    # job in flight): the co-location matrix (shards^T shards / shards per unit) times rho
                    others_share = 1.0 - 1.0 / streams
                    slowdown = [
                        1.0
                        + contention
                        * max(sum(share * rho_all[other] for other, share in row) * others_share, 0.0)
                        for row in self._colocation_rows
                    ]
                    self._slowdown_list = [slowdown[column] for column in self._pool_columns_list]
                    self._attention_slowdown = slowdown[self._attention_column]
            iteration_s = new_iteration_s
            self._cycle_s = iteration_s
            x_cap_budget = budget / ((prompt_mean + gaps_per_request) * iteration_s)
            x_cap_kv = running_limit / (prefill_s_mean + gaps_per_request * iteration_s)
            x_cap_new = min(x_cap_budget, x_cap_kv)
            x_cap = x_cap_new if math.isinf(x_cap) else math.sqrt(x_cap * x_cap_new)
            ttft_s = 0.5 * beta * iteration_s + prefill_s_mean
        x = min(x_demand, x_cap) if ready else 0.0
        if ready:
            self._capacity_per_stream = x_cap
        # per prompt quantile: its last chunk shares the iteration with other prefills (rho_p of the rest)
        priors = [(chunk - 1.0) * available for chunk in chunks]
        remaining = [prompt - prior for prompt, prior in zip(prompts, priors, strict=True)]
        last_chunk = [last + rho_prefill * max(available - last, 0.0) for last in remaining]
        # prefill iterations over the chunk distribution (full chunks and each quantile's last chunk):
        # iteration time is convex in tokens, so its mean exceeds the time at the mean chunk (Jensen)
        prefill_chunks = [available, *last_chunk]
        full_chunks = sum(chunks) - LENGTH_QUANTILES
        each_last = 1.0 / (full_chunks + LENGTH_QUANTILES)
        prefill_weights = [full_chunks * each_last, *[each_last] * LENGTH_QUANTILES]
        # operator level: the pools' prefill-call mix comes from the same lookups (the full chunk's
        # iteration time is the fixed point's full_s)
        prefill_attention = self._attention.prefill_scalar_s
        attention_prefills_s = [
            prefill_attention(chunk, prior)
            for chunk, prior in zip(prefill_chunks, [0.5 * prompt_mean, *priors], strict=True)
        ]
        mix_call_s: list[float] = []
        mix_compute_s: list[float] = []
        if not ready:
            last_times = [0.0] * LENGTH_QUANTILES
        elif operator:
            times, mix_call_s, mix_compute_s = self._pooled_times(
                decodes,
                prefill_chunks,
                attention_prefills_s,
                [decodes + 1.0] * len(prefill_chunks),
                context,
                pool_wait,
                prefill_weights,
            )
            last_times = times[1:]
        else:
            last_times = self._instance_iteration_times(
                decodes, last_chunk, attention_prefills_s[1:], context
            )
        prefill_s = [
            (chunk - 1.0) * full_s + time_s for chunk, time_s in zip(chunks, last_times, strict=True)
        ]
        prefill_times = [full_s, *last_times]
        mean_prefill_s = sum(
            weight * time_s for weight, time_s in zip(prefill_weights, prefill_times, strict=True)
        )
        if ready and x > 0:
            # used from the next interval on (one interval's lag keeps the loop cheap)
            self._prefill_correction = mean_prefill_s / prefill_at_mean_chunk_s
        served = x * streams * dt
        # all the demand is admitted unless the streams' capacity binds (no rounding residue left queued:
        # a residue would count the interval's admissions as drained from a backlog)
        backlog_end = max(demand - served, 0.0) if x < x_demand else 0.0
        backlog_mean = 0.5 * (self._backlog + backlog_end)
        # FCFS fluid: the requests admitted now are the trace's requests number served_total .. + served;
        # their wait is the time since their arrival (0 when nothing is queued)
        backlog_wait_s = 0.0
        if served > 0 and (self._backlog > 0 or backlog_end > 0):
            arrived_s = self._arrivals.mean_arrival_s(self._served_total, self._served_total + served)
            backlog_wait_s = 0.0 if math.isnan(arrived_s) else max(0.5 * (start_s + end_s) - arrived_s, 0.0)
        # admission wait: Erlang-C over the streams, service = a prompt's share of the prefill budget
        service_s = prompt_mean * iteration_s / available if ready else 0.0
        admission_rho = min(x * service_s, UTILISATION_CEILING)
        prompt_cv2 = sum(prompt * prompt for prompt in prompts) * inverse_quantiles / prompt_mean**2 - 1.0
        prob_wait = self._erlang_rows.at(self._stream_erlang_row, admission_rho) if ready else 0.0
        admission_wait_s = (
            prob_wait * service_s / (max(streams, 1) * (1.0 - admission_rho)) * (1.0 + prompt_cv2) / 2.0
            if ready
            else 0.0
        )
        residual_s = 0.5 * beta * iteration_s
        self._iteration_s = iteration_s
        prefill_s_mean = sum(prefill_s) * inverse_quantiles
        self._ttft_s = residual_s + admission_wait_s + prefill_s_mean

        # ---- TTFT of served requests: per prompt quantile a fixed part, plus the admission wait
        fixed_s = [residual_s + backlog_wait_s + prefill for prefill in prefill_s]
        fixed_array = np.array(fixed_s)
        wait_mean_s = admission_wait_s / prob_wait if prob_wait > 0 else 0.0
        served_ttft = TtftMixture(fixed_array, prob_wait, wait_mean_s)
        ttft_ok = served_ttft.cdf_scalar(self.slo.ttft_s, fixed_s) if ready else 0.0
        # ---- TBT: per output quantile, the chance its p99 (max) gap is over the SLO, and that it is long
        phi = min(prefill_rate * iteration_s, 1.0)
        # a decoding request sees the other requests' prefills at their arrival rate x (Poisson), not at
        # the busy-period rate x / beta: the share of its gaps that carry a prefill chunk is phi * beta
        phi_gap = phi * beta
        gap_mean_s = (1.0 - phi_gap) * decode_s + phi_gap * mean_prefill_s
        tbt_slo = self.slo.tbt_s
        over = (1.0 - phi_gap) * float(decode_s > tbt_slo) + phi_gap * self._prefill_share_over(
            tbt_slo, full_s, last_chunk, last_times, prefill_weights[0]
        )
        # the engine's per-request p99 is the gap at rank floor(0.99 (g - 1)) (0-based, no interpolation):
        # it is a long gap when at least g - floor(0.99 (g - 1)) gaps are long
        gaps = [float(round(output - 1.0)) for output in outputs]  # outputs >= 1
        if self.slo.tbt_statistic == "max":
            needed = [1] * len(gaps)
        else:
            needed = [int(max(1.0, count - math.floor(0.99 * max(count - 1.0, 0.0)))) for count in gaps]
        over_tails = self._poisson.total_at_least(over, gaps, needed)
        long_tails = self._poisson.total_at_least(phi_gap, gaps, needed)
        tbt_ok = 1.0 - over_tails * inverse_quantiles
        long_share = long_tails * inverse_quantiles
        # per-request TBT statistic: a prefill iteration's time when long gaps count, else the decode gap
        tbt_values = [decode_s, *prefill_times]
        tbt_weights = [1.0 - long_share, *[long_share * weight for weight in prefill_weights]]

        # ---- decided requests (metrics.py's rule)
        served_from_decided = min(served, self._backlog_decided)
        recent = window.count / dt * self.slo.ttft_s if dt > 0 else 0.0
        decided_waiting = max(backlog_end - recent, 0.0)
        newly_decided = max(decided_waiting - (self._backlog_decided - served_from_decided), 0.0)
        self._backlog_decided = decided_waiting
        served_fresh = served - served_from_decided
        decided = served_fresh + newly_decided
        slo_met = served_fresh * ttft_ok * tbt_ok
        # the engine decides a queued request at the first boundary after its deadline, at the time it
        # has waited so far (a lower bound of its TTFT): the deadline plus, on average, half an interval
        late_s = self.slo.ttft_s + 0.5 * dt
        late_share = newly_decided / decided if decided > 0 else 0.0
        ttft = TtftMixture(fixed_array, prob_wait, wait_mean_s, late_share, late_s)
        ttft_p50, ttft_p99 = ttft.quantiles((0.5, 0.99)) if decided > 0 else (0.0, 0.0)
        ttft_served_mean = sum(fixed_s) * inverse_quantiles + prob_wait * wait_mean_s
        self._backlog = backlog_end
        if ready:
            residence_s = self._ttft_s + gaps_per_request * iteration_s
            in_service_end = x * residence_s + (in_service_start - x * residence_s) * math.exp(
                -dt / residence_s
            )
            self._in_service = in_service_end * streams
        self._served_total += served

        # ---- per-unit figures (plain Python over the handful of units)
        iterations_per_busy_s = 1.0 / iteration_s if ready else 0.0
        decode_only_rate = max(iterations_per_busy_s - prefill_rate, 0.0)
        mean_tokens = decodes + phi * chunk_eff
        columns = len(self._units)
        utilisation = [0.0] * columns
        queue_tokens = [0.0] * columns
        batch_fill = [0.0] * columns
        wait_s = [0.0] * columns
        unit_service_s = [0.0] * columns
        attention_column = self._attention_column
        attention_decode_s = self._attention.decode_s(decodes, decodes * context)
        attention_prefill_s = attention_decode_s + sum(
            weight * prefill_s
            for weight, prefill_s in zip(prefill_weights, attention_prefills_s, strict=True)
        )
        waiting_tokens = (backlog_mean + streams * x * admission_wait_s) * prompt_mean
        queue_tokens[attention_column] = waiting_tokens
        batch_fill[attention_column] = min(mean_tokens / budget, 1.0)
        # attention's wait: the admission delay of the requests admitted (queue + backlog)
        wait_s[attention_column] = admission_wait_s + backlog_wait_s
        host = (
            self._overhead.fixed_s
            + self._overhead.per_tp_rank_s * self._ranks
            + self._overhead.per_request_s * (decodes + phi)
        )
        table = self._table
        if operator:
            attention_kernel_s = (
                attention_decode_s + phi * (attention_prefill_s - attention_decode_s)
            ) * self._attention_slowdown
            attention_call_s = (
                host
                + attention_kernel_s
                + self._attention_transfer_fixed_s
                + self._attention_transfer_per_token_s * mean_tokens
            )
            attention_rho = min(beta * attention_call_s / iteration_s, 1.0) if ready else 0.0
            utilisation[attention_column] = attention_rho
            unit_service_s[attention_column] = attention_call_s
            # per unit: its kernel load (busy share without inbound transfers nor the attention's host
            # overhead), that load without its contention slowdown, and its compute-bound part
            kernel_load = [0.0] * columns
            uncontended_load = [0.0] * columns
            compute_load = [0.0] * columns
            attention_load = attention_rho * max(
                1.0 - (attention_call_s - attention_kernel_s) / attention_call_s, 0.0
            )
            kernel_load[attention_column] = attention_load
            uncontended_load[attention_column] = attention_load / self._attention_slowdown
            compute_load[attention_column] = beta * prefill_rate * (attention_prefill_s - attention_decode_s)
            for row, column in enumerate(self._pool_columns_list):
                job_tokens, calls, service = (
                    self._mean_job_tokens_list[row],
                    self._jobs_per_call_list[row],
                    pools.service_s[row],
                )
                pool_slowdown = self._slowdown_list[row]
                rho = min(pools.rho[row], 1.0)
                utilisation[column] = rho
                queue_tokens[column] = pools.queue_jobs[row] * job_tokens
                batch_fill[column] = min(calls * job_tokens / self._pool_caps[row], 1.0)
                wait_s[column] = pools.wait_unit_s[row]
                unit_service_s[column] = service
                # compute-bound share of the pool's busy time: its calls' kernels that are compute-bound
                # (the engine flags whole calls by their size), decode and prefill calls weighted by time
                compute_kernel_s = (1.0 - phi) * table.compute_lines[row].at(pools.decode_call_tokens[row])
                if mix_compute_s:
                    compute_kernel_s += phi * mix_compute_s[row]
                compute_flag = compute_kernel_s * pool_slowdown / max(service, 1e-12)
                transfer_s = self._pool_transfer_fixed[row] + self._pool_transfer_per_token[row] * job_tokens
                load = rho * max(1.0 - transfer_s / max(service, 1e-12), 0.0)
                kernel_load[column] = load
                uncontended_load[column] = load / pool_slowdown
                compute_load[column] = load * compute_flag
            if x > 0:
                # prefill jobs' calls over this interval's chunk mix (used by the next interval's pool steps)
                self._prefill_call_list = mix_call_s
            energy_j = (
                self._operator_power_w(kernel_load, uncontended_load, compute_load, streams, contention) * dt
            )
        else:
            lm_head = self._lm_head_row
            decode_size = max(decodes, 1.0)
            prefill_tokens = [decodes + chunk for chunk in prefill_chunks]
            # compute-bound kernel seconds per busy second, by the engine's rule: whole unit calls from
            # their compute-bound size on, and the attention of iterations that carry prefill chunks
            compute_per_busy_s = prefill_rate * attention_prefill_s
            for row, column in enumerate(self._pool_columns_list):
                decode_call_s = table.scalar_time_s(row, decode_size)
                decode_compute_s = table.compute_lines[row].at(decode_size)
                if row == lm_head:
                    # the LM head samples one token per sequence: decodes (+ the finishing prefill)
                    prefill_call_s = table.scalar_time_s(lm_head, decodes + 1.0)
                    prefill_compute_s = table.compute_lines[lm_head].at(decodes + 1.0)
                else:
                    prefill_call_s, prefill_compute_s = table.weighted_times(
                        row, prefill_tokens, prefill_weights
                    )
                utilisation[column] = min(
                    beta * (decode_only_rate * decode_call_s + prefill_rate * prefill_call_s), 1.0
                )
                compute_per_busy_s += decode_only_rate * decode_compute_s + prefill_rate * prefill_compute_s
            # the attention replica is busy for its kernels and the iteration's engine overhead
            utilisation[attention_column] = min(
                beta
                * (
                    decode_only_rate * attention_decode_s
                    + prefill_rate * attention_prefill_s
                    + iterations_per_busy_s * host
                ),
                1.0,
            )
            fill = min(mean_tokens / budget, 1.0)
            batch_fill = [fill] * columns
            rate = beta * iterations_per_busy_s
            if rate > 0:
                unit_service_s = [value / rate for value in utilisation]
            # a serving instance's GPUs run kernels while its stream iterates, except during the host
            # overhead of each iteration; loading instances' GPUs idle
            busy = min(beta * max(1.0 - iterations_per_busy_s * host, 0.0), 1.0)
            compute_fraction_value = min(beta * compute_per_busy_s / busy, 1.0) if busy > 0 else 0.0
            serving_gpus = self._serving_gpus
            busy_w, idle_w = self._gpu_power_w(busy, compute_fraction_value), self._gpu_power_w(0.0, 0.0)
            energy_j = (serving_gpus * busy_w + (self._powered_count - serving_gpus) * idle_w) * dt
        return _Solution(
            duration_s=dt,
            arrivals=window.count,
            served=served,
            decided=decided,
            slo_met=slo_met,
            ttft_mean_s=(1.0 - late_share) * ttft_served_mean + late_share * late_s if decided > 0 else 0.0,
            ttft_p50_s=ttft_p50,
            ttft_p99_s=ttft_p99,
            tbt_mean_s=gap_mean_s if ready and gaps_per_request > 0 else 0.0,
            tbt_p99_s=weighted_quantile(tbt_values, tbt_weights, 0.99),
            e2e_mean_s=ttft_served_mean + gaps_per_request * gap_mean_s,
            prompt_tokens=served * prompt_mean,
            output_tokens=served * output_mean,
            running=x * streams * (prefill_s_mean + gaps_per_request * iteration_s),
            waiting=backlog_end + streams * x * admission_wait_s,
            gpu_seconds=self._powered_count * dt,
            energy_j=energy_j,
            unit_utilisation=utilisation,
            unit_queue_tokens=queue_tokens,
            unit_batch_fill=batch_fill,
            unit_wait_s=wait_s,
            unit_service_s=unit_service_s,
            unit_replicas=self._replicas,
            ttft=ttft,
            served_ttft=served_ttft,
            served_ttft_mean_s=ttft_served_mean,
            tbt_values=tbt_values,
            tbt_weights=tbt_weights,
        )

    def _gpu_power_w(self, busy: float, compute: float) -> float:
        """Power of one GPU: :meth:`PowerModel.power_w`'s formula on the levels looked up once (without
        its per-call range checks; the fractions are in [0, 1] by construction)."""
        idle, memory_w, compute_w = self._power_levels
        return idle + busy * ((memory_w - idle) + compute * (compute_w - memory_w))

    def _operator_power_w(
        self,
        kernel_load: list[float],
        uncontended_load: list[float],
        compute_load: list[float],
        streams: int,
        contention: float,
    ) -> float:
        """Power of the powered GPUs (operator level) from each unit's busy shares (per replica): kernel
        load, the same without contention slowdown, and its compute-bound part.

        A stream's job is in service at one replica at a time, so its busy shares on a GPU add up. With
        egalitarian processor sharing (factor 1) a GPU is work-conserving: busy = uncontended kernel work
        per second; without interference, calls overlap independently across the streams (a stream runs
        one call at a time): ``1 - (1 - load / S) ** S``. GPUs without serving shards idle.

        A GPU is busy at least while any one of its replicas runs a call, so no less than its busiest
        replica's (contended) kernel load. That bound matters for a TP replica slowed by sharing on
        another GPU of its group: it runs, at the pace of its most shared GPU, on GPUs that have less
        work of their own (e.g. a TP-4 MoE pool beside TP-1 units on one of its GPUs: busy 1.0
        against 0.7 of work on the others; the engine counts a GPU busy while a call runs on it).
        """
        summary = self._serving_summary
        sharing = min(contention, 1.0)
        independent = max(streams, 1)
        power_w = (self._powered_count - summary.active_gpus) * self._power_levels[0]
        for gpus, mix in summary.gpu_groups:
            load = work = compute = busiest = 0.0
            for column, shards in mix:
                replica_load = kernel_load[column]
                load += shards * replica_load
                work += shards * uncontended_load[column]
                compute += shards * compute_load[column]
                if replica_load > busiest:
                    busiest = replica_load
            overlap = 1.0 - (1.0 - min(load / independent, 1.0)) ** independent
            busy = min(sharing * max(min(work, 1.0), busiest) + (1.0 - sharing) * overlap, 1.0)
            power_w += gpus * self._gpu_power_w(busy, min(compute / max(busy, 1e-12), 1.0))
        return power_w

    # ------------------------------------------------------------------ metrics
    def _interval_metrics(self, start_s: float, end_s: float, solution: _Solution) -> IntervalMetrics:
        decided, served = solution.decided, solution.served
        counts = self._replica_counts()
        units: dict[UnitKind, UnitIntervalMetrics] = {}
        for column, unit in enumerate(self._units):
            serving, pending = counts[unit]
            units[unit] = UnitIntervalMetrics(
                replicas=serving,
                pending_replicas=pending,
                draining_replicas=0,
                utilisation=solution.unit_utilisation[column],
                queue_tokens=solution.unit_queue_tokens[column],
                batch_fill=solution.unit_batch_fill[column],
                mean_wait_s=solution.unit_wait_s[column],
                mean_service_s=solution.unit_service_s[column],
                batch_cap_tokens=self._unit_configs[unit].batch_cap_tokens,
            )
        return IntervalMetrics(
            start_s=start_s,
            end_s=end_s,
            arrivals=solution.arrivals,
            completions=self._counts.take("completions", served),
            decided=self._counts.take("decided", decided),
            slo_met=self._counts.take("slo_met", solution.slo_met),
            slo_attainment=solution.slo_met / decided if decided > 1e-9 else 1.0,
            ttft_mean_s=solution.ttft_mean_s if decided > 0 else 0.0,
            ttft_p50_s=solution.ttft_p50_s if decided > 0 else 0.0,
            ttft_p99_s=solution.ttft_p99_s if decided > 0 else 0.0,
            tbt_mean_s=solution.tbt_mean_s if served > 0 else 0.0,
            tbt_p99_s=solution.tbt_p99_s if served > 0 else 0.0,
            e2e_mean_s=solution.e2e_mean_s if served > 0 else 0.0,
            prompt_tokens_served=self._counts.take("prompt_tokens", solution.prompt_tokens),
            output_tokens_served=self._counts.take("output_tokens", solution.output_tokens),
            preemptions=0,
            running_requests=round(solution.running),
            waiting_requests=round(solution.waiting),
            gpus_powered=self.layout.state.gpus_powered,
            gpus_powered_mean=solution.gpu_seconds / (end_s - start_s),
            gpu_seconds=solution.gpu_seconds,
            energy_j=solution.energy_j,
            units=units,
        )

    def _replica_counts(self) -> dict[UnitKind, tuple[int, int]]:
        """Per unit, ``(serving, loading)`` replicas now (model level: instances, for every unit)."""
        now = self._now_s
        summary = self._serving_summary
        if now < summary.next_ready_s:  # nothing started serving since the summary: its counts hold
            return {
                unit: (summary.replicas[column], summary.pending[column])
                for column, unit in enumerate(self._units)
            }
        if self._granularity == "model":
            serving = sum(1 for r in self._pending if r.placed.ready_s <= now)
            return {u: (serving, len(self._pending) - serving) for u in self._units}
        counts = {}
        for unit in self._units:
            replicas = self.layout.replicas[unit]
            serving = sum(1 for r in replicas if r.ready_s <= now)
            counts[unit] = (serving, len(replicas) - serving)
        return counts

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time_s=self._now_s,
            deployment=self.deployment,
            gpus_powered=self.layout.state.gpus_powered,
            gpu_memory_used_bytes=self.layout.state.memory_used_bytes(),
            last_interval=self._last_interval,
        )

    def summary(self) -> RunSummary:
        """Whole-run figures up to now (percentiles from the decided-weighted TTFT / TBT mixtures)."""
        totals = self._totals
        duration = self._now_s
        return RunSummary(
            duration_s=duration,
            requests=self._arrivals.count_before(duration),
            completed=round(self._served_total),
            slo_attainment=totals.slo_met / totals.decided if totals.decided > 0 else 1.0,
            ttft_mean_s=totals.ttft_sum_s / totals.served if totals.served > 0 else 0.0,
            ttft_p99_s=totals.ttft_quantile(0.99),
            tbt_p99_s=totals.tbt_quantile(0.99),
            e2e_mean_s=totals.e2e_sum_s / totals.served if totals.served > 0 else 0.0,
            throughput_requests_per_s=self._served_total / duration if duration > 0 else 0.0,
            throughput_tokens_per_s=totals.tokens / duration if duration > 0 else 0.0,
            goodput_requests_per_s=totals.slo_met / duration if duration > 0 else 0.0,
            preemptions=0,
            gpus_mean=totals.gpu_seconds / duration if duration > 0 else 0.0,
            gpus_peak=totals.gpus_peak,
            gpu_seconds=totals.gpu_seconds,
            energy_j=totals.energy_j,
            unit_utilisation={
                unit: float(totals.unit_busy_s[column] / totals.unit_capacity_s[column])
                if totals.unit_capacity_s[column] > 0
                else 0.0
                for column, unit in enumerate(self._units)
            },
        )


class _WholeCounts:
    """Integer per-interval counts of fluid quantities whose running sums stay within 0.5 of the fluid
    totals (rounding each interval on its own would drift over a long run)."""

    def __init__(self) -> None:
        self._fluid: dict[str, float] = {}
        self._emitted: dict[str, int] = {}

    def take(self, name: str, amount: float) -> int:
        """The whole count for this interval's ``amount`` of ``name``."""
        total = self._fluid.get(name, 0.0) + amount
        self._fluid[name] = total
        count = round(total) - self._emitted.get(name, 0)
        self._emitted[name] = self._emitted.get(name, 0) + count
        return count


class _RunTotals:
    """Whole-run aggregates of the fluid model. The TTFT mixtures and TBT points of every interval are
    kept (a few dozen numbers each) and turned into run percentiles only when asked. Run-level TTFT
    covers completed (served) requests at their full TTFT, as the engine's records do; interval TTFT
    covers decided requests (deadline-decided ones at their wait so far), as the engine's intervals do."""

    def __init__(self, num_units: int) -> None:
        self.decided = 0.0
        self.slo_met = 0.0
        self.served = 0.0
        self.ttft_sum_s = 0.0
        self.e2e_sum_s = 0.0
        self.tokens = 0.0
        self.gpu_seconds = 0.0
        self.energy_j = 0.0
        self.gpus_peak = 0
        self.ttft_parts: list[tuple[float, TtftMixture]] = []
        self.tbt_parts: list[tuple[float, list[float], list[float]]] = []
        self.unit_busy_s = [0.0] * num_units
        self.unit_capacity_s = [0.0] * num_units

    def add(self, solution: _Solution) -> None:
        if solution.served > 0:
            self.ttft_parts.append((solution.served, solution.served_ttft))
            self.tbt_parts.append((solution.served, solution.tbt_values, solution.tbt_weights))
        self.decided += solution.decided
        self.slo_met += solution.slo_met
        self.served += solution.served
        self.ttft_sum_s += solution.served * solution.served_ttft_mean_s
        self.e2e_sum_s += solution.served * solution.e2e_mean_s
        self.tokens += solution.prompt_tokens + solution.output_tokens
        self.gpu_seconds += solution.gpu_seconds
        self.energy_j += solution.energy_j
        duration_s = solution.duration_s
        for column, (utilisation, replicas) in enumerate(
            zip(solution.unit_utilisation, solution.unit_replicas, strict=True)
        ):
            self.unit_busy_s[column] += utilisation * replicas * duration_s
            self.unit_capacity_s[column] += replicas * duration_s

    def ttft_quantile(self, quantile: float) -> float:
        histogram = LogHistogram()
        for weight, mixture in self.ttft_parts:
            histogram.add_cdf(mixture.cdf(LogHistogram.EDGES_S), weight)
        return histogram.quantile(quantile)

    def tbt_quantile(self, quantile: float) -> float:
        histogram = LogHistogram()
        for weight, values, weights in self.tbt_parts:
            histogram.add_points(np.asarray(values), weight * np.asarray(weights))
        return histogram.quantile(quantile)
