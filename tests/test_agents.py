"""Heuristic autoscalers: the planners' latency model, greedy vs exhaustive plans, HPA logic, registry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from opscale.agents.base import ControlContext, LoadEstimator
from opscale.agents.evaluation import evaluate, make_env
from opscale.agents.latency_model import (
    ModelLevelLatencyModel,
    OperatorLatencyModel,
    PlannerTargets,
    Workload,
)
from opscale.agents.model_level import ScalingMetric, TargetTrackingPolicy
from opscale.agents.operator_greedy import OperatorGreedyPolicy, OperatorPlan, PlanSearch, greedy_plan
from opscale.agents.oracle import exhaustive_plan
from opscale.agents.registry import POLICY_NAMES, SB3Policy, make_policy
from opscale.agents.static import StaticPolicy, provisioning_rate_per_s
from opscale.sim.config import SimConfig
from opscale.sim.costmodel import default_cost_model
from opscale.sim.deployment import Deployment, Placement, ScalingAction, UnitAction
from opscale.sim.hardware import ClusterSpec
from opscale.sim.metrics import default_slo
from opscale.sim.models import UnitKind, get_model
from opscale.sim.overhead import engine_overhead
from opscale.sim.queueing import mmc_mean_wait_s

MODEL = get_model("qwen2-7b")
CLUSTER = ClusterSpec.homogeneous("a100", 2)
SLO = default_slo(MODEL)
NO_CONTENTION = SimConfig(contention="none")


def _operator_model(
    sim_config: SimConfig = NO_CONTENTION, targets: PlannerTargets | None = None
) -> OperatorLatencyModel:
    return OperatorLatencyModel(
        MODEL, CLUSTER, SLO, default_cost_model(), sim_config, MODEL.units, targets=targets
    )


def _caps(value: float) -> dict[UnitKind, float]:
    return {unit: value for unit in MODEL.units}


# ----------------------------------------------------------------------------- latency model
def test_one_stream_never_queues_and_pays_its_call_and_transfers() -> None:
    """One stream has one job out at a time: its sojourn at a pool is exactly the call time of its
    iteration's tokens plus the per-layer NVLink hops (closed loop), whatever the open M/M/c says."""
    model = _operator_model()
    workload = Workload(3.0, 800.0, 200.0)
    tables = model.stream_tables(workload, 1, _caps(2048), 512, 4)
    tokens = workload.tokens_per_s * model.tau_budget_s
    link = CLUSTER.nodes[0].link
    for unit in model.stateless:
        hops = MODEL.layers_of(unit)
        transfer = (
            hops * link.latency_s
            + MODEL.activation_bytes_per_token(unit) * tokens * hops / link.bandwidth_bytes_per_s
        )
        expected = float(
            default_cost_model().unit_time_s_array(MODEL, unit, CLUSTER.gpu_of(0), 1, np.array([tokens]))[0]
        )
        assert tables.units[unit].sojourn_s[0] == pytest.approx(expected + transfer, rel=2e-3)


def test_pool_without_batching_waits_like_mmc() -> None:
    """A cap below one job's tokens forbids merging: the pool is a plain M/M/c queue of calls."""
    model = _operator_model()
    workload = Workload(40.0, 100.0, 100.0)
    streams = 12
    tables = model.stream_tables(workload, streams, _caps(1), 512, 6)
    tokens = workload.tokens_per_s * model.tau_budget_s / streams
    calls_per_s = streams / model.tau_budget_s
    link = CLUSTER.nodes[0].link
    unit = UnitKind.FFN
    service = model.unit_time_s(unit, np.array(tokens))
    hops = MODEL.layers_of(unit)
    transfer = (
        hops * link.latency_s
        + MODEL.activation_bytes_per_token(unit) * tokens * hops / link.bandwidth_bytes_per_s
    )
    table = tables.units[unit]
    for count in range(1, 7):
        wait = float(mmc_mean_wait_s(calls_per_s, service, count))
        if not math.isfinite(wait):
            assert not table.stable[count - 1]
            continue
        closed_bound = math.ceil((streams - 1) / count) * float(service)
        assert table.sojourn_s[count - 1] == pytest.approx(
            min(wait, closed_bound) + float(service) + transfer, rel=1e-6
        )


def test_more_replicas_never_slow_a_pool() -> None:
    """Without contention (with it, emptier replicas meet more busy neighbours: a small, real rise)."""
    model = _operator_model()
    tables = model.stream_tables(Workload(10.0, 1000.0, 200.0), 3, _caps(2048), 512, 8)
    for unit in model.stateless:
        sojourn = tables.units[unit].sojourn_s
        finite = sojourn[np.isfinite(sojourn)]
        assert np.all(np.diff(finite) <= 1e-12), unit


def test_model_level_iteration_is_the_sum_of_its_units() -> None:
    cost = default_cost_model()
    latency = ModelLevelLatencyModel(MODEL, CLUSTER, SLO, cost, NO_CONTENTION, 1)
    workload = Workload(4.0, 800.0, 200.0)
    iteration, tbt, _ = latency.iteration_s(workload, np.array([2.0]), 512)
    tau = latency.tau_budget_s
    decodes = workload.rate_per_s * workload.output_tokens * tau / 2
    prefill = workload.rate_per_s * workload.prompt_tokens * tau / 2
    gpu = CLUSTER.gpu_of(0)
    attention = cost.attention_time_s_array(
        MODEL,
        gpu,
        1,
        np.array([decodes]),
        np.array([decodes * 900.0]),
        np.array([prefill]),
        np.array([prefill * 801.0 / 2.0]),
        np.array([prefill / 800.0]),
    )[0]
    units = sum(
        cost.unit_time_s(MODEL, u, gpu, 1, decodes + prefill)
        for u in MODEL.units
        if u is not UnitKind.ATTENTION
    )
    overhead = engine_overhead(NO_CONTENTION.engine_overhead, gpu)
    expected = (
        overhead.fixed_s
        + overhead.per_request_s * (decodes + workload.rate_per_s * tau / 2)
        + attention
        + units
    )
    # unit_time_s takes whole tokens; the model uses the fractional count
    assert iteration[0] == pytest.approx(expected, rel=1e-2)
    assert tbt[0] > iteration[0]


def test_model_level_instances_grow_with_load() -> None:
    latency = ModelLevelLatencyModel(MODEL, CLUSTER, SLO, default_cost_model(), SimConfig(), 1)
    needed = [latency.instances_needed(Workload(rate, 1000.0, 200.0), 512, 16) for rate in (1.0, 8.0, 24.0)]
    assert needed[0] <= needed[1] <= needed[2]
    assert needed[2] > needed[0]


# ----------------------------------------------------------------------------- planners
@pytest.mark.parametrize("rate", [2.0, 6.0, 14.0])
def test_greedy_plan_is_feasible_and_locally_minimal(rate: float) -> None:
    model = _operator_model(SimConfig())
    search = PlanSearch(model, Workload(rate, 900.0, 180.0), _caps(1024), 512.0, 16)
    plan = greedy_plan(search, np.ones(len(MODEL.units), dtype=np.int64))
    assert plan.feasible
    slack = model.targets.removal_margin
    for index in range(len(MODEL.units)):
        if plan.replicas[index] > 1:
            fewer = plan.replicas.copy()
            fewer[index] -= 1
            assert search.excess(search.evaluate(fewer), slack)[0] > 0, MODEL.units[index]


def test_tbt_tail_counts_a_full_budget_chunk_even_at_light_load() -> None:
    """Bursts fill the token budget whatever the mean rate: the TBT estimate carries the whole free
    budget's prefill, so a budget whose full-chunk iteration breaks the TBT SLO is never feasible."""
    model = _operator_model(SimConfig())
    workload = Workload(0.2, 2000.0, 30.0)
    start = np.ones(len(MODEL.units), dtype=np.int64)
    decodes = workload.rate_per_s * workload.output_tokens * model.tau_budget_s
    chunk_s = float(
        default_cost_model().unit_time_s_array(
            MODEL, UnitKind.FFN, CLUSTER.gpu_of(0), 1, np.array([8192.0 - decodes])
        )[0]
    )
    assert chunk_s > SLO.tbt_s  # the FFN alone on an 8k-token chunk outlasts the TBT SLO
    for budget in (2048.0, 8192.0):
        plan = greedy_plan(PlanSearch(model, workload, _caps(16384), budget, 16), start)
        bump = float(plan.estimate.tbt_s[0] - plan.estimate.iteration_s[0])
        assert bump > 0.0
        if budget == 8192.0:
            assert not plan.feasible and float(plan.estimate.tbt_s[0]) > chunk_s


def test_feedback_slack_buys_headroom_and_holds_the_shrunk_budgets() -> None:
    """A plan under the controller's correction (budgets shrunk by ``slack``) keeps every budget at the
    shrunk level, so it never has fewer replicas of a unit than the uncorrected plan needs in total."""
    model = _operator_model(SimConfig())
    workload = Workload(6.0, 900.0, 180.0)
    start = np.ones(len(MODEL.units), dtype=np.int64)
    plain = greedy_plan(PlanSearch(model, workload, _caps(1024), 512.0, 16), start)
    corrected_search = PlanSearch(model, workload, _caps(1024), 512.0, 16, slack=0.3)
    corrected = greedy_plan(corrected_search, start)
    assert corrected.feasible
    assert corrected.replicas.sum() > plain.replicas.sum()
    estimate = corrected.estimate
    assert float(estimate.iteration_s[0]) <= model.targets.tbt_share * SLO.tbt_s * 0.7 + 1e-12
    assert float(estimate.ttft_s[0]) <= model.targets.ttft_share * SLO.ttft_s * 0.7 + 1e-12


def test_correction_grows_under_sustained_pressure_and_releases_when_calm() -> None:
    from opscale.agents import operator_greedy as greedy_module

    memory = greedy_module._GreedyMemory(load=LoadEstimator(900.0, 180.0, 5.0))
    memory.pressure_streak = greedy_module.PRESSURE_INTERVALS - 1
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == 0.0  # one bad interval is not enough
    for _ in range(20):
        memory.pressure_streak += 1
        OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == greedy_module.MAX_CORRECTION
    memory.pressure_streak = 0
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == pytest.approx(greedy_module.MAX_CORRECTION - greedy_module.CORRECTION_RELEASE)


def test_correction_step_that_does_not_lower_latency_is_taken_back() -> None:
    """Llama-2-70B on H100 ran away to 28 GPUs: each step bought attention streams that made the
    pooled calls smaller and slower, pressure stayed, and the integral kept adding. A step whose
    replicas leave the observed latency no better is undone, with its replicas."""
    from opscale.agents import operator_greedy as greedy_module

    memory = greedy_module._GreedyMemory(load=LoadEstimator(900.0, 180.0, 5.0))
    memory.pressure_streak = greedy_module.PRESSURE_INTERVALS
    memory.latency_level = 1.05
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == greedy_module.CORRECTION_STEP and memory.level_at_step == 1.05
    memory.replicas_at_step = np.array([1, 2, 4])
    # a step that did not make latency clearly worse is kept (one interval's p99 is noisy), and the
    # next one is judged against the new level
    memory.pressure_streak += 1
    memory.latency_level = 1.05 * 1.04
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == pytest.approx(2 * greedy_module.CORRECTION_STEP)
    # one that did is taken back: correction, ceiling and the replicas it added
    memory.pressure_streak += 1
    memory.latency_level = 1.05 * 1.04 * 1.06
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == pytest.approx(greedy_module.CORRECTION_STEP)
    assert memory.correction_ceiling == pytest.approx(greedy_module.CORRECTION_STEP)
    assert memory.revert_to is not None and memory.revert_to.tolist() == [1, 2, 4]
    # under the lowered ceiling further pressure adds nothing until the ceiling has room for a whole step
    steps_to_room = round(greedy_module.CORRECTION_STEP / greedy_module.CORRECTION_CEILING_RELEASE)
    for _ in range(steps_to_room - 1):
        memory.pressure_streak += 1
        OperatorGreedyPolicy.update_correction(memory)
        assert memory.correction == pytest.approx(greedy_module.CORRECTION_STEP)
    memory.pressure_streak += 1
    OperatorGreedyPolicy.update_correction(memory)
    assert memory.correction == pytest.approx(2 * greedy_module.CORRECTION_STEP)


@pytest.mark.parametrize("rate", [2.0, 6.0, 14.0])
def test_oracle_never_needs_more_gpus_than_greedy(rate: float) -> None:
    model = _operator_model(SimConfig())
    workload = Workload(rate, 900.0, 180.0)
    start = np.ones(len(MODEL.units), dtype=np.int64)
    greedy = greedy_plan(PlanSearch(model, workload, _caps(1024), 512.0, 16), start)
    oracle = exhaustive_plan(PlanSearch(model, workload, _caps(1024), 512.0, 16), start, extra_replicas=2)
    assert oracle.feasible and greedy.feasible
    assert (oracle.gpus_needed, float(oracle.estimate.gpus[0])) <= (
        greedy.gpus_needed,
        float(greedy.estimate.gpus[0]) + 1e-12,
    )


def test_oracle_refuses_large_boxes() -> None:
    model = _operator_model(SimConfig())
    search = PlanSearch(model, Workload(6.0, 900.0, 180.0), _caps(1024), 512.0, 16)
    with pytest.raises(ValueError, match="max_candidates"):
        exhaustive_plan(
            search, np.ones(len(MODEL.units), dtype=np.int64), extra_replicas=4, max_candidates=100
        )


def test_planner_targets_validate() -> None:
    with pytest.raises(ValueError, match="tbt_share"):
        PlannerTargets(tbt_share=1.5)


# ----------------------------------------------------------------------------- controllers
def test_load_estimator_discounts_counting_noise_and_learns_lengths() -> None:
    load = LoadEstimator(1000.0, 100.0, interval_s=5.0)
    load.observe_rate(4.0)
    load.observe_rate(5.0)
    # EWMA 4.3; last 5.0 minus one Poisson sigma sqrt(5/5) = 4.0 -> the mean wins
    assert load.rate_per_s == pytest.approx(4.3)
    load.observe_rate(20.0)  # far beyond noise: followed at once
    assert load.rate_per_s == pytest.approx(20.0 - 2.0)
    for _ in range(200):
        load.observe_interval({"arrivals": 10, "prompt_tokens_served": 5000, "output_tokens_served": 3000})
    assert load.mean_prompt_tokens == pytest.approx(500.0, rel=0.05)
    assert load.mean_output_tokens == pytest.approx(300.0, rel=0.05)


def _observation(context: ControlContext, replicas: int, **globals_: float) -> np.ndarray:
    layout = context.layout
    physical = np.zeros(layout.size)
    for feature in layout.features:
        if feature.unit is not None and feature.spec.key == "replicas":
            physical[feature.index] = replicas
        if feature.unit is not None and feature.spec.key == "batch_cap":
            physical[feature.index] = 512
    for name, value in globals_.items():
        physical[layout.index[name]] = value
    return layout.normalise(physical)


def test_hpa_scales_up_at_once_and_down_after_the_window() -> None:
    env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 4})
    policy = make_policy("model-level", env, target=10.0, token_budget=512, scale_down_window_s=30.0)
    assert isinstance(policy, TargetTrackingPolicy) and policy.config.metric is ScalingMetric.QUEUE
    context = policy.context
    interval = {"start_s": 0.0, "end_s": 5.0, "running_requests": 35, "waiting_requests": 10, "arrivals": 20}
    policy.observe_info({"interval": interval})
    action, _ = policy.predict(_observation(context, 2, arrival_rate=4.0))
    decoded = context.codec.decode(action)
    assert decoded.instance_delta == 2  # wants ceil(45 / 10) = 5 from 2: +2 now (largest delta)
    # load vanishes: the recommendation drops to 1, but the window (30 s = 2 decisions) holds it up
    steps_per_decision = policy.steps_per_decision
    deltas = []
    replicas = 5
    for _ in range(4 * steps_per_decision):
        policy.observe_info({"interval": {**interval, "running_requests": 2, "waiting_requests": 0}})
        action, _ = policy.predict(_observation(context, replicas, arrival_rate=0.5))
        delta = context.codec.decode(action).instance_delta
        deltas.append(delta)
        replicas += delta
    first_down = next(i for i, d in enumerate(deltas) if d < 0)
    assert first_down >= steps_per_decision  # not at the first decision after the drop
    assert replicas < 5


def test_greedy_policy_outputs_valid_actions_and_sets_budget() -> None:
    env = make_env("opscale/OperatorAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    policy = make_policy("operator-greedy", env)
    assert isinstance(policy, OperatorGreedyPolicy)
    observation, info = env.reset(seed=3)
    policy.observe_info(info)
    action, state = policy.predict(observation)
    assert state is None and env.action_space.contains(action)
    batch, _ = policy.predict(np.stack([observation, observation]))
    assert batch.shape == (2, *env.action_space.shape)


def test_episode_start_keeps_what_was_observed_since_the_reset() -> None:
    env = make_env("opscale/OperatorAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    policy = make_policy("operator-greedy", env)
    assert isinstance(policy, OperatorGreedyPolicy)
    observation, info = env.reset(seed=3)
    policy.observe_info(info)
    policy.predict(observation, episode_start=np.array([True]))
    first = policy._memory(0).load.arrivals
    assert first == info["interval"]["arrivals"] > 0
    observation, info = env.reset(seed=4)  # a second episode: used memory is forgotten
    policy.observe_info(info)
    policy.predict(observation, episode_start=np.array([True]))
    assert policy._memory(0).load.arrivals == info["interval"]["arrivals"]


def test_static_provisions_for_the_peak() -> None:
    env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    context = ControlContext.from_env(env)
    assert provisioning_rate_per_s(context, 100, 60) >= provisioning_rate_per_s(context, 50, 60)
    peak = StaticPolicy(context)
    median = StaticPolicy(context, percentile=50)
    assert peak.deployment.instances >= median.deployment.instances >= 1
    with pytest.raises(ValueError, match="percentile"):
        StaticPolicy(context, percentile=0)


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_errors(tmp_path) -> None:
    env = make_env("opscale/OperatorAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    assert set(POLICY_NAMES) == {
        "static",
        "model-level",
        "model-level-throughput",
        "model-level-planner",
        "operator-greedy",
        "oracle",
    }
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*operator-greedy"):
        make_policy("nope", env)
    with pytest.raises(FileNotFoundError, match="not found"):
        make_policy(str(tmp_path / "missing.zip"), env)
    with pytest.raises(ValueError, match="ModelAutoscale"):
        make_policy("model-level", env)
    model_env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    with pytest.raises(ValueError, match="OperatorAutoscale"):
        make_policy("operator-greedy", model_env)


@pytest.mark.slow  # imports torch and builds two SB3 models
@pytest.mark.parametrize("maskable", [False, True])
def test_registry_loads_saved_sb3_models(tmp_path, maskable: bool) -> None:
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    env = make_env("opscale/OperatorAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    algo = MaskablePPO if maskable else PPO
    path = tmp_path / "model.zip"
    algo("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu").save(path)
    policy = make_policy(str(path), env)
    assert isinstance(policy, SB3Policy) and policy.maskable is maskable
    observation, _ = env.reset(seed=0)
    action, _ = policy.predict(observation)
    assert env.action_space.contains(np.asarray(action, dtype=np.int64))
    model_env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 3})
    with pytest.raises(ValueError, match="trained for observation"):
        make_policy(str(path), model_env)
    # start_from: the saved model starts where the planner starts, and the harness rebinds its env
    assert policy.initial_deployment() is None
    started = make_policy(str(path), env, start_from="operator-greedy")
    planned = make_policy("operator-greedy", env).initial_deployment()
    assert isinstance(started, SB3Policy) and started.initial_deployment() == planned
    with pytest.raises(ValueError, match="only the option start_from"):
        make_policy(str(path), env, percentile=95)
    result = evaluate(
        started, "opscale/OperatorAutoscale-v0", seeds=[0], fidelity="fluid", env_config={"horizon": 3}
    )
    assert started.env is not env and result.episodes[0].steps == 3


def test_estimate_matches_the_tables_for_any_stream_counts() -> None:
    model = _operator_model(SimConfig())
    workload = Workload(8.0, 900.0, 180.0)
    candidates = np.array([[1, 1, 1, 2, 1, 2, 1], [1, 2, 2, 3, 2, 3, 1]], dtype=np.int64)
    estimate = model.estimate(workload, candidates, _caps(1024), 512)
    for row, candidate in enumerate(candidates):
        tables = model.stream_tables(workload, int(candidate[model.attention_index]), _caps(1024), 512, 3)
        single = model.evaluate(workload, tables, candidate, 512)
        assert estimate.iteration_s[row] == pytest.approx(single.iteration_s[0])
        assert estimate.gpus_needed[row] == single.gpus_needed[0]


def test_contention_aware_placement_spreads_pools_and_streams() -> None:
    from opscale.agents.operator_greedy import contention_aware_placement

    model = _operator_model(SimConfig(), PlannerTargets(max_gpu_busy=0.3))
    search = PlanSearch(model, Workload(12.0, 900.0, 180.0), _caps(1024), 512.0, 16)
    plan = greedy_plan(search, np.ones(len(MODEL.units), dtype=np.int64))
    assert plan.gpus_needed >= 2
    placement = contention_aware_placement(search, plan.replicas, CLUSTER.num_gpus, 0.0)
    for unit, groups in placement.items():
        assert len(groups) == plan.replicas[MODEL.units.index(unit)]
        gpus = [group[0] for group in groups]
        assert len(set(gpus)) == min(len(gpus), plan.gpus_needed), unit  # one per GPU while GPUs last


def _planned_placement(
    model_name: str, gpu: str, num_nodes: int, workload: Workload
) -> tuple[OperatorLatencyModel, OperatorPlan, dict[UnitKind, list[tuple[int, ...]]]]:
    """Operator-greedy's latency model, its plan from one replica per unit (token budget 256) for
    ``workload``, and :func:`contention_aware_placement` of that plan on 8-GPU nodes."""
    from opscale.agents.operator_greedy import contention_aware_placement

    env = make_env(
        "opscale/OperatorAutoscale-v0",
        fidelity="fluid",
        env_config={"model": model_name, "gpu": gpu, "num_nodes": num_nodes, "horizon": 2},
    )
    policy = make_policy("operator-greedy", env)
    start = np.ones(len(policy.latency_model.units), dtype=np.int64)
    search = policy.search(workload, start, 256)
    plan = greedy_plan(search, start)
    placement = contention_aware_placement(search, plan.replicas, policy.context.cluster.num_gpus, 0.0, 8)
    env.close()
    return policy.latency_model, plan, placement


# the default trace's longest prompts exceed Llama-2-70B's 4096-token context: the env clips them and says so
@pytest.mark.filterwarnings("ignore:.*'llama-2-70b' has a 4096-token context:UserWarning")
def test_contention_aware_placement_gives_tp_units_aligned_balanced_groups() -> None:
    """Llama-2-70B on H100: TP-2 and TP-4 units. Every group is aligned inside one node, and a pool's
    replicas take different groups while groups last (placing TP units by hand was what kept a
    70B operator deployment from thrashing on shared GPUs)."""
    model, plan, placement = _planned_placement("llama-2-70b", "h100", 6, Workload(5.0, 1100.0, 200.0))
    assert {model.tp[unit] for unit in model.units} >= {2, 4}
    for unit, groups in placement.items():
        tp = model.tp[unit]
        assert len(groups) == plan.replicas[model.units.index(unit)]
        for group in groups:
            assert (
                len(group) == tp and group[0] % tp == 0 and group == tuple(range(group[0], group[0] + tp))
            ), (unit, group)
            assert group[0] // 8 == group[-1] // 8
        distinct = -(-plan.gpus_needed // tp) * tp // tp
        assert len(set(groups)) == min(len(groups), distinct), unit


def test_contention_aware_placement_opens_only_the_group_it_needs() -> None:
    """Qwen2-57B-A14B on A100 at 5.5 req/s: three TP-4 MoE replicas too busy to share a group take
    GPUs 0-11. Opening a group must open just its GPUs: an overshoot (to GPU 15) left free GPUs that
    the TP-1 replicas placed next spread onto, three GPUs more for no latency gain."""
    model, plan, placement = _planned_placement("qwen2-57b-a14b", "a100", 2, Workload(5.5, 1155.0, 211.0))
    moe = model.units.index(UnitKind.MOE)
    assert plan.replicas[moe] == 3 and model.tp[UnitKind.MOE] == 4
    assert sorted(placement[UnitKind.MOE]) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    used = {gpu for groups in placement.values() for group in groups for gpu in group}
    assert used == set(range(12))


@pytest.mark.parametrize("metric", ["utilisation", "queue", "throughput"])
def test_hpa_metrics_produce_valid_actions(metric: str) -> None:
    env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 2})
    policy = make_policy("model-level", env, metric=metric)
    observation, info = env.reset(seed=0)
    policy.observe_info(info)
    for _ in range(2):
        action, _ = policy.predict(observation)
        assert env.action_space.contains(action)
        observation, *_, info = env.step(action)
        policy.observe_info(info)
    with pytest.raises(ValueError, match="not a batch-cap bucket"):
        make_policy("model-level", env, metric=metric, token_budget=300)


# ----------------------------------------------------------------------------- co-located chains
def _default_greedy(horizon: int = 2) -> tuple[Any, OperatorGreedyPolicy]:
    env = make_env("opscale/OperatorAutoscale-v0", fidelity="fluid", env_config={"horizon": horizon})
    policy = make_policy("operator-greedy", env)
    assert isinstance(policy, OperatorGreedyPolicy)
    return env, policy


@pytest.mark.parametrize("rate", [2.0, 20.0])
def test_planner_takes_chains_only_when_they_are_cheaper_or_safer(rate: float) -> None:
    """The starting plan is co-located chains exactly when the chain model's count needs fewer GPUs
    than the greedy per-unit plan, or as many while the plan shares a pool among streams (Qwen2-7B on
    A100: chains at the embedded default's light load, the per-unit plan at 20 req/s, where its
    Erlang-C estimate is the cheaper)."""
    env, policy = _default_greedy()
    workload = Workload(rate, *policy._prior_lengths)
    plan = policy.plan_from_scratch(workload)[2]
    _, chains = policy.chain_budget(workload)
    assert chains is not None and plan.feasible
    deployment = policy.planned_deployment(workload)
    replicas = {config.replicas for config in deployment.units.values()}
    streams = plan.replicas[policy.latency_model.attention_index]
    chain_gpus = chains * (policy.chain_tp or 0)
    assert policy.prefers_chains(plan, chains) == (
        chain_gpus < plan.gpus_needed
        or (chain_gpus == plan.gpus_needed and bool((plan.replicas < streams).any()))
    )
    if policy.prefers_chains(plan, chains):
        assert replicas == {chains}
        layouts = {tuple(config.gpus or ()) for config in deployment.units.values()}
        assert layouts == {tuple((gpu,) for gpu in range(chains))}  # chain k on GPU k
        assert len({config.batch_cap_tokens for config in deployment.units.values()}) == 1
    else:
        assert len(replicas) > 1
    env.close()


def test_chains_of_a_model_with_tp_units_run_every_unit_at_the_model_level_tp() -> None:
    """Qwen2-57B-A14B on A100 runs its MoE experts at TP 4 and the rest narrower in the env's default;
    its chain runs every unit at the model-level degree (4: the weights need it) on aligned groups."""
    env = make_env(
        "opscale/OperatorAutoscale-v0",
        fidelity="fluid",
        env_config={"model": "qwen2-57b-a14b", "num_nodes": 2, "horizon": 2},
    )
    policy = make_policy("operator-greedy", env)
    assert isinstance(policy, OperatorGreedyPolicy)
    assert len({config.tp for config in policy.context.initial_deployment.units.values()}) > 1
    assert policy.chain_tp == 4 and policy.max_chains == 4
    deployment = policy.chain_deployment(Workload(30.0, 1000.0, 200.0))
    assert deployment is not None
    chains = deployment.units[UnitKind.ATTENTION].replicas
    assert chains >= 2
    for config in deployment.units.values():
        assert config.tp == 4 and config.gpus == [tuple(range(4 * k, 4 * k + 4)) for k in range(chains)]
    env.close()


@pytest.mark.shared
def test_a_plan_that_ties_at_the_mean_but_scales_worse_starts_as_chains() -> None:
    """Qwen2-57B-A14B on A100s with the Azure code trace: the per-unit plan and one chain both need 4
    GPUs at the mean rate (so the plan, without shared pools, used to be taken), but at the 90th
    percentile of the per-minute rates the plan needs more GPUs than the chains: the episode starts
    (and stays) in chain mode."""
    env = make_env(
        "opscale/OperatorAutoscale-v0",
        fidelity="fluid",
        env_config={"model": "qwen2-57b-a14b", "trace": "azure-code", "num_nodes": 2, "horizon": 2},
    )
    policy = make_policy("operator-greedy", env)
    assert isinstance(policy, OperatorGreedyPolicy)
    trace = policy.context.trace
    lengths = (max(policy._prior_lengths[0], 1.0), max(policy._prior_lengths[1], 1.0))
    mean = Workload(trace.mean_rate_per_s, *lengths)
    peak = Workload(float(np.quantile(trace.rate_curve(60.0)[1], 0.9)), *lengths)
    plan = policy.plan_from_scratch(mean)[2]
    _, chains = policy.chain_budget(mean)
    assert chains is not None and not policy.prefers_chains(plan, chains)
    assert not policy.scales_worse(mean) and policy.scales_worse(peak)
    deployment = policy.initial_deployment()
    assert deployment is not None and policy.starts_with_chains
    assert {config.tp for config in deployment.units.values()} == {4}
    env.close()


def test_fewest_instances_needs_more_with_slack() -> None:
    latency = ModelLevelLatencyModel(
        MODEL, ClusterSpec.homogeneous("a100", 4), SLO, default_cost_model(), SimConfig()
    )
    workload = Workload(12.0, 1000.0, 200.0)
    counts = [latency.fewest_instances(workload, 512, 32, slack) for slack in (0.0, 0.2, 0.4)]
    assert all(count is not None for count in counts)
    assert counts == sorted(counts) and counts[-1] > counts[0]  # type: ignore[type-var]
    assert latency.instances_needed(workload, 512, 32) == counts[0]
    assert latency.fewest_instances(Workload(1e4, 1000.0, 200.0), 512, 4) is None


def _units_on_gpus(simulator: Any) -> dict[int, list[UnitKind]]:
    """Per powered GPU, the units whose replicas live there (either fidelity; reads private state)."""
    placed: dict[int, list[UnitKind]] = {}
    for unit in MODEL.units:
        if hasattr(simulator, "layout"):  # fluid
            groups = [replica.gpus for replica in simulator.layout.replicas[unit]]
        elif unit is UnitKind.ATTENTION:
            groups = [replica.gpus for replica in simulator._attention_replicas.values()]
        else:
            groups = [replica.gpus for replica in simulator.pools[unit].replicas]
        for group in groups:
            for gpu in group:
                placed.setdefault(gpu, []).append(unit)
    return placed


@pytest.mark.parametrize("fidelity", ["fluid", "des"])
def test_chain_actions_add_and_remove_whole_chains(fidelity: str) -> None:
    """Chain mode's actions (every unit +2, then every unit -1) keep the layout co-located on both
    simulators: the two new streams open a GPU each (``spread-gpu``) and every other unit's two
    replicas join them (``colocate``, placed after the streams although the units come first in the
    action), so each new GPU holds one replica of every unit; the removal empties one GPU (the
    engine's removal order takes the whole chain)."""
    _, policy = _default_greedy()
    deployment = policy.chain_deployment(Workload(2.0, *policy._prior_lengths))
    assert deployment is not None
    chains = deployment.units[UnitKind.ATTENTION].replicas
    env = make_env(
        "opscale/OperatorAutoscale-v0",
        fidelity=fidelity,
        env_config={"horizon": 4, "initial_deployment": deployment},
    )
    env.reset(seed=0)
    simulator = env.unwrapped.simulator
    one_chain = set(MODEL.units)
    assert MODEL.units.index(UnitKind.ATTENTION) > 0  # colocated units come first in the action
    for delta, expected in ((+2, chains + 2), (-1, chains + 1)):
        action = ScalingAction(
            units={
                unit: UnitAction(
                    replica_delta=delta,
                    placement=Placement.SPREAD_GPU if unit is UnitKind.ATTENTION else Placement.COLOCATE,
                )
                for unit in MODEL.units
            }
        )
        report = simulator.apply(action)
        assert report.repairs == 0, report.messages
        simulator.advance(5.0)
        placed = _units_on_gpus(simulator)
        assert len(placed) == expected
        assert all(sorted(units, key=MODEL.units.index) == list(MODEL.units) for units in placed.values()), (
            placed
        )
        assert {unit for units in placed.values() for unit in units} == one_chain
    env.close()


def test_chain_mode_moves_every_unit_together() -> None:
    """In chain mode every action gives all units the same replica delta, attention ``spread-gpu`` and
    the rest ``colocate``; under sustained pressure at a load far beyond the chains it adds as many
    whole chains as one action's delta allows (+2), and when the load is gone it removes them one
    per interval."""
    env, policy = _default_greedy()
    policy.initial_deployment()
    assert policy.starts_with_chains
    context = policy.context

    def deltas(replicas: int, **globals_: float) -> set[int]:
        action, _ = policy.predict(_observation(context, replicas, **globals_))
        decoded = context.codec.decode(action)
        placements = [unit_action.placement for unit_action in decoded.units.values()]
        assert placements == [
            Placement.SPREAD_GPU if unit is UnitKind.ATTENTION else Placement.COLOCATE
            for unit in decoded.units
        ]
        assert list(decoded.units) == list(context.units)
        return {unit_action.replica_delta for unit_action in decoded.units.values()}

    seen = [deltas(2, arrival_rate=40.0, slo_attainment=0.5) for _ in range(3)]
    assert all(len(step) == 1 for step in seen) and max(next(iter(step)) for step in seen) == 2
    policy.reset()
    calm = [deltas(6, arrival_rate=0.1, slo_attainment=1.0) for _ in range(3)]
    assert all(len(step) == 1 for step in calm) and min(next(iter(step)) for step in calm) == -1
    env.close()


def test_chains_beyond_any_certified_count_take_the_whole_cluster() -> None:
    """A load no chain count meets: every chain the cluster holds, at the budget with the most decode
    throughput per chain (what the model-level autoscaler's budget maximises too)."""
    env, policy = _default_greedy()
    workload = Workload(1e4, *policy._prior_lengths)
    budget, chains = policy.chain_budget(workload)
    assert chains is None
    assert policy.chain_model is not None
    capacities = {
        b: policy.chain_model.capacity(workload, b)[1] for b in policy.context.batch_cap_buckets_tokens
    }
    assert capacities[budget] == max(capacities.values())
    deployment = policy.chain_deployment(workload)
    assert deployment is not None
    assert {config.replicas for config in deployment.units.values()} == {policy.max_chains}
    assert policy.max_chains == policy.context.cluster.num_gpus
    env.close()


def test_model_level_planner_is_chain_mode_on_instances() -> None:
    """``model-level-planner`` starts from the instances chain mode would start from (same count, same
    budget), scales by instance deltas toward :meth:`chain_target`, and refuses pipeline stages."""
    operator_env, greedy = _default_greedy()
    model_env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": 2})
    planner = make_policy("model-level-planner", model_env)
    from opscale.agents.model_planner import ModelLevelPlannerPolicy

    assert isinstance(planner, ModelLevelPlannerPolicy)
    chains = greedy.initial_deployment()
    instances = planner.initial_deployment()
    assert chains is not None and instances is not None and greedy.starts_with_chains
    assert instances.instances == chains.units[UnitKind.ATTENTION].replicas
    assert (
        instances.units[UnitKind.ATTENTION].batch_cap_tokens
        == chains.units[UnitKind.ATTENTION].batch_cap_tokens
    )
    context = planner.context
    action, _ = planner.predict(_observation(context, 1, arrival_rate=40.0, slo_attainment=0.5))
    decoded = context.codec.decode(action)
    assert decoded.instance_delta == 0  # pressure must be sustained before adding
    for _ in range(3):
        action, _ = planner.predict(_observation(context, 1, arrival_rate=40.0, slo_attainment=0.5))
    assert context.codec.decode(action).instance_delta == max(context.replica_deltas)
    staged = make_env(
        "opscale/ModelAutoscale-v0",
        fidelity="fluid",
        env_config={
            "horizon": 2,
            "initial_deployment": Deployment.model_level("qwen2-7b", "a100", instances=1, pp=2, num_nodes=2),
        },
    )
    with pytest.raises(ValueError, match="single-stage"):
        make_policy("model-level-planner", staged)
    for env in (operator_env, model_env, staged):
        env.close()
