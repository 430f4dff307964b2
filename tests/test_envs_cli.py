"""``opscale env describe`` / ``opscale env run``."""

from __future__ import annotations

import pytest

from opscale.cli import main


def test_describe_prints_the_index_table_and_deployment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "describe", "--set", "horizon=10"]) == 0
    out = capsys.readouterr().out
    assert "attention.utilisation" in out and "episode_progress" in out
    assert "MultiDiscrete" in out and '"granularity": "operator"' in out
    assert "0 pack, 1 spread-gpu, 2 spread-node, 3 colocate" in out


def test_run_prints_one_line_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "run", "--id", "opscale/ModelAutoscale-fast-v0", "--steps", "3", "--render"]) == 0
    out = capsys.readouterr().out
    assert out.count("step ") >= 3 and "total reward" in out and "model level" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["env", "run", "--set", "model=gpt9"], "unknown model 'gpt9'"),
        (["env", "run", "--set", "horizon"], "--set expects KEY=VALUE"),
        (["env", "describe", "--id", "opscale/Nope-v0"], "unknown environment id 'opscale/Nope-v0'"),
        (["env", "run", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_input_is_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
