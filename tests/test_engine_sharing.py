"""Processor sharing of co-located calls (the contention model of the discrete-event engine)."""

from __future__ import annotations

import pytest
import simpy

from opscale.sim.cluster import ClusterState
from opscale.sim.config import SimConfig
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import get_model
from opscale.sim.sharing import GpuSharing


def _run(
    calls: list[tuple[float, tuple[int, ...], float, float]], **config: object
) -> tuple[dict[int, float], ClusterState]:
    """Start each ``(start_s, gpus, work_s, fixed_s)`` call; return finish times by call index."""
    env = simpy.Environment()
    settings = SimConfig(**config)
    cluster = ClusterState(ClusterSpec.homogeneous("a100", 1), get_model("llama-2-7b"), settings)
    sharing = GpuSharing(env, cluster, settings)
    done: dict[int, float] = {}
    for index, (start_s, gpus, work_s, fixed_s) in enumerate(calls):

        def begin(
            _event: simpy.Event,
            index: int = index,
            gpus: tuple[int, ...] = gpus,
            work_s: float = work_s,
            fixed_s: float = fixed_s,
        ) -> None:
            sharing.start(gpus, work_s, lambda: done.__setitem__(index, env.now), fixed_s=fixed_s)

        env.timeout(start_s).callbacks.append(begin)
    env.run()
    return done, cluster


def test_two_equal_calls_share_the_gpu() -> None:
    done, _ = _run([(0.0, (0,), 1.0, 0.0), (0.0, (0,), 1.0, 0.0)])
    assert done == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}


def test_sharing_is_work_conserving_and_rerates_on_start_and_end() -> None:
    # 1 s of work alone for 0.5 s, then two share: the first ends at 1.5, the second at 2.0
    done, cluster = _run([(0.0, (0,), 1.0, 0.0), (0.5, (0,), 1.0, 0.0)])
    assert done[0] == pytest.approx(1.5) and done[1] == pytest.approx(2.0)
    rows = cluster.take_interval(2.0)
    assert rows[0][2] == pytest.approx(2.0)  # GPU 0 busy all the time


def test_tp_group_runs_at_its_most_shared_gpu() -> None:
    done, _ = _run([(0.0, (0, 1), 1.0, 0.0), (0.0, (1,), 1.0, 0.0), (0.0, (2,), 1.0, 0.0)])
    assert done[0] == pytest.approx(2.0) and done[1] == pytest.approx(2.0) and done[2] == pytest.approx(1.0)


def test_fixed_tail_is_not_slowed_and_no_contention_option() -> None:
    # the first call's 5 s tail does not stretch; it still holds its share, so the second shares
    done, _ = _run([(0.0, (0,), 1.0, 5.0), (1.0, (0,), 1.0, 0.0)])
    assert done == {0: pytest.approx(6.0), 1: pytest.approx(3.0)}
    done, _ = _run([(0.0, (0,), 1.0, 0.0), (0.0, (0,), 1.0, 0.0)], contention="none")
    assert done == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    done, _ = _run([(0.0, (0,), 1.0, 0.0), (0.0, (0,), 1.0, 0.0)], contention_factor=0.5)
    assert done == {0: pytest.approx(1.5), 1: pytest.approx(1.5)}
