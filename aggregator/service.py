"""The aggregator: consume updates, apply them to the global parameters exactly once, ack.

One connection lifetime is ``_session``; ``run`` rebuilds it with capped, jittered backoff. Within
a session, deliveries are processed in batches (group commit): every message of a batch is
decoded and validated, valid ones are applied in memory, invalid ones are dead-lettered with a
reason, then the whole batch is written to Redis by one fenced Lua script, and only then acked
with one ``multiple`` ack. A crash anywhere before the commit loses nothing (the broker redelivers
the unacked messages); a crash after it applies nothing twice (the replay window committed with
the parameters turns the redelivery into a no-op).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from aggregator.evaluator import Evaluator
from aggregator.metrics import AggregatorMetrics
from aggregator.validate import validate
from shared import dedup, wire
from shared.amqp_names import DETAIL_HEADER, REASON_HEADER, AmqpNames
from shared.broker import connect as amqp_connect
from shared.broker import declare_topology, tune_for_large_messages
from shared.config import Connections, RunConfig
from shared.errors import BrokerError, ConfigError, FencedError, StoreError, ValidationError
from shared.lifecycle import EXIT_FENCED, EXIT_OK, Backoff, StopFlag
from shared.models import initial_parameters, model_spec
from shared.provision import participant_user
from shared.rules import UpdateRule, apply_update, bound_l2, decay
from shared.store import AggregatorState, RunStore
from shared.store import connect as redis_connect

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
    turn_timeout: float = 60.0  # a turn holder silent this long loses the turn (ordered modes)
    # Per-participant HMAC keys (from `dssgd provision`); when set, every message must carry a
    # valid tag and a user_id that names its participant's broker user.
    keys: dict[int, bytes] | None = field(default=None, repr=False)
    metrics_port: int | None = None  # serve Prometheus /metrics here (0 = any free port)
    metrics_addr: str = "127.0.0.1"
    name: str = field(default_factory=lambda: f"aggregator@{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if self.prefetch < 1 or self.max_batch < 1:
            raise ConfigError("prefetch and max batch must be >= 1")


@dataclass
class _Delivery:
    tag: int
    props: pika.BasicProperties
    body: bytes
    routing_key: str


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
        self._pending: list[_Delivery] = []
        self._buckets: dict[int, tuple[float, float]] = {}  # rate limit: (tokens, last time)
        tune_for_large_messages()
        self.metrics = AggregatorMetrics(settings.run_id)
        self.serving_since = 0.0  # monotonic time the current session began serving
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
        spec = model_spec(cfg.model)
        store.init_params(initial_parameters(cfg.model, cfg.seed))
        fence = store.take_fence()
        self.serving_since = time.monotonic()
        with self.lock:
            self.state = store.load_state()
            self.cfg = cfg
        self.rule = UpdateRule(cfg.effective_rule, cfg.staleness_exponent, cfg.participants)
        self.totals = Counter(store.counters())
        if self.evaluator is None and self.s.evaluate:
            self.evaluator = Evaluator(self, store, cfg)
        log.info(
            "run %s: serving %s (n=%d) at version %d, rule %s, order %s, fence %d",
            cfg.run_id,
            cfg.model,
            spec.n_params,
            self.state.version,
            self.rule.name,
            cfg.order,
            fence,
        )
        conn = amqp_connect(self.s.connections.amqp_url, self.s.name)
        self._pending = []
        try:
            ch = conn.channel()
            declare_topology(ch, self.names, cfg.queue_max_length)
            dead_ch = conn.channel()
            dead_ch.confirm_delivery()
            ch.basic_qos(prefetch_count=self.s.prefetch)
            ch.basic_consume(
                self.names.queue, self._on_message, auto_ack=False, consumer_tag=self.s.name
            )
            last_housekeeping = 0.0
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.5)
                if self._pending:
                    deadline = time.monotonic() + self.s.batch_window
                    while len(self._pending) < self.s.max_batch:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        conn.process_data_events(time_limit=left)
                while self._pending:
                    batch = self._pending[: self.s.max_batch]
                    self._pending = self._pending[self.s.max_batch :]
                    self._process(batch, store, fence, ch, dead_ch)
                now = time.monotonic()
                if now - last_housekeeping >= 1.0:
                    last_housekeeping = now
                    self._housekeeping(store, fence)
            # Graceful stop: what was delivered is processed and acked; the rest is requeued.
            if self._pending:
                self._process(self._pending, store, fence, ch, dead_ch)
                self._pending = []
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"RabbitMQ connection failed: {exc!r}") from exc
        finally:
            # A broken connection may fail to close in many ways; the broker requeues our unacked
            # deliveries either way.
            with contextlib.suppress(Exception):
                conn.close()

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

    def _on_message(
        self,
        _ch: BlockingChannel,
        method: pex.spec.Basic.Deliver,  # type: ignore[name-defined]
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._pending.append(_Delivery(method.delivery_tag, props, body, method.routing_key))

    # --- one batch ------------------------------------------------------------------------------

    def _process(
        self,
        batch: list[_Delivery],
        store: RunStore,
        fence: int,
        ch: BlockingChannel,
        dead_ch: BlockingChannel,
    ) -> None:
        assert self.state is not None and self.cfg is not None
        cfg, n = self.cfg, self.state.w.size
        counters: Counter[str] = Counter()
        dedup_changes: dict[int, str] = {}
        log_entries: list[str] = []
        stalenesses: list[int] = []
        dead: list[tuple[_Delivery, str, str]] = []
        holder = store.turn() if cfg.ordered else None
        advance = False
        t0 = time.perf_counter()
        with self.lock:
            state = self.state
            for d in batch:
                counters["bytes_in"] += len(d.body)
                try:
                    upd = wire.decode(
                        d.body,
                        expected_run=cfg.run_id,
                        expected_n=n,
                        key_for=self._key_for if self.s.keys else None,
                    )
                except wire.AuthenticationError as exc:
                    dead.append((d, "unauthenticated", str(exc)))
                    continue
                except wire.WireError as exc:
                    dead.append((d, "undecodable", str(exc)))
                    continue
                # Replays first: a copy of an applied update is a duplicate whatever else holds.
                window = state.dedup.get(upd.participant, (0, 0))
                verdict = dedup.check(window, upd.seq)
                if verdict == dedup.DUPLICATE:
                    counters["duplicates"] += 1
                    continue
                if verdict == dedup.TOO_OLD:
                    dead.append((d, "replay", f"seq {upd.seq} is older than the replay window"))
                    continue
                try:
                    self._check_rate(upd.participant, cfg)  # a flood is a flood, valid or not
                    staleness = validate(upd, cfg, n, state.version)
                    self._check_sender(upd.participant, d)
                except ValidationError as exc:
                    dead.append((d, exc.reason, exc.detail))
                    advance = advance or upd.participant == holder
                    continue
                weight = self.rule.weight(staleness)
                values = upd.values
                if cfg.max_l2 is not None:
                    values, clipped = bound_l2(values, cfg.max_l2)
                    counters["l2_clipped"] += clipped
                apply_update(state.w, state.stat, upd.indices, values, weight)
                decay(state.stat, cfg.stat_decay)
                state.version += 1
                window = dedup.mark(window, upd.seq)
                state.dedup[upd.participant] = window
                dedup_changes[upd.participant] = dedup.encode_state(window)
                log_entries.append(f"{upd.participant}:{upd.seq}:{state.version}:{staleness}")
                counters["applied"] += 1
                counters["entries"] += upd.count
                counters["staleness_sum"] += staleness
                stalenesses.append(staleness)
                advance = advance or upd.participant == holder
        for d, reason, detail in dead:
            self._dead_letter(dead_ch, d, reason, detail)
            counters["rejected"] += 1
            counters[f"rejected:{reason}"] += 1
        stamp = f"{time.time():.6f}"
        log_entries = [f"{e}:{stamp}" for e in log_entries]
        turn_expect = turn_next = ""
        if advance and holder is not None:
            turn_expect, turn_next = str(holder), self._next_turn(store, holder)
        store.commit(
            fence, state, dedup_changes, dict(counters), log_entries, turn_expect, turn_next
        )
        ch.basic_ack(batch[-1].tag, multiple=True)
        self.totals.update(counters)
        self.metrics.observe_batch(
            applied=counters["applied"],
            duplicates=counters["duplicates"],
            rejected={
                k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:")
            },
            staleness=stalenesses,
            bytes_in=counters["bytes_in"],
            seconds=time.perf_counter() - t0,
            version=state.version,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch of %d: %s in %.1f ms",
                len(batch),
                dict(counters),
                1000 * (time.perf_counter() - t0),
            )

    def _key_for(self, participant: int) -> bytes | None:
        if self.s.keys is None:
            return None
        return self.s.keys.get(participant)

    def _check_sender(self, participant: int, d: _Delivery) -> None:
        """The broker vouches for user_id and the routing key; both must name the participant."""
        if d.routing_key != AmqpNames.routing_key(participant):
            raise ValidationError(
                "wrong-routing-key", f"participant {participant} sent with key {d.routing_key!r}"
            )
        if self.s.keys is not None:
            expected = participant_user(self.s.run_id, participant)
            if d.props.user_id != expected:
                raise ValidationError(
                    "impersonation", f"user_id {d.props.user_id!r} is not {expected!r}"
                )

    def _check_rate(self, participant: int, cfg: RunConfig) -> None:
        if cfg.rate_limit is None:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(participant, (max(1.0, cfg.rate_limit), now))
        tokens = min(max(1.0, cfg.rate_limit), tokens + (now - last) * cfg.rate_limit)
        if tokens < 1.0:
            self._buckets[participant] = (tokens, now)
            raise ValidationError(
                "rate-limited", f"participant {participant} exceeds {cfg.rate_limit}/s"
            )
        self._buckets[participant] = (tokens - 1.0, now)

    def _dead_letter(
        self, dead_ch: BlockingChannel, d: _Delivery, reason: str, detail: str
    ) -> None:
        log.warning(
            "rejected message from %s (%s): %s", d.props.app_id or d.routing_key, reason, detail
        )
        headers = dict(d.props.headers or {})
        headers.update(
            {
                REASON_HEADER: reason,
                DETAIL_HEADER: detail[:500],
                "x-dssgd-routing-key": d.routing_key,
            }
        )
        props = pika.BasicProperties(
            content_type=d.props.content_type,
            app_id=d.props.app_id,
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=headers,
        )
        try:
            dead_ch.basic_publish(self.names.dead_exchange, "", d.body, props)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot dead-letter a message: {exc!r}") from exc

    # --- turns (ordered modes) --------------------------------------------------------------------

    def _candidates(self, store: RunStore) -> list[int]:
        finished = store.finished()
        return sorted(p for p in store.active() if p not in finished)

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
        stale = holder is not None and (
            holder not in active or time.time() - active[holder] > self.s.turn_timeout
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
