"""The package installs, exposes its version, and its CLI answers."""

from __future__ import annotations

import subprocess
import sys

import opscale
from opscale.cli import main


def test_version_is_a_release_string() -> None:
    major, minor, patch = opscale.__version__.split(".")
    assert all(part.isdigit() for part in (major, minor, patch))


def test_cli_version_flag(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert opscale.__version__ in capsys.readouterr().out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opscale.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"opscale {opscale.__version__}"
