"""The paper's MNIST models, selected by name, and the flat parameter view the system speaks in.

Everything outside this module sees a model as one float32 vector of ``n`` parameters in a stable
order (``named_parameters()`` order). That vector is what Redis stores, what a download overwrites
and what an update indexes into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ConfigError


class PaperCNN(nn.Module):
    """The paper's MNIST CNN on 32×32 inputs: exactly 105,506 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)  # 32×32 → 28×28, pool 3/3 → 9×9
        self.conv2 = nn.Conv2d(32, 64, 5)  # 9×9 → 5×5, pool 2/2 → 2×2
        self.fc1 = nn.Linear(64 * 2 * 2, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 32, 32)
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 3, 3)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class PaperMLP(nn.Module):
    """Two hidden ReLU layers (128, 64) on the flattened 28×28 image: 109,386 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 784)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # shape of one example as the model consumes it
    n_params: int


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", PaperMLP, (28 * 28,), 109_386),
    "cnn": ModelSpec("cnn", PaperCNN, (1, 32, 32), 105_506),
}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """Build a model; with a seed every process gets the same initial parameters."""
    spec = model_spec(name)
    if seed is None:
        return spec.factory()
    # A private generator state keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.factory()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module, out: np.ndarray | None = None) -> np.ndarray:
    """All parameters as one float32 vector (a copy), in named_parameters() order."""
    n = n_params(model)
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.shape != (n,) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape ({n},)")
    pos = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            out[pos : pos + k] = p.detach().reshape(-1).numpy()
            pos += k
    return out


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Overwrite all parameters from a flat float32 vector."""
    n = n_params(model)
    if flat.shape != (n,):
        raise ValueError(f"flat vector has shape {flat.shape}, model needs ({n},)")
    src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    pos = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            p.copy_(src[pos : pos + k].view_as(p))
            pos += k


def initial_parameters(name: str, seed: int) -> np.ndarray:
    """The run's seeded initialisation, identical in every process for the same (name, seed)."""
    return get_flat(build_model(name, seed))
