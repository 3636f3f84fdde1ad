"""Every value coding keeps a clipped value within ±γ (no servers): issue 20, finding 3 and 7."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd.aggregator.validate import validate
from dssgd.shared import wire
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ConfigError, ValidationError
from dssgd.shared.selection import budget, clip
from dssgd.worker.participant import synthetic_values

N = 20_000
RNG = np.random.default_rng(2020)
GAMMAS = np.exp(RNG.uniform(np.log(1e-6), np.log(100.0), size=1000))  # log-uniform in [1e-6, 100]


def _clipped_update(gamma: float, rng: np.random.Generator) -> wire.Update:
    """What a participant sends: Δw with a heavy tail, so many values are clipped to exactly ±γ."""
    k = budget(N, 0.01)
    idx = np.sort(rng.choice(N, size=k, replace=False)).astype(np.int64)
    delta = (rng.standard_normal(k) * 2 * gamma).astype(np.float32)
    return wire.Update("r", 0, 1, 0, N, idx, clip(delta, gamma))


def _rejections(coding: str, bound: bool) -> int:
    rng = np.random.default_rng(7)
    rejected = 0
    for gamma in GAMMAS:
        cfg = RunConfig(run_id="r", participants=1, theta_u=0.01, gamma=float(gamma))
        upd = _clipped_update(float(gamma), rng)
        body = wire.encode(upd, values=coding, rng=rng, bound=float(gamma) if bound else None)
        try:
            validate(wire.decode(body, expected_n=N), cfg, N)
        except ValidationError as exc:
            assert exc.reason == "beyond-gamma"
            rejected += 1
    return rejected


@pytest.mark.parametrize("coding", ["f32", "f16", "q8"])
def test_no_legitimate_update_is_rejected_at_1000_random_gammas(coding: str) -> None:
    assert _rejections(coding, bound=True) == 0


def test_negative_control_f16_round_to_nearest_overshoots_gamma() -> None:
    # Without the bound, about half of all γ are not float16 numbers and round above themselves.
    assert _rejections("f16", bound=False) > 300


def test_f16_bound_moves_only_the_values_that_would_overshoot() -> None:
    gamma = 0.001  # --preset paper
    values = np.array([gamma, -gamma, 0.5 * gamma, 1e-7], np.float32)
    nearest = wire.decode(
        wire.encode(wire.Update("r", 0, 1, 0, 10, np.arange(4), values), values="f16")
    ).values
    bounded = wire.decode(
        wire.encode(wire.Update("r", 0, 1, 0, 10, np.arange(4), values), values="f16", bound=gamma)
    ).values
    assert np.abs(nearest[:2]).min() > gamma  # the finding
    assert np.abs(bounded).max() <= gamma
    assert np.array_equal(bounded[2:], nearest[2:])  # values that fit are rounded to nearest
    assert np.all(np.abs(bounded[:2] - values[:2]) <= 2.0**-10 * gamma)  # one step at most


@pytest.mark.parametrize(("gamma", "words"), [(65504.0, "up to 65504"), (1e-9, "to zero")])
def test_gammas_f16_cannot_carry_are_refused_up_front(gamma: float, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        RunConfig(run_id="r", value_coding="f16", gamma=gamma)
    RunConfig(run_id="r", value_coding="f32", gamma=gamma)  # f32 carries them


def test_lr_decides_gamma_when_unset() -> None:
    with pytest.raises(ConfigError, match="f16"):
        RunConfig(run_id="r", value_coding="f16", lr=300_000.0)


@pytest.mark.parametrize("gamma", [0.05, 0.001, 1e-6, 2.0, 3.0, 100.0])
def test_synthetic_oracle_values_respect_gamma(gamma: float) -> None:
    v = synthetic_values(np.random.default_rng(1), 5000, gamma)
    assert np.abs(v).max() <= gamma and np.abs(v).max() > 0
    unit = np.abs(v[v != 0]).min()
    assert np.log2(unit) == int(np.log2(unit)), "a power of two, so float32 sums are exact"
    cfg = RunConfig(run_id="r", participants=1, theta_u=1.0, gamma=gamma)
    validate(wire.Update("r", 0, 1, 0, 5000, np.arange(5000), v), cfg, 5000)
