"""Every registered id on the real simulators: both env checkers, determinism, vector envs, masks.

The DES ids run on one node with a short horizon so the whole file stays well under a minute.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import opscale
from opscale.envs.operator_autoscale import OperatorAutoscaleEnv
from opscale.sim.deployment import ScalingAction, UnitAction
from opscale.sim.models import UnitKind

#: Small, short episodes: the checkers reset and step a few times; the DES pays per simulated second.
SMALL = {"horizon": 4, "num_nodes": 1}


def _make(env_id: str, **kwargs: Any) -> gym.Env:
    return gym.make(f"opscale:{env_id}", **{**SMALL, **kwargs})


@pytest.mark.parametrize("env_id", sorted(opscale.ENV_IDS))
@pytest.mark.parametrize("jitter", [0, 1])
def test_gymnasium_and_sb3_checkers_pass_without_warnings(env_id: str, jitter: int) -> None:
    """Every id, starting from its initial deployment and from jittered ones (``initial_replica_jitter``:
    the checkers' reset-determinism checks cover the draw)."""
    env = _make(env_id, render_mode="ansi", initial_replica_jitter=jitter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gymnasium_check_env(env.unwrapped)
        sb3_check_env(env, warn=True)
    env.close()


@pytest.mark.parametrize("env_id", sorted(env_id for env_id in opscale.ENV_IDS if "Operator" in env_id))
def test_checkers_pass_with_chain_actions(env_id: str) -> None:
    env = _make(env_id, chain_actions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gymnasium_check_env(env.unwrapped)
        sb3_check_env(env, warn=True)
    masks = env.unwrapped.action_masks()  # type: ignore[attr-defined]
    assert masks.shape == (int(env.action_space.nvec.sum()),)  # type: ignore[attr-defined]
    env.close()


@pytest.mark.parametrize("env_id", sorted(opscale.ENV_IDS))
def test_same_seed_gives_identical_trajectories(env_id: str) -> None:
    def rollout(seed: int) -> list[tuple[np.ndarray, float, dict]]:
        env = _make(env_id)
        env.action_space.seed(seed)
        observation, _ = env.reset(seed=seed)
        steps: list[tuple[np.ndarray, float, dict]] = [(observation, 0.0, {})]
        for _ in range(SMALL["horizon"]):
            observation, reward, _, _, info = env.step(env.action_space.sample())
            steps.append((observation, float(reward), info["interval"]))
        return steps

    first, second = rollout(5), rollout(5)
    for (obs_a, reward_a, interval_a), (obs_b, reward_b, interval_b) in zip(first, second, strict=True):
        assert np.array_equal(obs_a, obs_b)
        assert reward_a == reward_b
        assert interval_a == interval_b


@pytest.mark.parametrize("env_id", sorted(opscale.ENV_IDS))
def test_ansi_and_rgb_render_and_masks(env_id: str) -> None:
    env = _make(env_id, render_mode="ansi")
    env.reset(seed=0)
    env.step(env.unwrapped.codec.noop())  # type: ignore[attr-defined]
    table = env.render()
    assert isinstance(table, str) and "SLO attainment" in table and "attention" in table
    frame = _make(env_id, render_mode="rgb_array")
    frame.reset(seed=0)
    image = frame.render()
    assert (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    )
    masks = env.unwrapped.action_masks()  # type: ignore[attr-defined]
    assert masks.dtype == bool and masks.size == int(env.action_space.nvec.sum())  # type: ignore[attr-defined]


def env_shape(vec_env: Any) -> tuple[int, ...]:
    return tuple(vec_env.observation_space.shape)


@pytest.mark.slow  # two fresh interpreters import SB3 and torch: ~10-20 s on a shared 2-core machine
def test_canonical_id_works_in_spawned_subproc_vec_env() -> None:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    def make() -> gym.Env:
        return gym.make("opscale:opscale/OperatorAutoscale-fast-v0", horizon=8)

    vec_env = SubprocVecEnv([make, make], start_method="spawn")
    try:
        vec_env.seed(3)
        observations = np.asarray(vec_env.reset())
        assert observations.shape == (2, *env_shape(vec_env))
        actions = np.stack([vec_env.action_space.sample() for _ in range(2)])
        stepped, rewards, _, infos = vec_env.step(actions)
        assert np.asarray(stepped).shape[0] == 2 and rewards.shape == (2,)
        assert {"slo", "gpu", "energy"} <= set(infos[0]["reward_components"])
    finally:
        vec_env.close()


def test_maskable_ppo_reads_the_masks() -> None:
    from sb3_contrib import MaskablePPO

    env = _make("opscale/OperatorAutoscale-fast-v0", horizon=16)
    model = MaskablePPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=32)
    action, _ = model.predict(env.reset(seed=0)[0], action_masks=env.unwrapped.action_masks())  # type: ignore[attr-defined]
    assert env.action_space.contains(action)


@pytest.mark.parametrize("env_id", sorted(opscale.ENV_IDS))
def test_masks_read_the_simulators_deployment_and_memory(env_id: str) -> None:
    """The masks' replica counts, batch caps and free memory (read from the last interval and a cheap
    memory accessor) are the simulator's deployment and snapshot, along random actions (loading and
    draining replicas included)."""
    from opscale.envs.spaces import addable_replicas

    env = _make(env_id, horizon=40)
    base = env.unwrapped
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(12 if env_id.endswith("fast-v0") else 6):
        env.step(env.action_space.sample())
        simulator = base.simulator  # type: ignore[attr-defined]
        deployment, snapshot = simulator.deployment, simulator.snapshot()
        free = base._gpu_capacity_bytes - np.array(snapshot.gpu_memory_used_bytes)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(base._free_bytes_per_gpu(), free)  # type: ignore[attr-defined]
        replicas, addable = base._mask_state()  # type: ignore[attr-defined]
        memory, longest = base._memory, base.longest_request_tokens  # type: ignore[attr-defined]
        gpus_per_node = base.config.gpus_per_node  # type: ignore[attr-defined]
        if deployment.granularity == "model":
            tp, pp = deployment.tp, deployment.pp
            budget = max(config.batch_cap_tokens for config in deployment.units.values())
            need = sum(memory.replica_bytes_per_gpu(unit, tp, budget) for unit in deployment.units) / pp
            need += longest * memory.kv_bytes_per_token_per_gpu(tp) / pp
            assert replicas.tolist() == [deployment.instances]
            assert addable.tolist() == [addable_replicas(free, need, tp * pp, gpus_per_node)]
            continue
        for i, unit in enumerate(base.units):  # type: ignore[attr-defined]
            config = deployment.units[unit]
            need = memory.replica_bytes_per_gpu(unit, config.tp, config.batch_cap_tokens)
            if unit is UnitKind.ATTENTION:
                need += longest * memory.kv_bytes_per_token_per_gpu(config.tp)
            assert replicas[i] == config.replicas, unit
            assert addable[i] == addable_replicas(free, need, config.tp, gpus_per_node), unit


@pytest.mark.parametrize("unit", [UnitKind.ATTENTION, UnitKind.FFN])
def test_masks_agree_with_the_simulators_repairs_for_single_unit_actions(unit: UnitKind) -> None:
    """Adding replicas of one unit until the node is full: an add the mask allows is carried out,
    an add it forbids would have been repaired."""
    env = cast(OperatorAutoscaleEnv, _make("opscale/OperatorAutoscale-fast-v0", horizon=12).unwrapped)
    env.reset(seed=0)
    codec, deltas = env.codec, env.config.replica_deltas
    position = int(codec.nvec[: 3 * env.units.index(unit)].sum())
    add_one = codec.encode(ScalingAction(units={unit: UnitAction(replica_delta=1)}))
    saw_forbidden = False
    for _ in range(10):
        allowed = bool(env.action_masks()[position + deltas.index(1)])
        info = env.step(add_one)[4]
        assert (info["repairs"] == 0) == allowed, info["repair_messages"]
        saw_forbidden |= not allowed
    assert saw_forbidden, "one node should fill up within ten additions"


@pytest.mark.parametrize(
    ("model", "gpu"), [("qwen2-7b", "a100"), ("mixtral-8x7b", "h100"), ("qwen2-vl-7b", "h100")]
)
def test_default_deployment_meets_the_slo_on_the_default_workload(model: str, gpu: str) -> None:
    """The sized starting deployment (no actions) keeps the SLO in most intervals of an episode,
    for a dense model, an MoE whose experts need TP 4, and a vision-language model."""
    for env_id in ("opscale/OperatorAutoscale-fast-v0", "opscale/ModelAutoscale-fast-v0"):
        env = gym.make(f"opscale:{env_id}", horizon=24, model=model, gpu=gpu)
        env.reset(seed=1)
        noop = env.unwrapped.codec.noop()  # type: ignore[attr-defined]
        attainment = [env.step(noop)[4]["interval"]["slo_attainment"] for _ in range(24)]
        assert float(np.mean(attainment)) >= 0.95, (env_id, attainment)


def test_default_deployment_too_big_for_the_cluster_shrinks_with_a_warning() -> None:
    """Qwen2-57B-A14B on one A100 node at twice the default workload's rate: the sized replicas'
    memory (each stream reserves a share of its GPUs for KV) does not fit 8 GPUs. The env still starts,
    from every count scaled down together, and says so; before, ``gym.make`` raised, and the paper
    table's max-rate search counted the load as not sustained without running a policy."""
    with pytest.warns(UserWarning, match="do not fit the cluster's memory"):
        env = gym.make(
            "opscale:opscale/OperatorAutoscale-fast-v0",
            horizon=2,
            model="qwen2-57b-a14b",
            num_nodes=1,
            trace_rate_scale=2.0,
        )
    deployment = env.unwrapped.initial_deployment  # type: ignore[attr-defined]
    placed = {gpu for config in deployment.units.values() for group in config.gpus or () for gpu in group}
    assert placed <= set(range(8)) and all(config.replicas >= 1 for config in deployment.units.values())
    env.reset(seed=0)
    env.step(env.unwrapped.codec.noop())  # type: ignore[attr-defined]
