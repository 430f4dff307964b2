"""Speed of the fluid fidelity: ``advance(5.0)`` calls per second, and its independence of the request rate.

Runs :class:`opscale.sim.fluid.FluidSimulator` over a synthetic Poisson trace (lognormal lengths) for a
model-level and an operator-level deployment at a base rate and at 10x that rate (on 10x the GPUs),
and prints calls per second. The fluid model's cost per call must not grow with the request rate::

    python -m opscale.experiments.bench_fluid [--steps 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from opscale.experiments.fidelity_report import SHARED_GPU_REPLICAS
from opscale.sim.deployment import Deployment
from opscale.sim.fluid import FluidSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.traces.trace import RequestTrace

__all__ = ["BenchCase", "main", "measure", "poisson_trace"]


def poisson_trace(rate_per_s: float, duration_s: float, seed: int) -> RequestTrace:
    """Poisson arrivals with lognormal prompt (median 800) and output (median 150) lengths."""
    rng = np.random.default_rng(seed)
    count = int(rng.poisson(rate_per_s * duration_s))
    arrival_s = np.sort(rng.uniform(0.0, duration_s, count))
    prompt = np.clip(rng.lognormal(np.log(800.0), 0.8, count), 1, 3000).astype(np.int64)
    output = np.clip(rng.lognormal(np.log(150.0), 0.8, count), 1, 1000).astype(np.int64)
    return RequestTrace(
        arrival_s, prompt, output, name=f"poisson-{rate_per_s:g}", time_range_s=(0.0, duration_s)
    )


@dataclass(frozen=True)
class BenchCase:
    """One benchmark configuration.

    :param label: name printed in the table.
    :param deployment: what to simulate.
    :param rate_per_s: Poisson request rate.
    """

    label: str
    deployment: Deployment
    rate_per_s: float


def measure(case: BenchCase, steps: int, repeats: int, interval_s: float = 5.0) -> tuple[float, int]:
    """Best-of-``repeats`` ``advance(interval_s)`` calls per second, and the requests simulated."""
    trace = poisson_trace(case.rate_per_s, steps * interval_s, seed=0)
    cluster = ClusterSpec.homogeneous(case.deployment.gpu, case.deployment.num_nodes)
    best = 0.0
    warm_up = FluidSimulator(cluster, case.deployment.model, case.deployment, trace)
    for _ in range(min(steps, 200)):
        warm_up.advance(interval_s)
    for _ in range(repeats):
        simulator = FluidSimulator(cluster, case.deployment.model, case.deployment, trace)
        start = time.perf_counter()
        for _ in range(steps):
            simulator.advance(interval_s)
        best = max(best, steps / (time.perf_counter() - start))
    return best, len(trace)


def cases() -> list[BenchCase]:
    """Llama-2-7B on A100: 2 instances at 4 req/s, and 20 instances at 40 req/s; operator-level alike."""
    small_operator = SHARED_GPU_REPLICAS
    large_operator = {unit: 10 * count for unit, count in small_operator.items()}
    return [
        BenchCase("model-level, 2 instances", Deployment.model_level("llama-2-7b", "a100", instances=2), 4.0),
        BenchCase(
            "model-level, 20 instances (10x rate)",
            Deployment.model_level("llama-2-7b", "a100", instances=20),
            40.0,
        ),
        BenchCase(
            "operator-level, 9 replicas",
            Deployment.operator_level("llama-2-7b", "a100", replicas=small_operator),
            4.0,
        ),
        BenchCase(
            "operator-level, 90 replicas (10x rate)",
            Deployment.operator_level("llama-2-7b", "a100", replicas=large_operator),
            40.0,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="advance(5.0) calls per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per case (best is reported)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1, got {args.steps}, {args.repeats}")
    print(f"{'case':<42} {'req/s':>6} {'requests':>9} {'advance/s':>10} {'us/call':>8}")
    for case in cases():
        calls_per_s, requests = measure(case, args.steps, args.repeats)
        print(
            f"{case.label:<42} {case.rate_per_s:>6.0f} {requests:>9d} {calls_per_s:>10.0f} {1e6 / calls_per_s:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
