"""The operator-level engine's call loop, compiled with numba.

At operator level almost every event of the discrete-event engine is a *call* ending: a unit pool's
batch or an attention replica's kernels, on GPUs shared by processor sharing. Each one runs a few
Python functions (:mod:`opscale.sim.sharing`, :mod:`opscale.sim.pools`), about 4 us on a fast core,
and a 5-s interval at the default workload has ~10,000 of them. This module runs that loop compiled:
GPU sharing (:class:`~opscale.sim.sharing.GpuSharing`), the unit pools
(:class:`~opscale.sim.pools.UnitPool`) and a pooled stream's walk along its path
(:class:`~opscale.sim.pools.PooledStream`), statement for statement, in the same floating-point
order, so results are bitwise those of the Python classes (the tests compare whole runs).
:mod:`opscale.sim.compiled_pools` owns the state and hands control back and forth with SimPy.

What stays in Python: building iterations (:meth:`Stream.schedule`), ending them (:meth:`Stream.finish`),
arrivals, routing, reconfiguration and metrics. The compiled loop stops and reports when an iteration
has ended (:data:`NOTE_ITERATION_DONE`) or a draining replica has gone idle (:data:`NOTE_RELEASED`),
and resumes where it stopped on the next call.

Events share SimPy's event-id counter (``ints[I_EID]``), so a call ending at the same time as a SimPy
event is ordered exactly as SimPy would order it: by time, then priority (calls are ``NORMAL``), then id.

State is a set of arrays (:class:`CallArrays`, handed to compiled code as a :class:`CallState` struct
reference); rows are replica, pool, stream and GPU slots, columns the named constants below. Compiled
functions are cached on disk (``cache=True``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import njit, types
from numba.experimental import structref
from numpy.typing import NDArray
from simpy.events import NORMAL

from opscale.sim.cluster import BUSY_S, BUSY_SINCE, COMPUTE_BOUND_S

__all__ = [
    "NOTE_GROW",
    "NOTE_ITERATION_DONE",
    "NOTE_NONE",
    "NOTE_RELEASED",
    "CallArrays",
    "CallState",
    "ready",
    "run",
    "start_iteration",
]

# ---------------------------------------------------------------------- ints (scalars)
I_EID = 0  # next event id (shared with SimPy)
I_HEAP_N = 1  # events in the heap
I_PHASE = 2  # 1: a pool call ended and its jobs are being continued
I_RESUME_HOME = 3  # that call's replica's home GPU and pool (kept here, not read from the replica's row:
I_RESUME_POOL = 4  # a released replica's row may be reused before its jobs are continued)
I_RESUME_JOB = 5  # next job to continue
I_RESUME_JOBS = 6  # jobs in the call
I_NOTE_ARG = 7  # the stream or replica a note is about
NUM_INTS = 8
# ---------------------------------------------------------------------- floats (scalars)
F_NOW = 0
F_FACTOR = 1  # contention factor (0: no sharing slowdown)
F_QKV_BYTES_PER_TOKEN = 2  # attention's inbound bytes per token, all layers
F_LAYERS = 3
NUM_FLOATS = 4
# ---------------------------------------------------------------------- replicas (int columns)
R_POOL = 0  # pool index; -1 for an attention replica
R_STREAM = 1  # attention replica: its stream
R_TP = 2
R_HOME = 3
R_CAP = 4  # batch cap, tokens
R_BUSY = 5
R_RELEASE = 6  # draining: report when the call in progress ends
R_EVENT = 7  # id of the finish event that counts (-1: none)
R_JOBS = 8  # jobs in the call
R_GPU0 = 9  # then the TP group's GPUs
# ---------------------------------------------------------------------- replicas (float columns)
RF_BUSY_SINCE = 0
RF_BUSY_S = 1
RF_REMAINING = 2
RF_UPDATED = 3
RF_FIXED = 4
RF_COMPUTE_BOUND = 5
RF_RATE = 6
RF_END = 7
RF_DUE = 8
NUM_REPLICA_FLOATS = 9
# ---------------------------------------------------------------------- pools (int columns)
P_QUEUE_HEAD = 0
P_QUEUE_LEN = 1
P_QUEUED_TOKENS = 2
P_IDLE = 3
P_CALLS = 4
P_TOKENS = 5
P_JOBS = 6
P_HOPS = 7
NUM_POOL_INTS = 8
# ---------------------------------------------------------------------- pools (float columns)
PF_QUEUE_CHANGED = 0
PF_WAIT = 1
PF_SERVICE = 2
PF_QUEUE_TOKEN_S = 3
PF_INBOUND_BYTES_PER_TOKEN = 4
NUM_POOL_FLOATS = 5
# ---------------------------------------------------------------------- streams (int columns)
S_STEP = 0
S_BATCH_TOKENS = 1
S_SEQUENCES = 2
S_VISION = 3
S_JOB_TOKENS = 4
S_JOB_SOURCE = 5
S_REPLICA = 6
S_CHUNKS = 7  # the iteration has prefill chunks (attention is compute-bound)
S_ATT_CALLS = 8
S_ATT_JOBS = 9
S_ATT_TOKENS = 10
NUM_STREAM_INTS = 11
# ---------------------------------------------------------------------- streams (float columns)
SF_ATT_KERNEL = 0
SF_ATT_HOST = 1
SF_JOB_ENQUEUED = 2
SF_ATT_SERVICE = 3
NUM_STREAM_FLOATS = 4
# ---------------------------------------------------------------------- path steps (column 1)
STEP_BATCH = 0
STEP_SEQUENCES = 1
STEP_VISION = 2
STEP_ATTENTION = 3
# ---------------------------------------------------------------------- notes (run's result)
NOTE_NONE = 0
NOTE_ITERATION_DONE = 1
NOTE_RELEASED = 2
NOTE_GROW = 3  # the event heap needs room first

_LATE_S = 1e-12  # an event this early is its call's (the rest is rounding)

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


class CallArrays(NamedTuple):
    """The compiled loop's state (compiled code takes it as a :class:`CallState`, one reference)."""

    ints: IntArray  # NUM_INTS
    floats: FloatArray  # NUM_FLOATS
    replica_ints: IntArray  # [replicas, R_GPU0 + max TP]
    replica_floats: FloatArray  # [replicas, NUM_REPLICA_FLOATS]
    call_jobs: IntArray  # [replicas, streams]: streams served by a replica's call in progress
    gpu_busy: IntArray  # [gpus]: calls running (ClusterState's array)
    gpu_busy_floats: FloatArray  # [gpus, 3]: busy since, busy seconds, compute-bound seconds (ClusterState's)
    running: IntArray  # [gpus, 1 + replicas]: count, then the replicas with a call on the GPU
    pool_ints: IntArray  # [pools, NUM_POOL_INTS]
    pool_floats: FloatArray  # [pools, NUM_POOL_FLOATS]
    queue: IntArray  # [pools, streams]: ring buffer of waiting jobs (by stream)
    idle: IntArray  # [pools, replicas]: idle replicas, in the order they went idle
    tables: FloatArray  # [pools, max TP + 1, tokens]: all-layer time by token count
    thresholds: IntArray  # [pools, max TP + 1]: first compute-bound token count
    stream_ints: IntArray  # [streams, NUM_STREAM_INTS]
    stream_floats: FloatArray  # [streams, NUM_STREAM_FLOATS]
    path: IntArray  # [steps, 2]: pool (-1: attention), STEP_* kind
    latency_s: FloatArray  # [gpus, gpus]
    bandwidth: FloatArray  # [gpus, gpus], bytes/s (inf: no link needed)
    heap_times: FloatArray  # [capacity]
    heap_ids: IntArray  # [capacity, 2]: event id, replica
    resume_jobs: IntArray  # [streams]: the ended call's jobs, being continued
    affected: IntArray  # [replicas + 1]: scratch, the calls a start or an end re-times


@structref.register
class _CallStateType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class CallState(structref.StructRefProxy):
    """A :class:`CallArrays` as compiled code takes it: one reference to the same arrays (a call passes
    a pointer, not two dozen array descriptors)."""

    ints: IntArray
    floats: FloatArray
    replica_ints: IntArray
    replica_floats: FloatArray
    call_jobs: IntArray
    gpu_busy: IntArray
    gpu_busy_floats: FloatArray
    running: IntArray
    pool_ints: IntArray
    pool_floats: FloatArray
    queue: IntArray
    idle: IntArray
    tables: FloatArray
    thresholds: IntArray
    stream_ints: IntArray
    stream_floats: FloatArray
    path: IntArray
    latency_s: FloatArray
    bandwidth: FloatArray
    heap_times: FloatArray
    heap_ids: IntArray
    resume_jobs: IntArray
    affected: IntArray

    @classmethod
    def of(cls, arrays: CallArrays) -> CallState:
        return _new_call_state(*arrays)


structref.define_proxy(CallState, _CallStateType, list(CallArrays._fields))


@njit(cache=True)
def _new_call_state(*arrays: Any) -> CallState:
    """``CallState(*arrays)`` built in compiled code, so that numba's cache keeps the constructor (the
    proxy's own ``__new__`` compiles it anew in every process: ~0.6 s)."""
    return CallState(*arrays)


# ---------------------------------------------------------------------- event heap
@njit(cache=True, inline="always")
def _before(t_a: float, id_a: int, t_b: float, id_b: int) -> bool:
    return t_a < t_b or (t_a == t_b and id_a < id_b)


@njit(cache=True, inline="always")
def _push(k: CallState, time_s: float, replica: int) -> int:
    ints = k.ints
    times = k.heap_times
    ids = k.heap_ids
    event_id = ints[I_EID]
    ints[I_EID] = event_id + 1
    i = ints[I_HEAP_N]
    ints[I_HEAP_N] = i + 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(time_s, event_id, times[parent], ids[parent, 0]):
            break
        times[i] = times[parent]
        ids[i, 0] = ids[parent, 0]
        ids[i, 1] = ids[parent, 1]
        i = parent
    times[i] = time_s
    ids[i, 0] = event_id
    ids[i, 1] = replica
    return event_id


@njit(cache=True, inline="always")
def _pop(k: CallState) -> None:
    ints = k.ints
    times = k.heap_times
    ids = k.heap_ids
    n = ints[I_HEAP_N] - 1
    ints[I_HEAP_N] = n
    if n == 0:
        return
    last_t = times[n]
    last_id = ids[n, 0]
    last_replica = ids[n, 1]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _before(times[child + 1], ids[child + 1, 0], times[child], ids[child, 0]):
            child += 1
        if not _before(times[child], ids[child, 0], last_t, last_id):
            break
        times[i] = times[child]
        ids[i, 0] = ids[child, 0]
        ids[i, 1] = ids[child, 1]
        i = child
    times[i] = last_t
    ids[i, 0] = last_id
    ids[i, 1] = last_replica


# ---------------------------------------------------------------------- GPU sharing
@njit(cache=True, inline="always")
def _schedule(k: CallState, replica: int, at_s: float, now_s: float) -> None:
    """GpuSharing._schedule: the call's finish event at ``at_s`` (SimPy's ``now + delay`` rounding)."""
    k.replica_floats[replica, RF_DUE] = at_s
    k.replica_ints[replica, R_EVENT] = _push(k, now_s + (at_s - now_s), replica)


@njit(cache=True)
def _rerate(k: CallState, calls: IntArray, count: int, now_s: float) -> None:
    """GpuSharing._rerate."""
    replica_ints = k.replica_ints
    replica_floats = k.replica_floats
    running = k.running
    factor = k.floats[F_FACTOR]
    for c in range(count):
        call = calls[c]
        tp = replica_ints[call, R_TP]
        sharing = running[replica_ints[call, R_GPU0], 0]
        for g in range(1, tp):
            n = running[replica_ints[call, R_GPU0 + g], 0]
            if n > sharing:
                sharing = n
        rate = 1.0 / (1.0 + factor * (sharing - 1))
        if rate == replica_floats[call, RF_RATE]:
            continue
        remaining = (
            replica_floats[call, RF_REMAINING]
            - (now_s - replica_floats[call, RF_UPDATED]) * replica_floats[call, RF_RATE]
        )
        replica_floats[call, RF_RATE] = rate
        replica_floats[call, RF_UPDATED] = now_s
        if remaining <= 0.0:
            replica_floats[call, RF_REMAINING] = 0.0
            continue
        replica_floats[call, RF_REMAINING] = remaining
        end = now_s + remaining / rate + replica_floats[call, RF_FIXED]
        replica_floats[call, RF_END] = end
        if end < replica_floats[call, RF_DUE] and replica_ints[call, R_EVENT] >= 0:
            _schedule(k, call, end, now_s)


@njit(cache=True, inline="always")
def _add_affected(affected: IntArray, count: int, call: int) -> int:
    for i in range(count):
        if affected[i] == call:
            return count
    affected[count] = call
    return count + 1


@njit(cache=True)
def _sharing_start(k: CallState, replica: int, work_s: float, fixed_s: float, compute_bound_s: float) -> None:
    """GpuSharing.start: the replica's call begins (its record is the replica's row)."""
    now = k.floats[F_NOW]
    replica_ints = k.replica_ints
    replica_floats = k.replica_floats
    gpu_busy = k.gpu_busy
    gpu_floats = k.gpu_busy_floats
    running = k.running
    tp = replica_ints[replica, R_TP]
    for g in range(tp):
        gpu = replica_ints[replica, R_GPU0 + g]
        if gpu_busy[gpu] == 0:
            gpu_floats[gpu, BUSY_SINCE] = now
        gpu_busy[gpu] += 1
    replica_floats[replica, RF_REMAINING] = work_s
    replica_floats[replica, RF_UPDATED] = now
    replica_floats[replica, RF_FIXED] = fixed_s
    replica_floats[replica, RF_COMPUTE_BOUND] = compute_bound_s
    replica_floats[replica, RF_RATE] = 1.0
    end = now + work_s + fixed_s
    replica_floats[replica, RF_END] = end
    replica_floats[replica, RF_DUE] = end
    replica_ints[replica, R_EVENT] = -1
    if k.floats[F_FACTOR] != 0.0:
        affected = k.affected
        count = 0
        for g in range(tp):
            gpu = replica_ints[replica, R_GPU0 + g]
            n = running[gpu, 0]
            for j in range(n):
                count = _add_affected(affected, count, running[gpu, 1 + j])
            running[gpu, 1 + n] = replica
            running[gpu, 0] = n + 1
        if count:
            affected[count] = replica
            _rerate(k, affected, count + 1, now)
    end = replica_floats[replica, RF_END]
    replica_floats[replica, RF_DUE] = end
    replica_ints[replica, R_EVENT] = _push(k, now + (end - now), replica)


@njit(cache=True)
def _sharing_end(k: CallState, replica: int) -> None:
    """GpuSharing._end, after the checks: GPU accounting and the re-timing of the GPUs' other calls."""
    now = k.floats[F_NOW]
    replica_ints = k.replica_ints
    replica_floats = k.replica_floats
    gpu_busy = k.gpu_busy
    gpu_floats = k.gpu_busy_floats
    running = k.running
    tp = replica_ints[replica, R_TP]
    compute_bound_s = replica_floats[replica, RF_COMPUTE_BOUND]
    for g in range(tp):
        gpu = replica_ints[replica, R_GPU0 + g]
        gpu_busy[gpu] -= 1
        gpu_floats[gpu, COMPUTE_BOUND_S] += compute_bound_s
        if gpu_busy[gpu] == 0:
            gpu_floats[gpu, BUSY_S] += max(
                0.0, now - replica_floats[replica, RF_FIXED] - gpu_floats[gpu, BUSY_SINCE]
            )
    if k.floats[F_FACTOR] != 0.0:
        affected = k.affected
        count = 0
        for g in range(tp):
            gpu = replica_ints[replica, R_GPU0 + g]
            n = running[gpu, 0]
            for j in range(n):  # list.remove: the first occurrence, order kept
                if running[gpu, 1 + j] == replica:
                    for m in range(j, n - 1):
                        running[gpu, 1 + m] = running[gpu, 2 + m]
                    break
            n -= 1
            running[gpu, 0] = n
            for j in range(n):
                count = _add_affected(affected, count, running[gpu, 1 + j])
        if count:
            _rerate(k, affected, count, now)


# ---------------------------------------------------------------------- unit pools
@njit(cache=True, inline="always")
def _note_queue(k: CallState, pool: int) -> None:
    now = k.floats[F_NOW]
    pool_floats = k.pool_floats
    pool_floats[pool, PF_QUEUE_TOKEN_S] += k.pool_ints[pool, P_QUEUED_TOKENS] * (
        now - pool_floats[pool, PF_QUEUE_CHANGED]
    )
    pool_floats[pool, PF_QUEUE_CHANGED] = now


@njit(cache=True, inline="always")
def _take_idle(k: CallState, pool: int, source: int) -> int:
    """The idle replica on ``source`` (the first such), else the last to go idle; removed from the list."""
    replica_ints = k.replica_ints
    pool_ints = k.pool_ints
    idle = k.idle
    n = pool_ints[pool, P_IDLE]
    pick = n - 1
    for j in range(n):
        if replica_ints[idle[pool, j], R_HOME] == source:
            pick = j
            break
    replica = idle[pool, pick]
    for m in range(pick, n - 1):
        idle[pool, m] = idle[pool, m + 1]
    pool_ints[pool, P_IDLE] = n - 1
    return replica


@njit(cache=True, inline="always")
def _transfer_s(k: CallState, source: int, home: int, num_bytes: float, hops: float) -> float:
    """Link.time_s."""
    if source == home or num_bytes <= 0:
        return 0.0
    return hops * k.latency_s[source, home] + num_bytes / k.bandwidth[source, home]


@njit(cache=True)
def _pool_start(k: CallState, pool: int, replica: int, jobs: int, tokens: int) -> None:
    """UnitPool._start: the replica serves the ``jobs`` streams in ``call_jobs[replica]``."""
    now = k.floats[F_NOW]
    replica_ints = k.replica_ints
    replica_floats = k.replica_floats
    call_jobs = k.call_jobs
    pool_ints = k.pool_ints
    pool_floats = k.pool_floats
    tables = k.tables
    stream_ints = k.stream_ints
    stream_floats = k.stream_floats
    tp = replica_ints[replica, R_TP]
    cap = replica_ints[replica, R_CAP]
    if tokens <= cap:
        kernel = tables[pool, tp, tokens]
    else:
        full = tokens // cap
        kernel = full * tables[pool, tp, cap] + tables[pool, tp, tokens - full * cap]
    threshold = k.thresholds[pool, tp]
    transfer = 0.0
    home = replica_ints[replica, R_HOME]
    per_token = pool_floats[pool, PF_INBOUND_BYTES_PER_TOKEN]
    hops = float(pool_ints[pool, P_HOPS])
    for j in range(jobs):
        stream = call_jobs[replica, j]
        pool_floats[pool, PF_WAIT] += now - stream_floats[stream, SF_JOB_ENQUEUED]
        source = stream_ints[stream, S_JOB_SOURCE]
        if source != home:
            slope = _transfer_s(k, source, home, per_token, 0.0)
            fixed = _transfer_s(k, source, home, per_token, hops) - slope
            t = fixed + slope * stream_ints[stream, S_JOB_TOKENS]
            if t > transfer:
                transfer = t
    pool_ints[pool, P_CALLS] += 1
    pool_ints[pool, P_JOBS] += jobs
    pool_ints[pool, P_TOKENS] += tokens
    replica_ints[replica, R_BUSY] = 1
    replica_floats[replica, RF_BUSY_SINCE] = now
    replica_ints[replica, R_JOBS] = jobs
    _sharing_start(k, replica, kernel, transfer, kernel if tokens >= threshold else 0.0)


@njit(cache=True)
def _dispatch(k: CallState, pool: int) -> None:
    """UnitPool.dispatch."""
    replica_ints = k.replica_ints
    call_jobs = k.call_jobs
    pool_ints = k.pool_ints
    queue = k.queue
    stream_ints = k.stream_ints
    width = queue.shape[1]
    while pool_ints[pool, P_QUEUE_LEN] and pool_ints[pool, P_IDLE]:
        _note_queue(k, pool)
        head = pool_ints[pool, P_QUEUE_HEAD]
        replica = _take_idle(k, pool, stream_ints[queue[pool, head], S_JOB_SOURCE])
        cap = replica_ints[replica, R_CAP]
        stream = queue[pool, head]
        head = (head + 1) % width
        length = pool_ints[pool, P_QUEUE_LEN] - 1
        call_jobs[replica, 0] = stream
        jobs = 1
        tokens = stream_ints[stream, S_JOB_TOKENS]
        while length and tokens + stream_ints[queue[pool, head], S_JOB_TOKENS] <= cap:
            stream = queue[pool, head]
            head = (head + 1) % width
            length -= 1
            call_jobs[replica, jobs] = stream
            jobs += 1
            tokens += stream_ints[stream, S_JOB_TOKENS]
        pool_ints[pool, P_QUEUE_HEAD] = head
        pool_ints[pool, P_QUEUE_LEN] = length
        pool_ints[pool, P_QUEUED_TOKENS] -= tokens
        _pool_start(k, pool, replica, jobs, tokens)


@njit(cache=True)
def _submit(k: CallState, pool: int, stream: int) -> None:
    """UnitPool.submit."""
    now = k.floats[F_NOW]
    pool_ints = k.pool_ints
    queue = k.queue
    stream_ints = k.stream_ints
    k.stream_floats[stream, SF_JOB_ENQUEUED] = now
    if not pool_ints[pool, P_QUEUE_LEN] and pool_ints[pool, P_IDLE]:
        replica = _take_idle(k, pool, stream_ints[stream, S_JOB_SOURCE])
        k.call_jobs[replica, 0] = stream
        _pool_start(k, pool, replica, 1, stream_ints[stream, S_JOB_TOKENS])
        return
    _note_queue(k, pool)
    width = queue.shape[1]
    queue[pool, (pool_ints[pool, P_QUEUE_HEAD] + pool_ints[pool, P_QUEUE_LEN]) % width] = stream
    pool_ints[pool, P_QUEUE_LEN] += 1
    pool_ints[pool, P_QUEUED_TOKENS] += stream_ints[stream, S_JOB_TOKENS]
    if pool_ints[pool, P_IDLE]:
        _dispatch(k, pool)


# ---------------------------------------------------------------------- pooled streams
@njit(cache=True)
def _run_attention(k: CallState, stream: int) -> None:
    """PooledStream._run_attention (kernel and host times were computed when the iteration began)."""
    now = k.floats[F_NOW]
    stream_ints = k.stream_ints
    stream_floats = k.stream_floats
    replica = stream_ints[stream, S_REPLICA]
    batch_tokens = stream_ints[stream, S_BATCH_TOKENS]
    transfer = _transfer_s(
        k,
        stream_ints[stream, S_JOB_SOURCE],
        k.replica_ints[replica, R_HOME],
        k.floats[F_QKV_BYTES_PER_TOKEN] * batch_tokens,
        k.floats[F_LAYERS],
    )
    stream_ints[stream, S_ATT_CALLS] += 1
    stream_ints[stream, S_ATT_JOBS] += 1
    stream_ints[stream, S_ATT_TOKENS] += batch_tokens
    k.replica_ints[replica, R_BUSY] = 1
    k.replica_floats[replica, RF_BUSY_SINCE] = now
    kernel = stream_floats[stream, SF_ATT_KERNEL]
    _sharing_start(
        k,
        replica,
        kernel,
        stream_floats[stream, SF_ATT_HOST] + transfer,
        kernel if stream_ints[stream, S_CHUNKS] else 0.0,
    )


@njit(cache=True)
def _advance(k: CallState, stream: int) -> bool:
    """PooledStream._advance: submit to the next step; True when the iteration has ended."""
    stream_ints = k.stream_ints
    path = k.path
    step = stream_ints[stream, S_STEP]
    while step < path.shape[0]:
        kind = path[step, 1]
        if kind == STEP_BATCH:
            tokens = stream_ints[stream, S_BATCH_TOKENS]
        elif kind == STEP_SEQUENCES:
            tokens = stream_ints[stream, S_SEQUENCES]
        elif kind == STEP_ATTENTION:
            stream_ints[stream, S_STEP] = step
            _run_attention(k, stream)
            return False
        else:
            tokens = stream_ints[stream, S_VISION]
            if not tokens:
                step += 1
                continue
        stream_ints[stream, S_STEP] = step
        stream_ints[stream, S_JOB_TOKENS] = tokens
        _submit(k, path[step, 0], stream)
        return False
    stream_ints[stream, S_STEP] = step
    return True


@njit(cache=True)
def _begin(
    k: CallState,
    stream: int,
    batch_tokens: int,
    sequences: int,
    vision_patches: int,
    chunks: bool,
    attention_s: float,
    host_s: float,
) -> None:
    """An iteration's start (AttentionReplicaStream._next_iteration, then PooledStream._walk's first
    step): the batch's sizes, attention's kernel and host times."""
    stream_ints = k.stream_ints
    stream_ints[stream, S_BATCH_TOKENS] = batch_tokens
    stream_ints[stream, S_SEQUENCES] = sequences
    stream_ints[stream, S_VISION] = vision_patches
    stream_ints[stream, S_CHUNKS] = chunks
    k.stream_floats[stream, SF_ATT_KERNEL] = attention_s
    k.stream_floats[stream, SF_ATT_HOST] = host_s
    stream_ints[stream, S_JOB_TOKENS] = batch_tokens
    stream_ints[stream, S_JOB_SOURCE] = k.replica_ints[stream_ints[stream, S_REPLICA], R_HOME]
    stream_ints[stream, S_STEP] = 0
    _advance(k, stream)  # the path holds attention, so an iteration cannot end at once


@njit(cache=True)
def start_iteration(
    k: CallState,
    now_s: float,
    margin: int,
    stream: int,
    batch_tokens: int,
    sequences: int,
    vision_patches: int,
    chunks: bool,
    attention_s: float,
    host_s: float,
) -> bool:
    """Start ``stream``'s iteration now; False (nothing done) when the heap lacks ``margin`` room."""
    if k.ints[I_HEAP_N] + margin > k.heap_times.shape[0]:
        return False
    k.floats[F_NOW] = now_s
    _begin(k, stream, batch_tokens, sequences, vision_patches, chunks, attention_s, host_s)
    return True


@njit(cache=True)
def ready(k: CallState, now_s: float, margin: int, pool: int, replica: int) -> bool:
    """UnitPool.replica_ready: the replica joins the idle list; queued jobs start. False (nothing done)
    when the heap lacks ``margin`` room."""
    if k.ints[I_HEAP_N] + margin > k.heap_times.shape[0]:
        return False
    k.floats[F_NOW] = now_s
    pool_ints = k.pool_ints
    k.idle[pool, pool_ints[pool, P_IDLE]] = replica
    pool_ints[pool, P_IDLE] += 1
    _dispatch(k, pool)
    return True


@njit(cache=True)
def _continue_jobs(k: CallState) -> bool:
    """UnitPool._done's tail: each job of the ended call moves on; then queued jobs start. True when a
    job's iteration ended (reported; the rest continues at the next call)."""
    ints = k.ints
    stream_ints = k.stream_ints
    home = ints[I_RESUME_HOME]
    jobs = k.resume_jobs
    for j in range(ints[I_RESUME_JOB], ints[I_RESUME_JOBS]):
        stream = jobs[j]
        stream_ints[stream, S_JOB_SOURCE] = home
        stream_ints[stream, S_STEP] += 1
        if _advance(k, stream):
            ints[I_RESUME_JOB] = j + 1
            ints[I_NOTE_ARG] = stream
            return True
    ints[I_PHASE] = 0
    pool = ints[I_RESUME_POOL]
    if k.pool_ints[pool, P_QUEUE_LEN] and k.pool_ints[pool, P_IDLE]:
        _dispatch(k, pool)
    return False


@njit(cache=True)
def run(
    k: CallState,
    limit_s: float,
    limit_priority: int,
    limit_id: int,
    margin: int,
    stream: int,
    batch_tokens: int,
    sequences: int,
    vision_patches: int,
    chunks: bool,
    attention_s: float,
    host_s: float,
) -> int:
    """Process call endings before SimPy's next event ``(limit_s, limit_priority, limit_id)``; return a
    NOTE_* code (``NOTE_NONE``: nothing left before the limit; ``NOTE_GROW``: the heap lacks ``margin``
    room, the most one event needs, for the next event). ``stream`` >= 0: first start its iteration (as
    :func:`start_iteration`; deferred from the end of its previous one, which the last run reported).
    The caller makes sure the heap has ``margin`` room.
    """
    ints = k.ints
    floats = k.floats
    replica_ints = k.replica_ints
    replica_floats = k.replica_floats
    pool_ints = k.pool_ints
    pool_floats = k.pool_floats
    stream_ints = k.stream_ints
    stream_floats = k.stream_floats
    times = k.heap_times
    ids = k.heap_ids
    if stream >= 0:
        _begin(k, stream, batch_tokens, sequences, vision_patches, chunks, attention_s, host_s)
    if ints[I_PHASE] == 1 and _continue_jobs(k):
        return NOTE_ITERATION_DONE
    while ints[I_HEAP_N]:
        time_s = times[0]
        event_id = ids[0, 0]
        # calls are NORMAL priority events
        if not (
            time_s < limit_s
            or (
                time_s == limit_s
                and (limit_priority > NORMAL or (limit_priority == NORMAL and event_id < limit_id))
            )
        ):
            return NOTE_NONE
        if ints[I_HEAP_N] + margin > times.shape[0]:
            return NOTE_GROW
        replica = ids[0, 1]
        _pop(k)
        floats[F_NOW] = time_s
        if event_id != replica_ints[replica, R_EVENT]:
            continue  # re-timed since
        if replica_floats[replica, RF_END] > time_s + _LATE_S:
            _schedule(k, replica, replica_floats[replica, RF_END], time_s)  # slowed down since
            continue
        _sharing_end(k, replica)
        replica_ints[replica, R_BUSY] = 0
        busy_s = time_s - replica_floats[replica, RF_BUSY_SINCE]
        pool = replica_ints[replica, R_POOL]
        if pool < 0:  # PooledStream._attention_done
            stream = replica_ints[replica, R_STREAM]
            stream_floats[stream, SF_ATT_SERVICE] += busy_s
            replica_floats[replica, RF_BUSY_S] += busy_s
            stream_ints[stream, S_JOB_SOURCE] = replica_ints[replica, R_HOME]
            stream_ints[stream, S_STEP] += 1
            if _advance(k, stream):
                ints[I_NOTE_ARG] = stream
                return NOTE_ITERATION_DONE
            continue
        # UnitPool._done
        pool_floats[pool, PF_SERVICE] += busy_s
        replica_floats[replica, RF_BUSY_S] += busy_s
        jobs = replica_ints[replica, R_JOBS]
        k.resume_jobs[:jobs] = k.call_jobs[replica, :jobs]
        ints[I_PHASE] = 1
        ints[I_RESUME_HOME] = replica_ints[replica, R_HOME]
        ints[I_RESUME_POOL] = pool
        ints[I_RESUME_JOB] = 0
        ints[I_RESUME_JOBS] = jobs
        if replica_ints[replica, R_RELEASE]:
            ints[I_NOTE_ARG] = replica
            return NOTE_RELEASED
        k.idle[pool, pool_ints[pool, P_IDLE]] = replica
        pool_ints[pool, P_IDLE] += 1
        if _continue_jobs(k):
            return NOTE_ITERATION_DONE
    return NOTE_NONE
