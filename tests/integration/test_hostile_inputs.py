"""Hostile inputs against the real servers: nothing a sender controls can stop the aggregator,
and no legitimate update is lost beside it (issue 20)."""

from __future__ import annotations

import contextlib
import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pika
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import REASON_HEADER, AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.broker import connect as amqp_connect

from testing.oracle import (
    assert_exact,
    drain_dead_letters,
    integer_update,
    oracle_run,
    read_oracle,
)
from testing.runs import RunHandle

pytestmark = pytest.mark.integration

# One header value this long makes a header frame of about 131,040 bytes with the publisher's
# other properties: just under frame_max (131,072), so the broker accepts it.
BLOATED = 131_000


def _hostile(h: RunHandle, rng: np.random.Generator) -> list[tuple[str, bytes, dict, str]]:
    """(variant, body, headers, routing key) of each bad message; each must be dead-lettered."""
    stray = integer_update(h, 0, 10_000, rng)  # valid body, sent on a key that is not its own
    return [
        ("bloated header", b"\x00junk", {"h": "a" * BLOATED}, AmqpNames.routing_key(1)),
        ("many headers", b"\x00junk", {f"h{i}": "x" * 20 for i in range(4000)}, "upd.1"),
        ("huge routing key", wire.encode(stray), {}, "upd." + "k" * 251),
        ("huge app_id", b"\x00junk", {}, AmqpNames.routing_key(2)),
    ]


def test_bloated_messages_are_dead_lettered_and_every_update_beside_them_applied(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = oracle_run(make_run)
    agg_log = tmp_path / "agg.log"
    h.aggregator(log=agg_log)
    rng = np.random.default_rng(20)
    updates = [integer_update(h, pid, seq, rng) for seq in range(1, 35) for pid in range(3)][:100]
    hostile = _hostile(h, rng)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    big_app = Publisher(h.conns.amqp_url, h.names, app_id="a" * 255)
    try:
        for i, u in enumerate(updates):
            pub.publish(AmqpNames.routing_key(u.participant), wire.encode(u))
            if i % 25 == 10:  # spread among the legitimate ones, so they share batches
                variant, body, headers, key = hostile[i // 25]
                sender = big_app if variant == "huge app_id" else pub
                sender.publish(key, body, headers=headers)
    finally:
        pub.close()
        big_app.close()
    h.wait(lambda: h.version() == len(updates), timeout=60, what="all 100 updates applied")
    dead = drain_dead_letters(h, len(hostile))
    assert sorted(r for r, _ in dead) == sorted(
        ["undecodable", "undecodable", "wrong-routing-key", "undecodable"]
    )
    assert_exact(h, updates)
    counters = h.store.counters()
    assert counters["applied"] == 100 and counters["rejected"] == 4
    assert h.procs[0].poll() is None, "the aggregator must keep running"
    assert "reconnecting" not in agg_log.read_text(), "no reconnect loop"


def test_negative_control_copying_the_senders_headers_breaks_the_connection(
    make_run: Callable[..., RunHandle],
) -> None:
    """What the aggregator used to do: republish the sender's headers plus ~0.6 KB of its own.
    The broker closes the connection, so the test above would fail on the old code."""
    h = make_run()
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests-control")
    ch = conn.channel()
    ch.confirm_delivery()
    headers = {"h": "a" * BLOATED, REASON_HEADER: "undecodable", "x-dssgd-detail": "d" * 500}
    with pytest.raises(pika.exceptions.AMQPError, match=r"FRAME_ERROR|frame_too_large"):
        ch.basic_publish(h.names.dead_exchange, "", b"junk", pika.BasicProperties(headers=headers))
    with contextlib.suppress(Exception):
        conn.close()
    time.sleep(0)  # nothing to wait for: the broker has already closed the connection


def _synthetic_worker(h: RunHandle, pid: int, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return h.spawn(
        "worker",
        "--synthetic",
        "--participants",
        str(pid),
        "--record-dir",
        str(tmp_path),
        *extra,
        log=tmp_path / f"w{pid}.log",
    )


@pytest.mark.slow
def test_rate_limit_drops_nothing_sent_within_it_after_an_outage(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    """Rate limit 1/s, a participant at 0.5/s, the aggregator down 20 s: every update applied."""
    h = make_run(
        zero_init=True,
        participants=1,
        theta_u=0.01,
        gamma=100.0,
        rule="sum",
        rate_limit=1.0,
        epochs=16,
    )
    agg = h.aggregator(log=tmp_path / "agg.log")
    worker = _synthetic_worker(h, 0, tmp_path, "--pace", "2")
    h.wait(lambda: h.version() >= 2, timeout=60, what="the first updates")
    agg.send_signal(signal.SIGTERM)
    assert agg.wait(timeout=30) == 0
    time.sleep(20)  # the outage itself: the participant keeps publishing every 2 s
    h.aggregator(log=tmp_path / "agg.log")
    assert worker.wait(timeout=120) == 0
    confirmed = read_oracle(tmp_path, 0, h)[1]
    assert len(confirmed) == 16
    h.wait(lambda: h.version() == 16, timeout=60, what="all 16 updates applied")
    counters = h.store.counters()
    assert counters.get("rejected", 0) == 0, counters
    assert_exact(h, confirmed)


def _turn_intervals(h: RunHandle) -> list[tuple[float, float, int, int, int]]:
    """(download time, apply time, participant, seq, base version) of every applied update."""
    downloads = {(pid, seq): t for ev, pid, seq, t in h.store.read_trace() if ev == "d"}
    out = []
    for row in h.store.applied_log():
        pid, seq, version, stale, t = row.split(":", 4)
        base = int(version) - 1 - int(stale)
        out.append((downloads[(int(pid), int(seq))], float(t), int(pid), int(seq), base))
    return sorted(out)


@pytest.mark.slow
def test_round_robin_holds_the_turn_through_a_65_s_outage(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = make_run(
        zero_init=True, participants=2, theta_u=0.01, gamma=100.0, order="round-robin", epochs=0
    )
    agg = h.aggregator(log=tmp_path / "agg.log")
    workers = [_synthetic_worker(h, p, tmp_path) for p in range(2)]
    h.wait(lambda: h.version() >= 6, timeout=60, what="the first turns")
    agg.send_signal(signal.SIGTERM)
    assert agg.wait(timeout=30) == 0
    stopped_at = h.version()
    time.sleep(65)  # longer than the old 30 s give-up and the 60 s turn timeout
    h.aggregator(log=tmp_path / "agg.log")
    h.wait(lambda: h.version() >= stopped_at + 6, timeout=60, what="turns after the outage")
    h.store.request_stop("test over")
    for w in workers:
        assert w.wait(timeout=30) == 0
    rows = _turn_intervals(h)
    assert len(rows) >= stopped_at + 6
    bases = [base for *_, base in rows]
    assert len(set(bases)) == len(bases), "two updates of one turn share a base version"
    for (d1, a1, *who1), (d2, _a2, *who2) in itertools.pairwise(rows):
        assert d1 <= a1 <= d2, f"{who1} applied at {a1} after {who2} downloaded at {d2}"
    assert max(a - d for d, a, *_ in rows) > 60, "one turn spanned the outage"


def test_a_refused_dead_letter_falls_back_to_a_reject_and_costs_no_reconnect(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    """If the dead-letter exchange refuses the publish (here: it was deleted), the channel-level
    error must not end the session: the delivery is rejected instead, the batch goes on."""
    h = oracle_run(make_run)
    agg_log = tmp_path / "agg.log"
    h.aggregator(log=agg_log)
    # The aggregator declares its topology before it consumes: delete the exchange once it does.
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests-dlx")
    ch = conn.channel()
    h.wait(
        lambda: ch.queue_declare(h.names.queue, passive=True).method.consumer_count > 0,
        what="the aggregator consuming",
    )
    ch.exchange_delete(h.names.dead_exchange)
    conn.close()
    rng = np.random.default_rng(21)
    updates = [integer_update(h, 0, seq, rng) for seq in range(1, 11)]
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        for i, u in enumerate(updates):
            pub.publish(AmqpNames.routing_key(0), wire.encode(u))
            if i in (4, 9):  # the last one ends its batch: the ack must not name its tag
                pub.publish(AmqpNames.routing_key(1), b"\x00junk")
    finally:
        pub.close()
    h.wait(lambda: h.version() == len(updates), what="all 10 updates applied")
    h.wait(lambda: h.store.counters().get("rejected") == 2, what="both rejected")
    time.sleep(1.5)  # room for a reconnect to show in the log, if an ack closed the channel
    assert_exact(h, updates)
    log_text = agg_log.read_text()
    assert "rejecting it instead" in log_text and "reconnecting" not in log_text
