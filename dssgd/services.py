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
from shared.errors import ConfigError, DssgdError
from shared.lifecycle import EXIT_OK, EXIT_UNAVAILABLE, StopFlag, install_signal_handlers
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
        print(f"ok: {info['name']} at version {info['version']}, "
              f"{time.time() - info['time']:.1f} s ago")
        return EXIT_OK
    # Options given: create the run from them unless it exists. None given: wait for the run.
    cfg = run_config_from_args(args, args.run_id) if _any_run_option(args) else None
    settings = AggregatorSettings(run_id=args.run_id, connections=conns, prefetch=args.prefetch,
                                  max_batch=args.max_batch, evaluate=not args.no_eval)
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
    settings = WorkerSettings(
        run_id=args.run_id,
        connections=conns,
        participants=parse_participants(args.participants),
        slot=parse_slot(args.slot) if args.slot else None,
        claim=args.claim,
        synthetic=args.synthetic,
        record_dir=Path(args.record_dir) if args.record_dir else None,
        pace=args.pace,
    )
    stop = StopFlag()
    install_signal_handlers(stop)
    try:
        return Worker(settings, stop).run()
    except DssgdError:
        raise
