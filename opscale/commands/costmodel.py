"""``opscale costmodel``: score the operator cost model against real profiles, show a model's units.

Examples::

    opscale costmodel validate
    opscale costmodel validate --profiles ../shared/reference/vidur_profiles/data/profiling --json
    opscale costmodel show llama-2-70b --gpu h100 --tp 4 --tokens 512 --context 8192
    opscale costmodel show qwen2-57b-a14b --gpu a100 --tp 2 --tokens 1 --context 4096 --json
    opscale costmodel bench --model llama-2-70b --gpu h100 --tp 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``opscale costmodel`` and its sub-commands."""
    parser = subparsers.add_parser("costmodel", help="validate the operator cost model, show per-unit costs")
    actions = parser.add_subparsers(dest="costmodel_command", metavar="ACTION", required=True)

    validate = actions.add_parser(
        "validate", help="error of the analytic model against the Vidur profiles (MAPE, p90 APE, count)"
    )
    validate.add_argument(
        "--profiles",
        type=Path,
        default=None,
        help="Vidur data/profiling directory (default: ../shared/reference/vidur_profiles/data/profiling)",
    )
    validate.add_argument(
        "--splitwise",
        type=Path,
        default=None,
        help="SplitwiseSim perf_model.csv for the power check (default: the reference copy; skipped if absent)",
    )
    validate.add_argument("--json", action="store_true", help="print JSON instead of tables")
    validate.set_defaults(func=_validate)

    show = actions.add_parser("show", help="per-unit latency, FLOPs, bytes and bound of one batch")
    show.add_argument("model", help="model name (e.g. llama-2-70b, qwen2-7b, meta-llama/Llama-2-70b-hf)")
    show.add_argument("--gpu", required=True, help="GPU name (a100, h100, h200)")
    show.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    show.add_argument("--tokens", type=int, required=True, help="tokens in the batch")
    show.add_argument(
        "--context",
        type=int,
        default=0,
        help="cached context before the batch (prefill chunk) or KV length read (decode, --tokens 1)",
    )
    show.add_argument(
        "--profiles",
        type=Path,
        default=None,
        help="use the profile-table backend on this Vidur directory instead of the roofline",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=_show)

    bench = actions.add_parser("bench", help="time the cost model's hot-path calls (what the simulators pay)")
    bench.add_argument("--model", default="llama-2-70b", help="model name (default llama-2-70b)")
    bench.add_argument("--gpu", default="h100", help="GPU name (default h100)")
    bench.add_argument("--tp", type=int, default=4, help="tensor-parallel degree (default 4)")
    bench.add_argument("--calls", type=int, default=20000, help="calls per timed loop (default 20000)")
    bench.set_defaults(func=_bench)


def _validate(args: argparse.Namespace) -> int:
    from opscale.paths import reference_dir
    from opscale.sim.calibration import (
        SPLITWISE_PERF_MODEL,
        build_observations,
        check_power,
        check_targets,
        default_profiles_dir,
        load_splitwise_runs,
        power_errors,
        table_interpolation_rows,
        validate,
    )
    from opscale.sim.costmodel import default_cost_model
    from opscale.sim.costmodel_coefficients import FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS
    from opscale.sim.power import PowerModel, PowerPreset
    from opscale.sim.profile_table import VidurProfiles

    profiles_dir = args.profiles or default_profiles_dir()
    profiles = VidurProfiles.load(profiles_dir)
    rows = validate(build_observations(profiles), FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS)
    targets = check_targets(rows)
    rows += table_interpolation_rows(profiles)
    power: dict[str, dict[str, float]] = {}
    splitwise = args.splitwise or reference_dir() / SPLITWISE_PERF_MODEL
    if args.splitwise is not None or splitwise.is_file():
        runs = load_splitwise_runs(splitwise)
        for preset in PowerPreset:
            checks = check_power(runs, default_cost_model(), PowerModel.from_preset(preset))
            power[preset.value] = power_errors(checks)

    if args.json:
        payload = {
            "profiles": str(profiles_dir),
            "rows": [dataclasses.asdict(row) for row in rows],
            "targets": [{**dataclasses.asdict(t), "ok": t.ok} for t in targets],
            "power": power,
        }
        print(json.dumps(payload, indent=2))
        return 0 if all(t.ok for t in targets) else 1

    print(
        f"cost model vs Vidur profiles in {profiles_dir} (per layer, per TP worker; APE = |pred-meas|/meas)"
    )
    print(
        f"{'gpu':5s} {'operator':26s} {'scope':14s} {'count':>6s} {'MAPE':>7s} {'p90 APE':>8s} {'max APE':>8s}"
    )
    for row in rows:
        print(
            f"{row.gpu:5s} {row.operator:26s} {row.scope:14s} {row.count:6d} "
            f"{row.mape:7.1%} {row.p90_ape:8.1%} {row.max_ape:8.1%}"
        )
    print("\ntargets (issue 3)")
    for target in targets:
        print(
            f"  {target.name:52s} {target.value:7.3f} <= {target.limit:5.3f}  {'ok' if target.ok else 'MISSED'}"
        )
    if power:
        print("\npower vs SplitwiseSim measured per-GPU power (Llama-2-70B on A100, TP 2/4/8)")
        for preset, errors in power.items():
            print(
                f"  {preset:22s} runs={int(errors['count'])}  average-power MAPE={errors['average_mape']:.1%}  "
                f"peak-power MAPE={errors['peak_mape']:.1%}"
            )
    return 0 if all(t.ok for t in targets) else 1


def _show(args: argparse.Namespace) -> int:
    from opscale.sim.costmodel import CostModel, ProfileTableCostModel, default_cost_model, unit_breakdown
    from opscale.sim.hardware import get_gpu
    from opscale.sim.models import get_model

    model = get_model(args.model)
    gpu = get_gpu(args.gpu)
    model.validate_tp(args.tp)
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.context < 0:
        raise ValueError(f"--context must be >= 0, got {args.context}")
    cost_model: CostModel = default_cost_model()
    backend = "roofline"
    if args.profiles is not None:
        cost_model = ProfileTableCostModel(args.profiles)
        backend = f"profile table {args.profiles} (roofline where it has no rows)"
    rows = unit_breakdown(cost_model, model, gpu, args.tp, args.tokens, args.context)
    total_s = sum(row.time_s for row in rows)
    if args.json:
        payload = {
            "model": model.name,
            "gpu": gpu.name,
            "tp": args.tp,
            "tokens": args.tokens,
            "context": args.context,
            "backend": backend,
            "units": [{**dataclasses.asdict(row), "unit": row.unit.value} for row in rows],
            "total_s": total_s,
        }
        print(json.dumps(payload, indent=2))
        return 0
    phase = "decode" if args.tokens == 1 else "prefill chunk"
    print(
        f"{model.name} on {gpu.long_name}, TP {args.tp}, {args.tokens} tokens ({phase}), context {args.context}; "
        f"backend: {backend}; all layers, one TP group"
    )
    print(
        f"{'unit':15s} {'latency ms':>11s} {'of which TP comm':>17s} {'GFLOP':>11s} {'GB moved':>10s} {'bound':>8s}"
    )
    for row in rows:
        print(
            f"{row.unit.value:15s} {row.time_s * 1e3:11.3f} {row.collective_s * 1e3:17.3f} "
            f"{row.flops / 1e9:11.2f} {row.bytes_moved / 1e9:10.3f} {row.bound:>8s}"
        )
    print(f"{'total':15s} {total_s * 1e3:11.3f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from opscale.sim.costmodel import AttentionBatch, default_cost_model
    from opscale.sim.hardware import get_gpu
    from opscale.sim.models import UnitKind, get_model

    model, gpu = get_model(args.model), get_gpu(args.gpu)
    model.validate_tp(args.tp)
    if args.calls < 1:
        raise ValueError(f"--calls must be >= 1, got {args.calls}")
    cost_model = default_cost_model()
    mlp = UnitKind.MOE if model.is_moe else UnitKind.FFN
    calls = args.calls

    def per_call_us(action: Any, repeats: int) -> float:
        start = time.perf_counter()
        for index in range(repeats):
            action(index)
        return (time.perf_counter() - start) / repeats * 1e6

    first = per_call_us(lambda i: cost_model.unit_time_s(model, mlp, gpu, args.tp, 1 + i), calls)
    memo = per_call_us(lambda i: cost_model.unit_time_s(model, mlp, gpu, args.tp, 1 + i % 512), calls)
    batch = AttentionBatch.from_requests([4096] * 32, [(512, 2048)])
    attention = per_call_us(lambda i: cost_model.attention_time_s(model, gpu, args.tp, batch), calls)
    tokens = np.arange(131073, dtype=np.float64)
    array_us = per_call_us(
        lambda i: cost_model.unit_time_s_array(model, mlp, gpu, args.tp, tokens), min(calls, 20)
    )
    print(f"{model.name} {mlp.value} on {gpu.name} TP {args.tp}, {calls} calls per loop")
    print(f"  unit_time_s, first call per token count   {first:9.1f} us/call")
    print(f"  unit_time_s, memoised                     {memo:9.1f} us/call")
    print(f"  attention_time_s (32 decodes + 1 chunk)   {attention:9.1f} us/call")
    print(f"  unit_time_s_array, 131,073 token counts   {array_us / 1e3:9.2f} ms/call")
    return 0
