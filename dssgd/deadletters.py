"""``dssgd dead-letters RUN``: what the aggregator refused, by reason, and re-driving it.

The aggregator dead-letters every message it refuses, with the reason and a detail in capped
headers (``shared/broker.py:dead_letter_headers``). Listing reads every dead letter without
consuming it (the channel closes unacked, so the broker keeps them all). Re-driving publishes
each chosen dead letter, body unchanged, to the run's update exchange under its original routing
key, confirmed, and only then removes it from the dead-letter queue: safe to repeat, because the
replay window makes a copy of an update that was already applied a counted duplicate, and an
update that is still invalid is dead-lettered again with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex

from dssgd.options import add_connection_options, connections
from dssgd.shared.amqp_names import CONTENT_TYPE, DETAIL_HEADER, REASON_HEADER, AmqpNames
from dssgd.shared.broker import connect
from dssgd.shared.errors import BrokerError, ConfigError
from dssgd.shared.lifecycle import EXIT_OK

ROUTING_HEADER = "x-dssgd-routing-key"
APP_HEADER = "x-dssgd-app-id"
USER_HEADER = "x-dssgd-user-id"


def _refused(names: AmqpNames, exc: pex.ChannelClosedByBroker) -> Exception:
    if exc.reply_code == 404:
        return ConfigError(f"run {names.run_id!r} has no dead-letter queue (dssgd runs lists runs)")
    return BrokerError(f"RabbitMQ refused: {exc.reply_text}")


@dataclass
class Listing:
    total: int = 0  # messages in the dead-letter queue when we looked
    read: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)


def _text(headers: dict[str, Any], name: str) -> str:
    value = headers.get(name, "")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _example(headers: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {
        "detail": _text(headers, DETAIL_HEADER),
        "routing_key": _text(headers, ROUTING_HEADER),
        "app_id": _text(headers, APP_HEADER),
        "user_id": _text(headers, USER_HEADER),
        "bytes": len(body),
    }


def browse(url: str, names: AmqpNames, limit: int) -> Listing:
    """Read up to `limit` dead letters, leave them all in the queue; counts and one example
    (the first) per reason."""
    conn = connect(url, f"dssgd-dead-letters {names.run_id}", heartbeat=0)
    out = Listing()
    try:
        ch = conn.channel()
        out.total = ch.queue_declare(names.dead_queue, passive=True).method.message_count
        while out.read < min(limit, out.total):
            method, props, body = ch.basic_get(names.dead_queue, auto_ack=False)
            if method is None:
                break
            headers = props.headers or {}
            reason = _text(headers, REASON_HEADER) or "(no reason)"
            out.read += 1
            out.counts[reason] += 1
            out.examples.setdefault(reason, _example(headers, body))
        # Closing the channel without acks gives every message back to the queue.
    except pex.ChannelClosedByBroker as exc:
        raise _refused(names, exc) from None
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(f"reading {names.dead_queue} failed: {exc!r}") from exc
    finally:
        with contextlib.suppress(pex.AMQPError, OSError):
            conn.close()
    return out


@dataclass
class Redrive:
    republished: Counter[str] = field(default_factory=Counter)
    kept: int = 0  # not chosen (another reason) or without an original routing key


def redrive(url: str, names: AmqpNames, reasons: set[str], keep_user_id: bool) -> Redrive:
    """Re-publish the dead letters of the chosen reasons (all if empty), each confirmed before
    it leaves the dead-letter queue; only as many as the queue held when we started, so the
    ones refused again meanwhile are not re-driven in a loop."""
    conn = connect(url, f"dssgd-dead-letters {names.run_id} (redrive)", heartbeat=0)
    out = Redrive()
    try:
        ch, pub = conn.channel(), conn.channel()
        pub.confirm_delivery()
        todo = ch.queue_declare(names.dead_queue, passive=True).method.message_count
        for _ in range(todo):
            method, props, body = ch.basic_get(names.dead_queue, auto_ack=False)
            if method is None:
                break
            headers = props.headers or {}
            reason = _text(headers, REASON_HEADER) or "(no reason)"
            key = _text(headers, ROUTING_HEADER)
            if (reasons and reason not in reasons) or not key:
                out.kept += 1
                continue  # stays unacked: back in the queue when the channel closes
            user = _text(headers, USER_HEADER) if keep_user_id else ""
            properties = pika.BasicProperties(
                content_type=CONTENT_TYPE,
                delivery_mode=pika.DeliveryMode.Persistent,
                app_id=_text(headers, APP_HEADER) or None,
                user_id=user or None,
            )
            pub.basic_publish(names.exchange, key, body, properties, mandatory=True)
            ch.basic_ack(method.delivery_tag)  # after the confirm: never lost in between
            out.republished[reason] += 1
    except (pex.UnroutableError, pex.NackError) as exc:
        # Nothing is lost: the dead letter that was refused is still unacked, so it stays.
        raise BrokerError(f"the run's update queue did not take a message: {exc!r}") from exc
    except pex.ChannelClosedByBroker as exc:
        raise _refused(names, exc) from None
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(f"re-driving {names.dead_queue} failed: {exc!r}") from exc
    finally:
        with contextlib.suppress(pex.AMQPError, OSError):
            conn.close()
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "dead-letters",
        help="what the aggregator refused, by reason; --redrive re-publishes it",
        description="List the dead letters of RUN (counted by the reason the aggregator gave, "
        "with one example each) without consuming them. After fixing the cause (a wrong key "
        "file, say), --redrive publishes them again to the run's update queue: safe, since a "
        "copy of an update already applied is only counted as a duplicate, and one still "
        "invalid comes back here with its reason.",
    )
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--redrive", action="store_true", help="re-publish them to the update queue")
    p.add_argument(
        "--reason",
        action="append",
        default=[],
        help="only dead letters of this reason (repeatable; default: all)",
    )
    p.add_argument(
        "--keep-user-id",
        action="store_true",
        help="re-publish with the sender's user_id (needs a RabbitMQ user with the "
        "impersonator tag; a provisioned run's aggregator checks user_id)",
    )
    p.add_argument("--limit", type=int, default=100_000, help="read at most this many")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_options(p)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    # A missing queue is reported in one line below, not as pika's warning.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    url, names = connections(args).amqp_url, AmqpNames(args.run_id)
    if args.redrive:
        r = redrive(url, names, set(args.reason), args.keep_user_id)
        if args.json:
            print(json.dumps({"republished": dict(r.republished), "kept": r.kept}))
            return EXIT_OK
        total = sum(r.republished.values())
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.republished.items())) or "none"
        print(
            f"re-published {total} dead letters of run {args.run_id} ({by}); {r.kept} kept. "
            "Copies of applied updates count as duplicates; still-invalid ones come back here."
        )
        return EXIT_OK
    listing = browse(url, names, args.limit)
    if args.json:
        reasons = {
            k: {"count": n, "example": listing.examples[k]} for k, n in listing.counts.items()
        }
        print(json.dumps({"total": listing.total, "read": listing.read, "reasons": reasons}))
        return EXIT_OK
    print(_render(args.run_id, listing))
    return EXIT_OK


def _render(run_id: str, listing: Listing) -> str:
    if not listing.total:
        return f"run {run_id}: no dead letters"
    head = f"run {run_id}: {listing.total} dead letters"
    if listing.read < listing.total:
        head += f" ({listing.read} read; --limit reads more)"
    lines = [head, f"  {'reason':<22} {'count':>7}  example"]
    for reason, n in listing.counts.most_common():
        ex = listing.examples[reason]
        who = f"{ex['routing_key'] or '?'}, {ex['bytes']} B"
        lines.append(f"  {reason:<22} {n:>7}  [{who}] {ex['detail'][:120]}")
    lines.append(f"re-publish after a fix: dssgd dead-letters {run_id} --redrive [--reason R]")
    return "\n".join(lines)
