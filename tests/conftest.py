"""Shared fixtures: where the public data lives (skips with a reason when it is not beside the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opscale.paths import data_dir, reference_dir


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"public traces not found at {path} (set OPSCALE_DATA)")
    return path


@pytest.fixture(scope="session")
def reference_profiles_dir() -> Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.skip(f"reference profiles not found at {path} (set OPSCALE_REFERENCE)")
    return path
