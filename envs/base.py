"""Shared logic of the autoscaling environments (HighwayEnv style: the simulator is kept apart).

:class:`AutoscaleEnv` owns what both granularities share: configuration, the trace and its episode
windows, building a fresh simulator per episode through :func:`opscale.sim.simulator.simulator_class`,
turning interval metrics into observations (:class:`opscale.envs.spaces.ObservationLayout`) and rewards
(:class:`opscale.envs.reward.RewardFunction`), ``info``, masks and rendering. A subclass only says how
actions are encoded (:meth:`AutoscaleEnv._make_codec`), what the default deployment is and how many
replicas (or instances) it may add.

The per-step path is kept thin for the ``fluid`` fidelity (thousands of steps per second): no
``dataclasses.asdict``, no deep copies, the action is checked with two vectorised comparisons and the
observation is filled into one list then normalised in numpy.
"""

from __future__ import annotations

import math
import operator
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, SupportsFloat

import gymnasium as gym
import numpy as np

from opscale.envs.config import EnvConfig, check_deployment, resolve_config
from opscale.envs.costcache import MemoizedCostModel
from opscale.envs.render import render_ansi, render_rgb
from opscale.envs.reward import RewardFunction
from opscale.envs.spaces import WAITING_SCALE_REQUESTS, ActionCodec, ObservationLayout, addable_replicas
from opscale.sim.cluster import ClusterState
from opscale.sim.config import SimConfig
from opscale.sim.costmodel import default_cost_model
from opscale.sim.deployment import Deployment, Granularity, ScalingAction
from opscale.sim.hardware import ClusterSpec
from opscale.sim.metrics import SLO, IntervalMetrics, default_slo
from opscale.sim.models import UnitKind
from opscale.sim.simulator import ServingSimulator, simulator_class
from opscale.traces.trace import RequestTrace

__all__ = ["AutoscaleEnv", "MetricsSnapshot", "interval_metrics_dict"]

_SECONDS_PER_DAY = 86400.0
_RESET_OPTIONS = frozenset({"start_s", "deployment"})
#: Draws of a jittered starting deployment (``initial_replica_jitter``) before an episode starts unjittered.
JITTER_ATTEMPTS = 10
#: Enum ``.value`` goes through a descriptor; a dict lookup is several times cheaper on the step path.
_UNIT_NAMES: dict[UnitKind, str] = {unit: unit.value for unit in UnitKind}


class MetricsSnapshot(dict[str, Any]):
    """A read-only dict of one interval's metrics (``info["interval"]``, and its ``"units"`` entries).

    The values are numbers (and, for ``"units"``, snapshots), so the snapshot is immutable and
    ``copy.deepcopy`` returns it as is: SB3's ``DummyVecEnv`` deep-copies every env's ``info`` on every
    step, and copying ~90 numbers item by item cost ~0.2 ms per env step (a sixth of a fluid step).
    It is still a ``dict`` (``json.dumps``, ``isinstance`` and pickling work); ``dict(snapshot)`` gives
    a mutable copy.

    :raises TypeError: on any attempt to change it.
    """

    __slots__ = ()

    def _read_only(self, *_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("interval metrics are a read-only snapshot; take dict(snapshot) to change a copy")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __deepcopy__(self, memo: dict[int, Any]) -> MetricsSnapshot:
        return self

    def __copy__(self) -> MetricsSnapshot:
        return self

    def __reduce__(self) -> tuple[type[MetricsSnapshot], tuple[dict[str, Any]]]:
        # rebuilt through __init__ (unpickling a dict subclass would otherwise call __setitem__)
        return type(self), (dict(self),)


def interval_metrics_dict(metrics: IntervalMetrics) -> MetricsSnapshot:
    """``metrics`` as a fresh read-only dict (:class:`MetricsSnapshot`, units keyed by name).

    Much cheaper than ``dataclasses.asdict`` (no recursion, no deep copies): the metrics dataclasses
    hold numbers only, so a shallow copy of each instance's ``__dict__`` is a full copy.
    """
    data: dict[str, Any] = dict(vars(metrics))
    data["units"] = MetricsSnapshot(
        {
            _UNIT_NAMES[unit]: MetricsSnapshot(vars(unit_metrics))
            for unit, unit_metrics in metrics.units.items()
        }
    )
    return MetricsSnapshot(data)


class AutoscaleEnv(gym.Env[np.ndarray, np.ndarray]):
    """Base class; see :class:`opscale.envs.operator_autoscale.OperatorAutoscaleEnv` for the full contract.

    :param config: a (partial) configuration mapping, merged over :func:`opscale.envs.config.default_config`.
    :param render_mode: ``None``, ``"ansi"`` (text table) or ``"rgb_array"`` (bar image).
    :param overrides: further configuration keys (what ``gym.make(id, key=value)`` passes).
    :raises ValueError: for an unknown key, model, GPU, trace or render mode, or any invalid value.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 1}  # noqa: RUF012 (Gymnasium API)
    #: The deployment granularity the subclass's actions drive.
    granularity: ClassVar[Granularity]

    def __init__(
        self, config: Mapping[str, Any] | None = None, render_mode: str | None = None, **overrides: Any
    ):
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"unknown render_mode {render_mode!r}; valid: None, {', '.join(self.metadata['render_modes'])}"
            )
        self.render_mode = render_mode
        self.config: EnvConfig = resolve_config(config, **overrides)
        cfg = self.config
        self.model = cfg.model
        self.cluster = ClusterSpec.homogeneous(cfg.gpu, cfg.num_nodes, cfg.gpus_per_node)
        self.slo: SLO = cfg.slo or default_slo(cfg.model)
        self.sim_config: SimConfig = self._make_sim_config()
        # one memoising wrapper for every simulator this env builds (see opscale.envs.costcache)
        self.cost_model = MemoizedCostModel(default_cost_model())
        self.trace: RequestTrace = self._load_trace()
        #: the longest request's tokens: an attention replica must hold at least its KV (action masks)
        self.longest_request_tokens = self._check_request_lengths(self.trace)
        self.control_interval_s = cfg.control_interval_s
        self.episode_length_s = (cfg.warmup_intervals + cfg.horizon) * cfg.control_interval_s
        self._check_episode_fits()
        self.units: tuple[UnitKind, ...] = cfg.model.units
        self.initial_deployment: Deployment = cfg.initial_deployment or self._default_deployment()
        self._check_granularity(self.initial_deployment)
        self.max_replicas = self._max_replicas()
        self._check_deployment(self.initial_deployment)
        self.codec: ActionCodec = self._make_codec()
        self.action_space = self.codec.space()
        rate_scale = cfg.rate_scale_per_s or self._peak_interval_rate_per_s()
        self.max_power_w = self.cluster.num_gpus * cfg.gpu.tdp_watts
        self.observation_layout = ObservationLayout(
            self.units,
            {
                "max_replicas": float(self.max_replicas),
                "queue_tokens": cfg.queue_scale_tokens,
                "tbt_slo": self.slo.tbt_s,
                "ttft_slo": self.slo.ttft_s,
                "max_batch_cap": float(cfg.batch_cap_buckets_tokens[-1]),
                "rate": rate_scale,
                "waiting_requests": WAITING_SCALE_REQUESTS,
                "num_gpus": float(self.cluster.num_gpus),
                "max_power_w": self.max_power_w,
            },
        )
        self.observation_space = self.observation_layout.space()
        self.reward_function = RewardFunction(
            cfg.reward_weights, cfg.slo_penalty, cfg.slo_target, self.cluster.num_gpus, self.max_power_w
        )
        self._nvec = self.codec.nvec
        self._nvec_list: list[int] = self._nvec.tolist()
        #: the simulators' memory model (per-replica bytes and usable capacity per GPU), for masks
        self._memory = ClusterState(self.cluster, self.model, self.sim_config)
        self._gpu_capacity_bytes = np.array([gpu.capacity_bytes for gpu in self._memory.gpus])
        self._replica_bytes: dict[tuple[UnitKind, int, int], float] = {}
        self._sim: ServingSimulator | None = None
        self._window_start_s = 0.0
        self._episode_deployment = self.initial_deployment
        self._steps = 0
        self._last_rate_per_s = 0.0
        self._last_metrics: IntervalMetrics | None = None
        self._last_reward_components: dict[str, float] | None = None

    # ------------------------------------------------------------------ construction helpers
    def _check_granularity(self, deployment: Deployment) -> None:
        if deployment.granularity != self.granularity:
            raise ValueError(
                f"{type(self).__name__} needs a deployment of granularity {self.granularity!r}, "
                f"got {deployment.granularity!r}"
            )

    def _check_deployment(self, deployment: Deployment) -> None:
        """A starting deployment must fit the cluster, match the granularity and respect the replica cap."""
        deployment.validate(gpus_per_node=self.config.gpus_per_node)
        self._check_granularity(deployment)
        largest = max(unit.replicas for unit in deployment.units.values())
        if largest > self.max_replicas:
            raise ValueError(
                f"deployment has {largest} replicas of one unit, above max_replicas_per_unit={self.max_replicas}"
            )

    def _make_sim_config(self) -> SimConfig:
        """``SimConfig`` defaults, then ``sim_config`` overrides, then ``cold_start`` overrides."""
        return SimConfig().with_changes(**{**self.config.sim_config, **self.config.cold_start})

    def _load_trace(self) -> RequestTrace:
        cfg = self.config
        if isinstance(cfg.trace, RequestTrace):
            trace = cfg.trace
        else:
            from opscale.traces import load_trace

            extra: dict[str, Any] = (
                {} if cfg.trace_duration_s is None else {"duration_s": cfg.trace_duration_s}
            )
            trace = load_trace(cfg.trace, seed=cfg.trace_seed, **extra)
        if cfg.trace_rate_scale != 1.0:
            trace = trace.scale_rate(cfg.trace_rate_scale, np.random.default_rng(cfg.trace_seed))
        fitted = trace.truncate_lengths(self.model.max_context, policy=cfg.long_requests)
        if fitted is not trace:
            gym.logger.warn(
                f"model {self.model.name!r} has a {self.model.max_context}-token context: {fitted.notes[-1]} "
                "(config long_requests='clip' | 'drop' | 'error')"
            )
        return fitted

    def _check_request_lengths(self, trace: RequestTrace) -> int:
        """The longest request's tokens (prompt + output, + image tokens for vision models); after
        :meth:`_load_trace` applied ``long_requests`` it is within the model's context."""
        tokens = trace.prompt_tokens + trace.output_tokens
        if trace.image_tokens is not None and UnitKind.VISION_ENCODER in self.model.units:
            tokens = tokens + trace.image_tokens
        return int(tokens.max())

    def _check_episode_fits(self) -> None:
        span_s = self.trace.duration_s
        if span_s < self.episode_length_s:
            raise ValueError(
                f"trace {self.trace.name!r} spans {span_s:.1f} s, shorter than one episode of "
                f"(warmup_intervals + horizon) x control_interval_s = {self.episode_length_s:.1f} s; "
                "lower the horizon or use a longer trace"
            )
        start = self.config.episode_start_s
        for bound in start if isinstance(start, tuple) else () if start is None else (start,):
            self._check_start(bound)

    def _check_start(self, start_s: float) -> float:
        earliest, latest = self.trace.start_s, self.trace.end_s - self.episode_length_s
        if not (math.isfinite(start_s) and earliest <= start_s <= latest):
            raise ValueError(
                f"episode start {start_s} s is outside the trace: valid starts are {earliest:.1f}..{latest:.1f} s "
                f"(trace {self.trace.name!r} ends at {self.trace.end_s:.1f} s, an episode lasts {self.episode_length_s:.1f} s)"
            )
        return float(start_s)

    def _peak_interval_rate_per_s(self) -> float:
        """The trace's highest arrival rate over one control interval (the observation's rate scale)."""
        _, rates = self.trace.rate_curve(self.control_interval_s)
        return max(float(rates.max()), 1e-6)

    @abstractmethod
    def _make_codec(self) -> ActionCodec:
        """The action encoding of this granularity."""

    @abstractmethod
    def _default_deployment(self) -> Deployment:
        """The starting deployment when the config gives none (sized from the trace's rate)."""

    @abstractmethod
    def _max_replicas(self) -> int:
        """Cap on replicas per unit (operator level) or on instances (model level)."""

    def _new_simulator(self, deployment: Deployment, window: RequestTrace, seed: int) -> ServingSimulator:
        """A simulator of the configured fidelity serving ``window`` from ``deployment``."""
        return simulator_class(self.config.fidelity)(
            self.cluster,
            self.model,
            deployment,  # simulators copy the unit configs they change (tested)
            window,
            slo=self.slo,
            cost_model=self.cost_model,
            config=self.sim_config,
            seed=seed,
        )

    def _jittered(self, deployment: Deployment, jitter: int) -> Deployment:
        """``deployment`` with each unit's replicas (model level: the instances) moved by a uniform draw in
        ``-jitter..+jitter`` from ``self.np_random``, kept in ``1..max_replicas``. A unit on explicit GPUs
        that shrinks keeps its first groups; one that grows is placed by its placement policy."""

        def draw(replicas: int) -> int:
            moved = replicas + int(self.np_random.integers(-jitter, jitter + 1))
            return min(max(moved, 1), self.max_replicas)

        if deployment.granularity == "model":
            instances = draw(deployment.instances)
            units = {unit: replace(config, replicas=instances) for unit, config in deployment.units.items()}
            return replace(deployment, instances=instances, units=units)
        units = {}
        for unit, config in deployment.units.items():
            replicas = draw(config.replicas)
            gpus = config.gpus
            if gpus is not None:
                gpus = gpus[:replicas] if replicas <= len(gpus) else None
            units[unit] = replace(config, replicas=replicas, gpus=gpus)
        return deployment.with_units(units)

    @abstractmethod
    def _mask_state(self) -> tuple[np.ndarray, np.ndarray]:
        """``(replicas, addable)`` per action group, for :meth:`action_masks`."""

    # ------------------------------------------------------------------ Gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on a trace window.

        :param seed: seeds ``self.np_random`` (window start and the simulator's seed are drawn from it).
        :param options: ``{"start_s": float}`` to start the window at a given trace time;
            ``{"deployment": Deployment or dict}`` to start this episode from another deployment than
            ``initial_deployment`` (same model, GPU, cluster and granularity; e.g. a planner's output).
        """
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - _RESET_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown reset options {sorted(unknown)}; valid: {', '.join(sorted(_RESET_OPTIONS))}"
            )
        if "start_s" in options:
            start_s = self._check_start(float(options["start_s"]))
        elif isinstance(self.config.episode_start_s, tuple):
            start_s = float(self.np_random.uniform(*self.config.episode_start_s))
        elif self.config.episode_start_s is not None:
            start_s = self.config.episode_start_s
        else:
            start_s = float(
                self.np_random.uniform(self.trace.start_s, self.trace.end_s - self.episode_length_s)
            )
        deployment = self.initial_deployment
        jitter = self.config.initial_replica_jitter
        if "deployment" in options:
            given = check_deployment(
                options["deployment"], self.model, self.config.gpu, self.config.num_nodes
            )
            assert given is not None, "reset option 'deployment' must be a Deployment or its dict"
            self._check_deployment(given)
            deployment = given
            jitter = 0
        self._window_start_s = start_s
        window = self.trace.window(start_s, start_s + self.episode_length_s)
        simulator_seed = int(self.np_random.integers(0, 2**62))
        self._sim = None
        # a jittered start the cluster cannot hold (no room, or attention replicas too small for the
        # longest request) is redrawn; after JITTER_ATTEMPTS the episode starts unjittered
        for _ in range(JITTER_ATTEMPTS if jitter else 0):
            candidate = self._jittered(deployment, jitter)
            try:
                self._sim = self._new_simulator(candidate, window, simulator_seed)
            except ValueError:
                continue
            deployment = candidate
            break
        if self._sim is None:
            self._sim = self._new_simulator(deployment, window, simulator_seed)
        self._episode_deployment = deployment
        self._steps = 0
        self._last_rate_per_s = 0.0
        self._last_metrics = None
        self._last_reward_components = None
        for _ in range(self.config.warmup_intervals):
            self._record_rate(self._sim.advance(self.control_interval_s))
        observation = self._observation()
        info: dict[str, Any] = {"start_s": start_s, "time_s": self._sim.now_s}
        if self._last_metrics is not None:
            info["interval"] = interval_metrics_dict(self._last_metrics)
        return observation, info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Apply ``action`` at the control boundary and simulate one control interval.

        :raises RuntimeError: before the first :meth:`reset`.
        :raises ValueError: if ``action`` is not in :attr:`action_space`.
        """
        sim = self._sim
        if sim is None:
            raise RuntimeError("call reset() before step()")
        vector = np.asarray(action)
        if vector.shape != self._nvec.shape or vector.dtype.kind not in "iu":
            raise ValueError(f"action {action!r} is not in the action space {self.action_space}")
        values = vector.tolist()  # plain ints: checked and decoded faster than with numpy reductions
        if min(values) < 0 or not all(map(operator.lt, values, self._nvec_list)):
            raise ValueError(f"action {action!r} is not in the action space {self.action_space}")
        scaling, cap_repairs = self._cap_replicas(self.codec.decode_values(values))
        report = sim.apply(scaling)
        metrics = sim.advance(self.control_interval_s)
        self._steps += 1
        reward, components = self.reward_function(metrics)
        observation = self._observation_after(metrics)
        self._last_reward_components = components
        info = {
            "time_s": metrics.end_s,
            "reward_components": components,
            "interval": interval_metrics_dict(metrics),
            "repairs": report.repairs + len(cap_repairs),
            "repair_messages": [*cap_repairs, *report.messages],
        }
        return observation, reward, False, self._steps >= self.config.horizon, info

    def _current_replicas(self, unit: UnitKind) -> int:
        """Replicas of ``unit`` serving or loading now: from the last interval's end (the boundary the
        action applies at), or the episode's starting deployment before any interval ran."""
        if self._last_metrics is None:
            return self._episode_deployment.units[unit].replicas
        unit_metrics = self._last_metrics.units[unit]
        return unit_metrics.replicas + unit_metrics.pending_replicas

    def _capped_delta(self, what: str, current: int, delta: int, messages: list[str]) -> int:
        """``delta`` lowered so that ``current + delta <= max_replicas``; a lowering is recorded in ``messages``."""
        allowed = max(0, self.max_replicas - current)
        if delta <= allowed:
            return delta
        messages.append(
            f"{what}: asked +{delta} with {current} running, added at most {allowed} (cap {self.max_replicas})"
        )
        return allowed

    @abstractmethod
    def _cap_replicas(self, action: ScalingAction) -> tuple[ScalingAction, list[str]]:
        """``action`` with additions beyond :attr:`max_replicas` removed, and one message per repair
        (the cap is the environment's, so the repair is counted here, not by the simulator)."""

    def _observation_after(self, metrics: IntervalMetrics) -> np.ndarray:
        observation = self._observation_from(metrics)
        self._record_rate(metrics)
        return observation

    def _record_rate(self, metrics: IntervalMetrics) -> None:
        self._last_rate_per_s = metrics.arrival_rate_per_s
        self._last_metrics = metrics

    def _observation(self) -> np.ndarray:
        """The observation at a reset: from the last warm-up interval, or from the deployment alone."""
        if self._last_metrics is not None:
            # the trend of the first observation compares the warm-up interval with itself: zero
            return self._observation_from(self._last_metrics)
        assert self._sim is not None
        deployment = self._sim.deployment
        physical: list[float] = []
        for unit in self.units:
            unit_deployment = deployment.units[unit]
            physical += [unit_deployment.replicas, 0.0, 0.0, 0.0, 0.0, 0.0, unit_deployment.batch_cap_tokens]
        physical += [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, *self._time_features(self._sim.now_s)]
        return self.observation_layout.normalise(np.array(physical))

    def _observation_from(self, metrics: IntervalMetrics) -> np.ndarray:
        # log-scaled features (queue, waiting) enter as log1p here: cheaper on Python floats than in numpy
        prepared: list[float] = []
        unit_metrics = metrics.units
        log1p = math.log1p
        for unit in self.units:
            m = unit_metrics[unit]
            prepared += [
                m.replicas + m.pending_replicas,
                m.pending_replicas,
                m.utilisation,
                log1p(max(m.queue_tokens, 0.0)),
                m.batch_fill,
                m.mean_wait_s + m.mean_service_s,
                m.batch_cap_tokens,
            ]
        duration_s = metrics.end_s - metrics.start_s
        rate = metrics.arrivals / duration_s if duration_s > 0 else 0.0
        trend = 0.0 if self._last_metrics is metrics else rate - self._last_rate_per_s
        prepared += [
            rate,
            trend,
            metrics.slo_attainment,
            metrics.ttft_p99_s,
            metrics.tbt_p99_s,
            log1p(max(metrics.waiting_requests, 0)),
            metrics.gpus_powered_mean,
            metrics.energy_j / duration_s if duration_s > 0 else 0.0,
            *self._time_features(metrics.end_s),
        ]
        return self.observation_layout.scale_and_clip(prepared)

    def _time_features(self, sim_time_s: float) -> tuple[float, float, float]:
        angle = 2.0 * math.pi * ((self._window_start_s + sim_time_s) % _SECONDS_PER_DAY) / _SECONDS_PER_DAY
        return math.sin(angle), math.cos(angle), self._steps / self.config.horizon

    # ------------------------------------------------------------------ masks, decoding, rendering
    def action_masks(self) -> np.ndarray:
        """Per-dimension boolean masks (``sum(nvec)`` entries) for ``sb3_contrib.MaskablePPO``.

        A replica (instance) delta is allowed if it keeps at least one replica, at most
        ``max_replicas``, and adds no more than fit in free GPU memory now; no-change is always allowed.
        Joint infeasibility (two units competing for the same free memory) is left to the simulator's
        repair, which is counted in ``info["repairs"]``.
        """
        if self._sim is None:
            raise RuntimeError("call reset() before action_masks()")
        replicas, addable = self._mask_state()
        return self.codec.masks(replicas, addable, self.max_replicas)

    def _free_bytes_per_gpu(self) -> np.ndarray:
        assert self._sim is not None
        return self._gpu_capacity_bytes - np.asarray(self._sim.memory_used_bytes(), dtype=np.float64)

    def _current_batch_cap(self, unit: UnitKind) -> int:
        """``unit``'s batch cap now (as :meth:`_current_replicas`: the last interval's, or the start's)."""
        if self._last_metrics is None:
            return self._episode_deployment.units[unit].batch_cap_tokens
        return self._last_metrics.units[unit].batch_cap_tokens

    def _replica_bytes_per_gpu(self, unit: UnitKind, tp: int, batch_cap_tokens: int) -> float:
        """:meth:`ClusterState.replica_bytes_per_gpu`, memoised (masks ask it for every unit every step)."""
        key = (unit, tp, batch_cap_tokens)
        need = self._replica_bytes.get(key)
        if need is None:
            need = self._replica_bytes[key] = self._memory.replica_bytes_per_gpu(unit, tp, batch_cap_tokens)
        return need

    def _addable_from(self, free_bytes_per_gpu: np.ndarray, replica_bytes_per_gpu: float, tp: int) -> int:
        return addable_replicas(free_bytes_per_gpu, replica_bytes_per_gpu, tp, self.config.gpus_per_node)

    def decode_observation(self, observation: np.ndarray, *, physical: bool = False) -> dict[str, Any]:
        """Named values of ``observation`` (see :func:`opscale.envs.spaces.decode_observation`)."""
        from opscale.envs.spaces import decode_observation

        return decode_observation(observation, self.observation_layout, physical=physical)

    @property
    def simulator(self) -> ServingSimulator:
        """The current episode's simulator (for evaluation code that wants its summary)."""
        if self._sim is None:
            raise RuntimeError("call reset() first")
        return self._sim

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: a text table of units, replicas, GPUs and SLO status; ``"rgb_array"``: an image of
        per-unit replicas / utilisation / queue bars, the SLO status and the GPUs powered
        (:func:`opscale.envs.render.render_rgb`); ``None`` without a render mode."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' to gym.make")
            return None
        if self._sim is None:
            raise RuntimeError("call reset() before render()")
        metrics = self._last_metrics
        if self.render_mode == "rgb_array":
            observation = self._observation()
            index = self.observation_layout.index
            bars = [
                tuple(
                    float(observation[index[f"{unit.value}.{key}"]])
                    for key in ("replicas", "utilisation", "queue")
                )
                for unit in self.units
            ]
            slo_ok = metrics is None or metrics.slo_attainment >= self.config.slo_target
            gpu_fraction = 0.0 if metrics is None else metrics.gpus_powered_mean / self.cluster.num_gpus
            return render_rgb(bars, slo_ok, gpu_fraction)
        return render_ansi(
            deployment=self._sim.deployment,
            metrics=metrics,
            reward_components=self._last_reward_components,
            slo=self.slo,
            slo_target=self.config.slo_target,
            step=self._steps,
            horizon=self.config.horizon,
            num_gpus=self.cluster.num_gpus,
            time_s=self._window_start_s + self._sim.now_s,
        )
