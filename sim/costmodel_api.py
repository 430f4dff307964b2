"""The cost-model interface shared by every backend: the :class:`CostModel` protocol and the
:class:`AttentionBatch` statistics the simulator hands it (see :mod:`opscale.sim.costmodel`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from opscale.sim.hardware import GPUSpec
from opscale.sim.models import ModelSpec, Numeric, UnitKind

__all__ = [
    "AttentionBatch",
    "CostModel",
    "Numeric",
    "UnitBreakdown",
    "as_nonnegative_array",
    "maximum",
    "minimum",
    "split_prefill_pairs",
    "unit_breakdown",
    "when_positive",
]


@dataclass(frozen=True)
class AttentionBatch:
    """Sufficient statistics of one iteration's attention work on one replica.

    :param num_decodes: decode requests (one new token each).
    :param decode_context_tokens: sum over decodes of the KV length each reads.
    :param prefill_tokens: new prompt tokens in the iteration (all prefill chunks).
    :param prefill_attention_pairs: sum over prefill chunks of
        ``chunk * prior_context + chunk * (chunk + 1) / 2`` (causal query-key pairs).
    :param num_prefills: prefill chunks (requests) in the iteration.
    """

    num_decodes: int = 0
    decode_context_tokens: int = 0
    prefill_tokens: int = 0
    prefill_attention_pairs: float = 0.0
    num_prefills: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_decodes",
            "decode_context_tokens",
            "prefill_tokens",
            "prefill_attention_pairs",
            "num_prefills",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"AttentionBatch.{name} must be >= 0, got {getattr(self, name)}")
        if (self.num_prefills == 0) != (self.prefill_tokens == 0):
            raise ValueError(
                f"AttentionBatch: prefill_tokens ({self.prefill_tokens}) and num_prefills ({self.num_prefills}) "
                "must be both zero or both positive"
            )
        if self.prefill_attention_pairs < self.prefill_tokens:
            raise ValueError(
                f"AttentionBatch: prefill_attention_pairs ({self.prefill_attention_pairs}) < prefill_tokens "
                f"({self.prefill_tokens}); every token attends at least to itself"
            )
        if self.decode_context_tokens < self.num_decodes:
            raise ValueError(
                f"AttentionBatch: decode_context_tokens ({self.decode_context_tokens}) < num_decodes "
                f"({self.num_decodes}); each decode reads at least its own token"
            )

    @classmethod
    def from_requests(
        cls, decode_context_lengths: Sequence[int] = (), prefill_chunks: Sequence[tuple[int, int]] = ()
    ) -> AttentionBatch:
        """Build from per-request figures.

        :param decode_context_lengths: KV length read by each decode (including its new token).
        :param prefill_chunks: ``(chunk_tokens, prior_context_tokens)`` per prefill chunk.
        """
        pairs = sum(c * p + c * (c + 1) / 2 for c, p in prefill_chunks)
        return cls(
            num_decodes=len(decode_context_lengths),
            decode_context_tokens=int(sum(decode_context_lengths)),
            prefill_tokens=int(sum(c for c, _ in prefill_chunks)),
            prefill_attention_pairs=float(pairs),
            num_prefills=len(prefill_chunks),
        )


@runtime_checkable
class CostModel(Protocol):
    """How long operators and collectives take. All times in seconds."""

    def unit_time_s(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> float:
        """One call serving ``num_tokens`` tokens through all layers of a non-attention unit on one TP
        group, including that unit's TP collective; 0 tokens -> 0.0.

        For ``lm_head`` pass the tokens whose logits are computed (vLLM: one per sequence that samples
        this iteration, not every prompt token); for ``vision_encoder`` the image patches.
        """
        ...

    def unit_time_s_array(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: np.ndarray
    ) -> np.ndarray:
        """Vectorised :meth:`unit_time_s` over an array of token counts."""
        ...

    def attention_time_s(self, model: ModelSpec, gpu: GPUSpec, tp: int, batch: AttentionBatch) -> float:
        """Attention over all layers for one iteration's batch on one TP group."""
        ...

    def allreduce_time_s(self, gpu: GPUSpec, tp: int, num_bytes: float) -> float:
        """All-reduce of ``num_bytes`` (the full tensor) across ``tp`` GPUs; 0 when ``tp == 1``."""
        ...

    def send_recv_time_s(self, gpu: GPUSpec, num_bytes: float, cross_node: bool = False) -> float:
        """Point-to-point transfer of ``num_bytes`` (pipeline hop)."""
        ...

    def bound(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> str:
        """``"compute"`` or ``"memory"``: which roof limits the unit at this size."""
        ...


@dataclass(frozen=True)
class UnitBreakdown:
    """Roofline terms of one unit call over all layers (for ``opscale costmodel show``)."""

    unit: UnitKind
    time_s: float
    flops: float
    bytes_moved: float
    collective_s: float
    bound: str


def as_nonnegative_array(tokens: np.ndarray | Sequence[float] | float) -> np.ndarray:
    """``tokens`` as a float64 array; raises ``ValueError`` naming the first negative or non-finite entry."""
    array = np.asarray(tokens, dtype=np.float64)
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0):
        bad = array[~np.isfinite(array) | (array < 0)].flat[0]
        raise ValueError(f"token counts must be finite and >= 0, got {bad}")
    return array


def maximum(a: Numeric, b: Numeric) -> Numeric:
    """Elementwise max of floats or arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return a if a >= b else b


def minimum(a: Numeric, b: Numeric) -> Numeric:
    """Elementwise min of floats or arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return a if a <= b else b


def when_positive(gate: Numeric, value: Numeric) -> Numeric:
    """``value`` where ``gate > 0``, else 0 (no work, no time)."""
    if isinstance(gate, np.ndarray) or isinstance(value, np.ndarray):
        return np.where(np.asarray(gate) > 0, value, 0.0)
    return value if gate > 0 else 0.0


def split_prefill_pairs(
    prefill_tokens: Numeric, pairs: Numeric, num_prefills: Numeric
) -> tuple[Numeric, Numeric]:
    """Split causal query-key pairs into new (within the chunk) and cached (earlier context) pairs.

    The statistics do not carry each chunk's size; the split assumes equal chunks, for which
    ``new = T (T/n + 1) / 2`` is exact (one chunk per request per iteration is the common case).
    """
    chunks = maximum(num_prefills, 1.0)
    new = minimum(pairs, prefill_tokens * (prefill_tokens / chunks + 1.0) / 2.0)
    return new, maximum(pairs - new, 0.0)


def unit_breakdown(
    cost_model: CostModel, model: ModelSpec, gpu: GPUSpec, tp: int, num_tokens: int, context_tokens: int = 0
) -> list[UnitBreakdown]:
    """Per-unit time, FLOPs, bytes and bound of one pass of ``num_tokens`` tokens, all layers.

    Attention is taken as one prefill chunk of ``num_tokens`` tokens after ``context_tokens`` of cached
    context when ``num_tokens > 1``, else as one decode reading ``context_tokens + 1`` KV entries.
    ``collective_s`` is the unit's TP collective (:meth:`ModelSpec.tp_allreduce`) as the cost model
    prices it.
    """
    model.validate_tp(tp)
    rows: list[UnitBreakdown] = []
    for unit in model.units:
        if unit is UnitKind.ATTENTION:
            if num_tokens > 1:
                batch = AttentionBatch.from_requests(prefill_chunks=[(num_tokens, context_tokens)])
                pairs, kv_read = batch.prefill_attention_pairs, context_tokens + num_tokens
            else:
                batch = AttentionBatch.from_requests(decode_context_lengths=[context_tokens + 1])
                pairs, kv_read = float(context_tokens + 1), context_tokens + 1
            flops = model.flops(unit, num_tokens, tp, context_tokens=pairs)
            bytes_moved = model.bytes_moved(unit, num_tokens, tp, kv_tokens_read=kv_read)
            bound = (
                "compute"
                if flops / gpu.peak_flops > bytes_moved / gpu.hbm_bandwidth_bytes_per_s
                else "memory"
            )
            time_s = cost_model.attention_time_s(model, gpu, tp, batch)
            rows.append(UnitBreakdown(unit, time_s, flops, bytes_moved, 0.0, bound))
            continue
        bytes_per_token, collectives = model.tp_allreduce(unit)
        collective_s = collectives * cost_model.allreduce_time_s(gpu, tp, bytes_per_token * num_tokens)
        rows.append(
            UnitBreakdown(
                unit,
                cost_model.unit_time_s(model, unit, gpu, tp, num_tokens),
                model.flops(unit, num_tokens, tp),
                model.bytes_moved(unit, num_tokens, tp),
                collective_s,
                cost_model.bound(model, unit, gpu, tp, num_tokens),
            )
        )
    return rows
