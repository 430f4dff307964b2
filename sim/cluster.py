"""Cluster state of the discrete-event engine: GPUs, replicas, memory, placement, busy/power accounting.

Memory per GPU (``GPUSpec.memory_bytes x SimConfig.gpu_memory_fraction`` usable) holds, per resident
replica shard, its weights (:meth:`ModelSpec.weight_bytes` at the replica's TP degree), an activation
buffer (``activation_bytes_per_token x batch cap x 2``: one layer's input and output, reused layer by
layer) and, for attention replicas, the KV cache. An attention replica takes the memory left on its
GPUs after the stateless replicas placed there (split evenly between attention replicas sharing a
GPU); a later stateless replica can only use memory no KV cache holds.

Placement policies (:class:`opscale.sim.deployment.Placement`) choose a TP group of ``tp`` GPUs inside
one node whose free memory fits the replica:

* ``pack``: best fit among powered GPUs (least free memory left), then unpowered ones (fewest GPUs);
* ``spread-gpu``: the GPUs with the fewest resident replicas (least contention), most free memory;
* ``spread-node``: the node with the fewest replicas of this unit, then as ``spread-gpu``;
* ``colocate``: the group with the highest :func:`colocation_affinity` (where the replica's jobs
  stay on their GPU), then as ``pack``.

:meth:`ClusterState.find_group` runs compiled (numba) over per-GPU arrays of free memory and resident
replicas: :class:`ClusterState` keeps memory, residents and powered time only as such arrays
(:class:`PlacementArrays`), which its :class:`GpuState` objects read through.

A GPU is *powered* while any replica (loading, serving or draining) resides on it, *busy* while any
of its replicas runs a call. Busy and compute-bound seconds are integrated per GPU for utilisation and
energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

from opscale.sim.config import SimConfig
from opscale.sim.deployment import Placement, as_placement
from opscale.sim.hardware import ClusterSpec, GPUSpec
from opscale.sim.models import ModelSpec, UnitKind

__all__ = [
    "BUSY_S",
    "BUSY_SINCE",
    "COMPUTE_BOUND_S",
    "BusyArrays",
    "ClusterState",
    "GpuState",
    "PlacementArrays",
    "PlacementError",
    "Replica",
    "ReplicaState",
    "aligned_tp_groups",
    "colocation_affinity",
    "policy_code",
]

_GB = 1e9


def aligned_tp_groups(node_gpus: range, tp: int) -> list[tuple[int, ...]]:
    """The aligned TP-``tp`` groups of one node: ``tp`` consecutive GPUs starting at a multiple of
    ``tp`` from the node's first GPU, as NVLink/NCCL topologies and serving engines lay TP groups out
    (groups of different degrees then nest instead of straddling each other)."""
    return [tuple(range(first, first + tp)) for first in range(node_gpus.start, node_gpus.stop - tp + 1, tp)]


def colocation_affinity(unit: UnitKind, homes: Mapping[UnitKind, Iterable[int]]) -> dict[int, int]:
    """Per GPU, how many of a new ``unit`` replica's jobs would stay there (the ``colocate`` placement).

    The engine serves a job on a replica of its source's GPU first (no transfer). A stateless
    replica's jobs stay local on a GPU whose streams (attention replicas) outnumber the unit's
    replicas there: the affinity is that excess. An attention replica's jobs stay local beside
    stateless replicas that serve no stream of their GPU: the affinity is the most replicas of one
    stateless unit there less the streams there.

    :param homes: per unit, the home (first) GPU of each of its replicas in place (loading or serving).
    :returns: GPU index -> affinity, only where positive.
    """
    counts: dict[UnitKind, dict[int, int]] = {}
    for other, gpus in homes.items():
        per_gpu = counts.setdefault(other, {})
        for gpu in gpus:
            per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    streams = counts.get(UnitKind.ATTENTION, {})
    if unit is UnitKind.ATTENTION:
        local: dict[int, int] = {}
        for other, per_gpu in counts.items():
            if other is not UnitKind.ATTENTION:
                for gpu, count in per_gpu.items():
                    local[gpu] = max(local.get(gpu, 0), count)
        excess = {gpu: count - streams.get(gpu, 0) for gpu, count in local.items()}
    else:
        own = counts.get(unit, {})
        excess = {gpu: count - own.get(gpu, 0) for gpu, count in streams.items()}
    return {gpu: value for gpu, value in excess.items() if value > 0}


class PlacementArrays(NamedTuple):
    """The per-GPU state of a :class:`ClusterState` (the only copy: its :class:`GpuState` objects read
    it), and per node its first GPU and size. ``free_bytes`` is ``capacity_bytes - used_bytes``, stored
    because placement reads it most."""

    used_bytes: NDArray[np.float64]
    free_bytes: NDArray[np.float64]
    residents: NDArray[np.int64]
    capacity_bytes: NDArray[np.float64]
    node_first_gpu: NDArray[np.int64]
    node_gpus: NDArray[np.int64]
    powered_since_s: NDArray[np.float64]
    powered_s: NDArray[np.float64]


#: Columns of :attr:`BusyArrays.floats`.
BUSY_SINCE, BUSY_S, COMPUTE_BOUND_S = 0, 1, 2


class BusyArrays(NamedTuple):
    """Per GPU, the calls running (``calls``) and, in ``floats``, since when it has been busy and its
    busy and compute-bound seconds since the last interval boundary (columns :data:`BUSY_SINCE`,
    :data:`BUSY_S`, :data:`COMPUTE_BOUND_S`)."""

    calls: NDArray[np.int64]
    floats: NDArray[np.float64]


class PlacementError(ValueError):
    """A replica does not fit anywhere (the message names the unit, the need and the best free memory)."""


class ReplicaState(str, Enum):
    """Life cycle of a replica."""

    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    RELEASED = "released"


class GpuState:
    """One GPU: memory, residents and time integrals.

    Memory, residents and powered time live in the per-GPU arrays of the :class:`ClusterState` (compiled
    placement reads and writes them), and so do the busy count and integrals (:class:`BusyArrays`: the
    discrete-event engine's GPU sharing updates them on every call, compiled at operator level); this
    object reads and writes them through.

    :param index: global GPU index.
    :param node: node index.
    :param spec: GPU type.
    :param capacity_bytes: usable memory (HBM x ``gpu_memory_fraction``).
    :param arrays: the cluster's per-GPU arrays.
    """

    __slots__ = ("_arrays", "_busy", "capacity_bytes", "index", "node", "spec")

    def __init__(
        self,
        index: int,
        node: int,
        spec: GPUSpec,
        capacity_bytes: float,
        arrays: PlacementArrays,
        busy: BusyArrays,
    ) -> None:
        self.index = index
        self.node = node
        self.spec = spec
        self.capacity_bytes = capacity_bytes
        self._arrays = arrays
        self._busy = busy

    def __repr__(self) -> str:
        return (
            f"GpuState(index={self.index}, node={self.node}, spec={self.spec.name!r}, used_bytes={self.used_bytes}, "
            f"residents={self.residents}, busy={self.busy})"
        )

    @property
    def used_bytes(self) -> float:
        return float(self._arrays.used_bytes[self.index])

    @property
    def free_bytes(self) -> float:
        return float(self._arrays.free_bytes[self.index])

    @property
    def residents(self) -> int:
        return int(self._arrays.residents[self.index])

    @property
    def busy(self) -> int:
        """Calls running now."""
        return int(self._busy.calls[self.index])

    @busy.setter
    def busy(self, value: int) -> None:
        self._busy.calls[self.index] = value

    @property
    def busy_since_s(self) -> float:
        """Since when the GPU has been busy (while it is)."""
        return float(self._busy.floats[self.index, BUSY_SINCE])

    @busy_since_s.setter
    def busy_since_s(self, value: float) -> None:
        self._busy.floats[self.index, BUSY_SINCE] = value

    @property
    def busy_s(self) -> float:
        """Busy seconds since the last :meth:`ClusterState.take_interval`."""
        return float(self._busy.floats[self.index, BUSY_S])

    @busy_s.setter
    def busy_s(self, value: float) -> None:
        self._busy.floats[self.index, BUSY_S] = value

    @property
    def compute_bound_s(self) -> float:
        """Compute-bound seconds since the last :meth:`ClusterState.take_interval`."""
        return float(self._busy.floats[self.index, COMPUTE_BOUND_S])

    @compute_bound_s.setter
    def compute_bound_s(self, value: float) -> None:
        self._busy.floats[self.index, COMPUTE_BOUND_S] = value


@dataclass(eq=False)
class Replica:
    """One replica of one scaling unit on a TP group of GPUs.

    :param replica_id: unique per simulator run.
    :param unit: the scaling unit.
    :param gpus: global indices of its TP group (first is where its activations leave from).
    :param memory_bytes_per_gpu: weights + activations (+ KV for attention) reserved on each GPU.
    :param batch_cap_tokens: tokens per call (attention: token budget per iteration).
    :param ready_s: when it starts serving (after the weight load).
    :param kv_tokens: attention only: KV-cache capacity in tokens.
    """

    replica_id: int
    unit: UnitKind
    gpus: tuple[int, ...]
    memory_bytes_per_gpu: float
    batch_cap_tokens: int
    ready_s: float
    kv_tokens: int = 0
    state: ReplicaState = ReplicaState.LOADING
    busy: bool = False
    #: busy seconds since the last interval boundary (for per-unit utilisation).
    busy_s: float = 0.0
    busy_since_s: float = 0.0
    #: called once a draining replica has gone idle and left
    on_released: Callable[[Replica], None] | None = None
    #: stateless pools: the jobs of the call in progress, and the pool's completion handler for this
    #: replica (bound once, so a call allocates no closure)
    call_jobs: list[Any] = field(default_factory=list, repr=False)
    on_call_done: Callable[[], None] | None = field(default=None, repr=False)
    #: its row in the compiled call loop's arrays (:mod:`opscale.sim.compiled_pools`; -1: none)
    kernel_slot: int = field(default=-1, repr=False)
    #: TP degree (GPUs in the group) and the GPU its activations leave from (hot-loop attributes)
    tp: int = field(init=False)
    home_gpu: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError(f"replica {self.replica_id} of {self.unit.value!r} has no GPU")
        self.tp = len(self.gpus)
        self.home_gpu = self.gpus[0]


@dataclass
class ClusterState:
    """Mutable GPU state of one simulation.

    :param spec: the cluster.
    :param model: the served model (for weight and KV sizes).
    :param config: engine constants (memory fraction).
    """

    spec: ClusterSpec
    model: ModelSpec
    config: SimConfig
    gpus: list[GpuState] = field(init=False)

    def __post_init__(self) -> None:
        num_gpus = self.spec.num_gpus
        capacity = np.array(
            [
                self.spec.gpu_of(index).memory_bytes * self.config.gpu_memory_fraction
                for index in range(num_gpus)
            ]
        )
        self._placement_arrays = PlacementArrays(
            used_bytes=np.zeros(num_gpus),
            free_bytes=capacity.copy(),
            residents=np.zeros(num_gpus, dtype=np.int64),
            capacity_bytes=capacity,
            node_first_gpu=np.array(
                [self.spec.gpus_of_node(node).start for node in range(len(self.spec.nodes))], dtype=np.int64
            ),
            node_gpus=np.array([node.gpus_per_node for node in self.spec.nodes], dtype=np.int64),
            powered_since_s=np.zeros(num_gpus),
            powered_s=np.zeros(num_gpus),
        )
        self._no_exclusion = np.zeros(num_gpus, dtype=np.bool_)
        self.busy_arrays = BusyArrays(np.zeros(num_gpus, dtype=np.int64), np.zeros((num_gpus, 3)))
        self.gpus = [
            GpuState(
                index=index,
                node=self.spec.node_of(index),
                spec=self.spec.gpu_of(index),
                capacity_bytes=float(capacity[index]),
                arrays=self._placement_arrays,
                busy=self.busy_arrays,
            )
            for index in range(num_gpus)
        ]

    # ------------------------------------------------------------------ memory
    def replica_bytes_per_gpu(self, unit: UnitKind, tp: int, batch_cap_tokens: int) -> float:
        """Weights + activation buffer of one shard of a stateless (or attention, without KV) replica."""
        weights = self.model.weight_bytes(unit, tp)
        activations = 2.0 * self.model.activation_bytes_per_token(unit) * batch_cap_tokens / tp
        return weights + activations

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        """KV bytes one token occupies on each GPU of a TP-``tp`` attention replica (all layers)."""
        return self.model.kv_bytes_per_token(tp)

    def reserve(self, gpus: tuple[int, ...], bytes_per_gpu: float, now_s: float) -> None:
        """Reserve memory on ``gpus`` and count a resident replica on each.

        :raises PlacementError: if any GPU lacks the memory (the message names it and the limit).
        """
        arrays = self._placement_arrays
        for index in gpus:
            if arrays.free_bytes[index] + 1e-3 < bytes_per_gpu:
                gpu = self.gpus[index]
                raise PlacementError(
                    f"GPU {index} ({gpu.spec.name}) has {gpu.free_bytes / _GB:.2f} GB free of "
                    f"{gpu.capacity_bytes / _GB:.2f} GB usable; the replica needs {bytes_per_gpu / _GB:.2f} GB"
                )
        reserve_group(tuple(arrays), np.array(gpus, dtype=np.int64), float(bytes_per_gpu), float(now_s))

    def grow(self, gpus: tuple[int, ...], bytes_per_gpu: float) -> None:
        """Enlarge a resident replica's reservation (an attention replica taking leftover memory for KV)."""
        for index in gpus:
            gpu = self.gpus[index]
            if gpu.free_bytes + 1e-3 < bytes_per_gpu:
                raise PlacementError(
                    f"GPU {index} has {gpu.free_bytes / _GB:.2f} GB free, asked {bytes_per_gpu / _GB:.2f} GB"
                )
        arrays = self._placement_arrays
        for index in gpus:
            arrays.used_bytes[index] += bytes_per_gpu
            arrays.free_bytes[index] = arrays.capacity_bytes[index] - arrays.used_bytes[index]

    def release(self, gpus: tuple[int, ...], bytes_per_gpu: float, now_s: float) -> None:
        """Free a replica's memory; a GPU left with no resident is powered off."""
        release_group(
            tuple(self._placement_arrays), np.array(gpus, dtype=np.int64), float(bytes_per_gpu), float(now_s)
        )

    # ------------------------------------------------------------------ placement
    def find_group(
        self,
        tp: int,
        bytes_per_gpu: float,
        policy: Placement,
        *,
        unit_count_by_node: dict[int, int] | None = None,
        affinity: Mapping[int, int] | None = None,
        exclude: frozenset[int] = frozenset(),
    ) -> tuple[int, ...] | None:
        """A TP group of ``tp`` GPUs in one node, each with ``bytes_per_gpu`` free, chosen by ``policy``;
        ``None`` when no node has one.

        When ``tp`` divides the node's GPU count the group is one of :func:`aligned_tp_groups`: a TP
        call runs at the pace of its most shared GPU, and aligned groups meet as few others as possible.

        :param unit_count_by_node: replicas of the unit per node (``spread-node``).
        :param affinity: per GPU, :func:`colocation_affinity` (``colocate``; absent GPUs count 0).
        :param exclude: GPUs not to use.
        """
        gpus = len(self.gpus)
        affinity_per_gpu = np.zeros(gpus)
        if affinity:
            for index, value in affinity.items():
                affinity_per_gpu[index] = value
        units_per_node = np.zeros(len(self._placement_arrays.node_gpus))
        if unit_count_by_node:
            for node, count in unit_count_by_node.items():
                units_per_node[node] = count
        excluded = np.zeros(gpus, dtype=np.bool_)
        for index in exclude:
            excluded[index] = True
        return self.find_group_per_gpu(tp, bytes_per_gpu, policy, affinity_per_gpu, units_per_node, excluded)

    def find_group_per_gpu(
        self,
        tp: int,
        bytes_per_gpu: float,
        policy: Placement,
        affinity_per_gpu: NDArray[np.float64],
        units_per_node: NDArray[np.float64],
        excluded: NDArray[np.bool_] | None = None,
    ) -> tuple[int, ...] | None:
        """:meth:`find_group` with its inputs as arrays (what a caller that keeps them as arrays passes):
        ``affinity_per_gpu`` per GPU (read only by ``colocate``), ``units_per_node`` per node (read only
        by ``spread-node``), ``excluded`` per GPU (``None``: none)."""
        arrays = self._placement_arrays
        group = _find_group(
            arrays.free_bytes,
            arrays.residents,
            arrays.node_first_gpu,
            arrays.node_gpus,
            int(tp),
            float(bytes_per_gpu),  # one compiled signature, whatever number type the caller has
            policy_code(policy),
            affinity_per_gpu,
            units_per_node,
            self._no_exclusion if excluded is None else excluded,
        )
        return tuple(group.tolist()) if group.size else None

    def placement_arrays(self) -> PlacementArrays:
        """The arrays compiled placement reads (live views: do not write them)."""
        return self._placement_arrays

    def best_free_bytes(self) -> float:
        """Largest free memory on any GPU (error messages, and a quick no-room test before placing)."""
        return float(self._placement_arrays.free_bytes.max())

    def check_gpus_exist(self, gpus: tuple[int, ...], what: str) -> None:
        """:raises ValueError: if a GPU index is outside the cluster (names it and the range)."""
        for index in gpus:
            if not 0 <= index < len(self.gpus):
                raise ValueError(
                    f"{what} placed on GPU {index}, which does not exist; the cluster has GPUs 0..{len(self.gpus) - 1}"
                )

    # ------------------------------------------------------------------ busy / power accounting
    def take_interval(self, now_s: float) -> list[tuple[GPUSpec, float, float, float]]:
        """Per GPU ``(spec, powered_s, busy_s, compute_bound_s)`` since the previous call; resets them."""
        arrays = self._placement_arrays
        powered = arrays.residents > 0
        arrays.powered_s[powered] += now_s - arrays.powered_since_s[powered]
        arrays.powered_since_s[powered] = now_s
        powered_s = arrays.powered_s.tolist()
        arrays.powered_s[:] = 0.0
        out = []
        for gpu in self.gpus:
            if gpu.busy:
                gpu.busy_s += now_s - gpu.busy_since_s
                gpu.busy_since_s = now_s
            out.append((gpu.spec, powered_s[gpu.index], gpu.busy_s, min(gpu.compute_bound_s, gpu.busy_s)))
            gpu.busy_s = gpu.compute_bound_s = 0.0
        return out

    @property
    def gpus_powered(self) -> int:
        """GPUs holding at least one replica."""
        return int(np.count_nonzero(self._placement_arrays.residents))

    def release_order(
        self, gpus: tuple[int, ...], leaving: Mapping[int, int] | None = None
    ) -> tuple[int, float]:
        """Sort key for scale-down: replicas whose GPUs empty out soonest come first.

        Removing the replica on the GPU with the fewest resident replicas, then the least memory used,
        is what lets a GPU be released (zero power); removing from a crowded GPU releases nothing.

        :param gpus: the replica's GPU group.
        :param leaving: per GPU, residents already on their way out (draining): they do not count, so
            that the units of one action leave the same GPU although the first one drains for a while.
        :returns: (most residents staying on any GPU of the group, most bytes used on any GPU of it).
        """
        if leaving:
            staying = max(self.gpus[i].residents - leaving.get(i, 0) for i in gpus)
        else:
            staying = max(self.gpus[i].residents for i in gpus)
        return staying, max(self.gpus[i].used_bytes for i in gpus)

    def memory_used_bytes(self) -> list[float]:
        return self._placement_arrays.used_bytes.tolist()


@njit(cache=True)
def reserve_group(cluster: tuple, gpus: NDArray[np.int64], bytes_per_gpu: float, now_s: float) -> None:
    """Count a resident replica of ``bytes_per_gpu`` on each of ``gpus`` (negative entries end the group:
    slot-table padding); a GPU that gets its first resident is powered from ``now_s``. ``cluster`` is a
    :class:`PlacementArrays` as a plain tuple (``tuple(arrays)``: cheaper to pass), written in place.
    The caller has checked the room."""
    arrays = PlacementArrays(*cluster)
    for gpu in gpus:
        if gpu < 0:
            break
        if arrays.residents[gpu] == 0:
            arrays.powered_since_s[gpu] = now_s
        arrays.residents[gpu] += 1
        arrays.used_bytes[gpu] += bytes_per_gpu
        arrays.free_bytes[gpu] = arrays.capacity_bytes[gpu] - arrays.used_bytes[gpu]


@njit(cache=True)
def release_group(cluster: tuple, gpus: NDArray[np.int64], bytes_per_gpu: float, now_s: float) -> None:
    """Undo :func:`reserve_group`; a GPU left with no resident stops being powered at ``now_s``."""
    arrays = PlacementArrays(*cluster)
    for gpu in gpus:
        if gpu < 0:
            break
        arrays.used_bytes[gpu] = max(0.0, arrays.used_bytes[gpu] - bytes_per_gpu)
        arrays.free_bytes[gpu] = arrays.capacity_bytes[gpu] - arrays.used_bytes[gpu]
        arrays.residents[gpu] -= 1
        if arrays.residents[gpu] == 0:
            arrays.powered_s[gpu] += now_s - arrays.powered_since_s[gpu]


#: :func:`_find_group`'s policy codes
_PACK, _SPREAD_GPU, _SPREAD_NODE, _COLOCATE = 0, 1, 2, 3
_POLICY_CODES = {
    Placement.PACK: _PACK,
    Placement.SPREAD_GPU: _SPREAD_GPU,
    Placement.SPREAD_NODE: _SPREAD_NODE,
    Placement.COLOCATE: _COLOCATE,
}


def policy_code(policy: Placement | str) -> int:
    """The compiled placement's code of ``policy`` (a policy or its name)."""
    code = _POLICY_CODES.get(policy) if isinstance(policy, Placement) else None
    # as_placement: a name set after construction reads as its policy, not spread-node
    return _POLICY_CODES[as_placement(policy)] if code is None else code


@njit(cache=True)
def _gpu_rank(
    policy: int,
    gpu: int,
    free_bytes: NDArray[np.float64],
    residents: NDArray[np.int64],
    affinity: NDArray[np.float64],
) -> tuple[float, float, float, float]:
    """A GPU's place in its policy's order (lower first; the index breaks ties): ``pack`` best fit among
    powered GPUs, then unpowered ones; ``colocate`` the highest affinity, then as ``pack``; the spreads
    the fewest residents, then the most free memory."""
    unpowered = 1.0 if residents[gpu] == 0 else 0.0
    if policy == _PACK:
        return 0.0, unpowered, free_bytes[gpu], float(gpu)
    if policy == _COLOCATE:
        return -affinity[gpu], unpowered, free_bytes[gpu], float(gpu)
    return 0.0, float(residents[gpu]), -free_bytes[gpu], float(gpu)


@njit(cache=True)
def _group_key(
    policy: int,
    group: NDArray[np.int64],
    node: int,
    free_bytes: NDArray[np.float64],
    residents: NDArray[np.int64],
    affinity: NDArray[np.float64],
    units_per_node: NDArray[np.float64],
) -> tuple[float, float, float, float]:
    """A candidate group's place among the nodes' groups (lower first; the node breaks ties)."""
    unpowered = free = resident = affine = 0.0
    for gpu in group:
        unpowered += 1.0 if residents[gpu] == 0 else 0.0
        free += free_bytes[gpu]
        resident += residents[gpu]
        affine += affinity[gpu]
    if policy == _PACK:
        return 0.0, unpowered, free, float(node)
    if policy == _COLOCATE:
        return -affine, unpowered, free, float(node)
    if policy == _SPREAD_GPU:
        return 0.0, resident, -free, float(node)
    return units_per_node[node], resident, -free, float(node)


@njit(cache=True)
def _find_group(
    free_bytes: NDArray[np.float64],
    residents: NDArray[np.int64],
    node_first_gpu: NDArray[np.int64],
    node_gpus: NDArray[np.int64],
    tp: int,
    bytes_per_gpu: float,
    policy: int,
    affinity: NDArray[np.float64],
    units_per_node: NDArray[np.float64],
    excluded: NDArray[np.bool_],
) -> NDArray[np.int64]:
    """:meth:`ClusterState.find_group` over the per-GPU arrays: the chosen group's GPUs, ascending
    (empty: none fits). Per node, the candidate GPUs have room and are not excluded; with aligned TP
    groups (``tp`` divides the node) every aligned group of candidates competes, otherwise the first
    ``tp`` candidates in the policy's GPU order; the best group over the nodes wins (first on ties)."""
    best_key = (math.inf, math.inf, math.inf, math.inf)
    best = np.empty(0, dtype=np.int64)
    for node in range(node_first_gpu.size):
        first, size = node_first_gpu[node], node_gpus[node]
        fits = np.zeros(size, dtype=np.bool_)
        for offset in range(size):
            gpu = first + offset
            fits[offset] = not excluded[gpu] and free_bytes[gpu] + 1e-3 >= bytes_per_gpu
        if fits.sum() < tp:
            continue
        if tp > 1 and size % tp == 0:
            for start in range(0, size - tp + 1, tp):
                if fits[start : start + tp].all():
                    group = np.arange(first + start, first + start + tp)
                    key = _group_key(policy, group, node, free_bytes, residents, affinity, units_per_node)
                    if key < best_key:
                        best_key, best = key, group
            continue
        # the first tp candidates of the policy's order (ranks are distinct: the index is in them)
        group = np.empty(tp, dtype=np.int64)
        taken = ~fits
        for slot in range(tp):
            chosen = -1
            chosen_rank = (math.inf, math.inf, math.inf, math.inf)
            for offset in range(size):
                if not taken[offset]:
                    rank = _gpu_rank(policy, first + offset, free_bytes, residents, affinity)
                    if rank < chosen_rank:
                        chosen, chosen_rank = offset, rank
            taken[chosen] = True
            group[slot] = first + chosen
        key = _group_key(policy, group, node, free_bytes, residents, affinity, units_per_node)
        if key < best_key:
            best_key, best = key, np.sort(group)
    return best
