"""Least privilege, authentication, replay and poisoning bounds against the real servers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.errors import BrokerError
from dssgd.shared.provision import deprovision, participant_user, provision, read_credentials

from testing.oracle import assert_exact, drain_dead_letters, integer_update
from testing.runs import RunHandle

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(make_run: Callable[..., RunHandle], tmp_path: Path) -> Iterator[tuple[RunHandle, Path]]:
    h = make_run(
        zero_init=True, participants=2, theta_u=0.01, gamma=100.0, rule="sum", max_staleness=1000
    )
    creds = tmp_path / "creds"
    provision(h.cfg.run_id, 2, h.conns.amqp_url, h.conns.redis_url, creds)
    h.spawn(
        "aggregator",
        "--no-eval",
        "--credentials",
        str(creds / "aggregator.json"),
        log=tmp_path / "agg.log",
    )
    yield h, creds
    deprovision(h.cfg.run_id, 2, h.conns.amqp_url, h.conns.redis_url)


def participant_publisher(h: RunHandle, creds: Path, pid: int) -> tuple[Publisher, bytes]:
    c = read_credentials(creds / f"p{pid}.json")
    return (
        Publisher(c["amqp_url"], h.names, app_id=str(pid), user_id=c["amqp_user"]),
        bytes.fromhex(c["hmac_key"]),
    )


def test_impersonation_is_refused_four_ways(secured: tuple[RunHandle, Path]) -> None:
    h, creds = secured
    rng = np.random.default_rng(1)
    pub, key = participant_publisher(h, creds, 0)
    other_user = participant_user(h.cfg.run_id, 1)
    refused = 0
    try:
        good = integer_update(h, 0, 1, rng)
        pub.publish(AmqpNames.routing_key(0), wire.encode(good, key=key))
        h.wait(lambda: h.version() == 1, what="the genuine update")
        forged = wire.encode(integer_update(h, 0, 2, rng), key=key)
        attempts = {
            "another's routing key": dict(routing_key=AmqpNames.routing_key(1)),
            "another's user_id": dict(user_id=other_user),
            "default exchange": dict(exchange="", routing_key=h.names.queue),
        }
        for what, kw in attempts.items():
            rk = kw.pop("routing_key", AmqpNames.routing_key(0))
            with pytest.raises(BrokerError):
                pub.publish(rk, forged, **kw)  # type: ignore[arg-type]
            refused += 1
            print(f"refused by the broker: {what}")
        # No user_id at all: the broker cannot vouch for it, so the aggregator refuses it.
        pub.publish(AmqpNames.routing_key(0), forged, user_id=None)
    finally:
        pub.close()
    dead = drain_dead_letters(h, 1)
    assert [reason for reason, _ in dead] == ["impersonation"]
    refused += 1
    assert refused == 4
    time.sleep(0.5)
    assert h.version() == 1
    assert_exact(h, [good])


def test_participant_cannot_write_the_store(secured: tuple[RunHandle, Path]) -> None:
    h, creds = secured
    c = read_credentials(creds / "p0.json")
    r = redis.Redis.from_url(c["redis_url"])
    k = h.store.keys
    # Reads it needs work...
    assert r.get(k.w_chunk(0)) is not None
    assert r.get(k.version) is not None
    # ...and every write to what it must not touch is NOPERM.
    writes: list[tuple[str, ...]] = [
        ("SET", k.w_chunk(0), "x"),
        ("SETRANGE", k.w_chunk(0), "0", "x"),
        ("APPEND", k.w_chunk(0), "x"),
        ("DEL", k.w_chunk(0)),
        ("SET", k.shard(0).stat(0), "x"),
        ("INCR", k.version),
        ("SET", k.version, "9"),
        ("HSET", k.dedup, "0", "0:0"),
        ("HDEL", k.dedup, "0"),
        ("SET", k.config, "{}"),
        ("SET", k.fence, "1"),
        ("INCR", k.fence),
        ("HINCRBY", k.counters, "applied", "1"),
        ("RPUSH", k.applied_log, "x"),
        ("SET", k.turn, "1"),
        ("SET", k.stop, "x"),
        ("RENAME", k.w_chunk(0), "stolen"),
        ("EXPIRE", k.w_chunk(0), "1"),
        ("UNLINK", k.w_chunk(0)),
        ("HSET", k.participant(1), "epochs", "99"),
        ("RPUSH", k.wake(1), "1"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", k.w_chunk(0)),
        ("CONFIG", "SET", "appendonly", "no"),
        ("SET", "unrelated-key", "x"),
    ]
    denied = 0
    for cmd in writes:
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*cmd)
        denied += 1
    assert denied == len(writes)
    # Its own bookkeeping stays writable.
    r.hset(k.participant(0), "epochs", "1")


def test_replays_are_never_applied(secured: tuple[RunHandle, Path], conns: object) -> None:
    h, creds = secured
    rng = np.random.default_rng(2)
    pub, key = participant_publisher(h, creds, 0)
    sent = [integer_update(h, 0, 1, rng, k=5)]
    first = wire.encode(sent[0], key=key)
    try:
        pub.publish("upd.0", first)
        pub.publish("upd.0", first)  # immediate replay
        for seq in range(2, 1002):  # 10^3 newer genuine updates
            u = integer_update(h, 0, seq, rng, k=5)
            sent.append(u)
            pub.publish("upd.0", wire.encode(u, key=key))
        pub.publish("upd.0", first)  # late replay, far outside the window
    finally:
        pub.close()
    h.wait(lambda: h.version() == 1001, timeout=60, what="the genuine updates")
    dead = drain_dead_letters(h, 1)
    assert [reason for reason, _ in dead] == ["replay"]
    assert h.store.counters().get("duplicates", 0) == 1
    assert h.version() == 1001
    assert_exact(h, sent)


def test_replay_into_another_run_is_refused(
    make_run: Callable[..., RunHandle], secured: tuple[RunHandle, Path]
) -> None:
    h, creds = secured
    rng = np.random.default_rng(3)
    pub, key = participant_publisher(h, creds, 0)
    genuine = integer_update(h, 0, 1, rng)
    body = wire.encode(genuine, key=key)
    try:
        pub.publish("upd.0", body)
    finally:
        pub.close()
    h.wait(lambda: h.version() == 1, what="the genuine update")
    other = make_run(zero_init=True, participants=2, theta_u=0.01, gamma=100.0, rule="sum")
    other.aggregator()
    guest = Publisher(other.conns.amqp_url, other.names, app_id="attacker")
    try:
        guest.publish("upd.0", body)  # the same genuine bytes, into the other run
    finally:
        guest.close()
    dead = drain_dead_letters(other, 1)
    assert len(dead) == 1 and dead[0][0] in ("undecodable", "wrong-run")
    assert other.version() == 0


def test_poisoning_bounds_hold(make_run: Callable[..., RunHandle], tmp_path: Path) -> None:
    h = make_run(
        zero_init=True,
        participants=3,
        theta_u=0.5,
        gamma=1.0,
        rule="sum",
        max_l2=2.0,
        max_staleness=3,
        rate_limit=5.0,
    )
    h.aggregator(log=tmp_path / "agg.log")
    n = h.init.size
    pub = Publisher(h.conns.amqp_url, h.names, app_id="mallory")
    try:
        huge = wire.Update(
            h.cfg.run_id,
            0,
            1,
            0,
            n,
            np.array([1, 2], np.int64),
            np.array([1e30, -1e30], np.float32),
        )
        pub.publish("upd.0", wire.encode(huge))
        dense = wire.Update(
            h.cfg.run_id, 0, 2, 0, n, np.arange(n // 2, dtype=np.int64), np.ones(n // 2, np.float32)
        )
        pub.publish("upd.0", wire.encode(dense))  # within γ but huge in L2: scaled to the bound
        for seq in range(1, 21):  # 10× the allowed rate from participant 1
            u = wire.Update(
                h.cfg.run_id, 1, seq, 0, n, np.array([seq], np.int64), np.array([1.0], np.float32)
            )
            pub.publish("upd.1", wire.encode(u))
    finally:
        pub.close()
    h.wait(lambda: h.store.counters().get("rejected", 0) >= 2, what="rejections")
    time.sleep(1.0)
    _, w, _ = h.store.read_params()
    assert np.isfinite(w).all()
    # Indices ≥ 21 of the first half were touched only by the dense update: scaled to the bound.
    assert float(np.linalg.norm(w[21 : n // 2].astype(np.float64))) <= 2.0 + 1e-3
    counters = h.store.counters()
    assert counters.get("rejected:beyond-gamma", 0) == 1
    assert counters.get("l2_clipped", 0) == 1
    assert counters.get("rejected:rate-limited", 0) >= 10
    assert counters.get("rejected:stale", 0) >= 1  # later ones of participant 1 are > 3 old


def test_unauthenticated_updates_are_dead_lettered(secured: tuple[RunHandle, Path]) -> None:
    h, creds = secured
    rng = np.random.default_rng(5)
    pub, _key = participant_publisher(h, creds, 0)
    try:
        pub.publish("upd.0", wire.encode(integer_update(h, 0, 1, rng)))  # no tag
        pub.publish("upd.0", wire.encode(integer_update(h, 0, 2, rng), key=b"w" * 32))  # wrong key
    finally:
        pub.close()
    dead = drain_dead_letters(h, 2)
    assert [reason for reason, _ in dead] == ["unauthenticated", "unauthenticated"]
    assert h.version() == 0
