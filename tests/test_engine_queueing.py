"""Closed forms: a single unit pool with exponential service and Poisson arrivals is an M/M/c queue."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import pytest
import simpy

from opscale.sim.cluster import ClusterState, Replica
from opscale.sim.config import ContentionModel, ServiceTimeDistribution, SimConfig
from opscale.sim.hardware import ClusterSpec
from opscale.sim.models import UnitKind, get_model
from opscale.sim.pools import Link, UnitPool
from opscale.sim.queueing import mmc_mean_wait_s
from opscale.sim.sharing import GpuSharing


class _Job:
    """One single-token job; remembers when it finished."""

    def __init__(self) -> None:
        self.job_tokens = 1
        self.job_source_gpu = 0
        self.job_enqueued_s = 0.0
        self.done_s = -1.0

    def unit_done(self, now_s: float, replica: Replica) -> None:
        self.done_s = now_s


def _mean_wait(servers: int, utilisation: float, jobs: int, seed: int) -> float:
    service_s = 0.01
    arrival_rate = utilisation * servers / service_s
    config = SimConfig(
        service_time_distribution=ServiceTimeDistribution.EXPONENTIAL, contention=ContentionModel.NONE
    )
    env = simpy.Environment()
    model = get_model("llama-2-7b")
    cluster = ClusterState(ClusterSpec.homogeneous("a100", 1), model, config)
    rng = np.random.default_rng(seed)
    pool = UnitPool(
        env,
        UnitKind.FFN,
        GpuSharing(env, cluster, config),
        timers=lambda tp: None,
        link=Link(cluster.spec),
        inbound_bytes_per_token=0.0,
        hops=1,
        config=config,
        rng=rng,
        batch_cap_tokens=1,
        service_time_s=lambda tokens, replica: service_s,
    )
    for index in range(servers):
        replica = Replica(index, UnitKind.FFN, (index,), 0.0, batch_cap_tokens=1, ready_s=0.0)
        pool.add_replica(replica)
        pool.replica_ready(replica)
    arrivals = np.cumsum(rng.exponential(1.0 / arrival_rate, jobs))

    def source(env: simpy.Environment) -> Generator[simpy.Event, None, None]:
        for arrival in arrivals:
            yield env.timeout(arrival - env.now)
            pool.submit(_Job())

    env.process(source(env))
    env.run()
    # discard nothing: the queue starts empty, and the long run makes the warm-up negligible
    return pool.stats.wait_s / pool.stats.jobs


@pytest.mark.parametrize(
    ("utilisation", "jobs"),
    [
        (0.5, 200_000),
        (0.8, 200_000),
        # near saturation the sample mean converges slowly: more jobs, still < 20 s
        pytest.param(0.9, 500_000, marks=pytest.mark.slow),
    ],
)
def test_pool_matches_erlang_c_mean_wait(utilisation: float, jobs: int) -> None:
    servers = 4
    simulated = _mean_wait(servers, utilisation, jobs, seed=7)
    expected = float(mmc_mean_wait_s(utilisation * servers / 0.01, 0.01, servers))
    assert simulated == pytest.approx(expected, rel=0.05)
