"""Tests of shared.privacy: the sparse vector mechanism and the ε accountant.

The mechanism is random, so besides its invariants (at most c releases, sorted unique indices,
values within [−γ, γ]) the statistical tests check the noise scales themselves, against
closed-form Laplace probabilities and moments, with fixed seeds and tolerances of several binomial
or sampling standard errors. All pure functions: no servers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dssgd.shared.errors import DssgdError
from dssgd.shared.privacy import (
    BudgetExhausted,
    PrivacyAccountant,
    SvtParams,
    advanced_composition,
    basic_composition,
    epsilon_for,
    noise_rng,
    svt_select,
)
from hypothesis import given, settings
from hypothesis import strategies as st

GAMMA = 0.001  # the paper's MNIST settings
TAU = 0.0001


def laplace_diff_tail(d: float, b1: float, b2: float) -> float:
    """P[X − Y ≥ d] for independent X ~ Lap(b1), Y ~ Lap(b2), b1 ≠ b2.

    X − Y has the law of X + Y (Laplace is symmetric), whose density is
    (b1·e^(−|z|/b1) − b2·e^(−|z|/b2)) / (2(b1² − b2²)); integrating its right tail gives this.
    """
    if d < 0:
        return 1.0 - laplace_diff_tail(-d, b1, b2)
    return (b1**2 * math.exp(-d / b1) - b2**2 * math.exp(-d / b2)) / (2 * (b1**2 - b2**2))


def binomial_tol(p: float, trials: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / trials)


# --- SvtParams -------------------------------------------------------------------------------


def test_constants_follow_numeric_sparse() -> None:
    p = SvtParams(epsilon=9.0, c=10, gamma=GAMMA, tau=TAU)
    assert p.eps1 == pytest.approx(8.0)
    assert p.eps2 == pytest.approx(2.0)
    # selection spends ε1 in full, the c value releases ε2/2: together exactly ε
    assert p.eps1 + p.eps2 / 2 == pytest.approx(p.epsilon)
    assert p.sensitivity == pytest.approx(2 * GAMMA)
    sigma1 = 2 * 10 * 2 * GAMMA / 8.0
    assert p.threshold_scale == pytest.approx(sigma1)
    assert p.query_scale == pytest.approx(2 * sigma1)
    assert p.value_scale == pytest.approx(2 * 10 * 2 * GAMMA / 2.0)
    # each release's Laplace mechanism costs Δf/scale; c of them cost ε2/2
    assert p.c * p.sensitivity / p.value_scale == pytest.approx(p.eps2 / 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": math.inf},
        {"epsilon": math.nan},
        {"epsilon": 5e-324},  # ε2 underflows to 0
        {"epsilon": 1e-300, "c": 10**300},  # σ overflows
        {"c": 0},
        {"c": 2.5},
        {"c": True},
        {"gamma": 0.0},
        {"gamma": -1e-3},
        {"gamma": math.inf},
        {"tau": -1e-4},
        {"tau": math.nan},
    ],
)
def test_svt_params_validation(kwargs: dict[str, float]) -> None:
    base: dict[str, float] = {"epsilon": 1.0, "c": 5, "gamma": GAMMA, "tau": TAU}
    with pytest.raises(ValueError):
        SvtParams(**{**base, **kwargs})  # type: ignore[arg-type]


def test_svt_params_accepts_numpy_int_and_zero_tau() -> None:
    assert SvtParams(epsilon=1.0, c=np.int64(3), gamma=GAMMA, tau=0.0).c == 3  # type: ignore[arg-type]


def test_epsilon_for() -> None:
    assert epsilon_for(1.0, 10_551) == pytest.approx(10_551.0)
    assert epsilon_for(0.01, 105_506) == pytest.approx(1055.06)
    with pytest.raises(ValueError):
        epsilon_for(0.0, 10)
    with pytest.raises(ValueError):
        epsilon_for(1.0, 0)


# --- svt_select: invariants -------------------------------------------------------------------


def check_shapes(idx: np.ndarray, vals: np.ndarray, c: int, n: int, gamma: float) -> None:
    assert idx.dtype == np.int64
    assert vals.dtype == np.float32
    assert idx.shape == vals.shape
    assert idx.size <= min(c, n)
    assert np.all(np.diff(idx) > 0)  # sorted and unique
    if idx.size:
        assert idx[0] >= 0 and idx[-1] < n
    # compared in float64: float32 rounding must not push a value past γ
    assert np.all(np.abs(vals.astype(np.float64)) <= gamma)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    c=st.integers(1, 500),
    eps_per_value=st.sampled_from([0.01, 1.0, 100.0, 1e6]),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants(n: int, c: int, eps_per_value: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 2 * GAMMA).astype(np.float32)
    p = SvtParams(epsilon=epsilon_for(eps_per_value, c), c=c, gamma=GAMMA, tau=TAU)
    idx, vals = svt_select(delta, p, rng)
    check_shapes(idx, vals, c, n, GAMMA)


def test_invariants_at_paper_size() -> None:
    n = 105_506
    rng = np.random.default_rng(7)
    delta = (rng.standard_normal(n) * 5e-4).astype(np.float32)
    for c in (1, 106, 10_551, n):
        p = SvtParams(epsilon=epsilon_for(1.0, c), c=c, gamma=GAMMA, tau=TAU)
        idx, vals = svt_select(delta, p, rng)
        check_shapes(idx, vals, c, n, GAMMA)
        if c < 10_000:  # at ε/c = 1 roughly 40% of entries pass, so small budgets fill up
            assert idx.size == c


def test_deterministic_for_a_seeded_generator() -> None:
    delta = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * GAMMA
    p = SvtParams(epsilon=epsilon_for(1.0, 50), c=50, gamma=GAMMA, tau=TAU)
    a = svt_select(delta, p, np.random.default_rng(123))
    b = svt_select(delta, p, np.random.default_rng(123))
    c = svt_select(delta, p, np.random.default_rng(124))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_empty_and_bad_input() -> None:
    p = SvtParams(epsilon=1.0, c=3, gamma=GAMMA, tau=TAU)
    idx, vals = svt_select(np.empty(0, dtype=np.float32), p, np.random.default_rng(0))
    assert idx.dtype == np.int64 and vals.dtype == np.float32 and idx.size == 0
    with pytest.raises(ValueError):
        svt_select(np.zeros((2, 2), dtype=np.float32), p, np.random.default_rng(0))
    with pytest.raises(ValueError):
        svt_select(np.array([0.0, np.nan], dtype=np.float32), p, np.random.default_rng(0))


def test_noise_rng_is_not_reproducible() -> None:
    a, b = noise_rng(), noise_rng()
    assert isinstance(a, np.random.Generator)
    assert isinstance(a.bit_generator, np.random.PCG64)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))


# --- svt_select: noise scales -----------------------------------------------------------------


def test_huge_epsilon_selects_exactly_the_entries_above_tau() -> None:
    rng = np.random.default_rng(11)
    n = 20_000
    # magnitudes kept clear of τ, so noise of scale ~1e-9 cannot flip a comparison
    mags = rng.choice(np.array([0.2, 0.5, 2.0, 3.0]) * TAU * 10, size=n)
    mags[rng.random(n) < 0.5] *= 0.01  # well below τ
    delta = (mags * rng.choice([-1.0, 1.0], size=n)).astype(np.float32)
    expected = np.flatnonzero(np.abs(delta) >= TAU)
    # ε/c = 1e6: comparison noise of scale 9e-9 and value noise of scale 1.8e-8
    p = SvtParams(epsilon=epsilon_for(1e6, n), c=n, gamma=GAMMA, tau=TAU)
    idx, vals = svt_select(delta, p, rng)
    np.testing.assert_array_equal(idx, expected)
    clipped = np.clip(delta[idx].astype(np.float64), -GAMMA, GAMMA)
    # the largest of n Laplace draws is about b·ln(n) ≈ 10b; float32 rounding adds ~1e-10
    np.testing.assert_allclose(vals, clipped, rtol=0, atol=30 * p.value_scale + 1e-9)


def test_huge_epsilon_with_small_c_releases_c_of_the_candidates() -> None:
    rng = np.random.default_rng(12)
    n = 1000
    delta = np.where(rng.random(n) < 0.3, 5 * TAU, 0.1 * TAU).astype(np.float32)
    p = SvtParams(epsilon=1e6, c=40, gamma=GAMMA, tau=TAU)
    idx, _ = svt_select(delta, p, rng)
    assert idx.size == 40
    assert np.all(np.abs(delta[idx]) >= TAU)


def test_comparison_uses_the_clipped_value() -> None:
    """|clip(Δw_j, γ)| ≤ γ, so with τ above γ nothing passes, however large Δw_j is: the
    comparison's sensitivity is bounded only because it sees the clipped value."""
    delta = np.full(1000, 10 * GAMMA, dtype=np.float32)
    p = SvtParams(epsilon=epsilon_for(1e6, 1000), c=1000, gamma=GAMMA, tau=2 * GAMMA)
    idx, _ = svt_select(delta, p, np.random.default_rng(3))
    assert idx.size == 0


def test_entries_are_visited_in_uniformly_random_order() -> None:
    """With c below the number of clear candidates, each candidate is released with frequency
    c/K; a fixed visiting order would always release the same first c."""
    n, k, c, calls = 1000, 300, 40, 500
    rng = np.random.default_rng(4)
    delta = np.zeros(n, dtype=np.float32)
    cand = np.sort(rng.choice(n, size=k, replace=False))
    delta[cand] = 5 * TAU
    p = SvtParams(epsilon=epsilon_for(1e6, c), c=c, gamma=GAMMA, tau=TAU)
    counts = np.zeros(n, dtype=np.int64)
    for _ in range(calls):
        counts[svt_select(delta, p, rng)[0]] += 1
    assert counts.sum() == c * calls
    assert counts[np.setdiff1d(np.arange(n), cand)].sum() == 0
    mean, sd = calls * c / k, math.sqrt(calls * (c / k) * (1 - c / k))
    assert np.all(np.abs(counts[cand] - mean) < 5 * sd)


@pytest.mark.parametrize("eps_per_value", [1.0, 0.3])
def test_selection_probability_matches_laplace_scales(eps_per_value: float) -> None:
    """One entry with |Δw| = γ passes iff γ + r_j ≥ τ + r_τ, r_j ~ Lap(2σ1), r_τ ~ Lap(σ1)."""
    c = 1
    p = SvtParams(epsilon=epsilon_for(eps_per_value, c), c=c, gamma=GAMMA, tau=4 * GAMMA)
    b_query, b_thr = p.query_scale, p.threshold_scale
    assert b_query == pytest.approx(2 * b_thr)
    expected = laplace_diff_tail(p.tau - GAMMA, b_query, b_thr)

    # an independent Monte Carlo of the two draws guards the closed form itself
    mc = np.random.default_rng(99)
    mc_p = np.mean(
        GAMMA + mc.laplace(0, b_query, 2_000_000) >= p.tau + mc.laplace(0, b_thr, 2_000_000)
    )
    assert mc_p == pytest.approx(expected, abs=binomial_tol(expected, 2_000_000))

    rng = np.random.default_rng(2024)
    delta = np.array([GAMMA], dtype=np.float32)
    trials = 20_000
    hits = sum(svt_select(delta, p, rng)[0].size for _ in range(trials))
    assert hits / trials == pytest.approx(expected, abs=binomial_tol(expected, trials))


def test_threshold_is_redrawn_after_each_release() -> None:
    """Two equal entries, c = 2: with a fresh r_τ after a release the two outcomes are
    independent, so P[both] = p²; keeping r_τ would correlate them and make P[both] > p²."""
    c = 2
    p = SvtParams(epsilon=epsilon_for(1.0, c), c=c, gamma=GAMMA, tau=6 * GAMMA)
    single = laplace_diff_tail(p.tau - GAMMA, p.query_scale, p.threshold_scale)
    both = single**2
    rng = np.random.default_rng(31)
    delta = np.array([GAMMA, -GAMMA], dtype=np.float32)
    trials = 20_000
    counts = np.bincount([svt_select(delta, p, rng)[0].size for _ in range(trials)], minlength=3)
    assert counts[2] / trials == pytest.approx(both, abs=binomial_tol(both, trials))
    # a kept threshold would give P[both] = E[q(r_τ)²] ≥ p²: clearly larger at these scales
    mc = np.random.default_rng(5)
    r_tau = mc.laplace(0, p.threshold_scale, 400_000)
    r1, r2 = (mc.laplace(0, p.query_scale, 400_000) for _ in range(2))
    kept = np.mean((GAMMA + r1 >= p.tau + r_tau) & (GAMMA + r2 >= p.tau + r_tau))
    assert kept - both > 6 * binomial_tol(both, trials, sigmas=1.0)


def test_released_values_carry_laplace_noise_of_scale_sigma_eps2() -> None:
    n = 50_000
    gamma = 1.0
    true_value = 0.3
    # ε/c chosen so σ(ε2) = 0.01: clipping at ±1 is 70 scales away and never bites, and the
    # selection noise (scale 0.0025 around 0.3 vs τ = 0) lets every entry through.
    eps = 18 * n * gamma / 0.01
    p = SvtParams(epsilon=eps, c=n, gamma=gamma, tau=0.0)
    b = p.value_scale
    assert b == pytest.approx(0.01)
    delta = np.full(n, true_value, dtype=np.float32)
    idx, vals = svt_select(delta, p, np.random.default_rng(77))
    assert idx.size == n
    noise = vals.astype(np.float64) - float(np.float32(true_value))
    # mean: sd of the mean is sqrt(2)·b/sqrt(n); variance 2b² has relative sd sqrt(5/n)
    assert abs(noise.mean()) < 5 * math.sqrt(2) * b / math.sqrt(n)
    assert noise.var() == pytest.approx(2 * b**2, rel=5 * math.sqrt(5 / n))
    # E|X| = b is Laplace-specific (a Gaussian of the same variance gives 1.128·b)
    assert np.abs(noise).mean() == pytest.approx(b, rel=5 / math.sqrt(n))


# --- accounting -------------------------------------------------------------------------------


def test_composition_by_hand() -> None:
    assert basic_composition(0.5, 100) == pytest.approx(50.0)
    by_hand = math.sqrt(200 * math.log(1e5)) * 0.5 + 100 * 0.5 * (math.exp(0.5) - 1)
    assert advanced_composition(0.5, 100, 1e-5) == pytest.approx(by_hand)
    assert advanced_composition(0.5, 0, 1e-5) == 0.0
    assert advanced_composition(1000.0, 3, 1e-5) == math.inf  # e^ε overflows: basic wins
    with pytest.raises(ValueError):
        advanced_composition(0.5, 10, 0.0)
    with pytest.raises(ValueError):
        basic_composition(0.5, -1)


def test_accountant_totals() -> None:
    acc = PrivacyAccountant(eps_per_epoch=0.5, epochs=100)
    assert acc.total_basic == pytest.approx(50.0)
    assert acc.total_advanced == pytest.approx(
        math.sqrt(200 * math.log(1e5)) * 0.5 + 100 * 0.5 * (math.exp(0.5) - 1)
    )
    assert acc.total == min(acc.total_basic, acc.total_advanced)
    assert acc.total_delta == 0.0  # basic wins at ε = 0.5: ≈ 50 vs ≈ 56.3
    small = PrivacyAccountant(eps_per_epoch=0.01, epochs=10_000)
    assert small.total == small.total_advanced < small.total_basic
    assert small.total_delta == small.delta_prime


def test_budget_is_checked_before_spending() -> None:
    acc = PrivacyAccountant(eps_per_epoch=0.5, budget=2.0)
    for _ in range(4):
        assert acc.can_spend()
        acc.spend()
    assert acc.epochs == 4 and acc.total == pytest.approx(2.0)
    assert not acc.can_spend()
    before = (acc.epochs, acc.total_basic, acc.total_advanced, acc.total)
    with pytest.raises(BudgetExhausted) as info:
        acc.spend()
    assert isinstance(info.value, DssgdError)
    assert "budget" in str(info.value)
    assert (acc.epochs, acc.total_basic, acc.total_advanced, acc.total) == before


def test_budget_tolerates_binary_rounding() -> None:
    acc = PrivacyAccountant(eps_per_epoch=0.1, budget=0.3)
    for _ in range(3):
        acc.spend()  # 3 × 0.1 = 0.30000000000000004 must still fit
    with pytest.raises(BudgetExhausted):
        acc.spend()


def test_no_budget_never_exhausts() -> None:
    acc = PrivacyAccountant(eps_per_epoch=1e4)
    for _ in range(50):
        acc.spend()
    assert acc.can_spend() and acc.total == pytest.approx(5e5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps_per_epoch": 0.0},
        {"delta_prime": 0.0},
        {"delta_prime": 1.0},
        {"budget": -1.0},
        {"epochs": -1},
    ],
)
def test_accountant_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrivacyAccountant(**{"eps_per_epoch": 0.5, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [None, 2.0, 0.1 + 0.2])
def test_accountant_round_trip(budget: float | None) -> None:
    acc = PrivacyAccountant(eps_per_epoch=0.1 + 0.2, delta_prime=1e-6, budget=budget, epochs=7)
    d = acc.to_dict()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in d.items())
    assert PrivacyAccountant.from_dict(d) == acc
    # redis-py with decode_responses=False hands back bytes
    assert PrivacyAccountant.from_dict({k.encode(): v.encode() for k, v in d.items()}) == acc
    with pytest.raises(ValueError):
        PrivacyAccountant.from_dict({"eps_per_epoch": "0.5"})
