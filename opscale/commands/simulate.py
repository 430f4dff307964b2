"""``opscale simulate``: run a static deployment over a trace with the discrete-event engine.

Examples::

    opscale simulate --model llama-2-7b --gpu a100 --instances 2
    opscale simulate --model llama-2-70b --gpu a100 --trace azure-conv --duration 600 --instances 8 --tp 2 --pp 2
    opscale simulate --model qwen2-7b --gpu h100 --operator-level --replicas attention=2,ffn=3 --json
    opscale simulate --model llama-2-7b --gpu a100 --deployment deploy.json --out results/

``--out DIR`` writes ``requests.csv`` (one row per request), ``intervals.csv`` (one row per interval)
and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``opscale simulate``."""
    parser = subparsers.add_parser(
        "simulate",
        help="run a static deployment over a trace (discrete-event engine) and print the metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model catalog name (e.g. llama-2-7b, qwen2-7b)")
    parser.add_argument("--gpu", required=True, help="GPU catalog name (a100, h100, h200)")
    parser.add_argument(
        "--trace", default="default", help="trace name or file (default: the embedded default)"
    )
    parser.add_argument(
        "--deployment", type=Path, default=None, help="deployment JSON file (Deployment.to_json)"
    )
    parser.add_argument("--instances", type=int, default=1, help="model-level instances (default 1)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    parser.add_argument(
        "--pp", type=int, default=1, help="pipeline stages of a model-level instance (default 1)"
    )
    parser.add_argument(
        "--num-nodes", type=int, default=None, help="cluster nodes of 8 GPUs (default: just enough)"
    )
    parser.add_argument(
        "--operator-level", action="store_true", help="per-unit replica pools instead of instances"
    )
    parser.add_argument(
        "--replicas",
        default="",
        help="operator level: unit=N,... (units not named get --instances replicas each)",
    )
    parser.add_argument(
        "--batch-cap", type=int, default=None, help="batch cap / token budget in tokens, all units"
    )
    parser.add_argument(
        "--placement",
        default="pack",
        choices=["pack", "spread-gpu", "spread-node", "colocate"],  # Placement's values (lazy imports)
        help="operator-level placement",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="simulate the first S seconds of the trace"
    )
    parser.add_argument("--rate-scale", type=float, default=None, help="scale the arrival rate by X")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace and the simulator (default 0)")
    parser.add_argument("--interval", type=float, default=60.0, help="metrics interval in s (default 60)")
    parser.add_argument(
        "--overhead", default="modern", help="engine-overhead preset: modern, splitwise-vllm-2023, none"
    )
    parser.add_argument(
        "--clip-long", action="store_true", help="clip requests longer than the context limit (counted)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--out", type=Path, default=None, help="write requests.csv, intervals.csv, summary.json"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _parse_replicas(text: str) -> dict[str, int]:
    replicas: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep:
            raise ValueError(f"--replicas entry {part!r} is not unit=N")
        try:
            replicas[name.strip()] = int(count)
        except ValueError:
            raise ValueError(f"--replicas entry {part!r}: {count!r} is not an integer") from None
    return replicas


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _build_deployment(args: argparse.Namespace) -> Any:
    from opscale.sim.deployment import DEFAULT_TOKEN_BUDGET, Deployment
    from opscale.sim.hardware import get_gpu
    from opscale.sim.models import get_model

    model = get_model(args.model)
    if args.deployment is not None:
        deployment = Deployment.from_json(args.deployment.read_text())
        deployment.validate()
        if get_model(deployment.model).name != model.name:
            raise ValueError(f"--deployment is for model {deployment.model!r}, --model says {args.model!r}")
        if get_gpu(deployment.gpu).name != get_gpu(args.gpu).name:
            raise ValueError(f"--deployment is for GPU {deployment.gpu!r}, --gpu says {args.gpu!r}")
        return deployment
    if args.operator_level:
        replicas: dict[Any, int] = {unit: args.instances for unit in model.units}
        replicas.update(_parse_replicas(args.replicas))
        return Deployment.operator_level(
            model.name,
            args.gpu,
            replicas=replicas,
            tp=args.tp,
            batch_caps=args.batch_cap,
            placement=args.placement,
            num_nodes=args.num_nodes,
        )
    if args.replicas:
        raise ValueError("--replicas needs --operator-level")
    return Deployment.model_level(
        model.name,
        args.gpu,
        instances=args.instances,
        tp=args.tp,
        pp=args.pp,
        num_nodes=args.num_nodes,
        token_budget=args.batch_cap or DEFAULT_TOKEN_BUDGET,
    )


def _load_trace(args: argparse.Namespace) -> Any:
    import numpy as np

    from opscale.traces import load_trace

    options: dict[str, Any] = {}
    if args.trace == "default" and args.duration is not None:
        options["duration_s"] = args.duration
    trace = load_trace(args.trace, seed=args.seed, **options)
    if args.duration is not None and trace.duration_s > args.duration:
        trace = trace.window(trace.start_s, trace.start_s + args.duration)
    if args.rate_scale is not None:
        trace = trace.scale_rate(args.rate_scale, np.random.default_rng(args.seed))
    return trace


def _write_outputs(out: Path, simulator: Any, intervals: list[Any], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if simulator.records is not None:
        columns = simulator.records.columns()
        with (out / "requests.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in zip(*(column.tolist() for column in columns.values()), strict=True):
                writer.writerow(row)
    if intervals:
        names = [f.name for f in fields(intervals[0]) if f.name != "units"]
        with (out / "intervals.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            for interval in intervals:
                writer.writerow([getattr(interval, name) for name in names])


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [
        ("requests / completed", f"{summary['requests']} / {summary['completed']}"),
        ("simulated time", f"{summary['duration_s']:.1f} s"),
        ("SLO attainment", f"{summary['slo_attainment']:.1%}"),
        ("TTFT mean / p99", f"{summary['ttft_mean_s']:.3f} / {summary['ttft_p99_s']:.3f} s"),
        ("TBT p99 (per-request statistic)", f"{summary['tbt_p99_s'] * 1e3:.1f} ms"),
        ("end-to-end mean", f"{summary['e2e_mean_s']:.2f} s"),
        (
            "throughput",
            f"{summary['throughput_requests_per_s']:.2f} req/s, {summary['throughput_tokens_per_s']:.0f} tok/s",
        ),
        ("goodput", f"{summary['goodput_requests_per_s']:.2f} req/s"),
        ("preemptions", f"{summary['preemptions']}"),
        ("clipped / rejected requests", f"{summary['clipped_requests']} / {summary['rejected_requests']}"),
        ("GPUs mean / peak", f"{summary['gpus_mean']:.1f} / {summary['gpus_peak']}"),
        ("GPU-hours", f"{summary['gpu_seconds'] / 3600:.2f}"),
        ("energy", f"{summary['energy_j'] / 3.6e6:.3f} kWh ({summary['energy_j']:.0f} J)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    utilisation = ", ".join(f"{unit} {value:.0%}" for unit, value in summary["unit_utilisation"].items())
    print(f"{'unit utilisation':<{width}}  {utilisation}")


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from opscale.sim.config import EngineOverheadPreset, SimConfig
    from opscale.sim.engine import DiscreteEventSimulator
    from opscale.sim.hardware import ClusterSpec
    from opscale.sim.models import get_model

    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    try:
        preset = EngineOverheadPreset(args.overhead)
    except ValueError:
        valid = ", ".join(p.value for p in EngineOverheadPreset)
        raise ValueError(f"unknown --overhead {args.overhead!r}; valid: {valid}") from None
    deployment = _build_deployment(args)
    model = get_model(deployment.model)
    trace = _load_trace(args)
    cluster = ClusterSpec.homogeneous(deployment.gpu, deployment.num_nodes)
    config = SimConfig(
        engine_overhead=preset, clip_long_requests=args.clip_long, record_requests=args.out is not None
    )
    simulator = DiscreteEventSimulator(cluster, model, deployment, trace, config=config, seed=args.seed)
    horizon_s = max(trace.end_s, args.interval)
    intervals = []
    with tqdm(
        total=round(horizon_s),
        unit="sim-s",
        disable=args.quiet or args.json or horizon_s < 600,
        desc="simulating",
    ) as progress:
        # after the last arrival, keep going until every request finished (at most a day more)
        while not simulator.finished and simulator.now_s < horizon_s + 86400.0:
            before = simulator.now_s
            intervals.append(simulator.advance(args.interval))
            progress.update(
                min(round(simulator.now_s), round(horizon_s)) - min(round(before), round(horizon_s))
            )
    summary = _jsonable(asdict(simulator.summary()))
    summary["energy_kwh"] = simulator.summary().energy_kwh
    summary["deployment"] = deployment.to_dict()
    summary["trace"] = trace.name
    summary["clipped_requests"] = simulator.clipped_requests
    summary["rejected_requests"] = simulator.rejected_requests
    if args.out is not None:
        _write_outputs(args.out, simulator, intervals, summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        if args.out is not None:
            print(
                f"wrote {args.out / 'summary.json'}, {args.out / 'requests.csv'}, {args.out / 'intervals.csv'}"
            )
    return 0
