"""Named traces and :func:`load_trace`, the one entry point the rest of opscale uses.

Names resolve to files under the data directory (:func:`opscale.paths.data_dir`: ``$OPSCALE_DATA``,
else ``../shared/traces`` beside the checkout) except the embedded ``default`` workload, which needs
no file. A path to a trace file (or a ServeGen model folder) works too; its format is recognised from
its extension and header.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from opscale import paths
from opscale.traces.default import DEFAULT_TRACE_NAME, default_trace
from opscale.traces.errors import TraceDataNotFoundError, TraceFormatError
from opscale.traces.loaders import load_azure_csv, load_csv, load_mooncake_jsonl, load_vidur_csv
from opscale.traces.servegen import DEFAULT_DURATION_S, DEFAULT_START_S, servegen_trace
from opscale.traces.trace import RequestTrace


class TraceFormat(str, Enum):
    """File formats :func:`load_trace` understands."""

    AZURE_CSV = "azure-csv"
    VIDUR_CSV = "vidur-csv"
    GENERIC_CSV = "csv"
    MOONCAKE_JSONL = "mooncake-jsonl"
    SERVEGEN_DIR = "servegen"
    EMBEDDED = "embedded"


@dataclass(frozen=True)
class NamedTrace:
    """A registered trace.

    :param name: the name users type.
    :param trace_format: how it is loaded.
    :param relative_path: file or folder under the data directory (``None`` for the embedded default).
    :param description: one line for ``opscale trace list``.
    :param preset: options fixed by the name (the caller may override them).
    """

    name: str
    trace_format: TraceFormat
    relative_path: str | None
    description: str
    preset: Mapping[str, Any] | None = None


_SERVEGEN_WINDOW = "default window: day 0, 20:00-21:00"

NAMED_TRACES: dict[str, NamedTrace] = {
    spec.name: spec
    for spec in (
        NamedTrace("azure-conv", TraceFormat.AZURE_CSV, "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
                   "Azure LLM 2023 conversation: 19,366 req over 58 min, ramping, near-Poisson"),
        NamedTrace("azure-code", TraceFormat.AZURE_CSV, "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
                   "Azure LLM 2023 code: 8,819 req over 57 min, on/off bursts (IAT CV 13)"),
        NamedTrace("mooncake-conv", TraceFormat.MOONCAKE_JSONL, "mooncake_fast25/conversation_trace.jsonl",
                   "Kimi/Mooncake conversation: 12,031 req over 59 min, long prompts, prefix ids; 3-s ticks spread",
                   preset={"spread_ticks": True}),
        NamedTrace("mooncake-synthetic", TraceFormat.MOONCAKE_JSONL, "mooncake_fast25/synthetic_trace.jsonl",
                   "Kimi/Mooncake synthetic: 3,993 req over 17 min, Poisson arrivals, heavy prefix reuse"),
        NamedTrace("servegen-m-large", TraceFormat.SERVEGEN_DIR, "servegen/raw/language/m-large",
                   f"Alibaba Bailian large language model, 162 clients, 14 days, ~196 req/s mean ({_SERVEGEN_WINDOW})"),
        NamedTrace("servegen-m-mid", TraceFormat.SERVEGEN_DIR, "servegen/raw/language/m-mid",
                   f"Alibaba Bailian mid language model, 109 clients, 14 days, ~1,790 req/s mean ({_SERVEGEN_WINDOW})"),
        NamedTrace("servegen-m-small", TraceFormat.SERVEGEN_DIR, "servegen/raw/language/m-small",
                   f"Alibaba Bailian small language model, 43 clients, 14 days, ~1,174 req/s mean ({_SERVEGEN_WINDOW})"),
        NamedTrace("servegen-deepseek-r1", TraceFormat.SERVEGEN_DIR, "servegen/raw/reason/deepseek-r1",
                   f"Alibaba Bailian DeepSeek-R1, 73 clients, 1 day, ~16 req/s mean, long outputs ({_SERVEGEN_WINDOW})"),
        NamedTrace("servegen-mm-image", TraceFormat.SERVEGEN_DIR, "servegen/raw/multimodal/mm-image",
                   f"Alibaba Bailian multimodal (image), 35 clients, 1 day, ~9.5 req/s mean ({_SERVEGEN_WINDOW})"),
        NamedTrace(DEFAULT_TRACE_NAME, TraceFormat.EMBEDDED, None,
                   "embedded Azure-conv-like workload fitted in code; needs no data file"),
        NamedTrace("azure-conv-synthetic", TraceFormat.EMBEDDED, None, "alias of 'default'"),
    )
}  # fmt: skip

#: Every registered trace name.
TRACE_NAMES: tuple[str, ...] = tuple(NAMED_TRACES)


def _check_options(trace: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"trace {trace!r} does not take option(s) {unknown}; it accepts {sorted(allowed)}")


def _servegen_start_s(trace: str, options: dict[str, Any]) -> float:
    """``start_s`` from either ``start_s`` or ``day`` / ``hour`` (seconds from 00:00 of day 0)."""
    has_day_hour = "day" in options or "hour" in options
    if has_day_hour and "start_s" in options:
        raise ValueError(f"trace {trace!r}: give either start_s or day/hour, not both")
    if has_day_hour:
        day, hour = int(options.pop("day", 0)), float(options.pop("hour", 0))
        if day < 0 or not 0 <= hour < 24:
            raise ValueError(f"trace {trace!r}: need day >= 0 and 0 <= hour < 24, got day={day}, hour={hour}")
        return day * 86_400.0 + hour * 3_600.0
    return float(options.pop("start_s", DEFAULT_START_S))


_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_VIDUR_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


def _load_generic_csv(
    path: Path, name: str, _rng: np.random.Generator, options: dict[str, Any]
) -> RequestTrace:
    required = ("time_column", "prompt_column", "output_column")
    missing = [option for option in required if option not in options]
    if missing:
        raise ValueError(
            f"{path} is neither an Azure ({','.join(_AZURE_COLUMNS)}) nor a Vidur ({','.join(_VIDUR_COLUMNS)}) "
            f"CSV; name its columns with the options {list(required)} (missing: {missing})"
        )
    return load_csv(path, name=name, **options)


def _load_mooncake(path: Path, name: str, rng: np.random.Generator, options: dict[str, Any]) -> RequestTrace:
    spread = bool(options.pop("spread_ticks", False))
    return load_mooncake_jsonl(path, name=name, rng=rng, spread_tick_requests=spread, **options)


def _load_servegen(path: Path, name: str, rng: np.random.Generator, options: dict[str, Any]) -> RequestTrace:
    start_s = _servegen_start_s(name, options)
    duration_s = float(options.pop("duration_s", DEFAULT_DURATION_S))
    return servegen_trace(path, rng, start_s=start_s, duration_s=duration_s, name=name, **options)


FileLoader = Callable[[Path, str, np.random.Generator, dict[str, Any]], RequestTrace]

#: Per file format: the options it accepts and its loader ``(path, name, rng, options)``.
_FILE_LOADERS: dict[TraceFormat, tuple[tuple[str, ...], FileLoader]] = {
    TraceFormat.AZURE_CSV: (
        ("skip_bad_rows",),
        lambda path, name, _rng, options: load_azure_csv(path, name=name, **options),
    ),
    TraceFormat.VIDUR_CSV: (
        ("skip_bad_rows",),
        lambda path, name, _rng, options: load_vidur_csv(path, name=name, **options),
    ),
    TraceFormat.GENERIC_CSV: (
        (
            "time_column",
            "prompt_column",
            "output_column",
            "image_column",
            "time_format",
            "skip_bad_rows",
            "sort",
            "rebase",
        ),
        _load_generic_csv,
    ),
    TraceFormat.MOONCAKE_JSONL: (("skip_bad_rows", "spread_ticks"), _load_mooncake),
    TraceFormat.SERVEGEN_DIR: (
        (
            "start_s",
            "day",
            "hour",
            "duration_s",
            "rate_scale",
            "prompt_lengths",
            "output_lengths",
            "image_lengths",
        ),
        _load_servegen,
    ),
}


def _load_file(
    trace_format: TraceFormat, path: Path, name: str, rng: np.random.Generator, options: dict[str, Any]
) -> RequestTrace:
    """Load ``path`` in ``trace_format`` with the caller's options (validated per format)."""
    allowed, loader = _FILE_LOADERS[trace_format]
    _check_options(name, options, allowed)
    return loader(path, name, rng, dict(options))


def detect_format(path: Path) -> TraceFormat:
    """Recognise a trace file's format: ServeGen folder, ``.jsonl`` (Mooncake), or a CSV by its header."""
    if path.is_dir():
        if any(path.glob("chunk-*-trace.csv")):
            return TraceFormat.SERVEGEN_DIR
        raise ValueError(f"{path} is a folder without ServeGen chunk-<client>-trace.csv files")
    if path.suffix == ".jsonl":
        return TraceFormat.MOONCAKE_JSONL
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = {column.strip() for column in next(csv.reader(handle), [])}
        if not header:
            raise TraceFormatError(path, None, "file is empty (expected a header line)")
        # One signature column is enough: the loader then names any column that is missing.
        if header & set(_AZURE_COLUMNS):
            return TraceFormat.AZURE_CSV
        if header & set(_VIDUR_COLUMNS):
            return TraceFormat.VIDUR_CSV
        return TraceFormat.GENERIC_CSV
    raise ValueError(
        f"cannot tell the format of {path}: expected a .csv, a .jsonl or a ServeGen model folder"
    )


def _missing_data_error(spec: NamedTrace, path: Path, data_dir: str | Path | None) -> TraceDataNotFoundError:
    if data_dir is not None:
        looked = f"the data_dir argument {data_dir}"
    elif os.environ.get("OPSCALE_DATA"):
        looked = f"$OPSCALE_DATA={os.environ['OPSCALE_DATA']}"
    else:
        looked = f"the data directory {paths.data_dir()} (searched: {paths.searched_locations('OPSCALE_DATA', 'traces')})"
    return TraceDataNotFoundError(
        f"trace {spec.name!r} needs {spec.relative_path}, but {path} does not exist; looked in {looked}. "
        f"Point OPSCALE_DATA at the folder holding azure_llm_2023/, mooncake_fast25/ and servegen/ "
        f"(or pass data_dir=...), or use the embedded trace 'default', which needs no file."
    )


def load_trace(
    name_or_path: str | Path, *, seed: int = 0, data_dir: str | Path | None = None, **options: Any
) -> RequestTrace:
    """Load a named trace (see :data:`TRACE_NAMES`) or a trace file / ServeGen folder by path.

    :param name_or_path: a registered name or a path.
    :param seed: seed of the random draws some traces need (embedded default, ServeGen arrivals and
        lengths, Mooncake tick spreading); the real per-request traces ignore it otherwise.
    :param data_dir: folder holding the public traces (default :func:`opscale.paths.data_dir`).
    :param options: per-format options. Azure / Vidur CSV: ``skip_bad_rows``. Mooncake:
        ``skip_bad_rows``, ``spread_ticks`` (on for ``mooncake-conv``). ServeGen: ``start_s`` or
        ``day`` + ``hour``, ``duration_s`` (default 20:00-21:00 of day 0), ``rate_scale``, length
        distributions. Embedded default: ``duration_s``, ``rate_scale``. Generic CSV: the column names
        of :func:`opscale.traces.loaders.load_csv`.
    :raises ValueError: unknown name (the message lists the valid ones) or unknown option.
    :raises TraceDataNotFoundError: the named trace's file is missing (says where it looked).
    """
    rng = np.random.default_rng(seed)
    spec = NAMED_TRACES.get(str(name_or_path))
    if spec is not None:
        merged = {**(spec.preset or {}), **options}
        if spec.trace_format is TraceFormat.EMBEDDED:
            _check_options(spec.name, merged, ("duration_s", "rate_scale"))
            return default_trace(seed=seed, **merged)
        assert spec.relative_path is not None
        path = Path(data_dir if data_dir is not None else paths.data_dir()) / spec.relative_path
        if not path.exists():
            raise _missing_data_error(spec, path, data_dir)
        return _load_file(spec.trace_format, path, spec.name, rng, merged)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_file(detect_format(path), path, path.stem, rng, dict(options))
    raise ValueError(
        f"unknown trace {str(name_or_path)!r}: not a registered name and no such file; "
        f"valid names: {', '.join(TRACE_NAMES)}"
    )
