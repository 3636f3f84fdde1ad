"""The pure apply of one share server: stream messages in, its share state out. No I/O, no clock.

Both servers run this on the same stream in the same order, and every decision in it depends
only on what both can see (the public header, the indices, the lengths of the sealed boxes, the
committed replay window and version): so they apply, skip and refuse exactly the same messages,
and their states stay shares of one plaintext state. The one private input is the server's own
share of each update (``opener``); a box that does not open counts as a share of zero, so a
sender who spoils one box spoils only its own update, never the agreement between the servers.

The quantized plaintext reference is this same function with an opener that returns the
plaintext fixed-point values (``bench/secure*.py``, ``tests/integration/test_secure*.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from dssgd.aggregator.validate import check_version
from dssgd.shared import dedup, secure, wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.provision import participant_user
from dssgd.shared.rules import UpdateRule, decay
from dssgd.shared.selection import entry_limit
from dssgd.shared.stream import StreamDelivery
from dssgd.shared.tasks import buffer_entries

Opener = Callable[[wire.SecureUpdate], "np.ndarray | None"]


@dataclass
class ShareState:
    state: np.ndarray  # uint64: this server's share of Σ W·q(v) (plus its zero-sharing offset)
    stat: np.ndarray  # float32, plaintext: how often each coordinate was updated
    version: int  # non-empty updates applied, exactly as the plaintext aggregator counts
    offset: int  # last stream offset applied (-1: none)
    dedup: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShareSnapshot:
    offset: int
    version: int
    state: bytes
    stat: bytes


@dataclass
class ShareOutcome:
    counters: Counter[str] = field(default_factory=Counter)
    dedup_changes: dict[int, str] = field(default_factory=dict)
    snapshots: list[ShareSnapshot] = field(default_factory=list)


@dataclass(frozen=True)
class Refused:
    reason: str
    detail: str


def admit(
    d: StreamDelivery, cfg: RunConfig, n: int, keys: dict[int, bytes] | None
) -> wire.SecureUpdate | Refused:
    """The public verdict on one stream message: the decoded update, or why it is refused."""
    try:
        upd = wire.decode_secure(
            d.body,
            expected_run=cfg.run_id,
            expected_n=n,
            key_for=keys.get if keys is not None else None,
        )
    except wire.AuthenticationError as exc:
        return Refused("unauthenticated", str(exc))
    except wire.WireError as exc:
        return Refused("undecodable", str(exc))
    except Exception as exc:  # a decoder bug must cost one message, identically on both servers
        return Refused("undecodable", f"{type(exc).__name__}: {exc}")
    if not 0 <= upd.participant < cfg.participants:
        return Refused("unknown-participant", f"participant {upd.participant}")
    buffers = buffer_entries(cfg.task) if cfg.buffers == "whole" else 0
    limit = entry_limit(n, buffers, cfg.theta_u)
    if upd.count > limit:
        return Refused("too-many-entries", f"{upd.count} entries, θu allows {limit}")
    if d.routing_key != AmqpNames.routing_key(upd.participant):
        return Refused("wrong-routing-key", f"participant {upd.participant}: {d.routing_key[:64]}")
    if keys is not None and d.user_id != participant_user(cfg.run_id, upd.participant):
        return Refused("impersonation", f"user_id {(d.user_id or '')[:64]!r}")
    return upd


def apply_stream(
    s: ShareState,
    items: list[tuple[int, wire.SecureUpdate | Refused]],
    cfg: RunConfig,
    rule: UpdateRule,
    opener: Opener,
) -> ShareOutcome:
    """Apply (offset, verdict) items in stream order to ``s`` in place; snapshots at every
    offset o with (o + 1) % snapshot_every == 0 (the same offsets on both servers)."""
    out = ShareOutcome()
    last = items[-1][0] if items else -1
    every, ring = cfg.snapshot_every, cfg.snapshot_ring
    for offset, item in items:
        if offset <= s.offset:
            continue  # already in the committed state (a resumed consumer's first chunk)
        if isinstance(item, Refused):
            out.counters["rejected"] += 1
            out.counters[f"rejected:{item.reason}"] += 1
        else:
            _apply_one(s, item, cfg, rule, opener, out)
        s.offset = offset
        # Only the batch's last `ring` snapshot points are copied: older ones would be
        # overwritten in the ring by the same commit (a backlog batch passes many of them).
        if (offset + 1) % every == 0 and (last + 1) // every - (offset + 1) // every < ring:
            out.snapshots.append(
                ShareSnapshot(offset, s.version, s.state.tobytes(), s.stat.tobytes())
            )
    return out


def _apply_one(
    s: ShareState,
    upd: wire.SecureUpdate,
    cfg: RunConfig,
    rule: UpdateRule,
    opener: Opener,
    out: ShareOutcome,
) -> None:
    window = s.dedup.get(upd.participant, (0, 0))
    seen = dedup.check(window, upd.seq)
    if seen == dedup.DUPLICATE:
        out.counters["duplicates"] += 1
        return
    if seen == dedup.TOO_OLD:
        out.counters["rejected"] += 1
        out.counters["rejected:replay"] += 1
        return
    try:
        staleness = check_version(upd, cfg, s.version)  # type: ignore[arg-type]  # base only
    except ValidationError as exc:
        out.counters["rejected"] += 1
        out.counters[f"rejected:{exc.reason}"] += 1
        return
    if upd.count:
        weight = secure.encode_weight(rule.weight(staleness))
        share = opener(upd)
        if share is None:
            out.counters["unopened"] += 1  # a share of zero: see the module docstring
            share = np.zeros(upd.count, np.uint64)
        secure.apply_share(s.state, upd.indices, share, weight)
        s.stat[upd.indices] += 1
        decay(s.stat, cfg.stat_decay)
        s.version += 1
    else:
        out.counters["empty"] += 1
    window = dedup.mark(window, upd.seq)
    s.dedup[upd.participant] = window
    out.dedup_changes[upd.participant] = dedup.encode_state(window)
    out.counters["applied"] += 1
    out.counters["entries"] += upd.count
    out.counters["staleness_sum"] += staleness


def server_opener(role: str, private: bytes, run_id: str) -> Opener:
    """The opener of a real share server: its own sealed box of each update."""

    def open_box(upd: wire.SecureUpdate) -> np.ndarray | None:
        return secure.open_share(
            role, private, upd.box(role), run_id, upd.participant, upd.seq, upd.count
        )

    return open_box


def initial_state(run_id: str, role: str, n: int) -> ShareState:
    """A fresh server: its share of zero, nothing applied, no message read."""
    a, b = secure.zero_shares(run_id, n)
    start = {"a": a, "b": b}.get(role, secure.plain_state(n))
    return ShareState(start, np.zeros(n, np.float32), 0, -1)
