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
* an attention replica added later takes all the memory left on its GPUs as KV cache.

What the fluid model needs from a placement is summarised by :meth:`FluidLayout.serving_summary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from opscale.sim.cluster import ClusterState, PlacementError, colocation_affinity
from opscale.sim.config import SimConfig
from opscale.sim.deployment import Placement
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import ModelSpec, UnitKind

__all__ = ["FluidLayout", "PlacedReplica", "ServingSummary"]

FloatArray = NDArray[np.float64]

#: Smallest KV cache of a replica, in blocks (the engine's rule).
MIN_KV_BLOCKS = 16


@dataclass(eq=False)
class PlacedReplica:
    """One replica (or one model-level instance) as the fluid simulator tracks it.

    :param gpus: its GPU group.
    :param bytes_per_gpu: memory reserved on each of them.
    :param ready_s: when it starts serving.
    :param kv_tokens: KV capacity in tokens (attention replicas and instances; per instance, all streams).
    """

    gpus: tuple[int, ...]
    bytes_per_gpu: float
    ready_s: float
    kv_tokens: float = 0.0


@dataclass(frozen=True)
class ServingSummary:
    """The replicas serving at one moment, as the fluid model reads them.

    :param replicas: per unit (model order), replicas serving (model level: instances).
    :param pending: per unit, replicas still loading.
    :param homes: per unit, the first GPU of each serving replica (where its activations leave from)
        and how many replicas of the unit start there.
    :param gpu_shards: ``[GPUs holding a serving shard, units]``: each such GPU's serving shards per unit
        (GPU order; GPUs without one are left out).
    :param kv_tokens: KV capacity of each serving attention replica (model level: each instance).
    :param next_ready_s: earliest ready time of a loading replica (``inf`` when none loads): the
        summary holds until then.
    """

    replicas: tuple[int, ...]
    pending: tuple[int, ...]
    homes: tuple[dict[int, int], ...]
    gpu_shards: FloatArray
    kv_tokens: tuple[float, ...]
    next_ready_s: float

    @property
    def active_gpus(self) -> int:
        """GPUs holding at least one serving shard."""
        return int(self.gpu_shards.shape[0])


@dataclass
class FluidLayout:
    """Placement state: the replicas of every unit (or the instances) on the cluster's GPUs.

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
    replicas: dict[UnitKind, list[PlacedReplica]] = field(init=False)
    instances: list[PlacedReplica] = field(init=False)
    # KV tokens a run-time-added attention replica reserves (the engine's rule): the smallest start-up share
    added_attention_kv_tokens: int = field(init=False, default=0)
    _replica_bytes: dict[tuple[UnitKind, int, int], float] = field(
        init=False, default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        self.state = ClusterState(self.cluster, self.model, self.config)
        self.replicas = {unit: [] for unit in self.model.units}
        self.instances = []
        self.min_kv_tokens = max(self.min_kv_tokens, self.config.kv_block_tokens * MIN_KV_BLOCKS)

    # ------------------------------------------------------------------ model level
    def place_instance(
        self, tp: int, pp: int, token_budget: int, ready_s: float, now_s: float
    ) -> PlacedReplica | None:
        """Place one instance; ``None`` when no node has ``tp x pp`` GPUs with room."""
        model = self.model
        need = model.total_weight_bytes(tp) / pp + model.hidden_size * model.dtype_bytes * token_budget / tp
        kv_per_token = model.kv_bytes_per_token(tp) / pp
        group = self.state.find_group(
            tp * pp, need + kv_per_token * self.config.kv_block_tokens * MIN_KV_BLOCKS, Placement.PACK
        )
        if group is None:
            return None
        free = min(self.state.gpus[i].free_bytes for i in group)
        kv_tokens = int((free - need) / kv_per_token)
        bytes_per_gpu = need + kv_tokens * kv_per_token
        self.state.reserve(group, bytes_per_gpu, now_s)
        instance = PlacedReplica(group, bytes_per_gpu, ready_s, kv_tokens=float(kv_tokens))
        self.instances.append(instance)
        return instance

    # ------------------------------------------------------------------ operator level
    def place_stateless(
        self,
        unit: UnitKind,
        tp: int,
        batch_cap_tokens: int,
        policy: Placement,
        ready_s: float,
        now_s: float,
        explicit: tuple[int, ...] | None = None,
    ) -> PlacedReplica | None:
        """Place one replica of a non-attention unit; ``None`` when it fits nowhere."""
        need = self.replica_bytes_per_gpu(unit, tp, batch_cap_tokens)
        group = self._group(unit, tp, need, policy, explicit)
        if group is None:
            return None
        self.state.reserve(group, need, now_s)
        replica = PlacedReplica(group, need, ready_s)
        self.replicas[unit].append(replica)
        return replica

    def place_attention(
        self,
        tp: int,
        token_budget: int,
        policy: Placement,
        ready_s: float,
        now_s: float,
        *,
        share_later: bool,
        explicit: tuple[int, ...] | None = None,
    ) -> PlacedReplica | None:
        """Place one attention replica; ``None`` when it fits nowhere.

        :param share_later: at build time: take the minimum KV cache now, :meth:`share_attention_memory`
            spreads the rest once every replica is placed. Otherwise take the smallest start-up share
            (:attr:`added_attention_kv_tokens`), or the memory left if less.
        """
        unit = UnitKind.ATTENTION
        base = self.replica_bytes_per_gpu(unit, tp, token_budget)
        kv_per_token = self.model.kv_bytes_per_token(tp)
        group = self._group(unit, tp, base + kv_per_token * self.min_kv_tokens, policy, explicit)
        if group is None:
            return None
        if share_later:
            kv_tokens = self.min_kv_tokens
        else:
            kv_tokens = min(
                self.added_attention_kv_tokens,
                int((min(self.state.gpus[i].free_bytes for i in group) - base) / kv_per_token),
            )
        need = base + kv_tokens * kv_per_token
        self.state.reserve(group, need, now_s)
        replica = PlacedReplica(group, need, ready_s, kv_tokens=float(kv_tokens))
        self.replicas[unit].append(replica)
        return replica

    def share_attention_memory(self) -> None:
        """Give every attention replica an even share of the memory left on its GPUs (in whole blocks)."""
        attention = self.replicas[UnitKind.ATTENTION]
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
            replica.bytes_per_gpu += grow
            # the engine's stream holds whole blocks: (initial tokens // block + extra blocks) * block
            replica.kv_tokens = float((int(replica.kv_tokens) // block + extra_blocks) * block)
        self.added_attention_kv_tokens = min((int(replica.kv_tokens) for replica in attention), default=0)

    def _group(
        self, unit: UnitKind, tp: int, need: float, policy: Placement, explicit: tuple[int, ...] | None
    ) -> tuple[int, ...] | None:
        if explicit is not None:
            if any(self.state.gpus[i].free_bytes + 1e-3 < need for i in explicit):
                return None
            return explicit
        if self.state.best_free_bytes() + 1e-3 < need:
            return None  # no GPU has room (find_group's test): skip its per-node search
        by_node: dict[int, int] | None = None
        if policy is Placement.SPREAD_NODE:  # the only policy that reads the unit's replicas per node
            by_node = {}
            for replica in self.replicas[unit]:
                node = self.state.gpus[replica.gpus[0]].node
                by_node[node] = by_node.get(node, 0) + 1
        affinity = None
        if policy is Placement.COLOCATE:
            homes = {
                other: [replica.gpus[0] for replica in placed] for other, placed in self.replicas.items()
            }
            affinity = colocation_affinity(unit, homes)
        return self.state.find_group(tp, need, policy, unit_count_by_node=by_node, affinity=affinity)

    # ------------------------------------------------------------------ removal
    def remove(self, unit: UnitKind | None, replica: PlacedReplica, now_s: float) -> None:
        """Release ``replica`` of ``unit`` (``None``: a model-level instance)."""
        if unit is None:
            self.instances.remove(replica)
        else:
            self.replicas[unit].remove(replica)
        self.state.release(replica.gpus, replica.bytes_per_gpu, now_s)

    # ------------------------------------------------------------------ summaries
    def serving_summary(self, units: tuple[UnitKind, ...], serving_at_s: float) -> ServingSummary:
        """What the fluid model needs from the replicas serving at ``serving_at_s`` (``ready_s`` at or
        before it); model level: every instance counts as a replica of every unit."""
        columns = len(units)
        replicas = [0] * columns
        pending = [0] * columns
        homes: list[dict[int, int]] = [{} for _ in units]
        shard_counts = [0] * (self.cluster.num_gpus * columns)  # [gpu * columns + column]
        kv_tokens: list[float] = []
        next_ready_s = math.inf
        for column, unit in enumerate(units):
            unit_homes = homes[column]
            serving = 0
            for replica in self.instances or self.replicas[unit]:
                if replica.ready_s > serving_at_s:
                    pending[column] += 1
                    if replica.ready_s < next_ready_s:
                        next_ready_s = replica.ready_s
                    continue
                serving += 1
                gpus = replica.gpus
                unit_homes[gpus[0]] = unit_homes.get(gpus[0], 0) + 1
                for gpu in gpus:
                    shard_counts[gpu * columns + column] += 1
                if unit is UnitKind.ATTENTION:
                    kv_tokens.append(replica.kv_tokens)
            replicas[column] = serving
        gpu_shards = np.array(shard_counts, dtype=np.float64).reshape(self.cluster.num_gpus, columns)
        return ServingSummary(
            replicas=tuple(replicas),
            pending=tuple(pending),
            homes=tuple(homes),
            gpu_shards=gpu_shards[gpu_shards.any(axis=1)],
            kv_tokens=tuple(kv_tokens),
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
