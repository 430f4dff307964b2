"""``opscale/ModelAutoscale-v0`` (DES) and ``opscale/ModelAutoscale-fast-v0`` (fluid)."""

from __future__ import annotations

import numpy as np

from opscale.envs.base import AutoscaleEnv
from opscale.envs.sizing import size_model_level
from opscale.envs.spaces import ActionCodec, ModelActionCodec
from opscale.sim.deployment import Deployment, ScalingAction
from opscale.sim.models import UnitKind

__all__ = ["ModelAutoscaleEnv"]


class ModelAutoscaleEnv(AutoscaleEnv):
    """Model-level autoscaling (whole instances) of one LLM, on the same engine as the operator level.

    ## Description

    The baseline granularity: the model is served by monolithic instances of ``tp x pp`` GPUs, every
    scaling unit co-located on its instance's GPUs and scaled together. Every ``control_interval_s``
    the agent adds or removes whole instances and may set one batch cap (the instances' per-iteration
    token budget). A new instance serves only after its engine starts and its weights load (about 10.7 s
    for Qwen2-7B by default). Everything else (trace windows, SLO, reward, observation, fidelities) is
    shared with :class:`opscale.envs.operator_autoscale.OperatorAutoscaleEnv`, so RL results at the two
    granularities compare directly.

    ## Action Space

    ``MultiDiscrete([len(replica_deltas), len(batch_cap_buckets_tokens) + 1])`` (default ``[5, 7]``):

    =========  =======================================================================================
    Dimension  Meaning
    =========  =======================================================================================
    0          instance delta: value ``k`` -> ``replica_deltas[k]`` instances (default -2..+2; 2 = keep)
    1          batch cap of every unit: 0 keeps it; ``k >= 1`` -> ``batch_cap_buckets_tokens[k - 1]``
    =========  =======================================================================================

    Infeasible parts are repaired by the simulator (no room) or the environment (more instances than
    the cluster holds) and counted in ``info["repairs"]``;
    ``env.action_masks()`` masks deltas leaving no instance, exceeding the instances the cluster holds,
    or adding more than fit in free memory. An action outside the space raises ``ValueError``.

    ## Observation Space

    The same layout as the operator-level environment (``7 x units + 11`` float32 values, see
    :class:`opscale.envs.operator_autoscale.OperatorAutoscaleEnv`); every unit's ``replicas`` is the
    instance count scaled by the most instances the cluster holds (``cluster GPUs / (tp x pp)``).

    ## Rewards

    As the operator-level environment: ``reward = slo + gpu + energy`` with the components in
    ``info["reward_components"]``, the interval metrics in ``info["interval"]``.

    ## Starting State

    ``initial_deployment`` (default: instances of the smallest TP degree leaving half a GPU for the KV
    cache, sized for the trace's mean rate, see :mod:`opscale.envs.sizing`) at the start of a trace
    window chosen as in the operator-level environment; ``initial_replica_jitter`` moves the number of
    starting instances per reset.

    ## Episode End

    Never terminated; truncated after ``horizon`` steps.

    ## Arguments

    As the operator-level environment (:func:`opscale.envs.config.default_config`);
    ``initial_deployment`` must be a model-level deployment.

    ## Version History

    * v0: initial version.
    """

    granularity = "model"

    def _make_codec(self) -> ActionCodec:
        if self.config.chain_actions:
            raise ValueError(
                "config 'chain_actions' is for the operator-level envs; a model-level action's instance "
                "delta already adds or removes whole instances"
            )
        return ModelActionCodec(self.units, self.config.replica_deltas, self.config.batch_cap_buckets_tokens)

    def _max_replicas(self) -> int:
        if self.config.max_replicas_per_unit is not None:
            return self.config.max_replicas_per_unit
        return self.cluster.num_gpus // self.initial_deployment.gpus_per_instance

    def _default_deployment(self) -> Deployment:
        return size_model_level(
            self.model,
            self.cluster,
            self.trace,
            self.slo,
            self.cost_model,
            self.sim_config,
            budget_candidates=self.config.batch_cap_buckets_tokens,
            target_utilisation=self.config.initial_utilisation,
        )

    def _cap_replicas(self, action: ScalingAction) -> tuple[ScalingAction, list[str]]:
        messages: list[str] = []
        if action.instance_delta > 0:
            # every unit has one replica per instance; attention stands for the instance count
            current = self._current_replicas(UnitKind.ATTENTION)
            delta = self._capped_delta("instances", current, action.instance_delta, messages)
            if messages:
                return ScalingAction(units=action.units, instance_delta=delta), messages
        return action, messages

    def _mask_state(self) -> tuple[np.ndarray, np.ndarray]:
        tp, pp = self._episode_deployment.tp, self._episode_deployment.pp  # actions never change them
        token_budget = max(self._current_batch_cap(unit) for unit in self.units)
        # one GPU of an instance holds 1/pp of every unit's TP shard plus room for the KV of the trace's longest request
        need = sum(self._replica_bytes_per_gpu(unit, tp, token_budget) for unit in self.units) / pp
        need += self.longest_request_tokens * self._memory.kv_bytes_per_token_per_gpu(tp) / pp
        addable = self._addable_from(self._free_bytes_per_gpu(), need, tp * pp)
        # every unit has one replica per instance: attention stands for the instance count
        return np.array([self._current_replicas(UnitKind.ATTENTION)]), np.array([addable])
