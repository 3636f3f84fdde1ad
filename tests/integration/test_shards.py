"""Range shards S > 1 on the real servers (issue 15): each shard commits in its own fenced script
with its own replay windows, so an aggregator killed between two shards' commits recovers
exactly once; and an update split into one message per shard is applied exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dssgd.aggregator.admission import Accepted
from dssgd.aggregator.batch import apply_batch
from dssgd.shared import dedup, wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Delivery, Publisher
from dssgd.shared.lifecycle import StopFlag
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import AggregatorState
from dssgd.shared.tasks import load_task
from dssgd.worker.participant import Participant, SharedModel

from testing.oracle import assert_exact, expected_state, integer_update, read_oracle
from testing.runs import RunHandle

S = 3


def sharded_run(make_run: Callable[..., RunHandle], **extra: object) -> RunHandle:
    fields: dict[str, object] = {"theta_u": 0.01, "gamma": 100.0, "rule": "sum", "shards": S}
    return make_run(zero_init=True, participants=3, **{**fields, **extra})


def publish(h: RunHandle, bodies: list[tuple[int, bytes]]) -> None:
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        for pid, body in bodies:
            pub.publish(AmqpNames.routing_key(pid), body)
    finally:
        pub.close()


def shard_versions(h: RunHandle) -> list[int]:
    k = h.store.keys
    return [int(h.store.r.get(k.shard(s).version) or 0) for s in range(S)]


def shard_highs(h: RunHandle, pid: int) -> list[int]:
    k = h.store.keys
    return [dedup.decode_state(h.store.r.hget(k.shard(s).dedup, str(pid)))[0] for s in range(S)]


def redelivered(state: AggregatorState, h: RunHandle, updates: list[wire.Update]) -> np.ndarray:
    """w after the batch is applied again to ``state`` (in memory only)."""
    verdicts = [
        Accepted(Delivery(i, b"x", AmqpNames.routing_key(u.participant), None, None), u)
        for i, u in enumerate(updates, 1)
    ]
    apply_batch(state, verdicts, h.cfg, UpdateRule("sum", 1.0, h.cfg.participants))
    return state.w


def test_a_kill_between_two_shards_commits_recovers_exactly_once(
    make_run: Callable[..., RunHandle],
) -> None:
    h = sharded_run(make_run)
    rng = np.random.default_rng(15)
    updates = [integer_update(h, p, seq, rng, k=300) for seq in (1, 2, 3) for p in range(3)]
    publish(h, [(u.participant, wire.encode(u)) for u in updates])  # queued before it starts
    # kill -9 right after the first shard's commit (shard 2; shard 0 commits last).
    crashed = h.aggregator(env={"DSSGD_FAILPOINT": "after-shard-commit"})
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    at_crash = shard_versions(h)
    assert at_crash[0] == at_crash[1] == 0 < at_crash[2], at_crash  # torn across shards
    # Negative control: one replay window shared by every shard cannot recover this state.
    # With shard 2's (the committed one) the redelivery is skipped everywhere: shards 0 and 1
    # lose it; with shard 0's it is applied everywhere again: shard 2 doubles it.
    w_exp, _ = expected_state(h, updates)
    lo2 = h.store.layout().shard_span(2)[0]
    for donor in (2, 0):
        state = h.store.load_state()
        one = state.windows(donor)
        for s in range(S):
            state.windows(s).clear()
            state.windows(s).update(one)
        w = redelivered(state, h, updates)
        wrong = w[:lo2] if donor == 2 else w[lo2:]
        right = w_exp[:lo2] if donor == 2 else w_exp[lo2:]
        assert wrong.tobytes() != right.tobytes(), f"a window shared from shard {donor} sufficed"
    # The real recovery: each shard's own windows send the redelivery where it is missing.
    h.aggregator()
    h.wait(lambda: shard_versions(h) == [len(updates)] * S, timeout=90, what="every shard")
    assert_exact(h, updates)
    for p in range(3):
        assert shard_highs(h, p) == [3, 3, 3]
    completed = int(h.store.r.hget(h.store.keys.shard(2).counters, "completed") or 0)
    assert completed == 0  # shard 2 had it: the redelivery went to shards 0 and 1 only
    assert int(h.store.r.hget(h.store.keys.shard(1).counters, "applied") or 0) == len(updates)
    log = h.store.applied_log()
    assert sorted(e.split(":")[2] for e in log) == sorted(str(v) for v in range(1, 10))


def test_a_split_update_is_applied_exactly_once_per_shard(
    make_run: Callable[..., RunHandle],
) -> None:
    h = sharded_run(make_run, theta_u=1.0)
    h.aggregator()
    rng = np.random.default_rng(16)
    n = h.init.size
    layout = h.store.layout()
    spans = [layout.shard_span(s) for s in range(S)]
    big = wire.Update(
        h.cfg.run_id, 0, 1, 0, n, np.arange(n), rng.integers(-3, 4, n).astype(np.float32)
    )
    parts = wire.encode_parts(big, spans, split_bytes=64 * 1024)  # the split, made to happen
    assert len(parts) == S and all(len(p) < len(wire.encode(big)) for p in parts)
    assert [wire.decode(p).part for p in parts] == [2, 1, 0]  # shard 0's last
    small = integer_update(h, 1, 1, rng, k=200)
    # Every part twice (a redelivery of all of them) and a part once more out of order.
    publish(h, [(0, p) for p in parts] + [(1, wire.encode(small))] + [(0, p) for p in parts])
    publish(h, [(0, parts[1])])
    # 90 s: under a loaded machine the aggregator's start (PyTorch's import) alone took 30.
    h.wait(lambda: h.store.counters().get("duplicates", 0) >= 1, timeout=90, what="a duplicate")
    h.wait(lambda: shard_versions(h) == [2, 2, 2], timeout=90, what="both on every shard")
    assert_exact(h, [big, small])
    for s in range(1, S):
        counters = h.store.r.hgetall(h.store.keys.shard(s).counters)
        assert int(counters[b"applied"]) == 2  # the part and the small update, once each
    assert shard_highs(h, 0) == [1, 1, 1]


def test_participants_split_what_exceeds_a_message_and_send_per_shard_bases(
    make_run: Callable[..., RunHandle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "SPLIT_BYTES", 1)  # every update is "too large": always split
    h = sharded_run(make_run, theta_u=0.1, theta_d=0.3)
    h.aggregator()
    stop = StopFlag()
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    shared = SharedModel(load_task(h.cfg.task), h.cfg)
    try:
        parts = [
            Participant(
                p,
                h.cfg,
                h.store,
                pub,
                stop,
                None,
                synthetic=True,
                shared=shared,
                record_dir=tmp_path,
            )
            for p in (0, 1)
        ]
        for _ in range(3):
            for part in parts:
                report = part.run_epoch()
                assert report.bytes_up > 0 and len(part.bases) == S
    finally:
        pub.close()
        for part in parts:
            part.close()
    confirmed = [u for p in (0, 1) for u in read_oracle(tmp_path, p, h)[1]]
    h.wait(lambda: shard_versions(h) == [6] * S, timeout=90, what="every part applied")
    assert_exact(h, confirmed)
    assert h.store.counters().get("rejected", 0) == 0
