"""Fault injection: kill and restart every part of dssgd, then check the exact-sum oracle.

    python -m bench.chaos                        # all 14 scenarios (about 14 minutes)
    python -m bench.chaos --quick                # fewer faults, no long outages (about 5)
    python -m bench.chaos --scenario redis       # one scenario; repeat the flag for more

Every scenario drives a fresh run of synthetic participants (small integer updates, so float32
sums are exact) and one aggregator against a PRIVATE Redis (AOF, appendfsync always) and a
PRIVATE RabbitMQ node, both started here on free loopback ports inside a temporary directory.
Only those two are restarted or killed; the shared servers on 5672/6379 are never touched.

Scenarios (docs/RELIABILITY.md rows 1–4 and 15; the hostile ones rows 17–22):
  aggregator  SIGKILL the aggregator at random moments and restart it
  partitioned the same for the partitioned aggregator (--ingest 2): a random one of the
              applier and the two ingest processes each time
  rabbitmq    restart the broker mid-run (graceful stop, then kill -9 in the full version)
  redis       restart Redis mid-run (SIGTERM, then kill -9 in the full version)
  worker      SIGKILL worker processes at random and restart them with the same participants
  backlog     queue max-length 200, aggregator killed while workers publish until the broker
              refuses (nacks) them; then the aggregator comes back
  redis-stall Redis frozen (SIGSTOP) past the 10 s client timeout: a commit whose outcome the
              aggregator never learns, executed when Redis wakes up

Hostile inputs (issue 20; every finding of that review as a scenario):
  hostile-headers   a 131 KB header, 4000 headers, a 255-byte routing key, a 255-byte app_id and
                    a forged count among the workers' updates: all dead-lettered, no reconnect
  rate-backlog      rate limit 1/s, participants at 0.5/s, aggregator down 20 s: none refused
  f16-gamma         f16 with γ = 0.0025 (not a float16 number), values clipped to ±γ: none refused
  ordered-outage    round robin, aggregator stopped 65 s: one holder per turn throughout
  synthetic-gamma   the synthetic oracle at the default γ 0.05: none refused
  dead-participant  round robin, a worker dies for good: its participants leave `active`
  evaluator-points  evaluator on, aggregator killed twice: every point's version == applied

After each scenario: every confirmed update applied exactly once (lost 0, duplicated 0), an
update sent but never confirmed applied at most once, the global parameters equal byte for byte
to the float32 sum of the applied updates and stat to their counts. Recovery time runs from the
moment the restart command returned to the next increase of the global version (worker
scenario: until the restarted participants' next update is applied). Exit status: 0 all good,
1 a check failed, 3 a scenario could not run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TextIO

import msgpack
import numpy as np
import pika
import redis
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import (
    Publisher,
    declare_topology,
    delete_partitions,
    delete_topology,
    queue_depth,
)
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import DEFAULT_AMQP_URL, RunConfig
from dssgd.shared.dedup import decode_state
from dssgd.shared.errors import BrokerError, DssgdError
from dssgd.shared.models import initial_parameters
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from redis.backoff import NoBackoff
from redis.retry import Retry

ROOT = Path(__file__).resolve().parent.parent
RESUME_LIMIT = 30.0  # seconds; RELIABILITY.md rows 2 and 3: everyone resumes on their own
PROGRESS_TIMEOUT = 60.0  # a fault with no progress this long after it ended is a failure
DRAIN_TIMEOUT = 90.0
PR_SET_PDEATHSIG = 1


class SetupError(Exception):
    """A private server could not be started or stopped; the scenario cannot say anything."""


# --- small helpers ---------------------------------------------------------------------------


# "LO-HI": take the private servers' ports from this range (a machine shared by several people
# who each own a range); unset, the kernel picks free ones.
PORT_RANGE = os.environ.get("DSSGD_CHAOS_PORTS", "")
_handed_out: set[int] = set()


def free_port() -> int:
    if PORT_RANGE:
        lo, hi = (int(x) for x in PORT_RANGE.split("-"))
        for port in range(lo, hi + 1):
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        raise SetupError(f"no free port left in DSSGD_CHAOS_PORTS={PORT_RANGE}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def time_until(cond: Callable[[], bool], since: float, timeout: float = PROGRESS_TIMEOUT,
               interval: float = 0.01) -> float | None:
    """Seconds from ``since`` until ``cond`` holds; servers may still be coming back meanwhile."""
    while time.monotonic() - since < timeout:
        try:
            if cond():
                return time.monotonic() - since
        except (DssgdError, redis.RedisError, pika.exceptions.AMQPError, OSError):
            pass
        time.sleep(interval)
    return None


def pid_alive(pid: int) -> bool:
    # The detached RabbitMQ node is not our child, so it can linger as a zombie until init reaps
    # it; os.kill(pid, 0) would call that alive.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


_LIBC: ctypes.CDLL | None = None


def _die_with_parent() -> None:
    """preexec_fn: a bench killed with SIGKILL must not leave workers (epochs=0) running forever."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def popen(args: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A new session: Ctrl-C reaches only the bench, which then stops everything in order.
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_process(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> int:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return int(p.returncode)


def repair_tail(path: Path) -> bool:
    """Cut a record file back to its last complete line; True if a torn line was removed.

    A SIGKILL can cut a JSON line short, and the restarted worker appends to the same file, so
    an unterminated tail would swallow the first record of the new process.
    """
    if not path.exists():
        return False
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos + nl + 1)
                return True
        f.truncate(0)
        return True


# --- private servers --------------------------------------------------------------------------


class PrivateRedis:
    """Our own Redis with the durability production needs; restarting it disturbs no one."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "redis"
        self.dir.mkdir()
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is not installed")
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--dir", str(self.dir), "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = popen(args, self.dir / "stdout.log", cwd=self.dir)
        # No client-side retries here: we want to see when the server answers, not hide it.
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                            socket_connect_timeout=1, retry=Retry(NoBackoff(), 0),
                            decode_responses=True)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise SetupError(f"redis-server exited with {proc.returncode}; "
                                 f"see {self.dir / 'redis.log'}")
            try:
                return bool(probe.ping())  # LOADING (AOF replay) is an error, so not up yet
            except redis.RedisError:
                return False

        try:
            if not wait_for(up, timeout, 0.01):
                raise SetupError(f"Redis on port {self.port} did not answer in {timeout:.0f} s")
            fsync = probe.config_get("appendfsync").get("appendfsync")
            if fsync != "always":
                raise SetupError(f"private Redis runs with appendfsync {fsync!r}, not 'always'")
            self.version = str(probe.info("server").get("redis_version", ""))
        finally:
            probe.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None

    def pause(self, seconds: float) -> None:
        """SIGSTOP, then SIGCONT: a stall (swap storm, long fork, VM pause), not a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)


def _rabbit_tool(name: str) -> str:
    # Debian's /usr/sbin wrappers `su` to the rabbitmq user, whose HOME holds the shared node's
    # cookie and who cannot write our temporary directory; the real scripts run as us.
    real = Path("/usr/lib/rabbitmq/bin") / name
    if real.exists():
        return str(real)
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"{name} is not installed")
    return found


class PrivateRabbit:
    """Our own RabbitMQ node (own name, ports, data, logs, cookie); restarts touch only it."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "rabbitmq"
        self.dir.mkdir()
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"dssgd-chaos-{os.getpid()}@localhost"
        self.server = _rabbit_tool("rabbitmq-server")
        self.ctl = _rabbit_tool("rabbitmqctl")
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management: no port 15672 clash
        # max_message_size: what dssgd needs (wire.MAX_MESSAGE_BYTES, 8 MiB, plus 1 MiB of
        # room), not the broker's default; docs/RELIABILITY.md "Broker-side limits".
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                                                f"max_message_size = {9 * 1024 * 1024}\n")
        # Our own env file, or /etc/rabbitmq/rabbitmq-env.conf would rename us after the shared
        # node (NODENAME=rabbit@localhost).
        (self.dir / "rabbitmq-env.conf").write_text("# private node of bench.chaos\n")
        self.pid: int | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def env(self) -> dict[str, str]:
        d = str(self.dir)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": d,  # the Erlang cookie of this node and its CLI: shared with no other node
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
            "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": f"{d}/erl_crash.dump",
            # Erlang distribution on loopback only, like the AMQP listener.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.ctl, "-n", self.node, *args], env=self.env, cwd=self.dir,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout} s")

    def _own_pids(self) -> list[int]:
        """The node's OS process, found by its unique node name (never by a broad pattern)."""
        # The name is not on the command line; the node keeps it in its environment.
        needle = f"RABBITMQ_NODENAME={self.node}".encode()
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                if b"beam" not in cmd.split(b"\0", 1)[0]:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ and pid_alive(int(entry.name)):
                out.append(int(entry.name))
        return out

    def start(self, timeout: float = 120.0) -> None:
        with (self.dir / "startup.log").open("ab") as out:
            rc = subprocess.run([self.server, "-detached"], env=self.env, cwd=self.dir,
                                stdout=out, stderr=subprocess.STDOUT, timeout=60,
                                check=False).returncode
        if rc != 0:
            raise SetupError(f"rabbitmq-server -detached exited with {rc}")
        deadline = time.monotonic() + timeout
        while True:
            # await_startup fails at once while the node has not registered with epmd yet.
            r = self._ctl("await_startup", "--timeout", "30", timeout=45)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SetupError(f"private RabbitMQ node {self.node} did not start: "
                                 f"{(r.stderr or r.stdout).strip()[-400:]}")
            time.sleep(0.5)
        pids = self._own_pids()
        self.pid = pids[0] if pids else None
        try:
            amqp_connect(self.url, "dssgd-chaos-probe", heartbeat=0).close()  # guest/guest
        except BrokerError as exc:
            raise SetupError(f"guest cannot log in to the private node: {exc}") from exc
        if not self.version:
            v = self._ctl("version", timeout=30)
            self.version = v.stdout.strip() if v.returncode == 0 else "?"

    def stop(self) -> None:
        """Graceful: `rabbitmqctl shutdown` waits until the node's process has exited."""
        r = self._ctl("shutdown", timeout=120)
        pids = self._own_pids()
        if pids and (r.returncode != 0 or not wait_for(lambda: not self._own_pids(), 30)):
            self._kill(signal.SIGKILL)
        self.pid = None

    def kill9(self) -> None:
        if not self._own_pids():
            raise SetupError(f"no running process for {self.node}")
        self._kill(signal.SIGKILL)

    def _kill(self, sig: int) -> None:
        pids = self._own_pids()
        for pid in pids:
            os.kill(pid, sig)
        if not wait_for(lambda: not any(pid_alive(p) for p in pids), 30):
            raise SetupError(f"node {self.node} (pids {pids}) survived signal {sig}")
        self.pid = None

    def halt(self, how: str) -> None:
        if how == "kill9":
            self.kill9()
        else:
            self.stop()

    def close(self) -> None:
        # Ask by name even if no process was found: a node still booting may not show up yet.
        with contextlib.suppress(SetupError, OSError):
            self.stop()


def reap_orphans() -> list[str]:
    """Stop private nodes left by an earlier bench that was killed with SIGKILL.

    A detached node outlives its bench (it is not our child, so PR_SET_PDEATHSIG cannot reach
    it). Only nodes named by this bench's scheme whose bench process is gone are stopped.
    """
    reaped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"beam" not in (entry / "cmdline").read_bytes().split(b"\0", 1)[0]:
                continue
            env = dict(kv.split("=", 1) for kv in
                       (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        m = re.fullmatch(r"dssgd-chaos-(\d+)@localhost", env.get("RABBITMQ_NODENAME", ""))
        if m is None or pid_alive(int(m.group(1))) or not pid_alive(int(entry.name)):
            continue
        ctl_env = {**os.environ, **{k: v for k, v in env.items() if k == "HOME"
                                    or k.startswith(("RABBITMQ_", "ERL_"))}}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([_rabbit_tool("rabbitmqctl"), "-n", m.group(0), "shutdown"],
                           env=ctl_env, cwd=env.get("HOME", "/"), capture_output=True,
                           timeout=120, check=False)
        if pid_alive(int(entry.name)):
            os.kill(int(entry.name), signal.SIGKILL)
        home = Path(env.get("HOME", ""))
        if home.name == "rabbitmq" and home.parent.name.startswith("dssgd-chaos-"):
            shutil.rmtree(home.parent, ignore_errors=True)
        reaped.append(m.group(0))
    return reaped


# --- one run of the system --------------------------------------------------------------------


@dataclass
class Oracle:
    """What the synthetic participants recorded: every update sent, and the confirmed ones."""

    sent: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    confirmed: set[tuple[int, int]]
    torn: int  # lines a SIGKILL cut short
    reused: list[tuple[int, int]]  # a seq sent twice with different content (must never happen)


def read_oracle(folder: Path, participants: int) -> Oracle:
    sent: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    confirmed: set[tuple[int, int]] = set()
    torn = 0
    reused: list[tuple[int, int]] = []
    for pid in range(participants):
        path = folder / f"confirmed-{pid}.jsonl"
        if not path.exists():
            continue
        with path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                key = (pid, int(rec["seq"]))
                if rec["state"] == "sent":
                    upd = (np.asarray(rec["indices"], np.int64),
                           np.asarray(rec["values"], np.float32))
                    old = sent.get(key)
                    if old is not None and not (np.array_equal(old[0], upd[0])
                                                and np.array_equal(old[1], upd[1])):
                        reused.append(key)
                    sent[key] = upd
                elif rec["state"] == "confirmed":
                    confirmed.add(key)
    return Oracle(sent, confirmed, torn, reused)


@dataclass
class Result:
    scenario: str
    faults: int = 0
    confirmed: int = 0
    applied: int = 0
    lost: int = 0
    duplicated: int = 0
    w_exact: bool = False
    recoveries: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anything here fails the bench
    notes: list[str] = field(default_factory=list)  # figures worth reading, not failures
    skipped: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (not self.skipped and not self.problems and self.lost == 0
                and self.duplicated == 0 and self.w_exact)

    def recovered(self, seconds: float | None, what: str) -> None:
        if seconds is None:
            self.problems.append(f"{what}: no progress within {PROGRESS_TIMEOUT:.0f} s")
        else:
            self.recoveries.append(seconds)


class Run:
    """A throw-away training run in the private servers, its processes and its oracle files."""

    def __init__(self, svc: Services, name: str, participants: int, groups: list[tuple[int, ...]],
                 pace: float, queue_max_length: int, **overrides: object) -> None:
        self.svc = svc
        self.run_id = str(overrides.pop("run_id", "")) or f"chaos-{name}-{uuid.uuid4().hex[:6]}"
        # Integer values within a generous γ and the raw sum: every float32 sum stays exact.
        # epochs=0: participants run until we stop them, however long the faults take.
        fields: dict[str, object] = {"participants": participants, "theta_u": 0.01,
                                     "gamma": 100.0, "rule": "sum", "epochs": 0,
                                     "queue_max_length": queue_max_length, **overrides}
        self.cfg = RunConfig(run_id=self.run_id, **fields)  # type: ignore[arg-type]
        self.names = AmqpNames(self.run_id)
        self.groups = groups
        self.pace = pace
        self.dir = svc.base / self.run_id
        self.records = self.dir / "records"
        self.records.mkdir(parents=True)
        self.store = RunStore(redis_connect(svc.redis_url), self.run_id)
        self.store.create_config(self.cfg)
        self.n = initial_parameters(self.cfg.model, self.cfg.seed).size
        # zero init keeps sums integral
        self.store.init_params(np.zeros(self.n, np.float32), self.cfg.shards)
        conn = amqp_connect(svc.amqp_url, "dssgd-chaos")
        try:
            declare_topology(conn.channel(), self.names, queue_max_length, self.cfg.queue_replicas)
        finally:
            conn.close()
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.workers: dict[tuple[int, ...], subprocess.Popen[bytes]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    # processes

    def _spawn(self, module: str, args: list[str], log: str) -> subprocess.Popen[bytes]:
        p = popen([sys.executable, "-m", f"dssgd.{module}", "--run-id", self.run_id, *args],
                  self.dir / log, env=self.svc.child_env)
        self.procs.append(p)
        return p

    def start_aggregator(self, evaluate: bool = False) -> None:
        # The bench decides when the aggregator stops (SIGTERM, exit code checked); without
        # --keep-serving it would also end by itself once the run is over, and a SIGTERM landing
        # in its interpreter's shutdown then reads as -15.
        args = ["--keep-serving"] + ([] if evaluate else ["--no-eval"])
        self.aggregator = self._spawn("aggregator", args, "aggregator.log")

    def kill_aggregator(self) -> None:
        assert self.aggregator is not None
        stop_process(self.aggregator, signal.SIGKILL)
        self.aggregator = None

    def start_worker(self, group: tuple[int, ...]) -> None:
        name = "-".join(map(str, group))
        self.workers[group] = self._spawn(
            # A stable identity, as supervisor and the fork launcher give: the restarted worker
            # takes its own leases back at once instead of waiting for them to lapse.
            "worker", ["--synthetic", "--participants", ",".join(map(str, group)),
                       "--worker-id", f"chaos-{self.run_id}-{name}",
                       "--record-dir", str(self.records), "--pace", str(self.pace)],
            f"worker-{name}.log")

    def start_workers(self) -> None:
        for g in self.groups:
            self.start_worker(g)

    def kill_worker(self, group: tuple[int, ...]) -> int:
        """SIGKILL a worker; returns how many torn record lines had to be cut off."""
        stop_process(self.workers.pop(group), signal.SIGKILL)
        return sum(repair_tail(self.record(p)) for p in group)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                stop_process(p, signal.SIGKILL)
        # Only matters when the shared broker is the fallback: leave nothing behind there.
        with contextlib.suppress(DssgdError, pika.exceptions.AMQPError, OSError):
            conn = amqp_connect(self.svc.amqp_url, "dssgd-chaos")
            delete_topology(conn.channel(), self.names)
            conn.close()

    # observations

    def version(self) -> int:
        return int(self.store.r.get(self.store.keys.version) or 0)

    def highs(self) -> dict[int, int]:
        raw = self.store.r.hgetall(self.store.keys.dedup)
        return {int(k): decode_state(v)[0] for k, v in raw.items()}

    def next_seq(self, pid: int) -> int:
        """The seq a restarted participant starts from (mirrors worker.participant)."""
        progress = self.store.progress(pid)
        return max(int(progress.get("seq", 0)), int(progress.get("seq_sent", 0)),
                   self.store.applied_high(pid)) + 1

    def depth(self) -> int | None:
        d = queue_depth(self.svc.amqp_url, self.names)
        return None if d is None else d["updates"]

    def record(self, pid: int) -> Path:
        return self.records / f"confirmed-{pid}.jsonl"

    def record_offsets(self) -> dict[int, int]:
        return {p: self.record(p).stat().st_size if self.record(p).exists() else 0
                for p in range(self.cfg.participants)}

    def confirmed_since(self, offsets: dict[int, int]) -> bool:
        """Has every participant had an update confirmed since these file offsets?"""
        for pid, off in offsets.items():
            with self.record(pid).open("rb") as f:
                f.seek(off)
                if b'"confirmed"' not in f.read():
                    return False
        return True

    def await_progress(self) -> None:
        everyone = set(range(self.cfg.participants))
        if not wait_for(lambda: set(self.highs()) >= everyone, PROGRESS_TIMEOUT, 0.1):
            raise SetupError(f"run {self.run_id}: not every participant had an update applied "
                             f"within {PROGRESS_TIMEOUT:.0f} s (logs in {self.dir})")

    def log_lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        out = []
        for path in self.dir.glob("worker-*.log"):
            out += [ln for ln in path.read_text(errors="replace").splitlines() if rx.search(ln)]
        return out

    # the end of a scenario

    def applied_keys(self) -> set[tuple[int, int]]:
        return {(int(p), int(s)) for p, s, *_ in
                (e.split(":", 2) for e in self.store.applied_log())}

    def finish(self, res: Result) -> None:
        """Stop the workers, let the aggregator drain the queue, stop it, check the oracle."""
        self.store.request_stop("chaos scenario over")
        for group, p in list(self.workers.items()):
            try:
                rc = p.wait(timeout=45)  # the stop request alone must end them, with 0
            except subprocess.TimeoutExpired:
                rc = stop_process(p, signal.SIGTERM)
                res.problems.append(f"worker {group} ignored the stop request for 45 s")
            if rc != 0:
                res.problems.append(f"worker {group} exited with {rc} after the stop request")
        if self.aggregator is None:
            self.start_aggregator()
        confirmed = read_oracle(self.records, self.cfg.participants).confirmed
        last = [-1, time.monotonic()]

        def drained() -> bool:
            v = self.version()
            if v != last[0]:
                last[0], last[1] = v, time.monotonic()
            return (time.monotonic() - last[1] >= 1.5 and self.depth() == 0
                    and confirmed <= self.applied_keys())

        if not wait_for(drained, DRAIN_TIMEOUT, 0.25):
            res.problems.append(f"queue not drained within {DRAIN_TIMEOUT:.0f} s")
        assert self.aggregator is not None
        rc = stop_process(self.aggregator, signal.SIGTERM)
        self.aggregator = None
        if rc != 0:
            res.problems.append(f"aggregator exited with {rc} on SIGTERM (expected 0)")
        verify(self, res)


def verify(run: Run, res: Result) -> None:
    """The exact-sum oracle: lost, duplicated, and w/stat byte for byte."""
    oracle = read_oracle(run.records, run.cfg.participants)
    log = run.store.applied_log()
    keys: list[tuple[int, int]] = []
    by_version: dict[int, tuple[int, int]] = {}
    for entry in log:
        pid, seq, version, _staleness, _t = entry.split(":")
        key = (int(pid), int(seq))
        keys.append(key)
        if by_version.setdefault(int(version), key) != key:
            res.problems.append(f"version {version} logged for two different updates")
    counts = Counter(keys)
    applied = set(counts)
    res.confirmed = len(oracle.confirmed)
    res.applied = len(applied)
    res.duplicated = sum(c - 1 for c in counts.values() if c > 1)
    res.lost = len(oracle.confirmed - applied)
    replayed = sum(c - 1 for c in Counter(log).values() if c > 1)
    if replayed:
        # Same entry text twice (same version and time stamp): one commit script that ran twice,
        # not an update applied twice; reported apart so the cause is clear.
        res.notes.append(f"{replayed} of the duplicates are identical log entries (a commit that "
                         f"ran twice)")
    unknown = applied - oracle.sent.keys()
    if unknown:
        res.problems.append(f"{len(unknown)} applied updates were never recorded as sent")
    if oracle.confirmed - oracle.sent.keys():
        res.problems.append("confirmed updates without a sent record")
    if oracle.reused:
        res.problems.append(f"sequence numbers reused with other content: {oracle.reused[:5]}")
    if oracle.torn:
        res.notes.append(f"{oracle.torn} torn record lines (SIGKILL mid-write) ignored")

    version = run.version()
    if sorted(by_version) != list(range(1, version + 1)):
        res.problems.append(f"applied log versions are not exactly 1..{version}")
    # One apply per version: the float32 sum in version order is what w must hold, byte for byte
    # (the aggregator's own arithmetic; for integer values it equals the exact sum).
    w_exp = np.zeros(run.n, np.float32)
    stat_exp = np.zeros(run.n, np.float32)
    for _, key in sorted(by_version.items()):
        if key in oracle.sent:
            idx, vals = oracle.sent[key]
            w_exp[idx] += vals
            stat_exp[idx] += 1
    _, w, stat = run.store.read_params(with_stat=True)
    assert stat is not None
    res.w_exact = (not unknown and w.tobytes() == w_exp.tobytes()
                   and stat.tobytes() == stat_exp.tobytes())
    if not res.w_exact:
        res.problems.append("global parameters differ from the exact sum of the applied updates")

    counters = run.store.counters()
    if counters.get("applied", 0) != len(log):
        res.problems.append(f"counter applied={counters.get('applied', 0)} but the log has "
                            f"{len(log)} entries")
    late = len(applied & (oracle.sent.keys() - oracle.confirmed))
    res.notes.append(f"sent but unconfirmed: {len(oracle.sent) - len(oracle.confirmed)}, of which "
                     f"applied once: {late}; duplicates ignored by the aggregator: "
                     f"{counters.get('duplicates', 0)}")
    rejected = {k: v for k, v in counters.items() if k.startswith("rejected")}
    depth = queue_depth(run.svc.amqp_url, run.names)
    dead = depth["dead_letters"] if depth else None
    if rejected or dead:
        res.notes.append(f"dead-lettered: {dead} (aggregator rejections {rejected})")


# --- the servers and the scenarios ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    aggregator_kills: int
    # (how, seconds the server stays down before it is started again)
    rabbit_faults: tuple[tuple[str, float], ...]
    redis_faults: tuple[tuple[str, float], ...]
    worker_kills: int
    backlog_hold: float  # seconds the full queue keeps refusing publishes
    redis_stalls: int
    settle: float  # seconds of undisturbed traffic between two server restarts
    hostile_rounds: int = 4  # rounds of the five hostile messages
    rate_outage: float = 20.0  # seconds the aggregator is down in rate-backlog
    ordered_outage: float = 65.0  # seconds the aggregator is down in ordered-outage
    f16_updates: int = 30  # per participant in f16-gamma


# Redis outages of 5 and 12 s outlast redis-py's own silent retries (about 5 s) and the 10 s
# socket timeout, so the services' reconnect loops are exercised, not only the client library's.
FULL = Plan(aggregator_kills=20, rabbit_faults=(("stop", 0.0), ("kill9", 0.0)),
            redis_faults=(("term", 0.0), ("kill9", 5.0), ("kill9", 12.0)), worker_kills=8,
            backlog_hold=12.0, redis_stalls=2, settle=3.0)
QUICK = Plan(aggregator_kills=6, rabbit_faults=(("stop", 0.0),),
             redis_faults=(("kill9", 5.0),), worker_kills=3, backlog_hold=5.0, redis_stalls=1,
             settle=1.5, hostile_rounds=2, f16_updates=12)


class Services:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.redis = PrivateRedis(base)
        self.rabbit: PrivateRabbit | None = None
        self.fallback = ""  # why the shared broker is used, if it is

    def start(self) -> None:
        self.redis.start()
        try:
            self.rabbit = PrivateRabbit(self.base)
            self.rabbit.start()
        except (SetupError, OSError, subprocess.SubprocessError) as exc:
            if self.rabbit is not None:
                self.rabbit.close()
            self.rabbit = None
            self.fallback = f"no private RabbitMQ node ({exc}); using the shared broker"
            print(f"[chaos] WARNING: {self.fallback}; the rabbitmq scenario is skipped",
                  flush=True)

    @property
    def amqp_url(self) -> str:
        return self.rabbit.url if self.rabbit is not None else DEFAULT_AMQP_URL

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def child_env(self) -> dict[str, str]:
        # Nothing inherited may point a child at the shared servers or change the run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSSGD_")}
        return {**env, "DSSGD_AMQP_URL": self.amqp_url, "DSSGD_REDIS_URL": self.redis_url,
                "PYTHONUNBUFFERED": "1"}

    @contextlib.contextmanager
    def run(self, name: str, pace: float, participants: int = 4,
            queue_max_length: int = 100_000, **overrides: object) -> Iterator[Run]:
        groups = [tuple(range(i, participants, 2)) for i in range(2)]  # two worker processes
        run = Run(self, name, participants, groups, pace, queue_max_length, **overrides)
        print(f"[chaos]   run {run.run_id}, logs in {run.dir}", flush=True)
        try:
            yield run
        finally:
            run.close()

    def close(self) -> None:
        if self.rabbit is not None:
            self.rabbit.close()
        self.redis.stop()


def scenario_aggregator(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    with svc.run("aggregator", pace=0.05) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        for _ in range(plan.aggregator_kills):
            # Random moment after it has resumed: mid-batch, mid-commit, between acks or idle.
            time.sleep(rng.uniform(0.0, 1.5))
            run.kill_aggregator()
            run.start_aggregator()
            t_end = time.monotonic()
            res.faults += 1
            v0 = run.version()
            res.recovered(time_until(lambda v0=v0: run.version() > v0, t_end), "aggregator kill")
        time.sleep(plan.settle)
        run.finish(res)


def scenario_partitioned(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    """The partitioned aggregator (--ingest 2, each part its own process): SIGKILL one of the
    applier and the two ingests at random moments and restart it."""
    k = 2
    with svc.run("partitioned", pace=0.05) as run:
        base = ["--keep-serving", "--no-eval", "--ingest", str(k), "--part"]

        def start(part: str) -> subprocess.Popen[bytes]:
            return run._spawn("aggregator", [*base, part], f"{part}.log")

        parts = {part: start(part) for part in ("applier", *map(str, range(k)))}
        try:
            run.aggregator = parts["applier"]
            run.start_workers()
            run.await_progress()
            for _ in range(plan.aggregator_kills):
                time.sleep(rng.uniform(0.0, 1.5))
                victim = rng.choice(sorted(parts))
                stop_process(parts[victim], signal.SIGKILL)
                parts[victim] = start(victim)
                run.aggregator = parts["applier"]
                t_end = time.monotonic()
                res.faults += 1
                v0 = run.version()
                res.recovered(time_until(lambda v0=v0: run.version() > v0, t_end),
                              f"{'applier' if victim == 'applier' else 'ingest'} kill")
            time.sleep(plan.settle)
            run.finish(res)
        finally:
            for p in parts.values():
                if p.poll() is None:
                    stop_process(p, signal.SIGTERM)
            with contextlib.suppress(DssgdError, pika.exceptions.AMQPError, OSError):
                conn = amqp_connect(svc.amqp_url, "dssgd-chaos")
                delete_partitions(conn.channel(), run.names, k)
                conn.close()


def _server_faults(run: Run, res: Result, faults: tuple[tuple[str, float], ...], plan: Plan,
                   rng: random.Random, stop: Callable[[str], None], start: Callable[[], None],
                   what: str) -> None:
    for how, down in faults:
        time.sleep(plan.settle + rng.uniform(0.0, 1.0))
        t_fault = time.monotonic()
        stop(how)
        time.sleep(down)
        start()
        t_end = time.monotonic()
        res.faults += 1
        v0 = run.version()
        offsets = run.record_offsets()
        res.recovered(time_until(lambda v0=v0: run.version() > v0, t_end), f"{what} {how}")
        resumed = time_until(lambda v0=v0, offsets=offsets: run.version() > v0
                             and run.confirmed_since(offsets), t_end)
        shown = "never" if resumed is None else f"{resumed:.1f} s"
        res.notes.append(f"{what} {how}: down {t_end - t_fault:.1f} s (restart included); every "
                         f"worker confirmed again and the aggregator applied after {shown}")
        if resumed is None or resumed > RESUME_LIMIT:
            res.problems.append(f"{what} {how}: not everyone resumed within {RESUME_LIMIT:.0f} s")


def scenario_rabbitmq(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    rabbit = svc.rabbit
    if rabbit is None:
        res.skipped = svc.fallback or "no private RabbitMQ node"
        return
    with svc.run("rabbitmq", pace=0.05) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        _server_faults(run, res, plan.rabbit_faults, plan, rng, rabbit.halt, rabbit.start,
                       "RabbitMQ")
        time.sleep(plan.settle)
        run.finish(res)


def scenario_redis(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    def stop(how: str) -> None:
        svc.redis.stop(signal.SIGKILL if how == "kill9" else signal.SIGTERM)

    with svc.run("redis", pace=0.05) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        _server_faults(run, res, plan.redis_faults, plan, rng, stop, svc.redis.start, "Redis")
        time.sleep(plan.settle)
        run.finish(res)


def scenario_worker(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    # A short pace keeps the workers mostly publishing, so kills land mid-epoch and mid-confirm.
    with svc.run("worker", pace=0.02) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        torn = 0
        for _ in range(plan.worker_kills):
            time.sleep(rng.uniform(0.2, 1.5))
            group = rng.choice(run.groups)
            torn += run.kill_worker(group)
            starts = {p: run.next_seq(p) for p in group}
            run.start_worker(group)
            t_end = time.monotonic()
            res.faults += 1
            res.recovered(time_until(lambda g=group, s=starts: all(
                run.store.applied_high(p) >= s[p] for p in g), t_end), f"worker {group} kill")
        if torn:
            res.notes.append(f"{torn} torn record lines cut before restarts")
        time.sleep(plan.settle)
        run.finish(res)


def scenario_backlog(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    limit = 200
    with svc.run("backlog", pace=0.02, queue_max_length=limit) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        time.sleep(rng.uniform(0.0, 1.0))
        run.kill_aggregator()
        t_down = time.monotonic()
        res.faults += 1
        max_depth = [0]

        def depth_at_least(n: int) -> bool:
            d = run.depth() or 0
            max_depth[0] = max(max_depth[0], d)
            return d >= n

        filled = time_until(lambda: depth_at_least(limit), t_down, interval=0.1)
        hold_end = time.monotonic() + plan.backlog_hold
        while time.monotonic() < hold_end:  # keep it full; publishers are being refused now
            depth_at_least(limit)
            time.sleep(0.2)
        refused_before = len(run.log_lines(r"not confirmed \(broker refused"))
        run.start_aggregator()
        t_end = time.monotonic()
        v0 = run.version()
        res.recovered(time_until(lambda: run.version() > v0, t_end), "aggregator back")
        time.sleep(plan.settle)
        run.finish(res)
        refused = run.log_lines(r"not confirmed \(broker refused")
        messages = {m.groups() for m in
                    (re.search(r"participant (\d+) seq (\d+) not confirmed", ln) for ln in refused)
                    if m}
        filled_s = "never" if filled is None else f"{filled:.1f} s"
        res.notes.append(f"queue full (max-length {limit}) after {filled_s}; max depth seen "
                         f"{max_depth[0]}; publishes refused (nacked) {len(refused)} times "
                         f"({refused_before} while the aggregator was down), "
                         f"{len(messages)} distinct updates, each retried until confirmed")
        if not refused:
            res.problems.append("no publish was ever refused: the backlog bound was not reached")
        # A quorum queue refuses only once it is over the limit, so it holds limit + 1, and may
        # overshoot by what is in flight (RabbitMQ's quorum queue guide): one per publisher here.
        slack = run.cfg.participants
        if max_depth[0] > limit + slack:
            res.problems.append(f"queue depth {max_depth[0]} exceeded max-length {limit} by more "
                                f"than the {slack} publishes that can be in flight")


def scenario_redis_stall(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    # A stall longer than the store's 10 s socket timeout: the aggregator gives up on a commit
    # that Redis still executes when it wakes up. Outcome unknown to the writer is the hard case
    # of exactly-once; reloading the state and the replay window must turn the redeliveries of
    # that batch into duplicates.
    with svc.run("redis-stall", pace=0.05) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        for _ in range(plan.redis_stalls):
            time.sleep(plan.settle + rng.uniform(0.0, 1.0))
            svc.redis.pause(12.0)
            t_end = time.monotonic()
            res.faults += 1
            v0 = run.version()
            res.recovered(time_until(lambda v0=v0: run.version() > v0, t_end), "Redis stall")
        time.sleep(plan.settle)
        run.finish(res)


# --- hostile inputs (issue 20): every finding as a scenario, each with lost 0 --------------------


def _hostile_messages(run: Run) -> list[tuple[str, bytes, dict[str, object], str, str]]:
    """(variant, body, headers, routing key, app_id) of what any user allowed to publish can send.

    None needs a valid MAC: the broker accepts them all, and each used to stop the aggregator or
    cost memory (findings 1 and 6)."""
    stray = wire.Update(run.run_id, 0, 10**9, 0, run.n, np.array([1], np.int64),
                        np.array([1.0], np.float32))
    forged = msgpack.unpackb(wire.encode(stray)[6:], raw=False)
    forged.update(ic=2, il=0, ix=b"\xff" * ((run.n - 1 + 1 + 7) // 8))  # every bit set, k = 1
    forged_body = bytes([2, 0, 0, 0, 0, 0]) + msgpack.packb(forged)
    return [
        ("bloated header", b"\x00junk", {"h": "a" * 131_000}, "upd.1", "chaos"),
        ("many headers", b"\x00junk", {f"h{i}": "x" * 20 for i in range(4000)}, "upd.1", "chaos"),
        ("huge routing key", wire.encode(stray), {}, "upd." + "k" * 251, "chaos"),
        ("huge app_id", b"\x00junk", {}, "upd.2", "a" * 255),
        ("forged count", forged_body, {}, "upd.0", "chaos"),
    ]


def _aggregator_log(run: Run) -> str:
    return (run.dir / "aggregator.log").read_text(errors="replace")


def _expect_no_rejections(run: Run, res: Result, *allowed: str) -> None:
    rejected = {k: v for k, v in run.store.counters().items()
                if k.startswith("rejected:") and k.split(":", 1)[1] not in allowed}
    if rejected:
        res.problems.append(f"legitimate updates rejected: {rejected}")


def scenario_hostile_headers(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    with svc.run("hostile-headers", pace=0.05) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        pubs: dict[str, Publisher] = {}
        try:
            for _ in range(plan.hostile_rounds):
                for _variant, body, headers, key, app in _hostile_messages(run):
                    time.sleep(rng.uniform(0.0, 0.3))  # among the workers' updates
                    if app not in pubs:
                        pubs[app] = Publisher(svc.amqp_url, run.names, app_id=app)
                    pubs[app].publish(key, body, headers=headers)
                    res.faults += 1
        finally:
            for pub in pubs.values():
                pub.close()
        time.sleep(plan.settle)
        run.finish(res)
        depth = queue_depth(svc.amqp_url, run.names)
        dead = depth["dead_letters"] if depth else -1
        if dead != res.faults:
            res.problems.append(f"{res.faults} hostile messages sent, {dead} dead-lettered")
        reconnects = _aggregator_log(run).count("reconnecting")
        res.notes.append(f"{res.faults} hostile messages (5 variants), {dead} dead-lettered, "
                         f"aggregator reconnects {reconnects}")
        if reconnects:
            res.problems.append(f"the aggregator reconnected {reconnects} times")
        _expect_no_rejections(run, res, "undecodable", "wrong-routing-key")


def scenario_rate_backlog(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    # Rate limit 1/s, each participant at 0.5/s: a backlog must not look like a flood.
    with svc.run("rate-backlog", pace=2.0, participants=2, rate_limit=1.0) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        run.kill_aggregator()
        res.faults += 1
        time.sleep(plan.rate_outage)
        run.start_aggregator()
        t_end = time.monotonic()
        v0 = run.version()
        res.recovered(time_until(lambda: run.version() > v0, t_end), "aggregator back")
        time.sleep(plan.settle)
        run.finish(res)
        res.notes.append(f"aggregator down {plan.rate_outage:.0f} s, rate limit 1/s, "
                         f"participants at 0.5/s")
        _expect_no_rejections(run, res)


def scenario_f16_gamma(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    # γ = 0.0025 (lr 0.01's) is not a float16 number: values clipped to ±γ used to round above
    # it and be refused. Real clipped values here, so the oracle is the float32 sum in order.
    gamma, participants = 0.0025, 4
    with svc.run("f16-gamma", pace=0.0, participants=participants, value_coding="f16",
                 gamma=gamma) as run:
        run.start_aggregator()
        gen = np.random.default_rng(rng.randrange(2**32))
        pub = Publisher(svc.amqp_url, run.names, app_id="chaos-f16")
        files = {p: run.record(p).open("a") for p in range(participants)}
        try:
            for seq in range(1, plan.f16_updates + 1):
                for pid in range(participants):
                    _send_clipped(run, pub, files[pid], pid, seq, gamma, gen)
                if seq == plan.f16_updates // 2:
                    run.kill_aggregator()
                    run.start_aggregator()
                    res.faults += 1
        finally:
            pub.close()
            for f in files.values():
                f.close()
        run.finish(res)
        _expect_no_rejections(run, res)


def _send_clipped(run: Run, pub: Publisher, record: TextIO, pid: int, seq: int, gamma: float,
                  gen: np.random.Generator) -> None:
    idx = np.sort(gen.choice(run.n, size=200, replace=False)).astype(np.int64)
    vals = np.clip(gen.standard_normal(200) * 2 * gamma, -gamma, gamma).astype(np.float32)
    upd = wire.Update(run.run_id, pid, seq, 0, run.n, idx, vals)
    body = wire.encode(upd, values="f16", bound=gamma)
    sent = wire.decode(body).values  # what the aggregator will apply
    record.write(json.dumps({"seq": seq, "state": "sent", "indices": idx.tolist(),
                             "values": sent.tolist()}) + "\n")
    pub.publish(AmqpNames.routing_key(pid), body)
    record.write(json.dumps({"seq": seq, "state": "confirmed"}) + "\n")
    record.flush()


def scenario_ordered_outage(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    with svc.run("ordered-outage", pace=0.0, participants=2, order="round-robin") as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        assert run.aggregator is not None
        stop_process(run.aggregator, signal.SIGTERM)
        run.aggregator = None
        res.faults += 1
        time.sleep(plan.ordered_outage)  # past the old 30 s give-up and the 60 s turn timeout
        run.start_aggregator()
        t_end = time.monotonic()
        v0 = run.version()
        res.recovered(time_until(lambda: run.version() > v0, t_end), "aggregator back")
        time.sleep(plan.settle)
        run.finish(res)
        _check_turns(run, res)


def _check_turns(run: Run, res: Result) -> None:
    """One holder from download to apply: distinct base versions, intervals that never overlap."""
    downloads = {(pid, seq): t for ev, pid, seq, t in run.store.read_trace() if ev == "d"}
    rows = []
    for entry in run.store.applied_log():
        pid, seq, version, stale, t = entry.split(":", 4)
        rows.append((downloads.get((int(pid), int(seq)), float(t)), float(t),
                     int(version) - 1 - int(stale)))
    rows.sort()
    bases = [b for *_, b in rows]
    shared = len(bases) - len(set(bases))
    overlaps = sum(a1 > d2 for (_, a1, _), (d2, _, _) in itertools.pairwise(rows))
    longest = max((a - d for d, a, _ in rows), default=0.0)
    res.notes.append(f"{len(rows)} turns; longest download-to-apply {longest:.0f} s; shared base "
                     f"versions {shared}; overlapping intervals {overlaps}")
    if shared or overlaps:
        res.problems.append(f"turns broken: {shared} shared bases, {overlaps} overlaps")


def scenario_synthetic_gamma(svc: Services, plan: Plan, rng: random.Random, res: Result) -> None:
    # The default γ (lr / 4 = 0.05): the synthetic oracle used to send |v| >= 1, all refused.
    with svc.run("synthetic-gamma", pace=0.05, gamma=None) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        time.sleep(plan.settle)
        run.kill_aggregator()
        run.start_aggregator()
        res.faults += 1
        time.sleep(plan.settle)
        run.finish(res)
        res.notes.append(f"γ = {run.cfg.effective_gamma}")
        _expect_no_rejections(run, res)


def scenario_dead_participant(svc: Services, plan: Plan, rng: random.Random,
                              res: Result) -> None:
    # Round robin; the worker of participants 1 and 3 dies for good. After the turn timeout
    # they leave `active` and the turn goes round the living only.
    with svc.run("dead-participant", pace=0.0, participants=4, order="round-robin") as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        dead = (1, 3)
        run.kill_worker(dead)
        res.faults += 1
        t_kill = time.monotonic()
        # Gone from `active`, and the turn they held passed on (the next step of housekeeping).
        gone = time_until(lambda: not set(dead) & set(run.store.active())
                          and run.store.turn() not in dead, t_kill, timeout=PROGRESS_TIMEOUT + 30)
        res.recovered(gone, "dead participants leave active")
        v0, t0, handed = run.version(), time.monotonic(), 0
        while time.monotonic() - t0 < 10.0:
            handed += run.store.turn() in dead
            time.sleep(0.1)
        rate = (run.version() - v0) / 10.0
        res.notes.append(f"dead participants left active after "
                         f"{'never' if gone is None else f'{gone:.0f} s'}; then {rate:.1f} "
                         f"applies/s, turn seen with a dead participant {handed} times")
        if handed or rate < 1.0:
            res.problems.append(f"turn still handed to the dead ({handed}) or stalled ({rate}/s)")
        run.finish(res)


def scenario_evaluator_points(svc: Services, plan: Plan, rng: random.Random,
                              res: Result) -> None:
    # Every point's version and totals must come from one commit: version == applied here.
    with svc.run("evaluator-points", pace=0.05, eval_interval=0.2) as run:
        run.start_aggregator(evaluate=True)
        run.start_workers()
        run.await_progress()
        for _ in range(2):
            time.sleep(plan.settle + 2.0)
            run.kill_aggregator()
            run.start_aggregator(evaluate=True)
            res.faults += 1
        time.sleep(plan.settle + 2.0)
        run.finish(res)
        points = run.store.metrics()
        bad = [p for p in points if int(p["version"]) != int(p["applied"])]
        res.notes.append(f"{len(points)} evaluator points, {len(bad)} with version != applied")
        if not points or bad:
            res.problems.append(f"inconsistent evaluator points: {bad[:3]} of {len(points)}")


SCENARIOS: dict[str, Callable[[Services, Plan, random.Random, Result], None]] = {
    "aggregator": scenario_aggregator,
    "partitioned": scenario_partitioned,
    "rabbitmq": scenario_rabbitmq,
    "redis": scenario_redis,
    "worker": scenario_worker,
    "backlog": scenario_backlog,
    "redis-stall": scenario_redis_stall,
    "hostile-headers": scenario_hostile_headers,
    "rate-backlog": scenario_rate_backlog,
    "f16-gamma": scenario_f16_gamma,
    "ordered-outage": scenario_ordered_outage,
    "synthetic-gamma": scenario_synthetic_gamma,
    "dead-participant": scenario_dead_participant,
    "evaluator-points": scenario_evaluator_points,
}
# By default only: a 12 s stall, a 65 s outage and a 60 s turn timeout do not fit in minutes.
QUICK_SKIPS = ("redis-stall", "ordered-outage", "dead-participant")


def run_scenario(name: str, svc: Services, plan: Plan, rng: random.Random) -> Result:
    res = Result(name)
    t0 = time.monotonic()
    print(f"[chaos] {name} …", flush=True)
    try:
        SCENARIOS[name](svc, plan, rng, res)
    except (SetupError, DssgdError, redis.RedisError, pika.exceptions.AMQPError, OSError,
            subprocess.SubprocessError) as exc:
        res.problems.append(f"scenario aborted: {exc}")
    res.seconds = time.monotonic() - t0
    verdict = "SKIPPED" if res.skipped else "ok" if res.ok else "FAILED"
    print(f"[chaos] {name}: {verdict} in {res.seconds:.0f} s", flush=True)
    return res


# --- report ------------------------------------------------------------------------------------


def _fmt_s(values: list[float], f: Callable[[list[float]], float]) -> str:
    return f"{f(values):.2f} s" if values else "-"


def table(results: list[Result]) -> str:
    head = (f"{'scenario':<16} {'faults':>6} {'confirmed':>9} {'applied':>7} {'lost':>4} "
            f"{'dup':>4} {'w exact':>7} {'recovery max':>12} {'median':>8} {'verdict':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.scenario:<16} {'skipped: ' + r.skipped}")
            continue
        verdict = "ok" if r.ok else "FAILED"
        lines.append(f"{r.scenario:<16} {r.faults:>6} {r.confirmed:>9} {r.applied:>7} "
                     f"{r.lost:>4} {r.duplicated:>4} {'yes' if r.w_exact else 'NO':>7} "
                     f"{_fmt_s(r.recoveries, max):>12} {_fmt_s(r.recoveries, statistics.median):>8}"
                     f" {verdict:>7}")
    lines.append("")
    for r in results:
        for p in r.problems:
            lines.append(f"  {r.scenario}: FAILED: {p}")
        for n in r.notes:
            lines.append(f"  {r.scenario}: {n}")
    return "\n".join(lines)


class Interrupted(BaseException):
    """A signal: unwind through every finally (no `except Exception` may swallow it), so the
    private servers are stopped."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer faults and no redis-stall unless named: 2–3 minutes")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="run only this scenario (repeatable; default: all, in order)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault timing")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (server data, logs, oracle files)")
    args = ap.parse_args(argv)
    names = args.scenario or [n for n in SCENARIOS if not (args.quick and n in QUICK_SKIPS)]
    plan = QUICK if args.quick else FULL
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)

    global _LIBC
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork, used in the child
    # SIGINT too: started in the background of a script, Python would otherwise inherit it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    for node in reap_orphans():
        print(f"[chaos] stopped {node}, left running by an earlier bench that was killed",
              flush=True)
    base = Path(tempfile.mkdtemp(prefix="dssgd-chaos-"))
    results: list[Result] = []
    t0 = time.monotonic()
    svc: Services | None = None
    try:
        svc = Services(base)
        svc.start()
        rabbit = (f"RabbitMQ {svc.rabbit.version} node {svc.rabbit.node} on "
                  f"127.0.0.1:{svc.rabbit.port}" if svc.rabbit else svc.fallback)
        given = " ".join(argv if argv is not None else sys.argv[1:])
        print(f"[chaos] python -m bench.chaos {given}".rstrip())
        print(f"[chaos] {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {platform.node()}, "
              f"{os.cpu_count()} cores, {'quick' if args.quick else 'full'} plan, seed {seed}\n"
              f"[chaos] private Redis {svc.redis.version} (appendonly yes, appendfsync always) "
              f"on 127.0.0.1:{svc.redis.port}; {rabbit}; work dir {base}", flush=True)
        for name in names:
            results.append(run_scenario(name, svc, plan, rng))
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"[chaos] interrupted ({exc}); stopping the private servers",
              file=sys.stderr, flush=True)
        return 130
    except SetupError as exc:
        print(f"[chaos] cannot start the private servers: {exc}", file=sys.stderr)
        return 3
    finally:
        # Ignore further signals while cleaning up, so a second Ctrl-C cannot leave a node behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if svc is not None:
            svc.close()
        if args.keep:
            print(f"[chaos] kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(results))
    print(f"\nrecovery = from the restart command's return to the next increase of the global "
          f"version (worker: to the restarted participants' next applied update); "
          f"total {time.monotonic() - t0:.0f} s")
    if any(not r.skipped and not r.ok for r in results):
        return 1
    return 3 if any(r.skipped for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
