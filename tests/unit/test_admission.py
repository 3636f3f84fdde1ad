"""Admission and the pure batch, without servers: the rate limit on the sender's clock, and
apply_batch against the integer oracle (exact sums, duplicates, refusals, the turn)."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd.aggregator.admission import (
    MAX_CLOCK_LEAD,
    Accepted,
    Admission,
    Duplicate,
    Rejected,
    SenderClockLimiter,
)
from dssgd.aggregator.batch import apply_batch
from dssgd.shared import wire
from dssgd.shared.broker import Delivery, dead_letter_headers
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import AggregatorState


def _refused(limiter: SenderClockLimiter, stamps: list[float | None], now: float) -> int:
    refused = 0
    for seq, t in enumerate(stamps, start=1):
        try:
            limiter.check(0, seq, t, now)
        except ValidationError as exc:
            assert exc.reason == "rate-limited"
            refused += 1
    return refused


def test_a_backlog_sent_at_half_the_rate_is_within_the_limit() -> None:
    # 16 updates sent every 2 s at rate 1/s, all consumed at once after an outage.
    stamps = [1000.0 + 2 * i for i in range(16)]
    assert _refused(SenderClockLimiter(1.0), stamps, now=1040.0) == 0


def test_negative_control_charging_at_consumption_drops_the_backlog() -> None:
    # The old behaviour (and what schema-1 messages still get): charged on the aggregator's clock.
    assert _refused(SenderClockLimiter(1.0), [None] * 16, now=1040.0) == 15


def test_a_flood_on_the_senders_clock_is_refused() -> None:
    assert _refused(SenderClockLimiter(1.0), [1000.0] * 10, now=1000.0) == 9
    burst = SenderClockLimiter(5.0)  # burst max(1, rate) = 5
    assert _refused(burst, [1000.0] * 10, now=1000.0) == 5


def test_stamping_the_future_is_bounded() -> None:
    limiter = SenderClockLimiter(1.0)
    with pytest.raises(ValidationError) as exc:
        limiter.check(0, 1, 1000.0 + MAX_CLOCK_LEAD + 1, now=1000.0)
    assert exc.value.reason == "clock-ahead"


def test_a_redelivered_older_seq_is_not_charged_twice() -> None:
    limiter = SenderClockLimiter(1.0)
    limiter.check(0, 6, 1012.0, now=1020.0)
    limiter.check(0, 5, 1010.0, now=1020.0)  # out of order: bounded by the replay window instead
    limiter.check(0, 7, 1014.0, now=1020.0)


# --- apply_batch with the integer oracle --------------------------------------------------------

N = 1000
CFG = RunConfig(run_id="r", participants=3, theta_u=0.1, gamma=100.0, rule="sum")


def _delivery(body: bytes, pid: int, tag: int) -> Delivery:
    return Delivery(tag, body, f"upd.{pid}", None, "test")


def _state() -> AggregatorState:
    return AggregatorState(np.zeros(N, np.float32), np.zeros(N, np.float32), 0, {})


def _updates(rng: np.random.Generator, count: int) -> list[wire.Update]:
    out = []
    for i in range(count):
        idx = np.sort(rng.choice(N, size=20, replace=False)).astype(np.int64)
        vals = rng.integers(-3, 4, size=20).astype(np.float32)
        out.append(wire.Update("r", i % 3, i // 3 + 1, 0, N, idx, vals))
    return out


def _verdicts(state: AggregatorState, bodies: list[tuple[bytes, int]]) -> list:
    adm = Admission(CFG, N, None)
    return [
        adm.admit(_delivery(b, pid, tag), lambda p: state.dedup.get(p, (0, 0)))
        for tag, (b, pid) in enumerate(bodies, start=1)
    ]


def test_apply_batch_is_the_exact_sum_and_duplicates_in_one_batch_change_nothing() -> None:
    rng = np.random.default_rng(16)
    ups = _updates(rng, 30)
    bodies = [(wire.encode(u), u.participant) for u in ups]
    state = _state()
    out = apply_batch(state, _verdicts(state, bodies + bodies[:5]), CFG, UpdateRule("sum", 1.0, 3))
    expected = np.zeros(N, np.float64)
    for u in ups:
        expected[u.indices] += u.values
    assert state.w.tobytes() == expected.astype(np.float32).tobytes()
    assert state.version == 30 and out.counters["applied"] == 30
    assert out.counters["duplicates"] == 5
    again = apply_batch(state, _verdicts(state, bodies), CFG, UpdateRule("sum", 1.0, 3))
    assert again.counters["duplicates"] == 30 and state.version == 30


def test_one_undecodable_message_costs_only_itself_and_passes_the_holders_turn() -> None:
    rng = np.random.default_rng(17)
    ups = _updates(rng, 6)
    future = wire.Update("r", 1, 99, 10**6, N, ups[0].indices, ups[0].values)
    bodies = [(wire.encode(u), u.participant) for u in ups]
    bodies[2:2] = [(b"\x00junk", 0), (wire.encode(future), 1)]
    state = _state()
    verdicts = _verdicts(state, bodies)
    assert [type(v) for v in verdicts].count(Rejected) == 1
    assert all(isinstance(v, Accepted | Rejected | Duplicate) for v in verdicts)
    out = apply_batch(state, verdicts, CFG, UpdateRule("sum", 1.0, 3), holder=1)
    assert sorted(r.reason for r in out.rejected) == ["future-base", "undecodable"]
    assert out.counters["applied"] == 6 and out.holder_done and out.holder_refused == 99


def test_an_empty_update_is_recorded_without_moving_the_version() -> None:
    empty = wire.Update("r", 0, 1, 0, N, np.zeros(0, np.int64), np.zeros(0, np.float32))
    state = _state()
    out = apply_batch(
        state, _verdicts(state, [(wire.encode(empty), 0)]), CFG, UpdateRule("sum", 1.0, 3), holder=0
    )
    assert out.counters["applied"] == 1 and out.counters["empty"] == 1
    assert state.version == 0 and state.dedup[0][0] == 1 and out.holder_done


def test_dead_letter_headers_are_capped_whatever_the_sender_sent() -> None:
    headers = dead_letter_headers("r" * 10_000, "d" * 10**6, "k" * 255, "é" * 300, "u" * 255)
    size = sum(len(k) + len(v.encode()) for k, v in headers.items())
    assert size < 1200
    assert set(headers) == {
        f"x-dssgd-{f}" for f in ("reason", "detail", "routing-key", "app-id", "user-id")
    }


def test_intersected_windows_say_duplicate_only_where_every_shard_applied() -> None:
    from dssgd.shared import dedup

    a = (10, 0b1011)  # 10, 9, 7
    b = (9, 0b11)  # 9, 8
    both = dedup.intersect([a, b])
    assert [s for s in range(1, 12) if dedup.check(both, s) == dedup.DUPLICATE] == [9]
    assert dedup.check(both, 10) == dedup.NEW  # shard b has not applied 10
    assert dedup.intersect([a]) == a and dedup.intersect([a, (0, 0)]) == (0, 0)
