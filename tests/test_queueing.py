"""Closed forms of :mod:`opscale.sim.queueing` against textbook values and small simulations."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from opscale.sim.queueing import (
    ErlangCTable,
    allen_cunneen_wait_s,
    batch_service,
    erlang_b,
    erlang_c,
    mmc_mean_queue_length,
    mmc_mean_wait_s,
    mmc_wait_quantile_s,
    mmc_wait_tail,
)


def erlang_c_by_sum(c: int, a: float) -> float:
    """Textbook Erlang-C from the Poisson sums (factorials)."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def simulate_mmc_waits(lam: float, service_s: float, c: int, n: int, seed: int) -> np.ndarray:
    """FCFS M/M/c waiting times: each job takes the server that frees up first."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / lam, n))
    services = rng.exponential(service_s, n)
    free_at = [0.0] * c
    waits = np.empty(n)
    for i in range(n):
        earliest = heapq.heappop(free_at)
        start = max(earliest, arrivals[i])
        waits[i] = start - arrivals[i]
        heapq.heappush(free_at, start + services[i])
    return waits


def test_erlang_b_and_c_textbook_values() -> None:
    # M/M/2 at a = 1: B = 0.2, C = 1/3
    assert float(erlang_b(2, 1.0)) == pytest.approx(0.2)
    assert float(erlang_c(2, 1.0)) == pytest.approx(1.0 / 3.0)
    # M/M/1: C = rho
    assert np.allclose(erlang_c(1, np.array([0.1, 0.5, 0.9])), [0.1, 0.5, 0.9])


@pytest.mark.parametrize("c", [1, 2, 5, 16, 40])
def test_erlang_c_matches_factorial_sum(c: int) -> None:
    loads = np.array([0.1, 0.5, 0.8, 0.95]) * c
    expected = [erlang_c_by_sum(c, a) for a in loads]
    assert np.allclose(erlang_c(c, loads), expected, rtol=1e-9)


def test_erlang_c_vectorised_over_mixed_servers_and_unstable() -> None:
    servers = np.array([1, 3, 8, 2, 0])
    loads = np.array([0.5, 2.0, 6.0, 2.5, 0.3])
    result = erlang_c(servers, loads)
    for i in range(3):
        assert result[i] == pytest.approx(erlang_c_by_sum(int(servers[i]), float(loads[i])))
    assert result[3] == 1.0 and result[4] == 1.0  # unstable, no server


def test_mean_wait_queue_length_and_tail_closed_forms() -> None:
    # M/M/1, lambda 0.8, service 1 s: Wq = rho / (mu - lambda) = 4 s
    assert float(mmc_mean_wait_s(0.8, 1.0, 1)) == pytest.approx(4.0)
    assert float(mmc_mean_queue_length(0.8, 1.0, 1)) == pytest.approx(3.2)
    assert float(mmc_wait_tail(0.0, 0.8, 1.0, 1)) == pytest.approx(0.8)
    assert float(mmc_wait_tail(5.0, 0.8, 1.0, 1)) == pytest.approx(0.8 * math.exp(-0.2 * 5.0))
    p99 = float(mmc_wait_quantile_s(0.99, 0.8, 1.0, 1))
    assert float(mmc_wait_tail(p99, 0.8, 1.0, 1)) == pytest.approx(0.01)
    # a quantile below 1 - C is a zero wait
    assert float(mmc_wait_quantile_s(0.1, 0.8, 1.0, 1)) == 0.0
    assert math.isinf(float(mmc_mean_wait_s(2.0, 1.0, 1)))
    assert float(mmc_mean_wait_s(0.0, 1.0, 1)) == 0.0


def test_mmc_formulas_agree_with_simulation() -> None:
    lam, service_s, c = 2.4, 1.0, 3  # rho = 0.8
    waits = simulate_mmc_waits(lam, service_s, c, 200_000, seed=7)[10_000:]
    assert waits.mean() == pytest.approx(float(mmc_mean_wait_s(lam, service_s, c)), rel=0.06)
    assert (waits > 0).mean() == pytest.approx(float(erlang_c(c, lam * service_s)), abs=0.02)
    assert np.quantile(waits, 0.99) == pytest.approx(
        float(mmc_wait_quantile_s(0.99, lam, service_s, c)), rel=0.08
    )


def test_allen_cunneen_scales_mmc() -> None:
    base = float(mmc_mean_wait_s(0.7, 1.0, 1))
    # M/D/1 (cs^2 = 0): Pollaczek-Khinchine gives half the M/M/1 wait
    assert float(allen_cunneen_wait_s(0.7, 1.0, 1, 1.0, 0.0)) == pytest.approx(base / 2)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="servers"):
        erlang_c(1.5, 1.0)
    with pytest.raises(ValueError, match="offered_load"):
        erlang_c(2, -1.0)
    with pytest.raises(ValueError, match="quantile"):
        mmc_wait_quantile_s(1.0, 0.5, 1.0, 1)
    with pytest.raises(ValueError, match="service_time_s"):
        mmc_mean_wait_s(0.5, 0.0, 1)


def test_erlang_c_table_matches_exact() -> None:
    table = ErlangCTable(max_servers=32)
    rng = np.random.default_rng(0)
    servers = rng.integers(1, 33, 500)
    rho = rng.uniform(0.0, 0.999, 500)
    exact = erlang_c(servers, rho * servers)
    assert np.max(np.abs(table.lookup(servers, rho) - exact)) < 1e-4
    assert np.all(table.lookup(np.array([0, 3]), np.array([0.2, 1.5])) == 1.0)


def affine_service(tokens: np.ndarray) -> np.ndarray:
    """A memory-bound-then-compute-bound call: 2 ms fixed + 2 us per token."""
    return 2e-3 + 2e-6 * np.asarray(tokens, dtype=np.float64)


def test_batch_service_is_mmc_at_light_load() -> None:
    lam = np.array([20.0])  # rho = 20 * 2.064 ms = 4 %
    estimate = batch_service(lam, 32.0, 1, 2048, affine_service)
    assert float(estimate.jobs_per_call[0]) == pytest.approx(1.0, abs=0.05)
    service = float(affine_service(np.array(32.0)))
    assert float(estimate.mean_wait_s[0]) == pytest.approx(float(mmc_mean_wait_s(20.0, service, 1)), rel=0.05)


def test_batch_service_batches_past_unbatched_saturation() -> None:
    # 800 jobs/s of 32 tokens on one replica: unbatched rho = 1.65, batching keeps it stable
    estimate = batch_service(800.0, 32.0, 1, 2048, affine_service)
    assert bool(estimate.stable)
    assert float(estimate.jobs_per_call) > 1.5
    assert float(estimate.utilisation) < 1.0
    # a cap of one job per call cannot keep up
    capped = batch_service(800.0, 32.0, 1, 32, affine_service)
    assert not bool(capped.stable) and math.isinf(float(capped.mean_wait_s))


def simulate_batch_pool(
    lam: float, job_tokens: float, c: int, cap_jobs: int, n: int, seed: int
) -> tuple[float, float]:
    """A replica that frees up takes every queued job (up to ``cap_jobs``); returns (jobs/call, mean wait)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / lam, n))
    free_at = [0.0] * c
    queue_start = 0
    calls = 0
    waits = 0.0
    while queue_start < n:
        now = heapq.heappop(free_at)
        now = max(now, arrivals[queue_start])
        end = min(n, int(np.searchsorted(arrivals, now, side="right")), queue_start + cap_jobs)
        end = max(end, queue_start + 1)
        batch = end - queue_start
        waits += float(np.sum(now - arrivals[queue_start:end]))
        service = float(rng.exponential(float(affine_service(np.array(batch * job_tokens)))))
        heapq.heappush(free_at, now + service)
        calls += 1
        queue_start = end
    return n / calls, waits / n


@pytest.mark.parametrize("lam", [300.0, 700.0, 1200.0])
def test_batch_service_against_simulation(lam: float) -> None:
    jobs_sim, wait_sim = simulate_batch_pool(lam, 32.0, 2, 64, 30_000, seed=3)
    estimate = batch_service(lam, 32.0, 2, 64 * 32, affine_service)
    assert float(estimate.jobs_per_call) == pytest.approx(jobs_sim, rel=0.25)
    assert float(estimate.mean_wait_s) == pytest.approx(wait_sim, rel=0.5, abs=1e-3)
