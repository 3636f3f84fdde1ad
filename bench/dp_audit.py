"""The long DP self-test and the accounting figures of docs/PRIVACY.md.

    python -m bench.dp_audit                 # ≈ 2–4 min on one core
    python -m bench.dp_audit --samples 20000 # the CI test's size, for comparison

1. The distinguishing test of tests/unit/test_dp_selftest.py and
   tests/integration/test_dp_sgd.py with more samples:
   the empirical ε lower bound (Clopper–Pearson, 99 %) of the shipped SVT and DP-SGD step and of
   their negative controls (the pre-fix SVT, DP-SGD without clipping), beside the claimed ε.
2. Accounting: for the default task (MLP, n = 109,386) the total ε of the SVT under basic,
   advanced and PLD composition, and the DP-SGD noise multipliers of the results table.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
from dssgd.shared.accounting import dpsgd_epsilon, noise_multiplier, svt_pld_epsilon
from dssgd.shared.dpaudit import audit
from dssgd.shared.privacy import SvtParams, advanced_composition, epsilon_for, svt_select
from dssgd.shared.selection import budget

sys.path.insert(0, "tests")
from test_dp_selftest import (
    ALPHA,
    GAMMA,
    MIXED_STRESS,
    TAU,
    VALUE_STRESS,
    count_events,
    svt_prefix,
    value_events,
)
from test_dp_sgd import DELTA, _one_step

N_MLP = 109_386


def audits(samples: int) -> None:
    print("| mechanism | input | claimed ε | empirical ε lower bound (99 %) | event |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(11)
    for name, sel in (("SVT (shipped)", svt_select), ("SVT pre-fix (control)", svt_prefix)):
        for eps, c, x, events, label in (
            (0.5, 1, VALUE_STRESS, value_events(), "±100γ, c 1"),
            (2.0, 1, VALUE_STRESS, value_events(), "±100γ, c 1"),
            (2.0, 2, MIXED_STRESS, {**value_events(), **count_events(2)}, "3 × ±100γ, c 2"),
        ):
            p = SvtParams(epsilon=eps, c=c, gamma=GAMMA, tau=TAU)
            r = audit(lambda d, p=p, sel=sel: sel(d, p, rng), *x, events, samples,
                      samples // 4, alpha=ALPHA)  # fmt: skip
            print(f"| {name} | {label} | {eps} | {r.epsilon_lb:.3f} | {r.event} |", flush=True)
    eps = 2.0
    sigma = noise_multiplier(eps, DELTA, 1.0, 1)
    d = (torch.ones(2), torch.zeros(2))
    d2 = (torch.tensor([1.0, 1.0, 100.0]), torch.tensor([0.0, 0.0, -1.0]))
    events = {f"g > {t}": (lambda o, t=t: o > t) for t in (1.0, 2.0, 3.0, 5.0, 10.0)}
    events |= {f"g < {-t}": (lambda o, t=t: o < -t) for t in (1.0, 2.0, 3.0, 5.0)}
    n = max(2000, samples // 5)  # one DP-SGD step is ~100× slower than one SVT call
    for name, unclipped in (("DP-SGD step (shipped)", False), ("DP-SGD unclipped (control)", True)):
        r = audit(_one_step(1.0, sigma, unclipped), d2, d, events, n, n // 4, delta=DELTA,
                  alpha=ALPHA)  # fmt: skip
        print(f"| {name} | D vs D + one record of gradient 100, C 1 | {eps} (δ 1e-5) | "
              f"{r.epsilon_lb:.3f} | {r.event} |", flush=True)  # fmt: skip


def accounting() -> None:
    print("\n| θu | ε/c | epochs | basic k·ε | advanced | PLD (reported) |")
    print("|---|---|---|---|---|---|")
    for theta in (0.1, 0.01):
        c = budget(N_MLP, theta)
        for epv in (0.01, 0.1, 1.0, 10.0):
            eps = epsilon_for(epv, c)
            for k in (1, 30):
                adv = advanced_composition(eps, k, DELTA)
                print(f"| {theta} | {epv} | {k} | {k * eps:,.4g} | "
                      f"{'∞' if math.isinf(adv) else f'{adv:,.4g}'} | "
                      f"{svt_pld_epsilon(eps, c, k, DELTA):,.4g} |", flush=True)  # fmt: skip
    print("\n| DP-SGD setting | q | steps | ε = 1 | 2 | 4 | 8 |")
    print("|---|---|---|---|---|---|---|")
    for batch, epochs in ((32, 10), (32, 30), (120, 5), (300, 5), (600, 10)):
        q, steps = batch / 600, epochs * math.ceil(600 / batch)
        sig = [noise_multiplier(e, DELTA, q, steps) for e in (1.0, 2.0, 4.0, 8.0)]
        print(
            f"| B {batch}, {epochs} epochs | {q:.3f} | {steps} | "
            + " | ".join(f"σ {s:.3f}" for s in sig)
            + " |"
        )
        assert dpsgd_epsilon(sig[-1], q, steps, DELTA) <= 8.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    audits(args.samples)
    accounting()


if __name__ == "__main__":
    main()
