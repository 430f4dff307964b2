"""The request-stream type every other part of opscale consumes.

A :class:`RequestTrace` is a column store: one numpy array per field, one entry per request, sorted by
arrival time. It is immutable (frozen dataclass, read-only arrays), so slices and transformed copies can
be shared freely between the simulator, environments and experiments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

#: Tokens per Mooncake prefix block (``hash_ids`` granularity, ``shared/traces/README.md`` section 2).
PREFIX_BLOCK_TOKENS = 512


class TruncationPolicy(str, Enum):
    """What :meth:`RequestTrace.truncate_lengths` does with a request longer than the context limit."""

    CLIP = "clip"  # shorten it (prompt first), counted in the notes
    DROP = "drop"  # remove it, counted in the notes
    ERROR = "error"  # raise


TRUNCATION_POLICIES: tuple[str, ...] = tuple(policy.value for policy in TruncationPolicy)


def _frozen_array(values: object, dtype: type, name: str) -> np.ndarray:
    """Return a read-only 1-D copy of ``values`` with ``dtype`` (a copy, so the caller's array stays writable)."""
    array: np.ndarray = np.array(values, dtype=dtype, copy=True)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """A stream of inference requests.

    :param arrival_s: arrival times in seconds from the trace origin, float64, sorted ascending, >= 0.
    :param prompt_tokens: prompt (prefill) tokens per request, int64 >= 1.
    :param output_tokens: generated (decode) tokens per request, int64 >= 1.
    :param image_tokens: image tokens per request for multimodal traces, int64 >= 0, or ``None``.
    :param prefix_block_ids: per request, the Mooncake prefix-block hash ids (one per
        :data:`PREFIX_BLOCK_TOKENS` tokens; an equal id is a reusable KV block), or ``None``.
    :param name: a label (trace name plus the operations applied), for reports and plots.
    :param time_range_s: ``(start_s, end_s)`` the trace covers, when known (a window, a generated trace);
        ``None`` means "first arrival to last arrival". It matters for rates: a window with a quiet tail
        still spans its full length.
    :param notes: human-readable records of repairs made on the way (rows skipped, lengths clipped), so
        that nothing is changed silently.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    image_tokens: np.ndarray | None = None
    prefix_block_ids: tuple[np.ndarray, ...] | None = None
    name: str = ""
    time_range_s: tuple[float, float] | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        arrival_s = _frozen_array(self.arrival_s, np.float64, "arrival_s")
        prompt_tokens = _frozen_array(self.prompt_tokens, np.int64, "prompt_tokens")
        output_tokens = _frozen_array(self.output_tokens, np.int64, "output_tokens")
        count = arrival_s.size
        for column_name, column in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
            if column.size != count:
                raise ValueError(f"{column_name} has {column.size} entries, arrival_s has {count}")
        if count:
            if not np.all(np.isfinite(arrival_s)):
                raise ValueError(
                    f"arrival_s has a non-finite value at index {int(np.argmin(np.isfinite(arrival_s)))}"
                )
            if arrival_s[0] < 0:
                raise ValueError(f"arrival_s must be >= 0, got {arrival_s[0]} at index 0")
            decreasing = np.flatnonzero(np.diff(arrival_s) < 0)
            if decreasing.size:
                index = int(decreasing[0]) + 1
                raise ValueError(
                    f"arrival_s must be sorted ascending: index {index} ({arrival_s[index]}) "
                    f"comes before index {index - 1} ({arrival_s[index - 1]})"
                )
            for column_name, column in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
                if column.min() < 1:
                    index = int(np.argmin(column))
                    raise ValueError(f"{column_name} must be >= 1, got {column[index]} at index {index}")
        object.__setattr__(self, "arrival_s", arrival_s)
        object.__setattr__(self, "prompt_tokens", prompt_tokens)
        object.__setattr__(self, "output_tokens", output_tokens)
        if self.image_tokens is not None:
            image_tokens = _frozen_array(self.image_tokens, np.int64, "image_tokens")
            if image_tokens.size != count:
                raise ValueError(f"image_tokens has {image_tokens.size} entries, arrival_s has {count}")
            if count and image_tokens.min() < 0:
                index = int(np.argmin(image_tokens))
                raise ValueError(f"image_tokens must be >= 0, got {image_tokens[index]} at index {index}")
            object.__setattr__(self, "image_tokens", image_tokens)
        if self.prefix_block_ids is not None:
            if len(self.prefix_block_ids) != count:
                raise ValueError(
                    f"prefix_block_ids has {len(self.prefix_block_ids)} entries, arrival_s has {count}"
                )
            blocks = tuple(
                _frozen_array(ids, np.int64, "prefix_block_ids[i]") for ids in self.prefix_block_ids
            )
            object.__setattr__(self, "prefix_block_ids", blocks)
        if self.time_range_s is not None:
            start_s, end_s = (float(bound) for bound in self.time_range_s)
            if not (np.isfinite(start_s) and np.isfinite(end_s) and 0 <= start_s <= end_s):
                raise ValueError(
                    f"time_range_s must be finite with 0 <= start <= end, got {self.time_range_s}"
                )
            if count and (arrival_s[0] < start_s or arrival_s[-1] > end_s):
                raise ValueError(
                    f"arrivals [{arrival_s[0]}, {arrival_s[-1]}] fall outside time_range_s {self.time_range_s}"
                )
            object.__setattr__(self, "time_range_s", (start_s, end_s))
        object.__setattr__(self, "notes", tuple(self.notes))

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def __repr__(self) -> str:
        return (
            f"RequestTrace(name={self.name!r}, requests={len(self)}, duration_s={self.duration_s:.1f}, "
            f"mean_rate_per_s={self.mean_rate_per_s:.3f})"
        )

    @property
    def start_s(self) -> float:
        """Start of the covered time range: the explicit range start, else the first arrival (0 if empty)."""
        if self.time_range_s is not None:
            return self.time_range_s[0]
        return float(self.arrival_s[0]) if len(self) else 0.0

    @property
    def end_s(self) -> float:
        """End of the covered time range: the explicit range end, else the last arrival (0 if empty)."""
        if self.time_range_s is not None:
            return self.time_range_s[1]
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def duration_s(self) -> float:
        """Covered span in seconds: ``end_s - start_s`` (last minus first arrival unless a range is set)."""
        return self.end_s - self.start_s

    @property
    def mean_rate_per_s(self) -> float:
        """Requests per second over :attr:`duration_s`; 0 for an empty trace, ``inf`` for a zero span."""
        if not len(self):
            return 0.0
        duration_s = self.duration_s
        return len(self) / duration_s if duration_s > 0 else float("inf")

    # ------------------------------------------------------------------ selection helpers
    def _select(self, index: np.ndarray, **changes: object) -> RequestTrace:
        """A trace holding the requests at ``index`` (a boolean mask or sorted integer positions)."""
        positions = np.flatnonzero(index) if index.dtype == np.bool_ else index
        image_tokens = None if self.image_tokens is None else self.image_tokens[positions]
        prefix_block_ids = (
            None if self.prefix_block_ids is None else tuple(self.prefix_block_ids[i] for i in positions)
        )
        fields: dict[str, object] = {
            "arrival_s": self.arrival_s[positions],
            "prompt_tokens": self.prompt_tokens[positions],
            "output_tokens": self.output_tokens[positions],
            "image_tokens": image_tokens,
            "prefix_block_ids": prefix_block_ids,
        }
        fields.update(changes)
        return replace(self, **fields)  # type: ignore[arg-type]

    def _with_note(self, note: str) -> tuple[str, ...]:
        return (*self.notes, note)

    # ------------------------------------------------------------------ operations
    def window(self, start_s: float, end_s: float, *, rebase: bool = True) -> RequestTrace:
        """Requests arriving in ``[start_s, end_s)``.

        :param start_s: window start in the trace's time base (s).
        :param end_s: window end (s), exclusive; must be > ``start_s``.
        :param rebase: shift arrivals so that the window starts at 0.
        :returns: a trace whose :attr:`time_range_s` is the window, so its rate counts quiet stretches.
        """
        if not end_s > start_s >= 0:
            raise ValueError(f"window needs 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}")
        lo = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        hi = int(np.searchsorted(self.arrival_s, end_s, side="left"))
        positions = np.arange(lo, hi)
        offset_s = start_s if rebase else 0.0
        return self._select(
            positions,
            arrival_s=self.arrival_s[lo:hi] - offset_s,
            time_range_s=(start_s - offset_s, end_s - offset_s),
            name=f"{self.name}[{start_s:g}s:{end_s:g}s]",
        )

    def scale_time(self, factor: float) -> RequestTrace:
        """Stretch (``factor`` > 1, slower traffic) or compress (< 1, faster) time; lengths unchanged.

        The arrival rate is divided by ``factor`` and bursts keep their shape relative to the new clock.
        """
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"scale_time factor must be a positive finite number, got {factor}")
        time_range_s = (
            None
            if self.time_range_s is None
            else (self.time_range_s[0] * factor, self.time_range_s[1] * factor)
        )
        return replace(
            self,
            arrival_s=self.arrival_s * factor,
            time_range_s=time_range_s,
            name=f"{self.name}*time{factor:g}",
        )

    def scale_rate(self, factor: float, rng: np.random.Generator) -> RequestTrace:
        """Multiply the request rate by ``factor`` on the same clock, keeping the rate profile and bursts.

        * ``factor`` < 1 thins: each request is kept with probability ``factor`` (independent Bernoulli).
          The per-minute rate profile and on/off periods are kept; short-scale clustering weakens toward
          Poisson as it does for any independent thinning.
        * ``factor`` > 1 replicates: ``floor(factor)`` copies of every request, plus one more with
          probability ``factor - floor(factor)``. Each extra copy arrives uniformly inside the gap to the
          next request of the original, so it lands where the original traffic was dense (bursts stay
          bursts) and does not coincide with another arrival (unless the original gap is 0). A copy keeps its request's lengths; its prefix
          ids are moved to a disjoint id range per copy index, so every copy is an independent user
          population with the original's prefix-reuse structure (reuse is not inflated by duplicates).

        :param factor: rate multiplier, > 0.
        :param rng: the random source (thinning draws and copy placement).
        """
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"scale_rate factor must be a positive finite number, got {factor}")
        count = len(self)
        whole_copies = int(np.floor(factor))
        fraction = factor - whole_copies
        # copies_per_request[i]: how many times request i appears (original included).
        copies_per_request = np.full(count, whole_copies, dtype=np.int64)
        if fraction > 0:
            copies_per_request += rng.random(count) < fraction
        source = np.repeat(np.arange(count), copies_per_request)
        # copy_index: 0 for the first appearance (kept at the original time), 1, 2, ... for extra copies.
        starts = np.cumsum(copies_per_request) - copies_per_request
        copy_index = np.arange(source.size) - np.repeat(starts, copies_per_request)
        gaps_s = np.empty(count)
        if count:
            gaps_s[:-1] = np.diff(self.arrival_s)
            # The last request has no successor: use the mean gap (clipped to an explicit time range).
            mean_gap_s = self.duration_s / max(count - 1, 1)
            if self.time_range_s is not None:
                mean_gap_s = max(0.0, min(mean_gap_s, self.end_s - self.arrival_s[-1]))
            gaps_s[-1] = mean_gap_s
        arrival_s = (
            self.arrival_s[source] + np.where(copy_index > 0, rng.random(source.size), 0.0) * gaps_s[source]
        )
        order = np.argsort(arrival_s, kind="stable")
        source, copy_index, arrival_s = source[order], copy_index[order], arrival_s[order]
        prefix_block_ids = None
        if self.prefix_block_ids is not None:
            id_stride = 1 + max((int(ids.max()) for ids in self.prefix_block_ids if ids.size), default=0)
            prefix_block_ids = tuple(
                self.prefix_block_ids[i] + k * id_stride
                for i, k in zip(source.tolist(), copy_index.tolist(), strict=True)
            )
        return replace(
            self,
            arrival_s=arrival_s,
            prompt_tokens=self.prompt_tokens[source],
            output_tokens=self.output_tokens[source],
            image_tokens=None if self.image_tokens is None else self.image_tokens[source],
            prefix_block_ids=prefix_block_ids,
            name=f"{self.name}*rate{factor:g}",
        )

    def truncate_lengths(
        self, max_context: int, *, policy: TruncationPolicy | str = TruncationPolicy.CLIP
    ) -> RequestTrace:
        """Fit every request into a context window of ``max_context`` tokens (prompt + image + output).

        :param max_context: the context limit in tokens (>= 2: one prompt and one output token).
        :param policy: ``"clip"`` shortens the prompt first (to at least 1 token), then the output
            (to at least 1), then image tokens, and keeps the prefix ids of the blocks that remain; ``"drop"`` removes the requests that do
            not fit; ``"error"`` raises on the first one. Clip and drop append a note with the counts.
        """
        if policy not in TRUNCATION_POLICIES:
            raise ValueError(f"unknown truncation policy {policy!r}; choose one of {TRUNCATION_POLICIES}")
        policy = TruncationPolicy(policy)
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 tokens, got {max_context}")
        image_tokens = (
            self.image_tokens if self.image_tokens is not None else np.zeros(len(self), dtype=np.int64)
        )
        context = self.prompt_tokens + image_tokens + self.output_tokens
        too_long = context > max_context
        over_count = int(too_long.sum())
        if over_count == 0:
            return self
        if policy is TruncationPolicy.ERROR:
            index = int(np.argmax(too_long))
            raise ValueError(
                f"request {index} of trace {self.name!r} needs {int(context[index])} context tokens "
                f"(prompt {int(self.prompt_tokens[index])}, image {int(image_tokens[index])}, "
                f"output {int(self.output_tokens[index])}) > max_context {max_context}; "
                f"{over_count} requests exceed it (use policy='clip' or 'drop')"
            )
        if policy is TruncationPolicy.DROP:
            return self._select(
                ~too_long,
                notes=self._with_note(
                    f"truncate_lengths({max_context}, drop): dropped {over_count} of {len(self)} requests"
                ),
                name=f"{self.name}|ctx{max_context}",
            )
        # Clip: the prompt gives way first (down to 1 token), then the output (down to 1), then images.
        prompt_tokens = np.minimum(
            self.prompt_tokens, np.maximum(1, max_context - image_tokens - self.output_tokens)
        )
        output_tokens = np.minimum(
            self.output_tokens, np.maximum(1, max_context - image_tokens - prompt_tokens)
        )
        clipped_images = np.minimum(image_tokens, max_context - prompt_tokens - output_tokens)
        prompts_clipped = int((prompt_tokens < self.prompt_tokens).sum())
        outputs_clipped = int((output_tokens < self.output_tokens).sum())
        images_clipped = int((clipped_images < image_tokens).sum())
        prefix_block_ids = self.prefix_block_ids
        if prefix_block_ids is not None:
            blocks_kept = -(-prompt_tokens // PREFIX_BLOCK_TOKENS)
            prefix_block_ids = tuple(
                ids[:kept] for ids, kept in zip(prefix_block_ids, blocks_kept.tolist(), strict=True)
            )
        note = (
            f"truncate_lengths({max_context}, clip): {over_count} of {len(self)} requests clipped "
            f"({prompts_clipped} prompts, {outputs_clipped} outputs, {images_clipped} image inputs)"
        )
        return replace(
            self,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            image_tokens=None if self.image_tokens is None else clipped_images,
            prefix_block_ids=prefix_block_ids,
            notes=self._with_note(note),
            name=f"{self.name}|ctx{max_context}",
        )

    def concat(self, other: RequestTrace, *, gap_s: float = 0.0) -> RequestTrace:
        """Play ``other`` after this trace: ``other`` starts ``gap_s`` seconds after :attr:`end_s`.

        Image tokens missing on one side are filled with 0 (a text-only request). Prefix ids are kept
        as they are (they only mean something when both parts come from the same source trace); both
        sides must have them or neither.
        """
        if not (np.isfinite(gap_s) and gap_s >= 0):
            raise ValueError(f"concat gap_s must be a finite number >= 0, got {gap_s}")
        if (self.prefix_block_ids is None) != (other.prefix_block_ids is None):
            raise ValueError(
                f"cannot concat {self.name!r} and {other.name!r}: only one of them has prefix_block_ids"
            )
        offset_s = self.end_s + gap_s - other.start_s
        image_tokens = None
        if self.image_tokens is not None or other.image_tokens is not None:
            image_tokens = np.concatenate([_image_or_zeros(self), _image_or_zeros(other)])
        prefix_block_ids = None
        if self.prefix_block_ids is not None and other.prefix_block_ids is not None:
            prefix_block_ids = self.prefix_block_ids + other.prefix_block_ids
        has_range = self.time_range_s is not None or other.time_range_s is not None
        return RequestTrace(
            arrival_s=np.concatenate([self.arrival_s, other.arrival_s + offset_s]),
            prompt_tokens=np.concatenate([self.prompt_tokens, other.prompt_tokens]),
            output_tokens=np.concatenate([self.output_tokens, other.output_tokens]),
            image_tokens=image_tokens,
            prefix_block_ids=prefix_block_ids,
            name=f"{self.name}+{other.name}",
            time_range_s=(self.start_s, other.end_s + offset_s) if has_range else None,
            notes=self.notes + other.notes,
        )

    def rate_curve(self, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Arrival rate in consecutive bins of ``bin_s`` seconds, aligned to :attr:`start_s`.

        :returns: ``(bin_start_s, rate_per_s)``; the last bin may be partial and is divided by its full
            width (like the per-minute counts in ``shared/traces/README.md``).
        """
        if not (np.isfinite(bin_s) and bin_s > 0):
            raise ValueError(f"rate_curve bin_s must be a positive finite number, got {bin_s}")
        bins = max(1, int(np.ceil(self.duration_s / bin_s)))
        index = np.minimum(((self.arrival_s - self.start_s) // bin_s).astype(np.int64), bins - 1)
        counts = np.bincount(index, minlength=bins)
        return self.start_s + bin_s * np.arange(bins), counts / bin_s


def _image_or_zeros(trace: RequestTrace) -> np.ndarray:
    return trace.image_tokens if trace.image_tokens is not None else np.zeros(len(trace), dtype=np.int64)
