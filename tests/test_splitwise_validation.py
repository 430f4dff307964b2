"""The engine against SplitwiseSim's measured Llama-2-70B rows (issue 5 acceptance)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opscale.experiments.splitwise_validation import RowResult, perf_model_path, summarise, validate

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def results(reference_profiles_dir: Path) -> list[RowResult]:
    path = perf_model_path(reference_profiles_dir)
    if not path.is_file():
        pytest.skip(f"perf_model.csv not found at {path}")
    return validate(path)


def test_every_gpu_tp_pair_is_covered(results: list[RowResult]) -> None:
    assert set(summarise(results)) == {(gpu, tp) for gpu in ("a100", "h100") for tp in (2, 4, 8)}


def test_decode_iterations_within_15_percent(results: list[RowResult]) -> None:
    for key, figures in summarise(results).items():
        assert figures["token_median_abs_error"] <= 0.15, key


def test_single_request_prefill_within_15_percent(results: list[RowResult]) -> None:
    for key, figures in summarise(results).items():
        assert figures["prompt_single_median_abs_error"] <= 0.15, key


def test_kernels_alone_are_too_fast_at_high_tp(reference_profiles_dir: Path) -> None:
    """Without the engine-overhead preset decode iterations at TP8 are far too fast (DESIGN.md 2.3)."""
    path = perf_model_path(reference_profiles_dir)
    if not path.is_file():
        pytest.skip(f"perf_model.csv not found at {path}")
    from opscale.sim.config import EngineOverheadPreset

    bare = summarise(validate(path, EngineOverheadPreset.NONE))
    assert bare[("a100", 8)]["token_median_error"] < -0.3
    assert bare[("a100", 2)]["token_median_abs_error"] < 0.2
