"""--secure two-server against the real RabbitMQ stream, the coordination Redis and two private
Redis servers: exactness, consistent reads under a slowed server, crashes and duplicates."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from dssgd.shared import secure
from dssgd.shared.config import Connections
from dssgd.shared.rules import apply_update

from testing.secure import RedisServer, SecureRig, secure_config

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def share_redis() -> Iterator[tuple[str, str]]:
    try:
        a = RedisServer()
        b = RedisServer()
    except RuntimeError as exc:
        pytest.skip(f"private Redis servers for the share servers: {exc}")
    yield a.url, b.url
    a.stop()
    b.stop()


@pytest.fixture
def rig(conns: Connections, share_redis: tuple[str, str]) -> Iterator[SecureRig]:
    r = SecureRig(conns, secure_config(snapshot_every=4, snapshot_ring=8), share_redis)
    yield r
    r.close()


def _plain_stat(rig: SecureRig) -> np.ndarray:
    """stat as the plaintext aggregator computes it (rules.apply_update), unique updates only."""
    w = np.zeros(rig.n, np.float32)
    stat = np.zeros(rig.n, np.float32)
    seen = set()
    for s in rig.sent:
        if (s.participant, s.seq) in seen:
            continue
        seen.add((s.participant, s.seq))
        from dssgd.shared import wire

        idx = wire.decode_secure(s.body).indices
        apply_update(w, stat, idx, s.values, 1.0)
    return stat


def test_exact_shares_stat_and_duplicates(rig: SecureRig) -> None:
    """Reconstructed w is bit-identical to the quantized plaintext reference, stat is identical
    on both servers and to the plaintext aggregator's, and duplicates apply once on both."""
    rig.start_thread("a")
    rig.start_thread("b")
    rng = np.random.default_rng(5)
    unique = 0
    for seq in range(1, 13):
        for pid in range(4):
            sent = rig.send(pid, seq, k=200, rng=rng, base=max(0, unique - 6))
            unique += 1
            if seq % 4 == 0:  # the same bytes again: a publish whose confirm was lost
                rig.publish(sent.body, pid, seq, sent.values)
    rig.wait_applied()
    a, b = rig.server_state("a"), rig.server_state("b")
    ref, _ = rig.reference()
    ring = secure.reconstruct(a.state, b.state)
    assert ring.tobytes() == ref.state.tobytes()
    assert a.stat.tobytes() == b.stat.tobytes() == ref.stat.tobytes() == _plain_stat(rig).tobytes()
    assert a.version == b.version == unique
    for role in "ab":
        c = rig.counters(role)
        assert c["applied"] == unique and c["duplicates"] == len(rig.sent) - unique
    # The read API gives w0 + ring / 2^40; negative control: one server's state alone is noise.
    version, w, _ = rig.connect_sender().read_params()
    assert version == unique
    assert w.tobytes() == secure.decode_state(rig.w0, ref.state.view(np.int64)).tobytes()
    with pytest.raises(secure.ShareError):
        secure.decode_state(rig.w0, a.state.view(np.int64))


def test_reads_through_the_api_are_never_torn(rig: SecureRig) -> None:
    """With server B slowed, every read through the read API equals the reference at the
    offset it was served from; a naive read of both current states is mostly garbage."""
    rig.start_thread("a")
    rig.start_thread("b", slow=0.03, max_batch=2)
    reader = rig.connect_sender().reader
    reader.level_wait = 0.0  # no waiting for the servers to be level: exercise the ring
    rng = np.random.default_rng(9)
    reads: list[tuple[int, bytes]] = []
    naive: list[tuple[int, bytes]] = []
    for seq in range(1, 13):
        for pid in range(4):
            rig.send(pid, seq, k=100, rng=rng)
        va, vb = reader.read_views()
        reads.append((va.offset, secure.reconstruct(va.state, vb.state).tobytes()))
        a_now = rig.views[0].current(rig.views[0].peek()[0], False)
        b_now = rig.views[1].current(rig.views[1].peek()[0], False)
        if a_now is not None and b_now is not None:
            naive.append((a_now.offset, secure.reconstruct(a_now.state, b_now.state).tobytes()))
    rig.wait_applied()
    _, states = rig.reference(every=True)
    states[-1] = np.zeros(rig.n, np.uint64).tobytes()
    assert len(reads) == 12
    assert all(states[off] == got for off, got in reads), "a read through the API was torn"
    assert reader.fallbacks > 0, "server B was never behind: the test did not exercise the ring"
    torn = sum(states[off] != got for off, got in naive)
    assert torn >= len(naive) // 2, f"only {torn} of {len(naive)} naive reads were torn"


@pytest.mark.parametrize("crash", [("before-commit:2", "after-commit:3")])
def test_kill_9_and_duplicates_apply_exactly_once(rig: SecureRig, crash: tuple[str, str]) -> None:
    """SIGKILL of server A before a commit and of B between commit and ack, with duplicate
    publishes: after restarts both equal the fault-free reference, applied = unique."""
    rng = np.random.default_rng(11)
    rig.start_thread("a")  # registers both keys quickly, then hands over to processes
    rig.start_thread("b")
    rig.connect_sender()
    rig.stop_servers()
    unique = 0
    for seq in range(1, 7):
        for pid in range(4):
            sent = rig.send(pid, seq, k=150, rng=rng)
            unique += 1
            if pid == 1:
                rig.publish(sent.body, pid, seq, sent.values)
    rig.start_process("a", crash=crash[0])
    rig.start_process("b", crash=crash[1])
    deadline = time.monotonic() + 40
    while any(p.is_alive() for p in rig.procs.values()):
        assert time.monotonic() < deadline, "share servers did not crash"
        time.sleep(0.05)
    codes = {role: p.exitcode for role, p in rig.procs.items()}
    assert codes == {"a": -9, "b": -9}, f"fault injection did not fire: {codes}"
    rig.procs.clear()
    rig.start_thread("a")
    rig.start_thread("b")
    rig.wait_applied()
    a, b = rig.server_state("a"), rig.server_state("b")
    ref, _ = rig.reference()
    assert secure.reconstruct(a.state, b.state).tobytes() == ref.state.tobytes()
    for role in "ab":
        c = rig.counters(role)
        assert c["applied"] == unique, (role, c)


def test_delete_removes_the_secure_stream_and_exchange(conns: Connections) -> None:
    import pika.exceptions as pex
    from dssgd.shared.amqp_names import AmqpNames
    from dssgd.shared.broker import connect as amqp_connect
    from dssgd.shared.store import RunStore
    from dssgd.shared.store import connect as redis_connect
    from dssgd.shared.stream import declare_secure_topology

    from dssgd.cli import main

    cfg = secure_config()
    RunStore(redis_connect(conns.redis_url), cfg.run_id).create_config(cfg)
    names = AmqpNames(cfg.run_id)
    conn = amqp_connect(conns.amqp_url, "dssgd-tests")
    try:
        declare_secure_topology(conn.channel(), names)
        conn.channel().queue_declare(names.secure_stream, passive=True)  # there before
        urls = ["--amqp-url", conns.amqp_url, "--redis-url", conns.redis_url]
        assert main(["delete", cfg.run_id, *urls]) == 0
        with pytest.raises(pex.ChannelClosedByBroker, match="NOT_FOUND"):
            conn.channel().queue_declare(names.secure_stream, passive=True)
        with pytest.raises(pex.ChannelClosedByBroker, match="NOT_FOUND"):
            conn.channel().exchange_declare(names.secure_exchange, passive=True)
    finally:
        conn.close()
