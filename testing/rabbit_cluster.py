"""A private 3-node RabbitMQ cluster as plain processes, for the cluster bench and tests.

    with RabbitCluster(base_port=17200) as cluster:   # epmd, 3 nodes, joined, in ~20-40 s
        url = cluster.url                             # amqp://guest:guest@h:p1,h:p2,h:p3/%2F
        leader = cluster.leader(queue_name)           # "rabbitB@localhost"
        cluster.kill9(leader); cluster.start_node(leader)   # it rejoins on its own

Everything is private to this object: its own Erlang port mapper (``ERL_EPMD_PORT``), node
names, AMQP and distribution ports, data, logs and cookie in a temporary directory, the CLI's
distribution ports too. Nothing touches the shared broker on 5672 or its epmd on 4369, and
every process is stopped by its pid. Port layout from ``base_port`` (the 100 ports of a range):
epmd +0, AMQP +1..+3, node distribution +11..+13, CLI distribution +50..+99.

``+S 1:1`` (one scheduler each) and no busy-waiting schedulers let three Erlang VMs share two
cores with the services under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

NODE_NAMES = ("rabbitA", "rabbitB", "rabbitC")
# One scheduler, no busy waiting; distribution on loopback only, like the AMQP listener.
ERL_ARGS = ("+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none "
            "-kernel inet_dist_use_interface {127,0,0,1}")
OWNER_VAR = "DSSGD_RMQ_CLUSTER_OWNER"  # marks our processes, so orphans can be found by pid


class ClusterError(Exception):
    """The private cluster could not be started, joined or stopped."""


def _tool(name: str) -> str:
    # Debian's /usr/sbin wrappers `su` to the rabbitmq user, whose HOME holds the shared node's
    # cookie and who cannot write our temporary directory; the real scripts run as us.
    real = Path("/usr/lib/rabbitmq/bin") / name
    if real.exists():
        return str(real)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(cond: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Node:
    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.short = NODE_NAMES[index]
        self.name = f"{self.short}@localhost"
        self.port = cluster.base_port + 1 + index
        self.dist_port = cluster.base_port + 11 + index
        self.dir = cluster.dir / self.short
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management: no 15672 clash
        # max_message_size: what dssgd needs (wire.MAX_MESSAGE_BYTES, 8 MiB, plus 1 MiB).
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"max_message_size = {9 * 1024 * 1024}\n"
        )
        # Our own env file, or /etc/rabbitmq/rabbitmq-env.conf would rename us.
        (self.dir / "rabbitmq-env.conf").write_text("# private node of testing.rabbit_cluster\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the Erlang VM's own pid (what kill -9 hits)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def env(self) -> dict[str, str]:
        d, c = str(self.dir), self.cluster
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": str(c.dir),  # one cookie for the three nodes and their CLI, no one else's
            OWNER_VAR: str(os.getpid()),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(c.base_port + 50),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(c.base_port + 99),
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
            "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "ERL_EPMD_PORT": str(c.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": f"{d}/erl_crash.dump",
        }

    def ctl(self, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl"
            ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([_tool(tool), "-n", self.name, *args], env=self.env,
                                  cwd=self.dir, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout} s")

    def spawn(self) -> None:
        log = (self.dir / "server.log").open("ab")
        self.proc = subprocess.Popen([_tool("rabbitmq-server")], env=self.env, cwd=self.dir,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def await_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.dir / 'server.log'}")
            # await_startup fails at once while the node has not registered with epmd yet.
            r = self.ctl("await_startup", "--timeout", "20", timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} did not start: "
                                   f"{(r.stderr or r.stdout).strip()[-400:]}")
            time.sleep(0.3)
        r = self.ctl("eval", "list_to_integer(os:getpid()).", timeout=30)
        if r.returncode != 0:
            raise ClusterError(f"cannot read the pid of {self.name}: {r.stderr.strip()}")
        self.pid = int(r.stdout.strip())

    def kill9(self) -> None:
        if self.pid is None or not _alive(self.pid):
            raise ClusterError(f"{self.name} is not running")
        os.kill(self.pid, signal.SIGKILL)
        pid = self.pid
        if not _wait(lambda: not _alive(pid), 30):
            raise ClusterError(f"{self.name} (pid {pid}) survived SIGKILL")
        self.pid = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)  # the wrapper shell follows its VM

    def stop(self) -> None:
        """Graceful, then by pid if the node did not go."""
        if self.pid is not None and _alive(self.pid):
            self.ctl("shutdown", timeout=60)
            pid = self.pid
            if not _wait(lambda: not _alive(pid), 20):
                os.kill(pid, signal.SIGKILL)
        self.pid = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.proc = None


class RabbitCluster:
    """Three RabbitMQ nodes joined into one cluster, behind a private epmd."""

    def __init__(self, base_port: int = 17200, base_dir: Path | None = None) -> None:
        self.base_port = base_port
        self.epmd_port = base_port
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dssgd-rmqcluster-"))
        self._own_dir = base_dir is None
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        self.nodes = [Node(self, i) for i in range(len(NODE_NAMES))]
        self.epmd: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        """One URL naming every node (comma-separated hosts), as dssgd's settings take it."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"amqp://guest:guest@{hosts}/%2F"

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if name in (n.name, n.short):
                return n
        raise KeyError(name)

    # --- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> float:
        """Start epmd and the three nodes, join B and C to A; returns the seconds it took."""
        t0 = time.monotonic()
        epmd = shutil.which("epmd")
        if epmd is None:
            raise ClusterError("epmd is not installed")
        log = (self.dir / "epmd.log").open("ab")
        self.epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env={**os.environ, OWNER_VAR: str(os.getpid())}, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            for n in self.nodes:  # in parallel: each boot is mostly waiting on its own VM
                n.spawn()
            for n in self.nodes:
                n.await_up(timeout)
            first = self.nodes[0]
            for n in self.nodes[1:]:
                for step in (("stop_app",), ("join_cluster", first.name), ("start_app",)):
                    r = n.ctl(*step, timeout=120)
                    if r.returncode != 0:
                        raise ClusterError(f"{n.name} {' '.join(step)}: "
                                           f"{(r.stderr or r.stdout).strip()[-400:]}")
            running = self.running_nodes()
            if sorted(running) != sorted(n.name for n in self.nodes):
                raise ClusterError(f"cluster formed with {running} only")
            v = first.ctl("version", timeout=30)
            self.version = v.stdout.strip() if v.returncode == 0 else "?"
        except BaseException:
            self.close()
            raise
        return time.monotonic() - t0

    def start_node(self, name: str, timeout: float = 120.0) -> float:
        """Start a stopped or killed node again: it rejoins the cluster from its own data."""
        n = self.node(name)
        t0 = time.monotonic()
        n.spawn()
        n.await_up(timeout)
        return time.monotonic() - t0

    def kill9(self, name: str) -> None:
        self.node(name).kill9()

    def close(self) -> None:
        for n in self.nodes:
            n.stop()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.send_signal(signal.SIGKILL)
            self.epmd.wait(timeout=10)
        self.epmd = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- looking at it -----------------------------------------------------------------------

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.pid is not None and _alive(n.pid)]

    def running_nodes(self) -> list[str]:
        for n in self.live():
            r = n.ctl("cluster_status", "--formatter", "json", timeout=30)
            if r.returncode == 0:
                return list(json.loads(r.stdout).get("running_nodes", []))
        return []

    def queue_info(self, queue: str) -> dict[str, object]:
        """The queue's type, leader and members, asked of any live node."""
        for n in self.live():
            r = n.ctl("list_queues", "name", "type", "leader", "members", "online",
                      "--formatter", "json", "-q", timeout=30)
            if r.returncode != 0:
                continue
            for row in json.loads(r.stdout or "[]"):
                if row.get("name") == queue:
                    return dict(row)
        raise ClusterError(f"no live node knows queue {queue}")

    def leader(self, queue: str) -> str:
        return str(self.queue_info(queue)["leader"])


def reap_orphans() -> list[int]:
    """Kill the processes of clusters whose owner died (a SIGKILLed bench); their pids."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        owner = next((e.split(b"=", 1)[1] for e in env if e.startswith(OWNER_VAR.encode())), None)
        if owner is None or not owner.isdigit() or int(owner) == os.getpid():
            continue
        if not _alive(int(owner)) and _alive(int(entry.name)):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                out.append(int(entry.name))
    return out
