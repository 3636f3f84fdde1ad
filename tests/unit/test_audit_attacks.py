"""The audit's attack maths on small models and made-up scores (no data set, no servers).

Each attack has its positive control (a one-example update is read exactly) and a negative one
(the same attack must say "no" where nothing is there, or "not applicable" where it cannot run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dssgd.shared.models import MODELS, get_flat, layout_of
from dssgd.shared.training import LocalTrainer
from torch import nn

from dssgd.audit import labels, membership, reconstruct


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _update(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Δw of one SGD step on (x, y) through the project's LocalTrainer (batch = all of x)."""
    base = get_flat(model)
    loss = nn.functional.cross_entropy
    LocalTrainer(model, x, y, 0.1, len(x), 0, loss=loss).epoch()
    return get_flat(model) - base


def test_one_example_gradient_is_reconstructed_exactly() -> None:
    """Positive control: ΔW_k ÷ Δb_k of a one-record update is the record (cosine ≥ 0.999)."""
    model = _mlp()
    layout = layout_of(model)
    x, y = torch.randn(1, 16), torch.tensor([2])
    layer = reconstruct.find_first_layer(model, layout, x)
    delta = _update(model, x, y)
    never_seen = torch.randn(50, 16)
    r = reconstruct.attack(layer, delta, x, never_seen)
    assert r.applicable and r.best_cosine >= 0.999, r.summary()
    assert r.recovered == 1
    # Negative control: the same record among the never-seen ones is no longer "recovered":
    # a reconstruction only counts when it beats what a record nobody trained on scores.
    r2 = reconstruct.attack(layer, delta, x, torch.cat([never_seen, x]))
    assert r2.best_cosine >= 0.999 and r2.recovered == 0


def test_update_without_first_layer_biases_gives_nothing_to_divide() -> None:
    model = _mlp()
    layer = reconstruct.find_first_layer(model, layout_of(model), torch.randn(1, 16))
    delta = _update(model, torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    delta[layer.bias] = 0.0  # what top-|Δw| selection does when the biases are not among the top
    r = reconstruct.attack(layer, delta, torch.randn(4, 16), torch.randn(4, 16))
    assert r.candidates == 0 and r.recovered == 0 and "bias" in r.reason


def test_convolutional_first_layer_is_not_applicable() -> None:
    model = MODELS["cnn"].factory()
    layer = reconstruct.find_first_layer(model, layout_of(model), torch.randn(2, 1, 32, 32))
    assert not layer.applicable and "convolutional" in layer.reason
    r = reconstruct.attack(layer, np.zeros(1), torch.zeros(1, 4), torch.zeros(1, 4))
    assert not r.applicable and "convolutional" in r.reason


def test_first_layer_without_bias_is_not_applicable() -> None:
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 3))
    layer = reconstruct.find_first_layer(model, layout_of(model), torch.randn(1, 16))
    assert not layer.applicable and "no bias" in layer.reason


def test_label_set_from_last_layer_bias_signs() -> None:
    model = _mlp()
    layout = layout_of(model)
    x = torch.randn(2, 16)
    last = labels.find_last_layer(model, layout, x)
    shared = np.ones(layout.n, dtype=bool)
    one = labels.infer(last, _update(model, x[:1], torch.tensor([1])), shared, np.array([1]))
    assert one.exact and one.inferred == (1,) and one.beats_guess  # positive control
    # Negative control: a participant holding every class cannot be told from "guess all".
    y = torch.tensor([0, 1, 2] * 4)
    full = labels.infer(last, _update(model, torch.randn(12, 16), y), shared, y.numpy())
    assert not full.beats_guess


def test_auc_and_tpr_at_chance_and_at_separation() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=5000)
    same = membership.evaluate("s", rng.normal(size=600), u, 100)
    assert same.auc.contains(0.5) and same.tpr[0.01].value <= 0.025
    apart = membership.evaluate("s", rng.normal(3.0, 1.0, size=600), u, 100)
    assert apart.auc.low > 0.95 and apart.tpr[0.01].value > 0.5
    assert membership.leaks(apart) and not membership.leaks(same)


def test_tpr_threshold_never_lets_more_than_the_rate_through() -> None:
    u = np.arange(1000, dtype=float)
    assert membership.tpr_at(u, u, 0.01) <= 0.01
    assert membership.tpr_at(np.array([999.5]), u, 0.001) == 1.0
    assert membership.auc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)  # ties half


def test_calibration_removes_a_class_mix_difference() -> None:
    """Members with more of a class the update favours look like members until calibrated."""
    rng = np.random.default_rng(1)
    yu = rng.integers(0, 2, 4000)
    u = rng.normal(size=4000) + 2.0 * yu  # class 1 scores higher, members or not
    ym = (rng.random(600) < 0.8).astype(int)  # members: mostly class 1
    m = rng.normal(size=600) + 2.0 * ym
    assert membership.auc(m, u) > 0.6
    cm, cu = membership.calibrate(m, ym, u, yu), membership.calibrate(u, yu, u, yu)
    assert membership.evaluate("c", cm, cu, 100).auc.contains(0.5)
