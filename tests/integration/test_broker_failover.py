"""A broker URL naming several nodes: a dead node in the list costs nothing, exactly once holds.

The kill -9 of a real cluster node (the queue's leader) mid-run is bench/cluster_chaos.py: a
3-node cluster takes over a minute to form on 2 cores, too long for the suite.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher, connect, endpoints
from dssgd.shared.config import Connections
from dssgd.shared.errors import BrokerError

from dssgd.admin import check_amqp
from testing.oracle import assert_exact, integer_update, oracle_run
from testing.runs import RunHandle

pytestmark = pytest.mark.integration


def _dead_port() -> int:
    with socket.socket() as s:  # bound, never listening: every connect is refused at once
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_dead_nodes(url: str) -> str:
    """The shared broker's URL with two refusing nodes around it, as one comma-separated URL."""
    live = endpoints(url)[0]
    scheme, rest = live.split("://", 1)
    creds, _, hostpath = rest.rpartition("@")
    host, slash, tail = hostpath.partition("/")
    dead = [f"127.0.0.1:{_dead_port()}" for _ in range(2)]
    return f"{scheme}://{creds}@{dead[0]},{host},{dead[1]}{slash}{tail}"


def test_a_dead_node_in_the_list_is_skipped(conns: Connections) -> None:
    url = _with_dead_nodes(conns.amqp_url)
    for _ in range(6):  # the list starts at a random node: dead ones come first in most tries
        connect(url, "dssgd-tests-failover", heartbeat=0).close()
    only_dead = url.replace(endpoints(conns.amqp_url)[0].split("@")[1].split("/")[0], "")
    with pytest.raises(BrokerError, match="cannot connect"):  # control: no live node, no luck
        connect(only_dead.replace(",,", ","), "dssgd-tests-failover", heartbeat=0)
    check_amqp(url, "dssgd-tests-failover")  # the services' start-up check agrees
    with pytest.raises(BrokerError, match="none of the 2 RabbitMQ nodes"):
        check_amqp(only_dead.replace(",,", ","), "dssgd-tests-failover")


def test_exactly_once_through_a_node_list(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = oracle_run(make_run, participants=2)
    url = _with_dead_nodes(h.conns.amqp_url)
    h.conns = Connections(amqp_url=url, redis_url=h.conns.redis_url)  # the aggregator's too
    h.aggregator(log=tmp_path / "agg.log")
    rng = np.random.default_rng(5)
    updates = [integer_update(h, p, s, rng) for s in range(1, 31) for p in (0, 1)]
    pub = Publisher(url, h.names, app_id="test")
    try:
        for u in updates:
            pub.publish(AmqpNames.routing_key(u.participant), wire.encode(u))
        pub.publish(AmqpNames.routing_key(0), wire.encode(updates[0]))  # a re-send: absorbed
    finally:
        pub.close()
    h.wait(lambda: h.store.counters().get("duplicates", 0) >= 1, what="the re-send seen")
    assert h.version() == len(updates)
    assert_exact(h, updates)


def test_a_refused_publish_is_retried_on_a_fresh_connection(
    make_run: Callable[..., RunHandle],
) -> None:
    # A nack may come from a channel whose view of a quorum queue's leader is stale (seen on a
    # 3-node cluster after a leader kill), so the publisher drops its connection on one; the
    # retry must then work as soon as the broker accepts again.
    h = make_run(zero_init=True, participants=1, theta_u=0.01, gamma=100.0, rule="sum",
                 queue_max_length=1)
    rng = np.random.default_rng(7)
    updates = [integer_update(h, 0, s, rng) for s in range(1, 6)]
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        refused = 0
        for u in updates:
            try:
                pub.publish(AmqpNames.routing_key(0), wire.encode(u), timeout=10)
            except BrokerError as exc:
                assert "refused" in str(exc)
                refused += 1
        assert refused >= 1  # control: the bound was reached
        conn = connect(h.conns.amqp_url, "dssgd-tests-failover", heartbeat=0)
        ch = conn.channel()
        while ch.basic_get(h.names.queue, auto_ack=True)[0] is not None:
            pass  # make room
        conn.close()
        pub.publish(AmqpNames.routing_key(0), wire.encode(updates[-1]), timeout=10)
    finally:
        pub.close()
