"""The calibrated analytic (roofline) backend of :mod:`opscale.sim.costmodel`.

GEMMs: ``launch + (t_c**p + t_m**p)**(1/p)``, one parameter set per GPU shared by every GEMM and model;
elementwise kernels: ``latency + bytes / (HBM x efficiency)`` each; prefill attention: separate
efficiencies for new-token and cached-context query-key pairs (bounded below by reading the KV once);
decode attention: memory-bound with a floor and a per-sequence term; collectives: alpha-beta fits.
Efficiencies are <= 1, so no answer is faster than peak FLOP/s or HBM bandwidth allow, and every
term grows monotonically with tokens and context, at any length.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from opscale.sim.costmodel_api import (
    AttentionBatch,
    as_nonnegative_array,
    maximum,
    minimum,
    split_prefill_pairs,
    when_positive,
)
from opscale.sim.costmodel_coefficients import (
    FITTED_COEFFICIENTS,
    AttentionCoefficients,
    CollectiveCoefficients,
    ElementwiseCoefficients,
    GemmCoefficients,
    GpuCoefficients,
)
from opscale.sim.hardware import GPUSpec
from opscale.sim.models import GemmShape, ModelSpec, Numeric, UnitKind

__all__ = [
    "DEFAULT_GPUS_PER_NODE",
    "RooflineCostModel",
    "allreduce_time_s",
    "decode_attention_time_s",
    "elementwise_time_s",
    "gemm_time_s",
    "prefill_attention_time_s",
    "send_recv_time_s",
]

#: GPUs per node assumed by the collectives when a TP group size alone must tell intra- from
#: cross-node (DGX A100 / H100 / H200).
DEFAULT_GPUS_PER_NODE = 8

#: Entries kept by the per-instance memo of :meth:`RooflineCostModel.unit_time_s` before it is
#: cleared (bounded memory; a clear costs one recomputation per key).
UNIT_CACHE_MAX_ENTRIES = 1 << 18


def _pnorm(a: Numeric, b: Numeric, p: float) -> Numeric:
    """``(a**p + b**p) ** (1/p)`` computed stably (scaled by the larger term); 0 when both are 0."""
    top = maximum(a, b)
    safe = maximum(top, 1e-300)
    return when_positive(top, top * ((a / safe) ** p + (b / safe) ** p) ** (1.0 / p))


def gemm_time_s(
    shape: GemmShape, tokens: Numeric, gpu: GPUSpec, coeffs: GemmCoefficients, dtype_bytes: int
) -> Numeric:
    """Time of one layer's ``shape`` GEMM(s) for each token count (0 tokens -> 0)."""
    compute_s = shape.flops(tokens) / (gpu.peak_flops * coeffs.compute_efficiency)
    memory_s = shape.bytes_moved(tokens, dtype_bytes) / (
        gpu.hbm_bandwidth_bytes_per_s * coeffs.memory_efficiency
    )
    busy = coeffs.launch_s * shape.kernels + _pnorm(compute_s, memory_s, coeffs.smoothing_p)
    return when_positive(tokens, busy)


def elementwise_time_s(
    bytes_per_token: float, tokens: Numeric, gpu: GPUSpec, coeffs: ElementwiseCoefficients
) -> Numeric:
    """Time of one bandwidth-bound kernel over ``tokens`` rows (0 tokens -> 0)."""
    busy = coeffs.latency_s + tokens * bytes_per_token / (
        gpu.hbm_bandwidth_bytes_per_s * coeffs.memory_efficiency
    )
    return when_positive(tokens, busy)


def attention_kv_bytes_per_token(model: ModelSpec, tp: int) -> float:
    """KV bytes one cached token adds per layer on one TP shard."""
    return 2.0 * model.kv_heads_per_shard(tp) * model.head_dim * model.dtype_bytes


def prefill_attention_time_s(
    model: ModelSpec,
    gpu: GPUSpec,
    tp: int,
    coeffs: AttentionCoefficients,
    prefill_tokens: Numeric,
    prefill_attention_pairs: Numeric,
    num_prefills: Numeric,
) -> Numeric:
    """Prefill (FlashAttention) time of one layer on one TP shard.

    ``floor + per_sequence * chunks + max(compute, memory)``: compute charges new (within-chunk) and
    cached (earlier-context) query-key pairs at their own efficiencies; memory reads the KV of the
    earlier context and of the chunk once.
    """
    flops_per_pair = 4.0 * model.head_dim * model.heads_per_shard(tp)
    new_pairs, cached_pairs = split_prefill_pairs(prefill_tokens, prefill_attention_pairs, num_prefills)
    compute_s = flops_per_pair * (
        new_pairs / (gpu.peak_flops * coeffs.prefill_new_efficiency)
        + cached_pairs / (gpu.peak_flops * coeffs.prefill_cached_efficiency)
    )
    # cached pairs / mean chunk = earlier-context tokens whose KV is read
    mean_chunk = prefill_tokens / maximum(num_prefills, 1.0)
    prior_tokens = cached_pairs / maximum(mean_chunk, 1.0)
    memory_s = (
        (prior_tokens + prefill_tokens)
        * attention_kv_bytes_per_token(model, tp)
        / (gpu.hbm_bandwidth_bytes_per_s * coeffs.decode_memory_efficiency)
    )
    busy = (
        coeffs.prefill_floor_s + coeffs.prefill_per_sequence_s * num_prefills + maximum(compute_s, memory_s)
    )
    return when_positive(prefill_tokens, busy)


def decode_attention_time_s(
    model: ModelSpec,
    gpu: GPUSpec,
    tp: int,
    coeffs: AttentionCoefficients,
    num_decodes: Numeric,
    decode_context_tokens: Numeric,
) -> Numeric:
    """Paged decode attention time of one layer on one TP shard: memory-bound KV read with a floor
    and a per-sequence term (bounded below by the FLOPs at peak)."""
    memory_s = (
        decode_context_tokens
        * attention_kv_bytes_per_token(model, tp)
        / (gpu.hbm_bandwidth_bytes_per_s * coeffs.decode_memory_efficiency)
    )
    compute_s = 4.0 * model.head_dim * model.heads_per_shard(tp) * decode_context_tokens / gpu.peak_flops
    busy = coeffs.decode_floor_s + coeffs.decode_per_sequence_s * num_decodes + maximum(memory_s, compute_s)
    return when_positive(num_decodes, busy)


def allreduce_time_s(
    coeffs: CollectiveCoefficients, workers: Numeric, num_bytes: Numeric, cross_node: bool
) -> Numeric:
    """Ring all-reduce of ``num_bytes`` over ``workers`` GPUs (0 for one worker or no bytes):
    ``latency + per_rank * (workers - 2) + 2 (workers-1)/workers * bytes / bus_bandwidth``."""
    ring_factor = 2.0 * (workers - 1.0) / workers
    if cross_node:
        latency = coeffs.cross_node_allreduce_latency_s
        per_rank = coeffs.cross_node_allreduce_latency_per_rank_s
        bandwidth = coeffs.cross_node_allreduce_bus_bandwidth_bytes_per_s
    else:
        latency = coeffs.allreduce_latency_s
        per_rank = coeffs.allreduce_latency_per_rank_s
        bandwidth = coeffs.allreduce_bus_bandwidth_bytes_per_s
    busy = latency + per_rank * (workers - 2.0) + ring_factor * num_bytes / bandwidth
    return when_positive(num_bytes * (workers - 1.0), busy)


def send_recv_time_s(coeffs: CollectiveCoefficients, num_bytes: Numeric, cross_node: bool) -> Numeric:
    """Point-to-point NCCL send/recv: ``latency + bytes / bandwidth``."""
    if cross_node:
        latency, bandwidth = (
            coeffs.cross_node_send_recv_latency_s,
            coeffs.cross_node_send_recv_bandwidth_bytes_per_s,
        )
    else:
        latency, bandwidth = coeffs.send_recv_latency_s, coeffs.send_recv_bandwidth_bytes_per_s
    return when_positive(num_bytes, latency + num_bytes / bandwidth)


def _check_scalar(name: str, value: float) -> float:
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


class RooflineCostModel:
    """The calibrated analytic cost model (see the module docstring for the formulas).

    Instances keep a bounded memo of :meth:`unit_time_s` (per instance, keyed on the model, unit,
    GPU, TP degree and tokens). The array methods compute directly and never touch it.

    :param coefficients: per-GPU-name coefficients; defaults to the fitted values.
    :param gpus_per_node: GPUs per node, for telling intra- from cross-node TP collectives.
    """

    def __init__(
        self,
        coefficients: Mapping[str, GpuCoefficients] | None = None,
        gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
    ) -> None:
        self.coefficients: Mapping[str, GpuCoefficients] = (
            FITTED_COEFFICIENTS if coefficients is None else coefficients
        )
        self.gpus_per_node = gpus_per_node
        self._unit_cache: dict[tuple[object, ...], tuple[ModelSpec, GPUSpec, float]] = {}
        self._gemm_cache: dict[tuple[object, ...], tuple[GemmShape, ...]] = {}

    # ------------------------------------------------------------------ lookup
    def coefficients_for(self, gpu: GPUSpec) -> GpuCoefficients:
        """Coefficients of ``gpu``.

        :raises ValueError: when the GPU has no coefficients, naming those that do.
        """
        try:
            return self.coefficients[gpu.name]
        except KeyError:
            raise ValueError(
                f"no cost-model coefficients for GPU {gpu.name!r}; calibrated GPUs: {', '.join(sorted(self.coefficients))}"
            ) from None

    def _gemms(self, model: ModelSpec, unit: UnitKind, tp: int) -> tuple[GemmShape, ...]:
        key = (model, unit, tp)
        shapes = self._gemm_cache.get(key)
        if shapes is None:
            shapes = model.gemms(unit, tp)
            self._gemm_cache[key] = shapes
        return shapes

    # ------------------------------------------------------------------ units
    def unit_time_s(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> float:
        """See :meth:`CostModel.unit_time_s`; memoised per instance.

        The memo is keyed on the identity of ``model`` and ``gpu`` (hashing a frozen spec on every
        call would cost more than the lookup); each entry holds both objects, so an identity cannot be
        reused by another spec while its entry exists.
        """
        key = (id(model), unit, id(gpu), tp, num_tokens)
        entry = self._unit_cache.get(key)
        if entry is not None:
            return entry[2]
        value = float(self._unit_time(model, unit, gpu, tp, _check_scalar("num_tokens", num_tokens)))
        if len(self._unit_cache) >= UNIT_CACHE_MAX_ENTRIES:
            self._unit_cache.clear()
        self._unit_cache[key] = (model, gpu, value)
        return value

    def unit_time_s_array(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: np.ndarray
    ) -> np.ndarray:
        """Vectorised :meth:`unit_time_s`: one time per entry of ``tokens``.

        :raises ValueError: for ``attention`` (use :meth:`attention_time_s`), a unit the model lacks,
            a bad TP degree, or negative token counts.
        """
        return np.asarray(
            self._unit_time(model, unit, gpu, tp, as_nonnegative_array(tokens)), dtype=np.float64
        )

    def _unit_time(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: Numeric) -> Numeric:
        unit = UnitKind(unit)
        if unit is UnitKind.ATTENTION:
            raise ValueError("attention depends on context, not only tokens: use attention_time_s(...)")
        model.validate_tp(tp)
        kernel_s, collective_s = self._unit_terms(model, unit, gpu, tp, tokens)
        return kernel_s + collective_s

    def _unit_terms(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: Numeric
    ) -> tuple[Numeric, Numeric]:
        """(kernel time, TP collective time) over all layers, for a token count or an array of them."""
        coeffs = self.coefficients_for(gpu)
        layers = model.layers_of(unit)
        bytes_per_token, collectives_per_pass = model.tp_allreduce(unit)
        collective = self._allreduce(gpu, tp, tokens * bytes_per_token) * collectives_per_pass
        if unit is UnitKind.EMBED:
            per_token = 2.0 * model.hidden_size * model.dtype_bytes
            return elementwise_time_s(per_token, tokens, gpu, coeffs.embedding), collective
        kernel = 0.0 * tokens
        if unit is UnitKind.NORM:
            for name, per_token in model.elementwise_bytes_per_token(tp).items():
                kernel = kernel + elementwise_time_s(per_token, tokens, gpu, coeffs.elementwise[name])
            return kernel * layers, collective
        for shape in self._gemms(model, unit, tp):
            kernel = kernel + gemm_time_s(shape, tokens, gpu, coeffs.gemm, model.dtype_bytes)
        if unit is UnitKind.VISION_ENCODER:
            kernel = kernel + self._vision_extra_s(model, gpu, tp, tokens)
        return kernel * layers, collective

    def _vision_extra_s(self, model: ModelSpec, gpu: GPUSpec, tp: int, tokens: Numeric) -> Numeric:
        """ViT work beside its GEMMs: full attention over each image's patches and the per-block
        elementwise kernels (two LayerNorms, GELU, two residual adds)."""
        assert model.vision is not None
        vision = model.vision
        coeffs = self.coefficients_for(gpu)
        d = model.dtype_bytes
        pairs = tokens * minimum(tokens, float(vision.patches_per_image))
        images = -(-tokens // vision.patches_per_image)  # ceil, for floats and arrays alike
        attention = coeffs.attention
        attn_flops = 4.0 * vision.hidden_size / tp * pairs
        attn_s = when_positive(
            tokens,
            attention.prefill_floor_s
            + images * attention.prefill_per_sequence_s
            + attn_flops / (gpu.peak_flops * attention.prefill_new_efficiency),
        )
        layernorm, act, add = (coeffs.elementwise[k] for k in ("input_layernorm", "mlp_act", "add"))
        elementwise = 2 * elementwise_time_s(2.0 * vision.hidden_size * d, tokens, gpu, layernorm)
        elementwise = elementwise + elementwise_time_s(2.0 * vision.mlp_size / tp * d, tokens, gpu, act)
        elementwise = elementwise + 2 * elementwise_time_s(3.0 * vision.hidden_size * d, tokens, gpu, add)
        return (attn_s + elementwise) * vision.num_layers

    # ------------------------------------------------------------------ attention
    def attention_time_s(self, model: ModelSpec, gpu: GPUSpec, tp: int, batch: AttentionBatch) -> float:
        """See :meth:`CostModel.attention_time_s` (scalar path: no numpy arrays, no memo)."""
        coeffs = self.coefficients_for(gpu).attention
        prefill_s = prefill_attention_time_s(
            model,
            gpu,
            tp,
            coeffs,
            float(batch.prefill_tokens),
            float(batch.prefill_attention_pairs),
            float(batch.num_prefills),
        )
        decode_s = decode_attention_time_s(
            model, gpu, tp, coeffs, float(batch.num_decodes), float(batch.decode_context_tokens)
        )
        return float((prefill_s + decode_s) * model.num_layers)

    def attention_time_s_array(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        tp: int,
        num_decodes: np.ndarray,
        decode_context_tokens: np.ndarray,
        prefill_tokens: np.ndarray,
        prefill_attention_pairs: np.ndarray,
        num_prefills: np.ndarray,
    ) -> np.ndarray:
        """Vectorised :meth:`attention_time_s`: arrays of the :class:`AttentionBatch` fields
        (broadcast together); returns the time over all layers per entry."""
        prefill_s, decode_s = self.attention_terms_per_layer(
            model,
            gpu,
            tp,
            num_decodes,
            decode_context_tokens,
            prefill_tokens,
            prefill_attention_pairs,
            num_prefills,
        )
        return np.asarray((prefill_s + decode_s) * model.num_layers, dtype=np.float64)

    def attention_terms_per_layer(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        tp: int,
        num_decodes: np.ndarray,
        decode_context_tokens: np.ndarray,
        prefill_tokens: np.ndarray,
        prefill_attention_pairs: np.ndarray,
        num_prefills: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prefill kernel time, decode kernel time) of one layer on one TP shard."""
        model.validate_tp(tp)
        arrays = [
            as_nonnegative_array(a)
            for a in (
                num_decodes,
                decode_context_tokens,
                prefill_tokens,
                prefill_attention_pairs,
                num_prefills,
            )
        ]
        num_decodes, decode_context_tokens, prefill_tokens, prefill_attention_pairs, num_prefills = (
            np.broadcast_arrays(*arrays)
        )
        coeffs = self.coefficients_for(gpu).attention
        prefill_s = prefill_attention_time_s(
            model, gpu, tp, coeffs, prefill_tokens, prefill_attention_pairs, num_prefills
        )
        decode_s = decode_attention_time_s(model, gpu, tp, coeffs, num_decodes, decode_context_tokens)
        return np.asarray(prefill_s, dtype=np.float64), np.asarray(decode_s, dtype=np.float64)

    # ------------------------------------------------------------------ collectives
    def allreduce_time_s(self, gpu: GPUSpec, tp: int, num_bytes: float) -> float:
        """See :meth:`CostModel.allreduce_time_s`. TP groups larger than a node use the cross-node fit."""
        return float(self._allreduce(gpu, tp, _check_scalar("num_bytes", num_bytes)))

    def allreduce_time_s_array(self, gpu: GPUSpec, tp: int, num_bytes: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`allreduce_time_s` over message sizes."""
        return np.asarray(self._allreduce(gpu, tp, as_nonnegative_array(num_bytes)), dtype=np.float64)

    def _allreduce(self, gpu: GPUSpec, tp: int, num_bytes: Numeric) -> Numeric:
        if tp < 1:
            raise ValueError(f"TP degree must be >= 1, got {tp}")
        if tp == 1:
            return 0.0 * num_bytes
        collectives = self.coefficients_for(gpu).collectives
        return allreduce_time_s(collectives, float(tp), num_bytes, cross_node=tp > self.gpus_per_node)

    def send_recv_time_s(self, gpu: GPUSpec, num_bytes: float, cross_node: bool = False) -> float:
        """See :meth:`CostModel.send_recv_time_s`."""
        collectives = self.coefficients_for(gpu).collectives
        return float(send_recv_time_s(collectives, _check_scalar("num_bytes", num_bytes), cross_node))

    def send_recv_time_s_array(
        self, gpu: GPUSpec, num_bytes: np.ndarray, cross_node: bool = False
    ) -> np.ndarray:
        """Vectorised :meth:`send_recv_time_s` over message sizes."""
        collectives = self.coefficients_for(gpu).collectives
        return np.asarray(
            send_recv_time_s(collectives, as_nonnegative_array(num_bytes), cross_node), dtype=np.float64
        )

    # ------------------------------------------------------------------ reporting
    def bound(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> str:
        """``"compute"`` when the unit's FLOP time at peak exceeds its byte time at full HBM speed.

        For ``attention`` the call is read as a fresh prefill of ``num_tokens`` tokens.
        """
        unit = UnitKind(unit)
        tokens = _check_scalar("num_tokens", num_tokens)
        if unit is UnitKind.ATTENTION:
            flops = model.flops(unit, tokens, tp, context_tokens=tokens * (tokens + 1) / 2)
            bytes_moved = model.bytes_moved(unit, tokens, tp, kv_tokens_read=tokens)
        else:
            flops = model.flops(unit, tokens, tp)
            bytes_moved = model.bytes_moved(unit, tokens, tp)
        compute_s = flops / gpu.peak_flops
        memory_s = bytes_moved / gpu.hbm_bandwidth_bytes_per_s
        return "compute" if compute_s > memory_s else "memory"
