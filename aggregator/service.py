"""The aggregator: consume updates, apply them to the global parameters exactly once, ack.

One connection lifetime is ``_session``; ``run`` rebuilds it with capped, jittered backoff. Within
a session, deliveries (``shared.broker.Consumer``) are processed in batches (group commit): each
message gets a verdict (``aggregator.admission``), ``aggregator.batch.apply_batch`` applies the
accepted ones in memory, the whole batch is written to Redis by one fenced Lua script, the
refused messages are dead-lettered with a reason, and only then is the batch acked with one
``multiple`` ack. A crash anywhere before the commit loses nothing (the broker redelivers
the unacked messages); a crash after it applies nothing twice (the replay window committed with
the parameters turns the redelivery into a no-op).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from dssgd.aggregator.admission import Admission
from dssgd.aggregator.batch import Outcome, apply_batch
from dssgd.aggregator.defence import build as build_defence
from dssgd.aggregator.evaluator import Evaluator
from dssgd.aggregator.metrics import AggregatorMetrics
from dssgd.shared import dedup
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Consumer, Delivery, tune_for_large_messages
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, FencedError, StoreError, is_permanent
from dssgd.shared.lifecycle import EXIT_FENCED, EXIT_OK, Backoff, StopFlag
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import HOLDER_SILENCE, AggregatorState, RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tasks import load_task, model_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorSettings:
    run_id: str
    connections: Connections = field(default_factory=Connections)
    prefetch: int = 1000  # deliveries in flight; bounds memory and the size of a group commit
    max_batch: int = 500  # messages per Redis commit at most
    # How long a batch may wait for more deliveries after its first one: every commit writes the
    # whole parameter vector, so fuller batches are cheaper per update (group commit).
    batch_window: float = 0.005
    evaluate: bool = True  # run the periodic test-set evaluation thread
    # Ordered modes: how long the first turn waits for every participant to be present.
    turn_timeout: float = 60.0
    # A turn holder whose host stopped heartbeating (renewing its lease) for this long loses it.
    holder_silence: float = HOLDER_SILENCE
    # Per-participant HMAC keys (from `dssgd provision`); when set, every message must carry a
    # valid tag and a user_id that names its participant's broker user.
    keys: dict[int, bytes] | None = field(default=None, repr=False)
    metrics_port: int | None = None  # serve Prometheus /metrics here (0 = any free port)
    metrics_addr: str = "127.0.0.1"
    name: str = field(default_factory=lambda: f"aggregator@{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if self.prefetch < 1 or self.max_batch < 1:
            raise ConfigError("prefetch and max batch must be >= 1")


@dataclass(frozen=True)
class Snapshot:
    """The committed state, for the evaluator: parameters, version and totals of one commit."""

    w: np.ndarray
    version: int
    applied: int
    bytes_in: int


class Aggregator:
    def __init__(
        self, settings: AggregatorSettings, stop: StopFlag, cfg: RunConfig | None = None
    ) -> None:
        self.s = settings
        self.stop = stop
        self.names = AmqpNames(settings.run_id)
        self.initial_cfg = cfg
        self.lock = threading.Lock()  # guards `state` between apply and the evaluator's snapshot
        self.state: AggregatorState | None = None
        self.cfg: RunConfig | None = None
        self.totals: Counter[str] = Counter()
        self.evaluator: Evaluator | None = None
        self.rng = random.Random()
        tune_for_large_messages()
        self.metrics = AggregatorMetrics(settings.run_id)
        self.serving_since = 0.0  # monotonic time the current session began serving
        # Monotonic time since which this session's polls found nothing to consume (None: busy,
        # or not consuming): how a run's end knows the queue is drained (services.RunEndWatcher).
        self.quiet_since: float | None = None
        self.metrics_url: str | None = None
        if settings.metrics_port is not None:
            port = self.metrics.serve(settings.metrics_port, settings.metrics_addr)
            self.metrics_url = f"http://{settings.metrics_addr}:{port}/metrics"
            log.info("Prometheus metrics on %s", self.metrics_url)

    # --- outer loop -----------------------------------------------------------------------------

    def run(self) -> int:
        backoff = Backoff(initial=0.2, cap=5.0)
        try:
            while not self.stop.is_set():
                try:
                    self._session()
                    backoff.reset()
                except FencedError as exc:
                    log.error("%s; exiting so the other aggregator can work", exc)
                    return EXIT_FENCED
                except (BrokerError, StoreError) as exc:
                    if is_permanent(exc):  # rights or a password taken away: end, say why
                        log.error("%s: retrying cannot help, stopping", exc)
                        raise
                    log.warning("connection lost (%s); reconnecting", exc)
                    backoff.sleep(self.stop)
        finally:
            if self.evaluator is not None:
                self.evaluator.close()
            self.metrics.close()
        log.info("aggregator stopped (%s): %s", self.stop.reason or "done", dict(self.totals))
        return EXIT_OK

    # --- one connection lifetime ----------------------------------------------------------------

    def _session(self) -> None:
        r = redis_connect(self.s.connections.redis_url)
        store = RunStore(r, self.s.run_id)
        cfg = self._config(store)
        task = load_task(cfg.task)
        store.init_params(task.initial_state(cfg.seed), cfg.shards)
        store.init_model(model_record(task))  # workers check their model against it
        fence = store.take_fence()
        self.serving_since = time.monotonic()
        with self.lock:
            self.state = store.load_state()
            self.cfg = cfg
            self.totals = Counter(store.counters())
        self.rule = UpdateRule(cfg.effective_rule, cfg.staleness_exponent, cfg.participants)
        # Rate state lives as long as the session: a restart forgets it, which gives a key
        # holder at most one extra burst (docs/RELIABILITY.md).
        self.admission = Admission(cfg, task.layout.n, self.s.keys)
        self.defence = build_defence(cfg, task)  # per session: it judges against this state
        if self.evaluator is None and self.s.evaluate:
            self.evaluator = Evaluator(self.snapshot, store, cfg, self.metrics)
        log.info(
            "run %s: serving %s (n=%d) at version %d, rule %s, order %s, fence %d",
            cfg.run_id,
            cfg.task,
            task.layout.n,
            self.state.version,
            self.rule.name,
            cfg.order,
            fence,
        )
        consumer = Consumer(
            self.s.connections.amqp_url,
            self.names,
            self.s.name,
            self.s.prefetch,
            cfg.queue_max_length,
            cfg.queue_replicas,
        )
        try:
            last_housekeeping = 0.0
            while not self.stop.is_set():
                # A quiet aggregator looks at its stop flag ten times a second: SIGTERM at the
                # end of a run takes effect at once, not after half a second.
                batch = consumer.deliveries(0.1, self.s.max_batch, self.s.batch_window)
                if batch:
                    self.quiet_since = None
                    self._process(batch, store, fence, consumer)
                elif self.quiet_since is None:
                    self.quiet_since = time.monotonic()
                now = time.monotonic()
                if now - last_housekeeping >= 1.0:
                    last_housekeeping = now
                    self._housekeeping(store, fence)
            # Graceful stop: what was delivered is processed and acked; the rest is requeued.
            while batch := consumer.deliveries(0.0, self.s.max_batch):
                self._process(batch, store, fence, consumer)
        finally:
            self.quiet_since = None
            consumer.close()

    def quiet_for(self) -> float:
        """Seconds this aggregator has been consuming with nothing to consume (0 if busy)."""
        since = self.quiet_since
        return 0.0 if since is None else time.monotonic() - since

    def snapshot(self) -> Snapshot | None:
        """Parameters, version and totals of the last commit (the evaluator's only view)."""
        with self.lock:
            if self.state is None:
                return None
            return Snapshot(
                self.state.w.copy(),
                self.state.version,
                self.totals["applied"],
                self.totals["bytes_in"],
            )

    def _config(self, store: RunStore) -> RunConfig:
        if self.initial_cfg is not None:
            cfg, created = store.create_config(self.initial_cfg)
            if created:
                log.info("created run %s", cfg.run_id)
            elif cfg.replace(created=0.0) != self.initial_cfg.replace(created=0.0):
                log.warning(
                    "run %s exists with a different configuration; using the stored one", cfg.run_id
                )
            return cfg
        return store.wait_config(self.stop)

    # --- one batch ------------------------------------------------------------------------------

    def _process(
        self, batch: list[Delivery], store: RunStore, fence: int, consumer: Consumer
    ) -> None:
        """Admission → apply_batch → commit → dead letters → ack. The lock is held from the apply
        to the new totals, so a snapshot never pairs applied parameters with older totals."""
        assert self.state is not None and self.cfg is not None
        cfg = self.cfg
        holder = store.turn() if cfg.ordered else None
        t0 = time.perf_counter()
        with self.lock:
            state = self.state

            # What every range shard has applied: a duplicate here is one on every shard.
            def window_of(p: int) -> tuple[int, int]:
                return dedup.intersect([state.windows(s).get(p, (0, 0)) for s in shards])

            shards = range(state.shards)
            verdicts = [self.admission.admit(d, window_of) for d in batch]
            out = apply_batch(state, verdicts, cfg, self.rule, holder, self.defence)
            stamp = f"{time.time():.6f}"
            turn_expect = turn_next = ""
            if out.holder_done and holder is not None:
                turn_expect, turn_next = str(holder), self._next_turn(store, holder)
            try:
                store.commit(
                    fence,
                    state,
                    out.dedup_changes,
                    dict(out.counters),
                    [f"{e}:{stamp}" for e in out.log_entries],
                    turn_expect,
                    turn_next,
                    shards=out.shard_changes(),
                )
            except BaseException:
                self.state = None  # applied in memory, not committed: the next session reloads
                raise
            self.totals.update(out.counters)
        # After the commit: a crash before it leaves nothing dead-lettered twice; a crash
        # between here and the ack re-sends these dead letters once more (at least once).
        for rej in out.rejected:
            log.warning(
                "rejected message from %s (%s): %s",
                rej.participant if rej.participant is not None else rej.delivery.routing_key[:64],
                rej.reason,
                rej.detail[:200],
            )
            consumer.dead_letter(rej.delivery, rej.reason, rej.detail)
        if out.holder_refused is not None and holder is not None:
            # Lets the holder stop waiting for an apply that will not come (worker._wait_applied).
            store.record_progress(holder, refused_seq=out.holder_refused)
        consumer.ack_through(batch[-1].tag)
        self._observe(out, len(batch), time.perf_counter() - t0, state.version)

    def _observe(self, out: Outcome, size: int, seconds: float, version: int) -> None:
        counters = out.counters
        self.metrics.observe_batch(
            applied=counters["applied"],
            duplicates=counters["duplicates"],
            rejected={
                k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:")
            },
            staleness=out.stalenesses,
            bytes_in=counters["bytes_in"],
            seconds=seconds,
            version=version,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d: %s in %.1f ms", size, dict(counters), 1000 * seconds)

    # --- turns (ordered modes) --------------------------------------------------------------------

    def _candidates(self, store: RunStore) -> list[int]:
        """Who may get the turn: participants whose host heartbeats, not finished."""
        finished = store.finished()
        return sorted(p for p in store.active(self.s.holder_silence) if p not in finished)

    def _next_turn(self, store: RunStore, holder: int | None) -> str:
        assert self.cfg is not None
        cands = self._candidates(store)
        if not cands:
            return ""
        if self.cfg.order == "random":
            return str(self.rng.choice(cands))
        later = [p for p in cands if holder is None or p > holder]
        return str(later[0] if later else cands[0])

    def _housekeeping(self, store: RunStore, fence: int) -> None:
        assert self.state is not None and self.cfg is not None
        store.aggregator_heartbeat(
            {
                "name": self.s.name,
                "version": self.state.version,
                "fence": fence,
                "time": time.time(),
                "metrics_url": self.metrics_url,
            }
        )
        if self.cfg.dp_on and self.metrics_url is not None:
            # ε is spent (and recorded) by the participants; mirror it for dashboards.
            for pid, progress in store.all_progress(self.cfg.participants).items():
                if "dp_total" in progress:
                    bound = progress.get("dp_bound", "basic")
                    self.metrics.set_epsilon(pid, float(progress["dp_total"]), bound)
        if not self.cfg.ordered:
            return
        holder = store.turn()
        active = store.active()
        # A holder whose host stopped heartbeating loses the turn; its late update, if it comes,
        # is applied like any other, as a stale one (docs/ARCHITECTURE.md, "Dead turn holders").
        # Not in a session's first seconds: after an outage every host gets time to renew.
        serving = time.monotonic() - self.serving_since
        stale = (
            holder is not None
            and serving > self.s.holder_silence
            and holder not in store.active(self.s.holder_silence)
        )
        # The first turn waits (up to turn_timeout) until every participant is present;
        # otherwise the first worker process to start takes turn after turn on its own.
        if holder is None and time.monotonic() - self.serving_since < self.s.turn_timeout:
            finished = store.finished()
            if sum(p not in finished for p in active) < self.cfg.participants - len(finished):
                return
        if holder is None or stale:
            nxt = self._next_turn(store, holder)
            if nxt and store.pass_turn(fence, "" if holder is None else str(holder), nxt):
                log.info("turn passed from %s to %s", holder, nxt)
