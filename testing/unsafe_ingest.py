"""Negative control of the partitioned aggregator's exactly-once test: an ingest that acks each
batch's messages as soon as it has decoded them, before the applier committed the batch.

    python -m testing.unsafe_ingest --run-id R --ingest K --part I ...   (as `dssgd aggregator`)

Killed while its applier is down, it loses the batch it acked but had not yet handed off; the
oracle test must see that (tests/integration/test_partitioned.py).
"""

from __future__ import annotations

import sys

from dssgd.aggregator import partitioned
from dssgd.shared.broker import Delivery


class AckEarlyIngest(partitioned.Ingest):
    def _build(self, batch: list[Delivery]) -> partitioned.InFlight:
        built = super()._build(batch)
        self.consumer.ack_through(built.last_tag)  # the bug under test: ack before the commit
        return built


if __name__ == "__main__":
    partitioned.Ingest = AckEarlyIngest  # type: ignore[misc]
    from dssgd.cli import main

    sys.exit(main(["aggregator", *sys.argv[1:]]))
