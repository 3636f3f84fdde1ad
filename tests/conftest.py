"""Shared fixtures. Integration tests talk to the real RabbitMQ and Redis (never mocks).

Locally, tests that need the servers skip when one is missing (with the command that starts
them); in CI (CI=true) they fail instead, so a broken service can never pass as skipped.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.store import connect as redis_connect

from testing.runs import ROOT, RunHandle

__all__ = ["ROOT", "RunHandle"]


@pytest.fixture(scope="session")
def conns() -> Connections:
    c = Connections.from_env()
    try:
        redis_connect(c.redis_url).ping()
        amqp_connect(c.amqp_url, "dssgd-tests", heartbeat=0).close()
    except Exception as exc:  # the suite needs both servers; say so plainly
        why = (
            f"RabbitMQ and Redis must run for integration tests "
            f"(bash deploy/dev.sh services): {exc}"
        )
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return c


@pytest.fixture
def thread_aggregator() -> Iterator[Callable[[RunHandle], None]]:
    """Start an aggregator in a thread of the test process (no PyTorch import to pay again)."""
    from dssgd.aggregator.service import Aggregator, AggregatorSettings
    from dssgd.shared.lifecycle import StopFlag

    stops: list[tuple[StopFlag, threading.Thread]] = []

    def start(h: RunHandle) -> None:
        stop = StopFlag()
        agg = Aggregator(AggregatorSettings(h.cfg.run_id, h.conns, evaluate=False), stop)
        t = threading.Thread(target=agg.run, daemon=True)
        t.start()
        stops.append((stop, t))

    yield start
    for stop, t in stops:
        stop.set()
        t.join(timeout=10)


@pytest.fixture
def make_run(conns: Connections) -> Iterator[Callable[..., RunHandle]]:
    handles: list[RunHandle] = []

    def factory(zero_init: bool = False, **overrides: object) -> RunHandle:
        run_id = f"test-{uuid.uuid4().hex[:10]}"
        cfg = RunConfig(run_id=run_id, **overrides)  # type: ignore[arg-type]
        h = RunHandle(conns, cfg, zero_init=zero_init)
        handles.append(h)
        return h

    yield factory
    for h in handles:
        h.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` run only with DSSGD_LONG_TESTS=1: together they would take the suite
    past its 10-minute budget on 2 cores, and what they check is also covered by shorter tests
    or by bench/ (each says which)."""
    if os.environ.get("DSSGD_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long test: DSSGD_LONG_TESTS=1 runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
