"""Per-iteration engine (host) overhead: the time a serving engine spends outside GPU kernels.

Kernel profiles do not contain scheduling, sampling, input preparation, or launch gaps when CUDA
graphs are off (DESIGN.md 2.3). One iteration of an attention replica (a stream) pays

``fixed_s + per_tp_rank_s * tp + per_request_s * requests_in_batch``

on top of its kernel time. ``per_tp_rank_s`` models the per-worker RPC / broadcast cost of engines
that drive every TP rank from a central scheduler (2023 vLLM with Ray workers), which is why the
Splitwise decode iterations do not shrink from TP4 to TP8.

Presets (:class:`opscale.sim.config.EngineOverheadPreset`):

* ``modern``: CUDA graphs and an overlapped CPU scheduler (vLLM >= 0.6 / SGLang): ~1.5 ms fixed,
  ~10 us per request, no per-rank term; same for every GPU type.
* ``splitwise-vllm-2023``: least-squares fit, per GPU, of the decode time the kernels leave
  unexplained in ``splitwise_sim_perf_model/data/perf_model.csv`` (SplitwiseSim, MIT; Llama-2-70B on
  A100 and H100 at TP 2/4/8, batches up to 32), reproduced by
  ``python -m opscale.experiments.splitwise_validation --fit-overhead``.
* ``none``: kernel time only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from opscale.sim.config import EngineOverheadPreset
from opscale.sim.hardware import GPUSpec

__all__ = ["ENGINE_OVERHEAD_PRESETS", "EngineOverhead", "engine_overhead"]


@dataclass(frozen=True)
class EngineOverhead:
    """Host time per iteration of one stream.

    :param fixed_s: per iteration, s.
    :param per_tp_rank_s: per iteration and per GPU of the stream's TP group, s.
    :param per_request_s: per iteration and per request in the batch, s.
    """

    fixed_s: float = 0.0
    per_tp_rank_s: float = 0.0
    per_request_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.fixed_s, self.per_tp_rank_s, self.per_request_s) < 0:
            raise ValueError(f"engine overhead terms must be >= 0, got {self}")

    def iteration_s(self, tp: int, num_requests: int) -> float:
        """Host time of one iteration of a stream on ``tp`` GPUs running ``num_requests`` requests."""
        return self.fixed_s + self.per_tp_rank_s * tp + self.per_request_s * num_requests


_MODERN = EngineOverhead(fixed_s=1.5e-3, per_tp_rank_s=0.0, per_request_s=10e-6)

#: preset -> GPU catalog name -> overhead. ``"*"`` is the fallback for GPU types without their own entry.
ENGINE_OVERHEAD_PRESETS: Mapping[EngineOverheadPreset, Mapping[str, EngineOverhead]] = MappingProxyType(
    {
        EngineOverheadPreset.MODERN: MappingProxyType({"*": _MODERN}),
        EngineOverheadPreset.NONE: MappingProxyType({"*": EngineOverhead()}),
        # Fitted to SplitwiseSim perf_model.csv (llama2-70b token_time medians, TP 2/4/8); see module doc.
        EngineOverheadPreset.SPLITWISE_VLLM_2023: MappingProxyType(
            {
                "a100": EngineOverhead(fixed_s=0.75e-3, per_tp_rank_s=2.80e-3, per_request_s=0.207e-3),
                "h100": EngineOverhead(fixed_s=5.10e-3, per_tp_rank_s=1.37e-3, per_request_s=0.264e-3),
                # H200: no measurements; it shares the H100's host stack
                "*": EngineOverhead(fixed_s=5.10e-3, per_tp_rank_s=1.37e-3, per_request_s=0.264e-3),
            }
        ),
    }
)


def engine_overhead(preset: EngineOverheadPreset | str, gpu: GPUSpec) -> EngineOverhead:
    """The overhead of ``preset`` on ``gpu`` (falls back to the preset's ``"*"`` entry).

    :raises ValueError: for an unknown preset name (the message lists the valid ones).
    """
    try:
        key = EngineOverheadPreset(preset)
    except ValueError:
        valid = ", ".join(p.value for p in EngineOverheadPreset)
        raise ValueError(f"unknown engine-overhead preset {preset!r}; valid: {valid}") from None
    table = ENGINE_OVERHEAD_PRESETS[key]
    return table.get(gpu.name, table["*"])
