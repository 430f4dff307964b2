"""``opscale trace``: list the named traces, print a trace's statistics, plot it.

Examples::

    opscale trace list
    opscale trace stats azure-conv --json
    opscale trace stats default --seed 3 --duration-s 7200
    opscale trace stats servegen-m-large --day 2 --hour 14 --rate-scale 0.1
    opscale trace plot mooncake-conv -o mooncake.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

#: Loader options exposed as flags: (flag, option name, type, help).
_OPTION_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--duration-s", "duration_s", float, "length of a generated trace or ServeGen window (s)"),
    ("--rate-scale", "rate_scale", float, "rate multiplier (embedded default, ServeGen)"),
    ("--start-s", "start_s", float, "ServeGen window start, seconds from 00:00 of day 0"),
    ("--day", "day", int, "ServeGen window day (0-based)"),
    ("--hour", "hour", float, "ServeGen window hour of the day"),
)


def _add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", help="a registered trace name (see 'opscale trace list') or a trace file path"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for traces that draw random numbers (default 0)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding the public traces (default: $OPSCALE_DATA, else ../shared/traces)",
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="drop malformed rows (counted) instead of failing"
    )
    for flag, dest, kind, text in _OPTION_FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def add_parser(subparsers: Any) -> None:
    """Register ``opscale trace`` and its sub-commands."""
    parser = subparsers.add_parser("trace", help="inspect request traces (list, stats, plot)")
    actions = parser.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    list_parser = actions.add_parser("list", help="list the named traces and whether their data is found")
    list_parser.add_argument("--data-dir", default=None, help="folder holding the public traces")
    list_parser.set_defaults(func=_list)
    stats_parser = actions.add_parser(
        "stats", help="print requests, span, rates, IAT CV and length percentiles"
    )
    _add_trace_arguments(stats_parser)
    stats_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats_parser.set_defaults(func=_stats)
    plot_parser = actions.add_parser("plot", help="plot the rate over time and the length histograms")
    _add_trace_arguments(plot_parser)
    plot_parser.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    plot_parser.set_defaults(func=_plot)


def _load(args: argparse.Namespace) -> Any:
    from opscale.traces import load_trace

    options: dict[str, Any] = {
        dest: getattr(args, dest) for _, dest, _, _ in _OPTION_FLAGS if getattr(args, dest) is not None
    }
    if args.skip_bad_rows:
        options["skip_bad_rows"] = True
    return load_trace(args.name, seed=args.seed, data_dir=args.data_dir, **options)


def _json_safe(value: Any) -> Any:
    """Replace NaN / inf (not valid JSON) by ``None``, recursively."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _list(args: argparse.Namespace) -> int:
    from opscale.paths import data_dir
    from opscale.traces import NAMED_TRACES

    root = Path(args.data_dir) if args.data_dir else data_dir()
    print(f"data directory: {root}")
    for spec in NAMED_TRACES.values():
        found = (
            "embedded"
            if spec.relative_path is None
            else ("found" if (root / spec.relative_path).exists() else "MISSING")
        )
        print(f"  {spec.name:<22} {found:<8} {spec.description}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from opscale.traces import format_stats, trace_stats

    trace = _load(args)
    stats = trace_stats(trace)
    if args.json:
        print(json.dumps(_json_safe({**stats, "notes": list(trace.notes)}), indent=2))
    else:
        print(format_stats(stats))
        for note in trace.notes:
            print(f"note: {note}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    trace = _load(args)
    if not len(trace):
        raise ValueError(f"trace {trace.name!r} has no requests to plot")
    figure, (rate_axis, prompt_axis, output_axis) = plt.subplots(3, 1, figsize=(9, 10))
    # A bin of about 1/120 of the span (at least 1 s) shows both bursts and the slow trend.
    bin_s = max(1.0, trace.duration_s / 120)
    bin_start_s, rate_per_s = trace.rate_curve(bin_s)
    minute_start_s, minute_rate_per_s = trace.rate_curve(60.0)
    rate_axis.step((bin_start_s - trace.start_s) / 60, rate_per_s, where="post", label=f"{bin_s:.0f}-s bins")
    rate_axis.step((minute_start_s - trace.start_s) / 60, minute_rate_per_s, where="post", label="60-s bins")
    rate_axis.set(
        xlabel="time (min)", ylabel="arrival rate (req/s)", title=f"{trace.name}: {len(trace):,} requests"
    )
    rate_axis.legend()
    for axis, tokens, label in (
        (prompt_axis, trace.prompt_tokens, "prompt tokens"),
        (output_axis, trace.output_tokens, "output tokens"),
    ):
        bins = np.logspace(0, np.log10(max(2, int(tokens.max()))), 60)
        axis.hist(tokens, bins=bins)
        axis.set(xscale="log", xlabel=label, ylabel="requests")
        axis.axvline(
            float(np.median(tokens)), color="k", linestyle="--", label=f"p50 {np.median(tokens):,.0f}"
        )
        axis.axvline(
            float(np.percentile(tokens, 99)),
            color="r",
            linestyle=":",
            label=f"p99 {np.percentile(tokens, 99):,.0f}",
        )
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    plt.close(figure)
    print(f"wrote {args.output}")
    return 0
