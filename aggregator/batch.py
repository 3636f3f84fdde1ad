"""The pure batch: verdicts in, the new state and what to commit out. No I/O, no clock.

``apply_batch`` is the one place an update changes the global parameters. It re-checks the replay
window in order (two copies of one update may sit in the same batch), checks the base version
against the version the update is applied at, weights it by the run's rule and applies it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dssgd.aggregator.admission import Accepted, Duplicate, Rejected, Verdict
from dssgd.aggregator.defence import Defence
from dssgd.aggregator.validate import check_version
from dssgd.shared import dedup
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.rules import UpdateRule, apply_update, bound_l2, decay
from dssgd.shared.store import AggregatorState
from dssgd.shared.tasks import param_entries


@dataclass
class Outcome:
    counters: Counter[str] = field(default_factory=Counter)
    dedup_changes: dict[int, str] = field(default_factory=dict)
    log_entries: list[str] = field(default_factory=list)  # participant:seq:version:staleness
    stalenesses: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    holder_done: bool = False  # the turn holder's update was applied or refused
    holder_refused: int | None = None  # seq of the holder's refused update, if any


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
    for v in verdicts:
        out.counters["bytes_in"] += len(v.delivery.body)
        if isinstance(v, Duplicate):
            out.counters["duplicates"] += 1
            continue
        if isinstance(v, Accepted):
            after = _apply_one(state, v, cfg, rule, out, defence)
            if after is v and v.update.participant == holder:
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


def _apply_one(
    state: AggregatorState,
    v: Accepted,
    cfg: RunConfig,
    rule: UpdateRule,
    out: Outcome,
    defence: Defence | None = None,
) -> Verdict | None:
    """Apply one accepted update: ``v`` if applied, a Rejected if it may not be, None if it is
    a duplicate of one applied earlier (in this batch or before)."""
    upd = v.update
    window = state.dedup.get(upd.participant, (0, 0))
    seen = dedup.check(window, upd.seq)
    if seen == dedup.DUPLICATE:
        out.counters["duplicates"] += 1
        return None
    if seen == dedup.TOO_OLD:
        detail = f"seq {upd.seq} is older than the replay window"
        return Rejected(v.delivery, "replay", detail, upd.participant, upd.seq)
    try:
        staleness = check_version(upd, cfg, state.version)
    except ValidationError as exc:
        return Rejected(v.delivery, exc.reason, exc.detail, upd.participant, upd.seq)
    if upd.count:
        values = upd.values
        if cfg.max_l2 is not None:
            params = upd.indices < param_entries(cfg, state.w.size)  # buffers are not a step
            values, clipped = bound_l2(values, cfg.max_l2, params)
            out.counters["l2_clipped"] += clipped
        if defence is not None:  # on the state it would be applied to, values as sent
            why = defence.judge(state.w, upd.indices, values)
            if why is not None:
                return Rejected(v.delivery, "defence", why, upd.participant, upd.seq)
            defence.accepted(upd.indices, values)
        apply_update(state.w, state.stat, upd.indices, values, rule.weight(staleness))
        state.touched.append(upd.indices)  # the commit writes only the chunks these are in
        decay(state.stat, cfg.stat_decay)
        state.stat_all |= cfg.stat_decay != 1.0  # decay moves every counter
        state.version += 1
    else:
        # Nothing to apply (e.g. a DP epoch that selected nothing): recorded, but the version
        # does not move, so nobody else's staleness grows for it.
        out.counters["empty"] += 1
    window = dedup.mark(window, upd.seq)
    state.dedup[upd.participant] = window
    out.dedup_changes[upd.participant] = dedup.encode_state(window)
    out.log_entries.append(f"{upd.participant}:{upd.seq}:{state.version}:{staleness}")
    out.counters["applied"] += 1
    out.counters["entries"] += upd.count
    out.counters["staleness_sum"] += staleness
    out.stalenesses.append(staleness)
    return v
