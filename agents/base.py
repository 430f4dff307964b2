"""The policy protocol every autoscaler implements, and what a hand-written controller may observe.

Every policy, learned or hand-written, is scored by the same evaluator through one method, SB3's
``PolicyPredictor`` protocol (:class:`Policy`)::

    action, state = policy.predict(observation, state=None, episode_start=None, deterministic=True)

Heuristic controllers are built from an environment (:meth:`ControlContext.from_env`): the model, GPU,
cluster, SLO, control interval, cost model, observation layout and action codec, i.e. what an operator
configures a real autoscaler with. At run time they read only what a real controller can observe:

* the observation vector (decoded by name through :func:`opscale.envs.spaces.decode_observation`), and
* where a policy documents it, the metrics of the interval that just ended, which the environment puts
  in ``info["interval"]`` (:func:`opscale.envs.base.interval_metrics_dict`). The evaluation harness hands
  them over through :meth:`InfoObserver.observe_info` after every ``reset`` and ``step``; a policy used
  without it falls back to the priors it documents.

No policy looks at the future of the trace. ``static`` provisioning is computed once, offline, from the
trace's rate curve, which is what peak provisioning means.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from opscale.envs.spaces import ActionCodec, ObservationLayout, decode_observation
from opscale.sim.config import SimConfig
from opscale.sim.costmodel_api import CostModel
from opscale.sim.deployment import Deployment, ScalingAction
from opscale.sim.hardware import ClusterSpec, GPUSpec
from opscale.sim.metrics import SLO
from opscale.sim.models import ModelSpec, UnitKind
from opscale.traces.trace import RequestTrace

__all__ = [
    "ControlContext",
    "HeuristicPolicy",
    "InfoObserver",
    "LoadEstimator",
    "Policy",
    "PolicyState",
    "ProposesInitialDeployment",
]

#: What SB3 passes around as recurrent state (``None`` for feed-forward policies).
PolicyState = tuple[np.ndarray, ...] | None


@runtime_checkable
class Policy(Protocol):
    """SB3's ``PolicyPredictor``: map an observation (or a batch of them) to an action.

    :param observation: one observation, or a batch of shape ``(n_envs, obs_size)``.
    :param state: recurrent state (``None`` for every policy here).
    :param episode_start: per env, whether the observation starts a new episode (resets controller
        memory such as stabilisation windows).
    :param deterministic: ignored by heuristics; learned policies take the mode of their distribution.
    :returns: ``(action, state)``; the action has the batch shape of ``observation``.
    """

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: PolicyState = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, PolicyState]: ...


@runtime_checkable
class InfoObserver(Protocol):
    """A policy that also reads the last interval's metrics (``info["interval"]``) of its environment."""

    def observe_info(self, info: Mapping[str, Any], env_index: int = 0) -> None: ...


@runtime_checkable
class ProposesInitialDeployment(Protocol):
    """A policy that wants the episode to start from its own deployment (``static`` provisioning).

    The harness rebuilds the environment with ``initial_deployment`` set to the returned value.
    """

    def initial_deployment(self) -> Deployment | None: ...


@dataclass(frozen=True)
class ControlContext:
    """Everything a controller is configured with (nothing that changes during an episode).

    :param model: the served model.
    :param cluster: the cluster (node count, GPU type).
    :param slo: the latency objective.
    :param cost_model: operator timings (what offline profiling gives a real operator).
    :param sim_config: engine constants (memory fraction, start-up times, running-request cap).
    :param control_interval_s: seconds between two decisions of the environment.
    :param units: scaling units in observation / action order.
    :param layout: the observation layout (names every index).
    :param codec: encodes a :class:`ScalingAction` into the env's action space.
    :param granularity: ``"operator"`` (per-unit replica pools) or ``"model"`` (whole instances).
    :param replica_deltas: replica (instance) changes one action may carry.
    :param batch_cap_buckets_tokens: batch caps an action may select.
    :param max_replicas: cap on replicas per unit (operator) or instances (model).
    :param initial_deployment: the deployment episodes start from.
    :param trace: the environment's trace, only for offline planning (``static``); policies never
        read arrivals from it at run time.
    """

    model: ModelSpec
    cluster: ClusterSpec
    slo: SLO
    cost_model: CostModel
    sim_config: SimConfig
    control_interval_s: float
    units: tuple[UnitKind, ...]
    layout: ObservationLayout
    codec: ActionCodec
    granularity: str
    replica_deltas: tuple[int, ...]
    batch_cap_buckets_tokens: tuple[int, ...]
    max_replicas: int
    initial_deployment: Deployment
    trace: RequestTrace

    @property
    def gpu(self) -> GPUSpec:
        """The cluster's GPU type (homogeneous clusters)."""
        return self.cluster.gpu_of(0)

    @classmethod
    def from_env(cls, env: Any) -> ControlContext:
        """Read the context from an :class:`opscale.envs.base.AutoscaleEnv` (wrappers are unwrapped).

        :raises TypeError: if ``env`` is not an opscale autoscaling environment.
        """
        base = getattr(env, "unwrapped", env)
        needed = (
            "model",
            "cluster",
            "slo",
            "cost_model",
            "sim_config",
            "observation_layout",
            "codec",
            "config",
        )
        missing = [name for name in needed if not hasattr(base, name)]
        if missing:
            raise TypeError(
                f"{type(base).__name__} is not an opscale autoscaling environment (lacks {', '.join(missing)}); "
                "build heuristic policies from gym.make('opscale:opscale/...-v0')"
            )
        return cls(
            model=base.model,
            cluster=base.cluster,
            slo=base.slo,
            cost_model=base.cost_model,
            sim_config=base.sim_config,
            control_interval_s=float(base.control_interval_s),
            units=tuple(base.units),
            layout=base.observation_layout,
            codec=base.codec,
            granularity=str(base.granularity),
            replica_deltas=tuple(base.config.replica_deltas),
            batch_cap_buckets_tokens=tuple(base.config.batch_cap_buckets_tokens),
            max_replicas=int(base.max_replicas),
            initial_deployment=base.initial_deployment,
            trace=base.trace,
        )

    def clip_delta(self, delta: int) -> int:
        """The representable replica delta closest to ``delta`` (towards zero when between two)."""
        if delta >= 0:
            return max(d for d in self.replica_deltas if d <= delta)
        return min(d for d in self.replica_deltas if d >= delta)


#: Requests' worth of weight given to the prior mean lengths before any observation.
_PRIOR_REQUESTS = 50.0


@dataclass
class LoadEstimator:
    """Online estimates of the arrival rate and the mean request lengths, from observed intervals only.

    * arrival rate: exponentially weighted mean of the per-interval rates (``smoothing`` weight on the
      newest). Planners provision for the larger of that mean and the last interval's rate minus
      ``noise_sigmas`` Poisson standard deviations of it: a rise beyond counting noise is followed at
      once, while a noisy high count alone does not buy replicas (at 5 req/s over 5 s one standard
      deviation is 20 % of the rate).
    * mean prompt / output tokens per request: running totals of tokens served over arrivals, from
      ``info["interval"]`` (``prompt_tokens_served``, ``output_tokens_served``, ``arrivals``), mixed with
      a prior worth :data:`_PRIOR_REQUESTS` requests. The prior is the service's historical mean
      lengths (in the simulator: the environment trace's means, what the operator's logs would show);
      served tokens lag arrivals by the requests in flight, which the totals average out.

    :param prior_prompt_tokens: prior mean prompt length.
    :param prior_output_tokens: prior mean output length.
    :param interval_s: length of one observed interval (sets the Poisson noise of a count).
    :param smoothing: EWMA weight of the newest interval, in (0, 1].
    :param noise_sigmas: standard deviations of counting noise discounted from the last rate.
    """

    prior_prompt_tokens: float
    prior_output_tokens: float
    interval_s: float
    smoothing: float = 0.3
    noise_sigmas: float = 1.0
    rate_ewma_per_s: float | None = None
    last_rate_per_s: float = 0.0
    arrivals: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.interval_s <= 0 or self.noise_sigmas < 0:
            raise ValueError(
                f"need interval_s > 0 and noise_sigmas >= 0, got {self.interval_s}, {self.noise_sigmas}"
            )

    def observe_rate(self, rate_per_s: float) -> None:
        """Record one interval's arrival rate (requests/s)."""
        rate = max(0.0, float(rate_per_s))
        self.last_rate_per_s = rate
        if self.rate_ewma_per_s is None:
            self.rate_ewma_per_s = rate
        else:
            self.rate_ewma_per_s += self.smoothing * (rate - self.rate_ewma_per_s)

    def observe_interval(self, interval: Mapping[str, Any]) -> None:
        """Record the token counts of one interval's metrics dict (``info["interval"]``)."""
        self.arrivals += float(interval.get("arrivals", 0))
        self.prompt_tokens += float(interval.get("prompt_tokens_served", 0))
        self.output_tokens += float(interval.get("output_tokens_served", 0))

    @property
    def rate_per_s(self) -> float:
        """The rate to provision for (see the class docstring)."""
        last = self.last_rate_per_s
        ewma = last if self.rate_ewma_per_s is None else self.rate_ewma_per_s
        noise = self.noise_sigmas * math.sqrt(last / self.interval_s)
        return max(ewma, last - noise)

    @property
    def mean_prompt_tokens(self) -> float:
        return (self.prior_prompt_tokens * _PRIOR_REQUESTS + self.prompt_tokens) / (
            _PRIOR_REQUESTS + self.arrivals
        )

    @property
    def mean_output_tokens(self) -> float:
        return (self.prior_output_tokens * _PRIOR_REQUESTS + self.output_tokens) / (
            _PRIOR_REQUESTS + self.arrivals
        )


class HeuristicPolicy(ABC):
    """Base of the hand-written controllers: batching, per-env memory, decoding and encoding.

    Subclasses implement :meth:`decide` for one decoded observation and keep their per-episode memory
    in the object :meth:`new_memory` returns (one per env of a batch; reset at ``episode_start``).

    :param context: what the controller is configured with (:meth:`ControlContext.from_env`).
    """

    #: ``"operator"``, ``"model"`` or ``None`` (works at either granularity).
    granularity: str | None = None
    #: registry name, for messages.
    name: str = "heuristic"

    def __init__(self, context: ControlContext) -> None:
        if self.granularity is not None and context.granularity != self.granularity:
            wanted = (
                "opscale/OperatorAutoscale-*"
                if self.granularity == "operator"
                else "opscale/ModelAutoscale-*"
            )
            raise ValueError(
                f"policy {self.name!r} scales at {self.granularity} granularity and needs an {wanted} "
                f"environment; this environment is {context.granularity}-level"
            )
        self.context = context
        self._memories: list[Any] = []
        # per env: whether the memory has made a decision (an episode start resets only used memory,
        # so what observe_info() recorded after the reset is kept)
        self._decided: list[bool] = []
        prompt, output = context.trace.prompt_tokens, context.trace.output_tokens
        self._prior_lengths = (
            float(prompt.mean()) if len(prompt) else 1.0,
            float(output.mean()) if len(output) else 1.0,
        )

    # ------------------------------------------------------------------ per-env memory
    def new_load_estimator(self) -> LoadEstimator:
        """A fresh :class:`LoadEstimator` with this environment's length priors."""
        return LoadEstimator(*self._prior_lengths, interval_s=self.context.control_interval_s)

    @abstractmethod
    def new_memory(self) -> Any:
        """Fresh per-episode controller memory."""

    def _memory(self, env_index: int) -> Any:
        while len(self._memories) <= env_index:
            self._memories.append(self.new_memory())
            self._decided.append(False)
        return self._memories[env_index]

    def reset(self, env_index: int | None = None) -> None:
        """Forget the memory of one env (or all)."""
        if env_index is None:
            self._memories = []
            self._decided = []
        elif env_index < len(self._memories):
            self._memories[env_index] = self.new_memory()
            self._decided[env_index] = False

    def observe_info(self, info: Mapping[str, Any], env_index: int = 0) -> None:
        """Hand over ``info`` of the last ``reset``/``step``; reads ``info["interval"]`` if present.

        The info of a ``reset`` (it carries ``start_s``) starts a new episode: the env's memory is reset
        first, so a later ``episode_start`` flag does not wipe what was observed here.
        """
        if "start_s" in info:
            self.reset(env_index)
        interval = info.get("interval")
        if isinstance(interval, Mapping):
            self.observe_interval(self._memory(env_index), interval)

    def observe_interval(self, memory: Any, interval: Mapping[str, Any]) -> None:
        """Use one interval's metrics; the default records its token counts if the memory has a
        ``load`` :class:`LoadEstimator`."""
        load = getattr(memory, "load", None)
        if isinstance(load, LoadEstimator):
            load.observe_interval(interval)

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: PolicyState = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, PolicyState]:
        """See :class:`Policy`. Accepts one observation or a batch ``(n_envs, obs_size)``."""
        vector = np.asarray(observation, dtype=np.float64)
        size = self.context.layout.size
        if vector.shape == (size,):
            batch, single = vector[None, :], True
        elif vector.ndim == 2 and vector.shape[1] == size:
            batch, single = vector, False
        else:
            raise ValueError(f"observation has shape {vector.shape}; expected ({size},) or (n_envs, {size})")
        actions = []
        for index, row in enumerate(batch):
            memory = self._memory(index)
            if (
                episode_start is not None
                and bool(np.asarray(episode_start).reshape(-1)[index])
                and self._decided[index]
            ):
                self.reset(index)
                memory = self._memory(index)
            decoded = decode_observation(row, self.context.layout, physical=True)
            action = self.decide(memory, decoded)
            self._decided[index] = True
            actions.append(self.context.codec.encode(action))
        stacked = np.stack(actions)
        return (stacked[0] if single else stacked), state

    @abstractmethod
    def decide(self, memory: Any, observation: Mapping[str, Any]) -> ScalingAction:
        """The action for one physical, named observation (:func:`decode_observation` with ``physical``)."""

    # ------------------------------------------------------------------ helpers for subclasses
    def unit_replicas(self, observation: Mapping[str, Any]) -> dict[UnitKind, int]:
        """Replicas (serving or loading) per unit, rounded from the observation."""
        return {unit: round(observation[unit.value]["replicas"]) for unit in self.context.units}

    def decision_steps(self, period_s: float) -> int:
        """Control intervals per decision of a controller that decides every ``period_s`` seconds."""
        return max(1, math.ceil(period_s / self.context.control_interval_s - 1e-9))
