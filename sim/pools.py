"""Stateless scaling units as shared replica pools, and the stream that walks them.

A :class:`UnitPool` holds the replicas of one stateless unit (``embed``, ``norm``, ``qkv_proj``,
``o_proj``, ``ffn``/``moe``, ``lm_head``, ``vision_encoder``) and one FIFO queue. A free replica
takes queued jobs, from any streams, up to its batch cap in tokens and serves them in one call
(a job larger than the cap is served alone in back-to-back cap-sized calls). When the head job's
source GPU has an idle replica, that one serves (keeps co-located chains local).

One job serves a unit for **all its layers** (the service time is the cost model's all-layer time);
the per-layer ping-pong between units is not simulated event by event. Transfers are still counted
per layer: a job whose input sits on another GPU pays ``layers x link latency + bytes / bandwidth``
(bytes = activation bytes per token and layer of the previous unit x tokens x layers), added to the
call (the call waits for its slowest input).

Co-located busy replicas share their GPU (:class:`opscale.sim.sharing.GpuSharing`, processor
sharing of kernel time); the inbound transfer is a fixed part of a call that sharing does not stretch.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np
import simpy

from opscale.sim.cluster import Replica, ReplicaState
from opscale.sim.config import ServiceTimeDistribution, SimConfig
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import ModelSpec, UnitKind
from opscale.sim.sharing import GpuSharing
from opscale.sim.streams import Batch, IterationTimer, Stream, StreamHost

__all__ = [
    "AttentionReplicaStream",
    "Link",
    "PoolClient",
    "PooledStream",
    "ReplicaLifecycle",
    "UnitPool",
    "UnitStats",
]


class PoolClient(Protocol):
    """A job owner: one job in flight at a time (a stream's iteration at one unit)."""

    job_tokens: int
    job_source_gpu: int
    job_enqueued_s: float

    def unit_done(self, now_s: float, replica: Replica) -> None: ...


@dataclass
class UnitStats:
    """Per-interval statistics of a pool (reset at each boundary)."""

    calls: int = 0
    tokens: int = 0
    wait_s: float = 0.0
    jobs: int = 0
    service_s: float = 0.0
    queue_token_s: float = 0.0


class Link:
    """Transfer times between GPUs, per unit boundary (memoised per GPU pair)."""

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        self._pairs: dict[tuple[int, int], tuple[float, float]] = {}

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """Per GPU pair ``(latency_s, bandwidth_bytes_per_s)`` of :meth:`time_s`'s link: the node's link
        inside a node, the interconnect across nodes (the diagonal, never read: 0 and infinite)."""
        spec = self.cluster
        node_of = np.array([spec.node_of(gpu) for gpu in range(spec.num_gpus)])
        latency = np.full((node_of.size, node_of.size), spec.interconnect.latency_s)
        bandwidth = np.full((node_of.size, node_of.size), spec.interconnect.bandwidth_bytes_per_s)
        for index, node in enumerate(spec.nodes):
            block = np.ix_(node_of == index, node_of == index)
            latency[block] = node.link.latency_s
            bandwidth[block] = node.link.bandwidth_bytes_per_s
        np.fill_diagonal(latency, 0.0)
        np.fill_diagonal(bandwidth, np.inf)
        return latency, bandwidth

    def time_s(self, src: int, dst: int, num_bytes: float, hops: int) -> float:
        """``hops`` transfers totalling ``num_bytes`` from GPU ``src`` to ``dst`` (0 on the same GPU)."""
        if src == dst or num_bytes <= 0:
            return 0.0
        pair = self._pairs.get((src, dst))
        if pair is None:
            link = self.cluster.link_between(src, dst)
            pair = (0.0, float("inf")) if link is None else (link.latency_s, link.bandwidth_bytes_per_s)
            self._pairs[(src, dst)] = pair
        return hops * pair[0] + num_bytes / pair[1]


class ReplicaLifecycle:
    """A unit pool's replicas: draining, release and batch caps, the rules :class:`UnitPool` and
    :class:`opscale.sim.compiled_pools.CompiledUnitPool` share. Subclasses keep the idle list and the
    busy flags, which is where they differ."""

    unit: UnitKind
    replicas: list[Replica]
    batch_cap_tokens: int

    def drain(self, replica: Replica, on_released: Callable[[Replica], None]) -> None:
        """Stop giving ``replica`` work; ``on_released`` runs once it is idle (at once if it is)."""
        was_loading = replica.state is ReplicaState.LOADING
        replica.state = ReplicaState.DRAINING
        self._drop_idle(replica)
        if not self.is_busy(replica) or was_loading:
            self.release(replica, on_released)
        else:
            self._release_when_done(replica, on_released)

    def release(self, replica: Replica, on_released: Callable[[Replica], None]) -> None:
        """``replica`` leaves the pool; ``on_released`` runs."""
        replica.state = ReplicaState.RELEASED
        self.replicas.remove(replica)
        self._forget(replica)
        on_released(replica)

    def count(self, state: ReplicaState) -> int:
        return sum(1 for r in self.replicas if r.state is state)

    def set_batch_cap(self, cap: int) -> None:
        self.batch_cap_tokens = cap
        for replica in self.replicas:
            replica.batch_cap_tokens = cap

    def is_busy(self, replica: Replica) -> bool:
        raise NotImplementedError

    def _drop_idle(self, replica: Replica) -> None:
        """Take a draining ``replica`` off the idle list, if it is there."""
        raise NotImplementedError

    def _release_when_done(self, replica: Replica, on_released: Callable[[Replica], None]) -> None:
        """Release a draining ``replica`` when its running call ends."""
        raise NotImplementedError

    def _forget(self, replica: Replica) -> None:
        """Drop what the pool keeps of a released replica beyond its list entry."""


class UnitPool(ReplicaLifecycle):
    """Replicas of one stateless unit with a shared queue.

    :param env: the SimPy environment.
    :param unit: the unit.
    :param cluster: GPU state (busy accounting and contention).
    :param timers: TP degree -> memoised kernel times.
    :param link: transfer times.
    :param inbound_bytes_per_token: bytes per token (all layers) entering this unit from the previous one.
    :param hops: transfers per pass (the unit's layer count).
    :param config: engine constants.
    :param rng: seeded generator (exponential service only).
    :param service_time_s: optional override ``(tokens, replica) -> seconds`` (closed-form tests).
    """

    def __init__(
        self,
        env: simpy.Environment,
        unit: UnitKind,
        sharing: GpuSharing,
        timers: Callable[[int], IterationTimer],
        link: Link,
        *,
        inbound_bytes_per_token: float,
        hops: int,
        config: SimConfig,
        rng: np.random.Generator,
        batch_cap_tokens: int,
        service_time_s: Callable[[int, Replica], float] | None = None,
    ) -> None:
        self.env = env
        self.unit = unit
        self.sharing = sharing
        self.timers = timers
        self.link = link
        self.inbound_bytes_per_token = inbound_bytes_per_token
        self.hops = hops
        self.config = config
        self.rng = rng
        self.batch_cap_tokens = batch_cap_tokens
        self.service_time_s = service_time_s
        self.replicas: list[Replica] = []
        self.idle: list[Replica] = []
        self.queue: deque[PoolClient] = deque()
        self.queued_tokens = 0
        self.stats = UnitStats()
        self._queue_changed_s = 0.0
        self._exponential = config.service_time_distribution is ServiceTimeDistribution.EXPONENTIAL
        self._transfer_lines: dict[tuple[int, int], tuple[float, float]] = {}
        self._timer_by_tp: dict[int, IterationTimer] = {}
        self._fast: dict[int, tuple[list[float], int]] = {}

    # ------------------------------------------------------------------ replicas
    def add_replica(self, replica: Replica) -> None:
        """Track ``replica``; it serves once :meth:`replica_ready` is called."""
        replica.on_call_done = functools.partial(self._done, replica)
        self.replicas.append(replica)

    def replica_ready(self, replica: Replica) -> None:
        replica.state = ReplicaState.SERVING
        self.idle.append(replica)
        self.dispatch()

    def is_busy(self, replica: Replica) -> bool:
        return replica.busy

    def _drop_idle(self, replica: Replica) -> None:
        if replica in self.idle:
            self.idle.remove(replica)

    def _release_when_done(self, replica: Replica, on_released: Callable[[Replica], None]) -> None:
        replica.on_released = on_released

    # ------------------------------------------------------------------ work
    def _note_queue(self) -> None:
        now = self.env.now
        self.stats.queue_token_s += self.queued_tokens * (now - self._queue_changed_s)
        self._queue_changed_s = now

    def submit(self, client: PoolClient) -> None:
        """Queue one job and start it if a replica is free."""
        now = self.env.now
        client.job_enqueued_s = now
        if not self.queue and self.idle:
            # fast path: nothing queued, a replica is free (the queue integral does not change)
            idle = self.idle
            source = client.job_source_gpu
            replica = idle[-1]
            for candidate in idle:
                if candidate.home_gpu == source:
                    replica = candidate
                    break
            idle.remove(replica)
            self._start(replica, [client], client.job_tokens)
            return
        self._note_queue()
        self.queue.append(client)
        self.queued_tokens += client.job_tokens
        if self.idle:
            self.dispatch()

    def dispatch(self) -> None:
        """Start calls while jobs wait and replicas are free."""
        queue, idle = self.queue, self.idle
        while queue and idle:
            self._note_queue()
            source = queue[0].job_source_gpu
            replica = idle[-1]
            for candidate in idle:
                if candidate.home_gpu == source:
                    replica = candidate
                    break
            idle.remove(replica)
            cap = replica.batch_cap_tokens
            jobs = [queue.popleft()]
            tokens = jobs[0].job_tokens
            while queue and tokens + queue[0].job_tokens <= cap:
                job = queue.popleft()
                jobs.append(job)
                tokens += job.job_tokens
            self.queued_tokens -= tokens
            self._start(replica, jobs, tokens)

    def _timer(self, tp: int) -> IterationTimer:
        timer = self._timer_by_tp.get(tp)
        if timer is None:
            timer = self.timers(tp)
            self._timer_by_tp[tp] = timer
        return timer

    def _kernel_s(self, tokens: int, replica: Replica) -> float:
        if self.service_time_s is not None:
            return self.service_time_s(tokens, replica)
        timer = self._timer(replica.tp)
        cap = replica.batch_cap_tokens
        if tokens <= cap:
            return timer.unit_s(self.unit, tokens)
        full, rest = divmod(tokens, cap)
        return full * timer.unit_s(self.unit, cap) + timer.unit_s(self.unit, rest)

    def _compute_bound_from(self, tp: int) -> int:
        """:meth:`IterationTimer.compute_bound_from` of the unit at ``tp``."""
        return self._timer(tp).compute_bound_from(self.unit)

    def _transfer_line(self, source: int, home: int) -> tuple[float, float]:
        """``(fixed_s, per_token_s)`` of moving one job's input from ``source`` to ``home``."""
        key = (source, home)
        line = self._transfer_lines.get(key)
        if line is None:
            per_token = self.inbound_bytes_per_token
            fixed = self.link.time_s(source, home, per_token, self.hops) - self.link.time_s(
                source, home, per_token, 0
            )
            slope = self.link.time_s(source, home, per_token, 0)
            line = (fixed, slope)
            self._transfer_lines[key] = line
        return line

    def _fast_table(self, tp: int) -> tuple[list[float], int]:
        """(time by token count, compute-bound threshold) at ``tp``, for the hot path."""
        entry = self._fast.get(tp)
        if entry is None:
            timer = self._timer(tp)
            timer.unit_s(self.unit, 1)  # builds the table
            entry = (timer.table(self.unit), self._compute_bound_from(tp))
            self._fast[tp] = entry
        return entry

    def _start(self, replica: Replica, jobs: list[PoolClient], tokens: int) -> None:
        now = self.env.now
        if self.service_time_s is None:
            tp = replica.tp
            entry = self._fast.get(tp)
            if entry is None:
                entry = self._fast_table(tp)
            table, threshold = entry
            if tokens <= replica.batch_cap_tokens and tokens < len(table):
                kernel = table[tokens]
            else:
                kernel = self._kernel_s(tokens, replica)
        else:
            threshold = 1 << 62
            kernel = self.service_time_s(tokens, replica)
        if self._exponential:
            kernel = float(self.rng.exponential(kernel))
        transfer = 0.0
        stats = self.stats
        home = replica.home_gpu
        lines = self._transfer_lines
        for job in jobs:
            stats.wait_s += now - job.job_enqueued_s
            source = job.job_source_gpu
            if source != home:
                line = lines.get((source, home))
                if line is None:
                    line = self._transfer_line(source, home)
                t = line[0] + line[1] * job.job_tokens
                if t > transfer:
                    transfer = t
        stats.calls += 1
        stats.jobs += len(jobs)
        stats.tokens += tokens
        replica.busy = True
        replica.busy_since_s = now
        replica.call_jobs = jobs
        on_done = replica.on_call_done
        assert on_done is not None, "replica not added to a pool"
        self.sharing.start(
            replica.gpus,
            kernel,
            on_done,
            fixed_s=transfer,
            compute_bound_s=kernel if tokens >= threshold else 0.0,
        )

    def _done(self, replica: Replica) -> None:
        now = self.env.now
        jobs = replica.call_jobs  # (a job's continuation may start the replica's next call)
        replica.busy = False
        busy_s = now - replica.busy_since_s
        self.stats.service_s += busy_s
        replica.busy_s += busy_s
        if replica.state is ReplicaState.DRAINING and replica.on_released is not None:
            self.release(replica, replica.on_released)
        else:
            self.idle.append(replica)
        for job in jobs:
            job.unit_done(now, replica)
        if self.queue and self.idle:
            self.dispatch()

    def take_interval(self, now_s: float) -> tuple[UnitStats, float]:
        """(stats, busy replica-seconds) since the previous call; resets them."""
        self._note_queue()
        busy = 0.0
        for replica in self.replicas:
            if replica.busy:
                replica.busy_s += now_s - replica.busy_since_s
                replica.busy_since_s = now_s
            busy += replica.busy_s
            replica.busy_s = 0.0
        stats, self.stats = self.stats, UnitStats()
        return stats, busy


class _TokensOf(Enum):
    """What a path step's job size is: the iteration's tokens, its sampled sequences (LM head), its
    new image patches (vision encoder), or the attention replica's own step."""

    BATCH = "batch"
    SEQUENCES = "sequences"
    VISION_PATCHES = "vision-patches"
    ATTENTION = "attention"


def _tokens_of(pool: UnitPool | None) -> _TokensOf:
    if pool is None:
        return _TokensOf.ATTENTION
    if pool.unit is UnitKind.LM_HEAD:
        return _TokensOf.SEQUENCES
    if pool.unit is UnitKind.VISION_ENCODER:
        return _TokensOf.VISION_PATCHES
    return _TokensOf.BATCH


class AttentionReplicaStream(Stream):
    """An operator-level attention replica: each iteration visits the unit pools in model order and
    runs attention on its own replica. This base class builds the iterations; subclasses walk the
    path (:class:`PooledStream` in Python, :class:`opscale.sim.compiled_pools.CompiledPooledStream`
    compiled) and keep the attention replica's statistics."""

    def __init__(self, stream_id: int, host: StreamHost, *, replica: Replica, **kwargs: Any) -> None:
        super().__init__(stream_id, host, **kwargs)
        self.replica = replica
        self._batch: Batch | None = None
        self._sequences = 0
        self._batch_tokens = 0

    def _next_iteration(self) -> None:
        if not self._may_run():
            return
        batch = self._next_batch()
        if batch is None:
            return
        self._batch = batch
        self.iteration_start_s = self.env.now
        self._sequences = len(batch.decodes) + len(batch.chunks)
        tokens = batch.num_tokens
        self._batch_tokens = tokens
        self.tokens_scheduled += tokens
        self._walk(batch)

    def _walk(self, batch: Batch) -> None:
        """Send the iteration along the path; :meth:`_end_iteration` once the last unit is done."""
        raise NotImplementedError

    def _end_iteration(self) -> None:
        batch = self._batch
        assert batch is not None
        self._batch = None
        self.finish(batch, self.env.now)
        self._next_iteration()

    def take_attention_stats(self) -> UnitStats:
        """The attention replica's call statistics since the previous call (reset)."""
        raise NotImplementedError

    def take_replica_busy(self, now_s: float) -> float:
        """The attention replica's busy seconds since the previous call (reset)."""
        raise NotImplementedError


class PooledStream(AttentionReplicaStream):
    """:class:`AttentionReplicaStream` walking its path in Python: the attention kernels are shared with
    co-located calls (the iteration's engine overhead and the inbound QKV transfer as a fixed part). The
    LM head serves one token per sequence sampled (decodes and finished prefills); the vision encoder
    is visited only by iterations that start a request with image patches."""

    def __init__(
        self,
        stream_id: int,
        host: StreamHost,
        *,
        replica: Replica,
        path: list[UnitPool | None],
        timer: IterationTimer,
        sharing: GpuSharing,
        link: Link,
        model: ModelSpec,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream_id, host, replica=replica, **kwargs)
        # per step: the pool (None: attention on this replica) and which token count its job carries
        self._steps: list[tuple[UnitPool | None, _TokensOf]] = [(pool, _tokens_of(pool)) for pool in path]
        self.timer = timer
        self.sharing = sharing
        self.link = link
        self.qkv_bytes_per_token = model.activation_bytes_per_token(UnitKind.QKV_PROJ) * model.num_layers
        self.layers = model.num_layers
        self.job_tokens = 0
        self.job_source_gpu = replica.home_gpu
        self.job_enqueued_s = 0.0
        self._step = 0
        self.attention_stats = UnitStats()

    def _walk(self, batch: Batch) -> None:
        self.job_tokens = self._batch_tokens
        self.job_source_gpu = self.replica.home_gpu
        self._step = 0
        self._advance()

    def take_attention_stats(self) -> UnitStats:
        stats, self.attention_stats = self.attention_stats, UnitStats()
        return stats

    def take_replica_busy(self, now_s: float) -> float:
        replica = self.replica
        if replica.busy:
            replica.busy_s += now_s - replica.busy_since_s
            replica.busy_since_s = now_s
        busy, replica.busy_s = replica.busy_s, 0.0
        return busy

    def _advance(self) -> None:
        """Submit the iteration's job to the next unit on the path (or run attention, or finish)."""
        steps = self._steps
        step = self._step
        while step < len(steps):
            pool, tokens_of = steps[step]
            if tokens_of is _TokensOf.BATCH:
                tokens = self._batch_tokens
            elif tokens_of is _TokensOf.SEQUENCES:
                tokens = self._sequences
            elif tokens_of is _TokensOf.ATTENTION:
                self._step = step
                self._run_attention()
                return
            else:
                # only requests starting their prefill bring image patches; otherwise skip the encoder
                batch = self._batch
                assert batch is not None
                tokens = batch.vision_patches
                if not tokens:
                    step += 1
                    continue
            self._step = step
            self.job_tokens = tokens
            assert pool is not None
            pool.submit(self)
            return
        self._end_iteration()

    def _run_attention(self) -> None:
        batch = self._batch
        assert batch is not None
        now = self.env.now
        replica = self.replica
        kernel = self.timer.attention_s(batch)
        host_s = self.overhead.iteration_s(self.overhead_ranks, self._sequences)
        transfer = self.link.time_s(
            self.job_source_gpu, replica.home_gpu, self.qkv_bytes_per_token * self._batch_tokens, self.layers
        )
        stats = self.attention_stats
        stats.calls += 1
        stats.jobs += 1
        stats.tokens += self._batch_tokens
        replica.busy = True
        replica.busy_since_s = now
        # the host overhead and the inbound transfer do not occupy the GPU
        self.sharing.start(
            replica.gpus,
            kernel,
            self._attention_done,
            fixed_s=host_s + transfer,
            compute_bound_s=kernel if batch.chunks else 0.0,
        )

    def _attention_done(self) -> None:
        now = self.env.now
        replica = self.replica
        replica.busy = False
        self.attention_stats.service_s += now - replica.busy_since_s
        replica.busy_s += now - replica.busy_since_s
        self.job_source_gpu = replica.home_gpu
        self._step += 1
        self._advance()

    def unit_done(self, now_s: float, replica: Replica) -> None:
        self.job_source_gpu = replica.home_gpu
        self._step += 1
        self._advance()
