"""Hardware and model catalogs: public figures, lookups, sharding rules, per-unit FLOPs and bytes."""

from __future__ import annotations

import pytest

from opscale.sim.hardware import GPU_CATALOG, ClusterSpec, LinkSpec, get_gpu
from opscale.sim.models import MODEL_CATALOG, UnitKind, get_model


# ----------------------------------------------------------------------------- GPUs and clusters
@pytest.mark.parametrize(
    ("alias", "name"),
    [("A100", "a100"), ("a100-80gb", "a100"), ("H100-80GB", "h100"), (" h100 ", "h100"), ("H200", "h200")],
)
def test_get_gpu_accepts_aliases(alias: str, name: str) -> None:
    assert get_gpu(alias).name == name


def test_unknown_gpu_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown GPU 'v100'.*a100.*h100.*h200"):
        get_gpu("v100")


def test_gpu_figures_are_the_datasheet_ones() -> None:
    a100, h100, h200 = (GPU_CATALOG[n] for n in ("a100", "h100", "h200"))
    assert a100.peak_flops == pytest.approx(312e12)
    assert h100.peak_flops == pytest.approx(989e12) == h200.peak_flops
    assert a100.hbm_bandwidth_bytes_per_s < h100.hbm_bandwidth_bytes_per_s < h200.hbm_bandwidth_bytes_per_s
    assert (a100.tdp_watts, h100.tdp_watts) == (400.0, 700.0)
    assert (a100.idle_watts, a100.prefill_watts, a100.decode_watts) == (63.0, 400.0, 250.0)
    assert (h100.idle_watts, h100.prefill_watts, h100.decode_watts) == (75.0, 700.0, 380.0)
    assert h200.memory_bytes > h100.memory_bytes == a100.memory_bytes


def test_link_transfer_time_is_alpha_beta() -> None:
    link = LinkSpec(bandwidth_bytes_per_s=100e9, latency_s=5e-6)
    assert link.transfer_time_s(0) == 0.0
    assert link.transfer_time_s(1e9) == pytest.approx(5e-6 + 0.01)
    with pytest.raises(ValueError, match="num_bytes"):
        link.transfer_time_s(-1)


def test_cluster_numbering_and_links() -> None:
    cluster = ClusterSpec.homogeneous("h100", num_nodes=2)
    assert cluster.num_gpus == 16
    assert (cluster.node_of(7), cluster.node_of(8)) == (0, 1)
    assert cluster.gpu_of(15).name == "h100"
    assert cluster.link_between(3, 3) is None
    nvlink = cluster.link_between(0, 7)
    infiniband = cluster.link_between(0, 8)
    assert nvlink is not None and infiniband is not None
    assert nvlink.bandwidth_bytes_per_s == pytest.approx(450e9)
    assert infiniband.bandwidth_bytes_per_s == pytest.approx(50e9)  # 400 Gb/s
    assert list(cluster.gpus_of_node(1)) == list(range(8, 16))
    with pytest.raises(ValueError, match="out of range"):
        cluster.node_of(16)
    with pytest.raises(ValueError, match="unknown GPU"):
        ClusterSpec.homogeneous("tpu", 1)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    "alias", ["llama-2-70b", "Llama-2-70B", "meta-llama/Llama-2-70b-hf", "llama-2-70b-hf", "LLAMA2-70B"]
)
def test_get_model_accepts_aliases(alias: str) -> None:
    assert get_model(alias).name == "llama-2-70b"


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*codellama-34b.*qwen2-vl-7b"):
        get_model("gpt-5")


#: Published parameter counts (model cards), billions.
_PUBLISHED_PARAMS_B = {
    "llama-2-7b": 6.74,
    "llama-3-8b": 8.03,
    "codellama-34b": 33.7,
    "llama-2-70b": 68.98,
    "qwen2-7b": 7.62,
    "qwen2-57b-a14b": 57.41,
    "mixtral-8x7b": 46.70,
    "qwen2-vl-7b": 8.29,
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED_PARAMS_B))
def test_weight_bytes_match_published_parameter_counts(name: str) -> None:
    model = get_model(name)
    params_b = model.total_weight_bytes() / model.dtype_bytes / 1e9
    assert params_b == pytest.approx(_PUBLISHED_PARAMS_B[name], rel=0.02)


def test_catalog_is_complete() -> None:
    assert set(MODEL_CATALOG) == set(_PUBLISHED_PARAMS_B)


def test_units_in_forward_order() -> None:
    dense = get_model("qwen2-7b").units
    assert dense == (
        UnitKind.EMBED,
        UnitKind.NORM,
        UnitKind.QKV_PROJ,
        UnitKind.ATTENTION,
        UnitKind.O_PROJ,
        UnitKind.FFN,
        UnitKind.LM_HEAD,
    )
    assert get_model("mixtral-8x7b").units[5] is UnitKind.MOE
    assert UnitKind.FFN not in get_model("qwen2-57b-a14b").units
    assert get_model("qwen2-vl-7b").units[0] is UnitKind.VISION_ENCODER
    assert get_model("llama-2-7b").layers_of(UnitKind.FFN) == 32
    assert get_model("llama-2-7b").layers_of(UnitKind.LM_HEAD) == 1
    with pytest.raises(ValueError, match="has no unit 'moe'"):
        get_model("llama-2-7b").layers_of(UnitKind.MOE)


def test_kv_bytes_per_token_and_tp_sharding() -> None:
    llama7 = get_model("llama-2-7b")
    assert llama7.kv_bytes_per_token() == 2 * 32 * 128 * 2 * 32  # 0.5 MiB
    assert llama7.kv_bytes_per_token(tp=4) == llama7.kv_bytes_per_token() / 4
    llama70 = get_model("llama-2-70b")
    assert llama70.kv_bytes_per_token() == 2 * 8 * 128 * 2 * 80
    # 8 KV heads over 16 shards: replicated, one per shard (vLLM's rule)
    assert llama70.kv_heads_per_shard(16) == 1
    assert llama70.weight_bytes(UnitKind.FFN, tp=8) == pytest.approx(llama70.weight_bytes(UnitKind.FFN) / 8)


@pytest.mark.parametrize(
    ("name", "tp"), [("llama-2-7b", 3), ("qwen2-7b", 8), ("qwen2-7b", 7), ("llama-2-70b", 0)]
)
def test_tp_that_does_not_divide_the_heads_is_rejected(name: str, tp: int) -> None:
    with pytest.raises(ValueError, match=r"(does not divide|positive int).*"):
        get_model(name).validate_tp(tp)


def test_valid_tp_degrees_are_listed() -> None:
    assert get_model("qwen2-7b").valid_tp_degrees(limit=8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"valid TP degrees: \[1, 2, 4, 28\]"):
        get_model("qwen2-7b").validate_tp(8)


def test_gemm_flops_and_bytes_closed_form() -> None:
    model = get_model("llama-2-7b")
    tokens = 1000
    # QKV: 2 * T * h * 3h per layer
    assert model.flops(UnitKind.QKV_PROJ, tokens) == pytest.approx(2 * tokens * 4096 * 3 * 4096 * 32)
    expected_bytes = (4096 * 3 * 4096 + tokens * (4096 + 3 * 4096)) * 2 * 32
    assert model.bytes_moved(UnitKind.QKV_PROJ, tokens) == pytest.approx(expected_bytes)
    # attention FLOPs: 4 * head_dim * heads per query-key pair
    assert model.flops(UnitKind.ATTENTION, 1, context_tokens=500) == pytest.approx(4 * 128 * 32 * 500 * 32)
    with pytest.raises(ValueError, match="num_tokens"):
        model.flops(UnitKind.FFN, -1)


def test_moe_experts_sized_by_tokens_per_expert() -> None:
    mixtral = get_model("mixtral-8x7b")
    gemms = {g.name: g for g in mixtral.gemms(UnitKind.MOE)}
    assert gemms["expert_up"].tokens_scale == pytest.approx(2 / 8)
    assert gemms["expert_up"].count == 8
    tokens = 4096
    # FLOPs: router + top-k experts' worth of a dense FFN per token
    dense_ffn_per_token = 2 * (4096 * 2 * 14336 + 14336 * 4096)
    router = 2 * 4096 * 8
    assert mixtral.flops(UnitKind.MOE, tokens) == pytest.approx(
        tokens * (2 * dense_ffn_per_token + router) * 32
    )
    # one token reaches exactly top_k experts' weights; many tokens reach all experts
    assert gemms["expert_up"].matrices_read(1.0) == pytest.approx(2.0)
    assert gemms["expert_up"].matrices_read(10_000.0) == pytest.approx(8.0)
    qwen_moe = get_model("qwen2-57b-a14b")
    names = [g.name for g in qwen_moe.gemms(UnitKind.MOE)]
    assert names == ["router", "expert_up", "expert_down", "shared_up", "shared_down"]


def test_activation_bytes_handed_on() -> None:
    model = get_model("llama-3-8b")
    assert model.activation_bytes_per_token(UnitKind.QKV_PROJ) == (4096 + 2 * 1024) * 2
    assert model.activation_bytes_per_token(UnitKind.ATTENTION) == 4096 * 2
    assert model.activation_bytes_per_token(UnitKind.FFN) == 4096 * 2
    vl = get_model("qwen2-vl-7b")
    assert vl.activation_bytes_per_token(UnitKind.VISION_ENCODER) == pytest.approx(3584 * 2 / 4)


def test_tp_collectives_per_unit() -> None:
    model = get_model("llama-2-70b")
    assert model.tp_allreduce(UnitKind.O_PROJ) == (8192 * 2, 80)
    assert model.tp_allreduce(UnitKind.QKV_PROJ) == (0.0, 0)
    assert model.tp_allreduce(UnitKind.EMBED) == (8192 * 2, 1)
