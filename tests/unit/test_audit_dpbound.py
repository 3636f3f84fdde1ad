"""The audit's DP bound: the most any membership attack on one DP-SGD update can reach.

Checked where the answer is known exactly (one full-batch Gaussian step is μ-GDP with μ = 1/σ),
against what one (ε, δ) pair alone allows, and with a measured figure above the bound, which
the audit must flag.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from dssgd.audit import dpbound, labels, membership, reconstruct
from dssgd.audit.pipeline import Point
from dssgd.audit.sweep import PointResult

N01 = NormalDist()
Q, STEPS = 32 / 600, 19  # the default audit: 600 records, batch 32, one epoch


def test_one_gaussian_step_gives_the_exact_gdp_trade_off() -> None:
    mu = 0.5  # σ = 2, q = 1: the trade-off curve is Gaussian DP's, in closed form
    b = dpbound.dpsgd_update_bound(1 / mu, 1.0, 1, 1e-5)
    exact_auc = N01.cdf(mu / math.sqrt(2))
    exact_tpr = 1 - N01.cdf(N01.inv_cdf(0.99) - mu)
    # pessimistic discretisation: never below the exact curve, and close to it
    assert exact_auc - 1e-4 <= b.auc <= exact_auc + 2e-3
    assert exact_tpr - 1e-4 <= b.tpr[0.01] <= exact_tpr * 1.03


def test_the_profile_is_far_tighter_than_one_epsilon_delta_pair() -> None:
    sigma = 1.0439  # what the accountant gives for ε 8 over 30 epochs of these steps
    b = dpbound.dpsgd_update_bound(sigma, Q, STEPS, 1e-5)
    assert 1.8 < b.epsilon < 1.95
    one_pair = dpbound.bound_from_profile(
        np.array([b.epsilon]), np.array([1e-5]), (0.01,), b.epsilon, 1e-5
    )
    assert one_pair.auc > 0.85 and one_pair.tpr[0.01] > 0.06  # (1.87, 1e-5) alone
    assert 0.55 < b.auc < 0.6 and 0.015 < b.tpr[0.01] < 0.03  # the whole profile
    assert dpbound.dpsgd_update_bound(200.0, Q, STEPS, 1e-5).auc < 0.501  # noise only: chance


def _result(auc: tuple[float, float, float], tpr: tuple[float, float, float]) -> PointResult:
    est, at_1 = membership.Estimate(*auc), membership.Estimate(*tpr)
    m = membership.Membership("gradient alignment", 600, 5000, est, {0.01: at_1})
    bound = dpbound.AttackBound(1.87, 1e-5, 0.579, {0.01: 0.0242})
    none = "not measured here"
    return PointResult(
        Point("trained", 1.0, dp="dpsgd", eps=8.0),
        reconstruct.Reconstruction(False, none),
        {"gradient alignment": m},
        labels.LabelSet(False, none),
        0,
        0,
        1.0,
        0.0,
        dp_bound=bound,
    )


def test_a_figure_above_the_bound_is_flagged() -> None:
    within = _result((0.522, 0.503, 0.543), (0.018, 0.005, 0.032))
    assert within.above_dp_bound == [] and "ABOVE" not in within.verdict
    # negative controls: an AUC, or a TPR at 1 % FPR, whose interval lies above its bound
    for above in (
        _result((0.62, 0.60, 0.64), (0.018, 0.005, 0.032)),
        _result((0.55, 0.53, 0.57), (0.05, 0.03, 0.07)),
    ):
        assert above.above_dp_bound == ["gradient alignment"]
        assert "ABOVE THE DP BOUND" in above.verdict
