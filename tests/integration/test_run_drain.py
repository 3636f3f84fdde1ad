"""`dssgd run` ends only when every confirmed update is applied, and says so when it cannot.

The aggregator is frozen (SIGSTOP) while the participants finish, so the drain starts with a
backlog; then it is killed during the drain. Run 1 cannot restart it (its configuration is
unreadable, exit 2: FATAL) and must exit non-zero naming what waits and `--resume`; run 2, the
`--resume`, has its aggregator killed during its own drain, restarted by the launcher, and ends
with every confirmed update applied exactly once.
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
from dssgd.shared.config import Connections
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

from testing.runs import ROOT

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
    subprocess.run([sys.executable, "-m", "dssgd", "delete", rid], cwd=ROOT, capture_output=True)


def test_a_run_drains_through_an_aggregator_killed_in_the_drain(
    run: str, tmp_path: Path, conns: Connections
) -> None:
    store = RunStore(redis_connect(conns.redis_url), run)
    run_dir = tmp_path / run

    # Run 1: the aggregator freezes after its first apply; the participants finish meanwhile.
    proc = start(run, tmp_path, "--participants", str(N), "--epochs", str(EPOCHS))
    wait(lambda: int(store.r.get(store.keys.version) or 0) >= 1, "a first apply")
    first = aggregator_pid(run_dir)
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    wait(lambda: len(store.finished()) == N, "every participant finished")
    assert int(store.r.get(store.keys.version) or 0) < N * EPOCHS  # a backlog to drain
    # ... and cannot come back: its restart finds an unreadable configuration (exit 2: FATAL).
    config = store.r.get(store.keys.config)
    store.r.set(store.keys.config, b"{not json")
    os.kill(first, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    store.r.set(store.keys.config, config)
    assert proc.returncode == 75, err[-3000:]
    s1 = json.loads(out)
    version = int(store.r.get(store.keys.version) or 0)
    assert s1["drained"] is False and s1["confirmed_updates"] == N * EPOCHS
    assert s1["updates_waiting"] == N * EPOCHS - version  # measured: what the queue holds
    assert f"dssgd run --run-id {run} --resume" in s1["not_done"]
    assert f"{s1['updates_waiting']} updates wait in the queue" in err

    # Run 2, the resume: its aggregator is frozen before it consumes, then killed in the drain.
    store.r.delete(store.keys.heartbeat_aggregator)  # the killed one's lingers up to 15 s
    (run_dir / "pids.json").unlink()
    proc = start(run, tmp_path, "--resume")
    wait(lambda: aggregator_pid(run_dir, not_=first), "the resumed aggregator")
    second = aggregator_pid(run_dir)
    assert second is not None
    os.kill(second, signal.SIGSTOP)
    wait(lambda: store.stop_reason(), "the drain")  # `dssgd run` stopped the workers
    assert int(store.r.get(store.keys.version) or 0) == version  # nothing applied yet
    os.kill(second, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    s2 = json.loads(out)
    assert s2["drained"] is True and s2["updates_waiting"] == 0
    assert s2["restarts"] == {"aggregator": 1}
    assert s2["updates_applied"] == s2["confirmed_updates"] == N * EPOCHS
    # Exactly once: every (participant, seq) of the run in the applied log, each one time.
    applied = Counter(tuple(row.split(":")[:2]) for row in store.applied_log())
    assert applied == Counter({(str(p), str(q)): 1 for p in range(N) for q in range(1, 1 + EPOCHS)})
