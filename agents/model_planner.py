"""``model-level-planner``: operator-greedy's chain-mode controller on whole instances.

Where ``operator-greedy`` falls back to co-located chains (one replica of every unit beside each
stream), its deployment serves exactly as model-level instances (:mod:`opscale.agents.operator_greedy`,
point 5). Against the HPA-style ``model-level`` baseline it then differs in its *controller* only: the
planners' latency model with pressure feedback, budget correction and a removal margin, against
target tracking on requests in the system. This policy runs that controller on the model-level
environment (``opscale/ModelAutoscale-*``), so that

* ``operator-greedy`` against ``model-level-planner`` measures the granularity alone (equal where
  operator-greedy runs chains), and
* ``model-level-planner`` against ``model-level`` measures the controller alone.

It plans instances of the environment's own TP degree (single-stage instances only), starts from the
fewest the model certifies for the trace's mean rate, and moves by the largest representable instance
delta (instances load as a whole, there is no placement to keep together).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opscale.agents.base import ControlContext
from opscale.agents.latency_model import Workload
from opscale.agents.operator_greedy import OperatorGreedyPolicy, _GreedyMemory
from opscale.sim.deployment import Deployment, ScalingAction, UnitAction
from opscale.sim.models import UnitKind

__all__ = ["ModelLevelPlannerPolicy"]


class ModelLevelPlannerPolicy(OperatorGreedyPolicy):
    """``operator-greedy``'s chain mode on whole instances (see the module docstring).

    :param context: the environment's control context (must be model-level, single-stage instances).
    :param targets: budgets and limits of the latency model.
    :param budget_period_s: how often the token budget is re-chosen.
    :raises ValueError: for instances with pipeline stages.
    """

    granularity = "model"
    name = "model-level-planner"

    @staticmethod
    def chain_degree(context: ControlContext) -> int | None:
        """The environment's instance TP degree (an instance is the chain)."""
        instance = context.initial_deployment
        if instance.pp != 1:
            raise ValueError(
                f"model-level-planner plans single-stage instances; this environment's have pp={instance.pp}"
            )
        return instance.tp

    def new_memory(self) -> _GreedyMemory:
        return _GreedyMemory(load=self.new_load_estimator(), chains=True)

    def planned_deployment(self, workload: Workload, peak: Workload | None = None) -> Deployment:
        """The fewest instances the model certifies for a steady ``workload`` (every instance the
        cluster holds when none is), at the budget :meth:`chain_budget` chose (``peak`` plays no
        part: instances are the only mode)."""
        budget, certified = self.chain_budget(workload)
        context = self.context
        return Deployment.model_level(
            context.model.name,
            context.gpu.name,
            instances=self.max_chains if certified is None else certified,
            tp=int(self.chain_tp or 1),
            num_nodes=context.initial_deployment.num_nodes,
            token_budget=budget,
            gpus_per_node=context.cluster.nodes[0].gpus_per_node,
        )

    def chain_action(
        self, observation: Mapping[str, Any], current: Mapping[UnitKind, int], budget: int, target: int
    ) -> ScalingAction:
        """Towards ``target`` instances by the largest representable delta, at token budget ``budget``."""
        instances = current[UnitKind.ATTENTION]
        observed_budget = round(float(observation[UnitKind.ATTENTION.value]["batch_cap"]))
        caps = (
            {}
            if observed_budget == budget
            else {unit: UnitAction(batch_cap_tokens=budget) for unit in self.context.units}
        )
        return ScalingAction(units=caps, instance_delta=self.context.clip_delta(target - instances))
