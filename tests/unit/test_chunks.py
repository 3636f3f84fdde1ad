"""Tests of shared.chunks: the layout, the commit plan and the θd chunk choice (no servers)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from dssgd.shared.chunks import Layout, chunk_size, dense_writes, download_chunks, plan_writes


def replay(stored: list[bytearray], plan, layout: Layout) -> None:  # type: ignore[no-untyped-def]
    """What the commit script does with a plan, on a list of chunk buffers."""
    for c, data in zip(plan.dense, plan.dense_data, strict=True):
        stored[int(c)][:] = data
    pos = 0
    for k, off, length in plan.runs.tolist():
        c = int(plan.sparse[k])
        stored[c][off : off + length] = plan.values[pos : pos + length]
        pos += length
    assert pos == len(plan.values)


@pytest.mark.parametrize(
    "n,k,seed", [(1000, 3, 0), (5000, 400, 1), (70_000, 5000, 2), (300, 300, 3)]
)
def test_a_plan_brings_the_stored_chunks_up_to_date_byte_for_byte(
    n: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    layout = Layout.for_size(n)
    old = rng.standard_normal(n).astype(np.float32)
    stored = [bytearray(old[slice(*layout.span(c))].tobytes()) for c in range(layout.n_chunks)]
    new = old.copy()
    touched = np.sort(rng.choice(n, k, replace=False))
    new[touched] += 1
    plan = plan_writes(new, layout, touched)
    replay(stored, plan, layout)
    assert b"".join(stored) == new.tobytes()
    # Only touched chunks are written, and a sparse one carries only its changed entries.
    written = set(plan.dense.tolist()) | set(plan.sparse.tolist())
    assert written == set((touched // layout.chunk).tolist())
    assert len(plan.values) == 4 * int(np.isin(touched // layout.chunk, plan.sparse).sum())
    # Negative control: a plan not told of one changed entry (in a patched chunk) leaves it stale.
    patched = touched[np.isin(touched // layout.chunk, plan.sparse)]
    if patched.size:
        stored = [bytearray(old[slice(*layout.span(c))].tobytes()) for c in range(layout.n_chunks)]
        replay(stored, plan_writes(new, layout, touched[touched != patched[0]]), layout)
        assert b"".join(stored) != new.tobytes()


def test_dense_writes_cover_everything() -> None:
    layout = Layout.for_size(3000)
    blob = np.arange(3000, dtype=np.float32)
    stored = [bytearray(4 * (hi - lo)) for lo, hi in map(layout.span, range(layout.n_chunks))]
    replay(stored, dense_writes(blob, layout), layout)
    assert b"".join(stored) == blob.tobytes()


@pytest.mark.parametrize("n", [1, 255, 256, 105_506, 10_000_000, 10**9])
def test_chunk_size_and_shards_partition_the_vector(n: int) -> None:
    layout = Layout(n, chunk_size(n), shards=min(3, -(-n // chunk_size(n))))
    assert 256 <= layout.chunk <= 65536 and layout.chunk & (layout.chunk - 1) == 0
    assert layout.sizes().sum() == n
    spans = [layout.shard_span(s) for s in range(layout.shards)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("theta_d", [1e-6, 0.1, 0.5, 0.999])
def test_download_takes_the_most_updated_chunks_until_theta_d_is_covered(theta_d: float) -> None:
    layout = Layout(10_000, 256)
    summary = np.random.default_rng(5).random(layout.n_chunks).astype(np.float32)
    chosen = download_chunks(layout, theta_d, summary)
    covered = layout.sizes()[chosen].sum()
    assert covered >= theta_d * layout.n
    last = chosen[np.argmin(summary[chosen])]  # the lowest-ranked chunk taken was needed
    assert covered - layout.sizes()[last] < theta_d * layout.n
    others = np.setdiff1d(np.arange(layout.n_chunks), chosen)
    assert others.size == 0 or summary[chosen].min() >= summary[others].max()
    rng = np.random.default_rng(0)
    assert layout.sizes()[download_chunks(layout, theta_d, None, rng)].sum() >= theta_d * layout.n
