"""Closed-form queueing results used by the fluid simulator and the operator-level greedy planner.

Everything here is vectorised numpy: every argument may be a scalar or an array, arrays broadcast
against each other, and the result has the broadcast shape (a 0-d array for all-scalar input; wrap it
in ``float()`` if you need a Python number). Nothing here imports scipy.

Notation (M/M/c, first-come first-served, infinite queue):

* ``arrival_rate_per_s`` (lambda): Poisson arrival rate of jobs.
* ``service_time_s`` (1/mu): mean exponential service time of one job on one server.
* ``servers`` (c): identical servers (replicas), an integer >= 0.
* offered load ``a = lambda / mu`` (Erlangs) and utilisation ``rho = a / c``.

Results, for ``rho < 1`` (``a`` < ``c``):

* Erlang-B blocking ``B(c, a)`` by the stable recursion ``B(0) = 1``,
  ``B(k) = a B(k-1) / (k + a B(k-1))``;
* Erlang-C probability of waiting ``C(c, a) = c B / (c - a (1 - B))``;
* mean wait in queue ``Wq = C / (c mu - lambda)``; mean queue length ``Lq = lambda Wq``;
* the waiting time is 0 with probability ``1 - C`` and otherwise exponential with rate
  ``c mu - lambda``: ``P(Wq > t) = C exp(-(c mu - lambda) t)``, so its ``q``-quantile is
  ``max(0, ln(C / (1 - q)) / (c mu - lambda))``.

When ``rho >= 1`` the queue is unstable: ``C = 1`` and the waits are ``inf``; callers that need finite
numbers (the fluid simulator, which carries the excess as a backlog) clip ``rho`` first.

General service times use the Allen-Cunneen approximation ``Wq(G/G/c) ~ Wq(M/M/c) (ca^2 + cs^2) / 2``
(``ca^2``, ``cs^2``: squared coefficients of variation of inter-arrival and service times).

**Batch service** (:func:`batch_service`): a stateless operator pool (``qkv_proj``, ``ffn``, ...) of
``c`` replicas, each taking every queued job up to a token cap when it frees up, serves jobs of
``job_tokens`` tokens. The mean jobs per call ``n`` grows with load. We use the fixed point
``n = clip(1 + Lq(n) / c, 1, n_cap)`` with ``n_cap = max(1, floor(cap / job_tokens))``: a replica that
frees up finds on average ``Lq / c`` jobs waiting for it besides the one that triggered it, and
``Lq(n)`` is the M/M/c queue length of *calls* (arrival rate ``lambda / n``, service time
``s(n * job_tokens)``) converted back to jobs. The right-hand side falls as ``n`` grows whenever
``s`` is sub-additive (GEMMs are memory-bound at small batch), so the fixed point is unique and we
find it by bisection. At light load ``n = 1`` (plain M/M/c); near saturation ``n`` rises until the
call utilisation settles below one, the batching effect that makes per-operator pools efficient.
If even ``n_cap`` cannot bring ``rho`` below one, the pool is overloaded (``stable = False``).

:class:`ErlangCTable` tabulates ``C(c, rho)`` once so that hot loops (the fluid simulator calls it
thousands of times per second) replace the ``O(c)`` recursion by one interpolated lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

__all__ = [
    "BatchServiceEstimate",
    "ErlangCTable",
    "allen_cunneen_wait_s",
    "batch_service",
    "erlang_b",
    "erlang_c",
    "mmc_mean_queue_length",
    "mmc_mean_wait_s",
    "mmc_wait_quantile_s",
    "mmc_wait_tail",
    "shared_erlang_c_table",
]


def _as_servers(servers: ArrayLike) -> NDArray[np.int64]:
    array = np.asarray(servers)
    if np.any(array < 0) or np.any(np.asarray(array, dtype=np.float64) != np.floor(array)):
        raise ValueError(f"servers must be integers >= 0, got {servers!r}")
    return array.astype(np.int64)


def _check_nonnegative(name: str, values: ArrayLike) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if np.any(~(array >= 0)):  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {values!r}")
    return array


def erlang_b(servers: ArrayLike, offered_load: ArrayLike) -> FloatArray:
    """Erlang-B blocking probability ``B(c, a)`` of an M/M/c/c loss system.

    :param servers: ``c``, integers >= 0.
    :param offered_load: ``a = lambda / mu`` in Erlangs, >= 0.
    :returns: ``B`` in [0, 1] (``1`` where ``c == 0``).
    """
    c = _as_servers(servers)
    a = _check_nonnegative("offered_load", offered_load)
    c, a = np.broadcast_arrays(c, a)
    blocking = np.ones(a.shape, dtype=np.float64)
    for k in range(1, int(c.max(initial=0)) + 1):
        step = a * blocking / (k + a * blocking)
        blocking = np.where(k <= c, step, blocking)
    return blocking


def erlang_c(servers: ArrayLike, offered_load: ArrayLike) -> FloatArray:
    """Erlang-C probability that an arriving job waits, ``C(c, a)``, of an M/M/c queue.

    :param servers: ``c``, integers >= 0.
    :param offered_load: ``a = lambda / mu`` in Erlangs, >= 0.
    :returns: ``C`` in [0, 1]; ``1`` where the queue is unstable (``a >= c``).
    """
    c = _as_servers(servers)
    a = _check_nonnegative("offered_load", offered_load)
    blocking = erlang_b(c, a)
    c, a = np.broadcast_arrays(c, a)
    stable = a < c
    denominator = np.where(stable, c - a * (1.0 - blocking), 1.0)
    return np.where(stable, c * blocking / denominator, 1.0)


def _rates(
    arrival_rate_per_s: ArrayLike, service_time_s: ArrayLike, servers: ArrayLike
) -> tuple[FloatArray, NDArray[np.int64], FloatArray, FloatArray]:
    """Return ``(lambda, c, C, c mu - lambda)`` broadcast; the drain rate is 0 where unstable."""
    lam = _check_nonnegative("arrival_rate_per_s", arrival_rate_per_s)
    service = _check_nonnegative("service_time_s", service_time_s)
    if np.any(service == 0):
        raise ValueError(f"service_time_s must be > 0, got {service_time_s!r}")
    c = _as_servers(servers)
    lam, service, c = np.broadcast_arrays(lam, service, c)
    prob_wait = erlang_c(c, lam * service)
    drain_rate = np.maximum(c / service - lam, 0.0)
    return lam, c, prob_wait, drain_rate


def mmc_mean_wait_s(
    arrival_rate_per_s: ArrayLike, service_time_s: ArrayLike, servers: ArrayLike
) -> FloatArray:
    """Mean time a job waits before service in an M/M/c queue, ``Wq = C / (c mu - lambda)``.

    :returns: seconds; ``inf`` where the queue is unstable, ``0`` where nothing arrives.
    """
    lam, _, prob_wait, drain_rate = _rates(arrival_rate_per_s, service_time_s, servers)
    with np.errstate(divide="ignore", invalid="ignore"):
        wait = np.where(drain_rate > 0, prob_wait / np.where(drain_rate > 0, drain_rate, 1.0), np.inf)
    return np.where(lam == 0, 0.0, wait)


def mmc_mean_queue_length(
    arrival_rate_per_s: ArrayLike, service_time_s: ArrayLike, servers: ArrayLike
) -> FloatArray:
    """Mean number of jobs waiting (not in service) in an M/M/c queue, ``Lq = lambda Wq`` (Little)."""
    lam = np.asarray(arrival_rate_per_s, dtype=np.float64)
    wait = mmc_mean_wait_s(arrival_rate_per_s, service_time_s, servers)
    return np.where(lam == 0, 0.0, lam * wait)


def mmc_wait_tail(
    wait_s: ArrayLike, arrival_rate_per_s: ArrayLike, service_time_s: ArrayLike, servers: ArrayLike
) -> FloatArray:
    """Probability that a job waits longer than ``wait_s``: ``P(Wq > t) = C exp(-(c mu - lambda) t)``.

    :param wait_s: ``t`` in seconds, >= 0.
    :returns: probability in [0, 1]; ``1`` where the queue is unstable.
    """
    t = _check_nonnegative("wait_s", wait_s)
    _, _, prob_wait, drain_rate = _rates(arrival_rate_per_s, service_time_s, servers)
    return np.where(drain_rate > 0, prob_wait * np.exp(-drain_rate * t), 1.0)


def mmc_wait_quantile_s(
    quantile: ArrayLike, arrival_rate_per_s: ArrayLike, service_time_s: ArrayLike, servers: ArrayLike
) -> FloatArray:
    """The ``quantile`` of the waiting time in an M/M/c queue (e.g. ``0.99`` for the p99 wait).

    :param quantile: in [0, 1).
    :returns: seconds: ``max(0, ln(C / (1 - q)) / (c mu - lambda))``; ``inf`` where unstable.
    """
    q = np.asarray(quantile, dtype=np.float64)
    if np.any(~((q >= 0) & (q < 1))):
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    _, _, prob_wait, drain_rate = _rates(arrival_rate_per_s, service_time_s, servers)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(np.maximum(prob_wait, 1e-300) / (1.0 - q))
        wait = np.where(
            drain_rate > 0, np.maximum(log_ratio, 0.0) / np.where(drain_rate > 0, drain_rate, 1.0), np.inf
        )
    return wait


def allen_cunneen_wait_s(
    arrival_rate_per_s: ArrayLike,
    service_time_s: ArrayLike,
    servers: ArrayLike,
    arrival_cv2: ArrayLike = 1.0,
    service_cv2: ArrayLike = 1.0,
) -> FloatArray:
    """Mean wait of a G/G/c queue by Allen-Cunneen: ``Wq(M/M/c) * (ca^2 + cs^2) / 2``.

    :param arrival_cv2: squared coefficient of variation of inter-arrival times (1 for Poisson).
    :param service_cv2: squared coefficient of variation of service times (1 exponential, 0 deterministic).
    """
    factor = (
        _check_nonnegative("arrival_cv2", arrival_cv2) + _check_nonnegative("service_cv2", service_cv2)
    ) / 2.0
    return mmc_mean_wait_s(arrival_rate_per_s, service_time_s, servers) * factor


class ErlangCTable:
    """Erlang-C probability of waiting, tabulated on a utilisation grid for ``c = 1 .. max_servers``.

    ``lookup(c, rho)`` interpolates linearly in ``rho`` (``C`` is smooth in ``rho``; with the default
    2,049 grid points the absolute error is below 1e-4, see the tests). Servers above ``max_servers``
    use the last row (``C`` falls with ``c`` at fixed ``rho``, so this overestimates waiting; size the
    table for the cluster). Zero servers or ``rho >= 1`` give ``1``.

    :param max_servers: largest ``c`` tabulated (>= 1).
    :param grid_points: utilisation grid points over [0, 1].
    """

    def __init__(self, max_servers: int, grid_points: int = 2049) -> None:
        if max_servers < 1 or grid_points < 2:
            raise ValueError(f"need max_servers >= 1 and grid_points >= 2, got {max_servers}, {grid_points}")
        self.max_servers = int(max_servers)
        self._steps = grid_points - 1
        rho = np.linspace(0.0, 1.0, grid_points)
        servers = np.arange(1, self.max_servers + 1)[:, None]
        table = erlang_c(servers, rho[None, :] * servers)  # rho = 1 is unstable: exactly 1
        # row 0 stands for c = 0 (no server: always waits)
        self._table = np.vstack([np.ones((1, grid_points)), table]).ravel()
        self._row_length = grid_points
        self._table.setflags(write=False)
        #: ``[c, grid point]`` for ``c = 0 .. max_servers`` (a read-only view of the table)
        self.rows: FloatArray = self._table.reshape(self.max_servers + 1, grid_points)
        #: utilisation grid intervals: ``rho`` lies between points ``int(rho * steps)`` and the next
        self.steps = self._steps

    def lookup(self, servers: ArrayLike, utilisation: ArrayLike) -> FloatArray:
        """``C(c, c * rho)`` by interpolation.

        :param servers: ``c`` (integers >= 0; clipped to ``max_servers``).
        :param utilisation: ``rho = lambda / (c mu)`` (values >= 1 give ``1``).
        """
        c = np.minimum(np.asarray(servers, dtype=np.int64), self.max_servers)
        position = np.clip(np.asarray(utilisation, dtype=np.float64), 0.0, 1.0) * self._steps
        index = np.minimum(position.astype(np.int64), self._steps - 1)
        frac = position - index
        flat = c * self._row_length + index
        low = self._table[flat]
        high = self._table[flat + 1]
        result: FloatArray = low + frac * (high - low)
        return result

    def lookup_scalar(self, servers: int, utilisation: float) -> float:
        """:meth:`lookup` for one Python number (no array overhead)."""
        c = min(int(servers), self.max_servers)
        position = min(max(float(utilisation), 0.0), 1.0) * self._steps
        index = min(int(position), self._steps - 1)
        flat = c * self._row_length + index
        low = float(self._table[flat])
        return low + (position - index) * (float(self._table[flat + 1]) - low)


@lru_cache(maxsize=4)
def shared_erlang_c_table(max_servers: int = 128, grid_points: int = 1025) -> ErlangCTable:
    """One read-only :class:`ErlangCTable` per size, built on first use and shared (building a
    128-server table takes ~0.1 s; simulators and planners constructed in a loop reuse it)."""
    return ErlangCTable(max_servers, grid_points)


@dataclass(frozen=True)
class BatchServiceEstimate:
    """Steady state of a batching operator pool (see :func:`batch_service`).

    :param jobs_per_call: mean jobs merged into one call, >= 1.
    :param call_tokens: mean tokens per call (``jobs_per_call * job_tokens``).
    :param service_time_s: mean service time of one call.
    :param utilisation: busy fraction of the replicas, in [0, 1].
    :param prob_wait: probability that a job waits (Erlang-C of the calls).
    :param mean_wait_s: mean wait of a job before its call starts (``inf`` if overloaded).
    :param stable: whether the pool keeps up (``utilisation < 1`` at some batch within the cap).
    """

    jobs_per_call: FloatArray
    call_tokens: FloatArray
    service_time_s: FloatArray
    utilisation: FloatArray
    prob_wait: FloatArray
    mean_wait_s: FloatArray
    stable: NDArray[np.bool_]


def batch_service(
    arrival_rate_per_s: ArrayLike,
    job_tokens: ArrayLike,
    servers: ArrayLike,
    batch_cap_tokens: ArrayLike,
    service_time_fn: Callable[[FloatArray], FloatArray],
    *,
    iterations: int = 24,
) -> BatchServiceEstimate:
    """Mean batch size, utilisation and wait of a pool that merges queued jobs into capped calls.

    The model is in the module docstring: ``n = clip(1 + Lq(n) / c, 1, n_cap)`` solved by bisection.

    :param arrival_rate_per_s: job arrival rate at the pool.
    :param job_tokens: tokens per job (> 0).
    :param servers: replicas in the pool (integers >= 0).
    :param batch_cap_tokens: the most tokens one call serves (a job larger than the cap is served alone).
    :param service_time_fn: service time in seconds of one call of the given tokens (vectorised;
        must accept an array of the broadcast shape).
    :param iterations: bisection steps (the bracket shrinks by ``2**-iterations``).
    """
    lam = _check_nonnegative("arrival_rate_per_s", arrival_rate_per_s)
    tokens = _check_nonnegative("job_tokens", job_tokens)
    if np.any(tokens == 0):
        raise ValueError(f"job_tokens must be > 0, got {job_tokens!r}")
    c = _as_servers(servers)
    cap = _check_nonnegative("batch_cap_tokens", batch_cap_tokens)
    lam, tokens, c, cap = np.broadcast_arrays(lam, tokens, c, cap)
    max_jobs = np.maximum(1.0, np.floor(cap / tokens))
    safe_c = np.maximum(c, 1)

    def state(jobs: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        service = service_time_fn(jobs * tokens)
        rho = lam * service / (jobs * safe_c)
        prob = erlang_c(c, np.minimum(rho, 1.0) * c)
        drain = safe_c / service - lam / jobs
        with np.errstate(divide="ignore", invalid="ignore"):
            queue_calls = np.where(
                (rho < 1) & (c > 0), prob * (lam / jobs) / np.where(drain > 0, drain, 1.0), np.inf
            )
        return service, rho, prob, queue_calls * jobs  # queue in jobs

    low = np.ones_like(max_jobs)
    high = max_jobs.copy()
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        _, _, _, queue_jobs = state(mid)
        too_small = 1.0 + queue_jobs / safe_c > mid
        low = np.where(too_small, mid, low)
        high = np.where(too_small, high, mid)
    jobs = np.where(high - low < 1e-9, high, 0.5 * (low + high))
    service, rho, prob, queue_jobs = state(jobs)
    stable = (rho < 1) & (c > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        wait = np.where(stable, np.where(lam > 0, queue_jobs / np.where(lam > 0, lam, 1.0), 0.0), np.inf)
    return BatchServiceEstimate(
        jobs_per_call=jobs,
        call_tokens=jobs * tokens,
        service_time_s=service,
        utilisation=np.minimum(rho, 1.0),
        prob_wait=prob,
        mean_wait_s=wait,
        stable=stable,
    )
