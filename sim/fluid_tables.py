"""Precomputed cost-model tables for the fluid simulator's hot loop.

Calling the cost model costs ~0.1-0.2 ms per vectorised call, more than a whole fluid step may take,
so the fluid simulator asks it once, at construction, and interpolates afterwards:

* :class:`UnitTimeTable`: per non-attention unit, the time of one call (all layers, TP collective
  included) and whether it is compute-bound, on a log-spaced token grid (:data:`GRID_POINTS_PER_OCTAVE`
  points per doubling from 1 to :data:`GRID_MAX_TOKENS` tokens), interpolated linearly in tokens
  between grid points. Beyond the grid the last segment is extrapolated linearly (GEMM time is
  affine in tokens there, far into the compute-bound regime). :attr:`UnitTimeTable.segments` holds each
  row as per-segment lines (:func:`segment_lines`), for the time and for the compute-bound time (0
  where the call is memory-bound): the form the compiled interval model
  (:mod:`opscale.sim.fluid_kernel`) looks up.
* :class:`AttentionSurrogate`: attention time of one iteration as a linear model in the batch
  statistics. Decode: ``a + b * decodes + c * context_tokens``, which is exact for the roofline
  backend (a floor, a per-sequence term and a byte term proportional to the context read; the engine's
  :class:`opscale.sim.streams.IterationTimer` uses the same line). Prefill: ``floor + per_prefill *
  chunks + new * new_pairs + cached * cached_pairs + kv * prior_tokens``, least-squares fitted to the
  cost model over chunk sizes 16..16,384 and prior contexts 0..128 K; :attr:`prefill_fit_error`
  reports the worst relative error of that fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from opscale.sim.costmodel import AttentionBatch, CostModel
from opscale.sim.hardware import GPUSpec
from opscale.sim.models import ModelSpec, UnitKind

__all__ = [
    "GRID_MAX_TOKENS",
    "GRID_POINTS_PER_OCTAVE",
    "AttentionSurrogate",
    "UnitTimeTable",
    "segment_lines",
]

FloatArray = NDArray[np.float64]

#: Token-grid resolution of :class:`UnitTimeTable` (points per doubling).
GRID_POINTS_PER_OCTAVE = 8
#: Largest tabulated call size, tokens (2**18 = 262,144: beyond any token budget x batch).
GRID_MAX_TOKENS = 2**18


def segment_lines(
    tokens: FloatArray, values: FloatArray, segment_mask: FloatArray | None = None
) -> FloatArray:
    """A function tabulated on the log grid as lines per segment: ``[intercepts, slopes]`` (shape
    ``(2, segments)``), so that between grid points ``value = intercept + slope x tokens``. For
    ``tokens >= 1`` the segment is ``min(int(log2(tokens) * GRID_POINTS_PER_OCTAVE), segments - 1)``;
    beyond the grid the last segment extends.

    :param tokens: the grid (``2 ** (i / GRID_POINTS_PER_OCTAVE)``).
    :param values: the function on the grid.
    :param segment_mask: optional 0/1 per grid point: the line is 0 on the segments starting at a 0
        (e.g. a unit's time where it is compute-bound, 0 where it is memory-bound).
    """
    slopes = np.diff(values) / np.diff(tokens)
    intercepts = values[:-1] - slopes * tokens[:-1]
    if segment_mask is not None:
        slopes, intercepts = slopes * segment_mask[:-1], intercepts * segment_mask[:-1]
    return np.stack([intercepts, slopes])


class UnitTimeTable:
    """Call time and compute-bound flag of each unit on a token grid, for one (model, GPU).

    :param model: the served model.
    :param gpu: the GPU type.
    :param cost_model: the cost model to tabulate.
    :param units: the rows, in order (non-attention units).
    :param tp: tensor-parallel degree per row.
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        cost_model: CostModel,
        units: Sequence[UnitKind],
        tp: Sequence[int],
    ) -> None:
        if len(units) != len(tp):
            raise ValueError(f"{len(units)} units but {len(tp)} TP degrees")
        octaves = int(np.log2(GRID_MAX_TOKENS))
        self.tokens = 2.0 ** (np.arange(octaves * GRID_POINTS_PER_OCTAVE + 1) / GRID_POINTS_PER_OCTAVE)
        self.units = tuple(units)
        rows = [
            cost_model.unit_time_s_array(model, u, gpu, t, self.tokens)
            for u, t in zip(units, tp, strict=True)
        ]
        self.time_s = np.asarray(rows, dtype=np.float64).reshape(len(units), self.tokens.size)
        # compute-bound share, probed on a coarse sub-grid (the flag only switches once, near the ridge)
        coarse = self.tokens[::GRID_POINTS_PER_OCTAVE]
        flags = np.array(
            [
                [cost_model.bound(model, u, gpu, t, int(k)) == "compute" for k in coarse]
                for u, t in zip(units, tp, strict=True)
            ],
            dtype=np.float64,
        ).reshape(len(units), coarse.size)
        self.compute_bound = np.repeat(flags, GRID_POINTS_PER_OCTAVE, axis=1)[:, : self.tokens.size]
        self._last = self.tokens.size - 1
        self._row_offsets = np.arange(len(units)) * self.tokens.size
        self._flat_time = self.time_s.ravel()
        self._flat_bound = self.compute_bound.ravel()
        #: ``[4, units, segments]``: per row, :func:`segment_lines` of the call time (intercepts, slopes)
        #: and of the compute-bound time (intercepts, slopes)
        self.segments = np.stack(
            [
                *np.stack([segment_lines(self.tokens, row) for row in self.time_s], axis=1),
                *np.stack(
                    [
                        segment_lines(self.tokens, row, flags)
                        for row, flags in zip(self.time_s, self.compute_bound, strict=True)
                    ],
                    axis=1,
                ),
            ]
        )
        for array in (self.tokens, self.time_s, self.compute_bound, self.segments):
            array.setflags(write=False)  # simulators share a table (read-only)

    def _position(self, tokens: FloatArray) -> tuple[NDArray[np.int64], FloatArray]:
        tokens = np.maximum(tokens, 1.0)
        index = np.minimum((np.log2(tokens) * GRID_POINTS_PER_OCTAVE).astype(np.int64), self._last - 1)
        low = self.tokens[index]
        frac = (tokens - low) / (self.tokens[index + 1] - low)
        return index, frac

    def time_s_at(self, tokens: FloatArray) -> FloatArray:
        """Call time of every row at ``tokens`` (shape ``(units,)`` or ``(units, n)``; 0 tokens -> 0)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        index, frac = self._position(tokens)
        offsets = self._row_offsets if tokens.ndim == 1 else self._row_offsets[:, None]
        flat = offsets + index
        low = self._flat_time[flat]
        result: FloatArray = np.where(tokens > 0, low + frac * (self._flat_time[flat + 1] - low), 0.0)
        return result

    def compute_bound_at(self, tokens: FloatArray) -> FloatArray:
        """Compute-bound flag (0/1) of every row at ``tokens`` (same shapes as :meth:`time_s_at`)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        index, _ = self._position(tokens)
        offsets = self._row_offsets if tokens.ndim == 1 else self._row_offsets[:, None]
        result: FloatArray = self._flat_bound[offsets + index]
        return result


class AttentionSurrogate:
    """Linear models of attention time for one (model, GPU, TP); see the module docstring.

    :param model: the served model.
    :param gpu: the GPU type.
    :param tp: tensor-parallel degree of the attention replica.
    :param cost_model: the cost model to fit.
    """

    def __init__(self, model: ModelSpec, gpu: GPUSpec, tp: int, cost_model: CostModel) -> None:
        def attention(batch: AttentionBatch) -> float:
            return cost_model.attention_time_s(model, gpu, tp, batch)

        # decode: three probes determine a + b * n + c * ctx exactly for the roofline backend
        t11 = attention(AttentionBatch(num_decodes=1, decode_context_tokens=512))
        t12 = attention(AttentionBatch(num_decodes=1, decode_context_tokens=8192))
        t21 = attention(AttentionBatch(num_decodes=33, decode_context_tokens=33 * 512))
        self.decode_per_context_s = (t12 - t11) / (8192 - 512)
        self.decode_per_request_s = (t21 - t11 - self.decode_per_context_s * 32 * 512) / 32
        self.decode_floor_s = t11 - self.decode_per_request_s - self.decode_per_context_s * 512

        chunks = np.array([16, 64, 256, 1024, 4096, 16384], dtype=np.float64)
        priors = np.array([0, 512, 4096, 32768, 131072], dtype=np.float64)
        chunk_grid, prior_grid = (a.ravel() for a in np.meshgrid(chunks, priors))
        times = np.array(
            [
                attention(
                    AttentionBatch(
                        prefill_tokens=int(c),
                        prefill_attention_pairs=float(c * p + c * (c + 1) / 2),
                        num_prefills=1,
                    )
                )
                for c, p in zip(chunk_grid, prior_grid, strict=True)
            ]
        )
        features = self._prefill_features(chunk_grid, prior_grid)
        # relative least squares: every point matters, short chunks as much as long ones
        weights = 1.0 / times
        coefficients, *_ = np.linalg.lstsq(features * weights[:, None], np.ones_like(times), rcond=None)
        #: the prefill model's coefficients (floor, per chunk token, per new pair, per chunk x prior token,
        #: per prior token)
        self.prefill_coefficients: FloatArray = coefficients
        self.prefill_coefficients.setflags(write=False)
        fitted = features @ coefficients
        #: worst relative error of the prefill fit on its grid
        self.prefill_fit_error = float(np.max(np.abs(fitted - times) / times))

    @staticmethod
    def _prefill_features(chunk: FloatArray, prior: FloatArray) -> FloatArray:
        new_pairs = chunk * (chunk + 1.0) / 2.0
        return np.stack([np.ones_like(chunk), chunk, new_pairs, chunk * prior, prior], axis=-1)

    def decode_s(self, decodes: float, context_tokens: float) -> float:
        """Attention time of ``decodes`` decode requests reading ``context_tokens`` KV entries in total."""
        if decodes <= 0:
            return 0.0
        return (
            self.decode_floor_s
            + self.decode_per_request_s * decodes
            + self.decode_per_context_s * context_tokens
        )

    def prefill_s(self, chunk_tokens: FloatArray, prior_tokens: FloatArray) -> FloatArray:
        """Attention time of one prefill chunk of ``chunk_tokens`` after ``prior_tokens`` of context
        (vectorised; 0 where ``chunk_tokens`` is 0)."""
        chunk = np.asarray(chunk_tokens, dtype=np.float64)
        prior = np.asarray(prior_tokens, dtype=np.float64)
        c0, c1, c2, c3, c4 = self.prefill_coefficients
        fitted = c0 + chunk * (c1 + c2 * 0.5 * (chunk + 1.0) + c3 * prior) + c4 * prior
        value: FloatArray = np.where(chunk > 0, np.maximum(fitted, 0.0), 0.0)
        return value
