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


class Placement(str, Enum):
    """Where a new replica goes.

    * ``pack``: best fit, on the powered GPU with the least free memory that still fits (fewest GPUs);
    * ``spread-gpu``: on the powered-or-not GPU with the fewest busy replicas (least contention);
    * ``spread-node``: like ``spread-gpu`` but prefers the node with the fewest replicas of this unit.
    """

    PACK = "pack"
    SPREAD_GPU = "spread-gpu"
    SPREAD_NODE = "spread-node"


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
    """

    replica_delta: int = 0
    batch_cap_tokens: int | None = None
    placement: Placement | None = None


@dataclass
class ScalingAction:
    """What an autoscaler asks for at one control boundary.

    Operator-level deployments read ``units``; model-level deployments read ``instance_delta``
    (whole instances) and ignore per-unit replica deltas (batch caps still apply).
    """

    units: dict[UnitKind, UnitAction] = field(default_factory=dict)
    instance_delta: int = 0


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
