"""A right taken away mid-run ends the service at once with its cause; a dropped connection does
not (issue 18: a permanent error in a service must reach the user at once and stop the run)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dssgd.shared.config import Connections
from dssgd.shared.store import connect as redis_connect

from dssgd.admin import EXIT_DENIED
from testing.runs import ROOT, RunHandle


@pytest.fixture
def redis_user(conns: Connections) -> Iterator[tuple[str, str]]:
    """A throw-away ACL user of the shared Redis with every right; deleted afterwards."""
    r = redis_connect(conns.redis_url)
    name, password = f"dssgd-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    r.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    yield name, password
    r.acl_deluser(name)


def _with_user(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.rsplit('@', 1)[-1]}"


def _spawn(h: RunHandle, redis_url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**h.env, "DSSGD_REDIS_URL": redis_url}
    with log.open("ab") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "dssgd", *args, "--run-id", h.cfg.run_id],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    h.procs.append(p)
    return p


def test_revoked_rights_stop_worker_and_aggregator_a_dropped_connection_does_not(
    make_run: Callable[..., RunHandle],
    conns: Connections,
    redis_user: tuple[str, str],
    tmp_path: Path,
) -> None:
    h = make_run(participants=1, theta_u=0.01, epochs=0)
    url = _with_user(conns.redis_url, *redis_user)
    agg = _spawn(h, url, tmp_path / "agg.log", "aggregator", "--no-eval")
    worker = _spawn(h, url, tmp_path / "w.log", "worker", "--slot", "0/1", "--synthetic")
    h.wait(lambda: h.version() >= 5, timeout=120, what="5 updates applied")
    # Control: killing the user's connections is transient; both reconnect and go on.
    r = h.store.r
    r.execute_command("CLIENT", "KILL", "USER", redis_user[0])
    before = h.version()
    h.wait(lambda: h.version() >= before + 5, timeout=60, what="progress after CLIENT KILL")
    assert agg.poll() is None and worker.poll() is None
    # Rights taken away: retrying cannot help, so both end with EX_NOPERM and say why.
    r.execute_command("ACL", "SETUSER", redis_user[0], "resetkeys")
    t0 = time.monotonic()
    assert worker.wait(timeout=30) == EXIT_DENIED
    assert agg.wait(timeout=30) == EXIT_DENIED
    assert time.monotonic() - t0 < 30
    for name in ("w.log", "agg.log"):
        text = (tmp_path / name).read_text()
        assert "retrying cannot help" in text, text[-2000:]
        assert "Traceback" not in text, text[-2000:]
