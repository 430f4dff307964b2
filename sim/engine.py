"""The request-level, operator-disaggregated discrete-event engine (fidelity ``des``), on SimPy.

Serving semantics (DESIGN.md 2.4):

* **Attention replicas are streams** (:mod:`opscale.sim.streams`): continuous batching with chunked
  prefill, decodes first, KV-block admission, preemption by recompute. New requests go to the stream
  with the least capacity-weighted work (prefill + decode tokens still owed, running and queued, over
  its KV capacity), among streams whose KV cache can hold the request at all.
* **Model-level deployments** run each instance as :class:`~opscale.sim.streams.InstanceStream`
  (every unit dedicated and co-located: an iteration is one event; PP as ``pp`` micro-batch streams;
  pure-decode runs fast-forwarded). **Operator-level deployments** run every attention replica as a
  :class:`~opscale.sim.pools.PooledStream` whose iterations visit shared unit pools
  (:mod:`opscale.sim.pools`: per-unit batching across streams up to the batch cap, one job per unit
  for all layers, transfers per layer between GPUs) and co-located calls share their GPU by processor
  sharing (:mod:`opscale.sim.sharing`). These calls run in a compiled loop merged with SimPy's queue
  (:mod:`opscale.sim.compiled_pools`, :mod:`opscale.sim.call_kernel`; bitwise the same results, several
  times faster) unless ``SimConfig.compiled_calls`` is off or service times are exponential.
* **Reconfiguration** (:meth:`DiscreteEventSimulator.apply`): new replicas serve after
  :meth:`SimConfig.replica_load_time_s`; removed stateless replicas finish their call; removed
  attention replicas hand their requests over (``migrate``: KV moved over the link, queued requests
  re-routed) or finish them (``finish``), per :attr:`SimConfig.attention_drain`; a move
  (``UnitAction.move_replicas``) starts a replica elsewhere and drains the old one once the new one
  serves. Impossible parts of an action (no memory, last replica) are repaired and counted in the
  :class:`ApplyReport`; a request no replica can hold any more after a scale-down is rejected and
  counted (:attr:`DiscreteEventSimulator.rejected_requests`).
* **Metrics**: :mod:`opscale.sim.metrics` (the "decided" rule for per-interval SLO attainment);
  interval TTFT figures include requests decided by a passed TTFT deadline, at their waiting time so
  far (a lower bound); interval TBT and end-to-end figures cover requests that completed. Run-level
  ``tbt_p99_s`` is the 99th percentile over requests of their TBT statistic (p99 or max gap). For
  ``attention``, :class:`UnitIntervalMetrics` ``mean_wait_s`` is the mean admission delay (queueing
  from arrival or preemption until admitted) and ``queue_tokens`` the time-averaged prefill tokens
  waiting; a model-level instance's per-unit utilisation is the unit's share of iteration time.
* **Energy**: per GPU and interval, ``powered_s x P(busy fraction, compute-bound fraction)`` from the
  power model; released GPUs draw nothing, powered idle GPUs their idle power.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import simpy

from opscale.sim.cluster import ClusterState, PlacementError, Replica, ReplicaState, colocation_affinity
from opscale.sim.compiled_pools import CallEnvironment, CompiledCalls, CompiledPooledStream, CompiledUnitPool
from opscale.sim.config import AttentionDrain, ServiceTimeDistribution, SimConfig
from opscale.sim.costmodel import CostModel, default_cost_model
from opscale.sim.deployment import (
    ApplyReport,
    Deployment,
    Placement,
    ScalingAction,
    UnitDeployment,
)
from opscale.sim.hardware import ClusterSpec, GPUSpec
from opscale.sim.inputs import check_deployment, prepare_requests
from opscale.sim.metrics import SLO, IntervalMetrics, RunSummary, UnitIntervalMetrics, default_slo
from opscale.sim.models import ModelSpec, UnitKind, get_model
from opscale.sim.overhead import engine_overhead
from opscale.sim.pools import AttentionReplicaStream, Link, PooledStream, UnitPool
from opscale.sim.power import PowerModel
from opscale.sim.recorder import MetricsRecorder
from opscale.sim.sharing import GpuSharing
from opscale.sim.simulator import Snapshot
from opscale.sim.streams import ActiveRequest, InstanceStream, IterationTimer, Stream
from opscale.traces.trace import RequestTrace

__all__ = ["DiscreteEventSimulator"]

#: Batch caps an action may set, tokens (larger values are clipped and counted as repairs).
MAX_BATCH_CAP_TOKENS = 1 << 17


def _adopt(target: Stream, request: ActiveRequest, _event: simpy.Event) -> None:
    """Event callback: a migrated request's KV has arrived at ``target``."""
    target.adopt(request)


@dataclass(eq=False)
class _Instance:
    """A model-level instance: ``tp x pp`` GPUs, every unit on them, ``pp`` streams."""

    gpus: tuple[int, ...]
    bytes_per_gpu: float
    streams: list[InstanceStream]
    state: ReplicaState = ReplicaState.LOADING
    pending_streams: int = 0


class DiscreteEventSimulator:
    """Request-level discrete-event simulation of one deployment serving one trace.

    :param cluster: the GPU cluster (must have the deployment's GPU type and enough GPUs).
    :param model: the served model (spec or catalog name); must match ``deployment.model``.
    :param deployment: the initial deployment (model- or operator-level).
    :param trace: the requests (arrival times are simulated seconds).
    :param slo: latency SLO; default :func:`opscale.sim.metrics.default_slo`.
    :param cost_model: operator times; default :func:`opscale.sim.costmodel.default_cost_model`.
    :param config: engine constants; default :class:`SimConfig()`.
    :param seed: seed of the generator behind every random draw.
    :param power_model: GPU power levels; default :class:`opscale.sim.power.PowerModel()`
        (SplitwiseSim's per-phase constants).
    :raises ValueError: a deployment that names a missing or foreign unit, a GPU that does not exist,
        a GPU type other than the cluster's, a replica that does not fit in GPU memory, or a request
        longer than the model's context limit or any attention replica's KV cache (unless
        ``config.clip_long_requests``, which clips and counts in :attr:`clipped_requests`).
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec | str,
        deployment: Deployment,
        trace: RequestTrace,
        *,
        slo: SLO | None = None,
        cost_model: CostModel | None = None,
        config: SimConfig | None = None,
        seed: int = 0,
        power_model: PowerModel | None = None,
    ) -> None:
        self.cluster = cluster
        self.model = get_model(model) if isinstance(model, str) else model
        self._slo = slo or default_slo(self.model)
        self.config = config or SimConfig()
        self.cost_model: CostModel = cost_model or default_cost_model()
        self.rng = np.random.default_rng(seed)
        self.power_model = power_model or PowerModel()
        check_deployment(deployment, cluster, self.model)
        self.state = ClusterState(cluster, self.model, self.config)
        self.link = Link(cluster)
        #: operator level: the compiled call loop (None: the Python classes, GpuSharing and UnitPool)
        self.calls: CompiledCalls | None = None
        if (
            deployment.granularity == "operator"
            and self.config.compiled_calls
            and self.config.service_time_distribution is ServiceTimeDistribution.DETERMINISTIC
        ):
            env = CallEnvironment()
            gpu = self.state.gpus[0].spec
            latency_s, bandwidth = self.link.matrices()
            self.calls = CompiledCalls(
                env, self.state, self.config, self.model, latency_s, bandwidth, lambda tp: self.timer(gpu, tp)
            )
            self.env: simpy.Environment = env
        else:
            self.env = simpy.Environment()
        #: the Python classes' GPU sharing (None with the compiled loop, which shares GPUs itself)
        self.sharing = GpuSharing(self.env, self.state, self.config) if self.calls is None else None
        self._granularity = deployment.granularity
        self._tp = deployment.tp
        self._pp = deployment.pp
        self._unit_configs: dict[UnitKind, UnitDeployment] = {
            unit: replace(config) for unit, config in deployment.units.items()
        }
        self._timers: dict[tuple[GPUSpec, int], IterationTimer] = {}
        self.streams: list[Stream] = []
        self.instances: list[_Instance] = []
        self.pools: dict[UnitKind, UnitPool | CompiledUnitPool] = {}
        self._attention_replicas: dict[Stream, Replica] = {}
        # KV tokens a run-time-added attention replica reserves: the smallest start-up share
        # (set by _share_attention_memory), so it leaves room for other replicas on its GPU
        self._added_attention_kv_tokens = 0
        self._next_replica_id = 0
        self._load_trace(trace)
        self.metrics = MetricsRecorder(
            self.slo, self.power_model, self._num_requests, self.config.record_requests
        )
        self.tbt = self.metrics.tbt
        self.records = self.metrics.records
        self._active = 0
        self._arrived = 0
        self._last_interval: IntervalMetrics | None = None
        if self._granularity == "model":
            for _ in range(deployment.instances):
                self._add_instance(ready_now=True)
        else:
            self._build_operator_level()
        self._check_requests_fit()
        self.metrics.note_gpus_powered(self.state.gpus_powered)
        if self._num_requests:
            self._schedule_arrival(0)

    # ------------------------------------------------------------------ construction
    def _load_trace(self, trace: RequestTrace) -> None:
        requests = prepare_requests(trace, self.model, clip_long_requests=self.config.clip_long_requests)
        self.clipped_requests = requests.clipped
        #: requests no attention replica could hold any more (see :meth:`_reject`)
        self.rejected_requests = 0
        self._arrival_s = requests.arrival_s.tolist()
        self._prompt = requests.prompt.tolist()
        self._output = requests.output.tolist()
        self._patches = requests.patches.tolist()
        self._num_requests = len(self._arrival_s)
        self._max_request_tokens = requests.max_request_tokens

    def _check_requests_fit(self) -> None:
        if not self.streams or not self._num_requests:
            return
        largest = max(s.kv_tokens for s in self.streams)
        if self._max_request_tokens > largest:
            raise ValueError(
                f"a request needs {self._max_request_tokens} tokens of KV cache; the largest attention "
                f"replica holds {largest} tokens (raise TP, or give attention replicas more memory)"
            )

    def timer(self, gpu: GPUSpec, tp: int) -> IterationTimer:
        key = (gpu, tp)
        timer = self._timers.get(key)
        if timer is None:
            timer = IterationTimer(self.model, gpu, tp, self.cost_model)
            self._timers[key] = timer
        return timer

    def _new_replica_id(self) -> int:
        self._next_replica_id += 1
        return self._next_replica_id - 1

    def _stream_kwargs(self, kv_tokens: int, token_budget: int, gpu: GPUSpec, ranks: int) -> dict[str, Any]:
        return {
            "kv_tokens": kv_tokens,
            "block_tokens": self.config.kv_block_tokens,
            "token_budget": token_budget,
            "max_running": self.config.max_running_requests,
            "overhead": engine_overhead(self.config.engine_overhead, gpu),
            "overhead_ranks": ranks,
        }

    # ------------------------------------------------------------------ model-level instances
    def _instance_weight_bytes_per_gpu(self) -> float:
        tp, pp = self._tp, self._pp
        weights = self.model.total_weight_bytes(tp) / pp
        budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
        activations = 2.0 * self.model.hidden_size * self.model.dtype_bytes * budget / tp
        return weights + activations

    def _add_instance(self, *, ready_now: bool) -> _Instance | None:
        """Place and start one instance; ``None`` if no node has room (caller repairs)."""
        tp, pp = self._tp, self._pp
        need = self._instance_weight_bytes_per_gpu()
        kv_per_token = self.model.kv_bytes_per_token(tp) / pp
        min_kv = need + kv_per_token * self.config.kv_block_tokens * 16
        group = self.state.find_group(tp * pp, min_kv, Placement.PACK)
        if group is None:
            if ready_now:
                usable = self.state.gpus[0].capacity_bytes
                raise PlacementError(
                    f"instance of {self.model.name!r} at tp={tp} pp={pp} needs {need / 1e9:.1f} GB of weights "
                    f"and activations per GPU plus KV cache; {self.state.gpus[0].spec.name} has "
                    f"{usable / 1e9:.1f} GB usable (memory x gpu_memory_fraction "
                    f"{self.config.gpu_memory_fraction}), best free {self.state.best_free_bytes() / 1e9:.1f} GB"
                )
            return None
        free = min(self.state.gpus[i].free_bytes for i in group)
        kv_tokens = int((free - need) / kv_per_token)
        bytes_per_gpu = need + kv_tokens * kv_per_token
        now = self.env.now
        self.state.reserve(group, bytes_per_gpu, now)
        gpu = self.state.gpus[group[0]].spec
        timer = self.timer(gpu, tp)
        hop_bytes = self.model.hidden_size * self.model.dtype_bytes
        cross_node = len({self.state.gpus[i].node for i in group}) > 1

        # pipeline hops are alpha-beta (latency + bytes / bandwidth): probe the line once
        pp_hop_s = (0.0, 0.0)
        if pp > 1:
            one = self.cost_model.send_recv_time_s(gpu, hop_bytes * 1024, cross_node)
            two = self.cost_model.send_recv_time_s(gpu, hop_bytes * 2048, cross_node)
            per_token = (two - one) / 1024
            pp_hop_s = ((pp - 1) * (one - per_token * 1024), (pp - 1) * per_token)

        budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
        streams = [
            InstanceStream(
                len(self.streams) + k,
                self,
                timer=timer,
                units=self.model.units,
                pp_hop_s=pp_hop_s,
                fast_forward=self.config.fast_forward_decode,
                **self._stream_kwargs(kv_tokens // pp, budget, gpu, tp * pp),
            )
            for k in range(pp)
        ]
        instance = _Instance(gpus=group, bytes_per_gpu=bytes_per_gpu, streams=streams)
        for stream in streams:
            stream.instance = instance
        self.streams.extend(streams)
        self.instances.append(instance)
        if ready_now:
            self._instance_ready(instance)
        else:
            weights = self.model.total_weight_bytes(tp) / pp
            delay = self.config.replica_load_time_s(weights, whole_instance=True)
            self.env.timeout(delay).callbacks.append(lambda _e: self._instance_ready(instance))
        return instance

    def _instance_ready(self, instance: _Instance) -> None:
        if instance.state is not ReplicaState.LOADING:
            return
        instance.state = ReplicaState.SERVING
        for stream in instance.streams:
            stream.start_serving()

    # ------------------------------------------------------------------ operator-level pools
    def _build_operator_level(self) -> None:
        for unit in self.model.units:
            if unit is UnitKind.ATTENTION:
                continue
            self.pools[unit] = self._make_pool(unit)
        # stateless replicas first, attention replicas take the memory left
        order = [u for u in self.model.units if u is not UnitKind.ATTENTION] + [UnitKind.ATTENTION]
        for unit in order:
            config = self._unit_configs[unit]
            for index in range(config.replicas):
                explicit = None if config.gpus is None else tuple(config.gpus[index])
                if unit is UnitKind.ATTENTION:
                    ok = self._add_attention_replica(config, explicit, ready_now=True, share_evenly=True)
                else:
                    ok = self._add_pool_replica(unit, config, explicit, ready_now=True)
                if not ok:
                    raise PlacementError(self._no_room_message(unit, config))
        self._share_attention_memory()

    def _no_room_message(self, unit: UnitKind, config: UnitDeployment) -> str:
        need = self.state.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
        return (
            f"deployment does not fit: a replica of unit {unit.value!r} at tp={config.tp} needs "
            f"{need / 1e9:.2f} GB per GPU (plus KV cache for attention); the best GPU has "
            f"{self.state.best_free_bytes() / 1e9:.2f} GB free of {self.state.gpus[0].capacity_bytes / 1e9:.1f} GB "
            f"usable ({len(self.state.gpus)} GPUs)"
        )

    def _make_pool(self, unit: UnitKind) -> UnitPool | CompiledUnitPool:
        units = self.model.units
        position = units.index(unit)
        previous = units[position - 1] if position > 0 else None
        per_token = 4.0 if previous is None else self.model.activation_bytes_per_token(previous)
        hops = self.model.layers_of(unit)
        if self.calls is not None:
            return CompiledUnitPool(
                self.calls,
                unit,
                inbound_bytes_per_token=per_token * hops,
                hops=hops,
                batch_cap_tokens=self._unit_configs[unit].batch_cap_tokens,
            )
        gpu = self.state.gpus[0].spec
        assert self.sharing is not None
        return UnitPool(
            self.env,
            unit,
            self.sharing,
            lambda tp: self.timer(gpu, tp),
            self.link,
            inbound_bytes_per_token=per_token * hops,
            hops=hops,
            config=self.config,
            rng=self.rng,
            batch_cap_tokens=self._unit_configs[unit].batch_cap_tokens,
        )

    def _unit_counts_by_node(self, unit: UnitKind) -> dict[int, int]:
        counts: dict[int, int] = {}
        replicas = (
            [r for r in self._attention_replicas.values()]
            if unit is UnitKind.ATTENTION
            else self.pools[unit].replicas
        )
        for replica in replicas:
            node = self.state.gpus[replica.home_gpu].node
            counts[node] = counts.get(node, 0) + 1
        return counts

    def _place(
        self,
        unit: UnitKind,
        config: UnitDeployment,
        need: float,
        explicit: tuple[int, ...] | None,
        policy: Placement,
        exclude: frozenset[int] = frozenset(),
    ) -> tuple[int, ...] | None:
        if explicit is not None:
            if any(self.state.gpus[i].free_bytes + 1e-3 < need for i in explicit):
                return None
            return explicit
        affinity = self._colocation_affinity(unit) if policy is Placement.COLOCATE else None
        return self.state.find_group(
            config.tp,
            need,
            policy,
            unit_count_by_node=self._unit_counts_by_node(unit),
            affinity=affinity,
            exclude=exclude,
        )

    def _colocation_affinity(self, unit: UnitKind) -> dict[int, int]:
        """:func:`colocation_affinity` of the replicas in place (loading or serving; not draining)."""
        in_place = (ReplicaState.LOADING, ReplicaState.SERVING)
        homes = {
            other: [r.home_gpu for r in self.pools[other].replicas if r.state in in_place]
            for other in self.pools
        }
        homes[UnitKind.ATTENTION] = [
            r.home_gpu for r in self._attention_replicas.values() if r.state in in_place
        ]
        return colocation_affinity(unit, homes)

    def _add_pool_replica(
        self,
        unit: UnitKind,
        config: UnitDeployment,
        explicit: tuple[int, ...] | None,
        *,
        ready_now: bool,
        policy: Placement | None = None,
        exclude: frozenset[int] = frozenset(),
        on_ready: Callable[[], None] | None = None,
    ) -> bool:
        need = self.state.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
        group = self._place(unit, config, need, explicit, policy or config.placement, exclude)
        if group is None:
            return False
        now = self.env.now
        self.state.reserve(group, need, now)
        weights = self.model.weight_bytes(unit, config.tp)
        delay = 0.0 if ready_now else self.config.replica_load_time_s(weights, whole_instance=False)
        replica = Replica(
            replica_id=self._new_replica_id(),
            unit=unit,
            gpus=group,
            memory_bytes_per_gpu=need,
            batch_cap_tokens=config.batch_cap_tokens,
            ready_s=now + delay,
        )
        pool = self.pools[unit]
        pool.add_replica(replica)
        if ready_now:
            pool.replica_ready(replica)
        else:

            def ready(_event: simpy.Event) -> None:
                if replica.state is ReplicaState.LOADING:
                    pool.replica_ready(replica)
                    if on_ready is not None:
                        on_ready()

            self.env.timeout(delay).callbacks.append(ready)
        return True

    def _add_attention_replica(
        self,
        config: UnitDeployment,
        explicit: tuple[int, ...] | None,
        *,
        ready_now: bool,
        share_evenly: bool = False,
        policy: Placement | None = None,
        exclude: frozenset[int] = frozenset(),
        on_ready: Callable[[], None] | None = None,
    ) -> bool:
        tp = config.tp
        base = self.state.replica_bytes_per_gpu(UnitKind.ATTENTION, tp, config.batch_cap_tokens)
        kv_per_token = self.model.kv_bytes_per_token(tp)
        min_kv_tokens = max(self._max_request_tokens, self.config.kv_block_tokens * 16)
        group = self._place(
            UnitKind.ATTENTION,
            config,
            base + kv_per_token * min_kv_tokens,
            explicit,
            policy or config.placement,
            exclude,
        )
        if group is None:
            return False
        # at build time the KV share is settled once every attention replica is placed
        kv_tokens = (
            min_kv_tokens
            if share_evenly
            else min(
                self._added_attention_kv_tokens,
                int((min(self.state.gpus[i].free_bytes for i in group) - base) / kv_per_token),
            )
        )
        need = base + kv_tokens * kv_per_token
        now = self.env.now
        self.state.reserve(group, need, now)
        gpu = self.state.gpus[group[0]].spec
        replica = Replica(
            replica_id=self._new_replica_id(),
            unit=UnitKind.ATTENTION,
            gpus=group,
            memory_bytes_per_gpu=need,
            batch_cap_tokens=config.batch_cap_tokens,
            ready_s=now,
            kv_tokens=kv_tokens,
        )
        stream_kwargs = self._stream_kwargs(kv_tokens, config.batch_cap_tokens, gpu, tp)
        stream: AttentionReplicaStream
        if self.calls is not None:
            stream = CompiledPooledStream(
                len(self.streams),
                self,
                replica=replica,
                calls=self.calls,
                timer=self.timer(gpu, tp),
                **stream_kwargs,
            )
        else:
            assert self.sharing is not None
            path: list[UnitPool | None] = [
                None if u is UnitKind.ATTENTION else self._python_pool(u) for u in self.model.units
            ]
            stream = PooledStream(
                len(self.streams),
                self,
                replica=replica,
                path=path,
                timer=self.timer(gpu, tp),
                sharing=self.sharing,
                link=self.link,
                model=self.model,
                **stream_kwargs,
            )
        self.streams.append(stream)
        self._attention_replicas[stream] = replica
        if ready_now:
            replica.state = ReplicaState.SERVING
            stream.start_serving()
        else:
            delay = self.config.replica_load_time_s(0.0, whole_instance=False)
            replica.ready_s = now + delay

            def ready(_event: simpy.Event) -> None:
                if replica.state is ReplicaState.LOADING:
                    replica.state = ReplicaState.SERVING
                    stream.start_serving()
                    if on_ready is not None:
                        on_ready()

            self.env.timeout(delay).callbacks.append(ready)
        return True

    def _python_pool(self, unit: UnitKind) -> UnitPool:
        pool = self.pools[unit]
        assert isinstance(pool, UnitPool)
        return pool

    def _share_attention_memory(self) -> None:
        """Give every attention replica an even share of the memory left on its GPUs."""
        sharers: dict[int, int] = {}
        for replica in self._attention_replicas.values():
            for index in replica.gpus:
                sharers[index] = sharers.get(index, 0) + 1
        free = {index: self.state.gpus[index].free_bytes for index in sharers}
        for stream, replica in self._attention_replicas.items():
            extra_bytes = min(free[i] / sharers[i] for i in replica.gpus)
            kv_per_token = self.model.kv_bytes_per_token(replica.tp)
            extra_tokens = int(extra_bytes / kv_per_token)
            extra_blocks = extra_tokens // self.config.kv_block_tokens
            grow = extra_blocks * self.config.kv_block_tokens * kv_per_token
            self.state.grow(replica.gpus, grow)
            replica.memory_bytes_per_gpu += grow
            stream.total_blocks += extra_blocks
            stream.free_blocks += extra_blocks
            replica.kv_tokens = stream.kv_tokens
        self._added_attention_kv_tokens = min(
            (replica.kv_tokens for replica in self._attention_replicas.values()), default=0
        )

    # ------------------------------------------------------------------ arrivals and routing
    def _schedule_arrival(self, index: int) -> None:
        delay = max(0.0, self._arrival_s[index] - self.env.now)
        self.env.timeout(delay).callbacks.append(lambda _e: self._arrive(index))

    def _arrive(self, index: int) -> None:
        request = ActiveRequest(
            index,
            self._arrival_s[index],
            self._prompt[index],
            self._output[index],
            self.tbt.allocate(),
            self._patches[index],
        )
        self._arrived += 1
        self._active += 1
        self.metrics.interval.arrivals += 1
        self._route(request)
        if index + 1 < self._num_requests:
            self._schedule_arrival(index + 1)

    def _route(self, request: ActiveRequest, exclude: Stream | None = None) -> None:
        """Send ``request`` to the accepting stream with the least capacity-weighted work whose KV
        cache can hold it; reject it (counted, an SLO violation) when none can."""
        now = self.env.now
        work = request.remaining_work_tokens
        need = request.prompt + request.output
        best: Stream | None = None
        best_key = (True, math.inf)
        for stream in self.streams:
            if not stream.accepting or stream is exclude or not stream.fits(need):
                continue
            key = (not stream.serving, stream.load_score(work, now))
            if key < best_key:
                best, best_key = stream, key
        if best is None:
            self._reject(request)
        else:
            best.submit(request)

    def _reject(self, request: ActiveRequest) -> None:
        """No attention replica left can ever hold the request's KV (after scale-down): it leaves
        unserved, counted in :attr:`rejected_requests` and decided as an SLO violation."""
        self.rejected_requests += 1
        self._active -= 1
        self.metrics.reject(request, self.env.now)

    # ------------------------------------------------------------------ stream host callbacks
    def on_tokens(self, stream: Stream, prompt_tokens: int, output_tokens: int, preemptions: int) -> None:
        self.metrics.tokens(prompt_tokens, output_tokens, preemptions)

    def on_first_token(self, request: ActiveRequest, now_s: float) -> None:
        self.metrics.first_token(request, now_s)

    def on_complete(self, request: ActiveRequest, now_s: float) -> None:
        self._active -= 1
        self.metrics.complete(request, now_s, request.stream.stream_id if request.stream is not None else -1)

    def on_stream_drained(self, stream: Stream) -> bool:
        """Hand a draining stream's requests over (``migrate``) or wait until it is empty (``finish``)."""
        if self.config.attention_drain is AttentionDrain.FINISH and stream.num_requests:
            return False
        held = stream.release_requests()
        now = self.env.now
        for request in held:
            target = self._pick_target(request, stream)
            if target is None:
                self._reject(request)
            elif request.ctx and request.computed >= request.target:
                kv_bytes = request.ctx * self.model.kv_bytes_per_token(1)
                delay = self.link.time_s(self._stream_home(stream), self._stream_home(target), kv_bytes, 1)
                self.env.timeout(delay).callbacks.append(functools.partial(_adopt, target, request))
            else:
                request.ctx = request.computed = 0
                request.target = request.prompt + request.generated
                self._route(request, exclude=stream)
        if stream.active:
            stream.active = False
            stream.busy_s += now - stream.busy_since_s
        self._retire_stream(stream)
        return True

    def _pick_target(self, request: ActiveRequest, leaving: Stream) -> Stream | None:
        now = self.env.now
        candidates = [
            s
            for s in self.streams
            if s.accepting and s is not leaving and s.fits(request.prompt + request.output)
        ]
        if not candidates:
            return None
        return min(
            candidates, key=lambda s: (not s.serving, s.load_score(request.remaining_work_tokens, now))
        )

    def _stream_home(self, stream: Stream) -> int:
        if isinstance(stream, AttentionReplicaStream):
            return stream.replica.home_gpu
        return stream.instance.gpus[0]

    def _retire_stream(self, stream: Stream) -> None:
        now = self.env.now
        stream.serving = False
        self.streams.remove(stream)
        if isinstance(stream, AttentionReplicaStream):
            replica = self._attention_replicas.pop(stream)
            replica.state = ReplicaState.RELEASED
            self.state.release(replica.gpus, replica.memory_bytes_per_gpu, now)
            if isinstance(stream, CompiledPooledStream):
                stream.retire()
            return
        instance: _Instance = stream.instance
        instance.streams.remove(stream)
        if not instance.streams:
            instance.state = ReplicaState.RELEASED
            self.instances.remove(instance)
            self.state.release(instance.gpus, instance.bytes_per_gpu, now)

    # ------------------------------------------------------------------ control interface
    @property
    def slo(self) -> SLO:
        """The latency SLO deciding attainment (settable; applies to requests decided afterwards)."""
        return self._slo

    @slo.setter
    def slo(self, value: SLO) -> None:
        self._slo = value
        self.metrics.slo = value

    @property
    def now_s(self) -> float:
        return float(self.env.now)

    @property
    def finished(self) -> bool:
        return self._arrived == self._num_requests and self._active == 0

    @property
    def deployment(self) -> Deployment:
        gpus_per_node = self.cluster.nodes[0].gpus_per_node
        units = {}
        for unit, config in self._unit_configs.items():
            if self._granularity == "model":
                count = len(self.instances)
            elif unit is UnitKind.ATTENTION:
                count = sum(1 for s in self.streams if s.accepting)
            else:
                count = sum(1 for r in self.pools[unit].replicas if r.state is not ReplicaState.DRAINING)
            units[unit] = replace(config, replicas=count, gpus=None)
        return Deployment(
            model=self.model.name,
            gpu=self.state.gpus[0].spec.name,
            num_nodes=self.cluster.num_gpus // gpus_per_node,
            granularity=self._granularity,
            units=units,
            instances=len([i for i in self.instances if i.streams and i.streams[0].accepting]),
            tp=self._tp,
            pp=self._pp,
        )

    def apply(self, action: ScalingAction) -> ApplyReport:
        """Apply a scaling action now (a control boundary). Infeasible parts are repaired and counted."""
        report = ApplyReport()
        for unit, unit_action in action.units_in_apply_order():
            unit = UnitKind(unit)
            if unit not in self._unit_configs:
                report.repairs += 1
                report.messages.append(f"unit {unit.value!r} is not a unit of {self.model.name!r}; ignored")
                continue
            if unit_action.batch_cap_tokens is not None:
                self._set_batch_cap(unit, unit_action.batch_cap_tokens, report)
            if self._granularity == "operator":
                if unit_action.replica_delta:
                    self._scale_unit(unit, unit_action.replica_delta, unit_action.placement, report)
                if unit_action.move_replicas > 0:
                    self._move_unit_replicas(unit, unit_action.move_replicas, unit_action.placement, report)
            elif unit_action.replica_delta or unit_action.move_replicas:
                report.repairs += 1
                report.messages.append(
                    f"replica_delta / move_replicas for {unit.value!r} ignored: model-level deployments scale "
                    "by instance_delta"
                )
        if action.instance_delta:
            if self._granularity == "model":
                self._scale_instances(action.instance_delta, report)
            else:
                report.repairs += 1
                report.messages.append("instance_delta ignored: operator-level deployments scale per unit")
        self.metrics.note_gpus_powered(self.state.gpus_powered)
        return report

    def _set_batch_cap(self, unit: UnitKind, cap: int, report: ApplyReport) -> None:
        clipped = min(max(int(cap), 1), MAX_BATCH_CAP_TOKENS)
        if clipped != cap:
            report.repairs += 1
            report.messages.append(
                f"batch cap {cap} for {unit.value!r} clipped to {clipped} (1..{MAX_BATCH_CAP_TOKENS})"
            )
        self._unit_configs[unit] = replace(self._unit_configs[unit], batch_cap_tokens=clipped)
        if unit is UnitKind.ATTENTION:
            for stream in self.streams:
                stream.token_budget = clipped
        elif self._granularity == "operator":
            self.pools[unit].set_batch_cap(clipped)

    def _scale_unit(
        self, unit: UnitKind, delta: int, placement: Placement | None, report: ApplyReport
    ) -> None:
        config = self._unit_configs[unit]
        if delta > 0:
            added = 0
            for _ in range(delta):
                if unit is UnitKind.ATTENTION:
                    ok = self._add_attention_replica(config, None, ready_now=False, policy=placement)
                else:
                    ok = self._add_pool_replica(unit, config, None, ready_now=False, policy=placement)
                if not ok:
                    break
                added += 1
            if added < delta:
                report.repairs += 1
                report.messages.append(
                    f"{unit.value}: asked +{delta} replicas, added {added} (no GPU with "
                    f"{self.state.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens) / 1e9:.2f} GB free)"
                )
            if added:
                report.replicas_added[unit] = added
            return
        removed = self._remove_unit_replicas(unit, -delta)
        if removed < -delta:
            report.repairs += 1
            report.messages.append(
                f"{unit.value}: asked {delta} replicas, removed {removed} (keeps at least one)"
            )
        if removed:
            report.replicas_removed[unit] = removed

    def _drain_stream(self, stream: Stream) -> None:
        """Stop routing to ``stream``; it hands over or finishes its requests at its next iteration end."""
        stream.accepting = False
        stream.draining = True
        if not stream.serving:
            if isinstance(stream, AttentionReplicaStream):
                self._attention_replicas[stream].state = ReplicaState.RELEASED
            self.on_stream_drained(stream)
        elif not stream.active:
            self.on_stream_drained(stream)
        else:
            stream.on_new_work()

    def _drain_pool_replica(self, pool: UnitPool | CompiledUnitPool, replica: Replica) -> None:
        pool.drain(replica, lambda r: self.state.release(r.gpus, r.memory_bytes_per_gpu, self.env.now))

    def _leaving_per_gpu(self) -> dict[int, int]:
        """Per GPU, replicas draining there (streams no longer accepting, pool replicas draining)."""
        leaving: dict[int, int] = {}
        groups = [
            self._attention_replicas[s].gpus
            for s in self.streams
            if not s.accepting and s in self._attention_replicas
        ]
        for pool in self.pools.values():
            groups.extend(r.gpus for r in pool.replicas if r.state is ReplicaState.DRAINING)
        for group in groups:
            for gpu in group:
                leaving[gpu] = leaving.get(gpu, 0) + 1
        return leaving

    def _remove_unit_replicas(self, unit: UnitKind, count: int) -> int:
        leaving = self._leaving_per_gpu()
        if unit is UnitKind.ATTENTION:
            live = [s for s in self.streams if s.accepting]
            # loading first, then the one whose GPU empties soonest (ClusterState.release_order), then the least loaded
            live.sort(
                key=lambda s: (
                    s.serving,
                    self.state.release_order(self._attention_replicas[s].gpus, leaving),
                    s.pending_work_tokens,
                )
            )
            removable = live[: max(0, min(count, len(live) - 1))]
            for stream in removable:
                self._drain_stream(stream)
            return len(removable)
        pool = self.pools[unit]
        live_replicas = [r for r in pool.replicas if r.state in (ReplicaState.LOADING, ReplicaState.SERVING)]
        live_replicas.sort(
            key=lambda r: (
                r.state is ReplicaState.SERVING,
                self.state.release_order(r.gpus, leaving),
                pool.is_busy(r),
            )
        )
        removable_replicas = live_replicas[: max(0, min(count, len(live_replicas) - 1))]
        for replica in removable_replicas:
            self._drain_pool_replica(pool, replica)
        return len(removable_replicas)

    def _move_unit_replicas(
        self, unit: UnitKind, count: int, placement: Placement | None, report: ApplyReport
    ) -> None:
        """Make-before-break moves: a new replica off the old one's GPUs; the old drains once it serves."""
        config = self._unit_configs[unit]
        crowding = {gpu.index: gpu.residents for gpu in self.state.gpus}
        moved = 0
        if unit is UnitKind.ATTENTION:
            streams = [
                s for s in self.streams if s.accepting and s.serving and isinstance(s, AttentionReplicaStream)
            ]
            streams.sort(key=lambda s: -max(crowding[i] for i in s.replica.gpus))
            for stream in streams[:count]:
                assert isinstance(stream, AttentionReplicaStream)
                ok = self._add_attention_replica(
                    config,
                    None,
                    ready_now=False,
                    policy=placement,
                    exclude=frozenset(stream.replica.gpus),
                    on_ready=functools.partial(self._drain_if_serving, stream),
                )
                moved += ok
        else:
            pool = self.pools[unit]
            replicas = [r for r in pool.replicas if r.state is ReplicaState.SERVING]
            replicas.sort(key=lambda r: -max(crowding[i] for i in r.gpus))
            for replica in replicas[:count]:
                ok = self._add_pool_replica(
                    unit,
                    config,
                    None,
                    ready_now=False,
                    policy=placement,
                    exclude=frozenset(replica.gpus),
                    on_ready=functools.partial(self._drain_pool_replica_if_serving, pool, replica),
                )
                moved += ok
        if moved < count:
            report.repairs += 1
            report.messages.append(
                f"{unit.value}: asked to move {count} replicas, moving {moved} (serving replicas or room elsewhere lacking)"
            )
        if moved:
            report.replicas_added[unit] = report.replicas_added.get(unit, 0) + moved
            report.replicas_removed[unit] = report.replicas_removed.get(unit, 0) + moved

    def _drain_if_serving(self, stream: Stream) -> None:
        if stream.accepting:
            self._drain_stream(stream)

    def _drain_pool_replica_if_serving(self, pool: UnitPool | CompiledUnitPool, replica: Replica) -> None:
        if replica.state is ReplicaState.SERVING:
            self._drain_pool_replica(pool, replica)

    def _scale_instances(self, delta: int, report: ApplyReport) -> None:
        if delta > 0:
            added = 0
            for _ in range(delta):
                if self._add_instance(ready_now=False) is None:
                    break
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
        live = [i for i in self.instances if i.streams and i.streams[0].accepting]
        live.sort(
            key=lambda i: (i.state is ReplicaState.SERVING, sum(s.pending_work_tokens for s in i.streams))
        )
        removable = live[: max(0, min(-delta, len(live) - 1))]
        for instance in removable:
            for stream in list(instance.streams):
                self._drain_stream(stream)
        if len(removable) < -delta:
            report.repairs += 1
            report.messages.append(f"instances: asked {delta}, removed {len(removable)} (keeps at least one)")
        if removable:
            for unit in self._unit_configs:
                report.replicas_removed[unit] = len(removable)

    def advance(self, dt_s: float) -> IntervalMetrics:
        """Run ``dt_s`` simulated seconds; events at exactly the boundary belong to the next interval."""
        if not dt_s > 0:
            raise ValueError(f"advance needs dt_s > 0, got {dt_s}")
        end = self.env.now + dt_s
        self.env.run(until=end)
        for stream in self.streams:
            if isinstance(stream, InstanceStream):
                stream.commit_until(end)
        self.metrics.decide_deadlines(self._waiting_requests(), end)
        metrics = self._close_interval(end)
        self._last_interval = metrics
        return metrics

    def run_to_completion(
        self, interval_s: float = 60.0, max_time_s: float | None = None
    ) -> list[IntervalMetrics]:
        """Advance in ``interval_s`` steps until every request finished (or ``max_time_s``).

        :raises RuntimeError: if requests remain but nothing is scheduled any more (a deadlock would
            otherwise loop forever; it indicates an engine bug).
        """
        out = []
        while not self.finished and (max_time_s is None or self.now_s < max_time_s):
            if self.env.peek() == math.inf:
                raise RuntimeError(
                    f"simulation stalled at {self.now_s:.1f} s with {self._active} requests unfinished "
                    "and no event scheduled"
                )
            out.append(self.advance(interval_s))
        return out

    def _waiting_requests(self) -> Iterable[ActiveRequest]:
        """Requests without a first token (queued, being prefilled, or handed over)."""
        for stream in self.streams:
            yield from stream.waiting
            yield from stream.prefilling
            yield from stream.adopted

    def _close_interval(self, end_s: float) -> IntervalMetrics:
        duration = end_s - self.metrics.interval_start_s
        # an instance's GPUs are busy for its streams' kernel time (iterations minus host overhead), and
        # a pipeline stage works on one micro-batch stream's iteration for 1/pp of it
        for instance in self.instances:
            kernel_s = compute_s = 0.0
            for stream in instance.streams:
                kernel_s += max(0.0, stream.take_busy(end_s) - stream.take_overhead_s()) / self._pp
                compute_s += stream.compute_bound_s / self._pp
                stream.compute_bound_s = 0.0
            for index in instance.gpus:
                gpu = self.state.gpus[index]
                gpu.busy_s += min(duration, kernel_s)
                gpu.compute_bound_s += compute_s
        gpu_rows = self.state.take_interval(end_s)
        units = self._unit_metrics(duration, end_s)
        return self.metrics.close_interval(
            end_s,
            gpu_rows,
            units,
            running=sum(s.num_running for s in self.streams),
            waiting=sum(len(s.waiting) for s in self.streams),
            gpus_powered=self.state.gpus_powered,
        )

    def _unit_metrics(self, duration: float, end_s: float) -> dict[UnitKind, UnitIntervalMetrics]:
        units: dict[UnitKind, UnitIntervalMetrics] = {}
        streams = self.streams
        waiting_token_s = sum(s.take_waiting_token_s() for s in streams)
        admissions = sum(s.admissions for s in streams)
        admission_wait_s = sum(s.admission_wait_s for s in streams) / admissions if admissions else 0.0
        for stream in streams:
            stream.admissions = 0
            stream.admission_wait_s = 0.0
        if self._granularity == "model":
            serving = sum(
                1 for i in self.instances if i.state is ReplicaState.SERVING and i.streams[0].accepting
            )
            pending = sum(1 for i in self.instances if i.state is ReplicaState.LOADING)
            draining = sum(1 for i in self.instances if i.streams and not i.streams[0].accepting)
            busy: dict[UnitKind, float] = {}
            iterations = tokens = 0
            for stream in streams:
                assert isinstance(stream, InstanceStream)
                for unit, seconds in stream.take_unit_busy().items():
                    busy[unit] = busy.get(unit, 0.0) + seconds
                iterations += stream.iterations
                tokens += stream.tokens_scheduled
                stream.iterations = stream.tokens_scheduled = 0
                stream.take_busy(end_s)
            capacity = max(1, serving) * self._pp * duration
            budget = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
            for unit, config in self._unit_configs.items():
                units[unit] = UnitIntervalMetrics(
                    replicas=serving,
                    pending_replicas=pending,
                    draining_replicas=draining,
                    utilisation=min(1.0, busy.get(unit, 0.0) / capacity) if duration > 0 else 0.0,
                    queue_tokens=waiting_token_s / duration
                    if unit is UnitKind.ATTENTION and duration > 0
                    else 0.0,
                    batch_fill=min(1.0, tokens / (iterations * budget)) if iterations else 0.0,
                    mean_wait_s=admission_wait_s if unit is UnitKind.ATTENTION else 0.0,
                    mean_service_s=busy.get(unit, 0.0) / iterations if iterations else 0.0,
                    batch_cap_tokens=config.batch_cap_tokens,
                )
            return units
        for unit, pool in self.pools.items():
            stats, busy_s = pool.take_interval(end_s)
            serving = pool.count(ReplicaState.SERVING)
            cap = self._unit_configs[unit].batch_cap_tokens
            units[unit] = UnitIntervalMetrics(
                replicas=serving,
                pending_replicas=pool.count(ReplicaState.LOADING),
                draining_replicas=pool.count(ReplicaState.DRAINING),
                utilisation=min(1.0, busy_s / (serving * duration)) if serving and duration > 0 else 0.0,
                queue_tokens=stats.queue_token_s / duration if duration > 0 else 0.0,
                batch_fill=min(1.0, stats.tokens / (stats.calls * cap)) if stats.calls else 0.0,
                mean_wait_s=stats.wait_s / stats.jobs if stats.jobs else 0.0,
                mean_service_s=stats.service_s / stats.calls if stats.calls else 0.0,
                batch_cap_tokens=cap,
            )
        attention_busy = 0.0
        calls = tokens = 0
        service = 0.0
        for stream in streams:
            assert isinstance(stream, AttentionReplicaStream)
            stats = stream.take_attention_stats()
            calls += stats.calls
            tokens += stats.tokens
            service += stats.service_s
            attention_busy += stream.take_replica_busy(end_s)
            stream.take_busy(end_s)
        serving_streams = sum(1 for s in streams if s.serving and s.accepting)
        cap = self._unit_configs[UnitKind.ATTENTION].batch_cap_tokens
        units[UnitKind.ATTENTION] = UnitIntervalMetrics(
            replicas=serving_streams,
            pending_replicas=sum(1 for s in streams if not s.serving and s.accepting),
            draining_replicas=sum(1 for s in streams if not s.accepting),
            utilisation=min(1.0, attention_busy / (serving_streams * duration))
            if serving_streams and duration > 0
            else 0.0,
            queue_tokens=waiting_token_s / duration if duration > 0 else 0.0,
            batch_fill=min(1.0, tokens / (calls * cap)) if calls else 0.0,
            mean_wait_s=admission_wait_s,
            mean_service_s=service / calls if calls else 0.0,
            batch_cap_tokens=cap,
        )
        return units

    def memory_used_bytes(self) -> list[float]:
        return self.state.memory_used_bytes()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time_s=self.now_s,
            deployment=self.deployment,
            gpus_powered=self.state.gpus_powered,
            gpu_memory_used_bytes=self.memory_used_bytes(),
            last_interval=self._last_interval,
        )

    @property
    def gpu_utilisation(self) -> list[float]:
        """Per global GPU index, busy fraction over the last interval (0 for released GPUs)."""
        return self.metrics.gpu_utilisation or [0.0] * self.cluster.num_gpus

    def summary(self) -> RunSummary:
        """Whole-run figures up to now (percentiles exact from records when kept, else 1 % sketches)."""
        return self.metrics.summary(self.now_s, self._arrived)
