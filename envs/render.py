"""Rendering of an autoscaling environment's state: a text table (``"ansi"``) or an image (``"rgb_array"``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from opscale.sim.deployment import Deployment
from opscale.sim.metrics import SLO, IntervalMetrics

__all__ = ["render_ansi", "render_rgb"]


def _status(ok: bool) -> str:
    return "ok" if ok else "VIOLATED"


def render_ansi(
    *,
    deployment: Deployment,
    metrics: IntervalMetrics | None,
    reward_components: Mapping[str, float] | None,
    slo: SLO,
    slo_target: float,
    step: int,
    horizon: int,
    num_gpus: int,
    time_s: float,
) -> str:
    """A table of units (replicas, loading, utilisation, queue, batch cap and fill, call latency), then the
    cluster line (GPUs powered, power) and the SLO line (attainment, TTFT / TBT p99 against their bounds).

    :param deployment: the current deployment.
    :param metrics: the last interval's metrics, or ``None`` before any interval ran.
    :param reward_components: the last step's reward components, or ``None``.
    :param slo: the SLO the environment scores against.
    :param slo_target: attainment target of the reward.
    :param step: steps taken in this episode; ``horizon`` the episode's length.
    :param num_gpus: GPUs in the cluster.
    :param time_s: trace clock at the current boundary.
    """
    header = f"{'unit':<15}{'replicas':>9}{'loading':>8}{'util':>7}{'queue_tok':>11}{'batch_cap':>10}{'fill':>6}{'call_ms':>9}"
    granularity = deployment.granularity
    title = f"opscale  t={time_s:9.1f} s  step {step}/{horizon}  {deployment.model} on {deployment.gpu} ({granularity} level"
    title += f", {deployment.instances} instances)" if granularity == "model" else ")"
    lines = [title, header, "-" * len(header)]
    for unit, unit_deployment in deployment.units.items():
        unit_metrics = None if metrics is None else metrics.units.get(unit)
        if unit_metrics is None:
            lines.append(
                f"{unit.value:<15}{unit_deployment.replicas:>9}{'-':>8}{'-':>7}{'-':>11}{unit_deployment.batch_cap_tokens:>10}{'-':>6}{'-':>9}"
            )
            continue
        call_ms = 1e3 * (unit_metrics.mean_wait_s + unit_metrics.mean_service_s)
        lines.append(
            f"{unit.value:<15}{unit_metrics.replicas + unit_metrics.pending_replicas:>9}{unit_metrics.pending_replicas:>8}"
            f"{unit_metrics.utilisation:>7.2f}{unit_metrics.queue_tokens:>11.0f}{unit_metrics.batch_cap_tokens:>10}"
            f"{unit_metrics.batch_fill:>6.2f}{call_ms:>9.2f}"
        )
    lines.append("-" * len(header))
    if metrics is None:
        lines.append(f"GPUs powered: -/{num_gpus}   (no interval simulated yet)")
        return "\n".join(lines)
    lines.append(
        f"GPUs powered {metrics.gpus_powered}/{num_gpus} (mean {metrics.gpus_powered_mean:.2f})   "
        f"power {metrics.mean_power_w / 1e3:.2f} kW   arrivals {metrics.arrival_rate_per_s:.2f}/s   "
        f"running {metrics.running_requests}  waiting {metrics.waiting_requests}"
    )
    lines.append(
        f"SLO attainment {100 * metrics.slo_attainment:5.1f} % of {metrics.decided} (target {100 * slo_target:.0f} %: "
        f"{_status(metrics.slo_attainment >= slo_target)})   "
        f"TTFT p99 {metrics.ttft_p99_s:.3f}/{slo.ttft_s:g} s ({_status(metrics.ttft_p99_s <= slo.ttft_s)})   "
        f"TBT p99 {1e3 * metrics.tbt_p99_s:.1f}/{1e3 * slo.tbt_s:g} ms ({_status(metrics.tbt_p99_s <= slo.tbt_s)})"
    )
    if reward_components is not None:
        parts = "  ".join(f"{name} {value:+.3f}" for name, value in reward_components.items())
        lines.append(f"reward {sum(reward_components.values()):+.3f}  ({parts})")
    return "\n".join(lines)


#: Colours (RGB) of the ``rgb_array`` frame.
_BACKGROUND = (255, 255, 255)
_REPLICAS = (31, 119, 180)
_UTILISATION = (255, 127, 14)
_QUEUE = (214, 39, 40)
_OK = (44, 160, 44)
_VIOLATED = (214, 39, 40)
_GPUS = (127, 127, 127)


def render_rgb(
    observation_units: list[tuple[float, float, float]], slo_ok: bool, gpu_fraction: float
) -> np.ndarray:
    """An ``rgb_array`` frame (``uint8``, height x width x 3) of the cluster state.

    One group of three bars per unit: replicas (blue, share of the replica cap), utilisation (orange)
    and queue (red, log-scaled as in the observation), each in ``[0, 1]``; below them a strip that is
    green when the last interval met the SLO target and red when not, and a grey bar for the share of
    the cluster's GPUs powered.

    :param observation_units: per unit ``(replicas, utilisation, queue)`` normalised to ``[0, 1]``.
    :param slo_ok: whether the last interval met the attainment target.
    :param gpu_fraction: GPUs powered / cluster GPUs.
    """
    bar_px, gap_px, plot_px, strip_px = 6, 6, 120, 12
    width = max(64, len(observation_units) * (3 * bar_px + gap_px) + gap_px)
    frame = np.empty((plot_px + 2 * strip_px, width, 3), dtype=np.uint8)
    frame[:] = _BACKGROUND
    for index, values in enumerate(observation_units):
        left = gap_px + index * (3 * bar_px + gap_px)
        for offset, (value, colour) in enumerate(zip(values, (_REPLICAS, _UTILISATION, _QUEUE), strict=True)):
            height = round(plot_px * min(max(value, 0.0), 1.0))
            x = left + offset * bar_px
            frame[plot_px - height : plot_px, x : x + bar_px] = colour
    frame[plot_px : plot_px + strip_px, :] = _OK if slo_ok else _VIOLATED
    frame[plot_px + strip_px :, : round(width * min(max(gpu_fraction, 0.0), 1.0))] = _GPUS
    return frame
