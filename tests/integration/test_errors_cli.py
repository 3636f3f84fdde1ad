"""Every error class a person can make: one line, a meaningful exit code, no traceback, nothing
left half-created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from dssgd.shared.config import Connections
from dssgd.shared.keys import RUNS
from dssgd.shared.store import connect as redis_connect

from testing.runs import ROOT, RunHandle

pytestmark = pytest.mark.integration


def dssgd(*args: str, conns: Connections, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSSGD_AMQP_URL": conns.amqp_url, "DSSGD_REDIS_URL": conns.redis_url}
    return subprocess.run(
        [sys.executable, "-m", "dssgd", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == code, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def on_the_broker(conns: Connections, run_id: str) -> list[str]:
    """The run's queue and exchanges that exist on the broker (passive declares)."""
    import pika.exceptions as pex
    from dssgd.shared.amqp_names import AmqpNames
    from dssgd.shared.broker import connect as amqp_connect

    names, found = AmqpNames(run_id), []
    conn = amqp_connect(conns.amqp_url, "dssgd-tests")
    try:
        for kind, name in [("queue", names.queue), ("exchange", names.exchange),
                           ("exchange", names.dead_exchange)]:  # fmt: skip
            try:
                if kind == "queue":
                    conn.channel().queue_declare(name, passive=True)
                else:
                    conn.channel().exchange_declare(name, passive=True)
                found.append(name)
            except pex.ChannelClosedByBroker:
                pass
    finally:
        conn.close()
    return found


def test_an_unwritable_runs_dir_creates_nothing(conns: Connections) -> None:
    run_id = f"err-{uuid.uuid4().hex[:8]}"
    res = dssgd("run", "--run-id", run_id, "--runs-dir", "/proc/nope", conns=conns)
    one_line(res, 2, "/proc/nope", "--runs-dir")
    r = redis_connect(conns.redis_url)
    assert not r.sismember(RUNS, run_id)
    assert not list(r.scan_iter(match=f"dssgd:{{{run_id}}}:*"))
    assert not on_the_broker(conns, run_id)
    # ...so the same command with a good folder is not told the run already exists.


@pytest.mark.long  # several whole runs
def test_results_to_unwritable_paths_and_corrupt_files(
    make_run: Callable[..., RunHandle], conns: Connections, tmp_path: Path
) -> None:
    h = make_run(participants=2)
    rid = h.cfg.run_id
    one_line(dssgd("export", rid, "--out", "/proc/m.pt", conns=conns), 2, "/proc/m.pt")
    one_line(dssgd("export", rid, "--out", str(tmp_path), conns=conns), 2, "directory")
    h.store.push_metric({"time": 1.0, "version": 0, "applied": 0, "bytes": 0, "accuracy": 0.1})
    one_line(dssgd("plot", rid, "--out", "/proc/a.png", conns=conns), 2, "/proc/a.png")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not a state dict")
    one_line(dssgd("eval", rid, "--from-file", str(bad), conns=conns), 2, str(bad))
    one_line(dssgd("worker", "--credentials", str(bad), conns=conns), 2, str(bad))
    creds = tmp_path / "creds"
    fresh = f"err-{uuid.uuid4().hex[:8]}"
    res = dssgd("provision", fresh, "--participants", "2", "--out", "/proc/c", conns=conns)
    one_line(res, 2, "/proc/c")
    assert redis_connect(conns.redis_url).get(f"dssgd:{{{fresh}}}:config") is None
    assert dssgd("deprovision", fresh, conns=conns).returncode == 2  # no users were left
    # Negative control: a writable --out works.
    assert dssgd("export", rid, "--out", str(tmp_path / "m.pt"), conns=conns).returncode == 0
    assert not creds.exists()


def test_wrong_passwords_and_hosts_name_the_server(conns: Connections) -> None:
    bad_amqp = Connections(amqp_url="amqp://guest:wrong@127.0.0.1:5672/%2F")
    res = dssgd("worker", "--run-id", "x", "--amqp-url", bad_amqp.amqp_url, conns=conns)
    one_line(res, 77, "127.0.0.1:5672", "refused user 'guest'")
    res = dssgd("aggregator", "--run-id", "x", "--amqp-url", bad_amqp.amqp_url, conns=conns)
    one_line(res, 77, "127.0.0.1:5672")  # permanent: it ends instead of retrying forever
    wrong_redis = "redis://nobody:wrong@127.0.0.1:6379/0"
    one_line(dssgd("status", "--run-id", "x", "--redis-url", wrong_redis, conns=conns), 77)
    res = dssgd("worker", "--run-id", "x", "--redis-url", wrong_redis, conns=conns)
    one_line(res, 77, "127.0.0.1:6379", "refused user 'nobody'")
    res = dssgd(
        "worker", "--run-id", "x", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/", conns=conns
    )
    one_line(res, 69, "127.0.0.1:1", "unreachable")
    res = dssgd(
        "status", "--run-id", "x", "--redis-url", "redis://nohost.invalid:6379/0", conns=conns
    )
    assert res.returncode == 69 and "nohost.invalid:6379" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_runs_and_misspelled_toml(conns: Connections, tmp_path: Path) -> None:
    for cmd in (("status", "--run-id", "nope-x"), ("export", "nope-x"), ("delete", "nope-x")):
        one_line(dssgd(*cmd, conns=conns), 2, "nope-x", "does not exist")
    toml = tmp_path / "run.toml"
    toml.write_text("[rnu]\nepochs = 3\n")
    one_line(dssgd("run", "--config", str(toml), conns=conns), 2, "[rnu]", str(toml))
    toml.write_text("epochs = [\n")
    one_line(dssgd("run", "--config", str(toml), conns=conns), 2, "not valid TOML")


def test_resuming_a_run_that_does_not_exist_creates_nothing(
    conns: Connections, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dssgd.cli import main

    run_id = f"err-{uuid.uuid4().hex[:8]}"
    urls = ["--amqp-url", conns.amqp_url, "--redis-url", conns.redis_url]
    code = main(["run", "--run-id", run_id, "--resume", "--runs-dir", str(tmp_path), *urls])
    assert code == 2
    assert "does not exist, so there is nothing to resume" in capsys.readouterr().err
    r = redis_connect(conns.redis_url)
    assert not r.sismember(RUNS, run_id) and not (tmp_path / run_id).exists()
    assert not list(r.scan_iter(match=f"dssgd:{{{run_id}}}:*"))
    assert not on_the_broker(conns, run_id)


def test_a_worker_waiting_for_a_missing_run_says_so(conns: Connections, tmp_path: Path) -> None:
    env = {**os.environ, "DSSGD_AMQP_URL": conns.amqp_url, "DSSGD_REDIS_URL": conns.redis_url}
    log = tmp_path / "worker.err"
    want = "waiting up to 120 s for run nope-wait to be created"
    with log.open("w") as err_file:
        p = subprocess.Popen(
            [sys.executable, "-m", "dssgd", "worker", "--run-id", "nope-wait"],
            cwd=ROOT,
            env=env,
            stderr=err_file,
            text=True,
        )
        # Wait for the line rather than a fixed time: a loaded machine takes seconds to import.
        deadline = time.monotonic() + 60
        while want not in log.read_text() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    err = log.read_text()
    assert want in err, err


@pytest.mark.slow
def test_toml_run_options_and_resume_changes(conns: Connections, tmp_path: Path) -> None:
    run_id = f"toml-{uuid.uuid4().hex[:8]}"
    toml = tmp_path / "run.toml"
    toml.write_text("workers = 1\n[run]\nparticipants = 2\nepochs = 1\n")
    try:
        res = dssgd(
            "run",
            "--run-id",
            run_id,
            "--config",
            str(toml),
            "--runs-dir",
            str(tmp_path),
            conns=conns,
            timeout=180,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "1 worker processes" in res.stderr
        res = dssgd(
            "run",
            "--run-id",
            run_id,
            "--resume",
            "--epochs",
            "35",
            "--runs-dir",
            str(tmp_path),
            conns=conns,
        )
        one_line(res, 2, "epochs (stored 1, given 35)")
    finally:
        dssgd("delete", run_id, conns=conns)
