"""Large updates (issue 15): no size limit the user did not set refuses a valid update of a
big model; the limit still bounds what a sender may make the aggregator read."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from dssgd.shared import wire


def test_a_dense_update_of_a_big_model_is_encoded_and_decoded() -> None:
    n = 2_500_000  # a dense f32 update of it is ≈ 10 MB, above the 8 MiB floor
    upd = wire.Update("big", 0, 1, 0, n, np.arange(n, dtype=np.int64), np.ones(n, np.float32))
    body = wire.encode(upd)
    assert len(body) > wire.MAX_MESSAGE_BYTES
    got = wire.decode(body, expected_run="big", expected_n=n)
    assert got.count == n and got.values.tobytes() == upd.values.tobytes()
    # Negative controls: without the model's size the old floor applies, and a message larger
    # than any valid update of the run's model is still refused before it is parsed.
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(body)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(body, expected_run="big", expected_n=n // 4)


def test_an_update_beyond_one_message_travels_as_one_part_per_shard() -> None:
    n, shards = 2_500_000, 3  # dense f32 ≈ 10 MB: more than one broker message (8 MiB)
    spans = [(s * n // shards, (s + 1) * n // shards) for s in range(shards)]
    rng = np.random.default_rng(1)
    values = rng.standard_normal(n).astype(np.float32)
    upd = wire.Update("big", 4, 9, 5, n, np.arange(n), values, bases=(7, 5, 6))
    parts = wire.encode_parts(upd, spans)
    assert len(parts) == shards and max(map(len, parts)) <= wire.SPLIT_BYTES
    got = [wire.decode(p, expected_run="big", expected_n=n) for p in parts]
    assert [g.part for g in got] == [2, 1, 0]  # shard 0's part last
    for g in got:
        lo, hi = spans[g.part]  # type: ignore[index]
        assert g.span == (lo, hi) and g.total == n and g.bases == (7, 5, 6)
        assert np.array_equal(g.indices, np.arange(lo, hi))
        assert g.values.tobytes() == values[lo:hi].tobytes()
    # Negative control: one shard cannot be split, the single message stays over the limit.
    (whole,) = wire.encode_parts(upd, spans[:1] and [(0, n)])
    assert len(whole) > wire.SPLIT_BYTES


def test_schema_3_only_when_needed_and_old_messages_still_decode() -> None:
    idx, vals = np.array([1, 5, 900]), np.ones(3, np.float32)
    plain = wire.Update("r", 1, 2, 3, 1000, idx, vals)
    assert wire.encode(plain)[0] == 2  # one shard: byte for byte what it was
    assert wire.encode(plain, key=b"k")[0] == 2
    sharded = wire.Update("r", 1, 2, 3, 1000, idx, vals, bases=(3, 4))
    body = wire.encode(sharded)
    assert body[0] == wire.SCHEMA_VERSION == 3
    got = wire.decode(body)
    assert got.bases == (3, 4) and got.base_of(1) == 4 and got.part is None and got == sharded
    with pytest.raises(wire.WireError, match="least"):
        wire.encode(wire.Update("r", 1, 2, 9, 1000, idx, vals, bases=(3, 4)))
    fields = msgpack.unpackb(wire.encode(plain)[6:])
    for version, drop in ((2, ()), (1, ("t",))):  # what earlier participants send
        old = {k: v for k, v in fields.items() if k not in drop}
        body = bytes([version, 0]) + (1).to_bytes(4, "little") + msgpack.packb(old)
        assert wire.decode(body) == plain and wire.decode(body).bases is None
    assert "keys differ" in _error(bytes([3]) + wire.encode(plain)[1:])  # 3 needs its fields
    # A part must lie inside its range.
    with pytest.raises(wire.WireError, match="outside"):
        wire.encode(wire.Update("r", 1, 2, 3, 1000, idx, vals, part=0, span=(0, 500), total=3))


def _error(body: bytes) -> str:
    with pytest.raises(wire.WireError) as info:
        wire.decode(body)
    return str(info.value)
