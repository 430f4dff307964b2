"""``opscale simulate``: runs on the embedded default trace, writes its outputs, reports bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from opscale.cli import main


def test_simulate_json_and_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate", "--model", "llama-2-7b", "--gpu", "a100", "--instances", "2", "--duration", "60",
            "--clip-long", "--json", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == summary["requests"] > 0
    assert summary["deployment"]["instances"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["completed"] == summary["completed"]
    with (tmp_path / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["requests"]
    assert all(float(row["ttft_s"]) > 0 for row in rows)
    assert (tmp_path / "intervals.csv").is_file()


def test_simulate_operator_level_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate", "--model", "qwen2-7b", "--gpu", "h100", "--operator-level", "--replicas",
            "attention=2,ffn=2", "--duration", "30", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "SLO attainment" in out and "unit utilisation" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-5", "--gpu", "a100"], "unknown model 'gpt-5'"),
        (["--model", "llama-2-7b", "--gpu", "a100", "--duration", "60"], "context limit 4096"),
        (["--model", "llama-2-70b", "--gpu", "a100", "--clip-long", "--duration", "10"], "usable"),
        (["--model", "llama-2-7b", "--gpu", "a100", "--replicas", "ffn=2"], "--operator-level"),
        (["--model", "llama-2-7b", "--gpu", "a100", "--operator-level", "--replicas", "ffn"], "not unit=N"),
    ],
)
def test_simulate_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *args]) == 2
    assert message in capsys.readouterr().err
