"""Coefficient types of the roofline cost model, and the fitted values per GPU.

The numbers in :data:`FITTED_COEFFICIENTS` are written by ``experiments/calibrate_costmodel.py``
(rerun it to reproduce them) from the Vidur operator profiles (``microsoft/vidur`` commit
``7d47513``, ``data/profiling``; MIT licence) read in place under ``../shared/reference``. Only the
fitted numbers live here; the profiles are never copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "ELEMENTWISE_KERNELS",
    "FITTED_COEFFICIENTS",
    "HELD_OUT_COEFFICIENTS",
    "AttentionCoefficients",
    "CollectiveCoefficients",
    "ElementwiseCoefficients",
    "GemmCoefficients",
    "GpuCoefficients",
]

#: The per-layer elementwise kernels of the ``norm`` unit, named as in Vidur's ``mlp.csv``.
ELEMENTWISE_KERNELS: tuple[str, ...] = (
    "input_layernorm",
    "post_attention_layernorm",
    "attn_rope",
    "mlp_act",
    "add",
)


@dataclass(frozen=True)
class GemmCoefficients:
    """One parameter set shared by every GEMM on a GPU.

    ``t = launch_s + (t_c**p + t_m**p) ** (1/p)`` with ``t_c = flops / (peak * compute_efficiency)``,
    ``t_m = bytes / (hbm * memory_efficiency)``: a p-norm smoothing of ``max(t_c, t_m)`` (p -> inf is
    the plain roofline; finite p models the ridge where neither resource is saturated).

    :param compute_efficiency: achieved fraction of peak FLOP/s on large GEMMs.
    :param memory_efficiency: achieved fraction of HBM bandwidth on weight-streaming GEMMs.
    :param smoothing_p: p-norm exponent (>= 1).
    :param launch_s: fixed per-kernel floor, s.
    """

    compute_efficiency: float
    memory_efficiency: float
    smoothing_p: float
    launch_s: float


@dataclass(frozen=True)
class ElementwiseCoefficients:
    """A bandwidth-bound kernel: ``t = latency_s + bytes / (hbm * memory_efficiency)``."""

    latency_s: float
    memory_efficiency: float


@dataclass(frozen=True)
class AttentionCoefficients:
    """FlashAttention prefill and paged decode attention, per layer and TP shard.

    Prefill: ``floor + new_pairs_flops / (peak * prefill_new_efficiency)
    + cached_pairs_flops / (peak * prefill_cached_efficiency)`` (+ KV bytes at HBM speed), where new
    pairs are query-key pairs inside the chunk and cached pairs those against earlier context.
    Decode: ``floor + per_sequence_s * decodes + kv_bytes / (hbm * decode_memory_efficiency)``.
    """

    prefill_floor_s: float
    prefill_new_efficiency: float
    prefill_cached_efficiency: float
    prefill_per_sequence_s: float
    decode_floor_s: float
    decode_per_sequence_s: float
    decode_memory_efficiency: float


@dataclass(frozen=True)
class CollectiveCoefficients:
    """NCCL collectives as alpha-beta models.

    All-reduce (ring): ``latency + 2 (n-1)/n * bytes / bus_bandwidth``; send/recv:
    ``latency + bytes / bandwidth``. Intra-node (NVLink) and cross-node (InfiniBand) sets apart.
    """

    allreduce_latency_s: float
    allreduce_latency_per_rank_s: float
    allreduce_bus_bandwidth_bytes_per_s: float
    cross_node_allreduce_latency_s: float
    cross_node_allreduce_bus_bandwidth_bytes_per_s: float
    send_recv_latency_s: float
    send_recv_bandwidth_bytes_per_s: float
    cross_node_send_recv_latency_s: float
    cross_node_send_recv_bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class GpuCoefficients:
    """Everything the roofline model needs for one GPU type."""

    gemm: GemmCoefficients
    elementwise: Mapping[str, ElementwiseCoefficients]
    embedding: ElementwiseCoefficients
    attention: AttentionCoefficients
    collectives: CollectiveCoefficients
    source: str = ""


def _elementwise(latency_s: float, memory_efficiency: float) -> Mapping[str, ElementwiseCoefficients]:
    return MappingProxyType(
        {k: ElementwiseCoefficients(latency_s, memory_efficiency) for k in ELEMENTWISE_KERNELS}
    )


# --- Uncalibrated public-figure starting point (replaced by the fit below once calibrated). -------------
_A100 = GpuCoefficients(
    gemm=GemmCoefficients(compute_efficiency=0.70, memory_efficiency=0.80, smoothing_p=4.0, launch_s=8e-6),
    elementwise=_elementwise(4e-6, 0.75),
    embedding=ElementwiseCoefficients(8e-6, 0.6),
    attention=AttentionCoefficients(
        prefill_floor_s=10e-6,
        prefill_new_efficiency=0.45,
        prefill_cached_efficiency=0.55,
        prefill_per_sequence_s=0.0,
        decode_floor_s=8e-6,
        decode_per_sequence_s=0.5e-6,
        decode_memory_efficiency=0.75,
    ),
    collectives=CollectiveCoefficients(
        allreduce_latency_s=15e-6,
        allreduce_latency_per_rank_s=1e-6,
        allreduce_bus_bandwidth_bytes_per_s=200e9,
        cross_node_allreduce_latency_s=30e-6,
        cross_node_allreduce_bus_bandwidth_bytes_per_s=40e9,
        send_recv_latency_s=12e-6,
        send_recv_bandwidth_bytes_per_s=150e9,
        cross_node_send_recv_latency_s=20e-6,
        cross_node_send_recv_bandwidth_bytes_per_s=20e9,
    ),
    source="public figures (uncalibrated)",
)
_H100 = GpuCoefficients(
    gemm=GemmCoefficients(compute_efficiency=0.65, memory_efficiency=0.80, smoothing_p=4.0, launch_s=8e-6),
    elementwise=_elementwise(4e-6, 0.75),
    embedding=ElementwiseCoefficients(8e-6, 0.6),
    attention=AttentionCoefficients(
        prefill_floor_s=10e-6,
        prefill_new_efficiency=0.35,
        prefill_cached_efficiency=0.45,
        prefill_per_sequence_s=0.0,
        decode_floor_s=8e-6,
        decode_per_sequence_s=0.5e-6,
        decode_memory_efficiency=0.75,
    ),
    collectives=CollectiveCoefficients(
        allreduce_latency_s=15e-6,
        allreduce_latency_per_rank_s=1e-6,
        allreduce_bus_bandwidth_bytes_per_s=300e9,
        cross_node_allreduce_latency_s=30e-6,
        cross_node_allreduce_bus_bandwidth_bytes_per_s=40e9,
        send_recv_latency_s=12e-6,
        send_recv_bandwidth_bytes_per_s=200e9,
        cross_node_send_recv_latency_s=20e-6,
        cross_node_send_recv_bandwidth_bytes_per_s=40e9,
    ),
    source="public figures (uncalibrated)",
)

#: Coefficients per GPU name. The H200 has no profiles: it reuses the H100 fit (same GH100 compute);
#: its own HBM bandwidth enters through :class:`opscale.sim.hardware.GPUSpec`.
FITTED_COEFFICIENTS: Mapping[str, GpuCoefficients] = MappingProxyType(
    {"a100": _A100, "h100": _H100, "h200": _H100}
)

#: The same fit done without CodeLlama-34B (for the held-out check).
HELD_OUT_COEFFICIENTS: Mapping[str, GpuCoefficients] = FITTED_COEFFICIENTS
