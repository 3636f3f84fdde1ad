"""Tests of shared.models: the paper's parameter counts, forward shapes and the flat view.

The flat float32 vector is the system's lingua franca (Redis, downloads, update indices), so its
order and exact round trip matter more here than anything about training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dssgd.shared.errors import ConfigError
from dssgd.shared.models import (
    MODELS,
    build_model,
    get_flat,
    initial_parameters,
    model_spec,
    n_params,
    set_flat,
)

INPUT_SHAPES = {"cnn": (1, 32, 32), "mlp": (784,)}


def batch(name: str, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((size, *INPUT_SHAPES[name]), generator=gen)


@pytest.mark.parametrize(("name", "count"), [("cnn", 105_506), ("mlp", 109_386)])
def test_parameter_counts(name: str, count: int) -> None:
    model = build_model(name, seed=0)
    assert n_params(model) == count
    assert model_spec(name).n_params == count
    assert get_flat(model).shape == (count,)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_spec_input_shape_matches_model(name: str) -> None:
    assert MODELS[name].input_shape == INPUT_SHAPES[name]


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("size", [1, 7])
def test_forward_gives_log_probabilities(name: str, size: int) -> None:
    model = build_model(name, seed=3)
    with torch.no_grad():
        out = model(batch(name, size))
    assert out.shape == (size, 10)
    assert torch.all(out <= 1e-6)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_flat_round_trip_is_exact(name: str) -> None:
    src, dst = build_model(name, seed=1), build_model(name, seed=2)
    flat = get_flat(src)
    assert flat.dtype == np.float32
    assert not np.array_equal(flat, get_flat(dst))
    set_flat(dst, flat)
    np.testing.assert_array_equal(get_flat(dst), flat)
    x = batch(name, 5)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_flat_order_is_named_parameters_order(name: str) -> None:
    model = build_model(name, seed=4)
    flat = get_flat(model)
    pos = 0
    for pname, p in model.named_parameters():
        block = flat[pos : pos + p.numel()]
        np.testing.assert_array_equal(block, p.detach().reshape(-1).numpy(), err_msg=pname)
        pos += p.numel()
    assert pos == flat.size
    first = next(iter(model.parameters()))
    np.testing.assert_array_equal(flat[: first.numel()], first.detach().numpy().ravel())


def test_set_flat_writes_in_named_parameters_order() -> None:
    model = build_model("mlp", seed=0)
    # A ramp makes any misplaced block visible as the wrong numbers in the wrong tensor.
    ramp = np.arange(n_params(model), dtype=np.float32)
    set_flat(model, ramp)
    pos = 0
    for _, p in model.named_parameters():
        expected = ramp[pos : pos + p.numel()].reshape(tuple(p.shape))
        np.testing.assert_array_equal(p.detach().numpy(), expected)
        pos += p.numel()


def test_get_flat_returns_a_copy() -> None:
    model = build_model("mlp", seed=0)
    flat = get_flat(model)
    before = next(iter(model.parameters())).detach().clone()
    flat[:] = 123.0
    assert torch.equal(next(iter(model.parameters())), before)


def test_get_flat_fills_given_buffer() -> None:
    model = build_model("mlp", seed=0)
    out = np.zeros(n_params(model), dtype=np.float32)
    assert get_flat(model, out) is out
    np.testing.assert_array_equal(out, get_flat(model))
    with pytest.raises(ValueError):
        get_flat(model, np.zeros(n_params(model), dtype=np.float64))
    with pytest.raises(ValueError):
        get_flat(model, np.zeros(10, dtype=np.float32))


@pytest.mark.parametrize("delta", [-1, 1])
def test_set_flat_wrong_length_raises(delta: int) -> None:
    model = build_model("mlp", seed=0)
    before = get_flat(model)
    with pytest.raises(ValueError, match="shape"):
        set_flat(model, np.zeros(n_params(model) + delta, dtype=np.float32))
    np.testing.assert_array_equal(get_flat(model), before)


def test_set_flat_rejects_right_size_wrong_shape() -> None:
    model = build_model("mlp", seed=0)
    with pytest.raises(ValueError):
        set_flat(model, np.zeros((1, n_params(model)), dtype=np.float32))


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_build_model_is_deterministic_per_seed(name: str) -> None:
    a = get_flat(build_model(name, seed=7))
    b = get_flat(build_model(name, seed=7))
    c = get_flat(build_model(name, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(initial_parameters(name, 7), a)


def test_build_model_leaves_global_rng_untouched() -> None:
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(state)
    build_model("cnn", seed=1)
    build_model("mlp", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_build_model_seed_ignores_global_rng() -> None:
    torch.manual_seed(1)
    a = get_flat(build_model("mlp", seed=5))
    torch.manual_seed(999)
    b = get_flat(build_model("mlp", seed=5))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["nope", "", "CNN"])
def test_unknown_model_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        model_spec(name)
    with pytest.raises(ConfigError):
        build_model(name, seed=0)
