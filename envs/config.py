"""Environment configuration: the :func:`default_config` dict and its validated form, :class:`EnvConfig`.

Every environment takes ``config=`` (a mapping, HighwayEnv style) and/or keyword overrides through
``gym.make``; both are merged over :func:`default_config` and validated *at construction*, so a typo or an
impossible value (unknown model, GPU or trace name, ``horizon <= 0``, a negative reward weight, an unknown
key) raises :class:`ValueError` naming the bad value and the valid choices before any episode runs.

Keys (all optional; see :func:`default_config` for the defaults):

============================  ==================================================================
``model``                     model catalog name (:data:`opscale.sim.models.MODEL_CATALOG`)
``gpu``                       GPU catalog name (``"a100"``, ``"h100"``, ``"h200"``)
``num_nodes``                 nodes in the cluster; ``gpus_per_node`` GPUs each
``trace``                     a named trace (:data:`opscale.traces.TRACE_NAMES`) or a ``RequestTrace``
``trace_seed``                seed for generating / loading the named trace (fixed per env instance)
``trace_duration_s``          length generated for synthetic named traces (``None``: the loader's own)
``trace_rate_scale``          multiply the trace's request rate (``RequestTrace.scale_rate``)
``long_requests``             requests longer than the model's context: ``"clip"`` (default; counted in
                              ``env.trace.notes`` and warned once), ``"drop"`` or ``"error"``
``episode_start_s``           ``None``: a random window start per reset (from ``self.np_random``);
                              a number: a fixed start; a pair ``(low, high)``: a random start in that
                              range per reset (e.g. training windows kept apart from held-out ones).
                              ``reset(options={"start_s": ...})`` overrides all three.
``control_interval_s``        seconds between two decisions (default 5 s)
``horizon``                   decisions per episode; the episode is truncated after that many steps
``warmup_intervals``          control intervals simulated with no action before the first observation
``slo``                       ``None`` (the model's default SLO) or ``{"ttft_s", "tbt_s", "tbt_statistic"}``
``reward_weights``            ``{"slo", "gpu", "energy"}`` >= 0
``slo_penalty``               ``"hinge"``, ``"squared"`` or ``"step"`` (see :mod:`opscale.envs.reward`)
``slo_target``                per-interval SLO attainment below which the SLO term penalises, in (0, 1]
``cold_start``                ``None`` or overrides of the simulator's start-up figures (``SimConfig``
                              ``operator_start_s``, ``instance_start_s``, ``weight_load_bandwidth_bytes_per_s``)
``sim_config``                ``None`` or a mapping of further :class:`opscale.sim.config.SimConfig` fields
``initial_deployment``        ``None`` (sized from the trace's rate, see :mod:`opscale.envs.sizing`),
                              a ``Deployment`` or its ``to_dict()`` form
``initial_utilisation``       target utilisation the default initial deployment is sized for, in (0, 1]
``initial_replica_jitter``    ``j >= 0``: per reset, each unit's starting replicas (model level: the
                              instances) move by a uniform draw in ``-j..+j`` (``self.np_random``), kept
                              in ``1..max_replicas_per_unit``, so episodes start over- and
                              under-provisioned; a draw the cluster cannot hold is redrawn (see
                              ``AutoscaleEnv.reset``). A unit on explicit GPUs that grows is placed
                              by its policy. ``reset(options={"deployment": ...})`` is never
                              jittered. Default 0.
``fidelity``                  ``"des"`` (request-level truth) or ``"fluid"`` (fast analytic model)
``replica_deltas``            the replica (or instance) changes one action may ask for, e.g. -2..+2
``chain_actions``             operator level only: ``True`` adds an action dimension that adds or removes
                              one co-located chain (one replica of every unit, the model-level
                              instance's layout) in one choice; see ``OperatorActionCodec``. Default
                              ``False`` (the space as it was)
``batch_cap_buckets_tokens``  batch caps an action may select (tokens per call)
``max_replicas_per_unit``     ``None`` (the cluster's GPU count; model level: instances that fit) or a cap
``queue_scale_tokens``        queue length that maps to observation value 1 (log scale)
``rate_scale_per_s``          ``None`` (the trace's peak per-interval rate) or the arrival rate mapping to 1
============================  ==================================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opscale import ENV_IDS
from opscale.sim.deployment import Deployment
from opscale.sim.hardware import GPUSpec, get_gpu
from opscale.sim.metrics import SLO
from opscale.sim.models import ModelSpec, get_model
from opscale.sim.simulator import Fidelity
from opscale.traces.trace import TRUNCATION_POLICIES, RequestTrace

__all__ = ["REWARD_COMPONENTS", "EnvConfig", "check_deployment", "default_config", "resolve_config"]

#: Names of the reward components, in the order they are reported.
REWARD_COMPONENTS: tuple[str, ...] = ("slo", "gpu", "energy")
SLO_PENALTY_SHAPES: tuple[str, ...] = ("hinge", "squared", "step")
COLD_START_KEYS: tuple[str, ...] = (
    "operator_start_s",
    "instance_start_s",
    "weight_load_bandwidth_bytes_per_s",
)

_DEFAULTS: dict[str, Any] = {
    "model": "qwen2-7b",
    "gpu": "a100",
    "num_nodes": 2,
    "gpus_per_node": 8,
    "trace": "default",
    "trace_seed": 0,
    "trace_duration_s": None,
    "trace_rate_scale": 1.0,
    "long_requests": "clip",
    "episode_start_s": None,
    "control_interval_s": 5.0,
    "horizon": 120,
    "warmup_intervals": 1,
    "slo": None,
    "reward_weights": {"slo": 10.0, "gpu": 1.0, "energy": 0.5},
    "slo_penalty": "hinge",
    "slo_target": 0.95,
    "cold_start": None,
    "sim_config": None,
    "initial_deployment": None,
    "initial_utilisation": 0.6,
    "initial_replica_jitter": 0,
    "fidelity": "fluid",
    "replica_deltas": (-2, -1, 0, 1, 2),
    "chain_actions": False,
    "batch_cap_buckets_tokens": (256, 512, 1024, 2048, 4096, 8192),
    "max_replicas_per_unit": None,
    "queue_scale_tokens": 1.0e6,
    "rate_scale_per_s": None,
}


def default_config() -> dict[str, Any]:
    """A fresh copy of the default configuration (safe to mutate)."""
    return copy.deepcopy(_DEFAULTS)


@dataclass(frozen=True)
class EnvConfig:
    """A validated environment configuration (see the module docstring for every key)."""

    model: ModelSpec
    gpu: GPUSpec
    num_nodes: int
    gpus_per_node: int
    trace: str | RequestTrace
    trace_seed: int
    trace_duration_s: float | None
    trace_rate_scale: float
    long_requests: str
    episode_start_s: float | tuple[float, float] | None
    control_interval_s: float
    horizon: int
    warmup_intervals: int
    slo: SLO | None
    reward_weights: Mapping[str, float]
    slo_penalty: str
    slo_target: float
    cold_start: Mapping[str, float]
    sim_config: Mapping[str, Any]
    initial_deployment: Deployment | None
    initial_utilisation: float
    initial_replica_jitter: int
    fidelity: Fidelity
    replica_deltas: tuple[int, ...]
    chain_actions: bool
    batch_cap_buckets_tokens: tuple[int, ...]
    max_replicas_per_unit: int | None
    queue_scale_tokens: float
    rate_scale_per_s: float | None

    @property
    def num_gpus(self) -> int:
        """GPUs in the cluster."""
        return self.num_nodes * self.gpus_per_node


def _choices(values: object) -> str:
    return ", ".join(str(v) for v in values)  # type: ignore[attr-defined]


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"config {key!r} must be true or false, got {value!r}")
    return value


def _positive_number(key: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config {key!r} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config {key!r} must be {bound}, got {value!r}")
    return float(value)


def _check_episode_start(value: Any) -> float | tuple[float, float] | None:
    """``None``, a start time or a ``(low, high)`` range of start times, seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"config 'episode_start_s' as a range must be (low, high), got {value!r}")
        low, high = (_positive_number("episode_start_s", bound, allow_zero=True) for bound in value)
        if low > high:
            raise ValueError(f"config 'episode_start_s' range must have low <= high, got {value!r}")
        return (low, high)
    return _positive_number("episode_start_s", value, allow_zero=True)


def _positive_int(key: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config {key!r} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"config {key!r} must be {bound}, got {value!r}")
    return value


def _check_trace(value: Any) -> str | RequestTrace:
    if isinstance(value, RequestTrace):
        if len(value) == 0:
            raise ValueError("config 'trace' is an empty RequestTrace")
        return value
    from opscale.traces import TRACE_NAMES

    if not isinstance(value, str) or value not in TRACE_NAMES:
        raise ValueError(
            f"unknown trace {value!r}; valid names: {_choices(TRACE_NAMES)} (or pass a RequestTrace)"
        )
    return value


def _check_slo(value: Any) -> SLO | None:
    if value is None or isinstance(value, SLO):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"config 'slo' must be None, an SLO or a mapping, got {value!r}")
    unknown = set(value) - {"ttft_s", "tbt_s", "tbt_statistic"}
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; valid: ttft_s, tbt_s, tbt_statistic")
    return SLO(
        ttft_s=_positive_number("slo.ttft_s", value.get("ttft_s")),
        tbt_s=_positive_number("slo.tbt_s", value.get("tbt_s")),
        tbt_statistic=value.get("tbt_statistic", "p99"),
    )


def _check_weights(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError(f"config 'reward_weights' must be a mapping, got {value!r}")
    unknown = set(value) - set(REWARD_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown reward components {sorted(unknown)}; valid: {_choices(REWARD_COMPONENTS)}")
    weights = dict(_DEFAULTS["reward_weights"])
    for name, weight in value.items():
        weights[name] = _positive_number(f"reward_weights.{name}", weight, allow_zero=True)
    return weights


def _check_int_tuple(key: str, value: Any) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"config {key!r} must be a sequence of ints, got {value!r}") from None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"config {key!r} must be a non-empty sequence of ints, got {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"config {key!r} has repeated values: {items}")
    return tuple(sorted(items))


def check_deployment(value: Any, model: ModelSpec, gpu: GPUSpec, num_nodes: int) -> Deployment | None:
    """``value`` (``None``, a ``Deployment`` or its dict) as a ``Deployment`` for this model, GPU and cluster.

    :raises ValueError: for another model, GPU or cluster size, or a malformed dict.
    """
    if value is None:
        return None
    deployment = Deployment.from_dict(value) if isinstance(value, Mapping) else value
    if not isinstance(deployment, Deployment):
        raise ValueError(f"config 'initial_deployment' must be None, a Deployment or a dict, got {value!r}")
    if get_model(deployment.model) is not model or get_gpu(deployment.gpu) is not gpu:
        raise ValueError(
            f"initial_deployment is for model {deployment.model!r} on {deployment.gpu!r}, "
            f"but the env runs {model.name!r} on {gpu.name!r}"
        )
    if deployment.num_nodes != num_nodes:
        raise ValueError(f"initial_deployment has num_nodes={deployment.num_nodes}, the env has {num_nodes}")
    return deployment


#: Keys the registered ids pass as keywords; ``config`` must not contradict them silently.
_ID_KEYWORDS = frozenset(key for _, id_kwargs in ENV_IDS.values() for key in id_kwargs)


def resolve_config(config: Mapping[str, Any] | None = None, **overrides: Any) -> EnvConfig:
    """Merge ``config`` and ``overrides`` over :func:`default_config` and validate the result.

    :param config: a (partial) configuration mapping.
    :param overrides: further keys, applied after ``config`` (what ``gym.make(..., key=value)`` passes).
    :raises ValueError: for an unknown key or any invalid value; the message names it and the valid choices,
        and for a key that a registered id sets (:data:`opscale.ENV_IDS`) given a different value in
        ``config`` (e.g.
        ``gym.make("opscale/OperatorAutoscale-v0", config={"fidelity": "fluid"})``: the id's own
        ``fidelity="des"`` arrives as an override, and silently preferring either would surprise someone).
    """
    given = config or {}
    conflicting = sorted(
        key for key in _ID_KEYWORDS & set(overrides) if key in given and given[key] != overrides[key]
    )
    if conflicting:
        details = ", ".join(
            f"{key}: config {given[key]!r} vs keyword {overrides[key]!r}" for key in conflicting
        )
        raise ValueError(
            f"config keys set twice with different values ({details}); pass each once, e.g. "
            "gym.make(id, fidelity=...) or the '-fast-v0' id for the fluid fidelity"
        )
    merged = default_config()
    for source in (config or {}, overrides):
        unknown = set(source) - set(_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown config keys {sorted(unknown)}; valid keys: {_choices(sorted(_DEFAULTS))}"
            )
        merged.update(source)

    model = get_model(merged["model"])
    gpu = get_gpu(merged["gpu"])
    num_nodes = _positive_int("num_nodes", merged["num_nodes"])
    try:
        fidelity = Fidelity(merged["fidelity"])
    except ValueError:
        raise ValueError(
            f"unknown fidelity {merged['fidelity']!r}; valid: {_choices(f.value for f in Fidelity)}"
        ) from None
    penalty = merged["slo_penalty"]
    if penalty not in SLO_PENALTY_SHAPES:
        raise ValueError(f"unknown slo_penalty {penalty!r}; valid: {_choices(SLO_PENALTY_SHAPES)}")
    slo_target = _positive_number("slo_target", merged["slo_target"])
    if slo_target > 1:
        raise ValueError(f"config 'slo_target' must be in (0, 1], got {slo_target}")
    initial_utilisation = _positive_number("initial_utilisation", merged["initial_utilisation"])
    if initial_utilisation > 1:
        raise ValueError(f"config 'initial_utilisation' must be in (0, 1], got {initial_utilisation}")
    cold_start = dict(merged["cold_start"] or {})
    unknown_cold = set(cold_start) - set(COLD_START_KEYS)
    if unknown_cold:
        raise ValueError(
            f"unknown cold_start keys {sorted(unknown_cold)}; valid: {_choices(COLD_START_KEYS)}"
        )
    for key, value in cold_start.items():
        cold_start[key] = _positive_number(
            f"cold_start.{key}", value, allow_zero=key != "weight_load_bandwidth_bytes_per_s"
        )
    replica_deltas = _check_int_tuple("replica_deltas", merged["replica_deltas"])
    if 0 not in replica_deltas:
        raise ValueError(f"config 'replica_deltas' must include 0 (no change), got {replica_deltas}")
    buckets = _check_int_tuple("batch_cap_buckets_tokens", merged["batch_cap_buckets_tokens"])
    if buckets[0] < 1:
        raise ValueError(f"config 'batch_cap_buckets_tokens' must be >= 1 token, got {buckets}")
    long_requests = merged["long_requests"]
    if long_requests not in TRUNCATION_POLICIES:
        raise ValueError(
            f"unknown long_requests policy {long_requests!r}; valid: {_choices(TRUNCATION_POLICIES)}"
        )
    episode_start = merged["episode_start_s"]
    max_replicas = merged["max_replicas_per_unit"]
    rate_scale = merged["rate_scale_per_s"]
    duration = merged["trace_duration_s"]
    sim_config = merged["sim_config"] or {}
    if not isinstance(sim_config, Mapping):
        raise ValueError(
            f"config 'sim_config' must be None or a mapping of SimConfig fields, got {sim_config!r}"
        )
    return EnvConfig(
        model=model,
        gpu=gpu,
        num_nodes=num_nodes,
        gpus_per_node=_positive_int("gpus_per_node", merged["gpus_per_node"]),
        trace=_check_trace(merged["trace"]),
        trace_seed=_positive_int("trace_seed", merged["trace_seed"], allow_zero=True),
        trace_duration_s=None if duration is None else _positive_number("trace_duration_s", duration),
        trace_rate_scale=_positive_number("trace_rate_scale", merged["trace_rate_scale"]),
        long_requests=str(long_requests),
        episode_start_s=_check_episode_start(episode_start),
        control_interval_s=_positive_number("control_interval_s", merged["control_interval_s"]),
        horizon=_positive_int("horizon", merged["horizon"]),
        warmup_intervals=_positive_int("warmup_intervals", merged["warmup_intervals"], allow_zero=True),
        slo=_check_slo(merged["slo"]),
        reward_weights=_check_weights(merged["reward_weights"]),
        slo_penalty=penalty,
        slo_target=slo_target,
        cold_start=cold_start,
        sim_config=dict(sim_config),
        initial_deployment=check_deployment(merged["initial_deployment"], model, gpu, num_nodes),
        initial_utilisation=initial_utilisation,
        initial_replica_jitter=_positive_int(
            "initial_replica_jitter", merged["initial_replica_jitter"], allow_zero=True
        ),
        fidelity=fidelity,
        replica_deltas=replica_deltas,
        chain_actions=_check_bool("chain_actions", merged["chain_actions"]),
        batch_cap_buckets_tokens=buckets,
        max_replicas_per_unit=None
        if max_replicas is None
        else _positive_int("max_replicas_per_unit", max_replicas),
        queue_scale_tokens=_positive_number("queue_scale_tokens", merged["queue_scale_tokens"]),
        rate_scale_per_s=None if rate_scale is None else _positive_number("rate_scale_per_s", rate_scale),
    )
