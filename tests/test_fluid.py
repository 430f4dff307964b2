"""The fluid simulator: protocol, closed-form cases, overload and drain, cold start, GPUs and energy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from opscale.experiments.fidelity_report import SHARED_GPU_REPLICAS
from opscale.sim.config import SimConfig
from opscale.sim.costmodel import AttentionBatch, default_cost_model
from opscale.sim.deployment import Deployment, ScalingAction, UnitAction
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.fluid import FluidSimulator
from opscale.sim.hardware import ClusterSpec, get_gpu
from opscale.sim.metrics import SLO
from opscale.sim.models import UnitKind, get_model
from opscale.sim.overhead import engine_overhead
from opscale.sim.power import PowerModel
from opscale.sim.simulator import ServingSimulator, simulator_class
from opscale.traces.trace import RequestTrace

MODEL = "llama-2-7b"
SLO_TTFT_S = 1.0  # default TTFT SLO of a <= 8 B model
OPERATOR_REPLICAS = SHARED_GPU_REPLICAS


def poisson_trace(rate_per_s: float, duration_s: float, seed: int = 0) -> RequestTrace:
    rng = np.random.default_rng(seed)
    count = int(rng.poisson(rate_per_s * duration_s))
    arrival = np.sort(rng.uniform(0.0, duration_s, count))
    prompt = np.clip(rng.lognormal(np.log(800.0), 0.8, count), 1, 3000).astype(np.int64)
    output = np.clip(rng.lognormal(np.log(150.0), 0.8, count), 1, 1000).astype(np.int64)
    return RequestTrace(arrival, prompt, output, time_range_s=(0.0, duration_s))


def model_level(instances: int = 2) -> Deployment:
    return Deployment.model_level(MODEL, "a100", instances=instances)


def operator_level() -> Deployment:
    return Deployment.operator_level(MODEL, "a100", replicas=OPERATOR_REPLICAS)


def fluid(deployment: Deployment, trace: RequestTrace, **kwargs: object) -> FluidSimulator:
    return FluidSimulator(
        ClusterSpec.homogeneous("a100", deployment.num_nodes), MODEL, deployment, trace, **kwargs
    )


def test_implements_the_protocol_and_registry() -> None:
    simulator = fluid(model_level(), poisson_trace(2.0, 60.0))
    assert isinstance(simulator, ServingSimulator)
    assert simulator_class("fluid") is FluidSimulator
    metrics = simulator.advance(5.0)
    assert metrics.start_s == 0.0 and metrics.end_s == 5.0 and simulator.now_s == 5.0
    assert set(metrics.units) == set(get_model(MODEL).units)
    snapshot = simulator.snapshot()
    assert snapshot.last_interval is metrics and snapshot.gpus_powered == 2
    assert snapshot.deployment.instances == 2


@pytest.mark.parametrize("deployment", [model_level(), operator_level()], ids=["model", "operator"])
def test_same_inputs_same_metrics(deployment: Deployment) -> None:
    trace = poisson_trace(3.0, 120.0, seed=4)
    runs = []
    for _ in range(2):
        simulator = fluid(deployment, trace)
        runs.append([simulator.advance(5.0) for _ in range(24)])
    assert runs[0] == runs[1]


def test_single_request_latency_is_the_cost_model() -> None:
    """One 512-token prompt on an idle instance: TTFT is one prefill iteration; TBT the decode iteration."""
    prompt, output = 512, 64
    trace = RequestTrace(np.array([1.0]), np.array([prompt]), np.array([output]), time_range_s=(0.0, 60.0))
    simulator = fluid(model_level(1), trace)
    decided = [m for m in (simulator.advance(5.0) for _ in range(4)) if m.decided]
    cost_model, model, gpu = default_cost_model(), get_model(MODEL), get_gpu("a100")
    overhead = engine_overhead(SimConfig().engine_overhead, gpu)
    dense = sum(
        cost_model.unit_time_s(model, u, gpu, 1, prompt)
        for u in model.units
        if u not in (UnitKind.ATTENTION, UnitKind.LM_HEAD)
    )
    attention = cost_model.attention_time_s(
        model,
        gpu,
        1,
        AttentionBatch(
            prefill_tokens=prompt, prefill_attention_pairs=prompt * (prompt + 1) / 2, num_prefills=1
        ),
    )
    prefill_s = (
        overhead.iteration_s(1, 1)
        + dense
        + cost_model.unit_time_s(model, UnitKind.LM_HEAD, gpu, 1, 1)
        + attention
    )
    assert decided and decided[0].ttft_mean_s == pytest.approx(prefill_s, rel=0.1)
    decode_s = (
        overhead.iteration_s(1, 1)
        + sum(cost_model.unit_time_s(model, u, gpu, 1, 1) for u in model.units if u is not UnitKind.ATTENTION)
        + cost_model.attention_time_s(
            model, gpu, 1, AttentionBatch(num_decodes=1, decode_context_tokens=prompt + output // 2)
        )
    )
    assert decided[0].tbt_mean_s == pytest.approx(decode_s, rel=0.1)


def test_overload_builds_a_backlog_that_drains() -> None:
    """30 req/s for 60 s on one instance (capacity ~5 req/s), then nothing: queue and TTFT grow, then drain."""
    trace = poisson_trace(30.0, 60.0, seed=1)
    simulator = fluid(model_level(1), trace)
    intervals = [simulator.advance(5.0) for _ in range(12)]
    waiting = [m.waiting_requests for m in intervals]
    assert all(b > a for a, b in itertools.pairwise(waiting[1:]))
    # interval TTFT counts deadline-decided requests at their wait so far (as the engine does)
    assert intervals[-1].ttft_mean_s > SLO_TTFT_S and intervals[-1].slo_attainment < 0.2
    # requests past their TTFT deadline are decided while still queued
    assert sum(m.decided for m in intervals) > sum(m.completions for m in intervals)
    drain = [simulator.advance(5.0) for _ in range(200)]
    assert drain[-1].waiting_requests == 0 and simulator.finished
    assert sum(m.completions for m in intervals + drain) == pytest.approx(len(trace), abs=2)
    summary = simulator.summary()
    assert summary.completed == pytest.approx(len(trace), abs=2)
    # FCFS drain at ~5 req/s: the last of ~1,800 requests waits minutes
    assert summary.ttft_p99_s > 100.0 and summary.ttft_mean_s > 30.0


def test_cost_per_advance_does_not_depend_on_rate() -> None:
    """The interval model touches the trace only through cumulative sums: 100x the requests, same work."""
    calls = []
    for rate in (1.0, 100.0):
        simulator = fluid(model_level(20), poisson_trace(rate, 200.0))
        index = simulator._arrivals
        windows: list[tuple[float, float]] = []
        original = index.window

        def counted(
            start_s: float, end_s: float, original: object = original, windows: list = windows
        ) -> object:
            windows.append((start_s, end_s))
            return original(start_s, end_s)  # type: ignore[operator]

        index.window = counted
        for _ in range(40):
            simulator.advance(5.0)
        calls.append(len(windows))
    assert calls[0] == calls[1] == 40


def test_added_instance_serves_after_its_load_time() -> None:
    simulator = fluid(
        Deployment.model_level(MODEL, "a100", instances=1, num_nodes=1), poisson_trace(2.0, 120.0)
    )
    simulator.advance(5.0)
    report = simulator.apply(ScalingAction(instance_delta=1))
    assert report.replicas_added[UnitKind.ATTENTION] == 1 and report.repairs == 0
    load_s = SimConfig().replica_load_time_s(get_model(MODEL).total_weight_bytes(1), whole_instance=True)
    first = simulator.advance(5.0)
    assert first.gpus_powered == 2
    assert first.units[UnitKind.FFN].replicas == 1 and first.units[UnitKind.FFN].pending_replicas == 1
    steps = math.ceil(load_s / 5.0)
    later = [simulator.advance(5.0) for _ in range(steps)]
    assert later[-1].units[UnitKind.FFN].replicas == 2 and later[-1].units[UnitKind.FFN].pending_replicas == 0


def test_operator_level_actions_are_repaired_and_counted() -> None:
    simulator = fluid(operator_level(), poisson_trace(2.0, 60.0))
    report = simulator.apply(
        ScalingAction(
            units={
                UnitKind.FFN: UnitAction(replica_delta=-5),
                UnitKind.QKV_PROJ: UnitAction(replica_delta=2, batch_cap_tokens=10**9),
                UnitKind.MOE: UnitAction(replica_delta=1),
                UnitKind.O_PROJ: UnitAction(move_replicas=1),
            },
            instance_delta=1,
        )
    )
    assert report.replicas_removed[UnitKind.FFN] == 1  # keeps one
    assert report.replicas_added[UnitKind.QKV_PROJ] == 2
    assert (
        report.repairs == 4 == len(report.messages)
    )  # ffn floor, cap clip, unit not in model, instance_delta
    assert report.replicas_added[UnitKind.O_PROJ] == report.replicas_removed[UnitKind.O_PROJ] == 1  # moved
    deployment = simulator.deployment
    assert deployment.units[UnitKind.FFN].replicas == 1 and deployment.units[UnitKind.QKV_PROJ].replicas == 3
    metrics = simulator.advance(5.0)
    assert metrics.units[UnitKind.QKV_PROJ].replicas == 3  # an operator loads in well under 5 s


@pytest.mark.parametrize("unit", [UnitKind.FFN, UnitKind.ATTENTION])
def test_a_move_places_and_releases_as_the_engine_does(unit: UnitKind) -> None:
    """Make before break: the new replica is placed off the old one's GPUs at once, the old one leaves
    once the new one serves; GPUs and memory end as the engine's, the serving count never drops."""
    deployment = operator_level()
    cluster = ClusterSpec.homogeneous("a100", deployment.num_nodes)
    trace = poisson_trace(2.0, 60.0)
    engine = DiscreteEventSimulator(cluster, MODEL, deployment, trace)
    model = fluid(deployment, trace)
    simulators: list[ServingSimulator] = [engine, model]
    for simulator in simulators:
        simulator.advance(5.0)
    before = model.snapshot().gpu_memory_used_bytes
    serving = model.advance(5.0).units[unit].replicas
    engine.advance(5.0)
    action = ScalingAction(units={unit: UnitAction(move_replicas=2, placement="spread-gpu")})
    engine_report, fluid_report = (simulator.apply(action) for simulator in simulators)
    assert fluid_report.replicas_added == engine_report.replicas_added == {unit: 2}
    assert fluid_report.replicas_removed == engine_report.replicas_removed == {unit: 2}
    assert fluid_report.repairs == engine_report.repairs == 0
    after_apply = model.snapshot().gpu_memory_used_bytes  # both old and new replicas hold memory
    assert sum(after_apply) > sum(before)
    metrics = model.advance(5.0)  # the new replicas load in well under 2.5 s: they serve, the old left
    assert metrics.units[unit].replicas == serving and metrics.units[unit].pending_replicas == 0
    assert sum(model.snapshot().gpu_memory_used_bytes) < sum(after_apply)
    for _ in range(2):
        engine.advance(5.0)
        model.advance(5.0)
    assert model.snapshot().gpus_powered == engine.snapshot().gpus_powered
    assert np.allclose(model.snapshot().gpu_memory_used_bytes, engine.snapshot().gpu_memory_used_bytes)
    assert not np.allclose(model.snapshot().gpu_memory_used_bytes, before)  # the replicas did move
    assert model.deployment.units[unit].replicas == engine.deployment.units[unit].replicas == serving


def test_a_move_whose_replacement_is_removed_while_loading_keeps_the_old_replica() -> None:
    deployment = operator_level()
    cluster = ClusterSpec.homogeneous("a100", deployment.num_nodes)
    trace = poisson_trace(2.0, 60.0)
    simulators: list[ServingSimulator] = [
        DiscreteEventSimulator(cluster, MODEL, deployment, trace),
        fluid(deployment, trace),
    ]
    replicas = deployment.units[UnitKind.FFN].replicas
    for simulator in simulators:
        simulator.advance(5.0)
        simulator.apply(
            ScalingAction(units={UnitKind.FFN: UnitAction(move_replicas=1, placement="spread-gpu")})
        )
        # scale-down takes loading replicas first: the replacement goes, so the move is void
        report = simulator.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=-1)}))
        assert report.replicas_removed == {UnitKind.FFN: 1}
        for _ in range(3):
            simulator.advance(5.0)
        assert simulator.deployment.units[UnitKind.FFN].replicas == replicas
    engine, model = simulators
    assert np.allclose(model.snapshot().gpu_memory_used_bytes, engine.snapshot().gpu_memory_used_bytes)


@pytest.mark.parametrize("granularity", ["model", "operator"])
def test_repairs_count_as_the_engines(granularity: str) -> None:
    """The same malformed action is repaired the same number of times, with the same messages, by both
    fidelities (at model level a replica delta and a move count once)."""
    deployment = (
        Deployment.model_level(MODEL, "a100", instances=1, num_nodes=1)
        if granularity == "model"
        else operator_level()
    )
    action = ScalingAction(
        units={
            UnitKind.FFN: UnitAction(replica_delta=-5, move_replicas=1),
            UnitKind.O_PROJ: UnitAction(batch_cap_tokens=0, move_replicas=10),
            UnitKind.MOE: UnitAction(replica_delta=1),
        }
    )
    trace = poisson_trace(2.0, 30.0)
    cluster = ClusterSpec.homogeneous("a100", deployment.num_nodes)
    engine_report = DiscreteEventSimulator(cluster, MODEL, deployment, trace).apply(action)
    fluid_report = fluid(deployment, trace).apply(action)
    # unit not in the model, cap clip, and the ffn floor and more o_proj moves than replicas, or at model
    # level the ffn and o_proj deltas or moves
    assert fluid_report.repairs == len(fluid_report.messages) == engine_report.repairs == 4
    assert fluid_report.messages == engine_report.messages
    assert fluid_report.replicas_added == engine_report.replicas_added
    assert fluid_report.replicas_removed == engine_report.replicas_removed


@pytest.mark.parametrize(
    "make",
    [
        lambda: Deployment.model_level(MODEL, "a100", instances=3),
        operator_level,
        lambda: Deployment.operator_level(
            MODEL, "a100", replicas=OPERATOR_REPLICAS, placement="spread-gpu", num_nodes=1
        ),
        lambda: Deployment.operator_level(
            "llama-2-70b", "a100", replicas=OPERATOR_REPLICAS, tp=4, num_nodes=2
        ),
        lambda: Deployment.model_level("llama-2-70b", "a100", instances=1, tp=4, pp=2, num_nodes=2),
    ],
    ids=["model", "operator-pack", "operator-spread", "operator-70b-tp4", "model-70b-tp4-pp2"],
)
def test_gpus_and_memory_identical_to_the_engine(make: object) -> None:
    deployment = make()  # type: ignore[operator]
    cluster = ClusterSpec.homogeneous("a100", deployment.num_nodes)
    trace = poisson_trace(1.0, 30.0)
    engine = DiscreteEventSimulator(cluster, deployment.model, deployment, trace)
    model = FluidSimulator(cluster, deployment.model, deployment, trace)
    assert model.snapshot().gpus_powered == engine.snapshot().gpus_powered
    assert np.allclose(model.snapshot().gpu_memory_used_bytes, engine.snapshot().gpu_memory_used_bytes)
    if deployment.granularity == "model":
        actions = [ScalingAction(instance_delta=2), ScalingAction(instance_delta=-1)]
    else:
        actions = [
            ScalingAction(
                units={
                    UnitKind.FFN: UnitAction(replica_delta=3),
                    UnitKind.ATTENTION: UnitAction(replica_delta=1),
                }
            ),
            ScalingAction(units={UnitKind.QKV_PROJ: UnitAction(replica_delta=2, placement="spread-node")}),
        ]
    for action in actions:
        engine.apply(action)
        model.apply(action)
        assert model.snapshot().gpus_powered == engine.snapshot().gpus_powered


def test_idle_cluster_draws_idle_power() -> None:
    empty = RequestTrace(np.array([1000.0]), np.array([10]), np.array([10]), time_range_s=(0.0, 2000.0))
    simulator = fluid(model_level(2), empty)
    metrics = simulator.advance(10.0)
    idle_w = PowerModel().profile(get_gpu("a100")).idle_w
    assert metrics.energy_j == pytest.approx(2 * idle_w * 10.0)
    assert (
        metrics.gpu_seconds == pytest.approx(20.0) and metrics.slo_attainment == 1.0 and metrics.decided == 0
    )


def test_energy_rises_with_load_and_slo_falls() -> None:
    light, heavy = (fluid(model_level(2), poisson_trace(rate, 300.0)) for rate in (1.0, 8.0))
    light_intervals = [light.advance(5.0) for _ in range(60)]
    heavy_intervals = [heavy.advance(5.0) for _ in range(60)]
    assert sum(m.energy_j for m in heavy_intervals) > 1.1 * sum(m.energy_j for m in light_intervals)
    assert heavy.summary().slo_attainment < light.summary().slo_attainment
    assert max(m.units[UnitKind.FFN].utilisation for m in heavy_intervals) > max(
        m.units[UnitKind.FFN].utilisation for m in light_intervals
    )


def test_strict_slo_lowers_attainment() -> None:
    trace = poisson_trace(4.0, 200.0)
    loose = fluid(model_level(2), trace, slo=SLO(ttft_s=5.0, tbt_s=1.0))
    strict = fluid(model_level(2), trace, slo=SLO(ttft_s=0.05, tbt_s=0.02))
    for simulator in (loose, strict):
        for _ in range(40):
            simulator.advance(5.0)
    assert loose.summary().slo_attainment > 0.95 > 0.2 > strict.summary().slo_attainment


def test_bad_input_raises() -> None:
    trace = poisson_trace(1.0, 30.0)
    simulator = fluid(model_level(), trace)
    with pytest.raises(ValueError, match="dt_s > 0"):
        simulator.advance(0.0)
    with pytest.raises(ValueError, match="deployment is for model"):
        FluidSimulator(ClusterSpec.homogeneous("a100", 1), "llama-3-8b", model_level(), trace)
    with pytest.raises(ValueError, match="GPU"):
        FluidSimulator(ClusterSpec.homogeneous("h100", 1), MODEL, model_level(), trace)
    long_trace = RequestTrace(np.array([1.0]), np.array([4000]), np.array([500]))
    with pytest.raises(ValueError, match="context limit"):
        fluid(model_level(), long_trace)
    clipped = fluid(model_level(), long_trace, config=SimConfig(clip_long_requests=True))
    assert clipped.clipped_requests == 1
