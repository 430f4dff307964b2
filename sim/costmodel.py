"""Operator cost model: how long a scaling unit takes on a GPU (DESIGN.md 2.3).

Two backends behind one :class:`CostModel` protocol:

* :class:`RooflineCostModel` - the calibrated analytic model. GEMMs: ``max(compute, memory)``
  smoothed as a p-norm, plus a launch floor, one parameter set per GPU shared by every GEMM;
  elementwise kernels: latency + bytes / effective bandwidth each; prefill attention: separate
  efficiencies for new-token and cached-context query-key pairs; decode attention: memory-bound with a
  floor; tensor-parallel all-reduce and pipeline send/recv: alpha-beta models fitted to NCCL profiles.
  Coefficients: :mod:`opscale.sim.costmodel_coefficients`, fitted by
  ``experiments/calibrate_costmodel.py``. Every formula is closed-form and monotone in tokens and
  context, with efficiencies <= 1, so answers stay roofline-bounded at any length (no 4,096 ceiling).
* :class:`opscale.sim.profile_table.ProfileTableCostModel` - interpolates a Vidur-format profile
  table (re-exported here).

Conventions: times in seconds; a unit's time covers *all its layers* on one tensor-parallel group and
includes that unit's own TP collective (all-reduce after ``o_proj``, ``ffn`` / ``moe`` and the
vocabulary-parallel ``embed``; logits gather after ``lm_head``).
"""

from __future__ import annotations

from opscale.sim.costmodel_api import AttentionBatch, CostModel, UnitBreakdown, unit_breakdown
from opscale.sim.costmodel_roofline import RooflineCostModel
from opscale.sim.profile_table import ProfileTableCostModel

__all__ = [
    "AttentionBatch",
    "CostModel",
    "ProfileTableCostModel",
    "RooflineCostModel",
    "UnitBreakdown",
    "default_cost_model",
    "unit_breakdown",
]


def default_cost_model() -> RooflineCostModel:
    """A fresh :class:`RooflineCostModel` with the fitted coefficients."""
    return RooflineCostModel()
