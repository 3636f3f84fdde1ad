"""What DP-SGD's guarantee allows any membership attack on one update to reach.

For a mechanism that is (ε, δ(ε))-DP for every ε (its privacy profile), a test of "record x was
in the data" at false-positive rate α has power at most

    β(α) ≤ min over ε of  min(e^ε·α + δ(ε),  1 − e^(−ε)·(1 − δ(ε) − α))

(Kairouz et al. 2015; Dong, Roth and Su's trade-off functions). The profile of one audited
update, ceil(|D|/B) Poisson-subsampled Gaussian steps at the run's σ, comes from the same PLD
library as the accountant (shared/accounting.py), so the envelope is the tightest bound the
accountant's own figures support, far below what one (ε, δ) pair gives: at ε = 8 for a 30-epoch
run, one epoch is (1.87, 1e-5)-DP, which alone allows AUC 0.87 and TPR 6.5 % at 1 % FPR; the
whole profile allows 0.58 and 2.4 %. The maximal AUC is ∫β(α)dα.

The bound applies to the membership experiment of Yeom et al. (2018): a candidate drawn from the
data's distribution, in the participant's data or not. Measured figures above it would mean the
mechanism does not do what the accountant assumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

_EPS_GRID = np.linspace(0.0, 12.0, 1201)  # profile points; finer only tightens the envelope
_ALPHA = np.linspace(0.0, 1.0, 20001)


@dataclass(frozen=True)
class AttackBound:
    """The most any attack on one update can reach, and the update's own ε at the run's δ."""

    epsilon: float  # ε of the one update at δ (PLD), for reference
    delta: float
    auc: float
    tpr: dict[float, float]  # FPR → maximal TPR

    def as_dict(self) -> dict[str, object]:
        return {
            "update_epsilon": round(self.epsilon, 4),
            "delta": self.delta,
            "max_auc": round(self.auc, 4),
            "max_tpr_at_fpr": {f"{f:g}": round(t, 5) for f, t in self.tpr.items()},
        }

    def __str__(self) -> str:
        tprs = ", ".join(f"TPR@{f:.1%} ≤ {t:.2%}" for f, t in self.tpr.items())
        return f"AUC ≤ {self.auc:.3f}, {tprs} (one update: ε {self.epsilon:.2f})"


def power_envelope(alpha: np.ndarray, epsilons: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Maximal power at each FPR in ``alpha`` for a mechanism (ε_i, δ_i)-DP for every i."""
    a = np.asarray(alpha, dtype=np.float64)[:, None]
    e = np.asarray(epsilons, dtype=np.float64)[None, :]
    d = np.clip(np.asarray(deltas, dtype=np.float64)[None, :], 0.0, 1.0)
    beta = np.minimum(np.exp(e) * a + d, 1.0 - np.exp(-e) * (1.0 - d - a)).min(axis=1)
    # A test can always do as well as chance, never better than certainty.
    return np.clip(beta, np.asarray(alpha, dtype=np.float64), 1.0)


def bound_from_profile(
    epsilons: np.ndarray, deltas: np.ndarray, fprs: tuple[float, ...], eps_at: float, delta: float
) -> AttackBound:
    beta = power_envelope(_ALPHA, epsilons, deltas)
    auc = float(np.sum((beta[1:] + beta[:-1]) / 2 * np.diff(_ALPHA)))
    tpr = {f: float(power_envelope(np.array([f]), epsilons, deltas)[0]) for f in fprs}
    return AttackBound(eps_at, delta, auc, tpr)


@functools.lru_cache(maxsize=64)
def dpsgd_update_bound(
    sigma: float, q: float, steps: int, delta: float, fprs: tuple[float, ...] = (0.01, 0.001)
) -> AttackBound:
    """The bound for ``steps`` DP-SGD steps at rate q and noise multiplier σ (one update)."""
    from dp_accounting.pld import privacy_loss_distribution as pld  # ~1 s to import

    from dssgd.shared.accounting import dpsgd_epsilon

    one = pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=1e-3
    ).self_compose(steps)
    deltas = np.asarray(one.get_delta_for_epsilon(_EPS_GRID), dtype=np.float64)
    return bound_from_profile(_EPS_GRID, deltas, fprs, dpsgd_epsilon(sigma, q, steps, delta), delta)
