"""Deployment with local data: an aggregator and three workers as separate processes, each worker
reading its own folder of CSV files (the breast-cancer task), and a fourth worker whose model
differs, refused with the name of the first tensor that differs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dssgd.shared.builtin_tasks import write_csv_parts
from dssgd.shared.config import Connections
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

from testing.runs import ROOT

pytest.importorskip("sklearn")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

OTHER_MODEL = """
from torch import nn
from dssgd.shared.builtin_tasks import BreastCancerTask


class Narrower(BreastCancerTask):
    def build_model(self):
        return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


TASK = Narrower()
"""


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dssgd", *args],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_three_workers_with_their_own_csv_folders_and_a_refused_fourth(
    tmp_path: Path, conns: Connections
) -> None:
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    folders = write_csv_parts(tmp_path / "hospitals", 3)
    other = tmp_path / "other_task.py"
    other.write_text(OTHER_MODEL)
    store = RunStore(redis_connect(conns.redis_url), run_id)
    agg = start(
        "aggregator",
        "--run-id",
        run_id,
        "--task",
        "breast-cancer",
        "--participants",
        "3",
        "--epochs",
        "8",
        "--lr",
        "0.1",
        log=tmp_path / "aggregator.log",
    )
    workers = []
    try:
        for i, folder in enumerate(folders):
            workers.append(
                start(
                    "worker",
                    "--run-id",
                    run_id,
                    "--participants",
                    str(i),
                    "--data",
                    str(folder),
                    log=tmp_path / f"worker-{i}.log",
                )
            )
        wait_until = time.monotonic() + 120
        while store.model_record() is None and time.monotonic() < wait_until:
            time.sleep(0.2)  # the run exists: the refusal, not the wait for the run, is tested
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "dssgd",
                "worker",
                "--run-id",
                run_id,
                "--task",
                f"{other}:TASK",
                "--data",
                str(folders[0]),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert refused.returncode == 2, refused.stderr
        # One line for the user (log lines, if any, carry a timestamp and a level).
        lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("dssgd:")]
        assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "'0.weight'" in lines[0] and "differs" in lines[0], lines[0]
        for w in workers:
            assert w.wait(timeout=240) == 0
        deadline = time.monotonic() + 60
        while store.counters().get("applied", 0) < 24 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.counters().get("applied", 0) == 24
        for i, folder in enumerate(folders):
            assert int(store.progress(i)["epochs"]) == 8
            log = (tmp_path / f"worker-{i}.log").read_text()
            assert f"participant {i}: 151 local examples from {folder}" in log, log[-2000:]
        print(lines[0])
    finally:
        for p in [*workers, agg]:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "dssgd", "delete", run_id], cwd=ROOT, timeout=60)
