"""Every Redis key the system uses, in one place, namespaced by run id."""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "dssgd"
RUNS = f"{PREFIX}:runs"  # set of run ids


@dataclass(frozen=True)
class Keys:
    run_id: str

    def _k(self, suffix: str) -> str:
        return f"{PREFIX}:{{{self.run_id}}}:{suffix}"  # hash tag keeps a run in one cluster slot

    @property
    def config(self) -> str:  # JSON RunConfig
        return self._k("config")

    # --- parameters: fixed-size chunks, grouped in range shards (shared/store.py) -----------
    # Shard 0 shares the run's hash tag, so with one shard (the default) every key of a run is in
    # one cluster slot, as before; shard s > 0 has a tag of its own, so on a Redis Cluster each
    # shard's fenced commit runs in one slot of its own.

    @property
    def layout(self) -> str:  # JSON: n, chunk size, shards (written once, with the parameters)
        return self._k("layout")

    def shard(self, s: int) -> ShardKeys:
        return ShardKeys(self.run_id if s == 0 else f"{self.run_id}/s{s}")

    @property
    def legacy_blobs(self) -> tuple[str, str]:  # w and stat as one blob each (before chunks)
        return self._k("w"), self._k("stat")

    def w_chunk(self, c: int) -> str:  # shard 0's chunk c (the only shard by default)
        return self.shard(0).w(c)

    @property
    def version(self) -> str:  # integer, number of updates applied (shard 0)
        return self.shard(0).version

    @property
    def counters(self) -> str:  # hash: applied, rejected:<reason>, duplicates, bytes_in, ...
        return self._k("counters")

    @property
    def dedup(self) -> str:  # hash: participant → "high:mask" replay window (shard 0)
        return self.shard(0).dedup

    @property
    def fence(self) -> str:  # integer epoch of the aggregator allowed to write (shard 0)
        return self.shard(0).fence

    @property
    def metrics(self) -> str:  # list of JSON points (time, version, applied, bytes, acc, loss)
        return self._k("metrics")

    @property
    def applied_log(self) -> str:  # list "participant:seq:version:staleness:time", apply order
        return self._k("applied")

    @property
    def turn(self) -> str:  # participant id holding the turn (ordered modes)
        return self._k("turn")

    def wake(self, participant: int) -> str:  # list used to wake a participant when its turn comes
        return self._k(f"wake:{participant}")

    # Participant identity. There is no shared "active" or "finished" set any more: each
    # participant writes only keys of its own (lease, progress hash with its `finished` field,
    # trace), so a least-privileged participant can never rewrite another's state.

    def lease(self, participant: int) -> str:  # "owner expiry_ms ttl_ms": who hosts it, till when
        return self._k(f"lease:{participant}")

    def participant(self, participant: int) -> str:  # hash of a participant's progress
        return self._k(f"p:{participant}")

    def trace(self, participant: int) -> str:  # list "event pid seq time" for ordering checks
        return self._k(f"trace:{participant}")

    @property
    def stop(self) -> str:  # string reason; when set, workers finish their epoch and exit
        return self._k("stop")

    @property
    def model(self) -> str:  # JSON: task spec, model fingerprint, tensor names/shapes/dtypes
        return self._k("model")

    @property
    def heartbeat_aggregator(self) -> str:  # TTL key for health checks
        return self._k("hb:aggregator")

    # Partitioned aggregator (aggregator/partitioned.py): K ingest processes, one applier. All
    # under the run's own hash tag, so the applier's fenced commit can touch them in one slot.

    def ingest_fence(self, partition: int) -> str:  # integer epoch of partition's ingest
        return self._k(f"ingest:{partition}:fence")

    def ingest_batch(self, partition: int) -> str:  # blob: the partition's batch handed off
        return self._k(f"ingest:{partition}:batch")

    def ingest_done(self, partition: int) -> str:  # list: wakes the ingest when its batch commits
        return self._k(f"ingest:{partition}:done")

    @property
    def ingest_applied(self) -> str:  # hash: partition → id of its last committed batch
        return self._k("ingest:applied")

    @property
    def ingest_wake(self) -> str:  # list: wakes the applier when a batch is handed off
        return self._k("ingest:wake")

    @property
    def ingest_quiet(self) -> str:  # hash: partition → "time quiet_seconds" (ingest heartbeat)
        return self._k("ingest:quiet")

    @property
    def ingest_k(self) -> str:  # integer: how many partitions the run's aggregator uses
        return self._k("ingest:k")

    def share_server(self, role: str) -> str:  # hash: public (X25519, hex), read_url, name
        return self._k(f"share:{role}")

    def param_patterns(self) -> list[str]:
        """Globs of every chunk of w and stat, the chunk summaries and the shard versions, all
        shards (ACLs: a download reads each shard's version with its chunks)."""
        tags = [self.run_id, f"{self.run_id}/s*"]
        parts = ("w:*", "stat:*", "sum", "version")
        return [f"{PREFIX}:{{{t}}}:{part}" for t in tags for part in parts]

    def shard_patterns(self) -> list[str]:
        """Globs of the per-shard keys of shards s > 0 (shard 0's are the run's own)."""
        return [f"{PREFIX}:{{{self.run_id}/s*}}:*"]

    def all_patterns(self) -> list[str]:
        return [f"{PREFIX}:{{{self.run_id}}}:*", *self.shard_patterns()]


@dataclass(frozen=True)
class ShareKeys:
    """Keys of one share server (role a or b) in its own Redis (docs/SECURE.md)."""

    run_id: str
    role: str

    def _k(self, suffix: str) -> str:
        return f"{PREFIX}:{{{self.run_id}}}:share-{self.role}:{suffix}"

    @property
    def state(self) -> str:  # uint64 blob: this server's share of Σ W·q(v) (shared/secure.py)
        return self._k("state")

    @property
    def stat(self) -> str:  # float32 blob, plaintext counters (indices are public)
        return self._k("stat")

    @property
    def version(self) -> str:  # updates applied (non-empty ones), as the plaintext version
        return self._k("version")

    @property
    def offset(self) -> str:  # last stream offset whose message is in `state` (-1: none)
        return self._k("offset")

    @property
    def dedup(self) -> str:  # hash: participant → "high:mask" replay window
        return self._k("dedup")

    @property
    def counters(self) -> str:  # hash: applied, duplicates, rejected:<reason>, unopened, ...
        return self._k("counters")

    @property
    def fence(self) -> str:  # integer epoch of the server process allowed to write
        return self._k("fence")

    @property
    def snapshots(self) -> str:  # hash: ring slot → stream offset of the snapshot it holds
        return self._k("snaps")

    def snapshot(self, slot: int) -> str:  # hash: offset, version, state, stat
        return self._k(f"snap:{slot}")

    @property
    def private_key(self) -> str:  # this server's X25519 private key, when not in a key file
        return self._k("private-key")

    def all_patterns(self) -> list[str]:
        return [f"{PREFIX}:{{{self.run_id}}}:share-{self.role}:*"]


@dataclass(frozen=True)
class ShardKeys:
    """The keys of one range shard of the parameters, all under one hash tag (one slot)."""

    tag: str

    def _k(self, suffix: str) -> str:
        return f"{PREFIX}:{{{self.tag}}}:{suffix}"

    def w(self, c: int) -> str:  # float32 blob: chunk c (global chunk number) of w
        return self._k(f"w:{c}")

    def stat(self, c: int) -> str:  # float32 blob: chunk c of the update counters
        return self._k(f"stat:{c}")

    @property
    def summary(self) -> str:  # float32 blob: per chunk of the shard, its mean counter
        return self._k("sum")

    @property
    def version(self) -> str:  # integer, updates applied to this shard
        return self._k("version")

    @property
    def dedup(self) -> str:  # hash: participant → "high:mask", this shard's replay window
        return self._k("dedup")

    @property
    def fence(self) -> str:  # integer epoch of the aggregator allowed to write this shard
        return self._k("fence")

    @property
    def counters(self) -> str:  # hash: this shard's own counters (shards s > 0 only)
        return self._k("counters")

    @property
    def applied_log(self) -> str:  # list "participant:seq:version:staleness:time" (s > 0 only)
        return self._k("applied")

    @property
    def unused(self) -> str:  # a key of the shard's slot the commit script names but never writes
        return self._k("unused")
