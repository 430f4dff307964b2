"""``opscale train``: train a PPO / MaskablePPO autoscaler and log it to TensorBoard.

Example::

    opscale train --env opscale/OperatorAutoscale-fast-v0 --algo maskable-ppo --timesteps 200000 \\
        --n-envs 4 --seed 1 --logdir runs
    tensorboard --logdir runs

Options given on the command line override the ``--config`` file (JSON or TOML with
:class:`opscale.agents.ppo.PPOConfig` keys), which overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``opscale train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a PPO autoscaler (TensorBoard runs under --logdir)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env", dest="env_id", help="env id (default opscale/OperatorAutoscale-fast-v0)")
    parser.add_argument("--algo", choices=("ppo", "maskable-ppo"), help="algorithm (default ppo)")
    parser.add_argument("--timesteps", dest="total_timesteps", type=int, help="environment steps to train")
    parser.add_argument("--n-envs", dest="n_envs", type=int, help="parallel environments")
    parser.add_argument("--vec-env", dest="vec_env", choices=("dummy", "subproc"), help="vectorisation")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--exp-name", dest="exp_name", help="experiment name (part of the run directory)")
    parser.add_argument("--eval-freq", dest="eval_freq", type=int, help="steps between evaluations (0: none)")
    parser.add_argument("--config", help="JSON or TOML file of PPOConfig keys")
    parser.add_argument(
        "--env-kwargs",
        dest="env_kwargs",
        type=json.loads,
        help='JSON object of env config keys, e.g. \'{"model": "qwen2-7b", "gpu": "h100"}\'',
    )
    parser.add_argument("--logdir", help="parent of the run directories (default runs)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="print SB3's scalar table")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Build the :class:`PPOConfig` from ``--config`` and the flags, train, print where the run went."""
    from opscale.agents.ppo import PPOConfig, train

    config = PPOConfig.from_file(args.config) if args.config else PPOConfig()
    if args.env_kwargs is not None and not isinstance(args.env_kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    config = config.with_changes(
        env_id=args.env_id,
        algo=args.algo,
        total_timesteps=args.total_timesteps,
        n_envs=args.n_envs,
        vec_env=args.vec_env,
        seed=args.seed,
        exp_name=args.exp_name,
        eval_freq=args.eval_freq,
        env_kwargs=args.env_kwargs,
        logdir=args.logdir,
    )
    result = train(config, progress_bar=args.progress, verbose=args.verbose)
    print(f"run directory: {result.run_dir}")
    print(f"final model:   {result.model_path}")
    if result.best_model_path is not None:
        print(f"best model:    {result.best_model_path} (mean eval reward {result.best_eval_reward:.3f})")
    print(f"trained {result.timesteps} steps in {result.wall_s:.1f} s")
    return 0
