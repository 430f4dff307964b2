"""Model catalog: public architectures and their scaling units (DESIGN.md 2.2).

A model is decomposed into *scaling units*, the operators that get their own replica pools. Per
transformer layer: ``qkv_proj -> attention -> o_proj -> ffn`` (or ``moe``), with ``norm`` standing for
all per-layer elementwise work (two RMSNorms, rotary embedding, residual add, SiLU-and-mul); once per
pass ``embed`` and ``lm_head``; VL models put ``vision_encoder`` first.

Weights, FLOPs and bytes moved are for *all layers* of a unit (per-token activation and elementwise byte
counts are per layer, as their docstrings say), and for one tensor-parallel shard when a method takes
``tp`` (vLLM / Megatron sharding: QKV and FFN-up column-parallel, O and
FFN-down row-parallel, embedding and LM head vocabulary-parallel, norms replicated; KV heads are
replicated when ``tp`` exceeds their count, as vLLM does).

Each GEMM-bearing unit is described by :class:`GemmShape` rows (``k`` input features, ``n`` output
features per shard, ``count`` identical GEMMs per layer); the cost model turns those into time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import numpy as np

__all__ = [
    "MODEL_CATALOG",
    "GemmShape",
    "ModelSpec",
    "Numeric",
    "UnitKind",
    "VisionEncoderSpec",
    "get_model",
]


#: A float or a float64 array (the formulas below are written once for both).
Numeric = float | np.ndarray


class UnitKind(str, Enum):
    """The scaling units of a model, in forward order."""

    VISION_ENCODER = "vision_encoder"
    EMBED = "embed"
    NORM = "norm"
    QKV_PROJ = "qkv_proj"
    ATTENTION = "attention"
    O_PROJ = "o_proj"
    FFN = "ffn"
    MOE = "moe"
    LM_HEAD = "lm_head"


#: Units that run once per pass rather than once per layer.
_ONCE_PER_PASS = frozenset({UnitKind.EMBED, UnitKind.LM_HEAD, UnitKind.VISION_ENCODER})


@dataclass(frozen=True)
class GemmShape:
    """One GEMM of a unit, per layer and TP shard: ``[tokens x k] @ [k x n]``.

    :param name: what it is (``"qkv"``, ``"up"``, ``"down"``, ``"router"``, ...).
    :param k: reduction (input feature) size.
    :param n: output features on this shard.
    :param count: how many such GEMMs run per layer (routed experts; ViT blocks).
    :param tokens_scale: rows per GEMM = ``tokens * tokens_scale`` (MoE experts: ``top_k / experts``).
    :param kernels: kernel launches per layer (a fused-MoE grouped GEMM is one launch for all experts).
    """

    name: str
    k: int
    n: int
    count: int = 1
    tokens_scale: float = 1.0
    kernels: int = 1

    def flops(self, num_tokens: Numeric) -> Numeric:
        """FLOPs for ``num_tokens`` tokens entering the unit (all ``count`` GEMMs)."""
        return 2.0 * num_tokens * self.tokens_scale * self.k * self.n * self.count

    def matrices_read(self, num_tokens: Numeric) -> Numeric:
        """Weight matrices read: all ``count`` for dense GEMMs; for routed experts
        (``tokens_scale < 1``) the expected number reached by uniform top-k routing,
        ``count * (1 - (1 - top_k/experts) ** tokens)``."""
        if self.tokens_scale >= 1.0 or self.count == 1:
            return self.count + 0.0 * num_tokens
        return self.count * (1.0 - (1.0 - self.tokens_scale) ** num_tokens)

    def bytes_moved(self, num_tokens: Numeric, dtype_bytes: int) -> Numeric:
        """HBM bytes: weights read plus input rows read and output rows written."""
        rows = num_tokens * self.tokens_scale * self.count
        return (self.k * self.n * self.matrices_read(num_tokens) + rows * (self.k + self.n)) * dtype_bytes


@dataclass(frozen=True)
class VisionEncoderSpec:
    """A ViT image encoder (Qwen2-VL style): patch embedding, ``num_layers`` blocks, patch merger.

    Tokens entering the unit are image *patches*; ``spatial_merge_size**2`` patches merge into one LLM
    token at the output.

    :param num_layers: ViT blocks.
    :param hidden_size: ViT width.
    :param num_heads: ViT attention heads.
    :param mlp_size: ViT MLP hidden size (non-gated, QuickGELU).
    :param patch_size: spatial patch edge, pixels.
    :param temporal_patch_size: frames per patch.
    :param in_channels: image channels.
    :param spatial_merge_size: patches merged per side by the merger.
    :param out_hidden_size: width of merged tokens handed to the LLM.
    :param patches_per_image: typical patches per image, for the encoder's full attention
        (448x448 px at 14 px patches = 1,024).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    mlp_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden_size: int
    patches_per_image: int = 1024

    @property
    def patch_input_size(self) -> int:
        """Input features of the patch-embedding projection (channels x t x p x p)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_factor(self) -> int:
        """Patches merged into one LLM token."""
        return self.spatial_merge_size * self.spatial_merge_size


@dataclass(frozen=True)
class ModelSpec:
    """A decoder LLM (optionally MoE, optionally with a vision encoder).

    :param name: catalog key.
    :param hf_id: Hugging Face repository the config comes from.
    :param num_layers: decoder layers.
    :param hidden_size: model width.
    :param num_heads: query heads.
    :param num_kv_heads: key/value heads (GQA).
    :param head_dim: per-head size.
    :param ffn_size: dense MLP hidden size (gated: gate and up each of this size).
    :param vocab_size: vocabulary (embedding and LM-head rows).
    :param dtype_bytes: bytes per weight / activation element (2 = bf16/fp16).
    :param max_context: maximum context length from the config, tokens.
    :param num_experts: routed experts per MoE layer (0 = dense model).
    :param experts_top_k: experts each token is routed to.
    :param expert_ffn_size: hidden size of one routed expert.
    :param shared_expert_ffn_size: hidden size of the always-on shared expert (0 = none).
    :param gated_mlp: SwiGLU MLP (gate + up + down) rather than up + down.
    :param qkv_bias: QKV projection has a bias (Qwen2); costs nothing measurable, kept for weights.
    :param tied_embeddings: LM head shares the embedding matrix.
    :param vision: the vision encoder, or ``None``.
    """

    name: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    dtype_bytes: int = 2
    max_context: int = 4096
    num_experts: int = 0
    experts_top_k: int = 0
    expert_ffn_size: int = 0
    shared_expert_ffn_size: int = 0
    gated_mlp: bool = True
    qkv_bias: bool = False
    tied_embeddings: bool = False
    vision: VisionEncoderSpec | None = None
    #: :meth:`weight_bytes` per (unit, TP): asked for every replica placed, and the spec never changes
    _weight_bytes_memo: dict[tuple[UnitKind | str, int], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "dtype_bytes",
        )
        for attr in positive:
            if getattr(self, attr) <= 0:
                raise ValueError(f"model {self.name!r}: {attr} must be > 0, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.is_moe and not (0 < self.experts_top_k <= self.num_experts and self.expert_ffn_size > 0):
            raise ValueError(
                f"model {self.name!r}: MoE needs 0 < top_k <= experts and expert_ffn_size > 0, got "
                f"top_k={self.experts_top_k}, experts={self.num_experts}, expert_ffn_size={self.expert_ffn_size}"
            )
        if not self.is_moe and self.ffn_size <= 0:
            raise ValueError(f"model {self.name!r}: dense model needs ffn_size > 0")

    # ----------------------------------------------------------------- structure
    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of experts."""
        return self.num_experts > 0

    @property
    def units(self) -> tuple[UnitKind, ...]:
        """Scaling units in forward order of one pass."""
        mlp = UnitKind.MOE if self.is_moe else UnitKind.FFN
        body = (UnitKind.EMBED, UnitKind.NORM, UnitKind.QKV_PROJ, UnitKind.ATTENTION, UnitKind.O_PROJ, mlp)
        head = (UnitKind.VISION_ENCODER,) if self.vision is not None else ()
        return (*head, *body, UnitKind.LM_HEAD)

    def _check_unit(self, unit: UnitKind) -> UnitKind:
        unit = UnitKind(unit)
        if unit not in self.units:
            raise ValueError(
                f"model {self.name!r} has no unit {unit.value!r}; its units: {', '.join(u.value for u in self.units)}"
            )
        return unit

    def layers_of(self, unit: UnitKind) -> int:
        """How many times the unit runs per pass: ``num_layers`` for per-layer units, 1 for
        ``embed`` / ``lm_head`` / ``vision_encoder`` (whose own depth is inside its shapes)."""
        unit = self._check_unit(unit)
        return 1 if unit in _ONCE_PER_PASS else self.num_layers

    @property
    def q_size(self) -> int:
        """Query features (heads x head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Key (or value) features (kv heads x head_dim)."""
        return self.num_kv_heads * self.head_dim

    def validate_tp(self, tp: int) -> None:
        """Check that ``tp`` can shard this model.

        Query heads must divide evenly; KV heads either divide evenly or (``tp`` > KV heads) are
        replicated, which needs ``tp`` to be a multiple of the KV-head count (vLLM's rule).

        :raises ValueError: naming ``tp`` and the valid degrees.
        """
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor-parallel degree must be a positive int, got {tp!r}")
        heads_ok = self.num_heads % tp == 0
        kv_ok = self.num_kv_heads % tp == 0 if tp <= self.num_kv_heads else tp % self.num_kv_heads == 0
        if not (heads_ok and kv_ok):
            raise ValueError(
                f"TP degree {tp} does not divide model {self.name!r} (heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}); valid TP degrees: {self.valid_tp_degrees()}"
            )

    def valid_tp_degrees(self, limit: int = 64) -> list[int]:
        """Every TP degree up to ``limit`` that :meth:`validate_tp` accepts."""
        valid = []
        for tp in range(1, limit + 1):
            heads_ok = self.num_heads % tp == 0
            kv_ok = self.num_kv_heads % tp == 0 if tp <= self.num_kv_heads else tp % self.num_kv_heads == 0
            if heads_ok and kv_ok:
                valid.append(tp)
        return valid

    def heads_per_shard(self, tp: int) -> int:
        """Query heads on one TP shard."""
        self.validate_tp(tp)
        return self.num_heads // tp

    def kv_heads_per_shard(self, tp: int) -> int:
        """KV heads stored on one TP shard (at least one: replicated when ``tp`` > KV heads)."""
        self.validate_tp(tp)
        return max(1, self.num_kv_heads // tp)

    # ----------------------------------------------------------------- GEMMs
    def gemms(self, unit: UnitKind, tp: int = 1) -> tuple[GemmShape, ...]:
        """The GEMMs of one layer of ``unit`` on one TP shard (empty for GEMM-free units).

        MoE: a router GEMM (replicated), ``num_experts`` expert pairs each fed
        ``tokens * top_k / num_experts`` rows (uniform routing), and the shared expert.
        """
        unit = self._check_unit(unit)
        self.validate_tp(tp)
        h = self.hidden_size
        if unit is UnitKind.QKV_PROJ:
            n = (self.heads_per_shard(tp) + 2 * self.kv_heads_per_shard(tp)) * self.head_dim
            return (GemmShape("qkv", h, n),)
        if unit is UnitKind.O_PROJ:
            return (GemmShape("o", self.heads_per_shard(tp) * self.head_dim, h),)
        if unit is UnitKind.FFN:
            return self._mlp_gemms("", self.ffn_size, tp)
        if unit is UnitKind.MOE:
            share = self.experts_top_k / self.num_experts
            experts = tuple(
                GemmShape(f"expert_{g.name}", g.k, g.n, count=self.num_experts, tokens_scale=share)
                for g in self._mlp_gemms("", self.expert_ffn_size, tp)
            )
            shared = (
                self._mlp_gemms("shared_", self.shared_expert_ffn_size, tp)
                if self.shared_expert_ffn_size
                else ()
            )
            return (GemmShape("router", h, self.num_experts), *experts, *shared)
        if unit is UnitKind.LM_HEAD:
            return (GemmShape("lm_head", h, math.ceil(self.vocab_size / tp)),)
        if unit is UnitKind.VISION_ENCODER:
            assert self.vision is not None
            v = self.vision
            merged = v.hidden_size * v.merge_factor
            vit_layer = (
                GemmShape(
                    "vit_qkv", v.hidden_size, 3 * v.hidden_size // tp, v.num_layers, kernels=v.num_layers
                ),
                GemmShape("vit_o", v.hidden_size // tp, v.hidden_size, v.num_layers, kernels=v.num_layers),
                GemmShape("vit_fc1", v.hidden_size, v.mlp_size // tp, v.num_layers, kernels=v.num_layers),
                GemmShape("vit_fc2", v.mlp_size // tp, v.hidden_size, v.num_layers, kernels=v.num_layers),
            )
            return (
                GemmShape("patch_embed", v.patch_input_size, v.hidden_size),
                *vit_layer,
                # The merger's MLP runs on merged tokens: 1/merge_factor rows per patch.
                GemmShape("merger_fc1", merged, merged // tp, tokens_scale=1.0 / v.merge_factor),
                GemmShape("merger_fc2", merged // tp, v.out_hidden_size, tokens_scale=1.0 / v.merge_factor),
            )
        return ()

    def _mlp_gemms(self, prefix: str, size: int, tp: int) -> tuple[GemmShape, ...]:
        h = self.hidden_size
        up_width = (2 if self.gated_mlp else 1) * math.ceil(size / tp)
        return (GemmShape(f"{prefix}up", h, up_width), GemmShape(f"{prefix}down", math.ceil(size / tp), h))

    # ----------------------------------------------------------------- bytes
    def weight_bytes(self, unit: UnitKind, tp: int = 1) -> float:
        """Weight bytes of ``unit`` over all its layers, on one TP shard."""
        memo = self._weight_bytes_memo.get((unit, tp))
        if memo is None:
            memo = self._weight_bytes_memo[unit, tp] = self._weight_bytes(unit, tp)
        return memo

    def _weight_bytes(self, unit: UnitKind, tp: int) -> float:
        unit = self._check_unit(unit)
        self.validate_tp(tp)
        d = self.dtype_bytes
        layers = self.layers_of(unit)
        if unit is UnitKind.EMBED:
            return math.ceil(self.vocab_size / tp) * self.hidden_size * d
        if unit is UnitKind.NORM:
            # two RMSNorm weight vectors per layer, plus the final norm (counted once, spread over layers)
            return (2 * self.num_layers + 1) * self.hidden_size * d
        if unit is UnitKind.ATTENTION:
            return 0.0
        if unit is UnitKind.LM_HEAD and self.tied_embeddings:
            return 0.0
        params = sum(g.k * g.n * g.count for g in self.gemms(unit, tp))
        if unit is UnitKind.QKV_PROJ and self.qkv_bias:
            params += self.gemms(unit, tp)[0].n
        return float(params * d * layers)

    def total_weight_bytes(self, tp: int = 1) -> float:
        """Weight bytes of the whole model on one TP shard."""
        return sum(self.weight_bytes(unit, tp) for unit in self.units)

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """KV-cache bytes one token occupies, all layers, on one TP shard."""
        return float(2 * self.kv_heads_per_shard(tp) * self.head_dim * self.dtype_bytes * self.num_layers)

    def activation_bytes_per_token(self, unit: UnitKind) -> float:
        """Bytes per token, per layer, that ``unit`` hands to the next unit (whole unit, all shards).

        ``vision_encoder``: per input patch (merged tokens / merge factor); ``lm_head``: the sampled
        token id (int32), since sampling runs where the logits are.
        """
        unit = self._check_unit(unit)
        d = self.dtype_bytes
        if unit is UnitKind.QKV_PROJ:
            return float((self.q_size + 2 * self.kv_size) * d)
        if unit is UnitKind.ATTENTION:
            return float(self.q_size * d)
        if unit is UnitKind.LM_HEAD:
            return 4.0
        if unit is UnitKind.VISION_ENCODER:
            assert self.vision is not None
            return self.vision.out_hidden_size * d / self.vision.merge_factor
        return float(self.hidden_size * d)

    def tp_allreduce(self, unit: UnitKind) -> tuple[float, int]:
        """The tensor-parallel collective a unit ends with: (bytes per token per collective,
        collectives per pass); ``(0, 0)`` for none.

        Row-parallel ``o_proj`` and ``ffn`` / ``moe`` all-reduce the hidden state every layer; the
        vocabulary-parallel ``embed`` all-reduces it once; ``lm_head`` gathers its logits (an
        all-gather moves half an all-reduce's bytes); a ViT block all-reduces twice.
        """
        unit = self._check_unit(unit)
        hidden = float(self.hidden_size * self.dtype_bytes)
        if unit in (UnitKind.O_PROJ, UnitKind.FFN, UnitKind.MOE):
            return hidden, self.num_layers
        if unit is UnitKind.EMBED:
            return hidden, 1
        if unit is UnitKind.LM_HEAD:
            return self.vocab_size * self.dtype_bytes / 2.0, 1
        if unit is UnitKind.VISION_ENCODER:
            assert self.vision is not None
            return float(self.vision.hidden_size * self.dtype_bytes), 2 * self.vision.num_layers
        return 0.0, 0

    # ----------------------------------------------------------------- work per call
    def elementwise_bytes_per_token(self, tp: int = 1) -> dict[str, float]:
        """HBM bytes per token per layer of each elementwise kernel in ``norm`` on one shard.

        Keys match Vidur's ``mlp.csv`` columns: ``input_layernorm`` and ``post_attention_layernorm``
        (read + write ``hidden``), ``attn_rope`` (read + write q and k of this shard), ``mlp_act``
        (read gate+up, write hidden MLP), ``add`` (two reads, one write of ``hidden``).
        """
        self.validate_tp(tp)
        d = self.dtype_bytes
        h = self.hidden_size
        rope_features = (self.heads_per_shard(tp) + self.kv_heads_per_shard(tp)) * self.head_dim
        mlp_size = (
            self.expert_ffn_size * self.experts_top_k + self.shared_expert_ffn_size
            if self.is_moe
            else self.ffn_size
        )
        act_width = math.ceil(mlp_size / tp)
        return {
            "input_layernorm": 2.0 * h * d,
            "post_attention_layernorm": 2.0 * h * d,
            "attn_rope": 2.0 * rope_features * d,
            "mlp_act": (3.0 if self.gated_mlp else 2.0) * act_width * d,
            "add": 3.0 * h * d,
        }

    def flops(self, unit: UnitKind, num_tokens: float, tp: int = 1, context_tokens: float = 0.0) -> float:
        """FLOPs of one call of ``unit`` over all layers on one shard.

        :param num_tokens: tokens in the call.
        :param context_tokens: for ``attention`` only: query-key pairs in the call
            (see :class:`opscale.sim.costmodel.AttentionBatch`); each pair costs ``4 * head_dim``
            FLOPs per head (QK^T and PV).
        """
        unit = self._check_unit(unit)
        _check_tokens(num_tokens)
        layers = self.layers_of(unit)
        if unit is UnitKind.ATTENTION:
            return 4.0 * self.head_dim * self.heads_per_shard(tp) * context_tokens * layers
        if unit is UnitKind.VISION_ENCODER:
            assert self.vision is not None
            v = self.vision
            pairs = num_tokens * min(num_tokens, v.patches_per_image)
            attn = 4.0 * v.hidden_size / tp * pairs * v.num_layers
            return float(attn + sum(g.flops(num_tokens) for g in self.gemms(unit, tp)))
        gemm = sum(g.flops(num_tokens) for g in self.gemms(unit, tp))
        elementwise = 0.0
        if unit is UnitKind.NORM:
            # ~10 FLOPs per element touched (RMSNorm, rotary, SiLU): negligible next to bytes
            elementwise = (
                10.0 * num_tokens * sum(self.elementwise_bytes_per_token(tp).values()) / self.dtype_bytes
            )
        return float((gemm + elementwise) * layers)

    def bytes_moved(
        self, unit: UnitKind, num_tokens: float, tp: int = 1, kv_tokens_read: float = 0.0
    ) -> float:
        """HBM bytes of one call of ``unit`` over all layers on one shard.

        GEMMs read the weights (MoE: only the experts the tokens reach, uniform routing), read the
        inputs and write the outputs.

        :param kv_tokens_read: for ``attention`` only: KV entries (tokens) read per layer.
        """
        unit = self._check_unit(unit)
        _check_tokens(num_tokens)
        d = self.dtype_bytes
        layers = self.layers_of(unit)
        if unit is UnitKind.ATTENTION:
            kv = kv_tokens_read * 2 * self.kv_heads_per_shard(tp) * self.head_dim * d
            qo = num_tokens * 2 * self.heads_per_shard(tp) * self.head_dim * d
            return (kv + qo) * layers
        if unit is UnitKind.EMBED:
            return 2.0 * num_tokens * self.hidden_size * d
        if unit is UnitKind.NORM:
            return num_tokens * sum(self.elementwise_bytes_per_token(tp).values()) * layers
        return float(sum(g.bytes_moved(num_tokens, d) for g in self.gemms(unit, tp)) * layers)


def _check_tokens(num_tokens: float) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")


# ----------------------------------------------------------------------------- catalog
# Every entry copies the public Hugging Face config.json of the repository named in hf_id.
_MODELS: tuple[ModelSpec, ...] = (
    # meta-llama/Llama-2-7b-hf config.json
    ModelSpec(
        name="llama-2-7b",
        hf_id="meta-llama/Llama-2-7b-hf",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        ffn_size=11008,
        vocab_size=32000,
        max_context=4096,
    ),
    # meta-llama/Meta-Llama-3-8B config.json
    ModelSpec(
        name="llama-3-8b",
        hf_id="meta-llama/Meta-Llama-3-8B",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        ffn_size=14336,
        vocab_size=128256,
        max_context=8192,
    ),
    # codellama/CodeLlama-34b-Instruct-hf config.json (rope_theta 1e6, 16K positions)
    ModelSpec(
        name="codellama-34b",
        hf_id="codellama/CodeLlama-34b-Instruct-hf",
        num_layers=48,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        ffn_size=22016,
        vocab_size=32000,
        max_context=16384,
    ),
    # meta-llama/Llama-2-70b-hf config.json
    ModelSpec(
        name="llama-2-70b",
        hf_id="meta-llama/Llama-2-70b-hf",
        num_layers=80,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        ffn_size=28672,
        vocab_size=32000,
        max_context=4096,
    ),
    # Qwen/Qwen2-7B config.json (131,072 positions; the Instruct model documents 128K with YaRN)
    ModelSpec(
        name="qwen2-7b",
        hf_id="Qwen/Qwen2-7B",
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        ffn_size=18944,
        vocab_size=152064,
        max_context=131072,
        qkv_bias=True,
    ),
    # Qwen/Qwen2-57B-A14B config.json: 64 routed experts (moe_intermediate_size 2560), top-8,
    # shared expert 20480 (shared_expert_intermediate_size)
    ModelSpec(
        name="qwen2-57b-a14b",
        hf_id="Qwen/Qwen2-57B-A14B",
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        ffn_size=18944,
        vocab_size=151936,
        max_context=32768,
        num_experts=64,
        experts_top_k=8,
        expert_ffn_size=2560,
        shared_expert_ffn_size=20480,
        qkv_bias=True,
    ),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts of 14336, top-2, 32K positions
    ModelSpec(
        name="mixtral-8x7b",
        hf_id="mistralai/Mixtral-8x7B-v0.1",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        ffn_size=14336,
        vocab_size=32000,
        max_context=32768,
        num_experts=8,
        experts_top_k=2,
        expert_ffn_size=14336,
    ),
    # Qwen/Qwen2-VL-7B-Instruct config.json: Qwen2-7B LLM + vision_config (depth 32, embed_dim 1280,
    # 16 heads, mlp_ratio 4, patch 14, temporal patch 2, spatial merge 2, hidden_size 3584)
    ModelSpec(
        name="qwen2-vl-7b",
        hf_id="Qwen/Qwen2-VL-7B-Instruct",
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        ffn_size=18944,
        vocab_size=152064,
        max_context=32768,
        qkv_bias=True,
        vision=VisionEncoderSpec(
            num_layers=32,
            hidden_size=1280,
            num_heads=16,
            mlp_size=5120,
            patch_size=14,
            temporal_patch_size=2,
            in_channels=3,
            spatial_merge_size=2,
            out_hidden_size=3584,
        ),
    ),
)

#: The models the simulator knows, keyed by lower-case short name.
MODEL_CATALOG: Mapping[str, ModelSpec] = MappingProxyType({m.name: m for m in _MODELS})

_MODEL_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        **{m.hf_id.lower(): m.name for m in _MODELS},
        "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
        "meta-llama/llama-2-70b-chat-hf": "llama-2-70b",
        "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
        "codellama/codellama-34b-hf": "codellama-34b",
        "qwen/qwen2-7b-instruct": "qwen2-7b",
        "qwen/qwen2-57b-a14b-instruct": "qwen2-57b-a14b",
        "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
        "qwen/qwen2-vl-7b": "qwen2-vl-7b",
        "llama2-7b": "llama-2-7b",
        "llama2-70b": "llama-2-70b",
        "llama3-8b": "llama-3-8b",
        "meta-llama-3-8b": "llama-3-8b",
        "codellama-34b-instruct": "codellama-34b",
    }
)


def get_model(name: str) -> ModelSpec:
    """Look a model up by short name or Hugging Face id, case-insensitively.

    :raises ValueError: for an unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower()
    key = _MODEL_ALIASES.get(key, key)
    if key.endswith("-hf") and key[:-3] in MODEL_CATALOG:
        key = key[:-3]
    if key not in MODEL_CATALOG:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODEL_CATALOG))}")
    return MODEL_CATALOG[key]
