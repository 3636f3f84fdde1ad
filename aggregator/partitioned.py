"""The partitioned aggregator (``dssgd aggregator --ingest K``): K ingest processes, one applier.

Participant p belongs to partition p mod K, which has its own queue (``AmqpNames.partition_queue``,
bound to the routing keys of its participants, single active consumer). Partition i's **ingest**
owns its participants' replay windows: it decodes, validates and dedups on (participant, seq)
(``aggregator.admission``), and folds a batch's accepted updates into one pre-summed sparse
vector (``aggregator.presum``). It hands that off through Redis (``shared.ingest_store``) and
acks the batch's messages only once the applier has committed it. The **applier** adds every
waiting hand-off to the global state and writes it in the fenced commit of the one-process
aggregator, which also records (partition, batch id), deletes the hand-off and writes the replay
windows of the batch's participants: one script, all or nothing.

Crash points (kill -9, any process, any moment), each recovered from Redis:

* ingest dies before its hand-off: nothing was written; the broker redelivers its unacked input;
* ingest dies after its hand-off, before the ack: the batch waits in Redis and is applied once;
  the restarted ingest first waits until no batch of its partition is pending, then loads the
  committed windows, so every redelivered input is a duplicate (acked, not applied);
* applier dies before its commit: the hand-offs are still in Redis; the restarted applier reloads
  the state and applies them; their ingests were waiting, not acking;
* applier commits, ingest not told (it died, or missed the wake-up): the commit is the truth; an
  ingest polls ``applied`` as well as waiting for the wake-up, a restarted one sees its batch gone;
* ingest dies after the ack: the commit had the windows; nothing to redo.

A zombie ingest (one that lost its partition) is fenced by its epoch at the hand-off; a zombie
applier by the aggregator fence at the commit. What the partitioned mode cannot do, it refuses
(``check_supported``): ordered turns, the per-message defences that judge against the live global
state, and counter decay (a per-update β does not commute with a pre-sum). Staleness is measured
at ingest, against the version committed when the batch formed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pika
import pika.exceptions as pex
from dssgd.aggregator.admission import Accepted, Admission, Duplicate, Rejected
from dssgd.aggregator.presum import Accumulator, PreSum, apply_presum, decode, encode
from dssgd.aggregator.service import Aggregator, AggregatorSettings
from dssgd.aggregator.validate import check_version
from dssgd.shared import dedup
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Consumer, Delivery, declare_partitions, tune_for_large_messages
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, FencedError, StoreError, ValidationError
from dssgd.shared.ingest_store import IngestStore
from dssgd.shared.lifecycle import EXIT_FENCED, EXIT_OK, Backoff, StopFlag
from dssgd.shared.rules import UpdateRule, bound_l2
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.tasks import param_entries

log = logging.getLogger(__name__)


def check_supported(cfg: RunConfig) -> None:
    why = []
    if cfg.ordered:
        why.append(f"order {cfg.order} (turns need one consumer)")
    if cfg.defence != "none":
        why.append(f"defence {cfg.defence} (it judges each update against the live state)")
    if cfg.stat_decay != 1.0:
        why.append("stat decay (a per-update β does not commute with a pre-sum)")
    if cfg.shards > 1:
        why.append(f"{cfg.shards} range shards (its applier commits one shard)")
    if why:
        raise ConfigError(
            f"run {cfg.run_id}: the partitioned aggregator (--ingest) cannot serve "
            f"{'; '.join(why)}; run the one-process aggregator instead"
        )


def _serve(stop: StopFlag, session: object, what: str) -> int:
    """The outer loop of either role: sessions rebuilt with capped, jittered backoff."""
    backoff = Backoff(initial=0.2, cap=5.0)
    while not stop.is_set():
        try:
            session()  # type: ignore[operator]
            backoff.reset()
        except FencedError as exc:
            log.error("%s; exiting so the newer %s can work", exc, what)
            return EXIT_FENCED
        except (BrokerError, StoreError) as exc:
            log.warning("%s: connection lost (%s); reconnecting", what, exc)
            backoff.sleep(stop)
    return EXIT_OK


# --- ingest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestSettings:
    run_id: str
    partition: int
    partitions: int
    connections: Connections = field(default_factory=Connections)
    prefetch: int = 1000
    max_batch: int = 500
    batch_window: float = 0.005
    keys: dict[int, bytes] | None = field(default=None, repr=False)
    name: str = field(default_factory=lambda: f"ingest@{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if not 0 <= self.partition < self.partitions:
            raise ConfigError(f"partition must be within 0..{self.partitions - 1}")


@dataclass
class InFlight:
    """A batch built from deliveries: handed off (if it carries anything), not yet acked."""

    presum: PreSum
    last_tag: int
    rejected: list[Rejected]


class Ingest:
    def __init__(self, settings: IngestSettings, stop: StopFlag) -> None:
        self.s, self.stop = settings, stop
        self.names = AmqpNames(settings.run_id)
        self.totals: Counter[str] = Counter()
        self.quiet_since: float | None = None
        self.last_beat = 0.0
        tune_for_large_messages()

    def quiet_for(self) -> float:
        """Seconds this ingest has been consuming with nothing to consume (0 if busy)."""
        since = self.quiet_since
        return 0.0 if since is None else time.monotonic() - since

    def run(self) -> int:
        die_with_parent()
        code = _serve(self.stop, self._session, f"ingest {self.s.partition}")
        log.info("ingest %d stopped: %s", self.s.partition, dict(self.totals))
        return code

    def _session(self) -> None:
        s = self.s
        r = redis_connect(s.connections.redis_url)
        store = RunStore(r, s.run_id)
        cfg = store.wait_config(self.stop)
        check_supported(cfg)
        self.cfg, self.n = cfg, store.layout().n
        self.istore = IngestStore(r, s.run_id, s.partitions, s.partition)
        if not self._recover():
            return
        self.admission = Admission(cfg, self.n, s.keys)
        self.rule = UpdateRule(cfg.effective_rule, cfg.staleness_exponent, cfg.participants)
        self.acc = Accumulator(self.n)
        consumer = Consumer(
            s.connections.amqp_url,
            self.names,
            s.name,
            s.prefetch,
            cfg.queue_max_length,
            cfg.queue_replicas,
            queue=self.names.partition_queue(s.partition, s.partitions),
            topology=lambda ch: declare_partitions(
                ch,
                self.names,
                s.partitions,
                cfg.participants,
                cfg.queue_max_length,
                cfg.queue_replicas,
            ),
        )
        self.consumer = consumer
        try:
            self._consume(consumer)
        finally:
            consumer.close()

    def _recover(self) -> bool:
        """Take the partition (a new fence) and load its committed windows; False if stopped."""
        s = self.s
        self.fence = self.istore.take_fence()
        # A batch an earlier ingest of this partition handed off may still be on its way: the
        # committed windows mean something only once it is applied (or we would re-apply its
        # redelivered inputs).
        while self.istore.pending():
            if self.stop.is_set():
                return False
            self.istore.wait_done(0.2)
        self.windows = self.istore.windows()
        self.next_batch = self.istore.applied_batch() + 1
        log.info(
            "ingest %d/%d of run %s: %d windows, next batch %d, fence %d",
            s.partition,
            s.partitions,
            s.run_id,
            len(self.windows),
            self.next_batch,
            self.fence,
        )
        return True

    def _consume(self, consumer: Consumer) -> None:
        s = self.s
        # Pipelined: one batch handed off (``inflight``) while the next is decoded (``built``).
        inflight: InFlight | None = None
        built: InFlight | None = None
        while not self.stop.is_set():
            if built is None:
                batch = consumer.deliveries(0.02 if inflight else 0.5, s.max_batch, s.batch_window)
                built = self._build(batch) if batch else None
            self._heartbeat(inflight is not None or built is not None)
            if inflight is not None:
                # With the next batch ready there is nothing else to do but wait.
                if not self._committed(inflight, 3600.0 if built else 0.0):
                    continue
                self._finish(inflight, consumer)
                inflight = None
            if built is not None:
                inflight, built = self._hand_off(built), None
        # Graceful stop: ack what commits within a second; the rest is redelivered.
        if inflight is not None and self._committed(inflight, 1.0):
            self._finish(inflight, consumer)

    def _heartbeat(self, busy: bool) -> None:
        """Whether this partition is drained, for the applier's end of run (``quiet_for``)."""
        now = time.monotonic()
        if busy:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now
        if now - self.last_beat >= 1.0:
            self.last_beat = now
            self.istore.report_quiet(time.time(), self.quiet_for())

    def _build(self, batch: list[Delivery]) -> InFlight:
        part = self.s.partition
        version = self.istore.version()  # staleness is measured against the last commit
        window_of = lambda p: self.windows.get(p, (0, 0))  # noqa: E731
        ps = PreSum(part, self.next_batch, self.fence, *self.acc.take())
        rejected: list[Rejected] = []
        for d in batch:
            ps.counters["bytes_in"] += len(d.body)
            v = self.admission.admit(d, window_of)
            if isinstance(v, Accepted):
                v = self._accept(v, version, ps)
            if isinstance(v, Duplicate):
                ps.counters["duplicates"] += 1
            elif isinstance(v, Rejected):
                rejected.append(v)
                ps.counters["rejected"] += 1
                ps.counters[f"rejected:{v.reason}"] += 1
        ps.indices, ps.values, ps.counts = self.acc.take()
        return InFlight(ps, batch[-1].tag, rejected)

    def _accept(self, v: Accepted, version: int, ps: PreSum) -> Accepted | Duplicate | Rejected:
        """Fold one admitted update into the batch (``apply_batch``'s checks, done here)."""
        upd, cfg = v.update, self.cfg
        p = upd.participant
        if p % self.s.partitions != self.s.partition:  # the bindings make this impossible
            return Rejected(v.delivery, "wrong-partition", f"participant {p}", p, upd.seq)
        seen = dedup.check(self.windows.get(p, (0, 0)), upd.seq)  # a copy in this same batch
        if seen == dedup.DUPLICATE:
            return Duplicate(v.delivery, p, upd.seq)
        if seen == dedup.TOO_OLD:
            return Rejected(
                v.delivery, "replay", f"seq {upd.seq} is older than the window", p, upd.seq
            )
        try:
            staleness = check_version(upd, cfg, version)
        except ValidationError as exc:
            return Rejected(v.delivery, exc.reason, exc.detail, p, upd.seq)
        if upd.count:
            values = upd.values
            if cfg.max_l2 is not None:
                params = upd.indices < param_entries(cfg, self.n)
                values, clipped = bound_l2(values, cfg.max_l2, params)
                ps.counters["l2_clipped"] += clipped
            self.acc.add(upd.indices, values, self.rule.weight(staleness))
        else:
            ps.counters["empty"] += 1
        window = dedup.mark(self.windows.get(p, (0, 0)), upd.seq)
        self.windows[p] = window
        ps.windows[p] = dedup.encode_state(window)
        ps.records.append((p, upd.seq, staleness, bool(upd.count)))
        ps.counters["applied"] += 1
        ps.counters["entries"] += upd.count
        ps.counters["staleness_sum"] += staleness
        return v

    def _hand_off(self, f: InFlight) -> InFlight:
        self.istore.hand_off(self.fence, encode(f.presum))
        self.next_batch += 1
        return f

    def _committed(self, f: InFlight, wait: float) -> bool:
        """Whether the applier committed ``f``, waiting up to ``wait`` s (less if stopping)."""
        start = time.monotonic()
        while self.istore.applied_batch() < f.presum.batch:
            waited = time.monotonic() - start
            if waited >= wait or (self.stop.is_set() and waited > 1.0):
                if wait >= 3600.0:
                    raise StoreError(f"the applier did not commit batch {f.presum.batch} in 1 h")
                return False
            self.istore.wait_done(min(0.2, wait - waited))
        return True

    def _finish(self, f: InFlight, consumer: Consumer) -> None:
        """``f`` is committed: dead letters, then one ack for its messages."""
        for rej in f.rejected:
            who = rej.participant if rej.participant is not None else "?"
            log.warning("rejected message from %s (%s): %s", who, rej.reason, rej.detail[:200])
            consumer.dead_letter(rej.delivery, rej.reason, rej.detail)
        consumer.ack_through(f.last_tag)
        self.totals.update(f.presum.counters)


# --- applier -----------------------------------------------------------------------------------


class Applier(Aggregator):
    """The one writer of the global state: adds the ingests' pre-summed batches and commits them
    (the one-process aggregator's fence, state, evaluator, metrics and heartbeat)."""

    def __init__(
        self,
        settings: AggregatorSettings,
        partitions: int,
        stop: StopFlag,
        cfg: RunConfig | None = None,
    ) -> None:
        super().__init__(settings, stop, cfg)
        self.partitions = partitions
        self.istore: IngestStore | None = None

    def quiet_for(self) -> float:
        """Quiet only when every ingest is: the run's end waits for each partition to drain."""
        own, istore = super().quiet_for(), self.istore
        if own == 0.0 or istore is None:
            return 0.0
        try:
            return min(own, istore.ingests_quiet(time.time()))
        except StoreError:
            return 0.0

    def _session(self) -> None:
        from dssgd.aggregator.evaluator import Evaluator  # PyTorch: only if evaluating
        from dssgd.shared.tasks import load_task, model_record

        r = redis_connect(self.s.connections.redis_url)
        store = RunStore(r, self.s.run_id)
        cfg = self._config(store)
        check_supported(cfg)
        task = load_task(cfg.task)
        store.init_params(task.initial_state(cfg.seed))
        store.init_model(model_record(task))
        istore = self.istore = IngestStore(r, self.s.run_id, self.partitions)
        if old := istore.claim_partitions():
            log.warning("run %s was partitioned %d ways, now %d", cfg.run_id, old, self.partitions)
        fence = store.take_fence()
        self.serving_since = time.monotonic()
        with self.lock:
            self.state = store.load_state()
            self.cfg = cfg
            self.totals = Counter(store.counters())
        self.applied = istore.applied_batches()
        if self.evaluator is None and self.s.evaluate:
            self.evaluator = Evaluator(self.snapshot, store, cfg, self.metrics)
        conn = amqp_connect(self.s.connections.amqp_url, f"{self.s.name} (topology)")
        try:
            declare_partitions(
                conn.channel(),
                self.names,
                self.partitions,
                cfg.participants,
                cfg.queue_max_length,
                cfg.queue_replicas,
            )
            log.info(
                "run %s: applier of %d partitions at version %d, fence %d",
                cfg.run_id,
                self.partitions,
                self.state.version,
                fence,
            )
            self._loop(store, istore, fence, conn)
        finally:
            self.quiet_since = None
            conn.close()

    def _loop(self, store: RunStore, istore: IngestStore, fence: int, conn: object) -> None:
        last_housekeeping = 0.0
        channel = None
        while not self.stop.is_set():
            blobs = [b for b in istore.wait_batches(0.5) if b is not None]
            if blobs:
                self.quiet_since = None
                self._apply([decode(b) for b in blobs], store, fence)
            elif self.quiet_since is None:
                self.quiet_since = time.monotonic()
            now = time.monotonic()
            if now - last_housekeeping >= 1.0:
                last_housekeeping = now
                self._housekeeping(store, fence)
                channel = self._reroute(conn, channel)

    def _apply(self, batches: list[PreSum], store: RunStore, fence: int) -> None:
        assert self.state is not None
        t0 = time.perf_counter()
        counters: Counter[str] = Counter()
        windows: dict[int, str] = {}
        entries: list[str] = []
        ids: dict[int, int] = {}
        stamp = f"{time.time():.6f}"
        with self.lock:
            state = self.state
            for ps in batches:
                ids[ps.partition] = max(ps.batch, self.applied.get(ps.partition, 0))
                if ps.batch <= self.applied.get(ps.partition, 0):
                    log.warning(
                        "partition %d batch %d applied before: dropped", ps.partition, ps.batch
                    )
                    continue  # dedup on (partition, batch): consumed, not applied again
                entries += [f"{e}:{stamp}" for e in apply_presum(state, ps)]
                windows.update(ps.windows)
                counters.update(ps.counters)
            try:
                store.commit(fence, state, windows, dict(counters), entries, batches=ids)
            except BaseException:
                self.state = None  # applied in memory, not committed: the next session reloads
                raise
            self.applied.update(ids)
            self.totals.update(counters)
        self.metrics.observe_batch(
            applied=counters["applied"],
            duplicates=counters["duplicates"],
            rejected={
                k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:")
            },
            staleness=[],
            bytes_in=counters["bytes_in"],
            seconds=time.perf_counter() - t0,
            version=state.version,
        )

    def _reroute(self, conn: object, channel: object) -> object:
        """Move what is on the run's unpartitioned queue (published before the partitions were
        bound) to the partitions, with the same routing key: confirmed, then acked. A copy
        re-sent twice is a duplicate for its partition's replay window."""
        if self.s.keys is not None:
            return channel  # authenticated: the broker would refuse our user_id on their behalf
        try:
            if channel is None:
                channel = conn.channel()  # type: ignore[attr-defined]
                channel.confirm_delivery()  # type: ignore[attr-defined]
            for _ in range(1000):
                method, props, body = channel.basic_get(self.names.queue)  # type: ignore[attr-defined]
                if method is None:
                    break
                props = pika.BasicProperties(
                    content_type=props.content_type,
                    delivery_mode=2,
                    app_id=props.app_id,
                    headers=props.headers,
                )
                channel.basic_publish(
                    self.names.exchange, method.routing_key, body, props, mandatory=True
                )  # type: ignore[attr-defined]
                channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot move the unpartitioned queue: {exc!r}") from exc
        return channel


# --- the whole tier in one command -------------------------------------------------------------


def ingest_argv(run_id: str, partitions: int, partition: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dssgd.aggregator",
        "--run-id",
        run_id,
        "--ingest",
        str(partitions),
        "--part",
        str(partition),
        *extra,
    ]


PARENT_ENV = "DSSGD_INGEST_PARENT"  # set by IngestChildren: the applier's pid


def die_with_parent() -> None:
    """In a child ingest: ask Linux to SIGTERM us when the applier that started us dies, so a
    killed applier leaves no orphans (its restart starts new ingests). Done by the child itself,
    not in a pre-exec hook, which is unsafe in a process with threads."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class IngestChildren:
    """The K ingest processes of ``dssgd aggregator --ingest K``, restarted when they die."""

    def __init__(self, argvs: list[list[str]], env: dict[str, str], stop: StopFlag) -> None:
        self.argvs, self.env, self.stop = argvs, env, stop
        self.procs = [self._start(a) for a in argvs]
        self.restarts = 0
        self._thread = threading.Thread(target=self._watch, daemon=True, name="ingests")
        self._thread.start()

    def _start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env={**self.env, PARENT_ENV: str(os.getpid())})

    def _watch(self) -> None:
        rng = random.Random()
        while not self.stop.wait(0.5):
            for i, p in enumerate(self.procs):
                code = p.poll()
                if code is None:
                    continue
                log.warning("ingest %d exited with %s; restarting it", i, code)
                self.stop.wait(rng.uniform(0.2, 1.0))
                if not self.stop.is_set():
                    self.procs[i] = self._start(self.argvs[i])
                    self.restarts += 1

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
