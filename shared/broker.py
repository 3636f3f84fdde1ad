"""RabbitMQ: connections, the run's topology, and a confirmed publisher that keeps heartbeats alive.

pika errors are turned into ``BrokerError`` / ``UnroutableError`` here, so callers never see
pika's exception types.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
from dssgd.shared import tls
from dssgd.shared.amqp_names import CONTENT_TYPE, AmqpNames
from dssgd.shared.errors import BrokerError, UnroutableError
from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger(__name__)

# Bounded backlog: when the aggregator falls this far behind, publishes are refused (nacked) and
# publishers back off instead of the broker growing without limit.
DEFAULT_MAX_LENGTH = 100_000
# A message delivered this often is dead-lettered. Quorum queues also count deliveries that were
# prefetched when a consumer died, so the limit must outlast a burst of aggregator crashes (every
# prefetched message is counted at each one) while still stopping a message that kills every
# consumer it reaches; the replay window makes re-sending a dead letter safe.
DELIVERY_LIMIT = 100


def tune_for_large_messages() -> None:
    """Let pika read the socket in 128 KB chunks instead of 4 KB.

    Measured here (shared/docs/LIMITS.md): with ≥ 100 KB messages one consumer drains a backlog
    about twice as fast. pika has no public setting for it, so the class attributes of its
    transport are raised, if this pika version has them.
    """
    try:
        from pika.adapters.utils import io_services_utils as io
    except ImportError:  # another pika layout: keep its defaults
        return
    base = getattr(io, "_AsyncTransportBase", None)
    if base is not None and hasattr(base, "_MAX_RECV_BYTES"):
        base._MAX_RECV_BYTES = max(base._MAX_RECV_BYTES, 128 * 1024)
    if base is not None and hasattr(base, "_MAX_CONSUME_BYTES"):
        base._MAX_CONSUME_BYTES = max(base._MAX_CONSUME_BYTES, 4 * 1024 * 1024)


def endpoints(url: str) -> list[str]:
    """One URL per RabbitMQ node, from a setting that may name several.

    Two spellings: hosts separated by commas in one URL (``amqp://u:p@h1:5672,h2:5673/%2F?...``,
    every host sharing the credentials, vhost and options), or whole URLs separated by commas.
    A single URL is returned as it is.
    """
    parts = [p.strip() for p in url.split(",") if p.strip()]
    if len(parts) <= 1:
        return parts or [url]
    if all(p.startswith(("amqp://", "amqps://")) for p in parts):
        return parts
    scheme, rest = url.split("://", 1)
    slash = rest.find("/")
    netloc, tail = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    creds, _, hosts = netloc.rpartition("@")
    prefix = f"{scheme}://{creds}@" if creds else f"{scheme}://"
    return [f"{prefix}{h.strip()}{tail}" for h in hosts.split(",") if h.strip()]


def connect(url: str, name: str, heartbeat: int = 30) -> pika.BlockingConnection:
    """A connection to the first node that answers, trying every node the URL names once.

    The list starts at a random node so a cluster's clients spread over its nodes; a dead node
    costs one refused connection (or ``socket_timeout`` if it hangs). Retrying the whole list
    with backoff is the caller's reconnect loop's job.
    """
    try:
        urls = endpoints(url)
        start = random.randrange(len(urls))
        attempts = []
        for u in urls[start:] + urls[:start]:
            plain_url, ssl_options = tls.amqp_tls(u)  # amqps:// with certificates: shared/tls.py
            params = pika.URLParameters(plain_url)
            params.ssl_options = ssl_options
            params.heartbeat = heartbeat
            params.blocked_connection_timeout = 60
            params.connection_attempts = 1
            params.socket_timeout = 5
            params.client_properties = {"connection_name": name}
            attempts.append(params)
        return pika.BlockingConnection(attempts if len(attempts) > 1 else attempts[0])
    except (pex.AMQPError, OSError, ValueError) as exc:
        why = tls.explain(exc, url)
        if why is not None:
            raise BrokerError(f"cannot connect to RabbitMQ at {_redact(url)}: {why}") from exc
        raise BrokerError(
            f"cannot connect to RabbitMQ at {_redact(url)}: {exc!r}{tls.plaintext_hint(url)}"
        ) from exc


def _redact(url: str) -> str:
    return ",".join(_redact_one(u) for u in endpoints(url))


def _redact_one(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def declare_topology(
    channel: BlockingChannel,
    names: AmqpNames,
    max_length: int = DEFAULT_MAX_LENGTH,
    replicas: int = 0,
    bind: bool = True,
) -> None:
    """Durable exchanges and queues for a run; idempotent (same arguments every time).
    ``bind=False``: the update queue is not bound (a partitioned run's, ``declare_partitions``)."""
    try:
        channel.exchange_declare(names.dead_exchange, exchange_type="fanout", durable=True)
        dead_args = names.queue_arguments(max_length, None, DELIVERY_LIMIT, replicas)
        channel.queue_declare(names.dead_queue, durable=True, arguments=dead_args)
        channel.queue_bind(names.dead_queue, names.dead_exchange)
        channel.exchange_declare(names.exchange, exchange_type="topic", durable=True)
        args = names.queue_arguments(max_length, names.dead_exchange, DELIVERY_LIMIT, replicas)
        channel.queue_declare(names.queue, durable=True, arguments=args)
        if bind:
            channel.queue_bind(names.queue, names.exchange, routing_key=names.binding_key())
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(f"cannot declare the topology of run {names.run_id}: {exc!r}") from exc


def declare_partitions(
    channel: BlockingChannel,
    names: AmqpNames,
    partitions: int,
    participants: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    replicas: int = 0,
) -> None:
    """The partitioned aggregator's queues: one per partition, bound to the routing key of each
    of its participants (p mod K), then the run's single queue unbound, so each update lands in
    exactly one partition. Bindings first: an update is never unroutable in between (it may go
    to both: the applier moves the single queue's messages to the partitions, where a second copy
    is a duplicate for the replay window). Idempotent."""
    declare_topology(channel, names, max_length, replicas, bind=False)
    args = names.queue_arguments(max_length, names.dead_exchange, DELIVERY_LIMIT, replicas)
    args["x-single-active-consumer"] = True  # one ingest at a time owns a partition's windows
    try:
        for i in range(partitions):
            channel.queue_declare(
                names.partition_queue(i, partitions), durable=True, arguments=args
            )
        for p in range(participants):
            queue = names.partition_queue(names.partition_of(p, partitions), partitions)
            channel.queue_bind(queue, names.exchange, routing_key=names.routing_key(p))
        channel.queue_unbind(names.queue, names.exchange, routing_key=names.binding_key())
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(f"cannot declare the partitions of run {names.run_id}: {exc!r}") from exc


def delete_partitions(channel: BlockingChannel, names: AmqpNames, partitions: int) -> None:
    for q in _partition_queues(names, partitions):
        channel.queue_delete(q)


def delete_topology(channel: BlockingChannel, names: AmqpNames, partitions: int = 0) -> None:
    """The run's queues (with the K partition queues of a partitioned aggregator) and exchanges."""
    for q in (names.queue, names.dead_queue):
        channel.queue_delete(q)
    delete_partitions(channel, names, partitions)
    for ex in (names.exchange, names.dead_exchange):
        channel.exchange_delete(ex)


def _partition_queues(names: AmqpNames, partitions: int) -> list[str]:
    return [names.partition_queue(i, partitions) for i in range(partitions)]


def queue_depth(url: str, names: AmqpNames, partitions: int = 0) -> dict[str, int] | None:
    """Ready messages in the update queues (the run's and its K partition queues, summed) and the
    dead-letter queue; None if RabbitMQ is unreachable."""
    try:
        conn = connect(url, "dssgd-status", heartbeat=0)
    except BrokerError:
        return None
    try:
        out = {"updates": 0, "dead_letters": 0}
        queues = [("updates", q) for q in (names.queue, *_partition_queues(names, partitions))]
        for key, qname in [*queues, ("dead_letters", names.dead_queue)]:
            ch = conn.channel()
            with contextlib.suppress(pex.ChannelClosedByBroker):  # not declared: nothing waits
                out[key] += ch.queue_declare(qname, passive=True).method.message_count
        return out
    except (pex.AMQPError, OSError):
        return None
    finally:
        with contextlib.suppress(pex.AMQPError, OSError):
            conn.close()


@dataclass
class _Request:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    future: Future[None]


class Publisher:
    """Publishes with confirms and mandatory=True from a dedicated I/O thread.

    The thread owns the connection and services its heartbeats every 0.1 s, so a long PyTorch
    epoch in the caller's thread never gets the connection dropped. ``publish`` blocks the caller
    until the broker confirms (or raises), which is what lets the caller advance its sequence
    number only for confirmed updates.
    """

    def __init__(self, url: str, names: AmqpNames, app_id: str, user_id: str | None = None) -> None:
        self.url, self.names, self.app_id, self.user_id = url, names, app_id, user_id
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._conn: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._thread = threading.Thread(target=self._run, name="amqp-publisher", daemon=True)
        self._closed = False
        self._thread.start()

    def publish(
        self,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        timeout: float = 30.0,
        *,
        exchange: str | None = None,
        user_id: str | bool | None = True,
    ) -> None:
        """Publish and wait for the confirm. ``exchange``/``user_id`` overrides exist for tests
        that play an attacker (``user_id=True`` means this publisher's own user)."""
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            app_id=self.app_id,
            user_id=self.user_id if user_id is True else (user_id or None),
            headers=headers or {},
        )
        fut: Future[None] = Future()
        target = self.names.exchange if exchange is None else exchange
        self._requests.put(_Request(target, routing_key, body, props, fut))
        try:
            fut.result(timeout=timeout)
        except TimeoutError:
            raise BrokerError(f"no confirm within {timeout:.0f} s") from None

    def close(self) -> None:
        self._closed = True
        self._requests.put(None)
        self._thread.join(timeout=5)

    # --- the I/O thread -----------------------------------------------------------------------

    def _ensure(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop()
        # The run in the name: a broker serving several runs lists which connection is whose.
        self._conn = connect(self.url, f"dssgd-worker {self.names.run_id} [{self.app_id}]")
        ch = self._conn.channel()
        ch.confirm_delivery()
        self._channel = ch
        return ch

    def _drop(self) -> None:
        if self._conn is not None:
            # Closing a broken connection may fail in many ways; it is gone either way.
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn, self._channel = None, None

    def _run(self) -> None:
        while True:
            try:
                req = self._requests.get(timeout=0.1)
            except queue.Empty:
                req = None
                if self._closed:
                    break
            if req is None:
                if self._closed and self._requests.empty():
                    break
                self._service()
                continue
            if not req.future.set_running_or_notify_cancel():
                continue
            try:
                ch = self._ensure()
                ch.basic_publish(
                    req.exchange, req.routing_key, req.body, req.properties, mandatory=True
                )
                req.future.set_result(None)
            except pex.UnroutableError:
                req.future.set_exception(UnroutableError(f"no queue bound for {req.routing_key}"))
            except pex.NackError:
                # The queue is at its max-length (reject-publish), or this channel's view of a
                # quorum queue's leader is stale: on a 3-node cluster a channel opened just after
                # the leader's node was killed had every publish nacked for over a minute while
                # other channels published (bench/cluster_chaos.py). The caller backs off and
                # retries, on a fresh connection (perhaps to another node).
                req.future.set_exception(BrokerError("broker refused the message (queue full?)"))
                self._drop()
            except BrokerError as exc:
                req.future.set_exception(exc)
                self._drop()
            except (pex.AMQPError, OSError) as exc:
                req.future.set_exception(BrokerError(f"publish failed: {exc!r}"))
                self._drop()
        self._drop()

    def _service(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.process_data_events(time_limit=0)
        except (pex.AMQPError, OSError) as exc:
            log.warning("publisher connection lost while idle: %r", exc)
            self._drop()


# --- the consumer of a run's update queue -------------------------------------------------------

# Dead letters carry only these fields, each capped, so what a sender put into its message's
# properties can never make the republished header frame exceed frame_max (which closes the
# connection: FRAME_ERROR). AMQP caps routing key, app_id and user_id at 255 bytes anyway.
_DEAD_FIELD_CAP = {"reason": 64, "detail": 500, "routing-key": 255, "app-id": 128, "user-id": 128}
DEAD_HEADERS_MAX_BYTES = 2048  # whitelisted fields with their names and table overhead, at most


def dead_letter_headers(
    reason: str, detail: str, routing_key: str, app_id: str | None, user_id: str | None
) -> dict[str, str]:
    """The whole header table of a dead letter: whitelisted fields, each cut to its cap."""
    raw = {
        "reason": reason,
        "detail": detail,
        "routing-key": routing_key,
        "app-id": app_id or "",
        "user-id": user_id or "",
    }
    out = {}
    for name, value in raw.items():
        text = value if isinstance(value, str) else repr(value)
        # Cut by encoded size: a multi-byte character must not push a field past its cap.
        cut = text.encode("utf-8", "replace")[: _DEAD_FIELD_CAP[name]]
        out[f"x-dssgd-{name}"] = cut.decode("utf-8", "ignore")
    return out


@dataclass(frozen=True)
class Delivery:
    """One message from the update queue: what the aggregator may look at, nothing else.

    ``routing_key`` and ``user_id`` are vouched for by the broker (user_id only when the broker
    validates it, which it does for every publish); ``app_id`` is the sender's own word.
    """

    tag: int
    body: bytes
    routing_key: str
    user_id: str | None
    app_id: str | None
    redelivered: bool = False


class Consumer:
    """One connection lifetime of a run's update queue: deliveries, acks, dead letters.

    Every pika error is converted to :class:`BrokerError` here; the caller rebuilds the consumer
    after one (the broker requeues whatever was not acked). Dead-lettering can only fail on the
    connection itself, never on what a sender put into its message: the dead letter is built
    from a capped whitelist, and if the dead-letter exchange still refuses it the delivery is
    rejected to the queue's own dead-letter exchange instead (``x-dead-letter-exchange``).
    """

    def __init__(
        self,
        url: str,
        names: AmqpNames,
        name: str,
        prefetch: int,
        max_length: int,
        replicas: int = 0,
        queue: str | None = None,
        topology: Callable[[BlockingChannel], None] | None = None,
    ) -> None:
        """``queue``/``topology``: another queue of the run and how to declare it (a partition
        of ``dssgd aggregator --ingest K``); by default the run's one update queue."""
        self.names = names
        self._conn = connect(url, f"{name} {names.run_id}")
        self._pending: list[Delivery] = []
        # Delivered, neither acked nor rejected, in order: a multiple ack must end on one of
        # these (the broker closes the channel on an ack of a tag it no longer knows).
        self._unacked: list[int] = []
        try:
            self._ch = self._conn.channel()
            if topology is None:
                declare_topology(self._ch, names, max_length, replicas)
            else:
                topology(self._ch)
            self._dead = self._dead_channel()
            self._ch.basic_qos(prefetch_count=prefetch)
            self._ch.basic_consume(
                queue or names.queue, self._on_message, auto_ack=False, consumer_tag=name
            )
        except (pex.AMQPError, OSError) as exc:
            self.close()
            raise BrokerError(f"cannot consume {queue or names.queue}: {exc!r}") from exc
        except BrokerError:
            self.close()
            raise

    def _dead_channel(self) -> BlockingChannel:
        ch = self._conn.channel()
        ch.confirm_delivery()
        return ch

    def _on_message(
        self,
        _ch: BlockingChannel,
        method: Any,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._pending.append(
            Delivery(
                method.delivery_tag,
                body,
                method.routing_key,
                props.user_id,
                props.app_id,
                bool(method.redelivered),
            )
        )

    def deliveries(self, timeout: float, max_count: int, window: float = 0.0) -> list[Delivery]:
        """Up to ``max_count`` deliveries: waits ≤ ``timeout`` for the first, then ≤ ``window``
        for more (group commit: fuller batches are cheaper per update)."""
        try:
            if not self._pending:
                self._conn.process_data_events(time_limit=timeout)
            if self._pending and window > 0:
                deadline = time.monotonic() + window
                while len(self._pending) < max_count:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._conn.process_data_events(time_limit=left)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"RabbitMQ connection failed: {exc!r}") from exc
        batch, self._pending = self._pending[:max_count], self._pending[max_count:]
        self._unacked.extend(d.tag for d in batch)
        return batch

    def ack_through(self, tag: int) -> None:
        """Ack every delivery up to and including ``tag`` (one ``multiple`` ack), except those
        already rejected to the queue's dead-letter exchange."""
        covered = [t for t in self._unacked if t <= tag]
        self._unacked = [t for t in self._unacked if t > tag]
        if not covered:
            return
        try:
            self._ch.basic_ack(covered[-1], multiple=True)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot ack: {exc!r}") from exc

    def dead_letter(self, d: Delivery, reason: str, detail: str) -> None:
        """Publish ``d`` to the dead-letter exchange with a reason, confirmed; fall back to a
        reject to the queue's own dead-letter exchange if that channel refuses it."""
        headers = dead_letter_headers(reason, detail, d.routing_key, d.app_id, d.user_id)
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=headers,
        )
        try:
            self._dead.basic_publish(self.names.dead_exchange, "", d.body, props)
            return
        except pex.ChannelClosed as exc:  # the channel only: the connection is still good
            log.warning("dead-letter channel refused a message (%r); rejecting it instead", exc)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot dead-letter a message: {exc!r}") from exc
        try:
            self._dead = self._dead_channel()
            self._ch.basic_nack(d.tag, multiple=False, requeue=False)
            self._unacked.remove(d.tag)
        except (pex.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot reject a message: {exc!r}") from exc

    def close(self) -> None:
        """Close the connection; the broker requeues every unacked delivery."""
        # A broken connection may fail to close in many ways; it is gone either way.
        with contextlib.suppress(Exception):
            self._conn.close()
