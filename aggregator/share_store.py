"""One share server's own Redis: its share state, replay windows, stream offset and snapshot ring.

Everything of a batch is written by one fenced Lua script (``commit``), so the share state, the
replay window, the stream offset it corresponds to and the snapshots taken on the way are
committed together or not at all: a crash before the commit re-reads the stream after the old
offset, a crash after it resumes after the new one. Only this module writes these keys; the read
API (``worker/secure_send.py``) reads them with read-only credentials.
"""

from __future__ import annotations

import json

import numpy as np
import redis
from dssgd.aggregator.share_batch import ShareSnapshot, ShareState, initial_state
from dssgd.shared.dedup import decode_state
from dssgd.shared.keys import ShareKeys
from dssgd.shared.store import guarded

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED')
end
local current = tonumber(redis.call('GET', KEYS[5]) or '-1')
if tonumber(ARGV[5]) < current then
  return redis.error_reply('FENCED offset would move back')
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
redis.call('SET', KEYS[5], ARGV[5])
local extra = cjson.decode(ARGV[6])
for pid, state in pairs(extra.dedup) do
  redis.call('HSET', KEYS[6], pid, state)
end
for name, amount in pairs(extra.counters) do
  redis.call('HINCRBY', KEYS[7], name, amount)
end
for i, snap in ipairs(extra.snaps) do
  redis.call('HSET', KEYS[8 + i], 'offset', snap.offset, 'version', snap.version,
             'state', ARGV[5 + 2 * i], 'stat', ARGV[6 + 2 * i])
  redis.call('HSET', KEYS[8], snap.slot, snap.offset)
end
return 1
"""


class ShareStore:
    def __init__(self, r: redis.Redis, run_id: str, role: str) -> None:
        self.r, self.run_id, self.role = r, run_id, role
        self.keys = ShareKeys(run_id, role)
        self._commit = r.register_script(_COMMIT)

    def init(self, n: int) -> bool:
        """Start from a share of zero unless this server has a state already."""
        s = initial_state(self.run_id, self.role, n)
        with guarded("initialising the share state"):
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.keys.state, s.state.tobytes(), nx=True)
            pipe.set(self.keys.stat, s.stat.tobytes(), nx=True)
            pipe.set(self.keys.version, 0, nx=True)
            pipe.set(self.keys.offset, -1, nx=True)
            return bool(pipe.execute()[0])

    def take_fence(self) -> int:
        with guarded("taking the share server fence"):
            return int(self.r.incr(self.keys.fence))

    def load(self) -> ShareState:
        k = self.keys
        with guarded("loading the share state"):
            pipe = self.r.pipeline(transaction=True)
            for key in (k.state, k.stat, k.version, k.offset):
                pipe.get(key)
            pipe.hgetall(k.dedup)
            state, stat, version, offset, windows = pipe.execute()
        return ShareState(
            np.frombuffer(state, dtype="<u8").astype(np.uint64),
            np.frombuffer(stat, dtype=np.float32).copy(),
            int(version),
            int(offset),
            {int(p): decode_state(v) for p, v in windows.items()},
        )

    def commit(
        self,
        fence: int,
        s: ShareState,
        dedup_changes: dict[int, str],
        counters: dict[str, int],
        snapshots: list[ShareSnapshot],
        every: int,
        ring: int,
    ) -> None:
        k = self.keys
        snaps = [
            {"slot": slot_of(sn.offset, every, ring), "offset": sn.offset, "version": sn.version}
            for sn in snapshots
        ]
        extra = {
            "dedup": {str(p): v for p, v in dedup_changes.items()},
            "counters": {**counters, "commits": 1},
            "snaps": snaps,
        }
        blobs: list[bytes] = []
        for sn in snapshots:
            blobs += [sn.state, sn.stat]
        with guarded("committing shares"):
            self._commit(
                keys=[
                    k.fence,
                    k.state,
                    k.stat,
                    k.version,
                    k.offset,
                    k.dedup,
                    k.counters,
                    k.snapshots,
                    *(k.snapshot(x["slot"]) for x in snaps),
                ],
                args=[
                    str(fence),
                    s.state.astype("<u8").tobytes(),
                    s.stat.tobytes(),
                    str(s.version),
                    str(s.offset),
                    json.dumps(extra),
                    *blobs,
                ],
            )

    def counters(self) -> dict[str, int]:
        with guarded("reading counters"):
            return {k.decode(): int(v) for k, v in self.r.hgetall(self.keys.counters).items()}

    def offset(self) -> int:
        with guarded("reading the stream offset"):
            return int(self.r.get(self.keys.offset) or -1)

    def delete(self) -> int:
        with guarded("deleting a share server's state"):
            names = list(self.r.scan_iter(match=self.keys.all_patterns()[0], count=1000))
            return int(self.r.delete(*names)) if names else 0


def slot_of(offset: int, every: int, ring: int) -> int:
    """The ring slot of the snapshot taken after stream offset ``offset``."""
    return (offset // every) % ring
