"""TensorBoard callbacks for PPO training on the autoscaling environments.

Three callbacks, composed by :func:`opscale.agents.ppo.train`:

* :class:`ServingMetricsCallback` turns what the environments put in ``info`` (the interval metrics
  dict ``info["interval"]`` and ``info["reward_components"]``) into ``serving/*`` and ``reward/*``
  scalars, averaged over each rollout, next to SB3's own ``rollout/*`` and ``train/*`` scalars;
* :class:`HParamCallback` writes the run's hyperparameters to TensorBoard's HPARAMS tab;
* :class:`ServingEvalCallback` evaluates the current policy every ``eval_freq`` environment steps on
  fixed, seeded episodes (the same windows every time, so successive evaluations are paired), logs
  ``eval/*`` scalars and a figure of replicas per unit and load over time, and keeps the best model
  (EvalCallback style, by mean episode reward).

Scalar semantics (all per rollout of ``n_steps x n_envs`` control intervals):

==========================  =========================================================================
``serving/slo_attainment``  requests meeting the SLO / requests decided, summed over the rollout
``serving/gpus``            mean over intervals of the time-averaged powered GPUs
``serving/energy_kwh``      mean energy of the episodes that ended in the rollout, kWh per episode
                            (absent from a rollout in which no episode ended)
``serving/ttft_p99``        mean over intervals (with decided requests) of the interval's TTFT p99, s
``serving/tbt_p99``         the same for the TBT p99, s
``reward/<component>``      mean per step of ``info["reward_components"][component]``
==========================  =========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Figure, HParam

__all__ = [
    "EpisodeTrace",
    "HParamCallback",
    "ServingEvalCallback",
    "ServingMetricsCallback",
    "plot_episode",
    "run_episode",
]

_JOULES_PER_KWH = 3.6e6
#: Formats that cannot show a figure or hyperparameters (SB3 raises on them otherwise).
_TEXT_FORMATS = ("stdout", "log", "json", "csv")


@dataclass
class _IntervalAccumulator:
    """Sums of interval metrics over a stretch of steps (one rollout, or one evaluation)."""

    intervals: int = 0
    decided: int = 0
    slo_met: int = 0
    gpus_sum: float = 0.0
    energy_j: float = 0.0
    ttft_p99_sum_s: float = 0.0
    tbt_p99_sum_s: float = 0.0
    latency_intervals: int = 0
    reward_steps: int = 0
    reward_sums: dict[str, float] = field(default_factory=dict)

    def merge(self, other: _IntervalAccumulator) -> None:
        """Add ``other``'s sums to these."""
        for item in fields(self):
            if item.name != "reward_sums":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))
        for name, value in other.reward_sums.items():
            self.reward_sums[name] = self.reward_sums.get(name, 0.0) + value

    def add(self, info: Mapping[str, Any]) -> None:
        interval = info.get("interval")
        if interval is not None:
            self.intervals += 1
            self.decided += int(interval["decided"])
            self.slo_met += int(interval["slo_met"])
            self.gpus_sum += float(interval["gpus_powered_mean"])
            self.energy_j += float(interval["energy_j"])
            if interval["decided"] > 0:
                self.latency_intervals += 1
                self.ttft_p99_sum_s += float(interval["ttft_p99_s"])
                self.tbt_p99_sum_s += float(interval["tbt_p99_s"])
        components = info.get("reward_components")
        if components is not None:
            self.reward_steps += 1
            for name, value in components.items():
                self.reward_sums[name] = self.reward_sums.get(name, 0.0) + float(value)

    def scalars(self) -> dict[str, float]:
        """Averages of what was added (empty when nothing was)."""
        values: dict[str, float] = {}
        if self.intervals:
            values["slo_attainment"] = self.slo_met / self.decided if self.decided else 1.0
            values["gpus"] = self.gpus_sum / self.intervals
        if self.latency_intervals:
            values["ttft_p99"] = self.ttft_p99_sum_s / self.latency_intervals
            values["tbt_p99"] = self.tbt_p99_sum_s / self.latency_intervals
        return values

    def reward_means(self) -> dict[str, float]:
        return {name: total / self.reward_steps for name, total in self.reward_sums.items()} if self.reward_steps else {}


class ServingMetricsCallback(BaseCallback):
    """Log ``serving/*`` and ``reward/*`` scalars from the environments' ``info`` (see module docstring)."""

    def __init__(self, verbose: int = 0):
        super().__init__(verbose)
        self._rollout = _IntervalAccumulator()
        self._episode_energy_j: np.ndarray = np.zeros(0)
        self._finished_episode_energy_j: list[float] = []

    def _on_training_start(self) -> None:
        self._episode_energy_j = np.zeros(self.training_env.num_envs)

    def _on_rollout_start(self) -> None:
        self._rollout = _IntervalAccumulator()
        self._finished_episode_energy_j = []

    def _on_step(self) -> bool:
        infos: Sequence[Mapping[str, Any]] = self.locals["infos"]
        dones: np.ndarray = self.locals["dones"]
        for env_index, info in enumerate(infos):
            self._rollout.add(info)
            interval = info.get("interval")
            if interval is not None:
                self._episode_energy_j[env_index] += float(interval["energy_j"])
            if dones[env_index]:
                self._finished_episode_energy_j.append(float(self._episode_energy_j[env_index]))
                self._episode_energy_j[env_index] = 0.0
        return True

    def _on_rollout_end(self) -> None:
        for name, value in self._rollout.scalars().items():
            self.logger.record(f"serving/{name}", value)
        if self._finished_episode_energy_j:
            self.logger.record("serving/energy_kwh", float(np.mean(self._finished_episode_energy_j)) / _JOULES_PER_KWH)
        for name, value in self._rollout.reward_means().items():
            self.logger.record(f"reward/{name}", value)


class HParamCallback(BaseCallback):
    """Write ``hparams`` once, at the start of training, to TensorBoard's HPARAMS tab.

    :param hparams: hyperparameter name -> value (numbers, strings, booleans; others are stringified).
    :param metrics: the scalars the HPARAMS tab shows against them (they must be logged during training).
    """

    def __init__(self, hparams: Mapping[str, Any], metrics: Sequence[str], verbose: int = 0):
        super().__init__(verbose)
        self.hparams = {
            name: value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
            for name, value in hparams.items()
        }
        self.metrics = tuple(metrics)

    def _on_training_start(self) -> None:
        # The metric values here are placeholders: TensorBoard reads the real ones from the scalars.
        self.logger.record(
            "hparams", HParam(self.hparams, dict.fromkeys(self.metrics, 0.0)), exclude=_TEXT_FORMATS
        )

    def _on_step(self) -> bool:
        return True


@dataclass
class EpisodeTrace:
    """One evaluation episode, step by step.

    :param time_s: simulated time at the end of each control interval (since the window start).
    :param arrival_rate_per_s: request arrival rate of each interval.
    :param replicas: unit name -> serving plus pending replicas at the end of each interval.
    :param gpus: time-averaged powered GPUs of each interval.
    :param slo_attainment: SLO attainment of each interval.
    """

    time_s: list[float] = field(default_factory=list)
    arrival_rate_per_s: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=dict)
    gpus: list[float] = field(default_factory=list)
    slo_attainment: list[float] = field(default_factory=list)
    reward: float = 0.0
    length: int = 0
    totals: _IntervalAccumulator = field(default_factory=_IntervalAccumulator)

    def add(self, reward: float, info: Mapping[str, Any]) -> None:
        self.reward += reward
        self.length += 1
        self.totals.add(info)
        interval = info["interval"]
        duration_s = float(interval["end_s"]) - float(interval["start_s"])
        self.time_s.append(float(interval["end_s"]))
        self.arrival_rate_per_s.append(interval["arrivals"] / duration_s if duration_s > 0 else 0.0)
        self.gpus.append(float(interval["gpus_powered_mean"]))
        self.slo_attainment.append(float(interval["slo_attainment"]))
        for unit, unit_metrics in interval["units"].items():
            self.replicas.setdefault(unit, []).append(int(unit_metrics["replicas"] + unit_metrics["pending_replicas"]))


#: ``predict(observation, env) -> action``: how :func:`run_episode` asks a policy for an action.
ActionFunction = Callable[[np.ndarray, gym.Env], np.ndarray]


def model_action_function(model: BaseAlgorithm) -> ActionFunction:
    """Deterministic actions from an SB3 model, passing ``action_masks()`` to a ``MaskablePPO``."""
    from sb3_contrib import MaskablePPO

    if isinstance(model, MaskablePPO):

        def masked(observation: np.ndarray, env: gym.Env) -> np.ndarray:
            masks = env.get_wrapper_attr("action_masks")()
            return model.predict(observation, deterministic=True, action_masks=masks)[0]

        return masked
    return lambda observation, _env: model.predict(observation, deterministic=True)[0]


def run_episode(act: ActionFunction, env: gym.Env, seed: int) -> EpisodeTrace:
    """Play one episode of ``env`` from ``reset(seed=seed)`` and record it step by step."""
    observation, _ = env.reset(seed=seed)
    episode = EpisodeTrace()
    done = False
    while not done:
        observation, reward, terminated, truncated, info = env.step(act(observation, env))
        episode.add(float(reward), info)
        done = terminated or truncated
    return episode


def plot_episode(episode: EpisodeTrace, title: str) -> Any:
    """A matplotlib figure: replicas per unit (and powered GPUs) over time, with the load on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for unit, counts in episode.replicas.items():
        axis.step(episode.time_s, counts, where="post", label=unit, linewidth=1.2)
    axis.step(episode.time_s, episode.gpus, where="post", label="GPUs powered", color="black", linewidth=2.0)
    axis.set_xlabel("time in episode (s)")
    axis.set_ylabel("replicas / GPUs")
    load_axis = axis.twinx()
    load_axis.plot(episode.time_s, episode.arrival_rate_per_s, color="grey", linestyle="--", label="load")
    load_axis.set_ylabel("arrival rate (req/s)")
    handles, labels = axis.get_legend_handles_labels()
    load_handles, load_labels = load_axis.get_legend_handles_labels()
    axis.legend(handles + load_handles, labels + load_labels, fontsize="small", loc="upper left", ncol=2)
    axis.set_title(title)
    figure.tight_layout()
    return figure


class ServingEvalCallback(BaseCallback):
    """Evaluate every ``eval_freq`` environment steps; log ``eval/*`` and a figure; save the best model.

    The evaluation episodes reset with seeds ``eval_seed, eval_seed + 1, ...``: the same trace windows
    and simulator seeds every evaluation, so a change in ``eval/mean_reward`` is the policy's doing.

    :param eval_env: a single (non-vectorised) environment of the same spaces as the training env.
    :param eval_freq: environment steps (summed over the vectorised envs) between evaluations.
    :param n_eval_episodes: episodes per evaluation.
    :param eval_seed: seed of the first evaluation episode.
    :param best_model_path: where the best model so far is saved (``.zip`` added by SB3); ``None``: not saved.
    """

    def __init__(
        self,
        eval_env: gym.Env,
        eval_freq: int,
        n_eval_episodes: int = 2,
        eval_seed: int = 10_000,
        best_model_path: Path | None = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if eval_freq < 1 or n_eval_episodes < 1:
            raise ValueError(f"eval_freq and n_eval_episodes must be >= 1, got {eval_freq} and {n_eval_episodes}")
        self.eval_env = eval_env
        self.eval_freq = eval_freq
        self.n_eval_episodes = n_eval_episodes
        self.eval_seed = eval_seed
        self.best_model_path = best_model_path
        self.best_mean_reward = -math.inf
        self.evaluations = 0
        self._next_eval_step = eval_freq

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next_eval_step:
            self._next_eval_step += self.eval_freq
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, float]:
        """Run the evaluation episodes now, log them and return the ``eval/*`` scalars."""
        act = model_action_function(self.model)
        episodes = [run_episode(act, self.eval_env, self.eval_seed + i) for i in range(self.n_eval_episodes)]
        rewards = np.array([episode.reward for episode in episodes])
        totals = _IntervalAccumulator()
        for episode in episodes:
            totals.merge(episode.totals)
        scalars = {
            "mean_reward": float(rewards.mean()),
            "std_reward": float(rewards.std()),
            "mean_ep_length": float(np.mean([episode.length for episode in episodes])),
            "energy_kwh": totals.energy_j / len(episodes) / _JOULES_PER_KWH,
            **totals.scalars(),
        }
        for name, value in scalars.items():
            self.logger.record(f"eval/{name}", value)
        self.logger.record(
            "eval/episode",
            Figure(plot_episode(episodes[0], f"evaluation at {self.num_timesteps} steps (seed {self.eval_seed})"), close=True),
            exclude=_TEXT_FORMATS,
        )
        self.evaluations += 1
        if scalars["mean_reward"] > self.best_mean_reward:
            self.best_mean_reward = scalars["mean_reward"]
            if self.best_model_path is not None:
                self.model.save(self.best_model_path)
        self.logger.record("eval/best_mean_reward", self.best_mean_reward)
        self.logger.dump(self.num_timesteps)
        return scalars
