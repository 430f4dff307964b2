"""Fit the roofline cost model's coefficients to the Vidur operator profiles and write them into code.

Usage (needs scipy, a dev dependency)::

    python -m opscale.experiments.calibrate_costmodel            # fit, print the scores, rewrite the coefficients
    python -m opscale.experiments.calibrate_costmodel --dry-run  # fit and print only
    python -m opscale.experiments.calibrate_costmodel --profiles DIR

What it fits, per GPU with profiles (A100, H100), minimising a robust (soft-L1) loss of the relative
error ``(predicted - measured) / measured`` of the very functions the simulator runs:

* GEMMs: one set (compute efficiency, memory efficiency, p-norm exponent, launch floor) shared by
  ``qkv_proj``, ``o_proj``, ``ffn`` up and down of every profiled model and TP degree;
* each elementwise kernel and the embedding: (latency, bandwidth efficiency);
* attention (A100 legacy table only): decode (floor, per-sequence, bandwidth efficiency), then prefill
  (floor, new-pair and cached-pair efficiencies);
* collectives: all-reduce (latency, per-rank latency, bus bandwidth) and send/recv (latency,
  bandwidth), within a node and across nodes.

Derived, not fitted (no profiles): H100 attention takes the A100 fit with compute efficiencies
scaled by FlashAttention-2's published utilisation (about 73 % of peak on A100, 35 % on H100, per
the FlashAttention-2 and -3 papers) and the same fraction of HBM bandwidth; H100 cross-node
all-reduce takes the A100 latency and the A100 bus bandwidth scaled by the measured H100/A100
cross-node send/recv bandwidth ratio. The H200 reuses the H100 coefficients (same GH100 compute;
its 4.8 TB/s HBM enters through its GPUSpec).

It then repeats the model-dependent fits without CodeLlama-34B (the held-out check) and writes both
sets into ``sim/costmodel_coefficients.py`` between the ``BEGIN FITTED`` / ``END FITTED`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from scipy.optimize import least_squares

from opscale.sim import costmodel_coefficients
from opscale.sim.calibration import (
    HELD_OUT_MODEL,
    KIND_GEMM,
    ObservationSet,
    build_observations,
    check_power,
    check_targets,
    default_profiles_dir,
    load_splitwise_runs,
    validate,
)
from opscale.sim.costmodel_coefficients import (
    ELEMENTWISE_KERNELS,
    ElementwiseCoefficients,
    GemmCoefficients,
    GpuCoefficients,
)
from opscale.sim.costmodel_roofline import RooflineCostModel
from opscale.sim.power import POWER_PRESETS, PowerModel, PowerPreset
from opscale.sim.profile_table import VidurProfiles

#: FlashAttention-2 forward utilisation of peak: ~73 % on A100 (FA2 paper, Dao 2023), ~35 % on H100
#: (FA3 paper, Shah et al. 2024). Used only to derive H100 attention from the A100 fit.
FA2_UTILISATION = {"a100": 0.73, "h100": 0.35}

_US = 1e-6
_GBPS = 1e9
_COEFFICIENTS_FILE = Path(costmodel_coefficients.__file__)
_MARKER = re.compile(r"(# BEGIN FITTED.*?\n)(.*?)(# END FITTED)", re.S)


def _fit(
    residuals: Callable[[np.ndarray], np.ndarray],
    x0: Sequence[float],
    lower: Sequence[float],
    upper: Sequence[float],
) -> np.ndarray:
    result = least_squares(
        residuals,
        np.asarray(x0, dtype=float),
        bounds=(lower, upper),
        loss="soft_l1",
        f_scale=0.02,
        x_scale="jac",
    )
    return np.asarray(result.x)


def _stacked(
    sets: Sequence[ObservationSet], build: Callable[[np.ndarray], GpuCoefficients], exclude_model: str | None
) -> Callable[[np.ndarray], np.ndarray]:
    masks = [None if exclude_model is None else obs.models != exclude_model for obs in sets]

    def residuals(x: np.ndarray) -> np.ndarray:
        coefficients = build(x)
        return np.concatenate(
            [obs.relative_errors(coefficients, mask) for obs, mask in zip(sets, masks, strict=True)]
        )

    return residuals


def fit_gpu(
    gpu: str,
    observations: Sequence[ObservationSet],
    start: GpuCoefficients,
    exclude_model: str | None = None,
) -> GpuCoefficients:
    """Fit every coefficient group of ``gpu`` that its observation sets identify; keep ``start``'s
    values for the rest."""
    of_gpu = {obs.operator: obs for obs in observations if obs.gpu == gpu}
    coeffs = start

    gemm_sets = [obs for obs in of_gpu.values() if obs.kind == KIND_GEMM]

    def with_gemm(x: np.ndarray) -> GpuCoefficients:
        return dataclasses.replace(coeffs, gemm=GemmCoefficients(x[0], x[1], x[2], x[3] * _US))

    x = _fit(
        _stacked(gemm_sets, with_gemm, exclude_model),
        (0.7, 0.8, 2.0, 5.0),
        (0.05, 0.05, 1.0, 0.0),
        (1.0, 1.0, 30.0, 100.0),
    )
    coeffs = with_gemm(x)

    elementwise = dict(coeffs.elementwise)
    for kernel in (*ELEMENTWISE_KERNELS, "embed"):
        if kernel not in of_gpu:
            continue

        def with_kernel(
            x: np.ndarray,
            kernel: str = kernel,
            coeffs: GpuCoefficients = coeffs,
            elementwise: dict[str, ElementwiseCoefficients] = elementwise,
        ) -> GpuCoefficients:
            fitted = ElementwiseCoefficients(x[0] * _US, x[1])
            if kernel == "embed":
                return dataclasses.replace(coeffs, embedding=fitted)
            return dataclasses.replace(coeffs, elementwise=MappingProxyType({**elementwise, kernel: fitted}))

        x = _fit(
            _stacked([of_gpu[kernel]], with_kernel, exclude_model), (3.0, 0.5), (0.0, 0.01), (100.0, 1.0)
        )
        coeffs = with_kernel(x)
        elementwise = dict(coeffs.elementwise)

    if "attention_decode" in of_gpu:

        def with_decode(x: np.ndarray) -> GpuCoefficients:
            attention = dataclasses.replace(
                coeffs.attention,
                decode_floor_s=x[0] * _US,
                decode_per_sequence_s=x[1] * _US,
                decode_memory_efficiency=x[2],
            )
            return dataclasses.replace(coeffs, attention=attention)

        coeffs = with_decode(
            _fit(
                _stacked([of_gpu["attention_decode"]], with_decode, None),
                (10.0, 0.05, 0.7),
                (0, 0, 0.05),
                (100, 10, 1),
            )
        )
    if "attention_prefill" in of_gpu:

        def with_prefill(x: np.ndarray) -> GpuCoefficients:
            attention = dataclasses.replace(
                coeffs.attention,
                prefill_floor_s=x[0] * _US,
                prefill_new_efficiency=x[1],
                prefill_cached_efficiency=x[2],
                prefill_per_sequence_s=0.0,
            )
            return dataclasses.replace(coeffs, attention=attention)

        coeffs = with_prefill(
            _fit(
                _stacked([of_gpu["attention_prefill"]], with_prefill, None),
                (10.0, 0.4, 0.4),
                (0, 0.01, 0.01),
                (200, 1, 1),
            )
        )

    network_fits = {
        "all_reduce": (
            "allreduce_latency_s",
            "allreduce_latency_per_rank_s",
            "allreduce_bus_bandwidth_bytes_per_s",
        ),
        "all_reduce_cross_node": (
            "cross_node_allreduce_latency_s",
            "cross_node_allreduce_latency_per_rank_s",
            "cross_node_allreduce_bus_bandwidth_bytes_per_s",
        ),
        "send_recv": ("send_recv_latency_s", None, "send_recv_bandwidth_bytes_per_s"),
        "send_recv_cross_node": (
            "cross_node_send_recv_latency_s",
            None,
            "cross_node_send_recv_bandwidth_bytes_per_s",
        ),
    }
    for operator, (latency_field, per_rank_field, bandwidth_field) in network_fits.items():
        if operator not in of_gpu:
            continue

        def with_network(
            x: np.ndarray,
            latency_field: str = latency_field,
            per_rank_field: str | None = per_rank_field,
            bandwidth_field: str = bandwidth_field,
            coeffs: GpuCoefficients = coeffs,
        ) -> GpuCoefficients:
            changes = {latency_field: x[0] * _US, bandwidth_field: x[2] * _GBPS}
            if per_rank_field is not None:
                changes[per_rank_field] = x[1] * _US
            return dataclasses.replace(coeffs, collectives=dataclasses.replace(coeffs.collectives, **changes))

        x = _fit(
            _stacked([of_gpu[operator]], with_network, None),
            (20.0, 1.0, 100.0),
            (0.0, 0.0, 0.1),
            (1000.0, 100.0, 5000.0),
        )
        coeffs = with_network(x)
    return dataclasses.replace(
        coeffs, source=f"fitted by experiments/calibrate_costmodel.py on the Vidur {gpu} profiles"
    )


def derive_h100_missing(
    h100: GpuCoefficients, a100: GpuCoefficients, observations: Sequence[ObservationSet]
) -> GpuCoefficients:
    """Fill the H100 groups without profiles (attention, cross-node all-reduce) from the A100 fit."""
    scale = FA2_UTILISATION["h100"] / FA2_UTILISATION["a100"]
    attention = dataclasses.replace(
        a100.attention,
        prefill_new_efficiency=a100.attention.prefill_new_efficiency * scale,
        prefill_cached_efficiency=a100.attention.prefill_cached_efficiency * scale,
    )
    has = {(obs.gpu, obs.operator) for obs in observations}
    collectives = h100.collectives
    if ("h100", "all_reduce_cross_node") not in has:
        ratio = (
            h100.collectives.cross_node_send_recv_bandwidth_bytes_per_s
            / a100.collectives.cross_node_send_recv_bandwidth_bytes_per_s
        )
        collectives = dataclasses.replace(
            collectives,
            cross_node_allreduce_latency_s=a100.collectives.cross_node_allreduce_latency_s,
            cross_node_allreduce_latency_per_rank_s=a100.collectives.cross_node_allreduce_latency_per_rank_s,
            cross_node_allreduce_bus_bandwidth_bytes_per_s=a100.collectives.cross_node_allreduce_bus_bandwidth_bytes_per_s
            * ratio,
        )
    if ("h100", "attention_prefill") in has:
        attention = h100.attention
    return dataclasses.replace(
        h100,
        attention=attention,
        collectives=collectives,
        source=h100.source + "; attention and cross-node all-reduce derived from A100",
    )


def fit_all(
    observations: Sequence[ObservationSet], exclude_model: str | None = None
) -> dict[str, GpuCoefficients]:
    """Fitted coefficients for a100, h100 and h200 (= h100)."""
    start = costmodel_coefficients.STARTING_COEFFICIENTS
    a100 = fit_gpu("a100", observations, start["a100"], exclude_model)
    h100 = derive_h100_missing(
        fit_gpu("h100", observations, start["h100"], exclude_model), a100, observations
    )
    return {
        "a100": a100,
        "h100": h100,
        "h200": dataclasses.replace(h100, source=h100.source + "; H200 reuses the H100 fit"),
    }


def _literal(value: object, indent: int) -> str:
    """``value`` as Python source in ruff-format layout (floats to 6 significant digits)."""
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, float):
        text = f"{value:.6g}".replace("e+", "e")
        return text if any(ch in text for ch in ".en") else text + ".0"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        items = "".join(
            f"{inner}    {_literal(key, 0)}: {_literal(item, indent + 8)},\n" for key, item in value.items()
        )
        return f"MappingProxyType(\n{inner}{{\n{items}{inner}}}\n{pad})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = "".join(
            f"{inner}{f.name}={_literal(getattr(value, f.name), indent + 4)},\n"
            for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}(\n{fields}{pad})"
    raise TypeError(f"cannot write {value!r} as a literal")


def coefficients_source(
    fitted: Mapping[str, GpuCoefficients], held_out: Mapping[str, GpuCoefficients]
) -> str:
    """Python source of the two coefficient tables."""
    lines = [
        "# Written by experiments/calibrate_costmodel.py from the Vidur profiles (microsoft/vidur 7d47513,",
        "# MIT). Do not edit by hand: rerun the script.",
        f"FITTED_COEFFICIENTS: Mapping[str, GpuCoefficients] = {_literal(dict(fitted), 0)}",
        "",
        f"#: The same fit without {HELD_OUT_MODEL} (scored on it by ``opscale costmodel validate``).",
        f"HELD_OUT_COEFFICIENTS: Mapping[str, GpuCoefficients] = {_literal(dict(held_out), 0)}",
        "",
    ]
    return "\n".join(lines)


def write_coefficients(source: str, path: Path = _COEFFICIENTS_FILE) -> None:
    """Replace the text between the ``BEGIN FITTED`` / ``END FITTED`` markers of ``path``."""
    text = path.read_text()
    if not _MARKER.search(text):
        raise ValueError(f"{path}: no '# BEGIN FITTED' ... '# END FITTED' block to replace")
    path.write_text(_MARKER.sub(lambda m: m.group(1) + source + m.group(3), text))


def fit_memory_bound_power(gpu: str = "a100") -> float:
    """Memory-bound power (W) of ``gpu`` that best fits SplitwiseSim's measured average power, with idle
    and compute-bound power kept at the public constants (the ``splitwise-measured`` power preset)."""
    runs = [run for run in load_splitwise_runs() if run.gpu == gpu]
    base = POWER_PRESETS[PowerPreset.SPLITWISE_CONSTANTS]
    cost_model = RooflineCostModel()

    def residuals(x: np.ndarray) -> np.ndarray:
        profile = dataclasses.replace(base[gpu], memory_bound_w=float(x[0]))
        checks = check_power(runs, cost_model, PowerModel(profiles={**base, gpu: profile}))
        return np.array(
            [(c.predicted_average_w - c.measured_average_w) / c.measured_average_w for c in checks]
        )

    start = base[gpu].memory_bound_w
    return float(_fit(residuals, (start,), (base[gpu].idle_w,), (base[gpu].compute_bound_w,))[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=Path, default=None, help="Vidur data/profiling directory")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the fit, do not rewrite the coefficients file"
    )
    args = parser.parse_args(argv)
    observations = build_observations(VidurProfiles.load(args.profiles or default_profiles_dir()))
    fitted = fit_all(observations)
    held_out = fit_all(observations, exclude_model=HELD_OUT_MODEL)
    rows = validate(observations, fitted, held_out)
    for row in rows:
        print(f"{row.gpu:5s} {row.operator:26s} {row.scope:14s} n={row.count:6d} MAPE={row.mape:6.1%}")
    for check in check_targets(rows):
        print(
            f"target {check.name:45s} {check.value:7.3f} <= {check.limit:5.3f} {'ok' if check.ok else 'MISSED'}"
        )
    memory_bound_w = fit_memory_bound_power("a100")
    print(
        f"A100 memory-bound power fitted to SplitwiseSim: {memory_bound_w:.0f} W (A100_MEASURED_MEMORY_BOUND_W)"
    )
    source = coefficients_source(fitted, held_out)
    if args.dry_run:
        print(source)
    else:
        write_coefficients(source)
        print(f"wrote {_COEFFICIENTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
