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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import redis.exceptions as rex
from dssgd.shared.config import RunConfig
from dssgd.shared.dedup import decode_state
from dssgd.shared.errors import ConfigError, FencedError, StoreError
from dssgd.shared.keys import RUNS, Keys
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

APPLIED_LOG_CAP = 1_000_000
TRACE_CAP = 200_000
METRICS_CAP = 100_000


def connect(url: str) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            url,
            # No silent retries: a timed-out commit that Redis did carry out must surface as an
            # error (we then reload and let the replay window absorb redeliveries), never be
            # run a second time underneath us.
            retry=Retry(NoBackoff(), 0),
            socket_timeout=10,
            socket_connect_timeout=3,
            health_check_interval=15,
            decode_responses=False,
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc


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
    except rex.RedisError as exc:
        # str(), not repr(): redis-py's message names the host and port it could not reach.
        raise StoreError(f"Redis unavailable during {what}: {exc}") from exc


_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED')
end
local extra = cjson.decode(ARGV[5])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
for pid, state in pairs(extra.dedup) do
  redis.call('HSET', KEYS[5], pid, state)
end
for name, amount in pairs(extra.counters) do
  redis.call('HINCRBY', KEYS[6], name, amount)
end
if #extra.log > 0 then
  redis.call('RPUSH', KEYS[7], unpack(extra.log))
  redis.call('LTRIM', KEYS[7], -tonumber(ARGV[6]), -1)
end
if extra.turn_expect ~= '' and redis.call('GET', KEYS[8]) == extra.turn_expect then
  redis.call('SET', KEYS[8], extra.turn_next)
  redis.call('RPUSH', KEYS[9], '1')
  redis.call('LTRIM', KEYS[9], -1, -1)
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
    w: np.ndarray
    stat: np.ndarray
    version: int
    dedup: dict[int, tuple[int, int]] = field(default_factory=dict)


class RunStore:
    """All Redis access for one run."""

    def __init__(self, r: redis.Redis, run_id: str) -> None:
        self.r = r
        self.run_id = run_id
        self.keys = Keys(run_id)
        self._commit = r.register_script(_COMMIT)
        self._pass_turn = r.register_script(_PASS_TURN)
        self._acquire = r.register_script(_ACQUIRE)
        self._claim = r.register_script(_CLAIM)
        self._renew = r.register_script(_RENEW)
        self._participants: int | None = None
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
            # One transaction: a user who may not register the run (a NOPERM on `dssgd:runs`)
            # gets EXECABORT and leaves nothing behind, never a config no `dssgd runs` lists.
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

    def init_params(self, w: np.ndarray) -> bool:
        """Seed the global parameters unless they exist (every process derives the same ones)."""
        with guarded("initialising parameters"):
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.keys.params, w.astype(np.float32).tobytes(), nx=True)
            pipe.set(self.keys.stat, np.zeros(w.size, np.float32).tobytes(), nx=True)
            pipe.set(self.keys.version, 0, nx=True)
            created = pipe.execute()
        return bool(created[0])

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
            return bool(self.r.exists(self.keys.params))

    def read_params(self, with_stat: bool = False) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(version, w, stat) read atomically; arrays are read-only views of the reply."""
        with guarded("reading parameters"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(self.keys.version)
            pipe.get(self.keys.params)
            if with_stat:
                pipe.get(self.keys.stat)
            out = pipe.execute()
        if out[1] is None:
            raise StoreError(f"run {self.run_id!r} has no parameters yet")
        w = np.frombuffer(out[1], dtype=np.float32)
        stat = np.frombuffer(out[2], dtype=np.float32) if with_stat else None
        return int(out[0] or 0), w, stat

    # --- aggregator ---------------------------------------------------------------------------

    def take_fence(self) -> int:
        """Become the only aggregator allowed to write; any earlier one is fenced off."""
        with guarded("taking the aggregator fence"):
            return int(self.r.incr(self.keys.fence))

    def load_state(self) -> AggregatorState:
        with guarded("loading the aggregator state"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(self.keys.version)
            pipe.get(self.keys.params)
            pipe.get(self.keys.stat)
            pipe.hgetall(self.keys.dedup)
            version, w, stat, dedup = pipe.execute()
        if w is None or stat is None:
            raise StoreError(f"run {self.run_id!r} has no parameters")
        return AggregatorState(
            w=np.frombuffer(w, dtype=np.float32).copy(),
            stat=np.frombuffer(stat, dtype=np.float32).copy(),
            version=int(version or 0),
            dedup={int(k): decode_state(v) for k, v in dedup.items()},
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
    ) -> None:
        extra = {
            "dedup": {str(k): v for k, v in dedup_changes.items()},
            "counters": {**counters, "commits": 1},
            "log": log_entries,
            "turn_expect": turn_expect,
            "turn_next": turn_next,
        }
        payload = json.dumps(extra)
        wake = self.keys.wake(int(turn_next)) if turn_next else self.keys.wake(-1)
        k = self.keys
        with guarded("committing updates"):
            self._commit(
                keys=[
                    k.fence,
                    k.params,
                    k.stat,
                    k.version,
                    k.dedup,
                    k.counters,
                    k.applied_log,
                    k.turn,
                    wake,
                ],
                args=[
                    str(fence),
                    state.w.tobytes(),
                    state.stat.tobytes(),
                    str(state.version),
                    payload,
                    str(APPLIED_LOG_CAP),
                ],
            )

    def pass_turn(self, fence: int, expect: str, nxt: str) -> bool:
        wake = self.keys.wake(int(nxt)) if nxt else self.keys.wake(-1)
        with guarded("passing the turn"):
            return bool(
                self._pass_turn(
                    keys=[self.keys.fence, self.keys.turn, wake], args=[str(fence), expect, nxt]
                )
            )

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

    def active(self) -> dict[int, float]:
        """participant → time of its host's last lease renewal, for live leases only."""
        now = self.server_time()
        done = self.finished()  # a finished participant is no longer active, its host may linger
        return {
            p: renewed
            for p, (_, expiry, renewed) in self.leases().items()
            if expiry > now and p not in done
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
            names = list(self.r.scan_iter(match=self.keys.all_patterns()[0], count=1000))
            removed = int(self.r.delete(*names)) if names else 0
            self.r.srem(RUNS, self.run_id)
        return removed


def list_runs(r: redis.Redis) -> list[str]:
    with guarded("listing runs"):
        return sorted(x.decode() for x in r.smembers(RUNS))
