"""Gymnasium environments for operator-level and model-level autoscaling.

The environment classes live in :mod:`opscale.envs.operator_autoscale` and
:mod:`opscale.envs.model_autoscale` (registered as ``opscale/OperatorAutoscale-v0`` and friends by
``import opscale``); this package re-exports the configuration and observation helpers policies use.
"""

from opscale.envs.config import default_config
from opscale.envs.spaces import ObservationLayout, decode_observation

__all__ = ["ObservationLayout", "decode_observation", "default_config"]
