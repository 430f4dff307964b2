"""Observation layout and action encodings of the autoscaling environments.

Observations are one flat ``float32`` vector: a block of :data:`UNIT_FEATURES` per scaling unit (in the
model's forward order), then :data:`GLOBAL_FEATURES`. :class:`ObservationLayout` names every index,
holds the bounds of the ``Box`` and the scale that maps each physical quantity to its normalised value,
and :func:`decode_observation` turns a vector back into named (optionally physical) values, so policies
written by hand never index the vector by number.

Actions are flat ``MultiDiscrete`` vectors. :class:`OperatorActionCodec` has three dimensions per unit
(replica delta, batch-cap bucket, placement); :class:`ModelActionCodec` has two (instance delta, one
batch-cap bucket for every unit). Both decode to :class:`opscale.sim.deployment.ScalingAction`, encode
one back (raising when the action is not representable), and build the per-dimension boolean masks that
``sb3_contrib.MaskablePPO`` reads from ``env.action_masks()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from gymnasium import spaces

from opscale.sim.deployment import Placement, ScalingAction, UnitAction
from opscale.sim.models import UnitKind

__all__ = [
    "CHAIN_DELTAS",
    "GLOBAL_FEATURES",
    "KEEP_BATCH_CAP",
    "PLACEMENT_CHOICES",
    "UNIT_FEATURES",
    "ActionCodec",
    "FeatureSpec",
    "ModelActionCodec",
    "ObservationFeature",
    "ObservationLayout",
    "OperatorActionCodec",
    "addable_replicas",
    "addable_replicas_of_units",
    "decode_observation",
]

#: Placement choices in the order of the placement dimension of an operator action.
PLACEMENT_CHOICES: tuple[Placement, ...] = (
    Placement.PACK,
    Placement.SPREAD_GPU,
    Placement.SPREAD_NODE,
    Placement.COLOCATE,
)
#: Batch-cap dimension value meaning "keep the current cap"; value ``i >= 1`` selects bucket ``i - 1``.
KEEP_BATCH_CAP = 0
#: the chain dimension's values (``chain_actions``): remove one co-located chain, none, add one
CHAIN_DELTAS: tuple[int, ...] = (-1, 0, 1)


@dataclass(frozen=True)
class FeatureSpec:
    """One observation feature before its scale is known.

    :param key: short name (``"utilisation"``); unit features are named ``"<unit>.<key>"`` in a layout.
    :param low: lower bound of the normalised value.
    :param high: upper bound of the normalised value (values are clipped into ``[low, high]``).
    :param scale_key: what the physical value is divided by, resolved per env by :class:`ObservationLayout`
        (``"one"`` for already-normalised quantities).
    :param log: ``True``: normalised = ``log1p(x) / log1p(scale)``; else ``x / scale``.
    :param description: what the physical value is, with its unit.
    """

    key: str
    low: float
    high: float
    scale_key: str
    log: bool
    description: str


#: Per scaling unit, in this order.
UNIT_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        "replicas", 0.0, 1.0, "max_replicas", False, "replicas serving or loading, / max replicas per unit"
    ),
    FeatureSpec(
        "pending", 0.0, 1.0, "max_replicas", False, "replicas still loading weights, / max replicas per unit"
    ),
    FeatureSpec(
        "utilisation", 0.0, 1.0, "one", False, "busy time / (serving replicas x interval), last interval"
    ),
    FeatureSpec(
        "queue", 0.0, 1.0, "queue_tokens", True, "time-averaged queued tokens, log1p(x)/log1p(queue scale)"
    ),
    FeatureSpec("batch_fill", 0.0, 1.0, "one", False, "mean tokens per call / batch cap, last interval"),
    FeatureSpec("latency", 0.0, 10.0, "tbt_slo", False, "mean wait + service time of a call, s / TBT SLO"),
    FeatureSpec(
        "batch_cap", 0.0, 1.0, "max_batch_cap", False, "batch cap (tokens per call) / largest bucket"
    ),
)

#: After the unit blocks, in this order.
GLOBAL_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("arrival_rate", 0.0, 4.0, "rate", False, "arrivals per s in the last interval / rate scale"),
    FeatureSpec(
        "arrival_trend",
        -4.0,
        4.0,
        "rate",
        False,
        "change of the arrival rate since the interval before, / rate scale",
    ),
    FeatureSpec(
        "slo_attainment",
        0.0,
        1.0,
        "one",
        False,
        "share of requests decided in the last interval that met the SLO",
    ),
    FeatureSpec("ttft_p99", 0.0, 10.0, "ttft_slo", False, "p99 TTFT of the last interval, s / TTFT SLO"),
    FeatureSpec("tbt_p99", 0.0, 10.0, "tbt_slo", False, "p99 TBT of the last interval, s / TBT SLO"),
    FeatureSpec(
        "waiting", 0.0, 1.0, "waiting_requests", True, "requests waiting for admission, log1p(x)/log1p(scale)"
    ),
    FeatureSpec(
        "gpus_powered", 0.0, 1.0, "num_gpus", False, "GPUs holding a replica (time-averaged) / cluster GPUs"
    ),
    FeatureSpec("power", 0.0, 1.0, "max_power_w", False, "mean cluster power, W / (cluster GPUs x TDP)"),
    FeatureSpec("time_of_day_sin", -1.0, 1.0, "one", False, "sin(2 pi t / 86400 s) of the trace clock"),
    FeatureSpec("time_of_day_cos", -1.0, 1.0, "one", False, "cos(2 pi t / 86400 s) of the trace clock"),
    FeatureSpec("episode_progress", 0.0, 1.0, "one", False, "steps taken / horizon"),
)

#: Waiting requests that map to observation value 1 (log scale).
WAITING_SCALE_REQUESTS = 1.0e4


@dataclass(frozen=True)
class ObservationFeature:
    """One index of the observation vector.

    :param index: position in the vector.
    :param name: ``"<unit>.<key>"`` for unit features, ``"<key>"`` for global ones.
    :param unit: the scaling unit, or ``None`` for global features.
    :param spec: bounds, scaling rule and description.
    :param scale: physical value that maps to 1 (linear) or whose ``log1p`` maps to 1 (log).
    """

    index: int
    name: str
    unit: UnitKind | None
    spec: FeatureSpec
    scale: float


class ObservationLayout:
    """Every index of an environment's observation vector, its bounds and its normalisation.

    :param units: scaling units in the order of their blocks.
    :param scales: physical scale per ``scale_key`` used by the features (``"one"`` is implied).
    """

    def __init__(self, units: Sequence[UnitKind], scales: Mapping[str, float]) -> None:
        self.units: tuple[UnitKind, ...] = tuple(units)
        resolved = {"one": 1.0, **scales}
        missing = {spec.scale_key for spec in (*UNIT_FEATURES, *GLOBAL_FEATURES)} - set(resolved)
        if missing:
            raise ValueError(f"observation layout is missing scales {sorted(missing)}")
        for key, value in resolved.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"observation scale {key!r} must be a positive finite number, got {value}")
        self.scales: dict[str, float] = resolved
        features: list[ObservationFeature] = []
        for unit in self.units:
            for spec in UNIT_FEATURES:
                name = f"{unit.value}.{spec.key}"
                features.append(ObservationFeature(len(features), name, unit, spec, resolved[spec.scale_key]))
        for spec in GLOBAL_FEATURES:
            features.append(ObservationFeature(len(features), spec.key, None, spec, resolved[spec.scale_key]))
        self.features: tuple[ObservationFeature, ...] = tuple(features)
        self.index: dict[str, int] = {feature.name: feature.index for feature in features}
        self.low = np.array([f.spec.low for f in features], dtype=np.float32)
        self.high = np.array([f.spec.high for f in features], dtype=np.float32)
        self._is_log = np.array([f.spec.log for f in features], dtype=bool)
        self._log_positions = np.flatnonzero(self._is_log)
        # normalised = physical * multiplier (linear) or log1p(physical) * multiplier (log)
        self._multiplier = np.array(
            [1.0 / (math.log1p(f.scale) if f.spec.log else f.scale) for f in features], dtype=np.float64
        )
        self._multiplier32 = self._multiplier.astype(np.float32)
        self._low64 = self.low.astype(np.float64)
        self._high64 = self.high.astype(np.float64)

    @property
    def size(self) -> int:
        """Length of the observation vector."""
        return len(self.features)

    @property
    def unit_block_size(self) -> int:
        """Features per unit."""
        return len(UNIT_FEATURES)

    @property
    def global_offset(self) -> int:
        """Index of the first global feature."""
        return len(self.units) * len(UNIT_FEATURES)

    def space(self) -> spaces.Box:
        """The ``Box`` observation space (``float32``, finite bounds)."""
        return spaces.Box(low=self.low, high=self.high, dtype=np.float32)

    @property
    def log_positions(self) -> np.ndarray:
        """Indices of the log-scaled features (their physical values enter as ``log1p(max(x, 0))``)."""
        return self._log_positions

    def scale_and_clip(self, prepared: list[float]) -> np.ndarray:
        """The step path of :meth:`normalise`: ``prepared`` already holds ``log1p(max(x, 0))`` at
        :attr:`log_positions` (cheap on Python floats), so only a multiply and a clip remain."""
        values = np.array(prepared, dtype=np.float32)
        values *= self._multiplier32
        np.maximum(values, self.low, out=values)
        np.minimum(values, self.high, out=values)
        return values

    def normalise(self, physical: np.ndarray) -> np.ndarray:
        """Map a vector of physical values (layout order, float64) to a fresh ``float32`` observation,
        clipped to the bounds. Negative inputs of log features (counts) are clipped to zero first."""
        values = physical * self._multiplier
        log_positions = self._log_positions
        values[log_positions] = (
            np.log1p(np.maximum(physical[log_positions], 0.0)) * self._multiplier[log_positions]
        )
        # np.maximum/np.minimum with out= avoid np.clip's Python-level dispatch (it matters at ~5k steps/s)
        np.minimum(np.maximum(values, self._low64, out=values), self._high64, out=values)
        return values.astype(np.float32)

    def physical(self, observation: np.ndarray) -> np.ndarray:
        """Invert :meth:`normalise` (up to clipping): the physical value of every index."""
        values = np.asarray(observation, dtype=np.float64) / self._multiplier
        if self._log_positions.size:
            values[self._log_positions] = np.expm1(values[self._log_positions])
        return values

    def table(self) -> str:
        """A reST table of every index (what the environment docstrings show)."""
        rows = [("Index", "Name", "Bounds", "Meaning")]
        for feature in self.features:
            bounds = f"[{feature.spec.low:g}, {feature.spec.high:g}]"
            rows.append((str(feature.index), feature.name, bounds, feature.spec.description))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        rule = "  ".join("=" * w for w in widths)
        lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)), rule]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows[1:]]
        lines.append(rule)
        return "\n".join(lines)


def decode_observation(
    observation: np.ndarray, layout: ObservationLayout, *, physical: bool = False
) -> dict[str, dict[str, float] | float]:
    """Name every value of an observation vector.

    :param observation: one observation (shape ``(layout.size,)``).
    :param layout: the environment's layout (``env.unwrapped.observation_layout``).
    :param physical: return physical quantities (replica counts, tokens, seconds, W, arrivals per s)
        instead of normalised values. Clipped values decode to the clip bound's physical value.
    :returns: ``{"<unit>": {"replicas": ..., ...}, ..., "arrival_rate": ..., ...}``: one nested dict per
        unit (keyed by the unit's name) and the global features at the top level.
    :raises ValueError: if the vector does not have the layout's length.
    """
    vector = np.asarray(observation, dtype=np.float64)
    if vector.shape != (layout.size,):
        raise ValueError(f"observation has shape {vector.shape}, the layout expects ({layout.size},)")
    values = layout.physical(vector) if physical else vector
    decoded: dict[str, dict[str, float] | float] = {}
    for feature in layout.features:
        if feature.unit is None:
            decoded[feature.name] = float(values[feature.index])
        else:
            block = decoded.setdefault(feature.unit.value, {})
            assert isinstance(block, dict)
            block[feature.spec.key] = float(values[feature.index])
    return decoded


def addable_replicas(
    free_bytes_per_gpu: np.ndarray, replica_bytes: float, tp: int, gpus_per_node: int
) -> int:
    """How many more replicas of ``replica_bytes`` per GPU (``tp`` GPUs of one node each) fit in free memory.

    Counts, per node, the replica slots its GPUs have (``floor(free / replica_bytes)`` each) and divides by
    ``tp`` (a TP replica needs one slot on each of ``tp`` GPUs of the node). It is an upper bound used for
    action masks; the simulator's placement is the authority and repairs what does not fit.
    """
    return addable_replicas_of_units(free_bytes_per_gpu, [replica_bytes], [tp], gpus_per_node)[0]


def addable_replicas_of_units(
    free_bytes_per_gpu: np.ndarray, replica_bytes: Sequence[float], tps: Sequence[int], gpus_per_node: int
) -> list[int]:
    """:func:`addable_replicas` of several units at once (one numpy pass over units x GPUs: masks ask it
    for every unit every step)."""
    needs = np.asarray(replica_bytes, dtype=np.float64)
    sized = needs > 0
    # per unit and GPU, the replica slots (a unit of no size fits without bound)
    slots = np.floor(np.maximum(free_bytes_per_gpu, 0.0)[None, :] / np.where(sized, needs, 1.0)[:, None])
    counts: list[int] = []
    for unit_slots, tp, is_sized in zip(slots.astype(np.int64).tolist(), tps, sized.tolist(), strict=True):
        if not is_sized:
            counts.append(1 << 30)
        elif tp == 1:
            counts.append(sum(unit_slots))
        else:
            counts.append(
                sum(
                    _tp_groups(unit_slots[first : first + gpus_per_node], tp)
                    for first in range(0, len(unit_slots), gpus_per_node)
                )
            )
    return counts


def _tp_groups(node_slots: list[int], tp: int) -> int:
    """TP-``tp`` replicas that fit on one node whose GPUs have ``node_slots`` slots each."""
    # k TP replicas fit on a node iff its GPUs offer k*tp slots with at most k on any one GPU:
    # sum(min(slots, k)) >= k*tp. The left side is concave in k, so the k that fit are 0..K;
    # bisect for K (small replicas give thousands of slots: counting up k by k was the cost
    # of every action mask)
    low, high = 0, sum(node_slots) // tp
    while low < high:
        middle = (low + high + 1) // 2
        if sum(min(slot, middle) for slot in node_slots) >= middle * tp:
            low = middle
        else:
            high = middle - 1
    return low


class ActionCodec(Protocol):
    """Maps a flat ``MultiDiscrete`` action to a :class:`ScalingAction` and back, and builds masks."""

    @property
    def nvec(self) -> np.ndarray: ...

    def space(self) -> spaces.MultiDiscrete: ...

    def decode(self, action: np.ndarray) -> ScalingAction: ...

    def decode_values(self, values: list[int]) -> ScalingAction: ...

    def encode(self, action: ScalingAction) -> np.ndarray: ...

    def noop(self) -> np.ndarray: ...

    def masks(self, replicas: np.ndarray, addable: np.ndarray, max_replicas: int) -> np.ndarray: ...


def _delta_mask(deltas: list[int], replicas: int, addable: int, max_replicas: int) -> list[bool]:
    """Replica deltas keeping ``1 <= replicas + delta <= max_replicas`` and adding at most ``addable``.
    Zero (no change) is always allowed, so a mask never has an all-false dimension. (Plain Python: a
    handful of deltas per unit, asked every step, costs less than numpy's per-call overhead.)"""
    return [delta == 0 or (1 <= replicas + delta <= max_replicas and delta <= addable) for delta in deltas]


def _bucket_index(batch_cap_tokens: int | None, buckets: tuple[int, ...]) -> int:
    if batch_cap_tokens is None:
        return KEEP_BATCH_CAP
    if batch_cap_tokens not in buckets:
        raise ValueError(f"batch cap {batch_cap_tokens} is not a bucket; valid: {buckets} or None (keep)")
    return buckets.index(batch_cap_tokens) + 1


def _delta_index(delta: int, deltas: tuple[int, ...], what: str) -> int:
    if delta not in deltas:
        raise ValueError(f"{what} {delta} is not representable; valid deltas: {deltas}")
    return deltas.index(delta)


class OperatorActionCodec:
    """Operator-level action: for each unit ``u`` (index ``i``), three dimensions.

    * ``3i``: replica delta, value ``k`` -> ``replica_deltas[k]`` (default -2..+2, so 2 means no change);
    * ``3i+1``: batch cap, ``0`` keeps the cap, ``k >= 1`` sets ``batch_cap_buckets_tokens[k-1]``;
    * ``3i+2``: placement of replicas added by this action: 0 pack, 1 spread-gpu, 2 spread-node, 3 colocate.

    With ``chain_actions``, one more dimension, last: ``0`` removes one co-located chain, ``1`` leaves
    the chains alone, ``2`` adds one. A chain is one replica of every unit (attention ``spread-gpu``, the
    others ``colocate`` beside it: the model-level instance's layout); removing one takes one replica of
    every unit, which the simulators take from the GPU that empties soonest. When it is not ``1`` it
    replaces every unit's replica delta and placement for that step; the units' batch caps still apply.
    A macro action: the per-unit dimensions can express it, but a factorised policy almost never samples
    the same change in every unit at once.

    :param units: scaling units, in the model's forward order.
    :param replica_deltas: sorted deltas, including 0.
    :param batch_cap_buckets_tokens: sorted batch caps.
    :param chain_actions: add the chain dimension.
    """

    dims_per_unit = 3

    def __init__(
        self,
        units: Sequence[UnitKind],
        replica_deltas: Sequence[int],
        batch_cap_buckets_tokens: Sequence[int],
        *,
        chain_actions: bool = False,
    ) -> None:
        self.units = tuple(units)
        self.replica_deltas = tuple(replica_deltas)
        self.batch_cap_buckets_tokens = tuple(batch_cap_buckets_tokens)
        self.chain_actions = chain_actions
        per_unit = [len(self.replica_deltas), len(self.batch_cap_buckets_tokens) + 1, len(PLACEMENT_CHOICES)]
        chain = [len(CHAIN_DELTAS)] if chain_actions else []
        self._nvec = np.array(per_unit * len(self.units) + chain, dtype=np.int64)
        self._delta_list = list(self.replica_deltas)
        self._caps: tuple[int | None, ...] = (None, *self.batch_cap_buckets_tokens)
        # Every (delta, cap, placement) triple decoded once: decoding is then three list lookups per unit.
        # The simulator only reads actions, so these instances are shared between steps.
        self._unit_actions = [
            [
                [
                    UnitAction(replica_delta=delta, batch_cap_tokens=cap, placement=placement)
                    for placement in PLACEMENT_CHOICES
                ]
                for cap in self._caps
            ]
            for delta in self.replica_deltas
        ]
        self._unit_slots = tuple((unit, 3 * i) for i, unit in enumerate(self.units))

    @property
    def nvec(self) -> np.ndarray:
        return self._nvec

    def space(self) -> spaces.MultiDiscrete:
        return spaces.MultiDiscrete(self._nvec)

    def decode(self, action: np.ndarray) -> ScalingAction:
        """The :class:`ScalingAction` for a valid action vector (checked by the environment).

        Its :class:`UnitAction` values are shared, precomputed instances: read them, do not mutate them.
        """
        return self.decode_values(action.tolist())

    def decode_values(self, values: list[int]) -> ScalingAction:
        """:meth:`decode` of the action as a list of ints (what the environment's step path holds)."""
        if self.chain_actions and CHAIN_DELTAS[values[-1]]:
            return self._chain_action(CHAIN_DELTAS[values[-1]], values)
        table = self._unit_actions
        units = {unit: table[values[j]][values[j + 1]][values[j + 2]] for unit, j in self._unit_slots}
        return ScalingAction(units=units)

    def _chain_action(self, delta: int, values: list[int]) -> ScalingAction:
        """Every unit ``delta`` in a chain's layout, each with its own batch-cap choice."""
        return ScalingAction(
            units={
                unit: UnitAction(
                    replica_delta=delta,
                    batch_cap_tokens=self._caps[values[j + 1]],
                    placement=Placement.SPREAD_GPU if unit is UnitKind.ATTENTION else Placement.COLOCATE,
                )
                for unit, j in self._unit_slots
            }
        )

    def encode(self, action: ScalingAction) -> np.ndarray:
        """The action vector of ``action`` (units it omits get no change, pack placement; the chain
        dimension, if any, leaves the chains alone: a chain is encoded unit by unit).

        :raises ValueError: for a unit not in this env, an unrepresentable delta or a cap that is no bucket.
        """
        unknown = set(action.units) - set(self.units)
        if unknown:
            raise ValueError(
                f"action names units {sorted(u.value for u in unknown)}; this env's units: "
                f"{', '.join(u.value for u in self.units)}"
            )
        vector = self.noop()
        for i, unit in enumerate(self.units):
            unit_action = action.units.get(unit)
            if unit_action is None:
                continue
            vector[3 * i] = _delta_index(
                unit_action.replica_delta, self.replica_deltas, f"{unit.value} replica delta"
            )
            vector[3 * i + 1] = _bucket_index(unit_action.batch_cap_tokens, self.batch_cap_buckets_tokens)
            placement = unit_action.placement or Placement.PACK
            vector[3 * i + 2] = PLACEMENT_CHOICES.index(Placement(placement))
        return vector

    def noop(self) -> np.ndarray:
        """The action that changes nothing."""
        vector = np.zeros(self._nvec.size, dtype=np.int64)
        vector[0 : 3 * len(self.units) : 3] = self.replica_deltas.index(0)
        if self.chain_actions:
            vector[-1] = CHAIN_DELTAS.index(0)
        return vector

    def masks(self, replicas: np.ndarray, addable: np.ndarray, max_replicas: int) -> np.ndarray:
        """Flat boolean mask (``sum(nvec)`` entries, dimension after dimension).

        :param replicas: per unit, replicas serving or loading.
        :param addable: per unit, replicas that still fit in free GPU memory.
        :param max_replicas: the per-unit replica cap.
        """
        caps_and_placements = [True] * (len(self._caps) + len(PLACEMENT_CHOICES))
        flat: list[bool] = []
        for unit_replicas, unit_addable in zip(replicas.tolist(), addable.tolist(), strict=True):
            flat += _delta_mask(self._delta_list, unit_replicas, unit_addable, max_replicas)
            flat += caps_and_placements
        if self.chain_actions:
            # a chain change must be allowed for every unit at once
            per_unit = [
                _delta_mask(list(CHAIN_DELTAS), unit_replicas, unit_addable, max_replicas)
                for unit_replicas, unit_addable in zip(replicas.tolist(), addable.tolist(), strict=True)
            ]
            flat += [all(allowed) for allowed in zip(*per_unit, strict=True)]
        return np.array(flat, dtype=bool)


class ModelActionCodec:
    """Model-level action: two dimensions.

    * ``0``: instance delta, value ``k`` -> ``replica_deltas[k]`` whole instances (every unit scales together);
    * ``1``: batch cap, ``0`` keeps it, ``k >= 1`` sets ``batch_cap_buckets_tokens[k-1]`` on every unit
      (for ``attention`` that is the instance's per-iteration token budget).

    :param units: the model's scaling units (all receive the batch cap).
    :param replica_deltas: sorted instance deltas, including 0.
    :param batch_cap_buckets_tokens: sorted batch caps.
    """

    def __init__(
        self,
        units: Sequence[UnitKind],
        replica_deltas: Sequence[int],
        batch_cap_buckets_tokens: Sequence[int],
    ) -> None:
        self.units = tuple(units)
        self.replica_deltas = tuple(replica_deltas)
        self.batch_cap_buckets_tokens = tuple(batch_cap_buckets_tokens)
        self._nvec = np.array(
            [len(self.replica_deltas), len(self.batch_cap_buckets_tokens) + 1], dtype=np.int64
        )
        self._delta_list = list(self.replica_deltas)
        self._caps: tuple[int | None, ...] = (None, *self.batch_cap_buckets_tokens)

    @property
    def nvec(self) -> np.ndarray:
        return self._nvec

    def space(self) -> spaces.MultiDiscrete:
        return spaces.MultiDiscrete(self._nvec)

    def decode(self, action: np.ndarray) -> ScalingAction:
        return self.decode_values(action.tolist())

    def decode_values(self, values: list[int]) -> ScalingAction:
        delta_index, cap_index = values
        cap = self._caps[cap_index]
        units = {} if cap is None else {unit: UnitAction(batch_cap_tokens=cap) for unit in self.units}
        return ScalingAction(units=units, instance_delta=self.replica_deltas[delta_index])

    def encode(self, action: ScalingAction) -> np.ndarray:
        """The action vector of ``action``; its per-unit batch caps must all be equal (or absent).

        :raises ValueError: for an unrepresentable delta, per-unit replica deltas, or differing caps.
        """
        if any(unit_action.replica_delta for unit_action in action.units.values()):
            raise ValueError(
                "model-level actions scale whole instances: use instance_delta, not per-unit deltas"
            )
        caps = {unit_action.batch_cap_tokens for unit_action in action.units.values()}
        if len(caps) > 1:
            raise ValueError(
                f"model-level actions set one batch cap for every unit, got {sorted(caps, key=str)}"
            )
        cap = caps.pop() if caps else None
        return np.array(
            [
                _delta_index(action.instance_delta, self.replica_deltas, "instance delta"),
                _bucket_index(cap, self.batch_cap_buckets_tokens),
            ],
            dtype=np.int64,
        )

    def noop(self) -> np.ndarray:
        return np.array([self.replica_deltas.index(0), KEEP_BATCH_CAP], dtype=np.int64)

    def masks(self, replicas: np.ndarray, addable: np.ndarray, max_replicas: int) -> np.ndarray:
        """Flat boolean mask; ``replicas`` / ``addable`` hold one entry: instances now / instances that fit."""
        deltas = _delta_mask(self._delta_list, int(replicas[0]), int(addable[0]), max_replicas)
        return np.array(deltas + [True] * len(self._caps), dtype=bool)
