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
from opscale.sim.models import MODEL_CATALOG, ModelSpec, UnitKind
from opscale.sim.profile_table import VidurProfiles

from opscale.paths import reference_dir

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
        without :data:`HELD_OUT_MODEL`, scored on it) or ``in-sample-34b`` (fitted coefficients on the
        same held-out rows, the comparison point).
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
