"""The environment's memoising cost-model wrapper answers exactly as the wrapped model."""

from __future__ import annotations

import numpy as np

from opscale.envs.costcache import MemoizedCostModel
from opscale.sim.costmodel import default_cost_model
from opscale.sim.costmodel_api import AttentionBatch
from opscale.sim.hardware import get_gpu
from opscale.sim.models import UnitKind, get_model


def test_memoised_answers_equal_the_inner_model_and_hit_on_repeat() -> None:
    inner = default_cost_model()
    memo = MemoizedCostModel(inner)
    model, gpu = get_model("qwen2-7b"), get_gpu("a100")
    tokens = np.array([1, 64, 512, 4096])
    batch = AttentionBatch(
        num_decodes=8,
        decode_context_tokens=8 * 900,
        prefill_tokens=256,
        prefill_attention_pairs=256 * 400.0,
        num_prefills=1,
    )
    for _ in range(2):
        assert memo.bound(model, UnitKind.FFN, gpu, 1, 512) == inner.bound(model, UnitKind.FFN, gpu, 1, 512)
        assert memo.unit_time_s(model, UnitKind.QKV_PROJ, gpu, 2, 300) == inner.unit_time_s(
            model, UnitKind.QKV_PROJ, gpu, 2, 300
        )
        assert np.array_equal(
            memo.unit_time_s_array(model, UnitKind.FFN, gpu, 1, tokens),
            inner.unit_time_s_array(model, UnitKind.FFN, gpu, 1, tokens),
        )
        assert memo.attention_time_s(model, gpu, 1, batch) == inner.attention_time_s(model, gpu, 1, batch)
    assert memo.misses == 4 and memo.hits == 4
    assert not memo.unit_time_s_array(model, UnitKind.FFN, gpu, 1, tokens).flags.writeable
    assert memo.send_recv_time_s(gpu, 1e6) == inner.send_recv_time_s(gpu, 1e6)


def test_cache_is_bounded() -> None:
    memo = MemoizedCostModel(default_cost_model(), max_entries=3)
    model, gpu = get_model("llama-2-7b"), get_gpu("h100")
    for tokens in range(1, 10):
        memo.unit_time_s(model, UnitKind.FFN, gpu, 1, tokens)
    assert len(memo) <= 3
