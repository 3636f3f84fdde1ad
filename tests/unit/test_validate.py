"""Server-side validation of decoded updates (pure, property-based): 100% of invalid refused,
100% of valid accepted. (Another run or model size never gets here: decode refuses it.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from dssgd.aggregator.validate import check_version, validate
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.selection import budget
from dssgd.shared.wire import Update
from hypothesis import given, settings
from hypothesis import strategies as st

N_PARAMS = 5_000
CFG = RunConfig(run_id="r", participants=4, theta_u=0.1, gamma=0.5, max_staleness=20)
LIMIT = budget(N_PARAMS, CFG.theta_u)


def check(upd: Update, version: int) -> int:
    """Both server-side checks, as admission and the batch run them; returns the staleness."""
    validate(upd, CFG, N_PARAMS)
    return check_version(upd, CFG, version)


@st.composite
def valid_updates(draw: st.DrawFn) -> tuple[Update, int]:
    k = draw(st.integers(0, LIMIT))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(N_PARAMS, size=k, replace=False)).astype(np.int64)
    vals = rng.uniform(-CFG.effective_gamma, CFG.effective_gamma, size=k).astype(np.float32)
    version = draw(st.integers(0, 10_000))
    base = draw(st.integers(max(0, version - 20), version))
    pid = draw(st.integers(0, CFG.participants - 1))
    return Update("r", pid, draw(st.integers(1, 2**40)), base, N_PARAMS, idx, vals), version


@settings(max_examples=300, deadline=None)
@given(valid_updates())
def test_every_valid_update_is_accepted(case: tuple[Update, int]) -> None:
    upd, version = case
    assert check(upd, version) == version - upd.base_version


MUTATIONS = {
    "unknown-participant": lambda u, v: (replace(u, participant=CFG.participants + 3), v),
    "too-many-entries": lambda u, v: (
        replace(
            u, indices=np.arange(LIMIT + 1, dtype=np.int64), values=np.zeros(LIMIT + 1, np.float32)
        ),
        v,
    ),
    "beyond-gamma": lambda u, v: (
        replace(
            u,
            indices=np.array([7], np.int64),
            values=np.array([CFG.effective_gamma * 1.01], np.float32),
        ),
        v,
    ),
    "non-finite": lambda u, v: (
        replace(u, indices=np.array([7], np.int64), values=np.array([np.nan], np.float32)),
        v,
    ),
    "future-base": lambda u, v: (replace(u, base_version=v + 1), v),
    "stale": lambda u, v: (replace(u, base_version=0), max(v, 0) + 21),
}


@settings(max_examples=40, deadline=None)
@given(valid_updates(), st.sampled_from(sorted(MUTATIONS)))
def test_every_invalid_update_is_refused_with_its_reason(
    case: tuple[Update, int], reason: str
) -> None:
    upd, version = MUTATIONS[reason](*case)
    with pytest.raises(ValidationError) as exc:
        check(upd, version)
    assert exc.value.reason == reason


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gamma_check_uses_the_peak_decode_measured(sign: float) -> None:
    from dssgd.shared.wire import decode, encode

    gamma = CFG.effective_gamma
    values = np.array([0.5 * gamma, sign * 1.01 * gamma], dtype=np.float32)
    upd = decode(encode(Update(CFG.run_id, 0, 1, 0, N_PARAMS, np.array([3, 9]), values)))
    assert upd.peak == pytest.approx(1.01 * gamma)
    with pytest.raises(ValidationError) as err:
        check(upd, 0)
    assert err.value.reason == "beyond-gamma"
    ok = decode(encode(Update(CFG.run_id, 0, 1, 0, N_PARAMS, np.array([3]), values[:1])))
    assert check(ok, 0) == 0
