"""The maths of the per-message defences (aggregator/defence.py), without servers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from dssgd.aggregator.admission import Accepted
from dssgd.aggregator.batch import apply_batch
from dssgd.aggregator.defence import NormBound, ValidationDescent
from dssgd.shared import wire
from dssgd.shared.broker import Delivery
from dssgd.shared.config import RunConfig
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import AggregatorState


def quadratic_grad(target: np.ndarray):  # type: ignore[no-untyped-def]
    """The gradient of a validation loss ||w - target||², whose minimum is at ``target``."""
    return lambda w: 2.0 * (w - target)


def test_validation_refuses_a_step_uphill_and_accepts_one_downhill() -> None:
    target = np.ones(4, np.float32)
    d = ValidationDescent(quadratic_grad(target), margin=0.0)
    w = np.zeros(4, np.float32)  # gradient (-2, -2, -2, -2)
    idx = np.array([0, 1], np.int64)
    assert d.judge(w, idx, np.array([0.5, 0.5], np.float32)) is None  # towards the optimum
    why = d.judge(w, idx, np.array([-0.5, -0.5], np.float32))  # the same step, sign flipped
    assert why is not None and "cosine 1 > 0" in why
    # Scale-free: a huge honest step is as downhill as a small one (first order on purpose).
    assert d.score(w, idx, np.array([50.0, 50.0], np.float32)) == pytest.approx(-1.0)
    # Orthogonal to the gradient (cosine 0) passes at margin 0; a little uphill does not.
    g_orth = np.array([1.0, -1.0], np.float32)
    assert d.score(w, idx, g_orth) == pytest.approx(0.0) and d.judge(w, idx, g_orth) is None
    assert d.judge(w, idx, np.array([-0.5, 0.4], np.float32)) is not None
    assert ValidationDescent(quadratic_grad(target), margin=0.2).judge(
        w, idx, np.array([-0.5, 0.4], np.float32)) is None  # cosine 0.11 within the margin
    assert not w.any(), "judging must not touch the state"


def test_validation_computes_the_gradient_once_per_state() -> None:
    calls = Counter[str]()
    target = np.ones(3, np.float32)

    def grad_of(w: np.ndarray) -> np.ndarray:
        calls["backward"] += 1
        return quadratic_grad(target)(w)

    d = ValidationDescent(grad_of)
    w = np.zeros(3, np.float32)
    step = (np.array([0], np.int64), np.array([0.5], np.float32))
    for _ in range(3):  # three messages judged against one state: one backward pass
        d.judge(w, *step)
    assert calls["backward"] == 1
    d.accepted(*step)
    w[0] += 0.5
    d.judge(w, *step)
    assert calls["backward"] == 2
    # refresh_every=3: two more applies reuse it, the third asks for a fresh one.
    d3 = ValidationDescent(grad_of, refresh_every=3)
    d3.judge(w, *step)
    for _ in range(2):
        d3.accepted(*step)
        d3.judge(w, *step)
    assert calls["backward"] == 3
    d3.accepted(*step)
    d3.judge(w, *step)
    assert calls["backward"] == 4


def test_norm_bound_follows_the_population() -> None:
    d = NormBound(factor=2.0, window=5, warmup=3)
    idx = np.arange(4)
    big = np.full(4, 10.0, np.float32)
    assert d.judge(np.zeros(4), idx, big) is None  # warm-up: no population yet
    for _ in range(5):
        d.accepted(idx, np.full(4, 1.0, np.float32))  # norm 2
    assert d.limit() == 4.0
    assert d.judge(np.zeros(4), idx, np.full(4, 1.9, np.float32)) is None  # norm 3.8
    assert d.judge(np.zeros(4), idx, big) is not None
    for _ in range(5):  # the window moves on: larger honest updates raise the bound
        d.accepted(idx, np.full(4, 5.0, np.float32))
    assert d.judge(np.zeros(4), idx, big) is None


def test_apply_batch_refuses_what_the_defence_refuses_and_applies_the_rest() -> None:
    cfg = RunConfig(run_id="defence-unit", participants=2, theta_u=1.0, gamma=1.0, rule="sum")
    n = 3
    target = np.ones(n, np.float32)
    state = AggregatorState(w=np.zeros(n, np.float32), stat=np.zeros(n, np.float32),
                            version=0, dedup={})
    d = ValidationDescent(quadratic_grad(target))

    def accepted(pid: int, seq: int, values: list[float]) -> Accepted:
        u = wire.Update("defence-unit", pid, seq, 0, n, np.arange(n, dtype=np.int64),
                        np.array(values, np.float32))
        return Accepted(Delivery(seq, b"x", f"upd.{pid}", None, None), u)

    honest, liar = accepted(0, 1, [0.5, 0.5, 0.5]), accepted(1, 1, [-0.5, -0.5, -0.5])
    out = apply_batch(state, [honest, liar], cfg, UpdateRule("sum", 1.0, 2), defence=d)
    assert out.counters["applied"] == 1 and out.counters["rejected:defence"] == 1
    assert state.w.tolist() == [0.5, 0.5, 0.5] and state.version == 1
    # Negative control: without the defence the liar's step lands and undoes the honest one.
    state2 = AggregatorState(w=np.zeros(n, np.float32), stat=np.zeros(n, np.float32),
                             version=0, dedup={})
    out2 = apply_batch(state2, [honest, liar], cfg, UpdateRule("sum", 1.0, 2))
    assert out2.counters["applied"] == 2 and not state2.w.any()
