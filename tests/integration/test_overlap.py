"""Sending overlapped with training (asynchronous order) keeps both guarantees of a participant:
every sequence number is burned in Redis before its message can reach the broker, and every
confirmed update is applied exactly once, also across a worker killed mid-send."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dssgd.shared import wire
from dssgd.shared.broker import Publisher
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.lifecycle import StopFlag
from dssgd.shared.tasks import load_task
from dssgd.worker.participant import Outgoing, Participant, SharedModel
from dssgd.worker.service import Sender

from testing.oracle import assert_exact
from testing.runs import RunHandle


class PublishFirst(Participant):
    """Negative control: publishes, then burns (what the rule forbids)."""

    def deliver(self, out: Outgoing, overlapped: bool = False):  # type: ignore[no-untyped-def]
        for body in out.bodies:
            self._publish(body, out.seq)
        time.sleep(0.05)
        self._burn_seq(out.seq, out.indices, out.values)
        self.epochs += 1
        return out.report


def _unburned_at_arrival(h: RunHandle, cls: type[Participant], epochs: int) -> tuple[int, int]:
    """(messages, messages whose seq was not yet burned when they arrived) for 2 participants
    sending ``epochs`` updates each through the overlapped sender; checked per message as it
    comes off the queue."""
    stop = StopFlag()
    pub = Publisher(h.conns.amqp_url, h.names, app_id="0-1")
    shared = SharedModel(load_task(h.cfg.task), h.cfg)
    parts = [cls(p, h.cfg, h.store, pub, stop, None, synthetic=True, shared=shared) for p in (0, 1)]
    sender = Sender(stop)
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests-overlap")
    ch = conn.channel()
    seen = unburned = 0
    try:
        for _ in range(epochs):
            for part in parts:
                sender.submit(part, part.prepare())
        deadline = time.monotonic() + 20
        while seen < 2 * epochs and time.monotonic() < deadline:
            method, _props, body = ch.basic_get(h.names.queue, auto_ack=True)
            if method is None:
                time.sleep(0.005)
                continue
            u = wire.decode(body)
            burned = int(h.store.progress(u.participant).get("seq_sent", 0))
            seen, unburned = seen + 1, unburned + (burned < u.seq)
        sender.wait_idle(timeout=10)
    finally:
        sender.close()
        pub.close()
        conn.close()
    return seen, unburned


def test_seq_is_burned_before_the_message_reaches_the_broker(
    make_run: Callable[..., RunHandle],
) -> None:
    h = make_run(zero_init=True, participants=2, theta_u=0.01, gamma=100.0, rule="sum")
    seen, unburned = _unburned_at_arrival(h, Participant, epochs=15)
    assert seen == 30 and unburned == 0
    # Negative control: the same check catches a participant that publishes first.
    h2 = make_run(zero_init=True, participants=2, theta_u=0.01, gamma=100.0, rule="sum")
    seen, unburned = _unburned_at_arrival(h2, PublishFirst, epochs=3)
    assert seen == 6 and unburned > 0


def _records(folder: Path, pid: int) -> tuple[dict[int, list[dict]], set[int]]:  # type: ignore[type-arg]
    sent: dict[int, list[dict]] = {}  # type: ignore[type-arg]
    confirmed: set[int] = set()
    for line in (folder / f"confirmed-{pid}.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["state"] == "sent":
            sent.setdefault(rec["seq"], []).append(rec)
        else:
            confirmed.add(rec["seq"])
    return sent, confirmed


def test_overlapped_worker_killed_mid_send_applies_every_update_once(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    # No epoch limit: the run goes on until the test stops it, whatever the machine's speed.
    h = make_run(zero_init=True, participants=3, theta_u=0.01, gamma=100.0, rule="sum", epochs=0)
    h.aggregator(log=tmp_path / "agg.log")
    args = ("--slot", "0/1", "--worker-id", "w0", "--synthetic", "--record-dir", str(tmp_path))
    w = h.spawn("worker", *args, log=tmp_path / "w.log")
    h.wait(lambda: h.version() >= 40, timeout=180, what="40 updates applied")
    w.send_signal(signal.SIGKILL)  # somewhere between burn, publish and confirm, likely
    w.wait()
    w = h.spawn("worker", *args, log=tmp_path / "w.log")
    before = h.version()
    h.wait(lambda: h.version() >= before + 40, timeout=180, what="the restarted worker sending")
    h.store.request_stop("test over")
    assert w.wait(timeout=60) == 0
    updates: dict[tuple[int, int], wire.Update] = {}
    confirmed: list[tuple[int, int]] = []
    for pid in range(3):
        sent, ok = _records(tmp_path, pid)
        # A sequence number is never handed out twice, not even by the restarted worker.
        assert all(len(recs) == 1 for recs in sent.values()), f"participant {pid} reused a seq"
        for seq, (rec,) in sent.items():
            idx, vals = np.array(rec["indices"], np.int64), np.array(rec["values"], np.float32)
            updates[(pid, seq)] = wire.Update(h.cfg.run_id, pid, seq, 0, h.init.size, idx, vals)
        confirmed += [(pid, s) for s in ok]
    # Confirmed updates are applied (once each); a kill may add sent-but-unconfirmed ones.
    h.wait(
        lambda: (
            {tuple(map(int, e.split(":")[:2])) for e in h.store.applied_log()} >= set(confirmed)
        ),
        timeout=60,
        what="every confirmed update applied",
    )
    h.store.request_stop("test over")
    applied = [tuple(map(int, e.split(":")[:2])) for e in h.store.applied_log()]
    assert len(applied) == len(set(applied)) == h.version()
    assert len(confirmed) > 60
    assert_exact(h, [updates[key] for key in applied])  # type: ignore[index]
