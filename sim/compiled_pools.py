"""Unit pools and pooled streams on the compiled call loop (:mod:`opscale.sim.call_kernel`).

The operator-level engine runs its calls here unless told otherwise (``SimConfig.compiled_calls``) or the
service time is exponential (a numpy draw per call, which stays in Python). The classes mirror the
Python ones they stand in for, and results are bitwise the same:

* :class:`CompiledCalls` owns the compiled state (replica, pool, stream and GPU rows), grows it, and
  runs the loop from :class:`CallEnvironment`, a SimPy environment whose ``step`` first lets the loop
  process the calls ending before SimPy's next event;
* :class:`CompiledUnitPool` has :class:`~opscale.sim.pools.UnitPool`'s interface;
* :class:`CompiledPooledStream` is a :class:`~opscale.sim.pools.AttentionReplicaStream` whose iterations
  walk their path in compiled code; Python builds each batch and ends each iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import simpy

from opscale.sim import call_kernel as kernel
from opscale.sim.call_kernel import CallArrays
from opscale.sim.cluster import ClusterState, Replica, ReplicaState
from opscale.sim.config import ContentionModel, SimConfig
from opscale.sim.models import ModelSpec, UnitKind
from opscale.sim.pools import AttentionReplicaStream, ReplicaLifecycle, UnitStats
from opscale.sim.streams import Batch, IterationTimer, StreamHost

__all__ = ["CallEnvironment", "CompiledCalls", "CompiledPooledStream", "CompiledUnitPool"]

_T = TypeVar("_T")
#: :func:`call_kernel.run`'s arguments when no iteration starts first
_NO_START = (-1, 0, 0, 0, False, 0.0, 0.0)


def _take_slot(slots: list[_T | None], free: list[int], item: _T) -> int:
    """Put ``item`` in a freed slot if there is one, else in a new one at the end; its index."""
    if free:
        slot = free.pop()
        slots[slot] = item
        return slot
    slots.append(item)
    return len(slots) - 1


class _EventIds:
    """SimPy's event-id counter, kept in the compiled state so both queues draw from one sequence."""

    __slots__ = ("ints",)

    def __init__(self, ints: np.ndarray, first: int) -> None:
        self.ints = ints
        ints[kernel.I_EID] = first

    def __iter__(self) -> _EventIds:
        return self

    def __next__(self) -> int:
        ints = self.ints
        value = int(ints[kernel.I_EID])
        ints[kernel.I_EID] = value + 1
        return value


class CallEnvironment(simpy.Environment):
    """A SimPy environment merged with a :class:`CompiledCalls` loop: each step first runs the calls
    ending before SimPy's next event (by time, priority, then id, as SimPy orders its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: CompiledCalls | None = None

    def step(self) -> None:
        calls = self.calls
        if calls is not None and calls.run_due():
            return
        super().step()

    def peek(self) -> float:
        next_s = super().peek()
        if self.calls is not None:
            next_s = min(next_s, self.calls.next_event_s())
        return next_s


class CompiledCalls:
    """The compiled call loop's state and its bridge to SimPy and the Python objects.

    :param env: the environment (its event ids move into the compiled state).
    :param state: the cluster state (its GPU busy arrays are shared, not copied).
    :param config: contention model and factor.
    :param model: the served model (path and attention's inbound bytes).
    :param latency_s: per GPU pair, link latency (:meth:`opscale.sim.pools.Link.matrices`).
    :param bandwidth: per GPU pair, link bandwidth in bytes/s (inf: no link).
    :param timer: ``tp -> IterationTimer`` for the cluster's GPU type.
    """

    #: first row counts (the arrays double past them)
    initial_replicas = 16
    initial_streams = 8
    #: smallest kernel-time table (tokens); tables grow by doubling, as IterationTimer's do
    min_table_tokens = 4096

    def __init__(
        self,
        env: CallEnvironment,
        state: ClusterState,
        config: SimConfig,
        model: ModelSpec,
        latency_s: np.ndarray,
        bandwidth: np.ndarray,
        timer: Callable[[int], IterationTimer],
    ) -> None:
        self.env = env
        self.timer = timer
        #: by pool index (the model's stateless units in order)
        self.pools: dict[int, CompiledUnitPool] = {}
        self._pool_index = {
            unit: i for i, unit in enumerate(u for u in model.units if u is not UnitKind.ATTENTION)
        }
        # per step: pool (-1: attention) and what its job's size is (PooledStream's _TokensOf)
        sizes = {UnitKind.LM_HEAD: kernel.STEP_SEQUENCES, UnitKind.VISION_ENCODER: kernel.STEP_VISION}
        path = np.zeros((len(model.units), 2), dtype=np.int64)
        for step, unit in enumerate(model.units):
            if unit is UnitKind.ATTENTION:
                path[step] = (-1, kernel.STEP_ATTENTION)
            else:
                path[step] = (self._pool_index[unit], sizes.get(unit, kernel.STEP_BATCH))
        num_pools = len(self._pool_index)
        num_gpus = len(state.gpus)
        floats = np.zeros(kernel.NUM_FLOATS)
        floats[kernel.F_FACTOR] = (
            config.contention_factor if config.contention is ContentionModel.PROCESSOR_SHARING else 0.0
        )
        floats[kernel.F_QKV_BYTES_PER_TOKEN] = (
            model.activation_bytes_per_token(UnitKind.QKV_PROJ) * model.num_layers
        )
        floats[kernel.F_LAYERS] = model.num_layers
        ints = np.zeros(kernel.NUM_INTS, dtype=np.int64)
        env._eid = _EventIds(ints, next(env._eid))  # type: ignore[assignment]
        replicas, streams, max_tp = self.initial_replicas, self.initial_streams, 1
        self._replicas: list[Replica | None] = []
        self._streams: list[CompiledPooledStream | None] = []
        self._free_replicas: list[int] = []
        self._free_streams: list[int] = []
        #: tables filled per (pool, tp), and the largest job seen (tokens)
        self._filled: set[tuple[int, int]] = set()
        self._max_job = 0
        #: a stream ending its iteration (its next one starts at the next run), and that start's arguments
        self._deferred: CompiledPooledStream | None = None
        self._pending = _NO_START
        # (the scalar arrays are never reallocated)
        self._ints = ints
        self._floats = floats
        self.arrays = CallArrays(
            ints=ints,
            floats=floats,
            replica_ints=np.zeros((replicas, kernel.R_GPU0 + max_tp), dtype=np.int64),
            replica_floats=np.zeros((replicas, kernel.NUM_REPLICA_FLOATS)),
            call_jobs=np.zeros((replicas, streams), dtype=np.int64),
            gpu_busy=state.busy_arrays.calls,
            gpu_busy_floats=state.busy_arrays.floats,
            running=np.zeros((num_gpus, 1 + replicas), dtype=np.int64),
            pool_ints=np.zeros((num_pools, kernel.NUM_POOL_INTS), dtype=np.int64),
            pool_floats=np.zeros((num_pools, kernel.NUM_POOL_FLOATS)),
            queue=np.zeros((num_pools, streams), dtype=np.int64),
            idle=np.zeros((num_pools, replicas), dtype=np.int64),
            tables=np.zeros((num_pools, max_tp + 1, self.min_table_tokens)),
            thresholds=np.zeros((num_pools, max_tp + 1), dtype=np.int64),
            stream_ints=np.zeros((streams, kernel.NUM_STREAM_INTS), dtype=np.int64),
            stream_floats=np.zeros((streams, kernel.NUM_STREAM_FLOATS)),
            path=path,
            latency_s=latency_s,
            bandwidth=bandwidth,
            heap_times=np.zeros(0),
            heap_ids=np.zeros((0, 2), dtype=np.int64),
            resume_jobs=np.zeros(streams, dtype=np.int64),
            affected=np.zeros(replicas + 1, dtype=np.int64),
        )
        self._state = kernel.CallState.of(self.arrays)
        self._margin = self._heap_capacity = 0
        self._fit_heap()
        env.calls = self

    # ------------------------------------------------------------------ growth
    def _set(self, **changes: np.ndarray) -> None:
        self.arrays = self.arrays._replace(**changes)
        self._state = kernel.CallState.of(self.arrays)

    def _fit_heap(self) -> None:
        """Heap room for one event's pushes (each start or end re-times at most every call)."""
        replicas, streams = self.arrays.call_jobs.shape
        self._margin = (streams + replicas + 2) * (replicas + 1)
        size = int(self.arrays.ints[kernel.I_HEAP_N])
        capacity = len(self.arrays.heap_times)
        if size + 2 * self._margin <= capacity:
            return
        capacity = self._heap_capacity_for(size, capacity)
        times = np.zeros(capacity)
        ids = np.zeros((capacity, 2), dtype=np.int64)
        times[:size] = self.arrays.heap_times[:size]
        ids[:size] = self.arrays.heap_ids[:size]
        self._set(heap_times=times, heap_ids=ids)
        self._heap_capacity = capacity

    def _heap_capacity_for(self, size: int, capacity: int) -> int:
        """A regrown heap's capacity, for ``size`` events (a test hook: smaller capacities make the
        loop stop for room more often)."""
        return max(2 * capacity, size + 4 * self._margin)

    def _grow_rows(self, replicas: int, streams: int, max_tp: int) -> None:
        a = self.arrays
        old_streams = a.queue.shape[1]
        old_tp = a.replica_ints.shape[1] - kernel.R_GPU0

        def grown(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            out = np.zeros(shape, dtype=array.dtype)
            out[tuple(slice(0, n) for n in array.shape)] = array
            return out

        # queues are ring buffers: unroll each from its head before widening
        queue = np.zeros((a.queue.shape[0], streams), dtype=np.int64)
        for pool in range(a.queue.shape[0]):
            head = int(a.pool_ints[pool, kernel.P_QUEUE_HEAD])
            length = int(a.pool_ints[pool, kernel.P_QUEUE_LEN])
            queue[pool, :length] = [a.queue[pool, (head + j) % old_streams] for j in range(length)]
            a.pool_ints[pool, kernel.P_QUEUE_HEAD] = 0
        self._set(
            replica_ints=grown(a.replica_ints, (replicas, kernel.R_GPU0 + max(max_tp, old_tp))),
            replica_floats=grown(a.replica_floats, (replicas, kernel.NUM_REPLICA_FLOATS)),
            call_jobs=grown(a.call_jobs, (replicas, streams)),
            running=grown(a.running, (a.running.shape[0], 1 + replicas)),
            queue=queue,
            idle=grown(a.idle, (a.idle.shape[0], replicas)),
            tables=grown(a.tables, (a.tables.shape[0], max(max_tp, old_tp) + 1, a.tables.shape[2])),
            thresholds=grown(a.thresholds, (a.thresholds.shape[0], max(max_tp, old_tp) + 1)),
            stream_ints=grown(a.stream_ints, (streams, kernel.NUM_STREAM_INTS)),
            stream_floats=grown(a.stream_floats, (streams, kernel.NUM_STREAM_FLOATS)),
            resume_jobs=grown(a.resume_jobs, (streams,)),
            affected=grown(a.affected, (replicas + 1,)),
        )
        self._fit_heap()

    def _cover_tokens(self) -> None:
        """Make the kernel-time tables long enough for any call: a call holds one job larger than the
        cap, or jobs (one per stream) summing to at most the cap."""
        a = self.arrays
        largest_cap = max((pool.batch_cap_tokens for pool in self.pools.values()), default=0)
        streams = sum(1 for s in self._streams if s is not None)
        need = max(self._max_job, min(largest_cap, streams * self._max_job))
        length = a.tables.shape[2]
        if need < length:
            return
        length = max(self.min_table_tokens, 1 << int(need).bit_length())
        self._set(tables=np.zeros((a.tables.shape[0], a.tables.shape[1], length)))
        filled, self._filled = self._filled, set()
        for pool, tp in filled:
            self._fill(pool, tp)

    def _fill(self, pool: int, tp: int) -> None:
        if (pool, tp) in self._filled:
            return
        # (add_replica has grown the tables' TP axis to the replica's TP)
        unit = self.pools[pool].unit
        timer = self.timer(tp)
        length = self.arrays.tables.shape[2]
        timer.unit_s(unit, length - 1)  # grows the timer's table to cover
        self.arrays.tables[pool, tp] = timer.table(unit)[:length]
        self.arrays.thresholds[pool, tp] = timer.compute_bound_from(unit)
        self._filled.add((pool, tp))

    # ------------------------------------------------------------------ rows
    def register_pool(self, pool: CompiledUnitPool) -> int:
        """The pool's index (its unit's position among the model's stateless units)."""
        index = self._pool_index[pool.unit]
        self.pools[index] = pool
        return index

    def add_replica(self, replica: Replica, pool: int, stream: int = -1) -> None:
        """Give ``replica`` a row (``pool`` -1: an attention replica, of ``stream``)."""
        slot = _take_slot(self._replicas, self._free_replicas, replica)
        rows, columns = self.arrays.replica_ints.shape
        if slot >= rows or replica.tp > columns - kernel.R_GPU0:
            self._grow_rows(max(rows, 2 * slot), self.arrays.call_jobs.shape[1], replica.tp)
        replica.kernel_slot = slot
        row = self.arrays.replica_ints[slot]
        row[:] = 0
        row[kernel.R_POOL] = pool
        row[kernel.R_STREAM] = stream
        row[kernel.R_TP] = replica.tp
        row[kernel.R_HOME] = replica.home_gpu
        row[kernel.R_CAP] = replica.batch_cap_tokens
        row[kernel.R_EVENT] = -1
        row[kernel.R_GPU0 : kernel.R_GPU0 + replica.tp] = replica.gpus
        self.arrays.replica_floats[slot] = 0.0
        if pool >= 0:
            self._fill(pool, replica.tp)
            self._cover_tokens()

    def release_replica(self, replica: Replica) -> None:
        slot = replica.kernel_slot
        self._replicas[slot] = None
        self._free_replicas.append(slot)
        replica.kernel_slot = -1

    def add_stream(self, stream: CompiledPooledStream) -> int:
        slot = _take_slot(self._streams, self._free_streams, stream)
        rows = self.arrays.stream_ints.shape[0]
        if slot >= rows:
            self._grow_rows(self.arrays.replica_ints.shape[0], 2 * rows, 1)
        self.arrays.stream_ints[slot] = 0
        self.arrays.stream_floats[slot] = 0.0
        self._cover_tokens()
        return slot

    def release_stream(self, slot: int) -> None:
        self._streams[slot] = None
        self._free_streams.append(slot)

    def busy(self, replica: Replica) -> bool:
        return bool(self.arrays.replica_ints[replica.kernel_slot, kernel.R_BUSY])

    def take_busy(self, replica: Replica, now_s: float) -> float:
        """The replica's busy seconds since the previous call (reset), as the Python classes count them."""
        slot = replica.kernel_slot
        floats = self.arrays.replica_floats
        if self.arrays.replica_ints[slot, kernel.R_BUSY]:
            floats[slot, kernel.RF_BUSY_S] += now_s - floats[slot, kernel.RF_BUSY_SINCE]
            floats[slot, kernel.RF_BUSY_SINCE] = now_s
        busy = float(floats[slot, kernel.RF_BUSY_S])
        floats[slot, kernel.RF_BUSY_S] = 0.0
        return busy

    # ------------------------------------------------------------------ running
    def begin(self, stream: CompiledPooledStream, batch: Batch, attention_s: float, host_s: float) -> None:
        """Start ``stream``'s iteration on ``batch``: now, or, when the stream is ending its previous
        iteration (the last thing it does then), as the next run's first act: the same order of events,
        one compiled call fewer."""
        slot = stream.slot
        tokens = stream.batch_tokens
        vision = batch.vision_patches
        job = tokens if tokens > vision else vision
        if job > self._max_job:
            self._max_job = job
            self._cover_tokens()
        start = (slot, tokens, stream.sequences, vision, bool(batch.chunks), attention_s, host_s)
        if self._deferred is stream:
            self._pending = start
            self._deferred = None
            return
        while not kernel.start_iteration(self._state, self.env.now, self._margin, *start):
            self._fit_heap()

    def ready(self, pool: int, replica: Replica) -> None:
        while not kernel.ready(self._state, self.env.now, self._margin, pool, replica.kernel_slot):
            self._fit_heap()

    def next_event_s(self) -> float:
        """Time of the earliest pending call event (inf: none)."""
        if self.arrays.ints[kernel.I_HEAP_N] == 0:
            return math.inf
        return float(self.arrays.heap_times[0])

    def run_due(self) -> bool:
        """Run the calls ending before SimPy's next event; True when the loop stopped for Python (an
        iteration or a drained replica ended) and Python has run, False when SimPy's event is next."""
        env = self.env
        queue = env._queue
        if queue:
            head = queue[0]
            limit_s, priority, event_id = head[0], int(head[1]), head[2]
        else:
            limit_s, priority, event_id = math.inf, 0, 0
        start, self._pending = self._pending, _NO_START
        while True:
            if self._ints[kernel.I_HEAP_N] + self._margin > self._heap_capacity:
                self._fit_heap()
            note = kernel.run(self._state, limit_s, priority, event_id, self._margin, *start)
            if note != kernel.NOTE_GROW:
                break
            start = _NO_START
        if note == kernel.NOTE_NONE:
            return False
        env._now = float(self._floats[kernel.F_NOW])
        subject = int(self._ints[kernel.I_NOTE_ARG])
        if note == kernel.NOTE_ITERATION_DONE:
            stream = self._streams[subject]
            assert stream is not None
            self._deferred = stream
            stream._end_iteration()
            self._deferred = None
        else:
            replica = self._replicas[subject]
            assert replica is not None and replica.on_released is not None
            self.pools[self.arrays.replica_ints[subject, kernel.R_POOL]].release(replica, replica.on_released)
        return True


class CompiledUnitPool(ReplicaLifecycle):
    """:class:`~opscale.sim.pools.UnitPool`'s interface over the compiled call loop.

    :param calls: the loop.
    :param unit: the unit.
    :param inbound_bytes_per_token: bytes per token (all layers) entering this unit from the previous one.
    :param hops: transfers per pass (the unit's layer count).
    :param batch_cap_tokens: tokens per call.
    """

    def __init__(
        self,
        calls: CompiledCalls,
        unit: UnitKind,
        *,
        inbound_bytes_per_token: float,
        hops: int,
        batch_cap_tokens: int,
    ) -> None:
        self.calls = calls
        self.unit = unit
        self.index = calls.register_pool(self)
        self.batch_cap_tokens = batch_cap_tokens
        self.replicas: list[Replica] = []
        calls.arrays.pool_floats[self.index, kernel.PF_INBOUND_BYTES_PER_TOKEN] = inbound_bytes_per_token
        calls.arrays.pool_ints[self.index, kernel.P_HOPS] = hops

    def add_replica(self, replica: Replica) -> None:
        self.calls.add_replica(replica, self.index)
        self.replicas.append(replica)

    def replica_ready(self, replica: Replica) -> None:
        replica.state = ReplicaState.SERVING
        self.calls.ready(self.index, replica)

    def _drop_idle(self, replica: Replica) -> None:
        a = self.calls.arrays
        idle = a.idle[self.index]
        count = int(a.pool_ints[self.index, kernel.P_IDLE])
        for j in range(count):
            if idle[j] == replica.kernel_slot:
                idle[j : count - 1] = idle[j + 1 : count].copy()
                a.pool_ints[self.index, kernel.P_IDLE] = count - 1
                break

    def _release_when_done(self, replica: Replica, on_released: Callable[[Replica], None]) -> None:
        replica.on_released = on_released
        self.calls.arrays.replica_ints[replica.kernel_slot, kernel.R_RELEASE] = 1

    def _forget(self, replica: Replica) -> None:
        self.calls.release_replica(replica)

    def set_batch_cap(self, cap: int) -> None:
        super().set_batch_cap(cap)
        for replica in self.replicas:
            self.calls.arrays.replica_ints[replica.kernel_slot, kernel.R_CAP] = cap
        self.calls._cover_tokens()

    def is_busy(self, replica: Replica) -> bool:
        return self.calls.busy(replica)

    @property
    def stats(self) -> UnitStats:
        """The statistics since the last interval boundary (a copy)."""
        a = self.calls.arrays
        ints = a.pool_ints[self.index]
        floats = a.pool_floats[self.index]
        return UnitStats(
            calls=int(ints[kernel.P_CALLS]),
            tokens=int(ints[kernel.P_TOKENS]),
            wait_s=float(floats[kernel.PF_WAIT]),
            jobs=int(ints[kernel.P_JOBS]),
            service_s=float(floats[kernel.PF_SERVICE]),
            queue_token_s=float(floats[kernel.PF_QUEUE_TOKEN_S]),
        )

    def take_interval(self, now_s: float) -> tuple[UnitStats, float]:
        """(stats, busy replica-seconds) since the previous call; resets them."""
        a = self.calls.arrays
        ints = a.pool_ints[self.index]
        floats = a.pool_floats[self.index]
        floats[kernel.PF_QUEUE_TOKEN_S] += ints[kernel.P_QUEUED_TOKENS] * (
            now_s - floats[kernel.PF_QUEUE_CHANGED]
        )
        floats[kernel.PF_QUEUE_CHANGED] = now_s
        busy = 0.0
        for replica in self.replicas:
            busy += self.calls.take_busy(replica, now_s)
        stats = self.stats
        ints[[kernel.P_CALLS, kernel.P_TOKENS, kernel.P_JOBS]] = 0
        floats[[kernel.PF_WAIT, kernel.PF_SERVICE, kernel.PF_QUEUE_TOKEN_S]] = 0.0
        return stats, busy


class CompiledPooledStream(AttentionReplicaStream):
    """:class:`~opscale.sim.pools.PooledStream` with its path walked by the compiled call loop.

    :param calls: the loop.
    :param timer: kernel times of the replica's TP degree (attention).
    """

    def __init__(
        self,
        stream_id: int,
        host: StreamHost,
        *,
        replica: Replica,
        calls: CompiledCalls,
        timer: IterationTimer,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream_id, host, replica=replica, **kwargs)
        self.calls = calls
        self.timer = timer
        self.slot = calls.add_stream(self)
        calls.add_replica(replica, -1, self.slot)
        calls.arrays.stream_ints[self.slot, kernel.S_REPLICA] = replica.kernel_slot

    @property
    def batch_tokens(self) -> int:
        return self._batch_tokens

    @property
    def sequences(self) -> int:
        return self._sequences

    def _walk(self, batch: Batch) -> None:
        self.calls.begin(
            self,
            batch,
            self.timer.attention_s(batch),
            self.overhead.iteration_s(self.overhead_ranks, self._sequences),
        )

    def retire(self) -> None:
        """The replica has left: free its rows."""
        self.calls.release_replica(self.replica)
        self.calls.release_stream(self.slot)

    def take_attention_stats(self) -> UnitStats:
        a = self.calls.arrays
        ints = a.stream_ints[self.slot]
        stats = UnitStats(
            calls=int(ints[kernel.S_ATT_CALLS]),
            tokens=int(ints[kernel.S_ATT_TOKENS]),
            jobs=int(ints[kernel.S_ATT_JOBS]),
            service_s=float(a.stream_floats[self.slot, kernel.SF_ATT_SERVICE]),
        )
        ints[[kernel.S_ATT_CALLS, kernel.S_ATT_TOKENS, kernel.S_ATT_JOBS]] = 0
        a.stream_floats[self.slot, kernel.SF_ATT_SERVICE] = 0.0
        return stats

    def take_replica_busy(self, now_s: float) -> float:
        return self.calls.take_busy(self.replica, now_s)
