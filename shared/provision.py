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

from shared.amqp_names import AmqpNames
from shared.errors import BrokerError, ConfigError, StoreError
from shared.keys import Keys


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
        parts = urllib.parse.urlparse(amqp_url)
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


def provision(
    run_id: str,
    participants: int,
    amqp_url: str,
    redis_url: str,
    out_dir: Path,
    management_url: str | None = None,
) -> dict[str, Any]:
    """Create every user and key of a run; returns a summary without any secret."""
    if participants < 1:
        raise ConfigError("a run needs at least one participant")
    mgmt = Management.from_amqp_url(amqp_url, management_url)
    parts = urllib.parse.urlparse(amqp_url)
    vhost = urllib.parse.unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
    names = AmqpNames(run_id)
    keys = Keys(run_id)
    r = redis.Redis.from_url(redis_url, socket_timeout=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 5672
    rparts = urllib.parse.urlparse(redis_url)
    rhost, rport, rdb = rparts.hostname or "127.0.0.1", rparts.port or 6379, rparts.path or "/0"

    agg_name = aggregator_user(run_id)
    agg_secret = secrets.token_urlsafe(24)
    run_names = f"^dssgd\\.{_re(run_id)}\\..*"
    mgmt.call("PUT", f"/api/users/{_q(agg_name)}", {"password": agg_secret, "tags": ""})
    mgmt.call(
        "PUT",
        f"/api/permissions/{_q(vhost)}/{_q(agg_name)}",
        {"configure": run_names, "write": run_names, "read": run_names},
    )
    hmac_keys: dict[str, str] = {}
    try:
        for p in range(participants):
            user = participant_user(run_id, p)
            secret = secrets.token_urlsafe(24)
            key = secrets.token_hex(32)
            hmac_keys[str(p)] = key
            mgmt.call("PUT", f"/api/users/{_q(user)}", {"password": secret, "tags": ""})
            # Write only to the run's update exchange; no configure, no read.
            mgmt.call(
                "PUT",
                f"/api/permissions/{_q(vhost)}/{_q(user)}",
                {"configure": "^$", "write": f"^{_re(names.exchange)}$", "read": "^$"},
            )
            # ...and on that exchange only its own routing key.
            mgmt.call(
                "PUT",
                f"/api/topic-permissions/{_q(vhost)}/{_q(user)}",
                {"exchange": names.exchange, "write": f"^upd\\.{p}$", "read": "^$"},
            )
            # Redis: read the run, write only its own bookkeeping. %R~ / %RW~ need Redis >= 7.
            r.execute_command(
                "ACL",
                "SETUSER",
                user,
                "reset",
                "on",
                f">{secret}",
                f"%R~{keys.config}",
                f"%R~{keys.params}",
                f"%R~{keys.stat}",
                f"%R~{keys.version}",
                f"%R~{keys.dedup}",
                f"%R~{keys.turn}",
                f"%R~{keys.stop}",
                f"%R~{keys.model}",  # the model record a worker checks its own against
                f"%RW~{keys.finished}",
                f"%RW~{keys.participant(p)}",
                f"%RW~{keys.wake(p)}",
                f"%RW~{keys.active}",
                f"%RW~{keys.trace}",
                "+@connection",
                "+get",
                "+mget",
                "+getrange",
                "+strlen",
                "+exists",
                "+hget",
                "+hgetall",
                "+hmget",
                "+smembers",
                "+sismember",
                "+lrange",
                "+lindex",
                "+llen",
                "+hset",
                "+hdel",
                "+sadd",
                "+rpush",
                "+ltrim",
                "+blpop",
                "+multi",
                "+exec",
                "+discard",
                "+ping",
                "+select",
            )
            creds = {
                "run_id": run_id,
                "participant": p,
                "amqp_user": user,
                "amqp_url": f"amqp://{_q(user)}:{_q(secret)}@{host}:{port}/{_q(vhost)}",
                "redis_url": f"redis://{_q(user)}:{_q(secret)}@{rhost}:{rport}{rdb}",
                "hmac_key": key,
            }
            _write_secret(out_dir / f"p{p}.json", creds)
        r.execute_command(
            "ACL",
            "SETUSER",
            agg_name,
            "reset",
            "on",
            f">{agg_secret}",
            f"~dssgd:{{{run_id}}}:*",
            "+@all",
            "-@dangerous",
            "+info",
            "+ping",
        )
    except redis.RedisError as exc:
        raise StoreError(f"cannot create Redis ACL users: {exc}") from exc
    _write_secret(
        out_dir / "aggregator.json",
        {
            "run_id": run_id,
            "amqp_user": agg_name,
            "amqp_url": f"amqp://{_q(agg_name)}:{_q(agg_secret)}@{host}:{port}/{_q(vhost)}",
            "redis_url": f"redis://{_q(agg_name)}:{_q(agg_secret)}@{rhost}:{rport}{rdb}",
            "hmac_keys": hmac_keys,
        },
    )
    return {
        "run_id": run_id,
        "participants": participants,
        "directory": str(out_dir),
        "rabbitmq_users": participants + 1,
        "redis_users": participants + 1,
    }


def deprovision(
    run_id: str, participants: int, amqp_url: str, redis_url: str, management_url: str | None = None
) -> None:
    mgmt = Management.from_amqp_url(amqp_url, management_url)
    r = redis.Redis.from_url(redis_url, socket_timeout=10)
    users = [participant_user(run_id, p) for p in range(participants)] + [aggregator_user(run_id)]
    for u in users:
        mgmt.call("DELETE", f"/api/users/{_q(u)}")
        r.execute_command("ACL", "DELUSER", u)


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
