"""``opscale experiment``: named experiments. ``paper-table`` reproduces the paper's comparison.

Examples::

    opscale experiment paper-table --quick                 # embedded workload, no data files, minutes
    opscale experiment paper-table --models qwen2-7b --gpus a100 h100 --traces azure-conv azure-code
    opscale experiment paper-table --quick --ppo-model runs/.../best_model.zip --out results/quick

Writes ``results.csv``, ``table.md``, ``plots/*.png``, ``paper_table.json``, per-policy evaluations and
TensorBoard runs (``tensorboard --logdir OUT/tensorboard``) under ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``opscale experiment``."""
    parser = subparsers.add_parser(
        "experiment",
        help="run a named experiment (paper-table)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    paper = experiments.add_parser(
        "paper-table",
        help="static vs model-level vs operator-greedy vs PPO: GPUs, energy, SLO, max rate at a fixed budget",
        description="The paper's table (arXiv 2511.02248) on the DES simulator; see opscale.experiments.paper_table.",
    )
    paper.add_argument(
        "--quick", action="store_true", help="embedded workload, one model/GPU, short windows and PPO run"
    )
    paper.add_argument(
        "--models", nargs="+", help="model names (full default: qwen2-7b qwen2-57b-a14b llama-2-70b)"
    )
    paper.add_argument("--gpus", nargs="+", help="GPU names (full default: a100 h100)")
    paper.add_argument(
        "--traces", nargs="+", help="trace names (full default: azure-conv azure-code servegen-m-large)"
    )
    paper.add_argument(
        "--policies",
        nargs="+",
        help="subset of static model-level model-level-planner operator-greedy ppo (model-level required)",
    )
    paper.add_argument(
        "--out", type=Path, default=Path("results/paper-table"), help="output folder (default %(default)s)"
    )
    paper.add_argument(
        "--ppo-model", type=Path, help="saved PPO/MaskablePPO model to use instead of training"
    )
    paper.add_argument("--ppo-timesteps", type=int, help="PPO training steps per case")
    paper.add_argument(
        "--ppo-chain-actions",
        action="store_true",
        help="train and evaluate PPO with the chain action dimension (env key chain_actions)",
    )
    paper.add_argument("--seeds", type=int, nargs="+", help="evaluation seeds (paired across policies)")
    paper.add_argument("--horizon", type=int, help="decisions per evaluation episode")
    paper.add_argument("--no-progress", action="store_true", help="no progress bar")
    paper.set_defaults(func=_paper_table)


def _paper_table(args: argparse.Namespace) -> int:
    from opscale.experiments.paper_table import PaperTableConfig, run_paper_table

    changes: dict[str, Any] = {"out_dir": args.out, "progress": not args.no_progress}
    if args.ppo_chain_actions:
        changes["ppo_chain_actions"] = True
    for key, value in (
        ("models", args.models),
        ("gpus", args.gpus),
        ("traces", args.traces),
        ("policies", args.policies),
        ("ppo_model", args.ppo_model),
        ("ppo_timesteps", args.ppo_timesteps),
        ("eval_seeds", args.seeds),
        ("horizon", args.horizon),
    ):
        if value is not None:
            changes[key] = tuple(value) if isinstance(value, list) else value
    config = PaperTableConfig.quick(**changes) if args.quick else PaperTableConfig(**changes)
    command = (
        "opscale " + " ".join(shlex.quote(part) for part in sys.argv[1:])
        if sys.argv[1:2] == ["experiment"]
        else ""
    )
    result = run_paper_table(config, command=command)
    print(result.files["markdown"].read_text())
    print(
        f"wrote {config.out_dir} in {result.wall_s:.0f} s: "
        + ", ".join(
            str(path.relative_to(config.out_dir))
            for name, path in result.files.items()
            if not name.startswith("plot:")
        )
    )
    return 0
