"""A worker process: hosts one or more participants and runs their epochs.

Asynchronous order: the hosted participants take epochs in turn inside the process, each from
the freshest global parameters; while one trains, the previous epoch's update is published and
confirmed on the sending thread (``Sender``), so the broker's confirm never holds training up.
Every participant of the process shares one model object and trainer (worker/participant.py:
``SharedModel``), so a process can host thousands. Ordered modes: the process waits until the
turn (kept in Redis by the aggregator) belongs to one of its participants, runs that
participant's epoch, and waits again; the turn only moves on once the aggregator has applied
the update.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, StopRequested, StoreError, is_permanent
from dssgd.shared.lifecycle import EXIT_OK, Backoff, StopFlag
from dssgd.shared.store import LEASE_RENEW, RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tasks import (
    LoadedTask,
    check_coding,
    check_model,
    check_size,
    context_for,
    load_task,
)
from dssgd.worker.participant import Outgoing, Participant, SharedModel
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    run_id: str
    connections: Connections = field(default_factory=Connections)
    participants: tuple[int, ...] = ()  # explicit ids; empty = claim `claim` ids from Redis
    slot: tuple[int, int] | None = None  # (I, W): host every participant p with p % W == I
    claim: int = 1
    synthetic: bool = False  # send exact integer updates instead of training (test oracle)
    record_dir: Path | None = None  # where synthetic participants log their confirmed updates
    pace: float = 0.0  # minimum seconds between two epochs of one participant (synthetic load)
    hmac_key: bytes | None = field(default=None, repr=False)  # from `dssgd provision`
    amqp_user: str | None = None  # broker user; sent as user_id, which the broker verifies
    name: str = field(default_factory=lambda: f"worker@{socket.gethostname()}:{os.getpid()}")
    # Who holds this process's participant leases. A stable id (`--worker-id`, supervisor's
    # process name, the compose container's hostname) gets its participants back on a restart.
    worker_id: str = field(default_factory=lambda: default_worker_id())
    task: str | None = None  # --task: this worker's copy of the task (default: the run's)
    data_dir: Path | None = None  # --data DIR: handed to the task's local_data(ctx)
    # Asynchronous order: publish epoch t's update while epoch t+1 trains (False: one at a time).
    overlap: bool = True

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.participants):
            raise ConfigError("participant ids must be >= 0")
        if self.claim < 1:
            raise ConfigError("--claim must be >= 1")


def default_worker_id() -> str:
    """Stable across restarts where the process manager names the process, else host:pid."""
    explicit = os.environ.get("DSSGD_WORKER_ID")
    if explicit:
        return "".join(explicit.split())
    host = socket.gethostname()
    supervised = os.environ.get("SUPERVISOR_PROCESS_NAME")
    if supervised:
        return f"{supervised}@{host}"
    return f"worker@{host}:{os.getpid()}"


def compact_ids(pids: list[int], limit: int = 200) -> str:
    """ "0-2,5,7-9": a process's participants, short enough for AMQP's 255-byte app_id."""
    groups: list[list[int]] = []
    for p in sorted(set(pids)):
        if groups and groups[-1][1] == p - 1:
            groups[-1][1] = p
        else:
            groups.append([p, p])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in groups]
    if len(",".join(parts)) <= limit:
        return ",".join(parts)
    kept: list[str] = []
    size = count = 0
    for part, (a, b) in zip(parts, groups, strict=True):
        if size + len(part) + 1 > limit - 16:
            break
        kept.append(part)
        size, count = size + len(part) + 1, count + b - a + 1
    return ",".join(kept) + f",+{len(set(pids)) - count} more"


class LeaseKeeper:
    """Renews this process's participant leases from its own thread (an epoch may be long),
    every `LEASE_RENEW` seconds: the heartbeat by which a dead turn holder is noticed."""

    def __init__(self, url: str, run_id: str, owner: str, pids: list[int], stop: StopFlag) -> None:
        self.store = RunStore(redis_connect(url), run_id)
        self.owner, self.pids, self.stop = owner, pids, stop
        self.lost: list[int] = []
        self.fatal: StoreError | None = None  # a refusal that retrying cannot heal
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(LEASE_RENEW):
            try:
                lost = self.store.renew(self.owner, self.pids)
            except StoreError as exc:
                if is_permanent(exc):
                    log.error("cannot renew participant leases (%s): retrying cannot help", exc)
                    self.fatal = exc
                    self.stop.set(f"cannot renew participant leases: {exc}")
                    return
                log.warning("cannot renew participant leases (%s); retrying", exc)
                continue
            if lost:
                self.lost = lost
                log.error(
                    "participants %s were taken over by another worker while this one could not "
                    "renew their leases; stopping so that no participant runs twice",
                    lost,
                )
                self.stop.set(f"lost the lease of participants {lost}")
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(StoreError):
            if not self.lost:
                self.store.release(self.owner, self.pids)


class Sender:
    """The sending thread of a worker (asynchronous order): burns, publishes and records the
    updates the training thread hands over, one at a time and in order, so a participant's
    sequence numbers reach the broker in the order they were burned.

    At most ``depth`` updates wait; a participant with one in flight is not given another epoch
    (``busy``), so no participant ever trains from a state older than its own last update.
    """

    def __init__(self, stop: StopFlag, depth: int = 2) -> None:
        self.stop = stop
        self._jobs: queue.Queue[tuple[Participant, Outgoing] | None] = queue.Queue(depth)
        self._busy: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def submit(self, part: Participant, out: Outgoing) -> None:
        self.check()
        with self._lock:
            self._busy[part.pid] += 1
        while True:
            try:
                self._jobs.put((part, out), timeout=0.5)
                return
            except queue.Full:
                self.check()
                if self.stop.is_set():
                    raise StopRequested("stopped with an update not yet sent") from None

    def busy(self, pid: int) -> bool:
        return self._busy[pid] > 0

    def check(self) -> None:
        """Raise, on the training thread, what stopped the sending thread."""
        if self.error is not None:
            raise self.error

    def wait_idle(self, pid: int | None = None, timeout: float = 0.5) -> None:
        """Until ``pid`` (or everybody) has nothing in flight, or ``timeout``."""
        with self._idle:
            self._idle.wait_for(
                lambda: (
                    self.error is not None
                    or (self._busy[pid] == 0 if pid is not None else not +self._busy)
                ),
                timeout,
            )
        self.check()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            part, out = job
            try:
                if self.error is None:  # after a failure nothing more is sent
                    part.deliver(out, overlapped=True)
            except BaseException as exc:  # re-raised on the training thread by check()
                self.error = exc
            with self._idle:
                self._busy[part.pid] -= 1
                self._idle.notify_all()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)


class Worker:
    def __init__(self, settings: WorkerSettings, stop: StopFlag) -> None:
        self.s = settings
        self.stop = stop
        torch.set_num_threads(1)  # one thread per process: processes share the cores
        self.waited = 0.0  # seconds spent waiting for a turn (ordered modes)

    def run(self) -> int:
        r = redis_connect(self.s.connections.redis_url)
        store = RunStore(r, self.s.run_id)
        backoff = Backoff(initial=0.2, cap=5.0)
        if store_missing_config(store):
            log.info(
                "waiting up to 120 s for run %s to be created (by `dssgd provision` or "
                "`dssgd aggregator` with run options)",
                self.s.run_id,
            )
        while True:
            try:
                cfg = store.wait_config(self.stop)
                task = self._task(store, cfg)  # before claiming ids: a refused worker takes none
                pids = self._participants(store, cfg)
                break
            except StopRequested:
                return EXIT_OK
            except StoreError as exc:
                if _permanent(exc):
                    raise
                log.warning("Redis not reachable (%s); retrying", exc)
                if not backoff.sleep(self.stop):
                    return EXIT_OK
        bad = [p for p in pids if p >= cfg.participants]
        if bad:
            raise ConfigError(f"participant ids {bad} are outside 0..{cfg.participants - 1}")
        keeper = LeaseKeeper(
            self.s.connections.redis_url, cfg.run_id, self.s.worker_id, pids, self.stop
        )
        try:
            code = self._host(cfg, store, pids, task)
        finally:
            keeper.close()
        if keeper.fatal is not None:
            raise keeper.fatal  # the exit code says rights or a password were refused
        return code

    def _host(self, cfg: RunConfig, store: RunStore, pids: list[int], task: LoadedTask) -> int:
        publisher = Publisher(
            self.s.connections.amqp_url,
            AmqpNames(cfg.run_id),
            # AMQP's app_id is a short string (255 bytes): the ids compacted, never the full list.
            app_id=compact_ids(pids),
            user_id=self.s.amqp_user,
        )
        parts: dict[int, Participant] = {}
        try:
            parts = self._with_retry(
                lambda: self._make_participants(cfg, store, publisher, pids, task)
            )
            log.info(
                "%s (%s) hosting participants %s of run %s (%s order)",
                self.s.name,
                self.s.worker_id,
                pids if len(pids) <= 20 else compact_ids(pids),
                cfg.run_id,
                cfg.order,
            )
            self._loop(cfg, store, parts)
        except StopRequested as exc:
            log.info("stopping: %s", exc)
        finally:
            self._leave(store, parts)
            publisher.close()
        epochs = collections.Counter(p.epochs for p in parts.values())
        log.info(
            "worker stopped (%s); participants by epochs confirmed: %s",
            self.stop.reason or "all participants done",
            ", ".join(f"{n} × {e}" for e, n in sorted(epochs.items())),
        )
        return EXIT_OK

    def _make_participants(
        self,
        cfg: RunConfig,
        store: RunStore,
        publisher: Publisher,
        pids: list[int],
        task: LoadedTask,
    ) -> dict[int, Participant]:
        """The hosted participants: one shared model, progress read in one round trip."""
        shared = SharedModel(task, cfg)
        restored = store.restore_many(pids)
        parts = {}
        for pid in pids:
            parts[pid] = Participant(
                pid,
                cfg,
                store,
                publisher,
                self.stop,
                None if self.s.synthetic else self._local_data(task, cfg, pid, len(pids)),
                self.s.synthetic,
                self.s.record_dir,
                self.s.hmac_key,
                task,
                shared=shared,
                restored=restored[pid],
            )
        return parts

    def _leave(self, store: RunStore, parts: dict[int, Participant]) -> None:
        with contextlib.suppress(StoreError):
            store.leave_many([pid for pid, p in parts.items() if p.done and p.confirmed])
        for part in parts.values():
            part.close()

    def _task(self, store: RunStore, cfg: RunConfig) -> LoadedTask:
        """The task, refused when its model is not the run's (the aggregator records that)."""
        task = load_task(self.s.task or cfg.task)
        check_coding(task, cfg)
        deadline = time.monotonic() + 120.0
        while (record := self._with_retry(store.model_record)) is None:
            if self._with_retry(store.has_params):
                # A run seeded without a record (by an earlier version, or a test harness):
                # its parameters exist, so only their number can be checked.
                check_size(task, self._with_retry(store.layout).n, cfg.run_id)
                return task
            if time.monotonic() > deadline:
                raise ConfigError(f"run {cfg.run_id!r} has no model record: is its aggregator up?")
            if self.stop.wait(0.2):
                raise StopRequested("stopped while waiting for the run's model")
        check_model(task, record, cfg.run_id)
        return task

    def _local_data(self, task: LoadedTask, cfg: RunConfig, pid: int, hosted: int) -> Dataset:
        ctx = context_for(cfg, pid, self.s.data_dir)
        ds = task.local_data(ctx)
        where = f"from {ctx.data_dir}" if ctx.data_dir else "(simulated split)"
        # One line each for a few participants; thousands would drown the log.
        level = logging.INFO if hosted <= 20 else logging.DEBUG
        log.log(level, "participant %d: %d local examples %s", pid, len(ds), where)  # type: ignore[arg-type]
        return ds

    def _participants(self, store: RunStore, cfg: RunConfig) -> list[int]:
        """Which participants this process hosts, leased in the run's one identity registry."""
        if self.s.participants:
            pids = list(self.s.participants)
        elif self.s.slot is not None:
            i, w = self.s.slot
            pids = [p for p in range(cfg.participants) if p % w == i]
        else:
            return store.claim(self.s.worker_id, self.s.claim)
        bad = [p for p in pids if p >= cfg.participants]
        if bad:
            raise ConfigError(f"participant ids {bad} are outside 0..{cfg.participants - 1}")
        store.acquire(self.s.worker_id, pids)
        return pids

    def _with_retry(self, fn):  # type: ignore[no-untyped-def]
        backoff = None  # made on the first failure: seeding its generator costs every epoch
        while True:
            try:
                return fn()
            except (StoreError, BrokerError) as exc:
                if is_permanent(exc):  # rights or a password taken away mid-run: end, say why
                    log.error("%s: retrying cannot help, stopping", exc)
                    raise
                log.warning("%s; retrying", exc)
                backoff = backoff or Backoff(initial=0.2, cap=5.0)
                if not backoff.sleep(self.stop):
                    raise StopRequested("stopped while retrying") from exc

    def _should_stop(self, store: RunStore) -> bool:
        if self.stop.is_set():
            return True
        try:
            reason = store.stop_reason()
        except StoreError:
            return False
        if reason:
            self.stop.set(f"run stopped: {reason}")
            return True
        return False

    def _loop(self, cfg: RunConfig, store: RunStore, parts: dict[int, Participant]) -> None:
        if cfg.ordered or not self.s.overlap:
            self._loop_sync(cfg, store, parts)
            return
        sender = Sender(self.stop)
        try:
            self._loop_async(store, parts, sender)
        finally:
            sender.close()

    def _loop_async(self, store: RunStore, parts: dict[int, Participant], sender: Sender) -> None:
        """Round robin over the participants that still take epochs; each epoch's update goes to
        the sending thread while the next participant trains. Constant work per epoch."""
        live = collections.deque(parts)  # may still take epochs
        waiting: list[int] = []  # took their last epoch; its update may still be in flight
        last_epoch: dict[int, float] = {}
        last_check = 0.0
        while True:
            now = time.monotonic()
            if now - last_check >= 0.5 or not live:  # the run's stop flag: not once per epoch
                last_check = now
                if self._should_stop(store):
                    return
            waiting = self._finish(store, parts, waiting)
            if not live:
                if not waiting:
                    return
                sender.wait_idle()
                continue
            pid = live.popleft()
            part = parts[pid]
            if part.done:
                waiting.append(pid)
                continue
            if self.s.pace > 0:
                wait = last_epoch.get(pid, 0.0) + self.s.pace - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    return
            out = self._with_retry(part.prepare)
            sender.submit(part, out)
            last_epoch[pid] = time.monotonic()
            live.append(pid)

    def _finish(
        self, store: RunStore, parts: dict[int, Participant], waiting: list[int]
    ) -> list[int]:
        """Leave for good once a participant's last update is confirmed; the others still wait."""
        still = []
        for pid in waiting:
            part = parts[pid]
            if not part.confirmed:
                still.append(pid)
                continue
            why = part.budget_exhausted or f"finished its {part.epochs} epochs"
            self._with_retry(lambda pid=pid, why=why: store.finish(pid, why))
            log.log(
                logging.INFO if len(parts) <= 20 else logging.DEBUG, "participant %d %s", pid, why
            )
        return still

    def _loop_sync(self, cfg: RunConfig, store: RunStore, parts: dict[int, Participant]) -> None:
        """One epoch at a time, each confirmed before the next (ordered modes, or --no-overlap)."""
        last_epoch: dict[int, float] = {}
        order = list(parts)
        i = 0
        left: set[int] = set()
        while not self._should_stop(store):
            for pid in order:
                part = parts[pid]
                if pid not in left and part.done:
                    # Leave at once, so in the ordered modes the turn is never handed to us again.
                    self._with_retry(lambda pid=pid: store.leave(pid, finished=True))
                    left.add(pid)
                    why = part.budget_exhausted or f"finished its {part.epochs} epochs"
                    self._with_retry(
                        lambda pid=pid, why=why: store.record_progress(pid, stopped=why)
                    )
                    log.info("participant %d %s", pid, why)
            live = [p for p in order if p not in left]
            if not live:
                return
            if cfg.ordered:
                t_wait = time.perf_counter()
                pid = self._wait_turn(store, live)
                self.waited += time.perf_counter() - t_wait
                if pid is None:
                    continue
            else:
                pid = live[i % len(live)]
                i += 1
                if self.s.pace > 0:
                    wait = last_epoch.get(pid, 0.0) + self.s.pace - time.monotonic()
                    if wait > 0 and self.stop.wait(wait):
                        return
            part = parts[pid]
            report = self._with_retry(part.run_epoch)
            last_epoch[pid] = time.monotonic()
            log.debug(
                "participant %d epoch %d: seq %d, %d entries, %d B up, loss %.4f, %.0f ms",
                pid,
                part.epochs,
                report.seq,
                report.entries,
                report.bytes_up,
                report.loss,
                1000 * report.seconds_total,
            )
            if cfg.ordered:
                # We hold the turn until the aggregator applies this update and passes it on;
                # looking at the turn before that would start a second epoch on stale state.
                self._wait_applied(store, pid, report.seq, live)

    def _wait_turn(self, store: RunStore, live: list[int]) -> int | None:
        """Block (≤ 1 s) until one of our participants holds the turn."""
        holder = self._with_retry(store.turn)
        if holder in live:
            return holder
        self._with_retry(lambda: store.wait_wake(live, timeout=1.0))
        holder = self._with_retry(store.turn)
        return holder if holder in live else None

    def _wait_applied(self, store: RunStore, pid: int, seq: int, live: list[int]) -> None:
        """Hold the turn until our update is applied or refused, or the turn is no longer ours.

        However long the aggregator is away: giving up early would let this holder train again
        from the same parameters while its update is still queued. The lease thread keeps
        renewing meanwhile (a silent holder loses the turn after ``turn_timeout``), and a
        refused update ends the wait at once (the aggregator records ``refused_seq`` after
        passing the turn).
        """
        started = last_check = time.monotonic()
        while not self.stop.is_set():
            applied, holder, refused = self._with_retry(lambda: store.turn_wait_state(pid))
            if applied >= seq or refused >= seq or holder != pid:
                return
            now = time.monotonic()
            if now - last_check >= 1.0:
                if self._should_stop(store):  # a run stopped while the aggregator is away
                    return
                last_check = now
            # Poll fast while the apply is imminent, gently once the aggregator seems away.
            self.stop.wait(0.01 if now - started < 2.0 else 0.1)


def store_missing_config(store: RunStore) -> bool:
    try:
        return store.load_config() is None
    except StoreError:
        return False


def _permanent(exc: StoreError) -> bool:
    """Authentication and authorization refusals do not heal by retrying."""
    return is_permanent(exc)
