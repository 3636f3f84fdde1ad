"""The paper's MNIST models, and the flat state view the system speaks in.

Everything outside this module sees a model as one float32 vector of ``n`` entries in a stable
order: every parameter in ``named_parameters()`` order, then every persistent buffer (BatchNorm
running statistics and counters) in ``state_dict()`` order. That vector is what Redis stores,
what a download overwrites and what an update indexes into. A ``StateLayout`` names each slice
of it, so the state can always be turned back into the model's own ``state_dict`` names.

How buffers are shared (docs/TASKS.md): the first ``n_params`` entries are trainable parameters,
selected by θu and clipped by γ; the ``n_buffers`` entries after them are sent whole in every
update (their own budget, not clipped by γ) and applied by the run's update rule like parameters.
A model without buffers (the paper's two) has exactly the vector it always had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
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
    """One of the paper's two models by name (any other model comes with a task: shared/tasks)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)} (or --task FILE.py:NAME)"
        ) from None


def seeded(factory: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    """``factory()`` under ``torch.manual_seed(seed)``: the same initial state everywhere."""
    if seed is None:
        return factory()
    # A private generator state keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """Build a paper model; with a seed every process gets the same initial state."""
    return seeded(model_spec(name).factory, seed)


# --- the flat state view -----------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One tensor of the model's state and where it sits in the flat vector."""

    name: str  # the state_dict key
    shape: tuple[int, ...]
    dtype: str  # "float32", "int64", ...
    buffer: bool  # a buffer (sent whole, not clipped) rather than a parameter
    offset: int
    numel: int

    def describe(self) -> list[object]:
        return [self.name, list(self.shape), self.dtype]


@dataclass(frozen=True)
class StateLayout:
    slots: tuple[Slot, ...]
    n_params: int  # entries 0..n_params-1: parameters (θu budget, γ clip)
    n: int  # all entries; n_params..n-1 are buffers

    @property
    def n_buffers(self) -> int:
        return self.n - self.n_params

    def describe(self) -> list[list[object]]:
        """Names, shapes and dtypes: what two processes must agree on to train together."""
        return [s.describe() for s in self.slots]

    def fingerprint(self) -> str:
        return fingerprint_of(self.describe())


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_buffer): parameters first, then the persistent buffers."""
    params = dict(model.named_parameters())
    yield from ((name, p, False) for name, p in params.items())
    persistent = model.state_dict(keep_vars=True)
    for name, t in persistent.items():
        if name not in params and isinstance(t, torch.Tensor):
            yield name, t, True


def layout_of(model: nn.Module) -> StateLayout:
    slots, pos, n_params = [], 0, 0
    for name, t, is_buffer in _state_tensors(model):
        k = t.numel()
        slots.append(
            Slot(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), is_buffer, pos, k)
        )
        pos += k
        if not is_buffer:
            n_params = pos
    return StateLayout(tuple(slots), n_params, pos)


def fingerprint_of(described: list[list[object]]) -> str:
    return hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).hexdigest()[:16]


def first_difference(mine: list[list[object]], theirs: list[list[object]]) -> str | None:
    """The first tensor where two described layouts differ, in words; None when they agree."""
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            return (
                f"tensor {a[0]!r} is {a[2]} {tuple(a[1])} here but the run has "
                f"{b[0]!r} {b[2]} {tuple(b[1])}"
            )
    if len(mine) != len(theirs):
        longer, who = (mine, "here") if len(mine) > len(theirs) else (theirs, "in the run")
        extra = longer[min(len(mine), len(theirs))]
        return f"tensor {extra[0]!r} exists only {who}"
    return None


def n_params(model: nn.Module) -> int:
    """Trainable-parameter entries (the θu budget is a fraction of these)."""
    return sum(p.numel() for p in model.parameters())


def state_size(model: nn.Module) -> int:
    """Entries of the flat state: parameters and persistent buffers."""
    return sum(t.numel() for _, t, _ in _state_tensors(model))


def get_flat(model: nn.Module, out: np.ndarray | None = None) -> np.ndarray:
    """The whole state as one float32 vector (a copy): parameters, then buffers."""
    n = state_size(model)
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.shape != (n,) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape ({n},)")
    pos = 0
    with torch.no_grad():
        for _, t, _ in _state_tensors(model):
            k = t.numel()
            out[pos : pos + k] = t.detach().reshape(-1).to(torch.float32).numpy()
            pos += k
    return out


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Overwrite the whole state from a flat float32 vector (integer buffers are rounded)."""
    n = state_size(model)
    if flat.shape != (n,):
        raise ValueError(f"flat vector has shape {flat.shape}, model needs ({n},)")
    src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    pos = 0
    with torch.no_grad():
        for _, t, _ in _state_tensors(model):
            k = t.numel()
            part = src[pos : pos + k].view(t.shape)
            if not (t.is_floating_point() or t.is_complex()):
                part = part.round()
            t.copy_(part.to(t.dtype))
            pos += k


def state_dict_of(model: nn.Module, flat: np.ndarray) -> dict[str, torch.Tensor]:
    """The flat vector as the model's own ``state_dict`` (names and dtypes of the model)."""
    set_flat(model, flat)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_parameters(name: str, seed: int) -> np.ndarray:
    """The run's seeded initial state, identical in every process for the same (name, seed)."""
    return get_flat(build_model(name, seed))
