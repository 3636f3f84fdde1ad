"""The pre-summed batch of a partitioned aggregator (pure: no I/O, no clock).

An ingest process (``aggregator.partitioned``) folds the accepted updates of one batch of its
participants into one sparse vector: the weighted sum of their values and, per entry, how many
updates touched it (what ``stat`` counts). The applier adds that vector once instead of every
update, and records what the updates would have recorded one by one: one version per non-empty
update, one applied-log line each, the replay windows they moved.

Sums of float32 values in another order may round differently; integer-valued updates (the
test oracle's) sum exactly, so the state stays byte-identical to the one-process aggregator's.

The hand-off travels through Redis as ``encode``'s bytes: a length-prefixed JSON header, then
the indices (u32), the summed values and the counts (f32). No pickle.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from dssgd.shared.dedup import decode_state
from dssgd.shared.store import AggregatorState

_HEAD = struct.Struct("<I")


@dataclass
class PreSum:
    partition: int
    batch: int  # per partition, increasing: the applier's dedup key is (partition, batch)
    fence: int  # the ingest's epoch that built it
    indices: np.ndarray  # unique, sorted
    values: np.ndarray  # float32 weighted sums
    counts: np.ndarray  # float32 updates per entry
    # One per applied update, in apply order: (participant, seq, staleness, non-empty).
    records: list[tuple[int, int, int, bool]] = field(default_factory=list)
    windows: dict[int, str] = field(default_factory=dict)  # participant → encoded replay window
    counters: Counter[str] = field(default_factory=Counter)


class Accumulator:
    """Dense scratch space an ingest reuses batch after batch (zeroed only where touched)."""

    def __init__(self, n: int) -> None:
        self.values = np.zeros(n, np.float32)
        self.counts = np.zeros(n, np.float32)
        self.touched: list[np.ndarray] = []

    def add(self, indices: np.ndarray, values: np.ndarray, weight: float = 1.0) -> None:
        # Indices of one update are unique, so fancy-index adds are exact (no np.add.at).
        if weight == 1.0:
            self.values[indices] += values
        else:
            self.values[indices] += np.float32(weight) * values
        self.counts[indices] += 1
        self.touched.append(indices)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, summed values, counts) of everything added since the last take; resets."""
        if not self.touched:
            empty = np.empty(0, np.float32)
            return np.empty(0, np.int64), empty, empty
        total = sum(t.size for t in self.touched)
        if total * 8 >= self.counts.size:
            # A scan of n is cheaper than sorting the batch's indices (the CNN at θu 0.01: a
            # 500-update batch touches 5·n entries; measured 36 → 0.3 ms per batch).
            idx = np.flatnonzero(self.counts)
        else:
            idx = np.unique(np.concatenate(self.touched))
        out = idx, self.values[idx].copy(), self.counts[idx].copy()
        self.values[idx] = 0
        self.counts[idx] = 0
        self.touched.clear()
        return out


def encode(ps: PreSum) -> bytes:
    head = json.dumps(
        {
            "partition": ps.partition,
            "batch": ps.batch,
            "fence": ps.fence,
            "size": int(ps.indices.size),
            "records": ps.records,
            "windows": {str(p): w for p, w in ps.windows.items()},
            "counters": dict(ps.counters),
        }
    ).encode()
    return b"".join(
        [
            _HEAD.pack(len(head)),
            head,
            ps.indices.astype("<u4").tobytes(),
            ps.values.astype("<f4").tobytes(),
            ps.counts.astype("<f4").tobytes(),
        ]
    )


def decode(blob: bytes) -> PreSum:
    (hlen,) = _HEAD.unpack_from(blob)
    head = json.loads(blob[4 : 4 + hlen])
    size, pos = head["size"], 4 + hlen
    idx = np.frombuffer(blob, "<u4", size, pos).astype(np.int64)
    values = np.frombuffer(blob, "<f4", size, pos + 4 * size).copy()
    counts = np.frombuffer(blob, "<f4", size, pos + 8 * size).copy()
    if pos + 12 * size != len(blob):
        raise ValueError("pre-summed batch of the wrong length")
    return PreSum(
        head["partition"],
        head["batch"],
        head["fence"],
        idx,
        values,
        counts,
        [(int(p), int(s), int(st), bool(ne)) for p, s, st, ne in head["records"]],
        {int(p): w for p, w in head["windows"].items()},
        Counter(head["counters"]),
    )


def apply_presum(state: AggregatorState, ps: PreSum) -> list[str]:
    """Add a pre-summed batch to ``state`` in place; its applied-log entries (without time)."""
    if ps.indices.size:
        state.w[ps.indices] += ps.values
        state.stat[ps.indices] += ps.counts
        state.touched.append(ps.indices)
    entries = []
    for participant, seq, staleness, non_empty in ps.records:
        state.version += non_empty  # an empty update is recorded but moves no version
        entries.append(f"{participant}:{seq}:{state.version}:{staleness}")
    for p, w in ps.windows.items():
        state.dedup[p] = decode_state(w)
    return entries
