"""Evaluation harness: run any policy on paired seeds and trace windows, summarise with 95 % CIs.

Pairing: episode ``i`` resets the environment with ``seeds[i]``. The environment draws its window
start and its simulator seed from that seed, so two policies evaluated with the same seeds see the
same windows and the same arrivals (:func:`paired_difference` then compares them episode by
episode). ``windows="held-out"`` instead starts every episode inside the last ``held_out_fraction`` of
the trace (start drawn from ``numpy.random.default_rng(seed)``), the part training should leave alone
(:func:`window_range` gives both ranges).

Per episode (:class:`EpisodeResult`): GPUs mean / peak, GPU-hours, energy (kWh), SLO attainment,
TTFT / TBT p99 and the request counts from the simulator's :class:`opscale.sim.metrics.RunSummary`
(the whole simulated window, warm-up included), plus the summed reward and its components, repairs,
and wall time; and the per-step time series (time, arrival rate, GPUs powered, power, SLO
attainment, replicas per unit) for plots. :class:`EvaluationResult` writes ``episodes.csv``,
``episodes.json``, ``series.csv`` and ``summary.json`` (mean, standard deviation, Student-t 95 %
confidence interval per metric).

Policies that implement :class:`opscale.agents.base.InfoObserver` get every ``info`` after ``reset``
and ``step``; policies that implement :class:`opscale.agents.base.ProposesInitialDeployment` (``static``)
start every episode from their deployment.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from opscale.agents.base import InfoObserver, Policy, ProposesInitialDeployment
from opscale.traces.trace import RequestTrace

__all__ = [
    "EPISODE_METRICS",
    "EpisodeResult",
    "EvaluationResult",
    "MetricSummary",
    "StepSeries",
    "evaluate",
    "evaluate_policy_on_env",
    "make_env",
    "paired_difference",
    "summarise",
    "window_range",
]

WindowMode = Literal["random", "held-out"]

#: Share of the trace (its end) kept for held-out evaluation windows.
HELD_OUT_FRACTION = 0.2

#: Two-sided 95 % Student-t quantiles by degrees of freedom (1..30); above 30 the normal 1.96.
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclass
class StepSeries:
    """Per-step time series of one episode (one entry per control interval after the reset).

    :param time_s: end of the interval, simulated seconds since the window start.
    :param arrival_rate_per_s: arrivals / interval length.
    :param gpus: GPUs powered, time-averaged over the interval.
    :param power_w: mean cluster power.
    :param slo_attainment: share of the interval's decided requests meeting the SLO.
    :param replicas: per unit name, replicas serving + loading at the interval's end.
    """

    time_s: list[float] = field(default_factory=list)
    arrival_rate_per_s: list[float] = field(default_factory=list)
    gpus: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    slo_attainment: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=dict)

    def record(self, interval: Mapping[str, Any]) -> None:
        """Append one interval's metrics dict (``info["interval"]``)."""
        duration = float(interval["end_s"]) - float(interval["start_s"])
        self.time_s.append(float(interval["end_s"]))
        self.arrival_rate_per_s.append(float(interval["arrivals"]) / duration if duration > 0 else 0.0)
        self.gpus.append(float(interval["gpus_powered_mean"]))
        self.power_w.append(float(interval["energy_j"]) / duration if duration > 0 else 0.0)
        self.slo_attainment.append(float(interval["slo_attainment"]))
        for unit, metrics in interval.get("units", {}).items():
            count = int(metrics["replicas"]) + int(metrics.get("pending_replicas", 0))
            self.replicas.setdefault(str(unit), []).append(count)


@dataclass
class EpisodeResult:
    """Figures of one evaluated episode (see the module docstring)."""

    policy: str
    env_id: str
    fidelity: str
    episode: int
    seed: int
    start_s: float
    steps: int
    requests: int
    completed: int
    slo_attainment: float
    ttft_p99_s: float
    tbt_p99_s: float
    gpus_mean: float
    gpus_peak: int
    gpu_hours: float
    energy_kwh: float
    reward: float
    reward_slo: float
    reward_gpu: float
    reward_energy: float
    repairs: int
    wall_s: float
    series: StepSeries = field(default_factory=StepSeries, repr=False)

    def row(self) -> dict[str, Any]:
        """The scalar fields (what ``episodes.csv`` holds)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "series"}


#: Metrics summarised per evaluation (the numeric fields of :class:`EpisodeResult` that vary).
EPISODE_METRICS: tuple[str, ...] = (
    "slo_attainment",
    "ttft_p99_s",
    "tbt_p99_s",
    "gpus_mean",
    "gpus_peak",
    "gpu_hours",
    "energy_kwh",
    "reward",
    "reward_slo",
    "reward_gpu",
    "reward_energy",
    "repairs",
    "requests",
    "completed",
    "wall_s",
)


@dataclass(frozen=True)
class MetricSummary:
    """Mean, sample standard deviation and Student-t 95 % confidence interval of one metric.

    With one value the interval collapses to the value (no spread is known).
    """

    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.ci95_high - self.ci95_low) / 2.0


def summarise(values: Sequence[float]) -> MetricSummary:
    """:class:`MetricSummary` of ``values``.

    :raises ValueError: for an empty sequence.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("cannot summarise an empty list of values")
    mean = float(array.mean())
    if array.size == 1:
        return MetricSummary(mean, 0.0, mean, mean, 1)
    std = float(array.std(ddof=1))
    dof = array.size - 1
    quantile = _T95[dof - 1] if dof <= len(_T95) else 1.96
    half = quantile * std / math.sqrt(array.size)
    return MetricSummary(mean, std, mean - half, mean + half, int(array.size))


@dataclass
class EvaluationResult:
    """All episodes of one policy on one environment, and their summary."""

    policy: str
    env_id: str
    fidelity: str
    episodes: list[EpisodeResult]

    @property
    def summary(self) -> dict[str, MetricSummary]:
        return {name: summarise([getattr(e, name) for e in self.episodes]) for name in EPISODE_METRICS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: identification, per-episode rows and the summary."""
        return {
            "policy": self.policy,
            "env_id": self.env_id,
            "fidelity": self.fidelity,
            "episodes": [episode.row() for episode in self.episodes],
            "summary": {name: asdict(value) for name, value in self.summary.items()},
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``episodes.csv``, ``episodes.json``, ``series.csv`` and ``summary.json`` into ``out_dir``."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            name: folder / name for name in ("episodes.csv", "episodes.json", "series.csv", "summary.json")
        }
        rows = [episode.row() for episode in self.episodes]
        with paths["episodes.csv"].open("w", newline="") as handle:
            dict_writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            dict_writer.writeheader()
            dict_writer.writerows(rows)
        paths["episodes.json"].write_text(json.dumps(rows, indent=2))
        data = self.to_dict()
        paths["summary.json"].write_text(
            json.dumps({k: data[k] for k in ("policy", "env_id", "fidelity", "summary")}, indent=2)
        )
        units = sorted({unit for e in self.episodes for unit in e.series.replicas})
        with paths["series.csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "episode",
                    "seed",
                    "time_s",
                    "arrival_rate_per_s",
                    "gpus",
                    "power_w",
                    "slo_attainment",
                    *(f"replicas_{u}" for u in units),
                ]
            )
            for episode in self.episodes:
                series = episode.series
                for step, time_s in enumerate(series.time_s):
                    writer.writerow(
                        [
                            episode.episode,
                            episode.seed,
                            time_s,
                            series.arrival_rate_per_s[step],
                            series.gpus[step],
                            series.power_w[step],
                            series.slo_attainment[step],
                            *(series.replicas.get(u, [0] * len(series.time_s))[step] for u in units),
                        ]
                    )
        return paths


def paired_difference(a: EvaluationResult, b: EvaluationResult, metric: str) -> MetricSummary:
    """Summary of ``a - b`` for ``metric`` over the episodes both ran with the same seed.

    :raises ValueError: for an unknown metric or no common seed.
    """
    if metric not in EPISODE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(EPISODE_METRICS)}")
    by_seed = {e.seed: getattr(e, metric) for e in b.episodes}
    differences = [getattr(e, metric) - by_seed[e.seed] for e in a.episodes if e.seed in by_seed]
    if not differences:
        raise ValueError(f"{a.policy} and {b.policy} share no evaluation seed")
    return summarise(differences)


def window_range(
    env: Any, split: WindowMode = "held-out", held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[float, float]:
    """Range of episode start times: ``"held-out"`` (the trace's last ``held_out_fraction``) or
    ``"random"`` (everything before it, for training).

    :raises ValueError: for a fraction outside (0, 1) or an unknown split.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    base = env.unwrapped
    trace: RequestTrace = base.trace
    length = base.episode_length_s
    earliest, latest = trace.start_s, trace.end_s - length
    boundary = trace.end_s - held_out_fraction * trace.duration_s
    if split == "held-out":
        return min(max(boundary, earliest), latest), latest
    if split == "random":
        return earliest, max(earliest, min(boundary - length, latest))
    raise ValueError(f"unknown window split {split!r}; valid: random, held-out")


def make_env(
    env_id: str,
    *,
    fidelity: str | None = "des",
    trace: str | RequestTrace | None = None,
    env_config: Mapping[str, Any] | None = None,
) -> Any:
    """``gym.make(env_id)`` with a fidelity, a trace and further config keys.

    :raises ValueError: for an unknown env id (listing the valid ones) or an invalid config.
    """
    import gymnasium as gym

    from opscale import ENV_IDS

    if env_id.removeprefix("opscale:") not in ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; valid: {', '.join(ENV_IDS)}")
    config = dict(env_config or {})
    if trace is not None:
        config["trace"] = trace
    # keyword overrides beat both the config mapping and the id's registered kwargs (its fidelity)
    config_fidelity = config.pop("fidelity", None)
    chosen = fidelity if fidelity is not None else config_fidelity
    overrides: dict[str, Any] = {} if chosen is None else {"fidelity": chosen}
    return gym.make(env_id.removeprefix("opscale:"), config=config, **overrides)


def _reset_memory(policy: Any) -> None:
    reset = getattr(policy, "reset", None)
    if callable(reset):
        reset()


def evaluate_policy_on_env(
    policy: Policy,
    env: Any,
    *,
    seeds: Sequence[int],
    starts: Sequence[float | None] | None = None,
    policy_name: str = "policy",
    env_id: str = "",
    deterministic: bool = True,
    on_episode: Callable[[EpisodeResult], None] | None = None,
) -> list[EpisodeResult]:
    """Run ``policy`` for one episode per seed on ``env`` (already configured).

    :param seeds: the reset seed of each episode.
    :param starts: per episode, a window start (``None``: the env draws it from the seed).
    :param on_episode: called with each finished episode (progress displays).
    """
    if starts is not None and len(starts) != len(seeds):
        raise ValueError(f"{len(starts)} window starts for {len(seeds)} seeds")
    base = env.unwrapped
    results: list[EpisodeResult] = []
    for episode, seed in enumerate(seeds):
        start = None if starts is None else starts[episode]
        began = time.perf_counter()
        _reset_memory(policy)
        observation, info = env.reset(
            seed=int(seed), options=None if start is None else {"start_s": float(start)}
        )
        window_start_s = float(info["start_s"])
        if isinstance(policy, InfoObserver):
            policy.observe_info(info)
        series = StepSeries()
        totals = {"reward": 0.0, "slo": 0.0, "gpu": 0.0, "energy": 0.0}
        repairs = steps = 0
        state: Any = None
        episode_start = np.ones((1,), dtype=bool)
        done = False
        while not done:
            action, state = policy.predict(
                observation, state=state, episode_start=episode_start, deterministic=deterministic
            )
            episode_start = np.zeros((1,), dtype=bool)
            observation, reward, terminated, truncated, info = env.step(action)
            if isinstance(policy, InfoObserver):
                policy.observe_info(info)
            steps += 1
            totals["reward"] += float(reward)
            for name, value in info.get("reward_components", {}).items():
                totals[name] += float(value)
            repairs += int(info.get("repairs", 0))
            if "interval" in info:
                series.record(info["interval"])
            done = bool(terminated or truncated)
        summary = base.simulator.summary()
        result = EpisodeResult(
            policy=policy_name,
            env_id=env_id,
            fidelity=str(base.config.fidelity.value),
            episode=episode,
            seed=int(seed),
            start_s=window_start_s,
            steps=steps,
            requests=int(summary.requests),
            completed=int(summary.completed),
            slo_attainment=float(summary.slo_attainment),
            ttft_p99_s=float(summary.ttft_p99_s),
            tbt_p99_s=float(summary.tbt_p99_s),
            gpus_mean=float(summary.gpus_mean),
            gpus_peak=int(summary.gpus_peak),
            gpu_hours=float(summary.gpu_seconds) / 3600.0,
            energy_kwh=float(summary.energy_kwh),
            reward=totals["reward"],
            reward_slo=totals["slo"],
            reward_gpu=totals["gpu"],
            reward_energy=totals["energy"],
            repairs=repairs,
            wall_s=time.perf_counter() - began,
            series=series,
        )
        results.append(result)
        if on_episode is not None:
            on_episode(result)
    return results


def evaluate(
    policy: str | Path | Policy,
    env_id: str,
    *,
    trace: str | RequestTrace | None = None,
    episodes: int | None = None,
    seeds: Sequence[int] | None = None,
    fidelity: str | None = "des",
    env_config: Mapping[str, Any] | None = None,
    windows: WindowMode = "random",
    policy_kwargs: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate a policy (registry name, saved-model path, or a :class:`Policy` object) on ``env_id``.

    :param trace: a trace name or a :class:`RequestTrace` (``None``: the env's default).
    :param episodes: number of episodes (default: ``len(seeds)``, or 3).
    :param seeds: reset seed per episode (default ``0 .. episodes - 1``); the pairing key.
    :param fidelity: ``"des"`` (default, the truth), ``"fluid"``, or ``None`` for the env id's own.
    :param env_config: further environment config keys (horizon, model, gpu, rate scale, ...).
    :param windows: ``"random"`` (the env draws the window from the seed) or ``"held-out"``.
    :param policy_kwargs: options of a registry policy.
    :param out_dir: if given, the result is written there (:meth:`EvaluationResult.write`).
    :param progress: show a tqdm bar over episodes.
    :raises ValueError: unknown policy or env id, bad config, a trace shorter than one episode,
        mismatched ``episodes`` / ``seeds``.
    :raises FileNotFoundError: a saved-model path that does not exist.
    """
    from opscale.agents.registry import SB3Policy, make_policy

    if seeds is None:
        seeds = list(range(episodes if episodes is not None else 3))
    elif episodes is not None and episodes != len(seeds):
        raise ValueError(f"episodes={episodes} but {len(seeds)} seeds given; give one seed per episode")
    if len(seeds) == 0:
        raise ValueError("need at least one episode")
    env = make_env(env_id, fidelity=fidelity, trace=trace, env_config=env_config)
    if isinstance(policy, (str, Path)):
        name = str(policy)
        agent: Policy = make_policy(name, env, **dict(policy_kwargs or {}))
    else:
        name = getattr(policy, "name", type(policy).__name__)
        agent = policy
    if isinstance(agent, ProposesInitialDeployment):
        deployment = agent.initial_deployment()
        if deployment is not None:
            env.close()
            env = make_env(
                env_id,
                fidelity=fidelity,
                trace=trace,
                env_config={**dict(env_config or {}), "initial_deployment": deployment},
            )
            if isinstance(agent, SB3Policy):
                agent.env = env  # its action masks come from the env it acts on
    starts: list[float | None] | None = None
    if windows == "held-out":
        low, high = window_range(env, "held-out")
        starts = [float(np.random.default_rng(int(seed)).uniform(low, high)) for seed in seeds]
    elif windows != "random":
        raise ValueError(f"unknown windows {windows!r}; valid: random, held-out")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds), desc=f"evaluate {name}", unit="episode")

    def advance(result: EpisodeResult) -> None:
        if bar is not None:
            bar.set_postfix(slo=f"{result.slo_attainment:.3f}", gpus=f"{result.gpus_mean:.2f}")
            bar.update(1)

    try:
        episodes_run = evaluate_policy_on_env(
            agent, env, seeds=seeds, starts=starts, policy_name=name, env_id=env_id, on_episode=advance
        )
    finally:
        if bar is not None:
            bar.close()
        env.close()
    result = EvaluationResult(
        policy=name, env_id=env_id, fidelity=episodes_run[0].fidelity, episodes=episodes_run
    )
    if out_dir is not None:
        result.write(out_dir)
    return result
