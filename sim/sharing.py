"""GPU sharing between co-located replicas: processor sharing of kernel time.

Every call a replica makes (a unit pool's batch, an attention replica's iteration) has *work*: its
kernel time on an otherwise idle GPU. While ``n`` calls run on a GPU, each progresses at rate
``1 / (1 + contention_factor * (n - 1))`` (``contention_factor`` = 1: egalitarian processor sharing,
work-conserving; 0: co-located replicas do not interfere, an idealised spatial partition such as MIG).
A call on a TP group progresses at the rate of its most shared GPU. Rates are recomputed whenever a
call starts or ends on one of its GPUs, and the finish events of the calls affected are rescheduled.

A call may also carry a *fixed* tail that does not shrink under sharing (inbound activation transfer,
host engine overhead): it is added once the work is done, and the call keeps its GPU share until it
ends (one event per call instead of two; the share a call holds during its tail is an overestimate of
contention by at most the tail's length).
"""

from __future__ import annotations

from collections.abc import Callable

import simpy
from simpy.core import NORMAL

from opscale.sim.cluster import ClusterState
from opscale.sim.config import ContentionModel, SimConfig

__all__ = ["GpuSharing"]


class _Finish:
    """A call's finish event, pushed straight onto SimPy's queue: what :meth:`simpy.Environment.step`
    reads of an event (``callbacks``, ``_ok``, ``_value``) and no more. A ``Timeout`` costs ~1.5 us to
    create and schedule, this ~0.9 us, and the engine schedules one per call."""

    __slots__ = ("_ok", "_value", "callbacks")

    def __init__(self, call: _Call, callback: Callable[[_Finish], None]) -> None:
        self._ok = True
        self._value = call
        self.callbacks: list[Callable[[_Finish], None]] | None = [callback]


class _Call:
    """One call in progress (a fixed-size record)."""

    __slots__ = (
        "compute_bound_s",
        "due_s",
        "end_s",
        "event",
        "fixed_s",
        "gpus",
        "on_done",
        "rate",
        "remaining_s",
        "updated_s",
    )

    def __init__(
        self,
        gpus: tuple[int, ...],
        work_s: float,
        fixed_s: float,
        compute_bound_s: float,
        on_done: Callable[[], None],
        now_s: float,
    ) -> None:
        self.gpus = gpus
        #: GPU work left as of ``updated_s`` (exclusive-GPU seconds)
        self.remaining_s = work_s
        self.updated_s = now_s
        self.fixed_s = fixed_s
        self.compute_bound_s = compute_bound_s
        self.on_done = on_done
        self.rate = 1.0
        #: when the call ends at the current rate, and when its pending event fires
        self.end_s = now_s + work_s + fixed_s
        self.due_s = self.end_s
        #: the pending finish event that counts (earlier ones of a re-timed call are stale)
        self.event: _Finish | None = None


class GpuSharing:
    """Runs calls on GPUs under the contention model of a :class:`SimConfig`.

    Finish events are rescheduled lazily: a call that slows down keeps its (now early) event and is
    re-timed when it fires; only a call that speeds up gets a new event.

    :param env: the SimPy environment.
    :param cluster: GPU state (busy and compute-bound integrals for utilisation and energy).
    :param config: ``contention`` and ``contention_factor``.
    """

    def __init__(self, env: simpy.Environment, cluster: ClusterState, config: SimConfig) -> None:
        self.env = env
        self.cluster = cluster
        self.factor = (
            config.contention_factor if config.contention is ContentionModel.PROCESSOR_SHARING else 0.0
        )
        self._gpus = cluster.gpus
        self._running: list[list[_Call]] = [[] for _ in cluster.gpus]
        # one bound method for every finish event (no closure per event)
        self._on_event = self._end

    def start(
        self,
        gpus: tuple[int, ...],
        work_s: float,
        on_done: Callable[[], None],
        *,
        fixed_s: float = 0.0,
        compute_bound_s: float = 0.0,
    ) -> None:
        """Run ``work_s`` seconds of GPU work on ``gpus`` (shared), then wait ``fixed_s``, then call
        ``on_done``.

        :param compute_bound_s: how much of ``work_s`` is compute-bound (energy).
        """
        now = self.env.now
        cluster_gpus = self._gpus
        for index in gpus:  # GpuState busy count and busy-time integral
            gpu = cluster_gpus[index]
            if gpu.busy == 0:
                gpu.busy_since_s = now
            gpu.busy += 1
        call = _Call(gpus, work_s, fixed_s, compute_bound_s, on_done, now)
        if self.factor:
            running_by_gpu = self._running
            affected: list[_Call] = []
            for index in gpus:
                running = running_by_gpu[index]
                if running:
                    for other in running:
                        if other not in affected:
                            affected.append(other)
                running.append(call)
            if affected:
                affected.append(call)
                self._rerate(affected, now)
        # _schedule, inlined (hot path); the call is new, so it has no earlier event
        call.due_s = call.end_s
        event = _Finish(call, self._on_event)
        self.env.schedule(event, NORMAL, call.end_s - now)  # type: ignore[arg-type]
        call.event = event

    def _rerate(self, calls: list[_Call], now_s: float) -> None:
        """Re-time ``calls`` after the number of calls on some of their GPUs changed."""
        running = self._running
        factor = self.factor
        for call in calls:
            # a call progresses at the rate of its most shared GPU
            gpus = call.gpus
            sharing = len(running[gpus[0]])
            for index in gpus[1:]:
                if len(running[index]) > sharing:
                    sharing = len(running[index])
            rate = 1.0 / (1.0 + factor * (sharing - 1))
            if rate == call.rate:
                continue
            remaining = call.remaining_s - (now_s - call.updated_s) * call.rate
            call.rate = rate
            call.updated_s = now_s
            if remaining <= 0.0:
                call.remaining_s = 0.0
                continue  # already in its fixed tail: the rate no longer matters
            call.remaining_s = remaining
            call.end_s = now_s + remaining / rate + call.fixed_s
            if call.end_s < call.due_s and call.event is not None:
                self._schedule(call, call.end_s, now_s)

    def _schedule(self, call: _Call, at_s: float, now_s: float) -> None:
        call.due_s = at_s
        event = _Finish(call, self._on_event)
        self.env.schedule(event, NORMAL, at_s - now_s)  # type: ignore[arg-type]
        call.event = event

    def _end(self, event: _Finish) -> None:
        call = event._value
        if event is not call.event:
            return  # re-timed since
        now = self.env.now
        if call.end_s > now + 1e-12:
            self._schedule(call, call.end_s, now)  # slowed down since the event was set
            return
        gpus = call.gpus
        cluster_gpus = self._gpus
        compute_bound_s = call.compute_bound_s
        for index in gpus:  # the busy time ends before the fixed tail (no GPU work)
            gpu = cluster_gpus[index]
            gpu.busy -= 1
            gpu.compute_bound_s += compute_bound_s
            if gpu.busy == 0:
                gpu.busy_s += max(0.0, now - call.fixed_s - gpu.busy_since_s)
        if self.factor:
            running_by_gpu = self._running
            affected: list[_Call] = []
            for index in gpus:
                running = running_by_gpu[index]
                running.remove(call)
                for other in running:
                    if other not in affected:
                        affected.append(other)
            if affected:
                self._rerate(affected, now)
        call.on_done()
