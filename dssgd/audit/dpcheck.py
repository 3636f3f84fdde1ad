"""The DP mechanism self-test (shared/dpaudit.py) at the audited settings, with its control.

A distinguishing test gives an empirical lower bound on the ε a mechanism really has; the
shipped mechanism's bound must stay at or below its claim. Each test comes with a broken
mechanism (SVT with the noise on the raw value, DP-SGD without per-record clipping) that the
same test must flag above its claim, so a passing mechanism comes with proof the test has power.
The neighbouring inputs are those of docs/PRIVACY.md: one Δw entry at +100γ vs −100γ (their
clipped values differ by exactly Δf = 2γ) for SVT, and D vs D plus one record of gradient 100
(far past the clip norm) for one DP-SGD step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dssgd.shared.dpaudit import AuditResult, audit
from dssgd.shared.privacy import SvtParams, _float32_bound, svt_select

ALPHA = 0.01  # each bound holds with probability ≥ 99 %


@dataclass(frozen=True)
class SelfTest:
    mechanism: str
    claimed: float
    shipped: AuditResult
    broken: AuditResult  # the negative control

    @property
    def holds(self) -> bool:
        return self.shipped.epsilon_lb <= self.claimed

    @property
    def has_power(self) -> bool:
        return self.broken.epsilon_lb > self.claimed

    def summary(self) -> dict[str, object]:
        return {
            "mechanism": self.mechanism,
            "claimed_epsilon": self.claimed,
            "empirical_lower_bound": round(self.shipped.epsilon_lb, 4),
            "broken_control_lower_bound": round(self.broken.epsilon_lb, 4),
            "holds": self.holds,
            "test_has_power": self.has_power,
            "samples": self.shipped.samples,
        }


def _svt_raw_noise(delta: np.ndarray, p: SvtParams, rng: np.random.Generator) -> np.ndarray:
    """The broken control for c = 1 and one entry: Laplace noise on the raw, unclipped value."""
    bound = _float32_bound(p.gamma)
    return np.clip(delta + rng.laplace(0.0, p.value_scale, delta.size), -bound, bound)


def svt_selftest(eps: float, gamma: float, samples: int, seed: int = 1) -> SelfTest:
    """SVT with one entry and c = 1 (so ε = ε/c), neighbours ±100γ."""
    p = SvtParams(epsilon=eps, c=1, gamma=gamma, tau=gamma / 10)
    rng = np.random.default_rng(seed)
    x, x2 = np.array([100 * gamma]), np.array([-100 * gamma])
    events = {
        "released, value > 0": lambda o: o[1].size > 0 and bool(o[1][0] > 0),
        "released, value > γ/2": lambda o: o[1].size > 0 and bool(o[1][0] > gamma / 2),
        "released, value = γ": lambda o: o[1].size > 0 and bool(o[1][0] >= _float32_bound(gamma)),
    }
    shipped = audit(
        lambda d: svt_select(d, p, rng), x, x2, events, samples, samples // 4, alpha=ALPHA
    )
    raw_events = {
        "value > 0": lambda o: bool(o[0] > 0),
        "value > γ/2": lambda o: bool(o[0] > gamma / 2),
        "value = γ": lambda o: bool(o[0] >= _float32_bound(gamma)),
    }
    broken = audit(
        lambda d: _svt_raw_noise(d, p, rng), x, x2, raw_events, samples, samples // 4, alpha=ALPHA
    )
    return SelfTest(f"SVT ε/c {eps:g}", eps, shipped, broken)


class _Scalar(nn.Module):
    """out = w·x for one weight: record (x, y) has gradient (w·x − y)·x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


def _dpsgd_step(sigma: float, clip: float, seed: int):  # type: ignore[no-untyped-def]
    """One real DP-SGD step (full batch) as a mechanism; clip None = the broken control."""
    from dssgd.shared.dpsgd import DpSgdTrainer

    gen = torch.Generator().manual_seed(seed)
    trainers: dict[int, DpSgdTrainer] = {}

    def mech(data: tuple[torch.Tensor, torch.Tensor]) -> float:
        if id(data) not in trainers:
            x, y = data
            trainers[id(data)] = DpSgdTrainer(
                _Scalar(), x, y, 1.0, 2, 1.0, sigma, loss=_mse, generator=gen
            )
            if clip is None:  # noise for C = 1 but no clipping of the records
                trainers[id(data)].clip, trainers[id(data)].sigma = 1e9, sigma / 1e9
        t = trainers[id(data)]
        return float(t.noisy_gradient(torch.arange(len(t.x)))["w"])

    return mech


def dpsgd_selftest(eps: float, delta: float, samples: int, seed: int = 7) -> SelfTest:
    """One full-batch DP-SGD step, σ for (ε, δ); neighbours D vs D + a record of gradient 100."""
    from dssgd.shared.accounting import noise_multiplier

    sigma = noise_multiplier(eps, delta, 1.0, 1)
    d = (torch.ones(2), torch.zeros(2))
    d2 = (torch.tensor([1.0, 1.0, 100.0]), torch.tensor([0.0, 0.0, -1.0]))
    events = {f"g > {t}": (lambda o, t=t: o > t) for t in (1.0, 2.0, 3.0, 5.0, 10.0)}
    shipped = audit(
        _dpsgd_step(sigma, 1.0, seed),
        d,
        d2,
        events,
        samples,
        samples // 4,
        delta=delta,
        alpha=ALPHA,
    )
    broken = audit(
        _dpsgd_step(sigma, None, seed),
        d,
        d2,
        events,
        samples,
        samples // 4,
        delta=delta,
        alpha=ALPHA,
    )
    return SelfTest(f"DP-SGD step ε {eps:g}", eps, shipped, broken)
