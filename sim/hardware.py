"""Hardware catalog: GPUs, links, nodes and clusters, from public figures.

Sources (public datasheets; every figure below names its own):

* A100-80GB SXM: NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s dense BF16/FP16 tensor,
  2,039 GB/s HBM2e, 80 GB, NVLink 3 at 600 GB/s total (300 GB/s each direction), 400 W TDP.
* H100-80GB SXM: NVIDIA H100 Tensor Core GPU datasheet (2023): 989 TFLOP/s dense BF16 (1,979 with
  sparsity), 3.35 TB/s HBM3, 80 GB, NVLink 4 at 900 GB/s total (450 GB/s each direction), 700 W TDP.
* H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (2024): same GH100 compute as the H100 (989 TFLOP/s
  dense BF16), 4.8 TB/s HBM3e, 141 GB, NVLink 900 GB/s, up to 700 W TDP.
* Idle / prefill / decode power per GPU: SplitwiseSim's per-phase constants (Patel et al., ISCA'24,
  ``Mutinifni/splitwise-sim``): A100 63 / 400 / 250 W, H100 75 / 700 / 380 W. The H200 has no public
  per-phase figures; it shares the H100's GH100 die and 700 W limit, so it takes the H100 figures.
* InfiniBand between nodes: DGX A100 / DGX H100 pair each GPU with one ConnectX HDR (200 Gb/s) /
  NDR (400 Gb/s) port; the default here is 400 Gb/s per GPU (DESIGN.md 2.1) for all types.
* Link latencies: NVLink point-to-point about 2 us, InfiniBand about 5 us one way (NCCL small-message
  floors are larger and are fitted separately in :mod:`opscale.sim.costmodel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "GPU_CATALOG",
    "ClusterSpec",
    "GPUSpec",
    "LinkSpec",
    "NodeSpec",
    "default_infiniband",
    "default_nvlink",
    "get_gpu",
]

_GB = 1e9
_TB = 1e12


@dataclass(frozen=True)
class GPUSpec:
    """One GPU type.

    :param name: catalog key (``"a100"``, ``"h100"``, ``"h200"``).
    :param peak_flops: dense BF16/FP16 tensor-core throughput, FLOP/s.
    :param hbm_bandwidth_bytes_per_s: HBM bandwidth, bytes/s.
    :param memory_bytes: HBM capacity, bytes (datasheet GB = 1e9 bytes).
    :param nvlink_bandwidth_bytes_per_s: NVLink bandwidth per GPU in one direction, bytes/s.
    :param tdp_watts: board power limit, W.
    :param idle_watts: power when powered on and idle, W.
    :param prefill_watts: typical power during compute-bound (prefill) work, W.
    :param decode_watts: typical power during memory-bound (decode) work, W.
    :param long_name: human-readable product name.
    """

    name: str
    peak_flops: float
    hbm_bandwidth_bytes_per_s: float
    memory_bytes: float
    nvlink_bandwidth_bytes_per_s: float
    tdp_watts: float
    idle_watts: float
    prefill_watts: float
    decode_watts: float
    long_name: str = ""

    def __post_init__(self) -> None:
        for attr in (
            "peak_flops",
            "hbm_bandwidth_bytes_per_s",
            "memory_bytes",
            "nvlink_bandwidth_bytes_per_s",
            "tdp_watts",
        ):
            if getattr(self, attr) <= 0:
                raise ValueError(f"GPUSpec {self.name!r}: {attr} must be > 0, got {getattr(self, attr)}")
        if not 0 <= self.idle_watts <= self.decode_watts <= self.prefill_watts <= self.tdp_watts * 1.1:
            raise ValueError(
                f"GPUSpec {self.name!r}: need 0 <= idle <= decode <= prefill <= ~TDP watts, got "
                f"{self.idle_watts}/{self.decode_watts}/{self.prefill_watts}/{self.tdp_watts}"
            )


#: The GPU types the simulator knows, keyed by lower-case short name.
GPU_CATALOG: Mapping[str, GPUSpec] = MappingProxyType(
    {
        "a100": GPUSpec(
            name="a100",
            long_name="NVIDIA A100-80GB SXM",
            peak_flops=312 * _TB,
            hbm_bandwidth_bytes_per_s=2039 * _GB,
            memory_bytes=80 * _GB,
            nvlink_bandwidth_bytes_per_s=300 * _GB,
            tdp_watts=400.0,
            idle_watts=63.0,
            prefill_watts=400.0,
            decode_watts=250.0,
        ),
        "h100": GPUSpec(
            name="h100",
            long_name="NVIDIA H100-80GB SXM",
            peak_flops=989 * _TB,
            hbm_bandwidth_bytes_per_s=3350 * _GB,
            memory_bytes=80 * _GB,
            nvlink_bandwidth_bytes_per_s=450 * _GB,
            tdp_watts=700.0,
            idle_watts=75.0,
            prefill_watts=700.0,
            decode_watts=380.0,
        ),
        "h200": GPUSpec(
            name="h200",
            long_name="NVIDIA H200 SXM 141GB",
            peak_flops=989 * _TB,
            hbm_bandwidth_bytes_per_s=4800 * _GB,
            memory_bytes=141 * _GB,
            nvlink_bandwidth_bytes_per_s=450 * _GB,
            tdp_watts=700.0,
            idle_watts=75.0,
            prefill_watts=700.0,
            decode_watts=380.0,
        ),
    }
)

_GPU_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "a100-80gb": "a100",
        "a100-80gb-sxm": "a100",
        "a100-sxm": "a100",
        "a100_80gb": "a100",
        "h100-80gb": "h100",
        "h100-80gb-sxm": "h100",
        "h100-sxm": "h100",
        "h100_80gb": "h100",
        "h200-141gb": "h200",
        "h200-sxm": "h200",
    }
)


def get_gpu(name: str) -> GPUSpec:
    """Look a GPU up by name, case-insensitively, accepting aliases such as ``"A100-80GB"``.

    :param name: GPU name or alias.
    :raises ValueError: for an unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower()
    key = _GPU_ALIASES.get(key, key)
    if key not in GPU_CATALOG:
        valid = sorted(set(GPU_CATALOG) | set(_GPU_ALIASES))
        raise ValueError(f"unknown GPU {name!r}; valid names: {', '.join(valid)}")
    return GPU_CATALOG[key]


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link: alpha-beta model ``latency + bytes / bandwidth``.

    :param bandwidth_bytes_per_s: sustained bandwidth in one direction, bytes/s.
    :param latency_s: one-way start-up latency, s.
    """

    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(
                f"LinkSpec needs bandwidth > 0 and latency >= 0, got {self.bandwidth_bytes_per_s}, {self.latency_s}"
            )

    def transfer_time_s(self, num_bytes: float) -> float:
        """Time to move ``num_bytes`` over the link (0 bytes still pays no latency: nothing is sent)."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        if num_bytes == 0:
            return 0.0
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


#: One-way NVLink point-to-point latency, s (order of magnitude from NVIDIA NVLink material).
NVLINK_LATENCY_S = 2e-6
#: InfiniBand one-way latency incl. NIC, s.
INFINIBAND_LATENCY_S = 5e-6
#: InfiniBand bandwidth per GPU: 400 Gb/s (NDR, one port per GPU in a DGX H100), bytes/s.
INFINIBAND_BANDWIDTH_BYTES_PER_S = 400e9 / 8


def default_nvlink(gpu: GPUSpec) -> LinkSpec:
    """The NVLink link of ``gpu`` (its per-direction bandwidth, :data:`NVLINK_LATENCY_S`)."""
    return LinkSpec(bandwidth_bytes_per_s=gpu.nvlink_bandwidth_bytes_per_s, latency_s=NVLINK_LATENCY_S)


def default_infiniband() -> LinkSpec:
    """The default inter-node link: 400 Gb/s per GPU, :data:`INFINIBAND_LATENCY_S`."""
    return LinkSpec(bandwidth_bytes_per_s=INFINIBAND_BANDWIDTH_BYTES_PER_S, latency_s=INFINIBAND_LATENCY_S)


@dataclass(frozen=True)
class NodeSpec:
    """A server: ``gpus_per_node`` GPUs of one type joined by NVLink.

    :param gpu: the GPU type of this node.
    :param gpus_per_node: GPUs in the node (8 for DGX A100 / H100 / H200).
    :param nvlink: intra-node link; defaults to the GPU's NVLink figures.
    """

    gpu: GPUSpec
    gpus_per_node: int = 8
    nvlink: LinkSpec | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if self.nvlink is None:
            object.__setattr__(self, "nvlink", default_nvlink(self.gpu))

    @property
    def link(self) -> LinkSpec:
        """The intra-node link (never ``None`` after construction)."""
        assert self.nvlink is not None
        return self.nvlink


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of nodes (the GPU type is kept per node so heterogeneous pools remain possible).

    GPUs are numbered globally: node 0 holds GPUs ``0 .. gpus_per_node-1``, and so on.

    :param nodes: the nodes.
    :param interconnect: inter-node link per GPU (InfiniBand, 400 Gb/s by default).
    """

    nodes: tuple[NodeSpec, ...]
    interconnect: LinkSpec = field(default_factory=default_infiniband)
    _node_of_gpu: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _first_gpu_of_node: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        node_of_gpu: list[int] = []
        first: list[int] = []
        for index, node in enumerate(self.nodes):
            first.append(len(node_of_gpu))
            node_of_gpu.extend([index] * node.gpus_per_node)
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "_node_of_gpu", tuple(node_of_gpu))
        object.__setattr__(self, "_first_gpu_of_node", tuple(first))

    @classmethod
    def homogeneous(cls, gpu: str | GPUSpec, num_nodes: int, gpus_per_node: int = 8) -> ClusterSpec:
        """``num_nodes`` identical nodes of ``gpus_per_node`` GPUs of type ``gpu``.

        :raises ValueError: unknown GPU name or ``num_nodes < 1``.
        """
        spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        node = NodeSpec(gpu=spec, gpus_per_node=gpus_per_node)
        return cls(nodes=(node,) * num_nodes)

    @property
    def num_gpus(self) -> int:
        """Total GPUs in the cluster."""
        return len(self._node_of_gpu)

    def _check(self, gpu_index: int) -> None:
        if not 0 <= gpu_index < self.num_gpus:
            raise ValueError(f"GPU index {gpu_index} out of range 0..{self.num_gpus - 1}")

    def node_of(self, gpu_index: int) -> int:
        """Index of the node holding GPU ``gpu_index``."""
        self._check(gpu_index)
        return self._node_of_gpu[gpu_index]

    def gpu_of(self, gpu_index: int) -> GPUSpec:
        """GPU type of GPU ``gpu_index``."""
        return self.nodes[self.node_of(gpu_index)].gpu

    def gpus_of_node(self, node_index: int) -> range:
        """Global GPU indices of node ``node_index``."""
        if not 0 <= node_index < len(self.nodes):
            raise ValueError(f"node index {node_index} out of range 0..{len(self.nodes) - 1}")
        start = self._first_gpu_of_node[node_index]
        return range(start, start + self.nodes[node_index].gpus_per_node)

    def link_between(self, gpu_a: int, gpu_b: int) -> LinkSpec | None:
        """The link data takes from ``gpu_a`` to ``gpu_b``: ``None`` for the same GPU, NVLink inside a
        node, the interconnect across nodes."""
        node_a, node_b = self.node_of(gpu_a), self.node_of(gpu_b)
        if gpu_a == gpu_b:
            return None
        if node_a == node_b:
            return self.nodes[node_a].link
        return self.interconnect
