"""The per-participant replay window (pure functions).

Sequence numbers of one participant may arrive out of order (a requeued seq 5 after seq 6), so a
"highest seen" check is not enough. Like IPsec's anti-replay window we keep the highest applied
sequence number and a bitmask of which of the WINDOW numbers below it were applied; anything
older than the window counts as a replay.
"""

from __future__ import annotations

WINDOW = 64
_MASK = (1 << WINDOW) - 1

NEW, DUPLICATE, TOO_OLD = "new", "duplicate", "too-old"


def check(state: tuple[int, int], seq: int) -> str:
    high, mask = state
    if seq > high:
        return NEW
    offset = high - seq
    if offset >= WINDOW:
        return TOO_OLD
    return DUPLICATE if (mask >> offset) & 1 else NEW


def mark(state: tuple[int, int], seq: int) -> tuple[int, int]:
    high, mask = state
    if seq > high:
        shift = seq - high
        mask = ((mask << shift) | 1) & _MASK if shift < WINDOW else 1
        return seq, mask
    return high, mask | (1 << (high - seq))


def intersect(states: list[tuple[int, int]]) -> tuple[int, int]:
    """A window holding exactly the sequence numbers every one of ``states`` holds (range
    shards: what all shards have applied), so a DUPLICATE from it is one on every shard."""
    if len(states) == 1:
        return states[0]
    high = min(h for h, _ in states)
    mask = _MASK
    for h, m in states:
        shift = h - high
        mask &= m >> shift if shift < WINDOW else 0
    return high, mask


def encode_state(state: tuple[int, int]) -> str:
    return f"{state[0]}:{state[1]}"


def decode_state(text: str | bytes | None) -> tuple[int, int]:
    if not text:
        return (0, 0)
    if isinstance(text, bytes):
        text = text.decode()
    high, mask = text.split(":")
    return int(high), int(mask)
