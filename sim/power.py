"""GPU power and energy (DESIGN.md 2.4).

A powered GPU draws its idle power plus, in proportion to how busy it is, the extra power of the work
it runs: compute-bound work (prefill GEMMs) near the prefill / TDP figure, memory-bound work (decode)
lower::

    P = idle + busy * [(1 - c) * (memory_bound - idle) + c * (compute_bound - idle)]

with ``busy`` the fraction of time kernels run and ``c`` the compute-bound share of that busy time.
A released GPU draws nothing. Energy integrates power over time.

Presets (:class:`PowerPreset`):

* ``splitwise-constants`` (default): SplitwiseSim's per-phase constants (Patel et al., ISCA'24,
  ``Mutinifni/splitwise-sim``): A100 idle 63 W / prefill 400 W / decode 250 W; H100 75 / 700 / 380 W;
  the H200 takes the H100 figures (same GH100 die and 700 W limit; no public per-phase figures).
* ``splitwise-measured``: the A100 memory-bound figure refitted to the non-zero power columns of
  SplitwiseSim's ``perf_model.csv`` (Llama-2-70B on DGX-A100, TP 2/4/8) with the busy fractions this
  package's cost model gives for those runs (see ``opscale costmodel validate``): 299 W instead of
  250 W. The H100 / H200 keep the constants (the H100 power columns are all zero).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from opscale.sim.hardware import GPU_CATALOG, GPUSpec

#: A fraction or an array of them.
FractionT = TypeVar("FractionT", float, np.ndarray)

__all__ = [
    "POWER_PRESETS",
    "GpuPowerProfile",
    "PowerModel",
    "PowerPreset",
    "joules_to_kwh",
]

_J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class GpuPowerProfile:
    """Power levels of one GPU type, W.

    :param idle_w: powered and idle.
    :param memory_bound_w: fully busy with memory-bound work (decode).
    :param compute_bound_w: fully busy with compute-bound work (prefill).
    """

    idle_w: float
    memory_bound_w: float
    compute_bound_w: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.memory_bound_w <= self.compute_bound_w:
            raise ValueError(
                "need 0 <= idle_w <= memory_bound_w <= compute_bound_w, got "
                f"{self.idle_w}, {self.memory_bound_w}, {self.compute_bound_w}"
            )

    @classmethod
    def from_gpu(cls, gpu: GPUSpec) -> GpuPowerProfile:
        """The GPU spec's public per-phase figures (idle / decode / prefill watts)."""
        return cls(idle_w=gpu.idle_watts, memory_bound_w=gpu.decode_watts, compute_bound_w=gpu.prefill_watts)


class PowerPreset(str, Enum):
    """Named power-level sets (see the module docstring)."""

    SPLITWISE_CONSTANTS = "splitwise-constants"
    SPLITWISE_MEASURED = "splitwise-measured"


_CONSTANTS: Mapping[str, GpuPowerProfile] = MappingProxyType(
    {name: GpuPowerProfile.from_gpu(gpu) for name, gpu in GPU_CATALOG.items()}
)

#: A100 memory-bound power refitted to SplitwiseSim's measured average power (Llama-2-70B, TP 2/4/8),
#: reproduced by ``experiments/calibrate_costmodel.py`` (``fit_memory_bound_power``).
A100_MEASURED_MEMORY_BOUND_W = 299.0

#: Power levels per preset and GPU name.
POWER_PRESETS: Mapping[PowerPreset, Mapping[str, GpuPowerProfile]] = MappingProxyType(
    {
        PowerPreset.SPLITWISE_CONSTANTS: _CONSTANTS,
        PowerPreset.SPLITWISE_MEASURED: MappingProxyType(
            {
                **_CONSTANTS,
                "a100": GpuPowerProfile(
                    idle_w=_CONSTANTS["a100"].idle_w,
                    memory_bound_w=A100_MEASURED_MEMORY_BOUND_W,
                    compute_bound_w=_CONSTANTS["a100"].compute_bound_w,
                ),
            }
        ),
    }
)


def joules_to_kwh(joules: float) -> float:
    """Convert J to kWh."""
    return joules / _J_PER_KWH


def _check_fraction(name: str, value: np.ndarray) -> None:
    if np.any(~np.isfinite(value)) or np.any(value < 0) or np.any(value > 1):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _powered_w(levels: GpuPowerProfile, busy: FractionT, compute: FractionT) -> FractionT:
    """Power of a powered GPU (floats or arrays alike)."""
    active_w = (1.0 - compute) * (levels.memory_bound_w - levels.idle_w) + compute * (
        levels.compute_bound_w - levels.idle_w
    )
    return levels.idle_w + busy * active_w


@dataclass(frozen=True)
class PowerModel:
    """Per-GPU power as a function of utilisation and of how compute-bound the work is.

    :param profiles: power levels per GPU name (default: the ``splitwise-constants`` preset).
    """

    profiles: Mapping[str, GpuPowerProfile] = field(
        default_factory=lambda: POWER_PRESETS[PowerPreset.SPLITWISE_CONSTANTS]
    )

    @classmethod
    def from_preset(cls, preset: PowerPreset | str) -> PowerModel:
        """A model with a named preset's power levels.

        :raises ValueError: for an unknown preset name, listing the valid ones.
        """
        try:
            key = PowerPreset(preset)
        except ValueError:
            valid = ", ".join(p.value for p in PowerPreset)
            raise ValueError(f"unknown power preset {preset!r}; valid presets: {valid}") from None
        return cls(profiles=POWER_PRESETS[key])

    def profile(self, gpu: GPUSpec) -> GpuPowerProfile:
        """Power levels of ``gpu``.

        :raises ValueError: when the model has none for it, naming those it has.
        """
        try:
            return self.profiles[gpu.name]
        except KeyError:
            raise ValueError(
                f"no power profile for GPU {gpu.name!r}; known GPUs: {', '.join(sorted(self.profiles))}"
            ) from None

    def power_w_array(
        self,
        gpu: GPUSpec,
        busy_fraction: np.ndarray | float,
        compute_bound_fraction: np.ndarray | float,
        powered: np.ndarray | bool = True,
    ) -> np.ndarray:
        """Vectorised :meth:`power_w` (arguments broadcast together)."""
        busy = np.asarray(busy_fraction, dtype=np.float64)
        compute = np.asarray(compute_bound_fraction, dtype=np.float64)
        _check_fraction("busy_fraction", busy)
        _check_fraction("compute_bound_fraction", compute)
        return np.where(np.asarray(powered, dtype=bool), _powered_w(self.profile(gpu), busy, compute), 0.0)

    def power_w(
        self, gpu: GPUSpec, busy_fraction: float, compute_bound_fraction: float, powered: bool = True
    ) -> float:
        """Average power of one GPU, W.

        :param busy_fraction: share of the time kernels run, in [0, 1].
        :param compute_bound_fraction: share of the busy time spent in compute-bound work, in [0, 1].
        :param powered: ``False`` for a released GPU (draws 0 W).
        :raises ValueError: for fractions outside [0, 1].
        """
        # plain floats: the engine asks this per GPU and interval, and 0-d arrays cost ~10x more
        busy, compute = float(busy_fraction), float(compute_bound_fraction)
        for name, value in (("busy_fraction", busy), ("compute_bound_fraction", compute)):
            if not 0.0 <= value <= 1.0:  # (NaN fails too)
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        return _powered_w(self.profile(gpu), busy, compute) if powered else 0.0

    def energy_j(
        self, gpu: GPUSpec, duration_s: float, busy_fraction: float, compute_bound_fraction: float
    ) -> float:
        """Energy of one powered GPU over ``duration_s`` at the given average utilisation, J."""
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        return self.power_w(gpu, busy_fraction, compute_bound_fraction) * duration_s

    def energy_from_busy_time_j(
        self, gpu: GPUSpec, powered_s: float, compute_bound_busy_s: float, memory_bound_busy_s: float
    ) -> float:
        """Energy of one GPU from time totals: powered for ``powered_s``, of which kernels ran
        ``compute_bound_busy_s + memory_bound_busy_s`` (each at most ``powered_s`` together), J."""
        if min(powered_s, compute_bound_busy_s, memory_bound_busy_s) < 0:
            raise ValueError(
                f"times must be >= 0, got {powered_s}, {compute_bound_busy_s}, {memory_bound_busy_s}"
            )
        busy_s = compute_bound_busy_s + memory_bound_busy_s
        if busy_s > powered_s * (1 + 1e-9):
            raise ValueError(f"busy time {busy_s} s exceeds powered time {powered_s} s")
        levels = self.profile(gpu)
        return (
            levels.idle_w * powered_s
            + compute_bound_busy_s * (levels.compute_bound_w - levels.idle_w)
            + memory_bound_busy_s * (levels.memory_bound_w - levels.idle_w)
        )
