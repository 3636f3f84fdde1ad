"""The pure batch: verdicts in, the new state and what to commit out. No I/O, no clock.

``apply_batch`` is the one place an update changes the global parameters. It re-checks the replay
window in order (two copies of one update may sit in the same batch), checks the base version
against the version the update is applied at, weights it by the run's rule and applies it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from dssgd.aggregator.admission import Accepted, Duplicate, Rejected, Verdict
from dssgd.aggregator.defence import Defence
from dssgd.aggregator.validate import check_version
from dssgd.shared import dedup
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.rules import UpdateRule, apply_update, bound_l2, decay
from dssgd.shared.store import AggregatorState, ShardChanges
from dssgd.shared.tasks import param_entries
from dssgd.shared.wire import Update


@dataclass
class Outcome:
    counters: Counter[str] = field(default_factory=Counter)
    dedup_changes: dict[int, str] = field(default_factory=dict)  # shard 0's (the run's)
    log_entries: list[str] = field(default_factory=list)  # participant:seq:version:staleness
    stalenesses: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    holder_done: bool = False  # the turn holder's update was applied or refused
    holder_refused: int | None = None  # seq of the holder's refused update, if any
    # Range shards 1..S-1 (index 0 unused): their own window changes, counters and log.
    shard_dedup: list[dict[int, str]] = field(default_factory=list)
    shard_counters: list[Counter[str]] = field(default_factory=list)
    shard_logs: list[list[str]] = field(default_factory=list)

    def shard_changes(self) -> ShardChanges | None:
        """What ``RunStore.commit`` writes to shards 1..S-1 (None with one shard)."""
        if len(self.shard_dedup) <= 1:
            return None
        counters = [dict(c) for c in self.shard_counters]
        return ShardChanges(self.shard_dedup, counters, self.shard_logs)


def apply_batch(
    state: AggregatorState,
    verdicts: list[Verdict],
    cfg: RunConfig,
    rule: UpdateRule,
    holder: int | None = None,
    defence: Defence | None = None,
) -> Outcome:
    """Apply the accepted updates of a batch to ``state`` in place, in delivery order."""
    out = Outcome()
    out.shard_dedup = [{} for _ in range(state.shards)]
    out.shard_counters = [Counter() for _ in range(state.shards)]
    out.shard_logs = [[] for _ in range(state.shards)]
    for v in verdicts:
        out.counters["bytes_in"] += len(v.delivery.body)
        if isinstance(v, Duplicate):
            out.counters["duplicates"] += 1
            continue
        if isinstance(v, Accepted):
            after = _apply_one(state, v, cfg, rule, out, defence)
            if after is v and v.update.participant == holder and v.update.part in (None, 0):
                out.holder_done = True
            if not isinstance(after, Rejected):
                continue
            v = after
        if isinstance(v, Rejected):
            out.rejected.append(v)
            out.counters["rejected"] += 1
            out.counters[f"rejected:{v.reason}"] += 1
            if holder is not None and v.participant == holder:
                out.holder_done, out.holder_refused = True, v.seq
    return out


def _needs(state: AggregatorState, upd: Update) -> tuple[list[int], list[int], bool]:
    """(shards the message covers, those that have not applied it, whether every one it
    covers says too old). A whole update covers every range shard, a part its own; each shard
    answers from its own replay window, so after a crash between two shards' commits the
    redelivery goes to the shards that missed it and no other."""
    covered = list(range(state.shards)) if upd.part is None else [upd.part]
    seen = [dedup.check(state.windows(s).get(upd.participant, (0, 0)), upd.seq) for s in covered]
    need = [s for s, x in zip(covered, seen, strict=True) if x == dedup.NEW]
    return covered, need, all(x == dedup.TOO_OLD for x in seen)


def _judge(
    state: AggregatorState, v: Accepted, cfg: RunConfig, need: list[int], values: np.ndarray,
    defence: Defence | None,
) -> Rejected | list[int]:  # fmt: skip
    """Per shard staleness of an update no shard has applied yet, or why it may not be."""
    upd = v.update
    try:
        stale = [check_version(upd, cfg, state.version_of(s), s) for s in need]
    except ValidationError as exc:
        return Rejected(v.delivery, exc.reason, exc.detail, upd.participant, upd.seq)
    if defence is not None and upd.count:  # on the state it would be applied to, values as sent
        why = defence.judge(state.w, upd.indices, values)
        if why is not None:
            return Rejected(v.delivery, "defence", why, upd.participant, upd.seq)
        defence.accepted(upd.indices, values)
    return stale


def _apply_one(
    state: AggregatorState,
    v: Accepted,
    cfg: RunConfig,
    rule: UpdateRule,
    out: Outcome,
    defence: Defence | None = None,
) -> Verdict | None:
    """Apply one accepted update: ``v`` if applied, a Rejected if it may not be, None if it is
    a duplicate of one applied earlier (in this batch or before).

    The verdict is reached once, when no shard has applied the update yet. A shard that missed
    a commit another shard made (a crash between the two) completes it without judging again:
    a stale bound or the defence must not refuse on one shard what another already applied.
    """
    upd = v.update
    layout = state.layout
    assert layout is not None
    if upd.part is not None and (
        upd.part >= state.shards or upd.span != layout.shard_span(upd.part)
    ):
        detail = f"part {upd.part} {upd.span} is not a shard of this run's {state.shards}"
        return Rejected(v.delivery, "bad-part", detail, upd.participant, upd.seq)
    covered, need, too_old = _needs(state, upd)
    if not need:
        if too_old:
            detail = f"seq {upd.seq} is older than the replay window"
            return Rejected(v.delivery, "replay", detail, upd.participant, upd.seq)
        out.counters["duplicates"] += 1
        return None
    values, clipped = upd.values, False
    if cfg.max_l2 is not None and upd.count:
        params = upd.indices < param_entries(cfg, state.w.size)  # buffers are not a step
        values, clipped = bound_l2(values, cfg.max_l2, params)
    if len(need) == len(covered):
        judged = _judge(state, v, cfg, need, values, defence)
        if isinstance(judged, Rejected):
            return judged
        stale = judged
        out.counters["l2_clipped"] += clipped
    else:
        stale = [max(0, state.version_of(s) - upd.base_of(s)) for s in need]
        for s in need:  # shard 0's count goes with the run's counters
            (out.shard_counters[s] if s else out.counters)["completed"] += 1
    for s, staleness in zip(need, stale, strict=True):
        _apply_to_shard(state, upd, values, s, staleness, cfg, rule, out)
    return v


def _apply_to_shard(
    state: AggregatorState,
    upd: Update,
    values: np.ndarray,
    s: int,
    staleness: int,
    cfg: RunConfig,
    rule: UpdateRule,
    out: Outcome,
) -> None:
    """The update's entries in shard s, weighted by its staleness there, and shard s's window,
    version, counters and log."""
    assert state.layout is not None
    lo, hi = state.layout.shard_span(s)
    a, b = (0, upd.count) if state.shards == 1 else np.searchsorted(upd.indices, (lo, hi))
    if upd.whole_count:
        idx = upd.indices[a:b]
        apply_update(state.w, state.stat, idx, values[a:b], rule.weight(staleness))
        state.touched.append(idx)  # the commit writes only the chunks these are in
        decay(state.stat[lo:hi], cfg.stat_decay)
        state.stat_all |= cfg.stat_decay != 1.0  # decay moves every counter
        version = state.bump(s)
    else:
        # Nothing to apply (e.g. a DP epoch that selected nothing): recorded, but the version
        # does not move, so nobody else's staleness grows for it.
        version = state.version_of(s)
    windows = state.windows(s)
    window = dedup.mark(windows.get(upd.participant, (0, 0)), upd.seq)
    windows[upd.participant] = window
    entry = f"{upd.participant}:{upd.seq}:{version}:{staleness}"
    if s:
        out.shard_dedup[s][upd.participant] = dedup.encode_state(window)
        out.shard_logs[s].append(entry)
        out.shard_counters[s]["applied"] += 1
        out.shard_counters[s]["entries"] += int(b - a)
        return
    out.dedup_changes[upd.participant] = dedup.encode_state(window)
    out.log_entries.append(entry)
    if not upd.whole_count:
        out.counters["empty"] += 1
    out.counters["applied"] += 1
    out.counters["entries"] += upd.whole_count
    out.counters["staleness_sum"] += staleness
    out.stalenesses.append(staleness)
