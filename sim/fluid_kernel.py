"""The fluid simulator's interval model, compiled with numba.

:class:`opscale.sim.fluid.FluidSimulator` keeps the deployment, the placement and the metrics in
Python and hands each control interval to :func:`solve_interval`: the fixed point of the streams'
iteration time and the unit pools, then TTFT, TBT, SLO attainment, per-unit figures and energy. The
model is the one described in :mod:`opscale.sim.fluid`'s docstring; this module is only its
arithmetic, over a handful of units and :data:`~opscale.sim.fluid.LENGTH_QUANTILES` length points.
Compiled, one interval takes about 40-50 us, numba's call overhead included, against ~0.7 ms for the
same arithmetic in plain Python (``experiments/bench_fluid.py`` times whole ``advance`` calls).

Inputs come in named tuples, built by the simulator, and cross into compiled code as plain tuples of
their fields (:func:`solve_interval_fields`: numba types those in C, named tuples through Python):

* :class:`KernelConstants`: what depends on the model, GPU, unit TPs, config and SLO (built once);
* :class:`KernelLayout`: what depends on the replicas serving (rebuilt when an action changed the
  deployment or a loading replica started serving);
* :class:`KernelCarry`: the scalar state carried from one interval to the next (returned anew), and
  :class:`PoolCarry`: the per-pool state arrays, updated in place.

Compiled functions are cached on disk (``cache=True``, next to this file or in numba's user cache
directory): the first process after an install or a change of this file compiles them (~30 s on a slow
2-core machine), later ones load them in about a second.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

__all__ = [
    "FIXED_POINT_ITERATIONS",
    "POOL_WAIT_FACTOR",
    "UTILISATION_CEILING",
    "IntervalResult",
    "KernelCarry",
    "KernelConstants",
    "KernelLayout",
    "PoolCarry",
    "TransferConstants",
    "colocation_matrix",
    "mean_arrival_s",
    "operator_layout",
    "solve_interval",
    "solve_interval_fields",
    "transfer_terms",
    "ttft_quantiles",
    "weighted_quantile",
]

FloatArray = NDArray[np.float64]

#: Outer fixed-point iterations per interval (warm-started from the previous interval).
FIXED_POINT_ITERATIONS = 3
#: Utilisation at which queueing formulas are evaluated at most (beyond it the backlog takes over).
UTILISATION_CEILING = 0.98
#: Allen-Cunneen factor ``(ca^2 + cs^2) / 2`` of unit pools: Poisson-like job arrivals, deterministic service.
POOL_WAIT_FACTOR = 0.5
#: Multiples of the mean admission wait at which the TTFT CDF is probed (exponential tail up to ~1e-4).
TAIL_STEPS = np.array([0.05, 0.15, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.7, 3.5, 4.6, 6.0, 7.5, 9.2])

# rows of KernelConstants.lines
_TIME_INTERCEPT, _TIME_SLOPE, _COMPUTE_INTERCEPT, _COMPUTE_SLOPE = 0, 1, 2, 3
# rows of the pools' work array (one pool step's results)
_RHO, _SERVICE, _QUEUE, _WAIT, _DECODE_CALL, _DECODE_TOKENS = 0, 1, 2, 3, 4, 5


class KernelConstants(NamedTuple):
    """What the interval model needs that is fixed for a simulator (model, GPU, unit TPs, config, SLO,
    trace).

    :param operator: operator-level deployment (else model-level instances).
    :param lines: ``[4, units, segments]``: per non-attention unit and log-grid segment, the call time's
        intercept and slope, and the same for its compute-bound part
        (:func:`opscale.sim.fluid_tables.segment_lines`).
    :param dense: ``[2, segments]``: intercepts and slopes of a model-level iteration's units other than
        the LM head (pipeline hops included).
    :param points_per_octave: the grid's points per doubling of tokens.
    :param lm_head_row: the LM head's row in ``lines``.
    :param pool_columns: per row of ``lines``, the unit's column in model order.
    :param attention_column: attention's column.
    :param prefill_coefficients: the attention surrogate's 5 prefill coefficients.
    :param decode_coefficients: its decode floor, per-request and per-context-token terms.
    :param overhead_fixed_s: engine overhead per iteration.
    :param overhead_per_rank_s: the same per TP rank.
    :param overhead_per_request_s: the same per sequence.
    :param ranks: TP ranks of a stream (operator: the attention TP; model: ``tp * pp``).
    :param kv_block_tokens: KV block size, tokens.
    :param max_running_requests: the engine's cap on a stream's running requests.
    :param contention: processor-sharing slowdown per co-located busy replica (0: none).
    :param power_levels: idle, memory-bound and compute-bound power of one GPU, W.
    :param ttft_slo_s: TTFT SLO.
    :param tbt_slo_s: TBT SLO.
    :param tbt_max: the SLO is on each request's longest gap (else its p99 gap).
    :param quantile_levels: the length quantile points' levels, ``(i + 0.5) / Q``.
    :param poisson_flat: :class:`opscale.sim.fluid_latency.PoissonTailTable`'s flat table.
    :param poisson_row: its row length.
    :param poisson_max_count: its largest count.
    :param poisson_log_low: log of its smallest mean.
    :param poisson_per_log: its grid points per unit of log mean.
    :param poisson_mean_low: its smallest mean.
    :param erlang_rows: ``[c, grid point]``: Erlang-C probability of waiting with ``c`` servers on a
        utilisation grid (:attr:`opscale.sim.queueing.ErlangCTable.rows`; more servers use the last row).
    :param erlang_steps: its utilisation grid intervals.
    :param arrival_s: the trace's arrival times (sorted).
    :param cumulative_arrival_s: their cumulative sums, with a leading 0.
    """

    operator: bool
    lines: FloatArray
    dense: FloatArray
    points_per_octave: float
    lm_head_row: int
    pool_columns: NDArray[np.int64]
    attention_column: int
    prefill_coefficients: FloatArray
    decode_coefficients: FloatArray
    overhead_fixed_s: float
    overhead_per_rank_s: float
    overhead_per_request_s: float
    ranks: float
    kv_block_tokens: float
    max_running_requests: float
    contention: float
    power_levels: FloatArray
    ttft_slo_s: float
    tbt_slo_s: float
    tbt_max: bool
    quantile_levels: FloatArray
    poisson_flat: FloatArray
    poisson_row: int
    poisson_max_count: int
    poisson_log_low: float
    poisson_per_log: float
    poisson_mean_low: float
    erlang_rows: FloatArray
    erlang_steps: int
    arrival_s: FloatArray
    cumulative_arrival_s: FloatArray


class KernelLayout(NamedTuple):
    """What the interval model needs from the replicas serving (see
    :meth:`opscale.sim.fluid.FluidSimulator._refresh_layout`). Model level fills only the first six.

    :param ready: every unit has a serving replica (model level: an instance serves).
    :param streams: attention replicas (model level: instances x ``pp``).
    :param kv_per_stream: KV tokens per stream.
    :param budget: the attention batch cap (token budget per iteration).
    :param stream_servers: Erlang-C servers of the streams' admission queue (``max(streams, 1)``).
    :param powered: GPUs powered.
    :param serving_gpus: GPUs holding a serving shard.
    :param pool_replicas: serving replicas per pool.
    :param pool_caps: batch cap per pool, tokens.
    :param pool_servers: serving replicas per pool, as Erlang-C servers.
    :param contention_free: per pool, the share of the other streams it serves while a replica is held.
    :param pool_transfer_fixed_s: per pool, the fixed part of a job's inbound transfer.
    :param pool_transfer_per_token_s: per pool, its per-token part.
    :param attention_transfer_fixed_s: the attention call's inbound transfer, fixed part.
    :param attention_transfer_per_token_s: its per-token part.
    :param colocation: ``[units, units]``: per unit, the other units' shards on its GPUs per own shard
        (other streams' share applied where streams keep their units to themselves).
    :param gpu_shards: ``[GPUs, units]``: per GPU holding a serving shard, its shards per unit.
    """

    ready: bool
    streams: int
    kv_per_stream: float
    budget: float
    stream_servers: int
    powered: float
    serving_gpus: float
    pool_replicas: FloatArray
    pool_caps: FloatArray
    pool_servers: NDArray[np.int64]
    contention_free: FloatArray
    pool_transfer_fixed_s: FloatArray
    pool_transfer_per_token_s: FloatArray
    attention_transfer_fixed_s: float
    attention_transfer_per_token_s: float
    colocation: FloatArray
    gpu_shards: FloatArray

    @classmethod
    def for_instances(
        cls,
        *,
        ready: bool,
        streams: int,
        kv_per_stream: float,
        budget: float,
        stream_servers: int,
        powered: float,
        serving_gpus: float,
    ) -> KernelLayout:
        """A model-level layout: no unit pools (their fields are empty)."""
        empty, empty_2d = np.zeros(0), np.zeros((0, 0))
        return cls(
            ready,
            streams,
            kv_per_stream,
            budget,
            stream_servers,
            powered,
            serving_gpus,
            empty,
            empty,
            np.zeros(0, dtype=np.int64),
            empty,
            empty,
            empty,
            0.0,
            0.0,
            empty_2d,
            empty_2d,
        )


class KernelCarry(NamedTuple):
    """Scalar state carried across intervals.

    :param backlog: requests arrived and not admitted.
    :param in_service: requests admitted and not complete, all streams.
    :param backlog_decided: queued requests already decided (past their TTFT deadline).
    :param iteration_s: the streams' mean busy iteration time (0 before the first interval).
    :param ttft_s: mean TTFT (0 before the first interval).
    :param capacity_per_stream: a stream's admission capacity, requests/s (inf before the first).
    :param prefill_correction: mean prefill-iteration time over the chunk mix / time at the mean chunk.
    :param attention_slowdown: contention slowdown of attention calls.
    :param served_total: requests admitted so far (fluid).
    """

    backlog: float
    in_service: float
    backlog_decided: float
    iteration_s: float
    ttft_s: float
    capacity_per_stream: float
    prefill_correction: float
    attention_slowdown: float
    served_total: float


class PoolCarry(NamedTuple):
    """Per-pool state carried across intervals, updated in place (operator level).

    :param jobs_per_call: mean jobs batched per call.
    :param mean_job_tokens: mean tokens of a job.
    :param prefill_call_s: mean call time of a prefill job (last interval's chunk mix).
    :param slowdown: contention slowdown of the pool's calls.
    """

    jobs_per_call: FloatArray
    mean_job_tokens: FloatArray
    prefill_call_s: FloatArray
    slowdown: FloatArray


class IntervalResult(NamedTuple):
    """One interval's figures (the simulator wraps them as :class:`opscale.sim.metrics.IntervalMetrics`).

    ``unit_figures`` is ``[5, units]``: utilisation, queue tokens, batch fill, mean wait (s) and mean
    service time (s) per unit in model order. The served requests' TTFT is the mixture of
    :class:`opscale.sim.fluid_latency.TtftMixture` over ``ttft_fixed_s``, ``prob_wait`` and
    ``wait_mean_s``; ``late_share`` of the decided requests were decided at ``late_s``. TBT values and
    weights are the per-request TBT statistic's distribution.
    """

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
    energy_j: float
    unit_figures: FloatArray
    ttft_fixed_s: FloatArray
    prob_wait: float
    wait_mean_s: float
    late_share: float
    late_s: float
    served_ttft_mean_s: float
    tbt_values: FloatArray
    tbt_weights: FloatArray


class TransferConstants(NamedTuple):
    """What :func:`transfer_terms` needs of the cluster and the model.

    :param source_rows: per unit, the unit its jobs come from (the first unit's: attention).
    :param hops: per unit, inbound transfers per iteration (its layers).
    :param bytes_per_token: per unit, inbound bytes per token over all hops.
    :param node_of_gpu: per GPU, its node.
    :param intra_latency_s: per node, its link's latency.
    :param intra_inverse_bandwidth: per node, 1 / its link's bandwidth (s per byte).
    :param inter_latency_s: the interconnect's latency.
    :param inter_inverse_bandwidth: 1 / the interconnect's bandwidth.
    """

    source_rows: NDArray[np.int64]
    hops: FloatArray
    bytes_per_token: FloatArray
    node_of_gpu: NDArray[np.int64]
    intra_latency_s: FloatArray
    intra_inverse_bandwidth: FloatArray
    inter_latency_s: float
    inter_inverse_bandwidth: float


@njit(cache=True)
def transfer_terms(links: TransferConstants, homes: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per unit (model order): the expected inbound transfer ``fixed + per_token x tokens`` of one job.

    A job comes from its source unit's replica; a pool serves it on a replica of the same GPU when it
    has one (the engine prefers an idle one there), else on any replica (uniformly). ``homes``:
    ``[units, GPUs]``, replicas per first GPU. From a source GPU without a local replica, ``n`` of the
    pool's ``N`` replicas sit on its node (its link) and ``N - n`` on other nodes (the interconnect).
    """
    units, gpus = homes.shape
    nodes = links.intra_latency_s.size
    fixed = np.zeros(units)
    per_token = np.zeros(units)
    for column in range(units):
        destinations = homes[column]
        sources = homes[links.source_rows[column]]
        on_node = np.zeros(nodes)
        for gpu in range(gpus):
            on_node[links.node_of_gpu[gpu]] += destinations[gpu]
        total = destinations.sum()
        latency_sum = inverse_bandwidth_sum = sources_total = 0.0
        for gpu in range(gpus):
            count = sources[gpu]
            if count == 0.0:
                continue
            sources_total += count
            if destinations[gpu] > 0.0:
                continue  # served on the same GPU: no transfer
            node = links.node_of_gpu[gpu]
            near = on_node[node]
            latency_sum += count * (
                near * links.intra_latency_s[node] + (total - near) * links.inter_latency_s
            )
            inverse_bandwidth_sum += count * (
                near * links.intra_inverse_bandwidth[node] + (total - near) * links.inter_inverse_bandwidth
            )
        # source and destination shares: replicas per GPU over the unit's replicas
        scale = 1.0 / (max(sources_total, 1.0) * max(total, 1.0))
        fixed[column] = links.hops[column] * latency_sum * scale
        per_token[column] = links.bytes_per_token[column] * inverse_bandwidth_sum * scale
    return fixed, per_token


@njit(cache=True)
def colocation_matrix(
    homes: FloatArray, shards: FloatArray, source_rows: NDArray[np.int64], attention_column: int, streams: int
) -> tuple[NDArray[np.bool_], FloatArray]:
    """Which units are local, and the co-location matrix of the contention model.

    A unit is *local* when every job of it is served beside its stream: attention, and each pool with
    the same replicas per GPU as the attention replicas whose source unit is local too (the engine takes
    an idle replica on the job's GPU first, and each such GPU has one per stream there); its work on a
    GPU belongs to that GPU's streams only.

    ``colocation[u, v]``: unit ``v``'s shards on ``u``'s GPUs per shard of ``u``, summed over GPUs of
    ``shards[gpu, u] x shards[gpu, v]``. The fixed point counts ``1 - 1/S`` of co-located work as other
    streams'; on a GPU whose ``k`` streams are the only users of its local units, ``1 - 1/k`` is (a
    chain: none), so pairs of local units there are scaled by ``(1 - 1/k) / (1 - 1/S)``.

    :param homes: ``[units, GPUs]``: replicas per first GPU.
    :param shards: ``[GPUs, units]``: serving shards.
    :param source_rows: per unit, the unit its jobs come from.
    """
    units = homes.shape[0]
    local = np.zeros(units, dtype=np.bool_)
    local[attention_column] = True
    for column in range(units):  # sources come first in model order (the first unit's: attention)
        if column != attention_column and local[source_rows[column]]:
            local[column] = (homes[column] == homes[attention_column]).all()
    others_share = 1.0 - 1.0 / max(streams, 1)
    colocation = np.zeros((units, units))
    for gpu in range(shards.shape[0]):
        local_streams = shards[gpu, attention_column]
        own_scale = (
            (1.0 - 1.0 / local_streams) / others_share if local_streams > 0 and others_share > 0 else 1.0
        )
        for column in range(units):
            for other in range(units):
                weight = shards[gpu, column] * shards[gpu, other]
                colocation[column, other] += weight * own_scale if local[column] and local[other] else weight
    for column in range(units):
        colocation[column] /= max(shards[:, column].sum(), 1.0)
    return local, colocation


@njit(cache=True)
def operator_layout(
    transfer: tuple,
    homes: FloatArray,
    gpu_shards: FloatArray,
    replicas: NDArray[np.int64],
    kv_tokens: FloatArray,
    pool_columns: NDArray[np.int64],
    pool_caps: FloatArray,
    attention_column: int,
    budget: float,
    powered: float,
) -> KernelLayout:
    """An operator-level :class:`KernelLayout` from the serving replicas' summary
    (:meth:`opscale.sim.fluid_layout.FluidLayout.serving_summary`: ``homes``, ``gpu_shards``, serving
    ``replicas`` per unit, ``kv_tokens`` per attention replica) and the pools' batch caps. ``transfer`` is
    the :class:`TransferConstants` as a plain tuple (``tuple(constants)``: numba types a named tuple
    argument in Python, ~9 us a call)."""
    links = TransferConstants(*transfer)
    streams = replicas[attention_column]
    fixed, per_token = transfer_terms(links, homes)
    # contention in the fixed point: the other units' shards on each unit's GPUs
    _, colocation = colocation_matrix(homes, gpu_shards, links.source_rows, attention_column, streams)
    pool_servers = replicas[pool_columns]
    pool_replicas = pool_servers.astype(np.float64)
    # share of the other streams a pool still serves while one of its replicas is held
    other_streams = max(streams - 1, 1)
    contention_free = np.empty(pool_columns.size)
    for pool in range(pool_columns.size):
        contention_free[pool] = min(max(pool_replicas[pool] - 1.0, 0.0) / other_streams, 1.0)
    kv_total = 0.0
    for tokens in kv_tokens:
        kv_total += tokens
    every_unit_serves = True
    for count in replicas:
        every_unit_serves = every_unit_serves and count > 0
    return KernelLayout(
        streams > 0 and every_unit_serves,
        streams,
        kv_total / kv_tokens.size if kv_tokens.size else 0.0,
        budget,
        max(streams, 1),
        powered,
        float(gpu_shards.shape[0]),
        pool_replicas,
        pool_caps,
        pool_servers,
        contention_free,
        fixed[pool_columns],
        per_token[pool_columns],
        fixed[attention_column],
        per_token[attention_column],
        colocation,
        gpu_shards,
    )


# ---------------------------------------------------------------------------------------- lookups
@njit(cache=True)
def _line_at(intercepts: FloatArray, slopes: FloatArray, points_per_octave: float, tokens: float) -> float:
    """A :func:`opscale.sim.fluid_tables.segment_lines` line at ``tokens``: linear in tokens on the log
    grid (0 tokens -> 0, below 1 token -> 1 token, beyond the grid the last segment extended)."""
    if tokens <= 0.0:
        return 0.0
    if tokens < 1.0:
        tokens = 1.0
    index = int(math.log2(tokens) * points_per_octave)
    last = intercepts.size - 1
    if index > last:
        index = last
    return intercepts[index] + slopes[index] * tokens


@njit(cache=True)
def _unit_time_s(constants: KernelConstants, row: int, tokens: float) -> float:
    lines = constants.lines
    return _line_at(lines[_TIME_INTERCEPT, row], lines[_TIME_SLOPE, row], constants.points_per_octave, tokens)


@njit(cache=True)
def _unit_compute_s(constants: KernelConstants, row: int, tokens: float) -> float:
    lines = constants.lines
    return _line_at(
        lines[_COMPUTE_INTERCEPT, row], lines[_COMPUTE_SLOPE, row], constants.points_per_octave, tokens
    )


@njit(cache=True)
def _dense_s(constants: KernelConstants, tokens: float) -> float:
    return _line_at(constants.dense[0], constants.dense[1], constants.points_per_octave, tokens)


@njit(cache=True)
def _attention_prefill_s(constants: KernelConstants, chunk_tokens: float, prior_tokens: float) -> float:
    """:meth:`opscale.sim.fluid_tables.AttentionSurrogate.prefill_s` for one chunk."""
    if chunk_tokens <= 0.0:
        return 0.0
    c = constants.prefill_coefficients
    value = c[0] + c[1] * chunk_tokens + c[2] * chunk_tokens * (chunk_tokens + 1.0) / 2.0
    return max(value + c[3] * chunk_tokens * prior_tokens + c[4] * prior_tokens, 0.0)


@njit(cache=True)
def _attention_decode_s(constants: KernelConstants, decodes: float, context_tokens: float) -> float:
    """:meth:`opscale.sim.fluid_tables.AttentionSurrogate.decode_s`."""
    if decodes <= 0.0:
        return 0.0
    c = constants.decode_coefficients
    return c[0] + c[1] * decodes + c[2] * context_tokens


@njit(cache=True)
def _erlang_row(constants: KernelConstants, servers: int) -> FloatArray:
    """The Erlang-C row of ``servers`` (clipped to the table's largest)."""
    return constants.erlang_rows[min(servers, constants.erlang_rows.shape[0] - 1)]


@njit(cache=True)
def _erlang_at(row: FloatArray, steps: int, utilisation: float) -> float:
    """Erlang-C probability of waiting from a tabulated row (linear in utilisation, clipped to [0, 1])."""
    clipped = 0.0 if utilisation < 0.0 else 1.0 if utilisation > 1.0 else utilisation
    position = clipped * steps
    index = int(position)
    if index >= steps:
        index = steps - 1
    low = row[index]
    return low + (position - index) * (row[index + 1] - low)


@njit(cache=True)
def _poisson_total_at_least(
    constants: KernelConstants, rate: float, counts: FloatArray, needed: NDArray[np.int64]
) -> float:
    """``sum_j P(N_j >= needed[j])`` with ``N_j ~ Poisson(counts[j] * rate)``
    (:meth:`opscale.sim.fluid_latency.PoissonTailTable.lookup`, summed)."""
    if rate <= 0.0:
        return 0.0
    flat, row, max_count = constants.poisson_flat, constants.poisson_row, constants.poisson_max_count
    top = row - 1.000001
    total = 0.0
    for j in range(counts.size):
        mean = counts[j] * rate
        if mean < constants.poisson_mean_low:
            continue
        position = (math.log(mean + 1e-300) - constants.poisson_log_low) * constants.poisson_per_log
        position = 0.0 if position < 0.0 else top if position > top else position
        index = int(position)
        flat_index = min(needed[j], max_count) * row + (index - row)
        low = flat[flat_index]
        total += low + (position - index) * (flat[flat_index + 1] - low)
    return total


@njit(cache=True)
def mean_arrival_s(
    arrival_s: FloatArray, cumulative_arrival_s: FloatArray, first: float, last: float
) -> float:
    """Mean arrival time of requests ``first .. last`` in arrival order (fractional positions: the FCFS
    fluid's admitted requests); ``nan`` when the range is empty. ``cumulative_arrival_s``: the cumulative
    sums of ``arrival_s`` with a leading 0."""
    count = arrival_s.size
    first, last = min(max(first, 0.0), count), min(max(last, 0.0), count)
    if last - first <= 1e-9:
        return math.nan
    total = _arrival_sum_s(arrival_s, cumulative_arrival_s, last) - _arrival_sum_s(
        arrival_s, cumulative_arrival_s, first
    )
    return total / (last - first)


@njit(cache=True)
def _arrivals_time_integral(
    arrival_s: FloatArray, cumulative_arrival_s: FloatArray, low: float, high: float
) -> float:
    """``integral of N(t) dt`` over ``[low, high]``, ``N(t)`` the arrivals at or before ``t``."""
    below = np.searchsorted(arrival_s, low, side="right")
    upto = np.searchsorted(arrival_s, high, side="right")
    inside = (upto - below) * high - (cumulative_arrival_s[upto] - cumulative_arrival_s[below])
    return below * (high - low) + inside


@njit(cache=True)
def _forward_arrival_ratio(
    arrival_s: FloatArray, cumulative_arrival_s: FloatArray, start_s: float, end_s: float, life_s: float
) -> float:
    """The arrival rate a request admitted in ``[start_s, end_s)`` meets over the next ``life_s`` (at a
    uniform time in the interval), over the interval's own arrival rate (1 when it has none)."""
    own = np.searchsorted(arrival_s, end_s, side="right") - np.searchsorted(arrival_s, start_s, side="right")
    if own == 0 or life_s <= 0.0:
        return 1.0
    met = _arrivals_time_integral(
        arrival_s, cumulative_arrival_s, start_s + life_s, end_s + life_s
    ) - _arrivals_time_integral(arrival_s, cumulative_arrival_s, start_s, end_s)
    return met / life_s / own


@njit(cache=True)
def _arrival_sum_s(arrival_s: FloatArray, cumulative_arrival_s: FloatArray, position: float) -> float:
    """Summed arrival times of the first ``position`` requests (fractional: part of the next one)."""
    index = min(int(position), arrival_s.size - 1)
    return cumulative_arrival_s[index] + (position - index) * arrival_s[index]


@njit(cache=True)
def _interp(x: float, xp: FloatArray, fp: FloatArray, left: float, right: float) -> float:
    """:func:`numpy.interp` for one ``x`` (``xp`` non-decreasing; between tied points the last
    ``xp[j] <= x``); ``left`` / ``right`` strictly outside."""
    if x > xp[-1]:
        return right
    if x < xp[0]:
        return left
    above = np.searchsorted(xp, x, side="right")
    if above == xp.size:
        return fp[-1]
    below = above - 1
    slope = (fp[above] - fp[below]) / (xp[above] - xp[below])
    return slope * (x - xp[below]) + fp[below]


@njit(cache=True)
def weighted_quantile(values: FloatArray, weights: FloatArray, quantile: float) -> float:
    """Quantile of a discrete distribution (``values`` with probability ``weights``); 0 if empty."""
    if values.size == 0:
        return 0.0
    order = np.argsort(values, kind="mergesort")
    cumulative = np.cumsum(weights[order])
    total = cumulative[-1]
    if total <= 0.0:
        return 0.0
    index = np.searchsorted(cumulative, quantile * total, side="left")
    return values[order[min(index, values.size - 1)]]


# ---------------------------------------------------------------------------------------- TTFT
@njit(cache=True)
def _ttft_cdf(
    sorted_fixed_s: FloatArray,
    sums: FloatArray,
    prob_wait: float,
    wait_mean_s: float,
    late_share: float,
    late_s: float,
    t: float,
) -> float:
    """``P(TTFT <= t)`` of a :class:`opscale.sim.fluid_latency.TtftMixture` in O(log Q): with ``k``
    fixed parts at or below ``t``, the served CDF is ``(k - p sum_{j<k} exp(-(t - f_j) / w)) / Q``, and
    the sum is ``S_k exp(-(t - f_{k-1}) / w)`` with ``S_k`` accumulated once in ``sums``."""
    below = np.searchsorted(sorted_fixed_s, t, side="right")
    count = sorted_fixed_s.size
    if below == 0:
        served = 0.0
    elif prob_wait > 0.0 and wait_mean_s > 0.0:
        served = (
            below - prob_wait * sums[below - 1] * math.exp((sorted_fixed_s[below - 1] - t) / wait_mean_s)
        ) / count
    else:
        served = below / count
    if late_share <= 0.0:
        return served
    return (1.0 - late_share) * served + late_share * (1.0 if t >= late_s else 0.0)


@njit(cache=True)
def _ttft_partial_sums(sorted_fixed_s: FloatArray, prob_wait: float, wait_mean_s: float) -> FloatArray:
    """``S_k = sum_{j<k} exp(-(f_{k-1} - f_j) / w)`` for :func:`_ttft_cdf`, by the recurrence
    ``S_{k+1} = S_k exp(-(f_k - f_{k-1}) / w) + 1`` (every exponent <= 0: no overflow); ones when
    nothing waits."""
    sums = np.ones(sorted_fixed_s.size)
    if prob_wait > 0.0 and wait_mean_s > 0.0:
        for k in range(1, sorted_fixed_s.size):
            sums[k] = sums[k - 1] * math.exp((sorted_fixed_s[k - 1] - sorted_fixed_s[k]) / wait_mean_s) + 1.0
    return sums


@njit(cache=True)
def ttft_quantiles(
    fixed_s: FloatArray,
    prob_wait: float,
    wait_mean_s: float,
    late_share: float,
    late_s: float,
    levels: FloatArray,
) -> FloatArray:
    """Quantiles of a TTFT mixture (:class:`opscale.sim.fluid_latency.TtftMixture`) by interpolating its
    CDF on a grid: the fixed parts, just below each (a jump of the CDF is crossed at its location), a
    tail past the largest (:data:`TAIL_STEPS` mean waits) and the late requests' TTFT."""
    sorted_fixed = np.sort(fixed_s)
    count = sorted_fixed.size
    sums = _ttft_partial_sums(sorted_fixed, prob_wait, wait_mean_s)
    top = sorted_fixed[-1]
    grid = np.empty(2 * count + TAIL_STEPS.size + 2)
    grid[:count] = sorted_fixed
    grid[count : 2 * count] = sorted_fixed * (1.0 - 1e-9)
    grid[2 * count : 2 * count + TAIL_STEPS.size] = top + wait_mean_s * TAIL_STEPS
    grid[-2] = late_s
    grid[-1] = late_s * (1.0 - 1e-9)
    grid.sort()
    cdf = np.empty(grid.size)
    for index in range(grid.size):
        cdf[index] = _ttft_cdf(sorted_fixed, sums, prob_wait, wait_mean_s, late_share, late_s, grid[index])
    last = grid.size - 1
    result = np.empty(levels.size)
    for k in range(levels.size):
        level = levels[k]
        if cdf[last] < level:
            result[k] = grid[last]
            continue
        low, high = 0, last + 1  # bisect for the first grid point whose CDF exceeds the level
        while low < high:
            middle = (low + high) // 2
            if cdf[middle] > level:
                high = middle
            else:
                low = middle + 1
        if low == 0:
            result[k] = grid[0]
        elif low > last:
            result[k] = grid[last]
        else:
            slope = (grid[low] - grid[low - 1]) / (cdf[low] - cdf[low - 1])
            result[k] = slope * (level - cdf[low - 1]) + grid[low - 1]
    return result


@njit(cache=True)
def _ttft_share_within(fixed_s: FloatArray, prob_wait: float, wait_mean_s: float, t: float) -> float:
    """``P(TTFT <= t)`` of the served requests' mixture (no late requests)."""
    total = 0.0
    waits = prob_wait > 0.0 and wait_mean_s > 0.0
    for fixed in fixed_s:
        if t >= fixed:
            total += 1.0 - prob_wait * math.exp(-(t - fixed) / wait_mean_s) if waits else 1.0
    return total / fixed_s.size


@njit(cache=True)
def _prefill_share_over(
    constants: KernelConstants,
    limit_s: float,
    full_s: float,
    last_chunks: FloatArray,
    last_times: FloatArray,
    full_weight: float,
) -> float:
    """Share of prefill iterations longer than ``limit_s``: full chunks by their time; last chunks by
    the chunk size ``c*`` whose iteration takes ``limit_s`` and a piecewise-linear CDF through the
    quantile points (a step CDF would make the share jump by 1/Q as ``c*`` crosses a point)."""
    order = np.argsort(last_chunks, kind="mergesort")
    chunks = last_chunks[order]
    times = last_times[order]
    if times[-1] <= limit_s:
        last_over = 0.0
    elif times[0] > limit_s:
        last_over = 1.0
    else:
        running_max = np.empty(times.size)
        longest = -math.inf
        for j in range(times.size):
            longest = max(longest, times[j])
            running_max[j] = longest
        threshold = _interp(limit_s, running_max, chunks, chunks[0], chunks[-1])
        levels = constants.quantile_levels
        last_over = 1.0 - _interp(threshold, chunks, levels, 0.0, 1.0)
    return full_weight * (1.0 if full_s > limit_s else 0.0) + (1.0 - full_weight) * last_over


# ---------------------------------------------------------------------------------------- pools
@njit(cache=True)
def _pool_step(
    constants: KernelConstants,
    layout: KernelLayout,
    pools: PoolCarry,
    work: FloatArray,
    beta: float,
    iteration_s: float,
    decodes: float,
    phi: float,
    chunk_tokens: float,
) -> tuple[float, float]:
    """One damped step of the pools' batching / Erlang-C model (:mod:`opscale.sim.fluid`'s docstring,
    point 4). Updates the jobs per call and the mean job size, writes each pool's utilisation, service
    time, queue, wait, decode call time and tokens into ``work``; returns ``(summed waits, smallest
    iteration time the pools sustain)``."""
    lines, per_octave = constants.lines, constants.points_per_octave
    busy_streams = layout.streams * beta
    job_rate = busy_streams / iteration_s
    wait_per_queued_job = POOL_WAIT_FACTOR / (job_rate if job_rate > 1e-12 else 1e-12)
    others_share = (busy_streams - 1.0) / busy_streams if busy_streams > 1.0 else 0.0
    decode_tokens = decodes if decodes > 1.0 else 1.0
    prefill_tokens = decodes + phi * chunk_tokens
    if prefill_tokens < 1.0:
        prefill_tokens = 1.0
    lm_head_tokens = decodes + phi if decodes + phi > 1.0 else 1.0
    bound_s = wait_total = 0.0
    for u in range(pools.jobs_per_call.size):
        intercepts, slopes = lines[_TIME_INTERCEPT, u], lines[_TIME_SLOPE, u]
        tokens = lm_head_tokens if u == constants.lm_head_row else prefill_tokens
        calls = pools.jobs_per_call[u]
        servers = layout.pool_replicas[u]
        transfer = layout.pool_transfer_fixed_s[u] + layout.pool_transfer_per_token_s[u] * tokens
        decode_call_tokens = decode_tokens + (calls - 1.0) * tokens
        decode_call = _line_at(intercepts, slopes, per_octave, decode_call_tokens)
        service = ((1.0 - phi) * decode_call + phi * pools.prefill_call_s[u]) * pools.slowdown[u] + transfer
        rho = job_rate * service / (calls * servers)
        max_jobs = max(float(math.floor(layout.pool_caps[u] / tokens)), 1.0)
        # closed population: a call takes the jobs waiting when its replica frees; the jobs of the
        # calls just ended or running (c n of them) are not back yet, so n <= S beta - c n
        batch_limit = min(max(busy_streams / (servers + 1.0), 1.0), max_jobs)
        full = _line_at(intercepts, slopes, per_octave, max_jobs * tokens) * pools.slowdown[u] + transfer
        bound_s = max(bound_s, busy_streams * full / (max_jobs * servers))
        # arrival theorem (closed population): an arriving job finds the load of the other busy
        # streams only, (S beta - 1) / S beta of the pool's (a lone stream never waits)
        seen = min(rho * others_share, UTILISATION_CEILING)
        waiting_calls = (
            _erlang_at(_erlang_row(constants, layout.pool_servers[u]), constants.erlang_steps, seen)
            * seen
            / (1.0 - seen)
        )
        # closed population: at most one job per busy stream is anywhere in the pools
        queue = min(waiting_calls * calls, max(busy_streams - servers, 0.0))
        wait = queue * wait_per_queued_job
        target = min(1.0 + queue / servers, batch_limit)
        pools.jobs_per_call[u] = math.sqrt(calls * target)
        pools.mean_job_tokens[u] = tokens
        work[_RHO, u], work[_SERVICE, u], work[_QUEUE, u], work[_WAIT, u] = rho, service, queue, wait
        work[_DECODE_CALL, u], work[_DECODE_TOKENS, u] = decode_call, decode_call_tokens
        wait_total += wait
    return wait_total, bound_s


@njit(cache=True)
def _pooled_times(
    constants: KernelConstants,
    layout: KernelLayout,
    pools: PoolCarry,
    attention_slowdown: float,
    cycle_s: float,
    decodes: float,
    chunks: FloatArray,
    attention_prefills_s: FloatArray,
    sequences: FloatArray,
    context: float,
    jobs_wait_s: float,
    mix_weights: FloatArray,
    mix_call_s: FloatArray,
    mix_compute_s: FloatArray,
) -> FloatArray:
    """Operator level: iteration time of a busy stream with ``decodes`` decodes and, per entry, one
    prefill chunk of ``chunks[j]`` tokens (0: none) whose attention takes ``attention_prefills_s[j]``
    (uncontended), sampling ``sequences[j]`` tokens at the LM head; ``context``: mean KV read per
    decode; ``jobs_wait_s``: summed pool waits.

    With ``mix_weights`` non-empty (one per entry: a mix of calls) it also writes, per pool, the
    weighted mean over the entries of the kernel time of its call and of its compute-bound part into
    ``mix_call_s`` and ``mix_compute_s``.

    A job shares its call with ``n - 1`` jobs of the mean size. Contention: under processor sharing
    a call is slowed by ``f`` per call running beside it; on average that is the pool's ``1 + f k``
    (``k``: the other streams' busy replicas on its GPUs). A call much longer than the other streams'
    iteration cycle (a prefill) holds one replica of its pool while the other streams cycle: those
    that the pool's other ``c - 1`` replicas cannot serve queue behind it (a convoy) and stop
    running, so only ``cycle / (2 x call)`` of their load overlaps it; those the other replicas serve
    keep running beside it. Short (decode) calls keep the mean.
    """
    lines, per_octave = constants.lines, constants.points_per_octave
    attention_decode = _attention_decode_s(constants, decodes, decodes * context)
    base = (
        constants.overhead_fixed_s
        + constants.overhead_per_rank_s * constants.ranks
        + jobs_wait_s
        + layout.attention_transfer_fixed_s
    )
    entries = chunks.size
    compositions = decodes + chunks
    totals = np.empty(entries)
    for j in range(entries):
        totals[j] = (
            base
            + constants.overhead_per_request_s * sequences[j]
            + (attention_decode + attention_prefills_s[j]) * attention_slowdown
            + layout.attention_transfer_per_token_s * compositions[j]
        )
    with_mix = mix_weights.size > 0
    half_cycle = 0.5 * cycle_s
    for u in range(pools.jobs_per_call.size):
        others = (pools.jobs_per_call[u] - 1.0) * pools.mean_job_tokens[u]
        excess = pools.slowdown[u] - 1.0
        free = layout.contention_free[u]
        # contended time = kernel (1 + shared + convoy overlap), overlap = min(1, cycle / (2 kernel (1 + excess)))
        shared, convoy, contended = excess * free, excess * (1.0 - free), 1.0 + excess
        fixed, per_token = layout.pool_transfer_fixed_s[u], layout.pool_transfer_per_token_s[u]
        jobs = sequences if u == constants.lm_head_row else compositions
        previous_job = -1.0
        kernel = compute_kernel = time_s = call_sum = compute_sum = 0.0
        for j in range(entries):
            job = jobs[j]
            if job != previous_job:  # equal jobs (the LM head's) take the same time
                previous_job = job
                tokens = job + others
                kernel = _line_at(lines[_TIME_INTERCEPT, u], lines[_TIME_SLOPE, u], per_octave, tokens)
                compute_kernel = _line_at(
                    lines[_COMPUTE_INTERCEPT, u], lines[_COMPUTE_SLOPE, u], per_octave, tokens
                )
                time_s = kernel
                if excess > 0.0:
                    overlap = half_cycle / (kernel * contended + 5e-13)
                    time_s *= 1.0 + shared + convoy * (overlap if overlap < 1.0 else 1.0)
                time_s += fixed + per_token * job
            totals[j] += time_s
            if with_mix:
                call_sum += mix_weights[j] * kernel
                compute_sum += mix_weights[j] * compute_kernel
        if with_mix:
            mix_call_s[u] = call_sum
            mix_compute_s[u] = compute_sum
    return totals


@njit(cache=True)
def _instance_iteration_times(
    constants: KernelConstants,
    decodes: float,
    chunks: FloatArray,
    attention_prefills_s: FloatArray,
    context: float,
) -> FloatArray:
    """Model level: iteration time of a busy stream with ``decodes`` decodes and one prefill chunk
    (> 0 tokens) per entry of ``chunks`` whose attention takes ``attention_prefills_s``; ``context``:
    mean KV read per decode."""
    sequences = decodes + 1.0  # every entry carries a prefill chunk that samples one token
    host = (
        constants.overhead_fixed_s
        + constants.overhead_per_rank_s * constants.ranks
        + constants.overhead_per_request_s * sequences
    )
    attention_decode = _attention_decode_s(constants, decodes, decodes * context)
    fixed = host + _unit_time_s(constants, constants.lm_head_row, sequences)
    times = np.empty(chunks.size)
    for j in range(chunks.size):
        times[j] = (
            fixed + _dense_s(constants, decodes + chunks[j]) + (attention_decode + attention_prefills_s[j])
        )
    return times


@njit(cache=True)
def _iteration_triple(
    constants: KernelConstants,
    layout: KernelLayout,
    pools: PoolCarry,
    attention_slowdown: float,
    cycle_s: float,
    decodes: float,
    chunk_s: float,
    full_chunk: float,
    prior: float,
    context: float,
    jobs_wait_s: float,
) -> tuple[float, float, float]:
    """Times of a decode-only iteration, one with a prefill chunk of ``chunk_s`` tokens and one with a
    full chunk of ``full_chunk`` tokens (the fixed point's inner evaluation)."""
    if constants.operator:
        chunks = np.array([0.0, chunk_s, full_chunk])
        prefills = np.array(
            [
                0.0,
                _attention_prefill_s(constants, chunk_s, prior),
                _attention_prefill_s(constants, full_chunk, prior),
            ]
        )
        sequences = np.array([decodes, decodes + 1.0, decodes + 1.0])
        empty = np.empty(0)
        times = _pooled_times(
            constants,
            layout,
            pools,
            attention_slowdown,
            cycle_s,
            decodes,
            chunks,
            prefills,
            sequences,
            context,
            jobs_wait_s,
            empty,
            empty,
            empty,
        )
        return times[0], times[1], times[2]
    host = (
        constants.overhead_fixed_s
        + constants.overhead_per_rank_s * constants.ranks
        + constants.overhead_per_request_s * decodes
    )
    decode_attention = _attention_decode_s(constants, decodes, decodes * context)
    lm_head = constants.lm_head_row
    decode = (
        host + _dense_s(constants, decodes) + _unit_time_s(constants, lm_head, decodes) + decode_attention
    )
    base = (
        host
        + constants.overhead_per_request_s
        + decode_attention
        + _unit_time_s(constants, lm_head, decodes + 1.0)
    )
    with_chunk = (
        base + _dense_s(constants, decodes + chunk_s) + _attention_prefill_s(constants, chunk_s, prior)
    )
    full = (
        base + _dense_s(constants, decodes + full_chunk) + _attention_prefill_s(constants, full_chunk, prior)
    )
    return decode, with_chunk, full


# ---------------------------------------------------------------------------------------- power
@njit(cache=True)
def _gpu_power_w(constants: KernelConstants, busy: float, compute: float) -> float:
    """Power of one GPU: :meth:`opscale.sim.power.PowerModel.power_w`'s formula (fractions in [0, 1])."""
    idle, memory_w, compute_w = (
        constants.power_levels[0],
        constants.power_levels[1],
        constants.power_levels[2],
    )
    return idle + busy * ((memory_w - idle) + compute * (compute_w - memory_w))


@njit(cache=True)
def _operator_power_w(
    constants: KernelConstants,
    layout: KernelLayout,
    kernel_load: FloatArray,
    uncontended_load: FloatArray,
    compute_load: FloatArray,
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
    sharing = min(constants.contention, 1.0)
    independent = float(max(layout.streams, 1))
    power_w = (layout.powered - layout.serving_gpus) * constants.power_levels[0]
    for gpu in range(layout.gpu_shards.shape[0]):
        load = work = compute = busiest = 0.0
        for column in range(kernel_load.size):
            shards = layout.gpu_shards[gpu, column]
            if shards == 0.0:
                continue
            replica_load = kernel_load[column]
            load += shards * replica_load
            work += shards * uncontended_load[column]
            compute += shards * compute_load[column]
            if replica_load > busiest:
                busiest = replica_load
        overlap = 1.0 - (1.0 - min(load / independent, 1.0)) ** independent
        busy = min(sharing * max(min(work, 1.0), busiest) + (1.0 - sharing) * overlap, 1.0)
        power_w += _gpu_power_w(constants, busy, min(compute / max(busy, 1e-12), 1.0))
    return power_w


# ---------------------------------------------------------------------------------------- interval
@njit(cache=True)
def solve_interval_fields(
    constants: tuple,
    layout: tuple,
    carry: tuple,
    pools: tuple,
    start_s: float,
    end_s: float,
    arrivals: int,
    prompt_level: float,
    output_level: float,
    prompt_shape: FloatArray,
    output_shape: FloatArray,
) -> tuple[IntervalResult, KernelCarry]:
    """:func:`solve_interval` with its four named tuples passed as plain tuples of their fields (``tuple(x)``).

    It runs every step. numba types a plain tuple's arguments in C (~1 us); a named tuple goes through its
    Python typing (~9 us for :class:`KernelConstants`, ~13 us for all four).
    """
    return solve_interval(
        KernelConstants(*constants),
        KernelLayout(*layout),
        KernelCarry(*carry),
        PoolCarry(*pools),
        start_s,
        end_s,
        arrivals,
        prompt_level,
        output_level,
        prompt_shape,
        output_shape,
    )


@njit(cache=True)
def solve_interval(
    constants: KernelConstants,
    layout: KernelLayout,
    carry: KernelCarry,
    pools: PoolCarry,
    start_s: float,
    end_s: float,
    arrivals: int,
    prompt_level: float,
    output_level: float,
    prompt_shape: FloatArray,
    output_shape: FloatArray,
) -> tuple[IntervalResult, KernelCarry]:
    """The fluid model over ``[start_s, end_s)`` with the replicas of ``layout`` serving: ``arrivals``
    requests whose prompt and output lengths are the quantile points ``shape x level``. Returns the
    interval's figures and the carry for the next interval (``pools`` is updated in place)."""
    operator = constants.operator
    dt = end_s - start_s
    streams = layout.streams
    ready = layout.ready
    budget = layout.budget
    quantiles = prompt_shape.size
    inverse_quantiles = 1.0 / quantiles
    units = constants.pool_columns.size + 1
    attention_column = constants.attention_column
    # length quantile points
    prompts = np.maximum(prompt_shape * prompt_level, 1.0)
    outputs = np.maximum(output_shape * output_level, 1.0)
    prompt_mean = prompts.sum() * inverse_quantiles
    output_mean = outputs.sum() * inverse_quantiles
    gaps_per_request = max(output_mean - 1.0, 0.0)
    context = prompt_mean + (outputs * outputs).sum() * inverse_quantiles / (2.0 * output_mean)
    kv_per_request = prompt_mean + output_mean / 2.0 + constants.kv_block_tokens / 2.0
    running_limit = min(constants.max_running_requests, layout.kv_per_stream / kv_per_request)
    demand = arrivals + carry.backlog
    x_demand = demand / (streams * dt) if ready else 0.0
    contention = constants.contention if operator else 0.0
    attention_slowdown = carry.attention_slowdown
    pool_wait = 0.0
    pool_work = np.zeros((6, constants.pool_columns.size))
    pool_work[_DECODE_TOKENS] = 1.0

    cycle_s = carry.iteration_s
    iteration_s = carry.iteration_s
    if iteration_s == 0.0:
        iteration_s = _iteration_triple(
            constants, layout, pools, attention_slowdown, cycle_s, 1.0, 0.0, 0.0, 0.0, context, 0.0
        )[0]
    cycle_s = iteration_s
    ttft_s = carry.ttft_s if carry.ttft_s != 0.0 else iteration_s
    # the streams' admission capacity per stream, warm-started from the last interval (starting at
    # infinity under overload would make the fixed point swing between empty and jammed streams)
    x_cap = carry.capacity_per_stream
    x = 0.0
    in_service_start = carry.in_service / streams if streams else 0.0
    beta = decodes = rho_prefill = chunk_eff = prefill_rate = 0.0
    decode_s = prefill_iteration_s = prefill_at_mean_chunk_s = full_s = iteration_s
    prefill_s_mean = iteration_s
    available = budget
    chunks = np.ones(quantiles)
    prefill_correction = carry.prefill_correction
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
        chunks = np.ceil(prompts / available)
        mean_chunks = chunks.sum() * inverse_quantiles
        chunk_light = prompt_mean / mean_chunks
        chunk_eff = chunk_light + rho_prefill * max(available - chunk_light, 0.0)
        decode_s, prefill_iteration_s, full_s = _iteration_triple(
            constants,
            layout,
            pools,
            attention_slowdown,
            cycle_s,
            decodes,
            chunk_eff,
            available,
            0.5 * prompt_mean,
            context,
            pool_wait,
        )
        prefill_at_mean_chunk_s = prefill_iteration_s
        prefill_iteration_s *= prefill_correction
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
            pool_wait, bound_s = _pool_step(
                constants, layout, pools, pool_work, beta, new_iteration_s, decodes, phi, chunk_eff
            )
            new_iteration_s = max(new_iteration_s, bound_s)
            attention_call_s = (
                constants.overhead_fixed_s
                + constants.overhead_per_rank_s * constants.ranks
                + constants.overhead_per_request_s * (decodes + phi)
                + _attention_decode_s(constants, decodes, decodes * context)
                + phi * _attention_prefill_s(constants, chunk_eff, 0.5 * prompt_mean)
            ) * attention_slowdown
            if contention:
                rho_all = np.zeros(units)
                for row in range(constants.pool_columns.size):
                    rho_all[constants.pool_columns[row]] = min(pool_work[_RHO, row], 1.0)
                rho_all[attention_column] = min(beta * attention_call_s / new_iteration_s, 1.0)
                # busy replicas on each unit's GPUs (per shard), less the calling stream's own share (one
                # job in flight): the co-location matrix times rho
                others_share = 1.0 - 1.0 / streams
                slowdown = np.empty(units)
                for column in range(units):
                    busy = 0.0
                    for other in range(units):
                        busy += layout.colocation[column, other] * rho_all[other]
                    slowdown[column] = 1.0 + contention * max(busy * others_share, 0.0)
                for row in range(constants.pool_columns.size):
                    pools.slowdown[row] = slowdown[constants.pool_columns[row]]
                attention_slowdown = slowdown[attention_column]
        iteration_s = new_iteration_s
        cycle_s = iteration_s
        x_cap_budget = budget / ((prompt_mean + gaps_per_request) * iteration_s)
        x_cap_kv = running_limit / (prefill_s_mean + gaps_per_request * iteration_s)
        x_cap_new = min(x_cap_budget, x_cap_kv)
        x_cap = x_cap_new if math.isinf(x_cap) else math.sqrt(x_cap * x_cap_new)
        ttft_s = 0.5 * beta * iteration_s + prefill_s_mean
    x = min(x_demand, x_cap) if ready else 0.0
    capacity_per_stream = x_cap if ready else carry.capacity_per_stream
    # per prompt quantile: its last chunk shares the iteration with other prefills (rho_p of the rest)
    priors = (chunks - 1.0) * available
    remaining = prompts - priors
    last_chunk = remaining + rho_prefill * np.maximum(available - remaining, 0.0)
    # prefill iterations over the chunk distribution (full chunks and each quantile's last chunk):
    # iteration time is convex in tokens, so its mean exceeds the time at the mean chunk (Jensen)
    prefill_chunks = np.empty(quantiles + 1)
    prefill_chunks[0] = available
    prefill_chunks[1:] = last_chunk
    full_chunks = chunks.sum() - quantiles
    each_last = 1.0 / (full_chunks + quantiles)
    prefill_weights = np.full(quantiles + 1, each_last)
    prefill_weights[0] = full_chunks * each_last
    attention_prefills_s = np.empty(quantiles + 1)
    attention_prefills_s[0] = _attention_prefill_s(constants, available, 0.5 * prompt_mean)
    for q in range(quantiles):
        attention_prefills_s[q + 1] = _attention_prefill_s(constants, last_chunk[q], priors[q])
    pool_count = constants.pool_columns.size
    mix_call_s = np.zeros(pool_count)
    mix_compute_s = np.zeros(pool_count)
    have_mix = False
    if not ready:
        last_times = np.zeros(quantiles)
    elif operator:
        times = _pooled_times(
            constants,
            layout,
            pools,
            attention_slowdown,
            cycle_s,
            decodes,
            prefill_chunks,
            attention_prefills_s,
            np.full(quantiles + 1, decodes + 1.0),
            context,
            pool_wait,
            prefill_weights,
            mix_call_s,
            mix_compute_s,
        )
        last_times = times[1:]
        have_mix = True
    else:
        last_times = _instance_iteration_times(
            constants, decodes, last_chunk, attention_prefills_s[1:], context
        )
    prefill_s = (chunks - 1.0) * full_s + last_times
    prefill_times = np.empty(quantiles + 1)
    prefill_times[0] = full_s
    prefill_times[1:] = last_times
    mean_prefill_s = 0.0
    for j in range(quantiles + 1):
        mean_prefill_s += prefill_weights[j] * prefill_times[j]
    if ready and x > 0:
        # used from the next interval on (one interval's lag keeps the loop cheap)
        prefill_correction = mean_prefill_s / prefill_at_mean_chunk_s
    served = x * streams * dt
    # all the demand is admitted unless the streams' capacity binds (no rounding residue left queued:
    # a residue would count the interval's admissions as drained from a backlog)
    backlog_end = max(demand - served, 0.0) if x < x_demand else 0.0
    backlog_mean = 0.5 * (carry.backlog + backlog_end)
    # FCFS fluid: the requests admitted now are the trace's requests number served_total .. + served;
    # their wait is the time since their arrival (0 when nothing is queued)
    backlog_wait_s = 0.0
    if served > 0 and (carry.backlog > 0 or backlog_end > 0):
        arrived_s = mean_arrival_s(
            constants.arrival_s,
            constants.cumulative_arrival_s,
            carry.served_total,
            carry.served_total + served,
        )
        backlog_wait_s = 0.0 if math.isnan(arrived_s) else max(0.5 * (start_s + end_s) - arrived_s, 0.0)
    # admission wait: Erlang-C over the streams, service = a prompt's share of the prefill budget
    service_s = prompt_mean * iteration_s / available if ready else 0.0
    admission_rho = min(x * service_s, UTILISATION_CEILING)
    prompt_cv2 = (prompts * prompts).sum() * inverse_quantiles / prompt_mean**2 - 1.0
    prob_wait = (
        _erlang_at(_erlang_row(constants, layout.stream_servers), constants.erlang_steps, admission_rho)
        if ready
        else 0.0
    )
    admission_wait_s = (
        prob_wait * service_s / (max(streams, 1) * (1.0 - admission_rho)) * (1.0 + prompt_cv2) / 2.0
        if ready
        else 0.0
    )
    residual_s = 0.5 * beta * iteration_s
    prefill_s_mean = prefill_s.sum() * inverse_quantiles
    ttft_carry_s = residual_s + admission_wait_s + prefill_s_mean

    # ---- TTFT of served requests: per prompt quantile a fixed part, plus the admission wait
    fixed_s = residual_s + backlog_wait_s + prefill_s
    wait_mean_s = admission_wait_s / prob_wait if prob_wait > 0 else 0.0
    ttft_ok = _ttft_share_within(fixed_s, prob_wait, wait_mean_s, constants.ttft_slo_s) if ready else 0.0
    # ---- TBT: per output quantile, the chance its p99 (max) gap is over the SLO, and that it is long
    phi = min(prefill_rate * iteration_s, 1.0)
    # a decoding request sees the other requests' prefills at their arrival rate x (Poisson), not at
    # the busy-period rate x / beta: the share of its gaps that carry a prefill chunk is phi * beta
    phi_gap = phi * beta
    gap_mean_s = (1.0 - phi_gap) * decode_s + phi_gap * mean_prefill_s
    # a request meets the prefills of the requests that arrive while it decodes, not its interval's: a
    # burst's requests would each be charged the whole burst's prefills (the trace tells which arrive
    # when; under a binding capacity admissions, not arrivals, set the rate)
    phi_seen = phi_gap
    if x >= x_demand and gaps_per_request > 0:
        phi_seen = min(
            1.0,
            phi_gap
            * _forward_arrival_ratio(
                constants.arrival_s,
                constants.cumulative_arrival_s,
                start_s,
                end_s,
                gaps_per_request * gap_mean_s,
            ),
        )
    tbt_slo = constants.tbt_slo_s
    over = (1.0 - phi_seen) * (1.0 if decode_s > tbt_slo else 0.0) + phi_seen * _prefill_share_over(
        constants, tbt_slo, full_s, last_chunk, last_times, prefill_weights[0]
    )
    # the engine's per-request p99 is the gap at rank floor(0.99 (g - 1)) (0-based, no interpolation):
    # it is a long gap when at least g - floor(0.99 (g - 1)) gaps are long
    gaps = np.empty(quantiles)
    needed = np.ones(quantiles, dtype=np.int64)
    for q in range(quantiles):
        gaps[q] = float(round(outputs[q] - 1.0))  # outputs >= 1
        if not constants.tbt_max:
            needed[q] = int(max(1.0, gaps[q] - math.floor(0.99 * max(gaps[q] - 1.0, 0.0))))
    over_tails = _poisson_total_at_least(constants, over, gaps, needed)
    long_tails = _poisson_total_at_least(constants, phi_seen, gaps, needed)
    tbt_ok = 1.0 - over_tails * inverse_quantiles
    long_share = long_tails * inverse_quantiles
    # per-request TBT statistic: a prefill iteration's time when long gaps count, else the decode gap
    tbt_values = np.empty(quantiles + 2)
    tbt_values[0] = decode_s
    tbt_values[1:] = prefill_times
    tbt_weights = np.empty(quantiles + 2)
    tbt_weights[0] = 1.0 - long_share
    tbt_weights[1:] = long_share * prefill_weights

    # ---- decided requests (metrics.py's rule)
    served_from_decided = min(served, carry.backlog_decided)
    recent = arrivals / dt * constants.ttft_slo_s if dt > 0 else 0.0
    decided_waiting = max(backlog_end - recent, 0.0)
    newly_decided = max(decided_waiting - (carry.backlog_decided - served_from_decided), 0.0)
    served_fresh = served - served_from_decided
    decided = served_fresh + newly_decided
    slo_met = served_fresh * ttft_ok * tbt_ok
    # the engine decides a queued request at the first boundary after its deadline, at the time it
    # has waited so far (a lower bound of its TTFT): the deadline plus, on average, half an interval
    late_s = constants.ttft_slo_s + 0.5 * dt
    late_share = newly_decided / decided if decided > 0 else 0.0
    ttft_p50_s = ttft_p99_s = 0.0
    if decided > 0:
        levels = np.array([0.5, 0.99])
        p50_p99 = ttft_quantiles(fixed_s, prob_wait, wait_mean_s, late_share, late_s, levels)
        ttft_p50_s, ttft_p99_s = p50_p99[0], p50_p99[1]
    ttft_served_mean = fixed_s.sum() * inverse_quantiles + prob_wait * wait_mean_s
    in_service_end = carry.in_service
    if ready:
        residence_s = ttft_carry_s + gaps_per_request * iteration_s
        in_service_end = (
            x * residence_s + (in_service_start - x * residence_s) * math.exp(-dt / residence_s)
        ) * streams

    # ---- per-unit figures
    iterations_per_busy_s = 1.0 / iteration_s if ready else 0.0
    decode_only_rate = max(iterations_per_busy_s - prefill_rate, 0.0)
    mean_tokens = decodes + phi * chunk_eff
    figures = np.zeros((5, units))
    utilisation, queue_tokens, batch_fill, wait_s, unit_service_s = (
        figures[0],
        figures[1],
        figures[2],
        figures[3],
        figures[4],
    )
    attention_decode_s = _attention_decode_s(constants, decodes, decodes * context)
    prefill_attention_mean_s = 0.0
    for j in range(quantiles + 1):
        prefill_attention_mean_s += prefill_weights[j] * attention_prefills_s[j]
    attention_prefill_s = attention_decode_s + prefill_attention_mean_s
    queue_tokens[attention_column] = (backlog_mean + streams * x * admission_wait_s) * prompt_mean
    batch_fill[attention_column] = min(mean_tokens / budget, 1.0)
    # attention's wait: the admission delay of the requests admitted (queue + backlog)
    wait_s[attention_column] = admission_wait_s + backlog_wait_s
    host = (
        constants.overhead_fixed_s
        + constants.overhead_per_rank_s * constants.ranks
        + constants.overhead_per_request_s * (decodes + phi)
    )
    if operator:
        attention_kernel_s = (
            attention_decode_s + phi * (attention_prefill_s - attention_decode_s)
        ) * attention_slowdown
        attention_call_s = (
            host
            + attention_kernel_s
            + layout.attention_transfer_fixed_s
            + layout.attention_transfer_per_token_s * mean_tokens
        )
        attention_rho = min(beta * attention_call_s / iteration_s, 1.0) if ready else 0.0
        utilisation[attention_column] = attention_rho
        unit_service_s[attention_column] = attention_call_s
        # per unit: its kernel load (busy share without inbound transfers nor the attention's host
        # overhead), that load without its contention slowdown, and its compute-bound part
        kernel_load = np.zeros(units)
        uncontended_load = np.zeros(units)
        compute_load = np.zeros(units)
        attention_load = attention_rho * max(
            1.0 - (attention_call_s - attention_kernel_s) / attention_call_s, 0.0
        )
        kernel_load[attention_column] = attention_load
        uncontended_load[attention_column] = attention_load / attention_slowdown
        compute_load[attention_column] = beta * prefill_rate * (attention_prefill_s - attention_decode_s)
        for row in range(pool_count):
            column = constants.pool_columns[row]
            job_tokens, calls, service = (
                pools.mean_job_tokens[row],
                pools.jobs_per_call[row],
                pool_work[_SERVICE, row],
            )
            pool_slowdown = pools.slowdown[row]
            rho = min(pool_work[_RHO, row], 1.0)
            utilisation[column] = rho
            queue_tokens[column] = pool_work[_QUEUE, row] * job_tokens
            batch_fill[column] = min(calls * job_tokens / layout.pool_caps[row], 1.0)
            wait_s[column] = pool_work[_WAIT, row]
            unit_service_s[column] = service
            # compute-bound share of the pool's busy time: its calls' kernels that are compute-bound
            # (the engine flags whole calls by their size), decode and prefill calls weighted by time
            compute_kernel_s = (1.0 - phi) * _unit_compute_s(constants, row, pool_work[_DECODE_TOKENS, row])
            if have_mix:
                compute_kernel_s += phi * mix_compute_s[row]
            compute_flag = compute_kernel_s * pool_slowdown / max(service, 1e-12)
            transfer_s = (
                layout.pool_transfer_fixed_s[row] + layout.pool_transfer_per_token_s[row] * job_tokens
            )
            load = rho * max(1.0 - transfer_s / max(service, 1e-12), 0.0)
            kernel_load[column] = load
            uncontended_load[column] = load / pool_slowdown
            compute_load[column] = load * compute_flag
        if x > 0:
            # prefill jobs' calls over this interval's chunk mix (used by the next interval's pool steps)
            pools.prefill_call_s[:] = mix_call_s
        energy_j = _operator_power_w(constants, layout, kernel_load, uncontended_load, compute_load) * dt
    else:
        lm_head = constants.lm_head_row
        decode_size = max(decodes, 1.0)
        # compute-bound kernel seconds per busy second, by the engine's rule: whole unit calls from
        # their compute-bound size on, and the attention of iterations that carry prefill chunks
        compute_per_busy_s = prefill_rate * attention_prefill_s
        for row in range(pool_count):
            decode_call_s = _unit_time_s(constants, row, decode_size)
            decode_compute_s = _unit_compute_s(constants, row, decode_size)
            if row == lm_head:
                # the LM head samples one token per sequence: decodes (+ the finishing prefill)
                prefill_call_s = _unit_time_s(constants, lm_head, decodes + 1.0)
                prefill_compute_s = _unit_compute_s(constants, lm_head, decodes + 1.0)
            else:
                prefill_call_s = prefill_compute_s = 0.0
                for j in range(quantiles + 1):
                    tokens = decodes + prefill_chunks[j]
                    if tokens > 0.0:
                        prefill_call_s += prefill_weights[j] * _unit_time_s(constants, row, tokens)
                        prefill_compute_s += prefill_weights[j] * _unit_compute_s(constants, row, tokens)
            utilisation[constants.pool_columns[row]] = min(
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
        batch_fill[:] = min(mean_tokens / budget, 1.0)
        rate = beta * iterations_per_busy_s
        if rate > 0:
            unit_service_s[:] = utilisation / rate
        # a serving instance's GPUs run kernels while its stream iterates, except during the host
        # overhead of each iteration; loading instances' GPUs idle
        busy = min(beta * max(1.0 - iterations_per_busy_s * host, 0.0), 1.0)
        compute_fraction = min(beta * compute_per_busy_s / busy, 1.0) if busy > 0 else 0.0
        busy_w, idle_w = _gpu_power_w(constants, busy, compute_fraction), _gpu_power_w(constants, 0.0, 0.0)
        energy_j = (layout.serving_gpus * busy_w + (layout.powered - layout.serving_gpus) * idle_w) * dt
    result = IntervalResult(
        served,
        decided,
        slo_met,
        (1.0 - late_share) * ttft_served_mean + late_share * late_s if decided > 0 else 0.0,
        ttft_p50_s,
        ttft_p99_s,
        gap_mean_s if ready and gaps_per_request > 0 else 0.0,
        weighted_quantile(tbt_values, tbt_weights, 0.99),
        ttft_served_mean + gaps_per_request * gap_mean_s,
        served * prompt_mean,
        served * output_mean,
        x * streams * (prefill_s_mean + gaps_per_request * iteration_s),
        backlog_end + streams * x * admission_wait_s,
        energy_j,
        figures,
        fixed_s,
        prob_wait,
        wait_mean_s,
        late_share,
        late_s,
        ttft_served_mean,
        tbt_values,
        tbt_weights,
    )
    next_carry = KernelCarry(
        backlog_end,
        in_service_end,
        decided_waiting,
        iteration_s,
        ttft_carry_s,
        capacity_per_stream,
        prefill_correction,
        attention_slowdown,
        carry.served_total + served,
    )
    return result, next_carry
