"""``opscale/OperatorAutoscale-v0`` (DES) and ``opscale/OperatorAutoscale-fast-v0`` (fluid)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from opscale.envs.base import AutoscaleEnv
from opscale.envs.sizing import size_operator_level
from opscale.envs.spaces import ActionCodec, OperatorActionCodec, addable_replicas_of_units
from opscale.sim.deployment import Deployment, ScalingAction, UnitAction
from opscale.sim.models import UnitKind

__all__ = ["OperatorAutoscaleEnv"]


class OperatorAutoscaleEnv(AutoscaleEnv):
    """Operator-level autoscaling of one LLM on a GPU cluster.

    ## Description

    A model is served as a graph of *scaling units* (``embed``, ``norm``, ``qkv_proj``, ``attention``,
    ``o_proj``, ``ffn`` or ``moe``, ``lm_head``; ``vision_encoder`` first for VL models), each with its
    own pool of replicas, batch-size cap and placement (arXiv 2511.02248). Requests from a trace window
    arrive; every ``control_interval_s`` (default 5 s) the agent changes each unit's replica count,
    batch cap and placement policy. New replicas serve only after their weights load (cold start);
    removed replicas drain. The agent should keep the latency SLO (TTFT and TBT) with as few GPUs and
    as little energy as possible. ``-v0`` runs the request-level discrete-event simulator (truth for
    evaluation); ``-fast-v0`` runs the per-interval analytic (fluid) model for fast training. Both
    share every other setting.

    ## Action Space

    ``MultiDiscrete`` with three dimensions per unit ``i`` (units in the model's forward order,
    ``env.unwrapped.units``), ``3 x units`` in all (21 for a dense LLM):

    ==========  ==========================================================================
    Dimension   Meaning
    ==========  ==========================================================================
    ``3i``      replica delta: value ``k`` -> ``replica_deltas[k]`` (default -2..+2; 2 = keep)
    ``3i + 1``  batch cap: 0 keeps it; ``k >= 1`` -> ``batch_cap_buckets_tokens[k - 1]``
                (default 256, 512, 1024, 2048, 4096, 8192 tokens; attention: token budget)
    ``3i + 2``  placement of replicas added now: 0 pack, 1 spread-gpu, 2 spread-node,
                3 colocate (beside the streams that lack the unit; placed after the rest
                of the action, so ``+k`` attention ``spread-gpu`` and ``+k`` of every other
                unit ``colocate`` add ``k`` co-located chains; see ``Placement``)
    ==========  ==========================================================================

    With ``chain_actions=True`` one more dimension comes last (index ``3 x units``): 0 removes one
    co-located chain, 1 leaves the chains alone, 2 adds one (every unit +1, attention ``spread-gpu``, the
    others ``colocate``: what the per-unit dimensions can also say, as one choice). When it is not 1 it
    overrides every unit's replica delta and placement for that step; batch caps still apply. The mask
    allows a chain change only if every unit allows it.

    Parts that cannot be carried out (fewer than one replica, no GPU with room) are repaired by the
    simulator (clipped to what fits), additions beyond ``max_replicas_per_unit`` by the environment;
    both are counted in ``info["repairs"]`` and described in ``info["repair_messages"]``. ``env.action_masks()``
    masks deltas that would leave fewer than one replica, exceed ``max_replicas_per_unit`` or add more
    replicas than free memory holds (for ``sb3_contrib.MaskablePPO``). An action outside the space
    raises ``ValueError``. ``env.unwrapped.codec`` encodes a ``ScalingAction`` into this space.

    ## Observation Space

    ``Box(float32)`` of ``7 x units + 11`` values (60 for a dense LLM), clipped to the bounds below.
    Unit ``i`` fills indices ``7i .. 7i + 6``; the global block starts at ``G = 7 x units`` (49 for a
    dense LLM). ``env.unwrapped.observation_layout.table()`` prints every index by name, and
    :func:`opscale.envs.spaces.decode_observation` returns a named (optionally physical) dict.

    ============  ===================  ========  =========================================================
    Index         Name                 Bounds    Meaning (physical value / scale)
    ============  ===================  ========  =========================================================
    ``7i``        ``<unit>.replicas``  [0, 1]    replicas serving or loading / ``max_replicas_per_unit``
    ``7i + 1``    ``<unit>.pending``   [0, 1]    replicas loading weights / ``max_replicas_per_unit``
    ``7i + 2``    ``.utilisation``     [0, 1]    busy time / (serving replicas x interval)
    ``7i + 3``    ``.queue``           [0, 1]    log1p(queued tokens) / log1p(``queue_scale_tokens``)
    ``7i + 4``    ``.batch_fill``      [0, 1]    mean tokens per call / batch cap
    ``7i + 5``    ``.latency``         [0, 10]   mean wait + service of a call / TBT SLO
    ``7i + 6``    ``.batch_cap``       [0, 1]    batch cap / largest bucket
    ``G``         ``arrival_rate``     [0, 4]    arrivals per s / ``rate_scale_per_s`` (trace peak)
    ``G + 1``     ``arrival_trend``    [-4, 4]   change in arrivals per s since the interval before / scale
    ``G + 2``     ``slo_attainment``   [0, 1]    share of requests decided in the interval meeting the SLO
    ``G + 3``     ``ttft_p99``         [0, 10]   p99 TTFT / TTFT SLO
    ``G + 4``     ``tbt_p99``          [0, 10]   p99 TBT / TBT SLO
    ``G + 5``     ``waiting``          [0, 1]    log1p(requests waiting for admission) / log1p(1e4)
    ``G + 6``     ``gpus_powered``     [0, 1]    time-averaged GPUs holding a replica / cluster GPUs
    ``G + 7``     ``power``            [0, 1]    mean cluster power / (cluster GPUs x TDP)
    ``G + 8``     ``time_of_day_sin``  [-1, 1]   sin(2 pi t / 1 day) of the trace clock
    ``G + 9``     ``time_of_day_cos``  [-1, 1]   cos(2 pi t / 1 day) of the trace clock
    ``G + 10``    ``episode_progress`` [0, 1]    steps taken / horizon
    ============  ===================  ========  =========================================================

    ## Rewards

    ``reward = slo + gpu + energy`` (see :mod:`opscale.envs.reward`), each in ``info["reward_components"]``:
    ``slo = -w_slo x penalty(attainment)`` (default hinge ``max(0, target - a) / target``, target 0.95),
    ``gpu = -w_gpu x GPUs powered / cluster GPUs``, ``energy = -w_energy x power / (GPUs x TDP)``;
    default weights 10, 1, 0.5. ``info`` also holds ``"interval"`` (the interval's metrics as a plain
    dict), ``"repairs"`` and ``"repair_messages"``, and ``"time_s"``.

    ## Starting State

    ``initial_deployment`` (default: sized for the trace's mean rate with the cost model at
    ``initial_utilisation``, see :mod:`opscale.envs.sizing`) on an empty cluster at the start of a trace
    window of ``(warmup_intervals + horizon) x control_interval_s`` seconds. The window starts at
    ``reset(options={"start_s": s})``, else at ``episode_start_s`` (or uniformly at random in its
    ``(low, high)`` range), else uniformly at random in the trace (from ``self.np_random``);
    ``reset(options={"deployment": d})`` starts that episode from ``d`` instead. With
    ``initial_replica_jitter = j`` each unit's starting replicas move by a uniform draw in ``-j..+j``
    per reset (over- and under-provisioned starts; draws that do not fit are redrawn).
    ``warmup_intervals`` (default 1) are simulated with no action before the first
    observation. The simulator's own seed is drawn from ``self.np_random``. Requests longer than the
    model's context are clipped (``long_requests``, counted in ``env.unwrapped.trace.notes``).

    ## Episode End

    Never terminated. Truncated after ``horizon`` steps (default 120 = 10 simulated minutes).

    ## Arguments

    ``gym.make("opscale:opscale/OperatorAutoscale-fast-v0", render_mode="ansi", config={...}, **keys)``
    with any key of :func:`opscale.envs.config.default_config` (model, gpu, num_nodes, trace, window,
    control interval, horizon, SLO, reward weights and penalty shape, cold-start figures, initial
    deployment, fidelity, action buckets, observation scales). Unknown or invalid values raise
    ``ValueError`` at construction. ``render_mode``: ``"ansi"`` (text table of units, replicas, GPUs and
    SLO status) or ``"rgb_array"`` (bars per unit, SLO strip, GPUs powered).

    ## Version History

    * v0: initial version. Before the first release the placement dimension gained its fourth
      choice, ``colocate`` (PPO models trained before it expect three choices per unit), and the
      config keys ``initial_replica_jitter`` (default 0: episodes start as before) and
      ``chain_actions`` (default ``False``: the action space as before).
    """

    granularity = "operator"

    def _make_codec(self) -> ActionCodec:
        return OperatorActionCodec(
            self.units,
            self.config.replica_deltas,
            self.config.batch_cap_buckets_tokens,
            chain_actions=self.config.chain_actions,
        )

    def _max_replicas(self) -> int:
        return self.config.max_replicas_per_unit or self.cluster.num_gpus

    def _default_deployment(self) -> Deployment:
        return size_operator_level(
            self.model,
            self.cluster,
            self.trace,
            self.slo,
            self.cost_model,
            self.sim_config,
            budget_candidates=self.config.batch_cap_buckets_tokens,
            target_utilisation=self.config.initial_utilisation,
            max_replicas=self._max_replicas(),
        )

    def _cap_replicas(self, action: ScalingAction) -> tuple[ScalingAction, list[str]]:
        messages: list[str] = []
        capped: dict[UnitKind, UnitAction] | None = None
        for unit, unit_action in action.units.items():
            delta = unit_action.replica_delta
            if delta <= 0:
                continue
            current = self._current_replicas(unit)
            if current + delta <= self.max_replicas:
                continue
            if capped is None:
                capped = dict(action.units)
            capped[unit] = replace(
                unit_action, replica_delta=self._capped_delta(unit.value, current, delta, messages)
            )
        if capped is None:
            return action, messages
        return ScalingAction(units=capped, instance_delta=action.instance_delta), messages

    def _mask_state(self) -> tuple[np.ndarray, np.ndarray]:
        tps = [self._episode_deployment.units[unit].tp for unit in self.units]  # actions never change a TP
        needs = []
        for unit, tp in zip(self.units, tps, strict=True):
            need = self._replica_bytes_per_gpu(unit, tp, self._current_batch_cap(unit))
            if unit is UnitKind.ATTENTION:
                # an attention replica needs room for the KV of the trace's longest request
                need += self.longest_request_tokens * self._memory.kv_bytes_per_token_per_gpu(tp)
            needs.append(need)
        addable = addable_replicas_of_units(self._free_bytes_per_gpu(), needs, tps, self.config.gpus_per_node)
        replicas = [self._current_replicas(unit) for unit in self.units]
        return np.array(replicas, dtype=np.int64), np.array(addable, dtype=np.int64)
