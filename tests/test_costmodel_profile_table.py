"""The profile-table backend (Vidur CSV format) and the ``opscale costmodel`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from opscale.cli import main
from opscale.sim.calibration import table_interpolation_rows
from opscale.sim.costmodel import AttentionBatch, CostModel, ProfileTableCostModel, default_cost_model
from opscale.sim.hardware import get_gpu
from opscale.sim.models import UnitKind, get_model
from opscale.sim.profile_table import read_vidur_csv

A100_70B_MLP = Path("compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv")


@pytest.fixture(scope="module")
def profiles(reference_profiles_dir: Path) -> Path:
    return reference_profiles_dir / "vidur_profiles" / "data" / "profiling"


@pytest.fixture(scope="module")
def table(profiles: Path) -> ProfileTableCostModel:
    return ProfileTableCostModel(profiles)


def _median_ms(path: Path, op: str, tokens: int, tp: int) -> float:
    columns = read_vidur_csv(path, (f"time_stats.{op}.median", "num_tokens", "num_tensor_parallel_workers"))
    for value, n, workers in zip(
        columns[f"time_stats.{op}.median"],
        columns["num_tokens"],
        columns["num_tensor_parallel_workers"],
        strict=True,
    ):
        if int(n) == tokens and int(workers) == tp:
            return float(value)
    raise AssertionError(f"no row {op} tokens={tokens} tp={tp}")


@pytest.mark.shared
def test_table_reproduces_profiled_rows(table: ProfileTableCostModel, profiles: Path) -> None:
    model, gpu = get_model("llama-2-70b"), get_gpu("a100")
    assert isinstance(table, CostModel)
    assert table.coverage(model, UnitKind.FFN, gpu, 2) == "table"
    measured_ms = _median_ms(profiles / A100_70B_MLP, "attn_pre_proj", 1000, 2)
    assert table.unit_time_s(model, UnitKind.QKV_PROJ, gpu, 2, 1000) == pytest.approx(80 * measured_ms * 1e-3)
    ffn_ms = sum(_median_ms(profiles / A100_70B_MLP, op, 1000, 2) for op in ("mlp_up_proj", "mlp_down_proj"))
    all_reduce = 80 * table.allreduce_time_s(gpu, 2, 1000 * 8192 * 2)
    assert table.unit_time_s(model, UnitKind.FFN, gpu, 2, 1000) == pytest.approx(
        80 * ffn_ms * 1e-3 + all_reduce
    )


@pytest.mark.shared
def test_table_extends_beyond_4096_tokens_monotonically(table: ProfileTableCostModel) -> None:
    model, gpu = get_model("codellama-34b"), get_gpu("h100")
    tokens = np.array([1024, 2048, 4096, 4097, 8192, 32768, 131072], dtype=float)
    for unit in (UnitKind.QKV_PROJ, UnitKind.FFN, UnitKind.NORM):
        times = table.unit_time_s_array(model, unit, gpu, 4, tokens)
        assert np.all(np.diff(times) > 0), unit
        # continuous at the table edge, then roofline-shaped (about linear for big GEMMs)
        assert times[3] / times[2] == pytest.approx(1.0, abs=0.01)
        assert times[6] / times[5] == pytest.approx(4.0, rel=0.2)


@pytest.mark.shared
def test_attention_table_inside_and_beyond_the_profiled_region(table: ProfileTableCostModel) -> None:
    model, gpu = get_model("llama-2-70b"), get_gpu("a100")
    assert table.coverage(model, UnitKind.ATTENTION, gpu, 2) == "table"
    # a profiled decode row: batch 64 at KV 1024 (legacy attention.csv)
    inside = table.attention_time_s(model, gpu, 2, AttentionBatch.from_requests([1024] * 64))
    roofline = default_cost_model().attention_time_s(model, gpu, 2, AttentionBatch.from_requests([1024] * 64))
    assert inside == pytest.approx(roofline, rel=0.3)
    contexts = [1024, 4096, 16384, 65536, 131072]
    decode = [table.attention_time_s(model, gpu, 2, AttentionBatch.from_requests([c] * 32)) for c in contexts]
    prefill = [
        table.attention_time_s(model, gpu, 2, AttentionBatch.from_requests(prefill_chunks=[(2048, c)]))
        for c in contexts
    ]
    assert np.all(np.diff(decode) > 0) and np.all(np.diff(prefill) > 0)


@pytest.mark.shared
def test_units_without_profiles_fall_back_to_the_roofline(table: ProfileTableCostModel) -> None:
    roofline = default_cost_model()
    gpu = get_gpu("h200")  # no H200 profiles at all
    model = get_model("llama-2-70b")
    assert table.coverage(model, UnitKind.FFN, gpu, 2) == "roofline"
    assert table.unit_time_s(model, UnitKind.FFN, gpu, 2, 512) == roofline.unit_time_s(
        model, UnitKind.FFN, gpu, 2, 512
    )
    mixtral = get_model("mixtral-8x7b")
    assert table.coverage(mixtral, UnitKind.MOE, get_gpu("a100"), 1) == "roofline"
    assert table.coverage(model, UnitKind.LM_HEAD, get_gpu("a100"), 2) == "roofline"


def test_profile_csv_missing_columns_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "a100" / "mlp.csv"
    bad.parent.mkdir()
    bad.write_text("num_tokens,n_head\n1,32\n")
    with pytest.raises(
        ValueError, match=r"mlp.csv: missing columns \['n_kv_head'.*it has \['num_tokens', 'n_head'\]"
    ):
        ProfileTableCostModel(tmp_path)


def test_profile_dir_without_csvs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no mlp\.csv"):
        ProfileTableCostModel(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ProfileTableCostModel(tmp_path / "missing")


def test_flat_folder_needs_a_gpu(tmp_path: Path) -> None:
    (tmp_path / "send_recv.csv").write_text(
        ",time_stats.send_recv.median,num_workers,size,devices_per_node\n0,0.02,2,2048,2\n1,0.03,2,4096,2\n"
    )
    with pytest.raises(ValueError, match=r"cannot tell the GPU.*pass gpu="):
        ProfileTableCostModel(tmp_path)
    table = ProfileTableCostModel(tmp_path, gpu="H100")
    assert table.send_recv_time_s(get_gpu("h100"), 3072) == pytest.approx(25e-6)


# ----------------------------------------------------------------------------- CLI
def test_cli_show_prints_every_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costmodel", "show", "qwen2-57b-a14b", "--gpu", "h100", "--tp", "4", "--tokens", "256"]) == 0
    out = capsys.readouterr().out
    for unit in ("embed", "norm", "qkv_proj", "attention", "o_proj", "moe", "lm_head"):
        assert unit in out
    assert (
        main(
            [
                "costmodel",
                "show",
                "llama-2-7b",
                "--gpu",
                "a100",
                "--tokens",
                "1",
                "--context",
                "4000",
                "--json",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert {u["unit"] for u in payload["units"]} >= {"ffn", "attention"}
    assert payload["total_s"] == pytest.approx(sum(u["time_s"] for u in payload["units"]))


def test_cli_show_rejects_bad_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costmodel", "show", "gpt-9", "--gpu", "a100", "--tokens", "8"]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["costmodel", "show", "llama-2-7b", "--gpu", "a100", "--tp", "3", "--tokens", "8"]) == 2
    assert "valid TP degrees" in capsys.readouterr().err


@pytest.mark.shared
def test_cli_validate_json_reports_targets_and_power(
    capsys: pytest.CaptureFixture[str], profiles: Path
) -> None:
    assert main(["costmodel", "validate", "--profiles", str(profiles), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    scopes = {(row["gpu"], row["operator"], row["scope"]) for row in payload["rows"]}
    assert ("a100", "ffn_down", "held-out") in scopes
    assert ("a100", "all_reduce_cross_node", "in-sample") in scopes
    assert all(target["ok"] for target in payload["targets"])
    assert payload["power"]["splitwise-measured"]["average_mape"] < 0.10


def test_cli_bench_prints_per_call_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["costmodel", "bench", "--model", "mixtral-8x7b", "--gpu", "a100", "--tp", "2", "--calls", "20"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mixtral-8x7b moe on a100 TP 2" in out
    assert "memoised" in out and "us/call" in out


@pytest.mark.shared
def test_table_interpolates_left_out_points_within_a_few_percent(table: ProfileTableCostModel) -> None:
    rows = {(row.gpu, row.operator): row for row in table_interpolation_rows(table.profiles)}
    for gpu in ("a100", "h100"):
        for operator in ("qkv_proj", "o_proj", "ffn_up", "ffn_down"):
            assert rows[(gpu, operator)].mape < 0.05, (gpu, operator)
    assert rows[("a100", "attention_decode")].mape < 0.05
    assert rows[("a100", "attention_prefill")].mape < 0.05
