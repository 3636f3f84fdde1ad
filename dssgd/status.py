"""``dssgd status``, ``dssgd runs``, ``dssgd delete``: read a run's state for people and scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

from dssgd.options import connections
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.broker import delete_topology, queue_depth
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import BrokerError, ConfigError
from dssgd.shared.lifecycle import EXIT_OK
from dssgd.shared.store import RunStore, list_runs
from dssgd.shared.store import connect as redis_connect


def _config_or_none(store: RunStore) -> RunConfig | None:
    """A run written by another dssgd version may not parse here: list it, do not fail."""
    try:
        return store.load_config()
    except ConfigError:
        return None


def _epsilon_text(p: dict[str, Any]) -> str:
    """ε spent with the bound it is, e.g. "4.06 (pld, δ 1e-05)"; "-" without DP."""
    if p["epsilon"] is None:
        return "-"
    bound = p.get("epsilon_bound") or "basic"
    delta = p.get("epsilon_delta")
    return f"{p['epsilon']:.4g} ({bound}" + (f", δ {delta:g})" if delta else ")")


def _latest_run(r: Any) -> str:
    """The newest run started from here (a folder in the runs directory), else the newest in
    Redis, which on a shared Redis may be someone else's: then we say so."""
    runs = list_runs(r)
    if not runs:
        raise ConfigError("no runs in Redis yet; start one with `dssgd run`")
    created = []
    for run in runs:
        cfg = _config_or_none(RunStore(r, run))
        if cfg is not None:
            created.append((cfg.created, run))
    if not created:
        raise ConfigError("no run in Redis that this dssgd version can read; pass --run-id")
    here = Path(os.environ.get("DSSGD_RUNS_DIR", "runs"))
    mine = [(t, run) for t, run in created if (here / run).is_dir()]
    if mine:
        return max(mine)[1]
    run = max(created)[1]
    print(
        f"(no run of {here}/ in Redis: showing the newest one, {run}; pass --run-id)",
        file=sys.stderr,
    )
    return run


def _participant_row(
    pid: int,
    p: dict[str, str],
    version: int,
    now: float,
    active: Container[int],
    finished: Container[int],
) -> dict[str, Any]:
    """One participant's line of `dssgd status`, from its progress hash (empty: never seen)."""
    last = float(p.get("last_seen", 0) or 0)
    base = int(p.get("base_version", 0) or 0)
    return {
        "participant": pid,
        "epochs": int(p.get("epochs", 0)),
        "seq": int(p.get("seq", 0)),
        "state": "finished"
        if pid in finished
        else "active"
        if pid in active
        else "waiting"
        if not p
        else "gone",
        "last_seen_s": round(now - last, 1) if last else None,
        "staleness": version - base if p else None,
        "bytes_up": int(p.get("bytes_up", 0)),
        "loss": float(p["loss"]) if "loss" in p else None,
        "epsilon": float(p["dp_total"]) if "dp_total" in p else None,
        # which valid bound "epsilon" is (pld, advanced, basic) and its δ
        "epsilon_bound": p.get("dp_bound"),
        "epsilon_delta": float(p["dp_total_delta"]) if "dp_total_delta" in p else None,
        "stopped": p.get("stopped"),
    }


def _update_rate(metrics: list[dict[str, Any]]) -> float | None:
    """Updates applied per second over the last few metric points."""
    if len(metrics) < 2:
        return None
    a, b = metrics[max(0, len(metrics) - 6)], metrics[-1]
    if b["time"] > a["time"]:
        return (b["applied"] - a["applied"]) / (b["time"] - a["time"])
    return None


# The aggregator reports every second; a report older than this means it is gone (a killed
# one's report lingers until its 15 s expiry) or stuck.
REPORT_FRESH = 5.0


def aggregator_state(beat: dict[str, Any] | None, now: float) -> str:
    """"up", "silent for N s" (a report, but an old one) or "not running"."""
    if beat is None:
        return "not running"
    age = now - float(beat.get("time", 0))
    return "up" if age <= REPORT_FRESH else f"silent for {age:.0f} s"


def collect(store: RunStore, amqp_url: str) -> dict[str, Any]:
    cfg = store.load_config()
    if cfg is None:
        raise ConfigError(f"run {store.run_id!r} does not exist")
    counters = store.counters()
    version = int(store.r.get(store.keys.version) or 0)
    metrics = store.metrics()
    now = time.time()
    progress = store.all_progress(cfg.participants)
    active = store.active()
    finished = store.finished()
    participants = [
        _participant_row(pid, progress.get(pid, {}), version, now, active, finished)
        for pid in range(cfg.participants)
    ]
    agg = store.r.get(store.keys.heartbeat_aggregator)
    beat = json.loads(agg) if agg else None
    last_metric = metrics[-1] if metrics else None
    return {
        "run_id": cfg.run_id,
        "config": json.loads(cfg.to_json()),
        "version": version,
        "counters": counters,
        "updates_per_second": _update_rate(metrics),
        "queues": queue_depth(amqp_url, AmqpNames(cfg.run_id), store.ingest_partitions()),
        "aggregator": beat,
        "aggregator_state": aggregator_state(beat, now),
        "accuracy": last_metric["accuracy"] if last_metric else None,
        "loss": last_metric["loss"] if last_metric else None,
        # "federated": the participants' own held-out evaluations (a task without a test set)
        "accuracy_source": (last_metric or {}).get("source", "test set"),
        "stop": store.stop_reason(),
        "finished": len(finished) >= cfg.participants,
        "participants": participants,
    }


def render(s: dict[str, Any]) -> str:
    cfg = RunConfig.from_json(json.dumps(s["config"]))
    c = s["counters"]
    q = s["queues"] or {}
    acc = f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-"
    if s.get("accuracy_source") == "federated":
        acc += " (federated)"
    rate = f"{s['updates_per_second']:.1f}/s" if s["updates_per_second"] is not None else "-"
    agg = s.get("aggregator_state") or ("up" if s["aggregator"] else "not running")
    if agg == "up" and s["aggregator"].get("metrics_url"):
        agg += f" (metrics {s['aggregator']['metrics_url']})"
    lines = [
        f"run {s['run_id']}: {cfg.model}, {cfg.participants} participants, {cfg.order}, "
        f"rule {cfg.effective_rule}, θu={cfg.theta_u}, θd={cfg.theta_d}"
        + (f"  [stopped: {s['stop']}]" if s["stop"] else "")
        + ("  [finished: every participant finished]" if s.get("finished") else ""),
        f"  global version {s['version']}   applied {c.get('applied', 0)} ({rate})   rejected "
        f"{c.get('rejected', 0)}   duplicates {c.get('duplicates', 0)}",
        f"  accuracy {acc}   queue depth {q.get('updates', '-')}   dead letters "
        f"{q.get('dead_letters', '-')}   aggregator {agg}",
        "",
        "  participant  state     epochs   seq  staleness  last seen   loss     MB up   ε spent",
    ]
    for p in s["participants"]:
        seen = f"{p['last_seen_s']:.1f} s" if p["last_seen_s"] is not None else "-"
        loss = f"{p['loss']:.4f}" if p["loss"] is not None else "-"
        stale = p["staleness"] if p["staleness"] is not None else "-"
        lines.append(
            f"  {p['participant']:>11}  {p['state']:<8} {p['epochs']:>6} {p['seq']:>5} "
            f"{stale!s:>10}  {seen:>9}  {loss:>7} {p['bytes_up'] / 1e6:8.2f} "
            f"{_epsilon_text(p):>9}"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import logging

    # Queues not declared yet are a normal state here, not a pika warning on the screen.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    conns = connections(args)
    r = redis_connect(conns.redis_url)
    run_id = args.run_id or _latest_run(r)
    store = RunStore(r, run_id)
    while True:
        s = collect(store, conns.amqp_url)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            print(render(s))
        if not args.watch:
            return EXIT_OK
        time.sleep(args.watch)


def cmd_runs(args: argparse.Namespace) -> int:
    conns = connections(args)
    r = redis_connect(conns.redis_url)
    rows = []
    for run in list_runs(r):
        store = RunStore(r, run)
        cfg = _config_or_none(store)
        rows.append(
            {
                "run_id": run,
                "model": cfg.model if cfg else None,
                "participants": cfg.participants if cfg else None,
                "order": cfg.order if cfg else None,
                "created": cfg.created if cfg else None,
                "version": int(r.get(store.keys.version) or 0),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no runs")
    else:
        for row in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"] or 0))
            print(
                f"{row['run_id']:<32} {when}  {row['model']}  N={row['participants']}  "
                f"{row['order']}  version {row['version']}"
            )
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """Keys, queues and exchanges, and the run's users (RabbitMQ and Redis ACL)."""
    from dssgd.admin import remove_users
    from dssgd.shared.stream import delete_secure_topology

    conns = connections(args)
    store = RunStore(redis_connect(conns.redis_url), args.run_id)
    exists = store.load_config() is not None or bool(
        list(store.r.scan_iter(match=store.keys.all_patterns()[0]))
    )
    partitions = store.ingest_partitions()  # read before the keys go
    removed = store.delete_run() if exists else 0
    conn = amqp_connect(conns.amqp_url, f"dssgd-delete {args.run_id}")
    try:
        delete_topology(conn.channel(), AmqpNames(args.run_id), partitions)
        # A --secure run's stream and exchange too (deleting what does not exist is a no-op).
        delete_secure_topology(conn.channel(), AmqpNames(args.run_id))
    finally:
        conn.close()
    try:
        users = remove_users(args.run_id, conns.amqp_url, conns.redis_url, args.management_url)
    except BrokerError as exc:  # no management API here: the keys are gone, say what is left
        print(
            f"dssgd: users not checked ({exc}); `dssgd deprovision {args.run_id}` later",
            file=sys.stderr,
        )
        users = 0
    if not exists and not users:
        raise ConfigError(f"run {args.run_id!r} does not exist (no keys, no users)")
    print(
        f"deleted run {args.run_id}: {removed} Redis keys, its queues and exchanges, {users} users"
    )
    return EXIT_OK
