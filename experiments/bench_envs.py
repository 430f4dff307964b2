"""Environment speed benchmark (issue 6 targets), printing one line per figure.

* ``OperatorAutoscale-fast-v0`` alone (through ``gym.make``'s wrappers, random valid actions drawn up
  front, resets included): target >= 5,000 env steps/s;
* SB3 PPO on it with 8 ``DummyVecEnv`` envs (``learn`` wall time, rollouts and updates included):
  target >= 1,500 env steps/s;
* ``OperatorAutoscale-v0`` (DES) on the default workload and config (5-s control interval):
  target >= 50 env steps/s;
* the model-level ids for comparison, and the env layer's own cost (a replayed interval instead of a
  simulation), which bounds what any simulator behind it can reach.

Run: ``python -m opscale.experiments.bench_envs`` (``--quick`` for a smoke run). Add ``--profile`` to
print the top functions of a cProfile of the fast env.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import gymnasium as gym

import opscale
from opscale.sim.deployment import ApplyReport, Deployment, ScalingAction
from opscale.sim.metrics import IntervalMetrics

_T = TypeVar("_T")

__all__ = [
    "env_layer_steps_per_s",
    "env_steps_per_s",
    "main",
    "ppo_steps_per_s",
    "profile_fast_env",
    "reset_s",
]

FAST_ID = "opscale/OperatorAutoscale-fast-v0"
DES_ID = "opscale/OperatorAutoscale-v0"


def env_steps_per_s(env_id: str, steps: int, seed: int = 0, **kwargs: Any) -> float:
    """Steps per second of one environment under random actions (resets on truncation counted)."""
    env = gym.make(env_id, **kwargs)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(min(steps, 1024))]
    env.reset(seed=seed)
    start = time.perf_counter()
    for index in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[index % len(actions)])
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


class _ReplaySimulator:
    """A simulator that replays one recorded interval: what the env layer alone costs per step.

    The interval is recorded once from a real fast simulator (so observations, rewards and info are
    built from real metrics); :meth:`advance` returns a fresh copy of it with the clock moved on, and
    construction (every reset) costs nothing, so the figure excludes simulator construction too.
    """

    def __init__(self, recorded: IntervalMetrics, deployment: Deployment) -> None:
        self._recorded = recorded
        self.deployment = deployment
        self.now_s = 0.0

    def apply(self, action: ScalingAction) -> ApplyReport:
        return ApplyReport()

    def advance(self, dt_s: float) -> IntervalMetrics:
        start_s, self.now_s = self.now_s, self.now_s + dt_s
        interval = _shallow_copy(self._recorded)
        interval.start_s, interval.end_s = start_s, self.now_s
        interval.units = {unit: _shallow_copy(metrics) for unit, metrics in self._recorded.units.items()}
        return interval


def _shallow_copy(instance: _T) -> _T:
    """A shallow copy of a plain (non-slots) object; ``copy.copy`` and ``dataclasses.replace`` go through
    ``__reduce_ex__`` / ``__init__`` and would cost more than the env layer being measured."""
    clone = object.__new__(type(instance))
    clone.__dict__.update(instance.__dict__)
    return clone


def env_layer_steps_per_s(steps: int) -> float:
    """Steps per second of the operator-level env on :class:`_ReplaySimulator` (the env layer's own cost)."""
    from unittest import mock

    from opscale.envs import base

    probe = gym.make(FAST_ID).unwrapped
    probe.reset(seed=0)
    recorded = probe.simulator.advance(probe.control_interval_s)  # type: ignore[attr-defined]
    deployment = probe.initial_deployment  # type: ignore[attr-defined]

    def factory(*_args: Any, **_kwargs: Any) -> _ReplaySimulator:
        return _ReplaySimulator(recorded, deployment)

    with mock.patch.object(base, "simulator_class", lambda fidelity: factory):
        return env_steps_per_s(FAST_ID, steps)


def reset_s(env_id: str, resets: int) -> float:
    """Mean wall time of ``reset()`` (a new simulator and the warm-up interval), seconds."""
    env = gym.make(env_id)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(resets):
        env.reset()
    return (time.perf_counter() - start) / resets


def ppo_steps_per_s(total_timesteps: int, num_envs: int = 8, seed: int = 0) -> float:
    """Env steps per second of SB3 PPO (``MlpPolicy``, ``n_steps=256``, ``batch_size=256``, 10 epochs)
    on ``num_envs`` fast environments in a ``DummyVecEnv``; wall time of ``learn`` only."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    vec_env = make_vec_env(FAST_ID, n_envs=num_envs, seed=seed)
    model = PPO("MlpPolicy", vec_env, n_steps=256, batch_size=256, seed=seed, device="cpu", verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=total_timesteps)
    elapsed = time.perf_counter() - start
    vec_env.close()
    return model.num_timesteps / elapsed


def profile_fast_env(steps: int) -> None:
    """cProfile of the fast environment's step loop (top 25 functions by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    env_steps_per_s(FAST_ID, steps)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run, figures are noisy")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the fast env")
    args = parser.parse_args(argv)
    fast_steps, ppo_steps, des_steps = (500, 2048, 10) if args.quick else (20_000, 32_768, 200)
    rows: list[tuple[str, float, float]] = []
    rows.append(("env layer only (replayed interval, no simulation)", env_layer_steps_per_s(fast_steps), 0.0))
    rows.append((f"{FAST_ID} alone", env_steps_per_s(FAST_ID, fast_steps), 5000.0))
    rows.append(
        (
            "opscale/ModelAutoscale-fast-v0 alone",
            env_steps_per_s("opscale/ModelAutoscale-fast-v0", fast_steps),
            0.0,
        )
    )
    rows.append((f"SB3 PPO, 8 DummyVecEnv x {FAST_ID}", ppo_steps_per_s(ppo_steps), 1500.0))
    rows.append((f"{DES_ID} (default workload, 5 s)", env_steps_per_s(DES_ID, des_steps), 50.0))
    rows.append(
        (
            "opscale/ModelAutoscale-v0 (default workload, 5 s)",
            env_steps_per_s("opscale/ModelAutoscale-v0", des_steps),
            0.0,
        )
    )
    width = max(len(name) for name, _, _ in rows)
    load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, 1-min load average {load_1min:.1f} (figures scale down when the machine is shared)")
    print(f"{'benchmark':<{width}}  {'env steps/s':>12}  {'target':>8}  status")
    for name, value, target in rows:
        status = "-" if target == 0 else ("ok" if value >= target else "BELOW TARGET")
        target_text = "-" if target == 0 else f"{target:,.0f}"
        print(f"{name:<{width}}  {value:>12,.0f}  {target_text:>8}  {status}")
    print()
    for env_id in sorted(opscale.ENV_IDS):
        print(f"reset() of {env_id}: {1e3 * reset_s(env_id, 3 if args.quick else 10):.1f} ms (new simulator + warm-up interval)")
    if args.profile:
        profile_fast_env(fast_steps)
    return 0 if all(target == 0 or value >= target for _, value, target in rows) or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
