"""Loaders and named traces: real public traces reproduce shared/traces/README.md; bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opscale.traces import (
    TRACE_NAMES,
    TraceDataNotFoundError,
    TraceFormatError,
    load_csv,
    load_mooncake_jsonl,
    load_trace,
    spread_ticks,
    trace_stats,
)

# Figures of shared/traces/README.md, sections 1 and 2 (requests, span s, mean req/s, peak 1 s, peak 1 min,
# IAT CV, CV/min, prompt mean/p50/p99, output mean/p50/p99).
README_FIGURES = {
    "azure-conv": (19_366, 3_502, 5.53, 16, 507, 1.09, 0.22, (1_155, 1_020, 4_142), (211, 129, 601)),
    "azure-code": (8_819, 3_436, 2.57, 67, 632, 13.2, 1.04, (2_048, 1_469, 7_436), (27.9, 13, 251)),
    "mooncake-conv": (12_031, 3_537, 3.40, 28, 247, 3.03, 0.12, (12_035, 6_909, 85_400), (343, 350, 1_119)),
    "mooncake-synthetic": (3_993, 1_022, 3.91, 13, 273, 1.01, 0.07, (15_325, 11_587, 66_456), (149, 69, 768)),
}


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(README_FIGURES))
def test_real_traces_match_the_readme(name: str, traces_dir: Path) -> None:
    # The README's figures are for the raw timestamps, so the Mooncake ticks are not spread here.
    options = {"spread_ticks": False} if name.startswith("mooncake") else {}
    stats = trace_stats(load_trace(name, data_dir=traces_dir, **options))
    requests, span_s, rate, peak_1s, peak_1min, iat_cv, minute_cv, prompt, output = README_FIGURES[name]
    assert stats["requests"] == requests
    assert stats["span_s"] == pytest.approx(span_s, abs=0.5)
    assert stats["mean_rate_per_s"] == pytest.approx(rate, abs=0.005)
    assert stats["peak_1s_requests"] == peak_1s
    assert stats["peak_1min_requests"] == peak_1min
    assert stats["iat_cv"] == pytest.approx(iat_cv, rel=0.01)
    assert stats["per_minute_cv"] == pytest.approx(minute_cv, abs=0.006)
    for key, (mean, p50, p99) in (("prompt_tokens", prompt), ("output_tokens", output)):
        assert stats[key]["mean"] == pytest.approx(mean, rel=0.002)
        assert stats[key]["p50"] == p50
        assert stats[key]["p99"] == pytest.approx(p99, abs=0.5)


@pytest.mark.shared
def test_mooncake_prefix_reuse_matches_the_readme(traces_dir: Path) -> None:
    conversation = trace_stats(load_trace("mooncake-conv", data_dir=traces_dir))
    synthetic = trace_stats(load_trace("mooncake-synthetic", data_dir=traces_dir))
    assert conversation["prefix_blocks_per_request"] == pytest.approx(24.0, abs=0.05)
    assert conversation["prefix_reused_block_share"] == pytest.approx(0.366, abs=0.0005)
    assert synthetic["prefix_blocks_per_request"] == pytest.approx(30.5, abs=0.05)
    assert synthetic["prefix_reused_block_share"] == pytest.approx(0.640, abs=0.0005)


@pytest.mark.shared
def test_mooncake_conv_ticks_are_spread_within_each_tick(traces_dir: Path) -> None:
    raw = load_trace("mooncake-conv", data_dir=traces_dir, spread_ticks=False)
    spread = load_trace("mooncake-conv", data_dir=traces_dir, seed=5)
    assert np.array_equal(
        spread.arrival_s, load_trace("mooncake-conv", data_dir=traces_dir, seed=5).arrival_s
    )
    # Each request stays inside its ~3-s tick; the quantisation artefact (IAT CV 3.03) disappears.
    offset = spread.arrival_s - raw.arrival_s
    assert offset.min() >= 0 and offset.max() < 3.01
    assert trace_stats(spread)["iat_cv"] == pytest.approx(1.0, abs=0.1)
    assert np.array_equal(spread.prompt_tokens, raw.prompt_tokens)


def test_spread_ticks_keeps_order_within_a_tick() -> None:
    arrival_s = np.array([0.0, 0.0, 0.0, 3.0, 3.0, 6.0])
    spread = spread_ticks(arrival_s, np.random.default_rng(0))
    assert np.all(np.diff(spread) >= 0)
    assert np.all((spread[:3] >= 0) & (spread[:3] < 3)) and np.all((spread[3:5] >= 3) & (spread[3:5] < 6))


@pytest.mark.shared
def test_vidur_processed_csv_equals_the_azure_conv_trace(
    traces_dir: Path, reference_profiles_dir: Path
) -> None:
    vidur = load_trace(reference_profiles_dir / "vidur_profiles/data/processed_traces/splitwise_conv.csv")
    azure = load_trace("azure-conv", data_dir=traces_dir)
    assert np.array_equal(vidur.prompt_tokens, azure.prompt_tokens)
    assert np.allclose(vidur.arrival_s, azure.arrival_s, atol=1e-5)


def test_registry_names_are_the_documented_ones() -> None:
    assert set(TRACE_NAMES) == {
        "azure-conv", "azure-code", "mooncake-conv", "mooncake-synthetic", "servegen-m-large", "servegen-m-mid",
        "servegen-m-small", "servegen-deepseek-r1", "servegen-mm-image", "default", "azure-conv-synthetic",
    }  # fmt: skip


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown trace 'azure-chat'.*azure-conv, azure-code"):
        load_trace("azure-chat")


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(TraceDataNotFoundError) as caught:
        load_trace("azure-conv", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "OPSCALE_DATA" in message and "'default'" in message


def test_unknown_option_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,5,6\n")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['rate_scale'\]"):
        load_trace(path, rate_scale=2.0)


# ---------------------------------------------------------------------------------------------- malformed input
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD_ROWS = "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ("", None, "file is empty"),
        (AZURE_HEADER, None, "no data rows"),
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,5\n", 1, r"missing column\(s\) \['GeneratedTokens'\]"),
        (AZURE_HEADER + GOOD_ROWS + "2023-11-16 18:15:51.0,-3,44\n", 4, "ContextTokens must be >= 1, got -3"),
        (AZURE_HEADER + GOOD_ROWS + "2023-11-16 18:15:51.0,0,44\n", 4, "ContextTokens must be >= 1, got 0"),
        (
            AZURE_HEADER + GOOD_ROWS + "2023-11-16 18:15:51.0,12,abc\n",
            4,
            "GeneratedTokens is not a number: 'abc'",
        ),
        (
            AZURE_HEADER + GOOD_ROWS + "2023-11-16 18:15:51.0,12.5,4\n",
            4,
            "ContextTokens is not a whole number",
        ),
        (
            AZURE_HEADER + "2023-11-16 18:15:46.6,374,44\n2023-11-16 18:15:40.0,5,5\n",
            3,
            "TIMESTAMP out of order",
        ),
        (AZURE_HEADER + "yesterday,374,44\n", 2, "TIMESTAMP is not an ISO 8601 date-time: 'yesterday'"),
        (AZURE_HEADER + GOOD_ROWS + "2023-11-16 18:15:51.0,12\n", 4, "expected 3 fields"),
    ],
)
def test_malformed_azure_csv_names_file_line_and_problem(
    tmp_path: Path, content: str, line: int | None, problem: str
) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(content)
    with pytest.raises(TraceFormatError, match=problem) as caught:
        load_trace(path)
    assert caught.value.line == line and caught.value.path == path
    assert str(caught.value).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_skip_bad_rows_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        AZURE_HEADER + GOOD_ROWS
        + "2023-11-16 18:15:52.0,-3,44\n2023-11-16 18:15:53.0,7\n2023-11-16 18:15:10.0,5,5\n2023-11-16 18:15:54.0,8,9\n"
    )  # fmt: skip
    trace = load_trace(path, skip_bad_rows=True)
    assert trace.prompt_tokens.tolist() == [374, 396, 8]
    assert trace.arrival_s[-1] == pytest.approx(54.0 - 46.68059)
    assert trace.notes == (
        "azure.csv: skipped 3 of 6 bad rows (first: line 4: ContextTokens must be >= 1, got -3)",
    )


def test_generic_csv_with_named_columns_units_and_sorting(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text('t_ms,in,out,img,comment\n2000,10,3,0,"a, b"\n1000,20,4,576,x\n')
    with pytest.raises(TraceFormatError, match="t_ms out of order"):
        load_trace(path, time_column="t_ms", prompt_column="in", output_column="out")
    trace = load_csv(path, time_column="t_ms", prompt_column="in", output_column="out", image_column="img",
                     time_format="ms", sort=True)  # fmt: skip
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    assert trace.prompt_tokens.tolist() == [20, 10] and trace.image_tokens is not None
    assert trace.image_tokens.tolist() == [576, 0]


MOONCAKE_GOOD = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ("", None, "file is empty"),
        (MOONCAKE_GOOD + '{"timestamp": 5, "input_length": 6\n', 2, "not valid JSON"),
        (
            MOONCAKE_GOOD + '{"timestamp": 5, "input_length": 6, "hash_ids": []}\n',
            2,
            r"missing field\(s\) \['output_length'\]",
        ),
        (
            MOONCAKE_GOOD + '{"timestamp": 5, "input_length": -6, "output_length": 1, "hash_ids": []}\n',
            2,
            "input_length must be >= 1",
        ),
        (
            MOONCAKE_GOOD + '{"timestamp": 5, "input_length": "6", "output_length": 1, "hash_ids": []}\n',
            2,
            "input_length is not a whole number",
        ),
        (
            '{"timestamp": 9, "input_length": 6, "output_length": 1, "hash_ids": []}\n' + MOONCAKE_GOOD,
            2,
            "timestamp out of order",
        ),
    ],
)
def test_malformed_mooncake_names_file_line_and_problem(
    tmp_path: Path, content: str, line: int | None, problem: str
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(content)
    with pytest.raises(TraceFormatError, match=problem) as caught:
        load_mooncake_jsonl(path)
    assert caught.value.line == line


def test_mooncake_skip_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        MOONCAKE_GOOD + "not json\n" + MOONCAKE_GOOD.replace('"timestamp": 0', '"timestamp": 3000')
    )
    trace = load_trace(path, skip_bad_rows=True)
    assert trace.arrival_s.tolist() == [0.0, 3.0] and "skipped 1 of 3" in trace.notes[0]
    assert [ids.tolist() for ids in trace.prefix_block_ids or ()] == [[0, 1], [0, 1]]
