"""Speed and memory of the discrete-event engine (issue 5's targets).

Workload: Llama-2-70B on A100s, 10,000 requests with Azure-conv-like lengths (the embedded default
trace's length distributions, fitted to Azure LLM 2023 conv), Poisson arrivals at 6 req/s, requests
clipped to the 4,096-token context (counted). Deployments on the same 32 GPUs:

* ``model``: 8 monolithic instances at TP2-PP2 (target >= 300 simulated s per wall s, < 500 MB);
* ``operator``: the same units as per-unit pools, 8 TP2 replicas of every unit, attention/FFN
  disaggregated: in each group of 4 GPUs one TP2 pair holds FFN, embed, norm and LM head, the other
  attention (with the KV cache), QKV and O projections (target >= 100 simulated s per wall s).

Prints simulated seconds per wall second, events, peak RSS and (``--tracemalloc``, a second run)
the peak Python heap. Run: ``python -m opscale.experiments.bench_sim``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from opscale.sim.config import SimConfig
from opscale.sim.deployment import Deployment
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import UnitKind
from opscale.traces.default import default_output_lengths, default_prompt_lengths
from opscale.traces.trace import RequestTrace

MODEL = "llama-2-70b"
GPU = "a100"


def bench_trace(requests: int, rate_per_s: float, seed: int) -> RequestTrace:
    """Poisson arrivals at ``rate_per_s`` with the default trace's (Azure-conv-fitted) lengths."""
    rng = np.random.default_rng(seed)
    arrival_s = np.cumsum(rng.exponential(1.0 / rate_per_s, requests))
    return RequestTrace(
        arrival_s=arrival_s,
        prompt_tokens=default_prompt_lengths().sample(requests, rng),
        output_tokens=default_output_lengths().sample(requests, rng),
        name=f"bench-poisson-{rate_per_s:g}",
    )


def bench_deployment(kind: str) -> Deployment:
    """The model-level (8 x TP2-PP2) or operator-level (8 TP2 replicas per unit) deployment on 32 A100s."""
    if kind == "model":
        return Deployment.model_level(MODEL, GPU, instances=8, tp=2, pp=2, num_nodes=4)
    if kind == "operator":
        # per 4-GPU group: FFN (+ embed, norm, LM head) on one TP2 pair, attention + QKV + O on the other
        # (attention/FFN disaggregation; activations cross NVLink per layer)
        ffn_side = [(4 * i, 4 * i + 1) for i in range(8)]
        attention_side = [(4 * i + 2, 4 * i + 3) for i in range(8)]
        sides = {
            UnitKind.EMBED: ffn_side,
            UnitKind.NORM: ffn_side,
            UnitKind.FFN: ffn_side,
            UnitKind.LM_HEAD: ffn_side,
            UnitKind.QKV_PROJ: attention_side,
            UnitKind.ATTENTION: attention_side,
            UnitKind.O_PROJ: attention_side,
        }
        return Deployment.operator_level(
            MODEL, GPU, replicas={u: 8 for u in sides}, tp=2, gpus=sides, num_nodes=4
        )
    raise ValueError(f"unknown deployment kind {kind!r}; valid: model, operator")


@dataclass
class BenchResult:
    kind: str
    simulated_s: float
    wall_s: float
    cpu_s: float
    completed: int
    requests: int
    slo_attainment: float
    e2e_mean_s: float
    peak_rss_mb: float
    peak_heap_mb: float | None = None

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return self.simulated_s / self.wall_s

    @property
    def cpu_speed(self) -> float:
        """Simulated seconds per CPU second (what one dedicated core gives on a shared machine)."""
        return self.simulated_s / self.cpu_s


def run_once(
    kind: str, trace: RequestTrace, interval_s: float, record_requests: bool
) -> tuple[float, float, DiscreteEventSimulator]:
    """Build and run one simulation; returns (wall s, CPU s of this process, simulator)."""
    deployment = bench_deployment(kind)
    cluster = ClusterSpec.homogeneous(GPU, deployment.num_nodes)
    config = SimConfig(clip_long_requests=True, record_requests=record_requests)
    start, start_cpu = time.perf_counter(), time.process_time()
    simulator = DiscreteEventSimulator(cluster, MODEL, deployment, trace, config=config)
    simulator.run_to_completion(interval_s)
    return time.perf_counter() - start, time.process_time() - start_cpu, simulator


def bench(kind: str, trace: RequestTrace, interval_s: float, measure_heap: bool) -> BenchResult:
    wall_s, cpu_s, simulator = run_once(kind, trace, interval_s, record_requests=True)
    summary = simulator.summary()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        1024.0 if sys.platform != "darwin" else 1024.0**2
    )
    result = BenchResult(
        kind=kind,
        simulated_s=simulator.now_s,
        wall_s=wall_s,
        cpu_s=cpu_s,
        completed=summary.completed,
        requests=summary.requests,
        slo_attainment=summary.slo_attainment,
        e2e_mean_s=summary.e2e_mean_s,
        peak_rss_mb=peak_rss_mb,
    )
    if measure_heap:
        tracemalloc.start()
        run_once(kind, trace, interval_s, record_requests=True)
        result.peak_heap_mb = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Discrete-event engine speed benchmark (issue 5 targets).")
    parser.add_argument("--kind", choices=["model", "operator", "both"], default="both")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=6.0, help="Poisson arrival rate, req/s")
    parser.add_argument("--interval", type=float, default=60.0, help="control interval, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="second run under tracemalloc for peak heap"
    )
    args = parser.parse_args(argv)
    trace = bench_trace(args.requests, args.rate, args.seed)
    kinds = ["model", "operator"] if args.kind == "both" else [args.kind]
    targets = {"model": 300.0, "operator": 100.0}
    print(
        "| deployment | requests | simulated s | wall s | CPU s | sim s / wall s | sim s / CPU s (target) "
        "| peak RSS MB | peak heap MB | SLO | e2e mean s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        r = bench(kind, trace, args.interval, args.tracemalloc)
        heap = "-" if r.peak_heap_mb is None else f"{r.peak_heap_mb:.0f}"
        print(
            f"| {kind} | {r.completed}/{r.requests} | {r.simulated_s:.0f} | {r.wall_s:.2f} | {r.cpu_s:.2f} | "
            f"{r.speed:.0f} | {r.cpu_speed:.0f} (>= {targets[kind]:.0f}) | {r.peak_rss_mb:.0f} | {heap} | "
            f"{r.slo_attainment:.1%} | "
            f"{r.e2e_mean_s:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
