"""Environment layer: configuration, spaces, reward, episode mechanics (on a stand-in simulator).

These tests pin the Gym layer's own behaviour with :mod:`envs_fake_simulator` so they stay fast and do
not move when the simulators' numbers do; ``test_envs_registered.py`` runs the registered ids on the
real simulators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from envs_fake_simulator import FakeSimulator

from opscale.envs import base
from opscale.envs.config import default_config, resolve_config
from opscale.envs.model_autoscale import ModelAutoscaleEnv
from opscale.envs.operator_autoscale import OperatorAutoscaleEnv
from opscale.envs.reward import RewardFunction
from opscale.envs.spaces import (
    GLOBAL_FEATURES,
    PLACEMENT_CHOICES,
    UNIT_FEATURES,
    ModelActionCodec,
    ObservationLayout,
    OperatorActionCodec,
    addable_replicas,
    decode_observation,
)
from opscale.sim.deployment import Deployment, Placement, ScalingAction, UnitAction
from opscale.sim.metrics import IntervalMetrics
from opscale.sim.models import UnitKind, get_model
from opscale.traces.trace import RequestTrace

DENSE_UNITS = get_model("qwen2-7b").units


@pytest.fixture
def trace() -> RequestTrace:
    rng = np.random.default_rng(7)
    count = 6000
    return RequestTrace(
        np.sort(rng.uniform(0.0, 1800.0, count)),
        rng.integers(16, 2048, count),
        rng.integers(8, 512, count),
        name="uniform",
        time_range_s=(0.0, 1800.0),
    )


@pytest.fixture
def fake_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "simulator_class", lambda fidelity: FakeSimulator)


def _layout(units: tuple[UnitKind, ...] = DENSE_UNITS) -> ObservationLayout:
    scales = {
        "max_replicas": 16.0,
        "queue_tokens": 1e6,
        "tbt_slo": 0.1,
        "ttft_slo": 1.0,
        "max_batch_cap": 8192.0,
        "rate": 10.0,
        "waiting_requests": 1e4,
        "num_gpus": 16.0,
        "max_power_w": 6400.0,
    }
    return ObservationLayout(units, scales)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "gpt-9"}, "unknown model 'gpt-9'; valid names: .*qwen2-7b"),
        ({"gpu": "v100"}, "unknown GPU 'v100'; valid names: .*a100"),
        ({"horizon": 0}, "'horizon' must be >= 1, got 0"),
        ({"horizon": -5}, "'horizon' must be >= 1"),
        ({"reward_weights": {"gpu": -1.0}}, r"'reward_weights.gpu' must be >= 0, got -1.0"),
        ({"reward_weights": {"latency": 1.0}}, "unknown reward components .*valid: slo, gpu, energy"),
        ({"fidelity": "exact"}, "unknown fidelity 'exact'; valid: des, fluid"),
        ({"slo_penalty": "cubic"}, "unknown slo_penalty 'cubic'; valid: hinge, squared, step"),
        ({"slo_target": 1.5}, r"'slo_target' must be in \(0, 1\]"),
        ({"control_interval_s": 0}, "'control_interval_s' must be > 0"),
        ({"replica_deltas": (1, 2)}, "must include 0"),
        ({"horizion": 10}, "unknown config keys \\['horizion'\\]; valid keys: .*horizon"),
        ({"cold_start": {"warm_s": 1.0}}, "unknown cold_start keys"),
        ({"slo": {"ttft_s": 0.0, "tbt_s": 0.1}}, "'slo.ttft_s' must be > 0"),
        ({"trace": "azure-chat"}, "unknown trace 'azure-chat'; valid names: .*azure-conv.*default"),
        ({"trace": 42}, "unknown trace 42"),
        ({"long_requests": "wrap"}, "unknown long_requests policy 'wrap'; valid: clip, drop, error"),
        ({"initial_replica_jitter": -1}, "'initial_replica_jitter' must be >= 0"),
        ({"initial_replica_jitter": 1.5}, "'initial_replica_jitter' must be"),
        ({"chain_actions": 1}, "'chain_actions' must be true or false, got 1"),
    ],
)
def test_bad_config_raises_naming_value_and_choices(
    overrides: dict, message: str, trace: RequestTrace
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config({"trace": trace}, **overrides)


def test_default_config_is_a_fresh_copy() -> None:
    config = default_config()
    config["reward_weights"]["slo"] = -3.0
    assert default_config()["reward_weights"]["slo"] == 10.0


def test_bad_config_raises_at_env_construction(trace: RequestTrace, fake_sim: None) -> None:
    with pytest.raises(ValueError, match="'horizon' must be >= 1"):
        OperatorAutoscaleEnv(trace=trace, horizon=0)
    with pytest.raises(ValueError, match="shorter than one episode"):
        OperatorAutoscaleEnv(trace=trace, horizon=1000)
    with pytest.raises(ValueError, match=r"episode start 1790\.0 s is outside the trace"):
        OperatorAutoscaleEnv(trace=trace, episode_start_s=1790.0)
    with pytest.raises(ValueError, match=r"episode start 1790\.0 s is outside the trace"):
        OperatorAutoscaleEnv(trace=trace, episode_start_s=(0.0, 1790.0))
    with pytest.raises(ValueError, match="low <= high"):
        OperatorAutoscaleEnv(trace=trace, episode_start_s=(20.0, 10.0))
    with pytest.raises(ValueError, match=r"must be \(low, high\)"):
        OperatorAutoscaleEnv(trace=trace, episode_start_s=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="unknown render_mode 'human'"):
        OperatorAutoscaleEnv(trace=trace, render_mode="human")


def test_requests_longer_than_the_context_are_clipped_dropped_or_refused(fake_sim: None) -> None:
    long = RequestTrace(
        np.arange(200.0) * 5.0,
        np.where(np.arange(200) % 2 == 0, 4000, 100),
        np.full(200, 100),
        name="long",
        time_range_s=(0.0, 1000.0),
    )
    with pytest.raises(ValueError, match=r"needs 4100 context tokens .*> max_context 4096"):
        OperatorAutoscaleEnv(trace=long, model="llama-2-7b", horizon=10, long_requests="error")
    with pytest.warns(UserWarning, match="4096-token context: .*100"):
        clipped = OperatorAutoscaleEnv(trace=long, model="llama-2-7b", horizon=10)
    assert len(clipped.trace) == 200 and clipped.longest_request_tokens == 4096
    with pytest.warns(UserWarning):
        dropped = OperatorAutoscaleEnv(trace=long, model="llama-2-7b", horizon=10, long_requests="drop")
    assert len(dropped.trace) == 100 and dropped.longest_request_tokens == 200
    assert OperatorAutoscaleEnv(trace=long, model="qwen2-7b", horizon=10).trace is long


def test_initial_deployment_of_the_wrong_granularity_or_above_the_cap_raises(
    trace: RequestTrace, fake_sim: None
) -> None:
    operator_env = OperatorAutoscaleEnv(trace=trace)
    five = Deployment.operator_level("qwen2-7b", "a100", replicas=dict.fromkeys(DENSE_UNITS, 5), num_nodes=2)
    with pytest.raises(ValueError, match="5 replicas of one unit, above max_replicas_per_unit=4"):
        OperatorAutoscaleEnv(trace=trace, initial_deployment=five, max_replicas_per_unit=4)
    with pytest.raises(ValueError, match="needs a deployment of granularity 'model'"):
        ModelAutoscaleEnv(trace=trace, initial_deployment=operator_env.initial_deployment)


# ---------------------------------------------------------------------------------------------- spaces
def test_layout_names_every_index_in_order() -> None:
    layout = _layout()
    assert layout.size == len(DENSE_UNITS) * len(UNIT_FEATURES) + len(GLOBAL_FEATURES) == 60
    assert layout.index["embed.replicas"] == 0
    assert layout.index["attention.utilisation"] == 3 * 7 + 2
    assert layout.index["arrival_rate"] == layout.global_offset == 49
    assert layout.index["episode_progress"] == 59
    assert [f.index for f in layout.features] == list(range(60))
    space = layout.space()
    assert space.dtype == np.float32 and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))


def test_normalise_clips_and_physical_inverts() -> None:
    layout = _layout()
    physical = np.zeros(layout.size)
    physical[layout.index["attention.replicas"]] = 4
    physical[layout.index["ffn.queue"]] = 999.0
    physical[layout.index["ttft_p99"]] = 50.0  # 50 x the SLO: clipped to 10
    physical[layout.index["arrival_trend"]] = -3.0
    observation = layout.normalise(physical)
    assert observation.dtype == np.float32
    assert observation[layout.index["attention.replicas"]] == pytest.approx(0.25)
    assert observation[layout.index["ffn.queue"]] == pytest.approx(math.log1p(999.0) / math.log1p(1e6))
    assert observation[layout.index["ttft_p99"]] == 10.0
    assert observation[layout.index["arrival_trend"]] == pytest.approx(-0.3)
    decoded = decode_observation(observation, layout, physical=True)
    assert decoded["attention"]["replicas"] == pytest.approx(4.0)
    assert decoded["ffn"]["queue"] == pytest.approx(999.0, rel=1e-4)
    assert decoded["ttft_p99"] == pytest.approx(10.0)  # clipped value decodes to the bound
    assert set(decode_observation(observation, layout)) == {u.value for u in DENSE_UNITS} | {
        g.key for g in GLOBAL_FEATURES
    }
    with pytest.raises(ValueError, match="shape"):
        decode_observation(observation[:-1], layout)


def test_operator_codec_round_trips_and_rejects_unrepresentable() -> None:
    codec = OperatorActionCodec(DENSE_UNITS, (-2, -1, 0, 1, 2), (256, 512, 1024, 2048, 4096, 8192))
    assert list(codec.nvec) == [5, 7, 4] * 7
    action = ScalingAction(
        units={
            UnitKind.ATTENTION: UnitAction(
                replica_delta=2, batch_cap_tokens=4096, placement=Placement.SPREAD_NODE
            ),
            UnitKind.FFN: UnitAction(replica_delta=-1),
        }
    )
    vector = codec.encode(action)
    attention = 3 * DENSE_UNITS.index(UnitKind.ATTENTION)
    assert list(vector[attention : attention + 3]) == [4, 5, 2]
    decoded = codec.decode(vector)
    assert decoded.units[UnitKind.ATTENTION] == action.units[UnitKind.ATTENTION]
    assert (
        decoded.units[UnitKind.FFN].replica_delta == -1
        and decoded.units[UnitKind.FFN].batch_cap_tokens is None
    )
    assert all(
        u.replica_delta == 0 and u.batch_cap_tokens is None
        for k, u in codec.decode(codec.noop()).units.items()
    )
    with pytest.raises(ValueError, match="not representable; valid deltas"):
        codec.encode(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=3)}))
    with pytest.raises(ValueError, match="is not a bucket"):
        codec.encode(ScalingAction(units={UnitKind.FFN: UnitAction(batch_cap_tokens=300)}))
    with pytest.raises(ValueError, match="this env's units"):
        codec.encode(ScalingAction(units={UnitKind.MOE: UnitAction(replica_delta=1)}))


def test_chain_dimension_adds_or_removes_one_replica_of_every_unit() -> None:
    codec = OperatorActionCodec(DENSE_UNITS, (-2, -1, 0, 1, 2), (512, 2048), chain_actions=True)
    assert list(codec.nvec) == [5, 3, 4] * 7 + [3]
    noop = codec.noop()
    assert noop[-1] == 1 and all(u.replica_delta == 0 for u in codec.decode(noop).units.values())
    attention = 3 * DENSE_UNITS.index(UnitKind.ATTENTION)
    vector = noop.copy()
    vector[attention : attention + 3] = [0, 2, 0]  # -2 replicas, cap 2048, pack: overridden but the cap
    vector[-1] = 2
    added = codec.decode(vector).units
    assert {u.replica_delta for u in added.values()} == {1}
    assert added[UnitKind.ATTENTION].placement is Placement.SPREAD_GPU
    assert {added[unit].placement for unit in DENSE_UNITS if unit is not UnitKind.ATTENTION} == {
        Placement.COLOCATE
    }
    assert added[UnitKind.ATTENTION].batch_cap_tokens == 2048 and added[UnitKind.FFN].batch_cap_tokens is None
    vector[-1] = 0
    assert {u.replica_delta for u in codec.decode(vector).units.values()} == {-1}
    assert codec.encode(codec.decode(noop))[-1] == 1  # encoding goes unit by unit
    # masks: a chain change only where every unit allows it
    replicas, addable = np.full(7, 2), np.full(7, 3)
    assert list(codec.masks(replicas, addable, 16)[-3:]) == [True, True, True]
    replicas[DENSE_UNITS.index(UnitKind.NORM)] = 1  # one norm replica: no chain to remove
    addable[DENSE_UNITS.index(UnitKind.FFN)] = 0  # no room for another ffn: none to add
    assert list(codec.masks(replicas, addable, 16)[-3:]) == [False, True, False]


@pytest.mark.parametrize("fidelity", ["fluid", "des"])
def test_a_chain_action_scales_every_unit_by_one_in_the_simulator(fidelity: str) -> None:
    env = OperatorAutoscaleEnv(config={"chain_actions": True, "horizon": 4, "fidelity": fidelity})
    env.reset(seed=0)
    before = dict(env.simulator.deployment.units)
    action = env.codec.noop()
    action[-1] = 2
    _, _, _, _, info = env.step(action)
    assert info["repairs"] == 0
    after = env.simulator.deployment.units
    assert all(after[unit].replicas == before[unit].replicas + 1 for unit in env.units)
    action[-1] = 0
    env.step(action)
    assert all(env.simulator.deployment.units[unit].replicas == before[unit].replicas for unit in env.units)
    env.close()
    with pytest.raises(ValueError, match="'chain_actions' is for the operator-level envs"):
        ModelAutoscaleEnv(config={"chain_actions": True})


def test_model_codec_sets_one_cap_for_every_unit() -> None:
    codec = ModelActionCodec(DENSE_UNITS, (-2, -1, 0, 1, 2), (512, 2048))
    decoded = codec.decode(np.array([3, 2]))
    assert decoded.instance_delta == 1
    assert {u.batch_cap_tokens for u in decoded.units.values()} == {2048} and set(decoded.units) == set(
        DENSE_UNITS
    )
    assert codec.decode(codec.noop()).units == {} and codec.decode(codec.noop()).instance_delta == 0
    assert list(codec.encode(decoded)) == [3, 2]
    with pytest.raises(ValueError, match="use instance_delta"):
        codec.encode(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=1)}))


def test_masks_keep_one_replica_respect_cap_and_free_memory() -> None:
    codec = OperatorActionCodec(DENSE_UNITS[:2], (-2, -1, 0, 1, 2), (512,))
    mask = codec.masks(np.array([1, 15]), np.array([5, 1]), max_replicas=16)
    assert mask.size == int(codec.nvec.sum())
    per_unit = 5 + 2 + len(PLACEMENT_CHOICES)
    first_deltas, second_deltas = mask[0:5], mask[per_unit : per_unit + 5]
    assert list(first_deltas) == [False, False, True, True, True]  # 1 replica: no removal
    assert list(second_deltas) == [True, True, True, True, False]  # cap 16 and one addable
    assert mask[5:per_unit].all()
    assert list(codec.masks(np.array([3, 3]), np.array([0, 0]), 16)[0:5]) == [True, True, True, False, False]


def test_addable_replicas_counts_slots_and_tp_groups() -> None:
    gb = 1e9
    free = np.array([10, 10, 0, 0, 3, 3, 3, 3]) * gb
    assert addable_replicas(free, 3 * gb, 1, 8) == 3 + 3 + 4
    assert addable_replicas(free, 3 * gb, 2, 8) == 5  # 10 slots, at most 3 on either 10-GB GPU
    assert addable_replicas(free, 3 * gb, 8, 8) == 0
    assert addable_replicas(np.full(16, 80 * gb), 70 * gb, 8, 8) == 2
    # tiny replicas (thousands of slots per GPU) against the definition, counted up one group at a time
    rng = np.random.default_rng(0)
    for _ in range(20):
        slots_free = rng.integers(0, 3000, size=8) * 1e6
        for tp in (2, 4, 8):
            slots = np.floor(slots_free / 1e6).astype(np.int64)
            groups = 0
            while np.minimum(slots, groups + 1).sum() >= (groups + 1) * tp:
                groups += 1
            assert addable_replicas(slots_free, 1e6, tp, 8) == groups


# ---------------------------------------------------------------------------------------------- reward
def _metrics(attainment: float, gpus: float, energy_j: float) -> IntervalMetrics:
    return IntervalMetrics(
        start_s=0.0, end_s=5.0, slo_attainment=attainment, gpus_powered_mean=gpus, energy_j=energy_j
    )


@pytest.mark.parametrize(
    ("shape", "expected_slo"),
    [("hinge", -10 * 0.15 / 0.95), ("squared", -10 * (0.15 / 0.95) ** 2), ("step", -10.0)],
)
def test_reward_components_and_penalty_shapes(shape: str, expected_slo: float) -> None:
    reward = RewardFunction(
        {"slo": 10.0, "gpu": 1.0, "energy": 0.5}, shape, 0.95, num_gpus=16, max_power_w=6400.0
    )
    total, components = reward(_metrics(0.8, gpus=8.0, energy_j=5.0 * 3200.0))
    assert components["slo"] == pytest.approx(expected_slo)
    assert components["gpu"] == pytest.approx(-0.5)
    assert components["energy"] == pytest.approx(-0.25)
    assert total == pytest.approx(sum(components.values()))
    _, at_target = reward(_metrics(0.95, 8.0, 0.0))
    assert at_target["slo"] == 0.0


# ---------------------------------------------------------------------------------------------- episodes
@pytest.mark.parametrize("env_class", [OperatorAutoscaleEnv, ModelAutoscaleEnv])
def test_episode_truncates_at_horizon_and_never_terminates(
    env_class: type, trace: RequestTrace, fake_sim: None
) -> None:
    env = env_class(trace=trace, horizon=4, render_mode="ansi")
    observation, info = env.reset(seed=3)
    assert env.observation_space.contains(observation)
    assert 0.0 <= info["start_s"] <= trace.end_s - env.episode_length_s
    flags = []
    for _ in range(4):
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(observation)
        assert set(info["reward_components"]) == {"slo", "gpu", "energy"}
        assert reward == pytest.approx(sum(info["reward_components"].values()))
        assert isinstance(info["interval"], dict) and set(info["interval"]["units"]) == {
            u.value for u in env.units
        }
        assert isinstance(info["repairs"], int)
        flags.append((terminated, truncated))
    assert flags == [(False, False)] * 3 + [(False, True)]
    table = env.render()
    assert "attention" in table and "SLO attainment" in table and "GPUs powered" in table


def test_interval_metrics_are_a_read_only_snapshot(trace: RequestTrace, fake_sim: None) -> None:
    """``info["interval"]`` cannot be changed behind a consumer's back, so deep copies (SB3's
    ``DummyVecEnv`` makes one of every info on every step) may share it; pickling (``SubprocVecEnv``)
    and JSON still see a plain dict."""
    import copy
    import json
    import pickle

    env = OperatorAutoscaleEnv(trace=trace, horizon=3)
    env.reset(seed=0)
    interval = env.step(env.codec.noop())[4]["interval"]
    unit = interval["units"]["ffn"]
    for change in (
        lambda: interval.__setitem__("arrivals", 0),
        lambda: interval.update(arrivals=0),
        lambda: interval.pop("arrivals"),
        lambda: unit.__setitem__("replicas", 9),
        lambda: interval["units"].clear(),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert copy.deepcopy(interval) is interval
    restored = pickle.loads(pickle.dumps(interval))
    assert restored == interval and type(restored["units"]["ffn"]) is type(unit)
    assert json.loads(json.dumps(interval)) == interval
    editable = dict(interval)
    editable["arrivals"] = -1
    assert interval["arrivals"] != -1


def test_out_of_space_actions_raise(trace: RequestTrace, fake_sim: None) -> None:
    env = OperatorAutoscaleEnv(trace=trace, horizon=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.codec.noop())
    env.reset(seed=0)
    good = env.codec.noop()
    for bad in (
        good[:-1],
        np.full_like(good, 7),
        -good,
        good.astype(np.float64),
        np.concatenate([good, good]),
    ):
        with pytest.raises(ValueError, match="not in the action space"):
            env.step(bad)


def test_same_seed_same_trajectory(trace: RequestTrace, fake_sim: None) -> None:
    def rollout(seed: int) -> list[np.ndarray]:
        env = OperatorAutoscaleEnv(trace=trace, horizon=5)
        observation, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        out = [observation]
        for _ in range(5):
            out.append(env.step(env.action_space.sample())[0])
        return out

    first, second, other = rollout(11), rollout(11), rollout(12)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_window_start_from_options_config_or_random(trace: RequestTrace, fake_sim: None) -> None:
    env = OperatorAutoscaleEnv(trace=trace, horizon=2)
    assert env.reset(seed=1, options={"start_s": 100.0})[1]["start_s"] == 100.0
    starts = {env.reset(seed=s)[1]["start_s"] for s in range(5)}
    assert len(starts) == 5
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"begin": 3})
    with pytest.raises(ValueError, match="outside the trace"):
        env.reset(options={"start_s": 5000.0})
    fixed = OperatorAutoscaleEnv(trace=trace, horizon=2, episode_start_s=60.0)
    assert {fixed.reset(seed=s)[1]["start_s"] for s in range(3)} == {60.0}


def test_observation_time_features_follow_trace_clock(trace: RequestTrace, fake_sim: None) -> None:
    env = OperatorAutoscaleEnv(trace=trace, horizon=2, warmup_intervals=0)
    observation, _ = env.reset(options={"start_s": 0.0})
    decoded = env.decode_observation(observation)
    assert decoded["time_of_day_sin"] == pytest.approx(0.0, abs=1e-6)
    assert decoded["time_of_day_cos"] == pytest.approx(1.0)
    assert decoded["episode_progress"] == 0.0
    observation, *_ = env.step(env.codec.noop())
    angle = 2 * math.pi * env.control_interval_s / 86400.0
    assert env.decode_observation(observation)["time_of_day_sin"] == pytest.approx(math.sin(angle), rel=1e-5)
    assert env.decode_observation(observation)["episode_progress"] == pytest.approx(0.5)


def test_repairs_are_counted_in_info(trace: RequestTrace, fake_sim: None) -> None:
    ones = Deployment.operator_level("qwen2-7b", "a100", replicas={u: 1 for u in DENSE_UNITS}, num_nodes=2)
    env = OperatorAutoscaleEnv(trace=trace, horizon=3, initial_deployment=ones)
    env.reset(seed=0)
    shrink = env.codec.encode(ScalingAction(units={u: UnitAction(replica_delta=-2) for u in env.units}))
    info = env.step(shrink)[4]
    assert info["repairs"] == len(env.units)
    assert len(info["repair_messages"]) == len(env.units)


def test_observation_decodes_back_to_the_interval_metrics(trace: RequestTrace, fake_sim: None) -> None:
    env = OperatorAutoscaleEnv(trace=trace, horizon=3)
    env.reset(seed=0)
    observation, _, _, _, info = env.step(env.codec.noop())
    decoded = env.decode_observation(observation, physical=True)
    interval = info["interval"]
    for unit in env.units:
        metrics, values = interval["units"][unit.value], decoded[unit.value]
        assert values["replicas"] == pytest.approx(
            metrics["replicas"] + metrics["pending_replicas"], rel=1e-5
        )
        assert values["utilisation"] == pytest.approx(metrics["utilisation"], rel=1e-5)
        assert values["queue"] == pytest.approx(metrics["queue_tokens"], rel=1e-4, abs=1e-3)
        assert values["batch_cap"] == pytest.approx(metrics["batch_cap_tokens"], rel=1e-5)
        assert values["latency"] == pytest.approx(
            metrics["mean_wait_s"] + metrics["mean_service_s"], rel=1e-5
        )
    duration_s = interval["end_s"] - interval["start_s"]
    assert decoded["arrival_rate"] == pytest.approx(
        min(interval["arrivals"] / duration_s, 4 * env.observation_layout.scales["rate"]), rel=1e-5
    )
    assert decoded["slo_attainment"] == pytest.approx(interval["slo_attainment"], rel=1e-5)
    assert decoded["waiting"] == pytest.approx(interval["waiting_requests"], abs=1e-3)
    assert decoded["gpus_powered"] == pytest.approx(interval["gpus_powered_mean"], rel=1e-5)
    assert decoded["power"] == pytest.approx(interval["energy_j"] / duration_s, rel=1e-5)


def test_additions_beyond_the_replica_cap_are_repaired_by_the_env(
    trace: RequestTrace, fake_sim: None
) -> None:
    ones = Deployment.operator_level("qwen2-7b", "a100", replicas=dict.fromkeys(DENSE_UNITS, 1), num_nodes=2)
    env = OperatorAutoscaleEnv(trace=trace, horizon=3, initial_deployment=ones, max_replicas_per_unit=4)
    env.reset(seed=0)
    grow = env.codec.encode(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=2)}))
    assert env.step(grow)[4]["repairs"] == 0
    info = env.step(grow)[4]
    assert info["repairs"] == 1 and "cap 4" in info["repair_messages"][0]
    assert info["interval"]["units"]["ffn"]["replicas"] == 4


def test_model_level_instance_cap(trace: RequestTrace, fake_sim: None) -> None:
    two = Deployment.model_level("qwen2-7b", "a100", instances=2, num_nodes=2)
    env = ModelAutoscaleEnv(trace=trace, horizon=3, initial_deployment=two, max_replicas_per_unit=3)
    env.reset(seed=0)
    info = env.step(env.codec.encode(ScalingAction(instance_delta=2)))[4]
    assert info["repairs"] == 1 and "instances" in info["repair_messages"][0]
    assert info["interval"]["units"]["attention"]["replicas"] == 3


def test_reset_can_start_from_another_deployment(trace: RequestTrace, fake_sim: None) -> None:
    env = OperatorAutoscaleEnv(trace=trace, horizon=2)
    threes = Deployment.operator_level(
        "qwen2-7b", "a100", replicas=dict.fromkeys(DENSE_UNITS, 3), num_nodes=2
    )
    env.reset(seed=0, options={"deployment": threes.to_dict()})
    info = env.step(env.codec.noop())[4]
    assert {u["replicas"] for u in info["interval"]["units"].values()} == {3}
    env.reset(seed=0)
    assert (
        env.step(env.codec.noop())[4]["interval"]["units"]["ffn"]["replicas"]
        == env.initial_deployment.units[UnitKind.FFN].replicas
    )
    other_gpu = Deployment.operator_level(
        "qwen2-7b", "h100", replicas=dict.fromkeys(DENSE_UNITS, 1), num_nodes=2
    )
    with pytest.raises(ValueError, match="'h100'"):
        env.reset(options={"deployment": other_gpu})
    model_level = Deployment.model_level("qwen2-7b", "a100", instances=1, num_nodes=2)
    with pytest.raises(ValueError, match="needs a deployment of granularity 'operator', got 'model'"):
        env.reset(options={"deployment": model_level})


@pytest.mark.parametrize("env_class", [OperatorAutoscaleEnv, ModelAutoscaleEnv])
def test_initial_replica_jitter_starts_episodes_over_and_under_provisioned(env_class: type) -> None:
    """Per reset each unit's starting replicas (model level: the instances) move by up to the jitter,
    within 1..max_replicas, reproducibly per seed; the simulator serves the jittered start; a given
    deployment is never jittered; jitter 0 starts from the initial deployment."""
    env = env_class(initial_replica_jitter=2, horizon=4)
    base_counts = _replica_counts(env.initial_deployment)
    starts = []
    for seed in range(8):
        env.reset(seed=seed)
        counts = _replica_counts(env._episode_deployment)
        assert counts == _replica_counts(env._sim.deployment)
        for unit, count in counts.items():
            assert 1 <= count <= env.max_replicas
            assert abs(count - base_counts[unit]) <= 2
        starts.append(counts)
    assert any(counts != base_counts for counts in starts)
    assert len({tuple(counts.values()) for counts in starts}) > 1
    env.reset(seed=3)
    assert _replica_counts(env._episode_deployment) == starts[3]
    env.reset(seed=3, options={"deployment": env.initial_deployment})
    assert env._episode_deployment == env.initial_deployment
    plain = env_class(horizon=4)
    plain.reset(seed=3)
    assert plain._episode_deployment == plain.initial_deployment


# the default trace's longest prompts exceed Llama-2-70B's 4096-token context: the env clips them and says so
# and the sized deployment does not fit one 4-GPU node: the env starts from one replica per unit, and says so
@pytest.mark.filterwarnings("ignore:.*'llama-2-70b' has a 4096-token context:UserWarning")
@pytest.mark.filterwarnings("ignore:.*default deployment. the sized replicas:UserWarning")
@pytest.mark.parametrize("jitter", [3, 40])
def test_initial_replica_jitter_redraws_starts_the_cluster_cannot_hold(
    jitter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama-2-70B on one 4-GPU H100 node has little room to spare: many jittered starts do not fit.
    They are redrawn (after ``JITTER_ATTEMPTS`` the episode would start from the initial deployment);
    a reset never fails, and ends with one simulator built."""
    attempts = {"made": 0, "failed": 0}
    build = base.AutoscaleEnv._new_simulator

    def counted(self: base.AutoscaleEnv, *args: object) -> object:
        attempts["made"] += 1
        try:
            return build(self, *args)  # type: ignore[arg-type]
        except ValueError:
            attempts["failed"] += 1
            raise

    monkeypatch.setattr(base.AutoscaleEnv, "_new_simulator", counted)
    env = OperatorAutoscaleEnv(
        model="llama-2-70b",
        gpu="h100",
        num_nodes=1,
        gpus_per_node=4,
        initial_replica_jitter=jitter,
        horizon=4,
    )
    for seed in range(6):
        env.reset(seed=seed)
        assert _replica_counts(env._episode_deployment) == _replica_counts(env._sim.deployment)
    assert attempts["failed"] > 0
    assert attempts["made"] - attempts["failed"] == 6  # one simulator per reset in the end


def _replica_counts(deployment: Deployment) -> dict[UnitKind, int]:
    return {unit: config.replicas for unit, config in deployment.units.items()}


def test_config_conflicting_with_the_ids_keyword_is_an_error() -> None:
    import gymnasium as gym

    with pytest.raises(ValueError, match="fidelity"):
        gym.make("opscale:opscale/OperatorAutoscale-v0", config={"fidelity": "fluid"})
