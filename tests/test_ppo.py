"""PPO training: configuration, run naming, a tiny real run on the fast env, TensorBoard contents, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opscale.agents.ppo import Algo, PPOConfig, TrainResult, run_name, train
from opscale.agents.registry import SB3Policy, make_policy
from opscale.cli import main

FAST_ENV = "opscale/OperatorAutoscale-fast-v0"
#: A short episode so a few hundred steps finish several of them.
TINY_ENV_KWARGS = {"horizon": 8, "trace_duration_s": 600.0}
SERVING_TAGS = {
    "serving/slo_attainment",
    "serving/gpus",
    "serving/energy_kwh",
    "serving/ttft_p99",
    "serving/tbt_p99",
    "reward/slo",
    "reward/gpu",
    "reward/energy",
}


#: Steps per tiny run: PPO long enough for several rollouts and two evaluations, MaskablePPO shorter.
TINY_TIMESTEPS = {"ppo": 1024, "maskable-ppo": 256}


def _tiny_config(tmp_path: Path, algo: str) -> PPOConfig:
    return PPOConfig(
        env_id=FAST_ENV,
        exp_name="tiny",
        algo=Algo(algo),
        total_timesteps=TINY_TIMESTEPS[algo],
        n_envs=2,
        n_steps=64,
        batch_size=64,
        n_epochs=2,
        net_arch=(32, 32),
        eval_freq=512,
        n_eval_episodes=1,
        env_kwargs=TINY_ENV_KWARGS,
        logdir=str(tmp_path / "runs"),
    )


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    """One tiny run per algorithm, shared by the tests that inspect them."""
    tmp_path = tmp_path_factory.mktemp("ppo")
    return {algo: train(_tiny_config(tmp_path, algo)) for algo in ("ppo", "maskable-ppo")}


def _event_accumulator(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_config_loads_from_json_and_toml_and_round_trips(tmp_path: Path) -> None:
    config = PPOConfig(
        env_id=FAST_ENV, algo=Algo.MASKABLE_PPO, n_envs=3, net_arch=(64, 32), env_kwargs={"horizon": 8}
    )
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(config.to_dict()))
    assert PPOConfig.from_file(json_path) == config
    toml_path = tmp_path / "c.toml"
    toml_path.write_text(
        'algo = "maskable-ppo"\nn_envs = 3\nnet_arch = [64, 32]\n[env_kwargs]\nhorizon = 8\n'
    )
    loaded = PPOConfig.from_file(toml_path)
    assert (loaded.algo, loaded.n_envs, loaded.net_arch, dict(loaded.env_kwargs)) == (
        Algo.MASKABLE_PPO,
        3,
        (64, 32),
        {"horizon": 8},
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 1e-3}, "unknown PPOConfig keys \\['learning_rat'\\]"),
        ({"algo": "dqn"}, "unknown algo 'dqn'; valid: ppo, maskable-ppo"),
        ({"n_envs": 0}, "n_envs must be an int >= 1"),
        ({"gamma": 1.5}, "gamma must be in"),
    ],
)
def test_bad_config_values_raise_naming_them(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PPOConfig.from_mapping(values)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        PPOConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: ppo")
    with pytest.raises(ValueError, match=r"must end in \.json or \.toml"):
        PPOConfig.from_file(bad)


def test_run_name_is_file_name_safe() -> None:
    config = PPOConfig(env_id="opscale:opscale/OperatorAutoscale-fast-v0", exp_name="base", seed=3)
    assert run_name(config, started=0.0) == "opscale-OperatorAutoscale-fast-v0__base__3__19700101T000000"


def test_bad_env_fails_before_creating_a_run(tmp_path: Path) -> None:
    config = PPOConfig(env_id=FAST_ENV, env_kwargs={"modle": "qwen2-7b"}, logdir=str(tmp_path))
    with pytest.raises(ValueError, match="modle"):
        train(config)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("algo", ["ppo", "maskable-ppo"])
def test_tiny_run_trains_saves_reloads_and_evaluates(tiny_runs: dict[str, TrainResult], algo: str) -> None:
    result = tiny_runs[algo]
    assert result.timesteps == TINY_TIMESTEPS[algo]
    assert result.model_path.is_file() and result.best_model_path is not None
    assert PPOConfig.from_file(result.run_dir / "config.json").algo is Algo(algo)
    env = gym.make(FAST_ENV, **TINY_ENV_KWARGS)
    policy = make_policy(str(result.best_model_path), env)
    assert (
        isinstance(policy, SB3Policy)
        and type(policy.model).__name__ == {"ppo": "PPO", "maskable-ppo": "MaskablePPO"}[algo]
    )
    # the MultiDiscrete distribution computed per group of equal dimensions (opscale.agents.policies)
    assert (
        type(policy.model.policy).__name__
        == {
            "ppo": "MultiDiscreteActorCriticPolicy",
            "maskable-ppo": "MaskableMultiDiscreteActorCriticPolicy",
        }[algo]
    )
    observation, _ = env.reset(seed=5)
    steps, done = 0, False
    offsets = np.concatenate([[0], np.cumsum(env.action_space.nvec)[:-1]])
    while not done:
        masks = env.unwrapped.action_masks()
        action, _ = policy.predict(observation, deterministic=True)
        assert env.action_space.contains(action)
        if algo == "maskable-ppo":
            # every chosen value is allowed by the env's mask of its dimension
            assert masks[offsets + action].all()
        observation, _, terminated, truncated, _ = env.step(action)
        done, steps = terminated or truncated, steps + 1
    assert steps == TINY_ENV_KWARGS["horizon"]


def test_training_windows_stay_before_the_held_out_tail(tiny_runs: dict[str, TrainResult]) -> None:
    """Training episodes start in the ``"random"`` split, so held-out evaluation windows are unseen."""
    from opscale.agents.evaluation import window_range

    saved = PPOConfig.from_file(tiny_runs["ppo"].run_dir / "config.json")
    low, high = saved.env_kwargs["episode_start_s"]
    env = gym.make(FAST_ENV, **TINY_ENV_KWARGS)
    held_out_low, _ = window_range(env, "held-out")
    assert (low, high) == pytest.approx(window_range(env, "random"))
    assert high + env.unwrapped.episode_length_s <= held_out_low + 1e-9
    ranged = gym.make(FAST_ENV, **{**TINY_ENV_KWARGS, "episode_start_s": (low, high)})
    ranged_starts = [ranged.reset(seed=seed)[1]["start_s"] for seed in range(20)]
    assert all(low <= start <= high for start in ranged_starts) and len(set(ranged_starts)) == 20


def test_tensorboard_has_serving_reward_eval_scalars_figure_and_hparams(
    tiny_runs: dict[str, TrainResult],
) -> None:
    accumulator = _event_accumulator(tiny_runs["ppo"].run_dir)
    scalars = set(accumulator.Tags()["scalars"])
    assert scalars >= SERVING_TAGS
    assert scalars >= {
        "eval/mean_reward",
        "eval/slo_attainment",
        "eval/gpus_mean",
        "eval/energy_kwh",
        "eval/ttft_p99",
        "rollout/ep_rew_mean",
    }
    gpus = [event.value for event in accumulator.Scalars("serving/gpus")]
    attainment = [event.value for event in accumulator.Scalars("serving/slo_attainment")]
    assert len(gpus) == 1024 // (2 * 64)  # one point per rollout
    assert all(value >= 1 for value in gpus) and all(0 <= value <= 1 for value in attainment)
    assert all(event.value > 0 for event in accumulator.Scalars("serving/energy_kwh"))
    assert all(event.value <= 0 for event in accumulator.Scalars("reward/gpu"))
    assert "eval/episode" in accumulator.Tags()["images"]
    assert accumulator.PluginTagToContent("hparams")


def test_cli_train_runs_and_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(
        "n_steps = 64\nbatch_size = 64\nn_epochs = 1\nnet_arch = [16]\neval_freq = 0\n[env_kwargs]\nhorizon = 8\ntrace_duration_s = 600.0\n"
    )
    code = main(
        [
            "train",
            "--env",
            FAST_ENV,
            "--timesteps",
            "64",
            "--n-envs",
            "1",
            "--seed",
            "2",
            "--config",
            str(config_path),
            "--logdir",
            str(tmp_path / "runs"),
        ]
    )
    output = capsys.readouterr().out
    assert code == 0 and "final model:" in output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("opscale-OperatorAutoscale-fast-v0__ppo__2__")
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file" in capsys.readouterr().err


def test_noop_bias_makes_the_untrained_policy_keep_the_deployment() -> None:
    from stable_baselines3 import PPO

    from opscale.agents.ppo import bias_towards_noop, noop_action

    env = gym.make(FAST_ENV, **TINY_ENV_KWARGS)
    noop = noop_action(env)
    assert noop is not None and np.array_equal(noop, env.unwrapped.codec.noop())
    model = PPO("MlpPolicy", env, seed=0, device="cpu")
    observation, _ = env.reset(seed=0)
    bias_towards_noop(model, noop, 2.0)
    action, _ = model.predict(observation, deterministic=True)
    assert np.array_equal(action, noop)
    # 0.65 = e^2 / (e^2 + 4) for a 5-way replica delta: the bias sets the untrained probabilities
    distribution = model.policy.get_distribution(model.policy.obs_to_tensor(observation)[0])
    first = distribution.distribution[0].probs.detach().numpy()[0]
    assert first[noop[0]] == pytest.approx(np.exp(2) / (np.exp(2) + 4), abs=0.02)
