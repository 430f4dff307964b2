"""The fluid fidelity's fast paths agree with their plain definitions, and the documented one-solve rule.

The compiled interval model looks tables up one value at a time and aggregates the layout for speed;
these tests recompute the same quantities the direct way (vectorised tables, pairwise links, per-GPU
shard matrices, the direct TTFT and Poisson sums) and check that the cut-free advance serves a loading replica from the interval
boundary nearest its ready time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from opscale.sim.cluster import _find_group, colocation_affinity, release_group, reserve_group
from opscale.sim.costmodel import default_cost_model
from opscale.sim.deployment import Deployment, ScalingAction, UnitAction
from opscale.sim.engine import DiscreteEventSimulator
from opscale.sim.fluid import ERLANG_GRID_POINTS, MAX_TABLE_SERVERS, FluidSimulator
from opscale.sim.fluid_kernel import (
    KernelConstants,
    _erlang_at,
    _line_at,
    _poisson_total_at_least,
    _ttft_cdf,
    _ttft_partial_sums,
    _ttft_share_within,
    colocation_matrix,
    operator_layout,
    solve_interval_fields,
)
from opscale.sim.fluid_latency import TtftMixture, shared_poisson_tail_table
from opscale.sim.fluid_layout import _apply_scaling, _placement_context, _scale_down_order, _summarise_slots
from opscale.sim.fluid_tables import GRID_POINTS_PER_OCTAVE, UnitTimeTable
from opscale.sim.hardware import ClusterSpec, get_gpu
from opscale.sim.models import UnitKind, get_model
from opscale.sim.queueing import shared_erlang_c_table
from opscale.traces.trace import RequestTrace

MODEL = "llama-2-7b"
MODEL_SPEC = get_model(MODEL)


def poisson_trace(rate_per_s: float, duration_s: float, seed: int = 0) -> RequestTrace:
    rng = np.random.default_rng(seed)
    count = int(rng.poisson(rate_per_s * duration_s))
    arrival = np.sort(rng.uniform(0.0, duration_s, count))
    prompt = np.clip(rng.lognormal(np.log(800.0), 0.8, count), 1, 3000).astype(np.int64)
    output = np.clip(rng.lognormal(np.log(150.0), 0.8, count), 1, 1000).astype(np.int64)
    return RequestTrace(arrival, prompt, output, time_range_s=(0.0, duration_s))


@pytest.fixture(scope="module")
def constants() -> KernelConstants:
    """The compiled interval model's constants for a small operator-level deployment."""
    replicas = {unit.value: 2 for unit in MODEL_SPEC.units}
    deployment = Deployment.operator_level(MODEL, "a100", replicas=replicas, num_nodes=1)
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", 1), MODEL, deployment, poisson_trace(2.0, 60.0)
    )
    return simulator._kernel_constants


def test_segment_lines_match_the_vectorised_table() -> None:
    model, gpu = get_model(MODEL), get_gpu("a100")
    units = [u for u in model.units if u is not UnitKind.ATTENTION]
    table = UnitTimeTable(model, gpu, default_cost_model(), units, [1] * len(units))
    tokens = [0.0, 0.5, 1.0, 3.3, 100.0, 777.0, 4096.0, 300_000.0]
    grid = np.broadcast_to(np.array(tokens), (len(units), len(tokens)))
    times = table.time_s_at(grid)
    compute = times * table.compute_bound_at(grid)
    per_octave = float(GRID_POINTS_PER_OCTAVE)
    segments = table.segments
    for row in range(len(units)):
        line = [_line_at(segments[0, row], segments[1, row], per_octave, t) for t in tokens]
        compute_line = [_line_at(segments[2, row], segments[3, row], per_octave, t) for t in tokens]
        assert line == pytest.approx(times[row].tolist(), rel=1e-12, abs=1e-15)
        assert compute_line == pytest.approx(compute[row].tolist(), rel=1e-12, abs=1e-15)
    # a memory-bound decode and a compute-bound long prefill (the flag switches once, near the ridge)
    ffn = units.index(UnitKind.FFN)
    assert _line_at(segments[2, ffn], segments[3, ffn], per_octave, 1.0) == 0.0
    assert _line_at(segments[2, ffn], segments[3, ffn], per_octave, 200_000.0) > 0.0


def test_erlang_rows_equal_the_table_lookup() -> None:
    table = shared_erlang_c_table(MAX_TABLE_SERVERS, ERLANG_GRID_POINTS)
    rng = np.random.default_rng(2)
    for servers, utilisation in zip(rng.integers(0, 129, 300), rng.uniform(-0.1, 1.1, 300), strict=True):
        expected = table.lookup_scalar(int(servers), float(utilisation))
        assert _erlang_at(table.rows[servers], table.steps, float(utilisation)) == pytest.approx(
            expected, rel=1e-12, abs=1e-15
        )


def test_summed_poisson_tails_equal_the_vectorised_lookup(constants: KernelConstants) -> None:
    table = shared_poisson_tail_table()
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 400, 16).astype(float)
    needed = rng.integers(1, 200, 16)
    for rate in (0.0, 1e-7, 0.003, 0.2, 5.0):
        expected = float(table.lookup(counts * rate, needed.astype(float)).sum())
        total = _poisson_total_at_least(constants, rate, counts, needed)
        assert total == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("prob_wait", "wait_mean_s", "late_share"), [(0.4, 0.3, 0.0), (0.9, 1e-4, 0.2), (0.0, 0.0, 0.5)]
)
def test_sorted_ttft_cdf_equals_the_direct_sum(
    prob_wait: float, wait_mean_s: float, late_share: float
) -> None:
    fixed = np.random.default_rng(5).uniform(0.05, 40.0, 16)
    mixture = TtftMixture(fixed, prob_wait, wait_mean_s, late_share, late_s=2.5)
    ordered = np.sort(fixed)
    sums = _ttft_partial_sums(ordered, prob_wait, wait_mean_s)
    for t in [0.0, 0.05, *fixed.tolist(), 1.0, 2.5, 10.0, 100.0]:
        direct = float(mixture.cdf(np.array(t)))
        assert _ttft_cdf(ordered, sums, prob_wait, wait_mean_s, late_share, 2.5, t) == pytest.approx(
            direct, abs=1e-12
        )
        if late_share == 0.0:
            assert _ttft_share_within(fixed, prob_wait, wait_mean_s, t) == pytest.approx(direct, abs=1e-12)
    # quantiles invert the CDF (between grid points it is interpolated: within the grid's spacing)
    for level, value in zip((0.5, 0.99), mixture.quantiles((0.5, 0.99)), strict=True):
        assert float(mixture.cdf(np.array(value * 1.02))) >= level - 1e-9
        assert float(mixture.cdf(np.array(value * 0.98))) <= level + 1e-9


def _brute_force_layout(simulator: FluidSimulator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shards per (GPU, unit); per unit the inbound transfer terms by pairwise links; and the
    co-location matrix (the definitions): per GPU, shards x shards, where both units serve only the
    GPU's own k streams (attention, and pools placed like it whose source is too) scaled by the other
    streams' share there over the global one, (1 - 1/k) / (1 - 1/S); over each unit's shards."""
    units, cluster = simulator.model.units, simulator.cluster
    now = simulator.now_s
    shards = np.zeros((cluster.num_gpus, len(units)))
    homes = np.zeros((len(units), cluster.num_gpus))
    for column, unit in enumerate(units):
        for replica in simulator.layout.replicas[unit]:
            if replica.ready_s <= now:
                homes[column, replica.gpus[0]] += 1
                for gpu in replica.gpus:
                    shards[gpu, column] += 1
    share = homes / np.maximum(homes.sum(axis=1, keepdims=True), 1.0)
    fixed, per_token = np.zeros(len(units)), np.zeros(len(units))
    for column in range(len(units)):
        source_row = simulator._transfer_source_rows[column]
        for a in range(cluster.num_gpus):
            if homes[column, a] > 0:
                continue
            for b in range(cluster.num_gpus):
                link = cluster.link_between(a, b)
                if link is None:
                    continue
                weight = share[source_row, a] * share[column, b]
                fixed[column] += weight * link.latency_s
                per_token[column] += weight / link.bandwidth_bytes_per_s
    fixed *= simulator._transfer_constants.hops
    per_token *= simulator._transfer_constants.bytes_per_token
    attention = units.index(UnitKind.ATTENTION)
    local = {attention}
    for column in range(len(units)):
        if (homes[column] == homes[attention]).all() and simulator._transfer_source_rows[column] in local:
            local.add(column)
    streams = homes[attention].sum()
    colocation = np.zeros((len(units), len(units)))
    for row in shards:
        k = row[attention]
        for column in range(len(units)):
            for other in range(len(units)):
                weight = row[column] * row[other]
                if column in local and other in local and k and streams > 1:
                    weight *= (1.0 - 1.0 / k) / (1.0 - 1.0 / streams)
                colocation[column, other] += weight
    colocation /= np.maximum(shards.sum(axis=0), 1.0)[:, None]
    return shards, fixed, per_token, colocation


def test_layout_summary_matches_the_pairwise_definitions() -> None:
    replicas = {"embed": 2, "norm": 1, "qkv_proj": 3, "attention": 4, "o_proj": 2, "ffn": 5, "lm_head": 1}
    deployment = Deployment.operator_level(
        MODEL, "a100", replicas=replicas, placement="spread-gpu", num_nodes=2
    )
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", 2), MODEL, deployment, poisson_trace(2.0, 60.0)
    )
    simulator.advance(5.0)
    simulator.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=2, placement="spread-node")}))
    simulator.advance(5.0)  # the added replicas load in well under half an interval: they serve it
    _check_layout_summary(simulator)
    assert simulator.advance(5.0).units[UnitKind.FFN].replicas == 7
    # removals free slots of the layout's table and additions reuse them: the summary follows
    simulator.apply(
        ScalingAction(
            units={
                UnitKind.FFN: UnitAction(replica_delta=-3),
                UnitKind.ATTENTION: UnitAction(replica_delta=-1),
                UnitKind.EMBED: UnitAction(replica_delta=1, placement="colocate"),
            }
        )
    )
    assert simulator.advance(5.0).units[UnitKind.FFN].replicas == 4
    _check_layout_summary(simulator)
    simulator.apply(ScalingAction(units={UnitKind.QKV_PROJ: UnitAction(replica_delta=2, placement="pack")}))
    simulator.advance(5.0)
    _check_layout_summary(simulator)
    assert simulator._serving_summary.replicas == tuple(
        len(simulator.layout.replicas[unit]) for unit in MODEL_SPEC.units
    )


def test_placement_reads_of_the_slot_table_match_their_definitions() -> None:
    """What the fluid's placement computes compiled over the slot table and the cluster's arrays is the
    engine's definition, on layouts grown and shrunk at random across two nodes (loading and serving
    replicas mixed): the scale-down order is a stable sort by loading first, then
    ``ClusterState.release_order``, then the latest ready; the co-location affinity is
    :func:`colocation_affinity` of the replicas' home GPUs; the per-node count is the unit's replicas
    per node."""
    rng = np.random.default_rng(7)
    deployment = Deployment.operator_level(
        MODEL, "a100", replicas=dict.fromkeys((u.value for u in MODEL_SPEC.units), 2), num_nodes=2
    )
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", 2), MODEL, deployment, poisson_trace(2.0, 600.0)
    )
    layout = simulator.layout
    policies = ["pack", "spread-gpu", "spread-node", "colocate"]
    checked = 0
    for _ in range(60):
        simulator.advance(float(rng.choice([0.5, 5.0])))  # some replicas still load at the next check
        unit = MODEL_SPEC.units[rng.integers(len(MODEL_SPEC.units))]
        delta = int(rng.integers(-3, 4)) or 1
        now_s = simulator.now_s
        placed = layout.replicas[unit]  # in placement order
        expected = [
            replica.slot
            for replica in sorted(
                placed, key=lambda r: (r.ready_s <= now_s, layout.state.release_order(r.gpus), -r.ready_s)
            )
        ]
        cluster = layout.state.placement_arrays()
        for count in range(len(expected) + 1):
            positions = _scale_down_order(
                np.array([replica.slot for replica in placed], dtype=np.int64),
                layout._slot_gpus,
                layout._slot_ready_s,
                cluster.residents,
                cluster.used_bytes,
                now_s,
                count,
            )
            assert [placed[position].slot for position in positions] == expected[:count]
            checked += 1
        homes = {other: [r.gpus[0] for r in placed] for other, placed in layout.replicas.items()}
        affinity, units_per_node = _placement_context(
            layout._slot_column,
            layout._slot_gpus,
            len(MODEL_SPEC.units),
            MODEL_SPEC.units.index(unit),
            MODEL_SPEC.units.index(UnitKind.ATTENTION),
            layout._node_of_gpu,
            2,
        )
        assert dict(zip(*np.nonzero(affinity), affinity[affinity > 0], strict=True)) == colocation_affinity(
            unit, homes
        )
        per_node = [
            sum(1 for gpu in homes[unit] if simulator.cluster.node_of(gpu) == node) for node in range(2)
        ]
        assert units_per_node.tolist() == per_node
        report = simulator.apply(
            ScalingAction(units={unit: UnitAction(replica_delta=delta, placement=str(rng.choice(policies)))})
        )
        # a removal takes the replicas first in that order (one always stays)
        removed = report.replicas_removed.get(unit, 0)
        assert removed == (min(-delta, len(placed) - 1) if delta < 0 else 0)
        assert {r.slot for r in layout.replicas[unit]} >= set(expected[removed:])
        assert not {r.slot for r in layout.replicas[unit]} & set(expected[:removed])
        # the cluster's memory and residents are the sums over the replicas placed on each GPU
        used = np.zeros(simulator.cluster.num_gpus)
        residents = np.zeros(simulator.cluster.num_gpus, dtype=np.int64)
        for replicas in layout.replicas.values():
            for replica in replicas:
                for gpu in replica.gpus:
                    used[gpu] += replica.bytes_per_gpu
                    residents[gpu] += 1
        np.testing.assert_allclose(cluster.used_bytes, used, rtol=1e-9, atol=1e-3)
        np.testing.assert_allclose(cluster.free_bytes, cluster.capacity_bytes - used, rtol=1e-9, atol=1e-3)
        assert cluster.residents.tolist() == residents.tolist()
        assert layout.state.gpus_powered == int(np.count_nonzero(residents))
    assert checked > 200


def test_layout_summary_of_chains_and_shared_gpus() -> None:
    """Chains (every unit beside its stream: no co-located work of other streams) next to a GPU with two
    streams, and an FFN pool that is not placed like the streams (so it, and the LM head fed by it,
    are not local)."""
    stream_gpus = [(0,), (1,), (2,), (2,)]
    gpus = {unit.value: stream_gpus for unit in MODEL_SPEC.units}
    gpus["ffn"] = [(0,), (1,), (2,), (3,)]
    replicas = dict.fromkeys(gpus, 4)
    deployment = Deployment.operator_level(MODEL, "a100", replicas=replicas, gpus=gpus, num_nodes=1)
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", 1), MODEL, deployment, poisson_trace(2.0, 60.0)
    )
    simulator.advance(5.0)
    summary = simulator._serving_summary
    constants = simulator._kernel_constants
    local, _ = colocation_matrix(
        summary.homes,
        summary.gpu_shards,
        simulator._transfer_constants.source_rows,
        constants.attention_column,
        summary.replicas[constants.attention_column],
    )
    units = MODEL_SPEC.units
    assert {units[column] for column in np.flatnonzero(local)} == set(units) - {
        UnitKind.FFN,
        UnitKind.LM_HEAD,
    }
    _check_layout_summary(simulator)
    # on GPUs 0 and 1 a chain's attention meets no other stream's work
    attention = units.index(UnitKind.ATTENTION)
    # GPU 2 only: 2 x 2 shard pairs over attention's 4 shards, other streams' share 1/2 there over 3/4
    assert simulator._kernel_layout.colocation[attention, attention] == pytest.approx(
        (2 * 2 / 4) * (1 - 1 / 2) / (1 - 1 / 4)
    )


def _check_layout_summary(simulator: FluidSimulator) -> None:
    shards, fixed, per_token, colocation = _brute_force_layout(simulator)
    summary = simulator._serving_summary
    assert summary.active_gpus == int(np.count_nonzero(shards.sum(axis=1)))
    assert np.array_equal(summary.gpu_shards, shards[shards.any(axis=1)])
    layout, constants = simulator._kernel_layout, simulator._kernel_constants
    pools, attention = constants.pool_columns, constants.attention_column
    assert layout.pool_transfer_fixed_s == pytest.approx(fixed[pools], rel=1e-12, abs=1e-18)
    assert layout.pool_transfer_per_token_s == pytest.approx(per_token[pools], rel=1e-12, abs=1e-24)
    assert layout.attention_transfer_fixed_s == pytest.approx(fixed[attention], rel=1e-12, abs=1e-18)
    assert layout.attention_transfer_per_token_s == pytest.approx(per_token[attention], rel=1e-12, abs=1e-24)
    assert np.allclose(layout.colocation, colocation, rtol=1e-12, atol=0.0)


def test_a_loading_instance_serves_from_the_boundary_nearest_its_ready_time() -> None:
    """Overload on one instance; a second one is added: an interval it would serve for less than half
    gets one instance's throughput, one it serves for more than half gets two."""
    trace = poisson_trace(40.0, 60.0, seed=3)
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", 1),
        MODEL,
        Deployment.model_level(MODEL, "a100", instances=1, num_nodes=1),
        trace,
    )
    simulator.advance(2.0)
    simulator.apply(ScalingAction(instance_delta=1))
    ready_s = max(instance.ready_s for instance in simulator.layout.instances)
    simulator.advance(ready_s - 3.4 - simulator.now_s)
    one = simulator.advance(2.0)  # ends 1.4 s before the ready time
    late = simulator.advance(2.0)  # ready 1.4 s in (after its middle): one instance serves it
    early = simulator.advance(2.0)  # ready 0.6 s before it starts
    simulator.apply(ScalingAction(instance_delta=1))
    ready_s = max(instance.ready_s for instance in simulator.layout.instances)
    simulator.advance(ready_s - 0.6 - simulator.now_s)
    mostly = simulator.advance(2.0)  # ready 0.6 s in (before its middle): the third instance serves all of it
    assert one.units[UnitKind.FFN].pending_replicas == 1 and late.units[UnitKind.FFN].replicas == 2
    assert late.completions == pytest.approx(one.completions, rel=0.2)
    assert early.completions == pytest.approx(2.0 * one.completions, rel=0.2)
    assert mostly.completions == pytest.approx(3.0 * one.completions, rel=0.2)
    assert math.isclose(early.gpus_powered_mean, 2.0)


def test_light_load_leaves_no_backlog_wait() -> None:
    """All the demand is admitted when the streams keep up: no rounding residue counts as a backlog."""
    deployment = Deployment.model_level(MODEL, "a100", instances=20)
    simulator = FluidSimulator(
        ClusterSpec.homogeneous("a100", deployment.num_nodes), MODEL, deployment, poisson_trace(40.0, 200.0)
    )
    intervals = [simulator.advance(5.0) for _ in range(40)]
    assert all(m.waiting_requests == 0 for m in intervals)
    assert max(m.units[UnitKind.ATTENTION].mean_wait_s for m in intervals) < 1e-3


def test_compiled_functions_keep_one_signature() -> None:
    """Both granularities, both simulators and a scaling action call the numba functions with the same
    argument types: a second signature would mean a compile of several seconds in the middle of a run
    (an int where a float was passed, a writeable array where a read-only one was)."""
    trace = poisson_trace(2.0, 30.0)
    model_level = Deployment.model_level(MODEL, "a100", instances=1, num_nodes=1)
    replicas = {unit.value: 1 for unit in MODEL_SPEC.units}
    operator_level = Deployment.operator_level(MODEL, "a100", replicas=replicas, num_nodes=1)
    cluster = ClusterSpec.homogeneous("a100", 1)
    for deployment in (model_level, operator_level):
        simulator = FluidSimulator(cluster, MODEL, deployment, trace)
        simulator.advance(5.0)
        simulator.apply(
            ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=1, placement="colocate")})
        )
        simulator.advance(5.0)
        simulator.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=-1)}))
        simulator.advance(5.0)
    engine = DiscreteEventSimulator(cluster, MODEL, operator_level, trace)
    engine.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=1, placement="spread-gpu")}))
    engine.advance(5.0)
    engine.apply(ScalingAction(units={UnitKind.FFN: UnitAction(replica_delta=-1)}))
    engine.advance(5.0)
    for compiled in (
        solve_interval_fields,  # calls solve_interval
        operator_layout,  # calls transfer_terms and colocation_matrix
        _summarise_slots,
        _scale_down_order,
        _placement_context,
        _apply_scaling,
        reserve_group,
        release_group,
        _find_group,
    ):
        assert len(compiled.signatures) == 1, (compiled.__name__, compiled.signatures)
