"""`dssgd run` ends only when every confirmed update is applied, and says so when it cannot.

The aggregator is frozen (SIGSTOP) while the participants finish, so the drain starts with a
backlog; then it is killed during the drain, restarted by the launcher, and the run ends with
every confirmed update applied exactly once. The negative control: a drain whose aggregator
cannot come back measures what waits and names `--resume` (exit 75 in `dssgd run`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher, delete_topology
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import Connections
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

from dssgd import orchestrate
from dssgd.launcher import ForkLauncher
from testing.runs import ROOT, RunHandle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N, EPOCHS = 2, 4


def wait(cond: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def start(run_id: str, runs: Path, *extra: str) -> subprocess.Popen[str]:
    argv = ["run", "--run-id", run_id, "--runs-dir", str(runs), "--json", "--workers", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "dssgd", *argv, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def aggregator_pid(run_dir: Path, not_: int | None = None) -> int | None:
    try:
        pid = json.loads((run_dir / "pids.json").read_text()).get("aggregator")
    except (OSError, ValueError):
        return None
    return pid if pid != not_ else None


@pytest.fixture
def run(conns: Connections) -> Iterator[str]:
    rid = f"drain-{uuid.uuid4().hex[:8]}"
    yield rid
    RunStore(redis_connect(conns.redis_url), rid).delete_run()
    conn = amqp_connect(conns.amqp_url, "dssgd-tests")
    delete_topology(conn.channel(), AmqpNames(rid))
    conn.close()


def test_a_run_drains_through_an_aggregator_killed_in_the_drain(
    run: str, tmp_path: Path, conns: Connections
) -> None:
    store = RunStore(redis_connect(conns.redis_url), run)
    run_dir = tmp_path / run
    # The aggregator freezes after its first apply; the participants finish meanwhile.
    proc = start(run, tmp_path, "--participants", str(N), "--epochs", str(EPOCHS))
    wait(lambda: int(store.r.get(store.keys.version) or 0) >= 1, "a first apply")
    first = aggregator_pid(run_dir)
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    wait(lambda: store.stop_reason(), "the drain")  # all finished: `dssgd run` stopped them
    assert len(store.finished()) == N
    assert int(store.r.get(store.keys.version) or 0) < N * EPOCHS  # a backlog to drain
    os.kill(first, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads(out)
    assert s["drained"] is True and s["updates_waiting"] == 0
    assert s["restarts"] == {"aggregator": 1}
    assert s["updates_applied"] == s["confirmed_updates"] == N * EPOCHS
    # Exactly once: every (participant, seq) of the run in the applied log, each one time.
    applied = Counter(tuple(row.split(":")[:2]) for row in store.applied_log())
    assert applied == Counter({(str(p), str(q)): 1 for p in range(N) for q in range(1, 1 + EPOCHS)})


def entry(argv: list[str]) -> int:
    """A service that cannot start: exit 2 (bad input) on every start."""
    return 2


def test_a_drain_that_cannot_finish_is_measured_and_says_how_to_finish(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    """Negative control of the drain: with an aggregator that goes FATAL, what waits is measured
    (the queue, the replay windows), not assumed, and the resume command is named."""
    h = make_run(participants=2)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        for _ in range(3):
            pub.publish(AmqpNames.routing_key(0), b"confirmed, never consumed")
    finally:
        pub.close()
    h.store.record_progress(0, epochs=3, seq=3)  # what participant 0 would have recorded
    sup = ForkLauncher(tmp_path, {"aggregator": ["x"]}, entry=entry, warm_up=lambda: None)
    sup.start()
    why = orchestrate._drain(sup, h.store, h.cfg)
    sup.shutdown()
    assert why == "the aggregator is FATAL (see logs/aggregator.log)"
    d = orchestrate._measure_drain(h.store, h.cfg, h.conns.amqp_url, why)
    assert not d.done and (d.confirmed, d.unapplied, d.queued) == (3, 3, 3)
    text = orchestrate._not_done_text(d, h.cfg.run_id)
    assert text.startswith("3 updates wait in the queue (3 confirmed ones not applied")
    assert f"dssgd run --run-id {h.cfg.run_id} --resume" in text
