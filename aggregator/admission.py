"""Admission: one delivery in, one verdict out (decode, replay window, rate, sender, validation).

Nothing here touches a server. Whatever a sender put into a message ends as a verdict, never as
an exception: a message that breaks the decoder in a way nobody foresaw is rejected like any
other undecodable one, so one bad message can never fail the batch it came with.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aggregator.validate import validate
from shared import dedup, wire
from shared.amqp_names import AmqpNames
from shared.broker import Delivery
from shared.config import RunConfig
from shared.errors import ValidationError
from shared.provision import participant_user

log = logging.getLogger(__name__)

# A sender's clock may run this far ahead of the aggregator's before its messages are refused
# (``clock-ahead``): the rate limit trusts the sender's clock, so an unbounded lead would let a
# key holder stamp a flood as if it had been sent over the coming hours.
MAX_CLOCK_LEAD = 60.0
# Timestamps travel in whole milliseconds; an honest sender at exactly the rate may look a
# millisecond early.
_STAMP_SLACK = 0.005


@dataclass(frozen=True)
class Accepted:
    delivery: Delivery
    update: wire.Update


@dataclass(frozen=True)
class Duplicate:
    delivery: Delivery
    participant: int
    seq: int


@dataclass(frozen=True)
class Rejected:
    delivery: Delivery
    reason: str
    detail: str
    participant: int | None = None  # known once the message decoded
    seq: int | None = None


Verdict = Accepted | Duplicate | Rejected


class SenderClockLimiter:
    """Rate limit charged on the sender's clock (GCRA), so a backlog never looks like a flood.

    Each message carries its sender's wall clock (authenticated with the rest of the message).
    A participant may send ``rate`` updates per second with a burst of ``max(1, rate)``, measured
    by those stamps, not by when the aggregator gets to them: after the aggregator was away, a
    backlog of updates sent at half the rate is all within the limit. A sender can only cheat by
    stamping the future, which ``MAX_CLOCK_LEAD`` bounds. Only messages with a sequence number
    above every one charged so far are charged; older ones (redeliveries out of order) are
    bounded by the replay window instead (at most ``dedup.WINDOW`` of them ever land).
    """

    def __init__(self, rate: float, lead: float = MAX_CLOCK_LEAD) -> None:
        self.rate, self.lead = rate, lead
        self.tolerance = (max(1.0, rate) - 1.0) / rate + _STAMP_SLACK
        self._state: dict[int, tuple[int, float]] = {}  # participant -> (highest seq, TAT)

    def check(self, participant: int, seq: int, sent_at: float | None, now: float) -> None:
        """Raise ValidationError if this message exceeds the rate on its sender's clock."""
        # Schema 1 carries no clock: charge it on ours, as before.
        t = now if sent_at is None else sent_at
        if t > now + self.lead:
            raise ValidationError(
                "clock-ahead", f"sender clock {t - now:.0f} s ahead of the aggregator's"
            )
        high, tat = self._state.get(participant, (0, -math.inf))
        if seq <= high:
            return
        start = max(tat, t)
        if start - t > self.tolerance:
            raise ValidationError(
                "rate-limited", f"participant {participant} exceeds {self.rate}/s on its own clock"
            )
        self._state[participant] = (seq, start + 1.0 / self.rate)


class Admission:
    def __init__(
        self,
        cfg: RunConfig,
        n: int,
        keys: dict[int, bytes] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg, self.n, self.keys, self.clock = cfg, n, keys, clock
        self.limiter = SenderClockLimiter(cfg.rate_limit) if cfg.rate_limit else None

    def admit(self, d: Delivery, window_of: Callable[[int], tuple[int, int]]) -> Verdict:
        """The verdict on one delivery; ``window_of(p)`` is p's committed replay window."""
        try:
            upd = wire.decode(
                d.body,
                expected_run=self.cfg.run_id,
                expected_n=self.n,
                key_for=self.keys.get if self.keys is not None else None,
            )
        except wire.AuthenticationError as exc:
            return Rejected(d, "unauthenticated", str(exc))
        except wire.WireError as exc:
            return Rejected(d, "undecodable", str(exc))
        except Exception as exc:  # a decoder bug must cost one message, not the batch
            log.exception("decoder failed on a message")
            return Rejected(d, "undecodable", f"{type(exc).__name__}: {exc}")
        # Replays first: a copy of an applied update is a duplicate whatever else holds.
        verdict = dedup.check(window_of(upd.participant), upd.seq)
        if verdict == dedup.DUPLICATE:
            return Duplicate(d, upd.participant, upd.seq)
        if verdict == dedup.TOO_OLD:
            detail = f"seq {upd.seq} is older than the replay window"
            return Rejected(d, "replay", detail, upd.participant, upd.seq)
        try:
            if self.limiter is not None:  # a flood is a flood, valid or not
                self.limiter.check(upd.participant, upd.seq, upd.sent_at, self.clock())
            validate(upd, self.cfg, self.n)
            self._check_sender(upd.participant, d)
        except ValidationError as exc:
            return Rejected(d, exc.reason, exc.detail, upd.participant, upd.seq)
        return Accepted(d, upd)

    def _check_sender(self, participant: int, d: Delivery) -> None:
        """The broker vouches for user_id and the routing key; both must name the participant."""
        if d.routing_key != AmqpNames.routing_key(participant):
            raise ValidationError(
                "wrong-routing-key",
                f"participant {participant} sent with key {d.routing_key[:64]!r}",
            )
        if self.keys is not None:
            expected = participant_user(self.cfg.run_id, participant)
            if d.user_id != expected:
                raise ValidationError(
                    "impersonation", f"user_id {(d.user_id or '')[:64]!r} is not {expected!r}"
                )
