"""A task without a test set is evaluated by its participants; your own loop through Client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from dssgd.shared.config import Connections
from dssgd.shared.errors import ConfigError
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tasks import load_task

from testing.runs import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NO_TEST_SET = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Blobs:  # no test_data at all: participants evaluate on held-out parts of their data
    def build_model(self):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def local_data(self, ctx):
        g = torch.Generator().manual_seed(100 + ctx.participant)
        centers = 2.0 * torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 3, (300,), generator=g)
        return TensorDataset(centers[y] + torch.randn(300, 8, generator=g), y)


TASK = Blobs()
'''


def dssgd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dssgd", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture
def spec(tmp_path: Path) -> str:
    (tmp_path / "blobs.py").write_text(NO_TEST_SET)
    return f"{tmp_path / 'blobs.py'}:TASK"


def test_without_a_test_set_participants_evaluate(
    spec: str, tmp_path: Path, conns: Connections
) -> None:
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    try:
        res = dssgd("run", "--run-id", run_id, "--task", spec, "--participants", "3",
                    "--epochs", "8", "--runs-dir", str(tmp_path), "--json")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)
        points = RunStore(redis_connect(conns.redis_url), run_id).metrics()
        assert points and all(p["source"] == "federated" for p in points), points
        assert points[-1]["reporting"] == 3
        # Chance is 1/3; an asynchronous 24-update run lands at 0.78-0.9 by timing alone.
        assert summary["accuracy"] > 0.7, summary
        status = dssgd("status", "--run-id", run_id)
        assert status.returncode == 0 and f"{points[-1]['accuracy']:.4f}" in status.stdout
    finally:
        dssgd("delete", run_id)


def test_own_loop_pull_train_push(spec: str, tmp_path: Path, conns: Connections) -> None:
    from dssgd.worker.client import Client

    run_id = f"test-{uuid.uuid4().hex[:8]}"
    agg = subprocess.Popen(
        [sys.executable, "-m", "dssgd", "aggregator", "--run-id", run_id, "--task", spec,
         "--participants", "2", "--epochs", "0"],
        cwd=ROOT, stdout=(tmp_path / "agg.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    store = RunStore(redis_connect(conns.redis_url), run_id)
    try:
        deadline = time.monotonic() + 60
        while store.model_record() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        task = load_task(spec)
        model = task.build_model()
        with pytest.raises(ConfigError, match=r"'0\.weight'"):
            Client(run_id, 1, torch.nn.Sequential(torch.nn.Linear(8, 4)), conns)
        client = Client(run_id, 0, model, conns)
        with pytest.raises(ConfigError, match="pull"):
            client.push(model)
        from dssgd.shared.tasks import TaskContext, as_tensors

        x, y = as_tensors(task.local_data(TaskContext(0, 2, 1)))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)  # not dssgd's SGD: the user's loop
        for _ in range(3):
            client.pull(model)
            for _ in range(20):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            client.push(model, float(loss.detach()))
        with pytest.raises(ConfigError, match="pull"):
            client.push(model)  # exactly once per pull
        client.close()
        while store.counters().get("applied", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.counters().get("applied", 0) == 3
        assert int(store.progress(0)["epochs"]) == 3
    finally:
        agg.terminate()
        agg.wait(timeout=60)
        dssgd("delete", run_id)
