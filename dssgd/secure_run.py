"""What ``dssgd run --secure two-server`` needs: both share servers started next to the workers,
the drain check, the reconstructed parameters and the counters for the final table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dssgd.launcher import ForkLauncher, service_argv
from dssgd.secure_cmd import share_url
from dssgd.shared import secure
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import ConfigError
from dssgd.shared.keys import ShareKeys
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

log = logging.getLogger("dssgd.secure")


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


def secure_highs(store: RunStore) -> dict[int, int]:
    """Each participant's highest applied seq on BOTH servers (the lower of the two)."""
    highs: dict[int, int] | None = None
    for v in _views(store):
        raw = v.r.hgetall(ShareKeys(store.run_id, v.keys.role).dedup)
        mine = {int(p): int(x.split(b":")[0]) for p, x in raw.items()}
        highs = mine if highs is None else {p: min(h, mine.get(p, 0)) for p, h in highs.items()}
    return highs or {}


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
