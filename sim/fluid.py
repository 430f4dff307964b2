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
   ``x``, Poisson). For the SLO a request's chance is scaled to the arrivals it meets while it decodes:
   the trace's arrival rate over the next mean decode time (averaged over admission times in the
   interval) over the interval's own, unless capacity binds; otherwise a burst's requests would each be
   charged the whole burst's prefills. A request with ``g`` gaps has its p99 (max) gap above the SLO
   when at least ``g - floor(0.99 (g - 1))`` (one) of its gaps are over it (the engine's rank rule for
   the p99 of a request's gaps): Poisson counts over output quantiles.
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
contention of long calls follows the convoy argument of :func:`opscale.sim.fluid_kernel._pooled_times` (a
heuristic, not a derivation); admission waits near saturation are approximate. ``SimConfig`` fields
about individual requests or calls (``attention_drain``, ``service_time_distribution``,
``record_requests``, ``fast_forward_decode``) do not apply; image tokens join the prompt as in the
engine. A move (``UnitAction.move_replicas``) places the new replica at once, as the engine does, and
the old one leaves when the new one serves (at the start of that interval).

Cost: one solve per :meth:`~FluidSimulator.advance`; its cost depends on neither the request rate nor
the replica count. The model's arithmetic is compiled with numba (:mod:`opscale.sim.fluid_kernel`, about
50 us per interval, call overhead included; an ``advance`` with its metrics takes 0.1 ms, against 0.5-0.8
ms in plain Python before). What depends only on the deployment (which replicas serve, transfer terms,
co-location, batch caps) is recomputed in Python only after an action changed it or a loading replica
started serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from opscale.sim.config import ContentionModel, SimConfig
from opscale.sim.costmodel import CostModel, default_cost_model
from opscale.sim.deployment import (
    ApplyReport,
    Deployment,
    Placement,
    ScalingAction,
    UnitAction,
    UnitDeployment,
)
from opscale.sim.fluid_arrivals import ArrivalIndex
from opscale.sim.fluid_kernel import (
    IntervalResult,
    KernelCarry,
    KernelConstants,
    KernelLayout,
    PoolCarry,
    TransferConstants,
    operator_layout,
    solve_interval_fields,
)
from opscale.sim.fluid_latency import LogHistogram, TtftMixture, shared_poisson_tail_table
from opscale.sim.fluid_layout import FluidLayout
from opscale.sim.fluid_tables import GRID_POINTS_PER_OCTAVE, AttentionSurrogate, UnitTimeTable, segment_lines
from opscale.sim.hardware import ClusterSpec, GPUSpec
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
#: Largest replica count the Erlang-C table covers (more replicas use its last row).
MAX_TABLE_SERVERS = 128
#: Utilisation grid points of the Erlang-C table.
ERLANG_GRID_POINTS = 1025
#: Batch caps an action may set, tokens (the engine's limit).
MAX_BATCH_CAP_TOKENS = 1 << 17


@dataclass
class _Solution:
    """One control interval: the interval model's figures and what the simulator adds to them.

    :param result: the compiled model's figures.
    :param duration_s: interval length.
    :param arrivals: requests arrived in it.
    :param gpu_seconds: powered GPUs x duration.
    :param unit_replicas: serving replicas per unit (model order).
    """

    result: IntervalResult
    duration_s: float
    arrivals: int
    gpu_seconds: float
    unit_replicas: list[float]


@lru_cache(maxsize=16)
def _cost_tables(
    model: ModelSpec,
    gpu: GPUSpec,
    cost_model: CostModel,
    units: tuple[UnitKind, ...],
    tps: tuple[int, ...],
    attention_tp: int,
) -> tuple[UnitTimeTable, AttentionSurrogate]:
    """The unit-time table and attention surrogate of one (model, GPU, cost model, TPs), shared by the
    simulators built with them (an environment builds one per reset; ~2 ms each). Both are only read."""
    return UnitTimeTable(model, gpu, cost_model, units, tps), AttentionSurrogate(
        model, gpu, attention_tp, cost_model
    )


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
        self._load_trace(trace)
        self._units = self.model.units
        self._stateless = tuple(u for u in self._units if u is not UnitKind.ATTENTION)
        self._lm_head_row = self._stateless.index(UnitKind.LM_HEAD)
        self._pool_columns = np.array([self._units.index(u) for u in self._stateless], dtype=np.int64)
        self._attention_column = self._units.index(UnitKind.ATTENTION)
        self._erlang = shared_erlang_c_table(MAX_TABLE_SERVERS, ERLANG_GRID_POINTS)
        self._build_tables()
        self._build_transfer_constants()
        self.layout = FluidLayout(cluster, self.model, self.config, min_kv_tokens=self._max_request_tokens)
        self._now_s = 0.0
        #: the fixed part of a unit's scaling row, per (unit, batch cap, action placement, unit placement)
        self._scaling_constants: dict[
            tuple[UnitKind, int, Placement | None, Placement], tuple[float, ...]
        ] = {}
        self._instance_load_time_s: float | None = None
        self._place_initial(deployment)
        self._check_requests_fit()
        #: the layout figures (:meth:`_refresh_layout`) need recomputing before the next solve
        self._layout_stale = True
        self._layout_valid_until_s = math.inf
        self._kernel_constants = self._build_kernel_constants()
        self._kernel_constant_fields = tuple(self._kernel_constants)
        # fluid state carried across intervals (see opscale.sim.fluid_kernel)
        self._carry = KernelCarry(
            backlog=0.0,
            in_service=0.0,
            backlog_decided=0.0,
            iteration_s=0.0,
            ttft_s=0.0,
            capacity_per_stream=math.inf,
            prefill_correction=1.0,
            attention_slowdown=1.0,
            served_total=0.0,
        )
        pools = len(self._stateless)
        self._pools = PoolCarry(
            jobs_per_call=np.ones(pools),
            mean_job_tokens=np.ones(pools),
            # a prefill job's call before the first interval's chunk mix: 1,024 tokens
            prefill_call_s=self._table.time_s_at(np.full(pools, 1024.0)),
            slowdown=np.ones(pools),
        )
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
        self._table, self._attention = _cost_tables(
            model, gpu, self.cost_model, self._stateless, tuple(tps), attention_tp
        )
        self._attention_tp = attention_tp
        # model level: every unit but the LM head at the iteration's tokens, plus the pipeline hops
        dense = np.delete(self._table.time_s, self._lm_head_row, axis=0).sum(axis=0)
        if self._granularity == "model" and self._pp > 1:
            hop_bytes = model.hidden_size * model.dtype_bytes
            hop = [self.cost_model.send_recv_time_s(gpu, hop_bytes * k, False) for k in (1.0, 1025.0)]
            per_token = (hop[1] - hop[0]) / 1024.0
            dense = dense + (self._pp - 1) * (hop[0] - per_token + per_token * self._table.tokens)
        self._dense_segments = segment_lines(self._table.tokens, dense)

    def _build_kernel_constants(self) -> KernelConstants:
        """The interval model's fixed inputs (see :class:`opscale.sim.fluid_kernel.KernelConstants`)."""
        operator = self._granularity == "operator"
        overhead = engine_overhead(self.config.engine_overhead, self._gpu)
        attention = self._attention
        poisson = shared_poisson_tail_table()
        profile = self.power_model.profile(self._gpu)
        processor_sharing = self.config.contention is ContentionModel.PROCESSOR_SHARING
        return KernelConstants(
            operator=operator,
            lines=self._table.segments,
            dense=self._dense_segments,
            points_per_octave=float(GRID_POINTS_PER_OCTAVE),
            lm_head_row=self._lm_head_row,
            pool_columns=self._pool_columns,
            attention_column=self._attention_column,
            prefill_coefficients=attention.prefill_coefficients,
            decode_coefficients=np.array(
                [attention.decode_floor_s, attention.decode_per_request_s, attention.decode_per_context_s]
            ),
            overhead_fixed_s=overhead.fixed_s,
            overhead_per_rank_s=overhead.per_tp_rank_s,
            overhead_per_request_s=overhead.per_request_s,
            ranks=float(self._attention_tp if operator else self._tp * self._pp),
            kv_block_tokens=float(self.config.kv_block_tokens),
            max_running_requests=float(self.config.max_running_requests),
            contention=self.config.contention_factor if processor_sharing else 0.0,
            power_levels=np.array([profile.idle_w, profile.memory_bound_w, profile.compute_bound_w]),
            ttft_slo_s=float(self.slo.ttft_s),
            tbt_slo_s=float(self.slo.tbt_s),
            tbt_max=self.slo.tbt_statistic == "max",
            quantile_levels=(np.arange(LENGTH_QUANTILES) + 0.5) / LENGTH_QUANTILES,
            poisson_flat=poisson.flat,
            poisson_row=poisson.row,
            poisson_max_count=poisson.max_count,
            poisson_log_low=poisson.log_low,
            poisson_per_log=poisson.per_log,
            poisson_mean_low=poisson.mean_low,
            erlang_rows=self._erlang.rows,
            erlang_steps=self._erlang.steps,
            arrival_s=self._arrivals.arrival_s,
            cumulative_arrival_s=self._arrivals.cumulative_arrival_s,
        )

    # ------------------------------------------------------------------ placement
    def _place_initial(self, deployment: Deployment) -> None:
        layout = self.layout
        if self._granularity == "model":
            budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
            for _ in range(deployment.instances):
                if not layout.place_instance(self._tp, self._pp, budget, 0.0, 0.0):
                    need = self.model.total_weight_bytes(self._tp) / self._pp
                    raise layout.placement_error(
                        f"an instance of {self.model.name!r}", self._tp * self._pp, need
                    )
            return
        for unit in (*self._stateless, UnitKind.ATTENTION):
            config = self._unit_configs[unit]
            for index in range(config.replicas):
                explicit = None if config.gpus is None else tuple(config.gpus[index])
                if unit is UnitKind.ATTENTION:
                    placed = layout.place_attention(
                        config.tp, config.batch_cap_tokens, config.placement, explicit
                    )
                else:
                    placed = layout.place_stateless(
                        unit, config.tp, config.batch_cap_tokens, config.placement, explicit
                    )
                if not placed:
                    need = layout.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
                    raise layout.placement_error(f"a replica of unit {unit.value!r}", config.tp, need)
        layout.share_attention_memory()

    def _check_requests_fit(self) -> None:
        layout = self.layout
        kv = [r.kv_tokens / self._pp for r in layout.instances] + [
            r.kv_tokens for r in layout.replicas_of(UnitKind.ATTENTION)
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
        summary = self.layout.serving_summary(serving_at_s)
        self._layout_stale = False
        self._layout_valid_until_s = summary.next_ready_s
        self._serving_summary = summary
        self._powered_count = float(self.layout.state.gpus_powered)
        self._replicas = np.array(summary.replicas, dtype=np.float64).tolist()
        kv_tokens = summary.kv_tokens
        budget = float(self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens)
        if self._granularity == "model":
            instances = summary.replicas[0]
            streams = instances * self._pp
            self._kernel_layout = KernelLayout.for_instances(
                ready=streams > 0,
                streams=streams,
                kv_per_stream=float(kv_tokens.sum()) / (instances * self._pp) if instances else 0.0,
                budget=budget,
                stream_servers=max(streams, 1),
                powered=self._powered_count,
                serving_gpus=float(summary.active_gpus),
            )
            return
        self._kernel_layout = operator_layout(
            self._transfer_constant_fields,
            summary.homes,
            summary.gpu_shards,
            np.array(summary.replicas, dtype=np.int64),
            kv_tokens,
            self._pool_columns,
            np.array([float(self._unit_configs[unit].batch_cap_tokens) for unit in self._stateless]),
            self._attention_column,
            budget,
            self._powered_count,
        )

    def _build_transfer_constants(self) -> None:
        """What :func:`opscale.sim.fluid_kernel.transfer_terms` needs that depends only on the cluster and
        the model: per unit the hops and bytes per token of its inbound transfer and the unit its jobs
        come from; per GPU its node; per node the latency and inverse bandwidth of its intra-node link,
        and the same for the interconnect (:meth:`ClusterSpec.link_between`'s rule: none on the same
        GPU, the node's link inside a node, the interconnect across nodes)."""
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
        # a job comes from the previous unit's replica (the first unit's from the attention replica)
        attention_row = units.index(UnitKind.ATTENTION)
        self._transfer_source_rows = [attention_row, *range(len(units) - 1)]
        cluster = self.cluster
        self._transfer_constants = TransferConstants(
            source_rows=np.array(self._transfer_source_rows, dtype=np.int64),
            hops=np.array(hops),
            bytes_per_token=np.array(per_token_bytes),
            node_of_gpu=np.array([cluster.node_of(gpu) for gpu in range(cluster.num_gpus)], dtype=np.int64),
            intra_latency_s=np.array([node.link.latency_s for node in cluster.nodes]),
            intra_inverse_bandwidth=np.array(
                [1.0 / node.link.bandwidth_bytes_per_s for node in cluster.nodes]
            ),
            inter_latency_s=cluster.interconnect.latency_s,
            inter_inverse_bandwidth=1.0 / cluster.interconnect.bandwidth_bytes_per_s,
        )
        self._transfer_constant_fields = tuple(self._transfer_constants)

    # ------------------------------------------------------------------ protocol
    @property
    def now_s(self) -> float:
        return self._now_s

    @property
    def finished(self) -> bool:
        arrivals = self._arrivals
        return (
            self._now_s > arrivals.last_arrival_s
            and self._carry.backlog < 0.5
            and self._carry.served_total >= arrivals.num_requests - 0.5
            and self._carry.in_service < 0.5
        )

    @property
    def deployment(self) -> Deployment:
        gpus_per_node = self.cluster.nodes[0].gpus_per_node
        if self._granularity == "model":
            instances = self.layout.instance_count()
            units = {u: replace(c, replicas=instances, gpus=None) for u, c in self._unit_configs.items()}
        else:
            units = {
                u: replace(c, replicas=self.layout.replica_count(u), gpus=None)
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
        """Apply a scaling action now; infeasible parts are repaired and counted (as the engine does).

        Operator level: every unit's batch cap is set first (a unit's cap only sizes its own added
        replicas), then all replica changes run in one compiled call (:meth:`FluidLayout.scale`) in the
        action's apply order; the report lists each unit's repairs in that order.
        """
        ordered = [
            (unit if unit.__class__ is UnitKind else UnitKind(unit), unit_action)
            for unit, unit_action in action.units_in_apply_order()
        ]
        configs = self._unit_configs
        operator_level = self._granularity == "operator"
        rows: list[tuple[float, ...]] = []
        scaled: list[UnitKind] = []
        changes: dict[UnitKind, int] = {}
        moves: dict[UnitKind, int] = {}
        cap_messages: dict[UnitKind, str] = {}
        for unit, unit_action in ordered:
            config = configs.get(unit)
            if config is None:
                continue
            cap = unit_action.batch_cap_tokens
            if cap is not None and not (cap == config.batch_cap_tokens and 1 <= cap <= MAX_BATCH_CAP_TOKENS):
                cap_messages[unit] = self._set_batch_cap(unit, cap)
            if not operator_level:
                continue
            if unit_action.replica_delta:
                rows.append(self._scaling_row(unit, config, unit_action.replica_delta, unit_action.placement))
                scaled.append(unit)
            if unit_action.move_replicas > 0:
                # the engine moves a unit's replicas right after scaling it, before the next unit's turn
                changes.update(zip(scaled, self.layout.scale(rows, self._now_s), strict=True))
                rows, scaled = [], []
                row = self._scaling_row(unit, config, 1, unit_action.placement)  # one new replica per move
                moves[unit] = self.layout.move(row, unit_action.move_replicas, self._now_s)
        changes.update(zip(scaled, self.layout.scale(rows, self._now_s), strict=True))
        report = self._report(ordered, changes, moves, cap_messages)
        if action.instance_delta:
            if self._granularity == "model":
                self._scale_instances(action.instance_delta, report)
            else:
                report.repairs += 1
                report.messages.append("instance_delta ignored: operator-level deployments scale per unit")
        if report.replicas_added or report.replicas_removed:
            self._layout_stale = True
        if report.replicas_added:  # only an addition can power a GPU
            self._totals.gpus_peak = max(self._totals.gpus_peak, self.layout.state.gpus_powered)
        return report

    def _set_batch_cap(self, unit: UnitKind, cap: int) -> str:
        """Set ``unit``'s batch cap, clipped to ``1..MAX_BATCH_CAP_TOKENS``; the repair message of a clip
        (empty: none)."""
        clipped = min(max(int(cap), 1), MAX_BATCH_CAP_TOKENS)
        config = self._unit_configs[unit]  # the simulator's own copy: callers get copies (deployment)
        if clipped != config.batch_cap_tokens:
            config.batch_cap_tokens = clipped
            self._layout_stale = True
        if clipped == cap:
            return ""
        return f"batch cap {cap} for {unit.value!r} clipped to {clipped} (1..{MAX_BATCH_CAP_TOKENS})"

    def _scaling_row(
        self, unit: UnitKind, config: UnitDeployment, delta: int, placement: Placement | None
    ) -> tuple[float, ...]:
        """``unit``'s row of :meth:`FluidLayout.scale`. All but the delta and the ready time depend on the
        unit's batch cap and placement only (memoised: random actions scale most units every step)."""
        key = (unit, config.batch_cap_tokens, placement, config.placement)
        constants = self._scaling_constants.get(key)
        if constants is None:
            weight_bytes = 0.0 if unit is UnitKind.ATTENTION else self.model.weight_bytes(unit, config.tp)
            load_s = self.config.replica_load_time_s(weight_bytes, whole_instance=False)
            constants = (
                *self.layout.scaling_constants(
                    unit, config.tp, config.batch_cap_tokens, placement or config.placement
                ),
                load_s,
            )
            self._scaling_constants[key] = constants
        column, tp, need_bytes, kv_bytes_per_token, policy, load_s = constants
        return (column, delta, tp, need_bytes, kv_bytes_per_token, policy, self._now_s + load_s)

    def _report(
        self,
        ordered: list[tuple[UnitKind, UnitAction]],
        changes: dict[UnitKind, int],
        moves: dict[UnitKind, int],
        cap_messages: dict[UnitKind, str],
    ) -> ApplyReport:
        """The report of the unit actions ``ordered`` (apply order), given the replicas each scaled unit
        added or removed (``changes``) and moved (``moves``): what each did, and its repairs (unknown
        unit, clipped batch cap, replicas that did not fit or must stay, moves short of room, a replica
        delta or move at model level), unit by unit, in the engine's words."""
        report = ApplyReport()
        added, removed, messages = report.replicas_added, report.replicas_removed, report.messages
        for unit, unit_action in ordered:
            config = self._unit_configs.get(unit)
            if config is None:
                messages.append(f"unit {unit.value!r} is not a unit of {self.model.name!r}; ignored")
                continue
            cap_message = cap_messages.get(unit)
            if cap_message:
                messages.append(cap_message)
            delta = unit_action.replica_delta
            if self._granularity == "model":
                if delta or unit_action.move_replicas:
                    messages.append(
                        f"replica_delta / move_replicas for {unit.value!r} ignored: model-level deployments "
                        "scale by instance_delta"
                    )
                continue
            change = changes.get(unit, 0)
            if delta > 0 and change < delta:
                need = self.layout.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
                messages.append(
                    f"{unit.value}: asked +{delta} replicas, added {change} (no GPU with {need / 1e9:.2f} GB free)"
                )
            elif delta < 0 and change > delta:
                messages.append(
                    f"{unit.value}: asked {delta} replicas, removed {-change} (keeps at least one)"
                )
            if change > 0:
                added[unit] = change
            elif change < 0:
                removed[unit] = -change
            moved = moves.get(unit)
            if moved is None:
                continue
            if moved < unit_action.move_replicas:
                messages.append(
                    f"{unit.value}: asked to move {unit_action.move_replicas} replicas, moving {moved} "
                    "(serving replicas or room elsewhere lacking)"
                )
            if moved:
                added[unit] = added.get(unit, 0) + moved
                removed[unit] = removed.get(unit, 0) + moved
        report.repairs = len(messages)
        return report

    def _instance_load_s(self) -> float:
        """Load time of an added instance (asked once: the sum over units costs more than a step)."""
        if self._instance_load_time_s is None:
            weights = self.model.total_weight_bytes(self._tp) / self._pp
            self._instance_load_time_s = self.config.replica_load_time_s(weights, whole_instance=True)
        return self._instance_load_time_s

    def _scale_instances(self, delta: int, report: ApplyReport) -> None:
        if delta > 0:
            ready_s = self._now_s + self._instance_load_s()
            budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
            added = 0
            while added < delta and self.layout.place_instance(
                self._tp, self._pp, budget, ready_s, self._now_s
            ):
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
        live = sorted(self.layout.instances, key=lambda r: (r.ready_s <= self._now_s, -r.ready_s))
        removable = live[: max(0, min(-delta, len(live) - 1))]
        for instance in removable:
            self.layout.remove(instance, self._now_s)
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
        if self.layout.departures_pending and self.layout.depart(serving_at_s, start):
            self._layout_stale = True  # moved replicas whose replacements serve from this interval left
        if self._layout_stale or serving_at_s >= self._layout_valid_until_s:
            self._refresh_layout(serving_at_s)
        solution = self._solve(start, end)
        self._now_s = end
        metrics = self._interval_metrics(start, end, solution)
        self._totals.add(solution)
        self._totals.gpus_peak = max(self._totals.gpus_peak, metrics.gpus_powered)
        self._last_interval = metrics
        return metrics

    def _solve(self, start_s: float, end_s: float) -> _Solution:
        """The fluid model over ``[start_s, end_s)`` with the replicas serving at ``start_s``: one call
        of the compiled :func:`opscale.sim.fluid_kernel.solve_interval` (through
        :func:`~opscale.sim.fluid_kernel.solve_interval_fields`: plain tuples are cheaper to pass)."""
        window = self._arrivals.window(start_s, end_s)
        result, self._carry = solve_interval_fields(
            self._kernel_constant_fields,
            tuple(self._kernel_layout),
            tuple(self._carry),
            tuple(self._pools),
            start_s,
            end_s,
            window.count,
            window.prompt_mean,
            window.output_mean,
            window.prompt_shape,
            window.output_shape,
        )
        dt = end_s - start_s
        return _Solution(result, dt, window.count, self._powered_count * dt, self._replicas)

    # ------------------------------------------------------------------ metrics
    def _interval_metrics(self, start_s: float, end_s: float, solution: _Solution) -> IntervalMetrics:
        result = solution.result
        decided, served = result.decided, result.served
        utilisation, queue_tokens, batch_fill, wait_s, service_s = result.unit_figures.tolist()
        counts = self._replica_counts()
        units: dict[UnitKind, UnitIntervalMetrics] = {}
        for column, unit in enumerate(self._units):
            serving, pending = counts[unit]
            units[unit] = UnitIntervalMetrics(
                replicas=serving,
                pending_replicas=pending,
                draining_replicas=0,
                utilisation=utilisation[column],
                queue_tokens=queue_tokens[column],
                batch_fill=batch_fill[column],
                mean_wait_s=wait_s[column],
                mean_service_s=service_s[column],
                batch_cap_tokens=self._unit_configs[unit].batch_cap_tokens,
            )
        return IntervalMetrics(
            start_s=start_s,
            end_s=end_s,
            arrivals=solution.arrivals,
            completions=self._counts.take("completions", served),
            decided=self._counts.take("decided", decided),
            slo_met=self._counts.take("slo_met", result.slo_met),
            slo_attainment=result.slo_met / decided if decided > 1e-9 else 1.0,
            ttft_mean_s=result.ttft_mean_s if decided > 0 else 0.0,
            ttft_p50_s=result.ttft_p50_s if decided > 0 else 0.0,
            ttft_p99_s=result.ttft_p99_s if decided > 0 else 0.0,
            tbt_mean_s=result.tbt_mean_s if served > 0 else 0.0,
            tbt_p99_s=result.tbt_p99_s if served > 0 else 0.0,
            e2e_mean_s=result.e2e_mean_s if served > 0 else 0.0,
            prompt_tokens_served=self._counts.take("prompt_tokens", result.prompt_tokens),
            output_tokens_served=self._counts.take("output_tokens", result.output_tokens),
            preemptions=0,
            running_requests=round(result.running),
            waiting_requests=round(result.waiting),
            gpus_powered=self.layout.state.gpus_powered,
            gpus_powered_mean=solution.gpu_seconds / (end_s - start_s),
            gpu_seconds=solution.gpu_seconds,
            energy_j=result.energy_j,
            units=units,
        )

    def _replica_counts(self) -> dict[UnitKind, tuple[int, int]]:
        """Per unit, ``(serving, loading)`` replicas now (model level: instances, for every unit)."""
        summary = self._serving_summary
        if self._now_s < summary.next_ready_s:  # nothing started serving since the summary: its counts hold
            serving, loading = summary.replicas, summary.pending
        else:
            serving, loading = self.layout.replica_counts(self._now_s)
        return {unit: (serving[column], loading[column]) for column, unit in enumerate(self._units)}

    def memory_used_bytes(self) -> list[float]:
        return self.layout.state.memory_used_bytes()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time_s=self._now_s,
            deployment=self.deployment,
            gpus_powered=self.layout.state.gpus_powered,
            gpu_memory_used_bytes=self.memory_used_bytes(),
            last_interval=self._last_interval,
        )

    def summary(self) -> RunSummary:
        """Whole-run figures up to now (percentiles from the decided-weighted TTFT / TBT mixtures)."""
        totals = self._totals
        duration = self._now_s
        return RunSummary(
            duration_s=duration,
            requests=self._arrivals.count_before(duration),
            completed=round(self._carry.served_total),
            slo_attainment=totals.slo_met / totals.decided if totals.decided > 0 else 1.0,
            ttft_mean_s=totals.ttft_sum_s / totals.served if totals.served > 0 else 0.0,
            ttft_p99_s=totals.ttft_quantile(0.99),
            tbt_p99_s=totals.tbt_quantile(0.99),
            e2e_mean_s=totals.e2e_sum_s / totals.served if totals.served > 0 else 0.0,
            throughput_requests_per_s=self._carry.served_total / duration if duration > 0 else 0.0,
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
        self.tbt_parts: list[tuple[float, FloatArray, FloatArray]] = []
        self.unit_busy_s = [0.0] * num_units
        self.unit_capacity_s = [0.0] * num_units

    def add(self, solution: _Solution) -> None:
        result = solution.result
        served = result.served
        if served > 0:
            mixture = TtftMixture(result.ttft_fixed_s, result.prob_wait, result.wait_mean_s)
            self.ttft_parts.append((served, mixture))
            self.tbt_parts.append((served, result.tbt_values, result.tbt_weights))
        self.decided += result.decided
        self.slo_met += result.slo_met
        self.served += served
        self.ttft_sum_s += served * result.served_ttft_mean_s
        self.e2e_sum_s += served * result.e2e_mean_s
        self.tokens += result.prompt_tokens + result.output_tokens
        self.gpu_seconds += solution.gpu_seconds
        self.energy_j += result.energy_j
        duration_s = solution.duration_s
        for column, (utilisation, replicas) in enumerate(
            zip(result.unit_figures[0].tolist(), solution.unit_replicas, strict=True)
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
