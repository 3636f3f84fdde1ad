"""Redis durability that matches the ack: every acked update survives a Redis crash (AOF always)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.config import Connections

from testing.oracle import assert_exact, integer_update
from testing.runs import RunHandle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A Redis of our own, persisting with AOF and fsync on every write, on a free port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("private Redis did not start")

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    if r.proc and r.proc.poll() is None:
        r.crash()


def test_acked_updates_survive_a_redis_crash(
    private_redis: PrivateRedis, conns: Connections, tmp_path: Path
) -> None:
    c = Connections(amqp_url=conns.amqp_url, redis_url=private_redis.url)
    from dssgd.shared.config import RunConfig

    cfg = RunConfig(
        run_id=f"durable-{os.getpid()}", participants=2, theta_u=0.01, gamma=100.0, rule="sum"
    )
    h = RunHandle(c, cfg, zero_init=True)
    try:
        h.aggregator(log=tmp_path / "agg.log")
        rng = np.random.default_rng(11)
        updates = [integer_update(h, p, s, rng) for s in range(1, 101) for p in (0, 1)]
        pub = Publisher(c.amqp_url, h.names, app_id="test")
        try:
            for u in updates:
                pub.publish(AmqpNames.routing_key(u.participant), wire.encode(u))
        finally:
            pub.close()
        h.wait(lambda: h.version() == len(updates), what="every update acked")
        private_redis.crash()  # no shutdown, no final save: only what was fsynced survives
        private_redis.start()
        assert h.version() == len(updates)
        assert_exact(h, updates)
    finally:
        h.close()
