"""Least privilege for a run: broker users, Redis ACL users and message-authentication keys.

``dssgd provision RUN`` creates, for every participant p:

* a RabbitMQ user ``dssgd-<run>-p<p>`` that may only publish to the run's update exchange, only
  with routing key ``upd.<p>`` (topic permission), and whose messages must carry
  ``user_id = <its name>`` (the broker refuses another user's id; the aggregator refuses none);
* a Redis ACL user of the same name that can read the run's keys but write only its own
  progress, heartbeat, trace and wake-up keys — every write to the parameters is ``NOPERM``;
* a 32-byte secret for HMAC-SHA256 message authentication.

and an aggregator user on each side with only what the aggregator needs. Credentials go to
``<dir>/p<p>.json`` (what ``dssgd worker --credentials`` reads) and ``<dir>/aggregator.json``
(every participant's key; the aggregator verifies with them), mode 0600, never logged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, DssgdError, StoreError
from dssgd.shared.keys import Keys
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tls import with_files


def participant_user(run_id: str, participant: int) -> str:
    return f"dssgd-{run_id}-p{participant}"


def aggregator_user(run_id: str) -> str:
    return f"dssgd-{run_id}-aggregator"


@dataclass(frozen=True)
class Management:
    """The RabbitMQ management HTTP API (the portable way to manage users and permissions)."""

    url: str  # e.g. http://127.0.0.1:15672
    user: str
    password: str

    @classmethod
    def from_amqp_url(cls, amqp_url: str, management_url: str | None = None) -> Management:
        from dssgd.shared.broker import endpoints

        # A cluster's URL names every node; any node's management API serves the whole cluster.
        parts = urllib.parse.urlparse(endpoints(amqp_url)[0])
        base = (
            management_url
            or os.environ.get("DSSGD_MANAGEMENT_URL")
            or f"http://{parts.hostname or '127.0.0.1'}:15672"
        )
        return cls(
            base.rstrip("/"),
            urllib.parse.unquote(parts.username or "guest"),
            urllib.parse.unquote(parts.password or "guest"),
        )

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "DELETE":
                return None
            raise BrokerError(f"RabbitMQ management API {method} {path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerError(
                f"RabbitMQ management API at {self.url} unreachable ({exc}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`"
            ) from exc


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _re(text: str) -> str:
    return text.replace(".", r"\.")


# Commands, not categories: `+@connection` would include CLIENT KILL, `+@scripting` SCRIPT FLUSH.
_CONNECTION = ["+ping", "+hello", "+auth", "+select", "+client|setname"]
_SCRIPTS = ["+evalsha", "+eval", "+evalsha_ro", "+eval_ro", "+script|load"]
# What a worker does with its own keys: read the run, write progress, lease, trace, wake-up.
_PARTICIPANT_COMMANDS = [
    *_CONNECTION,
    *_SCRIPTS,
    "+time",
    "+get",
    "+mget",
    "+exists",
    "+hget",
    "+hgetall",
    "+hmget",
    "+hexists",
    "+lrange",
    "+llen",
    "+set",
    "+hset",
    "+rpush",
    "+ltrim",
    "+blpop",
    "+multi",
    "+exec",
    "+discard",
]


def participant_acl(run_id: str, participant: int, secret: str) -> list[str]:
    """ACL SETUSER arguments of a participant: read the run, write only keys of its own."""
    k = Keys(run_id)
    # k.model: the model record a worker checks its own model against.
    reads = [k.config, k.layout, *k.param_patterns(), k.version, k.dedup, k.turn, k.stop, k.model]
    own = [k.participant(participant), k.wake(participant), k.lease(participant)]
    own.append(k.trace(participant))
    return [
        "reset",
        "on",
        f">{secret}",
        *(f"%R~{key}" for key in reads),
        *(f"%RW~{key}" for key in own),
        *_PARTICIPANT_COMMANDS,
    ]


def aggregator_acl(run_id: str, secret: str) -> list[str]:
    """Read the whole run; write what only the aggregator writes (never a participant's keys)."""
    k = Keys(run_id)
    writes = [k.layout, *k.param_patterns(), k.version, k.dedup, k.counters, k.fence, k.metrics]
    writes += [k.model, *k.shard_patterns()]
    writes += [k.applied_log, k.turn, k._k("wake:*"), k.heartbeat_aggregator]
    return [
        "reset",
        "on",
        f">{secret}",
        f"%R~{k.all_patterns()[0]}",
        *(f"%RW~{key}" for key in writes),
        *_CONNECTION,
        *_SCRIPTS,
        "+@read",
        "+@write",
        "+@transaction",
        "+time",
        "-@dangerous",
    ]


def provision(
    run_id: str,
    participants: int,
    amqp_url: str,
    redis_url: str,
    out_dir: Path,
    management_url: str | None = None,
    cfg: RunConfig | None = None,
    tls: TlsBundle | None = None,
) -> dict[str, Any]:
    """Create the run (when `cfg` is given), every user and key of it; returns a summary.

    All or nothing: if any step fails, the users made so far are removed again and the run is
    not created, so a retry starts clean.
    """
    if participants < 1:
        raise ConfigError("a run needs at least one participant")
    if cfg is not None and cfg.participants != participants:
        raise ConfigError(
            f"--participants {participants} differs from the run configuration's {cfg.participants}"
        )
    mgmt = Management.from_amqp_url(amqp_url, management_url)
    r = redis_connect(redis_url)  # rediss:// too (shared/tls.py)
    store = RunStore(r, run_id)
    if cfg is not None and store.load_config() is not None:
        raise ConfigError(
            f"run {run_id!r} already exists; provision a new run id, or `dssgd delete {run_id}` "
            "first"
        )
    _prepare_dir(out_dir)
    try:
        summary = _create_users(run_id, participants, amqp_url, redis_url, out_dir, mgmt, r, tls)
        if cfg is not None:
            _create_run(store, amqp_url, cfg)
    except BaseException:
        with contextlib.suppress(DssgdError, redis.RedisError):
            deprovision(run_id, participants, amqp_url, redis_url, management_url)
        for f in out_dir.glob("*.json"):
            f.unlink(missing_ok=True)
        raise
    summary["run_created"] = cfg is not None
    return summary


def _prepare_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(out_dir, 0o700)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write credential files to {out_dir}: {exc.strerror}; choose another --out"
        ) from None


def _create_run(store: RunStore, amqp_url: str, cfg: RunConfig) -> None:
    """The run's configuration (with the admin's rights: it registers in `dssgd:runs`) and its
    queues, so the least-privileged aggregator and workers find everything in place."""
    from dssgd.shared.broker import connect as amqp_connect
    from dssgd.shared.broker import declare_topology

    conn = amqp_connect(amqp_url, f"dssgd-provision {cfg.run_id}")
    try:
        declare_topology(
            conn.channel(), AmqpNames(cfg.run_id), cfg.queue_max_length, cfg.queue_replicas
        )
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    store.create_config(cfg)


@dataclass(frozen=True)
class _Endpoints:
    """Where the run's users connect; credential files carry URLs built from these."""

    vhost: str
    hosts: str  # "h:p", or "h1:p1,h2:p2,..." for a cluster (every node, in the given order)
    rhost: str
    rport: int
    rdb: str
    amqp_scheme: str = "amqp"
    redis_scheme: str = "redis"
    tls: TlsBundle | None = None  # credential URLs then name the CA and the user's certificate

    @classmethod
    def parse(cls, amqp_url: str, redis_url: str, tls: TlsBundle | None = None) -> _Endpoints:
        from dssgd.shared.broker import endpoints

        nodes = [urllib.parse.urlparse(u) for u in endpoints(amqp_url)]
        parts = nodes[0]
        vhost = urllib.parse.unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
        rparts = urllib.parse.urlparse(redis_url)
        return cls(
            vhost=vhost,
            hosts=",".join(
                f"{n.hostname or '127.0.0.1'}:{n.port or (5671 if n.scheme == 'amqps' else 5672)}"
                for n in nodes
            ),
            rhost=rparts.hostname or "127.0.0.1",
            rport=rparts.port or 6379,
            rdb=rparts.path or "/0",
            amqp_scheme=parts.scheme or "amqp",
            redis_scheme=rparts.scheme or "redis",
            tls=tls,
        )

    def _with_tls(self, url: str, user: str, scheme: str) -> str:
        if self.tls is None or not scheme.endswith("s"):
            return url
        name = self.tls.client_name(user)
        return with_files(url, str(self.tls.ca.resolve()), str(self.tls.cert(name).resolve()),
                          str(self.tls.key(name).resolve()))

    def amqp_url(self, user: str, secret: str) -> str:
        s = self.amqp_scheme
        url = f"{s}://{_q(user)}:{_q(secret)}@{self.hosts}/{_q(self.vhost)}"
        return self._with_tls(url, user, s)

    def redis_url(self, user: str, secret: str) -> str:
        s = self.redis_scheme
        url = f"{s}://{_q(user)}:{_q(secret)}@{self.rhost}:{self.rport}{self.rdb}"
        return self._with_tls(url, user, s)


def _create_participant(
    run_id: str, p: int, at: _Endpoints, out_dir: Path, mgmt: Management, r: redis.Redis
) -> str:
    """One participant's broker user, Redis ACL user and credential file; its HMAC key."""
    names = AmqpNames(run_id)
    user = participant_user(run_id, p)
    secret = secrets.token_urlsafe(24)
    key = secrets.token_hex(32)
    mgmt.call("PUT", f"/api/users/{_q(user)}", {"password": secret, "tags": ""})
    # Write only to the run's update exchange; no configure, no read.
    mgmt.call(
        "PUT",
        f"/api/permissions/{_q(at.vhost)}/{_q(user)}",
        {"configure": "^$", "write": f"^{_re(names.exchange)}$", "read": "^$"},
    )
    # ...and on that exchange only its own routing key.
    mgmt.call(
        "PUT",
        f"/api/topic-permissions/{_q(at.vhost)}/{_q(user)}",
        {"exchange": names.exchange, "write": f"^upd\\.{p}$", "read": "^$"},
    )
    # Redis: read the run, write only its own keys. %R~ / %RW~ need Redis >= 7.
    r.execute_command("ACL", "SETUSER", user, *participant_acl(run_id, p, secret))
    creds = {
        "run_id": run_id,
        "participant": p,
        "amqp_user": user,
        "amqp_url": at.amqp_url(user, secret),
        "redis_url": at.redis_url(user, secret),
        "hmac_key": key,
    }
    _write_secret(out_dir / f"p{p}.json", creds)
    return key


def _create_users(
    run_id: str,
    participants: int,
    amqp_url: str,
    redis_url: str,
    out_dir: Path,
    mgmt: Management,
    r: redis.Redis,
    tls: TlsBundle | None = None,
) -> dict[str, Any]:
    at = _Endpoints.parse(amqp_url, redis_url, tls)
    agg_name = aggregator_user(run_id)
    agg_secret = secrets.token_urlsafe(24)
    run_names = f"^dssgd\\.{_re(run_id)}\\..*"
    mgmt.call("PUT", f"/api/users/{_q(agg_name)}", {"password": agg_secret, "tags": ""})
    mgmt.call(
        "PUT",
        f"/api/permissions/{_q(at.vhost)}/{_q(agg_name)}",
        {"configure": run_names, "write": run_names, "read": run_names},
    )
    hmac_keys: dict[str, str] = {}
    try:
        for p in range(participants):
            hmac_keys[str(p)] = _create_participant(run_id, p, at, out_dir, mgmt, r)
        r.execute_command("ACL", "SETUSER", agg_name, *aggregator_acl(run_id, agg_secret))
    except redis.RedisError as exc:
        raise StoreError(f"cannot create Redis ACL users at {at.rhost}:{at.rport}: {exc}") from exc
    _write_secret(
        out_dir / "aggregator.json",
        {
            "run_id": run_id,
            "amqp_user": agg_name,
            "amqp_url": at.amqp_url(agg_name, agg_secret),
            "redis_url": at.redis_url(agg_name, agg_secret),
            "hmac_keys": hmac_keys,
            "participants": participants,
        },
    )
    return {
        "run_id": run_id,
        "participants": participants,
        "directory": str(out_dir),
        "rabbitmq_users": participants + 1,
        "redis_users": participants + 1,
    }


def is_run_user(run_id: str, name: str) -> bool:
    """True for the names provision gives a run's users: dssgd-<run>-aggregator, -p<N>."""
    prefix = f"dssgd-{run_id}-"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return tail == "aggregator" or (tail[:1] == "p" and tail[1:].isdigit())


def run_users(r: redis.Redis, mgmt: Management, run_id: str) -> tuple[list[str], list[str]]:
    """(RabbitMQ users, Redis ACL users) of a run, found by name."""
    try:
        acl = [x.decode() if isinstance(x, bytes) else x for x in r.execute_command("ACL", "USERS")]
    except redis.RedisError as exc:
        raise StoreError(f"cannot list Redis ACL users: {exc}") from exc
    broker = [u["name"] for u in mgmt.call("GET", "/api/users") or []]
    return (
        sorted(u for u in broker if is_run_user(run_id, u)),
        sorted(u for u in acl if is_run_user(run_id, u)),
    )


def deprovision(
    run_id: str,
    participants: int | None,
    amqp_url: str,
    redis_url: str,
    management_url: str | None = None,
) -> int:
    """Remove every RabbitMQ and Redis user of a run; returns how many were removed.

    Users are found by name, not by count, so a run provisioned with another N (or half
    provisioned) is cleaned up too; `participants` is accepted for older callers.
    """
    del participants
    mgmt = Management.from_amqp_url(amqp_url, management_url)
    r = redis_connect(redis_url)
    broker, acl = run_users(r, mgmt, run_id)
    for u in broker:
        mgmt.call("DELETE", f"/api/users/{_q(u)}")
    try:
        for u in acl:
            r.execute_command("ACL", "DELUSER", u)
    except redis.RedisError as exc:
        raise StoreError(f"cannot delete Redis ACL users: {exc}") from exc
    return len(broker) + len(acl)


def _write_secret(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def read_credentials(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"credentials file {p} does not exist (create it with dssgd provision)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read credentials file {p}: {exc}") from exc
    if not isinstance(data, dict) or "run_id" not in data:
        raise ConfigError(f"{p} is not a dssgd credentials file")
    return data


# --- TLS certificates (dssgd provision --tls-dir) ----------------------------------------------

CA_DAYS = 3650
CERT_DAYS = 825  # the longest leaf lifetime browsers and most TLS stacks still accept


@dataclass(frozen=True)
class TlsBundle:
    """Where one CA's files live: ca.pem, server-<service>.pem, client-<name>.pem (+ -key.pem)."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}-key.pem"

    def client_name(self, user: str) -> str:
        return f"client-{user}"


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())  # small, fast, every TLS 1.2+ stack has it


def _write_pem(path: Path, data: bytes, secret: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _save(bundle: TlsBundle, name: str, cert: Any, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    _write_pem(bundle.key(name), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), secret=True)
    _write_pem(bundle.cert(name), cert.public_bytes(serialization.Encoding.PEM), secret=False)


def _load_ca(bundle: TlsBundle) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(bundle.ca.read_bytes())
        key = serialization.load_pem_private_key(bundle.key("ca").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA in {bundle.dir}: {exc}") from None
    return cert, key


def make_ca(bundle: TlsBundle, common_name: str = "dssgd CA") -> None:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    bundle.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bundle.dir, 0o700)
    _save(bundle, "ca", cert, key)
    os.replace(bundle.cert("ca"), bundle.ca)


def issue(bundle: TlsBundle, name: str, common_name: str, hosts: list[str] | None) -> None:
    """A certificate signed by the bundle's CA: a server's (``hosts`` = its names and
    addresses, checked by every client) or, with ``hosts`` None, a client's."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(bundle)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    eku = ExtendedKeyUsageOID
    usage = eku.SERVER_AUTH if hosts is not None else eku.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if hosts is not None:
        names: list[x509.GeneralName] = []
        for h in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _save(bundle, name, builder.sign(ca_key, hashes.SHA256()), key)


SERVICES = ("rabbitmq", "redis")


def ensure_tls(bundle: TlsBundle, hosts: dict[str, list[str]], clients: list[str]) -> list[str]:
    """The CA and a server certificate per service if missing, a client certificate per user if
    missing; returns the files created. An existing CA is kept: every certificate it signed,
    on every machine, stays valid."""
    created: list[str] = []
    if not bundle.ca.exists():
        make_ca(bundle)
        created.append(str(bundle.ca))
    for service in SERVICES:
        name = f"server-{service}"
        if not bundle.cert(name).exists():
            issue(bundle, name, f"dssgd {service}", hosts[service])
            created.append(str(bundle.cert(name)))
    for user in clients:
        name = bundle.client_name(user)
        if not bundle.cert(name).exists():
            issue(bundle, name, user, None)
            created.append(str(bundle.cert(name)))
    return created


def server_settings(bundle: TlsBundle, amqp_port: int = 5671, redis_port: int = 6380) -> str:
    """The lines that make RabbitMQ and Redis speak only TLS and require a client certificate."""
    d = bundle.dir.resolve()
    return (
        f"# rabbitmq.conf\nlisteners.tcp = none\nlisteners.ssl.default = {amqp_port}\n"
        f"ssl_options.cacertfile = {d / 'ca.pem'}\n"
        f"ssl_options.certfile = {d / 'server-rabbitmq.pem'}\n"
        f"ssl_options.keyfile = {d / 'server-rabbitmq-key.pem'}\n"
        "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
        f"# redis.conf\nport 0\ntls-port {redis_port}\n"
        f"tls-cert-file {d / 'server-redis.pem'}\ntls-key-file {d / 'server-redis-key.pem'}\n"
        f"tls-ca-cert-file {d / 'ca.pem'}\ntls-auth-clients yes\n"
    )
