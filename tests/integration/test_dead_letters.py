"""`dssgd dead-letters`: counts by reason without consuming, and a re-drive that applies each
update once (a copy of an applied one is a duplicate; a still-invalid one comes back)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pika
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher, dead_letter_headers, queue_depth
from dssgd.shared.broker import connect as amqp_connect

from dssgd.cli import main
from testing.oracle import assert_exact, integer_update, oracle_run
from testing.runs import RunHandle

pytestmark = pytest.mark.integration


def dead_letter(h: RunHandle, body: bytes, reason: str, detail: str, pid: int | None) -> None:
    """A dead letter as the aggregator writes one (shared/broker.py:Consumer.dead_letter)."""
    key = AmqpNames.routing_key(pid) if pid is not None else "upd.x"
    headers = dead_letter_headers(reason, detail, key, "test", None)
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests")
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish(h.names.dead_exchange, "", body, pika.BasicProperties(headers=headers))
    conn.close()


def cli(capsys: pytest.CaptureFixture[str], h: RunHandle, *args: str) -> dict:  # type: ignore[type-arg]
    urls = ["--amqp-url", h.conns.amqp_url, "--redis-url", h.conns.redis_url]
    assert main(["dead-letters", h.cfg.run_id, "--json", *args, *urls]) == 0
    return json.loads(capsys.readouterr().out)


def test_dead_letters_listed_by_reason_and_redriven_once(
    make_run: Callable[..., RunHandle],
    thread_aggregator: Callable[[RunHandle], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = oracle_run(make_run)
    thread_aggregator(h)
    rng = np.random.default_rng(5)
    applied, refused = integer_update(h, 0, 1, rng), integer_update(h, 0, 2, rng)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        pub.publish(AmqpNames.routing_key(0), wire.encode(applied))
    finally:
        pub.close()
    h.wait(lambda: h.version() == 1, what="the first update")
    # Refused under a wrong key file, say: the valid seq 2, and a copy of the applied seq 1.
    for u in (refused, applied):
        dead_letter(h, wire.encode(u), "unauthenticated", "bad tag (wrong key file)", 0)
    for junk in (b"\x00junk", b"\x01junk"):
        dead_letter(h, junk, "undecodable", "not msgpack", None)

    listing = cli(capsys, h)
    assert listing["total"] == 4
    assert {k: v["count"] for k, v in listing["reasons"].items()} == {
        "unauthenticated": 2,
        "undecodable": 2,
    }
    example = listing["reasons"]["unauthenticated"]["example"]
    assert example["detail"] == "bad tag (wrong key file)" and example["routing_key"] == "upd.0"
    assert cli(capsys, h)["total"] == 4  # listing consumed nothing

    # The fix is in (the aggregator has the right key now): re-drive that reason only.
    assert cli(capsys, h, "--redrive", "--reason", "unauthenticated") == {
        "republished": {"unauthenticated": 2},
        "kept": 2,
    }
    h.wait(lambda: h.store.counters().get("duplicates", 0) == 1, what="the copy seen as such")
    h.wait(lambda: h.version() == 2, what="the re-driven update applied")
    assert_exact(h, [applied, refused])  # each applied exactly once
    assert (queue_depth(h.conns.amqp_url, h.names) or {})["dead_letters"] == 2
    # Re-driving what is still invalid costs nothing: it comes back with its reason.
    assert cli(capsys, h, "--redrive")["republished"] == {"undecodable": 2}
    h.wait(
        lambda: (queue_depth(h.conns.amqp_url, h.names) or {}).get("dead_letters") == 2,
        what="the junk back in the dead letters",
    )
    assert h.version() == 2 and h.store.counters()["rejected:undecodable"] == 2
