"""Summary statistics of a trace, with the definitions of ``shared/traces/README.md`` ("Definitions").

* span: last arrival minus first arrival; mean rate = requests / span.
* peak 1 s / peak 1 min: the largest number of arrivals in a 1-s (60-s) bin, bins aligned to the first
  arrival; the per-minute peak is also given in req/s (count / 60).
* IAT CV: std / mean (population std) of the inter-arrival times of the sorted arrivals; CV/min: CV of
  the per-minute counts over the complete minutes (the trailing partial minute is left out, as the
  README's figures do: azure conv 0.22, not the 0.25 that the 1.7-s last minute would give).
* token statistics: mean, p50 and p99 (numpy linear percentiles) and max over all requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from opscale.traces.trace import RequestTrace


def _peak_count(offsets_s: np.ndarray, bin_s: float) -> int:
    return int(np.bincount((offsets_s // bin_s).astype(np.int64)).max()) if offsets_s.size else 0


def _coefficient_of_variation(values: np.ndarray) -> float:
    mean = float(values.mean()) if values.size else 0.0
    return float(values.std() / mean) if mean > 0 else float("nan")


def _length_summary(tokens: np.ndarray) -> dict[str, float]:
    if not tokens.size:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p99 = np.percentile(tokens, [50, 99])
    return {"mean": float(tokens.mean()), "p50": float(p50), "p99": float(p99), "max": float(tokens.max())}


def trace_stats(trace: RequestTrace) -> dict[str, Any]:
    """Summary figures of ``trace`` (JSON-serialisable; NaN where undefined, e.g. an empty trace).

    Keys: ``name, requests, span_s, mean_rate_per_s, peak_1s_requests, peak_1min_requests,
    peak_1min_rate_per_s, iat_cv, per_minute_cv, prompt_tokens{mean,p50,p99,max},
    output_tokens{...}``, plus ``image_tokens{...}`` for multimodal traces and ``prefix_blocks_per_request``
    and ``prefix_reused_block_share`` (share of block ids seen earlier in the trace) when prefix ids exist.
    """
    arrival_s = trace.arrival_s
    requests = len(trace)
    span_s = float(arrival_s[-1] - arrival_s[0]) if requests else 0.0
    offsets_s = arrival_s - arrival_s[0] if requests else arrival_s
    per_minute = np.bincount((offsets_s // 60.0).astype(np.int64)) if requests else np.zeros(0)
    peak_1min = int(per_minute.max()) if requests else 0
    stats: dict[str, Any] = {
        "name": trace.name,
        "requests": requests,
        "span_s": span_s,
        "mean_rate_per_s": requests / span_s if span_s > 0 else float("nan"),
        "peak_1s_requests": _peak_count(offsets_s, 1.0),
        "peak_1min_requests": peak_1min,
        "peak_1min_rate_per_s": peak_1min / 60.0,
        "iat_cv": _coefficient_of_variation(np.diff(arrival_s)),
        "per_minute_cv": _coefficient_of_variation(per_minute[: int(span_s // 60.0)].astype(np.float64)),
        "prompt_tokens": _length_summary(trace.prompt_tokens),
        "output_tokens": _length_summary(trace.output_tokens),
    }
    if trace.image_tokens is not None:
        stats["image_tokens"] = _length_summary(trace.image_tokens)
    if trace.prefix_block_ids is not None:
        all_ids = np.concatenate(trace.prefix_block_ids) if requests else np.zeros(0, dtype=np.int64)
        unique_ids = np.unique(all_ids).size
        stats["prefix_blocks_per_request"] = all_ids.size / requests if requests else float("nan")
        stats["prefix_reused_block_share"] = 1.0 - unique_ids / all_ids.size if all_ids.size else float("nan")
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """Render :func:`trace_stats` output as an aligned, human-readable block."""

    def lengths(key: str) -> str:
        summary = stats[key]
        return f"mean {summary['mean']:,.1f} / p50 {summary['p50']:,.0f} / p99 {summary['p99']:,.0f} / max {summary['max']:,.0f}"

    lines = [
        f"trace            {stats['name']}",
        f"requests         {stats['requests']:,}",
        f"span             {stats['span_s']:,.1f} s ({stats['span_s'] / 60:,.1f} min)",
        f"mean rate        {stats['mean_rate_per_s']:.3f} req/s",
        f"peak 1 s         {stats['peak_1s_requests']} req",
        f"peak 1 min       {stats['peak_1min_requests']} req = {stats['peak_1min_rate_per_s']:.2f} req/s",
        f"IAT CV           {stats['iat_cv']:.3f}",
        f"CV per minute    {stats['per_minute_cv']:.3f}",
        f"prompt tokens    {lengths('prompt_tokens')}",
        f"output tokens    {lengths('output_tokens')}",
    ]
    if "image_tokens" in stats:
        lines.append(f"image tokens     {lengths('image_tokens')}")
    if "prefix_blocks_per_request" in stats:
        lines.append(
            f"prefix blocks    {stats['prefix_blocks_per_request']:.1f} per request, "
            f"{100 * stats['prefix_reused_block_share']:.1f} % seen before"
        )
    return "\n".join(lines)
