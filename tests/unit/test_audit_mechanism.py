"""The DP-SGD update the audit measures is the mechanism its accountant composes.

shared/accounting.py composes ceil(|D|/B) Poisson-subsampled Gaussian steps per epoch at rate
q = B/|D|. These tests check that shared/dpsgd.py's epoch is that: records drawn independently at
rate q (not shuffled fixed batches), as many steps as are accounted, and an update that depends
on the drawn records only. Each check has a negative control that fails it: fixed batches for
the sampling, a trainer that reads every record (LocalTrainer) for the dependence. Small
synthetic data, no MNIST, well under a second each.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from dssgd.shared.dpsgd import DpSgdTrainer
from dssgd.shared.training import LocalTrainer
from torch import nn

N, B, EPOCHS = 200, 10, 10  # q = 0.05, 20 steps an epoch


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 12, generator=g), torch.randint(0, 3, (N,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _trainer(x: torch.Tensor, y: torch.Tensor, seed: int = 7) -> DpSgdTrainer:
    gen = torch.Generator().manual_seed(seed)
    return DpSgdTrainer(_model(), x, y, 0.1, B, 1.0, 1.0, generator=gen)


def _batch_sizes(trainer: DpSgdTrainer) -> list[int]:
    """Run EPOCHS epochs, recording the size of every step's batch."""
    sizes: list[int] = []
    step = trainer.noisy_gradient

    def spy(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes.append(int(idx.numel()))
        return step(idx)

    trainer.noisy_gradient = spy  # type: ignore[method-assign]
    for _ in range(EPOCHS):
        trainer.epoch()
    return sizes


def poisson_at(sizes: list[int], counts: np.ndarray, q: float) -> bool:
    """Batch sizes and per-record draw counts as independent Bernoulli(q) draws give them.

    Each record's count over T steps is Binomial(T, q), and so is each batch's size over N
    records: the mean within 4 standard errors, the variances within ±40 % (the sample variance
    of 200 values has a relative spread of ±10 %).
    """
    steps, n = len(sizes), len(counts)
    mean_ok = abs(counts.sum() - n * steps * q) <= 4 * math.sqrt(n * steps * q * (1 - q))
    var_count = counts.var(ddof=1) / (steps * q * (1 - q))
    var_batch = np.var(sizes, ddof=1) / (n * q * (1 - q))
    return bool(mean_ok and 0.6 < var_count < 1.4 and 0.6 < var_batch < 1.4)


def test_records_are_poisson_sampled_at_the_accounted_rate_and_steps() -> None:
    x, y = _data()
    trainer = _trainer(x, y)
    sizes = _batch_sizes(trainer)
    # the steps the audit (dssgd/audit/pipeline.py) and the worker hand to the accountant
    assert trainer.q == B / N
    assert len(sizes) == trainer.steps == EPOCHS * math.ceil(N / B)
    counts = trainer.times_sampled.numpy()
    assert counts.sum() == sum(sizes)
    assert poisson_at(sizes, counts, trainer.q)
    # negative control: shuffled fixed batches (every record once an epoch) fail the check
    fixed = [B] * len(sizes)
    assert not poisson_at(fixed, np.full(N, EPOCHS), trainer.q)


def _update(trainer: DpSgdTrainer | LocalTrainer) -> torch.Tensor:
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.epoch()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return after - before


def test_the_update_depends_on_the_drawn_records_only() -> None:
    x, y = _data()
    first = _trainer(x, y)
    delta = _update(first)
    never = first.times_sampled == 0
    assert 30 < int(never.sum()) < 120  # (1 − q)^20 ≈ 36 % of records are never drawn
    # Everything about the never-drawn records changed: features and labels.
    x2, y2 = x.clone(), y.clone()
    x2[never] = 10 * torch.randn(int(never.sum()), x.shape[1])
    y2[never] = (y[never] + 1) % 3
    assert torch.equal(_update(_trainer(x2, y2)), delta)  # same draws, same noise: bit for bit
    # ...while one drawn record changed does show (the comparison can see a change)
    x3 = x.clone()
    x3[int(torch.nonzero(~never)[0])] += 1.0
    assert not torch.equal(_update(_trainer(x3, y)), delta)

    # negative control: a trainer that reads every record fails the check
    def plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _update(LocalTrainer(_model(), x, y, 0.1, B, 0, F.cross_entropy))

    assert not torch.equal(plain(x2, y2), plain(x, y))
