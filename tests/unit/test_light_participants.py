"""Light participants (issue 18): one shared model, trainer and example tensor per process, and
yet every participant trains exactly as if it held its own copies."""

from __future__ import annotations

import numpy as np
import torch
from dssgd.shared.models import build_model, get_flat, set_flat
from dssgd.shared.tasks import as_tensors
from dssgd.shared.training import LocalTrainer
from dssgd.worker.participant import LocalData, epoch_seed, flat_view
from torch.utils.data import Subset, TensorDataset


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(500, 784, generator=g), torch.randint(0, 10, (500,), generator=g)
    )


def test_rows_of_a_shared_tensor_train_bit_for_bit_like_own_copies() -> None:
    ds = _dataset()
    part = Subset(Subset(ds, list(range(100, 400))), list(range(0, 300, 3)))  # nested, as holdout
    data = LocalData.of(part)
    assert data.rows is not None and data.x is ds.tensors[0]  # no copy of the examples
    own_x, own_y = as_tensors(part)
    assert torch.equal(data.tensors()[0], own_x) and torch.equal(data.tensors()[1], own_y)

    def trained(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, seed: int) -> bytes:
        model = build_model("mlp", seed=1)
        LocalTrainer(model, x, y, 0.1, 32, seed, rows=rows).epoch()
        return get_flat(model).tobytes()

    shared = trained(data.x, data.y, data.rows, seed=5)
    assert shared == trained(own_x, own_y, None, seed=5)
    # Negative control: the comparison sees a different shuffle.
    assert shared != trained(own_x, own_y, None, seed=6)


def test_one_trainer_rebound_per_participant_matches_fresh_trainers() -> None:
    ds = _dataset()
    parts = [LocalData.of(Subset(ds, list(range(p * 50, p * 50 + 50)))) for p in range(3)]
    model = build_model("mlp", seed=1)
    start = get_flat(model)
    trainer = LocalTrainer(model, parts[0].x, parts[0].y, 0.1, 32, 0, rows=parts[0].rows)
    for p, data in enumerate(parts):
        set_flat(model, start)
        trainer.bind(data.x, data.y, data.rows, epoch_seed(3, p, 0))
        trainer.epoch()
        fresh = build_model("mlp", seed=1)
        x, y = data.tensors()
        LocalTrainer(fresh, x, y, 0.1, 32, epoch_seed(3, p, 0)).epoch()
        assert get_flat(model).tobytes() == get_flat(fresh).tobytes()
    assert epoch_seed(3, 0, 1) != epoch_seed(3, 1, 0)  # seed + pid + epoch would collide here


def test_flat_view_is_the_model_state() -> None:
    model = build_model("mlp", seed=2)
    before = get_flat(model)
    flat = flat_view(model)
    assert flat is not None and flat.tobytes() == before.tobytes()
    flat[:] = np.arange(flat.size, dtype=np.float32)  # writing the vector loads the model
    assert get_flat(model).tobytes() == flat.tobytes()
    x = torch.randn(4, 784)
    model(x).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-0.1)  # training in place moves the vector
    assert get_flat(model).tobytes() == flat.tobytes()
    assert flat_view(torch.nn.BatchNorm1d(3)) is None  # buffers: the generic copies instead
