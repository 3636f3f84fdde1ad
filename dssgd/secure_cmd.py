"""``dssgd share-server`` and what ``dssgd run --secure two-server`` needs to start and end one.

A secure run has no plaintext aggregator: two share servers (roles a and b, two operators in a
deployment) each read the run's stream and keep additive shares of the global state in their own
Redis (docs/SECURE.md). Locally, ``dssgd run`` forks both next to the workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dssgd.launcher import ForkLauncher, service_argv
from dssgd.options import add_connection_options, connections
from dssgd.shared import secure
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import ConfigError
from dssgd.shared.keys import ShareKeys
from dssgd.shared.lifecycle import StopFlag, install_signal_handlers
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

log = logging.getLogger("dssgd.secure")

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


# --- dssgd run --secure two-server --------------------------------------------------------------


class SecureForkLauncher(ForkLauncher):
    """The fork launcher with the two share servers where the aggregator would be."""

    def stop_aggregator(self) -> None:
        self._stop(["share-a", "share-b"])


def secure_launcher(kind: str, run_dir: Path, run_id: str, workers: int, conns: Connections) -> Any:
    if kind != "fork":
        raise ConfigError(
            "--secure two-server runs with --launcher fork locally; a deployment runs "
            "`dssgd share-server --role a|b` under each operator's own supervisor (docs/SECURE.md)"
        )
    from dssgd.shared.amqp_names import AmqpNames
    from dssgd.shared.stream import ensure_secure_topology

    # Declared once before both servers start: two first declarations of one stream can race.
    ensure_secure_topology(conns.amqp_url, AmqpNames(run_id))
    programs = {n: v for n, v in service_argv(run_id, workers, conns).items() if n != "aggregator"}
    urls = ["--amqp-url", conns.amqp_url, "--redis-url", conns.redis_url]
    for role in secure.ROLES:
        peer = "b" if role == "a" else "a"
        programs = {
            f"share-{role}": [
                "share-server",
                "--run-id",
                run_id,
                "--role",
                role,
                *urls,
                "--share-redis-url",
                share_url(role, conns),
                "--peer-offset-url",
                share_url(peer, conns),
            ],
            **programs,
        }
    if share_url("a", conns) == share_url("b", conns):
        log.warning(
            "both share servers keep their state in %s (separate keys) for this local run; in a "
            "deployment each runs its own Redis (DSSGD_SHARE_A_REDIS_URL, _B_)",
            share_url("a", conns),
        )
    return SecureForkLauncher(run_dir, programs)


def _views(store: RunStore) -> list[Any]:
    from dssgd.worker.secure_send import ShareView, server_registration

    out = []
    for role in secure.ROLES:
        reg = server_registration(store, role, timeout=5.0)
        out.append(ShareView(redis_connect(reg["read_url"]), store.run_id, role))
    return out


def secure_drained(store: RunStore, cfg: RunConfig, timeout: float = 60.0) -> bool:
    """True once both servers have applied every confirmed update of every participant."""
    deadline = time.monotonic() + timeout
    views = _views(store)
    while time.monotonic() < deadline:
        progress = store.all_progress(cfg.participants)
        highs = []
        for v in views:
            raw = v.r.hgetall(ShareKeys(cfg.run_id, v.keys.role).dedup)
            highs.append({int(p): int(x.split(b":")[0]) for p, x in raw.items()})
        if all(h.get(pid, 0) >= int(p.get("seq", 0)) for h in highs for pid, p in progress.items()):
            return True
        time.sleep(0.2)
    return False


def secure_params(store: RunStore, cfg: RunConfig) -> np.ndarray:
    """The global parameters, reconstructed from both servers at one offset (the read API)."""
    from dssgd.shared.tasks import load_task
    from dssgd.worker.secure_send import open_reader

    reader = open_reader(store, load_task(cfg.task).initial_state(cfg.seed))
    return reader.read_params()[1]


def secure_counters(store: RunStore) -> dict[str, int]:
    """Server A's counters (B's are the same: both decide every message alike)."""
    view = _views(store)[0]
    raw = view.r.hgetall(ShareKeys(store.run_id, "a").counters)
    return {k.decode(): int(v) for k, v in raw.items()}
