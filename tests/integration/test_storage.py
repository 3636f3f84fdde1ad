"""Chunked parameter storage against a private redis-server: the bytes a download makes Redis
send, the bytes it reports, and what a commit writes (issue 15)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
from dssgd.shared.errors import FencedError, StoreError
from dssgd.shared.selection import most_updated
from dssgd.shared.store import AggregatorState, RunStore, connect

from testing.redis_cluster import PrivateCluster, PrivateServer

N = 105_506  # the CNN's size


@pytest.fixture
def server() -> Iterator[PrivateServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    srv = PrivateServer(17190 + os.getpid() % 10)
    yield srv
    srv.stop()


def seeded(server: PrivateServer, n: int = N) -> tuple[RunStore, int, AggregatorState]:
    store = RunStore(connect(server.url), "storage")
    rng = np.random.default_rng(3)
    store.init_params(rng.standard_normal(n).astype(np.float32))
    fence = store.take_fence()
    state = store.load_state()
    hot = rng.choice(n, n // 5, replace=False)
    for seq in range(1, 11):
        commit(store, fence, state, np.sort(rng.choice(hot, n // 100, replace=False)), seq)
    return store, fence, state


def commit(store: RunStore, fence: int, state: AggregatorState, idx: np.ndarray, seq: int) -> None:
    state.w[idx] += np.float32(1)
    state.stat[idx] += 1
    state.touched.append(idx)
    state.version += 1
    store.commit(fence, state, {0: f"{seq}:1"}, {"applied": 1}, [])


def test_a_tenth_download_makes_redis_send_a_tenth_and_reports_what_it_received(
    server: PrivateServer,
) -> None:
    store, _, state = seeded(server)
    out = np.zeros(N, np.float32)

    def measure(fn: object) -> tuple[int, int]:
        before = server.output_bytes()
        mid = server.output_bytes()  # the first INFO reply's size, as the server counts it
        reported = fn()  # type: ignore[operator]
        return server.output_bytes() - mid - (mid - before), reported

    full_sent, full_rep = measure(lambda: store.download(out, 1.0).bytes_received)
    assert out.tobytes() == state.w.tobytes()
    tenth_sent, tenth_rep = measure(lambda: store.download(out, 0.1).bytes_received)
    assert tenth_sent <= 0.15 * full_sent
    for s, r in ((full_sent, full_rep), (tenth_sent, tenth_rep)):
        assert abs(r - s) <= 0.05 * s, (r, s)
    # The most-updated chunks were read: every downloaded chunk is one the updates hit most.
    got = store.download(np.zeros(N, np.float32), 0.1)
    layout = store.layout()
    mean = np.add.reduceat(state.stat, np.arange(0, N, layout.chunk)) / layout.sizes()
    assert mean[got.chunks].min() >= np.delete(mean, got.chunks).max()

    # Negative control: the old download (w and stat whole, θd·n·4 reported) fails both checks.
    def old() -> int:
        _, _, stat = store.read_params(with_stat=True)
        assert stat is not None
        return int(most_updated(stat, 0.1).size * 4)

    old_sent, old_rep = measure(old)
    assert old_sent > 0.15 * full_sent
    assert abs(old_rep - old_sent) > 0.05 * old_sent


def test_a_commit_writes_what_it_touched_and_stays_fenced(server: PrivateServer) -> None:
    n = 1_000_000
    store, fence, state = seeded(server, n)

    def received() -> int:
        return int(store.r.info("stats")["total_net_input_bytes"])

    idx = np.sort(np.random.default_rng(9).choice(n, 100, replace=False))
    before = received()
    commit(store, fence, state, idx, 11)
    sparse_in = received() - before
    _, w, stat = store.read_params(with_stat=True)
    assert w.tobytes() == state.w.tobytes() and stat is not None
    assert stat.tobytes() == state.stat.tobytes()
    assert sparse_in < 40_000  # 100 entries, not 8 MB of w and stat
    # Negative control: a change of every counter (the paper's decay) writes all of stat.
    state.stat *= np.float32(0.5)
    state.stat_all = True
    before = received()
    commit(store, fence, state, idx, 12)
    assert received() - before > 4 * n
    assert store.read_params(with_stat=True)[2].tobytes() == state.stat.tobytes()  # type: ignore[union-attr]
    # A deposed aggregator writes nothing, and the chunks are as the last commit left them.
    store.take_fence()
    with pytest.raises(FencedError):
        commit(store, fence, state, idx, 13)
    assert store.read_params()[0] == 12


def test_a_run_lives_in_one_slot_of_a_redis_cluster_and_shards_would_not() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    from redis.cluster import key_slot

    cluster = PrivateCluster(17160 + 3 * (os.getpid() % 10))
    try:
        store = RunStore(connect(cluster.url + "?cluster=yes"), "storage-cluster")
        n = 50_000
        store.init_params(np.zeros(n, np.float32))
        fence = store.take_fence()
        state = store.load_state()
        commit(store, fence, state, np.arange(0, n, 3), 1)
        out = np.empty(n, np.float32)
        master = cluster.master_of(store.keys.version)
        before = master.output_bytes()
        mid = master.output_bytes()
        got = store.download(out, 1.0)
        sent = master.output_bytes() - mid - (mid - before)
        assert out.tobytes() == state.w.tobytes() and got.versions == (1,)
        assert abs(got.bytes_received - sent) <= 0.05 * sent
        # Every key of the run shares one slot; a second shard's keys would have their own.
        k = store.keys
        slots = {key_slot(x.encode()) for x in (k.version, k.dedup, k.w_chunk(0), k.config)}
        assert len(slots) == 1
        assert key_slot(k.shard(1).w(0).encode()) not in slots  # negative control
    finally:
        cluster.stop()


def test_a_run_stored_as_whole_blobs_keeps_its_state(server: PrivateServer) -> None:
    store = RunStore(connect(server.url), "legacy")
    old_w, old_stat = np.arange(3000, dtype=np.float32), np.ones(3000, np.float32)
    w_key, stat_key = store.keys.legacy_blobs
    store.r.mset({w_key: old_w.tobytes(), stat_key: old_stat.tobytes(), store.keys.version: 7})
    store.init_params(np.zeros(3000, np.float32))
    version, w, stat = store.read_params(with_stat=True)
    assert (version, w.tobytes(), stat.tobytes()) == (7, old_w.tobytes(), old_stat.tobytes())  # type: ignore[union-attr]
    # Negative control: a fresh run starts from the initial state it is given.
    fresh = RunStore(connect(server.url), "fresh")
    fresh.init_params(np.zeros(3000, np.float32))
    assert fresh.read_params()[1].tobytes() == np.zeros(3000, np.float32).tobytes()


def test_a_commit_cut_off_while_watching_the_fence_is_an_outage_not_a_takeover(
    server: PrivateServer,
) -> None:
    """redis-py raises WatchError for a connection lost while watching as well as for a watched
    key that changed: a stalled Redis must end the session (StoreError: reload, reconnect), not
    the aggregator (FencedError: exit so that another one can work)."""
    import redis

    store, fence, state = seeded(server, 20_000)
    impatient = RunStore(redis.Redis.from_url(server.url, socket_timeout=0.3), "storage")
    admin = redis.Redis.from_url(server.url)
    idx = np.arange(0, 20_000, 7)
    admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # reads (WATCH, GET) still served
    try:
        with pytest.raises(StoreError) as cut:
            commit(impatient, fence, state, idx, 11)
        assert not isinstance(cut.value, FencedError), cut.value
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    # Negative control: the same commit after another aggregator raised the fence is refused
    # as a takeover.
    store.take_fence()
    with pytest.raises(FencedError):
        commit(impatient, fence, state, idx, 12)
