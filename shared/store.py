"""Redis: the run's global state. Every key comes from ``shared.keys``; redis errors become ours.

Layout (per run): the global parameters ``w`` and the counters ``stat`` as float32 blobs, the
global ``version`` (updates applied), the replay window per participant, counters, the applied
log, the metrics time series, and the coordination keys (turn, active participants, stop).

Only the aggregator writes ``w``/``stat``/``version``/``dedup``, and only through ``commit``: one
Lua script that first checks the aggregator's fencing token and then writes everything of a batch
of updates at once, so a batch is applied entirely or not at all and a deposed aggregator can
never write again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
import redis.exceptions as rex
from dssgd.shared import failpoints, tls
from dssgd.shared.chunks import (
    Layout,
    Plan,
    chunk_sums,
    dense_writes,
    download_chunks,
    plan_writes,
    plan_writes_of,
)
from dssgd.shared.config import RunConfig
from dssgd.shared.dedup import decode_state
from dssgd.shared.errors import ConfigError, FencedError, StoreError
from dssgd.shared.keys import RUNS, Keys
from dssgd.shared.selection import sorted_distinct
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

APPLIED_LOG_CAP = 1_000_000
TRACE_CAP = 200_000
METRICS_CAP = 100_000


def split_cluster(url: str) -> tuple[str, bool]:
    """(the URL without its ``cluster`` option, whether it names a Redis Cluster)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    cluster = query.pop("cluster", ["no"])[-1].lower() in ("1", "yes", "true")
    return urlunsplit(parts._replace(query=urlencode(query, doseq=True))), cluster


def connect(url: str) -> redis.Redis:
    """A client for ``url``; ``?cluster=yes`` in it means a Redis Cluster (any node's address);
    ``rediss://`` with certificates means TLS (shared/tls.py).

    Every key of a run shares one hash tag (shard 0's), so on a cluster a run's transactions and
    scripts each stay in one slot; only the run registry (``dssgd:runs``) lives elsewhere.
    """
    url, cluster = split_cluster(url)
    plain_url, tls_args = tls.redis_tls(url)
    # No silent retries: a timed-out commit that Redis did carry out must surface as an error
    # (we then reload and let the replay window absorb redeliveries), never be run a second
    # time underneath us.
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": 10,
        "socket_connect_timeout": 3,
        "decode_responses": False,
        **tls_args,
    }
    try:
        if cluster:
            return redis.RedisCluster.from_url(plain_url, **options)  # type: ignore[return-value]
        return redis.Redis.from_url(plain_url, health_check_interval=15, **options)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
    except (rex.RedisClusterException, rex.RedisError) as exc:
        raise StoreError(f"Redis Cluster at {url!r} unavailable: {exc}") from exc


class CountingSocket:
    """A socket that counts the bytes it received: what Redis actually sent this client."""

    def __init__(self, sock: socket.socket, conn: Any) -> None:
        self._sock = sock
        self._conn = conn

    def recv(self, size: int, *args: Any) -> bytes:
        data = self._sock.recv(size, *args)
        if not args:  # a MSG_PEEK (liveness check) reads nothing for good
            self._conn.received += len(data)
        return data

    def recv_into(self, buf: Any, size: int = 0, *args: Any) -> int:
        got = self._sock.recv_into(buf, size, *args)
        if not args:
            self._conn.received += got
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _counting(cls: type) -> type:
    """``cls`` (a redis-py connection class: TCP, TLS or unix) whose socket counts bytes in."""

    def _connect(self: Any) -> Any:
        return CountingSocket(cls._connect(self), self)  # type: ignore[attr-defined]

    return type(f"Counting{cls.__name__}", (cls,), {"_connect": _connect, "received": 0})


def slot_client(r: redis.Redis, key: str) -> redis.Redis:
    """A plain client to the server holding ``key``: on a cluster, its slot's master (a cluster
    pipeline refuses MGET and MSET; a failover surfaces as an error, and the next session or
    download connects anew)."""
    if not isinstance(r, redis.RedisCluster):
        return r
    node = r.get_node_from_key(key)
    assert node is not None and node.redis_connection is not None
    return node.redis_connection  # type: ignore[no-any-return]


def counting_client(r: redis.Redis, key: str) -> redis.Redis:
    """A one-connection client to the server that holds ``key`` whose connection counts the bytes
    it received (``received`` on the connection); downloads go through it, so bytes down are
    measured, not computed. On a cluster, that is the master of the key's slot."""
    pool = slot_client(r, key).connection_pool
    counted = redis.ConnectionPool(
        connection_class=_counting(pool.connection_class),
        max_connections=1,
        **pool.connection_kwargs,
    )
    return redis.Redis(connection_pool=counted)


def received(client: redis.Redis) -> int:
    """Bytes the counting client's connection has received so far."""
    pool = client.connection_pool
    conns = [*pool._available_connections, *pool._in_use_connections]  # type: ignore[attr-defined]
    return sum(c.received for c in conns)


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    try:
        yield
    except rex.ResponseError as exc:
        if "FENCED" in str(exc):
            raise FencedError("another aggregator has taken over this run") from exc
        raise StoreError(f"Redis refused {what}: {exc}") from exc
    except rex.NoPermissionError as exc:
        raise StoreError(f"Redis refused {what}: NOPERM {exc}") from exc
    except rex.AuthenticationError as exc:
        raise StoreError(f"Redis refused the password ({what}): WRONGPASS {exc}") from exc
    except (rex.RedisError, rex.RedisClusterException) as exc:
        # str(), not repr(): redis-py's message names the host and port it could not reach.
        raise StoreError(f"Redis unavailable during {what}: {exc}") from exc


# A commit is one MULTI/EXEC under WATCH of the shard's fence: nothing of it lands if another
# aggregator raised the fence since it was read. Inside, one MSET writes the version, the chunk
# summaries and every chunk written whole, and _COMMIT (EVAL, not EVALSHA: a script cache
# emptied by a Redis restart must not fail half a transaction) does the rest. The chunks never
# pass through Lua: a script's arguments cost Redis about 1.2 ns a byte to take in, 1.1 ms for
# w and stat of the MLP, against ~0.1 ms for the MSET (docs/BENCHMARKS.md, issue 18).
# KEYS: dedup, counters, applied log, turn, wake, then the chunks patched. ARGV: extra (JSON),
# log cap, the runs table (u32 triples: KEYS index, byte offset, byte length), the runs' bytes.
_COMMIT = """
local extra = cjson.decode(ARGV[1])
local runs, data, pos = ARGV[3], ARGV[4], 1
for r = 1, #runs, 12 do
  local k, off, len = struct.unpack('<I4I4I4', runs, r)
  redis.call('SETRANGE', KEYS[k], off, string.sub(data, pos, pos + len - 1))
  pos = pos + len
end
for pid, state in pairs(extra.dedup) do
  redis.call('HSET', KEYS[1], pid, state)
end
for name, amount in pairs(extra.counters) do
  redis.call('HINCRBY', KEYS[2], name, amount)
end
if #extra.log > 0 then
  redis.call('RPUSH', KEYS[3], unpack(extra.log))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[2]), -1)
end
if extra.turn_expect ~= '' and redis.call('GET', KEYS[4]) == extra.turn_expect then
  redis.call('SET', KEYS[4], extra.turn_next)
  redis.call('RPUSH', KEYS[5], '1')
  redis.call('LTRIM', KEYS[5], -1, -1)
end
-- Partitioned aggregator: the batches applied, their hand-off keys consumed, their ingests woken
-- (keys under the run's own hash tag, named in extra.partitioned).
local part = extra.partitioned
if part then
  for pid, id in pairs(part.batches) do
    redis.call('HSET', part.applied, pid, id)
  end
  for _, key in ipairs(part.consumed) do
    redis.call('DEL', key)
  end
  for _, key in ipairs(part.notify) do
    redis.call('RPUSH', key, '1')
    redis.call('LTRIM', key, -1, -1)
  end
end
return 1
"""

_RAISE_FENCE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

_PASS_TURN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED')
end
local current = redis.call('GET', KEYS[2])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], -1, -1)
return 1
"""


# Leases: one key per participant, "owner expiry_ms ttl_ms", times from Redis's own clock so
# hosts with skewed clocks agree. Only these scripts write them; a participant's Redis user may
# touch its own lease key only, so they run under its ACL like any other command.
LEASE_TTL = 15.0  # seconds without a renewal after which another worker may take a participant
# A worker renews its leases this often (from its own thread, whatever its epoch is doing): the
# renewal is the participants' heartbeat.
LEASE_RENEW = 1.0
# An ordered mode's turn holder whose lease was not renewed for this long has lost the turn: a
# dead holder is replaced within HOLDER_SILENCE plus one aggregator housekeeping pass (≈ 1 s).
HOLDER_SILENCE = 3.0

_LEASE_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function live_other(v, owner)
  if not v then return false end
  local o, e = string.match(v, '^(%S+) (%d+)')
  return o ~= owner and tonumber(e) > now
end
"""

_ACQUIRE = (
    _LEASE_NOW
    + """
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local busy = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if live_other(v, owner) then busy[#busy + 1] = (i - 1) .. ' ' .. v end
end
if #busy > 0 then return {0, busy} end
for _, k in ipairs(KEYS) do redis.call('SET', k, owner .. ' ' .. (now + ttl) .. ' ' .. ttl) end
return {1, {}}
"""
)

_CLAIM = (
    _LEASE_NOW
    + """
local owner, want, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 2  -- KEYS: the n leases, then the n progress hashes
local mine, fresh, lapsed = {}, {}, {}
for i = 1, n do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  if redis.call('HEXISTS', KEYS[n + i], 'finished') == 1 then
    -- finished for good: nothing left to host
  elseif not v then fresh[#fresh + 1] = i
  elseif string.match(v, '^(%S+)') == owner then mine[#mine + 1] = i
  elseif not live_other(v, owner) then lapsed[#lapsed + 1] = i end
end
local got = {}
for _, group in ipairs({mine, fresh, lapsed}) do
  for _, i in ipairs(group) do
    if #got < want then got[#got + 1] = i end
  end
end
if #got < want then return {-1, #got} end  -- not enough: take none, say how many
local out = {}
for _, i in ipairs(got) do
  redis.call('SET', KEYS[i], owner .. ' ' .. (now + ttl) .. ' ' .. ttl)
  out[#out + 1] = i - 1
end
return out
"""
)

# ARGV[2] = ttl_ms, or -1 to release (expire now, keep the owner for its restart).
_RENEW = (
    _LEASE_NOW
    + """
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local lost = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v and string.match(v, '^(%S+)') == owner then
    if ttl < 0 then redis.call('SET', k, owner .. ' 0 0')
    else redis.call('SET', k, owner .. ' ' .. (now + ttl) .. ' ' .. ttl) end
  else
    lost[#lost + 1] = i - 1
  end
end
return lost
"""
)


@dataclass
class AggregatorState:
    """The aggregator's copy of the run: parameters, and per range shard its version and replay
    windows. ``version`` and ``dedup`` are shard 0's (with one shard, the run's); shards 1..S-1
    keep theirs in ``more_versions`` / ``more_dedup`` (see ``version_of`` / ``windows``)."""

    w: np.ndarray
    stat: np.ndarray
    version: int
    dedup: dict[int, tuple[int, int]] = field(default_factory=dict)
    layout: Layout | None = None  # how w and stat are chunked in Redis (None: one chunk)
    # What changed since the last commit (aggregator/batch.py records it; commit writes only
    # these chunks and clears it): the index arrays of the applied updates, and whether every
    # counter changed (the paper's decay).
    touched: list[np.ndarray] = field(default_factory=list)
    stat_all: bool = False
    chunk_sums: np.ndarray | None = None  # float64 sum of stat per chunk, kept at commit time
    more_versions: list[int] = field(default_factory=list)  # shards 1..S-1
    more_dedup: list[dict[int, tuple[int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = Layout.for_size(self.w.size)
        if self.chunk_sums is None:
            self.chunk_sums = chunk_sums(self.stat, self.layout)
        extra = self.layout.shards - 1
        if not self.more_versions:
            self.more_versions = [self.version] * extra
        if not self.more_dedup:
            self.more_dedup = [{} for _ in range(extra)]

    @property
    def shards(self) -> int:
        return 1 + len(self.more_versions)

    def version_of(self, s: int) -> int:
        return self.version if s == 0 else self.more_versions[s - 1]

    def bump(self, s: int) -> int:
        """One more update applied to shard s; its new version."""
        if s == 0:
            self.version += 1
            return self.version
        self.more_versions[s - 1] += 1
        return self.more_versions[s - 1]

    def windows(self, s: int) -> dict[int, tuple[int, int]]:
        """Shard s's replay windows (participant → (high, mask)), to read and to update."""
        return self.dedup if s == 0 else self.more_dedup[s - 1]

    def versions(self) -> list[int]:
        return [self.version, *self.more_versions]


@dataclass(frozen=True)
class Download:
    """What one download read: per-shard versions, the chunks, the bytes Redis sent for it."""

    versions: tuple[int | None, ...]  # every shard's version when read; None: shard not read
    chunks: np.ndarray
    bytes_received: int

    @property
    def version(self) -> int:  # the least version of the shards read
        return min(v for v in self.versions if v is not None)


class RunStore:
    """All Redis access for one run."""

    def __init__(self, r: redis.Redis, run_id: str) -> None:
        self.r = r
        self.run_id = run_id
        self.keys = Keys(run_id)
        self._pass_turn = r.register_script(_PASS_TURN)
        self._raise_fence = r.register_script(_RAISE_FENCE)
        self._acquire = r.register_script(_ACQUIRE)
        self._claim = r.register_script(_CLAIM)
        self._renew = r.register_script(_RENEW)
        self._participants: int | None = None
        self._layout: Layout | None = None
        self._readers: list[redis.Redis] | None = None  # per shard, counting connections
        self._whole_keys: dict[tuple[int, bool], list[str]] = {}
        self._names: tuple[list[str], list[str]] | None = None  # chunk keys (_chunk_names)
        self._reader_lock = threading.Lock()
        self._finished_upto = 0  # participants 0.._finished_upto-1 are known to have finished

    # --- configuration ----------------------------------------------------------------------

    def ping(self) -> None:
        with guarded("PING"):
            self.r.ping()

    def create_config(self, cfg: RunConfig) -> tuple[RunConfig, bool]:
        """Store the run's configuration unless it exists; returns (stored config, created)."""
        if cfg.created == 0.0:
            cfg = cfg.replace(created=time.time())
        stored = self.load_config()
        if stored is not None:  # exists: a least-privileged aggregator may not touch `dssgd:runs`
            return stored, False
        with guarded("creating the run configuration"):
            if isinstance(self.r, redis.RedisCluster):
                # The registry is in another slot: registered first, so no run goes unlisted.
                self.r.sadd(RUNS, self.run_id)
                created = bool(self.r.set(self.keys.config, cfg.to_json(), nx=True))
            else:
                # One transaction: a user who may not register the run (a NOPERM on
                # `dssgd:runs`) gets EXECABORT and leaves nothing behind, never a config no
                # `dssgd runs` lists.
                pipe = self.r.pipeline(transaction=True)
                pipe.set(self.keys.config, cfg.to_json(), nx=True)
                pipe.sadd(RUNS, self.run_id)
                created = bool(pipe.execute()[0])
        stored = self.load_config()
        assert stored is not None
        return stored, created

    def load_config(self) -> RunConfig | None:
        with guarded("reading the run configuration"):
            raw = self.r.get(self.keys.config)
        return None if raw is None else RunConfig.from_json(raw)

    def wait_config(self, stop: Any, timeout: float = 120.0) -> RunConfig:
        deadline = time.monotonic() + timeout
        while True:
            cfg = self.load_config()
            if cfg is not None:
                return cfg
            if time.monotonic() > deadline:
                raise ConfigError(f"run {self.run_id!r} does not exist (no configuration in Redis)")
            if stop.wait(0.5):
                raise ConfigError("stopped while waiting for the run configuration")

    # --- parameters -------------------------------------------------------------------------

    def init_params(self, w: np.ndarray, shards: int = 1) -> bool:
        """Seed the global parameters unless they exist (every process derives the same ones).

        The layout is written first (the first writer's wins); each shard's chunks, summary and
        version then go in one transaction, shard 0 last, so shard 0's version existing means
        every chunk exists.
        """
        with guarded("initialising parameters"):
            created = bool(
                self.r.set(self.keys.layout, Layout.for_size(w.size, shards).to_json(), nx=True)
            )
        layout = self.layout()
        if layout.n != w.size:
            raise ConfigError(
                f"run {self.run_id!r} stores {layout.n} parameters, this model has {w.size}"
            )
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        zeros = np.zeros(w.size, np.float32)
        if created:
            w32, zeros = self._legacy_blobs(w32, zeros)
        with guarded("initialising parameters"):
            for s in reversed(range(layout.shards)):
                sk, chunks = self.keys.shard(s), layout.shard_chunks(s)
                pipe = self.r.pipeline(transaction=True)
                for c in chunks:
                    lo, hi = layout.span(c)
                    pipe.set(sk.w(c), w32[lo:hi].tobytes(), nx=True)
                    pipe.set(sk.stat(c), zeros[lo:hi].tobytes(), nx=True)
                pipe.set(sk.summary, np.zeros(len(chunks), np.float32).tobytes(), nx=True)
                pipe.set(sk.version, 0, nx=True)
                pipe.execute()
        return created

    def _legacy_blobs(self, w: np.ndarray, stat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A run stored by an earlier version (w and stat as one blob each) keeps its state: its
        blobs, not the initial ones, become the chunks (its version key is kept as it is)."""
        with guarded("reading the parameters of an earlier layout"):
            old_w, old_stat = self.r.mget(list(self.keys.legacy_blobs))
        if old_w is None or old_stat is None or len(old_w) != 4 * w.size:
            return w, stat
        log.info("run %s: moving w and stat from whole blobs into chunks", self.run_id)
        return np.frombuffer(old_w, np.float32), np.frombuffer(old_stat, np.float32)

    def layout(self) -> Layout:
        """How the run's parameters are chunked and sharded (read once, then cached)."""
        if self._layout is None:
            with guarded("reading the parameter layout"):
                raw = self.r.get(self.keys.layout)
            if raw is None:
                raise StoreError(f"run {self.run_id!r} has no parameters yet")
            self._layout = Layout.from_json(raw)
        return self._layout

    def init_model(self, record: str) -> bool:
        """Store the run's model record (shared/tasks.py) unless it exists."""
        with guarded("recording the model"):
            return bool(self.r.set(self.keys.model, record, nx=True))

    def model_record(self) -> str | None:
        with guarded("reading the model record"):
            raw = self.r.get(self.keys.model)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def has_params(self) -> bool:
        with guarded("reading parameters"):
            return bool(self.r.exists(self.keys.layout)) and bool(self.r.exists(self.keys.version))

    def read_params(self, with_stat: bool = False) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(version, w, stat), each shard read atomically, into fresh arrays."""
        layout = self.layout()
        w = np.empty(layout.n, np.float32)
        stat = np.empty(layout.n, np.float32) if with_stat else None
        clients = [self.r] * layout.shards
        versions = self._read_chunks(clients, np.arange(layout.n_chunks), w, stat)
        return min(v for v in versions if v is not None), w, stat

    def download(
        self,
        out: np.ndarray,
        theta_d: float = 1.0,
        random: np.random.Generator | None = None,
    ) -> Download:
        """θd of the global parameters into ``out`` (the caller's buffer, reused every epoch).

        The most-updated chunks are found from the chunk summaries the aggregator keeps (one
        small blob per shard), or chunks are drawn with ``random``; only the chosen chunks are
        read, straight into ``out``. ``bytes_received`` is counted on the socket.
        """
        layout = self.layout()
        with self._reader_lock:
            if self._readers is None:
                self._readers = self._counting_readers(layout)
            readers = self._readers
            before = sum(received(c) for c in {id(c): c for c in readers}.values())
            try:
                summary = None
                if theta_d < 1.0 and random is None:
                    summary = self._read_summaries(readers, layout)
                chunks = download_chunks(layout, theta_d, summary, random)
                versions = self._read_chunks(readers, chunks, out, None)
            except StoreError:
                self._readers = None  # a failover moves a slot: find its master again
                raise
            got = sum(received(c) for c in {id(c): c for c in readers}.values()) - before
        return Download(tuple(versions), chunks, got)

    def _counting_readers(self, layout: Layout) -> list[redis.Redis]:
        """Per shard, a counting connection to the server holding it (one for a plain Redis;
        on a cluster, to the master of each shard's slot)."""
        if not isinstance(self.r, redis.RedisCluster):
            return [counting_client(self.r, self.keys.version)] * layout.shards
        return [counting_client(self.r, self.keys.shard(s).version) for s in range(layout.shards)]

    def _read_summaries(self, readers: list[redis.Redis], layout: Layout) -> np.ndarray:
        raw: list[bytes | None] = [None] * layout.shards
        with guarded("reading the chunk summaries"):
            for client in {id(c): c for c in readers}.values():
                mine = [s for s in range(layout.shards) if readers[s] is client]
                pipe = client.pipeline(transaction=False)
                for s in mine:
                    pipe.get(self.keys.shard(s).summary)
                for s, blob in zip(mine, pipe.execute(), strict=True):
                    raw[s] = blob
        if any(x is None for x in raw):
            raise StoreError(f"run {self.run_id!r} has no parameters yet")
        return np.concatenate([np.frombuffer(x, np.float32) for x in raw])  # type: ignore[arg-type]

    def _read_chunks(
        self,
        clients: list[redis.Redis],
        chunks: np.ndarray,
        w: np.ndarray,
        stat: np.ndarray | None,
    ) -> list[int | None]:
        """Chunks (sorted) of w (and stat) into the given arrays, shard by shard; returns the
        version of every shard read (None for a shard none of whose chunks was asked for)."""
        layout = self.layout()
        versions: list[int | None] = []
        for s in range(layout.shards):
            cs = layout.shard_chunks(s)
            mine = chunks[(chunks >= cs.start) & (chunks < cs.stop)].tolist()
            read = mine or (not chunks.size and s == 0)
            versions.append(self._read_shard(clients[s], s, mine, w, stat)[0] if read else None)
        return versions

    def _read_shard(
        self,
        client: redis.Redis,
        s: int,
        chunks: list[int],
        w: np.ndarray,
        stat: np.ndarray | None,
        with_dedup: bool = False,
    ) -> tuple[int, dict[bytes, bytes]]:
        """One shard's version, chunks (into w and stat) and optionally its replay windows, read
        atomically: a consistent snapshot of the shard."""
        if with_dedup or isinstance(client, redis.RedisCluster):
            # A cluster pipeline refuses MGET; downloads use a node's own connection instead.
            return self._read_shard_pipelined(client, s, chunks, w, stat, with_dedup)
        arrays = [w] if stat is None else [w, stat]
        keys = self._mget_keys(s, chunks, stat is not None)
        with guarded("reading parameters"):
            # One MGET (atomic, so a consistent snapshot) of the version and the chunks: Redis
            # hands them out as they are (a Lua script that joined them cost Redis 2.4 ms of CPU
            # per MLP download, this 0.07 ms) and the client parses one reply.
            version, *blobs = client.execute_command("MGET", *keys)
        if version is None:
            raise StoreError(f"run {self.run_id!r} has no parameters yet")
        if any(b is None for b in blobs):
            c = chunks[blobs.index(None) % len(chunks)]
            raise StoreError(f"run {self.run_id!r}: chunk {c} of the parameters is missing")
        self._scatter(np.frombuffer(b"".join(blobs), np.float32), chunks, arrays)
        return int(version), {}

    def _mget_keys(self, s: int, chunks: list[int], with_stat: bool) -> list[str]:
        """Shard s's version key, then its w (and stat) chunk keys; the list of a whole shard is
        kept (a θd = 1 download asks for it every epoch)."""
        whole = len(chunks) == len(self.layout().shard_chunks(s))
        if whole and (s, with_stat) in self._whole_keys:
            return self._whole_keys[(s, with_stat)]
        sk = self.keys.shard(s)
        names = [sk.w, sk.stat] if with_stat else [sk.w]
        keys = [sk.version] + [key(c) for key in names for c in chunks]
        if whole:
            self._whole_keys[(s, with_stat)] = keys
        return keys

    def _scatter(self, blob: np.ndarray, chunks: list[int], arrays: list[np.ndarray]) -> None:
        """Chunks read back to back into their places in each array (runs of consecutive chunks
        in one copy: a whole download is one memcpy)."""
        layout, pos = self.layout(), 0
        runs: list[tuple[int, int]] = []  # (first, last) chunk of each run
        for c in chunks:
            if runs and runs[-1][1] == c - 1:
                runs[-1] = (runs[-1][0], c)
            else:
                runs.append((c, c))
        for arr in arrays:
            for first, last in runs:
                lo, hi = layout.span(first)[0], layout.span(last)[1]
                arr[lo:hi] = blob[pos : pos + hi - lo]
                pos += hi - lo
        if pos != blob.size:
            raise StoreError(f"run {self.run_id!r}: a chunk of the parameters has the wrong size")

    def _read_shard_pipelined(
        self,
        client: redis.Redis,
        s: int,
        chunks: list[int],
        w: np.ndarray,
        stat: np.ndarray | None,
        with_dedup: bool = True,
    ) -> tuple[int, dict[bytes, bytes]]:
        """As ``_read_shard`` by a pipelined transaction, a GET a chunk, with the shard's replay
        windows when asked (load_state)."""
        layout, sk = self.layout(), self.keys.shard(s)
        with guarded("reading parameters"):
            # One GET a chunk, not MGET: a cluster pipeline refuses MGET.
            pipe = client.pipeline(transaction=True)
            pipe.get(sk.version)
            pipe.hgetall(sk.dedup) if with_dedup else pipe.exists(sk.version)
            arrays = [w] if stat is None else [w, stat]
            for key in (sk.w, sk.stat)[: len(arrays)]:
                for c in chunks:
                    pipe.get(key(c))
            version, dedup, *blobs = pipe.execute()
        if version is None:
            raise StoreError(f"run {self.run_id!r} has no parameters yet")
        for i, arr in enumerate(arrays):
            rows = blobs[i * len(chunks) : (i + 1) * len(chunks)]
            for c, blob in zip(chunks, rows, strict=True):
                if blob is None:
                    raise StoreError(f"run {self.run_id!r}: chunk {c} of the parameters is missing")
                lo, hi = layout.span(c)
                arr[lo:hi] = np.frombuffer(blob, np.float32)
        return int(version), dedup if with_dedup else {}

    # --- aggregator ---------------------------------------------------------------------------

    def take_fence(self) -> int:
        """Become the only aggregator allowed to write; any earlier one is fenced off."""
        with guarded("taking the aggregator fence"):
            fence = int(self.r.incr(self.keys.fence))
            # Every other shard's fence is raised to it before anything is read: a deposed
            # aggregator's commit to a shard either landed before (and is loaded) or is refused.
            for s in range(1, self._shards()):
                self._raise_fence(keys=[self.keys.shard(s).fence], args=[fence])
        return fence

    def _shards(self) -> int:
        """The run's range shards (1 before its parameters exist)."""
        try:
            return self.layout().shards
        except StoreError:
            return 1

    def load_state(self) -> AggregatorState:
        """Every shard's chunks, version and replay windows (each shard read atomically; the
        caller holds the fence, so nobody writes in between)."""
        layout = self.layout()
        w = np.empty(layout.n, np.float32)
        stat = np.empty(layout.n, np.float32)
        versions, windows = [], []
        for s in range(layout.shards):
            chunks = list(layout.shard_chunks(s))
            version, dedup = self._read_shard(self.r, s, chunks, w, stat, with_dedup=True)
            versions.append(version)
            windows.append({int(k): decode_state(v) for k, v in dedup.items()})
        return AggregatorState(
            w=w,
            stat=stat,
            version=versions[0],
            dedup=windows[0],
            layout=layout,
            more_versions=versions[1:],
            more_dedup=windows[1:],
        )

    def commit(
        self,
        fence: int,
        state: AggregatorState,
        dedup_changes: dict[int, str],
        counters: dict[str, int],
        log_entries: list[str],
        turn_expect: str = "",
        turn_next: str = "",
        *,
        shards: ShardChanges | None = None,
        batches: dict[int, int] | None = None,
    ) -> None:
        """Write a batch: per range shard one fenced script with the chunks it touched, its
        chunk summaries, version and replay windows, all or nothing for that shard.

        Shards S-1..1 are written first, shard 0 (with the run's counters, log and turn) last,
        so shard 0's windows never claim an update another shard has not committed. Without
        ``shards`` every shard takes ``dedup_changes`` (every update of the batch was applied
        to every shard); ``aggregator/batch.py`` gives each shard its own changes, so a
        redelivery after a crash between two shards' commits is applied only to the shards that
        have not seen it. ``batches``: see ``_partitioned_extra``.
        """
        layout = state.layout
        assert layout is not None
        if shards is None and any(v != state.version for v in state.more_versions):
            # Without per-shard changes every shard is taken to have applied the whole batch,
            # which only holds when the shards moved in lockstep.
            raise StoreError(
                f"run {self.run_id!r}: the shards' versions differ ({state.versions()}); commit "
                "with shards= (aggregator/batch.py Outcome.shard_changes)"
            )
        plans = _plans(state)
        extra0: dict[str, Any] = {
            "dedup": {str(k): v for k, v in dedup_changes.items()},
            "counters": {**counters, "commits": 1},
            "log": log_entries,
            "turn_expect": turn_expect,
            "turn_next": turn_next,
        }
        if batches:
            extra0["partitioned"] = _partitioned_extra(self.keys, batches)
        for s in reversed(range(layout.shards)):
            sk = self.keys.shard(s)
            if s == 0:
                wake = self.keys.wake(int(turn_next)) if turn_next else self.keys.wake(-1)
                k = self.keys
                fixed = [k.fence, k.version, k.dedup, k.counters, k.applied_log, k.turn, wake]
                extra = extra0
            else:
                fixed = [sk.fence, sk.version, sk.dedup, sk.counters, sk.applied_log]
                fixed += [sk.unused, sk.unused]
                extra = _shard_extra(s, shards, dedup_changes)
                if not extra["dedup"] and not plans[s][0].dense.size + plans[s][0].sparse.size:
                    continue  # nothing of this batch reached shard s
            self._commit_shard(fence, s, state.version_of(s), fixed, extra, plans[s])
            if s:
                failpoints.hit("after-shard-commit")
        state.touched.clear()
        state.stat_all = False

    def _commit_shard(
        self,
        fence: int,
        s: int,
        version: int,
        fixed: list[str],
        extra: dict[str, Any],
        plan: tuple[Plan, Plan, np.ndarray],
    ) -> None:
        """One shard's commit: MULTI/EXEC under WATCH of its fence (every key under the shard's
        hash tag). ``fixed``: fence, version, dedup, counters, applied log, turn, wake."""
        w_plan, stat_plan, summary = plan
        sk = self.keys.shard(s)
        names = self._chunk_names()
        whole: dict[str, Any] = {fixed[1]: str(version), sk.summary: summary.tobytes()}
        for chunk_keys, p in ((names[0], w_plan), (names[1], stat_plan)):
            whole.update(zip([chunk_keys[c] for c in p.dense.tolist()], p.dense_data, strict=True))
        patched = [names[0][c] for c in w_plan.sparse.tolist()]
        patched += [names[1][c] for c in stat_plan.sparse.tolist()]
        first = 6  # KEYS index (1-based) of the first patched chunk: after the five fixed
        runs = np.concatenate([w_plan.runs, stat_plan.runs])
        runs[: len(w_plan.runs), 0] += first
        runs[len(w_plan.runs) :, 0] += first + len(w_plan.sparse)
        keys = [*fixed[2:7], *patched]
        args = [json.dumps(extra), str(APPLIED_LOG_CAP), runs.tobytes()]
        args.append(w_plan.values + stat_plan.values)
        client, ours = slot_client(self.r, fixed[0]), str(fence).encode()
        with guarded("committing updates"), client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(fixed[0])
                if pipe.get(fixed[0]) != ours:
                    raise FencedError("another aggregator has taken over this run")
                pipe.multi()
                pipe.mset(whole)
                pipe.eval(_COMMIT, len(keys), *keys, *args)
                pipe.execute()
            except rex.WatchError as exc:
                # redis-py raises WatchError for a connection lost while watching too (a timeout,
                # a Redis stall): only the fence itself says whether another aggregator took over.
                # Lost, the commit's outcome is unknown, like any commit cut off: the session
                # reloads the state and the replay windows absorb the redeliveries.
                if client.get(fixed[0]) != ours:
                    raise FencedError("another aggregator has taken over this run") from exc
                raise StoreError(f"Redis unavailable during committing updates: {exc}") from exc

    def _chunk_names(self) -> tuple[list[str], list[str]]:
        """The key of every chunk of w and of stat, by chunk number (made once per store)."""
        if self._names is None:
            layout = self.layout()
            owner = [s for s in range(layout.shards) for _ in layout.shard_chunks(s)]
            shards = [self.keys.shard(s) for s in range(layout.shards)]
            w = [shards[owner[c]].w(c) for c in range(layout.n_chunks)]
            self._names = (w, [shards[owner[c]].stat(c) for c in range(layout.n_chunks)])
        return self._names

    def pass_turn(self, fence: int, expect: str, nxt: str) -> bool:
        wake = self.keys.wake(int(nxt)) if nxt else self.keys.wake(-1)
        with guarded("passing the turn"):
            return bool(
                self._pass_turn(
                    keys=[self.keys.fence, self.keys.turn, wake], args=[str(fence), expect, nxt]
                )
            )

    def ingest_partitions(self) -> int:
        """K of a run served by the partitioned aggregator (`--ingest K`), else 0."""
        with guarded("reading the partitions"):
            raw = self.r.get(self.keys.ingest_k)
        return int(raw) if raw else 0

    def counters(self) -> dict[str, int]:
        with guarded("reading counters"):
            raw = self.r.hgetall(self.keys.counters)
        return {k.decode(): int(v) for k, v in raw.items()}

    def applied_log(self) -> list[str]:
        with guarded("reading the applied log"):
            return [x.decode() for x in self.r.lrange(self.keys.applied_log, 0, -1)]

    def aggregator_heartbeat(self, info: dict[str, Any], ttl: float = 15.0) -> None:
        with guarded("writing the aggregator heartbeat"):
            self.r.set(self.keys.heartbeat_aggregator, json.dumps(info), px=int(ttl * 1000))

    # --- participants: leases, finished markers --------------------------------------------------

    def _n(self) -> int:
        """Number of participants of the run (from its configuration; cached)."""
        if self._participants is None:
            cfg = self.load_config()
            if cfg is None:
                raise ConfigError(f"run {self.run_id!r} does not exist (no configuration in Redis)")
            self._participants = cfg.participants
        return self._participants

    def acquire(self, owner: str, participants: list[int], ttl: float = LEASE_TTL) -> None:
        """Take the leases of these participants for `owner`, all or none.

        A lease held by another live owner refuses the whole request (ConfigError naming the
        holder); an expired one, or one `owner` held before (a restarted worker), is taken.
        """
        if not participants:
            return
        with guarded("taking participant leases"):
            ok, detail = self._acquire(
                keys=[self.keys.lease(p) for p in participants], args=[owner, int(ttl * 1000)]
            )
        if not int(ok):
            raise ConfigError(self._busy_message(participants, detail))

    def claim(self, owner: str, want: int, ttl: float = LEASE_TTL) -> list[int]:
        """Lease `want` participant ids for `owner` from the one registry of the run.

        `owner`'s own earlier ids come first (a restarted worker gets its participants back),
        then ids nobody ever hosted, then ids whose host stopped renewing (taken over).
        """
        n = self._n()
        with guarded("claiming participant ids"):
            got = self._claim(
                keys=[self.keys.lease(p) for p in range(n)]
                + [self.keys.participant(p) for p in range(n)],
                args=[owner, want, int(ttl * 1000)],
            )
        ids = [int(x) for x in got]
        if ids[:1] == [-1]:
            raise ConfigError(
                f"run {self.run_id!r} already has all {n} participants taken: {ids[1]} free, "
                f"{want} wanted (every other id is hosted by a live worker, or finished)"
            )
        return ids

    def renew(self, owner: str, participants: list[int], ttl: float = LEASE_TTL) -> list[int]:
        """Extend our leases; returns the participants whose lease another owner has taken."""
        if not participants:
            return []
        with guarded("renewing participant leases"):
            lost = self._renew(
                keys=[self.keys.lease(p) for p in participants], args=[owner, int(ttl * 1000)]
            )
        return [participants[int(i)] for i in lost]

    def release(self, owner: str, participants: list[int]) -> None:
        """Let the leases lapse now (the owner is kept, so a restart of `owner` gets them back)."""
        if not participants:
            return
        with guarded("releasing participant leases"):
            self._renew(keys=[self.keys.lease(p) for p in participants], args=[owner, -1])

    def leases(self) -> dict[int, tuple[str, float, float]]:
        """participant → (owner, expiry, last renewal) in Redis server time (unix seconds)."""
        n = self._n()
        with guarded("reading participant leases"):
            raw = self.r.mget([self.keys.lease(p) for p in range(n)]) if n else []
        out = {}
        for p, v in enumerate(raw):
            if v:
                owner, expiry, ttl = v.decode().split()
                out[p] = (owner, int(expiry) / 1000, (int(expiry) - int(ttl)) / 1000)
        return out

    def server_time(self) -> float:
        with guarded("reading the server time"):
            sec, usec = self.r.time()
        return sec + usec / 1e6

    def _busy_message(self, participants: list[int], detail: list[bytes]) -> str:
        now = self.server_time()
        parts = []
        for row in detail:
            i, owner, expiry, _ = row.decode().split()
            parts.append(
                f"participant {participants[int(i)]} is hosted by {owner} "
                f"(lease renewed, {int(expiry) / 1000 - now:.0f} s left)"
            )
        return (
            f"run {self.run_id!r}: {'; '.join(parts)}; a participant runs in one process only: "
            "stop that worker, or start this one when its lease has lapsed"
        )

    def leave(self, participant: int, finished: bool) -> None:
        if finished:
            with guarded("leaving the run"):
                self.r.hset(self.keys.participant(participant), "finished", f"{time.time():.3f}")

    def leave_many(self, participants: list[int]) -> None:
        """``leave(p, finished=True)`` for many participants in one round trip."""
        if not participants:
            return
        stamp = f"{time.time():.3f}"
        with guarded("leaving the run"):
            pipe = self.r.pipeline(transaction=False)
            for p in participants:
                pipe.hset(self.keys.participant(p), "finished", stamp)
            pipe.execute()

    def finish(self, participant: int, why: str) -> None:
        """Finished for good, and why, in one round trip (what `dssgd status` shows)."""
        with guarded("leaving the run"):
            self.r.hset(
                self.keys.participant(participant),
                mapping={"finished": f"{time.time():.3f}", "stopped": why},
            )

    def active(self, within: float | None = None) -> dict[int, float]:
        """participant → time of its host's last lease renewal, for live leases only (and, with
        `within`, only those renewed in the last `within` seconds: hosts that heartbeat)."""
        now = self.server_time()
        done = self.finished()  # a finished participant is no longer active, its host may linger
        return {
            p: renewed
            for p, (_, expiry, renewed) in self.leases().items()
            if expiry > now and p not in done and (within is None or now - renewed <= within)
        }

    def turn_wait_state(self, participant: int) -> tuple[int, int | None, int]:
        """(highest applied seq, turn holder, highest refused seq) of a holder waiting for its
        apply, in one round trip."""
        with guarded("reading the turn state"):
            pipe = self.r.pipeline(transaction=False)
            pipe.hget(self.keys.dedup, str(participant))
            pipe.get(self.keys.turn)
            pipe.hget(self.keys.participant(participant), "refused_seq")
            window, turn, refused = pipe.execute()
        holder = int(turn) if turn not in (None, b"") else None
        return decode_state(window)[0], holder, int(refused or 0)

    def finished(self) -> set[int]:
        n = self._n()
        with guarded("reading finished participants"):
            pipe = self.r.pipeline(transaction=False)
            for p in range(n):
                pipe.hexists(self.keys.participant(p), "finished")
            rows = pipe.execute()
        return {p for p, done in enumerate(rows) if done}

    def all_finished(self, chunk: int = 500) -> bool:
        """Whether every participant has finished, in amortised constant work per call.

        Finishing is for good, so the scan resumes where the last call met the first participant
        still running: a watcher asking every second reads a chunk, not the N progress hashes.
        """
        n = self._n()
        while self._finished_upto < n:
            ids = range(self._finished_upto, min(n, self._finished_upto + chunk))
            with guarded("reading finished participants"):
                pipe = self.r.pipeline(transaction=False)
                for p in ids:
                    pipe.hexists(self.keys.participant(p), "finished")
                rows = pipe.execute()
            for done in rows:
                if not done:
                    return False
                self._finished_upto += 1
        return True

    @property
    def finished_at_least(self) -> int:
        """How many participants ``all_finished`` has seen finished (a lower bound)."""
        return self._finished_upto

    def progress_totals(self, n: int, chunk: int = 1000) -> tuple[int, int, int]:
        """(Σ epochs, participants finished, Σ confirmed seq) from two fields of each progress
        hash, pipelined in chunks: the whole run's counts without reading every field."""
        epochs = finished = seqs = 0
        for start in range(0, n, chunk):
            with guarded("reading progress"):
                pipe = self.r.pipeline(transaction=False)
                for p in range(start, min(n, start + chunk)):
                    pipe.hmget(self.keys.participant(p), ["epochs", "finished", "seq"])
                rows = pipe.execute()
            for e, f, q in rows:
                epochs += int(e or 0)
                finished += f is not None
                seqs += int(q or 0)
        return epochs, finished, seqs

    def undrained(self, n: int, chunk: int = 1000) -> int:
        """Participants with a confirmed update not yet applied (confirmed seq > applied high)."""
        behind = 0
        for start in range(0, n, chunk):
            ids = list(range(start, min(n, start + chunk)))
            with guarded("reading progress"):
                pipe = self.r.pipeline(transaction=False)
                for p in ids:
                    pipe.hget(self.keys.participant(p), "seq")
                pipe.hmget(self.keys.dedup, [str(p) for p in ids])
                *seqs, windows = pipe.execute()
            behind += sum(
                int(q or 0) > decode_state(w)[0] for q, w in zip(seqs, windows, strict=True)
            )
        return behind

    def turn(self) -> int | None:
        with guarded("reading the turn"):
            raw = self.r.get(self.keys.turn)
        return int(raw) if raw not in (None, b"") else None

    def wait_wake(self, participants: list[int], timeout: float) -> None:
        with guarded("waiting for the turn"):
            self.r.blpop([self.keys.wake(p) for p in participants], timeout=timeout)

    def trace(self, event: str, participant: int, seq: int) -> None:
        with guarded("writing the trace"):
            pipe = self.r.pipeline(transaction=False)
            key = self.keys.trace(participant)
            pipe.rpush(key, f"{event} {participant} {seq} {time.time():.6f}")
            pipe.ltrim(key, -TRACE_CAP, -1)
            pipe.execute()

    def read_trace(self) -> list[tuple[str, int, int, float]]:
        n = self._n()
        with guarded("reading the trace"):
            pipe = self.r.pipeline(transaction=False)
            for p in range(n):
                pipe.lrange(self.keys.trace(p), 0, -1)
            rows = [row for rows in pipe.execute() for row in rows]
        out = []
        for row in rows:
            ev, pid, seq, t = row.decode().split()
            out.append((ev, int(pid), int(seq), float(t)))
        return sorted(out, key=lambda row: row[3])

    def record_progress(self, participant: int, **fields: Any) -> None:
        with guarded("recording progress"):
            self.r.hset(
                self.keys.participant(participant), mapping={k: str(v) for k, v in fields.items()}
            )

    def progress(self, participant: int) -> dict[str, str]:
        with guarded("reading progress"):
            raw = self.r.hgetall(self.keys.participant(participant))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def all_progress(self, n: int) -> dict[int, dict[str, str]]:
        with guarded("reading progress"):
            pipe = self.r.pipeline(transaction=False)
            for p in range(n):
                pipe.hgetall(self.keys.participant(p))
            rows = pipe.execute()
        return {
            p: {k.decode(): v.decode() for k, v in row.items()} for p, row in enumerate(rows) if row
        }

    def restore_many(self, participants: list[int]) -> dict[int, tuple[dict[str, str], int]]:
        """participant → (progress, highest applied seq), for a worker taking many over at once:
        pipelined in chunks, not two round trips per participant."""
        out: dict[int, tuple[dict[str, str], int]] = {}
        for i in range(0, len(participants), 1000):
            chunk = participants[i : i + 1000]
            with guarded("reading progress"):
                pipe = self.r.pipeline(transaction=False)
                for p in chunk:
                    pipe.hgetall(self.keys.participant(p))
                pipe.hmget(self.keys.dedup, [str(p) for p in chunk])
                *rows, windows = pipe.execute()
            for p, row, window in zip(chunk, rows, windows, strict=True):
                progress = {k.decode(): v.decode() for k, v in row.items()}
                out[p] = (progress, decode_state(window)[0])
        return out

    def applied_high(self, participant: int) -> int:
        with guarded("reading the replay window"):
            return decode_state(self.r.hget(self.keys.dedup, str(participant)))[0]

    def applied_highs(self) -> dict[int, int]:
        """participant → highest applied seq, for every participant with one (one round trip)."""
        with guarded("reading the replay windows"):
            raw = self.r.hgetall(self.keys.dedup)
        return {int(k): decode_state(v)[0] for k, v in raw.items()}

    # --- stop, metrics -------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        with guarded("requesting stop"):
            self.r.set(self.keys.stop, reason)

    def stop_reason(self) -> str | None:
        with guarded("reading the stop flag"):
            raw = self.r.get(self.keys.stop)
        return raw.decode() if raw is not None else None

    def clear_stop(self) -> None:
        with guarded("clearing the stop flag"):
            self.r.delete(self.keys.stop)

    def push_metric(self, point: dict[str, Any]) -> None:
        with guarded("writing a metric"):
            pipe = self.r.pipeline(transaction=False)
            pipe.rpush(self.keys.metrics, json.dumps(point))
            pipe.ltrim(self.keys.metrics, -METRICS_CAP, -1)
            pipe.execute()

    def metrics(self) -> list[dict[str, Any]]:
        with guarded("reading metrics"):
            return [json.loads(x) for x in self.r.lrange(self.keys.metrics, 0, -1)]

    def delete_run(self) -> int:
        with guarded("deleting the run"):
            names = [
                name
                for pattern in self.keys.all_patterns()
                for name in self.r.scan_iter(match=pattern, count=1000)
            ]
            removed = int(self.r.delete(*names)) if names else 0
            self.r.srem(RUNS, self.run_id)
        return removed


@dataclass
class ShardChanges:
    """What a batch changed in shards 1..S-1 beyond the parameters (aggregator/batch.py):
    per shard its replay-window changes, counters and applied-log entries (index 0 unused:
    shard 0's are ``commit``'s own arguments)."""

    dedup: list[dict[int, str]]
    counters: list[dict[str, int]]
    logs: list[list[str]]


def _shard_extra(s: int, shards: ShardChanges | None, every: dict[int, str]) -> dict[str, Any]:
    if shards is None:
        return {"dedup": {str(k): v for k, v in every.items()},
                "counters": {"commits": 1}, "log": [],
                "turn_expect": "", "turn_next": ""}  # fmt: skip
    counters = {name: v for name, v in shards.counters[s].items() if v}
    return {"dedup": {str(k): v for k, v in shards.dedup[s].items()},
            "counters": {**counters, "commits": 1}, "log": shards.logs[s],
            "turn_expect": "", "turn_next": ""}  # fmt: skip


def _partitioned_extra(keys: Keys, batches: dict[int, int]) -> dict[str, Any]:
    """What shard 0's commit records for the partitioned aggregator: the hand-offs applied
    (partition → batch id), their keys consumed, their ingests woken."""
    return {
        "applied": keys.ingest_applied,
        "batches": {str(p): b for p, b in batches.items()},
        "consumed": [keys.ingest_batch(p) for p in batches],
        "notify": [keys.ingest_done(p) for p in batches],
    }


def _plans(state: AggregatorState) -> list[tuple[Plan, Plan, np.ndarray]]:
    """Per shard, the writes of w and stat for what changed since the last commit, and the
    shard's new chunk summaries (the chunk sums are moved here, in memory, by the entries
    applied)."""
    layout = state.layout
    assert layout is not None and state.chunk_sums is not None
    every = np.concatenate(state.touched) if state.touched else np.empty(0, np.int64)
    touched = sorted_distinct(every, layout.n)
    if state.stat_all:
        state.chunk_sums = chunk_sums(state.stat, layout)
    else:
        # stat[j] += 1 per applied entry: the chunk sums move by the entries counted.
        state.chunk_sums += np.bincount(every // layout.chunk, minlength=layout.n_chunks)
    summary = (state.chunk_sums / layout.sizes()).astype(np.float32)
    out = []
    for s in range(layout.shards):
        cs = layout.shard_chunks(s)
        lo, hi = layout.shard_span(s)
        mine = touched[np.searchsorted(touched, lo) : np.searchsorted(touched, hi)]
        if state.stat_all:
            w_plan = plan_writes(state.w, layout, mine)
            stat_plan = dense_writes(state.stat, layout, cs)
        else:
            w_plan, stat_plan = plan_writes_of((state.w, state.stat), layout, mine)
        out.append((w_plan, stat_plan, summary[cs.start : cs.stop]))
    return out


def list_runs(r: redis.Redis) -> list[str]:
    with guarded("listing runs"):
        return sorted(x.decode() for x in r.smembers(RUNS))
