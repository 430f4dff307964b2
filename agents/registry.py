"""Enum-keyed policy registry: ``make_policy(name_or_path, env, **kwargs)``.

Names (:class:`PolicyName`): ``static``, ``model-level``, ``model-level-throughput``,
``operator-greedy``, ``oracle``. Anything else is taken as the path of a Stable-Baselines3 model saved
with ``model.save(path)`` (a ``.zip``): it loads as ``MaskablePPO`` (sb3-contrib) when its policy class
is a maskable one, else as ``PPO``, and is wrapped in :class:`SB3Policy`, which feeds
``env.action_masks()`` to maskable models. ``make_policy(path, env, start_from="operator-greedy")``
makes the saved model start its episodes from the deployment that heuristic would start from (the
same information, so a comparison measures the control, not the starting point).
"""

from __future__ import annotations

import importlib
import json
import zipfile
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from opscale.agents.base import ControlContext, Policy, PolicyState, ProposesInitialDeployment
from opscale.sim.deployment import Deployment

__all__ = ["POLICY_NAMES", "PolicyName", "SB3Policy", "load_sb3_policy", "make_policy"]


class PolicyName(str, Enum):
    """The hand-written policies."""

    STATIC = "static"
    MODEL_LEVEL = "model-level"
    MODEL_LEVEL_THROUGHPUT = "model-level-throughput"
    MODEL_LEVEL_PLANNER = "model-level-planner"
    OPERATOR_GREEDY = "operator-greedy"
    ORACLE = "oracle"


#: Name -> ``module:class`` (imported lazily; every class takes a :class:`ControlContext` first).
_POLICY_CLASSES: dict[PolicyName, str] = {
    PolicyName.STATIC: "opscale.agents.static:StaticPolicy",
    PolicyName.MODEL_LEVEL: "opscale.agents.model_level:TargetTrackingPolicy",
    PolicyName.MODEL_LEVEL_THROUGHPUT: "opscale.agents.model_level:ThroughputTrackingPolicy",
    PolicyName.MODEL_LEVEL_PLANNER: "opscale.agents.model_planner:ModelLevelPlannerPolicy",
    PolicyName.OPERATOR_GREEDY: "opscale.agents.operator_greedy:OperatorGreedyPolicy",
    PolicyName.ORACLE: "opscale.agents.oracle:OraclePolicy",
}

#: The registered names, in listing order.
POLICY_NAMES: tuple[str, ...] = tuple(name.value for name in PolicyName)


class SB3Policy:
    """A saved SB3 model behind the :class:`Policy` protocol.

    :param model: a loaded ``PPO`` or ``MaskablePPO``.
    :param env: the environment it acts on (``action_masks()`` is read from it for maskable models).
    :param path: where it was loaded from (for reports).
    :param start_from: a policy whose starting deployment this one adopts (``None``: the env's own).
    """

    def __init__(
        self, model: Any, env: Any, path: Path, start_from: ProposesInitialDeployment | None = None
    ) -> None:
        self.model = model
        self.env = env
        self.path = path
        self.maskable = type(model).__name__ == "MaskablePPO"
        self.start_from = start_from

    def initial_deployment(self) -> Deployment | None:
        """The ``start_from`` policy's starting deployment (``None``: start from the env's default)."""
        return None if self.start_from is None else self.start_from.initial_deployment()

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: PolicyState = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, PolicyState]:
        """See :class:`Policy`; maskable models get ``env.action_masks()``."""
        if self.maskable:
            masks = getattr(self.env, "action_masks", None) or self.env.unwrapped.action_masks
            action, new_state = self.model.predict(
                observation,
                state=state,
                episode_start=episode_start,
                deterministic=deterministic,
                action_masks=masks(),
            )
        else:
            action, new_state = self.model.predict(
                observation, state=state, episode_start=episode_start, deterministic=deterministic
            )
        return np.asarray(action), new_state


def _is_maskable(path: Path) -> bool:
    """Whether the saved model's policy class is sb3-contrib's maskable one (read from its ``data``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a Stable-Baselines3 model zip ({error})") from None
    policy_class = data.get("policy_class", {})
    described = json.dumps(policy_class) if isinstance(policy_class, dict) else str(policy_class)
    return "Maskable" in described


def load_sb3_policy(
    path: str | Path, env: Any, start_from: ProposesInitialDeployment | None = None
) -> SB3Policy:
    """Load a saved ``PPO`` / ``MaskablePPO`` model for ``env`` (``start_from``: see :class:`SB3Policy`).

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if it is not an SB3 model zip, or its spaces do not match ``env``'s.
    """
    file = Path(path)
    if not file.exists() and file.suffix != ".zip" and Path(f"{file}.zip").exists():
        file = Path(f"{file}.zip")
    if not file.is_file():
        raise FileNotFoundError(f"policy model file {str(path)!r} not found")
    if _is_maskable(file):
        from sb3_contrib import MaskablePPO

        model: Any = MaskablePPO.load(file, device="cpu")
    else:
        from stable_baselines3 import PPO

        model = PPO.load(file, device="cpu")
    base = getattr(env, "unwrapped", env)
    model_nvec = np.asarray(getattr(model.action_space, "nvec", []))
    env_nvec = np.asarray(getattr(base.action_space, "nvec", []))
    if model.observation_space.shape != base.observation_space.shape or not np.array_equal(
        model_nvec, env_nvec
    ):
        raise ValueError(
            f"model {file} was trained for observation {model.observation_space.shape} / action "
            f"{getattr(model.action_space, 'nvec', model.action_space)}, but this environment has "
            f"{base.observation_space.shape} / {getattr(base.action_space, 'nvec', base.action_space)} "
            "(different model, env id or action buckets)"
        )
    return SB3Policy(model, env, file, start_from)


def _looks_like_path(name: str) -> bool:
    return name.endswith(".zip") or "/" in name or "\\" in name or Path(name).exists()


def make_policy(name_or_path: str | Path | PolicyName, env: Any, **kwargs: Any) -> Policy:
    """Build a policy for ``env``.

    :param name_or_path: a :class:`PolicyName` (or its value), or the path of a saved SB3 model.
    :param env: the environment the policy acts on (heuristics read their configuration from it).
    :param kwargs: keyword arguments of the policy class (e.g. ``percentile=95`` for ``static``,
        ``metric="queue"`` for ``model-level``, ``targets=PlannerTargets(...)`` for the planners); for a
        saved model only ``start_from`` (a policy name, see :class:`SB3Policy`).
    :raises ValueError: for an unknown name (listing the valid ones) or a policy that does not fit
        the environment's granularity.
    :raises FileNotFoundError: for a model path that does not exist.
    """
    text = name_or_path.value if isinstance(name_or_path, PolicyName) else str(name_or_path)
    try:
        name = PolicyName(text)
    except ValueError:
        if _looks_like_path(text):
            start_from = kwargs.pop("start_from", None)
            if kwargs:
                raise ValueError(
                    f"saved models take only the option start_from, got {sorted(kwargs)}"
                ) from None
            return load_sb3_policy(text, env, _starting_policy(start_from, env))
        raise ValueError(
            f"unknown policy {text!r}; valid names: {', '.join(POLICY_NAMES)}, or a path to a saved SB3 model (.zip)"
        ) from None
    if "start_from" in kwargs:
        raise ValueError(
            f"start_from is an option of saved models; {name.value!r} starts from its own deployment"
        )
    module_name, class_name = _POLICY_CLASSES[name].split(":")
    policy_class = getattr(importlib.import_module(module_name), class_name)
    policy: Policy = policy_class(ControlContext.from_env(env), **kwargs)
    return policy


def _starting_policy(name: str | None, env: Any) -> ProposesInitialDeployment | None:
    """The registry policy named ``name`` as a source of starting deployments (``None`` for none)."""
    if name is None:
        return None
    policy = make_policy(name, env)
    if not isinstance(policy, ProposesInitialDeployment):
        raise ValueError(
            f"policy {name!r} proposes no starting deployment; use one that does, e.g. 'operator-greedy'"
        )
    return policy
