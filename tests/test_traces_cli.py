"""``opscale trace``: list, stats (table and JSON), plot, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opscale.cli import main


def test_stats_json_of_the_default_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", "default", "--json", "--seed", "2", "--duration-s", "600"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == "default" and stats["requests"] > 2_000
    assert set(stats["prompt_tokens"]) == {"mean", "p50", "p99", "max"}
    assert stats["notes"] == []


@pytest.mark.shared
def test_stats_table_of_azure_conv(capsys: pytest.CaptureFixture[str], traces_dir: Path) -> None:
    assert main(["trace", "stats", "azure-conv", "--data-dir", str(traces_dir)]) == 0
    out = capsys.readouterr().out
    assert "19,366" in out and "5.530 req/s" in out and "p50 1,020" in out and "p50 129" in out


def test_list_shows_every_name(capsys: pytest.CaptureFixture[str]) -> None:
    from opscale.traces import TRACE_NAMES

    assert main(["trace", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TRACE_NAMES)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    output = tmp_path / "default.png"
    assert main(["trace", "plot", "default", "--duration-s", "900", "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trace", "stats", "no-such-trace"], "unknown trace 'no-such-trace'"),
        (["trace", "stats", "default", "--day", "3"], "does not take option(s) ['day']"),
    ],
)
def test_bad_input_is_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_data_error_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", "azure-code", "--data-dir", str(tmp_path)]) == 2
    assert "OPSCALE_DATA" in capsys.readouterr().err
