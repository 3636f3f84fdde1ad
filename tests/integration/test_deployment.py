"""The documented deployment, run as written, and the least-privilege rules it provisions."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from dssgd.shared.config import Connections
from dssgd.shared.keys import RUNS, Keys
from dssgd.shared.provision import Management, aggregator_acl, is_run_user, participant_acl

from testing.runs import ROOT

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def deploy_block() -> str:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    m = re.search(r"<!-- deploy-begin -->\s*```bash\n(.*?)```\s*<!-- deploy-end -->", text, re.S)
    assert m, "docs/OPERATIONS.md lost its deploy-begin/deploy-end block"
    return m.group(1)


def run_users(conns: Connections, run_id: str) -> tuple[list[str], list[str]]:
    mgmt = Management.from_amqp_url(conns.amqp_url)
    r = redis.Redis.from_url(conns.redis_url)
    broker = [u["name"] for u in mgmt.call("GET", "/api/users") if is_run_user(run_id, u["name"])]
    acl = [u.decode() for u in r.execute_command("ACL", "USERS") if is_run_user(run_id, u.decode())]
    return broker, acl


@pytest.mark.slow
def test_the_documented_deployment_runs_and_leaves_no_users(
    conns: Connections, tmp_path: Path
) -> None:
    run_id = f"dep-{uuid.uuid4().hex[:8]}"
    script = deploy_block().replace("r1", run_id)  # the only change: a run id of our own
    assert script.count("dssgd worker --credentials") == 3
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DSSGD_AMQP_URL": conns.amqp_url,
        "DSSGD_REDIS_URL": conns.redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    try:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the background services die with it on a timeout
        )
        try:
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert f"run {run_id} over: every participant finished (3)" in out, out[-4000:]
        assert "[finished: every participant finished]" in res.stdout, out[-4000:]
        assert f"deleted run {run_id}" in res.stdout
        assert "Traceback" not in out, out[-4000:]
        assert run_users(conns, run_id) == ([], [])
        r = redis.Redis.from_url(conns.redis_url)
        assert not list(r.scan_iter(match=f"dssgd:{{{run_id}}}:*"))
        assert not r.sismember(RUNS, run_id)
    finally:
        subprocess.run([BIN / "dssgd", "delete", run_id], env=env, capture_output=True, timeout=60)


# --- the ACL rules, on a private Redis with provision's exact rules ----------------------------


@pytest.fixture(scope="module")
def private_redis() -> Iterator[redis.Redis]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = 16200 + os.getpid() % 50
    tmp = tempfile.mkdtemp(prefix="dssgd-acl-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield r
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


RUN = "acl-run"


def _user(r: redis.Redis, name: str, rules: list[str]) -> redis.Redis:
    r.execute_command("ACL", "SETUSER", name, *rules)
    return redis.Redis(
        port=r.connection_pool.connection_kwargs["port"], username=name, password="pw"
    )


def _writes(key: str) -> list[tuple[str, ...]]:
    return [
        ("SET", key, "x"),
        ("DEL", key),
        ("HSET", key, "f", "1"),
        ("SADD", key, "1"),
        ("RPUSH", key, "1"),
        ("EXPIRE", key, "1"),
        ("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", key),
    ]


def test_a_participant_can_write_only_its_own_keys(private_redis: redis.Redis) -> None:
    k = Keys(RUN)
    p1 = _user(private_redis, f"dssgd-{RUN}-p1", participant_acl(RUN, 1, "pw"))
    others = [k.participant(0), k.lease(0), k.trace(0), k.wake(0)]
    others += [k.participant(2), k.lease(2), k.trace(2), k.wake(2)]
    shared = [k.config, k.w_chunk(0), k.shard(0).stat(0), k.version, k.dedup, k.counters, k.fence]
    shared += [k.metrics, k.layout, k.shard(0).summary, k.shard(1).w(9), k.shard(1).fence]
    shared += [k.applied_log, k.turn, k.stop, k.heartbeat_aggregator, RUNS]
    # The keys the old layout shared between participants: no one may write them now.
    shared += [k._k("finished"), k._k("active"), k._k("claims"), k._k("trace")]
    denied = []
    for key in others + shared:
        for cmd in _writes(key):
            with pytest.raises(redis.exceptions.NoPermissionError):
                p1.execute_command(*cmd)
            denied.append(cmd)
    assert len(denied) == 7 * len(others + shared)
    for cmd in (("FLUSHALL",), ("CLIENT", "KILL", "TYPE", "normal"), ("SCRIPT", "FLUSH")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            p1.execute_command(*cmd)
    # Negative control: its own keys are writable, with the same commands and through a script.
    p1.hset(k.participant(1), "finished", "1")
    p1.execute_command("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", k.lease(1))
    p1.rpush(k.trace(1), "d 1 1 0")
    p1.rpush(k.wake(1), "1")
    assert p1.get(k.w_chunk(0)) is None  # reads of the run work (absent here)


def test_the_aggregator_never_writes_participant_keys_or_the_run_list(
    private_redis: redis.Redis,
) -> None:
    k = Keys(RUN)
    agg = _user(private_redis, f"dssgd-{RUN}-aggregator", aggregator_acl(RUN, "pw"))
    for key in (k.participant(0), k.lease(0), k.trace(0), k.config, RUNS, "dssgd:{other}:w"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            agg.set(key, "x")
    agg.set(k.w_chunk(0), b"\0")  # negative control: what it does write
    agg.incr(k.fence)
    agg.rpush(k.wake(3), "1")
    agg.hgetall(k.participant(0))
