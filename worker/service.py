"""A worker process: hosts one or more participants and runs their epochs.

Asynchronous order: the hosted participants take epochs in turn inside the process, each from
the freshest global parameters. Ordered modes: the process waits until the turn (kept in Redis by
the aggregator) belongs to one of its participants, runs that participant's epoch, and waits
again; the turn only moves on once the aggregator has applied the update.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from shared.amqp_names import AmqpNames
from shared.broker import Publisher
from shared.config import Connections, RunConfig
from shared.errors import BrokerError, ConfigError, StopRequested, StoreError
from shared.lifecycle import EXIT_OK, Backoff, StopFlag
from shared.store import RunStore
from shared.store import connect as redis_connect
from shared.tasks import LoadedTask, check_model, check_size, context_for, load_task
from worker.participant import Participant

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
    task: str | None = None  # --task: this worker's copy of the task (default: the run's)
    data_dir: Path | None = None  # --data DIR: handed to the task's local_data(ctx)

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.participants):
            raise ConfigError("participant ids must be >= 0")
        if self.claim < 1:
            raise ConfigError("--claim must be >= 1")


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
        while True:
            try:
                cfg = store.wait_config(self.stop)
                task = self._task(store, cfg)  # before claiming ids: a refused worker takes none
                pids = self._participants(store, cfg)
                break
            except StopRequested:
                return EXIT_OK
            except StoreError as exc:
                log.warning("Redis not reachable (%s); retrying", exc)
                if not backoff.sleep(self.stop):
                    return EXIT_OK
        bad = [p for p in pids if p >= cfg.participants]
        if bad:
            raise ConfigError(f"participant ids {bad} are outside 0..{cfg.participants - 1}")
        publisher = Publisher(
            self.s.connections.amqp_url,
            AmqpNames(cfg.run_id),
            app_id=",".join(map(str, pids)),
            user_id=self.s.amqp_user,
        )
        parts: dict[int, Participant] = {}
        try:
            for pid in pids:
                parts[pid] = self._with_retry(
                    lambda pid=pid: Participant(
                        pid,
                        cfg,
                        store,
                        publisher,
                        self.stop,
                        None if self.s.synthetic else self._local_data(task, cfg, pid),
                        self.s.synthetic,
                        self.s.record_dir,
                        self.s.hmac_key,
                        task,
                    )
                )
            log.info(
                "%s hosting participants %s of run %s (%s order)",
                self.s.name,
                pids,
                cfg.run_id,
                cfg.order,
            )
            self._loop(cfg, store, parts)
        except StopRequested as exc:
            log.info("stopping: %s", exc)
        finally:
            for pid, part in parts.items():
                with contextlib.suppress(StoreError):
                    store.leave(pid, finished=part.done)
                part.close()
            publisher.close()
        epochs = {pid: p.epochs for pid, p in parts.items()}
        log.info(
            "worker stopped (%s); epochs per participant: %s",
            self.stop.reason or "all participants done",
            epochs,
        )
        return EXIT_OK

    def _task(self, store: RunStore, cfg: RunConfig) -> LoadedTask:
        """The task, refused when its model is not the run's (the aggregator records that)."""
        task = load_task(self.s.task or cfg.task)
        deadline = time.monotonic() + 120.0
        while (record := self._with_retry(store.model_record)) is None:
            if self._with_retry(store.has_params):
                # A run seeded without a record (by an earlier version, or a test harness):
                # its parameters exist, so only their number can be checked.
                check_size(task, self._with_retry(store.read_params)[1].size, cfg.run_id)
                return task
            if time.monotonic() > deadline:
                raise ConfigError(f"run {cfg.run_id!r} has no model record: is its aggregator up?")
            if self.stop.wait(0.2):
                raise StopRequested("stopped while waiting for the run's model")
        check_model(task, record, cfg.run_id)
        return task

    def _local_data(self, task: LoadedTask, cfg: RunConfig, pid: int) -> Dataset:
        ctx = context_for(cfg, pid, self.s.data_dir)
        ds = task.local_data(ctx)
        where = f"from {ctx.data_dir}" if ctx.data_dir else "(simulated split)"
        log.info("participant %d: %d local examples %s", pid, len(ds), where)  # type: ignore[arg-type]
        return ds

    def _participants(self, store: RunStore, cfg: RunConfig) -> list[int]:
        if self.s.participants:
            return list(self.s.participants)
        if self.s.slot is not None:
            i, w = self.s.slot
            return [p for p in range(cfg.participants) if p % w == i]
        return [store.claim_participant(cfg.participants) for _ in range(self.s.claim)]

    def _with_retry(self, fn):  # type: ignore[no-untyped-def]
        backoff = Backoff(initial=0.2, cap=5.0)
        while True:
            try:
                return fn()
            except (StoreError, BrokerError) as exc:
                log.warning("%s; retrying", exc)
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
            self._with_retry(lambda live=live: store.heartbeat(live))
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
                self._wait_applied(store, pid, report.seq)

    def _wait_turn(self, store: RunStore, live: list[int]) -> int | None:
        """Block (≤ 1 s) until one of our participants holds the turn."""
        holder = self._with_retry(store.turn)
        if holder in live:
            return holder
        self._with_retry(lambda: store.wait_wake(live, timeout=1.0))
        holder = self._with_retry(store.turn)
        return holder if holder in live else None

    def _wait_applied(self, store: RunStore, pid: int, seq: int, timeout: float = 30.0) -> None:
        """Hold the turn until our last update is applied, so no one downloads before it lands."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            if self._with_retry(lambda: store.applied_high(pid)) >= seq:
                return
            self.stop.wait(0.01)
