"""The paper's two baselines, in the same harness as DSSGD: same model, shards and evaluation.

* centralized: one model trained on the union of every participant's shard (the data pooled);
* standalone: one participant's shard alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.config import RunConfig
from shared.data import Mnist, prepare, shard_indices
from shared.errors import ConfigError
from shared.models import build_model
from shared.training import LocalTrainer, evaluate, labels_tensor


@dataclass
class Curve:
    name: str
    points: list[tuple[int, float]]  # (epoch, test accuracy)
    seconds: float
    images: int

    @property
    def final(self) -> float:
        return self.points[-1][1] if self.points else float("nan")

    @property
    def best(self) -> float:
        return max(a for _, a in self.points) if self.points else float("nan")


def union_indices(cfg: RunConfig, labels: np.ndarray) -> np.ndarray:
    parts = [
        shard_indices(labels, p, cfg.participants, cfg.shard_size, cfg.seed, cfg.label_skew)
        for p in range(cfg.participants)
    ]
    return np.unique(np.concatenate(parts))


def train_curve(
    name: str,
    cfg: RunConfig,
    data: Mnist,
    indices: np.ndarray,
    epochs: int,
    progress: Callable[[str], None] | None = None,
) -> Curve:
    model = build_model(cfg.model, cfg.seed)
    trainer = LocalTrainer(
        model,
        prepare(data.train_x[indices], cfg.model),
        labels_tensor(data.train_y[indices]),
        cfg.lr,
        cfg.batch_size,
        seed=cfg.seed,
    )
    tx, ty = prepare(data.test_x, cfg.model), labels_tensor(data.test_y)
    points = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        trainer.epoch()
        acc = evaluate(model, tx, ty).accuracy
        points.append((epoch, acc))
        if progress:
            progress(f"{name}: epoch {epoch}/{epochs}, accuracy {acc:.4f}")
    return Curve(name, points, time.perf_counter() - t0, len(indices))


def centralized(
    cfg: RunConfig, data: Mnist, epochs: int, progress: Callable[[str], None] | None = None
) -> Curve:
    return train_curve("centralized", cfg, data, union_indices(cfg, data.train_y), epochs, progress)


def standalone(
    cfg: RunConfig,
    data: Mnist,
    epochs: int,
    participant: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Curve:
    idx = shard_indices(
        data.train_y, participant, cfg.participants, cfg.shard_size, cfg.seed, cfg.label_skew
    )
    return train_curve("standalone", cfg, data, idx, epochs, progress)


def task_baseline(cfg: RunConfig, participants: list[int], epochs: int) -> float:
    """Test accuracy of the run's task trained on the pooled data of ``participants`` alone.

    Centralized = every participant's part pooled; standalone = one participant's part. Same
    model, seed, learning rate and batch size as the federated run, any task (shared/tasks.py).
    """
    import torch
    from torch.utils.data import ConcatDataset

    from shared.tasks import as_tensors, central_test, context_for

    task, _, test = central_test(cfg)
    if test is None:
        raise ConfigError(f"task {cfg.task} has no central test set to compare on")
    pooled = ConcatDataset([task.local_data(context_for(cfg, p)) for p in participants])
    x, y = as_tensors(pooled)
    model = task.build_model(cfg.seed)
    trainer = LocalTrainer(model, x, y, cfg.lr, cfg.batch_size, seed=cfg.seed, loss=task.loss)
    for _ in range(epochs):
        trainer.epoch()
    with torch.inference_mode():
        return task.metrics(model, test)["accuracy"]
