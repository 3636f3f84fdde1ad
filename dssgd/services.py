"""``dssgd aggregator`` and ``dssgd worker``: settings → service object → run loop → exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dssgd.admin import check_amqp, check_redis, tls_for_provision
from dssgd.aggregator.service import Aggregator, AggregatorSettings
from dssgd.entry import run_command
from dssgd.options import (
    RUN_OPTIONS,
    connections,
    explicit_run_fields,
    parse_participants,
    parse_slot,
    run_config_from_args,
)
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import ConfigError, DssgdError
from dssgd.shared.lifecycle import EXIT_OK, EXIT_UNAVAILABLE, StopFlag, install_signal_handlers
from dssgd.shared.provision import provision, read_credentials, server_settings
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.worker.service import Worker, WorkerSettings

log = logging.getLogger("dssgd")


def service_main(argv: list[str]) -> int:
    """`dssgd aggregator|worker ARGS` in a forked child, parsed and guarded like the CLI does."""
    return run_command(argv, _dispatch_service)


def _dispatch_service(args: argparse.Namespace) -> int | None:
    if args.command == "aggregator":
        return cmd_aggregator(args)
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "share-server":  # --secure two-server (dssgd/secure_cmd.py)
        from dssgd.secure_cmd import cmd_share_server

        return cmd_share_server(args)
    return None


def _any_run_option(args: argparse.Namespace) -> bool:
    return bool(args.config or args.preset) or any(
        getattr(args, f, None) is not None for _, f, _, _ in RUN_OPTIONS
    )


def cmd_aggregator(args: argparse.Namespace) -> int:
    conns = connections(args)
    if args.check:
        return _check_aggregator(conns, args.run_id)
    # Options given: create the run from them unless it exists. None given: wait for the run.
    cfg = run_config_from_args(args, args.run_id) if _any_run_option(args) else None
    keys = None
    if args.credentials:
        creds = read_credentials(args.credentials)
        if creds["run_id"] != args.run_id:
            raise ConfigError(
                f"{args.credentials} is for run {creds['run_id']!r}, not {args.run_id!r}"
            )
        conns = Connections(amqp_url=creds["amqp_url"], redis_url=creds["redis_url"])
        keys = {int(p): bytes.fromhex(k) for p, k in creds["hmac_keys"].items()}
    check_redis(conns.redis_url)
    check_amqp(conns.amqp_url, f"dssgd-aggregator {args.run_id} (check)")
    store = RunStore(redis_connect(conns.redis_url), args.run_id)
    stored = store.load_config()
    if stored is not None and cfg is not None:
        _refuse_different(stored, args, cfg)
    if stored is None and cfg is None:
        log.info(
            "run %s does not exist yet: waiting up to 120 s for it to be created "
            "(`dssgd provision %s --participants N`, or give this aggregator run options)",
            args.run_id,
            args.run_id,
        )
    if (code := _cmd_ingest(args, conns, keys)) is not None:
        return code
    settings = AggregatorSettings(
        run_id=args.run_id,
        connections=conns,
        prefetch=args.prefetch,
        max_batch=args.max_batch,
        evaluate=not args.no_eval,
        keys=keys,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    agg, children = (
        _applier(args, settings, stop, cfg, conns)
        if args.ingest >= 1
        else (Aggregator(settings, stop, cfg), None)
    )
    end = not args.keep_serving
    watcher = RunEndWatcher(conns.redis_url, args.run_id, stop, end, agg.quiet_for)
    try:
        code = agg.run()
    finally:
        if children is not None:
            children.close()
    watcher.close()
    _clear_heartbeat(store, settings.name)
    if watcher.reason:
        _print_summary(store, watcher.reason)
    return code


def _check_aggregator(conns: Connections, run_id: str) -> int:
    store = RunStore(redis_connect(conns.redis_url), run_id)
    raw = store.r.get(store.keys.heartbeat_aggregator)
    if raw is None:
        print(f"no aggregator of run {run_id} reported in the last 15 s", file=sys.stderr)
        return EXIT_UNAVAILABLE
    info = json.loads(raw)
    ago = time.time() - info["time"]
    print(f"ok: {info['name']} at version {info['version']}, {ago:.1f} s ago")
    return EXIT_OK


def _applier(
    args: argparse.Namespace,
    settings: AggregatorSettings,
    stop: StopFlag,
    cfg: RunConfig | None,
    conns: Connections,
) -> tuple[Aggregator, Any]:
    """The applier of `--ingest K`, and its K ingest processes unless `--part applier`."""
    from dssgd.aggregator.partitioned import Applier, IngestChildren, ingest_argv

    agg = Applier(settings, args.ingest, stop, cfg)
    if args.part is not None:
        return agg, None
    extra = ["--prefetch", str(args.prefetch), "--max-batch", str(args.max_batch)]
    extra += ["--keep-serving"]  # they stop when we do
    if args.credentials:
        extra += ["--credentials", args.credentials]
    env = {**os.environ, "DSSGD_AMQP_URL": conns.amqp_url, "DSSGD_REDIS_URL": conns.redis_url}
    argvs = [ingest_argv(args.run_id, args.ingest, i, extra) for i in range(args.ingest)]
    return agg, IngestChildren(argvs, env, stop)


def _cmd_ingest(
    args: argparse.Namespace, conns: Connections, keys: dict[int, bytes] | None
) -> int | None:
    """`dssgd aggregator --ingest K --part I`: one ingest process of a partitioned aggregator
    (None: this process is not one)."""
    if args.ingest < 0 or (args.part is not None and args.ingest < 1):
        raise ConfigError("--ingest takes K >= 1 (0: one process); --part needs --ingest K")
    if args.ingest < 1 or args.part in (None, "applier"):
        return None
    from dssgd.aggregator.partitioned import Ingest, IngestSettings

    try:
        partition = int(args.part)
    except ValueError:
        raise ConfigError(f"--part is 'applier' or a partition 0..K-1, not {args.part!r}") from None
    settings = IngestSettings(
        run_id=args.run_id,
        partition=partition,
        partitions=args.ingest,
        connections=conns,
        prefetch=args.prefetch,
        max_batch=args.max_batch,
        keys=keys,
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    ingest = Ingest(settings, stop)
    watcher = RunEndWatcher(
        conns.redis_url, args.run_id, stop, not args.keep_serving, ingest.quiet_for
    )
    code = ingest.run()
    watcher.close()
    return code


def _clear_heartbeat(store: RunStore, name: str) -> None:
    """A stopped aggregator stops reporting at once (`--resume` then sees a run at rest), unless
    a newer aggregator has written the key since."""
    try:
        raw = store.r.get(store.keys.heartbeat_aggregator)
        if raw is not None and json.loads(raw).get("name") == name:
            store.r.delete(store.keys.heartbeat_aggregator)
    except Exception as exc:  # leaving: a heartbeat expires by itself within 15 s anyway
        log.debug("could not clear the aggregator heartbeat: %s", exc)


def _refuse_different(stored: RunConfig, args: argparse.Namespace, wanted: RunConfig) -> None:
    diff = [
        f"{f} (stored {getattr(stored, f)!r}, given {getattr(wanted, f)!r})"
        for f in sorted(explicit_run_fields(args))
        if getattr(stored, f) != getattr(wanted, f)
    ]
    if diff:
        raise ConfigError(
            f"run {stored.run_id!r} exists with other settings, which stay: {'; '.join(diff)}; "
            "drop these options (the stored configuration is used) or use a new run id"
        )


# Consuming this long with nothing to consume means the queue is empty, even when some
# participant's last confirmed update was refused (so its replay window never reaches it).
QUIET_DRAINED = 3.0


class RunEndWatcher:
    """Ends a standalone aggregator once its run is over: every participant finished (or the
    run's stop flag is set) and the queue is drained: every confirmed update applied and a poll
    found nothing more, or nothing to consume for `QUIET_DRAINED` seconds."""

    def __init__(
        self,
        redis_url: str,
        run_id: str,
        stop: StopFlag,
        enabled: bool = True,
        quiet: Callable[[], float] = lambda: 0.0,
        period: float = 1.0,
    ) -> None:
        self.store = RunStore(redis_connect(redis_url), run_id)
        self.stop, self.period, self.reason = stop, period, ""
        self.quiet = quiet
        self._done = threading.Event()
        if not enabled:
            self._done.set()
        self._thread = threading.Thread(target=self._run, name="run-end", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.period):
            try:
                reason = self._over()
            except DssgdError:
                continue  # not created yet, or Redis briefly away: the aggregator reports that
            if reason:
                self.reason = reason
                log.info("run is over (%s): stopping the aggregator", reason)
                self.stop.set(reason)
                return

    def _over(self) -> str:
        cfg = self.store.load_config()
        if cfg is None:
            return ""
        stop = self.store.stop_reason()
        everyone = self.store.all_finished()  # amortised O(1): not N reads every second
        if not stop and not everyone:
            return ""
        quiet = self.quiet()
        applied = not self.store.undrained(cfg.participants)
        if not (applied and quiet > 0) and quiet < QUIET_DRAINED:
            return ""  # confirmed updates still in the queue, or a delivery being processed
        if everyone:
            return f"every participant finished ({cfg.participants})"
        return f"run stopped: {stop}"

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def _print_summary(store: RunStore, reason: str) -> None:
    counters = store.counters()
    print(
        f"run {store.run_id} over: {reason}; version {int(store.r.get(store.keys.version) or 0)}, "
        f"applied {counters.get('applied', 0)}, rejected {counters.get('rejected', 0)}, "
        f"duplicates {counters.get('duplicates', 0)}",
        flush=True,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    conns = connections(args)
    if args.check:
        try:
            redis_connect(conns.redis_url).ping()
            amqp_connect(conns.amqp_url, "dssgd-healthcheck", heartbeat=0).close()
        except Exception as exc:  # a health check reports, it never raises
            print(f"unhealthy: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        print("ok")
        return EXIT_OK
    if args.participants and args.slot:
        raise ConfigError("give either --participants or --slot, not both")
    participants = parse_participants(args.participants)
    hmac_key = user = None
    run_id = args.run_id
    if args.credentials:
        creds = read_credentials(args.credentials)
        run_id, participants = creds["run_id"], (int(creds["participant"]),)
        conns = Connections(amqp_url=creds["amqp_url"], redis_url=creds["redis_url"])
        hmac_key, user = bytes.fromhex(creds["hmac_key"]), creds["amqp_user"]
    check_redis(conns.redis_url)
    check_amqp(conns.amqp_url, f"dssgd-worker {run_id} (check)")
    extra = {"worker_id": "".join(args.worker_id.split())} if args.worker_id else {}
    settings = WorkerSettings(
        run_id=run_id,
        connections=conns,
        participants=participants,
        hmac_key=hmac_key,
        amqp_user=user,
        slot=parse_slot(args.slot) if args.slot else None,
        claim=args.claim,
        synthetic=args.synthetic,
        record_dir=Path(args.record_dir) if args.record_dir else None,
        pace=args.pace,
        task=args.task,
        data_dir=Path(args.data) if args.data else None,
        **extra,
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    return Worker(settings, stop).run()


def cmd_provision(args: argparse.Namespace) -> int:
    conns = connections(args)
    out = Path(args.out or Path(args.runs_dir) / args.run_id / "credentials")
    cfg = run_config_from_args(args, args.run_id)
    tls = tls_for_provision(args, conns.amqp_url, conns.redis_url)
    if args.certs_only:
        print(server_settings(tls), end="")
        return EXIT_OK
    check_redis(conns.redis_url)
    summary = provision(
        args.run_id,
        args.participants,
        conns.amqp_url,
        conns.redis_url,
        out,
        args.management_url,
        cfg=cfg,
        tls=tls,
    )
    print(
        f"created run {args.run_id}: {cfg.participants} participants, {cfg.model}, "
        f"{cfg.epochs} epochs, {cfg.order} (every service reads it from Redis)"
    )
    print(
        f"provisioned run {summary['run_id']}: {summary['rabbitmq_users']} RabbitMQ users, "
        f"{summary['redis_users']} Redis ACL users, {summary['participants']} HMAC keys"
    )
    print(
        f"credentials (mode 0600) in {summary['directory']}: give p<N>.json to participant N "
        "(dssgd worker --credentials FILE) and aggregator.json to the aggregator"
    )
    return EXIT_OK
