"""Private Redis servers for tests and benches: one server, or a 3-master Redis Cluster, started
as processes on ports of their own and stopped by pid (never the shared server on 6379)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class PrivateServer:
    """One redis-server on ``port``, no persistence, for byte counts and cluster nodes."""

    def __init__(
        self,
        port: int,
        cluster: bool = False,
        folder: Path | None = None,
        durable: bool = False,
        bus_port: int | None = None,
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port
        self.folder = folder or Path(tempfile.mkdtemp(prefix=f"dssgd-redis-{port}-"))
        # durable: every write fsynced before the reply, as production runs it (a restart after
        # kill -9 then loses nothing that was acknowledged).
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if durable
            else ["--appendonly", "no"]
        )
        args = [exe, "--port", str(port), "--save", "", *aof]
        args += ["--dir", str(self.folder), "--bind", "127.0.0.1"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            args += ["--cluster-node-timeout", "2000"]
            if bus_port is not None:  # else port + 10000, outside a caller's own port range
                args += ["--cluster-port", str(bus_port)]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def output_bytes(self) -> int:
        """What the server has sent to all its clients (``INFO stats``)."""
        stats = redis.Redis(port=self.port).info("stats")
        return int(stats["total_net_output_bytes"])

    def kill(self) -> None:
        """kill -9: no chance to write anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateCluster:
    """A Redis Cluster of ``masters`` masters (and ``replicas`` per master) on ports from
    ``base``, created with ``redis-cli --cluster create``."""

    def __init__(
        self,
        base: int,
        masters: int = 3,
        replicas: int = 0,
        durable: bool = False,
        bus_base: int | None = None,
    ) -> None:
        self.nodes: list[PrivateServer] = []
        try:
            for i in range(masters * (1 + replicas)):
                bus = None if bus_base is None else bus_base + i
                node = PrivateServer(base + i, cluster=True, durable=durable, bus_port=bus)
                self.nodes.append(node)
            cmd = ["redis-cli", "--cluster", "create"]
            cmd += [f"127.0.0.1:{node.port}" for node in self.nodes]
            cmd += ["--cluster-replicas", str(replicas), "--cluster-yes"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            self.wait_ok(timeout=90)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Seconds until every live node reports cluster_state:ok."""
        t0 = time.monotonic()
        while True:
            states = []
            for node in self.nodes:
                if node.proc is None or node.proc.poll() is not None:
                    continue
                try:
                    info = redis.Redis(port=node.port, decode_responses=True).cluster("info")
                    states.append(info.get("cluster_state") == "ok")
                except redis.exceptions.RedisError:
                    states.append(False)
            if states and all(states):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def master_of(self, key: str) -> PrivateServer:
        """The node currently serving ``key``'s slot as a master."""
        c = redis.RedisCluster.from_url(self.url)
        try:
            node = c.get_node_from_key(key)
            return next(n for n in self.nodes if n.port == int(node.port))
        finally:
            c.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
