"""A faster actor-critic policy for the environments' flat ``MultiDiscrete`` actions.

SB3's :class:`~stable_baselines3.common.distributions.MultiCategoricalDistribution` builds one torch
``Categorical`` per action dimension (21 for the operator-level env) at every rollout step and for
every minibatch of every epoch, and most of PPO's own time went there (805 env steps/s on a replayed
interval). :class:`GroupedMultiCategoricalDistribution` computes the same distribution with one
log-softmax per distinct dimension size (3 for the operator-level env: replica delta, batch cap,
placement), each over a ``(batch, choices, dimensions)`` view of the logits. Two CPU costs are avoided
that way: torch's softmax along a short *last* axis is ~5x slower than along a middle one, and any
padding of the narrower dimensions at a very negative logit sends ``exp`` down its slow underflow path
(the previous, padded layout spent ~3.6 ms of a minibatch's ~8 ms there; grouped: ~1.9 ms).
Log-probabilities, entropies and modes equal SB3's (tested); samples follow the same distribution
by inverse CDF, a different draw order, so a run is reproducible per seed but not draw-for-draw
identical to ``"MlpPolicy"``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from numba import njit
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.distributions import MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

__all__ = [
    "GroupedMultiCategoricalDistribution",
    "MaskableGroupedMultiCategoricalDistribution",
    "MaskableMultiDiscreteActorCriticPolicy",
    "MultiDiscreteActorCriticPolicy",
]

_SelfGrouped = TypeVar("_SelfGrouped", bound="GroupedMultiCategoricalDistribution")


class GroupedMultiCategoricalDistribution(MultiCategoricalDistribution):
    """SB3's multi-categorical distribution, computed per group of equally sized dimensions.

    :param action_dims: the size of each discrete dimension (a ``MultiDiscrete`` space's ``nvec``).
    """

    def __init__(self, action_dims: list[int]) -> None:
        super().__init__(action_dims)
        offsets = np.cumsum([0, *action_dims[:-1]])
        #: per distinct size: the dimensions of that size, and where choice ``c`` of member ``m`` sits in
        #: the flat logits (``[c, m]``)
        self._groups: list[tuple[th.Tensor, th.Tensor]] = []
        for size in sorted(set(action_dims)):
            members = [dimension for dimension, n in enumerate(action_dims) if n == size]
            index = offsets[members][None, :] + np.arange(size)[:, None]
            self._groups.append((th.as_tensor(members), th.as_tensor(index)))
        self._logits = th.empty(0)
        self._log_probs: list[th.Tensor] = []
        #: per group ``(batch, choices, members)``: the choices allowed (``None``: all)
        self._allowed: list[th.Tensor] | None = None

    def proba_distribution(self: _SelfGrouped, action_logits: th.Tensor) -> _SelfGrouped:
        if self._groups and self._groups[0][1].device != action_logits.device:
            self._groups = [
                (members.to(action_logits.device), index.to(action_logits.device))
                for members, index in self._groups
            ]
        self._logits = action_logits.reshape(-1, sum(self.action_dims))
        self._normalise(None)
        return self

    def _normalise(self, masks: th.Tensor | None) -> None:
        """Per group, normalised log-probabilities along the choices; a choice ``masks`` forbids gets
        logit -1e8 (sb3-contrib's rule: probability 0 in float32)."""
        self._log_probs = []
        self._allowed = None if masks is None else []
        for _, index in self._groups:
            logits = self._logits[:, index]
            if masks is not None:
                allowed = masks[:, index]
                logits = th.where(allowed, logits, th.tensor(-1e8, dtype=logits.dtype, device=logits.device))
                self._allowed.append(allowed)  # type: ignore[union-attr]
            self._log_probs.append(th.log_softmax(logits, dim=1))

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        actions = actions.long()
        total = th.zeros(actions.shape[0], device=actions.device)
        for (members, _), log_probs in zip(self._groups, self._log_probs, strict=True):
            total = total + log_probs.gather(1, actions[:, members].unsqueeze(1)).sum(dim=(1, 2))
        return total

    def entropy(self) -> th.Tensor:
        terms = [log_probs.exp() * log_probs for log_probs in self._log_probs]
        if self._allowed is not None:
            # forbidden choices carry no uncertainty (and their -1e8 logits must not leak in)
            terms = [th.where(allowed, term, 0.0) for allowed, term in zip(self._allowed, terms, strict=True)]
        return -sum(term.sum(dim=(1, 2)) for term in terms)  # type: ignore[return-value]

    def _per_dimension(self, choose: Any) -> th.Tensor:
        """``(batch, dimensions)`` actions, ``choose(log_probs)`` giving each group's ``(batch, members)``."""
        first = self._log_probs[0]
        actions = th.empty(first.shape[0], len(self.action_dims), dtype=th.long, device=first.device)
        for (members, _), log_probs in zip(self._groups, self._log_probs, strict=True):
            actions[:, members] = choose(log_probs)
        return actions

    def sample(self) -> th.Tensor:
        def inverse_cdf(log_probs: th.Tensor) -> th.Tensor:
            cumulative = log_probs.exp().cumsum(dim=1)
            # a draw below the last cumulative probability never lands past the last allowed choice
            uniform = th.rand(log_probs.shape[0], 1, log_probs.shape[2], device=log_probs.device)
            below = (cumulative < uniform * cumulative[:, -1:, :]).sum(dim=1)
            return below.clamp_(max=log_probs.shape[1] - 1)

        return self._per_dimension(inverse_cdf)

    def mode(self) -> th.Tensor:
        return self._per_dimension(lambda log_probs: log_probs.argmax(dim=1))


class MaskableGroupedMultiCategoricalDistribution(GroupedMultiCategoricalDistribution, MaskableDistribution):
    """sb3-contrib's masked multi-categorical distribution (for ``MaskablePPO``), computed as
    :class:`GroupedMultiCategoricalDistribution`: a forbidden choice's logit is -1e8 and it adds nothing
    to the entropy, as in :class:`sb3_contrib.common.maskable.distributions.MaskableCategorical`."""

    def apply_masking(self, masks: th.Tensor | np.ndarray | None) -> None:
        if masks is None:
            self._normalise(None)
            return
        allowed = th.as_tensor(masks, dtype=th.bool, device=self._logits.device)
        self._normalise(allowed.reshape(-1, sum(self.action_dims)))


#: activation codes of the compiled rollout pass (other activations keep the torch pass)
_ACTIVATION_CODES: dict[type[nn.Module], int] = {nn.Tanh: 1, nn.ReLU: 2}

_Network = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], np.ndarray]


def _compiled_network(modules: list[nn.Module]) -> _Network | None:
    """``modules`` (``Linear`` layers, each optionally followed by ``Tanh`` or ``ReLU``) as (weights,
    biases, activation codes), the arrays numpy views of the parameters; ``None`` if another module or
    a parameter off the CPU or not float32 appears."""
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    activations: list[int] = []
    for module in modules:
        if isinstance(module, nn.Linear) and module.bias is not None:
            if module.weight.device.type != "cpu" or module.weight.dtype != th.float32:
                return None
            # views sharing the parameters' memory: in-place optimiser steps and loads show through
            weights.append(module.weight.detach().numpy())
            biases.append(module.bias.detach().numpy())
            activations.append(0)
        elif type(module) in _ACTIVATION_CODES and activations and activations[-1] == 0:
            activations[-1] = _ACTIVATION_CODES[type(module)]
        else:
            return None
    return tuple(weights), tuple(biases), np.array(activations, dtype=np.int64)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _run_network(
    inputs: np.ndarray,
    weights: tuple[np.ndarray, ...],
    biases: tuple[np.ndarray, ...],
    activations: np.ndarray,
) -> np.ndarray:
    """The layers on a ``(batch, features)`` float32 array. The dot products may be reassociated (vectorised),
    as BLAS's are, and tanh is ``1 - 2 / (exp(2x) + 1)`` (within 2e-7 of it; libm's ``tanhf`` costs ~27 ns
    here, 4x more): the result equals torch's up to float32 rounding."""
    one, two, zero = np.float32(1.0), np.float32(2.0), np.float32(0.0)
    for layer in range(len(activations)):
        weight, bias = weights[layer], biases[layer]
        outputs = np.empty((inputs.shape[0], weight.shape[0]), dtype=np.float32)
        for row in range(inputs.shape[0]):
            for unit in range(weight.shape[0]):
                total = zero
                for feature in range(weight.shape[1]):
                    total += inputs[row, feature] * weight[unit, feature]
                outputs[row, unit] = total + bias[unit]
        flat = outputs.ravel()
        if activations[layer] == 1:
            for index in range(flat.size):
                flat[index] = one - two / (np.exp(two * flat[index]) + one)
        elif activations[layer] == 2:
            for index in range(flat.size):
                flat[index] = max(flat[index], zero)
        inputs = outputs
    return inputs


@njit(cache=True)
def _rollout_step(
    features: np.ndarray,
    actor: _Network,
    critic: _Network,
    dimensions: np.ndarray,
    uniforms: np.ndarray,
    masks: np.ndarray,
    deterministic: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actions, values and log-probabilities of a batch (:meth:`_CompiledRolloutPass.__call__`).

    :param dimensions: per action dimension, ``(logit offset, choices, offset of its uniform draw in a
        row-major (batch, members) block, members of its size, its place among them)``.
    :param uniforms: the draws of :meth:`GroupedMultiCategoricalDistribution.sample`, concatenated.
    :param masks: ``(batch, sum(nvec))`` choices allowed (an empty array: all).
    """
    logits = _run_network(features, actor[0], actor[1], actor[2])
    values = _run_network(features, critic[0], critic[1], critic[2])
    batch = logits.shape[0]
    actions = np.empty((batch, len(dimensions)), dtype=np.int64)
    log_prob = np.zeros(batch, dtype=np.float32)
    masked = masks.shape[0] > 0
    forbidden = np.float32(-1e8)
    row = np.empty(logits.shape[1], dtype=np.float32)  # one dimension's shifted logits
    sums = np.empty(logits.shape[1], dtype=np.float32)  # and its cumulative probabilities
    for b in range(batch):
        for dimension in range(len(dimensions)):
            offset, size = dimensions[dimension, 0], dimensions[dimension, 1]
            draws_at, members, member = (
                dimensions[dimension, 2],
                dimensions[dimension, 3],
                dimensions[dimension, 4],
            )
            # log-softmax as torch computes it: x - max - log(sum(exp(x - max)))
            top = forbidden
            for choice in range(size):
                value = logits[b, offset + choice]
                if masked and not masks[b, offset + choice]:
                    value = forbidden
                row[choice] = value
                if choice == 0 or value > top:
                    top = value
            total = np.float32(0.0)
            for choice in range(size):
                row[choice] = row[choice] - top
                total += np.exp(row[choice])
            log_total = np.log(total)
            if deterministic:
                chosen = 0
                for choice in range(1, size):
                    if row[choice] > row[chosen]:
                        chosen = choice
            else:
                # inverse CDF, the draw scaled to the last cumulative probability
                cumulative = np.float32(0.0)
                for choice in range(size):
                    cumulative += np.exp(row[choice] - log_total)
                    sums[choice] = cumulative
                threshold = uniforms[draws_at * batch + b * members + member] * cumulative
                chosen = 0
                for choice in range(size):
                    if sums[choice] < threshold:
                        chosen += 1
                chosen = min(chosen, size - 1)
            actions[b, dimension] = chosen
            log_prob[b] += row[chosen] - log_total
    return actions, values, log_prob


class _CompiledRolloutPass:
    """The actor-critic's forward pass without autograd, compiled, for rollouts.

    PPO calls the policy once per vectorised step on a handful of observations (8 x 60 floats). In torch
    that is ~60 operator dispatches, ~0.95 ms on this project's 2-core box, about a third of PPO's own
    cost per env step; numpy is no better (~0.6 ms: ~5 us per small operation). One compiled call
    (:func:`_rollout_step`) takes ~0.15 ms, most of it the matrix products. The uniform draws still come from torch's generator, as many
    and in the same order as :meth:`GroupedMultiCategoricalDistribution.sample` (one ``th.rand`` of their
    total gives the same numbers as its per-group calls), so a seed gives the torch pass's actions; the
    network and log-probabilities agree up to float32 rounding (tested).

    Built by :meth:`build` for networks of ``Linear`` layers with ``Tanh`` or ``ReLU`` behind flatten
    extractors, float32 on the CPU; anything else keeps the torch pass.
    """

    def __init__(
        self, actor: _Network, critic: _Network, distribution: GroupedMultiCategoricalDistribution
    ) -> None:
        self.actor = actor
        self.critic = critic
        dimensions = np.zeros((len(distribution.action_dims), 5), dtype=np.int64)
        draws_at = 0
        for members, index in distribution._groups:
            choices = index.shape[0]
            for place, dimension in enumerate(members.tolist()):
                # index[0, place]: where the dimension's first choice sits in the flat logits
                dimensions[dimension] = (int(index[0, place]), choices, draws_at, len(members), place)
            draws_at += len(members)
        self.dimensions = dimensions
        self.draws_per_row = draws_at
        self.no_masks = np.zeros((0, 0), dtype=np.bool_)

    @classmethod
    def build(cls, policy: ActorCriticPolicy) -> _CompiledRolloutPass | None:
        distribution = policy.action_dist
        if not isinstance(distribution, GroupedMultiCategoricalDistribution):
            return None
        if not isinstance(policy.pi_features_extractor, FlattenExtractor) or not isinstance(
            policy.vf_features_extractor, FlattenExtractor
        ):
            return None
        extractor = policy.mlp_extractor
        actor = _compiled_network([*extractor.policy_net, policy.action_net])
        critic = _compiled_network([*extractor.value_net, policy.value_net])
        if actor is None or critic is None:
            return None
        return cls(actor, critic, distribution)

    def __call__(
        self, observations: th.Tensor, deterministic: bool, masks: np.ndarray | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``(actions, values, log_probs)`` as :meth:`ActorCriticPolicy.forward` returns them.

        :param masks: per row, the choices allowed (``sum(nvec)`` booleans); forbidden ones get logit -1e8.
        """
        batch = len(observations)
        features = np.ascontiguousarray(observations.numpy().reshape(batch, -1), dtype=np.float32)
        uniforms = (
            np.zeros(0, dtype=np.float32) if deterministic else th.rand(batch * self.draws_per_row).numpy()
        )
        actions, values, log_prob = _rollout_step(
            features,
            self.actor,
            self.critic,
            self.dimensions,
            uniforms,
            self.no_masks if masks is None else masks.reshape(batch, -1),
            deterministic,
        )
        return th.from_numpy(actions), th.from_numpy(values), th.from_numpy(log_prob)


def _fused_adam_by_default(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of a policy with SB3's default optimiser (Adam, eps 1e-5) made *fused* unless the caller
    chose an optimiser or its options: one kernel for all parameters instead of ~10 tensor ops each
    (on CPU, 0.36 against 1.4 ms a step for these networks; the same update up to rounding)."""
    if (
        kwargs.get("optimizer_kwargs") is None
        and kwargs.get("optimizer_class", th.optim.Adam) is th.optim.Adam
    ):
        kwargs = {**kwargs, "optimizer_kwargs": {"eps": 1e-5, "fused": True}}
    return kwargs


class _CompiledRollouts(nn.Module):
    """Mixin of the policies below: their forward pass is compiled (:class:`_CompiledRolloutPass`) when no
    gradient is recorded and the observations are on the CPU, i.e. while PPO collects rollouts."""

    #: the compiled pass, built at first use; ``None``: the network has no compiled form; ``False``: not built
    _compiled_pass: _CompiledRolloutPass | bool | None = False

    def _rollout_pass(self, observations: th.Tensor) -> _CompiledRolloutPass | None:
        """The compiled pass if it serves this call, else ``None`` (the torch pass)."""
        if th.is_grad_enabled() or observations.device.type != "cpu":
            return None
        if self._compiled_pass is False:
            self._compiled_pass = _CompiledRolloutPass.build(self)  # type: ignore[arg-type]
        return self._compiled_pass  # type: ignore[return-value]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # ``.to()``, ``.cpu()``, ``.float()``... may replace the parameters the compiled pass's views share
        self._compiled_pass = False
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # a copy's views would share the original's parameters: it builds its own
        state = super().__getstate__()
        state.pop("_compiled_pass", None)
        return state


class MultiDiscreteActorCriticPolicy(_CompiledRollouts, ActorCriticPolicy):
    """SB3's ``MlpPolicy`` with :class:`GroupedMultiCategoricalDistribution` for ``MultiDiscrete``
    action spaces (any other space: unchanged). The network is the same: one linear head with
    ``sum(nvec)`` logits. Its Adam is fused unless ``optimizer_class`` or ``optimizer_kwargs`` is given,
    and rollouts run compiled (:class:`_CompiledRolloutPass`)."""

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(observation_space, action_space, *args, **_fused_adam_by_default(kwargs))
        if isinstance(action_space, spaces.MultiDiscrete):
            self.action_dist = GroupedMultiCategoricalDistribution([int(n) for n in action_space.nvec])

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        rollout = self._rollout_pass(obs)
        if rollout is None:
            return super().forward(obs, deterministic)
        return rollout(obs, deterministic)


class MaskableMultiDiscreteActorCriticPolicy(_CompiledRollouts, MaskableActorCriticPolicy):
    """sb3-contrib's ``MlpPolicy`` for ``MaskablePPO`` with
    :class:`MaskableGroupedMultiCategoricalDistribution` for ``MultiDiscrete`` action spaces (any other
    space: unchanged). The network is the same; its Adam is fused and its rollouts run compiled as in
    :class:`MultiDiscreteActorCriticPolicy`."""

    def forward(
        self, obs: th.Tensor, deterministic: bool = False, action_masks: np.ndarray | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        rollout = self._rollout_pass(obs)
        if rollout is None:
            return super().forward(obs, deterministic, action_masks)
        return rollout(
            obs, deterministic, None if action_masks is None else np.asarray(action_masks, dtype=bool)
        )

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(observation_space, action_space, *args, **_fused_adam_by_default(kwargs))
        if isinstance(action_space, spaces.MultiDiscrete):
            self.action_dist = MaskableGroupedMultiCategoricalDistribution(
                [int(n) for n in action_space.nvec]
            )
