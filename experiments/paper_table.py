"""The paper's experiment: model-level vs operator-level vs PPO autoscaling, as tables, plots and TensorBoard.

arXiv 2511.02248 reports that operator-level autoscaling keeps the SLO with up to 40 % fewer GPUs and
35 % less energy than model-level autoscaling, or serves 1.6x the throughput on a fixed GPU budget.
:func:`run_paper_table` measures the same comparison on our simulator, per case (model x GPU x trace):

1. **PPO**: trained on ``opscale/OperatorAutoscale-fast-v0`` (the fluid fidelity) with the case's
   configuration through :func:`opscale.agents.ppo.train` (its TensorBoard run lands in
   ``OUT/tensorboard/train``), on another realisation (``trace_seed``) of generated traces than the
   evaluation's, unless a saved model is given (``ppo_model``).
2. **Matched-load comparison**: every policy runs on the **DES** fidelity (the truth) through the
   evaluation harness (:func:`opscale.agents.evaluation.evaluate`) on the same seeds, i.e. the same
   held-out trace windows and arrivals (paired): average and peak GPUs, energy, SLO attainment, TTFT
   and TBT p99 (whole-window figures from the simulator's run summary).
   ``static`` (peak provisioning, planned offline from the window's trace, so it knows the peak) and
   ``model-level`` (HPA-style target tracking) scale whole model
   instances on ``opscale/ModelAutoscale-v0``; ``operator-greedy`` (the paper's planner) and ``ppo``
   scale operators on ``opscale/OperatorAutoscale-v0``. Both envs run the same engine.
3. **Throughput at a fixed GPU budget**: the cluster is cut to ``budget_num_nodes`` nodes and the
   trace's request rate is multiplied by a scale found by bisection (:func:`max_sustainable_scale`):
   the largest scale at which the policy's SLO attainment over one held-out window stays at or above
   ``slo_threshold`` (default 0.9). PPO's observation rate scale is pinned to the unscaled trace so it
   *sees* the extra load (clipped at 4x its training peak, the observation's bound). Reported as
   requests/s actually offered in that window.

Savings are computed against ``model-level``: ``1 - x / x_model_level`` for GPUs and energy, and
``rate / rate_model_level`` for throughput; a saving only counts as "at matched SLO" when the policy's
SLO attainment is no more than ``slo_match_tolerance`` below model-level's (:mod:`.paper_table_report`
writes the tables and the paragraph that compares them with the paper's claims).

``quick`` mode (:meth:`PaperTableConfig.quick`) uses the embedded default workload (no data files),
one model on one GPU type, short windows and a short PPO run, and is meant to finish in minutes on
two CPU cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from opscale.agents.evaluation import EvaluationResult

__all__ = [
    "Bisection",
    "Case",
    "CaseResult",
    "PaperPolicy",
    "PaperTableConfig",
    "PaperTableResult",
    "PolicyResult",
    "max_sustainable_scale",
    "run_paper_table",
    "savings",
]


class PaperPolicy(str, Enum):
    """The policies of the table, in column order."""

    STATIC = "static"
    MODEL_LEVEL = "model-level"
    MODEL_LEVEL_PLANNER = "model-level-planner"
    OPERATOR_GREEDY = "operator-greedy"
    PPO = "ppo"


#: The environment each policy acts on (DES fidelity for evaluation).
POLICY_ENV_IDS: dict[PaperPolicy, str] = {
    PaperPolicy.STATIC: "opscale/ModelAutoscale-v0",
    PaperPolicy.MODEL_LEVEL: "opscale/ModelAutoscale-v0",
    PaperPolicy.MODEL_LEVEL_PLANNER: "opscale/ModelAutoscale-v0",
    PaperPolicy.OPERATOR_GREEDY: "opscale/OperatorAutoscale-v0",
    PaperPolicy.PPO: "opscale/OperatorAutoscale-v0",
}
#: Where PPO trains: the same operator-level env on the fluid fidelity.
PPO_TRAIN_ENV_ID = "opscale/OperatorAutoscale-fast-v0"
#: The baseline every saving is measured against.
BASELINE = PaperPolicy.MODEL_LEVEL


@dataclass(frozen=True)
class Case:
    """One row group of the table: a model served on a GPU type under a trace."""

    model: str
    gpu: str
    trace: str

    @property
    def slug(self) -> str:
        """File-name-safe identifier ``model__gpu__trace``."""
        return f"{self.model}__{self.gpu}__{self.trace}".replace("/", "-")


@dataclass(frozen=True)
class PaperTableConfig:
    """What :func:`run_paper_table` runs (defaults: the full experiment; see :meth:`quick`).

    :param models: model catalog names.
    :param gpus: GPU catalog names.
    :param traces: trace names (``"default"`` is the embedded workload, needing no file).
    :param policies: policies to compare (``model-level`` is always needed, as the baseline).
    :param out_dir: where tables, plots, evaluations and TensorBoard runs go.
    :param ppo_model: a saved PPO / MaskablePPO model used for every case instead of training.
    :param ppo_algo: ``"ppo"`` or ``"maskable-ppo"`` when training.
    :param ppo_timesteps: training steps per case (fluid fidelity).
    :param ppo_n_envs: parallel training envs.
    :param ppo_train_horizon: decisions per training episode.
    :param ppo_chain_actions: train and evaluate PPO with the operator-level env's chain dimension
        (``chain_actions``: one choice adds or removes a co-located chain), the other policies as before.
    :param num_nodes: cluster size (8-GPU nodes) of the matched-load comparison.
    :param model_num_nodes: per model, a cluster size replacing ``num_nodes`` (models whose default
        deployment does not fit ``num_nodes``).
    :param horizon: decisions per evaluation episode (``control_interval_s`` each).
    :param control_interval_s: seconds between decisions.
    :param eval_seeds: reset seeds of the evaluation episodes (the pairing key across policies).
    :param trace_rate_scales: per trace, a factor on its request rate for the whole experiment (e.g. to
        bring a ServeGen trace of ~200 req/s to a cluster-sized load); absent traces use 1.
    :param budget_num_nodes: the fixed GPU budget (8-GPU nodes) of the throughput comparison; ``None``
        per model: the nodes the model-level default deployment of the unscaled trace occupies.
    :param throughput_horizon: decisions per bisection probe.
    :param slo_threshold: SLO attainment a probe must reach to count as sustained.
    :param bisection_probes: probes per policy and case (the first doubles/halves from scale 1).
    :param max_rate_scale: largest rate multiplier tried.
    :param slo_match_tolerance: SLO attainment a policy may lose against model-level and still count
        as "at matched SLO".
    :param seed: PPO training seed.
    :param progress: show a tqdm progress bar.
    """

    models: tuple[str, ...] = ("qwen2-7b", "qwen2-57b-a14b", "llama-2-70b")
    gpus: tuple[str, ...] = ("a100", "h100")
    traces: tuple[str, ...] = ("azure-conv", "azure-code", "servegen-m-large")
    policies: tuple[PaperPolicy, ...] = tuple(PaperPolicy)
    out_dir: Path = Path("results/paper-table")
    ppo_model: Path | None = None
    ppo_algo: str = "maskable-ppo"
    ppo_timesteps: int = 50_000
    ppo_n_envs: int = 4
    ppo_train_horizon: int = 60
    ppo_chain_actions: bool = False
    num_nodes: int = 2
    model_num_nodes: Mapping[str, int] = field(default_factory=lambda: {"llama-2-70b": 6})
    horizon: int = 120
    control_interval_s: float = 5.0
    eval_seeds: tuple[int, ...] = (1000, 1001, 1002)
    trace_rate_scales: Mapping[str, float] = field(default_factory=lambda: {"servegen-m-large": 0.05})
    budget_num_nodes: int | None = None
    throughput_horizon: int = 60
    slo_threshold: float = 0.9
    bisection_probes: int = 6
    max_rate_scale: float = 16.0
    slo_match_tolerance: float = 0.01
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        valid = ", ".join(p.value for p in PaperPolicy)
        unknown = [p for p in self.policies if p not in {*PaperPolicy, *valid.split(", ")}]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; valid: {valid}")
        object.__setattr__(self, "policies", tuple(PaperPolicy(p) for p in self.policies))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.ppo_model is not None:
            object.__setattr__(self, "ppo_model", Path(self.ppo_model))
        if BASELINE not in self.policies:
            raise ValueError(
                f"policies must include the baseline {BASELINE.value!r}, got {[p.value for p in self.policies]}"
            )
        for name in ("models", "gpus", "traces", "eval_seeds"):
            if not getattr(self, name):
                raise ValueError(f"PaperTableConfig.{name} must not be empty")
        if not 0 < self.slo_threshold <= 1:
            raise ValueError(f"slo_threshold must be in (0, 1], got {self.slo_threshold}")
        if self.bisection_probes < 1 or self.max_rate_scale <= 1:
            raise ValueError(
                f"bisection_probes must be >= 1 and max_rate_scale > 1, got {self.bisection_probes}, {self.max_rate_scale}"
            )

    @classmethod
    def quick(cls, **changes: Any) -> PaperTableConfig:
        """The ``--quick`` configuration: embedded workload, Qwen2-7B on A100, short windows, short PPO run.

        Sized to finish in a few minutes on 2 CPU cores (see the report for a measured time).
        """
        quick = cls(
            models=("qwen2-7b",),
            gpus=("a100",),
            traces=("default",),
            ppo_timesteps=8192,
            ppo_n_envs=2,
            ppo_train_horizon=24,
            horizon=24,
            eval_seeds=(1000, 1001, 1002),
            throughput_horizon=24,
            budget_num_nodes=1,
            bisection_probes=6,
            max_rate_scale=16.0,
        )
        return replace(quick, **changes)

    def cases(self) -> list[Case]:
        """Every model x GPU x trace combination, in that nesting order."""
        return [
            Case(model, gpu, trace) for model in self.models for gpu in self.gpus for trace in self.traces
        ]

    def env_config(
        self, case: Case, *, horizon: int | None = None, policy: PaperPolicy | None = None
    ) -> dict[str, Any]:
        """The environment configuration of ``case`` (shared by every policy and by PPO training; PPO's
        adds ``chain_actions`` when :attr:`ppo_chain_actions` is set)."""
        config: dict[str, Any] = {
            "model": case.model,
            "gpu": case.gpu,
            "trace": case.trace,
            "num_nodes": self.model_num_nodes.get(case.model, self.num_nodes),
            "horizon": horizon or self.horizon,
            "control_interval_s": self.control_interval_s,
            "trace_rate_scale": float(self.trace_rate_scales.get(case.trace, 1.0)),
        }
        if policy is PaperPolicy.PPO and self.ppo_chain_actions:
            config["chain_actions"] = True
        return config


@dataclass(frozen=True)
class Bisection:
    """Result of :func:`max_sustainable_scale`.

    :param scale: the largest probed scale that sustained the SLO (0 if none did).
    :param probes: every ``(scale, slo_attainment)`` probed, in order (attainment NaN: the run could not
        start because the environment's starting deployment for that load does not fit the budget).
    :param capped: the search hit ``max_scale`` while still sustaining (the true maximum is higher).
    """

    scale: float
    probes: tuple[tuple[float, float], ...]
    capped: bool


def max_sustainable_scale(
    attainment_at: Callable[[float], float],
    threshold: float,
    probes: int,
    max_scale: float,
    start: float = 1.0,
) -> Bisection:
    """Largest rate scale whose SLO attainment is ``>= threshold``, assuming attainment falls with load.

    Doubles from ``start`` while the SLO holds (halves while it does not) until the two sides are
    bracketed, then bisects geometrically; every call of ``attainment_at`` counts as one of ``probes``.
    The answer is the largest *sustained* probe, so it errs low by at most the final bracket's ratio.
    Attainment measured on one window is noisy, so a non-monotone probe sequence is possible; the
    search then keeps the largest sustained probe below the first failure.

    :param attainment_at: scale -> SLO attainment of a run at that scale.
    :param threshold: attainment needed to count as sustained.
    :param probes: evaluations allowed (>= 1).
    :param max_scale: largest scale tried.
    :param start: first scale tried.
    """
    if probes < 1 or not 0 < start <= max_scale:
        raise ValueError(f"need probes >= 1 and 0 < start <= max_scale, got {probes}, {start}, {max_scale}")
    history: list[tuple[float, float]] = []
    low, high = 0.0, math.inf  # largest sustained, smallest failed

    def probe(scale: float) -> bool:
        attainment = float(attainment_at(scale))
        history.append((scale, attainment))
        return attainment >= threshold

    scale = start
    while len(history) < probes:
        if probe(scale):
            low = max(low, scale)
        else:
            high = min(high, scale)
        if math.isinf(high):
            if low >= max_scale:
                break
            scale = min(2.0 * low, max_scale)
        elif low == 0.0:
            scale = high / 2.0
        else:
            scale = math.sqrt(low * high)
    return Bisection(scale=low, probes=tuple(history), capped=math.isinf(high) and low >= max_scale)


@dataclass
class PolicyResult:
    """One policy on one case.

    :param evaluation: the DES evaluation at matched load (per-episode figures and series).
    :param throughput: the fixed-budget bisection, or ``None`` when it was skipped.
    :param max_rate_per_s: request rate offered at the largest sustained scale (0 if none).
    :param budget_gpus: the GPU budget of the throughput comparison.
    """

    policy: PaperPolicy
    env_id: str
    evaluation: EvaluationResult
    throughput: Bisection | None = None
    max_rate_per_s: float = 0.0
    budget_gpus: int = 0

    def mean(self, metric: str) -> float:
        """Mean of an :data:`opscale.agents.evaluation.EPISODE_METRICS` field over the episodes."""
        return self.evaluation.summary[metric].mean


@dataclass
class CaseResult:
    """Every policy on one case, plus where PPO came from."""

    case: Case
    policies: dict[PaperPolicy, PolicyResult]
    ppo_model: Path | None = None
    ppo_train_wall_s: float = 0.0
    ppo_timesteps: int = 0


@dataclass
class PaperTableResult:
    """What :func:`run_paper_table` produced, and the files it wrote."""

    config: PaperTableConfig
    cases: list[CaseResult]
    files: dict[str, Path]
    wall_s: float


class _Progress:
    """A tqdm bar over the experiment's tasks (or nothing), with the current task as its description."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="paper-table", unit="task", dynamic_ncols=True)

    @contextmanager
    def task(self, description: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description_str(description)
        yield
        if self.bar is not None:
            self.bar.update(1)

    def skip(self, tasks: int) -> None:
        """Count ``tasks`` planned tasks that turned out unnecessary (a bisection that stopped early)."""
        if self.bar is not None and tasks > 0:
            self.bar.update(tasks)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_ppo(config: PaperTableConfig, case: Case) -> tuple[Path, float, int]:
    """Train PPO on the fluid fidelity for ``case``; returns ``(best model, wall s, timesteps)``."""
    from opscale.agents.evaluation import make_env
    from opscale.agents.ppo import PPOConfig, train
    from opscale.agents.registry import make_policy

    # Another realisation (``trace_seed``) of a generated trace (embedded default, ServeGen arrivals) than the
    # evaluation's; training windows also end before the held-out tail (``PPOConfig.hold_out_windows``).
    env_kwargs: dict[str, Any] = {
        **config.env_config(case, horizon=config.ppo_train_horizon, policy=PaperPolicy.PPO),
        "trace_seed": config.seed + 1,
    }
    # PPO starts where operator-greedy starts (the planner's deployment for the trace's mean rate), in
    # training and in evaluation (``start_from``), so the comparison measures control, not the start
    probe = make_env(PPO_TRAIN_ENV_ID, fidelity=None, env_config=env_kwargs)
    try:
        start = make_policy(PaperPolicy.OPERATOR_GREEDY.value, probe).initial_deployment()
    finally:
        probe.close()
    if start is not None:
        env_kwargs["initial_deployment"] = start.to_dict()
    rollout = 128
    ppo_config = PPOConfig(
        env_id=PPO_TRAIN_ENV_ID,
        exp_name=f"paper-{case.slug}",
        algo=config.ppo_algo,  # a string: PPOConfig converts and checks it
        total_timesteps=config.ppo_timesteps,
        n_envs=config.ppo_n_envs,
        seed=config.seed,
        n_steps=rollout,
        batch_size=min(256, rollout * config.ppo_n_envs),
        eval_freq=max(config.ppo_timesteps // 4, rollout * config.ppo_n_envs),
        n_eval_episodes=1,
        env_kwargs=env_kwargs,
        logdir=str(config.out_dir / "tensorboard" / "train"),
    )
    result = train(ppo_config)
    return result.best_model_path or result.model_path, result.wall_s, result.timesteps


def _peak_rate_per_s(env_config: Mapping[str, Any]) -> float:
    """Peak per-interval arrival rate of the case's (unscaled-budget) trace: the observation's rate scale."""
    from opscale.agents.evaluation import make_env

    env = make_env(POLICY_ENV_IDS[BASELINE], fidelity="des", env_config=env_config)
    try:
        base = env.unwrapped
        _, rates = base.trace.rate_curve(base.control_interval_s)
        return max(float(rates.max()), 1e-6)
    finally:
        env.close()


def _policy_spec(policy: PaperPolicy, ppo_model: Path | None) -> str:
    if policy is PaperPolicy.PPO:
        if ppo_model is None:
            raise ValueError("PPO needs a trained model")
        return str(ppo_model)
    return policy.value


def _policy_kwargs(policy: PaperPolicy) -> dict[str, Any] | None:
    """PPO starts from operator-greedy's deployment (see :func:`_train_ppo`); heuristics need nothing."""
    return {"start_from": PaperPolicy.OPERATOR_GREEDY.value} if policy is PaperPolicy.PPO else None


def _budget_nodes(config: PaperTableConfig, model_level_peak_gpus: int) -> int:
    """The throughput comparison's nodes: configured, or the nodes model-level peaked at."""
    if config.budget_num_nodes is not None:
        return config.budget_num_nodes
    return max(1, math.ceil(model_level_peak_gpus / 8))


def _throughput(
    config: PaperTableConfig,
    case: Case,
    policy: PaperPolicy,
    spec: str,
    budget_nodes: int,
    rate_scale_per_s: float,
    progress: _Progress,
) -> tuple[Bisection, float]:
    """Bisect the trace's rate scale at ``budget_nodes`` nodes; returns the search and the sustained rate."""
    from opscale.agents.evaluation import evaluate

    base_config = config.env_config(case, horizon=config.throughput_horizon, policy=policy)
    base_scale = float(base_config["trace_rate_scale"])
    offered: dict[float, float] = {}

    def attainment_at(scale: float) -> float:
        with progress.task(f"{case.slug}: {policy.value} x{scale:.2f} on {budget_nodes * 8} GPUs"):
            env_config = {
                **base_config,
                "num_nodes": budget_nodes,
                "trace_rate_scale": base_scale * scale,
                # PPO's observation scale stays that of its training trace, so the load it sees rises with the
                # scale; heuristics read physical values, and the env default (this trace's peak) never clips
                "rate_scale_per_s": rate_scale_per_s if policy is PaperPolicy.PPO else None,
            }
            try:
                result = evaluate(
                    spec,
                    POLICY_ENV_IDS[policy],
                    seeds=config.eval_seeds[:1],
                    env_config=env_config,
                    windows="held-out",
                    policy_kwargs=_policy_kwargs(policy),
                )
            except ValueError as error:
                if "deployment" not in str(error):
                    raise
                # the env's starting deployment for this load does not fit the budget: not sustained
                return math.nan
        episode = result.episodes[0]
        window_s = (episode.steps + 1) * config.control_interval_s  # + the env's one warm-up interval
        offered[scale] = episode.requests / window_s
        return episode.slo_attainment

    bisection = max_sustainable_scale(
        attainment_at, config.slo_threshold, config.bisection_probes, config.max_rate_scale
    )
    progress.skip(config.bisection_probes - len(bisection.probes))
    return bisection, offered.get(bisection.scale, 0.0)


def _run_case(config: PaperTableConfig, case: Case, progress: _Progress) -> CaseResult:
    from opscale.agents.evaluation import evaluate

    result = CaseResult(case=case, policies={})
    if PaperPolicy.PPO in config.policies:
        if config.ppo_model is not None:
            result.ppo_model = config.ppo_model
        else:
            with progress.task(f"{case.slug}: training PPO ({config.ppo_timesteps} steps, fluid)"):
                result.ppo_model, result.ppo_train_wall_s, result.ppo_timesteps = _train_ppo(config, case)
    env_config = config.env_config(case)
    for policy in config.policies:
        spec = _policy_spec(policy, result.ppo_model)
        with progress.task(
            f"{case.slug}: evaluating {policy.value} (DES, {len(config.eval_seeds)} episodes)"
        ):
            evaluation = evaluate(
                spec,
                POLICY_ENV_IDS[policy],
                seeds=config.eval_seeds,
                env_config=config.env_config(case, policy=policy),
                windows="held-out",
                out_dir=config.out_dir / "evaluations" / case.slug / policy.value,
                policy_kwargs=_policy_kwargs(policy),
            )
        evaluation.policy = policy.value
        result.policies[policy] = PolicyResult(policy, POLICY_ENV_IDS[policy], evaluation)
    budget_nodes = _budget_nodes(config, int(result.policies[BASELINE].mean("gpus_peak")))
    rate_scale_per_s = _peak_rate_per_s(env_config)
    for policy, policy_result in result.policies.items():
        spec = _policy_spec(policy, result.ppo_model)
        bisection, rate = _throughput(config, case, policy, spec, budget_nodes, rate_scale_per_s, progress)
        policy_result.throughput, policy_result.max_rate_per_s, policy_result.budget_gpus = (
            bisection,
            rate,
            budget_nodes * 8,
        )
    return result


def run_paper_table(config: PaperTableConfig, command: str = "") -> PaperTableResult:
    """Run the experiment and write its outputs under ``config.out_dir`` (see the module docstring).

    :param command: the command line that ran it, quoted in the Markdown report.
    :raises ValueError: for an unknown model, GPU, trace or policy, or an unusable ``ppo_model``.
    :raises FileNotFoundError: for a trace file or ``ppo_model`` that does not exist.
    """
    from opscale.agents.evaluation import make_env
    from opscale.experiments.paper_table_report import write_outputs

    started = time.perf_counter()
    if config.ppo_model is not None and not config.ppo_model.is_file():
        raise FileNotFoundError(f"--ppo-model {str(config.ppo_model)!r} not found")
    cases = config.cases()
    for case in cases:  # fail fast on a bad name or a trace shorter than an episode, before any training
        make_env(POLICY_ENV_IDS[BASELINE], fidelity="des", env_config=config.env_config(case)).close()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    tasks_per_case = len(config.policies) * (1 + config.bisection_probes) + int(
        PaperPolicy.PPO in config.policies and config.ppo_model is None
    )
    progress = _Progress(len(cases) * tasks_per_case, config.progress)
    try:
        results = [_run_case(config, case, progress) for case in cases]
    finally:
        progress.close()
    wall_s = time.perf_counter() - started
    files = write_outputs(config, results, command=command, wall_s=wall_s)
    return PaperTableResult(config=config, cases=results, files=files, wall_s=wall_s)


def savings(case_result: CaseResult, policy: PaperPolicy) -> dict[str, float]:
    """``gpu_saving``, ``energy_saving`` (fractions) and ``throughput_ratio`` of ``policy`` vs model-level."""
    baseline = case_result.policies[BASELINE]
    mine = case_result.policies[policy]

    def saving(metric: str) -> float:
        reference = baseline.mean(metric)
        return 1.0 - mine.mean(metric) / reference if reference > 0 else float("nan")

    ratio = mine.max_rate_per_s / baseline.max_rate_per_s if baseline.max_rate_per_s > 0 else float("nan")
    return {
        "gpu_saving": saving("gpus_mean"),
        "energy_saving": saving("energy_kwh"),
        "throughput_ratio": ratio,
        "slo_delta": mine.mean("slo_attainment") - baseline.mean("slo_attainment"),
    }
