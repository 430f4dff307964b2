"""Outputs of the paper's experiment: CSV and Markdown tables, PNG plots, TensorBoard runs, JSON.

:func:`write_outputs` writes, under ``config.out_dir``:

* ``results.csv``: one row per case and policy (figures at matched load, max sustainable rate, savings
  against model-level);
* ``table.md``: the same as Markdown tables, the command that made them, the method, and a paragraph
  comparing the savings with the paper's claims (:func:`claims_paragraph`);
* ``plots/<case>.png``: GPUs powered over time against the offered load, one panel per policy (first
  evaluation episode); ``plots/savings.png``: savings per case;
* ``tensorboard/eval/<case>/<policy>``: the same time series as TensorBoard scalars (one run per policy,
  so TensorBoard overlays them), next to the PPO training runs in ``tensorboard/train``;
* ``paper_table.json``: everything above as data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from opscale.experiments.paper_table import (
    BASELINE,
    CaseResult,
    PaperPolicy,
    PaperTableConfig,
    PolicyResult,
    savings,
)

__all__ = ["PAPER_CLAIMS", "claims_paragraph", "result_rows", "write_outputs"]

#: The paper's headline figures (arXiv 2511.02248), operator-level vs model-level autoscaling.
PAPER_CLAIMS: dict[str, float] = {"gpu_saving": 0.40, "energy_saving": 0.35, "throughput_ratio": 1.6}
#: How far (absolute) our figure may sit from the paper's and still be called "in line with" it.
_AGREEMENT_TOLERANCE: dict[str, float] = {"gpu_saving": 0.10, "energy_saving": 0.10, "throughput_ratio": 0.2}
_CLAIM_LABELS: dict[str, str] = {
    "gpu_saving": "fewer GPUs (time-averaged)",
    "energy_saving": "less energy",
    "throughput_ratio": "throughput at a fixed GPU budget",
}
_COMPARED: tuple[PaperPolicy, ...] = (PaperPolicy.OPERATOR_GREEDY, PaperPolicy.PPO)


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def result_rows(config: PaperTableConfig, results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """One flat row per case and policy (what ``results.csv`` holds)."""
    rows = []
    for case_result in results:
        case = case_result.case
        for policy, policy_result in case_result.policies.items():
            summary = policy_result.evaluation.summary
            row: dict[str, Any] = {
                "model": case.model,
                "gpu": case.gpu,
                "trace": case.trace,
                "policy": policy.value,
                "env_id": policy_result.env_id,
                "episodes": len(policy_result.evaluation.episodes),
                "slo_attainment": summary["slo_attainment"].mean,
                "slo_attainment_ci95": summary["slo_attainment"].half_width,
                "gpus_mean": summary["gpus_mean"].mean,
                "gpus_mean_ci95": summary["gpus_mean"].half_width,
                "gpus_peak": max(episode.gpus_peak for episode in policy_result.evaluation.episodes),
                "energy_kwh": summary["energy_kwh"].mean,
                "ttft_p99_s": summary["ttft_p99_s"].mean,
                "tbt_p99_s": summary["tbt_p99_s"].mean,
                "requests": summary["requests"].mean,
                "budget_gpus": policy_result.budget_gpus,
                "max_rate_per_s": policy_result.max_rate_per_s,
                "max_rate_scale": policy_result.throughput.scale
                if policy_result.throughput
                else float("nan"),
                "max_rate_capped": bool(policy_result.throughput and policy_result.throughput.capped),
            }
            compared = savings(case_result, policy)
            row.update(compared)
            row["throughput_bound"] = _ratio_bound(policy_result, case_result.policies[BASELINE])
            row["matched_slo"] = compared["slo_delta"] >= -config.slo_match_tolerance
            rows.append(row)
    return rows


def _ratio_bound(policy_result: PolicyResult, baseline: PolicyResult) -> str:
    """How exact the throughput ratio is: ``"="``, ``">="`` (the policy's search hit the rate cap),
    ``"<="`` (the baseline's did) or ``"?"`` (both did: the ratio says nothing)."""
    mine = bool(policy_result.throughput and policy_result.throughput.capped)
    theirs = bool(baseline.throughput and baseline.throughput.capped)
    return {(False, False): "=", (True, False): ">=", (False, True): "<=", (True, True): "?"}[(mine, theirs)]


def _ratio_text(ratio: float, bound: str) -> str:
    if not math.isfinite(ratio):
        return "n/a"
    if bound == "?":
        return "n/a (both at the rate cap)"
    return f"{'' if bound == '=' else bound + ' '}{ratio:.2f}x"


def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f} %"


def _points(value: float) -> str:
    """An SLO attainment difference in percentage points."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f} pts"


def _verdict(metric: str, ours: float) -> str:
    claim, tolerance = PAPER_CLAIMS[metric], _AGREEMENT_TOLERANCE[metric]
    if abs(ours - claim) <= tolerance:
        return "in line with the paper"
    return "above the paper's figure" if ours > claim else "short of the paper's figure"


def claims_paragraph(config: PaperTableConfig, rows: Sequence[dict[str, Any]]) -> str:
    """A data-driven paragraph comparing our savings (:func:`result_rows`) with the paper's claims (Markdown)."""
    cases = {(row["model"], row["gpu"], row["trace"]) for row in rows}
    lines = [
        "The paper claims up to 40 % fewer GPUs and 35 % less energy at equal SLO, or 1.6x the throughput on "
        f"a fixed GPU budget, for operator-level over model-level autoscaling. Over {len(cases)} case(s) here "
        f"(DES fidelity, {len(config.eval_seeds)} paired held-out window(s) of "
        f"{config.horizon * config.control_interval_s:.0f} s each):",
        "",
    ]
    for policy in _COMPARED:
        mine = [row for row in rows if row["policy"] == policy.value]
        if not mine:
            continue
        matched = [row for row in mine if row["matched_slo"]]
        parts = []
        for metric in ("gpu_saving", "energy_saving"):
            values = _finite([row[metric] for row in mine])
            if values.size == 0:
                parts.append(f"{_CLAIM_LABELS[metric]}: not measurable (model-level baseline is zero)")
                continue
            matched_values = _finite([row[metric] for row in matched])
            claim = f"paper up to {100 * PAPER_CLAIMS[metric]:.0f} %"
            if matched_values.size:
                best = float(matched_values.max())
                verdict = f"best at matched SLO {_percent(best)}, {_verdict(metric, best)}"
            else:
                verdict = "none at matched SLO, so no like-for-like comparison"
            parts.append(
                f"{_CLAIM_LABELS[metric]}: {verdict} (mean over all cases {_percent(float(values.mean()))}; {claim})"
            )
        informative = [
            row for row in mine if math.isfinite(row["throughput_ratio"]) and row["throughput_bound"] != "?"
        ]
        if informative:
            best_row = max(informative, key=lambda row: row["throughput_ratio"])
            bound_note = (
                "" if best_row["throughput_bound"] == "=" else " (a bound: a bisection hit the rate cap)"
            )
            parts.append(
                f"{_CLAIM_LABELS['throughput_ratio']}: best {_ratio_text(best_row['throughput_ratio'], best_row['throughput_bound'])}"
                f"{bound_note}, {_verdict('throughput_ratio', best_row['throughput_ratio'])} (paper 1.6x)"
            )
        else:
            parts.append(
                f"{_CLAIM_LABELS['throughput_ratio']}: not measurable (no bisection ended inside the searched range)"
            )
        slo_deltas = _finite([row["slo_delta"] for row in mine])
        lines.append(
            f"- **{policy.value} vs model-level** (SLO attainment {_points(float(slo_deltas.mean()))} on "
            f"average; matched SLO in {len(matched)} of {len(mine)} case(s)): " + "; ".join(parts) + "."
        )
    lines += [
        "",
        'Positive savings mean fewer GPUs / less energy than model-level. "Matched SLO" means SLO attainment no '
        f"more than {100 * config.slo_match_tolerance:.0f} point(s) below model-level's; a saving bought with a "
        "worse SLO is not the paper's claim and is not counted as agreement.",
    ]
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(
    config: PaperTableConfig,
    results: Sequence[CaseResult],
    rows: Sequence[dict[str, Any]],
    command: str,
    wall_s: float,
) -> str:
    budget = (
        "the nodes model-level peaked at"
        if config.budget_num_nodes is None
        else f"{config.budget_num_nodes * 8} GPUs"
    )
    main_rows = [
        [
            row["model"],
            row["gpu"],
            row["trace"],
            row["policy"],
            f"{row['slo_attainment']:.3f} ± {row['slo_attainment_ci95']:.3f}",
            f"{row['gpus_mean']:.2f}",
            f"{row['gpus_peak']}",
            f"{row['energy_kwh']:.4f}",
            f"{row['ttft_p99_s']:.3f}",
            f"{row['tbt_p99_s']:.4f}",
            f"{row['max_rate_per_s']:.2f}{'+' if row['max_rate_capped'] else ''} ({row['budget_gpus']})",
        ]
        for row in rows
    ]
    saving_rows = [
        [
            row["model"],
            row["gpu"],
            row["trace"],
            row["policy"],
            _percent(row["gpu_saving"]),
            _percent(row["energy_saving"]),
            _ratio_text(row["throughput_ratio"], row["throughput_bound"]),
            _points(row["slo_delta"]),
            "yes" if row["matched_slo"] else "no",
        ]
        for row in rows
        if row["policy"] != BASELINE.value
    ]
    ppo_lines = []
    for case_result in results:
        if case_result.ppo_model is not None:
            trained = (
                f"trained {case_result.ppo_timesteps} steps on the fluid fidelity in {case_result.ppo_train_wall_s:.0f} s"
                if case_result.ppo_timesteps
                else "given on the command line"
            )
            if config.ppo_chain_actions:
                trained += "; with the chain action dimension (`chain_actions`)"
            ppo_lines.append(f"- {case_result.case.slug}: `{case_result.ppo_model}` ({trained})")
    sections = [
        "# Paper table: model-level vs operator-level vs PPO autoscaling",
        "",
        f"Command: `{command or 'run_paper_table(...)'}` — wall time {wall_s:.0f} s.",
        "",
        f"Matched load: {config.num_nodes * 8}-GPU cluster, {len(config.eval_seeds)} paired held-out window(s) per policy "
        f"(seeds {', '.join(map(str, config.eval_seeds))}), {config.horizon} decisions x {config.control_interval_s:g} s, "
        "DES fidelity. Max rate: largest request rate (req/s) whose SLO attainment over one held-out window of "
        f"{config.throughput_horizon} decisions stays >= {config.slo_threshold:g} on a fixed budget of {budget} "
        f"(bisection over the trace's rate scale, {config.bisection_probes} probes, up to x{config.max_rate_scale:g}; "
        "'+' = still sustained at the largest scale tried; the GPU budget in parentheses).",
        "",
        "## Results",
        "",
        _markdown_table(
            [
                "model",
                "GPU",
                "trace",
                "policy",
                "SLO attainment",
                "GPUs avg",
                "GPUs peak",
                "energy kWh",
                "TTFT p99 s",
                "TBT p99 s",
                "max rate req/s (GPUs)",
            ],
            main_rows,
        ),
        "",
        "## Savings against model-level",
        "",
        _markdown_table(
            [
                "model",
                "GPU",
                "trace",
                "policy",
                "GPU saving",
                "energy saving",
                "throughput ratio",
                "SLO Δ",
                "matched SLO",
            ],
            saving_rows,
        ),
        "",
        "## Against the paper's claims",
        "",
        claims_paragraph(config, rows),
        "",
    ]
    if ppo_lines:
        sections += ["## PPO models", "", *ppo_lines, ""]
    sections += [
        "## Method",
        "",
        "static, model-level and model-level-planner scale whole instances (`opscale/ModelAutoscale-v0`); "
        "operator-greedy and PPO scale operators (`opscale/OperatorAutoscale-v0`); both run the same DES engine "
        "with the same windows and "
        "arrivals (paired seeds). The bisection doubles the rate scale from 1 while the SLO holds, then bisects "
        "geometrically; it assumes SLO attainment falls with load and measures one window per probe, so the "
        "max rate is a noisy lower bound. Per-episode figures: `evaluations/<case>/<policy>/`; time series: "
        "`plots/` and `tensorboard/eval/`; PPO training runs: `tensorboard/train/`. model-level-planner runs "
        "operator-greedy's chain-mode controller on whole instances: where operator-greedy falls back to chains "
        "(the model-level layout), operator-greedy against it isolates the granularity, and it against "
        "model-level isolates the controller.",
        "",
    ]
    return "\n".join(sections)


def _plot_case(case_result: CaseResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(case_result.policies.values())
    figure, axes = plt.subplots(
        len(policies), 1, figsize=(9, 2.4 * len(policies)), sharex=True, squeeze=False
    )
    legend_handles: list[Any] = []
    for axis, policy_result in zip(axes[:, 0], policies, strict=True):
        episode = policy_result.evaluation.episodes[0]
        series = episode.series
        (gpus_line,) = axis.step(
            series.time_s, series.gpus, where="post", color="tab:blue", label="GPUs powered"
        )
        axis.set_ylabel("GPUs")
        axis.set_ylim(bottom=0)
        load_axis = axis.twinx()
        (load_line,) = load_axis.plot(
            series.time_s, series.arrival_rate_per_s, color="grey", linestyle="--", label="load (req/s)"
        )
        load_axis.set_ylabel("req/s")
        load_axis.set_ylim(bottom=0)
        legend_handles = legend_handles or [gpus_line, load_line]
        axis.set_title(
            f"{policy_result.policy.value}: SLO {episode.slo_attainment:.3f}, {episode.gpus_mean:.2f} GPUs avg, "
            f"{episode.energy_kwh:.4f} kWh (seed {episode.seed})",
            fontsize="small",
        )
    axes[-1, 0].set_xlabel("time in window (s)")
    axes[0, 0].legend(handles=legend_handles, fontsize="small", loc="upper left")
    figure.suptitle(case_result.case.slug)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_savings(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [
        row for row in rows if row["policy"] != BASELINE.value and row["policy"] != PaperPolicy.STATIC.value
    ]
    labels = [f"{row['model']}\n{row['gpu']} {row['trace']}\n{row['policy']}" for row in compared]
    positions = np.arange(len(compared))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(compared)), 4))
    width = 0.38
    axis.bar(positions - width / 2, [100 * row["gpu_saving"] for row in compared], width, label="GPU saving")
    axis.bar(
        positions + width / 2, [100 * row["energy_saving"] for row in compared], width, label="energy saving"
    )
    axis.axhline(100 * PAPER_CLAIMS["gpu_saving"], color="tab:blue", linestyle=":", label="paper: 40 % GPUs")
    axis.axhline(
        100 * PAPER_CLAIMS["energy_saving"], color="tab:orange", linestyle=":", label="paper: 35 % energy"
    )
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(positions, labels, fontsize="x-small")
    axis.set_ylabel("% vs model-level")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_tensorboard(case_result: CaseResult, root: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for policy, policy_result in case_result.policies.items():
        series = policy_result.evaluation.episodes[0].series
        with SummaryWriter(str(root / case_result.case.slug / policy.value)) as writer:
            for step, time_s in enumerate(series.time_s):
                wall = float(time_s)
                writer.add_scalar("serving/gpus", series.gpus[step], step, walltime=wall)
                writer.add_scalar("serving/slo_attainment", series.slo_attainment[step], step, walltime=wall)
                writer.add_scalar("serving/power_w", series.power_w[step], step, walltime=wall)
                writer.add_scalar(
                    "load/arrival_rate_per_s", series.arrival_rate_per_s[step], step, walltime=wall
                )
                for unit, counts in series.replicas.items():
                    writer.add_scalar(f"replicas/{unit}", counts[step], step, walltime=wall)
            for metric in ("slo_attainment", "gpus_mean", "energy_kwh", "ttft_p99_s", "tbt_p99_s"):
                writer.add_scalar(f"summary/{metric}", policy_result.mean(metric), 0)
            writer.add_scalar("summary/max_rate_per_s", policy_result.max_rate_per_s, 0)


def _json_ready(policy_result: PolicyResult) -> dict[str, Any]:
    data = policy_result.evaluation.to_dict()
    data["throughput"] = None if policy_result.throughput is None else asdict(policy_result.throughput)
    data["max_rate_per_s"] = policy_result.max_rate_per_s
    data["budget_gpus"] = policy_result.budget_gpus
    return data


def write_outputs(
    config: PaperTableConfig, results: Sequence[CaseResult], *, command: str = "", wall_s: float = 0.0
) -> dict[str, Path]:
    """Write every output (see the module docstring); returns name -> path."""
    out = config.out_dir
    (out / "plots").mkdir(parents=True, exist_ok=True)
    rows = result_rows(config, results)
    files = {"csv": out / "results.csv", "markdown": out / "table.md", "json": out / "paper_table.json"}
    with files["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files["markdown"].write_text(_markdown(config, results, rows, command, wall_s))
    for case_result in results:
        plot = out / "plots" / f"{case_result.case.slug}.png"
        _plot_case(case_result, plot)
        files[f"plot:{case_result.case.slug}"] = plot
        _write_tensorboard(case_result, out / "tensorboard" / "eval")
    files["plot:savings"] = out / "plots" / "savings.png"
    _plot_savings(rows, files["plot:savings"])
    files["tensorboard"] = out / "tensorboard"
    config_data = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()
    }
    config_data["policies"] = [policy.value for policy in config.policies]
    payload = {
        "command": command,
        "wall_s": wall_s,
        "config": config_data,
        "rows": rows,
        "cases": [
            {
                "case": asdict(case_result.case),
                "ppo_model": None if case_result.ppo_model is None else str(case_result.ppo_model),
                "ppo_timesteps": case_result.ppo_timesteps,
                "ppo_train_wall_s": case_result.ppo_train_wall_s,
                "policies": {
                    policy.value: _json_ready(result) for policy, result in case_result.policies.items()
                },
            }
            for case_result in results
        ],
    }
    files["json"].write_text(json.dumps(payload, indent=2, default=float))
    return files
