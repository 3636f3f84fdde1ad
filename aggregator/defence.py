"""Per-message defences against a participant that lies (docs/RELIABILITY.md, "A participant
that lies"). Each judges one update at the moment it would be applied, against the global
state it would be applied to: no rounds, no waiting for the others, so it fits asynchrony.

* ``none`` — today's bounds only (±γ per value, θu·n entries, optional ``max_l2``).
* ``norm`` — refuse an update whose L2 norm exceeds ``factor`` × the median norm of the last
  ``window`` accepted ones (after ``warmup`` of them). Cheap, needs no data; blind to a liar
  who stays within the population's norms (every value at ±γ is within them once honest
  updates are clipped at γ too).
* ``validation`` — refuse an update that points uphill on a small server-side validation set:
  the cosine between the step and the validation loss's gradient at the current state above
  ``margin`` (default 0). One forward and backward pass per change of the state. The
  validation images are ones no participant holds (for MNIST: training images
  outside every shard), so the defence learns nothing a participant did not already share.

A refused update is dead-lettered with reason ``defence`` like any other refusal; its sequence
number is spent, so the participant simply goes on. The registry ``DEFENCES`` is the plug-in
point: a factory ``(cfg, task) -> Defence``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Defence(Protocol):
    name: str

    def judge(self, w: np.ndarray, indices: np.ndarray, values: np.ndarray) -> str | None:
        """None to accept the update ``values`` at ``indices`` (as sent, before the rule's
        weight: a weight that falls with staleness must not decide, see ValidationDescent)
        on the state ``w``; else why it is refused."""

    def accepted(self, indices: np.ndarray, values: np.ndarray) -> None:
        """The step was applied (statistics of the population)."""


@dataclass
class NormBound:
    """Refuse a step whose L2 norm is far above the recent accepted ones' median."""

    factor: float = 2.0
    window: int = 50
    warmup: int = 10
    name: str = "norm"
    norms: deque[float] = field(default_factory=deque)

    def limit(self) -> float | None:
        if len(self.norms) < self.warmup:
            return None
        return self.factor * float(np.median(self.norms))

    def judge(self, w: np.ndarray, indices: np.ndarray, values: np.ndarray) -> str | None:
        limit = self.limit()
        norm = float(np.linalg.norm(values))
        if limit is not None and norm > limit:
            return f"L2 norm {norm:.3g} > {self.factor} × recent median ({limit:.3g})"
        return None

    def accepted(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.norms.append(float(np.linalg.norm(values)))
        while len(self.norms) > self.window:
            self.norms.popleft()


@dataclass
class ValidationDescent:
    """Refuse a step that goes uphill on the server's validation set: the cosine between the
    step and the loss's gradient there (over the step's entries) above ``margin``.

    First order and scale-free on purpose. Judging the loss after the whole step instead was
    tried first: it refused honest updates in bulk once the model was good (one participant's
    step, taken alone, often raises the loss a little; the average of many lowers it), and
    each refusal fed the next: the version stopped moving, staleness fell to 0, steps got
    their full weight and raised the loss more (bench/lying.py, 127 of 270 honest refused).
    A norm bound on the weighted step locked in the same way (242 of 270), so every defence
    now sees the values as sent.
    ``grad_of(w)`` is the validation loss's gradient at a flat state."""

    grad_of: Callable[[np.ndarray], np.ndarray]
    margin: float = 0.0
    # Recompute the gradient after this many applied updates: the backward pass is the cost,
    # and an aggregator that falls behind makes every update staler (and less often downhill).
    refresh_every: int = 1
    name: str = "validation"
    _grad: np.ndarray | None = None  # at a recent state; None: compute before the next verdict
    _since: int = 0  # updates applied since it was computed

    def score(self, w: np.ndarray, indices: np.ndarray, values: np.ndarray) -> float:
        """cos(gradient, step) on the step's entries: > 0 uphill, < 0 downhill."""
        if self._grad is None:
            self._grad = self.grad_of(w)
        g = self._grad[indices].astype(np.float64)
        v = values.astype(np.float64)
        norm = float(np.linalg.norm(g) * np.linalg.norm(v))
        return float(g @ v) / norm if norm > 0 else 0.0

    def judge(self, w: np.ndarray, indices: np.ndarray, values: np.ndarray) -> str | None:
        cos = self.score(w, indices, values)
        if not math.isfinite(cos) or cos > self.margin:
            return f"step goes uphill on the validation set (cosine {cos:.3g} > {self.margin:g})"
        return None

    def accepted(self, indices: np.ndarray, values: np.ndarray) -> None:
        self._since += 1
        if self._since >= self.refresh_every:  # the state moved enough: a fresh gradient
            self._grad, self._since = None, 0

    def forget(self) -> None:
        self._grad, self._since = None, 0


# --- building them for a run --------------------------------------------------------------------

VALIDATION_SIZE = 500
VALIDATION_REFRESH = 5  # applied updates per backward pass (a 10-participant run: every 0.5 s)


def validation_set(cfg: Any, task: Any, size: int = VALIDATION_SIZE) -> Any:
    """Images no participant holds: the task's ``validation_data(ctx)`` if it has one; for the
    built-in MNIST tasks, training images outside every participant's shard."""
    from pathlib import Path

    from dssgd.shared.tasks import TaskContext

    data_dir = None if cfg.data in ("auto", "hub") else Path(cfg.data)
    ctx = TaskContext(-1, cfg.participants, cfg.seed, data_dir, cfg.partition_spec)
    inner = getattr(task, "obj", task)
    if hasattr(inner, "validation_data"):
        return inner.validation_data(ctx)
    from dssgd.shared.builtin_tasks import MnistTask, _mnist
    from dssgd.shared.data import prepare, shard_indices
    from dssgd.shared.training import labels_tensor
    from torch.utils.data import TensorDataset

    if not isinstance(inner, MnistTask):
        from dssgd.shared.errors import ConfigError

        raise ConfigError(f"defence 'validation' needs a task with validation_data(ctx); "
                          f"{cfg.task} has none")
    data = _mnist(inner._source(ctx))
    held = np.zeros(len(data.train_y), bool)
    for p in range(cfg.participants):
        held[shard_indices(data.train_y, p, cfg.participants, cfg.shard_size, cfg.seed,
                           partition=cfg.partition_spec)] = True
    free = np.flatnonzero(~held)
    idx = np.sort(np.random.default_rng(cfg.seed + 7919).choice(free, size, replace=False))
    return TensorDataset(prepare(data.train_x[idx], inner.model),
                         labels_tensor(data.train_y[idx]))


def _validation(cfg: Any, task: Any) -> ValidationDescent:
    import torch
    from dssgd.shared.models import set_flat

    data = validation_set(cfg, task)
    model = task.build_model()
    model.eval()
    x, y = data.tensors
    params = list(model.parameters())
    n = task.layout.n

    def grad_of(w: np.ndarray) -> np.ndarray:
        set_flat(model, w)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            task.loss(model(x), y).backward()
        flat = np.zeros(n, np.float32)  # buffers (after the parameters) get no gradient
        pos = 0
        for p in params:
            k = p.numel()
            if p.grad is not None:
                flat[pos : pos + k] = p.grad.reshape(-1).numpy()
            pos += k
        return flat

    return ValidationDescent(grad_of, margin=cfg.defence_margin, refresh_every=VALIDATION_REFRESH)


DEFENCES: dict[str, Callable[[Any, Any], Defence]] = {
    "norm": lambda cfg, task: NormBound(),
    "validation": _validation,
}


def build(cfg: Any, task: Any) -> Defence | None:
    """The run's defence (None for ``none``)."""
    if cfg.defence == "none":
        return None
    d = DEFENCES[cfg.defence](cfg, task)
    log.info("defence %s on every update", d.name)
    return d
