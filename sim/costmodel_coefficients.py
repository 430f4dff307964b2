"""Coefficient types of the roofline cost model, and the fitted values per GPU.

The numbers in :data:`FITTED_COEFFICIENTS` are written by ``experiments/calibrate_costmodel.py``
(rerun it to reproduce them) from the Vidur operator profiles (``microsoft/vidur`` commit
``7d47513``, ``data/profiling``; MIT licence) read in place under ``../shared/reference``. Only the
fitted numbers live here; the profiles are never copied.

Not everything is fitted, because not everything was profiled (each entry's ``source`` says so):

* H100 attention: the only attention table is A100's; the H100 takes the A100 fit with its
  compute efficiencies scaled by FlashAttention-2's published utilisation on each GPU (~73 % of peak
  on A100, ~35 % on H100) and the same fraction of HBM bandwidth for decode.
* H100 cross-node all-reduce: A100 latency, bus bandwidth scaled by the measured H100/A100
  cross-node send/recv bandwidth ratio.
* H200: no profiles at all; it reuses every H100 coefficient (same GH100 compute), and its own
  4.8 TB/s HBM and 141 GB enter through :class:`opscale.sim.hardware.GPUSpec`, so memory-bound work
  (decode GEMMs, decode attention) runs ~1.4x faster than on an H100 and compute-bound work the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "ELEMENTWISE_KERNELS",
    "FITTED_COEFFICIENTS",
    "HELD_OUT_COEFFICIENTS",
    "STARTING_COEFFICIENTS",
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

    All-reduce (ring): ``latency + per_rank (n-2) + 2 (n-1)/n * bytes / bus_bandwidth``; send/recv:
    ``latency + bytes / bandwidth``. Intra-node (NVLink) and cross-node (InfiniBand) sets apart.
    """

    allreduce_latency_s: float
    allreduce_latency_per_rank_s: float
    allreduce_bus_bandwidth_bytes_per_s: float
    cross_node_allreduce_latency_s: float
    cross_node_allreduce_latency_per_rank_s: float
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
        cross_node_allreduce_latency_per_rank_s=1e-6,
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
        cross_node_allreduce_latency_per_rank_s=1e-6,
        cross_node_allreduce_bus_bandwidth_bytes_per_s=40e9,
        send_recv_latency_s=12e-6,
        send_recv_bandwidth_bytes_per_s=200e9,
        cross_node_send_recv_latency_s=20e-6,
        cross_node_send_recv_bandwidth_bytes_per_s=40e9,
    ),
    source="public figures (uncalibrated)",
)

#: Public-figure starting point of the fit (and what a GPU without profiles would fall back to).
STARTING_COEFFICIENTS: Mapping[str, GpuCoefficients] = MappingProxyType({"a100": _A100, "h100": _H100})

# Coefficients per GPU name. The H200 has no profiles: it reuses the H100 fit (same GH100 compute);
# its own HBM bandwidth enters through opscale.sim.hardware.GPUSpec.
# BEGIN FITTED (generated block)
# Written by experiments/calibrate_costmodel.py from the Vidur profiles (microsoft/vidur 7d47513,
# MIT). Do not edit by hand: rerun the script.
FITTED_COEFFICIENTS: Mapping[str, GpuCoefficients] = MappingProxyType(
    {
        "a100": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.738687,
                memory_efficiency=0.813662,
                smoothing_p=1.47783,
                launch_s=4.97397e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=1.30255e-06,
                        memory_efficiency=0.367828,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=1.01202e-06,
                        memory_efficiency=0.349251,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=2.19553e-06,
                        memory_efficiency=0.452871,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.84195e-06,
                        memory_efficiency=0.493857,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=7.69164e-07,
                        memory_efficiency=0.935131,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.30075e-06,
                memory_efficiency=0.154861,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.179126,
                prefill_cached_efficiency=0.422626,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=4.23486e-05,
                allreduce_latency_per_rank_s=1.31373e-06,
                allreduce_bus_bandwidth_bytes_per_s=1.68625e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=1.74211e10,
                send_recv_latency_s=1.3804e-05,
                send_recv_bandwidth_bytes_per_s=3.08776e11,
                cross_node_send_recv_latency_s=2.79292e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=7.76351e09,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur a100 profiles",
        ),
        "h100": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.737704,
                memory_efficiency=0.954396,
                smoothing_p=1.53418,
                launch_s=5.87466e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=2.41942e-06,
                        memory_efficiency=0.451015,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=1.62105e-06,
                        memory_efficiency=0.385539,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=1.85551e-06,
                        memory_efficiency=0.526421,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.61767e-06,
                        memory_efficiency=0.578962,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=4.62569e-07,
                        memory_efficiency=1.0,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.33111e-06,
                memory_efficiency=0.18936,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.0858825,
                prefill_cached_efficiency=0.202629,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=2.45972e-05,
                allreduce_latency_per_rank_s=8.42821e-07,
                allreduce_bus_bandwidth_bytes_per_s=3.47621e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=8.15024e10,
                send_recv_latency_s=7.63842e-06,
                send_recv_bandwidth_bytes_per_s=3.61084e11,
                cross_node_send_recv_latency_s=1.87243e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=3.63206e10,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur h100 profiles; attention and cross-node all-reduce derived from A100",
        ),
        "h200": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.737704,
                memory_efficiency=0.954396,
                smoothing_p=1.53418,
                launch_s=5.87466e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=2.41942e-06,
                        memory_efficiency=0.451015,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=1.62105e-06,
                        memory_efficiency=0.385539,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=1.85551e-06,
                        memory_efficiency=0.526421,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.61767e-06,
                        memory_efficiency=0.578962,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=4.62569e-07,
                        memory_efficiency=1.0,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.33111e-06,
                memory_efficiency=0.18936,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.0858825,
                prefill_cached_efficiency=0.202629,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=2.45972e-05,
                allreduce_latency_per_rank_s=8.42821e-07,
                allreduce_bus_bandwidth_bytes_per_s=3.47621e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=8.15024e10,
                send_recv_latency_s=7.63842e-06,
                send_recv_bandwidth_bytes_per_s=3.61084e11,
                cross_node_send_recv_latency_s=1.87243e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=3.63206e10,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur h100 profiles; attention and cross-node all-reduce derived from A100; H200 reuses the H100 fit",
        ),
    }
)

#: The same fit without codellama-34b (scored on it by ``opscale costmodel validate``).
HELD_OUT_COEFFICIENTS: Mapping[str, GpuCoefficients] = MappingProxyType(
    {
        "a100": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.737767,
                memory_efficiency=0.811932,
                smoothing_p=1.47718,
                launch_s=4.83321e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=1.25434e-06,
                        memory_efficiency=0.366402,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=9.51948e-07,
                        memory_efficiency=0.347502,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=2.11477e-06,
                        memory_efficiency=0.448554,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.87003e-06,
                        memory_efficiency=0.495239,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=7.38244e-07,
                        memory_efficiency=0.931973,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.21729e-06,
                memory_efficiency=0.153083,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.179126,
                prefill_cached_efficiency=0.422626,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=4.23486e-05,
                allreduce_latency_per_rank_s=1.31373e-06,
                allreduce_bus_bandwidth_bytes_per_s=1.68625e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=1.74211e10,
                send_recv_latency_s=1.3804e-05,
                send_recv_bandwidth_bytes_per_s=3.08776e11,
                cross_node_send_recv_latency_s=2.79292e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=7.76351e09,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur a100 profiles",
        ),
        "h100": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.748522,
                memory_efficiency=0.964448,
                smoothing_p=1.46368,
                launch_s=5.77222e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=2.4673e-06,
                        memory_efficiency=0.452073,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=1.87682e-06,
                        memory_efficiency=0.400589,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=1.78121e-06,
                        memory_efficiency=0.521998,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.61763e-06,
                        memory_efficiency=0.578529,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=4.83605e-07,
                        memory_efficiency=1.0,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.31636e-06,
                memory_efficiency=0.186778,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.0858825,
                prefill_cached_efficiency=0.202629,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=2.45972e-05,
                allreduce_latency_per_rank_s=8.42821e-07,
                allreduce_bus_bandwidth_bytes_per_s=3.47621e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=8.15024e10,
                send_recv_latency_s=7.63842e-06,
                send_recv_bandwidth_bytes_per_s=3.61084e11,
                cross_node_send_recv_latency_s=1.87243e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=3.63206e10,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur h100 profiles; attention and cross-node all-reduce derived from A100",
        ),
        "h200": GpuCoefficients(
            gemm=GemmCoefficients(
                compute_efficiency=0.748522,
                memory_efficiency=0.964448,
                smoothing_p=1.46368,
                launch_s=5.77222e-06,
            ),
            elementwise=MappingProxyType(
                {
                    "input_layernorm": ElementwiseCoefficients(
                        latency_s=2.4673e-06,
                        memory_efficiency=0.452073,
                    ),
                    "post_attention_layernorm": ElementwiseCoefficients(
                        latency_s=1.87682e-06,
                        memory_efficiency=0.400589,
                    ),
                    "attn_rope": ElementwiseCoefficients(
                        latency_s=1.78121e-06,
                        memory_efficiency=0.521998,
                    ),
                    "mlp_act": ElementwiseCoefficients(
                        latency_s=1.61763e-06,
                        memory_efficiency=0.578529,
                    ),
                    "add": ElementwiseCoefficients(
                        latency_s=4.83605e-07,
                        memory_efficiency=1.0,
                    ),
                }
            ),
            embedding=ElementwiseCoefficients(
                latency_s=2.31636e-06,
                memory_efficiency=0.186778,
            ),
            attention=AttentionCoefficients(
                prefill_floor_s=2.48886e-05,
                prefill_new_efficiency=0.0858825,
                prefill_cached_efficiency=0.202629,
                prefill_per_sequence_s=0.0,
                decode_floor_s=1.43574e-05,
                decode_per_sequence_s=2.16552e-08,
                decode_memory_efficiency=0.784591,
            ),
            collectives=CollectiveCoefficients(
                allreduce_latency_s=2.45972e-05,
                allreduce_latency_per_rank_s=8.42821e-07,
                allreduce_bus_bandwidth_bytes_per_s=3.47621e11,
                cross_node_allreduce_latency_s=0.000151638,
                cross_node_allreduce_latency_per_rank_s=4.39804e-06,
                cross_node_allreduce_bus_bandwidth_bytes_per_s=8.15024e10,
                send_recv_latency_s=7.63842e-06,
                send_recv_bandwidth_bytes_per_s=3.61084e11,
                cross_node_send_recv_latency_s=1.87243e-05,
                cross_node_send_recv_bandwidth_bytes_per_s=3.63206e10,
            ),
            source="fitted by experiments/calibrate_costmodel.py on the Vidur h100 profiles; attention and cross-node all-reduce derived from A100; H200 reuses the H100 fit",
        ),
    }
)
# END FITTED
