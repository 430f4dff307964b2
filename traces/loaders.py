"""Loaders for per-request trace files: Azure LLM 2023 CSV, Vidur's processed CSV, Mooncake JSONL, any CSV.

Every loader validates every row. A malformed row (missing field, non-numeric or non-positive token
count, unparsable or out-of-order timestamp) raises :class:`~opscale.traces.errors.TraceFormatError`
naming the file, the 1-based line and the problem. With ``skip_bad_rows=True`` such rows are dropped
instead and the returned trace carries a note with the count and the first problem. Parsing is
vectorised (numpy) with a per-row pass only to locate problems, so the 19,366-row Azure conv trace loads
in a few tens of milliseconds.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from opscale.traces.errors import TraceFormatError
from opscale.traces.trace import RequestTrace


class TimeFormat(str, Enum):
    """How a time column is written."""

    SECONDS = "s"
    MILLISECONDS = "ms"
    DATETIME = "datetime"  # ISO 8601 wall-clock, e.g. "2023-11-16 18:15:46.6805900"


_SECONDS_PER_UNIT = {TimeFormat.SECONDS: 1.0, TimeFormat.MILLISECONDS: 1e-3}


@dataclass
class _RowChecker:
    """Collects bad rows of one file: raises on the earliest one, or records them when skipping."""

    path: Path
    skip_bad_rows: bool
    problems: dict[int, str] = field(default_factory=dict)  # line number -> first problem found

    def report(self, lines: np.ndarray, problems: Sequence[str]) -> None:
        if not len(lines):
            return
        if not self.skip_bad_rows:
            first = int(np.argmin(lines))
            raise TraceFormatError(self.path, int(lines[first]), problems[first])
        for line, problem in zip(lines.tolist(), problems, strict=True):
            self.problems.setdefault(int(line), problem)

    def note(self, total_rows: int) -> str | None:
        if not self.problems:
            return None
        first_line = min(self.problems)
        return (
            f"{self.path.name}: skipped {len(self.problems)} of {total_rows} bad rows "
            f"(first: line {first_line}: {self.problems[first_line]})"
        )


def _parse_integers(
    texts: list[str], column: str, lines: np.ndarray, checker: _RowChecker, *, minimum: int = 1
) -> np.ndarray:
    """Parse token counts (int64): whole numbers >= ``minimum``. Bad rows get 0 when skipping."""
    try:
        # Python's int() per field is several times faster than numpy's str -> int64 cast.
        values = np.fromiter(map(int, texts), dtype=np.int64, count=len(texts))
    except (ValueError, OverflowError):
        values = np.zeros(len(texts), dtype=np.int64)
        bad_lines, problems = [], []
        for position, text in enumerate(texts):
            try:
                number = float(text)
            except ValueError:
                bad_lines.append(lines[position])
                problems.append(f"{column} is not a number: {text!r}")
                continue
            if not (number.is_integer() and abs(number) < 2**63):
                bad_lines.append(lines[position])
                problems.append(f"{column} is not a whole number: {text!r}")
                continue
            values[position] = int(number)
        checker.report(np.asarray(bad_lines, dtype=np.int64), problems)
    parsed = ~np.isin(lines, list(checker.problems))
    too_small = np.flatnonzero((values < minimum) & parsed)
    checker.report(
        lines[too_small], [f"{column} must be >= {minimum}, got {values[i]}" for i in too_small.tolist()]
    )
    return values


def _parse_times(
    texts: list[str], column: str, time_format: TimeFormat, lines: np.ndarray, checker: _RowChecker
) -> np.ndarray:
    """Parse a time column into float64 seconds (absolute, not yet rebased). Bad rows get NaN."""
    if time_format is TimeFormat.DATETIME:

        def convert(values: list[str]) -> np.ndarray:
            nanoseconds = np.asarray(values, dtype="datetime64[ns]").astype(np.int64)
            return nanoseconds.astype(np.float64) * 1e-9

        problem = f"{column} is not an ISO 8601 date-time"
    else:
        scale = _SECONDS_PER_UNIT[time_format]

        def convert(values: list[str]) -> np.ndarray:
            return np.fromiter(map(float, values), dtype=np.float64, count=len(values)) * scale

        problem = f"{column} is not a number"
    try:
        seconds = convert(texts)
    except ValueError:
        seconds = np.full(len(texts), np.nan)
        bad_lines, problems = [], []
        for position, text in enumerate(texts):
            try:
                seconds[position] = convert([text])[0]
            except ValueError:
                bad_lines.append(lines[position])
                problems.append(f"{problem}: {text!r}")
        checker.report(np.asarray(bad_lines, dtype=np.int64), problems)
    not_finite = np.flatnonzero(~np.isfinite(seconds) & ~np.isin(lines, list(checker.problems)))
    checker.report(lines[not_finite], [f"{column} is not finite: {texts[i]!r}" for i in not_finite.tolist()])
    return seconds


def _check_order(
    seconds: np.ndarray, column: str, lines: np.ndarray, good: np.ndarray, checker: _RowChecker
) -> None:
    """Flag rows earlier than the latest accepted timestamp before them (``sort=False`` loaders)."""
    good_positions = np.flatnonzero(good)
    good_seconds = seconds[good_positions]
    running_max = np.maximum.accumulate(good_seconds) if good_seconds.size else good_seconds
    out_of_order = np.flatnonzero(good_seconds[1:] < running_max[:-1]) + 1
    checker.report(
        lines[good_positions[out_of_order]],
        [
            f"{column} out of order: {good_seconds[i]:.6f} s comes after {running_max[i - 1]:.6f} s"
            for i in out_of_order.tolist()
        ],
    )


@dataclass(frozen=True)
class _Columns:
    """Raw text columns of a table file plus the 1-based file line of every row."""

    values: dict[str, list[str]]
    lines: np.ndarray


def _read_csv(path: Path, wanted: Sequence[str], checker: _RowChecker) -> _Columns:
    """Read the named columns of a headed CSV as text. Rows with a wrong field count are bad rows."""
    text = path.read_text(encoding="utf-8-sig")
    # Plain str.split is several times faster than the csv module; quoted fields need the real parser.
    rows = (
        list(csv.reader(io.StringIO(text)))
        if '"' in text
        else [line.split(",") for line in text.splitlines()]
    )
    if not rows:
        raise TraceFormatError(path, None, "file is empty (expected a header line)")
    header = [name.strip() for name in rows[0]]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise TraceFormatError(path, 1, f"missing column(s) {missing}; the header has {header}")
    positions = [header.index(name) for name in wanted]
    width = len(header)
    data_lines, data_rows, bad_lines, problems = [], [], [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) == width:
            data_lines.append(line_number)
            data_rows.append(row)
        elif row and (len(row) > 1 or row[0].strip()):  # a blank line (e.g. a trailing newline) is no row
            bad_lines.append(line_number)
            problems.append(f"expected {width} fields ({','.join(header)}), got {len(row)}")
    checker.report(np.asarray(bad_lines, dtype=np.int64), problems)
    if not data_rows:
        raise TraceFormatError(path, None, "file has a header but no data rows")
    return _Columns(
        {
            name: [row[position].strip() for row in data_rows]
            for name, position in zip(wanted, positions, strict=True)
        },
        np.asarray(data_lines, dtype=np.int64),
    )


def load_csv(
    path: str | Path,
    *,
    time_column: str,
    prompt_column: str,
    output_column: str,
    image_column: str | None = None,
    time_format: TimeFormat | str = TimeFormat.SECONDS,
    skip_bad_rows: bool = False,
    sort: bool = False,
    rebase: bool = True,
    name: str | None = None,
) -> RequestTrace:
    """Load any headed CSV with one request per row.

    :param path: the CSV file.
    :param time_column: column with the arrival time.
    :param prompt_column: column with prompt tokens (whole numbers >= 1).
    :param output_column: column with output tokens (whole numbers >= 1).
    :param image_column: optional column with image tokens (>= 0).
    :param time_format: ``"s"``, ``"ms"`` or ``"datetime"`` (ISO 8601).
    :param skip_bad_rows: drop malformed rows (counted in the trace's notes) instead of raising.
    :param sort: sort rows by time instead of treating a backwards timestamp as an error.
    :param rebase: shift arrivals so the first request arrives at 0 s.
    :param name: trace name (default: the file stem).
    :raises TraceFormatError: empty file, missing column, or a malformed row (unless skipped).
    """
    path = Path(path)
    time_format = TimeFormat(time_format)
    checker = _RowChecker(path, skip_bad_rows)
    wanted = [time_column, prompt_column, output_column] + ([image_column] if image_column else [])
    columns = _read_csv(path, wanted, checker)
    lines = columns.lines
    seconds = _parse_times(columns.values[time_column], time_column, time_format, lines, checker)
    prompt_tokens = _parse_integers(columns.values[prompt_column], prompt_column, lines, checker)
    output_tokens = _parse_integers(columns.values[output_column], output_column, lines, checker)
    image_tokens = None
    if image_column:
        image_tokens = _parse_integers(columns.values[image_column], image_column, lines, checker, minimum=0)
    # Rows with a wrong field count never reached ``lines``; count them for the "skipped k of n" note.
    total_rows = len(lines) + len(set(checker.problems) - set(lines.tolist()))
    good = ~np.isin(lines, list(checker.problems))
    if sort:
        order = np.argsort(seconds, kind="stable")
        seconds, lines, prompt_tokens, output_tokens, good = (
            seconds[order],
            lines[order],
            prompt_tokens[order],
            output_tokens[order],
            good[order],
        )
        image_tokens = None if image_tokens is None else image_tokens[order]
    else:
        _check_order(seconds, time_column, lines, good, checker)
        good = ~np.isin(lines, list(checker.problems))
    if not good.any():
        raise TraceFormatError(path, None, f"no valid rows left ({checker.note(total_rows)})")
    arrival_s = seconds[good]
    if rebase:
        arrival_s = arrival_s - arrival_s[0]
    note = checker.note(total_rows)
    return RequestTrace(
        arrival_s=arrival_s,
        prompt_tokens=prompt_tokens[good],
        output_tokens=output_tokens[good],
        image_tokens=None if image_tokens is None else image_tokens[good],
        name=name if name is not None else path.stem,
        notes=(note,) if note else (),
    )


def load_azure_csv(path: str | Path, *, skip_bad_rows: bool = False, name: str | None = None) -> RequestTrace:
    """Load an Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Arrivals are seconds since the first row's wall-clock ``TIMESTAMP`` (no zone; only differences matter).
    """
    return load_csv(
        path,
        time_column="TIMESTAMP",
        prompt_column="ContextTokens",
        output_column="GeneratedTokens",
        time_format=TimeFormat.DATETIME,
        skip_bad_rows=skip_bad_rows,
        name=name,
    )


def load_vidur_csv(path: str | Path, *, skip_bad_rows: bool = False, name: str | None = None) -> RequestTrace:
    """Load Vidur's processed trace CSV (``arrived_at`` in s, ``num_prefill_tokens``, ``num_decode_tokens``)."""
    return load_csv(
        path,
        time_column="arrived_at",
        prompt_column="num_prefill_tokens",
        output_column="num_decode_tokens",
        time_format=TimeFormat.SECONDS,
        skip_bad_rows=skip_bad_rows,
        name=name,
    )


_MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _parse_mooncake_line(path: Path, line_number: int, text: str) -> tuple[float, int, int, np.ndarray]:
    """One Mooncake JSONL record -> (timestamp ms, input, output, hash ids); raises TraceFormatError."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise TraceFormatError(path, line_number, f"not valid JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise TraceFormatError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _MOONCAKE_FIELDS if key not in record]
    if missing:
        raise TraceFormatError(path, line_number, f"missing field(s) {missing}")
    timestamp_ms = record["timestamp"]
    if (
        isinstance(timestamp_ms, bool)
        or not isinstance(timestamp_ms, int | float)
        or not np.isfinite(timestamp_ms)
    ):
        raise TraceFormatError(path, line_number, f"timestamp is not a finite number: {timestamp_ms!r}")
    if timestamp_ms < 0:
        raise TraceFormatError(path, line_number, f"timestamp must be >= 0 ms, got {timestamp_ms}")
    lengths = []
    for key in ("input_length", "output_length"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TraceFormatError(path, line_number, f"{key} is not a whole number: {value!r}")
        if value < 1:
            raise TraceFormatError(path, line_number, f"{key} must be >= 1, got {value}")
        lengths.append(value)
    hash_ids = record["hash_ids"]
    # One numpy conversion checks the whole list (a float, bool, string or nested entry changes the dtype).
    block_ids = np.asarray(hash_ids) if isinstance(hash_ids, list) else np.zeros((0, 0))
    if block_ids.ndim != 1 or (block_ids.size and block_ids.dtype.kind not in "iu"):
        raise TraceFormatError(path, line_number, "hash_ids is not a list of integers")
    return float(timestamp_ms), lengths[0], lengths[1], block_ids.astype(np.int64)


def spread_ticks(arrival_s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spread requests that share a quantised timestamp uniformly over their tick.

    A tick lasts until the next distinct timestamp (Mooncake conversation: 2.997-3.003 s); the last tick
    lasts the median tick. Offsets are sorted so the order of requests within a tick (turn order) is kept.

    :param arrival_s: sorted arrival times with repeated values.
    :param rng: source of the uniform offsets.
    """
    if arrival_s.size < 2:
        return arrival_s.copy()
    tick_starts, counts = np.unique(arrival_s, return_counts=True)
    if tick_starts.size < 2:
        raise ValueError("spread_ticks needs at least two distinct timestamps to know the tick length")
    tick_lengths_s = np.diff(tick_starts)
    tick_lengths_s = np.append(tick_lengths_s, np.median(tick_lengths_s))
    offsets = rng.random(arrival_s.size)
    tick_of_request = np.repeat(np.arange(tick_starts.size), counts)
    # Sort the offsets inside each tick so the within-tick order of requests is kept.
    order = np.lexsort((offsets, tick_of_request))
    return tick_starts[tick_of_request] + offsets[order] * tick_lengths_s[tick_of_request]


def load_mooncake_jsonl(
    path: str | Path,
    *,
    rng: np.random.Generator | None = None,
    spread_tick_requests: bool = False,
    skip_bad_rows: bool = False,
    name: str | None = None,
) -> RequestTrace:
    """Load a Mooncake FAST'25 trace (JSONL: ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``).

    :param path: the JSONL file.
    :param rng: random source for :func:`spread_ticks`; required when ``spread_tick_requests`` is true.
    :param spread_tick_requests: spread requests sharing a quantised timestamp over the tick (the
        conversation trace is quantised to ~3 s ticks; see ``shared/traces/README.md`` section 2).
    :param skip_bad_rows: drop malformed lines (counted in the notes) instead of raising.
    :param name: trace name (default: the file stem).
    """
    path = Path(path)
    checker = _RowChecker(path, skip_bad_rows)
    timestamps_ms: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    hash_ids: list[np.ndarray] = []
    line_numbers: list[int] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                parsed = _parse_mooncake_line(path, line_number, text)
            except TraceFormatError as error:
                checker.report(np.asarray([line_number]), [error.problem])
                continue
            timestamps_ms.append(parsed[0])
            inputs.append(parsed[1])
            outputs.append(parsed[2])
            hash_ids.append(parsed[3])
            line_numbers.append(line_number)
    total_rows = len(line_numbers) + len(checker.problems)
    if total_rows == 0:
        raise TraceFormatError(path, None, "file is empty (expected one JSON object per line)")
    seconds = np.asarray(timestamps_ms, dtype=np.float64) * 1e-3
    lines = np.asarray(line_numbers, dtype=np.int64)
    _check_order(seconds, "timestamp", lines, np.ones(lines.size, dtype=bool), checker)
    good = ~np.isin(lines, list(checker.problems))
    if not good.any():
        raise TraceFormatError(path, None, f"no valid rows left ({checker.note(total_rows)})")
    arrival_s = seconds[good]
    arrival_s = arrival_s - arrival_s[0]
    if spread_tick_requests:
        if rng is None:
            raise ValueError("load_mooncake_jsonl(spread_tick_requests=True) needs rng (a numpy Generator)")
        arrival_s = spread_ticks(arrival_s, rng)
    good_positions = np.flatnonzero(good).tolist()
    note = checker.note(total_rows)
    return RequestTrace(
        arrival_s=arrival_s,
        prompt_tokens=np.asarray(inputs, dtype=np.int64)[good],
        output_tokens=np.asarray(outputs, dtype=np.int64)[good],
        prefix_block_ids=tuple(hash_ids[i] for i in good_positions),
        name=name if name is not None else path.stem,
        notes=(note,) if note else (),
    )
