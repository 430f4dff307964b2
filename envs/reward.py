"""Reward of the autoscaling environments: named components ``slo``, ``gpu`` and ``energy``.

Per control interval, with ``a`` the interval's SLO attainment, ``a*`` the target (``slo_target``),
``G`` the time-averaged GPUs powered, ``N`` the cluster's GPUs, ``P`` the mean cluster power and
``P_max = N x TDP``::

    slo    = -w_slo    * penalty(a)
    gpu    = -w_gpu    * G / N
    energy = -w_energy * P / P_max
    reward = slo + gpu + energy                      (always in [-(w_slo + w_gpu + w_energy), 0])

with the SLO-violation penalty shape chosen by ``slo_penalty``:

* ``"hinge"`` (default): ``max(0, a* - a) / a*``: zero at or above target, growing linearly below it;
* ``"squared"``: the hinge squared: tolerant of small misses, harsh on large ones;
* ``"step"``: ``1`` if ``a < a*`` else ``0``: a pure constraint signal (sparse, harder to learn).

The GPU and energy terms are normalised by the cluster size, so weights transfer between cluster sizes;
with the defaults (10, 1, 0.5) on 16 GPUs, one extra GPU costs ``1/16 = 0.0625`` per step plus its power,
which the SLO term outweighs as soon as attainment drops ~0.6 points below target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum

from opscale.sim.metrics import IntervalMetrics

__all__ = ["RewardFunction", "SloPenaltyShape"]


class SloPenaltyShape(str, Enum):
    """How SLO attainment below target turns into a penalty in ``[0, 1]``."""

    HINGE = "hinge"
    SQUARED = "squared"
    STEP = "step"


def _hinge(attainment: float, target: float) -> float:
    return max(0.0, target - attainment) / target


_PENALTIES: dict[SloPenaltyShape, Callable[[float, float], float]] = {
    SloPenaltyShape.HINGE: _hinge,
    SloPenaltyShape.SQUARED: lambda attainment, target: _hinge(attainment, target) ** 2,
    SloPenaltyShape.STEP: lambda attainment, target: 1.0 if attainment < target else 0.0,
}


class RewardFunction:
    """Computes the reward and its components from one interval's metrics.

    :param weights: ``{"slo", "gpu", "energy"}`` weights, each >= 0.
    :param penalty: SLO-violation penalty shape.
    :param slo_target: attainment target in (0, 1].
    :param num_gpus: GPUs in the cluster (normalises the GPU term).
    :param max_power_w: ``num_gpus x TDP`` (normalises the energy term).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        penalty: SloPenaltyShape | str,
        slo_target: float,
        num_gpus: int,
        max_power_w: float,
    ) -> None:
        if not 0 < slo_target <= 1:
            raise ValueError(f"slo_target must be in (0, 1], got {slo_target}")
        if num_gpus < 1 or max_power_w <= 0:
            raise ValueError(f"need num_gpus >= 1 and max_power_w > 0, got {num_gpus}, {max_power_w}")
        self.weights = {name: float(weights[name]) for name in ("slo", "gpu", "energy")}
        if any(weight < 0 for weight in self.weights.values()):
            raise ValueError(f"reward weights must be >= 0, got {self.weights}")
        self.penalty_shape = SloPenaltyShape(penalty)
        self._penalty = _PENALTIES[self.penalty_shape]
        self.slo_target = slo_target
        self._gpu_scale = self.weights["gpu"] / num_gpus
        self._energy_scale = self.weights["energy"] / max_power_w

    def __call__(self, metrics: IntervalMetrics) -> tuple[float, dict[str, float]]:
        """``(reward, {"slo": ..., "gpu": ..., "energy": ...})``; the reward is the sum of the components."""
        slo = -self.weights["slo"] * self._penalty(metrics.slo_attainment, self.slo_target)
        gpu = -self._gpu_scale * metrics.gpus_powered_mean
        energy = -self._energy_scale * metrics.mean_power_w
        return slo + gpu + energy, {"slo": slo, "gpu": gpu, "energy": energy}
