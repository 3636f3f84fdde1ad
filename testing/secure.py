"""Scaffolding of the secure tests and benches: private Redis servers, two share servers, a
sender of secret-shared updates, and the quantized plaintext reference.

Private servers listen on the secure helper's port range (17000-17099) and are stopped by pid.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import redis
from dssgd.aggregator.share_batch import ShareState, admit, apply_stream, initial_state
from dssgd.aggregator.share_server import CRASH_ENV, ShareServer, ShareServerSettings
from dssgd.shared import secure
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.keys import ShareKeys
from dssgd.shared.lifecycle import StopFlag
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.stream import StreamDelivery, delete_secure_topology, ensure_secure_topology
from dssgd.shared.tasks import load_task
from dssgd.worker.secure_send import SecureChannel, ShareView

PORT_RANGE = range(17000, 17100)


class RedisServer:
    """A throw-away redis-server on a free port of our range, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="dssgd-redis-")
        self.port = port or _free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    start = PORT_RANGE.start + (os.getpid() % 50)
    for port in [*range(start, PORT_RANGE.stop), *range(PORT_RANGE.start, start)]:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 17000-17099")


@dataclass
class Sent:
    offset: int
    body: bytes
    participant: int
    seq: int
    values: np.ndarray


@dataclass
class SecureRig:
    """A secure run on the real RabbitMQ and coordination Redis, its servers' Redis private."""

    conns: Connections
    cfg: RunConfig
    urls: tuple[str, str]
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = AmqpNames(self.cfg.run_id)
        self.store = RunStore(redis_connect(self.conns.redis_url), self.cfg.run_id)
        self.store.create_config(self.cfg)
        ensure_secure_topology(self.conns.amqp_url, self.names)
        self.task = load_task(self.cfg.task)
        self.n = self.task.layout.n
        self.w0 = self.task.initial_state(self.cfg.seed)
        self.threads: dict[str, tuple[threading.Thread, StopFlag]] = {}
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.pub: Publisher | None = None
        self.channel: SecureChannel | None = None
        self.views = [
            ShareView(redis_connect(u), self.cfg.run_id, r)
            for u, r in zip(self.urls, secure.ROLES, strict=True)
        ]

    # --- servers ---------------------------------------------------------------------------

    def settings(self, role: str, **kw: object) -> ShareServerSettings:
        i = secure.ROLES.index(role)
        return ShareServerSettings(
            run_id=self.cfg.run_id,
            role=role,
            share_redis_url=self.urls[i],
            connections=self.conns,
            peer_offset_url=self.urls[1 - i],
            **kw,  # type: ignore[arg-type]
        )

    def start_thread(self, role: str, **kw: object) -> None:
        stop = StopFlag()
        server = ShareServer(self.settings(role, **kw), stop)
        t = threading.Thread(target=server.run, name=f"share-{role}", daemon=True)
        t.start()
        self.threads[role] = (t, stop)

    def start_process(self, role: str, crash: str = "", max_batch: int = 4) -> None:
        """The server in a child forked from this (warm) process, so a SIGKILL of it leaves the
        test alive; ``crash`` is the fault injection point (share_server.CRASH_ENV)."""
        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(
            target=_serve, args=(self.settings(role, max_batch=max_batch), crash), daemon=True
        )
        p.start()
        self.procs[role] = p

    def stop_servers(self) -> None:
        for t, stop in self.threads.values():
            stop.set("test over")
            t.join(10)
        self.threads.clear()
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
            p.join(10)
        self.procs.clear()

    # --- participants ------------------------------------------------------------------------

    def connect_sender(self) -> SecureChannel:
        if self.channel is None:
            self.channel = SecureChannel(self.cfg, self.store, self.w0)
            self.pub = Publisher(self.conns.amqp_url, self.names, app_id="secure-tests")
        return self.channel

    def send(self, pid: int, seq: int, k: int, rng: np.random.Generator, base: int = 0) -> Sent:
        """A random clipped update of k entries from ``pid`` (values within ±γ)."""
        ch = self.connect_sender()
        gamma = self.cfg.effective_gamma
        idx = np.sort(rng.choice(self.n, size=k, replace=False)).astype(np.int64)
        vals = rng.uniform(-gamma, gamma, size=k).astype(np.float32)
        body = ch.encode(pid, seq, base, self.n, idx, vals)
        return self.publish(body, pid, seq, vals)

    def publish(self, body: bytes, pid: int, seq: int, vals: np.ndarray) -> Sent:
        assert self.pub is not None
        self.pub.publish(AmqpNames.routing_key(pid), body, exchange=self.names.secure_exchange)
        s = Sent(len(self.sent), body, pid, seq, vals)
        self.sent.append(s)
        return s

    def offsets(self) -> tuple[int, int]:
        return self.views[0].peek()[0], self.views[1].peek()[0]

    def wait_applied(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = len(self.sent) - 1
        while self.offsets() != (last, last):
            if time.monotonic() > deadline:
                raise AssertionError(f"servers at {self.offsets()}, not both at {last}")
            time.sleep(0.05)

    # --- the quantized plaintext reference ----------------------------------------------------

    def reference(self, every: bool = False) -> tuple[ShareState, dict[int, bytes]]:
        """The plaintext ring state after every message sent (same pure apply, plaintext
        opener): (final state, offset → state bytes when ``every``)."""
        values = {(s.participant, s.seq): s.values for s in self.sent}
        s = initial_state(self.cfg.run_id, "plain", self.n)
        rule = UpdateRule(
            self.cfg.effective_rule, self.cfg.staleness_exponent, self.cfg.participants
        )
        states: dict[int, bytes] = {}
        for sent in self.sent:
            d = StreamDelivery(
                0, sent.offset, sent.body, AmqpNames.routing_key(sent.participant), None
            )
            item = admit(d, self.cfg, self.n, None)
            apply_stream(
                s,
                [(sent.offset, item)],
                self.cfg,
                rule,
                lambda u: secure.encode_values(values[(u.participant, u.seq)]),
            )
            if every:
                states[sent.offset] = s.state.tobytes()
        return s, states

    def server_state(self, role: str) -> ShareState:
        from dssgd.aggregator.share_store import ShareStore

        i = secure.ROLES.index(role)
        return ShareStore(redis_connect(self.urls[i]), self.cfg.run_id, role).load()

    def counters(self, role: str) -> dict[str, int]:
        i = secure.ROLES.index(role)
        raw = redis_connect(self.urls[i]).hgetall(ShareKeys(self.cfg.run_id, role).counters)
        return {k.decode(): int(v) for k, v in raw.items()}

    def close(self) -> None:
        self.stop_servers()
        if self.pub is not None:
            self.pub.close()
        with contextlib.suppress(Exception):
            self.store.delete_run()
            conn = amqp_connect(self.conns.amqp_url, "dssgd-tests")
            delete_secure_topology(conn.channel(), self.names)
            conn.close()


def _serve(settings: ShareServerSettings, crash: str) -> None:
    os.environ[CRASH_ENV] = crash
    os._exit(ShareServer(settings, StopFlag()).run())


def secure_config(**overrides: object) -> RunConfig:
    values: dict[str, object] = {"secure": "two-server", "participants": 4, "theta_u": 0.01}
    values.update(overrides)
    return RunConfig(run_id=f"test-sec-{uuid.uuid4().hex[:10]}", **values)  # type: ignore[arg-type]
