"""Per-message defences against a participant that lies (docs/RELIABILITY.md, "A participant
that lies"). Each judges one update at the moment it would be applied, against the global
state it would be applied to: no rounds, no waiting for the others, so it fits asynchrony.

* ``none`` — today's bounds only (±γ per value, θu·n entries, optional ``max_l2``).
* ``norm`` — refuse an update whose L2 norm exceeds ``factor`` × the median norm of the last
  ``window`` accepted ones (after ``warmup`` of them). Cheap, needs no data; blind to a liar
  who stays within the population's norms (every value at ±γ is within them once honest
  updates are clipped at γ too).
* ``validation`` — refuse an update that makes the loss on a small server-side validation set
  worse by more than ``margin`` (relative to the loss before it). One forward pass per
  update. The validation images are ones no participant holds (for MNIST: training images
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
        """None to accept the step ``w[indices] += values``; else why it is refused."""

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
class ValidationLoss:
    """Refuse a step that raises the loss on the server's validation set by more than
    ``margin`` × the loss before it. ``loss_of(w)`` is the validation loss of a flat state."""

    loss_of: Callable[[np.ndarray], float]
    margin: float = 0.02
    name: str = "validation"
    _cached: tuple[int, float] | None = None  # (id of the state's buffer version, loss)
    _version: int = 0
    _scratch: np.ndarray | None = None
    _pending: float = math.nan  # the loss of the state judged last

    def judge(self, w: np.ndarray, indices: np.ndarray, values: np.ndarray) -> str | None:
        before = self._before(w)
        if self._scratch is None or self._scratch.shape != w.shape:
            self._scratch = np.empty_like(w)
        np.copyto(self._scratch, w)
        self._scratch[indices] += values
        after = self.loss_of(self._scratch)
        if not math.isfinite(after) or after > before * (1 + self.margin):
            return f"validation loss {before:.4g} -> {after:.4g} (margin {self.margin:.0%})"
        self._pending = after
        return None

    def _before(self, w: np.ndarray) -> float:
        if self._cached is None or self._cached[0] != self._version:
            self._cached = (self._version, self.loss_of(w))
        return self._cached[1]

    def accepted(self, indices: np.ndarray, values: np.ndarray) -> None:
        # The state now is the one judged last: its loss is known, no second forward pass.
        self._version += 1
        self._cached = (self._version, self._pending)

    def forget(self) -> None:
        """The state changed under us (reloaded after a reconnect): recompute next time."""
        self._cached = None


# --- building them for a run --------------------------------------------------------------------

VALIDATION_SIZE = 500


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


def _validation(cfg: Any, task: Any) -> ValidationLoss:
    import torch
    from dssgd.shared.models import set_flat

    data = validation_set(cfg, task)
    model = task.build_model()
    model.eval()
    x, y = data.tensors
    loss_fn = task.loss

    def loss_of(w: np.ndarray) -> float:
        set_flat(model, w)
        with torch.inference_mode():
            return float(loss_fn(model(x), y))

    return ValidationLoss(loss_of, margin=cfg.defence_margin)


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
