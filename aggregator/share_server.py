"""A share server of ``--secure two-server``: read the stream, apply its shares, commit, ack.

Two of these run per secure run, operated by two parties who do not collude (role ``a`` and
``b``). Each has its own Redis and its own X25519 key; each reads the run's stream from the
offset it committed, opens only its own sealed box of every update, and applies its share with
the same pure function (``aggregator/share_batch.py``), so that the two states stay additive
shares of the plaintext state and neither ever holds a value. See docs/SECURE.md.

Like the aggregator: one connection lifetime is ``_session``, ``run`` rebuilds it with backoff,
every batch is committed by one fenced Lua script before it is acked.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dssgd.aggregator.share_batch import Opener, ShareState, admit, apply_stream, server_opener
from dssgd.aggregator.share_store import ShareStore
from dssgd.shared import secure
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import tune_for_large_messages
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, FencedError, StoreError
from dssgd.shared.keys import Keys, ShareKeys
from dssgd.shared.lifecycle import EXIT_FENCED, EXIT_OK, Backoff, StopFlag
from dssgd.shared.rules import UpdateRule
from dssgd.shared.store import RunStore, guarded
from dssgd.shared.store import connect as redis_connect
from dssgd.shared.stream import StreamConsumer, StreamDelivery
from dssgd.shared.tasks import load_task, model_record

log = logging.getLogger(__name__)

# Fault injection for the crash tests and bench/secure_chaos.py: "before-commit:N" or
# "after-commit:N" makes the server SIGKILL itself at its N-th batch. Never set in production.
CRASH_ENV = "DSSGD_TEST_CRASH_AT"


@dataclass(frozen=True)
class ShareServerSettings:
    run_id: str
    role: str  # "a" (holds q(v) − PRG(seed)) or "b" (holds the seeds)
    share_redis_url: str  # this server's own Redis, with its own credentials
    connections: Connections = field(default_factory=Connections)  # stream + run coordination
    read_url: str | None = None  # what participants use to read snapshots (read-only user)
    peer_offset_url: str | None = None  # read-only view of the peer's offset (lag bound)
    key_file: Path | None = None  # X25519 private key; None = kept in the server's own Redis
    keys: dict[int, bytes] | None = field(default=None, repr=False)  # participants' HMAC keys
    prefetch: int = 1000
    max_batch: int = 500
    # Wait up to 5 ms for more messages after the first (group commit), as the aggregator does:
    # longer windows made reads staler (measured: staleness, hence the update weights, moved).
    batch_window: float = 0.005
    slow: float = 0.0  # seconds of sleep after each batch (the torn-read tests slow one server)
    name: str = field(default_factory=lambda: f"share-server@{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if self.role not in secure.ROLES:
            raise ConfigError(f"--role must be a or b, got {self.role!r}")


def load_private_key(path: Path) -> bytes:
    """The server's X25519 private key from ``path``, created (mode 0600) if missing."""
    try:
        if not path.exists():
            private, _ = secure.new_keypair()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "w") as f:
                f.write(private.hex() + "\n")
            return private
        raw = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ConfigError(f"{path} does not hold a hex X25519 private key") from None
    except OSError as exc:
        raise ConfigError(f"cannot read or create the key file {path}: {exc.strerror}") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: an X25519 private key is 32 bytes, got {len(raw)}")
    return raw


class ShareServer:
    def __init__(self, settings: ShareServerSettings, stop: StopFlag) -> None:
        self.s, self.stop = settings, stop
        self.names = AmqpNames(settings.run_id)
        self.totals: Counter[str] = Counter()
        self.batches = 0
        self.crash = os.environ.get(CRASH_ENV, "")
        tune_for_large_messages()

    def run(self) -> int:
        backoff = Backoff(initial=0.2, cap=5.0)
        while not self.stop.is_set():
            try:
                self._session()
                backoff.reset()
            except FencedError as exc:
                log.error("%s; exiting", exc)
                return EXIT_FENCED
            except (BrokerError, StoreError) as exc:
                log.warning("connection lost (%s); reconnecting", exc)
                backoff.sleep(self.stop)
        log.info("share server %s stopped: %s", self.s.role, dict(self.totals))
        return EXIT_OK

    def _private_key(self, own: ShareStore) -> bytes:
        if self.s.key_file is not None:
            return load_private_key(self.s.key_file)
        fresh, _ = secure.new_keypair()
        with guarded("keeping the share server's key"):
            own.r.set(own.keys.private_key, fresh.hex(), nx=True)
            return bytes.fromhex(own.r.get(own.keys.private_key).decode())

    def _register(self, coord: RunStore, private: bytes) -> None:
        """Publish this server's public key and read URL for the participants."""
        public = secure.public_of(private).hex()
        key = Keys(self.s.run_id).share_server(self.s.role)
        with guarded("registering the share server"):
            known = coord.r.hget(key, "public")
            if known is not None and known.decode() != public:
                raise ConfigError(
                    f"run {self.s.run_id!r} already has another public key for server "
                    f"{self.s.role} ({known.decode()[:16]}…); use that server's key file"
                )
            read_url = self.s.read_url or self.s.share_redis_url
            coord.r.hset(key, mapping={"public": public, "read_url": read_url, "name": self.s.name})

    def _session(self) -> None:
        coord = RunStore(redis_connect(self.s.connections.redis_url), self.s.run_id)
        cfg = coord.wait_config(self.stop)
        if cfg.secure != "two-server":
            raise ConfigError(f"run {cfg.run_id!r} is not a --secure two-server run")
        task = load_task(cfg.task)
        n = task.layout.n
        coord.init_model(model_record(task))  # workers check their model against it
        own = ShareStore(redis_connect(self.s.share_redis_url), cfg.run_id, self.s.role)
        own.init(n)
        private = self._private_key(own)
        self._register(coord, private)
        fence = own.take_fence()
        state = own.load()
        rule = UpdateRule(cfg.effective_rule, cfg.staleness_exponent, cfg.participants)
        opener = server_opener(self.s.role, private, cfg.run_id)
        peer = None
        if self.s.peer_offset_url:
            other = "b" if self.s.role == "a" else "a"
            peer = (redis_connect(self.s.peer_offset_url), ShareKeys(cfg.run_id, other).offset)
        log.info(
            "share server %s of run %s: n=%d, offset %d, version %d, fence %d",
            self.s.role, cfg.run_id, n, state.offset, state.version, fence,
        )  # fmt: skip
        consumer = StreamConsumer(
            self.s.connections.amqp_url, self.names, self.s.name, state.offset + 1, self.s.prefetch
        )
        try:
            while not self.stop.is_set():
                if peer is not None and self._too_far_ahead(state, cfg, peer):
                    time.sleep(0.02)
                    continue
                batch = consumer.deliveries(0.5, self.s.max_batch, self.s.batch_window)
                if not batch:
                    consumer.ack_skipped()
                    continue
                self._process(batch, cfg, n, state, rule, opener, own, fence, consumer)
        finally:
            consumer.close()

    def _too_far_ahead(self, state: ShareState, cfg: RunConfig, peer: tuple) -> bool:
        """Bounded lag: never run more than ring − 2 snapshots ahead of the peer, so the two
        always share a snapshot for the participants to read."""
        r, key = peer
        try:
            other = int(r.get(key) or -1)
        except Exception:  # the peer's Redis away: its lag is unknown, keep serving
            return False
        return state.offset - other > (cfg.snapshot_ring - 2) * cfg.snapshot_every

    def _process(
        self,
        batch: list[StreamDelivery],
        cfg: RunConfig,
        n: int,
        state: ShareState,
        rule: UpdateRule,
        opener: Opener,
        own: ShareStore,
        fence: int,
        consumer: StreamConsumer,
    ) -> None:
        items = [(d.offset, admit(d, cfg, n, self.s.keys)) for d in batch]
        out = apply_stream(state, items, cfg, rule, opener)
        out.counters["bytes_in"] += sum(len(d.body) for d in batch)
        self.batches += 1
        self._maybe_crash("before-commit")
        own.commit(
            fence,
            state,
            out.dedup_changes,
            dict(out.counters),
            out.snapshots,
            cfg.snapshot_every,
            cfg.snapshot_ring,
        )
        self._maybe_crash("after-commit")
        consumer.ack_through(batch[-1].tag)
        self.totals.update(out.counters)
        if self.s.slow:
            time.sleep(self.s.slow)

    def _maybe_crash(self, point: str) -> None:
        if self.crash and self.crash == f"{point}:{self.batches}":
            log.warning("fault injection: SIGKILL at %s of batch %d", point, self.batches)
            os.kill(os.getpid(), signal.SIGKILL)
