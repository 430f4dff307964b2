"""Knobs of the serving simulators that are not part of a deployment (shared by ``des`` and ``fluid``).

A :class:`SimConfig` holds the engine-behaviour constants both fidelities read: per-iteration engine
overhead preset, KV-cache block size and memory share, running-request limit, replica start-up and
weight-load figures, the GPU-contention model, how a removed attention replica hands its requests
over, and what the discrete-event engine records. Field names are a stable contract: the fluid model
reads them too.

Start-up figures (DESIGN.md 2.4) are fitted to OpScale's reported load times for Qwen2-7B
(15.2 GB of bf16 weights): a whole model-level replica becomes ready after about 10.7 s, one operator
after about 0.03 s, all operators after about 0.33 s. With one load bandwidth shared by both
granularities: ``all operators`` = ``operator_start_s`` + 15.2 GB / bandwidth = 0.33 s with
``operator_start_s`` = 0.03 s gives ~50.7 GB/s (host-pinned weights over PCIe Gen5); a whole instance
additionally pays the engine start (process, NCCL, CUDA graphs): 10.7 s - 0.30 s = 10.4 s.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any


class EngineOverheadPreset(str, Enum):
    """Named per-iteration host-overhead presets (values in :mod:`opscale.sim.overhead`).

    * ``modern``: a current engine with CUDA graphs and an overlapped scheduler (small overhead);
    * ``splitwise-vllm-2023``: calibrated to the Splitwise measurements of 2023-era vLLM
      (``splitwise_sim_perf_model/perf_model.csv``), used by the end-to-end validation against them;
    * ``none``: kernel time only.
    """

    MODERN = "modern"
    SPLITWISE_VLLM_2023 = "splitwise-vllm-2023"
    NONE = "none"


class ContentionModel(str, Enum):
    """How replicas that share a GPU slow each other down.

    * ``processor-sharing``: while ``n`` calls run on a GPU each progresses at rate
      ``1 / (1 + contention_factor * (n - 1))``, re-rated whenever a call starts or ends (factor 1:
      egalitarian, work-conserving processor sharing; see :mod:`opscale.sim.sharing`);
    * ``none``: co-located replicas do not interfere (an idealised spatial partition, e.g. MIG/MPS).
    """

    PROCESSOR_SHARING = "processor-sharing"
    NONE = "none"


class AttentionDrain(str, Enum):
    """What a removed attention replica does with the requests it holds.

    * ``migrate``: queued requests move at once; running requests move with their KV cache over the
      link to the target replica (``kv bytes / link bandwidth`` plus latency) and resume there;
    * ``finish``: the replica stops admitting and serves its running and queued requests to completion.
    """

    MIGRATE = "migrate"
    FINISH = "finish"


class ServiceTimeDistribution(str, Enum):
    """Service-time law of stateless-unit calls.

    * ``deterministic``: the cost model's time (the default, what real GPUs do);
    * ``exponential``: an exponential draw with the cost model's time as mean, from the simulator's
      seeded generator. Only for checking the engine against queueing closed forms (M/M/c).
    """

    DETERMINISTIC = "deterministic"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class SimConfig:
    """Engine behaviour shared by both fidelities.

    :param engine_overhead: per-iteration host overhead preset (see :class:`EngineOverheadPreset`).
    :param kv_block_tokens: tokens per KV-cache block (vLLM's paged-attention block size).
    :param gpu_memory_fraction: share of each GPU's HBM usable for weights + KV cache + activations
        (vLLM's ``gpu_memory_utilization``); the rest is left to the CUDA context and fragmentation.
    :param max_running_requests: most requests one attention replica runs at once (vLLM ``max_num_seqs``).
    :param weight_load_bandwidth_bytes_per_s: bandwidth at which a new replica loads its weights.
    :param operator_start_s: fixed start-up time of one new operator-level replica.
    :param instance_start_s: fixed start-up time of one new model-level instance (engine start).
    :param contention: contention model between busy replicas sharing a GPU.
    :param contention_factor: slowdown per other call sharing the GPU (``processor-sharing`` only).
    :param attention_drain: how a removed attention replica hands its requests over.
    :param service_time_distribution: service-time law of stateless-unit calls (exponential only for
        closed-form checks).
    :param record_requests: keep one record per request (for CSV output and exact run percentiles);
        ``False`` keeps only streaming aggregates.
    :param fast_forward_decode: let the engine advance runs of pure-decode iterations of a stream in
        one event (exact up to the linearisation of decode-attention time in the context length).
    :param clip_long_requests: ``False``: a request longer than the model's context limit is an error;
        ``True``: its prompt is clipped so prompt + output fit, and the clip is counted.
    :param compiled_calls: run an operator-level deployment's calls (GPU sharing, unit pools, the
        streams' walk along the units) in the compiled loop of :mod:`opscale.sim.call_kernel`, several
        times faster with bitwise the same results; ``False``: the Python classes (exponential service
        times always use them).
    """

    engine_overhead: EngineOverheadPreset = EngineOverheadPreset.MODERN
    kv_block_tokens: int = 16
    gpu_memory_fraction: float = 0.9
    max_running_requests: int = 256
    weight_load_bandwidth_bytes_per_s: float = 50.7e9
    operator_start_s: float = 0.03
    instance_start_s: float = 10.4
    contention: ContentionModel = ContentionModel.PROCESSOR_SHARING
    contention_factor: float = 1.0
    attention_drain: AttentionDrain = AttentionDrain.MIGRATE
    service_time_distribution: ServiceTimeDistribution = ServiceTimeDistribution.DETERMINISTIC
    record_requests: bool = True
    fast_forward_decode: bool = True
    clip_long_requests: bool = False
    compiled_calls: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_overhead", EngineOverheadPreset(self.engine_overhead))
        object.__setattr__(self, "contention", ContentionModel(self.contention))
        object.__setattr__(self, "attention_drain", AttentionDrain(self.attention_drain))
        object.__setattr__(
            self, "service_time_distribution", ServiceTimeDistribution(self.service_time_distribution)
        )
        if self.kv_block_tokens < 1:
            raise ValueError(f"kv_block_tokens must be >= 1, got {self.kv_block_tokens}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.weight_load_bandwidth_bytes_per_s <= 0:
            raise ValueError(
                f"weight_load_bandwidth_bytes_per_s must be > 0, got {self.weight_load_bandwidth_bytes_per_s}"
            )
        if self.operator_start_s < 0 or self.instance_start_s < 0:
            raise ValueError(
                f"start times must be >= 0, got operator_start_s={self.operator_start_s}, "
                f"instance_start_s={self.instance_start_s}"
            )
        if self.contention_factor < 0:
            raise ValueError(f"contention_factor must be >= 0, got {self.contention_factor}")

    def with_changes(self, **changes: Any) -> SimConfig:
        """A copy with ``changes`` applied (field names checked)."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ValueError(f"unknown SimConfig field(s) {unknown}; valid: {', '.join(sorted(valid))}")
        return replace(self, **changes)

    def replica_load_time_s(self, weight_bytes: float, *, whole_instance: bool) -> float:
        """Seconds from the decision to add a replica until it serves.

        :param weight_bytes: bytes this replica loads onto each of its GPUs (one TP shard; shards load
            in parallel).
        :param whole_instance: ``True`` for a model-level instance (pays :attr:`instance_start_s`),
            ``False`` for an operator-level replica (pays :attr:`operator_start_s`).
        """
        start_s = self.instance_start_s if whole_instance else self.operator_start_s
        return start_s + weight_bytes / self.weight_load_bandwidth_bytes_per_s
