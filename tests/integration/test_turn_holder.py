"""Ordered modes: a turn holder whose process dies loses the turn within 5 s, a live one keeps
it, and the dead holder's late update is applied as a stale one without moving the turn."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.store import HOLDER_SILENCE, LEASE_RENEW

from testing.oracle import integer_update, oracle_run
from testing.runs import ROOT, RunHandle

pytestmark = pytest.mark.integration

# A participant's host as the aggregator sees it: a process renewing the participant's lease
# every LEASE_RENEW seconds (worker.service.LeaseKeeper's loop, without PyTorch to import).
HOST = """
import sys, time
from dssgd.shared.store import LEASE_RENEW, RunStore, connect
store = RunStore(connect(sys.argv[1]), sys.argv[2])
owner, pids = sys.argv[3], [int(p) for p in sys.argv[4].split(",")]
store.acquire(owner, pids)
print("up", flush=True)
while True:
    time.sleep(LEASE_RENEW)
    store.renew(owner, pids)
"""


def host(h: RunHandle, owner: str, pids: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", HOST, h.conns.redis_url, h.cfg.run_id, owner, pids]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    h.procs.append(p)  # type: ignore[arg-type]
    assert p.stdout is not None and p.stdout.readline() == "up\n"
    return p


# Random order takes the same path (the candidates are the heartbeating participants).
@pytest.mark.parametrize("order", ["round-robin"])
def test_a_killed_turn_holder_is_replaced_within_5_s(
    make_run: Callable[..., RunHandle], thread_aggregator: Callable[[RunHandle], None], order: str
) -> None:
    h = oracle_run(make_run)
    h.store.r.set(h.store.keys.config, h.cfg.replace(order=order, epochs=0).to_json())
    holder = host(h, "host-0", "0")
    host(h, "host-12", "1,2")
    thread_aggregator(h)
    h.wait(lambda: h.store.turn() is not None, timeout=30, what="the first turn")
    assert h.store.turn() == 0  # round robin starts at 0 once all three are present
    # Negative control: a holder that heartbeats keeps its turn however long it takes.
    time.sleep(HOLDER_SILENCE + 1.0)  # past the session's 3 s grace: housekeeping ran
    assert h.store.turn() == 0
    holder.kill()
    killed = time.monotonic()
    h.wait(lambda: h.store.turn() != 0, timeout=15, what="the turn to move on")
    replaced = time.monotonic() - killed
    print(f"turn replaced {replaced:.2f} s after the kill")
    assert replaced < 5.0, f"a dead holder kept the turn {replaced:.1f} s"
    assert h.store.turn() == 1
    # The dead holder's update, published before it died, arrives late: applied as a stale
    # update under the run's rule, and the turn stays with the new holder.
    late = integer_update(h, 0, 1, np.random.default_rng(3))
    pub = Publisher(h.conns.amqp_url, h.names, app_id="test")
    try:
        pub.publish(AmqpNames.routing_key(0), wire.encode(late))
    finally:
        pub.close()
    h.wait(lambda: h.version() == 1, what="the late update applied")
    assert h.store.turn() == 1 and h.store.counters().get("rejected", 0) == 0
    assert LEASE_RENEW < HOLDER_SILENCE
