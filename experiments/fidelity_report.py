"""Fluid vs discrete-event agreement: the same deployments and traces through both fidelities.

For a model-level and an operator-level deployment of Llama-2-7B on A100s, the script measures the
deployment's capacity with the discrete-event engine (completions per second under overload), then
replays steady Poisson traces (lengths of the embedded Azure-conv default) at 30 / 60 / 90 % of it
through both fidelities, plus an overload (130 %) and a burst (60 % with a 3x surge for 60 s), and
prints one Markdown table: SLO attainment, GPUs, energy, mean / p99 TTFT, mean / p99 TBT, and whether
the steady rows meet the targets (SLO within 5 points, GPUs identical, energy within 10 %, mean TTFT
and TBT within 20 %)::

    python -m opscale.experiments.fidelity_report [--duration 600] [--seed 0] [--seeds 1]

With ``--seeds N`` every row is the mean over ``N`` traces (seeds ``seed`` ..), the same traces through
both fidelities: near saturation a single window is too noisy to judge the model (:func:`mean_result`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from opscale.sim.deployment import Deployment
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.fluid import FluidSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.sim.metrics import IntervalMetrics
from opscale.sim.simulator import ServingSimulator
from opscale.traces.default import default_output_lengths, default_prompt_lengths
from opscale.traces.synthetic import StepRate, synthetic_trace
from opscale.traces.trace import RequestTrace

__all__ = [
    "AGREEMENT_TARGETS",
    "SHARED_GPU_REPLICAS",
    "AgreementCase",
    "FidelityResult",
    "agreement_cases",
    "mean_result",
    "measure_capacity",
    "poisson_trace",
    "run_fidelity",
    "within_targets",
]

#: Targets of issue 6 for steady loads: SLO points, energy and latency relative gaps.
AGREEMENT_TARGETS = {"slo_points": 5.0, "energy_relative": 0.10, "ttft_relative": 0.20, "tbt_relative": 0.20}
#: Replicas per unit of the operator-level Llama-2-7B example: two attention streams and two FFN
#: replicas, one replica of every other unit (``pack`` puts them all on one GPU).
SHARED_GPU_REPLICAS: dict[str, int] = {
    "embed": 1,
    "norm": 1,
    "qkv_proj": 1,
    "attention": 2,
    "o_proj": 1,
    "ffn": 2,
    "lm_head": 1,
}
#: Control interval of every run, s.
INTERVAL_S = 5.0
#: Extra simulated time after the last arrival so in-flight requests finish, s.
DRAIN_S = 60.0

SimulatorClass = Callable[..., ServingSimulator]


@dataclass(frozen=True)
class AgreementCase:
    """A deployment compared across fidelities.

    :param label: name in the table.
    :param deployment: the deployment (its model, GPU type and node count define the cluster).
    """

    label: str
    deployment: Deployment

    @property
    def cluster(self) -> ClusterSpec:
        return ClusterSpec.homogeneous(self.deployment.gpu, self.deployment.num_nodes)


def agreement_cases() -> list[AgreementCase]:
    """Llama-2-7B on one A100 node: two model-level instances; an operator-level deployment with two
    attention streams and two FFN replicas (the default ``pack`` placement co-locates everything);
    the model-level deployment as operator-level chains (every unit's replica ``k`` on GPU ``k``, the
    layout ``operator-greedy`` falls back to); two streams on two GPUs sharing one replica of every
    other unit, the FFN's at TP 2 over both GPUs (a shared pool of a small closed population, and
    a TP call slowed by sharing on one GPU of its group, as in a per-unit MoE plan)."""
    operator_replicas = dict(SHARED_GPU_REPLICAS)
    chain_units = tuple(operator_replicas)
    return [
        AgreementCase("model-level 2x(TP1)", Deployment.model_level("llama-2-7b", "a100", instances=2)),
        AgreementCase(
            "operator-level", Deployment.operator_level("llama-2-7b", "a100", replicas=operator_replicas)
        ),
        AgreementCase(
            "operator-level chains 2x(TP1)",
            Deployment.operator_level(
                "llama-2-7b",
                "a100",
                replicas=dict.fromkeys(chain_units, 2),
                gpus={unit: [(0,), (1,)] for unit in chain_units},
            ),
        ),
        AgreementCase(
            "operator-level shared TP-2 FFN",
            Deployment.operator_level(
                "llama-2-7b",
                "a100",
                replicas={**dict.fromkeys(chain_units, 1), "attention": 2},
                tp={"ffn": 2},
                gpus={
                    "embed": [(0,)],
                    "norm": [(1,)],
                    "qkv_proj": [(0,)],
                    "attention": [(0,), (1,)],
                    "o_proj": [(1,)],
                    "ffn": [(0, 1)],
                    "lm_head": [(1,)],
                },
            ),
        ),
    ]


def poisson_trace(
    rate_per_s: float,
    duration_s: float,
    seed: int,
    *,
    surge: tuple[float, float, float] | None = None,
    max_context: int = 4096,
) -> RequestTrace:
    """Poisson arrivals at ``rate_per_s`` with the default (Azure-conv) length distributions, clipped
    to ``max_context`` tokens (Llama-2's limit) by :meth:`RequestTrace.truncate_lengths`.

    :param surge: optional ``(start_s, end_s, factor)``: the rate is multiplied by ``factor`` inside.
    """
    rate: float | StepRate = rate_per_s
    if surge is not None:
        start, end, factor = surge
        rate = StepRate((0.0, start, end), (rate_per_s, rate_per_s * factor, rate_per_s))
    trace = synthetic_trace(
        rate,
        duration_s,
        default_prompt_lengths(),
        default_output_lengths(),
        np.random.default_rng(seed),
        name="poisson",
    )
    return trace.truncate_lengths(max_context, policy="clip")


@dataclass(frozen=True)
class FidelityResult:
    """Whole-run figures of one fidelity on one trace (interval-weighted where the summary lacks them).

    :param slo_attainment: share of decided requests within the SLO.
    :param gpus_peak: most GPUs powered.
    :param energy_j: energy over the run (trace + drain).
    :param ttft_mean_s: mean TTFT of completed requests (run summary).
    :param ttft_p99_s: run p99 TTFT.
    :param tbt_mean_s: mean over completed requests of their mean gap.
    :param tbt_p99_s: run p99 of the per-request TBT statistic.
    :param wall_s: wall-clock seconds the run took.
    """

    slo_attainment: float
    gpus_peak: int
    energy_j: float
    ttft_mean_s: float
    ttft_p99_s: float
    tbt_mean_s: float
    tbt_p99_s: float
    wall_s: float


def mean_result(results: Sequence[FidelityResult]) -> FidelityResult:
    """The mean of each figure over runs on different traces (the most GPUs: the peak over them).

    Near saturation one window's mean TTFT is set by whether a long busy period falls in it (the
    engine's ranges 0.23-0.63 s over six 300-s windows at 90 % load): agreement in expectation is
    judged on means over several seeds, paired (both fidelities replay the same traces).
    """
    if not results:
        raise ValueError("mean_result needs at least one result")
    return FidelityResult(
        slo_attainment=float(np.mean([r.slo_attainment for r in results])),
        gpus_peak=max(r.gpus_peak for r in results),
        energy_j=float(np.mean([r.energy_j for r in results])),
        ttft_mean_s=float(np.mean([r.ttft_mean_s for r in results])),
        ttft_p99_s=float(np.mean([r.ttft_p99_s for r in results])),
        tbt_mean_s=float(np.mean([r.tbt_mean_s for r in results])),
        tbt_p99_s=float(np.mean([r.tbt_p99_s for r in results])),
        wall_s=float(np.mean([r.wall_s for r in results])),
    )


def _weighted(intervals: list[IntervalMetrics], value: str, weight: str) -> float:
    weights = np.array([getattr(m, weight) for m in intervals], dtype=np.float64)
    values = np.array([getattr(m, value) for m in intervals], dtype=np.float64)
    return float(weights @ values / weights.sum()) if weights.sum() > 0 else 0.0


def run_fidelity(
    simulator_class: SimulatorClass, case: AgreementCase, trace: RequestTrace, duration_s: float
) -> FidelityResult:
    """Replay ``trace`` (``duration_s`` long, then :data:`DRAIN_S`) through one fidelity."""
    simulator = simulator_class(case.cluster, case.deployment.model, case.deployment, trace)
    start = time.perf_counter()
    intervals = [simulator.advance(INTERVAL_S) for _ in range(round((duration_s + DRAIN_S) / INTERVAL_S))]
    wall_s = time.perf_counter() - start
    summary = simulator.summary()
    return FidelityResult(
        slo_attainment=summary.slo_attainment,
        gpus_peak=summary.gpus_peak,
        energy_j=summary.energy_j,
        ttft_mean_s=summary.ttft_mean_s,
        ttft_p99_s=summary.ttft_p99_s,
        tbt_mean_s=_weighted(intervals, "tbt_mean_s", "completions"),
        tbt_p99_s=summary.tbt_p99_s,
        wall_s=wall_s,
    )


def measure_capacity(
    simulator_class: SimulatorClass, case: AgreementCase, *, probe_rate_per_s: float, seed: int = 0
) -> float:
    """Completions per second in the second half of a 100-s overload at ``probe_rate_per_s``."""
    trace = poisson_trace(probe_rate_per_s, 100.0, seed)
    simulator = simulator_class(case.cluster, case.deployment.model, case.deployment, trace)
    intervals = [simulator.advance(INTERVAL_S) for _ in range(20)]
    return sum(m.completions for m in intervals[10:]) / (10 * INTERVAL_S)


def within_targets(fluid: FidelityResult, des: FidelityResult) -> dict[str, bool]:
    """Which agreement targets the pair meets (see :data:`AGREEMENT_TARGETS`)."""

    def relative(a: float, b: float) -> float:
        return abs(a - b) / b if b > 0 else abs(a - b)

    return {
        "slo": abs(fluid.slo_attainment - des.slo_attainment) * 100 <= AGREEMENT_TARGETS["slo_points"],
        "gpus": fluid.gpus_peak == des.gpus_peak,
        "energy": relative(fluid.energy_j, des.energy_j) <= AGREEMENT_TARGETS["energy_relative"],
        "ttft": relative(fluid.ttft_mean_s, des.ttft_mean_s) <= AGREEMENT_TARGETS["ttft_relative"],
        "tbt": relative(fluid.tbt_mean_s, des.tbt_mean_s) <= AGREEMENT_TARGETS["tbt_relative"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="trace length per run, s")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (the first, with --seeds)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="traces per row: figures are means over seeds seed.. (paired)"
    )
    args = parser.parse_args(argv)
    if args.duration < 60:
        raise ValueError(f"--duration must be >= 60 s, got {args.duration}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    seeds = range(args.seed, args.seed + args.seeds)
    print(
        "| deployment | load | SLO fluid / DES | GPUs | energy kJ fluid / DES | TTFT mean s | TTFT p99 s | TBT mean ms | TBT p99 ms | targets |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in agreement_cases():
        capacity = measure_capacity(DiscreteEventSimulator, case, probe_rate_per_s=40.0, seed=args.seed)
        fluid_capacity = measure_capacity(FluidSimulator, case, probe_rate_per_s=40.0, seed=args.seed)
        print(
            f"| {case.label} | capacity (req/s) | fluid {fluid_capacity:.2f} / DES {capacity:.2f} | | | | | | | |"
        )
        scenarios: list[tuple[str, float, tuple[float, float, float] | None]] = [
            ("30 %", 0.3, None),
            ("60 %", 0.6, None),
            ("90 %", 0.9, None),
            ("130 % (overload)", 1.3, None),
            ("60 % + 3x burst 60 s", 0.6, (args.duration / 2, args.duration / 2 + 60.0, 3.0)),
        ]
        for label, load, surge in scenarios:
            traces = [poisson_trace(load * capacity, args.duration, seed, surge=surge) for seed in seeds]
            fluid = mean_result(
                [run_fidelity(FluidSimulator, case, trace, args.duration) for trace in traces]
            )
            des = mean_result(
                [run_fidelity(DiscreteEventSimulator, case, trace, args.duration) for trace in traces]
            )
            checks = within_targets(fluid, des)
            verdict = (
                "steady: all met"
                if all(checks.values())
                else "missed: " + ", ".join(k for k, ok in checks.items() if not ok)
            )
            print(
                f"| {case.label} | {label} | {fluid.slo_attainment:.3f} / {des.slo_attainment:.3f} "
                f"| {fluid.gpus_peak} / {des.gpus_peak} | {fluid.energy_j / 1e3:.1f} / {des.energy_j / 1e3:.1f} "
                f"| {fluid.ttft_mean_s:.3f} / {des.ttft_mean_s:.3f} | {fluid.ttft_p99_s:.2f} / {des.ttft_p99_s:.2f} "
                f"| {fluid.tbt_mean_s * 1e3:.1f} / {des.tbt_mean_s * 1e3:.1f} | {fluid.tbt_p99_s * 1e3:.0f} / {des.tbt_p99_s * 1e3:.0f} "
                f"| {verdict} |"
            )
        print(
            f"| {case.label} | wall time per run ({args.duration:.0f} s) | fluid {fluid.wall_s:.2f} s / DES {des.wall_s:.2f} s | | | | | | | |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
