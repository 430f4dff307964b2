"""GPU power and energy: levels, linearity in utilisation, presets, and the check against
SplitwiseSim's measured power (Llama-2-70B on DGX-A100)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opscale.sim.calibration import SPLITWISE_PERF_MODEL, check_power, load_splitwise_runs, power_errors
from opscale.sim.costmodel import default_cost_model
from opscale.sim.hardware import get_gpu
from opscale.sim.power import PowerModel, PowerPreset, joules_to_kwh


def test_levels_from_idle_to_full_load() -> None:
    power = PowerModel()
    a100, h100, h200 = get_gpu("a100"), get_gpu("h100"), get_gpu("h200")
    assert power.power_w(a100, 0.0, 0.0) == 63.0
    assert power.power_w(a100, 1.0, 1.0) == 400.0
    assert power.power_w(a100, 1.0, 0.0) == 250.0
    assert power.power_w(h100, 1.0, 1.0) == 700.0
    assert power.power_w(h100, 1.0, 0.0) == 380.0
    assert power.power_w(h200, 0.0, 0.0) == 75.0
    assert power.power_w(a100, 1.0, 1.0, powered=False) == 0.0


def test_power_rises_linearly_with_busy_time_and_compute_share() -> None:
    power, gpu = PowerModel(), get_gpu("h100")
    busy = np.linspace(0, 1, 11)
    memory_bound = power.power_w_array(gpu, busy, 0.0)
    compute_bound = power.power_w_array(gpu, busy, 1.0)
    assert np.all(np.diff(memory_bound) > 0) and np.all(np.diff(compute_bound) > 0)
    assert np.all(compute_bound >= memory_bound)
    assert np.allclose(np.diff(memory_bound, 2), 0.0)  # linear in utilisation
    assert power.power_w(gpu, 0.5, 0.5) == pytest.approx(75 + 0.5 * (0.5 * 305 + 0.5 * 625))


def test_scalar_power_is_the_array_power_bit_for_bit() -> None:
    power, rng = PowerModel(), np.random.default_rng(0)
    for gpu in (get_gpu("a100"), get_gpu("h100")):
        busy, compute = rng.random(200), rng.random(200)
        powered = rng.random(200) < 0.8
        array = power.power_w_array(gpu, busy, compute, powered)
        scalars = [
            power.power_w(gpu, float(b), float(c), bool(p))
            for b, c, p in zip(busy, compute, powered, strict=True)
        ]
        assert np.array_equal(array, scalars)


def test_energy_integrates_power() -> None:
    power, gpu = PowerModel(), get_gpu("a100")
    assert power.energy_j(gpu, 3600.0, 0.5, 0.0) == pytest.approx(3600 * (63 + 0.5 * 187))
    # 10 s powered: 2 s prefill (compute-bound), 3 s decode (memory-bound), 5 s idle
    joules = power.energy_from_busy_time_j(gpu, 10.0, 2.0, 3.0)
    assert joules == pytest.approx(10 * 63 + 2 * (400 - 63) + 3 * (250 - 63))
    assert joules == pytest.approx(power.energy_j(gpu, 10.0, 0.5, 0.4))
    assert joules_to_kwh(3.6e6) == 1.0


def test_bad_inputs_are_rejected() -> None:
    power, gpu = PowerModel(), get_gpu("a100")
    with pytest.raises(ValueError, match="busy_fraction must lie in"):
        power.power_w(gpu, 1.2, 0.0)
    with pytest.raises(ValueError, match="compute_bound_fraction must lie in"):
        power.power_w(gpu, 0.5, -0.1)
    with pytest.raises(ValueError, match="busy_fraction must lie in"):
        power.power_w(gpu, float("nan"), 0.0, powered=False)
    with pytest.raises(ValueError, match="compute_bound_fraction must lie in"):
        power.power_w_array(gpu, np.array([0.5, 0.5]), np.array([0.2, np.inf]))
    with pytest.raises(ValueError, match="exceeds powered time"):
        power.energy_from_busy_time_j(gpu, 1.0, 0.8, 0.8)
    with pytest.raises(ValueError, match=r"unknown power preset 'max'.*splitwise-constants"):
        PowerModel.from_preset("max")
    with pytest.raises(ValueError, match="no power profile for GPU 'h100'"):
        PowerModel(profiles={}).power_w(get_gpu("h100"), 0.5, 0.5)


def test_presets_differ_only_in_a100_memory_bound_power() -> None:
    constants = PowerModel.from_preset(PowerPreset.SPLITWISE_CONSTANTS)
    measured = PowerModel.from_preset("splitwise-measured")
    assert measured.profiles["h100"] == constants.profiles["h100"]
    assert measured.profiles["a100"].memory_bound_w > constants.profiles["a100"].memory_bound_w
    assert measured.profiles["a100"].compute_bound_w == constants.profiles["a100"].compute_bound_w


@pytest.mark.shared
def test_against_splitwise_measured_power(reference_profiles_dir: Path) -> None:
    """SplitwiseSim's average/peak power columns (normalised to TDP) are non-zero only for A100.

    Errors today: constants preset ~14 % (average) / ~16 % (peak); measured preset ~5 % / ~15 %.
    """
    runs = load_splitwise_runs(reference_profiles_dir / SPLITWISE_PERF_MODEL)
    assert len(runs) >= 20
    assert {run.gpu for run in runs} == {"a100"} and {run.tp for run in runs} == {2, 4, 8}
    cost_model = default_cost_model()
    constants = power_errors(check_power(runs, cost_model, PowerModel.from_preset("splitwise-constants")))
    measured = power_errors(check_power(runs, cost_model, PowerModel.from_preset("splitwise-measured")))
    print(f"power vs SplitwiseSim: constants {constants}, measured {measured}")
    assert constants["average_mape"] < 0.18
    assert measured["average_mape"] < 0.07
    assert measured["peak_mape"] < 0.20
    # TP2 keeps each GPU busier than TP8 in decode, and draws more: the model sees it too
    checks = check_power(runs, cost_model, PowerModel.from_preset("splitwise-measured"))
    by_tp = {tp: np.mean([c.predicted_average_w for c in checks if c.run.tp == tp]) for tp in (2, 8)}
    assert by_tp[2] > by_tp[8]
