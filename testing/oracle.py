"""The exact-sum oracle of the integration tests and the chaos bench: integer updates whose
float32 sums are exact, so the global state can be compared byte for byte."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dssgd.shared import wire
from dssgd.shared.amqp_names import REASON_HEADER
from dssgd.shared.broker import connect as amqp_connect

from testing.runs import RunHandle


def integer_update(
    h: RunHandle, pid: int, seq: int, rng: np.random.Generator, k: int = 50, base: int = 0
) -> wire.Update:
    n = h.init.size
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    vals = rng.integers(-3, 4, size=k).astype(np.float32)
    return wire.Update(h.cfg.run_id, pid, seq, base, n, idx, vals)


def expected_state(h: RunHandle, updates: list[wire.Update]) -> tuple[np.ndarray, np.ndarray]:
    w = h.init.astype(np.float64)
    stat = np.zeros(h.init.size, np.float64)
    for u in updates:
        w[u.indices] += u.values
        stat[u.indices] += 1
    return w.astype(np.float32), stat.astype(np.float32)


def assert_exact(h: RunHandle, updates: list[wire.Update]) -> None:
    w_exp, stat_exp = expected_state(h, updates)
    _, w, stat = h.store.read_params(with_stat=True)
    assert stat is not None
    assert w.tobytes() == w_exp.tobytes(), "global parameters differ from the exact sum"
    assert stat.tobytes() == stat_exp.tobytes(), "stat differs from the update counts"


def read_oracle(
    folder: Path, pid: int, h: RunHandle
) -> tuple[dict[int, wire.Update], list[wire.Update]]:
    """(every update sent by seq, the confirmed ones) from a synthetic participant's record."""
    sent: dict[int, wire.Update] = {}
    confirmed: list[wire.Update] = []
    for line in (folder / f"confirmed-{pid}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["state"] == "sent":
            sent[rec["seq"]] = wire.Update(
                h.cfg.run_id,
                pid,
                rec["seq"],
                0,
                h.init.size,
                np.array(rec["indices"], np.int64),
                np.array(rec["values"], np.float32),
            )
        else:
            confirmed.append(sent[rec["seq"]])
    return sent, confirmed


def drain_dead_letters(
    h: RunHandle, expected: int, timeout: float = 20
) -> list[tuple[str, bytes]]:
    conn = amqp_connect(h.conns.amqp_url, "dssgd-tests-dlq")
    ch = conn.channel()
    out: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        method, props, body = ch.basic_get(h.names.dead_queue, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        out.append(((props.headers or {}).get(REASON_HEADER, ""), body))
    conn.close()
    return out


def oracle_run(make_run: Callable[..., RunHandle], participants: int = 3) -> RunHandle:
    # Integer values within a generous γ and the paper's raw sum: every sum is exact in float32.
    return make_run(
        zero_init=True, participants=participants, theta_u=0.01, gamma=100.0, rule="sum"
    )
