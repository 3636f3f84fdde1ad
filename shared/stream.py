"""The secure run's one total order: a RabbitMQ stream both share servers read on their own.

A stream queue (``x-queue-type: stream``) keeps every message with a fixed offset; each consumer
says where to start (``x-stream-offset``) and acks only to get more credit (``basic.qos`` is
required). So two share servers see the same messages in the same order, and each resumes from
the offset it committed with its state: a crash before a commit replays the messages after the
committed offset, a crash after it replays nothing. pika errors become ``BrokerError`` here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect
from dssgd.shared.errors import BrokerError
from pika.adapters.blocking_connection import BlockingChannel


def declare_secure_topology(channel: BlockingChannel, names: AmqpNames) -> None:
    """The secure exchange and its stream queue; idempotent."""
    try:
        channel.exchange_declare(names.secure_exchange, exchange_type="topic", durable=True)
        channel.queue_declare(
            names.secure_stream, durable=True, arguments={"x-queue-type": "stream"}
        )
        channel.queue_bind(names.secure_stream, names.secure_exchange, names.binding_key())
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(
            f"cannot declare the secure stream of run {names.run_id}: {exc!r}"
        ) from exc


def ensure_secure_topology(url: str, names: AmqpNames) -> None:
    conn = connect(url, "dssgd-secure-topology", heartbeat=0)
    try:
        declare_secure_topology(conn.channel(), names)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def delete_secure_topology(channel: BlockingChannel, names: AmqpNames) -> None:
    channel.queue_delete(names.secure_stream)
    channel.exchange_delete(names.secure_exchange)


@dataclass(frozen=True)
class StreamDelivery:
    """One stream message: its offset, body, and what the broker vouches for."""

    tag: int
    offset: int
    body: bytes
    routing_key: str
    user_id: str | None


class StreamConsumer:
    """One connection lifetime reading the secure stream from ``start`` on."""

    def __init__(self, url: str, names: AmqpNames, name: str, start: int, prefetch: int) -> None:
        self._conn = connect(url, name)
        self._pending: list[StreamDelivery] = []
        self._last_tag = 0
        self._acked = 0
        try:
            self._ch = self._conn.channel()
            declare_secure_topology(self._ch, names)
            self._ch.basic_qos(prefetch_count=prefetch)
            self._ch.basic_consume(
                names.secure_stream,
                self._on_message,
                auto_ack=False,
                arguments={"x-stream-offset": max(0, start)},
            )
        except (pex.AMQPError, OSError) as exc:
            self.close()
            raise BrokerError(f"cannot consume {names.secure_stream}: {exc!r}") from exc
        except BrokerError:
            self.close()
            raise
        # A stream delivers from the start of the chunk holding `start`: earlier offsets are
        # skipped here, so a resumed server never sees a message it has committed.
        self._start = start

    def _on_message(
        self, _ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes
    ) -> None:
        offset = int((props.headers or {}).get("x-stream-offset", -1))
        self._last_tag = method.delivery_tag
        if offset < self._start:
            return
        self._pending.append(
            StreamDelivery(method.delivery_tag, offset, body, method.routing_key, props.user_id)
        )

    def deliveries(
        self, timeout: float, max_count: int, window: float = 0.0
    ) -> list[StreamDelivery]:
        try:
            if not self._pending:
                self._conn.process_data_events(time_limit=timeout)
            if self._pending and window > 0:
                deadline = time.monotonic() + window
                while len(self._pending) < max_count and time.monotonic() < deadline:
                    self._conn.process_data_events(time_limit=deadline - time.monotonic())
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"RabbitMQ connection failed: {exc!r}") from exc
        batch, self._pending = self._pending[:max_count], self._pending[max_count:]
        return batch

    def ack_through(self, tag: int) -> None:
        """Credit for more messages (a stream keeps them either way)."""
        if tag <= self._acked:  # acking a tag twice would close the channel
            return
        try:
            self._ch.basic_ack(tag, multiple=True)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot ack: {exc!r}") from exc
        self._acked = tag

    def ack_skipped(self) -> None:
        """Ack what was skipped below ``start`` while nothing new came (keeps the credit)."""
        if not self._pending and self._last_tag:
            self.ack_through(self._last_tag)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
