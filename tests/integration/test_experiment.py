"""The experiment runner end to end on its smallest preset (baselines + DSSGD + DP point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing.runs import ROOT

# long: several whole runs; `dssgd experiment` is also run by bench/ (docs/RESULTS.md)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]


def test_smoke_preset_writes_results_and_plots(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dssgd",
            "experiment",
            "paper",
            "--preset",
            "smoke",
            "--out",
            str(tmp_path),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| centralized" in text and "| standalone" in text and "ε/c = 10.0" in text
    assert "0.991" in text and "0.939" in text  # the paper's figures sit beside ours
    for name in ("results-smoke-epochs.png", "results-smoke-dp.png"):
        assert (tmp_path / "img" / name).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results-smoke.json").read_text())
    assert 0 < data["points"][0]["accuracy"] <= 1
    assert data["dp_points"][0]["eps"] == 10.0
