"""Message authentication: every altered bit of an authenticated message is refused."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd.shared import wire

N = 105_506


def test_ten_thousand_one_bit_flips_are_all_rejected() -> None:
    rng = np.random.default_rng(2015)
    key = bytes(range(32))
    keys = {3: key}
    idx = np.sort(rng.choice(N, size=1055, replace=False)).astype(np.int64)
    upd = wire.Update("run-a", 3, 17, 40, N, idx, rng.normal(0, 1e-3, 1055).astype(np.float32))
    body = bytearray(wire.encode(upd, key=key))
    assert wire.decode(bytes(body), key_for=keys.get) == upd
    rejected = 0
    positions = rng.integers(0, len(body) * 8, size=10_000)
    for pos in positions:
        mutated = bytearray(body)
        mutated[pos // 8] ^= 1 << (pos % 8)
        with pytest.raises(wire.WireError):
            wire.decode(bytes(mutated), key_for=keys.get)
        rejected += 1
    assert rejected == 10_000


def test_wrong_key_missing_tag_and_unknown_participant_are_refused() -> None:
    upd = wire.Update("run-a", 3, 1, 0, N, np.array([5], np.int64), np.array([1.0], np.float32))
    signed = wire.encode(upd, key=b"k" * 32)
    with pytest.raises(wire.WireError):
        wire.decode(signed, key_for={3: b"x" * 32}.get)
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(upd), key_for={3: b"k" * 32}.get)  # no tag at all
    with pytest.raises(wire.WireError):
        wire.decode(signed, key_for={4: b"k" * 32}.get)  # nobody has that participant's key
