"""Request traces: loaders for public traces, synthetic generators, the embedded default workload.

Everything downstream consumes a :class:`RequestTrace` (numpy columns, sorted arrivals). Get one with
:func:`load_trace` (a registered name from :data:`TRACE_NAMES` or a file path), :func:`default_trace`
(no data file needed) or :func:`synthetic_trace`; summarise it with :func:`trace_stats`.
"""

from opscale.traces.default import default_trace
from opscale.traces.errors import TraceDataNotFoundError, TraceFormatError
from opscale.traces.loaders import (
    TimeFormat,
    load_azure_csv,
    load_csv,
    load_mooncake_jsonl,
    load_vidur_csv,
    spread_ticks,
)
from opscale.traces.registry import (
    NAMED_TRACES,
    TRACE_NAMES,
    NamedTrace,
    TraceFormat,
    detect_format,
    load_trace,
)
from opscale.traces.servegen import ServeGenModel, servegen_trace
from opscale.traces.stats import format_stats, trace_stats
from opscale.traces.synthetic import (
    ArrivalProcess,
    ConstantRate,
    DiurnalSineRate,
    EmpiricalLengths,
    LengthDistribution,
    LognormalLengths,
    PiecewiseLinearRate,
    QuantileLengths,
    RateCurve,
    ReflectedRate,
    ScaledRate,
    StepRate,
    gamma_arrivals,
    generate_arrivals,
    poisson_arrivals,
    synthetic_trace,
)
from opscale.traces.trace import PREFIX_BLOCK_TOKENS, TRUNCATION_POLICIES, RequestTrace, TruncationPolicy

__all__ = [
    "NAMED_TRACES",
    "PREFIX_BLOCK_TOKENS",
    "TRACE_NAMES",
    "TRUNCATION_POLICIES",
    "ArrivalProcess",
    "ConstantRate",
    "DiurnalSineRate",
    "EmpiricalLengths",
    "LengthDistribution",
    "LognormalLengths",
    "NamedTrace",
    "PiecewiseLinearRate",
    "QuantileLengths",
    "RateCurve",
    "ReflectedRate",
    "RequestTrace",
    "ScaledRate",
    "ServeGenModel",
    "StepRate",
    "TimeFormat",
    "TraceDataNotFoundError",
    "TraceFormat",
    "TraceFormatError",
    "TruncationPolicy",
    "default_trace",
    "detect_format",
    "format_stats",
    "gamma_arrivals",
    "generate_arrivals",
    "load_azure_csv",
    "load_csv",
    "load_mooncake_jsonl",
    "load_trace",
    "load_vidur_csv",
    "poisson_arrivals",
    "servegen_trace",
    "spread_ticks",
    "synthetic_trace",
    "trace_stats",
]
