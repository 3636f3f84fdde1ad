"""Differential privacy for the shared Δw: the sparse vector technique and ε accounting.

This is the paper's Algorithm 2 (Shokri & Shmatikov, CCS 2015), which is Dwork and Roth's
NumericSparse (The Algorithmic Foundations of Differential Privacy, 2014, §3.6) applied to one
participant's Δw: the questions "is |clip(Δw_j, γ)| above τ?" are answered by the sparse vector
technique, and each entry that passes is released with Laplace noise on its value. One call of
`svt_select` is ε-differentially private with respect to the participant's training data, for the
ε in `SvtParams`; `PrivacyAccountant` composes that cost over epochs.

Pure functions and small classes, no I/O: the worker draws its noise from `noise_rng()`, passes
that generator in, and stores the accountant in Redis through `to_dict` / `from_dict`.
docs/PRIVACY.md has the threat model and what the guarantee does and does not cover.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from dssgd.shared.errors import DssgdError

# ε1 : ε2 = 8 : 2 follows NumericSparse. Selection spends ε1 in full; the c value releases, each
# with Laplace scale σ(ε2) = 2·c·Δf/ε2, cost c · Δf/σ(ε2) = ε2/2, so the epoch costs
# ε1 + ε2/2 = 8/9·ε + 1/9·ε = ε.
SELECTION_SHARE = 8.0 / 9.0
VALUE_SHARE = 2.0 / 9.0

# Budget comparisons forgive this relative excess: 3 × 0.1 is 0.30000000000000004 in binary, and a
# user who sets budget 0.3 at ε 0.1 per epoch means three epochs, not two.
_BUDGET_RTOL = 1e-9


class BudgetExhausted(DssgdError):
    """Another epoch would take the participant's total ε past its budget; nothing was spent."""

    def __init__(self, spent: float, next_total: float, budget: float, epochs: int) -> None:
        super().__init__(
            f"privacy budget exhausted after {epochs} epochs: total ε is {spent:.6g}, one more "
            f"epoch would make it {next_total:.6g} > budget {budget:.6g}; stop publishing"
        )
        self.spent = spent
        self.next_total = next_total
        self.budget = budget
        self.epochs = epochs


def noise_rng() -> np.random.Generator:
    """A generator for DP noise, seeded from the operating system's CSPRNG.

    A run's user seed must not make DP noise reproducible: whoever knows the seed could subtract
    the noise. So the seed comes from `secrets.randbits(128)`, never from configuration. The draws
    themselves come from PCG64, a fast statistical generator that is not a CSPRNG: its output
    could in principle be predicted from enough earlier output, but that output (the noise) is
    never published on its own, only added to data. numpy's Laplace sampler works in floating
    point, and Mironov (CCS 2012) showed that the low-order bits of floating-point Laplace noise
    can leak the un-noised value; the snapping mechanism fixes that and this module does not use
    it, so the guarantee holds for the idealised real-valued mechanism only.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def _positive_finite(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _count(name: str, value: int, minimum: int) -> int:
    # bool is an int subclass; True as a count is always a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SvtParams:
    """Constants of one participant's per-epoch sparse vector mechanism.

    `epsilon` is the budget of one participant for one epoch; `c` the most values it releases
    per epoch (θu·n); `gamma` the bound γ of every value (so the sensitivity is Δf = 2γ); `tau`
    the threshold τ on |clip(Δw_j, γ)|.
    """

    epsilon: float
    c: int
    gamma: float
    tau: float

    def __post_init__(self) -> None:
        _positive_finite("epsilon", self.epsilon)
        _count("c", self.c, 1)
        _positive_finite("gamma", self.gamma)
        if not (math.isfinite(self.tau) and self.tau >= 0.0):
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        # A tiny ε can underflow ε2 to 0 or overflow σ to inf; Laplace noise of infinite scale
        # would release pure garbage rather than fail.
        try:
            finite = math.isfinite(self.value_scale)
        except (ZeroDivisionError, OverflowError):
            finite = False
        if not finite:
            raise ValueError(f"epsilon {self.epsilon!r} is too small for c = {self.c}")

    @property
    def eps1(self) -> float:
        """ε1 = 8/9·ε, spent on choosing which entries to release."""
        return SELECTION_SHARE * self.epsilon

    @property
    def eps2(self) -> float:
        """ε2 = 2/9·ε; the c value releases cost ε2/2 of it in total."""
        return VALUE_SHARE * self.epsilon

    @property
    def sensitivity(self) -> float:
        """Δf = 2γ: a value clipped to [−γ, γ] moves by at most 2γ between neighbouring datasets."""
        return 2.0 * self.gamma

    def sigma(self, eps: float) -> float:
        """σ(x) = 2·c·Δf/x, the Laplace scale unit of the mechanism."""
        return 2.0 * self.c * self.sensitivity / eps

    @property
    def threshold_scale(self) -> float:
        """Scale of the threshold noise r_τ ~ Lap(σ(ε1))."""
        return self.sigma(self.eps1)

    @property
    def query_scale(self) -> float:
        """Scale of the per-entry comparison noise r_j ~ Lap(2σ(ε1))."""
        return 2.0 * self.sigma(self.eps1)

    @property
    def value_scale(self) -> float:
        """Scale of the noise on each released value, Lap(σ(ε2))."""
        return self.sigma(self.eps2)


def _float32_bound(gamma: float) -> float:
    """The largest float32 not above γ, so released float32 values satisfy |v| ≤ γ exactly."""
    g = np.float32(gamma)
    if float(g) > gamma:
        g = np.nextafter(g, np.float32(0.0))
    return float(g)


def svt_select(
    delta: np.ndarray, params: SvtParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Choose and noise up to c entries of Δw with the sparse vector technique (Algorithm 2).

    With σ(x) = 2·c·Δf/x, Δf = 2γ, ε1 = 8/9·ε and ε2 = 2/9·ε:

    1. draw the threshold noise r_τ ~ Lap(σ(ε1));
    2. visit the entries in a uniformly random order; for entry j draw r_j ~ Lap(2σ(ε1));
    3. if |clip(Δw_j, γ)| + r_j ≥ τ + r_τ, release clip(clip(Δw_j, γ) + Lap(σ(ε2)), γ), count it
       and draw a fresh r_τ;
    4. stop after c releases (or when every entry has been visited).

    Privacy: steps 1–3's selection is Dwork–Roth's Sparse with c above-threshold answers, queries
    of sensitivity ≤ Δf, and budget ε1; each released value is a Laplace mechanism costing
    Δf/σ(ε2) = ε2/(2c), so c of them cost ε2/2. The whole call is (ε1 + ε2/2) = ε-DP with respect
    to the data behind Δw, for the idealised real-valued mechanism (see `noise_rng` for the
    floating-point caveat). Sparse allows any number of queries, so visiting all n entries costs
    nothing extra, and stopping early when they run out reveals nothing the outputs do not.

    All random numbers are drawn up front (a permutation, n comparison noises, up to min(c, n)
    threshold noises, one value noise per release). They are independent, so the joint
    distribution is the same as drawing them one by one as the paper does.

    Returns (indices, values): indices into the 1-D `delta`, sorted ascending, int64; values
    float32, aligned, each within [−γ, γ].
    """
    d = np.asarray(delta)
    if d.ndim != 1:
        raise ValueError(f"delta must be a 1-D vector, got shape {d.shape}")
    n = d.size
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    d64 = d.astype(np.float64, copy=False)
    # NaN would compare False and silently never be released; a NaN Δw is a training bug to see.
    if not np.isfinite(d64).all():
        raise ValueError("delta contains NaN or infinite values")

    gamma = params.gamma
    order = rng.permutation(n)
    scores = np.abs(np.clip(d64[order], -gamma, gamma))
    scores += rng.laplace(0.0, params.query_scale, size=n)
    # Releases number at most min(c, n), and the threshold after the last release is never used.
    max_releases = min(params.c, n)
    thresholds = params.tau + rng.laplace(0.0, params.threshold_scale, size=max_releases)

    # An entry whose score is below every threshold that could ever apply is a miss whatever the
    # release history, so numpy drops those first and the sequential scan sees only the rest.
    candidates = np.flatnonzero(scores >= thresholds.min())
    released = _scan(scores[candidates].tolist(), thresholds.tolist(), max_releases)
    chosen = order[candidates[released]]

    # Clip *before* the noise: Δf = 2γ, and so the Laplace scale, holds only for the clipped value;
    # noise on the raw Δw_j has unbounded sensitivity. The outer clip is post-processing.
    clipped = np.clip(d64[chosen], -gamma, gamma)
    noisy = clipped + rng.laplace(0.0, params.value_scale, size=chosen.size)
    bound = _float32_bound(gamma)
    values = np.clip(noisy, -bound, bound).astype(np.float32)
    by_index = np.argsort(chosen, kind="stable")
    return chosen[by_index].astype(np.int64, copy=False), values[by_index]


def _scan(scores: list[float], thresholds: list[float], max_releases: int) -> np.ndarray:
    """Positions in `scores` released by the sequential threshold test.

    Each release switches to the next threshold, so whether entry i passes depends on every
    earlier outcome; a plain loop over Python floats (tens of ns per entry, at most n entries)
    beats one numpy call per release when releases are dense, which they are at the paper's ε/c.
    """
    out: list[int] = []
    k = 0
    t = thresholds[0]
    for i, s in enumerate(scores):
        if s >= t:
            out.append(i)
            k += 1
            if k == max_releases:
                break
            t = thresholds[k]
    return np.asarray(out, dtype=np.int64)


def epsilon_for(eps_per_value: float, c: int) -> float:
    """Per-epoch ε for the paper's x-axis value ε/c ("budget per parameter"): ε = (ε/c)·c."""
    return _positive_finite("eps_per_value", eps_per_value) * _count("c", c, 1)


def basic_composition(eps_per_epoch: float, epochs: int) -> float:
    """Total ε of k ε-DP epochs under basic composition: k·ε (a pure ε-DP guarantee)."""
    eps = _positive_finite("eps_per_epoch", eps_per_epoch)
    return _count("epochs", epochs, 0) * eps


def advanced_composition(eps_per_epoch: float, epochs: int, delta_prime: float) -> float:
    """Total ε' of k ε-DP epochs under Dwork–Rothblum–Vadhan advanced composition.

    ε' = sqrt(2k·ln(1/δ'))·ε + k·ε·(e^ε − 1), and the k-fold adaptive composition of pure ε-DP
    mechanisms is (ε', δ')-DP. Beats k·ε only for small ε and many epochs; inf when e^ε overflows.
    """
    eps = _positive_finite("eps_per_epoch", eps_per_epoch)
    k = _count("epochs", epochs, 0)
    dp = float(delta_prime)
    if not 0.0 < dp < 1.0:
        raise ValueError(f"delta_prime must be in (0, 1), got {delta_prime!r}")
    if k == 0:
        return 0.0
    try:
        growth = math.expm1(eps)
    except OverflowError:
        return math.inf
    return math.sqrt(2.0 * k * math.log(1.0 / dp)) * eps + k * eps * growth


@dataclass
class PrivacyAccountant:
    """One participant's ε spent so far, and its budget.

    Three valid bounds on the same mechanism: basic composition (k·ε, pure DP), advanced
    composition and, when `c` (releases per epoch) is known, the privacy-loss-distribution
    composition of every epoch's c above-threshold tests and c Laplace releases
    (shared.accounting). `total` is the tightest of them and `bound` names it; `total_delta` is
    its δ (0 for basic composition, else δ'). `budget` caps `total` (None: no cap).
    """

    eps_per_epoch: float
    delta_prime: float = 1e-5
    budget: float | None = None
    epochs: int = 0
    c: int | None = None

    def __post_init__(self) -> None:
        self.eps_per_epoch = _positive_finite("eps_per_epoch", self.eps_per_epoch)
        self.delta_prime = float(self.delta_prime)
        if not 0.0 < self.delta_prime < 1.0:
            raise ValueError(f"delta_prime must be in (0, 1), got {self.delta_prime!r}")
        if self.budget is not None:
            self.budget = _positive_finite("budget", self.budget)
        self.epochs = _count("epochs", self.epochs, 0)
        if self.c is not None:
            self.c = _count("c", self.c, 1)

    def bounds_after(self, epochs: int) -> dict[str, float]:
        """Every valid bound on the total ε after `epochs` epochs, by name."""
        out = {
            "basic": basic_composition(self.eps_per_epoch, epochs),
            "advanced": advanced_composition(self.eps_per_epoch, epochs, self.delta_prime),
        }
        if self.c is not None:
            from dssgd.shared.accounting import svt_pld_epsilon  # dp-accounting loads in ~1 s

            out["pld"] = svt_pld_epsilon(self.eps_per_epoch, self.c, epochs, self.delta_prime)
        return out

    def _total_after(self, epochs: int) -> float:
        return min(self.bounds_after(epochs).values())

    @property
    def total_basic(self) -> float:
        return basic_composition(self.eps_per_epoch, self.epochs)

    @property
    def total_advanced(self) -> float:
        return advanced_composition(self.eps_per_epoch, self.epochs, self.delta_prime)

    @property
    def total(self) -> float:
        """The ε of the reported guarantee: the tightest valid bound (named by `bound`)."""
        return self._total_after(self.epochs)

    @property
    def bound(self) -> str:
        """Which bound `total` is: "basic", "advanced" or "pld"."""
        bounds = self.bounds_after(self.epochs)
        return min(bounds, key=lambda k: bounds[k])

    @property
    def total_delta(self) -> float:
        """The δ that goes with `total`: 0 for basic composition (pure DP), else δ'."""
        return 0.0 if self.bound == "basic" else self.delta_prime

    def can_spend(self) -> bool:
        """Whether one more epoch stays within the budget."""
        if self.budget is None:
            return True
        nxt = self._total_after(self.epochs + 1)
        return nxt <= self.budget or math.isclose(nxt, self.budget, rel_tol=_BUDGET_RTOL)

    def spend(self) -> None:
        """Record one epoch, or raise BudgetExhausted without recording it.

        The check comes before the spend: a participant calls this before publishing an epoch's
        update and publishes only if it returns, so its total never passes the budget.
        """
        if not self.can_spend():
            assert self.budget is not None  # can_spend is always True without a budget
            raise BudgetExhausted(
                self.total, self._total_after(self.epochs + 1), self.budget, self.epochs
            )
        self.epochs += 1

    def to_dict(self) -> dict[str, str]:
        """Strings for a Redis hash.

        `total`, `total_delta` and `bound` are there for people reading Redis (and `dssgd status`);
        `from_dict` ignores them.
        """
        return {
            "eps_per_epoch": repr(self.eps_per_epoch),
            "delta_prime": repr(self.delta_prime),
            "budget": "" if self.budget is None else repr(self.budget),
            "epochs": str(self.epochs),
            "c": "" if self.c is None else str(self.c),
            "total": repr(self.total),
            "total_delta": repr(self.total_delta),
            "bound": self.bound,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str] | Mapping[bytes, bytes]) -> PrivacyAccountant:
        """Rebuild from `to_dict` output; str or bytes keys and values (redis-py returns bytes)."""
        fields: dict[str, str] = {}
        for key, value in data.items():
            k = key.decode() if isinstance(key, bytes) else str(key)
            fields[k] = value.decode() if isinstance(value, bytes) else str(value)
        try:
            budget = fields.get("budget", "")
            c = fields.get("c", "")
            return cls(
                eps_per_epoch=float(fields["eps_per_epoch"]),
                delta_prime=float(fields["delta_prime"]),
                budget=float(budget) if budget else None,
                epochs=int(fields["epochs"]),
                c=int(c) if c else None,
            )
        except KeyError as exc:
            raise ValueError(f"privacy accountant record lacks field {exc.args[0]!r}") from exc
