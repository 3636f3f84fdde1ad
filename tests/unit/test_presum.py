"""The partitioned aggregator's pre-summed batch (pure): same state as the updates one by one."""

from __future__ import annotations

import numpy as np
from dssgd.aggregator.presum import Accumulator, PreSum, apply_presum, decode, encode
from dssgd.shared.rules import apply_update
from dssgd.shared.store import AggregatorState


def _updates(rng: np.random.Generator, n: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(count):
        idx = np.sort(rng.choice(n, size=int(rng.integers(1, n)), replace=False))
        out.append((idx, rng.integers(-3, 4, size=idx.size).astype(np.float32)))
    return out


def test_presum_matches_one_by_one_byte_for_byte() -> None:
    rng = np.random.default_rng(1)
    n = 300
    ups = _updates(rng, n, 25)
    one = AggregatorState(np.zeros(n, np.float32), np.zeros(n, np.float32), 0)
    for idx, vals in ups:
        apply_update(one.w, one.stat, idx, vals)
        one.version += 1
    acc = Accumulator(n)
    for idx, vals in ups:
        acc.add(idx, vals)
    ps = PreSum(1, 7, 3, *acc.take(), records=[(1, s, 0, True) for s in range(1, 26)])
    ps.windows = {1: "25:33554431"}
    ps.counters["applied"] = 25
    back = decode(encode(ps))
    assert (back.batch, back.partition, back.fence, back.windows) == (7, 1, 3, ps.windows)
    both = AggregatorState(np.zeros(n, np.float32), np.zeros(n, np.float32), 0)
    entries = apply_presum(both, back)
    assert both.w.tobytes() == one.w.tobytes() and both.stat.tobytes() == one.stat.tobytes()
    assert both.version == 25 and entries[-1] == "1:25:25:0"
    assert both.dedup[1] == (25, 33554431)
    assert not acc.take()[0].size and not acc.values.any()  # scratch space zeroed


def test_empty_updates_are_recorded_without_a_version() -> None:
    ps = PreSum(0, 1, 1, *Accumulator(4).take(), records=[(0, 1, 0, False), (2, 1, 0, False)])
    state = AggregatorState(np.zeros(4, np.float32), np.zeros(4, np.float32), 5)
    assert apply_presum(state, decode(encode(ps))) == ["0:1:5:0", "2:1:5:0"]
    assert state.version == 5


def test_sparse_batch_takes_sorted_unique_indices() -> None:
    acc = Accumulator(10_000)
    acc.add(np.array([5, 9000]), np.array([1, 2], np.float32))
    acc.add(np.array([5, 7]), np.array([3, 4], np.float32))
    idx, vals, counts = acc.take()
    assert idx.tolist() == [5, 7, 9000] and vals.tolist() == [4, 4, 2]
    assert counts.tolist() == [2, 1, 1]
