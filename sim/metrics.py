"""Metrics shared by both fidelities (``des`` and ``fluid``): SLOs, per-interval and per-run figures.

Both simulators return exactly these structures, so environments, autoscalers and experiments never
care which fidelity produced them.

SLO attainment (DESIGN.md 2.4): the share of requests whose TTFT <= ``slo.ttft_s`` and whose TBT
statistic (p99 or max of the request's gaps) <= ``slo.tbt_s``. Per interval, a request counts in the
interval where it is *decided*: when it completes, or earlier, when its TTFT deadline passes with no
first token (a violation known at that moment; it is not counted again at completion). This keeps
overload visible in the interval where it happens instead of when the backlog finally drains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opscale.sim.models import ModelSpec, UnitKind

TbtStatistic = Literal["p99", "max"]


@dataclass(frozen=True)
class SLO:
    """Latency service-level objective.

    :param ttft_s: time-to-first-token bound, seconds.
    :param tbt_s: time-between-tokens bound, seconds, applied to ``tbt_statistic`` of a request's gaps.
    :param tbt_statistic: ``"p99"`` or ``"max"`` of the request's TBT gaps.
    """

    ttft_s: float
    tbt_s: float
    tbt_statistic: TbtStatistic = "p99"

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tbt_s > 0):
            raise ValueError(f"SLO bounds must be positive, got ttft_s={self.ttft_s}, tbt_s={self.tbt_s}")
        if self.tbt_statistic not in ("p99", "max"):
            raise ValueError(f"tbt_statistic {self.tbt_statistic!r} is not 'p99' or 'max'")


def default_slo(model: ModelSpec) -> SLO:
    """DESIGN.md 2.4 defaults: TTFT 1 s for models of <= 8 B parameters, 2 s for larger and MoE; TBT 100 ms."""
    small_dense = model.num_experts == 0 and model.total_weight_bytes() / model.dtype_bytes <= 8.5e9
    return SLO(ttft_s=1.0 if small_dense else 2.0, tbt_s=0.1)


@dataclass
class UnitIntervalMetrics:
    """One scaling unit over one control interval.

    :param replicas: replicas serving at the end of the interval.
    :param pending_replicas: replicas still loading weights at the end of the interval.
    :param draining_replicas: replicas finishing their work before they leave.
    :param utilisation: busy time / (serving replicas x interval), 0..1 (time-averaged).
    :param queue_tokens: tokens waiting in the unit's queue, time-averaged over the interval
        (attention: tokens of requests waiting for admission).
    :param batch_fill: mean tokens per call / batch cap, 0..1.
    :param mean_wait_s: mean queueing delay of a call's work before service.
    :param mean_service_s: mean service time of a call (all layers).
    :param batch_cap_tokens: the unit's batch cap at the end of the interval.
    """

    replicas: int
    pending_replicas: int = 0
    draining_replicas: int = 0
    utilisation: float = 0.0
    queue_tokens: float = 0.0
    batch_fill: float = 0.0
    mean_wait_s: float = 0.0
    mean_service_s: float = 0.0
    batch_cap_tokens: int = 0


@dataclass
class IntervalMetrics:
    """Everything measured over one control interval ``[start_s, end_s)``.

    Latency figures cover the requests decided in the interval (see module docstring); they are
    ``0.0`` when none was. ``slo_attainment`` is ``1.0`` when ``decided == 0``.
    """

    start_s: float
    end_s: float
    arrivals: int = 0
    completions: int = 0
    decided: int = 0
    slo_met: int = 0
    slo_attainment: float = 1.0
    ttft_mean_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tbt_mean_s: float = 0.0
    tbt_p99_s: float = 0.0
    e2e_mean_s: float = 0.0
    prompt_tokens_served: int = 0
    output_tokens_served: int = 0
    preemptions: int = 0
    running_requests: int = 0
    waiting_requests: int = 0
    gpus_powered: int = 0
    gpus_powered_mean: float = 0.0
    gpu_seconds: float = 0.0
    energy_j: float = 0.0
    units: dict[UnitKind, UnitIntervalMetrics] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def arrival_rate_per_s(self) -> float:
        return self.arrivals / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def throughput_tokens_per_s(self) -> float:
        tokens = self.prompt_tokens_served + self.output_tokens_served
        return tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def goodput_requests_per_s(self) -> float:
        return self.slo_met / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class RunSummary:
    """A whole run: the figures an experiment table reports.

    :param requests: requests in the trace window that arrived; ``completed`` of them finished.
    :param energy_kwh: ``energy_j / 3.6e6``.
    """

    duration_s: float
    requests: int
    completed: int
    slo_attainment: float
    ttft_mean_s: float
    ttft_p99_s: float
    tbt_p99_s: float
    e2e_mean_s: float
    throughput_requests_per_s: float
    throughput_tokens_per_s: float
    goodput_requests_per_s: float
    preemptions: int
    gpus_mean: float
    gpus_peak: int
    gpu_seconds: float
    energy_j: float
    unit_utilisation: dict[UnitKind, float] = field(default_factory=dict)

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / 3.6e6
