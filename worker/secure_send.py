"""The participant's side of ``--secure two-server``: seal shares out, read consistent state in.

* ``SecureChannel.encode``: the clipped update in fixed point, split into a seed for server B and
  ``q(v) − PRG(seed)`` for server A, each sealed to its server's X25519 key, both in one message
  (``wire.encode_secure``) published to the run's stream.
* ``ConsistentReader.read``: the global parameters from both servers *at the same stream
  offset*, never a torn mix. Each server commits its current state with its offset, and a ring
  of snapshots at the offsets o with (o + 1) % K == 0 (the same offsets on both). A read takes
  the current states when both servers are at one offset, else the newest snapshot both hold;
  shares read at two different offsets sum to garbage, not to stale values (docs/SECURE.md).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import redis
from dssgd.shared import secure, wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ConfigError, StoreError
from dssgd.shared.keys import Keys, ShareKeys
from dssgd.shared.store import RunStore, counting_client, guarded, received
from dssgd.shared.store import connect as redis_connect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerView:
    """What one share server shows a reader at one moment."""

    offset: int
    version: int
    state: np.ndarray
    stat: np.ndarray | None


class ShareView:
    """Read-only access to one share server's committed state and snapshot ring."""

    def __init__(self, r: redis.Redis, run_id: str, role: str) -> None:
        self.keys = ShareKeys(run_id, role)
        # One counting connection (shared/store.py): bytes down are what this server sent.
        self.r = counting_client(r, self.keys.offset)

    @property
    def received(self) -> int:
        """Bytes this view's connection has received so far."""
        return received(self.r)

    def peek(self) -> tuple[int, dict[int, int]]:
        """(current offset, stream offset → ring slot of every snapshot held)."""
        with guarded("reading a share server's offsets"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(self.keys.offset)
            pipe.hgetall(self.keys.snapshots)
            offset, snaps = pipe.execute()
        if offset is None:
            raise StoreError(f"share server {self.keys.role} has no state yet")
        return int(offset), {int(o): int(s) for s, o in snaps.items()}

    def current(self, offset: int, with_stat: bool) -> ServerView | None:
        """The current state if it is still at ``offset`` (one transaction), else None."""
        k = self.keys
        with guarded("reading a share server's state"):
            pipe = self.r.pipeline(transaction=True)
            for key in (k.offset, k.version, k.state, k.stat if with_stat else k.version):
                pipe.get(key)
            got, version, state, stat = pipe.execute()
        if got is None or int(got) != offset:
            return None
        return _view(offset, version, state, stat if with_stat else None)

    def snapshot(self, slot: int, offset: int, with_stat: bool) -> ServerView | None:
        """The snapshot in ``slot`` if it is still the one taken at ``offset``, else None."""
        fields = ["offset", "version", "state", "stat" if with_stat else "version"]
        with guarded("reading a share server's snapshot"):
            got, version, state, stat = self.r.hmget(self.keys.snapshot(slot), fields)
        if got is None or int(got) != offset:
            return None
        return _view(offset, version, state, stat if with_stat else None)


def _view(offset: int, version: bytes, state: bytes, stat: bytes | None) -> ServerView:
    return ServerView(
        offset,
        int(version),
        np.frombuffer(state, dtype="<u8").astype(np.uint64),
        None if stat is None else np.frombuffer(stat, dtype=np.float32),
    )


class ConsistentReader:
    """Both servers' shares at one stream offset, reconstructed (the read API)."""

    def __init__(
        self,
        a: ShareView,
        b: ShareView,
        w0: np.ndarray,
        timeout: float = 30.0,
        level_wait: float = 0.05,  # how long a read waits for the servers to be level
    ) -> None:
        self.a, self.b, self.w0, self.timeout = a, b, w0.astype(np.float32), timeout
        self.level_wait = level_wait
        self.offset = -1  # of the last read
        self.fallbacks = 0  # reads served from a snapshot (the servers were apart)
        self.bytes_read = 0  # bytes both servers sent for the last read (peeks included)

    def read_views(self, with_stat: bool = True) -> tuple[ServerView, ServerView]:
        """(A's view, B's view) at one common offset; raises StoreError if none within timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            pair = self._try(with_stat)
            if pair is not None:
                return pair
            if time.monotonic() > deadline:
                raise StoreError(
                    f"share servers hold no common offset for {self.timeout:.0f} s: one is "
                    "down or further behind than the snapshot ring reaches"
                )
            time.sleep(0.01)

    def _try(self, with_stat: bool) -> tuple[ServerView, ServerView] | None:
        # The servers are level most of the time between messages: give them a few ms to be
        # (a current read is fresher than the newest common snapshot, up to K − 1 messages).
        level_until = time.monotonic() + self.level_wait
        while True:
            oa, snaps_a = self.a.peek()
            ob, snaps_b = self.b.peek()
            if oa == ob:
                va, vb = self.a.current(oa, with_stat), self.b.current(ob, with_stat)
                if va is not None and vb is not None:
                    return va, vb
            if time.monotonic() >= level_until:
                break
            time.sleep(0.002)
        for off in sorted(set(snaps_a) & set(snaps_b), reverse=True)[:2]:
            va = self.a.snapshot(snaps_a[off], off, with_stat)
            vb = self.b.snapshot(snaps_b[off], off, with_stat)
            if va is not None and vb is not None:
                self.fallbacks += 1
                return va, vb
        return None

    def read_params(self, with_stat: bool = False) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(version, w, stat) as ``RunStore.read_params`` gives them, from the two servers."""
        before = self.a.received + self.b.received
        va, vb = self.read_views(with_stat=True)
        if va.version != vb.version or va.stat.tobytes() != vb.stat.tobytes():  # type: ignore[union-attr]
            # The same offset must mean the same public state on both: a server bug, say so.
            raise StoreError(f"share servers disagree at offset {va.offset} (version or stat)")
        self.offset = va.offset
        self.bytes_read = self.a.received + self.b.received - before  # every reply, as received
        w = secure.decode_state(self.w0, secure.reconstruct(va.state, vb.state))
        return va.version, w, va.stat if with_stat else None


def server_registration(store: RunStore, role: str, timeout: float = 120.0) -> dict[str, str]:
    """A share server's public key and read URL, as it registered them for the run."""
    deadline = time.monotonic() + timeout
    key = Keys(store.run_id).share_server(role)
    while True:
        with guarded("reading the share servers' keys"):
            raw = store.r.hgetall(key)
        if raw:
            return {k.decode(): v.decode() for k, v in raw.items()}
        if time.monotonic() > deadline:
            raise ConfigError(f"share server {role} of run {store.run_id!r} never registered")
        time.sleep(0.2)


def open_reader(store: RunStore, w0: np.ndarray) -> ConsistentReader:
    views = []
    for role in secure.ROLES:
        reg = server_registration(store, role)
        views.append(ShareView(redis_connect(reg["read_url"]), store.run_id, role))
    return ConsistentReader(views[0], views[1], w0)


class SecureChannel:
    """What a participant needs in a secure run: the two public keys, the read API, the stream."""

    def __init__(self, cfg: RunConfig, store: RunStore, w0: np.ndarray) -> None:
        self.cfg = cfg
        self.public = {r: bytes.fromhex(server_registration(store, r)["public"]) for r in "ab"}
        self.reader = open_reader(store, w0)
        self.exchange = AmqpNames(cfg.run_id).secure_exchange

    def read_params(self, with_stat: bool = False) -> tuple[int, np.ndarray, np.ndarray | None]:
        return self.reader.read_params(with_stat)

    def encode(
        self,
        participant: int,
        seq: int,
        version: int,
        n: int,
        indices: np.ndarray,
        values: np.ndarray,
        key: bytes | None = None,
    ) -> bytes:
        """One sealed, secret-shared message (the values were clipped to ±γ by selection)."""
        box_a, box_b = secure.seal_update(
            values, self.cfg.run_id, participant, seq, self.public["a"], self.public["b"],
            os.urandom(secure.SEED_BYTES),  # a fresh seed per message: B's whole share
        )  # fmt: skip
        update = wire.SecureUpdate(
            self.cfg.run_id, participant, seq, version, n, indices, box_a, box_b
        )
        return wire.encode_secure(update, key=key)
