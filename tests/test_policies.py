"""The grouped multi-categorical distribution is SB3's distribution, computed per dimension size."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib.common.maskable.distributions import MaskableMultiCategoricalDistribution
from stable_baselines3.common.distributions import MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy

import opscale  # noqa: F401  (registers the environments)
from opscale.agents.policies import (
    GroupedMultiCategoricalDistribution,
    MaskableGroupedMultiCategoricalDistribution,
    MaskableMultiDiscreteActorCriticPolicy,
    MultiDiscreteActorCriticPolicy,
    _CompiledRolloutPass,
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


@pytest.mark.parametrize(
    "policy_class", [MultiDiscreteActorCriticPolicy, MaskableMultiDiscreteActorCriticPolicy]
)
def test_adam_is_fused_by_default_and_steps_as_sb3s_adam(policy_class: type) -> None:
    space = gym.spaces.MultiDiscrete(NVEC)
    observations = gym.spaces.Box(-1.0, 1.0, (4,))
    th.manual_seed(0)
    fused = policy_class(observations, space, lambda _: 3e-4)
    assert fused.optimizer.defaults["fused"] and fused.optimizer.defaults["eps"] == 1e-5
    # SB3's default (``eps`` only) when the caller sets the options
    plain = policy_class(observations, space, lambda _: 3e-4, optimizer_kwargs={"eps": 1e-5})
    assert not plain.optimizer.defaults["fused"]
    plain.load_state_dict(fused.state_dict())
    batch = th.rand(32, 4)
    actions = th.stack([th.randint(0, n, (32,)) for n in NVEC], dim=1)
    for policy in (fused, plain):
        for _ in range(3):
            values, log_prob, entropy = policy.evaluate_actions(batch, actions)
            loss = values.square().mean() - log_prob.mean() - 0.01 * entropy.mean()
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
    for (name, fused_parameter), plain_parameter in zip(
        fused.named_parameters(), plain.parameters(), strict=True
    ):
        th.testing.assert_close(fused_parameter, plain_parameter, msg=name)


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


def _torch_pass(policy: th.nn.Module, *args: object) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    with th.enable_grad():  # recording gradients: the policy's own torch pass
        actions, values, log_prob = policy(*args)
    return actions, values.detach(), log_prob.detach()


def _sharpened(policy_class: type[ActorCriticPolicy], **kwargs: Any) -> Any:
    """A policy on the operator env's spaces whose action logits spread wider than at initialisation."""
    env = gym.make("opscale/OperatorAutoscale-fast-v0", horizon=2)
    th.manual_seed(0)
    policy = policy_class(env.observation_space, env.action_space, lambda _: 3e-4, **kwargs)
    with th.no_grad():
        policy.action_net.weight.mul_(300.0)  # SB3 initialises it with gain 0.01: near-uniform choices
    env.close()
    return policy


@pytest.mark.parametrize("deterministic", [False, True])
def test_compiled_rollout_pass_gives_the_torch_pass_actions_values_and_log_probs(deterministic: bool) -> None:
    policy = _sharpened(MultiDiscreteActorCriticPolicy)
    observations = th.rand(64, policy.observation_space.shape[0], generator=th.Generator().manual_seed(1))
    with th.no_grad():
        assert policy._rollout_pass(observations) is not None
        th.manual_seed(7)
        actions, values, log_prob = policy(observations, deterministic)
    th.manual_seed(7)
    reference = _torch_pass(policy, observations, deterministic)
    assert th.equal(actions, reference[0])
    th.testing.assert_close(values, reference[1], rtol=1e-5, atol=1e-5)
    th.testing.assert_close(log_prob, reference[2], rtol=1e-5, atol=1e-4)
    assert len(set(map(tuple, actions.tolist()))) > 1 or deterministic  # the draws do differ per row


def test_compiled_masked_pass_gives_the_torch_pass_and_never_a_forbidden_choice() -> None:
    policy = _sharpened(MaskableMultiDiscreteActorCriticPolicy)
    generator = th.Generator().manual_seed(2)
    observations = th.rand(64, policy.observation_space.shape[0], generator=generator)
    masks = th.rand(64, sum(policy.action_space.nvec), generator=generator) < 0.6
    offsets = np.cumsum([0, *policy.action_space.nvec[:-1]])
    masks[:, offsets] = True  # each dimension's first choice allowed: none is left without one
    with th.no_grad():
        th.manual_seed(3)
        actions, values, log_prob = policy(observations, False, masks.numpy())
    th.manual_seed(3)
    reference = _torch_pass(policy, observations, False, masks.numpy())
    assert th.equal(actions, reference[0])
    th.testing.assert_close(values, reference[1], rtol=1e-5, atol=1e-5)
    th.testing.assert_close(log_prob, reference[2], rtol=1e-5, atol=1e-4)
    assert masks.numpy()[np.arange(64)[:, None], offsets + actions.numpy()].all()


def test_compiled_pass_follows_weight_updates_moves_and_copies() -> None:
    import copy

    policy = _sharpened(MultiDiscreteActorCriticPolicy)
    observations = th.rand(8, policy.observation_space.shape[0], generator=th.Generator().manual_seed(4))
    with th.no_grad():
        before = policy(observations, True)[2]
        for parameter in policy.parameters():  # an optimiser step writes in place
            parameter.add_(0.05)
        after = policy(observations, True)[2]
        clone = copy.deepcopy(policy)
        for parameter in clone.parameters():
            parameter.mul_(0.5)
        assert th.equal(policy(observations, True)[2], after)  # the original keeps its own weights
        cloned = clone(observations, True)[2]
    assert not th.allclose(before, after)
    th.testing.assert_close(after, _torch_pass(policy, observations, True)[2], rtol=1e-5, atol=1e-4)
    th.testing.assert_close(cloned, _torch_pass(clone, observations, True)[2], rtol=1e-5, atol=1e-4)
    policy.to("cpu", dtype=th.float64)  # no compiled form for float64: the torch pass
    with th.no_grad():
        assert policy._rollout_pass(observations.double()) is None


def test_networks_without_a_compiled_form_keep_the_torch_pass() -> None:
    policy = _sharpened(MultiDiscreteActorCriticPolicy, activation_fn=th.nn.ELU)
    observations = th.rand(4, policy.observation_space.shape[0])
    with th.no_grad():
        assert policy._rollout_pass(observations) is None
        actions, _, _ = policy(observations)
    assert actions.shape == (4, len(policy.action_space.nvec))


def test_ppo_with_the_compiled_pass_is_reproducible_per_seed() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    def train(seed: int) -> list[th.Tensor]:
        env = make_vec_env(
            "opscale/OperatorAutoscale-fast-v0", n_envs=2, seed=seed, env_kwargs={"horizon": 8}
        )
        model = PPO(
            MultiDiscreteActorCriticPolicy,
            env,
            n_steps=16,
            batch_size=16,
            n_epochs=2,
            seed=seed,
            device="cpu",
        )
        model.learn(64)
        assert isinstance(model.policy._compiled_pass, _CompiledRolloutPass)  # the rollouts ran compiled
        env.close()
        return [parameter.detach().clone() for parameter in model.policy.parameters()]

    first, again, other = train(0), train(0), train(1)
    assert all(th.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(th.equal(a, b) for a, b in zip(first, other, strict=True))
