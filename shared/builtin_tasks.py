"""The built-in tasks: the paper's two MNIST models, and a clinical tabular set that ships offline.

* ``mnist-mlp``, ``mnist-cnn`` — MNIST (``shared/data.py``), each participant a seeded shard of
  the training set (``--shard-size``, ``--partition``), the 10k test set on the aggregator.
* ``breast-cancer`` — the Wisconsin diagnostic breast-cancer set bundled with scikit-learn
  (569 patients, 30 features, malignant or benign; ``pip install 'dssgd[sklearn]'``). A fixed
  seeded 20 % is the aggregator's test set; participants split the other 455 rows with the
  run's partitioner, or read their own CSV files with ``--data DIR`` (the hospital case:
  ``write_csv_parts`` writes such folders).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dssgd.shared import partition
from dssgd.shared.data import Mnist, load_mnist, prepare, shard_indices
from dssgd.shared.errors import DataError
from dssgd.shared.models import MODELS
from dssgd.shared.tasks import Task, TaskContext
from dssgd.shared.training import labels_tensor
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset


@functools.lru_cache(maxsize=2)
def _mnist(source: str) -> Mnist:
    """MNIST read once per process, however many participants the process hosts."""
    return load_mnist(source)


class _PreparedRows:
    """MNIST's training images prepared for one model, one tensor per process shared by all the
    participants it hosts: allocated whole, but filled (and resident in memory) only in the rows
    some participant uses, so a process pays for the images it trains on once, not per shard."""

    def __init__(self, data: Mnist, model: str) -> None:
        self.data, self.model = data, model
        shape = prepare(data.train_x[:1], model).shape[1:]
        self.dataset = TensorDataset(
            torch.empty((len(data.train_y), *shape)), labels_tensor(data.train_y)
        )
        self.ready = np.zeros(len(data.train_y), dtype=bool)

    def subset(self, idx: np.ndarray) -> Subset:
        todo = idx[~self.ready[idx]]
        if todo.size:
            x = self.dataset.tensors[0]
            x[torch.from_numpy(todo)] = prepare(self.data.train_x[todo], self.model)
            self.ready[todo] = True
        return Subset(self.dataset, idx.tolist())


class MnistTask(Task):
    """The paper's MNIST models (log-softmax outputs, so the loss is NLL)."""

    has_test_data = True  # MNIST's 10k test images (known without loading them)

    def __init__(self, model: str) -> None:
        self.model = model
        self._rows: dict[str, _PreparedRows] = {}
        # Prepared once per process: `dssgd run`'s preflight prepares it before forking, so the
        # forked aggregator's evaluator starts scoring at once instead of preparing it again.
        self._test: dict[str, TensorDataset] = {}

    def build_model(self) -> nn.Module:
        return MODELS[self.model].factory()

    @staticmethod
    def _source(ctx: TaskContext | None) -> str:
        return str(ctx.data_dir) if ctx is not None and ctx.data_dir is not None else "auto"

    def local_data(self, ctx: TaskContext) -> Dataset:
        data = _mnist(self._source(ctx))
        idx = shard_indices(
            data.train_y,
            ctx.participant,
            ctx.participants,
            ctx.shard_size or 600,
            ctx.seed,
            partition=ctx.partition,
        )
        source = self._source(ctx)
        if source not in self._rows:
            self._rows[source] = _PreparedRows(data, self.model)
        return self._rows[source].subset(idx)

    def test_data(self, ctx: TaskContext | None = None) -> Dataset:
        source = self._source(ctx)
        if source not in self._test:
            data = _mnist(source)
            x, y = prepare(data.test_x, self.model), labels_tensor(data.test_y)
            self._test[source] = TensorDataset(x, y)
        return self._test[source]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(output, target)


MNIST_MLP = MnistTask("mlp")
MNIST_CNN = MnistTask("cnn")


# --- breast cancer ------------------------------------------------------------------------------

TEST_FRACTION = 0.2
SPLIT_SEED = 20150  # fixed, not the run's seed: every run is judged on the same patients


def _bundled() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise DataError(
            "the breast-cancer task needs scikit-learn: pip install 'dssgd[sklearn]'"
        ) from None
    bunch = load_breast_cancer()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), list(bunch.feature_names)


def bundled_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of the bundled set, raw features, fixed split."""
    x, y, _ = _bundled()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = round(TEST_FRACTION * len(x))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class BreastCancerTask(Task):
    """Malignant or benign from 30 features: a small MLP, cross-entropy on logits."""

    has_test_data = True

    def __init__(self) -> None:
        self._scale: tuple[np.ndarray, np.ndarray] | None = None

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        # The task's published constants (mean and std of the bundled training split), applied
        # identically by every participant, as MNIST's mean and std are.
        if self._scale is None:
            train_x = bundled_split()[0]
            self._scale = (train_x.mean(0), train_x.std(0) + 1e-6)
        mean, std = self._scale
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    def local_data(self, ctx: TaskContext) -> Dataset:
        if ctx.data_dir is not None:
            x, y = read_csv_dir(ctx.data_dir)
            return TensorDataset(self._standardise(x), torch.from_numpy(y))
        train_x, train_y, _, _ = bundled_split()
        size = len(train_x) // ctx.participants
        idx = partition.indices(
            ctx.partition,
            train_y,
            len(train_x),
            ctx.participant,
            ctx.participants,
            size,
            ctx.seed,
        )
        return TensorDataset(self._standardise(train_x[idx]), torch.from_numpy(train_y[idx]))

    def test_data(self) -> Dataset:
        _, _, test_x, test_y = bundled_split()
        return TensorDataset(self._standardise(test_x), torch.from_numpy(test_y))


BREAST_CANCER = BreastCancerTask()


def read_csv_dir(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every ``*.csv`` in a folder: a header line, 30 feature columns, then ``target`` (0/1)."""
    files = sorted(Path(directory).glob("*.csv"))
    if not files:
        raise DataError(f"--data {directory} holds no .csv files")
    parts = []
    for f in files:
        try:
            table = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {f}: {exc}") from exc
        if table.shape[1] != 31:
            raise DataError(f"{f} has {table.shape[1]} columns; expected 30 features + target")
        parts.append(table)
    table = np.concatenate(parts)
    return table[:, :30].astype(np.float32), table[:, 30].astype(np.int64)


def write_csv_parts(out: Path, participants: int, seed: int = 1, scheme: str = "iid") -> list[Path]:
    """Write ``out/p<i>/part.csv`` per participant from the bundled training split (demos)."""
    train_x, train_y, _, _ = bundled_split()
    _, _, names = _bundled()
    header = ",".join([n.replace(" ", "_") for n in names] + ["target"])
    dirs = []
    for p in range(participants):
        idx = partition.indices(
            scheme, train_y, len(train_x), p, participants, len(train_x) // participants, seed
        )
        d = Path(out) / f"p{p}"
        d.mkdir(parents=True, exist_ok=True)
        rows = np.column_stack([train_x[idx], train_y[idx]])
        np.savetxt(d / "part.csv", rows, delimiter=",", header=header, comments="", fmt="%.6g")
        dirs.append(d)
    return dirs
