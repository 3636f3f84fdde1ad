"""The DP self-test: an empirical ε lower bound for every shipped mechanism (shared.dpaudit).

Each test runs the real mechanism on neighbouring inputs chosen to stress clipping or selection,
and checks that the Clopper–Pearson lower bound on ε stays within the claimed ε. The pre-fix SVT
(noise on the raw Δw_j, clipped afterwards) is kept here as the negative control: the same test
must flag it, clearly above its claim, or the test has no power. Seeded generators make every
figure reproducible; the samples are sized so the file runs in seconds. bench/dp_audit.py runs
the same audits with more samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from dssgd.shared.dpaudit import AuditResult, audit, clopper_pearson, epsilon_lower_bound
from dssgd.shared.privacy import SvtParams, _float32_bound, _scan, svt_select

GAMMA = 0.001
TAU = 0.0001
ALPHA = 0.01  # each bound holds with probability ≥ 99 %


def svt_prefix(
    delta: np.ndarray, params: SvtParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The shipped svt_select before the fix: Laplace noise on the raw Δw_j, then the clip.

    Kept verbatim (selection included) as the negative control of the self-test: the noise
    scale assumes Δf = 2γ, which the raw value does not have.
    """
    d64 = np.asarray(delta, dtype=np.float64)
    n, gamma = d64.size, params.gamma
    order = rng.permutation(n)
    scores = np.abs(np.clip(d64[order], -gamma, gamma))
    scores += rng.laplace(0.0, params.query_scale, size=n)
    max_releases = min(params.c, n)
    thresholds = params.tau + rng.laplace(0.0, params.threshold_scale, size=max_releases)
    candidates = np.flatnonzero(scores >= thresholds.min())
    released = _scan(scores[candidates].tolist(), thresholds.tolist(), max_releases)
    chosen = order[candidates[released]]
    noisy = d64[chosen] + rng.laplace(0.0, params.value_scale, size=chosen.size)
    bound = _float32_bound(gamma)
    values = np.clip(noisy, -bound, bound).astype(np.float32)
    by_index = np.argsort(chosen, kind="stable")
    return chosen[by_index].astype(np.int64, copy=False), values[by_index]


def value_events() -> dict[str, object]:
    """Events on (indices, values) that tell a positive release from a negative one."""
    return {
        "released, value > 0": lambda o: o[1].size > 0 and bool(o[1][0] > 0),
        "released, value > γ/2": lambda o: o[1].size > 0 and bool(o[1][0] > GAMMA / 2),
        "released, value = γ": lambda o: o[1].size > 0 and bool(o[1][0] >= _float32_bound(GAMMA)),
        "released": lambda o: o[0].size > 0,
    }


def count_events(c: int) -> dict[str, object]:
    out: dict[str, object] = {
        f"≥ {k} released": (lambda o, k=k: o[0].size >= k) for k in range(1, c + 1)
    }
    out["none released"] = lambda o: o[0].size == 0
    out["all released > 0"] = lambda o: o[0].size > 0 and bool((o[1] > 0).all())
    return out


def svt_audit(
    select: Callable[..., tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    x2: np.ndarray,
    params: SvtParams,
    events: dict[str, Any],
    samples: int,
    seed: int,
) -> AuditResult:
    rng = np.random.default_rng(seed)
    return audit(
        lambda d: select(d, params, rng), x, x2, events, samples, pilot=samples // 4, alpha=ALPHA
    )


# Neighbouring Δw vectors: every coordinate's clipped value moves by at most Δf = 2γ, the
# sensitivity the mechanism assumes (any one record may move the whole Δw).
VALUE_STRESS = (np.array([100 * GAMMA]), np.array([-100 * GAMMA]))  # raw values far past γ
SELECTION_STRESS = (np.full(6, GAMMA), np.zeros(6))  # |clip| at γ vs at 0: every score moves
MIXED_STRESS = (np.full(3, 100 * GAMMA), np.full(3, -100 * GAMMA))  # selection + values, c = 2


# --- the statistics themselves ----------------------------------------------------------------


def test_clopper_pearson_brackets_the_proportion() -> None:
    lo, hi = clopper_pearson(50, 100, 0.05)
    assert 0.39 < lo < 0.40 and 0.60 < hi < 0.61  # the textbook interval [0.3983, 0.6017]
    assert clopper_pearson(0, 10, 0.05)[0] == 0.0 and clopper_pearson(10, 10, 0.05)[1] == 1.0


def test_lower_bound_is_the_log_ratio_of_the_interval_ends() -> None:
    lo, _ = clopper_pearson(900, 1000, 0.05)
    _, hi = clopper_pearson(100, 1000, 0.05)
    assert epsilon_lower_bound(900, 100, 1000, 0.0, 0.05) == pytest.approx(np.log(lo / hi))
    assert epsilon_lower_bound(500, 500, 1000, 0.0, 0.05) == 0.0  # identical counts: no evidence


# --- SVT: the shipped mechanism stays within its claim --------------------------------------


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_svt_value_stress_within_claim(eps: float) -> None:
    p = SvtParams(epsilon=eps, c=1, gamma=GAMMA, tau=TAU)
    r = svt_audit(svt_select, *VALUE_STRESS, p, value_events(), 10_000, seed=1)
    assert r.epsilon_lb <= eps, r


def test_svt_selection_stress_within_claim() -> None:
    p = SvtParams(epsilon=2.0, c=2, gamma=GAMMA, tau=GAMMA / 2)
    r = svt_audit(svt_select, *SELECTION_STRESS, p, count_events(2), 10_000, seed=2)
    assert r.epsilon_lb <= p.epsilon, r


def test_svt_mixed_stress_within_claim() -> None:
    p = SvtParams(epsilon=2.0, c=2, gamma=GAMMA, tau=TAU)
    events = {**value_events(), **count_events(2)}
    r = svt_audit(svt_select, *MIXED_STRESS, p, events, 10_000, seed=3)
    assert r.epsilon_lb <= p.epsilon, r


# --- SVT negative control: the pre-fix mechanism is flagged ---------------------------------


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_prefix_svt_is_flagged(eps: float) -> None:
    """Noise on the raw value: the bound is several times the claim (the test has power)."""
    p = SvtParams(epsilon=eps, c=1, gamma=GAMMA, tau=TAU)
    r = svt_audit(svt_prefix, *VALUE_STRESS, p, value_events(), 10_000, seed=1)
    assert r.epsilon_lb > 2 * eps, r


def test_prefix_svt_is_flagged_with_selection_in_play() -> None:
    p = SvtParams(epsilon=2.0, c=2, gamma=GAMMA, tau=TAU)
    events = {**value_events(), **count_events(2)}
    r = svt_audit(svt_prefix, *MIXED_STRESS, p, events, 10_000, seed=3)
    assert r.epsilon_lb > 2 * p.epsilon, r
