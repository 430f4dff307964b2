"""The calibration script reproduces the coefficients that live in code, and writes them back intact."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest

from opscale.sim.calibration import HELD_OUT_MODEL, ObservationSet, build_observations
from opscale.sim.costmodel_coefficients import FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS, GpuCoefficients
from opscale.sim.profile_table import VidurProfiles

pytest.importorskip("scipy", reason="the calibration script needs scipy (a dev dependency)")

from opscale.experiments.calibrate_costmodel import (
    coefficients_source,
    fit_all,
    write_coefficients,
)


@pytest.fixture(scope="module")
def observations(reference_profiles_dir: Path) -> list[ObservationSet]:
    return build_observations(
        VidurProfiles.load(reference_profiles_dir / "vidur_profiles" / "data" / "profiling")
    )


def _assert_close(fitted: GpuCoefficients, stored: GpuCoefficients) -> None:
    """Every number within the 6 significant digits the script writes (plus optimiser jitter)."""

    def numbers(value: object) -> list[float]:
        if isinstance(value, float | int) and not isinstance(value, bool):
            return [float(value)]
        if isinstance(value, Mapping):
            return [n for key in sorted(value) for n in numbers(value[key])]
        if dataclasses.is_dataclass(value):
            return [n for f in dataclasses.fields(value) for n in numbers(getattr(value, f.name))]
        return []

    assert numbers(fitted) == pytest.approx(numbers(stored), rel=1e-3, abs=1e-12)


@pytest.mark.shared
@pytest.mark.slow
def test_script_reproduces_the_coefficients_in_code(observations: list[ObservationSet]) -> None:
    fitted = fit_all(observations)
    for gpu in ("a100", "h100", "h200"):
        _assert_close(fitted[gpu], FITTED_COEFFICIENTS[gpu])
    held_out = fit_all(observations, exclude_model=HELD_OUT_MODEL)
    _assert_close(held_out["a100"], HELD_OUT_COEFFICIENTS["a100"])


def test_written_block_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "coefficients.py"
    target.write_text("# header\n# BEGIN FITTED (generated block)\nold = 1\n# END FITTED\n# footer\n")
    write_coefficients(coefficients_source(FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS), target)
    text = target.read_text()
    assert text.startswith("# header\n") and text.endswith("# END FITTED\n# footer\n")
    assert "old = 1" not in text
    namespace: dict[str, object] = {}
    exec(  # the generated block is plain literals over the coefficient types
        "from collections.abc import Mapping\nfrom types import MappingProxyType\n"
        "from opscale.sim.costmodel_coefficients import *\n" + text,
        namespace,
    )
    assert namespace["FITTED_COEFFICIENTS"]["a100"] == FITTED_COEFFICIENTS["a100"]  # type: ignore[index]
    unmarked = tmp_path / "unmarked.py"
    unmarked.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no '# BEGIN FITTED'"):
        write_coefficients("y = 2\n", unmarked)
