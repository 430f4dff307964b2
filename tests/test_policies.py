"""The grouped multi-categorical distribution is SB3's distribution, computed per dimension size."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib.common.maskable.distributions import MaskableMultiCategoricalDistribution
from stable_baselines3.common.distributions import MultiCategoricalDistribution

import opscale  # noqa: F401  (registers the environments)
from opscale.agents.policies import (
    GroupedMultiCategoricalDistribution,
    MaskableGroupedMultiCategoricalDistribution,
    MaskableMultiDiscreteActorCriticPolicy,
    MultiDiscreteActorCriticPolicy,
)

NVEC = [5, 3, 7, 2, 1]


def _pair(logits: th.Tensor) -> tuple[MultiCategoricalDistribution, GroupedMultiCategoricalDistribution]:
    reference = MultiCategoricalDistribution(NVEC).proba_distribution(logits)
    grouped = GroupedMultiCategoricalDistribution(NVEC).proba_distribution(logits)
    return reference, grouped


def test_log_prob_entropy_and_mode_equal_sb3s() -> None:
    generator = th.Generator().manual_seed(0)
    logits = 3.0 * th.randn(64, sum(NVEC), generator=generator)
    actions = th.stack([th.randint(0, n, (64,), generator=generator) for n in NVEC], dim=1)
    reference, grouped = _pair(logits)
    th.testing.assert_close(grouped.log_prob(actions), reference.log_prob(actions))
    th.testing.assert_close(grouped.entropy(), reference.entropy())
    assert th.equal(grouped.mode(), reference.mode())


def test_samples_stay_in_each_dimension_and_follow_its_probabilities() -> None:
    th.manual_seed(0)
    logits = th.randn(1, sum(NVEC)).expand(20_000, -1)
    reference, grouped = _pair(logits)
    samples = grouped.sample()
    assert samples.shape == (20_000, len(NVEC))
    for dimension, (size, categorical) in enumerate(zip(NVEC, reference.distribution, strict=True)):
        column = samples[:, dimension].numpy()
        assert column.min() >= 0 and column.max() < size  # never outside the dimension
        frequencies = np.bincount(column, minlength=size) / column.size
        probabilities = categorical.probs[0].numpy()
        # binomial standard error of a frequency from 20k draws: at most 0.0036; 4 sigma
        np.testing.assert_allclose(frequencies, probabilities, atol=0.015)


def test_policy_uses_it_on_the_operator_env_and_keeps_the_network() -> None:
    env = gym.make("opscale/OperatorAutoscale-fast-v0", horizon=2)
    policy = MultiDiscreteActorCriticPolicy(env.observation_space, env.action_space, lambda _: 3e-4)
    assert isinstance(policy.action_dist, GroupedMultiCategoricalDistribution)
    assert policy.action_net.out_features == int(env.action_space.nvec.sum())
    observation, _ = env.reset(seed=0)
    action, _ = policy.predict(observation, deterministic=False)
    assert env.action_space.contains(action)
    env.close()


@pytest.mark.parametrize("space", [gym.spaces.Discrete(4), gym.spaces.Box(-1.0, 1.0, (2,))])
def test_other_action_spaces_keep_sb3s_distribution(space: gym.spaces.Space) -> None:
    policy = MultiDiscreteActorCriticPolicy(gym.spaces.Box(-1.0, 1.0, (3,)), space, lambda _: 3e-4)
    assert not isinstance(policy.action_dist, GroupedMultiCategoricalDistribution)


def test_saturated_logits_keep_finite_log_probs_and_entropies() -> None:
    # logit gaps of 1e4: a choice's probability underflows to 0, and its log-probability must stay finite
    generator = th.Generator().manual_seed(1)
    logits = 1e4 * th.randn(16, sum(NVEC), generator=generator)
    actions = th.stack([th.randint(0, n, (16,), generator=generator) for n in NVEC], dim=1)
    reference, grouped = _pair(logits)
    assert th.isfinite(grouped.entropy()).all() and th.isfinite(grouped.log_prob(actions)).all()
    th.testing.assert_close(grouped.entropy(), reference.entropy())
    th.testing.assert_close(grouped.log_prob(actions), reference.log_prob(actions))


def _masked_pair(
    logits: th.Tensor, masks: th.Tensor
) -> tuple[MaskableMultiCategoricalDistribution, MaskableGroupedMultiCategoricalDistribution]:
    reference = MaskableMultiCategoricalDistribution(NVEC).proba_distribution(logits)
    grouped = MaskableGroupedMultiCategoricalDistribution(NVEC).proba_distribution(logits)
    reference.apply_masking(masks)
    grouped.apply_masking(masks)
    return reference, grouped


def _random_masks(rows: int, generator: th.Generator) -> th.Tensor:
    masks = th.rand(rows, sum(NVEC), generator=generator) < 0.6
    first = 0
    for size in NVEC:  # every dimension keeps at least one allowed choice, as the env's masks do
        masks[th.arange(rows), first + th.randint(0, size, (rows,), generator=generator)] = True
        first += size
    return masks


def test_masked_log_prob_entropy_and_mode_equal_sb3_contribs() -> None:
    generator = th.Generator().manual_seed(2)
    logits = 3.0 * th.randn(64, sum(NVEC), generator=generator)
    masks = _random_masks(64, generator)
    reference, grouped = _masked_pair(logits, masks)
    actions = reference.sample()  # allowed actions
    th.testing.assert_close(grouped.log_prob(actions), reference.log_prob(actions))
    th.testing.assert_close(grouped.entropy(), reference.entropy())
    assert th.equal(grouped.mode(), reference.mode())
    # removing the masks restores the unmasked distribution
    reference.apply_masking(None)
    grouped.apply_masking(None)
    th.testing.assert_close(grouped.entropy(), reference.entropy())


def test_masked_samples_never_take_a_forbidden_choice_and_follow_the_rest() -> None:
    th.manual_seed(0)
    generator = th.Generator().manual_seed(3)
    logits = th.randn(1, sum(NVEC), generator=generator).expand(20_000, -1)
    masks = _random_masks(1, generator).expand(20_000, -1)
    reference, grouped = _masked_pair(logits, masks)
    samples = grouped.sample()
    first = 0
    for dimension, (size, categorical) in enumerate(zip(NVEC, reference.distributions, strict=True)):
        column = samples[:, dimension].numpy()
        allowed = masks[0, first : first + size].numpy()
        assert allowed[column].all()
        frequencies = np.bincount(column, minlength=size) / column.size
        np.testing.assert_allclose(frequencies, categorical.probs[0].numpy(), atol=0.015)
        first += size


def test_maskable_policy_uses_it_and_maskable_ppo_trains_with_it() -> None:
    from sb3_contrib import MaskablePPO

    env = gym.make("opscale/OperatorAutoscale-fast-v0", horizon=8)
    model = MaskablePPO(
        MaskableMultiDiscreteActorCriticPolicy, env, n_steps=16, batch_size=16, n_epochs=1, seed=0
    )
    assert isinstance(model.policy.action_dist, MaskableGroupedMultiCategoricalDistribution)
    model.learn(total_timesteps=16)
    observation, _ = env.reset(seed=0)
    masks = env.unwrapped.action_masks()  # type: ignore[attr-defined]
    action, _ = model.predict(observation, action_masks=masks)
    assert env.action_space.contains(action)
    env.close()
