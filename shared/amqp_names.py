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

    @staticmethod
    def routing_key(participant: int) -> str:
        return f"upd.{participant}"

    @staticmethod
    def binding_key() -> str:
        return "upd.*"
