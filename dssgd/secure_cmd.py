"""``dssgd share-server`` and what ``dssgd run --secure two-server`` needs to start and end one.

A secure run has no plaintext aggregator: two share servers (roles a and b, two operators in a
deployment) each read the run's stream and keep additive shares of the global state in their own
Redis (docs/SECURE.md). Locally, ``dssgd run`` forks both next to the workers
(``dssgd/secure_run.py``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dssgd.options import add_connection_options, connections
from dssgd.shared import secure
from dssgd.shared.config import Connections
from dssgd.shared.lifecycle import StopFlag, install_signal_handlers

SHARE_URL_ENV = {"a": "DSSGD_SHARE_A_REDIS_URL", "b": "DSSGD_SHARE_B_REDIS_URL"}


def add_share_server_parser(sub: Any) -> None:
    p = sub.add_parser(
        "share-server",
        help="one of the two share servers of a --secure two-server run",
        description="Read the run's stream, open this server's sealed share of every update "
        "and keep its share of the global state in its own Redis. Run role a and role b on "
        "two operators' machines: either alone learns nothing of any value (docs/SECURE.md).",
    )
    p.add_argument("--run-id", default=os.environ.get("DSSGD_RUN_ID", "default"))
    p.add_argument("--role", required=True, choices=secure.ROLES, help="a or b")
    p.add_argument(
        "--share-redis-url",
        help="this server's own Redis (env DSSGD_SHARE_A_REDIS_URL / _B_; default --redis-url)",
    )
    p.add_argument("--read-url", help="the read-only URL participants use (default: the above)")
    p.add_argument("--peer-offset-url", help="read-only URL of the peer's Redis (lag bound)")
    p.add_argument("--key-file", type=Path, help="X25519 private key (created if missing)")
    p.add_argument("--max-batch", type=int, default=500, help="messages per Redis commit at most")
    p.add_argument("--slow", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    add_connection_options(p)


def share_url(role: str, conns: Connections, given: str | None = None) -> str:
    return given or os.environ.get(SHARE_URL_ENV[role]) or conns.redis_url


def cmd_share_server(args: argparse.Namespace) -> int:
    from dssgd.aggregator.share_server import ShareServer, ShareServerSettings

    conns = connections(args)
    settings = ShareServerSettings(
        run_id=args.run_id,
        role=args.role,
        share_redis_url=share_url(args.role, conns, args.share_redis_url),
        connections=conns,
        read_url=args.read_url,
        peer_offset_url=args.peer_offset_url,
        key_file=args.key_file,
        slow=args.slow,
        max_batch=args.max_batch,
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    return ShareServer(settings, stop).run()
