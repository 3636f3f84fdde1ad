"""How the flat parameter vector is cut into chunks and range shards (pure functions, no I/O).

Redis holds ``w`` and ``stat`` as fixed-size float32 chunks, one key each, grouped in ``S`` range
shards (``shared/keys.py``: each shard under its own hash tag). Three things follow from the
chunking, all computed here:

* which chunks a commit must write, and whether each is written whole ("dense") or as the runs
  of entries that changed ("sparse"): a commit costs what it touched, not ``n``;
* the chunk summaries the aggregator keeps at commit time (each chunk's mean update counter), so
  a participant finds the most-updated θd of the parameters by reading one small blob per shard
  instead of all of ``stat``;
* which chunks a θd download reads: the most-updated ones (or random ones), whole chunks, until
  they hold θd·n entries.

The chunk size is chosen once per run from ``n`` (``chunk_size``) and stored with the parameters,
so every process of a run cuts the vector the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

# About this many chunks per model: few enough that a full download is one MGET of a few hundred
# keys, many enough that a θd download overshoots θd by at most 1/TARGET_CHUNKS of n.
TARGET_CHUNKS = 256
MIN_CHUNK, MAX_CHUNK = 256, 65536  # floats (1 KB .. 256 KB per key)
# A touched chunk with more runs of changed entries than chunk/DENSE_RUNS is written whole: one
# SETRANGE (inside the commit's Lua script) costs about as much as writing DENSE_RUNS floats of a
# chunk by MSET (bench/storage.py "cost"; 64 while whole chunks too went through Lua, whose
# arguments cost Redis ~1.2 ns a byte).
DENSE_RUNS = 128


def chunk_size(n: int) -> int:
    """The power of two that cuts n into about TARGET_CHUNKS chunks (clamped)."""
    want = max(1, n // TARGET_CHUNKS)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, 1 << (want - 1).bit_length())))


@dataclass(frozen=True)
class Layout:
    n: int  # entries of the flat state
    chunk: int  # floats per chunk (the last one may be shorter)
    shards: int = 1  # range shards, each a contiguous run of whole chunks

    @classmethod
    def for_size(cls, n: int, shards: int = 1, chunk: int | None = None) -> Layout:
        return cls(n, chunk or chunk_size(n), shards)

    def __post_init__(self) -> None:
        if self.n < 1 or self.chunk < 1 or not 1 <= self.shards <= max(1, self.n_chunks):
            raise ValueError(f"bad layout {self}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk)

    def span(self, c: int) -> tuple[int, int]:
        """Entries [lo, hi) of chunk c."""
        return c * self.chunk, min(self.n, (c + 1) * self.chunk)

    def shard_chunks(self, s: int) -> range:
        """The chunks of shard s (contiguous, so a shard is a range of entries)."""
        return range(s * self.n_chunks // self.shards, (s + 1) * self.n_chunks // self.shards)

    def shard_of(self, c: int) -> int:
        return next(s for s in range(self.shards) if c in self.shard_chunks(s))

    def shard_span(self, s: int) -> tuple[int, int]:
        cs = self.shard_chunks(s)
        return self.span(cs.start)[0], self.span(cs.stop - 1)[1]

    def sizes(self) -> np.ndarray:
        """Entries per chunk."""
        out = np.full(self.n_chunks, self.chunk, np.int64)
        out[-1] = self.n - (self.n_chunks - 1) * self.chunk
        return out

    def to_json(self) -> str:
        return json.dumps({"n": self.n, "chunk": self.chunk, "shards": self.shards})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Layout:
        d = json.loads(raw)
        return cls(int(d["n"]), int(d["chunk"]), int(d.get("shards", 1)))


def chunk_sums(stat: np.ndarray, layout: Layout) -> np.ndarray:
    """Each chunk's sum of update counters (float64); over its size, the ranking a θd download
    uses (the aggregator keeps these up to date at commit time)."""
    return np.add.reduceat(stat.astype(np.float64), np.arange(0, layout.n, layout.chunk))


def download_chunks(
    layout: Layout,
    theta_d: float,
    summary: np.ndarray | None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Chunks (sorted) a θd download reads: whole chunks holding at least θd·n entries.

    With ``summary`` (each chunk's mean counter) the most-updated chunks first, ties to the lower
    chunk; without it (``download = random``) chunks drawn at random with ``rng``.
    """
    if theta_d >= 1.0:
        return np.arange(layout.n_chunks, dtype=np.int64)
    want = max(1, math.ceil(theta_d * layout.n - 1e-9))
    if summary is None:
        assert rng is not None
        order = rng.permutation(layout.n_chunks)
    else:
        order = np.lexsort((np.arange(layout.n_chunks), -summary.astype(np.float64)))
    covered = np.cumsum(layout.sizes()[order])
    take = int(np.searchsorted(covered, want)) + 1
    return np.sort(order[:take]).astype(np.int64)


@dataclass(frozen=True)
class Plan:
    """The writes of one blob (w or stat): chunks written whole, and runs patched in place.

    ``runs`` rows are (sparse chunk position, byte offset in the chunk, byte length); ``values``
    holds the runs' bytes back to back. Built without a Python loop over entries or runs, so
    planning costs what was touched (measured in bench/storage.py).
    """

    dense: np.ndarray  # chunk numbers written whole
    dense_data: list[bytes]
    sparse: np.ndarray  # chunk numbers patched run by run
    runs: np.ndarray  # (m, 3) uint32
    values: bytes


def plan_writes(blob: np.ndarray, layout: Layout, touched: np.ndarray) -> Plan:
    """The writes that bring the stored chunks of ``blob`` up to date after changes at the
    sorted unique entries ``touched``: a chunk with more than chunk/DENSE_RUNS runs of changed
    entries is written whole, any other touched chunk run by run."""
    return plan_writes_of((blob,), layout, touched)[0]


def plan_writes_of(
    blobs: tuple[np.ndarray, ...], layout: Layout, touched: np.ndarray
) -> list[Plan]:
    """``plan_writes`` of several blobs changed at the same entries (w and stat): the runs and
    the choice of chunks are worked out once."""
    c_of = touched // layout.chunk
    # A run starts where the entry is not the previous one plus one, or a new chunk starts.
    starts = np.ones(touched.size, bool)
    starts[1:] = (np.diff(touched) != 1) | (np.diff(c_of) != 0)
    run_chunk, run_lo = c_of[starts], touched[starts]
    run_len = np.diff(np.append(np.flatnonzero(starts), touched.size))
    per_chunk = np.bincount(run_chunk, minlength=layout.n_chunks)
    whole = per_chunk > layout.sizes() / DENSE_RUNS
    dense = np.flatnonzero(whole)
    sparse = np.flatnonzero((per_chunk > 0) & ~whole)
    keep = ~whole[run_chunk]
    runs = np.empty((int(keep.sum()), 3), "<u4")
    runs[:, 0] = np.searchsorted(sparse, run_chunk[keep])
    runs[:, 1] = (run_lo[keep] - run_chunk[keep] * layout.chunk) * 4
    runs[:, 2] = run_len[keep] * 4
    patched = touched[~whole[c_of]]
    return [
        Plan(dense, chunk_bytes(blob, layout, dense), sparse, runs, blob[patched].tobytes())
        for blob in blobs
    ]


def chunk_bytes(blob: np.ndarray, layout: Layout, chunks: np.ndarray) -> list[bytes]:
    """The bytes of each of ``chunks`` (sorted) of ``blob``: one copy of the span they cover,
    then slices of it (a tobytes per chunk cost ~2 µs of Python each, 0.5 ms per MLP commit)."""
    if not chunks.size:
        return []
    lo, hi = layout.span(int(chunks[0]))[0], layout.span(int(chunks[-1]))[1]
    raw = blob[lo:hi].tobytes()
    starts = (chunks * layout.chunk - lo) * 4
    ends = np.minimum(starts + layout.chunk * 4, (hi - lo) * 4)
    return [raw[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def dense_writes(blob: np.ndarray, layout: Layout, chunks: range | None = None) -> Plan:
    """Every chunk (of ``chunks``, default all) written whole (a change everywhere, such as the
    paper's counter decay)."""
    every = np.arange(layout.n_chunks) if chunks is None else np.arange(chunks.start, chunks.stop)
    data = chunk_bytes(blob, layout, every)
    return Plan(every, data, np.empty(0, np.int64), np.empty((0, 3), "<u4"), b"")
