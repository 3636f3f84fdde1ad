"""One identity registry: a participant id is hosted by at most one live process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from dssgd.shared.config import Connections
from dssgd.shared.errors import ConfigError
from dssgd.worker.service import compact_ids

from testing.runs import ROOT, RunHandle

pytestmark = pytest.mark.integration
RUN = [sys.executable, "-m", "dssgd", "run"]
SMALL = ["--participants", "4", "--epochs", "0", "--time-limit", "300"]  # ended by SIGINT
CTL = [sys.executable, "-m", "supervisor.supervisorctl"]


def test_claim_after_slot_never_takes_a_slotted_id(make_run: Callable[..., RunHandle]) -> None:
    h = make_run(participants=4)
    h.store.acquire("slot-0-of-2", [0, 2])
    assert h.store.claim("claimer", 1) == [1]
    assert h.store.claim("claimer-2", 1) == [3]
    with pytest.raises(ConfigError, match="already has all 4 participants taken: 0 free"):
        h.store.claim("claimer-3", 1)
    # Mixing names and slots the other way round is refused too, naming the holder.
    with pytest.raises(ConfigError, match="participant 1 is hosted by claimer"):
        h.store.acquire("slot-1-of-3", [1])


def test_racing_claims_hand_out_each_id_once(make_run: Callable[..., RunHandle]) -> None:
    h = make_run(participants=12)
    got: list[int] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        try:
            ids = h.store.claim(f"racer-{i}", 1)
        except ConfigError as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            got.extend(ids)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(12))  # every id once, none twice
    assert len(errors) == 4


def test_a_restarted_owner_gets_its_ids_back_and_lapsed_ones_are_taken_over(
    make_run: Callable[..., RunHandle],
) -> None:
    h = make_run(participants=3)
    first = h.store.claim("w-a", 2, ttl=0.5)
    assert h.store.claim("w-a", 2, ttl=0.5) == first  # a restart with the same id: same ids
    with pytest.raises(ConfigError, match="is hosted by w-a"):
        h.store.acquire("w-b", first)
    time.sleep(0.7)  # w-a stopped renewing: its leases lapse
    assert h.store.renew("w-a", first) == []  # still its own (nobody took them)
    h.store.release("w-a", first)
    h.store.acquire("w-b", first)  # released (or lapsed): another worker may take over
    assert h.store.renew("w-a", first) == first  # and the old owner learns it lost them


def test_app_id_stays_short_for_many_participants() -> None:
    assert compact_ids([0, 1, 2, 5, 7, 8, 9]) == "0-2,5,7-9"
    assert compact_ids(list(range(300))) == "0-299"
    spread = compact_ids(list(range(0, 900, 3)))
    assert len(spread.encode()) <= 255 and spread.endswith("more")


def dssgd(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dssgd", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_three_hundred_participants_in_one_worker_publish(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = make_run(zero_init=True, participants=300, epochs=1, gamma=100.0, rule="sum")
    h.aggregator(log=tmp_path / "agg.log")
    w = h.spawn("worker", "--slot", "0/1", "--synthetic", log=tmp_path / "w.log")
    h.wait(lambda: h.version() >= 300, timeout=120, what="300 updates applied")
    assert w.wait(timeout=60) == 0
    assert "0-299" in (tmp_path / "w.log").read_text()


@pytest.mark.slow
@pytest.mark.long  # three workers racing for leases; the claim script is also tested alone
def test_a_worker_joining_a_run_never_hosts_a_participant_twice(
    conns: Connections, tmp_path: Path
) -> None:
    run_id = f"join-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DSSGD_AMQP_URL": conns.amqp_url, "DSSGD_REDIS_URL": conns.redis_url}
    run = subprocess.Popen(
        [*RUN, "--run-id", run_id, "--runs-dir", str(tmp_path), *SMALL, "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        log = tmp_path / run_id / "logs" / "worker-0.log"
        deadline = time.monotonic() + 60
        while "hosting participants" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the run's worker never started"
            time.sleep(0.2)
        for extra in (["--claim", "1"], ["--slot", "1/3"], ["--participants", "0"]):
            res = dssgd("worker", "--run-id", run_id, *extra, env=env)
            assert res.returncode == 2, res.stderr[-2000:]
            assert "Traceback" not in res.stderr
            assert "hosted by" in res.stderr or "0 free" in res.stderr, res.stderr[-500:]
        # --resume of the live run is refused, and nothing of it is disturbed.
        res = dssgd("run", "--run-id", run_id, "--resume", "--runs-dir", str(tmp_path), env=env)
        assert res.returncode == 2 and "is still running" in res.stderr, res.stderr[-2000:]
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=90)
        dssgd("delete", run_id, env=env)


@pytest.mark.slow
# supervisord's variant is long (a supervisord and fresh interpreters); the fork one stays.
@pytest.mark.parametrize("launcher", ["fork", pytest.param("supervisor", marks=pytest.mark.long)])
def test_a_killed_worker_comes_back_with_its_own_participants(
    launcher: str, conns: Connections, tmp_path: Path
) -> None:
    run_id = f"restart-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DSSGD_AMQP_URL": conns.amqp_url, "DSSGD_REDIS_URL": conns.redis_url}
    run = subprocess.Popen(
        [
            *RUN,
            "--run-id",
            run_id,
            "--runs-dir",
            str(tmp_path),
            *SMALL,
            "--workers",
            "2",
            "--launcher",
            launcher,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = tmp_path / run_id / "logs"
    try:

        def hosting() -> list[str]:
            text = (logs / "worker-0.log").read_text() if (logs / "worker-0.log").exists() else ""
            return [line for line in text.splitlines() if "hosting participants" in line]

        deadline = time.monotonic() + 60
        while not hosting():
            assert time.monotonic() < deadline, "worker-0 never started"
            time.sleep(0.2)
        pid = _worker_pid(tmp_path / run_id, launcher)
        os.kill(pid, signal.SIGKILL)  # a crash: no lease released, nothing cleaned up
        deadline = time.monotonic() + 40
        while len(hosting()) < 2:
            assert time.monotonic() < deadline, (logs / "worker-0.log").read_text()[-2000:]
            time.sleep(0.2)
        first, second = hosting()[:2]
        assert "participants [0, 2]" in first and "participants [0, 2]" in second
        assert "hosted by" not in (logs / "worker-0.log").read_text()
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=90)
        dssgd("delete", run_id, env=env)


def _worker_pid(run_dir: Path, launcher: str) -> int:
    if launcher == "fork":
        return int(json.loads((run_dir / "pids.json").read_text())["worker:worker-0"])
    out = subprocess.run(
        [*CTL, "-c", str(run_dir / "supervisord.conf"), "pid", "worker:worker-0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout.strip())
