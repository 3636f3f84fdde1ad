"""Operating a run: status, metrics, plots, export, graceful stops, anonymous scaling, budgets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from dssgd.shared.data import load_mnist, shard_indices
from dssgd.shared.models import build_model
from prometheus_client.parser import text_string_to_metric_families

from testing.runs import ROOT, RunHandle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def dssgd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dssgd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_status_metrics_plot_export_eval(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = make_run(participants=4, epochs=6, eval_interval=0.3)
    # --keep-serving: by default a standalone aggregator exits once the run is over.
    h.spawn("aggregator", "--metrics-port", "0", "--keep-serving", log=tmp_path / "agg.log")
    workers = [h.spawn("worker", "--slot", f"{i}/2", log=tmp_path / f"w{i}.log") for i in (0, 1)]
    for w in workers:
        assert w.wait(timeout=120) == 0
    h.wait(lambda: h.version() == 24, what="all updates")
    h.wait(
        lambda: bool(h.store.metrics()) and h.store.metrics()[-1]["version"] == 24,
        what="an evaluation of the final version",
    )
    status = json.loads(dssgd("status", "--run-id", h.cfg.run_id, "--json", env=h.env).stdout)
    assert status["version"] == 24 and status["counters"]["applied"] == 24
    assert [p["epochs"] for p in status["participants"]] == [6, 6, 6, 6]
    assert all(p["state"] == "finished" for p in status["participants"])
    assert status["queues"] == {"updates": 0, "dead_letters": 0}
    acc = status["accuracy"]
    assert acc > 0.8
    # Prometheus endpoint, parsed with the client library's own parser.
    url = status["aggregator"]["metrics_url"]
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["dssgd_updates_applied_total"].value == 24
    assert samples["dssgd_global_version"].value == 24
    assert samples["dssgd_test_accuracy"].value == pytest.approx(acc)
    # The picture.
    png = tmp_path / "acc.png"
    assert dssgd("plot", h.cfg.run_id, "--out", str(png), env=h.env).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Export → load into the plain model class → same accuracy as eval.
    model_file = tmp_path / "model.pt"
    assert dssgd("export", h.cfg.run_id, "--out", str(model_file), env=h.env).returncode == 0
    model = build_model("mlp")
    model.load_state_dict(torch.load(model_file, weights_only=True))
    live = json.loads(dssgd("eval", h.cfg.run_id, "--json", env=h.env).stdout)
    from_file = json.loads(
        dssgd("eval", h.cfg.run_id, "--from-file", str(model_file), "--json", env=h.env).stdout
    )
    assert live["accuracy"] == from_file["accuracy"]
    assert live["accuracy"] == pytest.approx(acc, abs=1e-9)


def test_sigterm_is_graceful_and_the_run_completes(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = make_run(participants=2, epochs=40, eval_interval=60)
    agg = h.spawn("aggregator", "--no-eval", log=tmp_path / "agg.log")
    worker = h.spawn("worker", "--participants", "0,1", log=tmp_path / "w.log")
    h.wait(lambda: h.version() >= 10, timeout=60, what="some progress")
    for proc in (agg, worker):
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 10
    confirmed = {p: int(h.store.progress(p).get("seq", 0)) for p in (0, 1)}
    h.spawn("aggregator", "--no-eval", log=tmp_path / "agg.log")
    # Nothing lost: every confirmed update gets applied by the restarted aggregator.
    h.wait(
        lambda: all(h.store.applied_high(p) >= s for p, s in confirmed.items()),
        what="confirmed updates applied after restart",
    )
    worker = h.spawn("worker", "--participants", "0,1", log=tmp_path / "w.log")
    assert worker.wait(timeout=120) == 0
    h.wait(lambda: h.version() == 80, timeout=30, what="the whole run")
    assert h.store.counters().get("rejected", 0) == 0


def test_anonymous_workers_claim_distinct_identities(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    h = make_run(participants=3, epochs=2, eval_interval=60)
    h.aggregator()
    workers = [h.spawn("worker", "--claim", "1", log=tmp_path / f"w{i}.log") for i in range(3)]
    for w in workers:
        assert w.wait(timeout=120) == 0
    progress = h.store.all_progress(3)
    assert sorted(progress) == [0, 1, 2]
    assert all(int(p["epochs"]) == 2 for p in progress.values())
    labels = load_mnist().train_y
    shards = [set(shard_indices(labels, p, 3, h.cfg.shard_size, h.cfg.seed)) for p in range(3)]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    # A fourth anonymous worker is told the run is full (a clear message, exit code 2).
    extra = h.spawn("worker", "--claim", "1", log=tmp_path / "w3.log")
    assert extra.wait(timeout=60) == 2
    assert "already has all 3 participants" in (tmp_path / "w3.log").read_text()


def test_participant_over_privacy_budget_stops(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    # ε/c = 10 with c = ⌈0.1·109,386⌉ = 10,939 → 109,390 per epoch (basic), 102,423 (PLD); a
    # budget of 300,000 allows 2.
    h = make_run(
        participants=1, epochs=10, dp_eps_per_value=10.0, dp_budget=300_000.0, eval_interval=60
    )
    h.aggregator()
    assert h.spawn("worker", "--participants", "0", log=tmp_path / "w.log").wait(timeout=120) == 0
    progress = h.store.progress(0)
    assert progress["epochs"] == "2"
    # the tightest valid bound (PLD composition), below basic composition's 2 × 109,390
    from dssgd.shared.accounting import svt_pld_epsilon

    assert float(progress["dp_total"]) == pytest.approx(svt_pld_epsilon(109_390.0, 10_939, 2, 1e-5))
    assert progress["dp_bound"] == "pld" and float(progress["dp_total"]) < 2 * 109_390
    assert "privacy budget exhausted" in progress["stopped"]
    h.wait(lambda: h.version() == 2, what="the two private updates")
    assert np.isfinite(h.store.read_params()[1]).all()


def test_the_management_console_names_each_connection_s_run(
    make_run: Callable[..., RunHandle],
) -> None:
    """Several runs on one broker: the console's connection list says which connection is whose
    (the worker's publisher and the aggregator's consumer carry the run id)."""
    from dssgd.shared.broker import BrokerError, Consumer, Publisher
    from dssgd.shared.provision import Management

    h = make_run(participants=1)
    pub = Publisher(h.conns.amqp_url, h.names, app_id="0")
    consumer = Consumer(h.conns.amqp_url, h.names, "aggregator@test", 10, h.cfg.queue_max_length)
    try:
        pub.publish("upd.0", b"x", headers={"participant": 0, "seq": 1})  # connects
        api = Management.from_amqp_url(h.conns.amqp_url)
        names: set[str] = set()
        deadline = time.monotonic() + 10  # the console's statistics lag a few seconds
        while time.monotonic() < deadline and len(names) < 2:
            try:
                conns = api.call("GET", "/api/connections?columns=client_properties")
            except BrokerError as exc:
                pytest.skip(f"no management API here: {exc}")
            names = {
                c["client_properties"].get("connection_name", "")
                for c in conns
                if h.cfg.run_id in c["client_properties"].get("connection_name", "")
            }
            time.sleep(0.5)
        assert f"dssgd-worker {h.cfg.run_id} [0]" in names, names
        assert f"aggregator@test {h.cfg.run_id}" in names, names
    finally:
        pub.close()
        consumer.close()
