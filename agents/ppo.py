"""PPO training on the autoscaling environments, in the CleanRL spirit: one function, top to bottom.

:func:`train` builds the vectorised environments, the SB3 ``PPO`` (or sb3-contrib ``MaskablePPO``, which
reads each env's ``action_masks()``), the TensorBoard callbacks of :mod:`opscale.agents.callbacks`, trains,
and saves ``final_model.zip`` (plus ``best_model.zip`` from the periodic evaluation) in the run directory
``LOGDIR/ENV__EXP__SEED__TIME``. Every hyperparameter is a field of :class:`PPOConfig`, which loads from
a JSON or TOML file (:meth:`PPOConfig.from_file`) and is written back next to the model as
``config.json``, so a run can be repeated from its own directory.

Example::

    from opscale.agents.ppo import PPOConfig, train
    result = train(PPOConfig(env_id="opscale/OperatorAutoscale-fast-v0", total_timesteps=50_000, n_envs=4))
    print(result.run_dir, result.model_path)

A saved model is loaded for evaluation by :func:`opscale.agents.registry.make_policy` (its path as the
policy name), which picks ``PPO`` or ``MaskablePPO`` from the zip.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = [
    "Algo",
    "PPOConfig",
    "TrainResult",
    "VecEnvKind",
    "bias_towards_noop",
    "canonical_env_id",
    "make_env",
    "noop_action",
    "run_name",
    "small_network_torch",
    "train",
]


class Algo(str, Enum):
    """Which SB3 algorithm trains the policy."""

    PPO = "ppo"
    MASKABLE_PPO = "maskable-ppo"


class VecEnvKind(str, Enum):
    """How the ``n_envs`` copies run: in this process, or one subprocess each."""

    DUMMY = "dummy"
    SUBPROC = "subproc"


@dataclass(frozen=True)
class PPOConfig:
    """Everything a training run depends on.

    :param env_id: a registered id, e.g. ``"opscale/OperatorAutoscale-fast-v0"`` (the ``opscale:`` module
        prefix is added when missing so subprocess workers can make it without a prior import).
    :param exp_name: experiment name, the second part of the run directory's name.
    :param algo: ``"ppo"`` or ``"maskable-ppo"``.
    :param total_timesteps: environment steps (control intervals) to train for, summed over envs.
    :param n_envs: parallel environment copies.
    :param vec_env: ``"dummy"`` (sequential, in process) or ``"subproc"`` (one process each).
    :param seed: seeds torch, the action space and each env copy (``seed + i``).
    :param learning_rate: Adam step size.
    :param n_steps: steps per env per rollout (the rollout holds ``n_steps x n_envs`` transitions).
    :param batch_size: minibatch size; must divide into ``n_steps x n_envs`` sensibly (SB3 warns otherwise).
    :param n_epochs: passes over each rollout.
    :param gamma: discount per control interval.
    :param gae_lambda: GAE lambda.
    :param clip_range: PPO ratio clip.
    :param ent_coef: entropy bonus weight.
    :param vf_coef: value-loss weight.
    :param max_grad_norm: gradient clipping norm.
    :param net_arch: hidden layer sizes of both the policy and the value network.
    :param normalize_reward: scale rewards by a running estimate of the return's standard deviation
        (``VecNormalize(norm_obs=False)``) while training. The SLO term can reach -10 per step, which
        gives returns in the hundreds and value losses in the thousands otherwise. Observations are
        already normalised by the env, so a saved model needs no statistics at inference.
    :param noop_logit_bias: added to the initial logit of each action dimension's no-op value (the env's
        ``codec.noop()``), so the untrained policy mostly keeps the deployment (0.65 probability per
        dimension for 5 choices at the default 2.0) instead of random-walking 21 dimensions, which
        fragments replicas over every GPU; 0 disables it (and envs without a codec get none).
    :param hold_out_windows: unless ``env_kwargs`` sets ``episode_start_s``, training and periodic
        evaluation episodes start before the trace's held-out tail (the ``"random"`` range of
        :func:`opscale.agents.evaluation.window_range`), so ``opscale evaluate --windows held-out`` tests
        on windows the agent never saw; the range is written to the run's ``config.json``.
    :param eval_freq: environment steps between evaluations (0: no periodic evaluation, no best model).
    :param n_eval_episodes: episodes per evaluation.
    :param eval_seed: reset seed of the first evaluation episode (fixed, so evaluations are paired).
    :param env_kwargs: configuration of the training env (``gym.make(env_id, **env_kwargs)``).
    :param eval_env_id: env id for evaluation; ``None``: ``env_id``.
    :param eval_env_kwargs: keys replacing ``env_kwargs`` for the evaluation env (e.g. another ``trace_seed``
        for held-out windows, or ``{"fidelity": "des"}``).
    :param logdir: parent directory of the run directories.
    :param device: torch device (``"cpu"`` is fastest for these small MLPs).
    :param torch_threads: torch intra-op threads while training (1 is fastest for small MLPs).
    """

    env_id: str = "opscale/OperatorAutoscale-fast-v0"
    exp_name: str = "ppo"
    algo: Algo = Algo.PPO
    total_timesteps: int = 100_000
    n_envs: int = 4
    vec_env: VecEnvKind = VecEnvKind.DUMMY
    seed: int = 0
    learning_rate: float = 3e-4
    n_steps: int = 256
    batch_size: int = 256
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (128, 128)
    normalize_reward: bool = True
    noop_logit_bias: float = 2.0
    hold_out_windows: bool = True
    eval_freq: int = 10_000
    n_eval_episodes: int = 2
    eval_seed: int = 10_000
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    eval_env_id: str | None = None
    eval_env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    logdir: str = "runs"
    device: str = "cpu"
    torch_threads: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "algo", Algo(self.algo))
        except ValueError:
            raise ValueError(
                f"unknown algo {self.algo!r}; valid: {', '.join(a.value for a in Algo)}"
            ) from None
        try:
            object.__setattr__(self, "vec_env", VecEnvKind(self.vec_env))
        except ValueError:
            raise ValueError(
                f"unknown vec_env {self.vec_env!r}; valid: {', '.join(k.value for k in VecEnvKind)}"
            ) from None
        object.__setattr__(self, "net_arch", tuple(int(width) for width in self.net_arch))
        for name in (
            "total_timesteps",
            "n_envs",
            "n_steps",
            "batch_size",
            "n_epochs",
            "n_eval_episodes",
            "torch_threads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be an int >= 1, got {value!r}")
        if self.eval_freq < 0:
            raise ValueError(
                f"PPOConfig.eval_freq must be >= 0 (0 disables evaluation), got {self.eval_freq}"
            )
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(
                f"gamma must be in (0, 1] and gae_lambda in [0, 1], got {self.gamma}, {self.gae_lambda}"
            )
        if self.learning_rate <= 0 or not self.net_arch or min(self.net_arch) < 1:
            raise ValueError(
                f"learning_rate must be > 0 and net_arch non-empty positive, got {self.learning_rate}, {self.net_arch}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PPOConfig:
        """A config from a mapping of field names (unknown names raise :class:`ValueError` naming the valid ones)."""
        valid = {item.name for item in fields(cls)}
        unknown = set(values) - valid
        if unknown:
            raise ValueError(
                f"unknown PPOConfig keys {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> PPOConfig:
        """Load a ``.json`` or ``.toml`` file of field names (top-level table / object).

        :raises FileNotFoundError: if ``path`` does not exist.
        :raises ValueError: for another suffix, a malformed file or unknown keys.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                values = json.loads(text)
            elif path.suffix == ".toml":
                import tomllib

                values = tomllib.loads(text)
            else:
                raise ValueError(f"config file {str(path)!r} must end in .json or .toml")
        except (json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"cannot read config file {str(path)!r}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold an object/table of PPOConfig keys")
        return cls.from_mapping(values)

    def with_changes(self, **changes: Any) -> PPOConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: "not given on the command line")."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (enums as their values) that :meth:`from_mapping` reads back."""
        data = asdict(self)
        data["algo"] = self.algo.value
        data["vec_env"] = self.vec_env.value
        data["net_arch"] = list(self.net_arch)
        return data


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    :param run_dir: the TensorBoard run directory (also holds the models and ``config.json``).
    :param model_path: the model after the last step.
    :param best_model_path: the best model by evaluation reward, or ``None`` without evaluation.
    :param timesteps: environment steps actually trained (a multiple of ``n_steps x n_envs``).
    :param wall_s: wall-clock training time.
    :param best_eval_reward: best mean evaluation reward, or ``None`` without evaluation.
    """

    run_dir: Path
    model_path: Path
    best_model_path: Path | None
    timesteps: int
    wall_s: float
    best_eval_reward: float | None


def canonical_env_id(env_id: str) -> str:
    """``"opscale/X"`` -> ``"opscale:opscale/X"`` so ``gym.make`` imports the package first (subprocess workers)."""
    if ":" not in env_id and env_id.startswith("opscale/"):
        return f"opscale:{env_id}"
    return env_id


def run_name(config: PPOConfig, started: float) -> str:
    """``ENV__EXP__SEED__TIME`` with ``/`` and ``:`` of the env id made file-name safe.

    :param started: Unix time the run started (``TIME`` is its UTC ``YYYYmmddTHHMMSS``).
    """
    env_part = re.sub(r"[/:]+", "-", config.env_id.removeprefix("opscale:"))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    return f"{env_part}__{config.exp_name}__{config.seed}__{stamp}"


def _unique_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``... if runs started in the same second."""
    candidate, suffix = parent / name, 2
    while candidate.exists():
        candidate, suffix = parent / f"{name}-{suffix}", suffix + 1
    return candidate


def make_env(env_id: str, env_kwargs: Mapping[str, Any]) -> gym.Env:
    """``gym.make`` of the canonical id; bad ids and config keys raise :class:`ValueError`."""
    try:
        return gym.make(canonical_env_id(env_id), **dict(env_kwargs))
    except gym.error.Error as error:
        raise ValueError(f"cannot make env {env_id!r}: {error}") from None


def noop_action(env: gym.Env) -> np.ndarray | None:
    """The env's no-op action (``codec.noop()`` of the opscale envs), or ``None`` if it has none."""
    try:
        return np.asarray(env.get_wrapper_attr("codec").noop())
    except AttributeError:
        return None


def bias_towards_noop(model: Any, noop: np.ndarray, bias: float) -> None:
    """Add ``bias`` to the action head's logit of every dimension's no-op value (see ``noop_logit_bias``)."""
    import torch

    nvec = np.asarray(model.action_space.nvec)
    offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
    with torch.no_grad():
        model.policy.action_net.bias[torch.as_tensor(offsets + noop)] += bias


@contextlib.contextmanager
def small_network_torch(threads: int) -> Iterator[None]:
    """Run torch single-threaded and without distribution argument checks, then restore both.

    The networks here are tiny MLPs and a ``MultiDiscrete`` action has one categorical per dimension
    (21+), so per-step time is dominated by per-call overhead: intra-op threads only contend (on a
    loaded 2-core machine a run was 5x slower with torch's default threads), and argument validation of
    each categorical costs about a third of the policy's forward pass.
    """
    import torch

    previous_threads = torch.get_num_threads()
    previous_validate = torch.distributions.Distribution._validate_args
    torch.set_num_threads(threads)
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.distributions.Distribution.set_default_validate_args(previous_validate)


def train(config: PPOConfig, *, progress_bar: bool = False, verbose: int = 0) -> TrainResult:
    """Train a policy as ``config`` says and save it; see the module docstring for what lands where.

    :param progress_bar: show SB3's tqdm/rich progress bar.
    :param verbose: SB3 verbosity (1 prints the scalar table every rollout).
    :raises ValueError: for an unknown env id or env config key (before any training).
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecMonitor, VecNormalize

    from opscale.agents.callbacks import HParamCallback, ServingEvalCallback, ServingMetricsCallback
    from opscale.agents.evaluation import window_range
    from opscale.agents.policies import MaskableMultiDiscreteActorCriticPolicy, MultiDiscreteActorCriticPolicy

    # 1. Run directory and the exact configuration, so the run can be repeated from it.
    env_id = canonical_env_id(config.env_id)
    probe_env = make_env(env_id, config.env_kwargs)  # fail fast, in this process, on a bad id or key
    # one reset here compiles the simulator's numba kernels (or loads them from the cache) before
    # subprocess envs start: on a fresh install they would otherwise all compile at once
    probe_env.reset(seed=config.seed)
    noop = noop_action(probe_env)
    if config.hold_out_windows and config.env_kwargs.get("episode_start_s") is None:
        training_starts = window_range(probe_env, "random")
        config = replace(config, env_kwargs={**config.env_kwargs, "episode_start_s": training_starts})
    probe_env.close()
    started = time.time()
    run_dir = _unique_dir(Path(config.logdir), run_name(config, started))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")

    # 2. Environments: n_envs training copies (each seeded seed + i), one evaluation copy.
    env_fns = [lambda: make_env(env_id, config.env_kwargs) for _ in range(config.n_envs)]
    vec_env_cls = SubprocVecEnv if config.vec_env is VecEnvKind.SUBPROC else DummyVecEnv
    envs: VecEnv = VecMonitor(vec_env_cls(env_fns))  # episode statistics in raw reward units
    if config.normalize_reward:
        envs = VecNormalize(envs, norm_obs=False, norm_reward=True, gamma=config.gamma)
    envs.seed(config.seed)
    envs.action_space.seed(config.seed)
    set_random_seed(config.seed)

    # 3. The algorithm: PPO, or MaskablePPO which asks each env for action_masks() every step. Both
    # compute the MultiDiscrete distribution per group of equally sized dimensions instead of SB3's
    # (and sb3-contrib's) one categorical per dimension: over twice PPO's own speed.
    maskable = config.algo is Algo.MASKABLE_PPO
    model = (MaskablePPO if maskable else PPO)(
        MaskableMultiDiscreteActorCriticPolicy if maskable else MultiDiscreteActorCriticPolicy,
        envs,
        learning_rate=config.learning_rate,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm,
        policy_kwargs={"net_arch": {"pi": list(config.net_arch), "vf": list(config.net_arch)}},
        seed=config.seed,
        device=config.device,
        verbose=verbose,
    )
    if config.noop_logit_bias and noop is not None:
        bias_towards_noop(model, noop, config.noop_logit_bias)
    model.set_logger(configure(str(run_dir), ["tensorboard", "csv"] + (["stdout"] if verbose else [])))

    # 4. Callbacks: serving/* and reward/* scalars, hyperparameters, periodic evaluation + best model.
    callbacks: list[Any] = [
        ServingMetricsCallback(),
        HParamCallback(
            {name: value for name, value in config.to_dict().items() if not isinstance(value, (dict, list))},
            metrics=("rollout/ep_rew_mean", "serving/slo_attainment", "serving/gpus"),
        ),
    ]
    eval_callback: ServingEvalCallback | None = None
    eval_env: gym.Env | None = None
    if config.eval_freq > 0:
        eval_env = make_env(config.eval_env_id or env_id, {**config.env_kwargs, **config.eval_env_kwargs})
        eval_callback = ServingEvalCallback(
            eval_env,
            eval_freq=config.eval_freq,
            n_eval_episodes=config.n_eval_episodes,
            eval_seed=config.eval_seed,
            best_model_path=run_dir / "best_model",
        )
        callbacks.append(eval_callback)

    # 5. Train (evaluating at least once, so a best model exists) and save.
    try:
        with small_network_torch(config.torch_threads):
            model.learn(
                total_timesteps=config.total_timesteps,
                callback=CallbackList(callbacks),
                progress_bar=progress_bar,
            )
            if eval_callback is not None and eval_callback.evaluations == 0:
                eval_callback.evaluate()
        model_path = run_dir / "final_model.zip"
        model.save(model_path)
    finally:
        envs.close()
        if eval_env is not None:
            eval_env.close()
        model.logger.close()  # flushes and closes progress.csv and the TensorBoard writer
    best_path = run_dir / "best_model.zip"
    return TrainResult(
        run_dir=run_dir,
        model_path=model_path,
        best_model_path=best_path if best_path.is_file() else None,
        timesteps=int(model.num_timesteps),
        wall_s=time.time() - started,
        best_eval_reward=None if eval_callback is None else eval_callback.best_mean_reward,
    )
