"""A user's task file (only torch, outside the repository) with BatchNorm, through `dssgd run`.

The inputs lie far from zero, so a BatchNorm model evaluated with its initial running statistics
(mean 0, variance 1) is useless: the test has power only if the buffers really travel. The same
run with buffers kept local (`buffers = "local"`) is the negative control.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from dssgd.shared.config import Connections
from dssgd.shared.tasks import TaskContext, as_tensors, load_task
from dssgd.shared.training import LocalTrainer
from torch.utils.data import ConcatDataset

from testing.runs import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASK_FILE = '''
"""A BatchNorm MLP on synthetic data far from zero: imports only torch."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

DIM, CLASSES, CENTER = 20, 4, 40.0


def _data(seed, n):
    centers = 1.5 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = CENTER + centers[y] + 2.0 * torch.randn(n, DIM, generator=g)
    return TensorDataset(x, y)


class BatchNormTask:
    def build_model(self):
        return nn.Sequential(
            nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES)
        )

    def local_data(self, ctx):
        return _data(1000 + ctx.participant, 400)

    def test_data(self):
        return _data(7, 2000)


TASK = BatchNormTask()
'''


def write_task(tmp_path: Path) -> str:
    path = tmp_path / "bn_task.py"
    path.write_text(TASK_FILE)
    return f"{path}:TASK"


def dssgd_run(
    spec: str, tmp_path: Path, env: dict[str, str] | None = None, export: bool = False
) -> dict:  # type: ignore[type-arg]
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--task", spec]
    cmd += ["--participants", "4", "--epochs", "10", "--runs-dir", str(tmp_path), "--json"]
    try:
        res = subprocess.run(
            cmd,
            cwd=tmp_path,  # not the repository: the task file must not need it on the path
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)
        if export:
            summary["exported"] = export_and_reload(spec, run_id, tmp_path)
        return summary
    finally:
        subprocess.run([sys.executable, "-m", "dssgd", "delete", run_id], cwd=ROOT, timeout=60)


def export_and_reload(spec: str, run_id: str, tmp_path: Path) -> float:
    """`dssgd export`: the model's own state-dict names, buffers included; evaluates the same."""
    out = tmp_path / f"{run_id}.pt"
    res = subprocess.run(
        [sys.executable, "-m", "dssgd", "export", run_id, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    task = load_task(spec)
    model = task.build_model()
    state = torch.load(out, weights_only=True)
    assert list(state) == list(model.state_dict())  # "1.running_mean", "1.num_batches_tracked"…
    model.load_state_dict(state)
    assert float(state["1.running_mean"].mean()) != 0.0  # the statistics travelled
    if out.with_suffix(".safetensors").exists():
        from safetensors.torch import load_file

        assert set(load_file(str(out.with_suffix(".safetensors")))) == set(state)
    test = task.test_data()
    assert test is not None
    with torch.inference_mode():
        return task.metrics(model, test)["accuracy"]


def centralized(spec: str) -> float:
    """The same model, hyper-parameters and epochs, trained on the union of the four datasets."""
    task = load_task(spec)
    union = ConcatDataset([task.local_data(TaskContext(p, 4, 1)) for p in range(4)])
    x, y = as_tensors(union)
    model = task.build_model(1)
    trainer = LocalTrainer(model, x, y, lr=0.2, batch_size=32, seed=1, loss=task.loss)
    for _ in range(10):
        trainer.epoch()
    test = task.test_data()
    assert test is not None
    with torch.inference_mode():
        return task.metrics(model, test)["accuracy"]


def test_batchnorm_task_file_matches_centralized_and_needs_its_buffers(
    tmp_path: Path, conns: Connections
) -> None:
    spec = write_task(tmp_path)
    central = centralized(spec)
    shared = dssgd_run(spec, tmp_path, export=True)
    local = dssgd_run(spec, tmp_path, {"DSSGD_BUFFERS": "local"})
    print(
        f"centralized {central:.4f}, dssgd {shared['accuracy']:.4f}, "
        f"buffers unshared {local['accuracy']:.4f}"
    )
    assert central > 0.9
    # Asynchronous interleaving under a loaded CI machine moves the shared run by several
    # points (0.86 once against 0.94); the negative control below stays 0.1 further away.
    assert shared["accuracy"] >= central - 0.1, (shared, central)
    assert local["accuracy"] < central - 0.2, (local, central)  # the negative control
    assert shared["exported"] == pytest.approx(shared["accuracy"], abs=1e-6)
