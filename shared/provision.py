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
_SCRIPTS = ["+evalsha", "+eval", "+script|load"]
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
    r = redis.Redis.from_url(redis_url, socket_timeout=10)
    store = RunStore(r, run_id)
    if cfg is not None and store.load_config() is not None:
        raise ConfigError(
            f"run {run_id!r} already exists; provision a new run id, or `dssgd delete {run_id}` "
            "first"
        )
    _prepare_dir(out_dir)
    try:
        summary = _create_users(run_id, participants, amqp_url, redis_url, out_dir, mgmt, r)
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

    @classmethod
    def parse(cls, amqp_url: str, redis_url: str) -> _Endpoints:
        from dssgd.shared.broker import endpoints

        nodes = [urllib.parse.urlparse(u) for u in endpoints(amqp_url)]
        parts = nodes[0]
        vhost = urllib.parse.unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
        rparts = urllib.parse.urlparse(redis_url)
        return cls(
            vhost=vhost,
            hosts=",".join(f"{n.hostname or '127.0.0.1'}:{n.port or 5672}" for n in nodes),
            rhost=rparts.hostname or "127.0.0.1",
            rport=rparts.port or 6379,
            rdb=rparts.path or "/0",
        )

    def amqp_url(self, user: str, secret: str) -> str:
        return f"amqp://{_q(user)}:{_q(secret)}@{self.hosts}/{_q(self.vhost)}"

    def redis_url(self, user: str, secret: str) -> str:
        return f"redis://{_q(user)}:{_q(secret)}@{self.rhost}:{self.rport}{self.rdb}"


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
) -> dict[str, Any]:
    at = _Endpoints.parse(amqp_url, redis_url)
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
    r = redis.Redis.from_url(redis_url, socket_timeout=10)
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
