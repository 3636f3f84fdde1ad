"""The aggregator against the real servers: exact, idempotent, dead-letters, crash-safe."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pika
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
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


def test_apply_is_exact_byte_for_byte(make_run: Callable[..., RunHandle], tmp_path: Path) -> None:
    h = oracle_run(make_run)
    h.aggregator(log=tmp_path / "agg.log")
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    rng = np.random.default_rng(7)
    updates = [integer_update(h, pid, seq, rng) for seq in range(1, 41) for pid in range(3)]
    try:
        for u in updates:
            pub.publish(AmqpNames.routing_key(u.participant), wire.encode(u))
    finally:
        pub.close()
    h.wait(lambda: h.version() == len(updates), what="all updates applied")
    assert_exact(h, updates)
    assert h.store.counters()["applied"] == len(updates)


def test_duplicates_and_redeliveries_change_nothing(make_run: Callable[..., RunHandle]) -> None:
    h = oracle_run(make_run)
    h.aggregator()
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    rng = np.random.default_rng(8)
    updates = [integer_update(h, 0, seq, rng) for seq in range(1, 21)]
    bodies = [wire.encode(u) for u in updates]
    try:
        for b in bodies:
            pub.publish(AmqpNames.routing_key(0), b)
            pub.publish(AmqpNames.routing_key(0), b)  # immediate duplicate
        for b in bodies[5:15]:  # late duplicates, out of order, after newer ones
            pub.publish(AmqpNames.routing_key(0), b)
    finally:
        pub.close()
    h.wait(lambda: h.store.counters().get("duplicates", 0) == 30, what="duplicates counted")
    assert h.version() == 20
    assert_exact(h, updates)


def test_invalid_messages_are_dead_lettered_with_a_reason(
    make_run: Callable[..., RunHandle],
) -> None:
    h = oracle_run(make_run)
    h.aggregator()
    rng = np.random.default_rng(9)
    n = h.init.size
    good = integer_update(h, 0, 1, rng)
    too_big = wire.Update(
        h.cfg.run_id, 1, 1, 0, n, np.array([3], np.int64), np.array([1000.0], np.float32)
    )
    too_many = wire.Update(
        h.cfg.run_id, 1, 2, 0, n, np.arange(2000, dtype=np.int64), np.ones(2000, np.float32)
    )
    stranger = wire.Update(
        h.cfg.run_id, 99, 1, 0, n, np.array([3], np.int64), np.array([1.0], np.float32)
    )
    other_run = wire.Update(
        "another-run", 1, 3, 0, n, np.array([3], np.int64), np.array([1.0], np.float32)
    )
    future = wire.Update(
        h.cfg.run_id, 2, 1, 10**6, n, np.array([3], np.int64), np.array([1.0], np.float32)
    )
    bad = {
        b"\x00garbage": "undecodable",
        wire.encode(too_big): "beyond-gamma",
        wire.encode(too_many): "too-many-entries",
        wire.encode(stranger): "unknown-participant",
        wire.encode(other_run): "undecodable",  # refused by the codec: wrong run
        wire.encode(future): "future-base",
    }
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        for body in bad:
            # Each on its sender's own key: the version is checked after the sender, at apply.
            pid = wire.peek_participant(body) if body[0] in (2, wire.SCHEMA_VERSION) else 1
            pub.publish(AmqpNames.routing_key(pid), body)
        pub.publish(AmqpNames.routing_key(0), wire.encode(good))
    finally:
        pub.close()
    h.wait(lambda: h.version() == 1, what="the valid update after the invalid ones")
    dead = drain_dead_letters(h, len(bad))
    assert sorted(reason for reason, _ in dead) == sorted(bad.values())
    assert {body for _, body in dead} == set(bad)
    assert_exact(h, [good])
    assert h.procs[0].poll() is None, "the aggregator must keep running"


def test_unroutable_publish_raises(make_run: Callable[..., RunHandle]) -> None:
    h = oracle_run(make_run)
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests")
    conn.channel().queue_unbind(h.names.queue, h.names.exchange, routing_key="upd.*")
    conn.close()
    from dssgd.shared.errors import UnroutableError

    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        with pytest.raises(UnroutableError):
            pub.publish("upd.0", b"x")
    finally:
        pub.close()


@pytest.mark.slow
def test_sigkill_aggregator_loses_nothing_applies_nothing_twice(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = oracle_run(make_run, participants=4)
    h.aggregator(log=tmp_path / "agg.log")
    workers = [
        h.spawn(
            "worker",
            "--synthetic",
            "--participants",
            str(p),
            "--record-dir",
            str(tmp_path),
            log=tmp_path / f"w{p}.log",
        )
        for p in range(4)
    ]
    rng = np.random.default_rng(3)
    kills = 0
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        time.sleep(float(rng.uniform(0.3, 1.2)))
        agg = h.procs[0] if kills == 0 else h.procs[-1]
        agg.send_signal(signal.SIGKILL)
        agg.wait()
        kills += 1
        h.aggregator(log=tmp_path / "agg.log")
    h.store.request_stop("test over")
    for w in workers:
        assert w.wait(timeout=30) == 0
    confirmed = [u for p in range(4) for u in read_oracle(tmp_path, p, h)[1]]
    h.wait(lambda: h.version() == len(confirmed), timeout=60, what="every confirmed update")
    assert kills >= 10
    assert len(confirmed) > 50
    assert_exact(h, confirmed)


def test_consumer_properties_name_the_participant(make_run: Callable[..., RunHandle]) -> None:
    h = oracle_run(make_run)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="7")
    try:
        pub.publish("upd.7", b"payload")
    finally:
        pub.close()
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests")
    ch = conn.channel()
    method, props, body = ch.basic_get(h.names.queue, auto_ack=True)
    conn.close()
    assert method is not None and body == b"payload"
    assert props.app_id == "7"
    assert props.content_type == "application/x-dssgd-update"
    assert props.delivery_mode == pika.DeliveryMode.Persistent.value


def test_a_second_aggregator_fences_off_the_first(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = oracle_run(make_run)
    first = h.aggregator(log=tmp_path / "a1.log")
    rng = np.random.default_rng(12)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        updates = [integer_update(h, 0, 1, rng)]
        pub.publish("upd.0", wire.encode(updates[0]))
        h.wait(lambda: h.version() == 1, what="the first aggregator applying")
        second = h.aggregator(log=tmp_path / "a2.log")
        h.wait(lambda: int(h.store.r.get(h.store.keys.fence) or 0) == 2, what="the new fence")
        for seq in range(2, 41):
            updates.append(integer_update(h, 0, seq, rng))
            pub.publish("upd.0", wire.encode(updates[-1]))
    finally:
        pub.close()
    # Whichever of the two received a delivery after the takeover: the deposed one cannot write
    # (its commit is refused) and exits 75; every update is applied exactly once by the new one.
    h.wait(lambda: h.version() == 40, what="every update applied")
    assert first.wait(timeout=20) == 75
    assert second.poll() is None
    assert_exact(h, updates)
