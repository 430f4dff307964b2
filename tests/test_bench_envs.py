"""The speed benchmark's measuring functions run and report rates (the figures themselves are printed by
``python -m opscale.experiments.bench_envs``, not asserted: they depend on the machine)."""

from __future__ import annotations

import math

from opscale.experiments.bench_envs import (
    DES_ID,
    FAST_ID,
    env_layer_steps_per_s,
    env_steps_per_s,
    python_reference_s,
)


def test_step_rates_are_positive_for_every_kind_of_run() -> None:
    rates = [
        env_steps_per_s(FAST_ID, 30, 10.0),
        env_steps_per_s(FAST_ID, 30, 10.0, noop=True),
        env_steps_per_s(DES_ID, 2, 10.0, noop=True),
        env_layer_steps_per_s(30, 10.0),
    ]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates), rates
    # the replayed interval skips the simulation: the env layer alone is faster than env + fluid
    assert rates[3] > rates[0]


def test_python_reference_is_a_plausible_time() -> None:
    assert 1e-4 < python_reference_s(repeats=2) < 10.0
