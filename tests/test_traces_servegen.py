"""ServeGen windows: per-client renewal processes reproduce the 10-min rates; windows, scales, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opscale.traces import TraceFormatError, load_trace, servegen_trace, trace_stats
from opscale.traces.servegen import DEFAULT_START_S, read_client_windows

pytestmark = pytest.mark.shared


def _aggregate_rates(traces_dir: Path, stem: str, start_s: float, windows: int) -> np.ndarray:
    table = np.loadtxt(traces_dir / "servegen" / "aggregate" / f"{stem}_10min.csv", delimiter=",", skiprows=1)
    first = int(np.searchsorted(table[:, 0], start_s))
    return table[first : first + windows, 1]


@pytest.mark.parametrize(
    ("name", "stem"),
    [("servegen-deepseek-r1", "reason_deepseek-r1"), ("servegen-mm-image", "multimodal_mm-image")],
)
def test_default_window_reproduces_the_aggregate_rates(traces_dir: Path, name: str, stem: str) -> None:
    trace = load_trace(name, data_dir=traces_dir, seed=1)
    assert trace.duration_s == 3600.0
    expected = _aggregate_rates(traces_dir, stem, DEFAULT_START_S, 6)
    observed = np.bincount((trace.arrival_s // 600).astype(int), minlength=6) / 600.0
    # Bursty clients (CV 2-3) make 10-min counts noisy; 15 % per window, 5 % over the hour.
    assert np.allclose(observed, expected, rtol=0.15)
    assert trace.mean_rate_per_s == pytest.approx(expected.mean(), rel=0.05)
    assert trace_stats(trace)["iat_cv"] > 1.1  # superposed Gamma / Weibull clients are burstier than Poisson


def test_lengths_follow_the_readme_fits(traces_dir: Path) -> None:
    trace = load_trace("servegen-mm-image", data_dir=traces_dir)
    stats = trace_stats(trace)
    # README section 3, mm-image: text p50 106 / p99 3,064; image p50 540 / p99 1,271; output p50 100 / p99 587.
    assert stats["prompt_tokens"]["p50"] == pytest.approx(106, rel=0.05)
    assert stats["prompt_tokens"]["p99"] == pytest.approx(3_064, rel=0.1)
    assert stats["image_tokens"]["p50"] == pytest.approx(540, rel=0.05)
    assert stats["output_tokens"]["p99"] == pytest.approx(587, rel=0.1)


def test_day_hour_window_and_rate_scale(traces_dir: Path) -> None:
    stem = "language_m-large"
    trace = load_trace(
        "servegen-m-large", data_dir=traces_dir, day=5, hour=3, duration_s=600.0, rate_scale=0.05
    )
    expected = _aggregate_rates(traces_dir, stem, 5 * 86_400 + 3 * 3_600, 1)[0] * 0.05
    assert trace.mean_rate_per_s == pytest.approx(expected, rel=0.15)
    same = load_trace(
        "servegen-m-large",
        data_dir=traces_dir,
        start_s=5 * 86_400 + 3 * 3_600,
        duration_s=600.0,
        rate_scale=0.05,
    )
    assert np.array_equal(trace.arrival_s, same.arrival_s)


def test_telemetry_gaps_are_flagged(traces_dir: Path) -> None:
    # README: m-mid has runs of windows below 1 req/s around hour 87.
    table = np.loadtxt(traces_dir / "servegen/aggregate/language_m-mid_10min.csv", delimiter=",", skiprows=1)
    gap_start_s = float(table[np.argmax(table[:, 1] < 1.0), 0])
    trace = load_trace(
        "servegen-m-mid", data_dir=traces_dir, start_s=gap_start_s, duration_s=600.0, rate_scale=0.01
    )
    assert len(trace.notes) == 1 and "telemetry gaps" in trace.notes[0]


def test_window_outside_the_data_is_rejected(traces_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"covers \[0, 86400\) s = 1 day"):
        load_trace("servegen-deepseek-r1", data_dir=traces_dir, day=1)
    with pytest.raises(ValueError, match="either start_s or day/hour"):
        load_trace("servegen-deepseek-r1", data_dir=traces_dir, day=0, start_s=0.0)


def test_malformed_client_file(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "chunk-0-trace.csv").write_text("0,1.5,2.0,Gamma,0.25,2.6\n600,2.0,1.0,Pareto,1.0,1.0\n")
    with pytest.raises(TraceFormatError, match="unknown pattern 'Pareto'") as caught:
        read_client_windows(model / "chunk-0-trace.csv")
    assert caught.value.line == 2
    (model / "chunk-0-trace.csv").write_text("0,1.5,2.0,Gamma,0.25,2.6\n600,-2.0,1.0,Gamma,1.0,1.0\n")
    with pytest.raises(TraceFormatError, match="rate_rps must be finite and >= 0"):
        servegen_trace(model, np.random.default_rng(0), start_s=0.0, duration_s=600.0)


def test_custom_model_folder_needs_lengths(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "chunk-3-trace.csv").write_text("0,2.0,2.0,Gamma,0.25,2.0\n600,0,0,,0,0\n")
    with pytest.raises(ValueError, match="pass prompt_lengths and output_lengths"):
        load_trace(model, start_s=0.0, duration_s=1200.0)
