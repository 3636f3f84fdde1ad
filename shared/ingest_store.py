"""Redis side of the partitioned aggregator's hand-off (aggregator/partitioned.py).

Partition i's ingest writes its pre-summed batch to one key (``Keys.ingest_batch(i)``) with a
script that checks the ingest's fence and that the previous batch was consumed; the applier's
commit (``RunStore.commit(..., batches=...)``) records the batch id, deletes the key and wakes
the ingest, in the same fenced script that writes the parameters and replay windows. So a batch
is either still in Redis, waiting, or applied exactly once with its windows — never both, never
neither — whatever process dies when.
"""

from __future__ import annotations

import redis
from dssgd.shared.dedup import decode_state
from dssgd.shared.errors import FencedError
from dssgd.shared.keys import Keys
from dssgd.shared.store import guarded

# KEYS: ingest fence, batch key, applier wake list. ARGV: fence, blob.
_HAND_OFF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED')
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('BUSY')
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('RPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], -1, -1)
return 1
"""


class IngestStore:
    """What partition ``partition`` of ``partitions`` reads and writes (``partition=-1``: the
    applier's view of every partition)."""

    def __init__(self, r: redis.Redis, run_id: str, partitions: int, partition: int = -1) -> None:
        self.r, self.keys = r, Keys(run_id)
        self.partitions, self.partition = partitions, partition
        self._hand_off = r.register_script(_HAND_OFF)

    # --- the ingest --------------------------------------------------------------------------

    def take_fence(self) -> int:
        with guarded("taking the ingest fence"):
            return int(self.r.incr(self.keys.ingest_fence(self.partition)))

    def pending(self) -> bool:
        """Whether a batch this partition handed off is still waiting for the applier."""
        with guarded("reading the hand-off"):
            return bool(self.r.exists(self.keys.ingest_batch(self.partition)))

    def applied_batch(self) -> int:
        with guarded("reading the applied batch"):
            raw = self.r.hget(self.keys.ingest_applied, str(self.partition))
        return int(raw or 0)

    def windows(self) -> dict[int, tuple[int, int]]:
        """The committed replay windows of this partition's participants."""
        with guarded("reading replay windows"):
            raw = self.r.hgetall(self.keys.dedup)
        out = {int(p): decode_state(w) for p, w in raw.items()}
        return {p: w for p, w in out.items() if p % self.partitions == self.partition}

    def version(self) -> int:
        with guarded("reading the version"):
            return int(self.r.get(self.keys.version) or 0)

    def hand_off(self, fence: int, blob: bytes) -> None:
        keys = [
            self.keys.ingest_fence(self.partition),
            self.keys.ingest_batch(self.partition),
            self.keys.ingest_wake,
        ]
        try:
            with guarded("handing a batch off"):
                self._hand_off(keys=keys, args=[str(fence), blob])
        except FencedError as exc:
            raise FencedError(f"partition {self.partition}: a newer ingest took over") from exc

    def wait_done(self, timeout: float) -> None:
        """Block until the applier commits one of our batches, or ``timeout`` seconds."""
        with guarded("waiting for the applier"):
            self.r.blpop([self.keys.ingest_done(self.partition)], timeout=max(timeout, 0.01))

    def report_quiet(self, now: float, quiet: float) -> None:
        with guarded("writing the ingest heartbeat"):
            self.r.hset(self.keys.ingest_quiet, str(self.partition), f"{now:.3f} {quiet:.3f}")

    # --- the applier -------------------------------------------------------------------------

    def wait_batches(self, timeout: float) -> list[bytes | None]:
        """Every partition's waiting batch (None: none), after at most ``timeout`` s of none."""
        with guarded("waiting for batches"):
            self.r.blpop([self.keys.ingest_wake], timeout=timeout)
            # Wake list emptied before the read: a hand-off after it pushes a new wake-up.
            self.r.delete(self.keys.ingest_wake)
            return list(self.r.mget([self.keys.ingest_batch(p) for p in range(self.partitions)]))

    def applied_batches(self) -> dict[int, int]:
        with guarded("reading the applied batches"):
            raw = self.r.hgetall(self.keys.ingest_applied)
        return {int(p): int(b) for p, b in raw.items()}

    def claim_partitions(self) -> int:
        """Record K for this run; the K recorded before, if it differs (0 if none)."""
        with guarded("recording the partitions"):
            old = self.r.getset(self.keys.ingest_k, str(self.partitions))
        return 0 if old is None or int(old) == self.partitions else int(old)

    def ingests_quiet(self, now: float, fresh: float = 3.0) -> float:
        """Seconds every ingest has had nothing to consume (0 if one is busy, or silent)."""
        with guarded("reading the ingest heartbeats"):
            raw = self.r.hgetall(self.keys.ingest_quiet)
        beats = {int(p): v.split() for p, v in raw.items()}
        quiet = []
        for p in range(self.partitions):
            if p not in beats or now - float(beats[p][0]) > fresh:
                return 0.0
            quiet.append(float(beats[p][1]))
        return min(quiet)
