"""Private RabbitMQ and Redis that speak only TLS and require a client certificate.

Made for tests/integration/test_tls.py and the TLS bench: certificates from
``dssgd.shared.provision`` (what ``dssgd provision --tls-dir`` makes), servers on ports from
DSSGD_TLS_TEST_PORTS (default 17400-17438), a private Erlang port mapper, stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dssgd.shared.provision import TlsBundle, ensure_tls, issue, make_ca
from dssgd.shared.tls import with_files

from bench.chaos import SetupError, free_port, stop_process, wait_for
from bench.soak import SoakRabbit

PORTS = os.environ.get("DSSGD_TLS_TEST_PORTS", "17400-17438")


def make_certs(base: Path) -> tuple[TlsBundle, TlsBundle]:
    """(the deployment's CA with server and client certificates, a stranger's CA and client)."""
    good = TlsBundle(base / "tls")
    hosts = ["localhost", "127.0.0.1"]
    ensure_tls(good, {"rabbitmq": hosts, "redis": hosts}, ["admin"])
    other = TlsBundle(base / "other-ca")
    make_ca(other, "someone else's CA")
    issue(other, "client-admin", "admin", None)
    return good, other


def tls_url(scheme: str, port: int, bundle: TlsBundle, client: bool = True,
            ca: TlsBundle | None = None, creds: str = "guest:guest@", path: str = "/%2F") -> str:
    """A URL for these servers: the client certificate of ``bundle``, trusting ``ca``'s CA."""
    url = f"{scheme}://{creds}127.0.0.1:{port}{path}"
    name = bundle.client_name("admin")
    trust = str((ca or bundle).ca)
    if not client:
        return with_files(url, trust)
    return with_files(url, trust, str(bundle.cert(name)), str(bundle.key(name)))


class TlsRedis:
    def __init__(self, base: Path, bundle: TlsBundle, port: int) -> None:
        self.dir = base / "redis-tls"
        self.dir.mkdir()
        self.port, self.bundle = port, bundle
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is not installed")
        b = self.bundle
        args = [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(b.cert("server-redis")),
                "--tls-key-file", str(b.key("server-redis")),
                "--tls-ca-cert-file", str(b.ca), "--tls-auth-clients", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log")]
        with (self.dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir)
        log = self.dir / "redis.log"
        if not wait_for(lambda: log.exists() and "Ready to accept" in log.read_text(), 15):
            raise SetupError(f"TLS Redis did not start: {log.read_text()[-400:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None


class TlsRabbit(SoakRabbit):
    """The soak's private node with only a TLS listener that requires a client certificate."""

    def __init__(self, base: Path, bundle: TlsBundle, epmd: int, ctl: tuple[int, int]) -> None:
        super().__init__(base, epmd, ctl)
        self.node = f"dssgd-tls-{os.getpid()}@localhost"
        self.bundle = bundle
        b = bundle
        (self.dir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {b.ca}\n"
            f"ssl_options.certfile = {b.cert('server-rabbitmq')}\n"
            f"ssl_options.keyfile = {b.key('server-rabbitmq')}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            "loopback_users = none\n"
        )

    @property
    def url(self) -> str:
        return tls_url("amqps", self.port, self.bundle)

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.pop("RABBITMQ_NODE_PORT", None)  # the TLS listener is in rabbitmq.conf
        return env


class TlsServers:
    """Both servers, started in parallel (RabbitMQ's boot is the slow part)."""

    def __init__(self, base: Path) -> None:
        lo, hi = (int(x) for x in PORTS.split("-"))
        import bench.chaos as chaos

        chaos.PORT_RANGE = f"{lo + 1}-{hi - 10}"
        self.base = base
        self.good, self.other = make_certs(base)
        self.redis = TlsRedis(base, self.good, free_port())
        self.rabbit = TlsRabbit(base, self.good, lo, (hi - 9, hi))

    def start(self) -> None:
        t0 = time.monotonic()
        self.redis.start()
        self.rabbit.start(timeout=240)  # a loaded 2-core machine can take minutes
        self.seconds = time.monotonic() - t0

    def stop(self) -> None:
        self.redis.stop()
        # A throw-away node: SIGKILL by pid is instant, a graceful shutdown costs seconds.
        if self.rabbit._own_pids():
            self.rabbit._kill(signal.SIGKILL)
        else:
            self.rabbit.close()
        self.rabbit.stop_epmd()

    def redis_url(self, **kw: object) -> str:
        return tls_url("rediss", self.redis.port, kw.pop("bundle", self.good),  # type: ignore[arg-type]
                       creds="", path="/0", **kw)  # type: ignore[arg-type]

    def amqp_url(self, **kw: object) -> str:
        return tls_url("amqps", self.rabbit.port, kw.pop("bundle", self.good),  # type: ignore[arg-type]
                       **kw)  # type: ignore[arg-type]
