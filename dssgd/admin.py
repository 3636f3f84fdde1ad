"""Operator-side pieces of the command line: TOML run files, provisioning options, deprovision,
pre-flight checks of the services with errors a person can act on.

Kept apart from ``dssgd/parser.py`` so the parser there only gains one line per feature.
"""

from __future__ import annotations

import argparse
import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

from dssgd.options import RUN_OPTIONS, add_connection_options, connections
from dssgd.shared.config import PRESETS
from dssgd.shared.errors import BrokerError, ConfigError, DssgdError, StoreError

log = logging.getLogger("dssgd")

EXIT_DENIED = 77  # EX_NOPERM: authentication or authorization refused; retrying cannot help


class AccessDenied(DssgdError):
    """A service refused our credentials or rights: permanent, the operator must act."""


def add_provision_options(p: argparse.ArgumentParser) -> None:
    """`dssgd provision` also creates the run, so it takes the run options (but --participants,
    which it has already)."""
    g = p.add_argument_group("the run it creates (stored in Redis with admin rights)")
    g.add_argument("--config", metavar="FILE", help="TOML file with any run settings")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named set of hyper-parameters")
    for flag, field_name, tp, help_text in RUN_OPTIONS:
        if field_name == "participants":
            continue
        metavar = field_name.upper().replace("_", "-") if tp is not str else None
        g.add_argument(flag, dest=field_name, type=tp, metavar=metavar, help=help_text)
    add_tls_options(p)


def add_tls_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS certificates (docs/OPERATIONS.md, TLS)")
    g.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="certificates of the deployment: a CA, a server certificate for RabbitMQ and "
        "Redis and a client certificate per participant, the aggregator and the admin, each "
        "made if missing; with amqps:// / rediss:// URLs the credential files name them",
    )
    g.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address the server certificates are valid for (repeatable; default "
        "the hosts of --amqp-url and --redis-url, localhost and 127.0.0.1)",
    )
    g.add_argument(
        "--certs-only",
        action="store_true",
        help="only make the certificates and print the servers' TLS settings; contacts no "
        "server (the first step: the servers need their certificates before they start)",
    )


def tls_for_provision(args: argparse.Namespace, amqp_url: str, redis_url: str) -> Any:
    """The TlsBundle of `dssgd provision --tls-dir`, its certificates made if missing."""
    if not args.tls_dir:
        if args.certs_only:
            raise ConfigError("--certs-only needs --tls-dir DIR")
        return None
    from dssgd.shared.provision import TlsBundle, aggregator_user, ensure_tls, participant_user

    bundle = TlsBundle(Path(args.tls_dir))
    hosts = {"rabbitmq": [urllib.parse.urlsplit(amqp_url).hostname or "127.0.0.1"],
             "redis": [urllib.parse.urlsplit(redis_url).hostname or "127.0.0.1"]}
    for names in hosts.values():
        names += [*args.tls_host, "localhost", "127.0.0.1"]
    clients = ["admin", aggregator_user(args.run_id)]
    clients += [participant_user(args.run_id, p) for p in range(args.participants)]
    try:
        created = ensure_tls(bundle, hosts, clients)
    except OSError as exc:
        raise ConfigError(f"cannot write certificates to {bundle.dir}: {exc.strerror}") from None
    print(f"TLS: {len(created)} certificates made in {bundle.dir} (CA ca.pem; keys *-key.pem, "
          "mode 0600)")
    return bundle


def add_management_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--management-url",
        help="RabbitMQ management API, to remove the run's users "
        "(default http://<amqp host>:15672)",
    )


def add_admin_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "deprovision",
        help="remove a run's users (RabbitMQ and Redis ACL) and credential files",
        description="Remove every RabbitMQ user and Redis ACL user `dssgd provision` made for "
        "RUN, and its credential files; also for a run that never started. `dssgd delete` "
        "does this and removes the run's keys and queues too.",
    )
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    add_management_option(p)
    add_connection_options(p)


def remove_users(run_id: str, amqp_url: str, redis_url: str, management_url: str | None) -> int:
    from dssgd.shared.provision import deprovision

    return deprovision(run_id, None, amqp_url, redis_url, management_url)


def cmd_deprovision(args: argparse.Namespace) -> int:
    conns = connections(args)
    removed = remove_users(args.run_id, conns.amqp_url, conns.redis_url, args.management_url)
    cred_dir = Path(args.runs_dir) / args.run_id / "credentials"
    files = list(cred_dir.glob("*.json")) if cred_dir.is_dir() else []
    for f in files:
        f.unlink()
    if removed == 0 and not files:
        raise ConfigError(f"run {args.run_id!r} has no users to remove")
    print(f"deprovisioned run {args.run_id}: {removed} users, {len(files)} credential files")
    return 0


def where(url: str, default_port: int) -> str:
    parts = urllib.parse.urlparse(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


def user_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(url).username or "default")


def check_redis(url: str) -> None:
    """One PING with the given URL; a refusal or an unreachable server becomes one clear line."""
    import redis
    import redis.exceptions as rex

    from dssgd.shared import tls
    from dssgd.shared.store import split_cluster

    at = where(url, 6379)
    try:
        node = split_cluster(url)[0]  # on a cluster, the node named answers PING
        plain_url, tls_args = tls.redis_tls(node)
        redis.Redis.from_url(plain_url, socket_connect_timeout=3, socket_timeout=5,
                             **tls_args).ping()
    except rex.AuthenticationError:
        raise AccessDenied(
            f"Redis at {at} refused user {user_of(url)!r}: wrong password or unknown user "
            "(check --redis-url or the credentials file)"
        ) from None
    except rex.NoPermissionError as exc:
        raise AccessDenied(f"Redis at {at}: user {user_of(url)!r} lacks a right ({exc})") from None
    except rex.ConnectionError as exc:
        why = tls.explain(exc, url)
        if why is not None:
            raise StoreError(f"Redis at {at}: {why}") from None
        raise StoreError(
            f"Redis at {at} is unreachable (is it running, is the host right?)"
            f"{tls.plaintext_hint(url)}; `bash deploy/dev.sh services` starts it locally"
        ) from None
    except rex.RedisError as exc:
        raise StoreError(f"Redis at {at}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL: {exc}") from None


def check_amqp(url: str, name: str) -> None:
    """Open and close one AMQP connection; a refusal or an unreachable broker is one line.

    A URL naming several nodes (a cluster) passes when one of them accepts."""
    from dssgd.shared.broker import endpoints

    nodes = endpoints(url)
    if len(nodes) == 1:
        _check_amqp_node(url, name)
        return
    for node in nodes:
        try:
            _check_amqp_node(node, name)
            return
        except BrokerError:
            continue
    at = ", ".join(where(n, 5672) for n in nodes)
    raise BrokerError(f"none of the {len(nodes)} RabbitMQ nodes ({at}) is reachable")


def _check_amqp_node(url: str, name: str) -> None:
    import pika
    import pika.exceptions as pex

    from dssgd.shared import tls

    at = where(url, 5671 if url.startswith("amqps:") else 5672)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # we say it once, below
    try:
        plain_url, ssl_options = tls.amqp_tls(url)
        params = pika.URLParameters(plain_url)
        params.ssl_options = ssl_options
        params.connection_attempts, params.socket_timeout = 1, 5
        params.blocked_connection_timeout = 10
        params.client_properties = {"connection_name": name}
        pika.BlockingConnection(params).close()
    except (pex.ProbableAuthenticationError, pex.AuthenticationError):
        raise AccessDenied(
            f"RabbitMQ at {at} refused user {user_of(url)!r}: wrong password or unknown user "
            "(check --amqp-url or the credentials file)"
        ) from None
    except pex.ProbableAccessDeniedError:
        raise AccessDenied(
            f"RabbitMQ at {at}: user {user_of(url)!r} may not use this virtual host"
        ) from None
    except (pex.AMQPError, OSError) as exc:
        why = tls.explain(exc, url)
        if why is not None:
            raise BrokerError(f"RabbitMQ at {at}: {why}") from None
        raise BrokerError(
            f"RabbitMQ at {at} is unreachable (is it running, is the host right?)"
            f"{tls.plaintext_hint(url)}; `bash deploy/dev.sh services` starts it locally"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"bad RabbitMQ URL: {exc}") from None
    finally:
        logging.getLogger("pika").setLevel(logging.WARNING)
