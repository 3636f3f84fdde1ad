"""``dssgd run``: a whole local training (services forked or under supervisord), with progress
and a final table."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dssgd.launcher import EXITED, FATAL, STOPPED, Launcher, make_launcher
from dssgd.options import connections, explicit_run_fields, run_config_from_args
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.broker import declare_topology, delete_topology, queue_depth
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ConfigError, DssgdError
from dssgd.shared.lifecycle import EXIT_ERROR, EXIT_OK, StopFlag, install_signal_handlers
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

log = logging.getLogger("dssgd.run")

# EX_TEMPFAIL: the run stopped with confirmed updates still in the queue; nothing is lost (the
# queue is durable) and `dssgd run --run-id R --resume` applies them.
EXIT_NOT_DRAINED = 75
# The drain gives up when nothing has been applied for this long although updates wait.
DRAIN_TIMEOUT = float(os.environ.get("DSSGD_DRAIN_TIMEOUT", "60"))


@dataclass
class Progress:
    elapsed: float
    epochs: int
    epochs_total: int
    version: int
    accuracy: float | None
    finished: int


def default_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def _check_services(
    store: RunStore, amqp_url: str, names: AmqpNames, max_length: int, replicas: int = 0
) -> None:
    store.ping()
    conn = amqp_connect(amqp_url, "dssgd-run")
    try:
        declare_topology(conn.channel(), names, max_length, replicas)
    finally:
        conn.close()


def _snapshot(
    store: RunStore, cfg: RunConfig, start: float, counted: list[float] | None = None
) -> Progress:
    """``counted``, kept by the caller: [when Σ epochs may be read again, the last Σ]."""
    counted = counted if counted is not None else [0.0, 0.0]
    metrics = store.r.lindex(store.keys.metrics, -1)
    acc = json.loads(metrics)["accuracy"] if metrics else None
    version = int(store.r.get(store.keys.version) or 0)
    total = cfg.participants * cfg.epochs if cfg.epochs else 0
    # Σ epochs reads every progress hash: at most a tenth of the time, however large N is.
    if time.monotonic() >= counted[0]:
        t0 = time.monotonic()
        counted[1] = store.progress_totals(cfg.participants)[0]
        counted[0] = time.monotonic() + 9 * (time.monotonic() - t0)
    epochs = int(counted[1])
    finished = cfg.participants if store.all_finished() else store.finished_at_least
    return Progress(time.monotonic() - start, epochs, total, version, acc, finished)


def _show(p: Progress, limit: float, tty: bool) -> None:
    frac = p.epochs / p.epochs_total if p.epochs_total else min(1.0, p.elapsed / limit)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    acc = f"{p.accuracy:.4f}" if p.accuracy is not None else "  -   "
    total = f"/{p.epochs_total}" if p.epochs_total else ""
    line = (
        f"[{bar}] {100 * frac:5.1f}%  epochs {p.epochs}{total}  version {p.version}  "
        f"accuracy {acc}  {p.elapsed:6.1f} s"
    )
    if tty:
        sys.stderr.write("\r" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class Drain:
    """What the drain measured: confirmed updates against applied ones and the queue."""

    confirmed: int = 0  # updates the broker confirmed to their senders (participants' epochs)
    unapplied: int = 0  # confirmed ones above their participant's highest applied seq
    queued: int | None = None  # messages left in the update queue once no consumer holds any
    dead_letters: int | None = None
    why: str = ""  # why the drain gave up ("" if it did not)

    @property
    def done(self) -> bool:
        # An empty queue means every confirmed update was applied (or refused with a reason,
        # in the dead letters); without the broker's word, the replay windows must say so.
        return not self.why and (self.queued == 0 or (self.queued is None and not self.unapplied))


def _unapplied(store: RunStore, cfg: RunConfig) -> tuple[int, int]:
    """(confirmed updates, confirmed ones not applied yet), from progress and replay windows."""
    progress = store.all_progress(cfg.participants)
    if cfg.secure:  # the replay windows live on the share servers (docs/SECURE.md)
        from dssgd.secure_run import secure_highs

        highs = secure_highs(store)
    else:
        highs = store.applied_highs()
    confirmed = sum(int(p.get("epochs", 0)) for p in progress.values())
    waiting = sum(max(0, int(p.get("seq", 0)) - highs.get(pid, 0)) for pid, p in progress.items())
    return confirmed, waiting


def _all_applied(store: RunStore, cfg: RunConfig) -> bool:
    """Every confirmed update applied (the drain's frequent check: one pipelined pass)."""
    if cfg.secure:
        return _unapplied(store, cfg)[1] == 0
    return not store.undrained(cfg.participants)


def _processed(store: RunStore, cfg: RunConfig) -> int:
    if cfg.secure:
        from dssgd.secure_run import secure_counters

        c = secure_counters(store)
    else:
        c = store.counters()
    return c.get("applied", 0) + c.get("rejected", 0) + c.get("duplicates", 0)


def _drain(sup: Launcher, store: RunStore, cfg: RunConfig) -> str:
    """Supervise the aggregator until every confirmed update is applied; "" then, else why it
    could not. A killed aggregator is restarted here like at any other time; one that ended by
    itself (services.RunEndWatcher: the run is over and its queue quiet) is done too. Either
    way the queue is measured afterwards, with no consumer holding anything."""
    last, last_change = -1, time.monotonic()
    while True:
        state = sup.states().get("aggregator")
        if state == FATAL:
            return "the aggregator is FATAL (see logs/aggregator.log)"
        if state in (EXITED, STOPPED):
            return ""
        try:
            if _all_applied(store, cfg):
                return ""
            done = _processed(store, cfg)
        except DssgdError as exc:  # Redis away: no progress, the timeout decides
            log.warning("drain: %s", exc)
            done = last
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        elif now - last_change > DRAIN_TIMEOUT:
            return f"nothing was applied for {DRAIN_TIMEOUT:.0f} s"
        # A second Ctrl-C ends `dssgd run` at once (lifecycle), the services with it.
        time.sleep(0.2)


def _measure_drain(store: RunStore, cfg: RunConfig, amqp_url: str, why: str) -> Drain:
    """After every service stopped: what is applied and what still waits, measured."""
    d = Drain(why=why)
    try:
        d.confirmed, d.unapplied = _unapplied(store, cfg)
    except DssgdError as exc:
        d.why = d.why or f"Redis unavailable ({exc})"
    try:
        partitions = store.ingest_partitions()
    except DssgdError:
        partitions = 0
    depth = queue_depth(amqp_url, AmqpNames(cfg.run_id), partitions)
    if depth is not None:
        d.queued, d.dead_letters = depth["updates"], depth["dead_letters"]
    return d


def final_evaluation(store: RunStore, cfg: RunConfig) -> tuple[float, float, int]:
    """(test accuracy, test loss, number of parameters) of the run's global model."""
    # Imported here: under --launcher supervisor, `dssgd run` starts its services without paying
    # for PyTorch (the fork launcher has imported it already, for its children).
    import torch

    from dssgd.shared.tasks import evaluate_state

    if cfg.secure:
        from dssgd.secure_run import secure_params

        w = secure_params(store, cfg)
    else:
        _, w, _ = store.read_params()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    m = evaluate_state(cfg, w) or federated_metrics(store)
    return m.get("accuracy", float("nan")), m.get("loss", float("nan")), int(w.size)


def federated_metrics(store: RunStore) -> dict[str, float]:
    """The latest metric point (participants' federated evaluation when there is no test set)."""
    points = store.metrics()
    last = points[-1] if points else {}
    return {k: float(last[k]) for k in ("accuracy", "loss") if k in last}


def summary(store: RunStore, cfg: RunConfig, wall: float, reason: str) -> dict[str, Any]:
    acc, loss, n = final_evaluation(store, cfg)
    if cfg.secure:
        from dssgd.secure_run import secure_counters

        counters = secure_counters(store)
    else:
        counters = store.counters()
    progress = store.all_progress(cfg.participants)
    epochs = [int(p.get("epochs", 0)) for p in progress.values()] or [0]
    up = sum(int(p.get("bytes_up", 0)) for p in progress.values())
    down = sum(int(p.get("bytes_down", 0)) for p in progress.values())
    applied = counters.get("applied", 0)
    return {
        "run_id": cfg.run_id,
        "model": cfg.model,
        "order": cfg.order,
        "rule": cfg.effective_rule,
        "participants": cfg.participants,
        "theta_u": cfg.theta_u,
        "theta_d": cfg.theta_d,
        "accuracy": acc,
        "loss": loss,
        "epochs_total": sum(epochs),
        "epochs_min": min(epochs),
        "epochs_max": max(epochs),
        "updates_applied": applied,
        "updates_rejected": counters.get("rejected", 0),
        "duplicates_ignored": counters.get("duplicates", 0),
        "bytes_up": up,
        "bytes_down": down,
        # Per update sent (confirmed), whether or not the aggregator got to it yet.
        "bytes_up_per_update": up / sum(epochs) if sum(epochs) else 0.0,
        "dense_bytes_per_update": 4 * n,
        "mean_staleness": counters.get("staleness_sum", 0) / applied if applied else 0.0,
        "wall_seconds": wall,
        "stop_reason": reason,
    }


def _applied_text(s: dict[str, Any]) -> str:
    confirmed = s.get("confirmed_updates")
    of = f" of {confirmed} confirmed" if confirmed is not None else ""
    dead = s.get("dead_letters")
    return (
        f"{s['updates_applied']}{of} (rejected {s['updates_rejected']}"
        + (f", {dead} dead letters: dssgd dead-letters {s['run_id']}" if dead else "")
        + f", duplicates ignored {s['duplicates_ignored']}, mean staleness "
        f"{s['mean_staleness']:.2f})"
    )


def print_table(s: dict[str, Any]) -> None:
    def mb(x: float) -> str:
        return f"{x / 1e6:.2f} MB"

    rows = [
        (
            "run",
            f"{s['run_id']} ({s['model']}, {s['participants']} participants, {s['order']}, "
            f"rule {s['rule']}, θu={s['theta_u']}, θd={s['theta_d']})",
        ),
        ("test accuracy", f"{s['accuracy']:.4f} (loss {s['loss']:.4f})"),
        (
            "epochs",
            f"{s['epochs_total']} in all, {s['epochs_min']}–{s['epochs_max']} per participant",
        ),
        ("updates applied", _applied_text(s)),
        (
            "bytes up",
            f"{mb(s['bytes_up'])} ({s['bytes_up_per_update']:.0f} B per update; dense "
            f"would be {s['dense_bytes_per_update']} B)",
        ),
        ("bytes down", mb(s["bytes_down"])),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
        ("stopped because", s["stop_reason"]),
    ]
    if s.get("restarts"):
        rows.append(("restarts", ", ".join(f"{k} {v}" for k, v in s["restarts"].items())))
    if s.get("not_done"):
        rows.append(("NOT DONE", s["not_done"]))
    if s.get("plot"):
        rows.append(("plot", s["plot"]))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _last_line(logs: Path, name: str) -> str:
    """The last line a failed service wrote: usually the one-line reason it stopped."""
    path = logs / f"{name.split(':')[-1]}.log"
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return f"no log at {path}"
    return lines[-1] if lines else f"{path} is empty"


def _resolve_run_command_defaults(args: argparse.Namespace) -> None:
    """Defaults of `dssgd run`'s own options, applied after TOML had its say."""
    if args.time_limit is None:
        args.time_limit = 900.0
    if args.runs_dir is None:
        args.runs_dir = os.environ.get("DSSGD_RUNS_DIR", "runs")
    if args.launcher is None:
        # Forking a process that has imported PyTorch is safe on Linux, not on macOS.
        args.launcher = "fork" if sys.platform.startswith("linux") else "supervisor"
    if args.launcher not in ("fork", "supervisor"):
        raise ConfigError(f"launcher must be fork or supervisor, got {args.launcher!r}")


def _prepare_run_dir(run_dir: Path) -> None:
    """Make the run folder or say in one line why not, before anything exists in Redis."""
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot create the run folder {run_dir}: {exc.strerror}; choose a writable "
            "--runs-dir (or DSSGD_RUNS_DIR)"
        ) from None


def _refuse_live(store: RunStore) -> None:
    """A run whose aggregator or participants still report must not get a second set."""
    agg = store.r.get(store.keys.heartbeat_aggregator)
    live = store.active()
    if agg or live:
        who = ""
        if agg:
            who = f"its aggregator reported {time.time() - json.loads(agg)['time']:.0f} s ago"
        if live:
            who += (", " if who else "") + f"participants {sorted(live)} are hosted"
        raise ConfigError(
            f"run {store.run_id!r} is still running ({who}); stop it first "
            "(Ctrl-C its `dssgd run`, or SIGTERM its services), then --resume"
        )


def _resume_config(stored: RunConfig, args: argparse.Namespace, wanted: RunConfig) -> RunConfig:
    """--resume continues with the stored configuration; a different value given now could not
    take effect, so it is refused rather than ignored."""
    given = explicit_run_fields(args)
    diff = [
        f"{f} (stored {getattr(stored, f)!r}, given {getattr(wanted, f)!r})"
        for f in sorted(given)
        if getattr(stored, f) != getattr(wanted, f)
    ]
    if diff:
        raise ConfigError(
            f"--resume continues run {stored.run_id!r} with its stored settings; these differ: "
            f"{'; '.join(diff)}. Drop them, or start a new run"
        )
    return stored


def cmd_run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    run_id = args.run_id or default_run_id()
    cfg = run_config_from_args(args, run_id)
    workers = _check_run_args(args, cfg)
    conns = connections(args)
    store = RunStore(redis_connect(conns.redis_url), run_id)
    # The services are checked (connections, topology) while PyTorch is imported for preflight:
    # waiting on the network and importing overlap instead of adding up.
    checked = _in_background(
        lambda: _check_services(
            store, conns.amqp_url, AmqpNames(run_id), cfg.queue_max_length, cfg.queue_replicas
        )
    )
    from dssgd.shared.tasks import preflight

    try:
        task = preflight(cfg)  # a bad task or missing data fails here, in one line (warms MNIST)
        checked()
        run_dir = Path(args.runs_dir) / run_id
        cfg, workers = _open_run(store, args, cfg, workers, run_dir)
    except BaseException:
        _forget_topology(store, conns.amqp_url, checked)
        raise
    _seed_state(store, cfg, task)
    if cfg.secure:  # two share servers instead of the aggregator (docs/SECURE.md)
        from dssgd.secure_run import secure_launcher

        sup = secure_launcher(args.launcher, run_dir, run_id, workers, conns)
    else:
        if args.aggregator_ingest:  # the aggregator child reads it (dssgd aggregator --ingest)
            from dssgd.aggregator.partitioned import check_supported

            check_supported(cfg)
            os.environ["DSSGD_AGGREGATOR_INGEST"] = str(args.aggregator_ingest)
        sup = make_launcher(args.launcher, run_dir, run_id, workers, conns)
    stop = StopFlag()
    install_signal_handlers(stop)
    log.info(
        "run %s: %d participants in %d worker processes (%s); folder %s",
        run_id,
        cfg.participants,
        workers,
        args.launcher,
        run_dir,
    )
    tty = sys.stderr.isatty()
    reason = ""
    drain = Drain(why="the run did not start")
    try:
        sup.start()  # inside: services started before a failure are stopped below
        reason = _watch(sup, store, cfg, args, run_dir, stop, t_start, tty)
    finally:
        if tty:
            sys.stderr.write("\n")
        drain = _wind_down(sup, store, cfg, reason, conns.amqp_url)
    _report(store, cfg, args, run_dir, time.monotonic() - t_start, reason, drain, sup)
    if not drain.done:
        return EXIT_NOT_DRAINED
    return EXIT_ERROR if reason.startswith("processes failed") else EXIT_OK


def _forget_topology(store: RunStore, amqp_url: str, checked: Callable[[], None]) -> None:
    """A run refused before it started leaves nothing on the broker either: the queue and
    exchanges the service check declared go again, unless they belong to an existing run."""
    with contextlib.suppress(Exception):
        checked()  # the check thread is done declaring before anything is deleted
    with contextlib.suppress(Exception):  # a clean-up must not hide why the run was refused
        if store.load_config() is not None:
            return
        conn = amqp_connect(amqp_url, "dssgd-run")
        try:
            delete_topology(conn.channel(), AmqpNames(store.run_id))
        finally:
            conn.close()


def _in_background(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` on a thread now; the returned function joins it and re-raises its error (the
    thread is gone before anything forks)."""
    failed: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=body, name="check-services", daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return join


def _seed_state(store: RunStore, cfg: RunConfig, task: Any) -> None:
    """The run's initial parameters and model record, written before any service starts (the
    aggregator would write the same ones): workers can train at once instead of waiting for
    the aggregator to come up."""
    from dssgd.shared.tasks import model_record

    store.init_params(task.initial_state(cfg.seed), cfg.shards)
    store.init_model(model_record(task))


def _check_run_args(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Validate the `dssgd run` options; the number of worker processes to start."""
    _resolve_run_command_defaults(args)
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise ConfigError("--target-accuracy must be in (0, 1]")
    if args.time_limit <= 0:
        raise ConfigError("--time-limit must be > 0")
    workers = args.workers or min(cfg.participants, max(1, os.cpu_count() or 1))
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    return min(workers, cfg.participants)


def _open_run(
    store: RunStore, args: argparse.Namespace, cfg: RunConfig, workers: int, run_dir: Path
) -> tuple[RunConfig, int]:
    """Create the run (or, with --resume, take the stored one) and its folder."""
    existing = store.load_config()
    if existing is None and args.resume:
        raise ConfigError(
            f"run {store.run_id!r} does not exist, so there is nothing to resume "
            "(dssgd runs lists the runs); drop --resume to start it"
        )
    if existing is not None and not args.resume:
        raise ConfigError(
            f"run {store.run_id!r} already exists; pass --resume to continue it or "
            "choose another --run-id (dssgd runs lists them)"
        )
    if existing is not None:
        _refuse_live(store)
        cfg = _resume_config(existing, args, cfg)
        store.clear_stop()
        workers = min(args.workers or workers, cfg.participants)
    _prepare_run_dir(run_dir)
    if existing is None:
        cfg, _ = store.create_config(cfg)
    (run_dir / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=2) + "\n")
    return cfg, workers


def _stop_reason(p: Progress, cfg: RunConfig, args: argparse.Namespace) -> str:
    """Why the run should stop now, given the latest progress snapshot; "" to go on."""
    if p.finished >= cfg.participants:
        return (
            f"every participant finished its {cfg.epochs} epochs"
            if cfg.dp_budget is None
            else f"every participant stopped ({cfg.epochs} epochs or its privacy budget)"
        )
    if (
        args.target_accuracy is not None
        and p.accuracy is not None
        and p.accuracy >= args.target_accuracy
    ):
        return f"target accuracy {args.target_accuracy} reached"
    if p.elapsed >= args.time_limit:
        return f"time limit of {args.time_limit:.0f} s reached"
    return ""


def _watch(
    sup: Launcher,
    store: RunStore,
    cfg: RunConfig,
    args: argparse.Namespace,
    run_dir: Path,
    stop: StopFlag,
    t_start: float,
    tty: bool,
) -> str:
    """Show progress until a stop condition, a signal or a failed process; return the reason."""
    last_line = 0.0
    counted = [0.0, 0.0]
    while True:
        # A tenth of a second: the run's end is noticed at once (the reads are a few small
        # commands; _snapshot bounds the one that grows with N).
        if stop.wait(0.1):
            return "interrupted"
        p = _snapshot(store, cfg, t_start, counted)
        reason = _stop_reason(p, cfg, args)
        if time.monotonic() - last_line >= (0.25 if tty else 5) or reason:
            _show(p, args.time_limit, tty)
            last_line = time.monotonic()
        if reason:
            return reason
        # BACKOFF is a restart on its way (both launchers): only FATAL ends the run.
        bad = [k for k, v in sup.states().items() if v == FATAL]
        if bad:
            for name in bad:
                log.error("%s: %s", name, _last_line(run_dir / "logs", name))
            return f"processes failed: {', '.join(bad)} (see {run_dir / 'logs'})"


def _wind_down(
    sup: Launcher, store: RunStore, cfg: RunConfig, reason: str, amqp_url: str
) -> Drain:
    """Workers first; then the aggregator, supervised, until it has applied every confirmed
    update; then what is left, measured."""
    why = "the run did not start"
    try:
        store.request_stop(reason or "stopped")
        sup.stop_workers()
        why = _drain(sup, store, cfg)
    except DssgdError as exc:
        why = str(exc)
    finally:
        # Even if Redis went away just now, no service may outlive `dssgd run`.
        sup.stop_aggregator()
        sup.shutdown()
    drain = _measure_drain(store, cfg, amqp_url, why)
    if not drain.done:
        log.error("%s", _not_done_text(drain, cfg.run_id))
    return drain


def _not_done_text(d: Drain, run_id: str) -> str:
    waiting = f"{d.queued} updates wait" if d.queued is not None else "updates may wait"
    return (
        f"{waiting} in the queue ({d.unapplied} confirmed ones not applied"
        + (f"; {d.why}" if d.why else "")
        + f"); nothing is lost: `dssgd run --run-id {run_id} --resume` applies them"
    )


def _report(
    store: RunStore,
    cfg: RunConfig,
    args: argparse.Namespace,
    run_dir: Path,
    elapsed: float,
    reason: str,
    drain: Drain,
    sup: Launcher,
) -> None:
    result = summary(store, cfg, elapsed, reason)
    result.update(
        confirmed_updates=drain.confirmed,
        updates_waiting=drain.queued,
        confirmed_unapplied=drain.unapplied,
        dead_letters=drain.dead_letters,
        drained=drain.done,
        restarts={k: v for k, v in sup.restarts().items() if v},
    )
    if not drain.done:
        result["not_done"] = _not_done_text(drain, cfg.run_id)
        result["resume_command"] = f"dssgd run --run-id {cfg.run_id} --resume"
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    from dssgd.results import write_plot

    try:
        result["plot"] = str(write_plot(store, cfg, run_dir / "accuracy.png"))
    except ConfigError as exc:
        log.warning("no plot: %s", exc)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
