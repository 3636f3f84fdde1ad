"""Empirical lower bounds on ε: a statistical distinguishing test of a DP mechanism.

In the style of Ding, Wang, Wang, Zhang and Kifer ("Detecting Violations of Differential Privacy",
CCS 2018): run the mechanism many times on two neighbouring inputs x and x', count how often an
output event E happens under each, and turn the counts into a lower bound on ε that holds with
the stated confidence. An (ε, δ)-DP mechanism satisfies P[M(x) ∈ E] ≤ e^ε·P[M(x') ∈ E] + δ for
every E, so with a Clopper–Pearson lower bound p̲ on P[M(x) ∈ E] and an upper bound p̄ on
P[M(x') ∈ E],

    ε ≥ ln((p̲ − δ) / p̄)

holds with probability ≥ 1 − α. A mechanism whose bound exceeds its claimed ε is broken (up to α).

The event is chosen from candidates on a first, separate batch of samples (the largest
estimated ratio, either direction), then evaluated on fresh samples, so the choice does not bias
the bound. Used by tests/unit/test_dp_selftest.py (fast, in CI) and bench/dp_audit.py (longer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

Mechanism = Callable[[Any], Any]
Event = Callable[[Any], bool]


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """The two-sided (1 − α) Clopper–Pearson interval for a binomial proportion k/n."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(k1: int, k2: int, n: int, delta: float, alpha: float) -> float:
    """ε ≥ ln((p̲1 − δ)/p̄2) from counts k1 (under x) and k2 (under x') of n runs each; ≥ 0."""
    lo1, _ = clopper_pearson(k1, n, alpha)
    _, hi2 = clopper_pearson(k2, n, alpha)
    if lo1 - delta <= 0.0 or hi2 <= 0.0:
        return 0.0
    return max(0.0, math.log((lo1 - delta) / hi2))


@dataclass(frozen=True)
class AuditResult:
    epsilon_lb: float  # the lower bound, holding with probability ≥ 1 − alpha
    event: str  # which candidate event gave it
    p_x: float  # the event's frequency under x (in the direction that gave the bound)
    p_x2: float  # ... and under x'
    samples: int


def _counts(mechanism: Mechanism, data: Any, events: Sequence[Event], n: int) -> np.ndarray:
    hits = np.zeros(len(events), dtype=np.int64)
    for _ in range(n):
        out = mechanism(data)
        for i, ev in enumerate(events):
            hits[i] += bool(ev(out))
    return hits


def audit(
    mechanism: Mechanism,
    x: Any,
    x2: Any,
    events: dict[str, Event],
    samples: int,
    pilot: int,
    delta: float = 0.0,
    alpha: float = 0.05,
) -> AuditResult:
    """The empirical ε lower bound of `mechanism` on neighbours x, x' over candidate `events`.

    `pilot` runs per input choose the event and direction with the largest smoothed ratio;
    `samples` fresh runs per input then give the Clopper–Pearson bound (confidence 1 − α).
    """
    names = list(events)
    evs = [events[k] for k in names]
    a, b = _counts(mechanism, x, evs, pilot), _counts(mechanism, x2, evs, pilot)
    # +1 smoothing so an event never seen under one input does not win on a 0 denominator alone
    ratios = [((a[i] + 1) / (b[i] + 1), i, False) for i in range(len(evs))]
    ratios += [((b[i] + 1) / (a[i] + 1), i, True) for i in range(len(evs))]
    _, best, flipped = max(ratios)
    first, second = (x2, x) if flipped else (x, x2)
    k1 = int(_counts(mechanism, first, [evs[best]], samples)[0])
    k2 = int(_counts(mechanism, second, [evs[best]], samples)[0])
    return AuditResult(
        epsilon_lower_bound(k1, k2, samples, delta, alpha),
        names[best] + (" (x' vs x)" if flipped else ""),
        k1 / samples,
        k2 / samples,
        samples,
    )
