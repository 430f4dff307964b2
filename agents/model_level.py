"""Model-level reactive autoscalers: Kubernetes-HPA target tracking on whole instances.

``model-level`` (:class:`TargetTrackingPolicy`) follows the HPA algorithm
(``kubernetes/pkg/controller/podautoscaler``): every ``decision_period_s`` (default 15 s, HPA's sync
period) it computes ``desired = ceil(total metric / target per instance)``, does nothing while
``|desired / ready - 1|`` is within ``tolerance`` (HPA: 0.1), scales up at once, and scales down only
to the highest recommendation of the last ``scale_down_window_s`` (HPA's scale-down stabilisation
window, 300 s by default in Kubernetes; 60 s here because episodes last minutes). Instances still
loading count towards the current size but not towards the ready instances that carry the metric.

Metrics (:class:`ScalingMetric`):

* ``queue`` (the default): requests in the system (running + waiting for admission, from
  ``info["interval"]``; the observation's waiting count alone when no info is handed over) per
  instance, Knative-style concurrency. Default target: 70 % of the concurrency one instance sustains
  within the SLO budgets, from the planners' latency model (what an operator benchmarks offline).
* ``utilisation``: GPU busy fraction of the ready instances; an instance's units run one after the
  other, so its busy fraction is the sum of its units' utilisations (observation) - the classic
  DCGM-utilisation HPA. Default target 0.7. Beware: a continuous-batching engine iterates whenever a
  request is running, so this saturates near 1 at any load and over-provisions (kept as the classic
  baseline, not the default).
* ``throughput`` (``model-level-throughput``, HeteroScale-style): decode tokens/s per instance
  (``info["interval"]["output_tokens_served"]``; the arrival rate times the mean output length when no
  info is handed over). Default target: 70 % of one instance's sustainable decode tokens/s.

Each step moves towards the current desired size by the largest representable instance delta, so a
large change completes over the following steps even between decisions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from opscale.agents.base import ControlContext, HeuristicPolicy, LoadEstimator
from opscale.agents.latency_model import ModelLevelLatencyModel, PlannerTargets, Workload
from opscale.sim.deployment import ScalingAction, UnitAction

__all__ = ["ScalingMetric", "TargetTrackingConfig", "TargetTrackingPolicy", "ThroughputTrackingPolicy"]


class ScalingMetric(str, Enum):
    """What the target-tracking autoscaler tracks (see the module docstring)."""

    UTILISATION = "utilisation"
    QUEUE = "queue"
    THROUGHPUT = "throughput"


@dataclass(frozen=True)
class TargetTrackingConfig:
    """HPA settings.

    :param metric: the tracked metric.
    :param target: target value per instance (``None``: the metric's default, see the module docstring).
    :param target_share: share of an instance's sustainable capacity used for the default ``queue`` and
        ``throughput`` targets.
    :param decision_period_s: seconds between two decisions (HPA sync period; 15-20 s).
    :param scale_down_window_s: scale-down stabilisation window.
    :param tolerance: relative change below which nothing is done.
    :param token_budget: per-iteration token budget the instances run with (a deployment setting the
        autoscaler applies at its first step); ``None``: the bucket with the highest sustainable
        per-instance throughput under the planners' latency model (what an operator tunes offline).
    """

    metric: ScalingMetric = ScalingMetric.QUEUE
    target: float | None = None
    target_share: float = 0.7
    decision_period_s: float = 15.0
    scale_down_window_s: float = 60.0
    tolerance: float = 0.1
    token_budget: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", ScalingMetric(self.metric))
        if self.target is not None and not self.target > 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if not 0 < self.target_share <= 1:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share}")
        if self.decision_period_s <= 0 or self.scale_down_window_s < 0 or self.tolerance < 0:
            raise ValueError(
                f"need decision_period_s > 0, scale_down_window_s >= 0, tolerance >= 0; got "
                f"{self.decision_period_s}, {self.scale_down_window_s}, {self.tolerance}"
            )


@dataclass
class _HpaMemory:
    load: LoadEstimator
    steps: int = 0
    desired: int | None = None
    recommendations: deque[int] = field(default_factory=deque)
    requests_in_system: float | None = None
    decode_tokens_per_s: float | None = None


class TargetTrackingPolicy(HeuristicPolicy):
    """HPA-style target tracking on whole instances (see the module docstring).

    :param context: the environment's control context (must be model-level).
    :param config: HPA settings; keyword overrides of :class:`TargetTrackingConfig` are accepted too.
    """

    granularity = "model"
    name = "model-level"

    def __init__(
        self, context: ControlContext, config: TargetTrackingConfig | None = None, **overrides: Any
    ) -> None:
        super().__init__(context)
        base = config or self.default_config()
        self.config = TargetTrackingConfig(**{**base.__dict__, **overrides}) if overrides else base
        self.steps_per_decision = self.decision_steps(self.config.decision_period_s)
        # recommendations kept for the scale-down window (at least the current one)
        self.window_decisions = max(
            1, math.ceil(self.config.scale_down_window_s / self.config.decision_period_s)
        )
        self.latency_model = ModelLevelLatencyModel(
            context.model,
            context.cluster,
            context.slo,
            context.cost_model,
            context.sim_config,
            context.initial_deployment.tp,
            PlannerTargets(),
        )
        prompt, output = self._prior_lengths
        self.reference_workload = Workload(1.0, max(prompt, 1.0), max(output, 1.0))
        buckets = context.batch_cap_buckets_tokens
        if self.config.token_budget is not None and self.config.token_budget not in buckets:
            raise ValueError(
                f"token_budget {self.config.token_budget} is not a batch-cap bucket; valid: {buckets}"
            )
        self.token_budget = self.config.token_budget or max(
            buckets,
            key=lambda budget: (self.latency_model.capacity(self.reference_workload, budget)[1], -budget),
        )
        self.target = self.config.target if self.config.target is not None else self.default_target()

    def default_config(self) -> TargetTrackingConfig:
        return TargetTrackingConfig()

    def default_target(self) -> float:
        """The metric's default target per instance."""
        metric = self.config.metric
        if metric is ScalingMetric.UTILISATION:
            return self.config.target_share
        in_system, decode_tokens_per_s = self.latency_model.capacity(
            self.reference_workload, self.token_budget
        )
        capacity = in_system if metric is ScalingMetric.QUEUE else decode_tokens_per_s
        return max(self.config.target_share * capacity, 1e-6)

    def new_memory(self) -> _HpaMemory:
        return _HpaMemory(load=self.new_load_estimator())

    def observe_interval(self, memory: Any, interval: Mapping[str, Any]) -> None:
        memory.load.observe_interval(interval)
        memory.requests_in_system = float(interval.get("running_requests", 0)) + float(
            interval.get("waiting_requests", 0)
        )
        duration = float(interval.get("end_s", 0.0)) - float(interval.get("start_s", 0.0))
        if duration > 0:
            memory.decode_tokens_per_s = float(interval.get("output_tokens_served", 0)) / duration

    def metric_total(self, memory: Any, observation: Mapping[str, Any], ready: int) -> float:
        """The tracked metric summed over the ready instances."""
        metric = self.config.metric
        if metric is ScalingMetric.UTILISATION:
            busy = sum(float(observation[unit.value]["utilisation"]) for unit in self.context.units)
            return min(busy, 1.0) * ready
        if metric is ScalingMetric.QUEUE:
            if memory.requests_in_system is not None:
                return float(memory.requests_in_system)
            return float(observation["waiting"])
        if memory.decode_tokens_per_s is not None:
            return float(memory.decode_tokens_per_s)
        return float(observation["arrival_rate"]) * memory.load.mean_output_tokens

    def decide(self, memory: Any, observation: Mapping[str, Any]) -> ScalingAction:
        memory.load.observe_rate(float(observation["arrival_rate"]))
        first = self.context.units[0].value
        current = round(float(observation[first]["replicas"]))
        ready = max(current - round(float(observation[first]["pending"])), 1)
        if memory.steps % self.steps_per_decision == 0:
            total = self.metric_total(memory, observation, ready)
            ratio = total / (self.target * ready)
            recommendation = (
                current
                if abs(ratio - 1.0) <= self.config.tolerance
                else math.ceil(total / self.target - 1e-9)
            )
            recommendation = min(max(recommendation, 1), self.context.max_replicas)
            memory.recommendations.append(recommendation)
            while len(memory.recommendations) > self.window_decisions:
                memory.recommendations.popleft()
            # up at once; down only to the highest recommendation in the stabilisation window
            memory.desired = recommendation if recommendation >= current else max(memory.recommendations)
        memory.steps += 1
        desired = current if memory.desired is None else memory.desired
        observed_budget = round(float(observation[first]["batch_cap"]))
        caps = (
            {}
            if observed_budget == self.token_budget
            else {unit: UnitAction(batch_cap_tokens=self.token_budget) for unit in self.context.units}
        )
        return ScalingAction(units=caps, instance_delta=self.context.clip_delta(desired - current))


class ThroughputTrackingPolicy(TargetTrackingPolicy):
    """``model-level-throughput``: :class:`TargetTrackingPolicy` on decode tokens/s per instance."""

    name = "model-level-throughput"

    def default_config(self) -> TargetTrackingConfig:
        return TargetTrackingConfig(metric=ScalingMetric.THROUGHPUT)
