"""ServeGen (Alibaba Bailian) workloads: per-client 10-minute rate windows turned into request streams.

The data (``shared/traces/servegen/raw/<category>/<model>/chunk-<client>-trace.csv``, README section 3)
is not per request: each row is one client's 600-s window ``window_start_s, rate_rps, iat_cv, pattern,
shape, scale``, where ``pattern`` is the inter-arrival law fitted in the window (``Gamma`` with scipy's
shape ``a`` or ``Weibull`` with shape ``c``; empty when the client was idle). As ServeGen does, each
active client-window becomes a renewal process with that law, its gaps rescaled to mean ``1 / rate``;
the model's stream is the superposition over clients. Each window's process starts in equilibrium
(see :mod:`opscale.traces.synthetic`), so window edges add no artificial arrival.

The language models span 14 days (about 0.2-2 billion requests), the others one day, so a load always
takes a time window: by default one hour, 20:00-21:00 of day 0 (``start_s = 72,000``, the span that
ServeGen's own examples use). ``rate_scale`` multiplies every client's rate (keeping its burstiness).

Token lengths: the per-client length distributions (``dataset.json``) are not in the data folder, so
lengths come from a lognormal per model fitted to the README's request-weighted p50 and p99 (table
"input mean / p50 / p99"): ``sigma = ln(p99 / p50) / 2.326``. Each is truncated at
:data:`MAX_SAMPLED_TOKENS`. The implied means differ from the README's means by the lognormal's misfit,
listed with each constant. Any :class:`~opscale.traces.synthetic.LengthDistribution` can be passed
instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from opscale.traces.errors import TraceFormatError
from opscale.traces.synthetic import ArrivalProcess, LengthDistribution, LognormalLengths, unit_rate_events
from opscale.traces.trace import RequestTrace

#: Width of one ServeGen rate window (s).
WINDOW_S = 600.0
#: Default load window: 20:00-21:00 of day 0 (ServeGen's examples use ``span(72000, 75600)``).
DEFAULT_START_S = 72_000.0
DEFAULT_DURATION_S = 3_600.0
#: Cap on sampled token counts (a 128 Ki context); the lognormal tails above it are < 0.1 % of requests.
MAX_SAMPLED_TOKENS = 131_072
#: A window whose total rate is below this share of the model's median total rate is flagged as a
#: probable telemetry gap (README: m-mid / m-small have runs of windows below 1 req/s out of thousands).
TELEMETRY_GAP_SHARE = 0.01

_CLIENT_FILE = re.compile(r"chunk-(\d+)-trace\.csv$")


class ServeGenModel(str, Enum):
    """The ServeGen models in the data folder, as ``<category>/<model>`` paths under ``raw/``."""

    M_LARGE = "language/m-large"
    M_MID = "language/m-mid"
    M_SMALL = "language/m-small"
    DEEPSEEK_R1 = "reason/deepseek-r1"
    MM_IMAGE = "multimodal/mm-image"


@dataclass(frozen=True)
class ServeGenLengths:
    """Lognormal length fits (p50, p99 from ``shared/traces/README.md`` section 3) for one model.

    :param prompt_p50: median prompt (text input) tokens. :param prompt_p99: 99th percentile.
    :param output_p50: median output tokens. :param output_p99: 99th percentile.
    :param image_p50: median image tokens (multimodal only). :param image_p99: 99th percentile.
    """

    prompt_p50: float
    prompt_p99: float
    output_p50: float
    output_p99: float
    image_p50: float | None = None
    image_p99: float | None = None

    def prompt(self) -> LognormalLengths:
        return LognormalLengths.from_median_p99(
            self.prompt_p50, self.prompt_p99, max_tokens=MAX_SAMPLED_TOKENS
        )

    def output(self) -> LognormalLengths:
        return LognormalLengths.from_median_p99(
            self.output_p50, self.output_p99, max_tokens=MAX_SAMPLED_TOKENS
        )

    def image(self) -> LognormalLengths | None:
        if self.image_p50 is None or self.image_p99 is None:
            return None
        return LognormalLengths.from_median_p99(
            self.image_p50, self.image_p99, min_tokens=0, max_tokens=MAX_SAMPLED_TOKENS
        )


#: Per-model length fits. Source: ``shared/traces/README.md`` section 3, request-weighted mixture of the
#: ServeGen ``dataset.json`` distributions. Lognormal means implied by (p50, p99) vs the README's means
#: (prompt; output): m-large 942 vs 914; 109 vs 155. m-mid 340 vs 307; 59.4 vs 50.8. m-small 133 vs 120;
#: 11.9 vs 14.9. deepseek-r1 1,635 vs 1,268; 1,607 vs 1,527. mm-image text 302 vs 572; 134 vs 130;
#: image 578 vs 650.
SERVEGEN_LENGTHS: dict[ServeGenModel, ServeGenLengths] = {
    ServeGenModel.M_LARGE: ServeGenLengths(601, 5_452, 53, 872),
    ServeGenModel.M_MID: ServeGenLengths(173, 2_583, 34, 397),
    ServeGenModel.M_SMALL: ServeGenLengths(40, 1_478, 3, 142),
    ServeGenModel.DEEPSEEK_R1: ServeGenLengths(208, 23_423, 792, 12_607),
    ServeGenModel.MM_IMAGE: ServeGenLengths(106, 3_064, 100, 587, image_p50=540, image_p99=1_271),
}


@dataclass(frozen=True)
class ClientWindows:
    """One client's rate windows (all arrays share one index).

    :param client_id: the ``chunk-<id>`` number.
    :param window_start_s: window starts (s from 00:00 of day 0).
    :param rate_per_s: mean request rate in the window.
    :param process: fitted inter-arrival law per window (``None`` when idle).
    :param shape: the law's shape parameter per window.
    """

    client_id: int
    window_start_s: np.ndarray
    rate_per_s: np.ndarray
    process: tuple[ArrivalProcess | None, ...]
    shape: np.ndarray


_PATTERNS = {"Gamma": ArrivalProcess.GAMMA, "Weibull": ArrivalProcess.WEIBULL, "": None}


def read_client_windows(path: Path) -> ClientWindows:
    """Parse one ``chunk-<id>-trace.csv`` (no header; 6 fields per row), validating every row.

    Checks are vectorised; a per-row pass runs only to name the line of a non-numeric field.
    """
    match = _CLIENT_FILE.search(path.name)
    if match is None:
        raise TraceFormatError(path, None, "file name does not look like chunk-<client>-trace.csv")
    numbered = [
        (number, text.split(","))
        for number, text in enumerate(path.read_text().splitlines(), 1)
        if text.strip()
    ]
    if not numbered:
        raise TraceFormatError(path, None, "file is empty (expected one 10-minute window per line)")
    for line_number, fields in numbered:
        if len(fields) != 6:
            raise TraceFormatError(
                path,
                line_number,
                f"expected 6 fields (window_start_s,rate_rps,iat_cv,pattern,shape,scale), got {len(fields)}",
            )
    lines = np.asarray([number for number, _ in numbered])
    try:
        # Python's float() on the three numeric fields is several times faster than numpy's str->float.
        numbers = np.asarray(
            [(float(fields[0]), float(fields[1]), float(fields[4])) for _, fields in numbered]
        )
    except ValueError:
        for line_number, fields in numbered:
            try:
                [float(fields[i]) for i in (0, 1, 4)]
            except ValueError:
                raise TraceFormatError(
                    path, line_number, f"non-numeric window_start_s, rate_rps or shape: {','.join(fields)!r}"
                ) from None
        raise
    start_s, rate_per_s, shape = numbers.T
    pattern_names = [fields[3] for _, fields in numbered]
    patterns = np.asarray(pattern_names, dtype=str)

    def fail_first(bad: np.ndarray, problem: str) -> None:
        if bad.any():
            fields = numbered[int(np.argmax(bad))][1]
            values = {name: fields[column] for name, column in _FIELDS.items()}
            raise TraceFormatError(path, int(lines[int(np.argmax(bad))]), problem.format(**values))

    fail_first(
        ~np.isin(patterns, list(_PATTERNS)),
        "unknown pattern {pattern!r}; expected one of Gamma, Weibull or empty",
    )
    fail_first(~(np.isfinite(rate_per_s) & (rate_per_s >= 0)), "rate_rps must be finite and >= 0, got {rate}")
    fail_first(
        (rate_per_s > 0) & (patterns != "") & ~(np.isfinite(shape) & (shape > 0)),
        "shape must be > 0 for a {pattern} window, got {shape}",
    )
    fail_first(
        np.concatenate([[False], np.diff(start_s) <= 0]),
        "window_start_s {start} does not follow the previous window",
    )
    return ClientWindows(
        client_id=int(match.group(1)),
        window_start_s=start_s,
        rate_per_s=rate_per_s,
        process=tuple(_PATTERNS[pattern] for pattern in pattern_names),
        shape=shape,
    )


#: Columns of a client file, by the names the error messages use.
_FIELDS = {"start": 0, "rate": 1, "pattern": 3, "shape": 4}


def read_model_clients(model_dir: Path) -> list[ClientWindows]:
    """All clients of one model directory, sorted by client id."""
    numbered = [(_CLIENT_FILE.search(path.name), path) for path in model_dir.glob("chunk-*-trace.csv")]
    files = [path for _, path in sorted((int(m.group(1)), p) for m, p in numbered if m is not None)]
    if not files:
        raise FileNotFoundError(f"no chunk-<client>-trace.csv files in {model_dir}")
    return [read_client_windows(path) for path in files]


def servegen_trace(
    model_dir: str | Path,
    rng: np.random.Generator,
    *,
    start_s: float = DEFAULT_START_S,
    duration_s: float = DEFAULT_DURATION_S,
    rate_scale: float = 1.0,
    prompt_lengths: LengthDistribution | None = None,
    output_lengths: LengthDistribution | None = None,
    image_lengths: LengthDistribution | None = None,
    name: str | None = None,
) -> RequestTrace:
    """Generate the request stream of one ServeGen model over ``[start_s, start_s + duration_s)``.

    :param model_dir: ``.../servegen/raw/<category>/<model>``.
    :param rng: random source (arrivals client by client, then lengths).
    :param start_s: window start, seconds from 00:00 of day 0 (e.g. ``day * 86400 + hour * 3600``).
    :param duration_s: window length (s); arrivals are rebased so the window starts at 0.
    :param rate_scale: multiplier on every client's rate (> 0).
    :param prompt_lengths: prompt-token law (default: the model's lognormal fit, :data:`SERVEGEN_LENGTHS`).
    :param output_lengths: output-token law (default: the model's fit).
    :param image_lengths: image-token law (default: the model's fit, multimodal only).
    :param name: trace name (default ``servegen-<model>``).
    :raises ValueError: a window outside the data's span, or a non-positive scale.
    """
    model_dir = Path(model_dir)
    if not (np.isfinite(rate_scale) and rate_scale > 0):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale}")
    if not (np.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive finite number, got {duration_s}")
    clients = read_model_clients(model_dir)
    data_end_s = max(float(client.window_start_s[-1]) for client in clients) + WINDOW_S
    end_s = start_s + duration_s
    if not 0 <= start_s < end_s <= data_end_s:
        raise ValueError(
            f"ServeGen window [{start_s:g}, {end_s:g}) s is outside the data of {model_dir.name}, "
            f"which covers [0, {data_end_s:g}) s = {data_end_s / 86400:g} day(s); "
            f"choose start_s (day * 86400 + hour * 3600) and duration_s inside it"
        )
    arrivals: list[np.ndarray] = []
    total_rate_per_window: dict[float, float] = {}
    for client in clients:
        in_range = (client.window_start_s + WINDOW_S > start_s) & (client.window_start_s < end_s)
        for index in np.flatnonzero(in_range).tolist():
            window_start_s = float(client.window_start_s[index])
            rate = float(client.rate_per_s[index]) * rate_scale
            total_rate_per_window[window_start_s] = total_rate_per_window.get(window_start_s, 0.0) + rate
            if rate <= 0:
                continue
            process = client.process[index] or ArrivalProcess.POISSON
            shape = float(client.shape[index]) if client.process[index] else 1.0
            # The window's process in unit time (mean gap 1), then stretched to mean gap 1 / rate.
            events = (
                unit_rate_events(rate * WINDOW_S, rng, process=process, shape=shape) / rate + window_start_s
            )
            arrivals.append(events[(events >= start_s) & (events < end_s)])
    arrival_s = np.sort(np.concatenate(arrivals)) - start_s if arrivals else np.zeros(0)
    model = _model_of(model_dir)
    fitted = SERVEGEN_LENGTHS.get(model) if model is not None else None
    prompt_law = prompt_lengths or (fitted.prompt() if fitted else None)
    output_law = output_lengths or (fitted.output() if fitted else None)
    if prompt_law is None or output_law is None:
        raise ValueError(f"no length fit for {model_dir}; pass prompt_lengths and output_lengths")
    image_law = image_lengths or (fitted.image() if fitted else None)
    count = arrival_s.size
    return RequestTrace(
        arrival_s=arrival_s,
        prompt_tokens=prompt_law.sample(count, rng),
        output_tokens=output_law.sample(count, rng),
        image_tokens=None if image_law is None else image_law.sample(count, rng),
        name=name or f"servegen-{model_dir.name}",
        time_range_s=(0.0, duration_s),
        notes=_telemetry_gap_notes(clients, total_rate_per_window, rate_scale),
    )


def _model_of(model_dir: Path) -> ServeGenModel | None:
    key = f"{model_dir.parent.name}/{model_dir.name}"
    return next((model for model in ServeGenModel if model.value == key), None)


def _telemetry_gap_notes(
    clients: list[ClientWindows], total_rate_per_window: dict[float, float], rate_scale: float
) -> tuple[str, ...]:
    """Flag windows of the selection whose total rate looks like a telemetry gap, not idleness."""
    all_starts = np.unique(np.concatenate([client.window_start_s for client in clients]))
    totals = np.zeros(all_starts.size)
    for client in clients:
        totals[np.searchsorted(all_starts, client.window_start_s)] += client.rate_per_s
    threshold = TELEMETRY_GAP_SHARE * float(np.median(totals)) * rate_scale
    gaps = sorted(start for start, total in total_rate_per_window.items() if total < threshold)
    if not gaps:
        return ()
    return (
        f"{len(gaps)} selected 10-min window(s) (starting at {', '.join(f'{g:g}' for g in gaps)} s) carry < "
        f"{100 * TELEMETRY_GAP_SHARE:g} % of the median total rate: probably telemetry gaps in the data, "
        "not idle time (shared/traces/README.md section 3)",
    )
