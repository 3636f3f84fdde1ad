"""Per-update membership inference: was this record in the participant's epoch?

Two scores a curious server can compute from the base state w and the decoded update Δ:

* loss drop, L(w; x, y) − L(w + Δ; x, y): the epoch lowered its own records' losses most;
* gradient alignment, −cos(∇L(w; x, y), Δ): a record the epoch trained on points along Δ.

Members (the participant's records) are scored against non-members (records nobody trained
on). ``evaluate`` gives the AUC and the true-positive rate at 1 % and 0.1 % false positives,
each with a bootstrap interval (members and non-members resampled separately). By chance the
AUC is 0.5 and TPR at x % FPR is x %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FPRS = (0.01, 0.001)
CONFIDENCE = 0.95


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score), ties counted half (Mann–Whitney)."""
    return _auc_sorted(np.asarray(members, dtype=np.float64), np.sort(non_members))


def tpr_at(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """Share of members above the threshold that lets through a fraction ``fpr`` of non-members.

    The threshold is the ⌈(1 − fpr)·n⌉-th smallest non-member score, so at most ⌊fpr·n⌋
    non-members score strictly above it (never more than the stated rate).
    """
    return _tpr_sorted(np.asarray(members, dtype=np.float64), np.sort(non_members), fpr)


def _auc_sorted(m: np.ndarray, u: np.ndarray) -> float:
    below = np.searchsorted(u, m, side="left")
    ties = np.searchsorted(u, m, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(m) * len(u)))


def _tpr_sorted(m: np.ndarray, u: np.ndarray, fpr: float) -> float:
    k = min(len(u) - 1, int(np.ceil((1.0 - fpr) * len(u))) - 1)
    return float(np.mean(m > u[max(0, k)]))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict[str, float]:
        return {
            "value": round(self.value, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
        }

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class Membership:
    score: str
    members: int
    non_members: int
    auc: Estimate
    tpr: dict[float, Estimate]  # FPR → TPR

    def as_dict(self) -> dict[str, object]:
        return {
            "score": self.score,
            "members": self.members,
            "non_members": self.non_members,
            "auc": self.auc.as_dict(),
            "tpr_at_fpr": {f"{f:g}": e.as_dict() for f, e in self.tpr.items()},
        }


def _interval(samples: list[float], point: float) -> Estimate:
    a = (1.0 - CONFIDENCE) / 2
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return Estimate(point, float(lo), float(hi))


def evaluate(
    score: str, members: np.ndarray, non_members: np.ndarray, resamples: int, seed: int = 0
) -> Membership:
    """AUC and TPR at FPRS, with percentile-bootstrap intervals of ``resamples`` draws."""
    m = np.asarray(members, dtype=np.float64)
    u = np.asarray(non_members, dtype=np.float64)
    # A NaN score (a loss that overflowed) must rank as "no evidence", not crash the sort.
    m, u = np.nan_to_num(m, nan=-np.inf), np.nan_to_num(u, nan=-np.inf)
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    tprs: dict[float, list[float]] = {f: [] for f in FPRS}
    us = np.sort(u)
    for _ in range(resamples):
        mb = m[rng.integers(0, len(m), len(m))]
        # A resample of sorted scores, sorted: each score repeated as often as it was drawn
        # (O(n), where sorting each resample was most of the audit's statistics time).
        ub = np.repeat(us, np.bincount(rng.integers(0, len(us), len(us)), minlength=len(us)))
        aucs.append(_auc_sorted(mb, ub))
        for f in FPRS:
            tprs[f].append(_tpr_sorted(mb, ub, f))
    return Membership(
        score,
        len(m),
        len(u),
        _interval(aucs, auc(m, u)),
        {f: _interval(tprs[f], tpr_at(m, u, f)) for f in FPRS},
    )


def calibrate(
    scores: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray
) -> np.ndarray:
    """Scores standardised per class by the reference (non-member) scores of that class.

    One update moves whole classes: noise that happens to favour one digit raises the score of
    every record of it, and a member set with a little more of that digit would pass for
    members. Records are correlated within a class, so comparing within classes removes that
    and keeps the bootstrap (which assumes independent records) honest. The attacker knows
    each candidate's label, so this is the attack, not a help to it.
    """
    out = np.asarray(scores, dtype=np.float64).copy()
    lab, ref_lab = np.asarray(labels), np.asarray(ref_labels)
    ref = np.asarray(ref, dtype=np.float64)
    for c in np.unique(lab):
        r = ref[ref_lab == c]
        if r.size < 2:
            continue  # a class the reference lacks stays as it is
        out[lab == c] = (out[lab == c] - r.mean()) / (r.std() or 1.0)
    return out


def leaks(result: Membership) -> bool:
    """The attack beats chance: the AUC interval lies above 0.5."""
    return result.auc.low > 0.5


def percentile_of(score: float, non_members: np.ndarray) -> float:
    """Share of non-members scoring below ``score`` (the positive control's rank)."""
    return float(np.mean(np.asarray(non_members) < score))
