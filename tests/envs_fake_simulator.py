"""A tiny stand-in for the serving simulators (env-layer tests that must not depend on simulator detail).

It honours the :class:`opscale.sim.simulator.ServingSimulator` protocol: replica deltas change the
deployment (clipped to ``[1, max_replicas]``, each clip a counted repair), batch caps are set, and each
interval reports arrivals from the trace and a utilisation of ``load / replicas``. Its numbers mean
nothing physically; they only have to be deterministic functions of the seed, trace and actions.
"""

from __future__ import annotations

import copy

import numpy as np

from opscale.sim.deployment import ApplyReport, Deployment, ScalingAction
from opscale.sim.metrics import IntervalMetrics, RunSummary, UnitIntervalMetrics, default_slo
from opscale.sim.simulator import Snapshot

MAX_REPLICAS = 12


class FakeSimulator:
    def __init__(self, cluster, model, deployment, trace, *, slo=None, cost_model=None, config=None, seed=0):
        self.cluster, self.model, self.trace = cluster, model, trace
        self.slo = slo or default_slo(model)
        self._deployment: Deployment = deployment
        self._now_s = 0.0
        self._rng = np.random.default_rng(seed)

    @property
    def now_s(self) -> float:
        return self._now_s

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    @property
    def finished(self) -> bool:
        return self._now_s >= self.trace.end_s

    def apply(self, action: ScalingAction) -> ApplyReport:
        report = ApplyReport()
        deployment = self._deployment
        if deployment.granularity == "model" and action.instance_delta:
            wanted = deployment.instances + action.instance_delta
            instances = int(np.clip(wanted, 1, MAX_REPLICAS))
            report.repairs += int(instances != wanted)
            deployment.instances = instances
            for unit in deployment.units.values():
                unit.replicas = instances
        for unit, unit_action in action.units.items():
            config = deployment.units[unit]
            if deployment.granularity == "operator" and unit_action.replica_delta:
                wanted = config.replicas + unit_action.replica_delta
                config.replicas = int(np.clip(wanted, 1, MAX_REPLICAS))
                if config.replicas != wanted:
                    report.repairs += 1
                    report.messages.append(f"{unit.value}: asked {wanted} replicas, kept {config.replicas}")
            if unit_action.batch_cap_tokens is not None:
                config.batch_cap_tokens = unit_action.batch_cap_tokens
        return report

    def advance(self, dt_s: float) -> IntervalMetrics:
        start, end = self._now_s, self._now_s + dt_s
        arrivals = int(np.count_nonzero((self.trace.arrival_s >= start) & (self.trace.arrival_s < end)))
        units = {}
        for unit, config in self._deployment.units.items():
            load = arrivals / (4.0 * config.replicas)
            units[unit] = UnitIntervalMetrics(
                replicas=config.replicas,
                utilisation=min(1.0, load),
                queue_tokens=max(0.0, load - 1.0) * 1000.0,
                batch_fill=min(1.0, load / 2),
                mean_service_s=0.001 * (1 + self._rng.random()),
                batch_cap_tokens=config.batch_cap_tokens,
            )
        gpus = sum(c.replicas for c in self._deployment.units.values()) // 4 + 1
        attainment = (
            1.0 if arrivals == 0 else float(min(1.0, 2.0 / max(u.utilisation for u in units.values()) / 2))
        )
        self._now_s = end
        return IntervalMetrics(
            start_s=start,
            end_s=end,
            arrivals=arrivals,
            decided=arrivals,
            slo_met=round(attainment * arrivals),
            slo_attainment=attainment,
            ttft_p99_s=0.1 * arrivals,
            tbt_p99_s=0.01,
            gpus_powered=gpus,
            gpus_powered_mean=float(gpus),
            energy_j=gpus * 200.0 * dt_s,
            units=units,
        )

    def memory_used_bytes(self) -> list[float]:
        return [0.0] * self.cluster.num_gpus

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time_s=self._now_s,
            deployment=copy.deepcopy(self._deployment),
            gpus_powered=1,
            gpu_memory_used_bytes=self.memory_used_bytes(),
        )

    def summary(self) -> RunSummary:
        raise NotImplementedError
