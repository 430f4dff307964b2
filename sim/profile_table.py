"""Profile-table backend of the cost model: interpolate measured operator times in Vidur's CSV format.

Reads every ``mlp.csv``, ``attention.csv``, ``all_reduce.csv`` and ``send_recv.csv`` under a
directory (Vidur's ``data/profiling`` layout, or a flat folder with ``gpu=`` given). The GPU of a
file is the first path component naming a known GPU (``a100``, ``h100_dgx``, ...). Times are the
``time_stats.<op>.median`` columns (ms, per layer, per TP worker), the statistic Vidur trains on.

Lookup rules (documented fall-backs, never a silent wrong shape):

* ``mlp.csv`` rows serve a model whose (heads, KV heads, hidden, FFN) match the file's
  (``n_head``, ``n_kv_head``, ``n_embd``, ``n_expanded_embd``), per TP degree. Token counts between
  profiled points interpolate linearly; beyond the largest profiled count the table's last value is
  scaled by the roofline model's ratio ``roofline(T) / roofline(T_max)``, so the curve stays continuous
  and monotone at any length. ``embed``, ``norm``, ``qkv_proj``, ``o_proj`` and ``ffn`` come from the
  table; units it does not profile (``moe``, ``lm_head``, ``vision_encoder``) come from the fallback.
* ``attention.csv`` serves a model with matching ``n_embd`` / ``n_q_head`` / ``n_kv_head`` and TP.
  Decode: bilinear in (batch size, mean KV length); prefill: bilinear in (chunk, prior context) per
  chunk. Outside the profiled region the value at the nearest profiled point is scaled by the
  roofline's ratio between the asked and the nearest point (so 128 K contexts stay sensible).
* ``all_reduce.csv`` / ``send_recv.csv``: per (workers, GPUs per node), linear in message size;
  beyond the largest size the last segment's slope (bandwidth) continues.
* Anything with no matching table (another GPU, model shape or TP degree) is answered by the
  fallback :class:`~opscale.sim.costmodel_roofline.RooflineCostModel`. :meth:`ProfileTableCostModel.coverage`
  says which case applies.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opscale.sim.costmodel_api import AttentionBatch, as_nonnegative_array, split_prefill_pairs
from opscale.sim.costmodel_roofline import (
    UNIT_CACHE_MAX_ENTRIES,
    RooflineCostModel,
    decode_attention_time_s,
    prefill_attention_time_s,
)
from opscale.sim.hardware import GPU_CATALOG, GPUSpec, get_gpu
from opscale.sim.models import ModelSpec, UnitKind

__all__ = [
    "MLP_OPERATIONS",
    "ProfileTableCostModel",
    "VidurProfiles",
    "gpu_name_from_path",
    "read_vidur_csv",
]

_MS = 1e-3

#: Operator columns of Vidur's ``mlp.csv`` and the unit each belongs to.
MLP_OPERATIONS: Mapping[str, UnitKind] = {
    "emb": UnitKind.EMBED,
    "input_layernorm": UnitKind.NORM,
    "attn_pre_proj": UnitKind.QKV_PROJ,
    "attn_rope": UnitKind.NORM,
    "attn_post_proj": UnitKind.O_PROJ,
    "post_attention_layernorm": UnitKind.NORM,
    "mlp_up_proj": UnitKind.FFN,
    "mlp_act": UnitKind.NORM,
    "mlp_down_proj": UnitKind.FFN,
    "add": UnitKind.NORM,
}

_MLP_KEYS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens", "num_tensor_parallel_workers")
_ATTENTION_KEYS = (
    "n_embd",
    "n_q_head",
    "n_kv_head",
    "num_tensor_parallel_workers",
    "batch_size",
    "prefill_chunk_size",
    "kv_cache_size",
    "is_prefill",
    "time_stats.attn_prefill.median",
    "time_stats.attn_decode.median",
)
_NETWORK_KEYS = ("num_workers", "size", "devices_per_node")


def read_vidur_csv(path: Path, required: Iterable[str]) -> dict[str, list[str]]:
    """Read a CSV into columns of strings, checking the required columns are there.

    :raises ValueError: naming the file, the missing columns and the columns it has.
    """
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty CSV (no header)") from None
        rows = list(reader)
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; it has {header}")
    for line_number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{line_number}: {len(row)} fields, header has {len(header)}")
    transposed = zip(*rows, strict=True) if rows else ([] for _ in header)
    return {name: list(values) for name, values in zip(header, transposed, strict=True)}


def _floats(values: list[str]) -> np.ndarray:
    """Column of numbers; empty cells (Vidur leaves the other phase's times blank) become NaN."""
    return np.fromiter((float(v) if v else np.nan for v in values), dtype=np.float64, count=len(values))


def gpu_name_from_path(path: Path, root: Path) -> str | None:
    """The first component of ``path`` below ``root`` that names a known GPU (``h100_dgx`` -> ``h100``)."""
    for part in path.relative_to(root).parts:
        candidate = part.lower().removesuffix("_dgx")
        if candidate in GPU_CATALOG:
            return candidate
        try:
            return get_gpu(candidate).name
        except ValueError:
            continue
    return None


def _interp_extend(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Linear interpolation that continues the end segments' slopes outside ``xs`` (clamped at >= 0
    below and >= the last value above, so it never turns down)."""
    inside = np.interp(x, xs, ys)
    if len(xs) < 2:
        return inside
    high_slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
    low_slope = max((ys[1] - ys[0]) / (xs[1] - xs[0]), 0.0)
    above = ys[-1] + high_slope * (x - xs[-1])
    below = np.maximum(ys[0] + low_slope * (x - xs[0]), 0.0)
    return np.where(x > xs[-1], above, np.where(x < xs[0], below, inside))


@dataclass(frozen=True)
class _Curve:
    """Sorted ``x`` and ``y`` of one profiled curve (y in seconds)."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def build(cls, x: np.ndarray, y: np.ndarray) -> _Curve:
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        # repeated x (several ranks or repetitions): their mean
        unique_x, index, counts = np.unique(x, return_inverse=True, return_counts=True)
        return cls(unique_x, np.bincount(index, weights=y) / counts)


@dataclass
class _Grid2D:
    """Curves ``y(inner)`` at several ``outer`` values: bilinear lookup inside the profiled region;
    :meth:`clamp` gives the nearest profiled point for callers that extend beyond it."""

    outer: np.ndarray
    curves: tuple[_Curve, ...]

    @classmethod
    def build(cls, outer: np.ndarray, inner: np.ndarray, y: np.ndarray) -> _Grid2D:
        values = np.unique(outer)
        return cls(values, tuple(_Curve.build(inner[outer == v], y[outer == v]) for v in values))

    def _neighbours(self, outer: float) -> tuple[int, int]:
        index = int(np.searchsorted(self.outer, outer))
        if index <= 0:
            return 0, 0
        if index >= len(self.outer):
            return len(self.outer) - 1, len(self.outer) - 1
        return index - 1, index

    def clamp(self, outer: float, inner: float) -> tuple[float, float]:
        """The nearest point with profiled values on both neighbouring curves."""
        outer = float(np.clip(outer, self.outer[0], self.outer[-1]))
        low, high = self._neighbours(outer)
        inner_min = max(self.curves[low].x[0], self.curves[high].x[0])
        inner_max = min(self.curves[low].x[-1], self.curves[high].x[-1])
        return outer, float(np.clip(inner, inner_min, max(inner_min, inner_max)))

    def lookup(self, outer: float, inner: float) -> float:
        """Bilinear value at a point inside the profiled region (see :meth:`clamp`)."""
        low, high = self._neighbours(outer)
        y_low = float(np.interp(inner, self.curves[low].x, self.curves[low].y))
        if low == high:
            return y_low
        y_high = float(np.interp(inner, self.curves[high].x, self.curves[high].y))
        weight = (outer - self.outer[low]) / (self.outer[high] - self.outer[low])
        return y_low + weight * (y_high - y_low)


@dataclass
class VidurProfiles:
    """Profile tables parsed from a Vidur ``data/profiling`` tree.

    ``mlp[(gpu, shape, tp)][op]`` is a curve over tokens; ``shape`` = (heads, kv heads, hidden, ffn).
    ``attention_prefill`` / ``attention_decode[(gpu, (hidden, heads, kv heads), tp)]`` are grids.
    ``all_reduce[(gpu, workers, gpus_per_node)]`` and ``send_recv[(gpu, cross_node)]`` are curves
    over bytes.
    """

    mlp: dict[tuple[str, tuple[int, int, int, int], int], dict[str, _Curve]] = field(default_factory=dict)
    attention_prefill: dict[tuple[str, tuple[int, int, int], int], _Grid2D] = field(default_factory=dict)
    attention_decode: dict[tuple[str, tuple[int, int, int], int], _Grid2D] = field(default_factory=dict)
    all_reduce: dict[tuple[str, int, int], _Curve] = field(default_factory=dict)
    send_recv: dict[tuple[str, bool], _Curve] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | str, gpu: str | None = None) -> VidurProfiles:
        """Parse every profile CSV under ``root``.

        :param gpu: GPU for files whose path names none (a flat folder).
        :raises FileNotFoundError: when ``root`` is missing or holds no profile CSV.
        :raises ValueError: a file with missing columns, or whose GPU cannot be told.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"profile directory not found: {root}")
        default_gpu = get_gpu(gpu).name if gpu is not None else None
        profiles = cls()
        readers: dict[str, Callable[[Path, str], None]] = {
            "mlp.csv": profiles._add_mlp,
            "attention.csv": profiles._add_attention,
            "all_reduce.csv": profiles._add_all_reduce,
            "send_recv.csv": profiles._add_send_recv,
        }
        found = 0
        for path in sorted(root.rglob("*.csv")):
            reader = readers.get(path.name)
            if reader is None:
                continue
            gpu_name = gpu_name_from_path(path, root) or default_gpu
            if gpu_name is None:
                raise ValueError(
                    f"{path}: cannot tell the GPU from the path; pass gpu= (one of {', '.join(sorted(GPU_CATALOG))})"
                )
            reader(path, gpu_name)
            found += 1
        if not found:
            raise FileNotFoundError(
                f"no mlp.csv / attention.csv / all_reduce.csv / send_recv.csv under {root}"
            )
        return profiles

    def _add_mlp(self, path: Path, gpu: str) -> None:
        median_columns = [f"time_stats.{op}.median" for op in MLP_OPERATIONS]
        columns = read_vidur_csv(path, (*_MLP_KEYS, *median_columns))
        keys = {name: _floats(columns[name]).astype(np.int64) for name in _MLP_KEYS}
        shapes = np.stack(
            [keys["n_head"], keys["n_kv_head"], keys["n_embd"], keys["n_expanded_embd"]], axis=1
        )
        tokens = keys["num_tokens"].astype(np.float64)
        for shape_row in np.unique(shapes, axis=0):
            shape = (int(shape_row[0]), int(shape_row[1]), int(shape_row[2]), int(shape_row[3]))
            of_shape = np.all(shapes == shape_row, axis=1)
            for tp in np.unique(keys["num_tensor_parallel_workers"][of_shape]):
                rows = of_shape & (keys["num_tensor_parallel_workers"] == tp)
                self.mlp[(gpu, shape, int(tp))] = {
                    op: _Curve.build(tokens[rows], _floats(columns[f"time_stats.{op}.median"])[rows] * _MS)
                    for op in MLP_OPERATIONS
                }

    def _add_attention(self, path: Path, gpu: str) -> None:
        columns = read_vidur_csv(path, _ATTENTION_KEYS)
        numbers = {name: _floats(columns[name]) for name in _ATTENTION_KEYS if name != "is_prefill"}
        is_prefill = np.array([v.strip().lower() == "true" for v in columns["is_prefill"]])
        shapes = np.stack([numbers["n_embd"], numbers["n_q_head"], numbers["n_kv_head"]], axis=1).astype(
            np.int64
        )
        tps = numbers["num_tensor_parallel_workers"].astype(np.int64)
        for shape_row in np.unique(shapes, axis=0):
            shape = (int(shape_row[0]), int(shape_row[1]), int(shape_row[2]))
            for tp in np.unique(tps):
                rows = np.all(shapes == shape_row, axis=1) & (tps == tp)
                prefill, decode = rows & is_prefill, rows & ~is_prefill
                key = (gpu, shape, int(tp))
                if prefill.any():
                    self.attention_prefill[key] = _Grid2D.build(
                        numbers["prefill_chunk_size"][prefill],
                        numbers["kv_cache_size"][prefill],
                        numbers["time_stats.attn_prefill.median"][prefill] * _MS,
                    )
                if decode.any():
                    self.attention_decode[key] = _Grid2D.build(
                        numbers["batch_size"][decode],
                        numbers["kv_cache_size"][decode],
                        numbers["time_stats.attn_decode.median"][decode] * _MS,
                    )

    def _network_curves(self, path: Path, collective: str) -> dict[tuple[int, int], _Curve]:
        time_column = f"time_stats.{collective}.median"
        columns = read_vidur_csv(path, (*_NETWORK_KEYS, time_column))
        workers = _floats(columns["num_workers"]).astype(np.int64)
        per_node = _floats(columns["devices_per_node"]).astype(np.int64)
        size = _floats(columns["size"])
        seconds = _floats(columns[time_column]) * _MS
        curves = {}
        for w, n in {(int(a), int(b)) for a, b in zip(workers, per_node, strict=True)}:
            rows = (workers == w) & (per_node == n)
            curves[(w, n)] = _Curve.build(size[rows], seconds[rows])
        return curves

    def _add_all_reduce(self, path: Path, gpu: str) -> None:
        for (workers, per_node), curve in self._network_curves(path, "all_reduce").items():
            self.all_reduce[(gpu, workers, per_node)] = curve

    def _add_send_recv(self, path: Path, gpu: str) -> None:
        for (workers, per_node), curve in self._network_curves(path, "send_recv").items():
            self.send_recv[(gpu, per_node < workers)] = curve


def _extend_grid(
    grid: _Grid2D, outer: float, inner: float, roofline: Callable[[float, float], float]
) -> float:
    """Grid value inside the profiled region; outside it, the value at the nearest profiled point
    scaled by the roofline's ratio between the asked and the nearest point."""
    outer_c, inner_c = grid.clamp(outer, inner)
    value = grid.lookup(outer_c, inner_c)
    if (outer_c, inner_c) == (outer, inner):
        return value
    return value * roofline(outer, inner) / roofline(outer_c, inner_c)


def _model_shape(model: ModelSpec) -> tuple[int, int, int, int]:
    return (model.num_heads, model.num_kv_heads, model.hidden_size, model.ffn_size)


class ProfileTableCostModel:
    """Cost model that interpolates Vidur-format profile tables (see the module docstring).

    :param profiles_dir: directory with the CSVs (e.g. ``reference_dir()/vidur_profiles/data/profiling``).
    :param fallback: model for what the tables do not cover (default: the calibrated roofline).
    :param gpu: GPU for CSVs whose path names none.
    """

    def __init__(
        self, profiles_dir: Path | str, fallback: RooflineCostModel | None = None, gpu: str | None = None
    ) -> None:
        self.profiles = VidurProfiles.load(profiles_dir, gpu=gpu)
        self.fallback = fallback if fallback is not None else RooflineCostModel()
        self._unit_cache: dict[tuple[object, ...], tuple[ModelSpec, GPUSpec, float]] = {}

    # ------------------------------------------------------------------ coverage
    def coverage(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int) -> str:
        """``"table"`` when profiles answer this (model, unit, GPU, TP), else ``"roofline"``."""
        unit = UnitKind(unit)
        if unit is UnitKind.ATTENTION:
            key = (gpu.name, (model.hidden_size, model.num_heads, model.num_kv_heads), tp)
            covered = key in self.profiles.attention_prefill or key in self.profiles.attention_decode
        else:
            covered = (
                unit in MLP_OPERATIONS.values()
                and not model.is_moe
                and (gpu.name, _model_shape(model), tp) in self.profiles.mlp
            )
        return "table" if covered else "roofline"

    # ------------------------------------------------------------------ units
    def unit_time_s(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> float:
        """See :meth:`opscale.sim.costmodel.CostModel.unit_time_s`; memoised per instance (keyed on the
        identity of ``model`` and ``gpu``, which each entry holds, as in the roofline model)."""
        key = (id(model), unit, id(gpu), tp, num_tokens)
        entry = self._unit_cache.get(key)
        if entry is not None:
            return entry[2]
        value = float(
            self.unit_time_s_array(model, unit, gpu, tp, np.array([num_tokens], dtype=np.float64))[0]
        )
        if len(self._unit_cache) >= UNIT_CACHE_MAX_ENTRIES:
            self._unit_cache.clear()
        self._unit_cache[key] = (model, gpu, value)
        return value

    def unit_time_s_array(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: np.ndarray
    ) -> np.ndarray:
        """Vectorised :meth:`unit_time_s`."""
        unit = UnitKind(unit)
        model.validate_tp(tp)
        tokens = as_nonnegative_array(tokens)
        if self.coverage(model, unit, gpu, tp) == "roofline":
            return self.fallback.unit_time_s_array(model, unit, gpu, tp, tokens)
        curves = self.profiles.mlp[(gpu.name, _model_shape(model), tp)]
        kernel_per_layer = np.zeros_like(tokens)
        for op, op_unit in MLP_OPERATIONS.items():
            if op_unit is unit:
                kernel_per_layer += self._extend_with_roofline(model, unit, gpu, tp, tokens, curves[op])
        bytes_per_token, collectives_per_pass = model.tp_allreduce(unit)
        collective = self.allreduce_time_s_array(gpu, tp, tokens * bytes_per_token) * collectives_per_pass
        return kernel_per_layer * model.layers_of(unit) + collective

    def _extend_with_roofline(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: np.ndarray, curve: _Curve
    ) -> np.ndarray:
        inside = np.interp(tokens, curve.x, curve.y, left=curve.y[0])
        top = curve.x[-1]
        beyond = tokens > top
        if beyond.any():
            edge = self.fallback.unit_time_s_array(model, unit, gpu, tp, np.array([top]))[0]
            ratio = self.fallback.unit_time_s_array(model, unit, gpu, tp, tokens[beyond]) / edge
            inside = inside.copy()
            inside[beyond] = curve.y[-1] * ratio
        # below the smallest profiled count (>0) the kernel still costs its floor
        return np.where(tokens > 0, inside, 0.0)

    # ------------------------------------------------------------------ attention
    def attention_time_s(self, model: ModelSpec, gpu: GPUSpec, tp: int, batch: AttentionBatch) -> float:
        """See :meth:`opscale.sim.costmodel.CostModel.attention_time_s`."""
        model.validate_tp(tp)
        coeffs = self.fallback.coefficients_for(gpu).attention
        key = (gpu.name, (model.hidden_size, model.num_heads, model.num_kv_heads), tp)
        prefill_grid = self.profiles.attention_prefill.get(key)
        decode_grid = self.profiles.attention_decode.get(key)

        def roofline_prefill(chunk: float, prior: float) -> float:
            """One chunk of ``chunk`` tokens after ``prior`` cached tokens."""
            pairs = chunk * prior + chunk * (chunk + 1) / 2
            return float(prefill_attention_time_s(model, gpu, tp, coeffs, chunk, pairs, 1.0))

        def roofline_decode(batch_size: float, mean_context: float) -> float:
            return float(
                decode_attention_time_s(model, gpu, tp, coeffs, batch_size, batch_size * mean_context)
            )

        tokens, prefills = float(batch.prefill_tokens), float(batch.num_prefills)
        if prefill_grid is not None and prefills:
            _, cached = split_prefill_pairs(tokens, float(batch.prefill_attention_pairs), prefills)
            chunk, prior = tokens / prefills, float(cached) / tokens
            prefill_s = prefills * _extend_grid(prefill_grid, chunk, prior, roofline_prefill)
        else:
            pairs = float(batch.prefill_attention_pairs)
            prefill_s = float(prefill_attention_time_s(model, gpu, tp, coeffs, tokens, pairs, prefills))
        decodes, context = float(batch.num_decodes), float(batch.decode_context_tokens)
        if decode_grid is not None and decodes:
            decode_s = _extend_grid(decode_grid, decodes, context / decodes, roofline_decode)
        else:
            decode_s = float(decode_attention_time_s(model, gpu, tp, coeffs, decodes, context))
        return (prefill_s + decode_s) * model.num_layers

    # ------------------------------------------------------------------ collectives
    def allreduce_time_s(self, gpu: GPUSpec, tp: int, num_bytes: float) -> float:
        """See :meth:`opscale.sim.costmodel.CostModel.allreduce_time_s`."""
        return float(self.allreduce_time_s_array(gpu, tp, np.array([num_bytes], dtype=np.float64))[0])

    def allreduce_time_s_array(self, gpu: GPUSpec, tp: int, num_bytes: np.ndarray) -> np.ndarray:
        """Vectorised all-reduce: the table for (GPU, ``tp`` workers on one node), else the fallback."""
        num_bytes = as_nonnegative_array(num_bytes)
        per_node = min(tp, self.fallback.gpus_per_node)
        curve = self.profiles.all_reduce.get((gpu.name, tp, per_node))
        if tp == 1 or curve is None:
            return self.fallback.allreduce_time_s_array(gpu, tp, num_bytes)
        return np.where(num_bytes > 0, _interp_extend(num_bytes, curve.x, curve.y), 0.0)

    def send_recv_time_s(self, gpu: GPUSpec, num_bytes: float, cross_node: bool = False) -> float:
        """See :meth:`opscale.sim.costmodel.CostModel.send_recv_time_s`."""
        as_nonnegative_array(num_bytes)
        curve = self.profiles.send_recv.get((gpu.name, cross_node))
        if curve is None:
            return self.fallback.send_recv_time_s(gpu, num_bytes, cross_node)
        if num_bytes == 0:
            return 0.0
        return float(_interp_extend(np.array([float(num_bytes)]), curve.x, curve.y)[0])

    def bound(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> str:
        """The roofline's verdict (a table has times, not FLOP and byte counts)."""
        return self.fallback.bound(model, unit, gpu, tp, num_tokens)
