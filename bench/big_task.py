"""A 10 M-parameter task for the storage benches: MNIST through one wide hidden layer.

    dssgd run --task bench/big_task.py:TASK --participants 2 --epochs 3 --theta-u 0.01

784 → 12,600 → 10: 10,017,010 parameters, every one of them a float32 in Redis.
"""

from __future__ import annotations

from dssgd.shared.builtin_tasks import MnistTask
from torch import nn

HIDDEN = 12_600


class WideMlp(MnistTask):
    def __init__(self) -> None:
        super().__init__("mlp")  # the MLP's input: flattened, normalised 28×28 images

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10), nn.LogSoftmax(dim=1)
        )


TASK = WideMlp()
