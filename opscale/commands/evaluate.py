"""``opscale evaluate``: score a policy (heuristic name or saved SB3 model) on paired seeds.

Examples::

    opscale evaluate --policy operator-greedy --env opscale/OperatorAutoscale-v0 --episodes 3
    opscale evaluate --policy model-level --env opscale/ModelAutoscale-v0 --trace azure-conv --seeds 0 1 2
    opscale evaluate --policy runs/ppo/best_model.zip --env opscale/OperatorAutoscale-v0 --windows held-out \\
        --out results/ppo --json

Runs on the DES fidelity unless ``--fidelity fluid`` is given. Writes ``episodes.csv``,
``episodes.json``, ``series.csv`` and ``summary.json`` under ``--out``; prints a summary table (or the
JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: Summary rows of the printed table: (metric, label, format).
_TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("slo_attainment", "SLO attainment", "{:.4f}"),
    ("gpus_mean", "GPUs (mean)", "{:.2f}"),
    ("gpus_peak", "GPUs (peak)", "{:.1f}"),
    ("gpu_hours", "GPU-hours", "{:.4f}"),
    ("energy_kwh", "energy (kWh)", "{:.4f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("tbt_p99_s", "TBT p99 (s)", "{:.4f}"),
    ("reward", "reward", "{:.2f}"),
    ("repairs", "repairs", "{:.1f}"),
)


def add_parser(subparsers: Any) -> None:
    """Register ``opscale evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a policy on paired seeds (per-episode metrics, summary with 95%% CIs)",
        description="Evaluate a heuristic policy or a saved SB3 model on an opscale environment.",
    )
    parser.add_argument(
        "--policy",
        required=True,
        help=(
            "static, model-level, model-level-throughput, model-level-planner, operator-greedy, oracle, or a path "
            "to a saved SB3 .zip"
        ),
    )
    parser.add_argument(
        "--env", default="opscale/OperatorAutoscale-v0", help="environment id (default %(default)s)"
    )
    parser.add_argument(
        "--trace", default=None, help="trace name or file (default: the env's, the embedded default workload)"
    )
    parser.add_argument("--episodes", type=int, default=None, help="episodes (default: one per seed, or 3)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="reset seed per episode (default 0..episodes-1)"
    )
    parser.add_argument(
        "--fidelity", choices=("des", "fluid"), default="des", help="simulator fidelity (default des)"
    )
    parser.add_argument(
        "--windows", choices=("random", "held-out"), default="random", help="episode windows (default random)"
    )
    parser.add_argument("--horizon", type=int, default=None, help="decisions per episode (env default 120)")
    parser.add_argument("--model", default=None, help="model name (env default qwen2-7b)")
    parser.add_argument("--gpu", default=None, help="GPU name (env default a100)")
    parser.add_argument("--num-nodes", type=int, default=None, help="cluster nodes (env default 2)")
    parser.add_argument("--rate-scale", type=float, default=None, help="multiply the trace's request rate")
    parser.add_argument("--config", default=None, help="JSON object of further env config keys")
    parser.add_argument("--out", default=None, help="write episodes.csv/json, series.csv, summary.json here")
    parser.add_argument(
        "--start-from",
        default=None,
        help="saved models only: start episodes from this heuristic's deployment (e.g. operator-greedy)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_evaluate)


def _env_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config:
        try:
            loaded = json.loads(args.config)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config must be a JSON object, got {args.config!r}")
        config.update(loaded)
    for key, value in (
        ("horizon", args.horizon),
        ("model", args.model),
        ("gpu", args.gpu),
        ("num_nodes", args.num_nodes),
        ("trace_rate_scale", args.rate_scale),
    ):
        if value is not None:
            config[key] = value
    return config


def _resolve_trace(name: str | None) -> Any:
    """A registered name stays a name (the env loads it); anything else is loaded as a file."""
    if name is None:
        return None
    from opscale.traces import TRACE_NAMES, load_trace

    return name if name in TRACE_NAMES else load_trace(name)


def _evaluate(args: argparse.Namespace) -> int:
    from opscale.agents.evaluation import evaluate

    if args.episodes is not None and args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    result = evaluate(
        args.policy,
        args.env,
        trace=_resolve_trace(args.trace),
        episodes=args.episodes,
        seeds=args.seeds,
        fidelity=args.fidelity,
        env_config=_env_config(args),
        windows=args.windows,
        out_dir=args.out,
        progress=not (args.no_progress or args.json),
        policy_kwargs=None if args.start_from is None else {"start_from": args.start_from},
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    summary = result.summary
    n = len(result.episodes)
    print(
        f"policy {result.policy} on {result.env_id} ({result.fidelity}), {n} episode(s), seeds {[e.seed for e in result.episodes]}"
    )
    print(f"{'metric':<16} {'mean':>10} {'95% CI':>24}")
    for metric, label, fmt in _TABLE_ROWS:
        stats = summary[metric]
        interval = f"[{fmt.format(stats.ci95_low)}, {fmt.format(stats.ci95_high)}]"
        print(f"{label:<16} {fmt.format(stats.mean):>10} {interval:>24}")
    if args.out:
        print(f"wrote {args.out}/episodes.csv, episodes.json, series.csv, summary.json")
    return 0
