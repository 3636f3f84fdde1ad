"""Building blocks of the system benchmarks (issue 7); the sections live in ``bench.__main__``.

* machine facts and CPU accounting from ``/proc`` (psutil is not a dependency);
* realistic update messages: a few pre-encoded templates per θu, each publish stamping a unique
  (participant, seq) into the header and the msgpack ``s`` field (one copy, no re-encoding);
* publisher processes with asynchronous confirms (pika ``SelectConnection``, a window of
  outstanding confirms) and an ack-only ceiling consumer (prefetch 1000, ack ``multiple``);
* ``capacity``: the real aggregator against the ceiling, same publishers and bytes;
* ``drive_run``: a whole ``dssgd run`` in a subprocess, watched from outside (participant
  progress, accuracy series, queue depth, CPU of the aggregator, workers, broker and Redis).

Every run, queue and Redis key created here is named ``bench-…`` and removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pika.exceptions as pex
from dssgd.shared import wire
from dssgd.shared.amqp_names import CONTENT_TYPE, AmqpNames
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.broker import declare_topology, delete_topology
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

ROOT = Path(__file__).resolve().parent.parent
N_CNN = 105_506
SEQ0 = 1 << 24  # every stamped seq is >= 2**24, so msgpack always codes it as uint32 (5 bytes)
CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = os.cpu_count() or 1


def conns() -> Connections:
    return Connections.from_env()


def new_id(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# Machine and CPU accounting


def machine_info() -> dict[str, str]:
    import torch  # only here: the publisher processes never need it

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(NPROC),
        "cpu": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pika": pika.__version__,
    }


def proc_cpu(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of a process (or one of its threads) in seconds; None once it is gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loadavg() -> float:
    """The 1-minute load average: how busy the shared machine was before a measurement."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts) - idle) / CLK_TCK, sum(parts) / CLK_TCK


def find_pids(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (arguments joined by spaces)."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            out.append(int(entry))
    return sorted(out)


def service_pids(run_dir: Path, run_id: str, kind: str) -> list[int]:
    """Pids of a local run's aggregator or workers: from the fork launcher's pids.json, or
    (under supervisord, fresh interpreters) from their command lines."""
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return find_pids(f"-m {kind} --run-id {run_id}")
    return sorted(int(v) for k, v in pids.items() if k.split(":")[0] == kind)


def find_comm(name: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    out.append(int(entry))
    return out


class CpuMeter:
    """CPU seconds of named groups of processes, sampled over time."""

    def __init__(self) -> None:
        self.groups: dict[str, list[tuple[int, int | None]]] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[tuple[int, int | None], float] = {}

    def watch(self, name: str, pid: int, tid: int | None = None) -> None:
        members = self.groups.setdefault(name, [])
        if (pid, tid) not in members:
            members.append((pid, tid))

    def sample(self) -> None:
        row: dict[str, float] = {}
        for name, members in self.groups.items():
            total = 0.0
            for key in members:
                v = proc_cpu(*key)
                if v is not None:
                    self._last[key] = v  # a process that exited keeps its last reading
                total += self._last.get(key, 0.0)
            row[name] = total
        busy, _ = system_busy()
        row["machine"] = busy
        self.samples.append((time.time(), row))

    def share(self, name: str, t0: float, t1: float) -> float | None:
        """CPU seconds of ``name`` between the samples nearest t0 and t1, over wall × cores."""
        pts = [(t, row.get(name)) for t, row in self.samples if row.get(name) is not None]
        if len(pts) < 2:
            return None
        a = min(pts, key=lambda p: abs(p[0] - t0))
        b = min(pts, key=lambda p: abs(p[0] - t1))
        if b[0] <= a[0]:
            return None
        return (b[1] - a[1]) / ((b[0] - a[0]) * NPROC)


# --------------------------------------------------------------------------------------------
# Messages


def make_templates(run_id: str, theta: float, count: int, seed: int,
                   n: int = N_CNN) -> tuple[list[bytes], int]:
    """``count`` encoded updates of k = round(θu·n) random entries, values ~ N(0, 1e-3), and the
    byte offset of their 4-byte seq. Checked: a stamped copy decodes to what was stamped."""
    rng = np.random.default_rng(seed)
    k = max(1, round(theta * n))
    bodies = []
    for _ in range(count):
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        vals = rng.normal(0.0, 1e-3, size=k).astype(np.float32)
        bodies.append(wire.encode(wire.Update(run_id, 0, SEQ0, 0, n, idx, vals)))
    marker = b"\xa1s\xce" + SEQ0.to_bytes(4, "big")
    at = bodies[0].find(marker)
    if at < 0 or any(b.find(marker) != at for b in bodies):
        raise RuntimeError("cannot locate the seq field in the encoded template")
    at += 3
    probe = wire.decode(stamp(bodies[-1], 7, SEQ0 + 12345, at), expected_run=run_id, expected_n=n)
    if (probe.participant, probe.seq) != (7, SEQ0 + 12345) or probe.count != k:
        raise RuntimeError("stamping a template does not give the expected message")
    return bodies, at


def stamp(template: bytes, participant: int, seq: int, seq_at: int) -> bytes:
    """The template with another participant (header bytes 2..5) and seq (uint32 at seq_at)."""
    view = memoryview(template)
    return b"".join((view[:2], participant.to_bytes(4, "little"), view[6:seq_at],
                     seq.to_bytes(4, "big"), view[seq_at + 4 :]))


# --------------------------------------------------------------------------------------------
# Publisher processes (asynchronous confirms)


@dataclass(frozen=True)
class PubSpec:
    amqp_url: str
    run_id: str  # written into the messages
    theta: float
    exchange: str  # "" = the default exchange, routing key = queue
    queue: str  # target queue (default exchange) or "" to route by participant
    first_participant: int
    participants: int
    duration: float  # seconds of publishing
    max_bytes: int  # or stop after this many bytes
    max_messages: int = 1 << 62  # or after this many messages
    window: int = 1000  # unconfirmed messages at most
    window_bytes: int = 16 << 20  # unconfirmed bytes at most
    templates: int = 16
    seed: int = 1


class _AsyncPublisher:
    def __init__(self, spec: PubSpec, ready: Any, go: Any, results: Any) -> None:
        self.s, self.ready, self.go, self.results = spec, ready, go, results
        self.bodies, self.seq_at = make_templates(spec.run_id, spec.theta, spec.templates,
                                                  spec.seed + spec.first_participant)
        self.keys = [spec.queue or AmqpNames.routing_key(spec.first_participant + i)
                     for i in range(spec.participants)]
        self.props = pika.BasicProperties(content_type=CONTENT_TYPE, app_id="bench",
                                          delivery_mode=pika.DeliveryMode.Persistent)
        self.pending: dict[int, int] = {}
        self.floor = 0
        self.out_bytes = 0
        self.sent = self.acked = self.nacked = 0
        self.sent_bytes = 0
        self.t_first = self.t_last = 0.0
        self.deadline = 0.0
        self.stopping = False
        self.done = False
        self.error = ""
        self.ch: Any = None

    def run(self) -> None:
        params = pika.URLParameters(self.s.amqp_url)
        params.heartbeat = 0
        self.conn = pika.SelectConnection(params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_error,
                                          on_close_callback=self._on_closed)
        self.conn.ioloop.call_later(self.s.duration + 300, self._abort)
        self.conn.ioloop.start()
        self.results.put({"sent": self.sent, "acked": self.acked, "nacked": self.nacked,
                          "bytes": self.sent_bytes, "t_first": self.t_first,
                          "t_last": self.t_last, "error": self.error})

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_error(self, _conn: Any, exc: Any) -> None:
        self.error = f"connection failed: {exc!r}"
        self.conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: Any) -> None:
        if not self.done and not self.error:
            self.error = f"connection closed: {reason!r}"
        self.conn.ioloop.stop()

    def _abort(self) -> None:
        self.error = self.error or "timed out"
        self.conn.close()

    def _on_channel(self, ch: Any) -> None:
        self.ch = ch
        ch.confirm_delivery(self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _frame: Any) -> None:
        self.ready.put(os.getpid())
        self.go.wait(120)  # everyone starts together
        self.t_first = time.time()
        self.deadline = self.t_first + self.s.duration
        self._pump()

    def _pump(self) -> None:
        s = self.s
        now = time.time()
        while not self.stopping and len(self.pending) < s.window and \
                self.out_bytes < s.window_bytes:
            if now >= self.deadline or self.sent_bytes >= s.max_bytes or \
                    self.sent >= s.max_messages:
                self.stopping = True
                break
            j = self.sent
            slot = j % s.participants
            body = stamp(self.bodies[j % len(self.bodies)], s.first_participant + slot,
                         SEQ0 + j // s.participants, self.seq_at)
            self.ch.basic_publish(s.exchange, self.keys[slot], body, self.props)
            self.sent += 1
            self.pending[self.sent] = len(body)
            self.out_bytes += len(body)
            self.sent_bytes += len(body)
            if not self.sent % 32:
                now = time.time()
        if self.stopping and not self.pending and not self.done:
            self.done = True
            self.conn.close()

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        nack = isinstance(m, pika.spec.Basic.Nack)
        tags = range(self.floor + 1, m.delivery_tag + 1) if m.multiple else (m.delivery_tag,)
        for t in tags:
            b = self.pending.pop(t, None)
            if b is not None:
                self.out_bytes -= b
                if nack:
                    self.nacked += 1
                else:
                    self.acked += 1
        if m.multiple:
            self.floor = max(self.floor, m.delivery_tag)
        self.t_last = time.time()
        self._pump()


def _publisher_main(spec: PubSpec, ready: Any, go: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        _AsyncPublisher(spec, ready, go, results).run()
    except Exception as exc:  # report, never hang the parent
        results.put({"error": repr(exc), "sent": 0, "acked": 0, "nacked": 0, "bytes": 0,
                     "t_first": 0.0, "t_last": 0.0})


def _ceiling_consumer_main(amqp_url: str, queue: str, prefetch: int, ack_every: int,
                           ready: Any, expected: Any, results: Any) -> None:
    """Consume and ack only (ack ``multiple`` every ``ack_every``) until ``expected`` arrived."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    params = pika.URLParameters(amqp_url)
    params.heartbeat = 0
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    st = {"n": 0, "tag": 0, "unacked": 0, "bytes": 0, "t_first": 0.0, "t_last": 0.0}

    def on_message(chan: Any, method: Any, _props: Any, body: bytes) -> None:
        st["n"] += 1
        st["bytes"] += len(body)
        st["tag"] = method.delivery_tag
        st["unacked"] += 1
        if st["unacked"] >= ack_every:
            chan.basic_ack(method.delivery_tag, multiple=True)
            st["unacked"] = 0
        now = time.time()
        st["t_first"] = st["t_first"] or now
        st["t_last"] = now

    ch.basic_consume(queue, on_message, auto_ack=False)
    ready.put(os.getpid())
    limit = time.time() + 900
    while time.time() < limit:
        conn.process_data_events(time_limit=0.05)
        if st["unacked"] and time.time() - st["t_last"] > 0.05:
            ch.basic_ack(st["tag"], multiple=True)  # the tail of a burst
            st["unacked"] = 0
        if expected.value > 0 and st["n"] >= expected.value:
            break
    if st["unacked"]:
        ch.basic_ack(st["tag"], multiple=True)
    conn.close()
    results.put({k: st[k] for k in ("n", "bytes", "t_first", "t_last")})


# --------------------------------------------------------------------------------------------
# Aggregator capacity against the broker's ceiling


@dataclass
class LoadResult:
    what: str
    theta: float
    messages: int
    bytes: int
    entries: int
    seconds: float  # first publish -> last message consumed (ceiling) / committed (aggregator)
    publish_seconds: float  # first publish -> last confirm
    published_per_s: float
    nacked: int = 0
    commits: int = 0
    rejected: int = 0
    duplicates: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # share of all cores over the run
    note: str = ""

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def entries_per_s(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LoadSettings:
    publishers: int = 3
    participants_each: int = 10
    duration: float = 8.0
    max_bytes: int = 2_000_000_000  # over all publishers; bounds the broker backlog
    window: int = 1000
    prefetch: int = 1000
    ack_every: int = 100


def _start_publishers(specs: list[PubSpec]) -> tuple[list[Any], Any, Any]:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_publisher_main, args=(s, ready, go, results), daemon=True)
             for s in specs]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    return procs, go, results


def _collect(results: Any, count: int, timeout: float, poll: Any = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.time() + timeout
    while len(out) < count:
        if time.time() > deadline:
            raise RuntimeError("publishers did not report in time")
        try:
            out.append(results.get(timeout=0.02))
        except queue_mod.Empty:
            if poll is not None:
                poll()
    bad = [r["error"] for r in out if r.get("error")]
    if bad:
        raise RuntimeError(f"publisher failed: {bad[0]}")
    return out


def _specs(cfg: LoadSettings, run_id: str, theta: float, exchange: str, queue: str,
           messages: int | None = None) -> list[PubSpec]:
    """One spec per publisher; with ``messages``, exactly that many in all (a backlog)."""
    url = conns().amqp_url
    out = []
    for i in range(cfg.publishers):
        extra = {}
        if messages is not None:
            extra["max_messages"] = messages // cfg.publishers + (i < messages % cfg.publishers)
        out.append(PubSpec(url, run_id, theta, exchange, queue, i * cfg.participants_each,
                           cfg.participants_each, cfg.duration if messages is None else 600.0,
                           cfg.max_bytes // cfg.publishers, window=cfg.window, **extra))
    return out


def _fill(cfg: LoadSettings, run_id: str, theta: float, exchange: str, queue: str,
          messages: int) -> int:
    """Publish a backlog of ``messages`` with nobody consuming; returns how many were confirmed."""
    procs, go, results = _start_publishers(_specs(cfg, run_id, theta, exchange, queue, messages))
    go.set()
    rows = _collect(results, len(procs), 600)
    for p in procs:
        p.join(timeout=10)
    return sum(r["acked"] for r in rows)


def _pub_summary(rows: list[dict[str, Any]]) -> tuple[int, int, int, float, float]:
    acked = sum(r["acked"] for r in rows)
    nacked = sum(r["nacked"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    t0 = min(r["t_first"] for r in rows)
    t1 = max(r["t_last"] for r in rows)
    return acked, nacked, nbytes, t0, t1


def measure_ceiling(cfg: LoadSettings, theta: float, run_id: str) -> LoadResult:
    """The broker with an empty consumer: same publishers and bytes, plain durable quorum queue."""
    qname = _declare_plain_queue()
    ctx = mp.get_context("spawn")
    ready, results, expected = ctx.Queue(), ctx.Queue(), ctx.Value("q", 0)
    consumer = ctx.Process(target=_ceiling_consumer_main, daemon=True,
                           args=(conns().amqp_url, qname, cfg.prefetch, cfg.ack_every, ready,
                                 expected, results))
    consumer.start()
    procs: list[Any] = []
    try:
        ready.get(timeout=60)
        procs, go, pub_results = _start_publishers(_specs(cfg, run_id, theta, "", qname))
        meter = CpuMeter()
        meter.watch("consumer", consumer.pid)
        meter.watch("publishers", procs[0].pid)
        for p in procs[1:]:
            meter.watch("publishers", p.pid)
        _watch_services(meter)
        meter.sample()
        go.set()
        rows = _collect(pub_results, len(procs), cfg.duration + 300)
        acked, nacked, _, t0, t1 = _pub_summary(rows)
        meter.sample()
        expected.value = sum(r["sent"] for r in rows) - nacked
        got = results.get(timeout=300)
        meter.sample()
        seconds = got["t_last"] - t0
        k = max(1, round(theta * N_CNN))
        return LoadResult("ceiling", theta, got["n"], got["bytes"], got["n"] * k, seconds,
                          t1 - t0, acked / (t1 - t0), nacked=nacked,
                          cpu=_shares(meter, t0, got["t_last"]))
    finally:
        for p in [*procs, consumer]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        _delete_queue(qname)


def _declare_plain_queue() -> str:
    qname = new_id("ceiling")
    conn = amqp_connect(conns().amqp_url, "bench-ceiling", heartbeat=0)
    conn.channel().queue_declare(qname, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    return qname


def _delete_queue(qname: str) -> None:
    conn = amqp_connect(conns().amqp_url, "bench-ceiling", heartbeat=0)
    try:
        conn.channel().queue_delete(qname)
    finally:
        conn.close()


def _watch_services(meter: CpuMeter) -> None:
    for pid in find_comm("beam.smp"):
        meter.watch("broker", pid)
    for pid in find_comm("redis-server"):
        meter.watch("redis", pid)


def _shares(meter: CpuMeter, t0: float, t1: float) -> dict[str, float]:
    names = {n for _, row in meter.samples for n in row}
    out = {}
    for n in sorted(names):
        v = meter.share(n, t0, t1)
        if v is not None:
            out[n] = v
    return out


class BenchRun:
    """A throw-away run for the aggregator alone: config, zero parameters, topology."""

    def __init__(self, run_id: str, participants: int, theta: float) -> None:
        self.run_id = run_id
        self.store = RunStore(redis_connect(conns().redis_url), run_id)
        self.cfg = RunConfig(run_id=run_id, model="cnn", participants=participants,
                             theta_u=theta, gamma=100.0, rule="sum", queue_max_length=1_000_000)
        self.store.create_config(self.cfg)
        self.store.init_params(np.zeros(N_CNN, np.float32))
        conn = amqp_connect(conns().amqp_url, "bench", heartbeat=0)
        declare_topology(conn.channel(), AmqpNames(run_id), self.cfg.queue_max_length)
        conn.close()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkdtemp(prefix="bench-agg-")) / "aggregator.log"

    def version(self) -> int:
        return int(self.store.r.get(self.store.keys.version) or 0)

    def start_aggregator(self, command: list[str] | None = None) -> int:
        """``python -m dssgd.aggregator --run-id R --no-eval`` (or ``command`` + those arguments, to
        try a variant); returns its pid once it consumes from the run's queue."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cmd = command or [sys.executable, "-m", "dssgd.aggregator"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--run-id", self.run_id, "--no-eval"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        conn = amqp_connect(conns().amqp_url, "bench-probe", heartbeat=0)
        try:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"aggregator exited; see {self.log}")
                ch = conn.channel()
                ok = ch.queue_declare(AmqpNames(self.run_id).queue, passive=True)
                ch.close()
                if ok.method.consumer_count > 0:
                    return self.proc.pid
                time.sleep(0.1)
        finally:
            conn.close()
        raise RuntimeError("the aggregator did not start consuming within 90 s")

    def close(self) -> None:
        crashed = self.proc is not None and self.proc.poll() not in (None, 0)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        delete_run(self.run_id)
        if not crashed:  # a crashed aggregator's log stays for inspection (named in the error)
            shutil.rmtree(self.log.parent, ignore_errors=True)


def delete_run(run_id: str) -> None:
    """``dssgd delete`` (Redis keys, queues, exchanges), in-process when the CLI is too slow."""
    res = subprocess.run([sys.executable, "-m", "dssgd", "delete", run_id], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:  # fall back to the same two calls the command makes
        with contextlib.suppress(Exception):
            RunStore(redis_connect(conns().redis_url), run_id).delete_run()
        with contextlib.suppress(Exception):
            conn = amqp_connect(conns().amqp_url, "bench-delete", heartbeat=0)
            delete_topology(conn.channel(), AmqpNames(run_id))
            conn.close()


def measure_aggregator(cfg: LoadSettings, theta: float, run_id: str,
                       profiler: list[str] | None = None,
                       command: list[str] | None = None) -> LoadResult:
    """The real aggregator (``python -m dssgd.aggregator --no-eval``) under the same load; the
    end is the moment the version key shows every confirmed message applied."""
    run = BenchRun(run_id, cfg.publishers * cfg.participants_each, theta)
    procs: list[Any] = []
    prof: subprocess.Popen[bytes] | None = None
    try:
        agg_pid = run.start_aggregator(command)
        procs, go, pub_results = _start_publishers(
            _specs(cfg, run_id, theta, AmqpNames(run_id).exchange, ""))
        meter = CpuMeter()
        meter.watch("aggregator", agg_pid)
        meter.watch("aggregator main thread", agg_pid, agg_pid)
        for p in procs:
            meter.watch("publishers", p.pid)
        _watch_services(meter)
        meter.sample()
        if profiler:
            prof = subprocess.Popen([*profiler, "--pid", str(agg_pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        go.set()
        last_sample = [time.time()]

        def poll() -> None:
            if time.time() - last_sample[0] >= 0.5:
                meter.sample()
                last_sample[0] = time.time()

        rows = _collect(pub_results, len(procs), cfg.duration + 300, poll)
        acked, nacked, nbytes, t0, t1 = _pub_summary(rows)
        target = acked
        deadline = time.time() + 600
        while True:
            v = run.version()
            if v >= target:
                t_end = time.time()
                break
            if time.time() > deadline:
                raise RuntimeError(f"aggregator applied {v} of {target} in time")
            if run.proc is not None and run.proc.poll() is not None:
                raise RuntimeError(f"aggregator exited; see {run.log}")
            poll()
            time.sleep(0.002)
        meter.sample()
        counters = run.store.counters()
        k = max(1, round(theta * N_CNN))
        note = ""
        if nacked:
            note = f"{nacked} publishes refused by the broker"
        return LoadResult("aggregator", theta, target, nbytes, target * k, t_end - t0, t1 - t0,
                          acked / (t1 - t0), nacked=nacked,
                          commits=counters.get("commits", 0),
                          rejected=counters.get("rejected", 0),
                          duplicates=counters.get("duplicates", 0),
                          cpu=_shares(meter, t0, t_end), note=note)
    finally:
        if prof is not None:
            prof.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                prof.wait(timeout=30)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        run.close()


@dataclass
class DrainResult:
    what: str
    theta: float
    messages: int
    seconds: float  # first delivery (ceiling) / first commit (aggregator) -> last
    commits: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def drain_ceiling(cfg: LoadSettings, theta: float, run_id: str, messages: int) -> DrainResult:
    """An ack-only consumer draining a backlog of ``messages`` (nothing else running)."""
    qname = _declare_plain_queue()
    consumer = None
    try:
        total = _fill(cfg, run_id, theta, "", qname, messages)
        ctx = mp.get_context("spawn")
        ready, results, expected = ctx.Queue(), ctx.Queue(), ctx.Value("q", total)
        consumer = ctx.Process(target=_ceiling_consumer_main, daemon=True,
                               args=(conns().amqp_url, qname, cfg.prefetch, cfg.ack_every, ready,
                                     expected, results))
        consumer.start()
        meter = CpuMeter()
        meter.watch("consumer", consumer.pid)
        _watch_services(meter)
        meter.sample()
        got = results.get(timeout=600)
        meter.sample()
        return DrainResult("ceiling", theta, got["n"] - 1, got["t_last"] - got["t_first"],
                           cpu=_shares(meter, got["t_first"], got["t_last"]))
    finally:
        if consumer is not None:
            consumer.join(timeout=10)
            if consumer.is_alive():
                consumer.kill()
        _delete_queue(qname)


def drain_aggregator(cfg: LoadSettings, theta: float, run_id: str, messages: int,
                     command: list[str] | None = None) -> DrainResult:
    """The aggregator started on a backlog of ``messages``: from its first commit to its last."""
    run = BenchRun(run_id, cfg.publishers * cfg.participants_each, theta)
    try:
        total = _fill(cfg, run_id, theta, AmqpNames(run_id).exchange, "", messages)
        run.start_aggregator(command)
        assert run.proc is not None
        meter = CpuMeter()
        meter.watch("aggregator", run.proc.pid)
        _watch_services(meter)
        v0 = t_first = 0.0
        deadline = time.time() + 600
        last = 0.0
        while True:
            v = run.version()
            now = time.time()
            if v and not t_first:
                v0, t_first = v, now
                meter.sample()
            if v >= total:
                break
            if now > deadline or run.proc.poll() is not None:
                raise RuntimeError(f"aggregator applied {v} of {total}; see {run.log}")
            if t_first and now - last > 0.5:
                meter.sample()
                last = now
            time.sleep(0.002)
        meter.sample()
        commits = run.store.counters().get("commits", 0)
        return DrainResult("aggregator", theta, int(total - v0), now - t_first, commits,
                           cpu=_shares(meter, t_first, now))
    finally:
        run.close()


# --------------------------------------------------------------------------------------------
# Whole runs of `dssgd run`, watched from outside


@dataclass
class RunRecord:
    run_id: str
    args: list[str]
    t_start: float  # just before the command was started (time.time())
    t_exit: float = 0.0
    returncode: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    participants: int = 0
    # per participant (last_seen, t_epoch) as first seen at the end of its epoch 1
    first_epoch: dict[int, tuple[float, float]] = field(default_factory=dict)
    final: dict[int, dict[str, str]] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[tuple[float, int]] = field(default_factory=list)  # (time, Σ epochs)
    depth: list[tuple[float, int]] = field(default_factory=list)  # (time, ready messages)
    unapplied: list[tuple[float, int]] = field(default_factory=list)  # (time, confirmed - applied)
    cpu: CpuMeter = field(default_factory=CpuMeter)
    stderr_tail: str = ""
    milestones: dict[str, float] = field(default_factory=dict)  # seconds after t_start

    @property
    def wall(self) -> float:
        return self.t_exit - self.t_start

    @property
    def machine_busy(self) -> float | None:
        """Busy share of all cores over the whole command (ours and everybody else's)."""
        return self.cpu.share("machine", self.t_start, self.t_exit)

    def participant_wall(self, pid: int) -> float | None:
        """From the first download to the last confirm of one participant: the end of its last
        epoch (``last_seen``) minus the start of its first (end of epoch 1 minus its t_epoch)."""
        if pid not in self.first_epoch or pid not in self.final:
            return None
        last_seen_1, t_epoch_1 = self.first_epoch[pid]
        return float(self.final[pid]["last_seen"]) - (last_seen_1 - t_epoch_1)

    def epoch_window(self, lo: float = 0.1, hi: float = 0.9) -> tuple[float, float, float] | None:
        """(t_lo, t_hi, epochs/s) between the moments Σ epochs passed lo and hi of its final value,
        interpolated between samples: the steady state, without start-up and tail."""
        if not self.epochs:
            return None
        total = self.epochs[-1][1]
        if total < 10:
            return None

        def when(target: float) -> float:
            prev = self.epochs[0]
            for t, e in self.epochs:
                if e >= target:
                    if e == prev[1]:
                        return t
                    return prev[0] + (t - prev[0]) * (target - prev[1]) / (e - prev[1])
                prev = (t, e)
            return self.epochs[-1][0]

        t_lo, t_hi = when(lo * total), when(hi * total)
        if t_hi <= t_lo:
            return None
        return t_lo, t_hi, (hi - lo) * total / (t_hi - t_lo)


def drive_run(args: list[str], tag: str, progress_every: float = 0.25,
              sample_every: float = 0.5, watch: bool = True, keep: bool = False) -> RunRecord:
    """``python -m dssgd run --json ARGS`` in a subprocess, watched until it exits, then deleted.

    Every ``progress_every`` s: all participants' progress (the first snapshot of each one's
    epoch 1 gives the start of its first epoch); every ``sample_every`` s: queue depth (passive
    declare) and CPU of the aggregator, its main thread, the workers, the broker and Redis."""
    run_id = new_id(tag)
    runs_dir = tempfile.mkdtemp(prefix="bench-runs-")
    c = conns()
    store = RunStore(redis_connect(c.redis_url), run_id)
    names = AmqpNames(run_id)
    err = Path(runs_dir) / "stderr.log"
    rec = RunRecord(run_id, args, time.time())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with err.open("wb") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--runs-dir", runs_dir,
             "--json", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err_f)
    amqp = None
    try:
        if watch:
            amqp = amqp_connect(c.amqp_url, "bench-watch", heartbeat=0)
            _watch_services(rec.cpu)
        rec.cpu.sample()
        next_progress = next_sample = 0.0
        agg_found = False
        workers: set[int] = set()
        while proc.poll() is None:
            now = time.time()
            if not rec.participants:
                cfg = store.load_config()
                rec.participants = cfg.participants if cfg else 0
            if rec.participants and now >= next_progress:
                next_progress = now + progress_every
                snap = store.all_progress(rec.participants)
                version = int(store.r.get(store.keys.version) or 0)
                total = confirmed = 0
                for pid, p in snap.items():
                    e = int(p.get("epochs", 0))
                    total += e
                    confirmed += int(p.get("seq", 0))
                    if e == 1 and pid not in rec.first_epoch:
                        rec.first_epoch[pid] = (float(p["last_seen"]), float(p["t_epoch"]))
                rec.epochs.append((now, total))
                rec.unapplied.append((now, max(0, confirmed - version)))
            if now >= next_sample:
                next_sample = now + sample_every
                if watch:
                    if not agg_found:
                        pids = service_pids(Path(runs_dir) / run_id, run_id, "aggregator")
                        if pids:
                            agg_found = True
                            rec.cpu.watch("aggregator", pids[0])
                            rec.cpu.watch("aggregator main thread", pids[0], pids[0])
                    for pid in service_pids(Path(runs_dir) / run_id, run_id, "worker"):
                        if pid not in workers:
                            workers.add(pid)
                            rec.cpu.watch("workers", pid)
                rec.cpu.sample()  # without watch: the machine's busy share only
                if amqp is not None:
                    try:
                        ch = amqp.channel()
                        depth = ch.queue_declare(names.queue, passive=True).method.message_count
                        ch.close()
                        rec.depth.append((now, depth))
                    except pex.ChannelClosedByBroker:
                        pass  # not declared yet
            time.sleep(min(progress_every, sample_every, 0.05))
        out = proc.stdout.read() if proc.stdout else b""
        rec.t_exit = time.time()
        rec.cpu.sample()
        rec.returncode = proc.returncode
        rec.stderr_tail = err.read_text(errors="replace")[-3000:]
        with contextlib.suppress(ValueError):
            rec.summary = json.loads(out)
        if not rec.participants:
            cfg = store.load_config()
            rec.participants = cfg.participants if cfg else 0
        rec.final = store.all_progress(rec.participants) if rec.participants else {}
        rec.metrics = store.metrics()
        rec.milestones = milestones(Path(runs_dir) / run_id, rec)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if amqp is not None:
            with contextlib.suppress(Exception):
                amqp.close()
        if not keep:
            delete_run(run_id)
            shutil.rmtree(runs_dir, ignore_errors=True)
    if rec.returncode != 0:
        raise RuntimeError(f"dssgd run {' '.join(args)} failed ({rec.returncode}):\n"
                           f"{rec.stderr_tail}")
    return rec


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _log_times(path: Path, needle: str) -> list[float]:
    """Unix times of the log lines (logging's local-time stamps) that contain ``needle``."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = _STAMP.match(line)
            if m and needle in line:
                out.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                           + int(m.group(2)) / 1000)
    return out


def milestones(run_dir: Path, rec: RunRecord) -> dict[str, float]:
    """Start-up of a ``dssgd run``, in seconds after the command started: supervisord spawned
    the aggregator, the aggregator serves, the last worker hosts its participants, the first
    epoch ended, the evaluator started (first accuracy point minus its elapsed)."""
    out: dict[str, float] = {}
    spawned = _log_times(run_dir / "supervisord.log", "spawned: 'aggregator'")
    serving = _log_times(run_dir / "logs" / "aggregator.log", "serving")
    hosting = [t for f in sorted((run_dir / "logs").glob("worker-*.log"))
               for t in _log_times(f, "hosting participants")]
    if spawned:
        out["processes spawned"] = spawned[0] - rec.t_start
    if serving:
        out["aggregator serving"] = serving[0] - rec.t_start
    if hosting:
        out["workers ready"] = max(hosting) - rec.t_start
    if rec.first_epoch:
        out["first epoch done"] = min(t for t, _ in rec.first_epoch.values()) - rec.t_start
    if rec.metrics:
        m = min(rec.metrics, key=lambda x: x["time"])
        out["evaluator started"] = m["time"] - m["elapsed"] - rec.t_start
    return out


CENTRALIZED = r"""
import json, sys, time
from dssgd.shared.baselines import train_curve, union_indices
from dssgd.shared.config import RunConfig
from dssgd.shared.data import load_mnist
import torch
target, epochs, threads = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = RunConfig(run_id="bench-centralized", lr=0.2, batch_size=32)
data = load_mnist(cfg.data)
idx = union_indices(cfg, data.train_y)
print(json.dumps({"ready": time.time(), "images": int(len(idx)),
                  "threads": torch.get_num_threads()}), flush=True)
def progress(msg):
    acc = float(msg.rsplit(" ", 1)[1])
    print(json.dumps({"t": time.time(), "acc": acc}), flush=True)
    if acc >= target:
        raise SystemExit(0)
train_curve("centralized", cfg, data, idx, epochs, progress)
"""


@dataclass
class CentralRecord:
    t_start: float
    ready: float  # MNIST loaded and the union of the shards computed
    images: int
    threads: int
    points: list[tuple[float, float]]  # (time, accuracy) after every epoch

    def time_to(self, target: float) -> float | None:
        hit = next((t for t, a in self.points if a >= target), None)
        return None if hit is None else hit - self.t_start


def run_centralized(target: float, threads: int, max_epochs: int = 50) -> CentralRecord:
    """The same MLP on the union of the 10 shards, in a fresh process with ``threads`` torch
    threads, timed from its start."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", CENTRALIZED, str(target), str(max_epochs),
                          str(threads)], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"centralized baseline failed:\n{res.stderr[-2000:]}")
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    head = lines[0]
    return CentralRecord(t0, head["ready"], head["images"], head["threads"],
                         [(x["t"], x["acc"]) for x in lines[1:]])
