"""Local SGD and evaluation: the only place that runs PyTorch training loops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int


class LocalTrainer:
    """A model, data and optimiser; ``epoch()`` is the paper's local step 2.

    The data are ``x``/``y`` themselves, or only their ``rows`` (indices): a process hosting many
    participants keeps one trainer and ``bind``s it to each participant's rows of one shared
    pair of tensors before its epoch, so no participant holds a copy of its examples.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float,
        batch_size: int,
        seed: int,
        loss: LossFn = F.nll_loss,  # the task's loss (shared/tasks.py); NLL for the paper's
        rows: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.batch_size = batch_size
        self.lr = lr
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gen = torch.Generator()
        self.bind(x, y, rows, seed)

    def bind(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, seed: int) -> None:
        """Train on ``rows`` of x/y (all of them if None) with shuffles seeded by ``seed``."""
        self.x, self.y, self.rows = x, y, rows
        self.gen.manual_seed(seed)

    @torch.no_grad()
    def _sgd_step(self) -> None:
        # Plain SGD, p ← p − lr·∇p: what torch.optim.SGD (no momentum, no weight decay) computes
        # on CPU, bit for bit (tests/integration/test_training.py). torch.optim is not used
        # because every optimizer step passes through torch._disable_dynamo, whose first call
        # imports torch._dynamo: about 1.4 s in every process that trains, besides importing torch.
        # One foreach call instead of an add_ per tensor: the same kernel on CPU, one dispatch.
        params = [p for p in self.params if p.grad is not None]
        if params:
            torch._foreach_add_(params, [p.grad for p in params], alpha=-self.lr)

    def epoch(self) -> float:
        """One pass over the local data in shuffled mini-batches; returns the mean training loss."""
        self.model.train()
        size = len(self.x) if self.rows is None else len(self.rows)
        order = torch.randperm(size, generator=self.gen)
        if self.rows is not None:
            order = self.rows[order]  # positions in the shared tensors
        total, count = 0.0, 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for p in self.params:  # zero_grad(set_to_none=True) without walking the modules
                p.grad = None
            loss = self.loss(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self._sgd_step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        return total / max(1, count)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int = 2000,
    loss_fn: LossFn | None = None,
) -> EvalResult:
    """Accuracy and mean loss (NLL unless the task's loss is given) in batches."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch):
        out = model(x[start : start + batch])
        target = y[start : start + batch]
        if loss_fn is None:
            loss += float(F.nll_loss(out, target, reduction="sum"))
        else:
            loss += float(loss_fn(out, target)) * len(target)
        correct += int((out.argmax(1) == target).sum())
    n = len(x)
    return EvalResult(accuracy=correct / n, loss=loss / n, examples=n)


def labels_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """The BatchNorm-style layers that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@torch.no_grad()
def refresh_norm_stats(model: nn.Module, x: torch.Tensor, batch_size: int) -> bool:
    """Recompute every BatchNorm's running statistics for the model's current parameters.

    The statistics become the plain average over one pass of ``x`` (momentum None), so they
    describe exactly these parameters on this data. Returns False when the model has none.
    """
    layers = norm_layers(model)
    if not layers:
        return False
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size])
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    return True
