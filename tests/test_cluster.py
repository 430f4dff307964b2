"""Cluster state: memory accounting, placement policies, deployment constructors and validation."""

from __future__ import annotations

import pytest

from opscale.sim.cluster import ClusterState, PlacementError, colocation_affinity
from opscale.sim.config import SimConfig
from opscale.sim.deployment import Deployment, Placement, ScalingAction, UnitAction, UnitDeployment
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import UnitKind, get_model
from opscale.traces.trace import RequestTrace


def _state(num_nodes: int = 2) -> ClusterState:
    return ClusterState(ClusterSpec.homogeneous("a100", num_nodes), get_model("llama-2-7b"), SimConfig())


def test_usable_memory_and_reservations() -> None:
    state = _state(1)
    gpu = state.gpus[0]
    assert gpu.capacity_bytes == pytest.approx(80e9 * 0.9)
    state.reserve((0, 1), 10e9, now_s=0.0)
    assert state.gpus[0].free_bytes == pytest.approx(62e9)
    assert state.gpus_powered == 2
    with pytest.raises(PlacementError, match=r"GPU 0 .*62.00 GB free.*needs 70.00 GB"):
        state.reserve((0,), 70e9, now_s=0.0)
    state.release((0, 1), 10e9, now_s=1.0)
    assert state.gpus_powered == 0 and state.gpus[1].used_bytes == 0.0


def test_tp_groups_stay_inside_one_node() -> None:
    state = _state(2)
    for _ in range(4):
        group = state.find_group(4, 70e9, Placement.PACK)
        assert group is not None
        assert len({state.gpus[i].node for i in group}) == 1
        state.reserve(group, 70e9, now_s=0.0)
    assert state.find_group(4, 70e9, Placement.PACK) is None
    assert state.find_group(4, 1e9, Placement.PACK) is not None


def test_tp_groups_are_aligned_and_nest() -> None:
    state = _state(1)
    # a TP-1 replica on GPU 3 must not pull a TP-2 group onto (3, 4) or a TP-4 group onto (2..5)
    state.reserve((3,), 20e9, now_s=0.0)
    assert state.find_group(2, 10e9, Placement.PACK) == (2, 3)
    assert state.find_group(4, 10e9, Placement.PACK) == (0, 1, 2, 3)
    state.reserve((0, 1, 2, 3), 10e9, now_s=0.0)
    assert state.find_group(4, 10e9, Placement.SPREAD_GPU) == (4, 5, 6, 7)
    # no aligned group left with room: None even though four scattered GPUs have it
    state.reserve((4,), 60e9, now_s=0.0)
    assert state.find_group(4, 45e9, Placement.PACK) is None
    assert state.find_group(2, 45e9, Placement.PACK) == (0, 1)


def test_pack_fills_powered_gpus_first_spread_uses_fresh_ones() -> None:
    state = _state(1)
    state.reserve((3,), 20e9, now_s=0.0)
    assert state.find_group(1, 10e9, Placement.PACK) == (3,)
    assert state.find_group(1, 10e9, Placement.SPREAD_GPU) != (3,)
    # best fit: of two powered GPUs, the one with less free memory that still fits
    state.reserve((5,), 50e9, now_s=0.0)
    assert state.find_group(1, 10e9, Placement.PACK) == (5,)
    assert state.find_group(1, 30e9, Placement.PACK) == (3,)


def test_excluded_gpus_and_odd_group_sizes() -> None:
    state = _state(2)
    state.reserve((3,), 20e9, now_s=0.0)
    # pack prefers the powered GPU 3 unless it is excluded; then the first fresh GPU (lowest index)
    assert state.find_group(1, 10e9, Placement.PACK) == (3,)
    assert state.find_group(1, 10e9, Placement.PACK, exclude=frozenset({3})) == (0,)
    assert state.find_group(1, 10e9, Placement.PACK, exclude=frozenset(range(8))) == (8,)
    # TP-3 does not divide a node of 8: the first three GPUs of the policy's order, in one node
    assert state.find_group(3, 10e9, Placement.PACK) == (0, 1, 3)
    assert state.find_group(3, 10e9, Placement.SPREAD_GPU) == (0, 1, 2)
    # a group larger than any node never fits; neither does a replica larger than any GPU
    assert state.find_group(16, 1e9, Placement.PACK) is None
    assert state.find_group(1, 100e9, Placement.SPREAD_GPU) is None
    # the placement arrays follow reservations, growth and releases
    state.grow((3,), 5e9)
    state.release((3,), 25e9, now_s=1.0)
    assert state.best_free_bytes() == pytest.approx(72e9)
    assert state.find_group(1, 10e9, Placement.PACK) == (0,)


def test_spread_node_balances_a_unit_across_nodes() -> None:
    state = _state(2)
    group = state.find_group(1, 1e9, Placement.SPREAD_NODE, unit_count_by_node={0: 3, 1: 0})
    assert group is not None and state.gpus[group[0]].node == 1


def test_colocation_affinity_counts_streams_without_a_local_replica_and_back() -> None:
    homes = {
        UnitKind.ATTENTION: [0, 0, 2, 5],
        UnitKind.FFN: [0, 2, 3],
        UnitKind.QKV_PROJ: [3, 3],
    }
    # ffn: GPU 0 has two streams and one ffn replica, GPU 5 a stream and none; GPU 2 is served
    assert colocation_affinity(UnitKind.FFN, homes) == {0: 1, 5: 1}
    assert colocation_affinity(UnitKind.QKV_PROJ, homes) == {0: 2, 2: 1, 5: 1}
    # attention: GPU 3 holds two qkv_proj replicas (and an ffn) serving no stream there
    assert colocation_affinity(UnitKind.ATTENTION, homes) == {3: 2}


def test_colocate_follows_the_affinity_and_packs_without_it() -> None:
    state = _state(1)
    state.reserve((1,), 20e9, now_s=0.0)
    state.reserve((6,), 30e9, now_s=0.0)
    # the affinity wins over best fit; a GPU without room is skipped
    assert state.find_group(1, 10e9, Placement.COLOCATE, affinity={6: 1, 4: 2}) == (4,)
    assert state.find_group(1, 45e9, Placement.COLOCATE, affinity={6: 1, 4: 2}) == (4,)
    assert state.find_group(1, 45e9, Placement.COLOCATE, affinity={6: 1}) == (1,)
    # no affinity anywhere: exactly pack
    for need in (10e9, 45e9):
        assert state.find_group(1, need, Placement.COLOCATE, affinity={}) == state.find_group(
            1, need, Placement.PACK
        )
    # TP groups: the aligned group holding the GPUs with affinity
    assert state.find_group(2, 10e9, Placement.COLOCATE, affinity={5: 1}) == (4, 5)


def test_unknown_placement_names_are_rejected_and_names_converted() -> None:
    assert UnitAction(placement="colocate").placement is Placement.COLOCATE  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown placement 'near'; valid: 'pack', 'spread-gpu'"):
        UnitAction(placement="near")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown placement"):
        UnitDeployment(1, placement="fill")  # type: ignore[arg-type]
    # a name reaching find_group reads as its policy (identity tests once read "pack" as spread-node)
    state = _state(1)
    state.reserve((5,), 20e9, now_s=0.0)
    assert state.find_group(1, 1e9, "pack") == state.find_group(1, 1e9, Placement.PACK) == (5,)  # type: ignore[arg-type]


def test_colocated_replicas_are_applied_after_the_rest_of_the_action() -> None:
    action = ScalingAction(
        units={
            UnitKind.FFN: UnitAction(1, placement=Placement.COLOCATE),
            UnitKind.ATTENTION: UnitAction(1, placement=Placement.SPREAD_GPU),
            UnitKind.NORM: UnitAction(1),
        }
    )
    assert [unit for unit, _ in action.units_in_apply_order()] == [
        UnitKind.ATTENTION,
        UnitKind.NORM,
        UnitKind.FFN,
    ]


def test_model_level_constructor_sizes_the_cluster() -> None:
    deployment = Deployment.model_level("llama-2-70b", "a100", instances=8, tp=2, pp=2)
    assert deployment.num_nodes == 4
    assert deployment.units[UnitKind.FFN].replicas == 8
    assert Deployment.from_json(deployment.to_json()) == deployment
    with pytest.raises(ValueError, match="TP degree 3"):
        Deployment.model_level("llama-2-70b", "a100", instances=1, tp=3)
    with pytest.raises(ValueError, match="does not fit a node"):
        Deployment.model_level("llama-2-70b", "a100", instances=1, tp=8, pp=2)


def test_operator_level_constructor_and_validation() -> None:
    model = get_model("qwen2-7b")
    replicas = {u.value: 1 for u in model.units}
    replicas["ffn"] = 3
    deployment = Deployment.operator_level(
        "qwen2-7b", "h100", replicas=replicas, tp={"ffn": 2}, batch_caps={"ffn": 512}, placement="spread-gpu"
    )
    ffn = deployment.units[UnitKind.FFN]
    assert (ffn.replicas, ffn.tp, ffn.batch_cap_tokens, ffn.placement) == (3, 2, 512, Placement.SPREAD_GPU)
    assert Deployment.from_json(deployment.to_json()) == deployment
    with pytest.raises(ValueError, match="unknown unit 'mlp'"):
        Deployment.operator_level("qwen2-7b", "h100", replicas={**replicas, "mlp": 1})
    with pytest.raises(ValueError, match="has no unit 'moe'"):
        Deployment.operator_level("qwen2-7b", "h100", replicas={**replicas, "moe": 1})


def test_attention_replicas_share_the_memory_left() -> None:
    model = get_model("llama-2-7b")
    deployment = Deployment.operator_level(
        model.name, "a100", replicas={u: 1 for u in model.units} | {UnitKind.ATTENTION: 2}, num_nodes=1
    )
    trace = RequestTrace(arrival_s=[0.0], prompt_tokens=[10], output_tokens=[2])
    sim = DiscreteEventSimulator(ClusterSpec.homogeneous("a100", 1), model, deployment, trace)
    # pack puts everything on GPU 0; the two attention replicas split what the weights leave
    used = sim.state.gpus[0].used_bytes
    assert used == pytest.approx(sim.state.gpus[0].capacity_bytes, rel=1e-3)
    kv = [s.kv_tokens for s in sim.streams]
    assert kv[0] == pytest.approx(kv[1], rel=0.01)
    weights = model.total_weight_bytes(1)
    expected_tokens = (sim.state.gpus[0].capacity_bytes - weights) / model.kv_bytes_per_token(1) / 2
    assert kv[0] == pytest.approx(expected_tokens, rel=0.02)
    assert sim.snapshot().gpus_powered == 1
