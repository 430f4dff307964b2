"""opscale: operator-level autoscaling of LLM serving.

Importing :mod:`opscale` registers the Gymnasium environment ids (idempotently), so
``gym.make("opscale:opscale/OperatorAutoscale-fast-v0")`` works in a fresh process, e.g. a
``SubprocVecEnv`` child.
"""

from __future__ import annotations

from opscale.version import __version__

__all__ = ["ENV_IDS", "__version__", "register_envs"]

#: Registered ids -> (entry point, default kwargs). The ``-fast`` variants differ only in config.
ENV_IDS: dict[str, tuple[str, dict[str, object]]] = {
    "opscale/OperatorAutoscale-v0": (
        "opscale.envs.operator_autoscale:OperatorAutoscaleEnv",
        {"fidelity": "des"},
    ),
    "opscale/OperatorAutoscale-fast-v0": (
        "opscale.envs.operator_autoscale:OperatorAutoscaleEnv",
        {"fidelity": "fluid"},
    ),
    "opscale/ModelAutoscale-v0": ("opscale.envs.model_autoscale:ModelAutoscaleEnv", {"fidelity": "des"}),
    "opscale/ModelAutoscale-fast-v0": (
        "opscale.envs.model_autoscale:ModelAutoscaleEnv",
        {"fidelity": "fluid"},
    ),
}


def register_envs() -> None:
    """Register every id in :data:`ENV_IDS` unless it is already registered."""
    from gymnasium.envs.registration import register, registry

    for env_id, (entry_point, kwargs) in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry_point, kwargs=dict(kwargs))


register_envs()
