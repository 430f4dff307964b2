"""The compiled call loop (``SimConfig.compiled_calls``) against the Python classes it stands in for.

The two must give bitwise the same runs: every interval's metrics and the run summary, under random
scaling actions (adds, removes, moves, batch caps up to the largest), across contention models, drain
policies, TP groups across nodes and the vision encoder's step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from opscale.sim import call_kernel
from opscale.sim.compiled_pools import CompiledCalls, CompiledPooledStream, CompiledUnitPool
from opscale.sim.config import SimConfig
from opscale.sim.deployment import Deployment, Placement, ScalingAction, UnitAction
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.hardware import ClusterSpec, NodeSpec, get_gpu
from opscale.sim.models import UnitKind, get_model
from opscale.sim.pools import Link, PooledStream, UnitPool
from opscale.traces.trace import RequestTrace

PLACEMENTS = list(Placement)
CAPS = (64, 512, 2048, 8192, 1 << 17)


def _trace(n: int, rate: float, seed: int, images: bool = False) -> RequestTrace:
    rng = np.random.default_rng(seed)
    return RequestTrace(
        arrival_s=np.cumsum(rng.exponential(1.0 / rate, n)),
        prompt_tokens=rng.integers(20, 3000, n),
        output_tokens=rng.integers(2, 400, n),
        image_tokens=rng.integers(0, 2, n) * rng.integers(64, 1024, n) if images else None,
    )


def _random_action(rng: np.random.Generator, units: list[UnitKind]) -> ScalingAction:
    actions = {}
    for unit in units:
        draw = rng.random()
        if draw < 0.3:
            actions[unit] = UnitAction(
                replica_delta=int(rng.integers(-2, 3)),
                placement=PLACEMENTS[int(rng.integers(len(PLACEMENTS)))],
            )
        elif draw < 0.4:
            actions[unit] = UnitAction(move_replicas=1)
        elif draw < 0.5:
            actions[unit] = UnitAction(batch_cap_tokens=CAPS[int(rng.integers(len(CAPS)))])
    return ScalingAction(units=actions)


def _run(
    compiled: bool,
    model: str,
    deployment: Deployment,
    trace: RequestTrace,
    gpus_per_node: int = 8,
    **config: Any,
) -> tuple[list[str], DiscreteEventSimulator]:
    """Metrics, reports and summary of 24 intervals of 2.5 s with random actions between them."""
    settings = SimConfig(compiled_calls=compiled, **config)
    cluster = ClusterSpec.homogeneous("a100", deployment.num_nodes, gpus_per_node=gpus_per_node)
    sim = DiscreteEventSimulator(cluster, model, deployment, trace, config=settings, seed=3)
    assert (sim.calls is not None) == compiled
    rng = np.random.default_rng(11)
    out = []
    for _ in range(24):
        out.append(repr(sim.advance(2.5)))
        out.append(repr(sim.apply(_random_action(rng, list(get_model(model).units)))))
    out.append(repr(sim.summary()))
    return out, sim


CASES = {
    "processor sharing": {},
    "half contention, drain by finishing": {"contention_factor": 0.5, "attention_drain": "finish"},
    "no contention": {"contention": "none"},
}


@pytest.mark.parametrize("config", list(CASES.values()), ids=list(CASES))
def test_compiled_calls_match_the_python_classes_under_random_actions(config: dict[str, Any]) -> None:
    model = get_model("llama-2-7b")
    replicas = {u: 2 for u in model.units} | {UnitKind.ATTENTION: 3}
    deployment = Deployment.operator_level(
        "llama-2-7b", "a100", replicas=replicas, tp={UnitKind.FFN: 2}, num_nodes=2, placement="spread-gpu"
    )
    trace = _trace(900, 40.0, seed=5)
    compiled, _ = _run(True, "llama-2-7b", deployment, trace, **config)
    assert compiled == _run(False, "llama-2-7b", deployment, trace, **config)[0]


def test_compiled_calls_match_with_a_vision_encoder_and_tp_across_nodes() -> None:
    model = get_model("qwen2-vl-7b")
    replicas = {u: 1 for u in model.units} | {UnitKind.ATTENTION: 2}
    deployment = Deployment.operator_level(
        "qwen2-vl-7b", "a100", replicas=replicas, tp={UnitKind.ATTENTION: 2}, num_nodes=3, gpus_per_node=2
    )
    trace = _trace(300, 12.0, seed=6, images=True)
    compiled, sim = _run(True, "qwen2-vl-7b", deployment, trace, gpus_per_node=2)
    assert sim.summary().unit_utilisation[UnitKind.VISION_ENCODER] > 0
    assert compiled == _run(False, "qwen2-vl-7b", deployment, trace, gpus_per_node=2)[0]


def test_compiled_calls_are_the_default_and_exponential_service_keeps_the_python_classes() -> None:
    model = get_model("llama-2-7b")
    deployment = Deployment.operator_level(
        "llama-2-7b", "a100", replicas={u: 1 for u in model.units}, num_nodes=1
    )
    trace = _trace(50, 5.0, seed=1)
    cluster = ClusterSpec.homogeneous("a100", 1)
    default = DiscreteEventSimulator(cluster, "llama-2-7b", deployment, trace)
    assert all(isinstance(pool, CompiledUnitPool) for pool in default.pools.values())
    assert all(isinstance(stream, CompiledPooledStream) for stream in default.streams)
    exponential = DiscreteEventSimulator(
        cluster, "llama-2-7b", deployment, trace, config=SimConfig(service_time_distribution="exponential")
    )
    assert exponential.calls is None
    assert all(isinstance(pool, UnitPool) for pool in exponential.pools.values())
    assert all(isinstance(stream, PooledStream) for stream in exponential.streams)


def test_compiled_state_grows_past_its_first_sizes() -> None:
    """More replicas and streams than the first allocation (16 replicas, 8 streams) and long batches
    (kernel-time tables past 4,096 tokens)."""
    model = get_model("llama-2-7b")
    replicas = {u: 3 for u in model.units} | {UnitKind.ATTENTION: 10}
    deployment = Deployment.operator_level(
        "llama-2-7b", "a100", replicas=replicas, batch_caps={UnitKind.ATTENTION: 16384}, num_nodes=2
    )
    trace = _trace(600, 60.0, seed=8)
    compiled, sim = _run(True, "llama-2-7b", deployment, trace)
    assert sim.calls is not None
    arrays = sim.calls.arrays
    assert arrays.replica_ints.shape[0] > 16 and arrays.stream_ints.shape[0] > 8
    assert arrays.tables.shape[2] > 4096
    assert compiled == _run(False, "llama-2-7b", deployment, trace)[0]


def test_compiled_loop_grows_every_array_mid_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows for one replica and one stream, 1-token tables and a heap with three events to spare: every
    growth path runs, the loop's stops for heap room included, and the run is still the Python one."""
    monkeypatch.setattr(CompiledCalls, "initial_replicas", 1)
    monkeypatch.setattr(CompiledCalls, "initial_streams", 1)
    monkeypatch.setattr(CompiledCalls, "min_table_tokens", 1)
    monkeypatch.setattr(
        CompiledCalls, "_heap_capacity_for", lambda self, size, capacity: size + self._margin + 3
    )
    grow_stops = 0
    run = call_kernel.run

    def counting_run(*args: Any) -> int:
        nonlocal grow_stops
        note = run(*args)
        grow_stops += note == call_kernel.NOTE_GROW
        return note

    monkeypatch.setattr(call_kernel, "run", counting_run)
    model = get_model("llama-2-7b")
    deployment = Deployment.operator_level(
        "llama-2-7b", "a100", replicas={u: 2 for u in model.units} | {UnitKind.ATTENTION: 3}, num_nodes=1
    )
    trace = _trace(400, 40.0, seed=9)
    compiled, _ = _run(True, "llama-2-7b", deployment, trace, gpus_per_node=4)
    assert grow_stops > 0
    assert compiled == _run(False, "llama-2-7b", deployment, trace, gpus_per_node=4)[0]


def test_link_matrices_give_every_pairs_transfer_time() -> None:
    """Nodes of different GPU types (so different NVLink figures) and sizes, and the interconnect."""
    cluster = ClusterSpec(
        nodes=(NodeSpec(get_gpu("a100"), 2), NodeSpec(get_gpu("h100"), 3), NodeSpec(get_gpu("a100"), 1))
    )
    link = Link(cluster)
    latency, bandwidth = link.matrices()
    for src in range(cluster.num_gpus):
        for dst in range(cluster.num_gpus):
            expected = link.time_s(src, dst, 1e6, 3)
            if src != dst:
                assert 3 * latency[src, dst] + 1e6 / bandwidth[src, dst] == expected
