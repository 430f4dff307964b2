"""``opscale env``: describe an environment or run a few steps of it.

Examples::

    opscale env describe                                   # OperatorAutoscale-fast-v0, default config
    opscale env describe --id opscale/ModelAutoscale-v0 --set model=mixtral-8x7b --set gpu=h100
    opscale env run --steps 12 --policy noop --render      # ANSI table after every step
    opscale env run --id opscale/OperatorAutoscale-v0 --set horizon=24 --policy random --seed 3

``--set key=value`` sets any key of :func:`opscale.envs.config.default_config`; the value is read as
JSON when it parses (``--set reward_weights='{"slo": 20}'``, ``--set horizon=60``), else as a string.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_DEFAULT_ID = "opscale/OperatorAutoscale-fast-v0"


def add_parser(subparsers: Any) -> None:
    """Register ``opscale env`` with ``describe`` and ``run``."""
    parser = subparsers.add_parser(
        "env",
        help="describe an environment (observation indices, actions, starting deployment) or run it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("describe", "print the observation index table, the action encoding and the starting deployment"),
        ("run", "run steps with a simple policy and print per-step reward, SLO attainment and GPUs"),
    ):
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--id", default=_DEFAULT_ID, help=f"environment id (default {_DEFAULT_ID})")
        sub.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config key (repeatable)"
        )
        sub.set_defaults(func=_describe if name == "describe" else _run)
    run = actions.choices["run"]
    run.add_argument("--steps", type=int, default=12, help="steps to run (default 12)")
    run.add_argument("--policy", choices=("noop", "random"), default="noop", help="actions (default noop)")
    run.add_argument("--seed", type=int, default=0, help="reset seed (default 0)")
    run.add_argument("--render", action="store_true", help="print the ANSI table after every step")


def _config(pairs: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            config[key] = json.loads(text)
        except json.JSONDecodeError:
            config[key] = text
    return config


def _make(args: argparse.Namespace, render_mode: str | None = None) -> Any:
    import gymnasium as gym

    import opscale

    if args.id not in opscale.ENV_IDS:
        raise ValueError(f"unknown environment id {args.id!r}; valid: {', '.join(sorted(opscale.ENV_IDS))}")
    return gym.make(args.id, render_mode=render_mode, config=_config(args.set))


def _describe(args: argparse.Namespace) -> int:
    env = _make(args)
    base = env.unwrapped
    print(
        f"{args.id}: {base.model.name} on {base.cluster.num_gpus} x {base.config.gpu.name}, fidelity {base.config.fidelity.value}"
    )
    print(f"SLO: TTFT {base.slo.ttft_s:g} s, TBT {base.slo.tbt_s:g} s ({base.slo.tbt_statistic})")
    print(f"trace {base.trace.name!r}: {len(base.trace)} requests over {base.trace.duration_s:.0f} s")
    print(f"\naction space {env.action_space} ({type(base.codec).__name__}):")
    print(
        f"  replica deltas {base.config.replica_deltas}; batch caps (0 = keep) {base.config.batch_cap_buckets_tokens}"
    )
    if base.granularity == "operator":
        from opscale.envs.spaces import PLACEMENT_CHOICES

        choices = ", ".join(f"{index} {placement.value}" for index, placement in enumerate(PLACEMENT_CHOICES))
        print(f"  placement of added replicas (third dimension of each unit): {choices}")
        if base.config.chain_actions:
            print("  chain (the last dimension): 0 removes one co-located chain, 1 none, 2 adds one")
    print(f"\nobservation space Box{env.observation_space.shape} (float32):")
    print(base.observation_layout.table())
    print("\nstarting deployment:")
    print(base.initial_deployment.to_json())
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    env = _make(args, render_mode="ansi" if args.render else None)
    env.action_space.seed(args.seed)
    env.reset(seed=args.seed)
    noop = env.unwrapped.codec.noop()
    total = 0.0
    for step in range(1, args.steps + 1):
        action = noop if args.policy == "noop" else env.action_space.sample()
        _, reward, _, truncated, info = env.step(action)
        total += float(reward)
        interval = info["interval"]
        print(
            f"step {step:4d}  reward {float(reward):+8.3f}  SLO {100 * interval['slo_attainment']:5.1f} %  "
            f"GPUs {interval['gpus_powered']:3d}  arrivals {interval['arrivals']:4d}  repairs {info['repairs']}"
        )
        if args.render:
            print(env.render())
        if truncated:
            env.reset()
    print(f"total reward {total:+.3f} over {args.steps} steps")
    return 0
