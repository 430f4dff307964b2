"""``static``: provision once for the trace's peak (or a percentile) rate and never change.

Offline planning is what static provisioning means, so this policy (alone) reads the environment's
trace: its per-``rate_bin_s`` arrival-rate curve gives the rate to provision for (``percentile`` 100 =
peak, 95 = P95) and its mean lengths the request shape. Sizing uses the planners' latency model:

* model-level env: the fewest instances (at the environment's TP) meeting the budgets, with the
  token-budget bucket that needs the fewest (:meth:`ModelLevelLatencyModel.best_token_budget`);
* operator-level env: the greedy planner's deployment for that load
  (:meth:`OperatorGreedyPolicy.planned_deployment`: counts, batch caps, token budget and
  contention-aware explicit placement).

The episode starts from that deployment (:meth:`StaticPolicy.initial_deployment`, which the
evaluation harness applies); ``predict`` then only steers back to it should the environment start
elsewhere, and otherwise does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from opscale.agents.base import ControlContext, HeuristicPolicy
from opscale.agents.latency_model import ModelLevelLatencyModel, PlannerTargets, Workload
from opscale.agents.operator_greedy import OperatorGreedyPolicy
from opscale.sim.deployment import Deployment, ScalingAction, UnitAction

__all__ = ["StaticPolicy", "provisioning_rate_per_s"]


def provisioning_rate_per_s(context: ControlContext, percentile: float, rate_bin_s: float) -> float:
    """The ``percentile`` of the trace's arrival rate over bins of ``rate_bin_s``."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    _, rates = context.trace.rate_curve(rate_bin_s)
    return float(np.percentile(rates, percentile)) if len(rates) else 0.0


class StaticPolicy(HeuristicPolicy):
    """Peak (or percentile) provisioning at either granularity.

    :param context: the environment's control context.
    :param percentile: rate percentile to provision for (100 = peak).
    :param rate_bin_s: bin of the rate curve (60 s: minute-level peaks, as capacity planning uses).
    :param targets: budgets of the latency model.
    """

    name = "static"

    def __init__(
        self,
        context: ControlContext,
        percentile: float = 100.0,
        rate_bin_s: float = 60.0,
        targets: PlannerTargets | None = None,
    ) -> None:
        super().__init__(context)
        self.percentile = percentile
        prompt, output = self._prior_lengths
        self.workload = Workload(
            max(provisioning_rate_per_s(context, percentile, rate_bin_s), 0.05),
            max(prompt, 1.0),
            max(output, 1.0),
        )
        self.targets = targets or PlannerTargets()
        self.deployment = self._size()

    def _size(self) -> Deployment:
        context = self.context
        initial = context.initial_deployment
        gpus_per_node = context.cluster.nodes[0].gpus_per_node
        if context.granularity == "model":
            latency = ModelLevelLatencyModel(
                context.model,
                context.cluster,
                context.slo,
                context.cost_model,
                context.sim_config,
                initial.tp,
                self.targets,
            )
            budget, instances = latency.best_token_budget(
                self.workload, context.batch_cap_buckets_tokens, context.max_replicas
            )
            return Deployment.model_level(
                context.model.name,
                context.gpu.name,
                instances=instances,
                tp=initial.tp,
                pp=initial.pp,
                num_nodes=initial.num_nodes,
                token_budget=budget,
                gpus_per_node=gpus_per_node,
            )
        return OperatorGreedyPolicy(context, self.targets).planned_deployment(self.workload)

    def initial_deployment(self) -> Deployment:
        """The provisioned deployment (the harness starts episodes from it)."""
        return self.deployment

    def new_memory(self) -> None:
        return None

    def decide(self, memory: Any, observation: Mapping[str, Any]) -> ScalingAction:
        current = self.unit_replicas(observation)
        if self.context.granularity == "model":
            first = self.context.units[0]
            return ScalingAction(
                instance_delta=self.context.clip_delta(self.deployment.instances - current[first])
            )
        return ScalingAction(
            units={
                unit: UnitAction(
                    replica_delta=self.context.clip_delta(
                        self.deployment.units[unit].replicas - current[unit]
                    )
                )
                for unit in self.context.units
            }
        )
