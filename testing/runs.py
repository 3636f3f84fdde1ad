"""Test scaffolding shared by tests/ and bench/: throw-away runs on the real servers.

Never imported by production code (tests/unit/test_structure.py checks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.broker import declare_topology, delete_topology
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import DssgdError
from dssgd.shared.models import initial_parameters
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

ROOT = Path(__file__).resolve().parent.parent


class RunHandle:
    """A throw-away run: its config in Redis, its topology in RabbitMQ, removed afterwards."""

    def __init__(self, conns: Connections, cfg: RunConfig, zero_init: bool = False) -> None:
        self.conns = conns
        self.cfg = cfg
        self.names = AmqpNames(cfg.run_id)
        self.store = RunStore(redis_connect(conns.redis_url), cfg.run_id)
        self.store.create_config(cfg)
        self.init = initial_parameters(cfg.model, cfg.seed)
        if zero_init:
            # Integer-valued start: sums of integer updates stay exact in float32 (the oracle).
            self.init = np.zeros_like(self.init)
        self.store.init_params(self.init, cfg.shards)
        conn = amqp_connect(conns.amqp_url, "dssgd-tests")
        declare_topology(conn.channel(), self.names, cfg.queue_max_length, cfg.queue_replicas)
        conn.close()
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DSSGD_AMQP_URL": self.conns.amqp_url,
            "DSSGD_REDIS_URL": self.conns.redis_url,
            "PYTHONUNBUFFERED": "1",
        }

    def spawn(
        self, module: str, *args: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = log.open("ab") if log else subprocess.DEVNULL
        p = subprocess.Popen(
            [sys.executable, "-m", f"dssgd.{module}", "--run-id", self.cfg.run_id, *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(p)
        return p

    def aggregator(
        self, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.spawn("aggregator", "--no-eval", log=log, env=env)

    def wait(self, cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")

    def version(self) -> int:
        return int(self.store.r.get(self.store.keys.version) or 0)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        try:
            self.store.delete_run()
            conn = amqp_connect(self.conns.amqp_url, "dssgd-tests")
            delete_topology(conn.channel(), self.names)
            conn.close()
        except DssgdError:
            pass
