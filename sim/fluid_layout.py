"""Replica placement and memory bookkeeping of the fluid simulator.

The fluid simulator places replicas with the discrete-event engine's own :class:`ClusterState`
(memory per GPU, the ``pack`` / ``spread-gpu`` / ``spread-node`` / ``colocate`` policies) and follows the engine's
placement order and memory rules (:mod:`opscale.sim.engine`), so both fidelities power the same GPUs
for the same deployment and actions:

* a model-level instance takes ``tp x pp`` GPUs (``pack``) holding its weights, one activation buffer
  and, as KV cache, all the memory left; it runs ``pp`` streams, each with ``1/pp`` of the KV cache;
* an operator-level deployment places the stateless replicas first (model order), then the attention
  replicas with a minimum KV cache (the longest request, at least 16 blocks); once all are placed the
  memory left on each GPU is shared evenly among the attention replicas there;
* an attention replica added later takes the smallest start-up share of KV cache, or the memory left
  on its GPUs if less (at least the minimum);
* a scale-down takes a unit's replicas in the engine's order (loading first, then those whose GPUs
  empty out soonest) and always leaves one.

Placed replicas are rows of a slot table (numpy arrays) and the cluster's memory lives in
:class:`~opscale.sim.cluster.ClusterState`'s per-GPU arrays, so an action's scaling runs compiled in one
call (:meth:`FluidLayout.scale`). What the fluid model needs from a placement is summarised by
:meth:`FluidLayout.serving_summary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from numpy.typing import NDArray

from opscale.sim.cluster import (
    ClusterState,
    PlacementArrays,
    PlacementError,
    _find_group,
    policy_code,
    release_group,
    reserve_group,
)
from opscale.sim.config import SimConfig
from opscale.sim.deployment import Placement
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import ModelSpec, UnitKind

__all__ = ["FluidLayout", "PlacedReplica", "ServingSummary"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Slot-table column of a model-level instance (a replica of every unit) and of a free slot.
INSTANCE_SLOT, FREE_SLOT = -1, -2

#: Smallest KV cache of a replica, in blocks (the engine's rule).
MIN_KV_BLOCKS = 16


@dataclass(frozen=True)
class PlacedReplica:
    """One replica (or one model-level instance) as the fluid simulator has placed it: a read-only view
    of its row in :class:`FluidLayout`'s slot table.

    :param gpus: its GPU group.
    :param bytes_per_gpu: memory reserved on each of them.
    :param ready_s: when it starts serving.
    :param kv_tokens: KV capacity in tokens (attention replicas and instances; per instance, all streams).
    :param slot: its row in the slot table.
    """

    gpus: tuple[int, ...]
    bytes_per_gpu: float
    ready_s: float
    kv_tokens: float
    slot: int


@dataclass(frozen=True)
class ServingSummary:
    """The replicas serving at one moment, as the fluid model reads them.

    :param replicas: per unit (model order), replicas serving (model level: instances).
    :param pending: per unit, replicas still loading.
    :param homes: ``[units, GPUs]``: per unit, how many serving replicas start on each GPU (their first
        GPU, where their activations leave from).
    :param gpu_shards: ``[GPUs holding a serving shard, units]``: each such GPU's serving shards per unit
        (GPU order; GPUs without one are left out).
    :param kv_tokens: KV capacity of each serving attention replica (model level: each instance).
    :param next_ready_s: earliest ready time of a loading replica (``inf`` when none loads): the
        summary holds until then.
    """

    replicas: tuple[int, ...]
    pending: tuple[int, ...]
    homes: FloatArray
    gpu_shards: FloatArray
    kv_tokens: FloatArray
    next_ready_s: float

    @property
    def active_gpus(self) -> int:
        """GPUs holding at least one serving shard."""
        return int(self.gpu_shards.shape[0])


@dataclass
class FluidLayout:
    """Placement state: the replicas of every unit (or the instances) on the cluster's GPUs.

    The replicas are rows of a slot table (numpy arrays, what the compiled placement, scaling and
    summary read and write): per slot the unit column (``INSTANCE_SLOT`` for a model-level instance,
    ``FREE_SLOT``), the GPU group (padded with -1), the ready time, the KV tokens, the bytes reserved per
    GPU and a placement sequence number (the order replicas were placed in, which breaks scale-down
    ties). :attr:`replicas` and :attr:`instances` read it as :class:`PlacedReplica` records.

    :param cluster: the cluster.
    :param model: the model.
    :param config: engine constants (memory fraction, KV block size).
    :param min_kv_tokens: smallest KV cache an attention replica is placed with (the longest request).
    """

    cluster: ClusterSpec
    model: ModelSpec
    config: SimConfig
    min_kv_tokens: int = 0
    state: ClusterState = field(init=False)
    # KV tokens a run-time-added attention replica reserves (the engine's rule): the smallest start-up share
    added_attention_kv_tokens: int = field(init=False, default=0)
    _replica_bytes: dict[tuple[UnitKind, int, int], float] = field(
        init=False, default_factory=dict, repr=False
    )
    _instance_weight_bytes: dict[int, float] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.state = ClusterState(self.cluster, self.model, self.config)
        self.min_kv_tokens = max(self.min_kv_tokens, self.config.kv_block_tokens * MIN_KV_BLOCKS)
        self._columns = {unit: column for column, unit in enumerate(self.model.units)}
        self._node_of_gpu = np.array(
            [self.cluster.node_of(gpu) for gpu in range(self.cluster.num_gpus)], np.int64
        )
        self._node_count = len(self.cluster.nodes)
        self._slot_column = np.full(0, FREE_SLOT, dtype=np.int64)
        self._slot_gpus = np.full((0, max(node.gpus_per_node for node in self.cluster.nodes)), -1, np.int64)
        self._slot_ready_s = np.zeros(0)
        self._slot_kv_tokens = np.zeros(0)
        self._slot_bytes = np.zeros(0)
        self._slot_sequence = np.zeros(0, dtype=np.int64)
        #: free slots, the next one taken last (a stack: a released slot is the next one reused)
        self._free_slots: list[int] = []
        self._next_sequence = 0
        self._no_exclusion = np.zeros(self.cluster.num_gpus, dtype=np.bool_)
        #: replicas a move replaces: (slot, placement sequence, the replacement's slot and sequence, when
        #: the replacement serves)
        self._departures: list[tuple[int, int, int, int, float]] = []

    def _reserve_slots(self, count: int) -> list[int]:
        """The next ``count`` free slots in the order they are taken (the table grows when short)."""
        if len(self._free_slots) < count:
            size = self._slot_column.size
            grow = max(size, 32, count)
            self._slot_column = np.concatenate([self._slot_column, np.full(grow, FREE_SLOT, np.int64)])
            self._slot_gpus = np.concatenate(
                [self._slot_gpus, np.full((grow, self._slot_gpus.shape[1]), -1, np.int64)]
            )
            self._slot_ready_s = np.concatenate([self._slot_ready_s, np.zeros(grow)])
            self._slot_kv_tokens = np.concatenate([self._slot_kv_tokens, np.zeros(grow)])
            self._slot_bytes = np.concatenate([self._slot_bytes, np.zeros(grow)])
            self._slot_sequence = np.concatenate([self._slot_sequence, np.zeros(grow, np.int64)])
            # the new slots are taken after the free ones, lowest first
            self._free_slots[:0] = range(size + grow - 1, size - 1, -1)
        return self._free_slots[: -count - 1 : -1]

    def _slot_table(self) -> tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray, IntArray]:
        """The slot table's arrays, as :func:`_apply_scaling` takes them."""
        return (
            self._slot_column,
            self._slot_gpus,
            self._slot_ready_s,
            self._slot_kv_tokens,
            self._slot_bytes,
            self._slot_sequence,
        )

    def _occupy_slot(
        self, column: int, gpus: tuple[int, ...], bytes_per_gpu: float, ready_s: float, kv_tokens: float = 0.0
    ) -> None:
        """Record a replica (of unit ``column``, or ``INSTANCE_SLOT``) placed on ``gpus`` (reserved)."""
        (slot,) = self._reserve_slots(1)
        self._free_slots.pop()
        self._slot_column[slot] = column
        self._slot_gpus[slot] = gpus + (-1,) * (self._slot_gpus.shape[1] - len(gpus))
        self._slot_ready_s[slot] = ready_s
        self._slot_kv_tokens[slot] = kv_tokens
        self._slot_bytes[slot] = bytes_per_gpu
        self._slot_sequence[slot] = self._next_sequence
        self._next_sequence += 1

    def _placed(self, column: int) -> list[PlacedReplica]:
        """The replicas in slots of ``column``, in placement order."""
        slots = np.flatnonzero(self._slot_column == column)
        slots = slots[np.argsort(self._slot_sequence[slots])]
        return [
            PlacedReplica(
                gpus=tuple(gpu for gpu in self._slot_gpus[slot].tolist() if gpu >= 0),
                bytes_per_gpu=float(self._slot_bytes[slot]),
                ready_s=float(self._slot_ready_s[slot]),
                kv_tokens=float(self._slot_kv_tokens[slot]),
                slot=int(slot),
            )
            for slot in slots
        ]

    @property
    def replicas(self) -> dict[UnitKind, list[PlacedReplica]]:
        """Per unit, its replicas (loading or serving) in placement order (read-only records)."""
        return {unit: self._placed(column) for unit, column in self._columns.items()}

    def replicas_of(self, unit: UnitKind) -> list[PlacedReplica]:
        """``replicas[unit]``, without reading the other units."""
        return self._placed(self._columns[unit])

    @property
    def instances(self) -> list[PlacedReplica]:
        """The model-level instances in placement order (read-only records)."""
        return self._placed(INSTANCE_SLOT)

    def replica_count(self, unit: UnitKind) -> int:
        """Replicas of ``unit`` placed (loading or serving)."""
        return int(np.count_nonzero(self._slot_column == self._columns[unit]))

    def instance_count(self) -> int:
        """Model-level instances placed (loading or serving)."""
        return int(np.count_nonzero(self._slot_column == INSTANCE_SLOT))

    def replica_counts(self, now_s: float) -> tuple[list[int], list[int]]:
        """Per unit (model order), the replicas serving at ``now_s`` and those still loading; an instance
        counts as a replica of every unit."""
        columns = len(self._columns)
        placed = self._slot_column
        serving = self._slot_ready_s <= now_s
        instances = placed == INSTANCE_SLOT
        units = placed >= 0
        serving_counts = np.bincount(placed[units & serving], minlength=columns)
        loading_counts = np.bincount(placed[units & ~serving], minlength=columns)
        serving_counts += int(np.count_nonzero(instances & serving))
        loading_counts += int(np.count_nonzero(instances & ~serving))
        return serving_counts.tolist(), loading_counts.tolist()

    # ------------------------------------------------------------------ model level
    def place_instance(self, tp: int, pp: int, token_budget: int, ready_s: float, now_s: float) -> bool:
        """Place one instance; ``False`` when no node has ``tp x pp`` GPUs with room."""
        weights = self._instance_weight_bytes.get(tp)
        if weights is None:  # memoised: the sum over units is asked for every added instance
            weights = self._instance_weight_bytes[tp] = self.model.total_weight_bytes(tp)
        model = self.model
        need = weights / pp + model.hidden_size * model.dtype_bytes * token_budget / tp
        kv_per_token = model.kv_bytes_per_token(tp) / pp
        group = self.state.find_group(
            tp * pp, need + kv_per_token * self.config.kv_block_tokens * MIN_KV_BLOCKS, Placement.PACK
        )
        if group is None:
            return False
        free = min(self.state.gpus[i].free_bytes for i in group)
        kv_tokens = int((free - need) / kv_per_token)
        bytes_per_gpu = need + kv_tokens * kv_per_token
        self.state.reserve(group, bytes_per_gpu, now_s)
        self._occupy_slot(INSTANCE_SLOT, group, bytes_per_gpu, ready_s, float(kv_tokens))
        return True

    def remove(self, replica: PlacedReplica, now_s: float) -> None:
        """Release ``replica`` (a unit's replica or an instance) and free its slot."""
        self._release_slot(replica.slot, replica.gpus, replica.bytes_per_gpu, now_s)

    def _release_slot(self, slot: int, gpus: tuple[int, ...], bytes_per_gpu: float, now_s: float) -> None:
        self.state.release(gpus, bytes_per_gpu, now_s)
        self._slot_column[slot] = FREE_SLOT
        self._free_slots.append(slot)

    # ------------------------------------------------------------------ operator level: start-up
    def place_stateless(
        self,
        unit: UnitKind,
        tp: int,
        batch_cap_tokens: int,
        policy: Placement,
        explicit: tuple[int, ...] | None = None,
    ) -> bool:
        """Place one start-up replica of a non-attention unit (ready at once); ``False`` when it fits
        nowhere."""
        need = self.replica_bytes_per_gpu(unit, tp, batch_cap_tokens)
        group = self._group(unit, tp, need, policy, explicit)
        if group is None:
            return False
        self.state.reserve(group, need, 0.0)
        self._occupy_slot(self._columns[unit], group, need, 0.0)
        return True

    def place_attention(
        self, tp: int, token_budget: int, policy: Placement, explicit: tuple[int, ...] | None = None
    ) -> bool:
        """Place one start-up attention replica (ready at once) with the minimum KV cache;
        :meth:`share_attention_memory` spreads the rest once every replica is placed. ``False`` when it
        fits nowhere."""
        unit = UnitKind.ATTENTION
        base = self.replica_bytes_per_gpu(unit, tp, token_budget)
        kv_per_token = self.model.kv_bytes_per_token(tp)
        group = self._group(unit, tp, base + kv_per_token * self.min_kv_tokens, policy, explicit)
        if group is None:
            return False
        need = base + self.min_kv_tokens * kv_per_token
        self.state.reserve(group, need, 0.0)
        self._occupy_slot(self._columns[unit], group, need, 0.0, float(self.min_kv_tokens))
        return True

    def share_attention_memory(self) -> None:
        """Give every attention replica an even share of the memory left on its GPUs (in whole blocks)."""
        attention = self.replicas_of(UnitKind.ATTENTION)
        sharers: dict[int, int] = {}
        for replica in attention:
            for index in replica.gpus:
                sharers[index] = sharers.get(index, 0) + 1
        free = {index: self.state.gpus[index].free_bytes for index in sharers}
        block = self.config.kv_block_tokens
        for replica in attention:
            kv_per_token = self.model.kv_bytes_per_token(len(replica.gpus))
            extra_bytes = min(free[i] / sharers[i] for i in replica.gpus)
            extra_blocks = int(extra_bytes / kv_per_token) // block
            grow = extra_blocks * block * kv_per_token
            self.state.grow(replica.gpus, grow)
            self._slot_bytes[replica.slot] += grow
            # the engine's stream holds whole blocks: (initial tokens // block + extra blocks) * block
            self._slot_kv_tokens[replica.slot] = float(
                (int(replica.kv_tokens) // block + extra_blocks) * block
            )
        kv_tokens = self._slot_kv_tokens[self._slot_column == self._columns[UnitKind.ATTENTION]]
        self.added_attention_kv_tokens = int(kv_tokens.min()) if kv_tokens.size else 0

    def _group(
        self, unit: UnitKind, tp: int, need: float, policy: Placement, explicit: tuple[int, ...] | None
    ) -> tuple[int, ...] | None:
        if explicit is not None:
            if any(self.state.gpus[i].free_bytes + 1e-3 < need for i in explicit):
                return None
            return explicit
        affinity, units_per_node = _placement_context(
            self._slot_column,
            self._slot_gpus,
            len(self._columns),
            self._columns[unit],
            self._columns[UnitKind.ATTENTION],
            self._node_of_gpu,
            self._node_count,
        )
        return self.state.find_group_per_gpu(tp, need, policy, affinity, units_per_node)

    # ------------------------------------------------------------------ operator level: scaling
    def scaling_constants(
        self, unit: UnitKind, tp: int, batch_cap_tokens: int, policy: Placement
    ) -> tuple[int, int, float, float, int]:
        """The part of a :meth:`scale` row fixed by the unit's configuration: ``(unit column, TP degree,
        bytes per GPU of an added replica (attention: before its KV cache), KV bytes per token (attention;
        else 0), placement code)``."""
        column = self._columns[unit]
        kv_bytes_per_token = self.model.kv_bytes_per_token(tp) if unit is UnitKind.ATTENTION else 0.0
        need_bytes = self.replica_bytes_per_gpu(unit, tp, batch_cap_tokens)
        return column, tp, need_bytes, kv_bytes_per_token, policy_code(policy)

    def scale(
        self, rows: list[tuple[float, ...]], now_s: float, excluded: NDArray[np.bool_] | None = None
    ) -> list[int]:
        """Scale units in order, in one compiled call; returns per row the replicas added (> 0) or removed
        (< 0). A row is ``(unit column, replica delta, TP degree, bytes per GPU, KV bytes per token,
        placement code, ready time of added replicas)``: :meth:`scaling_constants` with the delta and the
        ready time.

        A removal takes the unit's replicas in the engine's scale-down order (loading ones first, then
        the one whose GPUs empty out soonest: :meth:`ClusterState.release_order`, fewest residents, then
        least memory used, on the group's most crowded GPU; then the most recently added, where the
        engine takes an idle replica before a busy one, a state the fluid does not track; ties keep
        placement order) and always leaves one. An addition places replicas one after the other by the
        row's policy, as the engine does, until one does not fit. An added attention replica takes the
        smallest start-up share of KV cache (:attr:`added_attention_kv_tokens`), or the memory left if
        less (at least the minimum). Added replicas avoid the GPUs ``excluded`` marks (per GPU; ``None``:
        none).
        """
        if not rows:
            return []
        additions = 0
        for row in rows:
            if row[1] > 0:
                additions += int(row[1])
        self._reserve_slots(additions)
        changes, free_slots, placed = _apply_scaling(
            self._slot_table(),
            np.array(self._free_slots, dtype=np.int64),
            tuple(self.state.placement_arrays()),
            self._node_of_gpu,
            len(self._columns),
            self._columns[UnitKind.ATTENTION],
            np.array(rows, dtype=np.float64),
            float(self.min_kv_tokens),
            float(self.added_attention_kv_tokens),
            self._next_sequence,
            float(now_s),
            self._no_exclusion if excluded is None else excluded,
        )
        self._free_slots = free_slots.tolist()
        self._next_sequence += placed
        return changes.tolist()

    def move(self, row: tuple[float, ...], count: int, now_s: float) -> int:
        """Make-before-break moves, as the engine makes them: up to ``count`` of the unit's serving
        replicas, those on the most crowded GPUs first (residents before any move; ties in placement
        order), each get a new replica placed by the row's policy off their GPUs, ready at the row's
        ready time; the old one leaves once the new one serves (:meth:`depart`). ``row`` is the
        :meth:`scale` row that adds one such replica. Returns the replicas moved (a candidate whose new
        replica fits nowhere stays)."""
        column, ready_s = int(row[0]), row[6]
        slots = np.flatnonzero((self._slot_column == column) & (self._slot_ready_s <= now_s))
        slots = slots[np.argsort(self._slot_sequence[slots], kind="stable")]
        residents = self.state.placement_arrays().residents
        gpus_of = [[gpu for gpu in self._slot_gpus[slot].tolist() if gpu >= 0] for slot in slots]
        crowding = [max(int(residents[gpu]) for gpu in gpus) for gpus in gpus_of]
        order = sorted(range(len(slots)), key=lambda candidate: -crowding[candidate])
        moved = 0
        for candidate in order[:count]:
            excluded = np.zeros(self.cluster.num_gpus, dtype=np.bool_)
            excluded[gpus_of[candidate]] = True
            if self.scale([row], now_s, excluded)[0] == 1:
                slot = int(slots[candidate])
                new_sequence = self._next_sequence - 1  # the replica just placed
                (new_slot,) = np.flatnonzero(
                    (self._slot_sequence == new_sequence) & (self._slot_column == column)
                )
                self._departures.append(
                    (slot, int(self._slot_sequence[slot]), int(new_slot), new_sequence, ready_s)
                )
                moved += 1
        return moved

    @property
    def departures_pending(self) -> bool:
        """Whether a moved replica still waits for its replacement to serve."""
        return bool(self._departures)

    def depart(self, serving_at_s: float, now_s: float) -> bool:
        """Release the replicas whose replacements serve at ``serving_at_s`` (the fluid counts a replica as
        serving a whole interval from the interval it is ready by the middle of), at ``now_s``. As in the
        engine, a replacement removed while it loaded (scale-down takes loading replicas first) leaves the
        old replica in place, and an old replica removed since is not removed twice. Returns whether any
        left."""
        staying: list[tuple[int, int, int, int, float]] = []
        left = False
        for departure in self._departures:
            slot, sequence, new_slot, new_sequence, serves_s = departure
            if serves_s > serving_at_s:
                staying.append(departure)
            elif self._placed_as(slot, sequence) and self._placed_as(new_slot, new_sequence):
                gpus = tuple(gpu for gpu in self._slot_gpus[slot].tolist() if gpu >= 0)
                self._release_slot(slot, gpus, float(self._slot_bytes[slot]), now_s)
                left = True
        self._departures = staying
        return left

    def _placed_as(self, slot: int, sequence: int) -> bool:
        """Whether ``slot`` still holds the replica placed ``sequence``-th (slots are reused)."""
        return bool(self._slot_column[slot] != FREE_SLOT and self._slot_sequence[slot] == sequence)

    # ------------------------------------------------------------------ summaries
    def serving_summary(self, serving_at_s: float) -> ServingSummary:
        """What the fluid model needs from the replicas serving at ``serving_at_s`` (``ready_s`` at or
        before it), in the model's unit order; model level: every instance counts as a replica of every
        unit."""
        replicas, pending, next_ready_s, homes, shards, kv_tokens = _summarise_slots(
            self._slot_column,
            self._slot_gpus,
            self._slot_ready_s,
            self._slot_kv_tokens,
            serving_at_s,
            len(self._columns),
            self.cluster.num_gpus,
            self._columns[UnitKind.ATTENTION],
        )
        return ServingSummary(
            replicas=tuple(replicas.tolist()),
            pending=tuple(pending.tolist()),
            homes=homes,
            gpu_shards=shards,
            kv_tokens=kv_tokens,
            next_ready_s=next_ready_s,
        )

    def replica_bytes_per_gpu(self, unit: UnitKind, tp: int, batch_cap_tokens: int) -> float:
        """:meth:`ClusterState.replica_bytes_per_gpu`, memoised (it depends only on its arguments, and
        random scaling actions ask it for every added replica)."""
        key = (unit, tp, batch_cap_tokens)
        need = self._replica_bytes.get(key)
        if need is None:
            need = self._replica_bytes[key] = self.state.replica_bytes_per_gpu(unit, tp, batch_cap_tokens)
        return need

    def placement_error(self, what: str, tp: int, need_bytes: float) -> PlacementError:
        """A :class:`PlacementError` naming ``what`` did not fit and the best free memory."""
        return PlacementError(
            f"deployment does not fit: {what} at tp={tp} needs {need_bytes / 1e9:.2f} GB per GPU; the best GPU has "
            f"{self.state.best_free_bytes() / 1e9:.2f} GB free of {self.state.gpus[0].capacity_bytes / 1e9:.1f} GB usable "
            f"({len(self.state.gpus)} GPUs)"
        )


@njit(cache=True)
def _summarise_slots(
    slot_column: IntArray,
    slot_gpus: IntArray,
    slot_ready_s: FloatArray,
    slot_kv_tokens: FloatArray,
    serving_at_s: float,
    columns: int,
    num_gpus: int,
    attention_column: int,
) -> tuple[IntArray, IntArray, float, FloatArray, FloatArray, FloatArray]:
    """:meth:`FluidLayout.serving_summary` over the slot table: per unit the serving and loading
    replicas, the earliest ready time of a loading one, home GPUs ``[units, GPUs]``, serving shards
    ``[GPUs holding one, units]`` and the KV tokens of the serving attention replicas (or instances)."""
    replicas = np.zeros(columns, dtype=np.int64)
    pending = np.zeros(columns, dtype=np.int64)
    homes = np.zeros((columns, num_gpus))
    shards = np.zeros((num_gpus, columns))
    kv_tokens = np.empty(slot_column.size)
    serving_kv = 0
    next_ready_s = math.inf
    for slot in range(slot_column.size):
        column = slot_column[slot]
        if column == FREE_SLOT:
            continue
        first, last = (0, columns) if column == INSTANCE_SLOT else (column, column + 1)
        if slot_ready_s[slot] > serving_at_s:
            pending[first:last] += 1
            next_ready_s = min(next_ready_s, slot_ready_s[slot])
            continue
        replicas[first:last] += 1
        homes[first:last, slot_gpus[slot, 0]] += 1.0
        for gpu in slot_gpus[slot]:
            if gpu < 0:
                break
            shards[gpu, first:last] += 1.0
        if first <= attention_column < last:
            kv_tokens[serving_kv] = slot_kv_tokens[slot]
            serving_kv += 1
    holding = 0  # the GPUs holding a serving shard, in GPU order
    for gpu in range(num_gpus):
        if shards[gpu].any():
            shards[holding] = shards[gpu]
            holding += 1
    return replicas, pending, next_ready_s, homes, shards[:holding].copy(), kv_tokens[:serving_kv]


@njit(cache=True)
def _scale_down_order(
    slots: IntArray,
    slot_gpus: IntArray,
    slot_ready_s: FloatArray,
    residents: IntArray,
    used_bytes: FloatArray,
    now_s: float,
    count: int,
) -> IntArray:
    """The engine's scale-down order (see :meth:`FluidLayout.scale`) over the slot table: positions in
    ``slots`` (a unit's replicas in placement order) of the first ``count`` by key (serving, most
    residents on a GPU of the group, most bytes used on one, -ready time), the earlier position first on
    ties (a stable sort's order)."""
    keys = np.empty((slots.size, 4))
    for position in range(slots.size):
        slot = slots[position]
        staying = 0
        used = 0.0
        for gpu in slot_gpus[slot]:
            if gpu < 0:
                break
            staying = max(staying, residents[gpu])
            used = max(used, used_bytes[gpu])
        ready_s = slot_ready_s[slot]
        keys[position, 0] = 1.0 if ready_s <= now_s else 0.0
        keys[position, 1] = staying
        keys[position, 2] = used
        keys[position, 3] = -ready_s
    taken = np.zeros(slots.size, dtype=np.bool_)
    order = np.empty(min(count, slots.size), dtype=np.int64)
    for rank in range(order.size):
        best = -1
        for position in range(slots.size):
            if taken[position]:
                continue
            if best < 0 or (
                keys[position, 0],
                keys[position, 1],
                keys[position, 2],
                keys[position, 3],
            ) < (keys[best, 0], keys[best, 1], keys[best, 2], keys[best, 3]):
                best = position
        taken[best] = True
        order[rank] = best
    return order


@njit(cache=True)
def _placement_context(
    slot_column: IntArray,
    slot_gpus: IntArray,
    columns: int,
    column: int,
    attention_column: int,
    node_of_gpu: IntArray,
    num_nodes: int,
) -> tuple[FloatArray, FloatArray]:
    """What placing one more replica of unit ``column`` reads from the replicas in place (loading or
    serving): per GPU its :func:`~opscale.sim.cluster.colocation_affinity` (``colocate``), per node the
    unit's replicas there (``spread-node``), both counted by home (first) GPU."""
    num_gpus = node_of_gpu.size
    streams = np.zeros(num_gpus)  # attention replicas per home GPU
    own = np.zeros(num_gpus)  # the unit's replicas per home GPU
    most_of_one_unit = np.zeros(num_gpus)  # per GPU, the most replicas of one stateless unit
    per_unit = np.zeros((columns, num_gpus))
    units_per_node = np.zeros(num_nodes)
    for slot in range(slot_column.size):
        other = slot_column[slot]
        if other < 0:  # a free slot (instances never meet operator-level placement)
            continue
        home = slot_gpus[slot, 0]
        per_unit[other, home] += 1.0
        if other == attention_column:
            streams[home] += 1.0
        else:
            most_of_one_unit[home] = max(most_of_one_unit[home], per_unit[other, home])
        if other == column:
            own[home] += 1.0
            units_per_node[node_of_gpu[home]] += 1.0
    excess = most_of_one_unit - streams if column == attention_column else streams - own
    return np.maximum(excess, 0.0), units_per_node


@njit(cache=True)
def _apply_scaling(
    table: tuple,
    free_slots: IntArray,
    cluster: tuple,
    node_of_gpu: IntArray,
    columns: int,
    attention_column: int,
    steps: FloatArray,
    min_kv_tokens: float,
    added_kv_tokens: float,
    next_sequence: int,
    now_s: float,
    excluded: NDArray[np.bool_],
) -> tuple[IntArray, IntArray, int]:
    """:meth:`FluidLayout.scale` over the slot table (``table``: its arrays, written in place) and the
    cluster's :class:`~opscale.sim.cluster.PlacementArrays` (``cluster``, as a plain tuple, written in
    place). ``steps`` has one row per unit change, in order: unit column, replica delta, TP degree, bytes
    per GPU of an added replica (attention: before its KV cache), KV bytes per token (attention), policy
    code, ready time of added replicas (one float array: one argument to type instead of seven).
    ``free_slots`` is the free-slot stack (taken from the end, released slots pushed there); it holds at
    least as many slots as the steps add; added replicas avoid the GPUs ``excluded`` marks. Returns per
    step the replicas added (> 0) or removed (< 0), the free-slot stack after, and the replicas placed."""
    slot_column, slot_gpus, slot_ready_s, slot_kv_tokens, slot_bytes, slot_sequence = table
    arrays = PlacementArrays(*cluster)
    stack = np.empty(free_slots.size + slot_column.size, dtype=np.int64)
    stack[: free_slots.size] = free_slots
    free = free_slots.size
    changes = np.zeros(steps.shape[0], dtype=np.int64)
    sequence = next_sequence
    for step in range(steps.shape[0]):
        column, delta, tp = int(steps[step, 0]), int(steps[step, 1]), int(steps[step, 2])
        need_bytes, kv_per_token, policy, ready_s = (
            steps[step, 3],
            steps[step, 4],
            int(steps[step, 5]),
            steps[step, 6],
        )
        if delta < 0:
            # the unit's replicas in placement order; one always stays
            members = np.flatnonzero(slot_column == column)
            members = members[np.argsort(slot_sequence[members])]
            count = min(-delta, members.size - 1)
            if count <= 0:
                continue
            order = _scale_down_order(
                members, slot_gpus, slot_ready_s, arrays.residents, arrays.used_bytes, now_s, count
            )
            for position in order:
                slot = members[position]
                release_group(cluster, slot_gpus[slot], slot_bytes[slot], now_s)
                slot_column[slot] = FREE_SLOT
                stack[free] = slot
                free += 1
            changes[step] = -count
            continue
        # an attention replica needs room for the minimum KV cache too
        search_bytes = need_bytes + kv_per_token * min_kv_tokens if column == attention_column else need_bytes
        placed = 0
        while placed < delta:
            affinity, units_per_node = _placement_context(
                slot_column, slot_gpus, columns, column, attention_column, node_of_gpu, arrays.node_gpus.size
            )
            group = _find_group(
                arrays.free_bytes,
                arrays.residents,
                arrays.node_first_gpu,
                arrays.node_gpus,
                tp,
                search_bytes,
                policy,
                affinity,
                units_per_node,
                excluded,
            )
            if group.size == 0:
                break
            bytes_per_gpu = need_bytes
            kv_tokens = 0.0
            if column == attention_column:
                # the smallest start-up share, or the memory left if less
                least_free = math.inf
                for gpu in group:
                    least_free = min(least_free, arrays.free_bytes[gpu])
                kv_tokens = min(added_kv_tokens, float(int((least_free - bytes_per_gpu) / kv_per_token)))
                bytes_per_gpu = bytes_per_gpu + kv_tokens * kv_per_token
            reserve_group(cluster, group, bytes_per_gpu, now_s)
            free -= 1
            slot = stack[free]
            slot_column[slot] = column
            slot_gpus[slot] = -1
            slot_gpus[slot, :tp] = group
            slot_ready_s[slot] = ready_s
            slot_kv_tokens[slot] = kv_tokens
            slot_bytes[slot] = bytes_per_gpu
            slot_sequence[slot] = sequence
            sequence += 1
            placed += 1
        changes[step] = placed
    return changes, stack[:free].copy(), sequence - next_sequence
