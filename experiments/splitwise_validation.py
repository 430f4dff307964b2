"""End-to-end validation of the discrete-event engine against SplitwiseSim's measured rows.

``splitwise_sim_perf_model/data/perf_model.csv`` (SplitwiseSim, MIT; read in place under
``../shared/reference``) holds request-level measurements of Llama-2-70B on DGX-A100 and DGX-H100 with
2023-era vLLM at TP 2, 4 and 8: ``prompt_time`` (prefill of the whole batch, ms) and ``token_time``
(mean decode iteration, ms) for batches of ``batch_size`` identical requests.

Each distinct row configuration is replayed through :class:`opscale.sim.engine.DiscreteEventSimulator`
with one monolithic instance: ``batch_size`` requests arriving together, a token budget large enough
to prefill the whole batch in one iteration (2023 vLLM did not chunk prefills), and the
``splitwise-vllm-2023`` engine-overhead preset. Simulated prompt time = the batch's last first token;
token time = (last completion - last first token) / (output tokens - 1).

Two deliberate departures from the catalog, both because the measurements exceed them: the model's
context limit is raised to 16,384 (rows reach 512 + 8,192 tokens), and the KV memory share to 0.95
(the batch-64 rows hold 64 x 640 tokens of KV at TP 2, more than 90 % of an A100 leaves after the
weights; the real runs evidently fitted them).

Multi-request prefill rows (batch 2..64 of 512-token prompts) are reported, not fitted:

* at TP 4 and 8 the measured batched prefill is *slower* than one prompt of the same total length
  although it does less attention work (A100 TP8: 16 x 512 tokens take 2,084 ms, one 8,192-token
  prompt 1,550 ms). That per-sequence cost of 2023 vLLM's batched prefill (padding, per-sequence
  attention launches, sampling) is neither in the operator profiles nor in a per-iteration overhead,
  so the engine is 30-50 % fast on batches of 8 or more there;
* the batch-64 rows at TP 2 (A100 794 ms, H100 361 ms) lie below the compute bound of a 64 x 512-token
  prefill (~7 s on two A100s at peak): vLLM could not hold the whole batch's KV cache and the
  measurement covers only the first admitted subset. The engine preempts for the same reason, which
  also slows its decode iterations on those rows.

Run ``python -m opscale.experiments.splitwise_validation`` to print the table.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

import numpy as np

from opscale.paths import reference_dir
from opscale.sim.config import EngineOverheadPreset, SimConfig
from opscale.sim.deployment import Deployment
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import get_model
from opscale.sim.overhead import EngineOverhead
from opscale.traces.trace import RequestTrace

__all__ = ["RowResult", "fit_overhead", "load_rows", "simulate_row", "summarise", "validate"]

_HARDWARE = {"a100-80gb": "a100", "h100-80gb": "h100"}


@dataclass(frozen=True)
class RowResult:
    """Measured (median over repeats) and simulated times of one row configuration, ms."""

    gpu: str
    tp: int
    batch_size: int
    prompt_tokens: int
    output_tokens: int
    measured_prompt_ms: float
    simulated_prompt_ms: float
    measured_token_ms: float
    simulated_token_ms: float

    @property
    def prompt_error(self) -> float:
        return self.simulated_prompt_ms / self.measured_prompt_ms - 1.0

    @property
    def token_error(self) -> float:
        return self.simulated_token_ms / self.measured_token_ms - 1.0


def perf_model_path(root: Path | None = None) -> Path:
    """Where ``perf_model.csv`` lives (``reference_dir()`` by default)."""
    base = reference_dir() if root is None else root
    return base / "splitwise_sim_perf_model" / "data" / "perf_model.csv"


def load_rows(path: Path) -> dict[tuple[str, int, int, int, int], tuple[float, float]]:
    """Llama-2-70B rows on A100/H100 grouped by (gpu, tp, batch, prompt, output) -> median
    (prompt_time, token_time) in ms."""
    groups: dict[tuple[str, int, int, int, int], list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["model"] != "llama2-70b" or row["hardware"] not in _HARDWARE:
                continue
            key = (
                _HARDWARE[row["hardware"]],
                int(row["tensor_parallel"]),
                int(row["batch_size"]),
                int(row["prompt_size"]),
                int(row["token_size"]),
            )
            groups[key].append((float(row["prompt_time"]), float(row["token_time"])))
    return {
        key: (median(p for p, _ in values), median(t for _, t in values)) for key, values in groups.items()
    }


def simulate_row(
    gpu: str,
    tp: int,
    batch_size: int,
    prompt_tokens: int,
    output_tokens: int,
    preset: EngineOverheadPreset = EngineOverheadPreset.SPLITWISE_VLLM_2023,
) -> tuple[float, float]:
    """Simulated (prompt_time, token_time) in ms for one row configuration."""
    model = replace(get_model("llama-2-70b"), max_context=16384)
    budget = max(2048, batch_size * prompt_tokens)
    deployment = Deployment.model_level(model.name, gpu, instances=1, tp=tp, token_budget=budget)
    cluster = ClusterSpec.homogeneous(gpu, deployment.num_nodes)
    trace = RequestTrace(
        arrival_s=np.zeros(batch_size),
        prompt_tokens=np.full(batch_size, prompt_tokens),
        output_tokens=np.full(batch_size, output_tokens),
    )
    config = SimConfig(
        engine_overhead=preset, gpu_memory_fraction=0.95, max_running_requests=max(256, batch_size)
    )
    simulator = DiscreteEventSimulator(cluster, model, deployment, trace, config=config)
    simulator.run_to_completion(interval_s=3600.0)
    records = simulator.records
    assert records is not None
    first_token_s = float(np.max(records.ttft_s))
    last_s = float(np.max(records.e2e_s))
    token_s = (last_s - first_token_s) / max(1, output_tokens - 1)
    return first_token_s * 1e3, token_s * 1e3


def validate(
    path: Path | None = None, preset: EngineOverheadPreset = EngineOverheadPreset.SPLITWISE_VLLM_2023
) -> list[RowResult]:
    """Simulate every Llama-2-70B A100/H100 row configuration."""
    rows = load_rows(perf_model_path() if path is None else path)
    results = []
    for (gpu, tp, batch, prompt, output), (prompt_ms, token_ms) in sorted(rows.items()):
        sim_prompt, sim_token = simulate_row(gpu, tp, batch, prompt, output, preset)
        results.append(RowResult(gpu, tp, batch, prompt, output, prompt_ms, sim_prompt, token_ms, sim_token))
    return results


def summarise(results: Iterable[RowResult]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (gpu, tp): median |error| of decode iterations (all rows), of single-request prefill and of
    multi-request prefill."""
    grouped: dict[tuple[str, int], list[RowResult]] = defaultdict(list)
    for result in results:
        grouped[(result.gpu, result.tp)].append(result)
    summary = {}
    for key, rows in sorted(grouped.items()):
        single = [abs(r.prompt_error) for r in rows if r.batch_size == 1]
        multi = [abs(r.prompt_error) for r in rows if r.batch_size > 1]
        summary[key] = {
            "token_median_abs_error": median(abs(r.token_error) for r in rows),
            "token_median_error": median(r.token_error for r in rows),
            "prompt_single_median_abs_error": median(single) if single else float("nan"),
            "prompt_multi_median_abs_error": median(multi) if multi else float("nan"),
            "rows": float(len(rows)),
        }
    return summary


def fit_overhead(results: Iterable[RowResult]) -> dict[str, EngineOverhead]:
    """Least-squares fit of ``fixed + per_tp_rank * tp + per_request * batch`` per GPU to the decode
    time the kernels leave unexplained (``results`` simulated with the ``none`` preset), over the rows
    up to batch 32 (the batch-64 rows do not fit the KV cache at TP 2 and are preemption-bound).

    This is how the ``splitwise-vllm-2023`` preset of :mod:`opscale.sim.overhead` was obtained."""
    by_gpu: dict[str, list[RowResult]] = defaultdict(list)
    for result in results:
        if result.batch_size <= 32:
            by_gpu[result.gpu].append(result)
    fitted = {}
    for gpu, rows in sorted(by_gpu.items()):
        design = np.array([[1.0, r.tp, r.batch_size] for r in rows])
        missing_s = np.array([(r.measured_token_ms - r.simulated_token_ms) / 1e3 for r in rows])
        coefficients, *_ = np.linalg.lstsq(design, missing_s, rcond=None)
        fixed, per_rank, per_request = (max(0.0, float(c)) for c in coefficients)
        fitted[gpu] = EngineOverhead(fixed_s=fixed, per_tp_rank_s=per_rank, per_request_s=per_request)
    return fitted


def _format(results: list[RowResult]) -> str:
    lines = [
        "| GPU | TP | decode median abs err | decode median signed err | 1-req prefill median abs err "
        "| multi-req prefill median abs err |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (gpu, tp), figures in summarise(results).items():
        lines.append(
            f"| {gpu} | {tp} | {figures['token_median_abs_error']:.1%} | {figures['token_median_error']:+.1%} | "
            f"{figures['prompt_single_median_abs_error']:.1%} | {figures['prompt_multi_median_abs_error']:.1%} |"
        )
    lines.append("")
    lines.append("| GPU | TP | batch | prompt | output | prompt ms meas/sim | token ms meas/sim |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        lines.append(
            f"| {r.gpu} | {r.tp} | {r.batch_size} | {r.prompt_tokens} | {r.output_tokens} | "
            f"{r.measured_prompt_ms:.0f} / {r.simulated_prompt_ms:.0f} ({r.prompt_error:+.0%}) | "
            f"{r.measured_token_ms:.1f} / {r.simulated_token_ms:.1f} ({r.token_error:+.0%}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default=EngineOverheadPreset.SPLITWISE_VLLM_2023.value,
        choices=[p.value for p in EngineOverheadPreset],
    )
    parser.add_argument("--reference", type=Path, default=None, help="reference data dir (default: auto)")
    parser.add_argument(
        "--fit-overhead",
        action="store_true",
        help="fit the per-GPU engine overhead to the decode rows (kernel-only simulation) and print it",
    )
    args = parser.parse_args(argv)
    path = perf_model_path(args.reference)
    if not path.is_file():
        raise FileNotFoundError(f"perf_model.csv not found at {path} (set OPSCALE_REFERENCE)")
    if args.fit_overhead:
        for gpu, overhead in fit_overhead(validate(path, EngineOverheadPreset.NONE)).items():
            print(
                f"{gpu}: fixed {overhead.fixed_s * 1e3:.2f} ms, per TP rank {overhead.per_tp_rank_s * 1e3:.2f} ms, "
                f"per request {overhead.per_request_s * 1e3:.3f} ms"
            )
        return 0
    print(_format(validate(path, EngineOverheadPreset(args.preset))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
