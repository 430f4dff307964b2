"""Benchmark trace loading: wall time of ``load_trace`` per named trace (median of repeats).

Run with ``python -m opscale.experiments.bench_traces [--repeats N] [--names ...]``. Each figure is
the median over ``repeats`` loads in this process (the first load, which also pays imports and a cold
page cache, is reported separately).
"""

from __future__ import annotations

import argparse
import statistics
import time

from opscale.traces import load_trace

#: Traces timed by default (ServeGen m-large: the default 1-hour window, about 1.1 M requests).
DEFAULT_NAMES = (
    "azure-conv",
    "azure-code",
    "mooncake-conv",
    "mooncake-synthetic",
    "default",
    "servegen-m-large",
)


def time_load(name: str, repeats: int) -> tuple[float, float, int]:
    """``(first_s, median_s, requests)`` for loading ``name`` ``repeats`` times after one first load."""
    start = time.perf_counter()
    trace = load_trace(name)
    first_s = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_trace(name)
        timings.append(time.perf_counter() - start)
    return first_s, statistics.median(timings), len(trace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES))
    args = parser.parse_args(argv)
    print(f"{'trace':<22} {'requests':>10} {'first load s':>13} {'median s':>9} {'M req/s':>8}")
    for name in args.names:
        first_s, median_s, requests = time_load(name, args.repeats)
        print(
            f"{name:<22} {requests:>10,} {first_s:>13.3f} {median_s:>9.3f} {requests / median_s / 1e6:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
