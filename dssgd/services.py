"""``dssgd aggregator`` and ``dssgd worker``: settings → service object → run loop → exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from aggregator.service import Aggregator, AggregatorSettings
from dssgd.cli import connections, parse_participants, parse_slot, run_config_from_args
from shared.broker import connect as amqp_connect
from shared.config import Connections
from shared.errors import ConfigError
from shared.lifecycle import EXIT_OK, EXIT_UNAVAILABLE, StopFlag, install_signal_handlers
from shared.provision import provision, read_credentials
from shared.store import RunStore
from shared.store import connect as redis_connect
from worker.service import Worker, WorkerSettings


def _any_run_option(args: argparse.Namespace) -> bool:
    from dssgd.cli import RUN_OPTIONS

    return bool(args.config or args.preset) or any(
        getattr(args, f, None) is not None for _, f, _, _ in RUN_OPTIONS
    )


def cmd_aggregator(args: argparse.Namespace) -> int:
    conns = connections(args)
    if args.check:
        store = RunStore(redis_connect(conns.redis_url), args.run_id)
        raw = store.r.get(store.keys.heartbeat_aggregator)
        if raw is None:
            print(f"no aggregator of run {args.run_id} reported in the last 15 s", file=sys.stderr)
            return EXIT_UNAVAILABLE
        info = json.loads(raw)
        print(
            f"ok: {info['name']} at version {info['version']}, "
            f"{time.time() - info['time']:.1f} s ago"
        )
        return EXIT_OK
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
    return Aggregator(settings, stop, cfg).run()


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
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    return Worker(settings, stop).run()


def cmd_provision(args: argparse.Namespace) -> int:
    conns = connections(args)
    out = Path(args.out or Path(args.runs_dir) / args.run_id / "credentials")
    summary = provision(
        args.run_id, args.participants, conns.amqp_url, conns.redis_url, out, args.management_url
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
