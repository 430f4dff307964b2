"""Deployments and scaling actions as plain data.

A :class:`Deployment` says which replicas of which scaling unit run where. Model-level deployments
(``instances x TP x PP``, every unit co-located on the instance's GPUs, scaled together) and
operator-level ones (per-unit replica counts, TP degrees, batch caps and placement) are values of the
same type, so static, model-level and operator-level configurations all run on the same engine.

A :class:`ScalingAction` is what an autoscaler hands the simulator at a control boundary.
Both serialise to JSON (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Literal

from opscale.sim.models import UnitKind

Granularity = Literal["model", "operator"]

#: Default per-iteration token budget of an attention replica (chunked prefill, Sarathi/vLLM-v1 style).
DEFAULT_TOKEN_BUDGET = 2048
#: Default batch-size cap (tokens per call) of a stateless unit replica.
DEFAULT_BATCH_CAP_TOKENS = 2048
#: GPUs per node (DGX A100 / H100 / H200).
GPUS_PER_NODE = 8


def _unit_keyed(
    values: Mapping[Any, Any], valid: tuple[UnitKind, ...], model: str, what: str
) -> dict[UnitKind, Any]:
    """``values`` keyed by :class:`UnitKind` (names accepted); unknown or foreign units raise."""
    keyed: dict[UnitKind, Any] = {}
    for key, value in values.items():
        try:
            unit = UnitKind(key)
        except ValueError:
            raise ValueError(
                f"{what}: unknown unit {key!r}; units of {model!r}: {', '.join(u.value for u in valid)}"
            ) from None
        if unit not in valid:
            raise ValueError(
                f"{what}: model {model!r} has no unit {unit.value!r}; its units: {', '.join(u.value for u in valid)}"
            )
        keyed[unit] = value
    return keyed


class Placement(str, Enum):
    """Where a new replica goes.

    * ``pack``: best fit, on the powered GPU with the least free memory that still fits (fewest GPUs);
    * ``spread-gpu``: on the powered-or-not GPU with the fewest busy replicas (least contention);
    * ``spread-node``: like ``spread-gpu`` but prefers the node with the fewest replicas of this unit;
    * ``colocate``: where the replica's jobs stay on their GPU (the engine serves a job on a replica of
      its own GPU first, with no transfer): a stateless replica on the group of the stream (attention
      replica) with no local replica of its unit, an attention replica beside stateless replicas that
      serve no stream of their GPU (:func:`opscale.sim.cluster.colocation_affinity`); as ``pack`` where
      no group is such. Colocated replicas are placed after the action's other replicas, so that a
      chain (a stream and one replica of every unit) is added in one action: the attention replica
      with ``spread-gpu``, the others with ``colocate``.
    """

    PACK = "pack"
    SPREAD_GPU = "spread-gpu"
    SPREAD_NODE = "spread-node"
    COLOCATE = "colocate"


def as_placement(value: Placement | str) -> Placement:
    """``value`` as a :class:`Placement` (a policy or its name).

    :raises ValueError: for an unknown name (lists the valid ones).
    """
    if isinstance(value, Placement):
        return value  # (Placement(value) would return it too, through the slower enum lookup)
    try:
        return Placement(value)
    except ValueError:
        valid = ", ".join(repr(p.value) for p in Placement)
        raise ValueError(f"unknown placement {value!r}; valid: {valid}") from None


@dataclass
class UnitDeployment:
    """The replicas of one scaling unit.

    :param replicas: number of replicas (>= 1 in a valid deployment).
    :param tp: tensor-parallel degree of each replica (a replica spans ``tp`` GPUs of one node).
    :param batch_cap_tokens: the most tokens one call of a replica serves (stateless units); for
        ``attention`` the per-iteration token budget of each stream.
    :param placement: policy used to place replicas that have no explicit GPUs.
    :param gpus: optional explicit placement, one tuple of global GPU indices (length ``tp``) per replica.
    """

    replicas: int
    tp: int = 1
    batch_cap_tokens: int = DEFAULT_BATCH_CAP_TOKENS
    placement: Placement = Placement.PACK
    gpus: list[tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        self.placement = as_placement(self.placement)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["placement"] = self.placement.value
        data["gpus"] = None if self.gpus is None else [list(g) for g in self.gpus]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnitDeployment:
        gpus = data.get("gpus")
        return cls(
            replicas=int(data["replicas"]),
            tp=int(data.get("tp", 1)),
            batch_cap_tokens=int(data.get("batch_cap_tokens", DEFAULT_BATCH_CAP_TOKENS)),
            placement=Placement(data.get("placement", Placement.PACK.value)),
            gpus=None if gpus is None else [tuple(int(i) for i in g) for g in gpus],
        )


@dataclass
class Deployment:
    """A full serving deployment of one model on one cluster.

    :param model: model catalog name (see :func:`opscale.sim.models.get_model`).
    :param gpu: GPU catalog name (see :func:`opscale.sim.hardware.get_gpu`).
    :param num_nodes: nodes in the cluster (8 GPUs each by default).
    :param granularity: ``"model"`` (whole instances) or ``"operator"`` (per-unit pools).
    :param units: per scaling unit, its replicas. For ``"model"`` granularity every unit has
        ``instances`` replicas with the instance's TP, co-located per instance.
    :param instances: model-level only: number of monolithic instances.
    :param tp: model-level only: tensor-parallel degree of an instance.
    :param pp: model-level only: pipeline stages of an instance (layers split evenly).
    """

    model: str
    gpu: str
    num_nodes: int
    granularity: Granularity
    units: dict[UnitKind, UnitDeployment] = field(default_factory=dict)
    instances: int = 0
    tp: int = 1
    pp: int = 1

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    def with_units(self, units: Mapping[UnitKind, UnitDeployment]) -> Deployment:
        return replace(self, units=dict(units))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpu": self.gpu,
            "num_nodes": self.num_nodes,
            "granularity": self.granularity,
            "instances": self.instances,
            "tp": self.tp,
            "pp": self.pp,
            "units": {unit.value: config.to_dict() for unit, config in self.units.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        granularity = data.get("granularity")
        if granularity not in ("model", "operator"):
            raise ValueError(f"deployment granularity {granularity!r} is not 'model' or 'operator'")
        try:
            units = {UnitKind(name): UnitDeployment.from_dict(cfg) for name, cfg in data["units"].items()}
        except ValueError as error:
            valid = ", ".join(u.value for u in UnitKind)
            raise ValueError(f"{error}; valid unit names: {valid}") from error
        return cls(
            model=str(data["model"]),
            gpu=str(data["gpu"]),
            num_nodes=int(data["num_nodes"]),
            granularity=granularity,
            units=units,
            instances=int(data.get("instances", 0)),
            tp=int(data.get("tp", 1)),
            pp=int(data.get("pp", 1)),
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def model_level(
        cls,
        model: str,
        gpu: str,
        *,
        instances: int,
        tp: int = 1,
        pp: int = 1,
        num_nodes: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        gpus_per_node: int = GPUS_PER_NODE,
    ) -> Deployment:
        """``instances`` monolithic instances of ``tp x pp`` GPUs each; every unit co-located.

        :param model: model catalog name.
        :param gpu: GPU catalog name.
        :param instances: monolithic instances (>= 1).
        :param tp: tensor-parallel degree of every unit of an instance.
        :param pp: pipeline stages of an instance (layers split evenly).
        :param num_nodes: cluster nodes; default: just enough for ``instances * tp * pp`` GPUs.
        :param token_budget: per-iteration token budget of each instance (also each unit's batch cap).
        :raises ValueError: for non-positive counts, a bad TP degree, or an unknown model.
        """
        from opscale.sim.models import get_model

        spec = get_model(model)
        if instances < 1 or pp < 1:
            raise ValueError(
                f"model-level deployment needs instances >= 1 and pp >= 1, got {instances}, {pp}"
            )
        spec.validate_tp(tp)
        if pp > spec.num_layers:
            raise ValueError(f"pp={pp} exceeds the {spec.num_layers} layers of model {spec.name!r}")
        if tp * pp > gpus_per_node:
            raise ValueError(
                f"an instance of tp*pp={tp * pp} GPUs does not fit a node of {gpus_per_node} GPUs"
            )
        per_node = gpus_per_node // (tp * pp)
        needed_nodes = -(-instances // per_node)
        deployment = cls(
            model=spec.name,
            gpu=gpu,
            num_nodes=needed_nodes if num_nodes is None else num_nodes,
            granularity="model",
            units={
                unit: UnitDeployment(replicas=instances, tp=tp, batch_cap_tokens=token_budget)
                for unit in spec.units
            },
            instances=instances,
            tp=tp,
            pp=pp,
        )
        deployment.validate(gpus_per_node=gpus_per_node)
        return deployment

    @classmethod
    def operator_level(
        cls,
        model: str,
        gpu: str,
        *,
        replicas: Mapping[UnitKind | str, int],
        tp: int | Mapping[UnitKind | str, int] = 1,
        batch_caps: int | Mapping[UnitKind | str, int] | None = None,
        placement: Placement | str | Mapping[UnitKind | str, Placement | str] = Placement.PACK,
        num_nodes: int | None = None,
        gpus: Mapping[UnitKind | str, list[tuple[int, ...]]] | None = None,
        gpus_per_node: int = GPUS_PER_NODE,
    ) -> Deployment:
        """Per-unit replica pools.

        :param replicas: replicas per unit; every unit of the model must appear (``attention``
            replicas are the streams).
        :param tp: one TP degree for all units, or per unit (missing units: 1).
        :param batch_caps: batch cap in tokens (``attention``: token budget), one for all or per unit;
            ``None``: :data:`DEFAULT_BATCH_CAP_TOKENS` / :data:`DEFAULT_TOKEN_BUDGET`.
        :param placement: placement policy, one for all or per unit.
        :param num_nodes: cluster nodes; default: enough for one GPU per replica shard (an upper bound;
            packing usually needs fewer powered GPUs).
        :param gpus: optional explicit placement per unit (global GPU indices, one tuple per replica).
        :raises ValueError: naming a missing or unknown unit, a bad TP degree or a bad count.
        """
        from opscale.sim.models import get_model

        spec = get_model(model)

        def per_unit(value: Any, unit: UnitKind, default: Any) -> Any:
            if isinstance(value, Mapping):
                keyed = {UnitKind(k): v for k, v in value.items()}
                return keyed.get(unit, default)
            return default if value is None else value

        counts = _unit_keyed(replicas, spec.units, spec.name, "replicas")
        missing = [u.value for u in spec.units if u not in counts]
        if missing:
            raise ValueError(
                f"operator-level deployment of {spec.name!r} lacks replicas for unit(s) {', '.join(missing)}; "
                f"every unit needs >= 1: {', '.join(u.value for u in spec.units)}"
            )
        explicit = {} if gpus is None else _unit_keyed(gpus, spec.units, spec.name, "gpus")
        units: dict[UnitKind, UnitDeployment] = {}
        for unit in spec.units:
            default_cap = DEFAULT_TOKEN_BUDGET if unit is UnitKind.ATTENTION else DEFAULT_BATCH_CAP_TOKENS
            unit_gpus = explicit.get(unit)
            units[unit] = UnitDeployment(
                replicas=int(counts[unit]),
                tp=int(per_unit(tp, unit, 1)),
                batch_cap_tokens=int(per_unit(batch_caps, unit, default_cap)),
                placement=Placement(per_unit(placement, unit, Placement.PACK)),
                gpus=None if unit_gpus is None else [tuple(int(i) for i in g) for g in unit_gpus],
            )
        shards = sum(u.replicas * u.tp for u in units.values())
        deployment = cls(
            model=spec.name,
            gpu=gpu,
            num_nodes=max(1, -(-shards // gpus_per_node)) if num_nodes is None else num_nodes,
            granularity="operator",
            units=units,
        )
        deployment.validate(gpus_per_node=gpus_per_node)
        return deployment

    def validate(self, gpus_per_node: int = GPUS_PER_NODE) -> None:
        """Check the deployment against its model and cluster size.

        :raises ValueError: naming the unknown model/GPU, a unit missing from or foreign to the model,
            a replica count < 1, a bad TP degree or batch cap, or a GPU index beyond the cluster.
        """
        from opscale.sim.hardware import get_gpu
        from opscale.sim.models import get_model

        spec = get_model(self.model)
        get_gpu(self.gpu)
        if self.num_nodes < 1:
            raise ValueError(f"deployment num_nodes must be >= 1, got {self.num_nodes}")
        num_gpus = self.num_nodes * gpus_per_node
        missing = [u.value for u in spec.units if u not in self.units]
        if missing:
            raise ValueError(
                f"deployment of {spec.name!r} lacks unit(s) {', '.join(missing)}; "
                f"the model's units: {', '.join(u.value for u in spec.units)}"
            )
        foreign = [u.value for u in self.units if u not in spec.units]
        if foreign:
            raise ValueError(
                f"deployment names unit(s) {', '.join(foreign)} that model {spec.name!r} lacks; "
                f"its units: {', '.join(u.value for u in spec.units)}"
            )
        if self.granularity == "model":
            if self.instances < 1:
                raise ValueError(f"model-level deployment needs instances >= 1, got {self.instances}")
            spec.validate_tp(self.tp)
            if self.instances * self.tp * self.pp > num_gpus:
                raise ValueError(
                    f"{self.instances} instances of tp*pp={self.tp * self.pp} GPUs need "
                    f"{self.instances * self.tp * self.pp} GPUs; the cluster has {num_gpus} "
                    f"({self.num_nodes} nodes x {gpus_per_node})"
                )
        for unit, config in self.units.items():
            if config.replicas < 1:
                raise ValueError(f"unit {unit.value!r} needs >= 1 replica, got {config.replicas}")
            spec.validate_tp(config.tp)
            if config.tp > gpus_per_node:
                raise ValueError(
                    f"unit {unit.value!r}: tp={config.tp} exceeds the {gpus_per_node} GPUs of a node"
                )
            if config.batch_cap_tokens < 1:
                raise ValueError(
                    f"unit {unit.value!r}: batch_cap_tokens must be >= 1, got {config.batch_cap_tokens}"
                )
            if config.gpus is None:
                continue
            if len(config.gpus) != config.replicas:
                raise ValueError(
                    f"unit {unit.value!r}: {len(config.gpus)} explicit GPU groups for {config.replicas} replicas"
                )
            for group in config.gpus:
                if len(group) != config.tp:
                    raise ValueError(
                        f"unit {unit.value!r}: GPU group {group} has {len(group)} GPUs, tp={config.tp}"
                    )
                for index in group:
                    if not 0 <= index < num_gpus:
                        raise ValueError(
                            f"unit {unit.value!r}: replica placed on GPU {index}, which does not exist; "
                            f"the cluster has GPUs 0..{num_gpus - 1}"
                        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        return cls.from_dict(json.loads(text))


@dataclass
class UnitAction:
    """Change to one unit's pool at a control boundary.

    :param replica_delta: replicas to add (> 0) or remove (< 0; removed replicas drain first).
    :param batch_cap_tokens: new batch cap, or ``None`` to keep it.
    :param placement: placement policy for replicas added by this action, or ``None`` for the unit's own.
    :param move_replicas: replicas to re-place, make before break: each gets a new replica placed by
        ``placement`` off its GPUs, and drains once the new one serves (most crowded GPUs first).
    """

    replica_delta: int = 0
    batch_cap_tokens: int | None = None
    placement: Placement | None = None
    move_replicas: int = 0

    def __post_init__(self) -> None:
        if self.placement is not None:
            self.placement = as_placement(self.placement)


@dataclass
class ScalingAction:
    """What an autoscaler asks for at one control boundary.

    Operator-level deployments read ``units``; model-level deployments read ``instance_delta``
    (whole instances) and ignore per-unit replica deltas (batch caps still apply).
    """

    units: dict[UnitKind, UnitAction] = field(default_factory=dict)
    instance_delta: int = 0

    def units_in_apply_order(self) -> list[tuple[UnitKind, UnitAction]]:
        """The unit actions in the order simulators apply them: as given, ``colocate`` placements last
        (they join the replicas the rest of the action adds, see :class:`Placement`)."""
        return sorted(self.units.items(), key=lambda item: item[1].placement is Placement.COLOCATE)


@dataclass
class ApplyReport:
    """What :meth:`ServingSimulator.apply` did with an action.

    :param replicas_added: per unit, replicas actually started (weights loading).
    :param replicas_removed: per unit, replicas actually put to drain.
    :param repairs: number of parts of the action that were infeasible and repaired (clipped to
        capacity, to the minimum of one replica, or to valid batch caps).
    :param messages: one line per repair, saying what was asked and what was done.
    """

    replicas_added: dict[UnitKind, int] = field(default_factory=dict)
    replicas_removed: dict[UnitKind, int] = field(default_factory=dict)
    repairs: int = 0
    messages: list[str] = field(default_factory=list)
