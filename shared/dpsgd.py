"""Record-level DP-SGD for one participant's local epoch (Abadi et al., CCS 2016).

Every step: Poisson-sample each local record with probability q, compute its own gradient
(torch.func: vmap over grad), clip it to L2 norm ≤ C, sum, add N(0, σ²C²) to every coordinate,
divide by the batch size B (a public constant; the shard size |D| and so q = B/|D| are in the
run's configuration, treated as public) and take a plain SGD step. Each step is then the
subsampled Gaussian mechanism with respect to adding or removing one record, and everything the
participant does afterwards with its parameters (Δw, selection, clipping to γ, publishing) is
post-processing: the guarantee covers the released update whatever the selection does.
shared.accounting composes every step of the run (PLD) into (ε, δ).

Written against any `nn.Module`, a loss `loss(output, target)` (default cross-entropy on logits;
the paper models' log-softmax outputs give the same value, log-softmax being idempotent) and
tensors of inputs and targets, so it works for any task whose layers torch.func can take
per-example gradients of. Layers that mix examples (batch norm in training mode) cannot be, and
say so in one line (DpSgdUnsupported).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import torch
import torch.nn.functional as F
from dssgd.shared.errors import DssgdError
from torch import nn
from torch.func import functional_call, grad, vmap

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Batch norm in training mode computes statistics across the batch: one record's output depends on
# the others, so a per-example gradient (and per-example clipping) is not defined.
_MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


class DpSgdUnsupported(DssgdError):
    """The model has a layer whose per-example gradients DP-SGD cannot take."""


def check_supported(model: nn.Module) -> None:
    """Raise DpSgdUnsupported naming the first layer per-example gradients cannot handle."""
    for name, module in model.named_modules():
        if isinstance(module, _MIXING):
            raise DpSgdUnsupported(
                f"DP-SGD needs per-example gradients, but layer {name or '<root>'} "
                f"({type(module).__name__}) mixes the examples of a batch; use GroupNorm or "
                f"LayerNorm instead"
            )


def secure_generator() -> torch.Generator:
    """Sampling and noise must be unpredictable to whoever knows the run's seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class DpSgdTrainer:
    """A participant's model, data and DP-SGD; ``epoch()`` replaces LocalTrainer.epoch()."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float,
        batch_size: int,
        clip: float,
        noise_multiplier: float,
        loss: Loss | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_supported(model)
        if not (clip > 0 and math.isfinite(clip)) or not noise_multiplier >= 0:
            raise ValueError("DP-SGD needs clip norm > 0 and noise multiplier >= 0")
        self.model, self.x, self.y = model, x, y
        self.lr, self.clip, self.sigma = lr, float(clip), float(noise_multiplier)
        self.loss: Loss = loss or F.cross_entropy
        self.q = min(1.0, batch_size / len(x))
        # The divisor must not depend on the data: B (public configuration), not a count of the
        # records sampled or held (the self-test catches q·|D| with |D| differing by one).
        self.expected_batch = float(batch_size)
        self.steps_per_epoch = math.ceil(len(x) / batch_size)
        self.gen = generator or secure_generator()
        self.steps = 0  # every step is a privacy-relevant event (accounted by the caller)
        # How often each record was drawn so far: never released, only read by the audit, whose
        # members that were never drawn must score like non-members (dssgd/audit/sweep.py).
        self.times_sampled = torch.zeros(len(x), dtype=torch.long)
        self._per_example = vmap(grad(self._loss_one), in_dims=(None, None, 0, 0))

    def _loss_one(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        out = functional_call(self.model, (params, buffers), (x.unsqueeze(0),))
        return self.loss(out, y.unsqueeze(0))

    def per_example_grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: tensor of shape (batch, *param.shape)}: each record's own gradient."""
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        buffers = dict(self.model.named_buffers())
        try:
            return self._per_example(params, buffers, x, y)
        except (RuntimeError, NotImplementedError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DpSgdUnsupported(f"DP-SGD cannot take per-example gradients: {first}") from exc

    def noisy_gradient(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """(Σ clip(g_i, C) + N(0, σ²C²)) / (q·|D|) over the records in `idx` (may be empty)."""
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        if idx.numel() > 0:
            g = self.per_example_grads(self.x[idx], self.y[idx])
            norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
            scale = (self.clip / (norms + 1e-12)).clamp(max=1.0)
            for k, v in g.items():
                total[k] = torch.einsum("b,b...->...", scale, v)
        for t in total.values():
            t.add_(torch.randn(t.shape, generator=self.gen) * (self.sigma * self.clip))
            t.div_(self.expected_batch)
        return total

    def epoch(self) -> float:
        """ceil(|D|/B) Poisson-sampled DP-SGD steps. Returns NaN, not a loss.

        A training loss computed on the records would be a release outside the mechanism, so
        none is computed: the participant publishes "nan" in its progress.
        """
        self.model.train()
        params = dict(self.model.named_parameters())
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(len(self.x), generator=self.gen) < self.q
            self.times_sampled += mask
            g = self.noisy_gradient(torch.nonzero(mask).flatten())
            with torch.no_grad():
                for k, v in g.items():
                    params[k].add_(v, alpha=-self.lr)
            self.steps += 1
        return math.nan
