"""First-layer analytic reconstruction (Phong et al., IEEE TIFS 2018) and its controls.

For a fully connected first layer y = W·x + b, one record's gradient has ∂L/∂W_k = ∂L/∂b_k · x
for every neuron k, so ΔW_k ÷ Δb_k is the record itself. An update of many records gives, per
neuron, a weighted mix of the records that neuron responded to; when one record dominates a
neuron, it comes out nearly exactly. Learning rate and sign cancel in the ratio.

Controls: a record counts as *recovered* only when its best reconstruction's cosine is above
0.9 *and* above the never-seen control — the best cosine any of an equal number of records
nobody trained on reaches against any reconstruction. (On MNIST a never-seen digit already
scores 0.81–0.95 against some training digit: similarity alone proves nothing.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dssgd.shared.models import StateLayout

RECOVERED_COSINE = 0.9
_MIN_BIAS = 1e-12  # a neuron whose bias did not move carries no ratio


@dataclass(frozen=True)
class FirstLayer:
    """Where the first layer's weight and bias sit in the flat state, or why there is none."""

    applicable: bool
    reason: str = ""
    weight: slice = field(default_factory=lambda: slice(0))
    bias: slice = field(default_factory=lambda: slice(0))
    shape: tuple[int, int] = (0, 0)  # (neurons, input features)


def _first_module(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module, bool]:
    """(name, module, sees the raw input) of the first module with parameters to run."""
    fired: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = []
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, inp, out, name=name: fired.append((name, mod, inp[0]))
                )
            )
    try:
        with torch.no_grad():
            model.eval()
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not fired:
        return "", model, False
    name, module, inp = fired[0]
    raw = inp.shape[0] == example.shape[0] and torch.equal(
        inp.reshape(len(inp), -1), example.reshape(len(example), -1)
    )
    return name, module, raw


def find_first_layer(model: nn.Module, layout: StateLayout, example: torch.Tensor) -> FirstLayer:
    """The fully connected first layer the attack needs, or the reason it does not apply."""
    name, module, raw = _first_module(model, example)
    kind = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        return FirstLayer(
            False,
            f"first layer {name} is convolutional ({kind}): ∂W/∂b gives a sum over image patches "
            "(features), not the input",
        )
    if not isinstance(module, nn.Linear):
        return FirstLayer(False, f"first layer {name or '<root>'} is a {kind}, not nn.Linear")
    if module.bias is None:
        return FirstLayer(False, f"first layer {name} has no bias: the ratio ∂W/∂b needs one")
    if not raw:
        return FirstLayer(False, f"first layer {name} does not see the raw input")
    slots = {s.name: s for s in layout.slots}
    w, b = slots[f"{name}.weight"], slots[f"{name}.bias"]
    return FirstLayer(
        True,
        weight=slice(w.offset, w.offset + w.numel),
        bias=slice(b.offset, b.offset + b.numel),
        shape=(module.out_features, module.in_features),
    )


def candidates(layer: FirstLayer, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions, neuron ids): ΔW_k / Δb_k for every neuron whose bias moved."""
    w = delta[layer.weight].reshape(layer.shape).astype(np.float64)
    b = delta[layer.bias].astype(np.float64)
    live = np.flatnonzero(np.abs(b) > _MIN_BIAS)
    rec = w[live] / b[live, None]
    ok = np.isfinite(rec).all(1) & (np.abs(rec).sum(1) > 0)
    return rec[ok], live[ok]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norm > 0, norm, 1.0)


@dataclass
class Reconstruction:
    """Scores of one update's reconstructions against members and the never-seen control."""

    applicable: bool
    reason: str = ""
    candidates: int = 0
    members: int = 0
    recovered: int = 0
    best_cosine: float = float("nan")  # best reconstruction vs its nearest member
    control: float = float("nan")  # best reconstruction vs its nearest never-seen record
    per_member: np.ndarray = field(default_factory=lambda: np.empty(0))  # best cos per member
    best_candidate: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    images: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # candidate vectors

    @property
    def margin(self) -> float:
        """best_cosine − control: what the update adds over guessing with a similar record."""
        return self.best_cosine - self.control

    def top(self, k: int) -> list[tuple[int, float]]:
        """The k members best reconstructed: (member index, cosine)."""
        if self.per_member.size == 0:
            return []
        order = np.argsort(-self.per_member)[:k]
        return [(int(i), float(self.per_member[i])) for i in order]

    def summary(self) -> dict[str, object]:
        return {
            "applicable": self.applicable,
            "reason": self.reason,
            "candidates": self.candidates,
            "members": self.members,
            "recovered": self.recovered,
            "best_cosine": _r(self.best_cosine),
            "never_seen_control": _r(self.control),
            "margin": _r(self.margin),
        }


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)


def attack(
    layer: FirstLayer, delta: np.ndarray, members: torch.Tensor, never_seen: torch.Tensor
) -> Reconstruction:
    """Reconstruct from a dense update and score against members and never-seen records."""
    if not layer.applicable:
        return Reconstruction(False, layer.reason)
    rec, _ = candidates(layer, delta)
    m = members.reshape(len(members), -1).numpy()
    out = Reconstruction(True, candidates=len(rec), members=len(m))
    if len(rec) == 0:
        out.reason = "no first-layer bias entry was shared (or moved): nothing to divide by"
        out.per_member = np.zeros(len(m))
        out.best_cosine = out.control = 0.0
        return out
    u = _unit(rec)
    sim = _unit(m) @ u.T  # cosines (members, candidates); the ratio keeps the record's sign
    ctrl = _unit(never_seen.reshape(len(never_seen), -1).numpy()) @ u.T
    out.per_member = sim.max(1)
    out.best_candidate = sim.argmax(1)
    out.best_cosine = float(out.per_member.max())
    out.control = float(ctrl.max())
    # Beating the control means by more than rounding: the same record among the never-seen
    # ones scores its cosine again, a matrix product of another shape a unit in the last place off.
    out.recovered = int(np.sum(out.per_member > max(RECOVERED_COSINE, out.control + 1e-9)))
    out.images = rec
    return out
