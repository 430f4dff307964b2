"""Cost-model calibration data and scoring against the Vidur operator profiles.

Turns the profile tables (:class:`~opscale.sim.profile_table.VidurProfiles`) into *observation sets*:
measured times of one operator on one GPU together with a function that predicts the same rows
from a :class:`~opscale.sim.costmodel_coefficients.GpuCoefficients`. The fit script
(``experiments/calibrate_costmodel.py``) minimises the relative error of those predictions; the
``opscale costmodel validate`` command and the tests score them. Both therefore evaluate exactly the
formulas the simulator runs (:mod:`opscale.sim.costmodel_roofline`).

Operators scored (per layer, per TP worker, as profiled):

* GEMMs ``qkv_proj``, ``o_proj``, ``ffn_up``, ``ffn_down`` (the TP all-reduce is not in the profile);
* elementwise kernels ``input_layernorm``, ``post_attention_layernorm``, ``attn_rope``, ``mlp_act``,
  ``add`` and ``embed``;
* ``layer_sum``: all the above per layer except ``embed`` (what one layer's non-attention work costs);
* ``attention_prefill``, ``attention_decode`` (A100 legacy table only);
* ``all_reduce`` / ``send_recv`` within a node and ``*_cross_node``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opscale.paths import reference_dir
from opscale.sim.costmodel_api import AttentionBatch, CostModel
from opscale.sim.costmodel_coefficients import ELEMENTWISE_KERNELS, GpuCoefficients
from opscale.sim.costmodel_roofline import (
    allreduce_time_s,
    decode_attention_time_s,
    elementwise_time_s,
    gemm_time_s,
    prefill_attention_time_s,
    send_recv_time_s,
)
from opscale.sim.hardware import GPUSpec, get_gpu
from opscale.sim.models import MODEL_CATALOG, ModelSpec, UnitKind, get_model
from opscale.sim.power import PowerModel
from opscale.sim.profile_table import VidurProfiles, read_vidur_csv

__all__ = [
    "GEMM_OPERATORS",
    "HELD_OUT_MODEL",
    "ObservationSet",
    "ValidationRow",
    "build_observations",
    "default_profiles_dir",
    "model_for_attention_shape",
    "model_for_mlp_shape",
    "score",
    "table_interpolation_rows",
    "validate",
]

#: Where the Vidur profiles sit below :func:`opscale.paths.reference_dir`.
VIDUR_PROFILES_SUBDIR = Path("vidur_profiles") / "data" / "profiling"

#: The model left out of the held-out fit and scored on it.
HELD_OUT_MODEL = "codellama-34b"

#: GEMM operators: name -> (Vidur column, unit, index of the GEMM in ``ModelSpec.gemms``).
GEMM_OPERATORS: Mapping[str, tuple[str, UnitKind, int]] = {
    "qkv_proj": ("attn_pre_proj", UnitKind.QKV_PROJ, 0),
    "o_proj": ("attn_post_proj", UnitKind.O_PROJ, 0),
    "ffn_up": ("mlp_up_proj", UnitKind.FFN, 0),
    "ffn_down": ("mlp_down_proj", UnitKind.FFN, 1),
}

#: Observation kinds (which coefficient group an operator belongs to).
KIND_GEMM, KIND_ELEMENTWISE, KIND_LAYER, KIND_ATTENTION, KIND_NETWORK = (
    "gemm",
    "elementwise",
    "layer",
    "attention",
    "network",
)


def default_profiles_dir() -> Path:
    """``reference_dir()/vidur_profiles/data/profiling``."""
    return reference_dir() / VIDUR_PROFILES_SUBDIR


def model_for_mlp_shape(shape: tuple[int, int, int, int]) -> ModelSpec:
    """The dense catalog model with (heads, KV heads, hidden, FFN) = ``shape``.

    :raises ValueError: when no catalog model has that shape.
    """
    for model in MODEL_CATALOG.values():
        if (
            not model.is_moe
            and model.vision is None
            and (
                model.num_heads,
                model.num_kv_heads,
                model.hidden_size,
                model.ffn_size,
            )
            == shape
        ):
            return model
    raise ValueError(f"no catalog model with (heads, kv_heads, hidden, ffn) = {shape}")


def model_for_attention_shape(shape: tuple[int, int, int]) -> ModelSpec:
    """The first dense catalog model with (hidden, heads, KV heads) = ``shape``.

    :raises ValueError: when no catalog model has that shape.
    """
    for model in MODEL_CATALOG.values():
        if not model.is_moe and (model.hidden_size, model.num_heads, model.num_kv_heads) == shape:
            return model
    raise ValueError(f"no catalog model with (hidden, heads, kv_heads) = {shape}")


Predictor = Callable[[GpuCoefficients], np.ndarray]


@dataclass(frozen=True)
class ObservationSet:
    """Measured times of one operator on one GPU and the model's prediction of the same rows.

    :param gpu: GPU name.
    :param operator: operator name (see the module docstring).
    :param kind: coefficient group (``gemm``, ``elementwise``, ``layer``, ``attention``, ``network``).
    :param models: model name per row (``""`` for collectives).
    :param measured_s: measured time per row, s.
    :param predict: coefficients -> predicted time per row, s.
    """

    gpu: str
    operator: str
    kind: str
    models: np.ndarray
    measured_s: np.ndarray
    predict: Predictor

    def relative_errors(self, coefficients: GpuCoefficients, mask: np.ndarray | None = None) -> np.ndarray:
        """``(predicted - measured) / measured`` per row (optionally only the rows in ``mask``)."""
        errors = (self.predict(coefficients) - self.measured_s) / self.measured_s
        return errors if mask is None else errors[mask]


def _concat(parts: Sequence[Predictor]) -> Predictor:
    def predict(coefficients: GpuCoefficients) -> np.ndarray:
        return np.concatenate([part(coefficients) for part in parts])

    return predict


def _gemm_predictor(model: ModelSpec, operator: str, tp: int, tokens: np.ndarray, gpu: GPUSpec) -> Predictor:
    _, unit, index = GEMM_OPERATORS[operator]
    shape = model.gemms(unit, tp)[index]
    return lambda c: gemm_time_s(shape, tokens, gpu, c.gemm, model.dtype_bytes)


def _elementwise_predictor(
    model: ModelSpec, kernel: str, tp: int, tokens: np.ndarray, gpu: GPUSpec
) -> Predictor:
    if kernel == "embed":
        per_token = 2.0 * model.hidden_size * model.dtype_bytes
        return lambda c: elementwise_time_s(per_token, tokens, gpu, c.embedding)
    per_token = model.elementwise_bytes_per_token(tp)[kernel]
    return lambda c: elementwise_time_s(per_token, tokens, gpu, c.elementwise[kernel])


def _layer_predictor(model: ModelSpec, tp: int, tokens: np.ndarray, gpu: GPUSpec) -> Predictor:
    parts = [_gemm_predictor(model, op, tp, tokens, gpu) for op in GEMM_OPERATORS]
    parts += [_elementwise_predictor(model, kernel, tp, tokens, gpu) for kernel in ELEMENTWISE_KERNELS]

    def predict(coefficients: GpuCoefficients) -> np.ndarray:
        return np.sum([part(coefficients) for part in parts], axis=0)

    return predict


def _mlp_observations(profiles: VidurProfiles) -> list[ObservationSet]:
    """GEMM, elementwise and per-layer-sum sets, one per (GPU, operator)."""
    vidur_column = {op: column for op, (column, _, _) in GEMM_OPERATORS.items()}
    vidur_column.update({kernel: kernel for kernel in ELEMENTWISE_KERNELS})
    vidur_column["embed"] = "emb"
    kinds = {op: KIND_GEMM for op in GEMM_OPERATORS} | {
        op: KIND_ELEMENTWISE for op in (*ELEMENTWISE_KERNELS, "embed")
    }
    blocks: dict[tuple[str, str], list[tuple[str, np.ndarray, Predictor]]] = {}
    for (gpu_name, shape, tp), curves in sorted(profiles.mlp.items()):
        gpu = get_gpu(gpu_name)
        model = model_for_mlp_shape(shape)
        for operator, column in vidur_column.items():
            curve = curves[column]
            if kinds[operator] == KIND_GEMM:
                predictor = _gemm_predictor(model, operator, tp, curve.x, gpu)
            else:
                predictor = _elementwise_predictor(model, operator, tp, curve.x, gpu)
            blocks.setdefault((gpu_name, operator), []).append((model.name, curve.y, predictor))
        tokens = curves["attn_pre_proj"].x
        layer_columns = [vidur_column[op] for op in (*GEMM_OPERATORS, *ELEMENTWISE_KERNELS)]
        if all(np.array_equal(curves[column].x, tokens) for column in layer_columns):
            measured = np.sum([curves[column].y for column in layer_columns], axis=0)
            predictor = _layer_predictor(model, tp, tokens, gpu)
            blocks.setdefault((gpu_name, "layer_sum"), []).append((model.name, measured, predictor))
    kinds["layer_sum"] = KIND_LAYER
    sets = []
    for (gpu_name, operator), parts in blocks.items():
        sets.append(
            ObservationSet(
                gpu=gpu_name,
                operator=operator,
                kind=kinds[operator],
                models=np.concatenate([np.full(len(y), name) for name, y, _ in parts]),
                measured_s=np.concatenate([y for _, y, _ in parts]),
                predict=_concat([p for _, _, p in parts]),
            )
        )
    return sets


def _attention_observations(profiles: VidurProfiles) -> list[ObservationSet]:
    sets = []
    for (gpu_name, shape, tp), grid in sorted(profiles.attention_prefill.items()):
        gpu, model = get_gpu(gpu_name), model_for_attention_shape(shape)
        chunk = np.concatenate([np.full(len(c.x), o) for o, c in zip(grid.outer, grid.curves, strict=True)])
        prior = np.concatenate([c.x for c in grid.curves])
        measured = np.concatenate([c.y for c in grid.curves])
        pairs = chunk * prior + chunk * (chunk + 1) / 2
        ones = np.ones_like(chunk)

        def predict_prefill(
            c: GpuCoefficients,
            model: ModelSpec = model,
            gpu: GPUSpec = gpu,
            tp: int = tp,
            chunk: np.ndarray = chunk,
            pairs: np.ndarray = pairs,
            ones: np.ndarray = ones,
        ) -> np.ndarray:
            return prefill_attention_time_s(model, gpu, tp, c.attention, chunk, pairs, ones)

        sets.append(
            ObservationSet(
                gpu_name,
                "attention_prefill",
                KIND_ATTENTION,
                np.full(len(chunk), model.name),
                measured,
                predict_prefill,
            )
        )
    for (gpu_name, shape, tp), grid in sorted(profiles.attention_decode.items()):
        gpu, model = get_gpu(gpu_name), model_for_attention_shape(shape)
        batch = np.concatenate([np.full(len(c.x), o) for o, c in zip(grid.outer, grid.curves, strict=True)])
        context = np.concatenate([c.x for c in grid.curves])
        measured = np.concatenate([c.y for c in grid.curves])

        def predict_decode(
            c: GpuCoefficients,
            model: ModelSpec = model,
            gpu: GPUSpec = gpu,
            tp: int = tp,
            batch: np.ndarray = batch,
            context: np.ndarray = context,
        ) -> np.ndarray:
            return decode_attention_time_s(model, gpu, tp, c.attention, batch, batch * context)

        sets.append(
            ObservationSet(
                gpu_name,
                "attention_decode",
                KIND_ATTENTION,
                np.full(len(batch), model.name),
                measured,
                predict_decode,
            )
        )
    return sets


def _network_observations(profiles: VidurProfiles) -> list[ObservationSet]:
    grouped: dict[tuple[str, str], list[tuple[np.ndarray, Predictor]]] = {}
    for (gpu_name, workers, per_node), curve in sorted(profiles.all_reduce.items()):
        cross = per_node < workers
        operator = "all_reduce_cross_node" if cross else "all_reduce"

        def predict_all_reduce(
            c: GpuCoefficients, workers: int = workers, sizes: np.ndarray = curve.x, cross: bool = cross
        ) -> np.ndarray:
            return allreduce_time_s(c.collectives, workers, sizes, cross_node=cross)

        grouped.setdefault((gpu_name, operator), []).append((curve.y, predict_all_reduce))
    for (gpu_name, cross), curve in sorted(profiles.send_recv.items()):
        operator = "send_recv_cross_node" if cross else "send_recv"

        def predict_send_recv(
            c: GpuCoefficients, sizes: np.ndarray = curve.x, cross: bool = cross
        ) -> np.ndarray:
            return send_recv_time_s(c.collectives, sizes, cross_node=cross)

        grouped.setdefault((gpu_name, operator), []).append((curve.y, predict_send_recv))
    return [
        ObservationSet(
            gpu=gpu_name,
            operator=operator,
            kind=KIND_NETWORK,
            models=np.full(sum(len(y) for y, _ in parts), ""),
            measured_s=np.concatenate([y for y, _ in parts]),
            predict=_concat([p for _, p in parts]),
        )
        for (gpu_name, operator), parts in grouped.items()
    ]


def build_observations(profiles: VidurProfiles) -> list[ObservationSet]:
    """Every observation set the profiles support (see the module docstring)."""
    return [
        *_mlp_observations(profiles),
        *_attention_observations(profiles),
        *_network_observations(profiles),
    ]


@dataclass(frozen=True)
class ValidationRow:
    """Error of the cost model on one (GPU, operator, scope) group of profile rows.

    :param scope: ``in-sample`` (fitted coefficients, all rows), ``held-out`` (coefficients fitted
        without :data:`HELD_OUT_MODEL`, scored on it), ``in-sample-34b`` (fitted coefficients on the
        same held-out rows, the comparison point) or ``table-interp`` (the profile-table backend on
        left-out profile points, see :func:`table_interpolation_rows`).
    """

    gpu: str
    operator: str
    scope: str
    count: int
    mape: float
    p90_ape: float
    max_ape: float


def score(
    observations: ObservationSet, coefficients: GpuCoefficients, mask: np.ndarray | None = None
) -> tuple[int, float, float, float]:
    """(count, MAPE, p90 APE, max APE) of ``coefficients`` on the rows of ``observations`` (in ``mask``)."""
    errors = np.abs(observations.relative_errors(coefficients, mask))
    if errors.size == 0:
        return 0, float("nan"), float("nan"), float("nan")
    return int(errors.size), float(errors.mean()), float(np.quantile(errors, 0.9)), float(errors.max())


def validate(
    observations: Sequence[ObservationSet],
    coefficients: Mapping[str, GpuCoefficients],
    held_out_coefficients: Mapping[str, GpuCoefficients] | None = None,
) -> list[ValidationRow]:
    """Score every observation set; add held-out rows for the model-dependent sets.

    :param coefficients: fitted coefficients per GPU name.
    :param held_out_coefficients: coefficients fitted without :data:`HELD_OUT_MODEL` (optional).
    """
    rows = []
    for obs in observations:
        rows.append(ValidationRow(obs.gpu, obs.operator, "in-sample", *score(obs, coefficients[obs.gpu])))
        held_out = obs.models == HELD_OUT_MODEL
        if held_out_coefficients is None or obs.kind not in (KIND_GEMM, KIND_LAYER) or not held_out.any():
            continue
        rows.append(
            ValidationRow(
                obs.gpu, obs.operator, "in-sample-34b", *score(obs, coefficients[obs.gpu], held_out)
            )
        )
        rows.append(
            ValidationRow(
                obs.gpu, obs.operator, "held-out", *score(obs, held_out_coefficients[obs.gpu], held_out)
            )
        )
    return rows


def _ape_summary(gpu: str, operator: str, errors: Sequence[np.ndarray]) -> ValidationRow:
    ape = np.abs(np.concatenate(errors))
    return ValidationRow(
        gpu,
        operator,
        "table-interp",
        int(ape.size),
        float(ape.mean()),
        float(np.quantile(ape, 0.9)),
        float(ape.max()),
    )


def table_interpolation_rows(profiles: VidurProfiles) -> list[ValidationRow]:
    """Accuracy of the profile-table backend between profiled points: every other point of each
    curve (tokens, KV length or message size) is left out, the rest interpolated linearly as
    :class:`~opscale.sim.profile_table.ProfileTableCostModel` does, and scored on the left-out points
    (scope ``table-interp``). In-sample the table reproduces its rows exactly."""

    def left_out_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        kept, held = slice(0, None, 2), slice(1, -1, 2)  # held points always lie between kept ones
        return (np.interp(x[held], x[kept], y[kept]) - y[held]) / y[held]

    grouped: dict[tuple[str, str], list[np.ndarray]] = {}
    for (gpu, _, _), curves in profiles.mlp.items():
        for operator, (column, _, _) in GEMM_OPERATORS.items():
            grouped.setdefault((gpu, operator), []).append(
                left_out_errors(curves[column].x, curves[column].y)
            )
    for name, grids in (
        ("attention_prefill", profiles.attention_prefill),
        ("attention_decode", profiles.attention_decode),
    ):
        for (gpu, _, _), grid in grids.items():
            for curve in grid.curves:
                if len(curve.x) >= 3:
                    grouped.setdefault((gpu, name), []).append(left_out_errors(curve.x, curve.y))
    for (gpu, workers, per_node), curve in profiles.all_reduce.items():
        name = "all_reduce_cross_node" if per_node < workers else "all_reduce"
        grouped.setdefault((gpu, name), []).append(left_out_errors(curve.x, curve.y))
    for (gpu, cross), curve in profiles.send_recv.items():
        grouped.setdefault((gpu, "send_recv_cross_node" if cross else "send_recv"), []).append(
            left_out_errors(curve.x, curve.y)
        )
    return [_ape_summary(gpu, operator, errors) for (gpu, operator), errors in sorted(grouped.items())]


# ----------------------------------------------------------------------------- power (SplitwiseSim)
#: SplitwiseSim's ``perf_model.csv`` below :func:`opscale.paths.reference_dir`.
SPLITWISE_PERF_MODEL = Path("splitwise_sim_perf_model") / "data" / "perf_model.csv"

_SPLITWISE_COLUMNS = (
    "model",
    "hardware",
    "prompt_size",
    "batch_size",
    "token_size",
    "peak_power",
    "average_power",
    "prompt_time",
    "token_time",
    "e2e_time",
    "tensor_parallel",
)
_SPLITWISE_MODELS = {"llama2-70b": "llama-2-70b"}
_SPLITWISE_HARDWARE = {"a100-80gb": "a100", "h100-80gb": "h100"}


@dataclass(frozen=True)
class SplitwiseRun:
    """One configuration of SplitwiseSim's measurements (repetitions averaged).

    Times in s; powers as fractions of TDP, as in the file.
    """

    model: str
    gpu: str
    tp: int
    prompt_tokens: int
    batch_size: int
    output_tokens: int
    prompt_time_s: float
    token_time_s: float
    e2e_time_s: float
    average_power_tdp: float
    peak_power_tdp: float


def load_splitwise_runs(path: Path | None = None) -> list[SplitwiseRun]:
    """Runs of catalog models on catalog GPUs with non-zero power columns, whose prompt plus output
    fits the model's context (Llama-2-70B: 4,096; the 8,192-token rows report near-idle power and are
    left out as invalid).

    :raises ValueError: when the CSV lacks a required column.
    """
    columns = read_vidur_csv(path or reference_dir() / SPLITWISE_PERF_MODEL, _SPLITWISE_COLUMNS)
    groups: dict[tuple[str, str, int, int, int, int], list[int]] = {}
    for index, (model, hardware) in enumerate(zip(columns["model"], columns["hardware"], strict=True)):
        if model not in _SPLITWISE_MODELS or hardware not in _SPLITWISE_HARDWARE:
            continue
        if float(columns["average_power"][index]) <= 0:
            continue
        key = (
            _SPLITWISE_MODELS[model],
            _SPLITWISE_HARDWARE[hardware],
            int(columns["tensor_parallel"][index]),
            int(columns["prompt_size"][index]),
            int(columns["batch_size"][index]),
            int(columns["token_size"][index]),
        )
        if key[3] + key[5] > get_model(key[0]).max_context:
            continue
        groups.setdefault(key, []).append(index)

    def mean(name: str, rows: list[int]) -> float:
        return float(np.mean([float(columns[name][i]) for i in rows]))

    return [
        SplitwiseRun(
            model=model,
            gpu=gpu,
            tp=tp,
            prompt_tokens=prompt,
            batch_size=batch,
            output_tokens=output,
            prompt_time_s=mean("prompt_time", rows) * 1e-3,
            token_time_s=mean("token_time", rows) * 1e-3,
            e2e_time_s=mean("e2e_time", rows) * 1e-3,
            average_power_tdp=mean("average_power", rows),
            peak_power_tdp=mean("peak_power", rows),
        )
        for (model, gpu, tp, prompt, batch, output), rows in sorted(groups.items())
    ]


@dataclass(frozen=True)
class PowerCheck:
    """Predicted against measured power of one Splitwise run (W per GPU).

    ``prefill_busy`` / ``decode_busy``: kernel time from the cost model over the measured phase time.
    """

    run: SplitwiseRun
    prefill_busy: float
    decode_busy: float
    predicted_average_w: float
    measured_average_w: float
    predicted_peak_w: float
    measured_peak_w: float


def _iteration_kernel_s(
    cost_model: CostModel, model: ModelSpec, gpu: GPUSpec, tp: int, tokens: int, batch: AttentionBatch
) -> tuple[float, float]:
    """(kernel time, compute-bound part of it) of one forward pass of all units; ``lm_head`` runs on
    one token per sequence (vLLM computes logits only where it samples)."""
    total = compute = 0.0
    sequences = batch.num_decodes + batch.num_prefills
    for unit in model.units:
        if unit is UnitKind.ATTENTION:
            seconds = cost_model.attention_time_s(model, gpu, tp, batch)
            bound = "compute" if batch.num_prefills else "memory"
        else:
            unit_tokens = sequences if unit is UnitKind.LM_HEAD else tokens
            seconds = cost_model.unit_time_s(model, unit, gpu, tp, unit_tokens)
            bound = cost_model.bound(model, unit, gpu, tp, unit_tokens)
        total += seconds
        compute += seconds if bound == "compute" else 0.0
    return total, compute


def check_power(
    runs: Sequence[SplitwiseRun], cost_model: CostModel, power_model: PowerModel
) -> list[PowerCheck]:
    """Predict each run's average and peak per-GPU power.

    The prefill phase lasts the measured ``prompt_time`` with the GPU busy for the cost model's
    kernel time of the batch's prompts; the decode phase fills the rest of ``e2e_time`` with
    iterations of ``token_time``, each busy for the kernel time of one decode step at the mean
    context. Average = time-weighted phase powers; peak = the larger phase power.
    """
    checks = []
    for run in runs:
        model, gpu = get_model(run.model), get_gpu(run.gpu)
        prefill_s, prefill_compute_s = _iteration_kernel_s(
            cost_model,
            model,
            gpu,
            run.tp,
            run.batch_size * run.prompt_tokens,
            AttentionBatch.from_requests(prefill_chunks=[(run.prompt_tokens, 0)] * run.batch_size),
        )
        context = run.prompt_tokens + run.output_tokens // 2
        decode_s, decode_compute_s = _iteration_kernel_s(
            cost_model,
            model,
            gpu,
            run.tp,
            run.batch_size,
            AttentionBatch.from_requests([context] * run.batch_size),
        )
        prefill_busy = min(1.0, prefill_s / run.prompt_time_s)
        decode_busy = min(1.0, decode_s / run.token_time_s)
        prefill_w = power_model.power_w(gpu, prefill_busy, prefill_compute_s / prefill_s)
        decode_w = power_model.power_w(gpu, decode_busy, decode_compute_s / decode_s)
        decode_phase_s = max(run.e2e_time_s - run.prompt_time_s, 0.0)
        average_w = (prefill_w * run.prompt_time_s + decode_w * decode_phase_s) / (
            run.prompt_time_s + decode_phase_s
        )
        checks.append(
            PowerCheck(
                run=run,
                prefill_busy=prefill_busy,
                decode_busy=decode_busy,
                predicted_average_w=average_w,
                measured_average_w=run.average_power_tdp * gpu.tdp_watts,
                predicted_peak_w=max(prefill_w, decode_w),
                measured_peak_w=run.peak_power_tdp * gpu.tdp_watts,
            )
        )
    return checks


def power_errors(checks: Sequence[PowerCheck]) -> dict[str, float]:
    """MAPE of the average and of the peak power over ``checks``."""
    average = [abs(c.predicted_average_w - c.measured_average_w) / c.measured_average_w for c in checks]
    peak = [abs(c.predicted_peak_w - c.measured_peak_w) / c.measured_peak_w for c in checks]
    return {
        "count": float(len(checks)),
        "average_mape": float(np.mean(average)),
        "peak_mape": float(np.mean(peak)),
    }


# ----------------------------------------------------------------------------- targets (issue 3)
#: GEMM-mean MAPE limits per GPU; other limits below apply to every GPU with the rows.
GEMM_MEAN_MAPE_LIMIT = {"a100": 0.08, "h100": 0.10}
GEMM_EACH_MAPE_LIMIT = 0.13
ATTENTION_MAPE_LIMIT = 0.15
NETWORK_MAPE_LIMIT = 0.15
LAYER_SUM_MAPE_LIMIT = 0.07
HELD_OUT_RATIO_LIMIT = 1.5


@dataclass(frozen=True)
class TargetCheck:
    """One accuracy target: ``value <= limit``."""

    name: str
    value: float
    limit: float

    @property
    def ok(self) -> bool:
        """Whether the target is met."""
        return bool(self.value <= self.limit)


def _mape(rows: Sequence[ValidationRow], gpu: str, operators: Sequence[str], scope: str) -> float:
    values = [r.mape for r in rows if r.gpu == gpu and r.operator in operators and r.scope == scope]
    return float(np.mean(values)) if values else float("nan")


def check_targets(rows: Sequence[ValidationRow]) -> list[TargetCheck]:
    """The accuracy targets of the cost-model issue, evaluated on validation rows."""
    checks = []
    gemms = tuple(GEMM_OPERATORS)
    for gpu in sorted({r.gpu for r in rows}):
        in_sample = {r.operator: r for r in rows if r.gpu == gpu and r.scope == "in-sample"}
        if all(op in in_sample for op in gemms):
            limit = GEMM_MEAN_MAPE_LIMIT.get(gpu, max(GEMM_MEAN_MAPE_LIMIT.values()))
            checks.append(TargetCheck(f"{gpu} GEMM mean MAPE", _mape(rows, gpu, gemms, "in-sample"), limit))
            checks += [
                TargetCheck(f"{gpu} {op} MAPE", in_sample[op].mape, GEMM_EACH_MAPE_LIMIT) for op in gemms
            ]
        for op in ("attention_prefill", "attention_decode"):
            if op in in_sample:
                checks.append(TargetCheck(f"{gpu} {op} MAPE", in_sample[op].mape, ATTENTION_MAPE_LIMIT))
        for op in ("all_reduce", "send_recv"):
            if op in in_sample:
                checks.append(
                    TargetCheck(f"{gpu} {op} (intra-node) MAPE", in_sample[op].mape, NETWORK_MAPE_LIMIT)
                )
        if "layer_sum" in in_sample:
            checks.append(
                TargetCheck(f"{gpu} layer_sum MAPE", in_sample["layer_sum"].mape, LAYER_SUM_MAPE_LIMIT)
            )
        for label, operators in (("GEMM mean", gemms), ("layer_sum", ("layer_sum",))):
            held_out = _mape(rows, gpu, operators, "held-out")
            if np.isfinite(held_out):
                ratio = held_out / _mape(rows, gpu, operators, "in-sample")
                checks.append(
                    TargetCheck(
                        f"{gpu} held-out {HELD_OUT_MODEL} {label} / in-sample", ratio, HELD_OUT_RATIO_LIMIT
                    )
                )
    return checks
