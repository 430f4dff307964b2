"""Environment speed benchmark (issue 6 targets), printing one line per figure.

* ``OperatorAutoscale-fast-v0`` alone (through ``gym.make``'s wrappers, random valid actions drawn up
  front, resets included; default config): target >= 5,000 env steps/s;
* SB3 PPO on it with 8 ``DummyVecEnv`` envs (``learn`` wall time, rollouts and updates included), its
  untrained policy acting uniformly at random: target >= 1,500 env steps/s; and again started with the
  no-op bias ``opscale train`` gives it by default (fewer replica changes per step);
* ``OperatorAutoscale-v0`` (DES) on the default workload and config (5-s control interval):
  target >= 50 env steps/s;
* no-op actions (the deployment stays as sized), the model-level ids and MaskablePPO for comparison, and the env
  layer's own cost (a replayed interval instead of a simulation), which bounds what any simulator
  behind it can reach; likewise PPO on the replayed interval, which bounds the PPO figure.

Each figure runs for a fixed number of steps or a wall-time budget (30 s; 5 s with ``--quick``),
whichever ends first, so slow simulators still give a figure in bounded time.
Run: ``python -m opscale.experiments.bench_envs`` (``--quick`` for a smoke run). Add ``--profile`` to
print the top functions of a cProfile of the fast env.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import time
import timeit
from collections.abc import Iterator, Sequence
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
    "ppo_layer_steps_per_s",
    "ppo_steps_per_s",
    "profile_fast_env",
    "reset_s",
]

FAST_ID = "opscale/OperatorAutoscale-fast-v0"
DES_ID = "opscale/OperatorAutoscale-v0"


#: Untimed random steps before a timed run (scale-ups, scale-downs, a refresh: every compiled call).
WARM_UP_STEPS = 3


def env_steps_per_s(
    env_id: str, max_steps: int, max_seconds: float, *, noop: bool = False, seed: int = 0, **kwargs: Any
) -> float:
    """Steps per second of one environment (through ``gym.make``'s wrappers, resets on truncation
    counted) over ``max_steps`` steps or ``max_seconds`` of wall time, whichever ends first. A few
    untimed steps first load (or, after a change, compile) the numba functions the run calls.

    :param noop: send the no-change action every step instead of random valid actions (drawn up front).
    """
    env = gym.make(env_id, **kwargs)
    env.action_space.seed(seed)
    warm_up = [env.action_space.sample() for _ in range(WARM_UP_STEPS)]
    if noop:
        actions = [env.unwrapped.codec.noop()]  # type: ignore[attr-defined]
    else:
        actions = [env.action_space.sample() for _ in range(min(max_steps, 1024))]
    env.reset(seed=seed)
    for action in warm_up:
        env.step(action)
    env.reset(seed=seed)
    steps = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    while steps < max_steps and time.perf_counter() < deadline:
        _, _, terminated, truncated, _ = env.step(actions[steps % len(actions)])
        steps += 1
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


@contextlib.contextmanager
def _replayed_simulator() -> Iterator[None]:
    """Inside the block every environment built runs on :class:`_ReplaySimulator` (one interval
    recorded from a real fast simulator): what the layers above the simulator cost alone."""
    from unittest import mock

    from opscale.envs import base

    probe = gym.make(FAST_ID).unwrapped
    probe.reset(seed=0)
    recorded = probe.simulator.advance(probe.control_interval_s)  # type: ignore[attr-defined]
    deployment = probe.initial_deployment  # type: ignore[attr-defined]

    def factory(*_args: Any, **_kwargs: Any) -> _ReplaySimulator:
        return _ReplaySimulator(recorded, deployment)

    with mock.patch.object(base, "simulator_class", lambda fidelity: factory):
        yield


def env_layer_steps_per_s(max_steps: int, max_seconds: float) -> float:
    """Steps per second of the operator-level env on :class:`_ReplaySimulator` (the env layer's own cost)."""
    with _replayed_simulator():
        return env_steps_per_s(FAST_ID, max_steps, max_seconds)


def reset_s(env_id: str, resets: int) -> float:
    """Mean wall time of ``reset()`` (a new simulator and the warm-up interval), seconds."""
    env = gym.make(env_id)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(resets):
        env.reset()
    return (time.perf_counter() - start) / resets


def ppo_steps_per_s(
    total_timesteps: int,
    max_seconds: float,
    num_envs: int = 8,
    seed: int = 0,
    *,
    maskable: bool = False,
    noop_logit_bias: float = 0.0,
) -> float:
    """Env steps per second of SB3 PPO (``MlpPolicy``, ``n_steps=256``, ``batch_size=256``, 10 epochs)
    on ``num_envs`` fast environments in a ``DummyVecEnv``: ``learn`` wall time (rollouts and updates)
    until ``total_timesteps`` or ``max_seconds``, whichever comes first. With a slow simulator the
    budget may end inside the first rollout, and the figure is then the rollout speed alone. PPO runs
    as ``opscale train`` runs it: :class:`~opscale.agents.policies.MultiDiscreteActorCriticPolicy`,
    torch in :func:`opscale.agents.ppo.small_network_torch` (one thread, no distribution argument
    checks).

    :param maskable: sb3-contrib's MaskablePPO instead (with
        :class:`~opscale.agents.policies.MaskableMultiDiscreteActorCriticPolicy`; it asks every env for
        ``action_masks()`` every step).
    :param noop_logit_bias: start the policy biased towards no-op actions, as ``opscale train`` does by
        default (:attr:`opscale.agents.ppo.PPOConfig.noop_logit_bias`); 0: an untrained policy's
        uniformly random actions, the simulator's costliest steps.
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from opscale.agents.policies import MaskableMultiDiscreteActorCriticPolicy, MultiDiscreteActorCriticPolicy
    from opscale.agents.ppo import bias_towards_noop, small_network_torch

    class StopAt(BaseCallback):
        def __init__(self, deadline: float) -> None:
            super().__init__()
            self.deadline = deadline

        def _on_step(self) -> bool:
            return time.perf_counter() < self.deadline

    vec_env = make_vec_env(FAST_ID, n_envs=num_envs, seed=seed)
    model = (MaskablePPO if maskable else PPO)(
        MaskableMultiDiscreteActorCriticPolicy if maskable else MultiDiscreteActorCriticPolicy,
        vec_env,
        n_steps=256,
        batch_size=256,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    if noop_logit_bias:
        bias_towards_noop(model, vec_env.envs[0].unwrapped.codec.noop(), noop_logit_bias)  # type: ignore[attr-defined]
    with small_network_torch(threads=1):
        start = time.perf_counter()
        model.learn(total_timesteps=total_timesteps, callback=StopAt(start + max_seconds))
        elapsed = time.perf_counter() - start
    vec_env.close()
    return model.num_timesteps / elapsed


def ppo_layer_steps_per_s(total_timesteps: int, max_seconds: float, num_envs: int = 8) -> float:
    """:func:`ppo_steps_per_s` on :class:`_ReplaySimulator`: the ceiling of PPO (rollouts, policy,
    updates, env layer) whatever the simulator's speed."""
    with _replayed_simulator():
        return ppo_steps_per_s(total_timesteps, max_seconds, num_envs)


def profile_fast_env(max_steps: int, max_seconds: float) -> None:
    """cProfile of the fast environment's step loop (top 25 functions by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    env_steps_per_s(FAST_ID, max_steps, max_seconds)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def python_reference_s(repeats: int = 10) -> float:
    """Seconds CPython takes for ``sum(range(10**6))``, the best of ``repeats``: a yardstick of the core's
    speed (shared cloud cores drift by ~20 % within an hour), printed beside the figures."""
    return min(timeit.repeat("sum(range(10**6))", number=1, repeat=repeats))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run, figures are noisy")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the fast env")
    args = parser.parse_args(argv)
    # step counts a fast simulator reaches in a few seconds; the time budget bounds slow ones
    fast_steps, ppo_steps, des_steps, seconds = (
        (500, 2048, 20, 5.0) if args.quick else (20_000, 16_384, 500, 30.0)
    )
    model_fast_id, model_des_id = "opscale/ModelAutoscale-fast-v0", "opscale/ModelAutoscale-v0"
    rows: list[tuple[str, float, float]] = [
        (
            "env layer only (replayed interval, no simulation)",
            env_layer_steps_per_s(fast_steps, seconds),
            0.0,
        ),
        (f"{FAST_ID}, random actions", env_steps_per_s(FAST_ID, fast_steps, seconds), 5000.0),
        (f"{FAST_ID}, no-op actions", env_steps_per_s(FAST_ID, fast_steps, seconds, noop=True), 0.0),
        (f"{model_fast_id}, random actions", env_steps_per_s(model_fast_id, fast_steps, seconds), 0.0),
        (f"SB3 PPO, 8 DummyVecEnv x {FAST_ID}", ppo_steps_per_s(ppo_steps, seconds), 1500.0),
        (
            "  the same, policy started as `opscale train` starts it (no-op bias 2.0)",
            ppo_steps_per_s(ppo_steps, seconds, noop_logit_bias=2.0),
            0.0,
        ),
        (
            "SB3 PPO, 8 DummyVecEnv x replayed interval (PPO's own cost)",
            ppo_layer_steps_per_s(ppo_steps, seconds),
            0.0,
        ),
        (
            f"sb3-contrib MaskablePPO, 8 DummyVecEnv x {FAST_ID}",
            ppo_steps_per_s(ppo_steps, seconds, maskable=True),
            0.0,
        ),
        (f"{DES_ID}, random actions", env_steps_per_s(DES_ID, des_steps, seconds), 50.0),
        (f"{DES_ID}, no-op actions", env_steps_per_s(DES_ID, des_steps, seconds, noop=True), 0.0),
        (f"{model_des_id}, random actions", env_steps_per_s(model_des_id, des_steps, seconds), 0.0),
    ]
    width = max(len(name) for name, _, _ in rows)
    load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{os.cpu_count()} CPUs, 1-min load average {load_1min:.1f} (figures scale down when the machine is shared)"
    )
    print(
        f"this core's pace: sum(range(10**6)) in {1e3 * python_reference_s():.1f} ms "
        "(compare figures across machines or hours in proportion)"
    )
    print(f"{'benchmark':<{width}}  {'env steps/s':>12}  {'target':>8}  status")
    for name, value, target in rows:
        status = "-" if target == 0 else ("ok" if value >= target else "BELOW TARGET")
        target_text = "-" if target == 0 else f"{target:,.0f}"
        print(f"{name:<{width}}  {value:>12,.0f}  {target_text:>8}  {status}")
    print()
    for env_id in sorted(opscale.ENV_IDS):
        print(
            f"reset() of {env_id}: {1e3 * reset_s(env_id, 3 if args.quick else 10):.1f} ms (new simulator + warm-up interval)"
        )
    if args.profile:
        profile_fast_env(fast_steps, seconds)
    return 0 if all(target == 0 or value >= target for _, value, target in rows) or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
