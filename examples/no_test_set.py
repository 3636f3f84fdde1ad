"""A task without a central test set: each participant evaluates the downloaded global model on a
held-out 20 % of its own data, and the run's metrics are their example-weighted mean.

    dssgd run --task examples/no_test_set.py:TASK --participants 3 --epochs 8

It also shows ``ctx.split``: every participant takes its part of one dataset with the run's
partitioner (``--label-skew 0.5``, or ``DSSGD_PARTITION=classes:1``).
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Blobs:
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def local_data(self, ctx):
        g = torch.Generator().manual_seed(0)  # one dataset, the same in every process…
        centers = 2.0 * torch.randn(3, 8, generator=g)
        y = torch.randint(0, 3, (3000,), generator=g)
        everyone = TensorDataset(centers[y] + torch.randn(3000, 8, generator=g), y)
        return ctx.split(everyone)  # …of which this participant holds its part


TASK = Blobs()
