"""Which classes a participant holds, read off the signs of its last-layer bias update.

With softmax cross-entropy, ∂L/∂b_c = p_c − [y = c]: negative only for the record's own class.
Summed over an epoch, the bias of every class the participant holds rises (Δb_c = −lr·∂L/∂b_c
> 0) and the others fall, so {c : Δb_c > 0} is the label set. The control is the best guess
without the update: "every class" (right only for a participant that holds them all).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dssgd.shared.models import StateLayout


@dataclass(frozen=True)
class LastLayer:
    applicable: bool
    reason: str = ""
    bias: slice = field(default_factory=lambda: slice(0))
    classes: int = 0


def find_last_layer(model: nn.Module, layout: StateLayout, example: torch.Tensor) -> LastLayer:
    """The fully connected output layer with a bias, one output per class, or why not."""
    fired: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: fired.append((name, mod)))
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            model.eval()
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    if not fired:
        return LastLayer(False, "the model has no parameters")
    name, module = fired[-1]
    if not isinstance(module, nn.Linear) or module.bias is None:
        return LastLayer(False, f"last layer {name} is not nn.Linear with a bias")
    if out.ndim != 2 or out.shape[1] != module.out_features or out.shape[1] < 2:
        return LastLayer(False, f"the model's output is not one score per class from {name}")
    slot = {s.name: s for s in layout.slots}[f"{name}.bias"]
    return LastLayer(True, bias=slice(slot.offset, slot.offset + slot.numel), classes=slot.numel)


@dataclass(frozen=True)
class LabelSet:
    applicable: bool
    reason: str = ""
    truth: tuple[int, ...] = ()
    inferred: tuple[int, ...] = ()
    shared_biases: int = 0  # how many of the bias entries the update carried
    classes: int = 0

    @property
    def exact(self) -> bool:
        return self.applicable and self.truth == self.inferred

    @property
    def beats_guess(self) -> bool:
        """Exact, where guessing "every class" would not be."""
        return self.exact and len(self.truth) < self.classes

    def summary(self) -> dict[str, object]:
        return {
            "applicable": self.applicable,
            "reason": self.reason,
            "truth": list(self.truth),
            "inferred": list(self.inferred),
            "exact": self.exact,
            "beats_guess_all": self.beats_guess,
            "shared_biases": self.shared_biases,
        }


def infer(layer: LastLayer, delta: np.ndarray, shared: np.ndarray, truth: np.ndarray) -> LabelSet:
    """{c : Δb_c > 0} from a dense update; ``shared`` marks the entries the update carried."""
    if not layer.applicable:
        return LabelSet(False, layer.reason)
    b = delta[layer.bias]
    got = tuple(int(c) for c in np.flatnonzero(b > 0))
    held = tuple(int(c) for c in np.unique(truth))
    return LabelSet(True, "", held, got, int(shared[layer.bias].sum()), layer.classes)
