"""A BatchNorm model on synthetic data whose inputs lie far from zero. Imports only torch.

    dssgd run --task examples/batchnorm_task.py:TASK --participants 4 --epochs 10

Evaluated with its initial BatchNorm statistics (mean 0, variance 1) this model is useless on
inputs around 40, so a good accuracy shows that the buffers travelled with the parameters.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

DIM, CLASSES, CENTER = 20, 4, 40.0


def _data(seed: int, n: int) -> TensorDataset:
    centers = 1.5 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = CENTER + centers[y] + 2.0 * torch.randn(n, DIM, generator=g)
    return TensorDataset(x, y)


class BatchNormTask:
    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES)
        )

    def local_data(self, ctx):  # ctx.participant, ctx.participants, ctx.seed, ctx.data_dir
        return _data(1000 + ctx.participant, 400)

    def test_data(self):
        return _data(7, 2000)


TASK = BatchNormTask()
