"""Attention replicas as streams: continuous batching with chunked prefill (Sarathi / vLLM-v1 style).

A :class:`Stream` holds the KV cache of the requests routed to it and runs iterations back to back
while it has work. Each iteration it schedules, in order:

1. every running request in decode phase (one token each), allocating a KV block when a request
   crosses a block boundary; when no block is free the most recently admitted request is preempted
   (recompute: its KV is freed and it re-queues at the head, to prefill prompt + generated tokens);
2. prefill chunks of admitted, partially prefilled requests, within the token budget;
3. new requests from the FIFO queue while budget, ``max_running_requests`` and free KV blocks allow
   (KV blocks for the whole prefill are reserved at admission; decode growth is allocated on demand).

The end of an iteration emits one token per decode and the first token of every request whose
prefill completes. A TBT gap is the time since the request's previous token.

How an iteration's time is obtained is left to subclasses: :class:`InstanceStream` (a monolithic
model-level instance, one event per iteration, optional fast-forward of pure-decode runs) and
:class:`opscale.sim.pools.PooledStream` (operator-level: the iteration visits the unit pools).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import simpy

from opscale.sim.costmodel import AttentionBatch, CostModel
from opscale.sim.hardware import GPUSpec
from opscale.sim.models import ModelSpec, UnitKind
from opscale.sim.overhead import EngineOverhead
from opscale.sim.recorder import StreamGaps, TbtHistograms

__all__ = ["ActiveRequest", "InstanceStream", "IterationTimer", "Stream", "StreamHost"]


class ActiveRequest:
    """A request between arrival and completion (a fixed-size record; no per-token objects)."""

    __slots__ = (
        "arrival_s",
        "blocks",
        "computed",
        "ctx",
        "first_token_s",
        "gap_count",
        "gap_sum_s",
        "generated",
        "hist_row",
        "image_patches",
        "index",
        "last_token_s",
        "output",
        "preemptions",
        "prompt",
        "queued_s",
        "stream",
        "target",
        "tbt_max_s",
        "ttft_decided",
    )

    def __init__(
        self, index: int, arrival_s: float, prompt: int, output: int, hist_row: int, image_patches: int = 0
    ) -> None:
        self.index = index
        #: vision-encoder input patches (encoded once, with the request's first prefill chunk)
        self.image_patches = image_patches
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.hist_row = hist_row
        #: tokens generated so far
        self.generated = 0
        #: prefill tokens computed since (re)admission, and the prefill target (prompt + regenerated)
        self.computed = 0
        self.target = prompt
        #: tokens held in KV, and KV blocks allocated
        self.ctx = 0
        self.blocks = 0
        self.first_token_s = -1.0
        self.last_token_s = -1.0
        self.tbt_max_s = 0.0
        self.gap_sum_s = 0.0
        self.gap_count = 0
        self.preemptions = 0
        #: when it last joined a stream's queue (admission-wait statistics)
        self.queued_s = arrival_s
        self.stream: Stream | None = None
        #: decided early as a TTFT violation (see :mod:`opscale.sim.metrics`)
        self.ttft_decided = False

    @property
    def remaining_work_tokens(self) -> int:
        """Prefill tokens still to compute plus tokens still to generate (for routing)."""
        return (self.target - self.computed) + (self.output - self.generated)


class StreamHost(Protocol):
    """What a stream reports to its simulator."""

    env: simpy.Environment

    def on_tokens(self, stream: Stream, prompt_tokens: int, output_tokens: int, preemptions: int) -> None: ...

    tbt: TbtHistograms

    def on_first_token(self, request: ActiveRequest, now_s: float) -> None: ...

    def on_complete(self, request: ActiveRequest, now_s: float) -> None: ...

    def on_stream_drained(self, stream: Stream) -> bool:
        """A draining stream reached an iteration boundary: hand its requests over; ``True`` if it left."""
        ...


@dataclass
class Batch:
    """One iteration's work: decodes and ``(request, chunk)`` prefill chunks."""

    decodes: list[ActiveRequest]
    chunks: list[tuple[ActiveRequest, int]]
    decode_context_tokens: int
    prefill_tokens: int
    prefill_pairs: float
    #: vision-encoder patches of the requests starting their prefill in this batch
    vision_patches: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + self.prefill_tokens

    def attention(self) -> AttentionBatch:
        return AttentionBatch(
            num_decodes=len(self.decodes),
            decode_context_tokens=self.decode_context_tokens,
            prefill_tokens=self.prefill_tokens,
            prefill_attention_pairs=self.prefill_pairs,
            num_prefills=len(self.chunks),
        )


class IterationTimer:
    """Memoised kernel times of one (model, GPU, TP) for the engine's hot loop.

    Decode-only attention is taken as ``a(n) + b(n) * context_tokens`` per batch size ``n``, probed
    from the cost model at two contexts; this is exact for the roofline model (its decode term is a
    floor, a per-sequence term and a byte/FLOP term proportional to the context) and a secant
    approximation for a table backend. Batches with prefill call the cost model directly.
    """

    def __init__(self, model: ModelSpec, gpu: GPUSpec, tp: int, cost_model: CostModel) -> None:
        self.model = model
        self.gpu = gpu
        self.tp = tp
        self.cost_model = cost_model
        self._decode_line: dict[int, tuple[float, float]] = {}
        #: per unit, time by token count (index), filled in vectorised blocks
        self._tables: dict[UnitKind, list[float]] = {}
        self._compute_threshold: dict[UnitKind, int] = {}

    def compute_bound_from(self, unit: UnitKind) -> int:
        """Smallest token count at which a call of ``unit`` is compute-bound (the roofline bound is
        monotone in tokens: memory-bound GEMMs at small batch, compute-bound at large). Both
        granularities flag a call's whole time as compute-bound from it (energy)."""
        threshold = self._compute_threshold.get(unit)
        if threshold is None:

            def compute(tokens: int) -> bool:
                return self.cost_model.bound(self.model, unit, self.gpu, self.tp, tokens) == "compute"

            low, high = 0, 1 << 20
            if not compute(high):
                threshold = high
            else:
                while high - low > 1:
                    mid = (low + high) // 2
                    if compute(mid):
                        high = mid
                    else:
                        low = mid
                threshold = high
            self._compute_threshold[unit] = threshold
        return threshold

    def unit_s(self, unit: UnitKind, tokens: int) -> float:
        """All-layer time of ``unit`` for ``tokens`` tokens (a table lookup after the first call)."""
        table = self._tables.get(unit)
        if table is None or tokens >= len(table):
            table = self._grow(unit, tokens)
        return table[tokens]

    def table(self, unit: UnitKind) -> list[float]:
        """The unit's time-by-token-count table built so far (read-only use)."""
        return self._tables[unit]

    def _grow(self, unit: UnitKind, tokens: int) -> list[float]:
        size = max(4096, 1 << int(tokens).bit_length())
        values = self.cost_model.unit_time_s_array(
            self.model, unit, self.gpu, self.tp, np.arange(size, dtype=np.float64)
        )
        table: list[float] = np.asarray(values, dtype=np.float64).tolist()
        table[0] = 0.0
        self._tables[unit] = table
        return table

    def decode_line(self, num_decodes: int) -> tuple[float, float]:
        """``(a, b)`` with decode attention time ``a + b * context_tokens`` for ``num_decodes`` decodes."""
        line = self._decode_line.get(num_decodes)
        if line is None:
            low, high = 64 * num_decodes, 2048 * num_decodes
            t_low = self.cost_model.attention_time_s(
                self.model,
                self.gpu,
                self.tp,
                AttentionBatch(num_decodes=num_decodes, decode_context_tokens=low),
            )
            t_high = self.cost_model.attention_time_s(
                self.model,
                self.gpu,
                self.tp,
                AttentionBatch(num_decodes=num_decodes, decode_context_tokens=high),
            )
            slope = (t_high - t_low) / (high - low)
            line = (t_low - slope * low, slope)
            self._decode_line[num_decodes] = line
        return line

    def attention_s(self, batch: Batch) -> float:
        if not batch.chunks:
            if not batch.decodes:
                return 0.0
            a, b = self.decode_line(len(batch.decodes))
            return a + b * batch.decode_context_tokens
        return self.cost_model.attention_time_s(self.model, self.gpu, self.tp, batch.attention())


class Stream:
    """An attention replica: request queue, KV blocks and the iteration scheduler.

    :param stream_id: index used in records.
    :param host: the simulator receiving token and completion events.
    :param kv_tokens: KV-cache capacity in tokens.
    :param block_tokens: tokens per KV block.
    :param token_budget: tokens per iteration.
    :param max_running: most requests admitted at once.
    :param overhead: engine overhead per iteration.
    :param overhead_ranks: GPUs driven by the stream's engine (for the per-rank overhead term).
    """

    def __init__(
        self,
        stream_id: int,
        host: StreamHost,
        *,
        kv_tokens: int,
        block_tokens: int,
        token_budget: int,
        max_running: int,
        overhead: EngineOverhead,
        overhead_ranks: int,
    ) -> None:
        self.stream_id = stream_id
        self.host = host
        self.env = host.env
        self.block_tokens = block_tokens
        self.total_blocks = kv_tokens // block_tokens
        self.free_blocks = self.total_blocks
        self.token_budget = token_budget
        self.max_running = max_running
        self.overhead = overhead
        self.overhead_ranks = overhead_ranks
        self.decoding: list[ActiveRequest] = []
        self.prefilling: list[ActiveRequest] = []
        self.waiting: deque[ActiveRequest] = deque()
        #: prefill + decode tokens still owed to the requests routed here (routing signal)
        self.pending_work_tokens = 0
        self.adopted: list[ActiveRequest] = []
        self.active = False
        #: routable (False once the replica is being removed)
        self.accepting = True
        self.serving = False
        self.draining = False
        #: time integral of waiting prefill tokens since the last interval boundary
        self.waiting_token_s = 0.0
        self._waiting_tokens = 0
        self._waiting_changed_s = 0.0
        #: compute-bound (prefill) seconds since the last interval boundary (energy)
        self.compute_bound_s = 0.0
        self.tokens_scheduled = 0
        #: admissions and their summed queueing delay since the last interval boundary
        self.admissions = 0
        self.admission_wait_s = 0.0
        #: gap histogram shared by the decoding members, and when the current iteration started
        self.gaps = StreamGaps()
        self.tbt = host.tbt
        self.iteration_start_s = 0.0
        #: busy seconds since the last interval boundary
        self.busy_s = 0.0
        self.busy_since_s = 0.0
        self.iterations = 0

    # ------------------------------------------------------------------ capacity / routing
    @property
    def kv_tokens(self) -> int:
        return self.total_blocks * self.block_tokens

    def fits(self, request_tokens: int) -> bool:
        """Whether a request needing ``request_tokens`` of KV can ever run here."""
        return math.ceil(request_tokens / self.block_tokens) <= self.total_blocks

    def work_tokens(self, now_s: float) -> int:
        """Prefill + decode tokens still owed at ``now_s`` (running and queued)."""
        return self.pending_work_tokens

    def load_score(self, extra_tokens: int, now_s: float) -> float:
        """Capacity-weighted queue length after adding ``extra_tokens`` of work (lower is better)."""
        return (self.work_tokens(now_s) + extra_tokens) / max(1, self.kv_tokens)

    @property
    def num_requests(self) -> int:
        """Requests held: running, handed over and queued."""
        return len(self.decoding) + len(self.prefilling) + len(self.adopted) + len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling) + len(self.adopted)

    def _waiting_delta(self, tokens: int) -> None:
        now = self.env.now
        self.waiting_token_s += self._waiting_tokens * (now - self._waiting_changed_s)
        self._waiting_changed_s = now
        self._waiting_tokens += tokens

    def take_waiting_token_s(self) -> float:
        """Time integral of waiting prefill tokens since the previous call."""
        self._waiting_delta(0)
        value, self.waiting_token_s = self.waiting_token_s, 0.0
        return value

    # ------------------------------------------------------------------ intake
    def submit(self, request: ActiveRequest) -> None:
        """Route ``request`` here (arrival or hand-over)."""
        request.stream = self
        self.waiting.append(request)
        request.queued_s = self.env.now
        self._waiting_delta(request.target)
        self.pending_work_tokens += request.remaining_work_tokens
        self._wake()

    def adopt(self, request: ActiveRequest) -> None:
        """Take over a migrated request with its KV cache (resumes decoding if KV blocks allow,
        else it re-queues to recompute)."""
        request.stream = self
        self.adopted.append(request)
        self.pending_work_tokens += request.remaining_work_tokens
        self._wake()

    def _wake(self) -> None:
        if self.serving and not self.active:
            self._start_busy()
            self._next_iteration()
        else:
            self.on_new_work()

    def release_requests(self) -> list[ActiveRequest]:
        """Remove and return every request held (queued first, then running); KV is freed."""
        for r in self.decoding:
            self.tbt.leave(r.hist_row, self.gaps)
        held = [*self.waiting, *self.adopted, *self.prefilling, *self.decoding]
        self._waiting_delta(-self._waiting_tokens)
        self.waiting.clear()
        self.adopted.clear()
        self.prefilling.clear()
        self.decoding.clear()
        for r in held:
            self.free_blocks += r.blocks
            r.blocks = 0
        self.pending_work_tokens = 0
        return held

    def on_new_work(self) -> None:
        """Hook: a request arrived while an iteration (or run) is in flight."""

    def start_serving(self) -> None:
        """The replica finished loading: begin iterating if work is queued."""
        self.serving = True
        if not self.active and (self.waiting or self.adopted):
            self._start_busy()
            self._next_iteration()

    def _start_busy(self) -> None:
        self.active = True
        self.busy_since_s = self.env.now

    def _stop_busy(self) -> None:
        self.active = False
        self.busy_s += self.env.now - self.busy_since_s

    def take_busy(self, now_s: float) -> float:
        """Busy seconds since the previous call (interval accounting)."""
        if self.active:
            self.busy_s += now_s - self.busy_since_s
            self.busy_since_s = now_s
        busy, self.busy_s = self.busy_s, 0.0
        return busy

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, victim: ActiveRequest) -> None:
        if victim in self.prefilling:
            self.prefilling.remove(victim)
        else:
            self.decoding.remove(victim)
            self.tbt.leave(victim.hist_row, self.gaps)
        self.free_blocks += victim.blocks
        self.pending_work_tokens -= victim.remaining_work_tokens
        victim.blocks = 0
        victim.ctx = 0
        victim.computed = 0
        victim.target = victim.prompt + victim.generated
        victim.preemptions += 1
        self.pending_work_tokens += victim.remaining_work_tokens
        self.waiting.appendleft(victim)
        victim.queued_s = self.env.now
        self._waiting_delta(victim.target)

    def _take_adopted(self) -> int:
        """Move adopted (migrated) requests into the batch, or back to the queue to recompute."""
        preemptions = 0
        for r in self.adopted:
            need = -(-(r.ctx + 1) // self.block_tokens)
            if r.computed >= r.target and need <= self.free_blocks and self.num_running <= self.max_running:
                r.blocks = need
                self.free_blocks -= need
                self.decoding.append(r)
                self.tbt.join(r.hist_row, self.gaps)
            else:
                self.pending_work_tokens -= r.remaining_work_tokens
                r.ctx = r.computed = r.blocks = 0
                r.target = r.prompt + r.generated
                r.preemptions += 1
                preemptions += 1
                self.pending_work_tokens += r.remaining_work_tokens
                self.waiting.appendleft(r)
                r.queued_s = self.env.now
                self._waiting_delta(r.target)
        self.adopted.clear()
        return preemptions

    def schedule(self) -> tuple[Batch, int]:
        """Build the next iteration's batch; returns it with the number of preemptions made."""
        preemptions = self._take_adopted() if self.adopted else 0
        block = self.block_tokens
        # 1. decodes: every decode crossing a block boundary needs one block; preempt until they fit
        while True:
            crossing: list[ActiveRequest] = []
            decode_context = 0
            for r in self.decoding:
                decode_context += r.ctx + 1
                if r.ctx + 1 > r.blocks * block:
                    crossing.append(r)
            if len(crossing) <= self.free_blocks or not (self.decoding or self.prefilling):
                break
            victim = self.prefilling[-1] if self.prefilling else self.decoding[-1]
            self._preempt(victim)
            preemptions += 1
        for r in crossing:
            r.blocks += 1
        self.free_blocks -= len(crossing)
        budget = self.token_budget - len(self.decoding)
        chunks: list[tuple[ActiveRequest, int]] = []
        prefill_tokens = 0
        pairs = 0.0
        # 2. continue partial prefills
        for r in self.prefilling:
            if budget <= 0:
                break
            chunk = min(r.target - r.computed, budget)
            chunks.append((r, chunk))
            budget -= chunk
            prefill_tokens += chunk
            pairs += chunk * r.computed + chunk * (chunk + 1) / 2
        # 3. admit new requests (FIFO; whole-prefill KV reserved at admission)
        while budget > 0 and self.waiting and len(self.decoding) + len(self.prefilling) < self.max_running:
            head = self.waiting[0]
            need = -(-(head.target + 1) // block)
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            self._waiting_delta(-head.target)
            self.admission_wait_s += self.env.now - head.queued_s
            self.admissions += 1
            head.blocks = need
            self.free_blocks -= need
            self.prefilling.append(head)
            chunk = min(head.target, budget)
            chunks.append((head, chunk))
            budget -= chunk
            prefill_tokens += chunk
            pairs += chunk * (chunk + 1) / 2
        vision_patches = sum(r.image_patches for r, _ in chunks if r.computed == 0) if chunks else 0
        return Batch(
            self.decoding, chunks, decode_context, prefill_tokens, pairs, vision_patches
        ), preemptions

    def finish(self, batch: Batch, now_s: float) -> None:
        """Apply the end of an iteration: tokens, first tokens, completions."""
        host = self.host
        self.iterations += 1
        output_tokens = len(batch.decodes)
        completed: list[ActiveRequest] = []
        tbt = self.tbt
        if batch.decodes:
            # every decode shares the iteration's gap, except after a hand-over (own gap, banked alone)
            shared_gap = now_s - self.iteration_start_s
            for r in batch.decodes:
                r.ctx += 1
                r.generated += 1
                gap = now_s - r.last_token_s
                r.last_token_s = now_s
                r.gap_sum_s += gap
                r.gap_count += 1
                if gap > r.tbt_max_s:
                    r.tbt_max_s = gap
                # (back-to-back iterations give the shared gap exactly: skip the tolerance test)
                if gap != shared_gap and abs(gap - shared_gap) > 1e-9:
                    tbt.replace_shared(r.hist_row, shared_gap, gap)
                if r.generated >= r.output:
                    completed.append(r)
            self.gaps.add(shared_gap)
        self.pending_work_tokens -= output_tokens
        for r, chunk in batch.chunks:
            r.computed += chunk
            r.ctx += chunk
            self.pending_work_tokens -= chunk
            if r.computed >= r.target:
                self.prefilling.remove(r)
                r.generated += 1
                output_tokens += 1
                self.pending_work_tokens -= 1
                if r.first_token_s < 0:
                    r.first_token_s = now_s
                    host.on_first_token(r, now_s)
                else:
                    gap = now_s - r.last_token_s
                    r.gap_sum_s += gap
                    r.gap_count += 1
                    r.tbt_max_s = max(r.tbt_max_s, gap)
                    tbt.add_own(r.hist_row, gap)
                r.last_token_s = now_s
                if r.generated < r.output:
                    self.decoding.append(r)
                    tbt.join(r.hist_row, self.gaps)
                else:
                    self._complete(r, now_s)
        host.on_tokens(self, batch.prefill_tokens, output_tokens, 0)
        if completed:
            self.decoding = [r for r in self.decoding if r.generated < r.output]
            for r in completed:
                tbt.leave(r.hist_row, self.gaps)
                self._complete(r, now_s)

    def _complete(self, request: ActiveRequest, now_s: float) -> None:
        self.free_blocks += request.blocks
        request.blocks = 0
        self.host.on_complete(request, now_s)

    def _next_iteration(self) -> None:
        """Schedule and start the next iteration, or go idle."""
        raise NotImplementedError

    def _may_run(self) -> bool:
        """False when the stream stops instead of running an iteration: drained (the host retires it)
        or not serving (it goes idle)."""
        if self.draining and self.host.on_stream_drained(self):
            return False
        if not self.serving:
            self._stop_busy()
            return False
        return True

    def _next_batch(self) -> Batch | None:
        """The next iteration's batch (its preemptions reported), or None: nothing to run, the stream
        goes idle."""
        batch, preemptions = self.schedule()
        if preemptions:
            self.host.on_tokens(self, 0, 0, preemptions)
        if not batch.decodes and not batch.chunks:
            self._stop_busy()
            return None
        return batch


class InstanceStream(Stream):
    """A stream whose every unit is dedicated and co-located (a model-level instance, or one pipeline
    micro-batch slot of it): an iteration is one event whose time is

    ``overhead + sum of unit times (all layers, TP all-reduce included) + attention + PP hops``.

    With ``pp`` stages the instance runs ``pp`` such streams (one per in-flight micro-batch, each
    with 1/pp of the KV cache), each iteration crossing the ``pp - 1`` stage boundaries: with evenly
    split layers a full pipeline starts one micro-batch per stage time, which is what ``pp``
    independent streams of full-pass iterations give (stage collisions are not modelled).

    Fast-forward: when a stream holds only decodes and can admit nothing, the iterations up to the
    next completion (or the KV limit) are identical in structure and their times grow linearly with
    the context; they run as one event, interrupted (at the next iteration end) by an arrival routed
    here. Gaps are recorded in bulk.
    """

    def __init__(
        self,
        stream_id: int,
        host: StreamHost,
        *,
        timer: IterationTimer,
        units: tuple[UnitKind, ...],
        pp_hop_s: tuple[float, float],
        fast_forward: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream_id, host, **kwargs)
        self.timer = timer
        # the LM head runs on one token per sampled sequence, not on every prefill token
        # the vision encoder runs on image patches of requests starting their prefill
        self.dense_units = tuple(
            u for u in units if u not in (UnitKind.ATTENTION, UnitKind.LM_HEAD, UnitKind.VISION_ENCODER)
        )
        self.has_vision = UnitKind.VISION_ENCODER in units
        self.has_lm_head = UnitKind.LM_HEAD in units
        self.pp_hop_s = pp_hop_s
        self.fast_forward = fast_forward
        self._dense_cache: dict[int, float] = {}
        self._compute_dense_cache: dict[int, float] = {}
        self._lm_head_compute_from = timer.compute_bound_from(UnitKind.LM_HEAD) if self.has_lm_head else 0
        self._generation = 0
        #: the model-level instance this stream belongs to (set by the simulator)
        self.instance: Any = None
        # current run: start, iterations, first duration, per-iteration increment, committed count
        self._run_t0 = 0.0
        self._run_k = 0
        self._run_d1 = 0.0
        self._run_slope = 0.0
        self._run_done = 0
        self._run_reserved_blocks = 0
        #: iterations per (tokens, sequences) and attention seconds since the last interval boundary
        self._iteration_shapes: dict[tuple[int, int], int] = {}
        self._attention_busy_s = 0.0
        self._vision_busy_s = 0.0
        #: host (engine-overhead) seconds since the last interval boundary: the GPUs idle meanwhile
        self.overhead_s = 0.0

    def dense_s(self, tokens: int, sequences: int) -> float:
        """Time of every non-attention unit plus the pipeline hops for ``tokens`` tokens of which
        ``sequences`` are sampled."""
        value = self._dense_cache.get(tokens)
        if value is None:
            hop_fixed_s, hop_per_token_s = self.pp_hop_s
            value = sum(self.timer.unit_s(u, tokens) for u in self.dense_units)
            if hop_fixed_s or hop_per_token_s:
                value += hop_fixed_s + hop_per_token_s * tokens
            self._dense_cache[tokens] = value
        if self.has_lm_head:
            value += self.timer.unit_s(UnitKind.LM_HEAD, sequences)
        return value

    def _account_units(self, tokens: int, sequences: int, iterations: int, attention_s: float) -> None:
        key = (tokens, sequences)
        shapes = self._iteration_shapes
        shapes[key] = shapes.get(key, 0) + iterations
        self._attention_busy_s += attention_s
        self.compute_bound_s += iterations * self._compute_bound_units_s(tokens, sequences)

    def _compute_bound_units_s(self, tokens: int, sequences: int) -> float:
        """Time of the units whose calls are compute-bound at this size (whole calls, as the operator-
        level pools flag them): an instance's energy then equals that of the same units deployed as
        co-located operator replicas."""
        timer = self.timer
        value = self._compute_dense_cache.get(tokens)
        if value is None:
            value = sum(
                timer.unit_s(u, tokens) for u in self.dense_units if tokens >= timer.compute_bound_from(u)
            )
            self._compute_dense_cache[tokens] = value
        # the LM head is compute-bound only for very large sampled batches: one comparison per iteration
        if self.has_lm_head and sequences >= self._lm_head_compute_from:
            value += timer.unit_s(UnitKind.LM_HEAD, sequences)
        return value

    def take_overhead_s(self) -> float:
        """Host-overhead seconds since the previous call."""
        value, self.overhead_s = self.overhead_s, 0.0
        return value

    def take_unit_busy(self) -> dict[UnitKind, float]:
        """Busy seconds per unit (its share of iteration time) since the previous call."""
        timer = self.timer
        busy = {unit: 0.0 for unit in self.dense_units}
        lm_head = 0.0
        for (tokens, sequences), iterations in self._iteration_shapes.items():
            for unit in self.dense_units:
                busy[unit] += iterations * timer.unit_s(unit, tokens)
            lm_head += iterations * timer.unit_s(UnitKind.LM_HEAD, sequences) if self.has_lm_head else 0.0
        if self.has_lm_head:
            busy[UnitKind.LM_HEAD] = lm_head
        busy[UnitKind.ATTENTION] = self._attention_busy_s
        if self.has_vision:
            busy[UnitKind.VISION_ENCODER] = self._vision_busy_s
        self._iteration_shapes = {}
        self._attention_busy_s = self._vision_busy_s = 0.0
        return busy

    def _next_iteration(self) -> None:
        if not self._may_run():
            return
        if self.fast_forward and self._try_run():
            return
        batch = self._next_batch()
        if batch is None:
            return
        self.iteration_start_s = self.env.now
        tokens = batch.num_tokens
        sequences = len(batch.decodes) + len(batch.chunks)
        attention_s = self.timer.attention_s(batch)
        duration = (
            self.overhead.iteration_s(self.overhead_ranks, sequences)
            + self.dense_s(tokens, sequences)
            + attention_s
        )
        if batch.vision_patches and self.has_vision:
            vision_s = self.timer.unit_s(UnitKind.VISION_ENCODER, batch.vision_patches)
            duration += vision_s
            self._vision_busy_s += vision_s
            if batch.vision_patches >= self.timer.compute_bound_from(UnitKind.VISION_ENCODER):
                self.compute_bound_s += vision_s
        # the attention replica is busy for its kernels and the iteration's engine overhead
        host_s = self.overhead.iteration_s(self.overhead_ranks, sequences)
        self.overhead_s += host_s
        self._account_units(tokens, sequences, 1, attention_s + host_s)
        self.tokens_scheduled += tokens
        if batch.chunks:  # attention with prefill chunks is compute-bound (the pools' rule)
            self.compute_bound_s += attention_s
        self._generation += 1
        generation = self._generation
        event = self.env.timeout(duration)
        event.callbacks.append(lambda _e: self._iteration_done(batch, generation))

    def _iteration_done(self, batch: Batch, generation: int) -> None:
        if generation != self._generation:
            return
        self.finish(batch, self.env.now)
        self._next_iteration()

    # ------------------------------------------------------------------ fast-forward runs
    def _can_admit(self) -> bool:
        if not self.waiting or len(self.decoding) >= self.max_running:
            return False
        head = self.waiting[0]
        return -(-(head.target + 1) // self.block_tokens) <= self.free_blocks

    def _try_run(self) -> bool:
        """Start a fast-forwarded run of pure-decode iterations if the state allows (>= 2 iterations)."""
        decoding = self.decoding
        if self.prefilling or self.adopted or not decoding or self._can_admit():
            return False
        n = len(decoding)
        k = min(r.output - r.generated for r in decoding)
        if k < 2:
            return False
        block = self.block_tokens
        state = [(r.ctx, r.blocks) for r in decoding]

        def blocks_needed(iterations: int) -> int:
            return sum(max(0, -(-(ctx + iterations) // block) - alloc) for ctx, alloc in state)

        if blocks_needed(k) > self.free_blocks:
            low, high = 0, k  # largest feasible in [low, high)
            while high - low > 1:
                mid = (low + high) // 2
                if blocks_needed(mid) <= self.free_blocks:
                    low = mid
                else:
                    high = mid
            k = low
            if k < 2:
                return False
        reserved = blocks_needed(k)
        self.free_blocks -= reserved
        self._run_reserved_blocks = reserved
        context0 = sum(ctx for ctx, _ in state) + n
        a, b = self.timer.decode_line(n)
        base = self.overhead.iteration_s(self.overhead_ranks, n) + self.dense_s(n, n)
        self._run_t0 = self.env.now
        self._run_k = k
        self._run_d1 = base + a + b * context0
        self._run_slope = b * n
        self._run_done = 0
        self._schedule_run_end(k)
        return True

    def _run_end_s(self, j: int) -> float:
        return self._run_t0 + j * self._run_d1 + self._run_slope * j * (j - 1) / 2.0

    def _schedule_run_end(self, k: int) -> None:
        self._run_k = k
        self._generation += 1
        generation = self._generation
        event = self.env.timeout(self._run_end_s(k) - self.env.now)
        event.callbacks.append(lambda _e: self._run_done_event(generation))

    def in_run(self) -> bool:
        return self._run_k > 0

    def work_tokens(self, now_s: float) -> int:
        """As :meth:`Stream.work_tokens`, counting run iterations finished by ``now_s`` but not yet applied."""
        if not self._run_k:
            return self.pending_work_tokens
        unapplied = self.iterations_finished_by(now_s) - self._run_done
        return self.pending_work_tokens - len(self.decoding) * unapplied

    def on_new_work(self) -> None:
        """An arrival during a run: cut the run after the iteration in progress."""
        if self._run_k == 0:
            return
        self.commit_run(self.iterations_finished_by(self.env.now))
        finished = self.iterations_finished_by(self.env.now)
        cut = min(self._run_k, finished + 1)
        if cut < self._run_k:
            self._schedule_run_end(cut)

    def iterations_finished_by(self, time_s: float) -> int:
        """Iterations of the current run whose end is <= ``time_s``."""
        d1, slope, elapsed = self._run_d1, self._run_slope, time_s - self._run_t0
        if elapsed <= 0:
            return 0
        if slope <= 0:
            j = int(elapsed / d1)
        else:
            # j*d1 + slope*j*(j-1)/2 <= elapsed  ->  quadratic in j
            half = slope / 2.0
            j = int((-(d1 - half) + math.sqrt((d1 - half) ** 2 + 4 * half * elapsed)) / (2 * half))
        j = max(0, min(j, self._run_k))
        while j < self._run_k and self._run_end_s(j + 1) <= time_s:
            j += 1
        while j > 0 and self._run_end_s(j) > time_s:
            j -= 1
        return j

    def commit_run(self, upto: int) -> None:
        """Apply iterations ``_run_done + 1 .. upto`` of the current run (tokens, gaps, KV)."""
        done = self._run_done
        if upto <= done:
            return
        count = upto - done
        d1, slope = self._run_d1, self._run_slope
        first_gap = d1 + slope * done
        last_gap = d1 + slope * (upto - 1)
        total = count * (first_gap + last_gap) / 2.0
        end_s = self._run_end_s(upto)
        decoding = self.decoding
        n = len(decoding)
        block = self.block_tokens
        for r in decoding:
            # runs follow the previous iteration back to back, so every gap is an iteration duration
            r.ctx += count
            r.generated += count
            r.gap_sum_s += total
            r.gap_count += count
            if last_gap > r.tbt_max_s:
                r.tbt_max_s = last_gap
            r.last_token_s = end_s
            needed = -(-r.ctx // block)
            if needed > r.blocks:
                self._run_reserved_blocks -= needed - r.blocks
                r.blocks = needed
        self.gaps.add_ramp(first_gap, last_gap, count)
        self.overhead_s += count * self.overhead.iteration_s(self.overhead_ranks, n)
        self._account_units(n, n, count, total - count * self.dense_s(n, n))
        self.iterations += count
        self.tokens_scheduled += n * count
        self.pending_work_tokens -= n * count
        self.host.on_tokens(self, 0, n * count, 0)
        self._run_done = upto

    def _run_done_event(self, generation: int) -> None:
        if generation != self._generation:
            return
        self.commit_run(self._run_k)
        self._run_k = 0
        self.free_blocks += self._run_reserved_blocks
        self._run_reserved_blocks = 0
        now = self.env.now
        completed = [r for r in self.decoding if r.generated >= r.output]
        if completed:
            self.decoding = [r for r in self.decoding if r.generated < r.output]
            for r in completed:
                self.tbt.leave(r.hist_row, self.gaps)
                self._complete(r, now)
        self._next_iteration()

    def commit_until(self, time_s: float) -> None:
        """Interval boundary: apply the run's iterations that ended by ``time_s`` (the run goes on)."""
        if self._run_k:
            self.commit_run(self.iterations_finished_by(time_s))
