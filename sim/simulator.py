"""The control interface every fidelity implements, and the registry that builds them.

DESIGN.md 2.6: build a cluster + model + trace; :meth:`ServingSimulator.apply` an action at a control
boundary; :meth:`ServingSimulator.advance` to the next boundary; :meth:`ServingSimulator.snapshot` for
observation data. SimPy's ``run(until=t)`` does not process events at exactly ``t``; such boundary
events belong to the next interval, in both fidelities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from opscale.sim.deployment import ApplyReport, Deployment, ScalingAction
from opscale.sim.hardware import ClusterSpec
from opscale.sim.metrics import SLO, IntervalMetrics, RunSummary
from opscale.sim.models import ModelSpec


class Fidelity(str, Enum):
    """``des``: request-level discrete-event engine (truth). ``fluid``: per-interval analytic model (fast)."""

    DES = "des"
    FLUID = "fluid"


@dataclass
class Snapshot:
    """State an autoscaler or environment may observe at a control boundary.

    :param time_s: simulated time.
    :param deployment: the current deployment as data (replica counts include pending replicas).
    :param gpus_powered: GPUs holding at least one replica (loading, serving or draining).
    :param gpu_memory_used_bytes: per global GPU index, bytes of weights + KV + activations reserved.
    :param last_interval: metrics of the interval that just ended (``None`` before the first advance).
    """

    time_s: float
    deployment: Deployment
    gpus_powered: int
    gpu_memory_used_bytes: list[float] = field(default_factory=list)
    last_interval: IntervalMetrics | None = None


@runtime_checkable
class ServingSimulator(Protocol):
    """One serving simulation: a cluster, a model, a deployment, a trace, driven interval by interval.

    An implementation keeps its own copies of what it changes: the deployment it was built from stays as
    the caller made it (environments start every episode from the same object).
    """

    cluster: ClusterSpec
    model: ModelSpec
    slo: SLO

    @property
    def now_s(self) -> float: ...

    @property
    def deployment(self) -> Deployment: ...

    @property
    def finished(self) -> bool:
        """True once every request of the trace has arrived and completed."""
        ...

    def apply(self, action: ScalingAction) -> ApplyReport: ...

    def advance(self, dt_s: float) -> IntervalMetrics: ...

    def snapshot(self) -> Snapshot: ...

    def memory_used_bytes(self) -> list[float]:
        """GPU memory reserved now, per GPU, bytes (``snapshot().gpu_memory_used_bytes`` without the rest
        of the snapshot: action masks read it every step)."""
        ...

    def summary(self) -> RunSummary: ...


#: Fidelity -> factory. Implementations register themselves here (see :func:`make_simulator`).
SimulatorFactory = Callable[..., ServingSimulator]
_FACTORIES: dict[Fidelity, str] = {
    Fidelity.DES: "opscale.sim.engine:DiscreteEventSimulator",
    Fidelity.FLUID: "opscale.sim.fluid:FluidSimulator",
}


def simulator_class(fidelity: Fidelity | str) -> SimulatorFactory:
    """The class implementing ``fidelity`` (imported lazily)."""
    import importlib

    try:
        key = Fidelity(fidelity)
    except ValueError:
        valid = ", ".join(f.value for f in Fidelity)
        raise ValueError(f"unknown fidelity {fidelity!r}; valid: {valid}") from None
    module_name, class_name = _FACTORIES[key].split(":")
    factory: SimulatorFactory = getattr(importlib.import_module(module_name), class_name)
    return factory
