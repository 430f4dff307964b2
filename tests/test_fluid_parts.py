"""Building blocks of the fluid fidelity: interval arrivals, cost tables, latency mixtures."""

from __future__ import annotations

import numpy as np
import pytest

from opscale.sim.costmodel import AttentionBatch, default_cost_model
from opscale.sim.fluid_arrivals import PRIOR_REQUESTS, SHAPE_BLOCK_S, ArrivalIndex, quantiles_of
from opscale.sim.fluid_kernel import _forward_arrival_ratio, mean_arrival_s, weighted_quantile
from opscale.sim.fluid_latency import LogHistogram, PoissonTailTable, TtftMixture, poisson_at_least
from opscale.sim.fluid_tables import AttentionSurrogate, UnitTimeTable
from opscale.sim.hardware import get_gpu
from opscale.sim.models import UnitKind, get_model


@pytest.fixture(scope="module")
def arrivals() -> tuple[ArrivalIndex, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    arrival = np.sort(rng.uniform(0, 100, 5000))
    prompt = rng.integers(1, 4000, 5000)
    output = rng.integers(1, 800, 5000)
    return ArrivalIndex(arrival, prompt, output), arrival, prompt, output


def test_window_counts_and_sums_match_direct_computation(arrivals: tuple) -> None:
    index, arrival, prompt, output = arrivals
    window = index.window(10.0, 17.5)
    inside = (arrival >= 10.0) & (arrival < 17.5)
    assert window.count == inside.sum()
    assert window.prompt_tokens == pytest.approx(prompt[inside].sum())
    assert window.output_tokens == pytest.approx(output[inside].sum())
    # blended means: the window's sums plus PRIOR_REQUESTS requests at the trace-wide mean
    expected = (prompt[inside].sum() + PRIOR_REQUESTS * prompt.mean()) / (inside.sum() + PRIOR_REQUESTS)
    assert window.prompt_mean == pytest.approx(expected)
    # shape: the empirical equal-probability points of the block, normalised to mean 1
    levels = (np.arange(16) + 0.5) / 16
    points = np.quantile(prompt[arrival < SHAPE_BLOCK_S], levels)
    assert np.allclose(window.prompt_shape, points / points.mean())
    assert window.output_shape.mean() == pytest.approx(1.0)


def test_shape_follows_the_block_of_the_window() -> None:
    arrival = np.concatenate(
        (np.linspace(0, SHAPE_BLOCK_S - 1, 500), np.linspace(SHAPE_BLOCK_S, 2 * SHAPE_BLOCK_S - 1, 500))
    )
    prompt = np.concatenate((np.full(500, 100), np.tile([10, 1000], 250)))
    index = ArrivalIndex(arrival, prompt, np.full(1000, 5))
    assert np.allclose(index.window(0.0, 5.0).prompt_shape, 1.0)
    late = index.window(SHAPE_BLOCK_S + 10.0, SHAPE_BLOCK_S + 15.0).prompt_shape
    assert late.min() < 0.1 and late.max() > 1.9


@pytest.mark.parametrize("size", [1, 2, 3, 17, 1000, 4099])
def test_quantiles_of_equals_numpys_linear_quantile_bit_for_bit(size: int) -> None:
    rng = np.random.default_rng(size)
    levels = np.concatenate(((np.arange(16) + 0.5) / 16, [0.0, 0.5, 1.0], rng.uniform(0, 1, 8)))
    for values in (rng.lognormal(6.0, 1.2, size).round(), rng.integers(1, 5, size).astype(float)):  # ties too
        np.testing.assert_array_equal(quantiles_of(values, levels), np.quantile(values, levels))


def test_empty_window_falls_back_to_trace_statistics(arrivals: tuple) -> None:
    index, _, prompt, output = arrivals
    window = index.window(500.0, 505.0)
    assert window.count == 0
    assert window.prompt_mean == pytest.approx(prompt.mean())
    assert window.output_mean == pytest.approx(output.mean())
    assert index.count_before(50.0) == int((arrivals[1] < 50.0).sum())


def test_mean_arrival_of_fcfs_positions() -> None:
    index = ArrivalIndex(np.array([1.0, 2.0, 4.0, 8.0]), np.ones(4, dtype=int), np.ones(4, dtype=int))

    def mean(first: float, last: float) -> float:
        return mean_arrival_s(index.arrival_s, index.cumulative_arrival_s, first, last)

    assert mean(0.0, 2.0) == pytest.approx(1.5)
    assert mean(1.0, 4.0) == pytest.approx(14.0 / 3.0)
    assert mean(0.5, 1.5) == pytest.approx(1.5)  # half of request 0, half of request 1
    assert mean(-1.0, 9.0) == pytest.approx(15.0 / 4.0)  # clipped to the trace
    assert np.isnan(mean(2.0, 2.0))


def test_forward_arrival_ratio_counts_the_arrivals_a_request_meets() -> None:
    """The arrivals met over the next ``life_s`` by a request admitted at a uniform time in the interval
    (a fine Riemann sum over admission times), over the interval's own arrival rate."""
    rng = np.random.default_rng(3)
    arrival_s = np.sort(rng.uniform(0.0, 60.0, 90))
    cumulative = np.concatenate(([0.0], np.cumsum(arrival_s)))
    for start_s, life_s in [(10.0, 4.0), (20.0, 12.0), (55.0, 8.0), (0.0, 0.5)]:
        end_s = start_s + 5.0
        admissions = np.linspace(start_s, end_s, 20_001)
        met = np.searchsorted(arrival_s, admissions + life_s, side="right") - np.searchsorted(
            arrival_s, admissions, side="right"
        )
        own = np.count_nonzero((arrival_s > start_s) & (arrival_s <= end_s))
        expected = met.mean() / life_s / (own / 5.0)
        ratio = _forward_arrival_ratio(arrival_s, cumulative, start_s, end_s, life_s)
        assert ratio == pytest.approx(expected, rel=2e-3)
    # a burst's requests meet only what arrives after them: fewer than the burst's own rate
    burst = np.array([10.1, 10.2, 10.3, 10.4, 10.5, 30.0])
    burst_cumulative = np.concatenate(([0.0], np.cumsum(burst)))
    assert _forward_arrival_ratio(burst, burst_cumulative, 10.0, 15.0, 4.0) < 0.5
    assert _forward_arrival_ratio(burst, burst_cumulative, 40.0, 45.0, 4.0) == 1.0  # none arrive: no change


def test_arrival_index_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sorted"):
        ArrivalIndex(np.array([2.0, 1.0]), np.array([5, 5]), np.array([5, 5]))
    with pytest.raises(ValueError, match=">= 1"):
        ArrivalIndex(np.array([1.0]), np.array([0]), np.array([5]))
    with pytest.raises(ValueError, match="length"):
        ArrivalIndex(np.array([1.0]), np.array([5, 6]), np.array([5]))


@pytest.mark.parametrize(
    ("model_name", "gpu_name", "tp"),
    [("llama-2-7b", "a100", 1), ("llama-2-70b", "h100", 4), ("qwen2-57b-a14b", "h100", 2)],
)
def test_unit_table_interpolates_the_cost_model(model_name: str, gpu_name: str, tp: int) -> None:
    cost_model = default_cost_model()
    model, gpu = get_model(model_name), get_gpu(gpu_name)
    units = [u for u in model.units if u is not UnitKind.ATTENTION]
    table = UnitTimeTable(model, gpu, cost_model, units, [tp] * len(units))
    tokens = np.array([1.0, 7.0, 100.0, 777.0, 3000.0, 50_000.0])
    exact = np.array([cost_model.unit_time_s_array(model, u, gpu, tp, tokens) for u in units])
    approx = table.time_s_at(np.broadcast_to(tokens, exact.shape))
    assert np.max(np.abs(approx / exact - 1.0)) < 0.01
    assert np.all(table.time_s_at(np.zeros(len(units))) == 0.0)


def test_attention_surrogate_decode_exact_and_prefill_close() -> None:
    cost_model = default_cost_model()
    model, gpu = get_model("llama-2-7b"), get_gpu("a100")
    surrogate = AttentionSurrogate(model, gpu, 1, cost_model)
    exact = cost_model.attention_time_s(
        model, gpu, 1, AttentionBatch(num_decodes=20, decode_context_tokens=20 * 900)
    )
    assert surrogate.decode_s(20, 20 * 900) == pytest.approx(exact, rel=1e-9)
    for chunk, prior in [(100, 0), (1000, 0), (2048, 4000)]:
        batch = AttentionBatch(
            prefill_tokens=chunk,
            prefill_attention_pairs=chunk * prior + chunk * (chunk + 1) / 2,
            num_prefills=1,
        )
        exact = cost_model.attention_time_s(model, gpu, 1, batch)
        assert float(surrogate.prefill_s(np.array(float(chunk)), np.array(float(prior)))) == pytest.approx(
            exact, rel=0.1
        )
    assert surrogate.prefill_fit_error < 0.3


def test_ttft_mixture_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    fixed = np.array([0.1, 0.2, 0.4, 0.8])
    mixture = TtftMixture(fixed, prob_wait=0.3, wait_mean_s=0.5)
    samples = rng.choice(fixed, 200_000) + np.where(
        rng.random(200_000) < 0.3, rng.exponential(0.5, 200_000), 0.0
    )
    assert mixture.mean_s() == pytest.approx(samples.mean(), rel=0.01)
    for t in (0.15, 0.5, 1.0, 2.0):
        assert float(mixture.cdf(np.array(t))) == pytest.approx((samples <= t).mean(), abs=0.01)
    p50, p99 = mixture.quantiles((0.5, 0.99))
    assert p50 == pytest.approx(np.quantile(samples, 0.5), rel=0.1)
    assert p99 == pytest.approx(np.quantile(samples, 0.99), rel=0.05)
    late = TtftMixture(fixed, 0.0, 0.0, late_share=0.5, late_s=3.0)
    assert late.mean_s() == pytest.approx(0.5 * fixed.mean() + 1.5)
    assert late.quantiles((0.99,))[0] == pytest.approx(3.0)


def test_poisson_tail_exact_and_table() -> None:
    # P(N >= 1) = 1 - e^-mu; P(N >= 2) = 1 - e^-mu (1 + mu)
    mu = np.array([0.1, 1.0, 3.0])
    assert np.allclose(poisson_at_least(mu, np.ones(3)), 1 - np.exp(-mu))
    assert np.allclose(poisson_at_least(mu, np.full(3, 2.0)), 1 - np.exp(-mu) * (1 + mu))
    table = PoissonTailTable(64)
    rng = np.random.default_rng(1)
    means, needed = rng.uniform(0.01, 60, 500), rng.integers(1, 60, 500).astype(float)
    assert np.max(np.abs(table.lookup(means, needed) - poisson_at_least(means, needed))) < 0.01
    assert float(table.lookup(np.array([0.0]), np.array([1.0]))[0]) == 0.0


def test_weighted_quantile_and_histogram() -> None:
    assert weighted_quantile(np.array([3.0, 1.0, 2.0]), np.array([0.2, 0.5, 0.3]), 0.6) == 2.0
    histogram = LogHistogram()
    histogram.add_points(np.array([0.01, 1.0]), np.array([99.0, 1.0]))
    assert histogram.quantile(0.5) == pytest.approx(0.01, rel=0.1)
    assert histogram.quantile(0.995) == pytest.approx(1.0, rel=0.1)
