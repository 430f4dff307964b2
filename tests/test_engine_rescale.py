"""Run-time scale-up then scale-down of an operator-level deployment: GPUs are shared, then released.

Regression tests for: a run-time attention replica taking a whole GPU's free memory as KV cache (so every
later replica opened a new GPU), and removal that ignored placement (so GPU counts only ratcheted up).
"""

from __future__ import annotations

import numpy as np
import pytest

from opscale.sim.deployment import Deployment, ScalingAction, UnitAction
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.fluid import FluidSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import UnitKind, get_model
from opscale.traces.trace import RequestTrace

MODEL = "qwen2-7b"
SCALE_UP = ScalingAction(
    units={UnitKind.ATTENTION: UnitAction(replica_delta=2), UnitKind.FFN: UnitAction(replica_delta=3)}
)
SCALE_DOWN = ScalingAction(
    units={UnitKind.ATTENTION: UnitAction(replica_delta=-2), UnitKind.FFN: UnitAction(replica_delta=-3)}
)


def _trace(n: int = 150, rate: float = 10.0, seed: int = 3) -> RequestTrace:
    rng = np.random.default_rng(seed)
    return RequestTrace(
        arrival_s=np.cumsum(rng.exponential(1.0 / rate, n)),
        prompt_tokens=rng.integers(50, 1500, n),
        output_tokens=rng.integers(5, 200, n),
    )


def _simulators() -> tuple[DiscreteEventSimulator, FluidSimulator]:
    model = get_model(MODEL)
    deployment = Deployment.operator_level(MODEL, "a100", replicas={u: 1 for u in model.units}, num_nodes=2)
    cluster = ClusterSpec.homogeneous("a100", 2)
    trace = _trace()
    return (
        DiscreteEventSimulator(cluster, MODEL, deployment, trace),
        FluidSimulator(cluster, MODEL, deployment, trace),
    )


def test_run_time_attention_replica_takes_the_start_up_kv_share_not_the_whole_gpu() -> None:
    engine, _ = _simulators()
    start_up_kv_tokens = min(s.kv_tokens for s in engine.streams)
    engine.advance(2.0)
    engine.apply(ScalingAction(units={UnitKind.ATTENTION: UnitAction(replica_delta=1)}))
    added = engine.streams[-1]
    assert added.kv_tokens == start_up_kv_tokens
    # the new replica's GPU keeps room for another replica: an FFN replica added next shares it
    powered = engine.snapshot().gpus_powered
    engine.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=1)}))
    assert engine.snapshot().gpus_powered == powered


@pytest.mark.parametrize("fidelity", ["des", "fluid"])
def test_scale_up_then_down_releases_the_added_gpus(fidelity: str) -> None:
    engine, fluid = _simulators()
    sim = engine if fidelity == "des" else fluid
    start = sim.snapshot().gpus_powered
    sim.advance(3.0)
    sim.apply(SCALE_UP)
    sim.advance(5.0)
    scaled = sim.snapshot().gpus_powered
    assert scaled > start
    sim.apply(SCALE_DOWN)
    # removed replicas drain before their GPUs are released
    sim.advance(10.0)
    assert sim.snapshot().gpus_powered == start


def test_engine_and_fluid_keep_identical_gpu_counts_through_scale_up_and_down() -> None:
    engine, fluid = _simulators()
    for action in (SCALE_UP, SCALE_DOWN):
        engine.advance(4.0)
        fluid.advance(4.0)
        engine.apply(action)
        fluid.apply(action)
        # the engine drains removed replicas, the fluid model drops them at once: compare once drained
        engine.advance(10.0)
        fluid.advance(10.0)
        assert fluid.snapshot().gpus_powered == engine.snapshot().gpus_powered
        assert np.allclose(fluid.snapshot().gpu_memory_used_bytes, engine.snapshot().gpu_memory_used_bytes)


@pytest.mark.parametrize("fidelity", ["des", "fluid"])
def test_removal_takes_the_replica_alone_on_its_gpu(fidelity: str) -> None:
    engine, fluid = _simulators()
    sim = engine if fidelity == "des" else fluid
    start = sim.snapshot().gpus_powered
    # a spread placement puts the new FFN replica on a GPU of its own
    sim.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=1, placement="spread-gpu")}))
    sim.advance(2.0)
    assert sim.snapshot().gpus_powered == start + 1
    sim.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=-1)}))
    sim.advance(2.0)
    assert sim.snapshot().gpus_powered == start


@pytest.mark.parametrize("granularity", ["operator", "model"])
@pytest.mark.parametrize("simulator_class", [DiscreteEventSimulator, FluidSimulator])
def test_the_deployment_a_simulator_starts_from_is_never_changed(
    simulator_class: type, granularity: str
) -> None:
    # environments pass the same deployment object to the simulator of every episode
    model = get_model(MODEL)
    if granularity == "operator":
        deployment = Deployment.operator_level(
            MODEL, "a100", replicas={u: 1 for u in model.units}, num_nodes=2
        )
        action = ScalingAction(
            units={unit: UnitAction(replica_delta=1, batch_cap_tokens=512) for unit in model.units}
        )
    else:
        deployment = Deployment.model_level(MODEL, "a100", instances=1, num_nodes=2)
        action = ScalingAction(
            units={unit: UnitAction(batch_cap_tokens=512) for unit in model.units}, instance_delta=1
        )
    before = deployment.to_dict()
    simulator = simulator_class(ClusterSpec.homogeneous("a100", 2), MODEL, deployment, _trace())
    simulator.advance(2.0)
    simulator.apply(action)
    simulator.advance(2.0)
    assert simulator.deployment.to_dict() != before
    assert deployment.to_dict() == before
