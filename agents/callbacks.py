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

``eval/*`` (per evaluation, means over its episodes, run through
:func:`opscale.agents.evaluation.evaluate_policy_on_env` so they are the same figures ``opscale evaluate``
reports): ``mean_reward``, ``std_reward``, ``mean_ep_length``, ``slo_attainment``, ``gpus_mean``,
``gpus_peak``, ``energy_kwh``, ``ttft_p99``, ``tbt_p99`` (whole-episode figures from the simulator's run
summary), ``best_mean_reward``, and the image ``eval/episode`` of the first episode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Figure, HParam

if TYPE_CHECKING:
    from opscale.agents.evaluation import StepSeries

__all__ = [
    "HParamCallback",
    "ServingEvalCallback",
    "ServingMetricsCallback",
    "plot_episode",
]

_JOULES_PER_KWH = 3.6e6
#: Per-episode figures of :class:`opscale.agents.evaluation.EpisodeResult` logged as ``eval/<name>``
#: (a trailing ``_s`` dropped, matching the ``serving/*`` names).
_EVAL_EPISODE_FIELDS = ("slo_attainment", "gpus_mean", "gpus_peak", "energy_kwh", "ttft_p99_s", "tbt_p99_s")
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
        return (
            {name: total / self.reward_steps for name, total in self.reward_sums.items()}
            if self.reward_steps
            else {}
        )


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
            self.logger.record(
                "serving/energy_kwh", float(np.mean(self._finished_episode_energy_j)) / _JOULES_PER_KWH
            )
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


def plot_episode(series: StepSeries, title: str) -> Any:
    """A matplotlib figure: replicas per unit (and powered GPUs) over time, with the load on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for unit, counts in series.replicas.items():
        axis.step(series.time_s, counts, where="post", label=unit, linewidth=1.2)
    axis.step(series.time_s, series.gpus, where="post", label="GPUs powered", color="black", linewidth=2.0)
    axis.set_xlabel("time in episode (s)")
    axis.set_ylabel("replicas / GPUs")
    load_axis = axis.twinx()
    load_axis.plot(series.time_s, series.arrival_rate_per_s, color="grey", linestyle="--", label="load")
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
            raise ValueError(
                f"eval_freq and n_eval_episodes must be >= 1, got {eval_freq} and {n_eval_episodes}"
            )
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
        from opscale.agents.evaluation import evaluate_policy_on_env
        from opscale.agents.registry import SB3Policy

        policy = SB3Policy(self.model, self.eval_env, Path(f"<training step {self.num_timesteps}>"))
        seeds = [self.eval_seed + i for i in range(self.n_eval_episodes)]
        episodes = evaluate_policy_on_env(policy, self.eval_env, seeds=seeds, policy_name="ppo")
        rewards = np.array([episode.reward for episode in episodes])
        scalars = {
            "mean_reward": float(rewards.mean()),
            "std_reward": float(rewards.std()),
            "mean_ep_length": float(np.mean([episode.steps for episode in episodes])),
        }
        for name in _EVAL_EPISODE_FIELDS:
            scalars[name.removesuffix("_s")] = float(
                np.mean([getattr(episode, name) for episode in episodes])
            )
        for name, value in scalars.items():
            self.logger.record(f"eval/{name}", value)
        title = f"evaluation at {self.num_timesteps} steps (seed {seeds[0]})"
        self.logger.record(
            "eval/episode", Figure(plot_episode(episodes[0].series, title), close=True), exclude=_TEXT_FORMATS
        )
        self.evaluations += 1
        if scalars["mean_reward"] > self.best_mean_reward:
            self.best_mean_reward = scalars["mean_reward"]
            if self.best_model_path is not None:
                self.model.save(self.best_model_path)
        self.logger.record("eval/best_mean_reward", self.best_mean_reward)
        self.logger.dump(self.num_timesteps)
        return scalars
