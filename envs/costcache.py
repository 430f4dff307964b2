"""A memoising :class:`opscale.sim.costmodel_api.CostModel` wrapper, one per environment.

An environment builds a new simulator at every reset, and both simulators ask the cost model the same
questions again: the fluid model rebuilds its unit-time tables (``unit_time_s_array`` over a token
grid, ``bound`` on a coarse grid), the discrete-event engine asks ``bound`` for every call to decide its
power phase and ``attention_time_s`` for decode lines. Those answers depend only on their arguments,
and some are expensive (``bound`` of the roofline model takes ~0.1 ms), so the environment wraps its
cost model in :class:`MemoizedCostModel` and hands the same wrapper to every simulator it builds.

The cache belongs to the wrapper (no module-level state) and is dropped whole when it reaches
``max_entries``, which bounds memory for long runs with ever-new attention batches.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from opscale.sim.costmodel_api import AttentionBatch, CostModel
from opscale.sim.hardware import GPUSpec
from opscale.sim.models import ModelSpec, UnitKind

__all__ = ["MemoizedCostModel"]


class MemoizedCostModel:
    """Remembers ``bound``, ``attention_time_s``, ``unit_time_s`` and ``unit_time_s_array`` answers.

    Every other attribute is the wrapped model's. Arrays returned by :meth:`unit_time_s_array` are
    read-only copies shared between callers (the simulators only read them).

    :param inner: the cost model to ask on a miss.
    :param max_entries: cache size at which the cache is cleared.
    """

    def __init__(self, inner: CostModel, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.inner = inner
        self.max_entries = max_entries
        self._cache: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Answers currently cached."""
        return len(self._cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _remember(self, key: Hashable, value: Any) -> Any:
        self.misses += 1
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = value
        return value

    def bound(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> str:
        key = ("bound", model, unit, gpu, tp, num_tokens)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return str(cached)
        return str(self._remember(key, self.inner.bound(model, unit, gpu, tp, num_tokens)))

    def unit_time_s(self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, num_tokens: int) -> float:
        key = ("unit", model, unit, gpu, tp, num_tokens)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return float(cached)
        return float(self._remember(key, self.inner.unit_time_s(model, unit, gpu, tp, num_tokens)))

    def unit_time_s_array(
        self, model: ModelSpec, unit: UnitKind, gpu: GPUSpec, tp: int, tokens: np.ndarray
    ) -> np.ndarray:
        array = np.asarray(tokens)
        key = ("unit_array", model, unit, gpu, tp, array.dtype.str, array.shape, array.tobytes())
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return np.asarray(cached)
        values = np.array(self.inner.unit_time_s_array(model, unit, gpu, tp, array), copy=True)
        values.setflags(write=False)
        return np.asarray(self._remember(key, values))

    def attention_time_s(self, model: ModelSpec, gpu: GPUSpec, tp: int, batch: AttentionBatch) -> float:
        key = ("attention", model, gpu, tp, batch)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return float(cached)
        return float(self._remember(key, self.inner.attention_time_s(model, gpu, tp, batch)))

    def allreduce_time_s(self, gpu: GPUSpec, tp: int, num_bytes: float) -> float:
        return self.inner.allreduce_time_s(gpu, tp, num_bytes)

    def send_recv_time_s(self, gpu: GPUSpec, num_bytes: float, cross_node: bool = False) -> float:
        return self.inner.send_recv_time_s(gpu, num_bytes, cross_node)
