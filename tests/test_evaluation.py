"""Evaluation harness and ``opscale evaluate``: every heuristic on both fidelities, pairing, summaries,
files, bad inputs, and the operator-level vs model-level comparison on a steady load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opscale.agents.evaluation import (
    EPISODE_METRICS,
    evaluate,
    make_env,
    paired_difference,
    summarise,
    window_range,
)
from opscale.cli import main
from opscale.sim.deployment import Deployment
from opscale.sim.models import get_model
from opscale.traces import LognormalLengths, RequestTrace, synthetic_trace

HEURISTICS = (
    ("static", "opscale/ModelAutoscale-v0"),
    ("model-level", "opscale/ModelAutoscale-v0"),
    ("model-level-throughput", "opscale/ModelAutoscale-v0"),
    ("model-level-planner", "opscale/ModelAutoscale-v0"),
    ("static", "opscale/OperatorAutoscale-v0"),
    ("operator-greedy", "opscale/OperatorAutoscale-v0"),
    ("oracle", "opscale/OperatorAutoscale-v0"),
)
HORIZON = 3


@pytest.mark.parametrize("fidelity", ["fluid", "des"])
@pytest.mark.parametrize(("policy", "env_id"), HEURISTICS)
def test_every_heuristic_runs_through_the_harness(policy: str, env_id: str, fidelity: str) -> None:
    result = evaluate(policy, env_id, seeds=[7], fidelity=fidelity, env_config={"horizon": HORIZON})
    (episode,) = result.episodes
    assert episode.fidelity == fidelity and episode.steps == HORIZON
    assert len(episode.series.time_s) == HORIZON
    assert set(episode.series.replicas) == {u.value for u in get_model("qwen2-7b").units}
    assert 0.0 <= episode.slo_attainment <= 1.0
    assert episode.gpus_mean > 0 and episode.gpus_peak >= math.floor(episode.gpus_mean)
    assert episode.energy_kwh > 0 and episode.gpu_hours > 0
    assert episode.requests > 0
    assert episode.reward == pytest.approx(episode.reward_slo + episode.reward_gpu + episode.reward_energy)


def test_same_seeds_give_the_same_windows_for_every_policy() -> None:
    config = {"horizon": HORIZON}
    tracking = evaluate(
        "model-level", "opscale/ModelAutoscale-v0", seeds=[1, 2], fidelity="fluid", env_config=config
    )
    static = evaluate(
        "static", "opscale/ModelAutoscale-v0", seeds=[1, 2], fidelity="fluid", env_config=config
    )
    assert [e.start_s for e in tracking.episodes] == [e.start_s for e in static.episodes]
    assert [e.requests for e in tracking.episodes] == [e.requests for e in static.episodes]
    assert tracking.episodes[0].start_s != tracking.episodes[1].start_s
    difference = paired_difference(tracking, static, "gpus_mean")
    assert difference.n == 2
    assert difference.mean == pytest.approx(
        np.mean([a.gpus_mean - b.gpus_mean for a, b in zip(tracking.episodes, static.episodes, strict=True)])
    )


def test_held_out_windows_start_in_the_last_fifth() -> None:
    env = make_env("opscale/ModelAutoscale-v0", fidelity="fluid", env_config={"horizon": HORIZON})
    low, high = window_range(env, "held-out")
    train_low, train_high = window_range(env, "random")
    trace = env.unwrapped.trace
    assert low == pytest.approx(trace.end_s - 0.2 * trace.duration_s)
    assert train_high <= low and train_low == trace.start_s
    result = evaluate(
        "model-level",
        "opscale/ModelAutoscale-v0",
        seeds=[0, 1],
        fidelity="fluid",
        env_config={"horizon": HORIZON},
        windows="held-out",
    )
    assert all(low <= e.start_s <= high for e in result.episodes)


def test_summary_uses_student_t_intervals() -> None:
    summary = summarise([1.0, 2.0, 3.0])
    assert summary.mean == 2.0 and summary.std == pytest.approx(1.0)
    assert summary.half_width == pytest.approx(4.303 / math.sqrt(3))
    single = summarise([5.0])
    assert (single.ci95_low, single.ci95_high, single.n) == (5.0, 5.0, 1)
    with pytest.raises(ValueError, match="empty"):
        summarise([])


def test_result_files(tmp_path) -> None:
    result = evaluate(
        "static",
        "opscale/ModelAutoscale-v0",
        seeds=[0, 1],
        fidelity="fluid",
        env_config={"horizon": HORIZON},
        out_dir=tmp_path,
    )
    rows = (tmp_path / "episodes.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("policy,env_id,fidelity,episode,seed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["summary"]) == set(EPISODE_METRICS)
    assert summary["summary"]["gpus_mean"]["mean"] == pytest.approx(result.summary["gpus_mean"].mean)
    series = (tmp_path / "series.csv").read_text().strip().splitlines()
    assert len(series) == 1 + 2 * HORIZON and "replicas_attention" in series[0]
    assert len(json.loads((tmp_path / "episodes.json").read_text())) == 2


def test_evaluate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown env id"):
        evaluate("static", "opscale/Nope-v0", seeds=[0])
    with pytest.raises(ValueError, match="one seed per episode"):
        evaluate("static", "opscale/ModelAutoscale-v0", episodes=3, seeds=[0])
    with pytest.raises(ValueError, match="unknown windows"):
        evaluate(
            "static",
            "opscale/ModelAutoscale-v0",
            seeds=[0],
            fidelity="fluid",
            env_config={"horizon": 2},
            windows="later",
        )  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the comparison
def _steady_trace(rate_per_s: float) -> RequestTrace:
    rng = np.random.default_rng(0)
    return synthetic_trace(
        rate_per_s,
        600.0,
        LognormalLengths(np.log(600.0), 0.6, 1, 4000),
        LognormalLengths(np.log(150.0), 0.6, 1, 1000),
        rng,
        name="steady",
    )


@pytest.mark.parametrize("fidelity", ["fluid", "des"])
def test_operator_greedy_meets_the_slo_with_fewer_gpus_than_model_level(fidelity: str) -> None:
    """Qwen2-57B-A14B at a steady 1 req/s: the model-level env runs TP-4 instances (its sizing leaves
    half of each GPU for KV), so its autoscaler cannot go below 4 GPUs; the operator level shards
    only the MoE (TP 2) and packs the small operators and the KV cache around it. Both must meet the
    SLO, measured by the simulator."""
    model = "qwen2-57b-a14b"
    trace = _steady_trace(1.0)
    spec = get_model(model)
    start = Deployment.operator_level(
        model, "a100", replicas=dict.fromkeys(spec.units, 1), tp={"moe": 2}, num_nodes=2
    )
    common = {"horizon": 12, "model": model}
    operator = evaluate(
        "operator-greedy",
        "opscale/OperatorAutoscale-v0",
        trace=trace,
        seeds=[0],
        fidelity=fidelity,
        env_config={**common, "initial_deployment": start},
    )
    monolith = evaluate(
        "model-level",
        "opscale/ModelAutoscale-v0",
        trace=trace,
        seeds=[0],
        fidelity=fidelity,
        env_config=common,
    )
    op, ml = operator.episodes[0], monolith.episodes[0]
    assert ml.slo_attainment >= 0.95 and op.slo_attainment >= 0.95
    assert op.gpus_mean < ml.gpus_mean
    assert op.energy_kwh < ml.energy_kwh


# ----------------------------------------------------------------------------- CLI
def test_cli_bad_inputs_fail_clearly(capsys, tmp_path) -> None:
    assert main(["evaluate", "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--policy", str(tmp_path / "model.zip")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", "--policy", "static", "--horizon", "100000", "--fidelity", "fluid"]) == 2
    assert "shorter than one episode" in capsys.readouterr().err
    assert main(["evaluate", "--policy", "static", "--config", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_cli_prints_json(capsys) -> None:
    code = main(
        [
            "evaluate",
            "--policy",
            "model-level",
            "--env",
            "opscale/ModelAutoscale-v0",
            "--fidelity",
            "fluid",
            "--horizon",
            "2",
            "--seeds",
            "0",
            "1",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "model-level" and len(data["episodes"]) == 2
    assert data["summary"]["slo_attainment"]["n"] == 2
