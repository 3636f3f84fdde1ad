"""Whole runs through `dssgd run` (both launchers, real RabbitMQ and Redis, real MNIST)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dssgd.shared.config import Connections
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

from testing.runs import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def dssgd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dssgd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def run_id(conns: Connections, tmp_path: Path):  # type: ignore[no-untyped-def]
    rid = f"e2e-{uuid.uuid4().hex[:8]}"
    yield rid
    dssgd("delete", rid)


def run_json(run_id: str, tmp_path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    res = dssgd("run", "--run-id", run_id, "--runs-dir", str(tmp_path), "--json", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_default_run_reaches_target_accuracy(run_id: str, tmp_path: Path) -> None:
    summary = run_json(run_id, tmp_path)
    assert summary["participants"] == 10 and summary["order"] == "async"
    assert summary["theta_u"] == 0.1 and summary["model"] == "mlp"
    assert summary["accuracy"] >= 0.93, summary
    assert summary["wall_seconds"] < 180, summary
    assert summary["updates_applied"] == summary["epochs_total"] == 300
    # Sparse on the wire: θu = 0.1 costs well under a quarter of the dense update.
    assert summary["bytes_up_per_update"] < 0.25 * summary["dense_bytes_per_update"]
    logs = tmp_path / run_id / "logs"
    assert {p.name for p in logs.iterdir()} == {"aggregator.log", "worker-0.log", "worker-1.log"}
    assert "hosting participants" in (logs / "worker-0.log").read_text()


def _intervals(store: RunStore) -> list[tuple[float, float, int, int]]:
    downloads = {(pid, seq): t for ev, pid, seq, t in store.read_trace() if ev == "d"}
    out = []
    for row in store.applied_log():
        pid, seq, _version, _stale, t = row.split(":", 4)
        key = (int(pid), int(seq))
        out.append((downloads[key], float(t), *key))
    return sorted(out)


@pytest.mark.parametrize("order", ["round-robin", "random"])
def test_ordered_modes_hold_the_turn(
    order: str, run_id: str, tmp_path: Path, conns: Connections
) -> None:
    # Round robin runs under supervisord, so that launcher is covered end to end too.
    launcher = "supervisor" if order == "round-robin" else "fork"
    summary = run_json(
        run_id,
        tmp_path,
        *("--order", order, "--epochs", "4", "--participants", "5", "--launcher", launcher),
    )
    assert (tmp_path / run_id / "supervisord.conf").is_file() == (launcher == "supervisor")
    assert summary["updates_applied"] == 20
    assert summary["mean_staleness"] == 0
    store = RunStore(redis_connect(conns.redis_url), run_id)
    intervals = _intervals(store)
    assert len(intervals) == 20
    for (d1, a1, *who1), (d2, _a2, *who2) in itertools.pairwise(intervals):
        assert a1 <= d2, f"{who1} applied at {a1} after {who2} downloaded at {d2}"
        assert d1 <= a1
    if order == "round-robin":
        # The first turn waits for all five; then the turn goes round them in order.
        assert [pid for _, _, pid, _ in intervals] == [0, 1, 2, 3, 4] * 4


def test_ctrl_c_stops_the_forked_services_in_order_and_loses_nothing(
    run_id: str, tmp_path: Path, conns: Connections
) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dssgd",
            "run",
            "--run-id",
            run_id,
            "--runs-dir",
            str(tmp_path),
            "--json",
            "--epochs",
            "400",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    store = RunStore(redis_connect(conns.redis_url), run_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and int(store.r.get(store.keys.version) or 0) < 30:
        time.sleep(0.1)
    pids = json.loads((tmp_path / run_id / "pids.json").read_text())
    assert set(pids) == {"aggregator", "worker:worker-0", "worker:worker-1"}
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["stop_reason"] == "interrupted"
    assert summary["epochs_total"] < 4000
    # Workers stopped first, then the aggregator applied every confirmed update.
    progress = store.all_progress(10)
    assert all(store.applied_high(p) == int(v.get("seq", 0)) for p, v in progress.items())
    assert summary["updates_applied"] == sum(int(v.get("seq", 0)) for v in progress.values())
    for pid in pids.values():  # nothing outlives `dssgd run`
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_f16_run_at_lr_001_applies_every_update(run_id: str, tmp_path: Path) -> None:
    # γ = lr / 4 = 0.0025 is not a float16 number: round to nearest used to land above it and
    # the aggregator refused every update (issue 20, finding 3).
    summary = run_json(
        run_id,
        tmp_path,
        "--value-coding",
        "f16",
        "--lr",
        "0.01",
        "--participants",
        "3",
        "--epochs",
        "2",
    )
    assert summary["updates_rejected"] == 0, summary
    assert summary["updates_applied"] == summary["epochs_total"] == 6
