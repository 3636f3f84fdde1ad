"""Every RabbitMQ name the system uses, in one place, namespaced by run id.

Names say what they are and which run they belong to, so the management console reads well:
``dssgd.<run>.updates`` (topic exchange and its queue) and ``dssgd.<run>.dead-letter``.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTENT_TYPE = "application/x-dssgd-update"
REASON_HEADER = "x-dssgd-reason"
DETAIL_HEADER = "x-dssgd-detail"


@dataclass(frozen=True)
class AmqpNames:
    run_id: str

    @property
    def exchange(self) -> str:
        return f"dssgd.{self.run_id}.updates"

    @property
    def queue(self) -> str:
        return f"dssgd.{self.run_id}.updates"

    @property
    def dead_exchange(self) -> str:
        return f"dssgd.{self.run_id}.dead-letter"

    @property
    def dead_queue(self) -> str:
        return f"dssgd.{self.run_id}.dead-letter"

    @property
    def secure_exchange(self) -> str:  # --secure two-server: where participants publish
        return f"dssgd.{self.run_id}.secure"

    @property
    def secure_stream(self) -> str:  # the stream both share servers read, in one total order
        return f"dssgd.{self.run_id}.secure-log"

    def partition_queue(self, partition: int, partitions: int) -> str:
        """Partition ``partition`` of ``partitions``' queue (``dssgd aggregator --ingest K``):
        bound to the routing keys of participants p with p mod K = partition."""
        return f"dssgd.{self.run_id}.updates.p{partition}of{partitions}"

    @staticmethod
    def partition_of(participant: int, partitions: int) -> int:
        return participant % partitions

    @staticmethod
    def queue_arguments(
        max_length: int, dead_exchange: str | None, delivery_limit: int, replicas: int = 0
    ) -> dict[str, object]:
        """The arguments of a run's queues, the one place they are spelled (every declarer must
        pass the same ones: RabbitMQ refuses a re-declaration with other arguments).

        Quorum queues (Raft-replicated, on every node of a cluster unless ``replicas`` says
        otherwise); the update queue (``dead_exchange`` given) is bounded and dead-letters what
        is delivered too often, the dead-letter queue (``dead_exchange=None``) is plain.
        """
        args: dict[str, object] = {"x-queue-type": "quorum"}
        if replicas > 0:
            args["x-quorum-initial-group-size"] = replicas
        if dead_exchange is not None:
            args.update({
                "x-dead-letter-exchange": dead_exchange,
                "x-delivery-limit": delivery_limit,
                "x-max-length": max_length,
                "x-overflow": "reject-publish",
            })
        return args

    @staticmethod
    def routing_key(participant: int) -> str:
        return f"upd.{participant}"

    @staticmethod
    def binding_key() -> str:
        return "upd.*"
