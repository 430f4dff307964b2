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
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.distributions import MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy

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


class MultiDiscreteActorCriticPolicy(ActorCriticPolicy):
    """SB3's ``MlpPolicy`` with :class:`GroupedMultiCategoricalDistribution` for ``MultiDiscrete``
    action spaces (any other space: unchanged). The network is the same: one linear head with
    ``sum(nvec)`` logits."""

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(observation_space, action_space, *args, **kwargs)
        if isinstance(action_space, spaces.MultiDiscrete):
            self.action_dist = GroupedMultiCategoricalDistribution([int(n) for n in action_space.nvec])


class MaskableMultiDiscreteActorCriticPolicy(MaskableActorCriticPolicy):
    """sb3-contrib's ``MlpPolicy`` for ``MaskablePPO`` with
    :class:`MaskableGroupedMultiCategoricalDistribution` for ``MultiDiscrete`` action spaces (any other
    space: unchanged). The network is the same."""

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(observation_space, action_space, *args, **kwargs)
        if isinstance(action_space, spaces.MultiDiscrete):
            self.action_dist = MaskableGroupedMultiCategoricalDistribution(
                [int(n) for n in action_space.nvec]
            )
