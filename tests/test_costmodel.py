"""The roofline cost model: accuracy against the Vidur profiles, roofline bounds, monotonicity up to
128 K context, TP scaling, MoE sizing, bad inputs. The profile-table backend lives in
``test_costmodel_profile_table.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opscale.sim.calibration import (
    GEMM_OPERATORS,
    HELD_OUT_MODEL,
    ObservationSet,
    ValidationRow,
    build_observations,
    check_targets,
    validate,
)
from opscale.sim.costmodel import AttentionBatch, CostModel, RooflineCostModel, default_cost_model
from opscale.sim.costmodel_coefficients import FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS
from opscale.sim.hardware import GPU_CATALOG, get_gpu
from opscale.sim.models import MODEL_CATALOG, UnitKind, get_model
from opscale.sim.profile_table import VidurProfiles

CONTEXTS_TO_128K = np.array([1, 16, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072], dtype=float)
TOKENS = np.array([1, 2, 8, 64, 100, 512, 1000, 4096, 8192, 32768, 131072], dtype=float)


@pytest.fixture(scope="module")
def cost_model() -> RooflineCostModel:
    return default_cost_model()


@pytest.fixture(scope="module")
def observations(reference_profiles_dir: Path) -> list[ObservationSet]:
    return build_observations(
        VidurProfiles.load(reference_profiles_dir / "vidur_profiles" / "data" / "profiling")
    )


@pytest.fixture(scope="module")
def validation_rows(observations: list[ObservationSet]) -> list[ValidationRow]:
    return validate(observations, FITTED_COEFFICIENTS, HELD_OUT_COEFFICIENTS)


# ----------------------------------------------------------------------------- accuracy (profiles)
@pytest.mark.shared
def test_every_accuracy_target_of_the_issue_is_met(validation_rows: list[ValidationRow]) -> None:
    targets = check_targets(validation_rows)
    names = {t.name for t in targets}
    # the rows the issue names are all there
    for gpu in ("a100", "h100"):
        assert f"{gpu} GEMM mean MAPE" in names
        assert f"{gpu} layer_sum MAPE" in names
        assert f"{gpu} all_reduce (intra-node) MAPE" in names
        assert f"{gpu} held-out {HELD_OUT_MODEL} GEMM mean / in-sample" in names
    assert "a100 attention_prefill MAPE" in names and "a100 attention_decode MAPE" in names
    missed = [f"{t.name}: {t.value:.3f} > {t.limit}" for t in targets if not t.ok]
    assert not missed, missed


@pytest.mark.shared
def test_gemm_rows_cover_every_profiled_model_and_tp(observations: list[ObservationSet]) -> None:
    qkv = {obs.gpu: obs for obs in observations if obs.operator == "qkv_proj"}
    assert set(np.unique(qkv["a100"].models)) == {"llama-2-7b", "llama-3-8b", "codellama-34b", "llama-2-70b"}
    assert set(np.unique(qkv["h100"].models)) == {"llama-2-7b", "codellama-34b", "llama-2-70b"}
    assert qkv["a100"].measured_s.size > 4000


@pytest.mark.shared
def test_held_out_fit_differs_but_scores_like_in_sample(validation_rows: list[ValidationRow]) -> None:
    assert HELD_OUT_COEFFICIENTS["a100"].gemm != FITTED_COEFFICIENTS["a100"].gemm
    for gpu in ("a100", "h100"):
        held_out = np.mean(
            [
                r.mape
                for r in validation_rows
                if r.gpu == gpu and r.scope == "held-out" and r.operator in GEMM_OPERATORS
            ]
        )
        in_sample = np.mean(
            [
                r.mape
                for r in validation_rows
                if r.gpu == gpu and r.scope == "in-sample" and r.operator in GEMM_OPERATORS
            ]
        )
        assert held_out <= 1.5 * in_sample


def test_sanity_figure_from_the_profile_readme(cost_model: RooflineCostModel) -> None:
    """Vidur: Llama-2-7B QKV for 4,096 tokens at TP1 takes 1.89 ms on A100 and 0.58 ms on H100."""
    model = get_model("llama-2-7b")
    a100 = cost_model.unit_time_s(model, UnitKind.QKV_PROJ, get_gpu("a100"), 1, 4096) / 32
    h100 = cost_model.unit_time_s(model, UnitKind.QKV_PROJ, get_gpu("h100"), 1, 4096) / 32
    assert a100 == pytest.approx(1.89e-3, rel=0.10)
    assert h100 == pytest.approx(0.58e-3, rel=0.15)


# ----------------------------------------------------------------------------- roofline bounds
@pytest.mark.parametrize("gpu_name", sorted(GPU_CATALOG))
@pytest.mark.parametrize("model_name", sorted(MODEL_CATALOG))
def test_never_faster_than_peak_flops_or_hbm(
    cost_model: RooflineCostModel, gpu_name: str, model_name: str
) -> None:
    gpu, model = get_gpu(gpu_name), get_model(model_name)
    tp = max(t for t in model.valid_tp_degrees(limit=8) if t <= 4)
    for unit in model.units:
        if unit is UnitKind.ATTENTION:
            continue
        times = cost_model.unit_time_s_array(model, unit, gpu, tp, TOKENS)
        for tokens, time_s in zip(TOKENS, times, strict=True):
            floor_s = max(
                model.flops(unit, tokens, tp) / gpu.peak_flops,
                model.bytes_moved(unit, tokens, tp) / gpu.hbm_bandwidth_bytes_per_s,
            )
            assert time_s >= floor_s * (1 - 1e-12), (unit, tokens)
    for context in CONTEXTS_TO_128K:
        decode = AttentionBatch.from_requests([int(context)] * 8)
        time_s = cost_model.attention_time_s(model, gpu, tp, decode)
        kv_bytes = 8 * context * model.kv_bytes_per_token(tp)
        assert time_s >= kv_bytes / gpu.hbm_bandwidth_bytes_per_s
        prefill = AttentionBatch.from_requests(prefill_chunks=[(512, int(context))])
        flops = model.flops(UnitKind.ATTENTION, 512, tp, context_tokens=prefill.prefill_attention_pairs)
        assert cost_model.attention_time_s(model, gpu, tp, prefill) >= flops / gpu.peak_flops


def test_fitted_efficiencies_are_fractions_of_peak() -> None:
    for coefficients in (*FITTED_COEFFICIENTS.values(), *HELD_OUT_COEFFICIENTS.values()):
        assert 0 < coefficients.gemm.compute_efficiency <= 1
        assert 0 < coefficients.gemm.memory_efficiency <= 1
        assert all(0 < e.memory_efficiency <= 1 for e in coefficients.elementwise.values())
        attention = coefficients.attention
        assert 0 < attention.prefill_new_efficiency <= 1 and 0 < attention.prefill_cached_efficiency <= 1
        assert 0 < attention.decode_memory_efficiency <= 1


# ----------------------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("model_name", sorted(MODEL_CATALOG))
def test_monotone_in_tokens_up_to_128k(cost_model: RooflineCostModel, model_name: str) -> None:
    model = get_model(model_name)
    tokens = np.arange(0, 131073, 37, dtype=float)
    for gpu in GPU_CATALOG.values():
        for unit in model.units:
            if unit is UnitKind.ATTENTION:
                continue
            times = cost_model.unit_time_s_array(model, unit, gpu, 1, tokens)
            assert times[0] == 0.0
            assert np.all(np.diff(times) >= 0), (gpu.name, unit)


@pytest.mark.parametrize("model_name", ["llama-2-70b", "qwen2-7b", "qwen2-57b-a14b"])
def test_attention_monotone_in_context_up_to_128k(cost_model: RooflineCostModel, model_name: str) -> None:
    model, gpu = get_model(model_name), get_gpu("h100")
    context = np.arange(1, 131073, 61, dtype=float)
    ones = np.ones_like(context)
    decode = cost_model.attention_time_s_array(
        model, gpu, 1, ones * 16, context * 16, 0 * ones, 0 * ones, 0 * ones
    )
    assert np.all(np.diff(decode) > 0)
    chunk = 2048.0
    pairs = chunk * context + chunk * (chunk + 1) / 2
    prefill = cost_model.attention_time_s_array(model, gpu, 1, 0 * ones, 0 * ones, chunk * ones, pairs, ones)
    assert np.all(np.diff(prefill) > 0)
    # a 128K prompt costs far more than a 4K one (no ceiling), roughly quadratically
    full = [
        cost_model.attention_time_s(model, gpu, 1, AttentionBatch.from_requests(prefill_chunks=[(n, 0)]))
        for n in (4096, 131072)
    ]
    assert full[1] / full[0] > 0.5 * (131072 / 4096) ** 2


def test_chunked_prefill_is_priced_by_new_and_cached_pairs(cost_model: RooflineCostModel) -> None:
    """The profiles price a within-chunk (causal) query-key pair ~2x a cached-context pair, so eight
    1K chunks of an 8K prompt cost less attention than one 8K pass, but no less than the cached rate."""
    model, gpu = get_model("llama-2-70b"), get_gpu("a100")
    one_pass = cost_model.attention_time_s(
        model, gpu, 2, AttentionBatch.from_requests(prefill_chunks=[(8192, 0)])
    )
    chunked = sum(
        cost_model.attention_time_s(
            model, gpu, 2, AttentionBatch.from_requests(prefill_chunks=[(1024, prior)])
        )
        for prior in range(0, 8192, 1024)
    )
    attention = FITTED_COEFFICIENTS["a100"].attention
    cheapest = attention.prefill_new_efficiency / attention.prefill_cached_efficiency
    assert cheapest * 0.9 < chunked / one_pass < 1.0


# ----------------------------------------------------------------------------- TP scaling, MoE, GPUs
def test_tp_shrinks_big_gemms_and_adds_all_reduce(cost_model: RooflineCostModel) -> None:
    model, gpu = get_model("llama-2-70b"), get_gpu("h100")
    kernel = {}
    for tp in (1, 2, 4, 8):
        total = cost_model.unit_time_s(model, UnitKind.FFN, gpu, tp, 4096)
        allreduce = model.num_layers * cost_model.allreduce_time_s(gpu, tp, 4096 * model.hidden_size * 2)
        kernel[tp] = total - allreduce
        assert (allreduce > 0) == (tp > 1)
    assert kernel[1] > kernel[2] > kernel[4] > kernel[8]
    assert kernel[1] / kernel[8] > 5  # near-linear speed-up for a compute-bound GEMM
    # QKV has no collective of its own
    assert cost_model.unit_time_s(model, UnitKind.QKV_PROJ, gpu, 8, 4096) < cost_model.unit_time_s(
        model, UnitKind.QKV_PROJ, gpu, 1, 4096
    )


def test_allreduce_grows_with_bytes_and_crosses_nodes(cost_model: RooflineCostModel) -> None:
    gpu = get_gpu("a100")
    assert cost_model.allreduce_time_s(gpu, 1, 1e6) == 0.0
    small, large = cost_model.allreduce_time_s(gpu, 8, 1e4), cost_model.allreduce_time_s(gpu, 8, 1e8)
    assert 0 < small < large
    assert cost_model.allreduce_time_s(gpu, 16, 1e8) > large  # beyond one node: InfiniBand
    assert cost_model.send_recv_time_s(gpu, 1e8, cross_node=True) > cost_model.send_recv_time_s(gpu, 1e8)
    assert cost_model.send_recv_time_s(gpu, 0) == 0.0


def test_moe_time_follows_tokens_per_expert(cost_model: RooflineCostModel) -> None:
    mixtral, gpu = get_model("mixtral-8x7b"), get_gpu("h100")
    # Mixtral's dense twin: one expert as a dense FFN of the same shape (Llama-3-8B has it exactly)
    twin = get_model("llama-3-8b")
    tokens = 32768
    moe = cost_model.unit_time_s(mixtral, UnitKind.MOE, gpu, 1, tokens)
    one_expert_ffn = cost_model.unit_time_s(twin, UnitKind.FFN, gpu, 1, tokens)
    # compute-bound: top_k = 2 experts' worth of work per token
    assert moe / one_expert_ffn == pytest.approx(2.0, rel=0.15)
    # decode of one token streams top_k = 2 experts' weights, a batch of 64 streams all 8
    one = cost_model.unit_time_s(mixtral, UnitKind.MOE, gpu, 1, 1)
    batch = cost_model.unit_time_s(mixtral, UnitKind.MOE, gpu, 1, 64)
    assert 3.0 < batch / one < 4.5


def test_h200_is_faster_only_where_memory_bound(cost_model: RooflineCostModel) -> None:
    model = get_model("llama-2-70b")
    h100, h200 = get_gpu("h100"), get_gpu("h200")
    decode_ratio = cost_model.unit_time_s(model, UnitKind.FFN, h100, 4, 8) / cost_model.unit_time_s(
        model, UnitKind.FFN, h200, 4, 8
    )
    prefill_ratio = cost_model.unit_time_s(model, UnitKind.FFN, h100, 4, 8192) / cost_model.unit_time_s(
        model, UnitKind.FFN, h200, 4, 8192
    )
    assert decode_ratio > 1.2
    assert prefill_ratio < decode_ratio


def test_scalar_memo_matches_the_array_path(cost_model: RooflineCostModel) -> None:
    model, gpu = get_model("qwen2-vl-7b"), get_gpu("a100")
    for unit in model.units:
        if unit is UnitKind.ATTENTION:
            continue
        array = cost_model.unit_time_s_array(model, unit, gpu, 2, np.array([0.0, 7.0, 300.0]))
        scalars = [cost_model.unit_time_s(model, unit, gpu, 2, n) for n in (0, 7, 300)]
        assert scalars == pytest.approx(list(array))
        assert cost_model.unit_time_s(model, unit, gpu, 2, 300) == scalars[2]  # memoised, same value
    assert isinstance(cost_model, CostModel)


def test_bound_flips_from_memory_to_compute(cost_model: RooflineCostModel) -> None:
    model, gpu = get_model("llama-2-7b"), get_gpu("a100")
    assert cost_model.bound(model, UnitKind.FFN, gpu, 1, 1) == "memory"
    assert cost_model.bound(model, UnitKind.FFN, gpu, 1, 4096) == "compute"
    assert cost_model.bound(model, UnitKind.NORM, gpu, 1, 4096) == "memory"


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(cost_model: RooflineCostModel) -> None:
    model, gpu = get_model("llama-2-7b"), get_gpu("a100")
    with pytest.raises(ValueError, match="must be finite and >= 0, got -5"):
        cost_model.unit_time_s(model, UnitKind.FFN, gpu, 1, -5)
    with pytest.raises(ValueError, match="TP degree 3 does not divide"):
        cost_model.unit_time_s(model, UnitKind.FFN, gpu, 3, 10)
    with pytest.raises(ValueError, match="use attention_time_s"):
        cost_model.unit_time_s(model, UnitKind.ATTENTION, gpu, 1, 10)
    with pytest.raises(ValueError, match="has no unit 'moe'"):
        cost_model.unit_time_s(model, UnitKind.MOE, gpu, 1, 10)
    with pytest.raises(ValueError, match=r"no cost-model coefficients for GPU 'h100'; calibrated GPUs: a100"):
        RooflineCostModel(coefficients={"a100": FITTED_COEFFICIENTS["a100"]}).unit_time_s(
            model, UnitKind.FFN, get_gpu("h100"), 1, 10
        )
    with pytest.raises(ValueError, match="both zero or both positive"):
        AttentionBatch(prefill_tokens=10, prefill_attention_pairs=55, num_prefills=0)
    with pytest.raises(ValueError, match="num_decodes must be >= 0"):
        AttentionBatch(num_decodes=-1)
    with pytest.raises(ValueError, match="attends at least to itself"):
        AttentionBatch(prefill_tokens=10, prefill_attention_pairs=5, num_prefills=1)
