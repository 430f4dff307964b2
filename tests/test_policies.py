"""The grouped multi-categorical distribution is SB3's distribution, computed per dimension size."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.distributions import MultiCategoricalDistribution

import opscale  # noqa: F401  (registers the environments)
from opscale.agents.policies import GroupedMultiCategoricalDistribution, MultiDiscreteActorCriticPolicy

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
